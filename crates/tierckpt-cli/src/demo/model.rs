//! The demo's workload: a model of `LAYERS` weight matrices trained by
//! Adam on a synthetic regression task, sharded across ranks as in ZeRO, and
//! the checkpoint of one rank's state (tensors and metadata) with everything
//! a bitwise-identical resume needs.

use std::collections::BTreeMap;

use anyhow::{anyhow, ensure, Context, Result};
use tierckpt_client::TensorData;
use tierckpt_format::{Dtype, ShardLayout, TensorSpec};
use tierckpt_harness::rng::{mix, Rng};

#[cfg(test)]
mod tests;

// Tensors are saved as their in-memory bytes: safetensors is little-endian.
const _: () = assert!(cfg!(target_endian = "little"), "the demo trainer assumes a little-endian host");

/// Width of every weight matrix.
pub(crate) const HIDDEN: usize = 1024;
/// Number of weight matrices ("layers"), each saved as its own tensors.
pub(crate) const LAYERS: usize = 8;
/// Elements per loss partial sum; fixed so the loss does not depend on threads.
const BLOCK: usize = 1 << 16;
/// Batches in the synthetic data set; the loader shuffles them every epoch.
const BATCHES: u32 = 16;

const LR: f32 = 0.01;
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;
const NOISE: f32 = 0.5;

/// Spreads parameter indices before they are hashed.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

const STEP_TENSOR: &str = "trainer.step";
const RNG_TENSOR: &str = "trainer.rng_state";

/// Rows of each layer for a state of `state_bytes` (12 bytes per parameter).
pub(crate) fn model_rows(state_bytes: u64) -> Result<Vec<usize>> {
    let params = state_bytes / 12;
    let rows = (params / HIDDEN as u64) as usize;
    ensure!(
        rows >= LAYERS,
        "a training state of {state_bytes} bytes is too small: use at least {} bytes (--size)",
        12 * HIDDEN * LAYERS
    );
    Ok((0..LAYERS).map(|l| rows / LAYERS + usize::from(l < rows % LAYERS)).collect())
}

/// Default trainer threads: the cores, shared among `ranks` trainers.
pub(crate) fn default_threads(ranks: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores / ranks.max(1)).max(1)
}

/// A uniform f32 in [-1, 1), exact (24 random bits).
fn unit(h: u64) -> f32 {
    ((h >> 40) as f32) * (1.0 / (1u32 << 23) as f32) - 1.0
}

/// The regression target of parameter `i`: a Weyl sequence in [-1, 1).
fn weyl(i: u64) -> f32 {
    (((i as u32).wrapping_mul(0x9E37_79B9) >> 8) as f32) * (1.0 / (1u32 << 23) as f32) - 1.0
}

/// A data loader over a synthetic data set of `BATCHES` batches, reshuffled
/// at every epoch with the trainer's RNG. Its position is checkpointed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Loader {
    epoch: u64,
    position: usize,
    order: Vec<u32>,
}

impl Loader {
    fn next_batch(&mut self, rng: &mut Rng) -> u32 {
        if self.position >= self.order.len() {
            self.order = (0..BATCHES).collect();
            for i in (1..self.order.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                self.order.swap(i, j);
            }
            self.epoch += 1;
            self.position = 0;
        }
        self.position += 1;
        self.order[self.position - 1]
    }
}

/// The part of the model one rank holds, as in ZeRO: a contiguous range of
/// whole rows of the flat parameter vector, with the matching Adam moments.
/// Its tensors are its rows of every layer it touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shard {
    pub(crate) rank: u32,
    pub(crate) world_size: u32,
    /// Global index of its first parameter.
    pub(crate) base: usize,
    /// (layer, first row within the layer, rows).
    pub(crate) pieces: Vec<(usize, usize, usize)>,
}

impl Shard {
    /// Rank `rank`'s share of a model with these layer rows: rows
    /// [R r / W, R (r+1) / W) of the R rows of all layers in order.
    pub(crate) fn of(rows: &[usize], rank: u32, world_size: u32) -> Result<Self> {
        ensure!(rank < world_size, "rank {rank} is not below the world size {world_size}");
        let total: usize = rows.iter().sum();
        let w = world_size as usize;
        ensure!(
            total >= w,
            "a model of {total} rows of {HIDDEN} parameters cannot be split across {w} ranks: use a larger --size"
        );
        let (lo, hi) = (total * rank as usize / w, total * (rank as usize + 1) / w);
        let mut pieces = Vec::new();
        let mut off = 0;
        for (l, &n) in rows.iter().enumerate() {
            let (a, b) = (lo.max(off), hi.min(off + n));
            if a < b {
                pieces.push((l, a - off, b - a));
            }
            off += n;
        }
        Ok(Self { rank, world_size, base: lo * HIDDEN, pieces })
    }

    /// The whole model, on one rank.
    #[cfg(test)]
    pub(crate) fn whole(rows: &[usize]) -> Self {
        Self {
            rank: 0,
            world_size: 1,
            base: 0,
            pieces: rows.iter().enumerate().filter(|(_, &n)| n > 0).map(|(l, &n)| (l, 0, n)).collect(),
        }
    }

    /// Rows of all layers it holds.
    pub(crate) fn rows(&self) -> usize {
        self.pieces.iter().map(|p| p.2).sum()
    }

    /// Parameters it holds.
    pub(crate) fn params(&self) -> usize {
        self.rows() * HIDDEN
    }

    /// "layer:first_row+rows,...", kept in the checkpoint's metadata.
    fn describe(&self) -> String {
        self.pieces.iter().map(|(l, a, n)| format!("{l}:{a}+{n}")).collect::<Vec<_>>().join(",")
    }
}

/// Everything a training process holds: its shard of the weights and of
/// Adam's moments, step counter, RNG and data loader.
pub(crate) struct TrainState {
    seed: u64,
    step: u64,
    rng: Rng,
    loader: Loader,
    shard: Shard,
    params: Vec<f32>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

/// The per-step constants of the Adam kernel.
#[derive(Clone, Copy)]
struct StepConsts {
    noise_seed: u64,
    shift: f32,
    bc1: f32,
    bc2: f32,
}

/// Splits three equal-length arrays and the per-block loss sums into one
/// contiguous range per thread (on block boundaries), and runs `f` on each.
fn parallel_blocks<F>(threads: usize, p: &mut [f32], m: &mut [f32], v: &mut [f32], losses: &mut [f64], f: F)
where
    F: Fn(usize, &mut [f32], &mut [f32], &mut [f32], &mut [f64]) + Sync,
{
    let per = losses.len().div_ceil(threads.max(1)).max(1);
    let (mut p, mut m, mut v, mut l) = (p, m, v, losses);
    let mut start = 0;
    std::thread::scope(|s| {
        while !l.is_empty() {
            let nb = per.min(l.len());
            let ne = (nb * BLOCK).min(p.len());
            let (p0, p1) = std::mem::take(&mut p).split_at_mut(ne);
            let (m0, m1) = std::mem::take(&mut m).split_at_mut(ne);
            let (v0, v1) = std::mem::take(&mut v).split_at_mut(ne);
            let (l0, l1) = std::mem::take(&mut l).split_at_mut(nb);
            (p, m, v, l) = (p1, m1, v1, l1);
            let f = &f;
            let at = start;
            if l.is_empty() {
                f(at, p0, m0, v0, l0);
            } else {
                s.spawn(move || f(at, p0, m0, v0, l0));
            }
            start += ne;
        }
    });
}

/// One Adam step over a range of parameters starting at global index `start`.
fn adam_range(start: usize, p: &mut [f32], m: &mut [f32], v: &mut [f32], losses: &mut [f64], k: StepConsts) {
    for (b, loss) in losses.iter_mut().enumerate() {
        let lo = b * BLOCK;
        let hi = (lo + BLOCK).min(p.len());
        let mut acc = 0f64;
        let it = p[lo..hi].iter_mut().zip(&mut m[lo..hi]).zip(&mut v[lo..hi]);
        for (j, ((x, mj), vj)) in it.enumerate() {
            let i = (start + lo + j) as u64;
            let d = *x - (weyl(i) + k.shift);
            let g = d + NOISE * unit(mix(k.noise_seed ^ i.wrapping_mul(GOLDEN)));
            *mj = BETA1 * *mj + (1.0 - BETA1) * g;
            *vj = BETA2 * *vj + (1.0 - BETA2) * g * g;
            *x -= LR * (*mj / k.bc1) / ((*vj / k.bc2).sqrt() + EPS);
            acc += f64::from(d * d);
        }
        *loss = 0.5 * acc;
    }
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and u8 no alignment requirement.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

/// Names of the three tensors of layer `l`.
fn layer_names(l: usize) -> [String; 3] {
    [
        format!("model.layers.{l}.weight"),
        format!("optimizer.exp_avg.model.layers.{l}.weight"),
        format!("optimizer.exp_avg_sq.model.layers.{l}.weight"),
    ]
}

/// The tensors of a checkpoint of this shard: its rows of each layer.
fn checkpoint_specs(shard: &Shard) -> Vec<TensorSpec> {
    let mut specs = Vec::with_capacity(3 * shard.pieces.len() + 2);
    for &(l, _, r) in &shard.pieces {
        for name in layer_names(l) {
            specs.push(TensorSpec { name, dtype: Dtype::F32, shape: vec![r, HIDDEN] });
        }
    }
    specs.push(TensorSpec { name: STEP_TENSOR.into(), dtype: Dtype::I64, shape: vec![1] });
    specs.push(TensorSpec { name: RNG_TENSOR.into(), dtype: Dtype::U8, shape: vec![32] });
    specs
}

/// The largest shard's checkpoint file length at the last step of a run
/// (rank 0 holds the most rows), from the layout alone.
pub(crate) fn largest_checkpoint_len(seed: u64, steps: u64, rows: &[usize], world: usize) -> Result<u64> {
    let mut max = 0;
    for rank in 0..world as u32 {
        let shard = Shard::of(rows, rank, world as u32)?;
        let probe = TrainState {
            seed,
            step: steps,
            rng: Rng::seeded(0),
            loader: Loader { epoch: steps, position: 0, order: (0..BATCHES).collect() },
            shard: shard.clone(),
            params: Vec::new(),
            exp_avg: Vec::new(),
            exp_avg_sq: Vec::new(),
        };
        max = max.max(ShardLayout::new(&checkpoint_specs(&shard), &probe.metadata())?.file_len);
    }
    Ok(max)
}

/// Byte buffers of the small tensors, filled by a restore.
#[derive(Default)]
struct Scalars {
    step: [u8; 8],
    rng: [u8; 32],
}

impl TrainState {
    /// A freshly initialised shard of the model (every page of it touched).
    pub(crate) fn new(seed: u64, shard: &Shard, threads: usize) -> Self {
        let n = shard.params();
        let mut params = vec![0f32; n];
        let mut exp_avg = vec![0f32; n];
        let mut exp_avg_sq = vec![0f32; n];
        let mut blocks = vec![0f64; n.div_ceil(BLOCK)];
        let init_seed = mix(seed ^ 0x1417);
        let base = shard.base;
        parallel_blocks(threads, &mut params, &mut exp_avg, &mut exp_avg_sq, &mut blocks, |at, p, m, v, _| {
            for (j, x) in p.iter_mut().enumerate() {
                *x = 0.5 * unit(mix(init_seed ^ ((base + at + j) as u64).wrapping_mul(GOLDEN)));
            }
            m.fill(0.0);
            v.fill(0.0);
        });
        Self {
            seed,
            step: 0,
            rng: Rng::seeded(seed),
            loader: Loader::default(),
            shard: shard.clone(),
            params,
            exp_avg,
            exp_avg_sq,
        }
    }

    /// Steps trained so far.
    pub(crate) fn step(&self) -> u64 {
        self.step
    }

    /// Parameters of this shard.
    pub(crate) fn params(&self) -> usize {
        self.params.len()
    }

    /// Bytes of weights and moments.
    pub(crate) fn state_bytes(&self) -> u64 {
        12 * self.params.len() as u64
    }

    /// One training step; returns the mean loss of this shard's parameters
    /// before the update.
    pub(crate) fn train_step(&mut self, threads: usize) -> f64 {
        let noise_seed = self.rng.next_u64();
        let batch = self.loader.next_batch(&mut self.rng);
        self.step += 1;
        let t = self.step as f64;
        let k = StepConsts {
            noise_seed,
            shift: 0.25 * unit(mix(mix(self.seed) ^ u64::from(batch))),
            bc1: (1.0 - f64::from(BETA1).powf(t)) as f32,
            bc2: (1.0 - f64::from(BETA2).powf(t)) as f32,
        };
        let mut losses = vec![0f64; self.params.len().div_ceil(BLOCK)];
        let base = self.shard.base;
        parallel_blocks(
            threads,
            &mut self.params,
            &mut self.exp_avg,
            &mut self.exp_avg_sq,
            &mut losses,
            |at, p, m, v, l| adam_range(base + at, p, m, v, l, k),
        );
        losses.iter().sum::<f64>() / self.params.len().max(1) as f64
    }

    /// xxh3-128 of every byte of state, in hex.
    pub(crate) fn state_hash(&self) -> String {
        let mut h = xxhash_rust::xxh3::Xxh3Default::new();
        h.update(&self.step.to_le_bytes());
        h.update(&self.rng.to_bytes());
        h.update(&self.loader.epoch.to_le_bytes());
        h.update(&(self.loader.position as u64).to_le_bytes());
        for b in &self.loader.order {
            h.update(&b.to_le_bytes());
        }
        for a in [&self.params, &self.exp_avg, &self.exp_avg_sq] {
            h.update(f32_bytes(a));
        }
        format!("{:032x}", h.digest128())
    }

    /// Non-tensor state, as safetensors `__metadata__`.
    fn metadata(&self) -> BTreeMap<String, String> {
        let order: Vec<String> = self.loader.order.iter().map(u32::to_string).collect();
        BTreeMap::from([
            ("format".to_string(), "tierckpt-demo/2".to_string()),
            ("step".to_string(), self.step.to_string()),
            ("seed".to_string(), self.seed.to_string()),
            ("params".to_string(), self.params.len().to_string()),
            ("rank".to_string(), self.shard.rank.to_string()),
            ("world_size".to_string(), self.shard.world_size.to_string()),
            ("shard.base".to_string(), self.shard.base.to_string()),
            ("shard.rows".to_string(), self.shard.describe()),
            ("optimizer".to_string(), format!("adam lr={LR} betas=({BETA1},{BETA2}) eps={EPS}")),
            ("data.epoch".to_string(), self.loader.epoch.to_string()),
            ("data.position".to_string(), self.loader.position.to_string()),
            ("data.order".to_string(), order.join(",")),
            ("rng".to_string(), format!("xoshiro256** state in tensor {RNG_TENSOR}")),
        ])
    }

    /// The checkpoint's tensors, borrowing the state, and its metadata.
    pub(crate) fn with_checkpoint<R>(&self, f: impl FnOnce(&[TensorData<'_>], &BTreeMap<String, String>) -> R) -> R {
        let specs = checkpoint_specs(&self.shard);
        let step = (self.step as i64).to_le_bytes();
        let rng = self.rng.to_bytes();
        let mut data: Vec<&[u8]> = Vec::with_capacity(specs.len());
        let mut at = 0;
        for &(_, _, r) in &self.shard.pieces {
            let range = at * HIDDEN..(at + r) * HIDDEN;
            for a in [&self.params, &self.exp_avg, &self.exp_avg_sq] {
                data.push(f32_bytes(&a[range.clone()]));
            }
            at += r;
        }
        data.push(&step);
        data.push(&rng);
        let tensors: Vec<TensorData<'_>> = specs
            .iter()
            .zip(data)
            .map(|(s, d)| TensorData { name: &s.name, dtype: s.dtype, shape: &s.shape, data: d })
            .collect();
        f(&tensors, &self.metadata())
    }

    /// Fills the state from a checkpoint: `load` gets one buffer per tensor
    /// name and returns the checkpoint's metadata.
    pub(crate) fn restore_with(
        &mut self,
        load: impl FnOnce(&mut [(&str, &mut [u8])]) -> Result<BTreeMap<String, String>>,
    ) -> Result<()> {
        let specs = checkpoint_specs(&self.shard);
        let mut sc = Scalars::default();
        let meta = {
            let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(specs.len());
            let (mut p, mut m, mut v) = (&mut self.params[..], &mut self.exp_avg[..], &mut self.exp_avg_sq[..]);
            for &(_, _, r) in &self.shard.pieces {
                for a in [&mut p, &mut m, &mut v] {
                    let (head, tail) = std::mem::take(a).split_at_mut(r * HIDDEN);
                    *a = tail;
                    bufs.push(f32_bytes_mut(head));
                }
            }
            bufs.push(&mut sc.step);
            bufs.push(&mut sc.rng);
            let mut targets: Vec<(&str, &mut [u8])> = specs.iter().map(|s| s.name.as_str()).zip(bufs).collect();
            load(&mut targets)?
        };
        self.restore_metadata(&meta, &sc)
    }

    /// Checks a loaded checkpoint's metadata against this rank's shard and
    /// takes the step, RNG and data loader from it.
    fn restore_metadata(&mut self, meta: &BTreeMap<String, String>, sc: &Scalars) -> Result<()> {
        let get = |k: &str| meta.get(k).ok_or_else(|| anyhow!("the checkpoint has no metadata {k:?}"));
        let num = |k: &str| -> Result<u64> { get(k)?.parse().with_context(|| format!("metadata {k:?}")) };
        let step = num("step")?;
        ensure!(
            i64::from_le_bytes(sc.step) as u64 == step,
            "the checkpoint's step tensor ({}) and metadata ({step}) disagree",
            i64::from_le_bytes(sc.step)
        );
        ensure!(
            num("seed")? == self.seed,
            "the checkpoint was written by a run with seed {}, not {}",
            num("seed")?,
            self.seed
        );
        let (rows, base) = (get("shard.rows")?, num("shard.base")?);
        ensure!(
            *rows == self.shard.describe() && base == self.shard.base as u64,
            "the checkpoint holds rows {rows} from parameter {base}, but rank {} of {} holds rows {} from parameter {}",
            self.shard.rank,
            self.shard.world_size,
            self.shard.describe(),
            self.shard.base
        );
        let order = get("data.order")?;
        let order: Vec<u32> = if order.is_empty() {
            Vec::new()
        } else {
            order.split(',').map(str::parse).collect::<Result<_, _>>().context("metadata \"data.order\"")?
        };
        self.loader = Loader { epoch: num("data.epoch")?, position: num("data.position")? as usize, order };
        self.rng = Rng::from_bytes(&sc.rng);
        self.step = step;
        Ok(())
    }
}

/// The job's state hash: xxh3-128 of the ranks' state hashes, in rank order.
pub(crate) fn combined_hash(rank_hashes: &[String]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    for r in rank_hashes {
        h.update(r.as_bytes());
    }
    format!("{:032x}", h.digest128())
}
