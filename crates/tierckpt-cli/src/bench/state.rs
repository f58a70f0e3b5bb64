//! The training state the benchmarks save: bf16 tensors of pseudo-random
//! bytes in pre-faulted caller memory, and the change a training step makes
//! to it between checkpoints (`--changed`: a fraction of the shard's 4 MiB
//! chunks, chosen at random at every step, rewritten with fresh bytes).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use clap::Args;
use tierckpt_client::TensorData;
use tierckpt_format::{Dtype, ShardLayout, TensorSpec, DEFAULT_CHUNK_SIZE};
use tierckpt_harness::rng::{fill_random, mix, Rng};
use tierckpt_harness::size::parse_size;

/// Seed of the harness generator that picks and rewrites changed chunks.
const CHANGE_SEED: u64 = 0x7F4A_7C15;

/// Caller memory that starts `offset` bytes after a page boundary, every
/// page written (no page fault is timed later).
pub(crate) struct Buf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buf {
    /// A buffer of `len` bytes at `offset` (modulo a page) from a page
    /// boundary, filled with `fill`.
    pub(crate) fn new(len: usize, offset: usize, fill: u8) -> Self {
        const PAGE: usize = 4096;
        let offset = offset % PAGE;
        let mut v = vec![0u8; len + PAGE + offset];
        let start = v.as_ptr().align_offset(PAGE) + offset;
        v[start..start + len].fill(fill);
        Self { v, start, len }
    }

    /// A page-aligned buffer of `len` random bytes (seed `seed`).
    pub(crate) fn random(len: usize, seed: u64) -> Self {
        let mut b = Self::new(len, 0, 0);
        let part = len.div_ceil(cores()).max(1);
        let pieces: Vec<(&mut [u8], u64)> =
            b.bytes_mut().chunks_mut(part).enumerate().map(|(i, p)| (p, mix(seed + i as u64))).collect();
        fill_in_parallel(pieces);
        b
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.v[self.start..self.start + self.len]
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

/// The machine's cores (what the client's copy workers use too).
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Fills each piece with the random bytes of its seed, on every core.
fn fill_in_parallel(pieces: Vec<(&mut [u8], u64)>) {
    let n = cores().min(pieces.len()).max(1);
    let mut parts: Vec<Vec<(&mut [u8], u64)>> = (0..n).map(|_| Vec::new()).collect();
    for (i, p) in pieces.into_iter().enumerate() {
        parts[i % n].push(p);
    }
    std::thread::scope(|s| {
        for part in parts {
            s.spawn(move || part.into_iter().for_each(|(buf, seed)| fill_random(buf, seed)));
        }
    });
}

/// Byte lengths of `n` bf16 tensors adding up to `total`.
pub(crate) fn tensor_lens(total: u64, n: usize) -> Result<Vec<usize>> {
    if n == 0 {
        bail!("--tensors must be at least 1");
    }
    if total == 0 || total & 1 == 1 {
        bail!("--size must be a positive even number of bytes (the tensors are bf16); got {total}");
    }
    let elems = total / 2;
    if elems < n as u64 {
        bail!("--size {total} is too small for {n} bf16 tensors");
    }
    let (q, r) = (elems / n as u64, elems % n as u64);
    Ok((0..n as u64).map(|i| 2 * (q + u64::from(i < r)) as usize).collect())
}

/// Cuts `buf` into one slice per tensor (`names` and `lens` in order): the
/// targets of `Client::load_into` and of the memcpy floor.
pub(crate) fn restore_targets<'a>(
    names: &'a [String],
    lens: &[usize],
    buf: &'a mut Buf,
) -> Vec<(&'a str, &'a mut [u8])> {
    let mut targets = Vec::with_capacity(lens.len());
    let mut rest = buf.bytes_mut();
    for (name, &l) in names.iter().zip(lens) {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(l);
        targets.push((name.as_str(), head));
        rest = tail;
    }
    targets
}

/// Parses `--changed`: a fraction of the shard's chunks in [0, 1].
pub(crate) fn parse_changed(s: &str) -> Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|_| format!("--changed takes a fraction in [0, 1], like 0.25; got {s:?}"))?;
    if !(0.0..=1.0).contains(&x) {
        return Err(format!("--changed takes a fraction in [0, 1] of the shard's chunks; got {x}"));
    }
    Ok(x)
}

/// One rank's shard of training state: `tensors` bf16 tensors named
/// `layers.{i}.weight`, each in its own caller buffer.
pub(crate) struct State {
    names: Vec<String>,
    shapes: Vec<[usize; 1]>,
    bufs: Vec<Buf>,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) layout: ShardLayout,
    rng: Rng,
}

/// What one training step changed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Change {
    pub(crate) chunks: usize,
    /// Tensor bytes rewritten.
    pub(crate) bytes: u64,
}

impl State {
    /// `size` bytes of random bf16 tensors in `tensors` buffers, each
    /// `buffer_offset` bytes past a page boundary; `bench` names the
    /// benchmark in the shard's metadata.
    pub(crate) fn new(size: u64, tensors: usize, buffer_offset: usize, bench: &str) -> Result<Self> {
        let lens = tensor_lens(size, tensors)?;
        let names: Vec<String> = (0..lens.len()).map(|i| format!("layers.{i}.weight")).collect();
        let shapes: Vec<[usize; 1]> = lens.iter().map(|&l| [l / 2]).collect();
        let specs: Vec<TensorSpec> = (0..lens.len())
            .map(|i| TensorSpec { name: names[i].clone(), dtype: Dtype::BF16, shape: shapes[i].to_vec() })
            .collect();
        let metadata = BTreeMap::from([("bench".to_string(), bench.to_string())]);
        let layout = ShardLayout::new(&specs, &metadata)?;
        let mut bufs: Vec<Buf> = lens.iter().map(|&l| Buf::new(l, buffer_offset, 0)).collect();
        fill_in_parallel(bufs.iter_mut().enumerate().map(|(i, b)| (b.bytes_mut(), i as u64 + 1)).collect());
        Ok(Self { names, shapes, bufs, metadata, layout, rng: Rng::seeded(CHANGE_SEED) })
    }

    /// Tensor bytes.
    pub(crate) fn bytes(&self) -> u64 {
        self.bufs.iter().map(|b| b.len as u64).sum()
    }

    /// Bytes of the shard file (tensors and the safetensors header).
    pub(crate) fn file_bytes(&self) -> u64 {
        self.layout.file_len
    }

    /// Chunks of the shard file's manifest.
    pub(crate) fn chunks(&self) -> usize {
        self.file_bytes().div_ceil(DEFAULT_CHUNK_SIZE) as usize
    }

    pub(crate) fn names(&self) -> &[String] {
        &self.names
    }

    /// The tensors, as `Client::save` takes them.
    pub(crate) fn tensors(&self) -> Vec<TensorData<'_>> {
        (0..self.bufs.len())
            .map(|i| TensorData {
                name: &self.names[i],
                dtype: Dtype::BF16,
                shape: &self.shapes[i],
                data: self.bufs[i].bytes(),
            })
            .collect()
    }

    /// Each tensor's bytes.
    pub(crate) fn data(&self) -> Vec<&[u8]> {
        self.bufs.iter().map(Buf::bytes).collect()
    }

    /// Each tensor's length in bytes.
    pub(crate) fn lens(&self) -> Vec<usize> {
        self.bufs.iter().map(|b| b.len).collect()
    }

    /// Whether restored `targets` hold exactly the tensors' bytes.
    pub(crate) fn matches(&self, targets: &[(&str, &mut [u8])]) -> bool {
        self.bufs.len() == targets.len() && self.bufs.iter().zip(targets).all(|(b, (_, d))| b.bytes() == &d[..])
    }

    /// Chunks changed by one step at `fraction`: rounded, at least one
    /// unless `fraction` is 0.
    pub(crate) fn changed_chunks(&self, fraction: f64) -> usize {
        let n = (fraction * self.chunks() as f64).round() as usize;
        if fraction > 0.0 {
            n.clamp(1, self.chunks())
        } else {
            0
        }
    }

    /// A training step: rewrites the tensor bytes of `fraction` of the
    /// shard's chunks, chosen at random, with fresh random bytes.
    pub(crate) fn step(&mut self, fraction: f64) -> Change {
        let (n, want) = (self.chunks(), self.changed_chunks(fraction));
        // A partial Fisher-Yates shuffle picks `want` distinct chunks.
        let mut order: Vec<usize> = (0..n).collect();
        for i in 0..want {
            let j = i + self.rng.below((n - i) as u64) as usize;
            order.swap(i, j);
        }
        let mut chosen = order[..want].to_vec();
        chosen.sort_unstable();
        let ranges: Vec<(u64, u64)> = chosen
            .iter()
            .map(|&c| (c as u64 * DEFAULT_CHUNK_SIZE, ((c as u64 + 1) * DEFAULT_CHUNK_SIZE).min(self.file_bytes())))
            .collect();
        let mut pieces = Vec::new();
        let mut bytes = 0;
        for (buf, e) in self.bufs.iter_mut().zip(&self.layout.entries) {
            let (ea, eb) = (e.offset, e.offset + e.len);
            let mut rest = buf.bytes_mut();
            let mut at = ea;
            for &(a, b) in ranges.iter().filter(|(a, b)| *a < eb && *b > ea) {
                let (a, b) = (a.max(ea), b.min(eb));
                let (_, tail) = std::mem::take(&mut rest).split_at_mut((a - at) as usize);
                let (piece, tail) = tail.split_at_mut((b - a) as usize);
                bytes += piece.len() as u64;
                pieces.push((piece, self.rng.next_u64()));
                (rest, at) = (tail, b);
            }
        }
        fill_in_parallel(pieces);
        Change { chunks: want, bytes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lens_add_up() {
        let l = tensor_lens(1 << 30, 64).unwrap();
        assert_eq!(l.len(), 64);
        assert_eq!(l.iter().sum::<usize>(), 1 << 30);
        let l = tensor_lens(1000, 7).unwrap();
        assert_eq!(l.iter().sum::<usize>(), 1000);
        assert!(l.iter().all(|x| x % 2 == 0));
        assert!(tensor_lens(1001, 7).is_err());
        assert!(tensor_lens(10, 7).is_err());
        assert!(tensor_lens(10, 0).is_err());
    }

    #[test]
    fn changed_is_a_fraction() {
        assert_eq!(parse_changed("0").unwrap(), 0.0);
        assert_eq!(parse_changed("1.0").unwrap(), 1.0);
        assert!(parse_changed("1.5").unwrap_err().contains("--changed"));
        assert!(parse_changed("-0.1").unwrap_err().contains("--changed"));
        assert!(parse_changed("lots").unwrap_err().contains("--changed"));
    }

    /// Indices of the chunks whose bytes differ between two file images.
    fn differing_chunks(a: &State, before: &[Vec<u8>]) -> Vec<usize> {
        let mut out = std::collections::BTreeSet::new();
        for ((now, was), e) in a.data().iter().zip(before).zip(&a.layout.entries) {
            for (i, (x, y)) in now.iter().zip(was).enumerate() {
                if x != y {
                    out.insert(((e.offset + i as u64) / DEFAULT_CHUNK_SIZE) as usize);
                }
            }
        }
        out.into_iter().collect()
    }

    #[test]
    fn a_step_rewrites_the_chosen_share_of_chunks() {
        // 40 MiB in 3 tensors: 11 chunks, tensors straddling chunk borders.
        let mut s = State::new(40 << 20, 3, 16, "test").unwrap();
        assert_eq!(s.chunks(), 11);
        assert_eq!(s.bytes(), 40 << 20);
        let snapshot = |s: &State| s.data().iter().map(|d| d.to_vec()).collect::<Vec<_>>();

        let before = snapshot(&s);
        let c = s.step(1.0);
        assert_eq!(c.chunks, 11);
        assert_eq!(c.bytes, 40 << 20);
        assert_eq!(differing_chunks(&s, &before), (0..11).collect::<Vec<_>>());

        let before = snapshot(&s);
        let c = s.step(0.3);
        assert_eq!(c.chunks, 3);
        let changed = differing_chunks(&s, &before);
        assert_eq!(changed.len(), 3, "{changed:?}");
        let before2 = snapshot(&s);
        s.step(0.3);
        assert_ne!(differing_chunks(&s, &before2), changed, "chunks are chosen anew at each step");

        let before = snapshot(&s);
        assert_eq!(s.step(0.0).chunks, 0);
        assert!(differing_chunks(&s, &before).is_empty());
        assert_eq!(s.changed_chunks(0.001), 1);
    }
}

/// What each training step of a benchmark rewrote, as its report gives it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FreshData {
    /// `--changed`: the share of the shard's chunks each step rewrites.
    pub changed_fraction: f64,
    /// Chunks of the shard file (of `chunk_size` bytes).
    pub chunks: usize,
    /// Bytes of a chunk (the manifest's).
    pub chunk_size: u64,
    /// Chunks each step rewrote.
    pub changed_chunks_per_step: usize,
    /// Tensor bytes each step rewrote.
    pub changed_bytes_per_step: u64,
}

impl FreshData {
    /// `--changed`, the shard's chunk count, and what a step changed.
    pub(crate) fn new(changed_fraction: f64, chunks: usize, change: Change) -> Self {
        Self {
            changed_fraction,
            chunks,
            chunk_size: DEFAULT_CHUNK_SIZE,
            changed_chunks_per_step: change.chunks,
            changed_bytes_per_step: change.bytes,
        }
    }

    /// The line a table report gives it in.
    pub(crate) fn describe(&self) -> String {
        format!(
            "each step rewrites {} of {} chunks of {} ({}; --changed {})",
            self.changed_chunks_per_step,
            self.chunks,
            crate::output::human_bytes(self.chunk_size),
            crate::output::human_bytes(self.changed_bytes_per_step),
            self.changed_fraction
        )
    }
}

/// The shard a steady-state benchmark saves step after step, and how it
/// measures (shared by `bench memory` and `bench replicate`).
#[derive(Args, Debug, Clone)]
pub struct ShardArgs {
    /// Total tensor bytes of the shard, like "1GiB", "512MB" or a number of bytes.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Number of tensors the shard is split into (bf16, equal sizes).
    #[arg(long, default_value_t = 64)]
    pub tensors: usize,
    /// Measured checkpoints (saves, or replications), and measured restores.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Unmeasured checkpoints before the measured ones [default: keep_last + 2,
    /// enough for retention to start recycling segments].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Steps each daemon keeps (its retention).
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    /// Repetitions of the floor up front (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub floor_reps: usize,
    /// Fraction of the shard's 4 MiB chunks that a training step rewrites
    /// before every save but the first (chosen at random at each step).
    #[arg(long, value_name = "FRACTION", default_value_t = 1.0, value_parser = parse_changed, allow_negative_numbers = true)]
    pub changed: f64,
}
