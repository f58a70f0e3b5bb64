//! `tierckpt bench`: benchmarks that report ratios against a floor measured
//! in the same run (see docs/BENCHMARKS.md).
//!
//! `bench memory` saves a state into the local memory tier of a real daemon
//! child and restores it, and compares both with a one-thread memcpy of the
//! same bytes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use tierckpt_client::{Client, TensorData};
use tierckpt_format::{Dtype, ShardKey, ShardLayout, TensorSpec};

use crate::daemon_proc::{DaemonOptions, DaemonProcess};
use crate::output;

/// Ratio to the floor that `bench memory` aims for, for saves and restores.
pub const MEMORY_TARGET_RATIO: f64 = 1.2;

/// Benchmarks with ratios against a floor measured in the same run.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub cmd: BenchCmd,
}

#[derive(Subcommand, Debug, Clone)]
pub enum BenchCmd {
    /// Save into and restore from the local memory tier, against a
    /// one-thread memcpy of the same bytes.
    Memory(MemoryArgs),
}

#[derive(Args, Debug, Clone)]
pub struct MemoryArgs {
    /// Total tensor bytes of the state, like "1GiB", "512MB" or a number of bytes.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub size: u64,
    /// Number of tensors the state is split into (bf16, equal sizes).
    #[arg(long, default_value_t = 64)]
    pub tensors: usize,
    /// Measured saves, and measured restores.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Unmeasured saves before the measured ones [default: keep_last + 2,
    /// enough for retention to start recycling segments].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Steps the daemon keeps (its retention).
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    /// Repetitions of the memcpy floor (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub floor_reps: usize,
    /// Offset of every caller buffer from a page boundary. 0 matches pinned
    /// host memory and torch's 64-byte-aligned CPU tensors; malloc hands out
    /// large blocks at 16.
    #[arg(long, default_value_t = 0)]
    pub buffer_offset: usize,
    /// Directory (a tmpfs) in which the daemon's memory tier is created, in a
    /// fresh subdirectory removed at the end. A tmpfs mounted with
    /// `huge=within_size` shows what huge pages do (docs/BENCHMARKS.md).
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s).map_err(|e| format!("{s:?} is not a size ({e}); write it like \"1GiB\" or \"512MB\""))
}

pub fn run(args: &BenchArgs, json: bool) -> Result<()> {
    match &args.cmd {
        BenchCmd::Memory(a) => {
            let report = memory(a)?;
            if json {
                output::print_json(&report);
            } else {
                print_memory(&report);
            }
            Ok(())
        }
    }
}

/// What `bench memory` measured. Times are seconds; ratios are a time over
/// `memcpy_floor_s`.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub benchmark: &'static str,
    /// Tensor bytes of the state (what the floor copies).
    pub bytes: u64,
    /// Bytes of the shard file (tensor bytes plus the safetensors header).
    pub file_bytes: u64,
    pub tensors: usize,
    pub dtype: &'static str,
    pub iters: usize,
    pub warmup: usize,
    pub keep_last: usize,
    /// Copy workers the client uses for a save and for a restore of this size.
    pub threads: usize,
    pub restore_threads: usize,
    /// Threads of the floor (one, by definition).
    pub floor_threads: usize,
    /// Offset of the caller's buffers from a page boundary.
    pub buffer_offset: usize,
    pub memcpy_floor_s: f64,
    pub memcpy_floor_gibps: f64,
    pub memcpy_floor_min_s: f64,
    /// Floor repetitions: `floor_reps` up front, then one before each
    /// measured save and restore.
    pub floor_samples: usize,
    /// Median time the caller is blocked by a save, in steady state.
    pub save_stall_s: f64,
    pub save_gibps: f64,
    pub save_ratio: f64,
    /// Medians of each phase of the measured saves (they need not add up to
    /// the median total).
    pub save_reserve_s: f64,
    pub save_copy_s: f64,
    pub save_seal_s: f64,
    pub save_stall_min_s: f64,
    pub save_stall_max_s: f64,
    /// The very first save, into fresh tmpfs pages.
    pub save_stall_first_s: f64,
    pub save_first_ratio: f64,
    /// Median time of `load_into` (map, copy and verify every checksum).
    pub restore_s: f64,
    pub restore_gibps: f64,
    pub restore_ratio: f64,
    /// Median time to map and populate the shard, a part of `restore_s`.
    pub restore_map_s: f64,
    pub restore_min_s: f64,
    pub restore_first_s: f64,
    pub target_ratio: f64,
    pub save_meets_target: bool,
    pub restore_meets_target: bool,
    /// The restored bytes were compared with the saved ones.
    pub restored_identical: bool,
    pub steady_state: &'static str,
}

const STEADY_STATE: &str = "checksumming happens between saves, as between training steps: \
each save is waited for (wait_visible) outside the timed region";

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn gibps(bytes: u64, s: f64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / s
}

/// Fills `buf` with splitmix64 output seeded by `seed`, touching every page.
fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&next().to_le_bytes());
    }
    let rest = words.into_remainder();
    let last = next().to_le_bytes();
    rest.copy_from_slice(&last[..rest.len()]);
}

/// Caller memory that starts `offset` bytes after a page boundary.
struct Buf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, offset: usize) -> Self {
        const PAGE: usize = 4096;
        let offset = offset % PAGE;
        let v = vec![0u8; len + PAGE + offset];
        let start = v.as_ptr().align_offset(PAGE) + offset;
        Self { v, start, len }
    }

    fn bytes(&self) -> &[u8] {
        &self.v[self.start..self.start + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Byte lengths of `n` bf16 tensors adding up to `total`.
fn tensor_lens(total: u64, n: usize) -> Result<Vec<usize>> {
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

/// Runs `bench memory` and returns its figures.
pub fn memory(a: &MemoryArgs) -> Result<MemoryReport> {
    if a.iters == 0 || a.floor_reps == 0 {
        bail!("--iters and --floor-reps must be at least 1");
    }
    if a.keep_last == 0 {
        bail!("--keep-last must be at least 1");
    }
    let warmup = a.warmup.unwrap_or(a.keep_last + 2);
    let lens = tensor_lens(a.size, a.tensors)?;
    let bytes = a.size;

    // The state, in pre-faulted caller memory.
    let names: Vec<String> = (0..lens.len()).map(|i| format!("layers.{i}.weight")).collect();
    let shapes: Vec<[usize; 1]> = lens.iter().map(|&l| [l / 2]).collect();
    let mut state_bufs: Vec<Buf> = lens.iter().map(|&l| Buf::new(l, a.buffer_offset)).collect();
    {
        let n = cores().min(state_bufs.len());
        let mut parts: Vec<Vec<(usize, &mut [u8])>> = (0..n).map(|_| Vec::new()).collect();
        for (i, buf) in state_bufs.iter_mut().enumerate() {
            parts[i % n].push((i, buf.bytes_mut()));
        }
        std::thread::scope(|s| {
            for part in parts {
                s.spawn(move || {
                    for (i, buf) in part {
                        fill_random(buf, i as u64 + 1);
                    }
                });
            }
        });
    }
    let state: Vec<&[u8]> = state_bufs.iter().map(Buf::bytes).collect();
    let tensors: Vec<TensorData<'_>> = (0..lens.len())
        .map(|i| TensorData { name: &names[i], dtype: Dtype::BF16, shape: &shapes[i], data: state[i] })
        .collect();
    let specs: Vec<TensorSpec> = (0..lens.len())
        .map(|i| TensorSpec { name: names[i].clone(), dtype: Dtype::BF16, shape: shapes[i].to_vec() })
        .collect();
    let metadata = BTreeMap::from([("bench".to_string(), "memory".to_string())]);
    let file_bytes = ShardLayout::new(&specs, &metadata)?.file_len;

    // The floor: one thread copies the same bytes into pre-faulted memory,
    // the buffer that later receives the restores. Besides `floor_reps`
    // repetitions up front, one repetition runs right before each measured
    // save and restore, so that floor and measurement see the same machine
    // (a VM's memory bandwidth drifts).
    let mut dst = Buf::new(bytes as usize, a.buffer_offset);
    dst.bytes_mut().fill(0x5A);
    let mut targets: Vec<(&str, &mut [u8])> = Vec::with_capacity(lens.len());
    {
        let mut rest = dst.bytes_mut();
        for (i, &l) in lens.iter().enumerate() {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(l);
            targets.push((names[i].as_str(), head));
            rest = tail;
        }
    }
    let mut floor = Vec::with_capacity(a.floor_reps + 2 * a.iters);
    let mut floor_rep = |targets: &mut Vec<(&str, &mut [u8])>| {
        let t = Instant::now();
        for (src, (_, d)) in state.iter().zip(targets.iter_mut()) {
            d.copy_from_slice(src);
        }
        std::hint::black_box(&mut *targets);
        floor.push(t.elapsed().as_secs_f64());
    };
    for _ in 0..a.floor_reps {
        floor_rep(&mut targets);
    }

    // A daemon of our own, on a fresh directory, sized for keep_last + 2 shards.
    let dir = tempfile::Builder::new()
        .prefix("tierckpt-bench-")
        .tempdir_in(&a.dir)
        .with_context(|| format!("creating a directory under {}", a.dir.display()))?;
    let mut opts = DaemonOptions::new(dir.path());
    opts.memory_tier_size = ((a.keep_last as u64 + 2) * file_bytes).to_string();
    opts.keep_last = a.keep_last;
    opts.http_addr = "off".into();
    let mut daemon = DaemonProcess::spawn(opts)?;
    let mut client = Client::connect(&daemon.socket)?;

    // Saves: successive steps of one namespace, like a training loop.
    let ns = "bench-memory";
    let mut saves = Vec::with_capacity(warmup + a.iters);
    for step in 0..(warmup + a.iters) as u64 {
        if step >= warmup as u64 {
            floor_rep(&mut targets);
        }
        let key = ShardKey::new(ns, step, 0);
        let t = client
            .save(&key, 1, &tensors, &metadata, false)
            .with_context(|| format!("saving step {step}"))?;
        // Outside the timed region: the daemon checksums before the next save.
        client.wait_visible(&key, Duration::from_secs(600))?;
        saves.push(t);
    }
    let measured = &saves[warmup..];
    let totals: Vec<f64> = measured.iter().map(|t| t.total_s()).collect();
    let phase = |f: fn(&tierckpt_client::SaveTiming) -> f64| median(&measured.iter().map(f).collect::<Vec<_>>());
    let save_stall_s = median(&totals);
    let last = ShardKey::new(ns, (warmup + a.iters - 1) as u64, 0);

    // Restores of the newest step into the pre-faulted buffer, verified.
    // The first one is reported apart; the floor runs before the others.
    let mut restores = Vec::with_capacity(a.iters + 1);
    for i in 0..=a.iters {
        if i > 0 {
            floor_rep(&mut targets);
        }
        let t = Instant::now();
        client.load_into(&last, &mut targets).context("restoring")?;
        restores.push(t.elapsed().as_secs_f64());
    }
    let restored_identical = state.iter().zip(&targets).all(|(src, (_, d))| src[..] == d[..]);
    if !restored_identical {
        bail!("the restored bytes differ from the saved ones");
    }
    drop(targets);
    let memcpy_floor_s = median(&floor);
    let mut maps = Vec::with_capacity(a.iters.min(5));
    for _ in 0..a.iters.min(5) {
        let t = Instant::now();
        let m = client.map_unverified(&last)?;
        maps.push(t.elapsed().as_secs_f64());
        drop(m);
    }
    let restore_s = median(&restores[1..]);

    drop(client);
    daemon.kill()?;
    drop(daemon);
    dir.close().context("removing the benchmark's memory tier")?;

    let threads = if bytes < 4 << 20 { 1 } else { cores().clamp(1, 8) };
    let chunks = file_bytes.div_ceil(tierckpt_format::DEFAULT_CHUNK_SIZE) as usize;
    let save_ratio = save_stall_s / memcpy_floor_s;
    let restore_ratio = restore_s / memcpy_floor_s;
    Ok(MemoryReport {
        benchmark: "memory",
        bytes,
        file_bytes,
        tensors: lens.len(),
        dtype: "BF16",
        iters: a.iters,
        warmup,
        keep_last: a.keep_last,
        threads,
        restore_threads: cores().min(8).min(chunks).max(1),
        floor_threads: 1,
        buffer_offset: a.buffer_offset % 4096,
        memcpy_floor_s,
        memcpy_floor_gibps: gibps(bytes, memcpy_floor_s),
        memcpy_floor_min_s: min(&floor),
        floor_samples: floor.len(),
        save_stall_s,
        save_gibps: gibps(bytes, save_stall_s),
        save_ratio,
        save_reserve_s: phase(|t| t.reserve_s),
        save_copy_s: phase(|t| t.copy_s),
        save_seal_s: phase(|t| t.seal_s),
        save_stall_min_s: min(&totals),
        save_stall_max_s: totals.iter().copied().fold(0.0, f64::max),
        save_stall_first_s: saves[0].total_s(),
        save_first_ratio: saves[0].total_s() / memcpy_floor_s,
        restore_s,
        restore_gibps: gibps(bytes, restore_s),
        restore_ratio,
        restore_map_s: median(&maps),
        restore_min_s: min(&restores[1..]),
        restore_first_s: restores[0],
        target_ratio: MEMORY_TARGET_RATIO,
        save_meets_target: save_ratio <= MEMORY_TARGET_RATIO,
        restore_meets_target: restore_ratio <= MEMORY_TARGET_RATIO,
        restored_identical,
        steady_state: STEADY_STATE,
    })
}

fn print_memory(r: &MemoryReport) {
    println!(
        "bench memory: {} in {} {} tensors; {} warm-up saves, then medians of {} saves and {} restores; keep_last {}",
        output::human_bytes(r.bytes),
        r.tensors,
        r.dtype.to_lowercase(),
        r.warmup,
        r.iters,
        r.iters,
        r.keep_last
    );
    let mut t = output::table(&["operation", "threads", "seconds", "GiB/s", "ratio to floor"]);
    let row = |t: &mut comfy_table::Table, op: &str, threads: String, s: f64, ratio: bool| {
        t.add_row(vec![
            op.to_string(),
            threads,
            format!("{s:.4}"),
            if ratio { format!("{:.2}", gibps(r.bytes, s)) } else { String::new() },
            if ratio { format!("{:.3}", s / r.memcpy_floor_s) } else { String::new() },
        ]);
    };
    row(&mut t, "memcpy into caller memory (the floor)", "1".into(), r.memcpy_floor_s, true);
    row(&mut t, "save: caller blocked (steady state)", r.threads.to_string(), r.save_stall_s, true);
    row(&mut t, "  reserve", String::new(), r.save_reserve_s, false);
    row(&mut t, "  copy into the segment", r.threads.to_string(), r.save_copy_s, false);
    row(&mut t, "  seal", String::new(), r.save_seal_s, false);
    row(&mut t, "save: first (fresh tmpfs pages)", r.threads.to_string(), r.save_stall_first_s, true);
    row(&mut t, "restore: load_into, checksums verified", r.restore_threads.to_string(), r.restore_s, true);
    row(&mut t, "  map and populate", String::new(), r.restore_map_s, false);
    row(&mut t, "restore: first", r.restore_threads.to_string(), r.restore_first_s, true);
    println!("{t}");
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "target: ratio at most {} -- save {:.3} ({}), restore {:.3} ({})",
        r.target_ratio,
        r.save_ratio,
        verdict(r.save_meets_target),
        r.restore_ratio,
        verdict(r.restore_meets_target)
    );
    println!("steady state: {}", r.steady_state);
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
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn random_fill_is_deterministic_and_covers_tails() {
        let (mut a, mut b) = (vec![0u8; 1003], vec![0u8; 1003]);
        fill_random(&mut a, 7);
        fill_random(&mut b, 7);
        assert_eq!(a, b);
        assert!(a[1000..].iter().any(|&x| x != 0));
    }
}
