//! `tierckpt demo`: the main job, on a local cluster.
//!
//! It starts a cluster of N node daemons (`tierckptd`, default 4) on
//! 127.0.0.1, each with a fresh memory tier under `/dev/shm`, replicating
//! every sealed shard to k=1 peer (ring: node i -> i+1), and draining every
//! complete checkpoint (`--persist-every`) to a persistent tier shared by all
//! nodes: a `file://` directory beside the memory tiers. Then it runs a job
//! of N training processes (`tierckpt demo-trainer`, this same executable),
//! rank r talking to node r's daemon. Each rank owns one shard of the model,
//! as in ZeRO: a 1/N slice of the weights and of Adam's two moments
//! (`--size` is the total across ranks), and checkpoints it every K steps.
//!
//! The demo runs the job once uninterrupted for a reference, then again with
//! three failures, each between two checkpoints (so work is lost and redone):
//!
//! 1. **trainer crash**: one rank's trainer is SIGKILLed; as a job launcher
//!    would, the demo then SIGKILLs the other ranks and restarts the whole
//!    job. Every rank restores from its own node's memory tier.
//! 2. **node loss**: node 2's daemon and its trainer are SIGKILLed together,
//!    the other ranks stopped, and an empty daemon with the same node id and
//!    address takes the lost node's place. The job restarts; rank 2's shard
//!    comes from the peer that holds its replica.
//! 3. **total memory loss**: once the newest checkpoint is committed in the
//!    persistent tier (the demo waits for it, and reports the wait), every
//!    daemon and every trainer is SIGKILLed, every node's memory tier wiped,
//!    and empty daemons start in their place. The job restarts; every rank's
//!    shard comes from the persistent tier.
//!
//! At the end it compares the job's final state with the reference bit for
//! bit (the xxh3-128 of the ranks' state hashes in rank order).
//!
//! The workload is deterministic: the gradient of step t is a function of the
//! weights, of a data batch picked by a shuffling data loader, and of noise
//! seeded from an RNG whose state, like the loader's, travels in every
//! shard. Every rank runs the same RNG and loader and updates its own slice
//! of the flat parameter vector by global index, so the N-rank job computes
//! exactly what one process holding the whole model would. A resumed run is
//! identical to an uninterrupted one only if every piece of that state was
//! saved and restored exactly.
//!
//! The ranks run in lockstep, as data-parallel ranks do (a collective per
//! step): the demo is their launcher and their barrier. Each trainer talks to
//! it over its stdin and stdout, one line per message:
//!
//! - trainer -> demo (JSON): `started`, `latest` (the newest complete step
//!   its daemon knows of: in memory on a live node, or committed in the
//!   persistent tier), `resumed` (step, tier, restore time), `ready`,
//!   `checkpoint`, `step`, `done` (state hash).
//! - demo -> trainer: `resume <step>` or `resume none` once every rank said
//!   `latest` (the newest step any rank saw complete, so that all ranks
//!   resume from the same step, as rank 0's broadcast does in a real job),
//!   then `go` before every step, once every rank finished the previous one.

// `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use tierckpt_client::{Client, ErrorKind, TensorData};
use tierckpt_format::{Dtype, ShardKey, ShardLayout, TensorSpec};

use crate::output::{human_bytes, print_json};
use tierckpt_harness::daemon::{LocalCluster, LocalClusterOptions};

use self::baseline::FileCheckpoints;

mod baseline;

// Tensors are saved as their in-memory bytes: safetensors is little-endian.
const _: () = assert!(cfg!(target_endian = "little"), "the demo trainer assumes a little-endian host");

/// Copies of each shard on peers.
const REPLICATION_FACTOR: usize = 1;
const PLACEMENT: &str = "ring";
/// Where a rank's shard can come from, fastest first.
const TIERS: [&str; 3] = ["memory", "peer", "persistent"];

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Training state to checkpoint, across all ranks: weights plus Adam's two moments, all f32 ("300MB", "1GiB").
    #[arg(long, default_value = "300MB", value_parser = parse_size_arg)]
    pub size: u64,
    /// Nodes of the local cluster (one daemon each); the job has one rank per node.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Training steps.
    #[arg(long, default_value_t = 60)]
    pub steps: u64,
    /// Checkpoint every K steps.
    #[arg(long, value_name = "K", default_value_t = 10)]
    pub checkpoint_every: u64,
    /// Seed of the workload; it also picks the steps after which the failures strike and the rank that crashes.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Crash a trainer after this step instead of one picked from the seed.
    #[arg(long, value_name = "STEP")]
    pub kill_at_step: Option<u64>,
    /// Lose node 2 (daemon and trainer) after this step instead of one picked from the seed.
    #[arg(long, value_name = "STEP")]
    pub node_loss_at_step: Option<u64>,
    /// Lose every node's memory (every daemon and trainer) after this step instead of one picked from the seed.
    #[arg(long, value_name = "STEP")]
    pub total_loss_at_step: Option<u64>,
    /// Complete checkpoints each memory tier keeps (and the persistent tier too).
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    /// Drain every Nth complete checkpoint to the persistent tier.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub persist_every: u64,
    /// Threads of each trainer's optimizer step [default: the cores shared among the ranks].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Directory (a tmpfs) in which the demo's memory tiers are created and removed.
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    pub tmp_dir: PathBuf,
    /// Directory (a disk) in which the persistent tier and the baseline's checkpoint files are created and removed [default: the system's temporary directory].
    #[arg(long, value_name = "DIR")]
    pub persist_dir: Option<PathBuf>,
    /// Milliseconds of each training step standing for the forward and backward pass on an accelerator (the host's cores are idle meanwhile).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub compute_ms: u64,
    /// Write rate of the persistent storage per node, per second ("off": as fast as the local disk goes). It paces the drain to the persistent tier and the baseline's checkpoint writes alike. The default is what torch.save reached on an H100 node's local disk (8 GiB in 10.3 s).
    #[arg(long, value_name = "RATE", default_value = "800MB", value_parser = parse_rate_arg)]
    pub storage_bandwidth: Rate,
}

#[derive(clap::Args, Debug, Clone)]
pub struct TrainerArgs {
    /// Socket of the daemon to checkpoint into.
    #[arg(long, required_unless_present = "checkpoint_dir", conflicts_with = "checkpoint_dir")]
    pub daemon_socket: Option<PathBuf>,
    /// Checkpoint synchronously to files in this directory instead (the baseline).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Complete checkpoints kept in --checkpoint-dir.
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    /// Milliseconds each step waits, standing for the accelerator's forward and backward pass.
    #[arg(long, default_value_t = 0)]
    pub compute_ms: u64,
    /// Write rate of the storage behind --checkpoint-dir, bytes per second.
    #[arg(long)]
    pub storage_bandwidth: Option<u64>,
    #[arg(long)]
    pub namespace: String,
    /// Bytes of training state (weights + two moments) across all ranks.
    #[arg(long, value_parser = parse_size_arg)]
    pub size: u64,
    #[arg(long)]
    pub steps: u64,
    #[arg(long)]
    pub checkpoint_every: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    #[arg(long, default_value_t = 1)]
    pub world_size: u32,
    #[arg(long)]
    pub threads: Option<usize>,
}

// ---------------------------------------------------------------------------
// Sizes

/// Parses "300MB" (powers of 1000), "512MiB" (powers of 1024), "1.5GB", or a
/// plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("{s:?} is not a size; write it like \"300MB\", \"512MiB\" or a byte count");
    let value: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// Bytes per second, or none ("off").
#[derive(Debug, Clone, Copy)]
pub struct Rate(pub Option<u64>);

fn parse_rate_arg(s: &str) -> Result<Rate, String> {
    match s.trim() {
        "off" => Ok(Rate(None)),
        r => parse_size_arg(r).map(|b| Rate(Some(b))),
    }
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

// ---------------------------------------------------------------------------
// The workload

/// Width of every weight matrix.
const HIDDEN: usize = 1024;
/// Number of weight matrices ("layers"), each saved as its own tensors.
const LAYERS: usize = 8;
/// Elements per loss partial sum; fixed so the loss does not depend on threads.
const BLOCK: usize = 1 << 16;
/// Batches in the synthetic data set; the loader shuffles them every epoch.
const BATCHES: u32 = 16;

const LR: f32 = 0.01;
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;
const NOISE: f32 = 0.5;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Rows of each layer for a state of `state_bytes` (12 bytes per parameter).
pub fn model_rows(state_bytes: u64) -> Result<Vec<usize>> {
    let params = state_bytes / 12;
    let rows = (params / HIDDEN as u64) as usize;
    ensure!(
        rows >= LAYERS,
        "a training state of {state_bytes} bytes is too small: use at least {} bytes (--size)",
        12 * HIDDEN * LAYERS
    );
    Ok((0..LAYERS).map(|l| rows / LAYERS + usize::from(l < rows % LAYERS)).collect())
}

/// splitmix64's finalizer.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform f32 in [-1, 1), exact (24 random bits).
fn unit(h: u64) -> f32 {
    ((h >> 40) as f32) * (1.0 / (1u32 << 23) as f32) - 1.0
}

/// The regression target of parameter `i`: a Weyl sequence in [-1, 1).
fn weyl(i: u64) -> f32 {
    (((i as u32).wrapping_mul(0x9E37_79B9) >> 8) as f32) * (1.0 / (1u32 << 23) as f32) - 1.0
}

/// xoshiro256**: the trainer's RNG, whose state is part of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rng([u64; 4]);

impl Rng {
    fn seeded(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(GOLDEN);
            mix(x)
        };
        Self([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }

    fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (c, w) in b.chunks_exact_mut(8).zip(self.0) {
            c.copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    fn from_bytes(b: &[u8; 32]) -> Self {
        let mut s = [0u64; 4];
        for (w, c) in s.iter_mut().zip(b.chunks_exact(8)) {
            *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
        Self(s)
    }
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
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
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
pub struct Shard {
    pub rank: u32,
    pub world_size: u32,
    /// Global index of its first parameter.
    pub base: usize,
    /// (layer, first row within the layer, rows).
    pub pieces: Vec<(usize, usize, usize)>,
}

impl Shard {
    /// Rank `rank`'s share of a model with these layer rows: rows
    /// [R r / W, R (r+1) / W) of the R rows of all layers in order.
    pub fn of(rows: &[usize], rank: u32, world_size: u32) -> Result<Self> {
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
    pub fn whole(rows: &[usize]) -> Self {
        Self {
            rank: 0,
            world_size: 1,
            base: 0,
            pieces: rows.iter().enumerate().filter(|(_, &n)| n > 0).map(|(l, &n)| (l, 0, n)).collect(),
        }
    }

    pub fn rows(&self) -> usize {
        self.pieces.iter().map(|p| p.2).sum()
    }

    pub fn params(&self) -> usize {
        self.rows() * HIDDEN
    }

    /// "layer:first_row+rows,...", kept in the checkpoint's metadata.
    fn describe(&self) -> String {
        self.pieces.iter().map(|(l, a, n)| format!("{l}:{a}+{n}")).collect::<Vec<_>>().join(",")
    }
}

/// Everything a training process holds: its shard of the weights and of
/// Adam's moments, step counter, RNG and data loader.
pub struct TrainState {
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

const STEP_TENSOR: &str = "trainer.step";
const RNG_TENSOR: &str = "trainer.rng_state";

/// The tensors of a checkpoint of this shard: its rows of each layer.
pub fn checkpoint_specs(shard: &Shard) -> Vec<TensorSpec> {
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

/// Byte buffers of the small tensors, filled by a restore.
#[derive(Default)]
struct Scalars {
    step: [u8; 8],
    rng: [u8; 32],
}

impl TrainState {
    /// A freshly initialised shard of the model (every page of it touched).
    pub fn new(seed: u64, shard: &Shard, threads: usize) -> Self {
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

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn params(&self) -> usize {
        self.params.len()
    }

    /// Bytes of weights and moments.
    pub fn state_bytes(&self) -> u64 {
        12 * self.params.len() as u64
    }

    /// One training step; returns the mean loss of this shard's parameters
    /// before the update.
    pub fn train_step(&mut self, threads: usize) -> f64 {
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
    pub fn state_hash(&self) -> String {
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
    fn with_checkpoint<R>(&self, f: impl FnOnce(&[TensorData<'_>], &BTreeMap<String, String>) -> R) -> R {
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
    fn restore_with(
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
pub fn combined_hash(rank_hashes: &[String]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    for r in rank_hashes {
        h.update(r.as_bytes());
    }
    format!("{:032x}", h.digest128())
}

/// Default trainer threads: the cores, shared among `ranks` trainers.
fn default_threads(ranks: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores / ranks.max(1)).max(1)
}

// ---------------------------------------------------------------------------
// The trainer process

/// One JSON object per line on stdout, flushed.
fn emit(v: Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}").and_then(|()| out.flush()).context("writing to the demo")
}

/// Tries of a restore from a peer before giving up.
const PEER_ATTEMPTS: u32 = 5;

/// Parses the demo's `resume <step>` / `resume none`.
fn parse_resume(line: &str) -> Result<Option<u64>> {
    match line.strip_prefix("resume ") {
        Some("none") => Ok(None),
        Some(s) => Ok(Some(s.parse().with_context(|| format!("the demo said {line:?}"))?)),
        None => bail!("the demo said {line:?}, expected \"resume <step>\" or \"resume none\""),
    }
}

pub fn run_trainer(a: &TrainerArgs) -> Result<()> {
    ensure!(a.checkpoint_every > 0, "--checkpoint-every must be at least 1");
    let threads = a.threads.unwrap_or_else(|| default_threads(a.world_size as usize)).max(1);
    let rows = model_rows(a.size)?;
    let shard = Shard::of(&rows, a.rank, a.world_size)?;
    let (ns, rank) = (a.namespace.as_str(), a.rank);
    let t0 = Instant::now();
    let mut state = TrainState::new(a.seed, &shard, threads);
    emit(json!({
        "event": "started",
        "pid": std::process::id(),
        "rank": rank,
        "params": state.params(),
        "state_bytes": state.state_bytes(),
        "init_s": t0.elapsed().as_secs_f64(),
    }))?;
    let mut client = match (&a.daemon_socket, &a.checkpoint_dir) {
        (Some(socket), _) => Client::connect(socket)?,
        (None, Some(dir)) => {
            let files = FileCheckpoints::new(dir, rank, a.world_size, a.keep_last, a.storage_bandwidth);
            return run_file_trainer(a, state, files, threads);
        }
        (None, None) => bail!("give --daemon-socket or --checkpoint-dir"),
    };
    // The newest step complete across the cluster's live nodes.
    let latest = client.latest(ns).context("asking for the latest checkpoint")?;
    emit(json!({ "event": "latest", "step": latest }))?;
    let mut order = stdin_orders();
    if let Some(step) = parse_resume(&order()?)? {
        let key = ShardKey::new(ns, step, rank);
        // `steps` lists only this node's shards: is ours here, or does the
        // daemon have to fetch it, from a live peer or the persistent tier?
        let local = client
            .steps(ns)
            .context("listing this node's checkpoints")?
            .iter()
            .any(|s| s.step == step && s.ranks.contains(&rank));
        let status = if local { None } else { client.status().ok() };
        let cluster = status.as_ref().and_then(|s| s.cluster.as_ref());
        // The live peers holding it, in this node's view of the cluster.
        let peers: Vec<String> = cluster
            .and_then(|c| {
                let s = c.namespaces.get(ns)?.iter().find(|s| s.step == step)?;
                Some(s.holders.get(&rank)?.iter().filter(|h| **h != c.node_id).cloned().collect())
            })
            .unwrap_or_default();
        let fetched_before = cluster.map(|c| c.replication.shards_fetched);
        let expected = if local {
            "memory"
        } else if !peers.is_empty() {
            "peer"
        } else {
            "persistent"
        };
        let t = Instant::now();
        let mut attempts = 0;
        state
            .restore_with(|targets| loop {
                attempts += 1;
                match client.load_into(&key, targets) {
                    Ok((_, view)) => return Ok(view.metadata),
                    // The daemon's view of its peers comes from its last
                    // probe of them; one probe answered late hides a holder.
                    Err(e)
                        if !local
                            && attempts < PEER_ATTEMPTS
                            && matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Unavailable) =>
                    {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => return Err(e.into()),
                }
            })
            .with_context(|| format!("restoring {key}"))?;
        let restore_s = t.elapsed().as_secs_f64();
        ensure!(state.step() == step, "restored step {} for {key}", state.step());
        // Where the daemon found it: a fetch from a peer is counted; a shard
        // this node did not hold and no peer sent came from the persistent tier.
        let tier = if local {
            "memory"
        } else {
            let fetched_after = client.status().ok().and_then(|s| s.cluster).map(|c| c.replication.shards_fetched);
            match (fetched_before, fetched_after) {
                (Some(b), Some(a)) if a > b => "peer",
                (Some(_), Some(_)) => "persistent",
                // No counters to tell by: trust the view taken before.
                _ => expected,
            }
        };
        emit(json!({
            "event": "resumed",
            "step": step,
            "restore_s": restore_s,
            "bytes": state.state_bytes(),
            "tier": tier,
            "expected_tier": expected,
            "peers": if tier == "peer" { peers } else { Vec::new() },
            "attempts": attempts,
        }))?;
    }
    client.discard_incomplete_after(ns, state.step()).context("discarding leftovers of a crashed run")?;
    emit(json!({ "event": "ready", "step": state.step() }))?;
    train(a, &mut state, threads, &mut order, |state, step| {
        let key = ShardKey::new(ns, step, rank);
        let timing = state
            .with_checkpoint(|tensors, meta| client.save(&key, a.world_size, tensors, meta, false))
            .with_context(|| format!("saving {key}"))?;
        Ok((timing.total_s(), timing.copy_s, timing.bytes))
    })
}

/// The training loop shared by both kinds of trainer: a step on each "go",
/// a checkpoint (by `save`, returning stall, copy time and bytes) every
/// `checkpoint_every` steps.
fn train(
    a: &TrainerArgs,
    state: &mut TrainState,
    threads: usize,
    order: &mut impl FnMut() -> Result<String>,
    mut save: impl FnMut(&TrainState, u64) -> Result<(f64, f64, u64)>,
) -> Result<()> {
    while state.step() < a.steps {
        let o = order()?;
        ensure!(o == "go", "the demo said {o:?}, expected \"go\"");
        let t = Instant::now();
        let loss = state.train_step(threads);
        // The accelerator's share of the step: the host's cores are free meanwhile.
        std::thread::sleep(Duration::from_millis(a.compute_ms));
        let step_s = t.elapsed().as_secs_f64();
        let step = state.step();
        if step % a.checkpoint_every == 0 {
            let (stall_s, copy_s, bytes) = save(state, step)?;
            emit(json!({
                "event": "checkpoint",
                "step": step,
                "stall_s": stall_s,
                "copy_s": copy_s,
                "bytes": bytes,
            }))?;
        }
        emit(json!({
            "event": "step",
            "step": step,
            "loss": loss,
            "params": state.params(),
            "step_s": step_s,
        }))?;
    }
    emit(json!({ "event": "done", "step": state.step(), "state_hash": state.state_hash() }))
}

fn stdin_orders() -> impl FnMut() -> Result<String> {
    let mut orders = std::io::stdin().lock().lines();
    move || match orders.next() {
        Some(line) => Ok(line.context("reading from the demo")?.trim().to_string()),
        None => bail!("the demo closed the trainer's stdin"),
    }
}

/// The baseline's trainer: checkpoints to files, synchronously, and resumes
/// from the newest step every rank's file is there for.
fn run_file_trainer(a: &TrainerArgs, mut state: TrainState, files: FileCheckpoints, threads: usize) -> Result<()> {
    let latest = files.latest()?;
    emit(json!({ "event": "latest", "step": latest }))?;
    let mut order = stdin_orders();
    if let Some(step) = parse_resume(&order()?)? {
        let t = Instant::now();
        state.restore_with(|targets| files.load_into(step, targets))?;
        ensure!(state.step() == step, "restored step {} from the files of step {step}", state.step());
        emit(json!({
            "event": "resumed",
            "step": step,
            "restore_s": t.elapsed().as_secs_f64(),
            "bytes": state.state_bytes(),
            "tier": "persistent",
            "expected_tier": "persistent",
            "peers": [],
            "attempts": 1,
        }))?;
    }
    emit(json!({ "event": "ready", "step": state.step() }))?;
    train(a, &mut state, threads, &mut order, |state, step| {
        let t = Instant::now();
        let bytes = state
            .with_checkpoint(|tensors, meta| files.save(step, tensors, meta))
            .with_context(|| format!("saving step {step} of rank {} to files", a.rank))?;
        let s = t.elapsed().as_secs_f64();
        Ok((s, s, bytes))
    })
}

// ---------------------------------------------------------------------------
// The demo

fn check_interrupt() -> Result<()> {
    if crate::signals::received() != 0 {
        bail!("interrupted");
    }
    Ok(())
}

/// This very binary, even if a rebuild replaced the file meanwhile: the
/// reference and the interrupted runs must run the same code.
fn trainer_exe() -> Result<PathBuf> {
    let self_exe = Path::new("/proc/self/exe");
    if self_exe.exists() {
        Ok(self_exe.to_path_buf())
    } else {
        std::env::current_exe().context("locating the tierckpt executable")
    }
}

/// One rank's trainer process: its stdout events go to the job's channel,
/// the tail of its stderr is kept for error messages. Killed on drop.
struct Trainer {
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Trainer {
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        rank: usize,
        world: usize,
        store: &Store,
        namespace: &str,
        a: &DemoArgs,
        threads: usize,
        events: Sender<(usize, Value)>,
    ) -> Result<Self> {
        let exe = trainer_exe()?;
        let mut cmd = Command::new(&exe);
        cmd.arg0("tierckpt")
            .arg("demo-trainer")
            .args(store.trainer_args(rank))
            .args(["--namespace", namespace])
            .args(["--keep-last", &a.keep_last.to_string()])
            .args(["--compute-ms", &a.compute_ms.to_string()])
            .args(a.storage_bandwidth.0.iter().flat_map(|b| ["--storage-bandwidth".to_string(), b.to_string()]))
            .args(["--size", &a.size.to_string()])
            .args(["--steps", &a.steps.to_string()])
            .args(["--checkpoint-every", &a.checkpoint_every.to_string()])
            .args(["--seed", &a.seed.to_string()])
            .args(["--rank", &rank.to_string()])
            .args(["--world-size", &world.to_string()])
            .args(["--threads", &threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The trainer dies with the demo.
        tierckpt_harness::daemon::die_with_parent(&mut cmd);
        let mut child =
            cmd.spawn().with_context(|| format!("starting {} demo-trainer --rank {rank}", exe.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "event": "text", "text": line }));
                if events.send((rank, v)).is_err() {
                    return;
                }
            }
            let _ = events.send((rank, json!({ "event": "exit" })));
        });
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let t = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut q = t.lock().unwrap_or_else(|p| p.into_inner());
                if q.len() == 20 {
                    q.pop_front();
                }
                q.push_back(line);
            }
        });
        Ok(Self { stdin: child.stdin.take(), child, stderr: tail })
    }

    fn stderr_tail(&self) -> String {
        // Give the reader a moment to collect what a dying trainer wrote.
        std::thread::sleep(Duration::from_millis(50));
        let q = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// SIGKILL, then reap (nothing if it already exited).
    fn kill(&mut self) -> Result<()> {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.child.kill().context("killing a trainer")?;
        }
        self.stdin = None;
        self.child.wait().context("waiting for a trainer")?;
        Ok(())
    }
}

impl Drop for Trainer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The trainers of one incarnation of the job, rank r on node r.
struct Job {
    trainers: Vec<Trainer>,
    events: Receiver<(usize, Value)>,
}

/// Where a job's ranks checkpoint.
enum Store {
    /// Into the memory tier of each rank's node daemon (one socket per rank).
    Daemons(Vec<PathBuf>),
    /// Synchronously into files in one directory (the baseline), for `world` ranks.
    Files(PathBuf, usize),
}

impl Store {
    fn world(&self) -> usize {
        match self {
            Store::Daemons(s) => s.len(),
            Store::Files(_, w) => *w,
        }
    }

    fn trainer_args(&self, rank: usize) -> Vec<std::ffi::OsString> {
        match self {
            Store::Daemons(s) => vec!["--daemon-socket".into(), s[rank].clone().into()],
            Store::Files(dir, _) => vec!["--checkpoint-dir".into(), dir.clone().into()],
        }
    }
}

impl Job {
    fn spawn(store: &Store, namespace: &str, a: &DemoArgs, threads: usize) -> Result<Self> {
        let (tx, events) = mpsc::channel();
        let trainers = (0..store.world())
            .map(|rank| Trainer::spawn(rank, store.world(), store, namespace, a, threads, tx.clone()))
            .collect::<Result<_>>()?;
        Ok(Self { trainers, events })
    }

    fn pid(&self, rank: usize) -> u32 {
        self.trainers[rank].child.id()
    }

    /// The next event of any rank.
    fn next_event(&self) -> Result<(usize, Value)> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            check_interrupt()?;
            match self.events.recv_timeout(Duration::from_millis(100)) {
                Ok(e) => return Ok(e),
                Err(RecvTimeoutError::Disconnected) => bail!("every trainer closed its stdout"),
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!("the trainers said nothing for 10 minutes")
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Sends one line to every rank.
    fn tell_all(&mut self, line: &str) -> Result<()> {
        for (rank, t) in self.trainers.iter_mut().enumerate() {
            let stdin = t.stdin.as_mut().ok_or_else(|| anyhow!("rank {rank}'s stdin is closed"))?;
            writeln!(stdin, "{line}")
                .and_then(|()| stdin.flush())
                .with_context(|| format!("telling rank {rank} {line:?}"))?;
        }
        Ok(())
    }

    fn kill(&mut self, rank: usize) -> Result<()> {
        self.trainers[rank].kill()
    }

    /// What a job launcher does when a rank fails: SIGKILL the rest.
    fn kill_all(&mut self) -> Result<()> {
        self.trainers.iter_mut().try_for_each(Trainer::kill)
    }
}

/// One checkpoint of the job: every rank saved its shard of one step.
struct Checkpoint {
    step: u64,
    /// The job's pause: the slowest rank's (the next step waits for it).
    stall_s: f64,
    shard_stalls: Vec<f64>,
    bytes: u64,
}

/// What one namespace's runs recorded.
#[derive(Default)]
struct RunLog {
    checkpoints: Vec<Checkpoint>,
    step_s: Vec<f64>,
    last_step: u64,
    loss: Option<f64>,
    killed_at: Option<Instant>,
    /// Where checkpoints go, as the progress lines say it.
    into: &'static str,
    /// When the first step was ordered, and when the newest step ended.
    trained_from: Option<Instant>,
    last_step_at: Option<Instant>,
}

impl RunLog {
    fn new(into: &'static str) -> Self {
        Self { into, ..Default::default() }
    }

    /// The training loop's time without its checkpoint pauses: what the
    /// job needs when nothing fails and nothing is saved.
    fn useful_s(&self) -> Option<f64> {
        let trained = (self.last_step_at? - self.trained_from?).as_secs_f64();
        Some(trained - self.checkpoints.iter().map(|c| c.stall_s).sum::<f64>())
    }

    fn last_checkpoint(&self) -> Option<u64> {
        self.checkpoints.iter().map(|c| c.step).max()
    }
}

/// How one rank resumed.
struct RankRestore {
    rank: usize,
    tier: String,
    /// The tier the view before loading pointed to (memory, peer, persistent).
    expected_tier: String,
    restore_s: f64,
    bytes: u64,
    peers: Vec<String>,
    attempts: u64,
}

/// What one start of the job did before training.
#[derive(Default)]
struct Incarnation {
    /// Each rank's answer to `latest`.
    latest_seen: Vec<Option<u64>>,
    /// The step every rank resumed from.
    resume: Option<u64>,
    ranks: Vec<RankRestore>,
    /// When the last rank had restored its shard.
    resumed_at: Option<Instant>,
    /// The slowest rank's model initialisation.
    init_s: Option<f64>,
}

impl Incarnation {
    fn ranks_from(&self, tier: &str) -> Vec<usize> {
        let mut r: Vec<usize> = self.ranks.iter().filter(|r| r.tier == tier).map(|r| r.rank).collect();
        r.sort_unstable();
        r
    }

    /// The slowest restore from `tier`.
    fn restore_s(&self, tier: Option<&str>) -> Option<f64> {
        self.ranks.iter().filter(|r| tier.is_none_or(|t| r.tier == t)).map(|r| r.restore_s).reduce(f64::max)
    }

    /// The slowest tier any rank restored from.
    fn recovered_from(&self) -> &'static str {
        if self.resume.is_none() {
            return "none";
        }
        for tier in ["persistent", "peer"] {
            if self.ranks.iter().any(|r| r.tier == tier) {
                return tier;
            }
        }
        "memory"
    }
}

enum Outcome {
    Done {
        hashes: Vec<String>,
    },
    /// Every rank finished the step asked for and waits for the next `go`.
    Stopped,
}

/// Prints a line above the progress bar (to stderr), unless `--json`.
struct Ui {
    json: bool,
}

impl Ui {
    fn say(&self, pb: &ProgressBar, msg: impl AsRef<str>) {
        if !self.json {
            pb.suspend(|| eprintln!("{}", msg.as_ref()));
        }
    }

    fn bar(&self, len: u64, prefix: &'static str) -> ProgressBar {
        if self.json {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "  {prefix:<9} [{bar:36.cyan/blue}] {pos:>4}/{len} steps  {elapsed:>4}  {msg}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        pb.set_style(style);
        pb.set_prefix(prefix);
        pb
    }
}

fn fmt_s(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn gib_s(bytes: u64, s: f64) -> f64 {
    bytes as f64 / s / (1u64 << 30) as f64
}

fn list(ranks: &[usize]) -> String {
    ranks.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

fn num(v: &Value, k: &str) -> Result<f64> {
    v[k].as_f64().ok_or_else(|| anyhow!("a trainer sent {v} without a number {k:?}"))
}

/// A step's reports, as they come in from the ranks.
#[derive(Default)]
struct StepIn {
    ranks: usize,
    loss_sum: f64,
    params: f64,
    checkpoint: Vec<(f64, u64)>,
}

/// Runs one start of the job: agrees on the step to resume from, then
/// steps the ranks in lockstep until they are done, or until every rank
/// finished step `stop_at` (they then wait for orders that never come).
fn drive(
    job: &mut Job,
    steps: u64,
    ui: &Ui,
    pb: &ProgressBar,
    log: &mut RunLog,
    stop_at: Option<u64>,
) -> Result<(Incarnation, Outcome)> {
    let w = job.trainers.len();
    let mut inc = Incarnation { latest_seen: vec![None; w], ..Default::default() };
    let (mut latest_n, mut ready_n) = (0, 0);
    let mut by_step: BTreeMap<u64, StepIn> = BTreeMap::new();
    let mut hashes: Vec<Option<String>> = vec![None; w];
    loop {
        let (rank, ev) = job.next_event()?;
        match ev["event"].as_str().unwrap_or("") {
            "started" => {
                let i = num(&ev, "init_s")?;
                inc.init_s = Some(inc.init_s.map_or(i, |m| m.max(i)));
            }
            "latest" => {
                inc.latest_seen[rank] = ev["step"].as_u64();
                latest_n += 1;
                if latest_n == w {
                    // Every shard of a step some rank saw complete is still
                    // held: retention never drops a newest complete step.
                    inc.resume = inc.latest_seen.iter().copied().max().flatten();
                    let order = inc.resume.map_or("resume none".to_string(), |s| format!("resume {s}"));
                    job.tell_all(&order)?;
                }
            }
            "resumed" => {
                inc.ranks.push(RankRestore {
                    rank,
                    tier: ev["tier"].as_str().unwrap_or("memory").to_string(),
                    expected_tier: ev["expected_tier"].as_str().unwrap_or("memory").to_string(),
                    restore_s: num(&ev, "restore_s")?,
                    bytes: num(&ev, "bytes")? as u64,
                    peers: ev["peers"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|p| p.as_str().map(String::from)).collect())
                        .unwrap_or_default(),
                    attempts: ev["attempts"].as_u64().unwrap_or(1),
                });
                if inc.ranks.len() == w {
                    let now = Instant::now();
                    inc.resumed_at = Some(now);
                    let step = inc.resume.unwrap_or(0);
                    let lost = log.last_step.saturating_sub(step);
                    let mut parts = Vec::new();
                    for tier in TIERS {
                        let ranks = inc.ranks_from(tier);
                        if ranks.is_empty() {
                            continue;
                        }
                        let bytes: u64 =
                            inc.ranks.iter().filter(|r| r.tier == tier).map(|r| r.bytes).max().unwrap_or(0);
                        let s = inc.restore_s(Some(tier)).unwrap_or(0.0);
                        let from = if tier == "peer" {
                            let mut p: Vec<String> =
                                inc.ranks.iter().filter(|r| r.tier == tier).flat_map(|r| r.peers.clone()).collect();
                            p.dedup();
                            let tries =
                                inc.ranks.iter().filter(|r| r.tier == tier).map(|r| r.attempts).max().unwrap_or(1);
                            let tries = if tries > 1 { format!(", {tries} tries") } else { String::new() };
                            if p.is_empty() {
                                tries
                            } else {
                                format!(" (held by {}{tries})", p.join(", "))
                            }
                        } else {
                            String::new()
                        };
                        parts.push(format!(
                            "rank{} {} from {tier}{from} in {} ({:.2} GiB/s)",
                            if ranks.len() > 1 { "s" } else { "" },
                            list(&ranks),
                            fmt_s(s),
                            gib_s(bytes, s)
                        ));
                    }
                    let since_kill = log
                        .killed_at
                        .map_or(String::new(), |k| format!("; {} after the kill", fmt_s((now - k).as_secs_f64())));
                    ui.say(
                        pb,
                        format!(
                            "    resumed     from step {step}: {}{since_kill}; {lost} step{} to redo",
                            parts.join(", "),
                            if lost == 1 { "" } else { "s" }
                        ),
                    );
                }
            }
            "ready" => {
                ready_n += 1;
                if ready_n == w {
                    let step = inc.resume.unwrap_or(0);
                    log.last_step = step;
                    pb.set_position(step);
                    if step < steps {
                        log.trained_from.get_or_insert_with(Instant::now);
                        job.tell_all("go")?;
                    }
                }
            }
            "checkpoint" => {
                let step = num(&ev, "step")? as u64;
                let e = by_step.entry(step).or_default();
                e.checkpoint.push((num(&ev, "stall_s")?, num(&ev, "bytes")? as u64));
            }
            "step" => {
                let step = num(&ev, "step")? as u64;
                log.step_s.push(num(&ev, "step_s")?);
                let e = by_step.entry(step).or_default();
                e.ranks += 1;
                e.loss_sum += num(&ev, "loss")? * num(&ev, "params")?;
                e.params += num(&ev, "params")?;
                if e.ranks < w {
                    continue;
                }
                let e = by_step.remove(&step).expect("present");
                let loss = e.loss_sum / e.params.max(1.0);
                log.last_step_at = Some(Instant::now());
                log.last_step = step;
                log.loss = Some(loss);
                pb.set_position(step);
                pb.set_message(format!("loss {loss:.4}"));
                if !e.checkpoint.is_empty() {
                    ensure!(
                        e.checkpoint.len() == w,
                        "only {} of {w} ranks checkpointed step {step}",
                        e.checkpoint.len()
                    );
                    let c = Checkpoint {
                        step,
                        stall_s: e.checkpoint.iter().map(|c| c.0).fold(0.0, f64::max),
                        shard_stalls: e.checkpoint.iter().map(|c| c.0).collect(),
                        bytes: e.checkpoint.iter().map(|c| c.1).sum(),
                    };
                    ui.say(
                        pb,
                        format!(
                            "    checkpoint  step {step:>4}  {w} shards, {} into {}, training paused {}",
                            human_bytes(c.bytes),
                            log.into,
                            fmt_s(c.stall_s)
                        ),
                    );
                    log.checkpoints.push(c);
                }
                if stop_at == Some(step) {
                    return Ok((inc, Outcome::Stopped));
                }
                if step < steps {
                    job.tell_all("go")?;
                }
            }
            "done" => {
                let hash = ev["state_hash"].as_str().ok_or_else(|| anyhow!("rank {rank} sent {ev} without a hash"))?;
                hashes[rank] = Some(hash.to_string());
                if hashes.iter().all(Option::is_some) {
                    for (r, t) in job.trainers.iter_mut().enumerate() {
                        t.stdin = None;
                        let status = t.child.wait().context("waiting for a trainer")?;
                        ensure!(
                            status.success(),
                            "rank {r}'s trainer exited ({status}) after it was done:\n{}",
                            t.stderr_tail()
                        );
                    }
                    return Ok((inc, Outcome::Done { hashes: hashes.into_iter().flatten().collect() }));
                }
            }
            "exit" if hashes[rank].is_none() => {
                check_interrupt()?;
                let t = &mut job.trainers[rank];
                let status = t.child.wait().context("waiting for a trainer")?;
                bail!(
                    "rank {rank}'s trainer (pid {}) exited ({status}) before it was done:\n{}",
                    t.child.id(),
                    t.stderr_tail()
                );
            }
            _ => {}
        }
    }
}

fn candidates(steps: u64, every: u64) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    let all: Vec<u64> = (every + 1..steps).collect();
    let off: Vec<u64> = all.iter().copied().filter(|s| s % every != 0).collect();
    let clear: Vec<u64> = off.iter().copied().filter(|s| (s + 1) % every != 0).collect();
    (all, off, clear)
}

/// The flags that choose the failure steps, in the order the failures strike.
const FAILURE_FLAGS: [&str; 3] = ["--kill-at-step", "--node-loss-at-step", "--total-loss-at-step"];

/// The steps after which the three failures strike: [trainer crash, node
/// loss, total memory loss]. All lie past the first checkpoint, in that
/// order, preferably neither on a checkpoint boundary nor right before one
/// (so work is lost and recomputed), the crash in the first half of the run
/// and a checkpoint between each failure and the next; picked from the seed
/// where not given, fitted around those given.
pub fn pick_failure_steps(steps: u64, every: u64, seed: u64, chosen: [Option<u64>; 3]) -> Result<[u64; 3]> {
    ensure!(every > 0, "--checkpoint-every must be at least 1");
    for (flag, s) in FAILURE_FLAGS.iter().zip(chosen) {
        if let Some(s) = s {
            ensure!(
                s > every && s < steps,
                "{flag} must lie after the first checkpoint (step {every}) and before the last step ({steps})"
            );
        }
    }
    let given: Vec<(&str, u64)> = FAILURE_FLAGS.iter().zip(chosen).filter_map(|(f, s)| Some((*f, s?))).collect();
    for w in given.windows(2) {
        let ((f0, s0), (f1, s1)) = (w[0], w[1]);
        ensure!(s0 < s1, "{f0} ({s0}) must come before {f1} ({s1})");
    }
    if let [Some(c), Some(l), Some(t)] = chosen {
        return Ok([c, l, t]);
    }
    ensure!(
        steps >= every + 4,
        "--steps ({steps}) must exceed --checkpoint-every ({every}) by at least 4, so that three failures can follow a checkpoint"
    );
    let (all, off, clear) = candidates(steps, every);
    // A checkpoint lies in (a, b].
    let between = |a: u64, b: u64| b / every > a / every;
    // Strictest first: (steps to pick from, a checkpoint between failures,
    // the crash in the first half).
    let levels: [(&[u64], bool, bool); 6] = [
        (&clear, true, true),
        (&clear, true, false),
        (&clear, false, false),
        (&off, true, false),
        (&off, false, false),
        (&all, false, false),
    ];
    for (pool, spaced, first_half) in levels {
        let pools: Vec<Vec<u64>> = (0..3)
            .map(|i| match chosen[i] {
                Some(s) => vec![s],
                None => pool.iter().copied().filter(|&s| !(i == 0 && first_half && 2 * s > steps)).collect(),
            })
            .collect();
        let follows = |prev: Option<u64>, s: u64| prev.is_none_or(|p| s > p && (!spaced || between(p, s)));
        // Whether failures i.. fit after one at `prev`: `follows` only gets
        // easier for later steps, so the earliest fitting step leaves the most room.
        let fits = |prev: Option<u64>, i: usize| {
            let mut prev = prev;
            for p in &pools[i..] {
                match p.iter().copied().find(|&s| follows(prev, s)) {
                    Some(s) => prev = Some(s),
                    None => return false,
                }
            }
            true
        };
        if !fits(None, 0) {
            continue;
        }
        let mut picked = [0; 3];
        let mut prev = None;
        for (i, salt) in [0xC2A5u64, 0x10557, 0x7074].into_iter().enumerate() {
            let ok: Vec<u64> = pools[i].iter().copied().filter(|&s| follows(prev, s) && fits(Some(s), i + 1)).collect();
            let s = ok[(mix(seed ^ salt) % ok.len() as u64) as usize];
            picked[i] = s;
            prev = Some(s);
        }
        return Ok(picked);
    }
    let chosen: Vec<String> = given.iter().map(|(f, s)| format!("{f} {s}")).collect();
    bail!(
        "three failures in order between the first checkpoint (step {every}) and the last step ({steps}) do not fit around {}: \
         choose other steps or use more --steps",
        chosen.join(", ")
    )
}

/// The rank whose trainer crashes first.
pub fn pick_crash_rank(world: usize, seed: u64) -> usize {
    (mix(seed ^ 0xDEAD) % world as u64) as usize
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => None,
        n if n % 2 == 1 => Some(s[n / 2]),
        n => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

/// Live copies of every rank's shard of `step`, as node `from` sees them.
fn copies(cluster: &LocalCluster, from: usize, ns: &str, step: u64, world: usize) -> Result<Vec<usize>> {
    let st = Client::connect(cluster.socket(from))?.status()?;
    let c = st.cluster.ok_or_else(|| anyhow!("node {from} is not in a cluster"))?;
    let s = c.namespaces.get(ns).and_then(|steps| steps.iter().find(|s| s.step == step));
    Ok((0..world as u32).map(|r| s.and_then(|s| s.holders.get(&r)).map_or(0, Vec::len)).collect())
}

/// Waits until every shard of `step` has `want` live copies (replication is
/// asynchronous); returns how long that took, or None if it did not happen
/// within `limit`.
fn wait_replicated(
    cluster: &LocalCluster,
    from: usize,
    ns: &str,
    step: u64,
    world: usize,
    want: usize,
    limit: Duration,
) -> Result<Option<f64>> {
    let t = Instant::now();
    loop {
        check_interrupt()?;
        if copies(cluster, from, ns, step, world)?.iter().all(|&n| n >= want) {
            return Ok(Some(t.elapsed().as_secs_f64()));
        }
        if t.elapsed() > limit {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Deletes a namespace from every node. A delete is local to a node, and a
/// node whose peer dropped its copy may re-replicate its own meanwhile, so
/// it checks, a few heartbeats later, that no node holds any of it.
fn delete_everywhere(cluster: &LocalCluster, ns: &str) -> Result<()> {
    for _ in 0..5 {
        for i in 0..cluster.nodes.len() {
            match Client::connect(cluster.socket(i))?.delete_namespace(ns) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("deleting {ns} on node {i}")),
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut left = false;
        for i in 0..cluster.nodes.len() {
            left |= !Client::connect(cluster.socket(i))?.steps(ns)?.is_empty();
        }
        if !left {
            return Ok(());
        }
    }
    bail!("the nodes still hold copies of {ns} after deleting it five times")
}

/// The largest shard's file length (rank 0 holds the most rows).
fn shard_file_len(a: &DemoArgs, rows: &[usize], world: usize) -> Result<u64> {
    let mut max = 0;
    for rank in 0..world as u32 {
        let shard = Shard::of(rows, rank, world as u32)?;
        let probe = TrainState {
            seed: a.seed,
            step: a.steps,
            rng: Rng::seeded(0),
            loader: Loader { epoch: a.steps, position: 0, order: (0..BATCHES).collect() },
            shard: shard.clone(),
            params: Vec::new(),
            exp_avg: Vec::new(),
            exp_avg_sq: Vec::new(),
        };
        max = max.max(ShardLayout::new(&checkpoint_specs(&shard), &probe.metadata())?.file_len);
    }
    Ok(max)
}

/// What one daemon moved, from its status: bytes sent to peers (replicas
/// and re-replication), shards it fetched from peers, and bytes and shards
/// it uploaded to the persistent tier for one namespace.
#[derive(Debug, Default, Clone, Copy)]
struct Traffic {
    replicated: u64,
    /// What the replicas took on the wire, after deltas and compression.
    replicated_wire: u64,
    fetched: u64,
    persisted: u64,
    /// What the persisted shards took in the store, after deltas and compression.
    persisted_stored: u64,
    persisted_shards: u64,
}

fn traffic(cluster: &LocalCluster, i: usize, ns: &str) -> Result<Traffic> {
    let st = Client::connect(cluster.socket(i))?.status()?;
    let r = st.cluster.map(|c| c.replication).unwrap_or_default();
    let drain =
        st.persistent.as_ref().and_then(|p| p["namespaces"].as_array()?.iter().find(|n| n["namespace"] == ns).cloned());
    let get = |k: &str| drain.as_ref().and_then(|d| d[k].as_u64()).unwrap_or(0);
    Ok(Traffic {
        replicated: r.bytes_sent,
        replicated_wire: r.wire_bytes_sent,
        fetched: r.shards_fetched,
        persisted: get("uploaded_bytes"),
        persisted_stored: get("stored_bytes"),
        persisted_shards: get("uploaded_shards"),
    })
}

/// Adds up the daemons' counters over a run in which daemons die and are
/// replaced: each daemon's counters are read just before it is killed (a
/// new daemon starts from zero).
struct Meter {
    ns: String,
    seen: Vec<Traffic>,
    total: Traffic,
}

impl Meter {
    /// Starts counting now (what the daemons did before is left out).
    fn start(cluster: &LocalCluster, ns: &str) -> Result<Self> {
        let seen = (0..cluster.nodes.len()).map(|i| traffic(cluster, i, ns)).collect::<Result<_>>()?;
        Ok(Self { ns: ns.to_string(), seen, total: Traffic::default() })
    }

    /// Adds what node `i` did since its last reading.
    fn read(&mut self, cluster: &LocalCluster, i: usize) -> Result<()> {
        let now = traffic(cluster, i, &self.ns).with_context(|| format!("asking node {i} for its counters"))?;
        let was = std::mem::replace(&mut self.seen[i], now);
        self.total.replicated += now.replicated.saturating_sub(was.replicated);
        self.total.replicated_wire += now.replicated_wire.saturating_sub(was.replicated_wire);
        self.total.persisted_stored += now.persisted_stored.saturating_sub(was.persisted_stored);
        self.total.fetched += now.fetched.saturating_sub(was.fetched);
        self.total.persisted += now.persisted.saturating_sub(was.persisted);
        self.total.persisted_shards += now.persisted_shards.saturating_sub(was.persisted_shards);
        Ok(())
    }

    fn read_all(&mut self, cluster: &LocalCluster) -> Result<()> {
        (0..self.seen.len()).try_for_each(|i| self.read(cluster, i))
    }

    /// Node `i` was replaced: its new daemon counts from zero.
    fn replaced(&mut self, i: usize) {
        self.seen[i] = Traffic::default();
    }
}

/// The steps of `ns` committed in the `file://` persistent tier at `dir`
/// (a step exists there only through its COMMIT object).
fn committed_steps(dir: &Path, ns: &str) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir.join(ns))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("COMMIT").is_file())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

/// Whether some node's drainer is uploading a shard of `ns` right now.
fn uploading(cluster: &LocalCluster, ns: &str) -> Result<bool> {
    for i in 0..cluster.nodes.len() {
        let st = Client::connect(cluster.socket(i))?.status()?;
        let busy = st
            .persistent
            .as_ref()
            .and_then(|p| p["namespaces"].as_array()?.iter().find(|n| n["namespace"] == ns).cloned())
            .is_some_and(|n| !n["uploading"].is_null());
        if busy {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Waits until `step` of `ns` is committed in the persistent tier (the
/// drain runs in the background); returns how long it waited and whether
/// the step was committed. With `persist_every` > 1 the drainers may skip
/// the step: then it also stops once no node has uploaded anything for
/// 2.5 s (more than two rounds of the drainers), or after `limit`.
fn wait_persisted(
    cluster: &LocalCluster,
    dir: &Path,
    ns: &str,
    step: u64,
    persist_every: u64,
    limit: Duration,
) -> Result<(f64, bool)> {
    let t = Instant::now();
    let mut idle_since = Instant::now();
    loop {
        check_interrupt()?;
        if committed_steps(dir, ns).contains(&step) {
            return Ok((t.elapsed().as_secs_f64(), true));
        }
        if persist_every > 1 {
            if uploading(cluster, ns)? {
                idle_since = Instant::now();
            } else if idle_since.elapsed() > Duration::from_millis(2500) {
                return Ok((t.elapsed().as_secs_f64(), false));
            }
        }
        if t.elapsed() > limit {
            return Ok((t.elapsed().as_secs_f64(), false));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A failure's record in the report.
fn failure_json(kind: &str, step_killed: u64, killed_at: Instant, inc: &Incarnation, extra: Value) -> Value {
    let step = inc.resume.unwrap_or(0);
    let ranks: Vec<Value> = {
        let mut r: Vec<&RankRestore> = inc.ranks.iter().collect();
        r.sort_by_key(|r| r.rank);
        r.iter()
            .map(|r| {
                json!({
                    "rank": r.rank,
                    "node": LocalCluster::node_id(r.rank),
                    "tier": r.tier,
                    "expected_tier": r.expected_tier,
                    "restore_s": r.restore_s,
                    "bytes": r.bytes,
                    "peers": r.peers,
                    "attempts": r.attempts,
                })
            })
            .collect()
    };
    let mut v = json!({
        "kind": kind,
        "signal": "SIGKILL",
        "step_killed": step_killed,
        "step_resumed": step,
        "steps_recomputed": step_killed.saturating_sub(step),
        "recovered_from": inc.recovered_from(),
        "restored_from": {
            "memory": inc.ranks_from("memory"),
            "peer": inc.ranks_from("peer"),
            "persistent": inc.ranks_from("persistent"),
        },
        "restore_s": inc.restore_s(None),
        "restore_s_memory": inc.restore_s(Some("memory")),
        "restore_s_peer": inc.restore_s(Some("peer")),
        "restore_s_persistent": inc.restore_s(Some("persistent")),
        "init_s": inc.init_s,
        "recovery_s": inc.resumed_at.map(|t| (t - killed_at).as_secs_f64()),
        "latest_seen": inc.latest_seen,
        "ranks": ranks,
    });
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

/// The failures both runs go through: kind, the step after which it
/// strikes, and the ranks whose trainers it kills (the launcher then stops
/// the rest and restarts the job).
struct Failure {
    kind: &'static str,
    step: u64,
    ranks: Vec<usize>,
}

/// What the baseline run measured.
struct BaselineRun {
    log: RunLog,
    hashes: Vec<String>,
    failures: Vec<Value>,
    wall_s: f64,
}

/// The baseline: the same job and the same failures, checkpointing only to
/// files on the persistent tier's disk, synchronously (write + fsync); every
/// restart reads the newest complete step's files.
fn run_baseline(
    a: &DemoArgs,
    dir: &Path,
    world: usize,
    threads: usize,
    ui: &Ui,
    failures: &[Failure],
) -> Result<BaselineRun> {
    let store = Store::Files(dir.to_path_buf(), world);
    let ns = "demo-baseline";
    let mut log = RunLog::new("files (write + fsync)");
    let pb = ui.bar(a.steps, "baseline");
    let t = Instant::now();
    let mut job = Job::spawn(&store, ns, a, threads)?;
    let mut reports = Vec::new();
    let mut pending: Option<(&Failure, Instant)> = None;
    for next in failures.iter().map(Some).chain([None]) {
        let (inc, out) = drive(&mut job, a.steps, ui, &pb, &mut log, next.map(|f| f.step))?;
        if let Some((f, killed_at)) = pending.take() {
            reports.push(failure_json(f.kind, f.step, killed_at, &inc, json!({ "ranks_killed": f.ranks })));
        }
        let Some(f) = next else {
            let Outcome::Done { hashes } = out else { bail!("the baseline stopped without being asked to") };
            drop(job);
            pb.finish_and_clear();
            return Ok(BaselineRun { log, hashes, failures: reports, wall_s: t.elapsed().as_secs_f64() });
        };
        ensure!(matches!(out, Outcome::Stopped), "the baseline finished before its {}", f.kind);
        let killed_at = Instant::now();
        for &r in &f.ranks {
            job.kill(r)?;
        }
        job.kill_all()?;
        drop(job);
        log.killed_at = Some(killed_at);
        ui.say(&pb, format!("    {:<11} after step {}: the job restarts and reads its newest files", f.kind, f.step));
        pending = Some((f, killed_at));
        job = Job::spawn(&store, ns, a, threads)?;
    }
    unreachable!("the loop returns after the last run")
}

pub fn run(args: &DemoArgs, json: bool) -> Result<()> {
    let wall = Instant::now();
    let a = args;
    ensure!(a.checkpoint_every > 0, "--checkpoint-every must be at least 1");
    ensure!(a.keep_last > 0, "--keep-last must be at least 1");
    ensure!(a.persist_every > 0, "--persist-every must be at least 1");
    ensure!(a.nodes >= 2, "--nodes must be at least 2: each shard is copied to {REPLICATION_FACTOR} peer");
    ensure!(a.nodes <= 64, "--nodes must be at most 64 on one machine");
    let world = a.nodes;
    let rows = model_rows(a.size)?;
    let shards: Vec<Shard> = (0..world as u32).map(|r| Shard::of(&rows, r, world as u32)).collect::<Result<_>>()?;
    let [crash_step, loss_step, total_step] = pick_failure_steps(
        a.steps,
        a.checkpoint_every,
        a.seed,
        [a.kill_at_step, a.node_loss_at_step, a.total_loss_at_step],
    )?;
    let crash_rank = pick_crash_rank(world, a.seed);
    let lost = 2.min(world - 1);
    let threads = a.threads.unwrap_or_else(|| default_threads(world)).max(1);
    let params = rows.iter().sum::<usize>() * HIDDEN;
    let state_bytes = 12 * params as u64;
    let shard_bytes = shard_file_len(a, &rows, world)?;
    // Per node: its own rank's shards and a peer's replicas, each for the
    // steps kept, one being written and one more (a fetched or re-replicated copy).
    let capacity = 2 * (a.keep_last as u64 + 3) * (shard_bytes + (1 << 20));
    // Ctrl-C or SIGTERM end the demo through its normal error path, so the
    // children are killed and the memory tiers removed.
    crate::signals::catch_int_term();

    let tmp_dir = std::path::absolute(&a.tmp_dir).with_context(|| format!("resolving {}", a.tmp_dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("tierckpt-demo-")
        .tempdir_in(&tmp_dir)
        .with_context(|| format!("creating the demo's memory tiers under {}", tmp_dir.display()))?;
    // The persistent tier, shared by every node, outlives their memory.
    // The persistent tier and the baseline's files live on a disk, as they would.
    let persist_root = a.persist_dir.clone().unwrap_or_else(std::env::temp_dir);
    let ptmp = tempfile::Builder::new()
        .prefix("tierckpt-demo-")
        .tempdir_in(&persist_root)
        .with_context(|| format!("creating the demo's persistent tier under {}", persist_root.display()))?;
    let persist_dir = ptmp.path().join("persistent");
    let baseline_dir = ptmp.path().join("baseline");
    std::fs::create_dir(&persist_dir).with_context(|| format!("creating {}", persist_dir.display()))?;
    let persist_url = format!("file://{}", persist_dir.display());
    let opts = LocalClusterOptions {
        nodes: world,
        memory_tier_size: capacity.to_string(),
        keep_last: a.keep_last,
        replication_factor: REPLICATION_FACTOR,
        placement: PLACEMENT.into(),
        extra_args: vec![
            "--persistent-path".into(),
            persist_url.clone(),
            "--persist-every".into(),
            a.persist_every.to_string(),
            "--persist-keep-last".into(),
            a.keep_last.to_string(),
        ]
        .into_iter()
        .chain(a.storage_bandwidth.0.iter().flat_map(|b| ["--persist-bandwidth".to_string(), b.to_string()]))
        .collect(),
        ..Default::default()
    };
    let heartbeat = opts.heartbeat_interval.clone();
    let mut cluster = LocalCluster::start(tmp.path(), opts).context("starting the cluster's daemons")?;
    let store = Store::Daemons((0..world).map(|i| cluster.socket(i)).collect());
    let ui = Ui { json };
    let hidden = ProgressBar::hidden();
    let pids: Vec<String> =
        (0..world).map(|i| format!("{} (pid {})", LocalCluster::node_id(i), cluster.node(i).pid())).collect();
    let every_nth = match a.persist_every {
        1 => "every checkpoint".to_string(),
        n => format!("one checkpoint in {n}"),
    };
    ui.say(
        &hidden,
        format!(
            "tierckpt demo: a local cluster of {world} nodes, a job of {world} ranks (one per node)\n  \
             Adam over {:.1}M parameters ({} of weights, exp_avg and exp_avg_sq, f32, in {LAYERS} layers), \
             sharded as in ZeRO: each rank holds 1/{world} ({} per shard)\n  \
             {} steps, a checkpoint every {} steps, seed {}; each step is Adam on the host plus {} ms standing for \
             the accelerator's forward and backward pass\n  \
             failures: rank {crash_rank}'s trainer crashes after step {crash_step} (the job restarts); \
             node {} is lost after step {loss_step} (daemon and trainer), replaced by an empty node; \
             every node's memory is lost after step {total_step} (every daemon and trainer), replaced by empty nodes\n  \
             daemons: {}; each with a {} memory tier under {}, keeping {} checkpoints, \
             copying each shard to {REPLICATION_FACTOR} peer ({PLACEMENT}), heartbeat {heartbeat}\n  \
             persistent tier: {persist_url}, shared by every node: {every_nth} uploaded in the background and committed, {} kept\n  \
             then a baseline: the same job and failures, checkpointing only to files on that disk, synchronously\n",
            params as f64 / 1e6,
            human_bytes(state_bytes),
            human_bytes(shard_bytes),
            a.steps,
            a.checkpoint_every,
            a.seed,
            a.compute_ms,
            LocalCluster::node_id(lost),
            pids.join(", "),
            human_bytes(capacity),
            tmp.path().display(),
            a.keep_last,
            a.keep_last
        ),
    );

    // 1. The reference: the same job, never interrupted.
    let ref_ns = "demo-reference";
    ui.say(&hidden, "[1/3] reference run, uninterrupted");
    let mut ref_log = RunLog::new("node memory");
    let t_ref = Instant::now();
    let pb = ui.bar(a.steps, "reference");
    let mut job = Job::spawn(&store, ref_ns, a, threads)?;
    let ref_hashes = match drive(&mut job, a.steps, &ui, &pb, &mut ref_log, None)?.1 {
        Outcome::Done { hashes } => hashes,
        Outcome::Stopped => unreachable!("no stop was asked for"),
    };
    drop(job);
    let ref_hash = combined_hash(&ref_hashes);
    let ref_wall_s = t_ref.elapsed().as_secs_f64();
    pb.finish_and_clear();
    ui.say(&hidden, format!("    done in {ref_wall_s:.1} s, final state xxh3-128 {ref_hash}\n"));
    // Its segments go back to the daemons' pools, for the next run to
    // reuse; first let replication finish, so no copy lands after the delete.
    // (What the reference left in the persistent tier stays there, under
    // its own namespace.)
    if let Some(s) = ref_log.last_checkpoint() {
        wait_replicated(&cluster, 0, ref_ns, s, world, REPLICATION_FACTOR + 1, Duration::from_secs(30))?;
    }
    delete_everywhere(&cluster, ref_ns).context("deleting the reference run's checkpoints")?;

    // 2. The same job, with three failures.
    let ns = "demo";
    let mut meter = Meter::start(&cluster, ns)?;
    ui.say(
        &hidden,
        format!(
            "[2/3] training, with a trainer crash after step {crash_step}, the loss of node {} after step {loss_step} \
             and the loss of every node's memory after step {total_step}",
            LocalCluster::node_id(lost)
        ),
    );
    let mut log = RunLog::new("node memory");
    let t_main = Instant::now();
    let pb = ui.bar(a.steps, "training");

    // Failure 1: a trainer crash.
    let mut job = Job::spawn(&store, ns, a, threads)?;
    let (_, out) = drive(&mut job, a.steps, &ui, &pb, &mut log, Some(crash_step))?;
    ensure!(matches!(out, Outcome::Stopped), "the job finished before the crash");
    let last_ckpt = log.last_checkpoint();
    let pid = job.pid(crash_rank);
    let killed_at = Instant::now();
    job.kill(crash_rank)?;
    // The launcher sees a rank die and stops the others (they would hang in
    // the next collective), then starts the job again.
    job.kill_all()?;
    drop(job);
    log.killed_at = Some(killed_at);
    ui.say(
        &pb,
        format!(
            "    SIGKILL     rank {crash_rank}'s trainer (pid {pid}) after step {crash_step} (last checkpoint: step {}); \
             the launcher stops the other ranks and restarts the job",
            last_ckpt.map_or("none".into(), |s| s.to_string())
        ),
    );
    let mut job = Job::spawn(&store, ns, a, threads)?;
    let (inc1, out) = drive(&mut job, a.steps, &ui, &pb, &mut log, Some(loss_step))?;
    ensure!(matches!(out, Outcome::Stopped), "the job finished before the node loss");
    let crash = failure_json(
        "trainer_crash",
        crash_step,
        killed_at,
        &inc1,
        json!({ "rank_killed": crash_rank, "ranks_stopped": (0..world).filter(|&r| r != crash_rank).collect::<Vec<_>>() }),
    );

    // Failure 2: node `lost` goes away with its trainer; an empty node takes its place.
    let last_ckpt = log.last_checkpoint();
    // Replication runs in the background and takes well under a step; the
    // demo makes sure of it, so that the resume step does not depend on timing.
    let watcher = (lost + 1) % world;
    let replication_wait_s = match last_ckpt {
        Some(s) => wait_replicated(&cluster, watcher, ns, s, world, REPLICATION_FACTOR + 1, Duration::from_secs(30))?,
        None => None,
    };
    let copies_at_kill = match last_ckpt {
        Some(s) => copies(&cluster, watcher, ns, s, world)?,
        None => Vec::new(),
    };
    let daemon_pid = cluster.node(lost).pid();
    let trainer_pid = job.pid(lost);
    meter.read(&cluster, lost)?;
    let killed_at = Instant::now();
    cluster.kill(lost)?;
    job.kill(lost)?;
    job.kill_all()?;
    drop(job);
    log.killed_at = Some(killed_at);
    let t = Instant::now();
    cluster.replace_empty(lost).context("starting an empty replacement node")?;
    meter.replaced(lost);
    let replace_s = t.elapsed().as_secs_f64();
    ui.say(
        &pb,
        format!(
            "    node loss   {}: tierckptd (pid {daemon_pid}) and rank {lost}'s trainer (pid {trainer_pid}) SIGKILLed after step {loss_step} \
             (last checkpoint: step {}, {}); an empty tierckptd (pid {}) took its place in {}",
            LocalCluster::node_id(lost),
            last_ckpt.map_or("none".into(), |s| s.to_string()),
            match replication_wait_s {
                Some(w) => format!("every shard on {} nodes, waited {} for it", REPLICATION_FACTOR + 1, fmt_s(w)),
                None => format!("copies per shard {copies_at_kill:?}"),
            },
            cluster.node(lost).pid(),
            fmt_s(replace_s)
        ),
    );
    let mut job = Job::spawn(&store, ns, a, threads)?;
    let (inc2, out) = drive(&mut job, a.steps, &ui, &pb, &mut log, Some(total_step))?;
    ensure!(matches!(out, Outcome::Stopped), "the job finished before the total memory loss");
    let node_loss = failure_json(
        "node_loss",
        loss_step,
        killed_at,
        &inc2,
        json!({
            "node_killed": LocalCluster::node_id(lost),
            "rank_killed": lost,
            "ranks_stopped": (0..world).filter(|&r| r != lost).collect::<Vec<_>>(),
            "replacement": "empty",
            "replace_s": replace_s,
            "replicated_before_kill": replication_wait_s.is_some(),
            "replication_wait_s": replication_wait_s,
            "copies_at_kill": copies_at_kill,
        }),
    );

    // Failure 3: every node loses its memory (and every trainer dies); empty
    // nodes take their places and the job restores from the persistent tier.
    let last_ckpt = log.last_checkpoint();
    // The drain runs in the background, a second or so behind the trainers;
    // the demo waits for the newest checkpoint's commit so that the resume
    // step does not depend on timing.
    let (persist_wait_s, persisted) = match last_ckpt {
        Some(s) => wait_persisted(&cluster, &persist_dir, ns, s, a.persist_every, Duration::from_secs(60))?,
        None => (0.0, false),
    };
    let committed_at_kill = committed_steps(&persist_dir, ns).last().copied();
    let daemon_pids: Vec<u32> = (0..world).map(|i| cluster.node(i).pid()).collect();
    meter.read_all(&cluster)?;
    let killed_at = Instant::now();
    for i in 0..world {
        cluster.kill(i)?;
    }
    job.kill_all()?;
    drop(job);
    log.killed_at = Some(killed_at);
    let t = Instant::now();
    cluster.replace_all_empty()?;
    for i in 0..world {
        meter.replaced(i);
    }
    let total_replace_s = t.elapsed().as_secs_f64();
    ui.say(
        &pb,
        format!(
            "    total loss  every node: {world} tierckptd (pids {}) and {world} trainers SIGKILLed after step {total_step}, \
             every memory tier wiped (last checkpoint: step {}, {}); {world} empty tierckptd took their places in {}",
            daemon_pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
            last_ckpt.map_or("none".into(), |s| s.to_string()),
            match (persisted, committed_at_kill) {
                (true, _) => format!("committed in the persistent tier, waited {} for it", fmt_s(persist_wait_s)),
                (false, Some(c)) => format!("not persisted after {}; newest committed: step {c}", fmt_s(persist_wait_s)),
                (false, None) => format!("nothing committed in the persistent tier after {}", fmt_s(persist_wait_s)),
            },
            fmt_s(total_replace_s)
        ),
    );
    let mut job = Job::spawn(&store, ns, a, threads)?;
    let (inc3, out) = drive(&mut job, a.steps, &ui, &pb, &mut log, None)?;
    let hashes = match out {
        Outcome::Done { hashes } => hashes,
        Outcome::Stopped => unreachable!("no stop was asked for"),
    };
    drop(job);
    let all_ranks: Vec<usize> = (0..world).collect();
    let total_loss = failure_json(
        "total_memory_loss",
        total_step,
        killed_at,
        &inc3,
        json!({
            "nodes_killed": (0..world).map(LocalCluster::node_id).collect::<Vec<_>>(),
            "ranks_killed": all_ranks,
            "replacement": "empty",
            "replace_s": total_replace_s,
            "last_checkpoint_at_kill": last_ckpt,
            "persisted_before_kill": persisted,
            "persist_wait_s": persist_wait_s,
            "persistent_last_committed_at_kill": committed_at_kill,
        }),
    );
    let final_hash = combined_hash(&hashes);
    let main_wall_s = t_main.elapsed().as_secs_f64();
    pb.finish_and_clear();
    ui.say(&hidden, format!("    done in {main_wall_s:.1} s, final state xxh3-128 {final_hash}\n"));
    // The last checkpoint drains too; wait for it (bounded) so that the
    // counts below include it.
    let final_persist_wait_s = match log.last_checkpoint() {
        Some(s) if a.persist_every == 1 => {
            Some(wait_persisted(&cluster, &persist_dir, ns, s, 1, Duration::from_secs(30))?.0)
        }
        _ => None,
    };
    meter.read_all(&cluster)?;
    let traffic = meter.total;
    let persisted_steps = committed_steps(&persist_dir, ns);

    drop(cluster);
    tmp.close().context("removing the demo's memory tiers")?;

    // 3. The baseline: the same job and failures, checkpointing to files only.
    ui.say(
        &hidden,
        format!(
            "[3/3] baseline: the same job and failures, checkpointing only to files on disk ({}), written and fsynced by the trainers",
            baseline_dir.display()
        ),
    );
    let plan = [
        Failure { kind: "trainer_crash", step: crash_step, ranks: vec![crash_rank] },
        Failure { kind: "node_loss", step: loss_step, ranks: vec![lost] },
        Failure { kind: "total_memory_loss", step: total_step, ranks: (0..world).collect() },
    ];
    let base = run_baseline(a, &baseline_dir, world, threads, &ui, &plan)?;
    let base_hash = combined_hash(&base.hashes);
    ui.say(&hidden, format!("    done in {:.1} s, final state xxh3-128 {base_hash}\n", base.wall_s));
    ptmp.close().context("removing the demo's persistent tier and baseline files")?;
    let base_stalls: Vec<f64> = base.log.checkpoints.iter().map(|c| c.stall_s).collect();

    // Goodput: the training time an uninterrupted run without checkpoints
    // needs, over each run's wall time. The demo's own waits (for a copy on
    // a peer, for a commit) before a failure are not the job's.
    let useful_s = ref_log.useful_s().context("the reference run took no step")?;
    let demo_waits_s = replication_wait_s.unwrap_or(0.0) + persist_wait_s;
    let run_s = main_wall_s - demo_waits_s;
    let goodput = useful_s / run_s;
    let baseline_goodput = useful_s / base.wall_s;

    let identical = final_hash == ref_hash;
    let stalls: Vec<f64> = log.checkpoints.iter().map(|c| c.stall_s).collect();
    let shard_stalls: Vec<f64> = log.checkpoints.iter().flat_map(|c| c.shard_stalls.clone()).collect();
    let ref_stalls: Vec<f64> = ref_log.checkpoints.iter().map(|c| c.stall_s).collect();
    let stall_median = median(&stalls);
    let wall_s = wall.elapsed().as_secs_f64();
    let failures = [crash, node_loss, total_loss];
    if json {
        // In two parts: one `json!` this large exceeds the macro recursion limit.
        let tiers = json!({
            "restore_s_persistent": inc3.restore_s(Some("persistent")),
            "bytes_replicated": traffic.replicated,
            "bytes_replicated_wire": traffic.replicated_wire,
            "bytes_persisted": traffic.persisted,
            "bytes_persisted_stored": traffic.persisted_stored,
            "shards_persisted": traffic.persisted_shards,
            "persistent_last_committed": persisted_steps.last(),
            "persistent": {
                "url": persist_url,
                "persist_every": a.persist_every,
                "keep_last": a.keep_last,
                "steps_committed": persisted_steps,
                "last_committed": persisted_steps.last(),
                "final_wait_s": final_persist_wait_s,
            },
        });
        let goodput_json = json!({
            "compute_ms": a.compute_ms,
            "useful_s": useful_s,
            "run_s": run_s,
            "demo_waits_s": demo_waits_s,
            "goodput": goodput,
            "baseline_goodput": baseline_goodput,
            "baseline": {
                "storage": "files, written and fsynced by each trainer",
                "bitwise_identical": base_hash == ref_hash,
                "state_hash": base_hash,
                "checkpoints": base.log.checkpoints.len(),
                "stall_s": base_stalls,
                "stall_s_median": median(&base_stalls),
                "failures": base.failures,
                "wall_s": base.wall_s,
            },
        });
        let mut report = json!({
            "bitwise_identical": identical,
            "state_hash": final_hash,
            "reference_state_hash": ref_hash,
            "rank_state_hashes": hashes,
            "nodes": world,
            "ranks": world,
            "replication_factor": REPLICATION_FACTOR,
            "placement": PLACEMENT,
            "state_bytes": state_bytes,
            "shard_state_bytes": shards.iter().map(|s| 12 * s.params() as u64).collect::<Vec<_>>(),
            "checkpoint_bytes": log.checkpoints.first().map_or(0, |c| c.bytes),
            "shard_bytes": shard_bytes,
            "params": params,
            "steps": a.steps,
            "checkpoint_every": a.checkpoint_every,
            "keep_last": a.keep_last,
            "persist_every": a.persist_every,
            "seed": a.seed,
            "threads": threads,
            "checkpoints": log.checkpoints.len(),
            "checkpoint_steps": log.checkpoints.iter().map(|c| c.step).collect::<Vec<_>>(),
            "stall_s": stalls,
            "stall_s_median": stall_median,
            "stall_s_max": stalls.iter().copied().reduce(f64::max),
            "shard_stall_s_median": median(&shard_stalls),
            "step_s_median": median(&log.step_s),
            "restore_s": failures[0]["restore_s"],
            "recovery_s": failures[0]["recovery_s"],
            "restore_s_memory": inc1.restore_s(Some("memory")),
            "restore_s_peer": inc2.restore_s(Some("peer")),
            "shards_fetched_from_peers": traffic.fetched,
            "failures": failures,
            "final_loss": log.loss,
            "reference": {
                "checkpoints": ref_log.checkpoints.len(),
                "stall_s": ref_stalls,
                "stall_s_median": median(&ref_stalls),
                "wall_s": ref_wall_s,
            },
            "wall_s": wall_s,
        });
        for part in [tiers, goodput_json] {
            if let (Some(r), Value::Object(t)) = (report.as_object_mut(), part) {
                r.extend(t);
            }
        }
        print_json(&report);
    } else {
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
        t.add_row(vec![
            "cluster".to_string(),
            format!(
                "{world} nodes (tierckptd on 127.0.0.1), {world} ranks; each shard copied to {REPLICATION_FACTOR} peer ({PLACEMENT}); \
                 {every_nth} drained to a persistent tier ({persist_url})"
            ),
        ]);
        t.add_row(vec![
            "training state".to_string(),
            format!(
                "{} ({:.1}M parameters, Adam, f32), {} per rank",
                human_bytes(state_bytes),
                params as f64 / 1e6,
                human_bytes(state_bytes / world as u64)
            ),
        ]);
        t.add_row(vec![
            "checkpoints taken".to_string(),
            format!(
                "{} (every {} steps, {world} shards of {} each)",
                log.checkpoints.len(),
                a.checkpoint_every,
                human_bytes(shard_bytes)
            ),
        ]);
        if let Some(m) = stall_median {
            let max = stalls.iter().copied().fold(0.0, f64::max);
            t.add_row(vec![
                "training paused per checkpoint".to_string(),
                format!("{} median, {} max (slowest rank)", fmt_s(m), fmt_s(max)),
            ]);
        }
        if let Some(m) = median(&log.step_s) {
            t.add_row(vec!["one training step".to_string(), format!("{} median", fmt_s(m))]);
        }
        t.add_row(vec![
            "copied in the background".to_string(),
            format!(
                "{} to peers ({} on the wire after deltas); {} ({} shards) to the persistent tier ({} stored after compression and deltas), newest committed step {}",
                human_bytes(traffic.replicated),
                human_bytes(traffic.replicated_wire),
                human_bytes(traffic.persisted),
                traffic.persisted_shards,
                human_bytes(traffic.persisted_stored),
                persisted_steps.last().map_or("none".to_string(), u64::to_string)
            ),
        ]);
        let rows_for =
            |t: &mut comfy_table::Table, f: &Value, inc: &Incarnation, what: String, before: Option<String>| {
                t.add_row(vec!["failure".to_string(), what]);
                if let Some(b) = before {
                    t.add_row(vec!["before the kill".to_string(), b]);
                }
                let Some(step) = inc.resume else {
                    t.add_row(vec!["recovered from".to_string(), "nothing: started over".to_string()]);
                    return;
                };
                let mut from = Vec::new();
                let mut restore = Vec::new();
                for (tier, name) in
                    [("persistent", "the persistent tier"), ("peer", "a peer's memory"), ("memory", "local memory")]
                {
                    let ranks = inc.ranks_from(tier);
                    if ranks.is_empty() {
                        continue;
                    }
                    let s = inc.restore_s(Some(tier)).unwrap_or(0.0);
                    let bytes = inc.ranks.iter().filter(|r| r.tier == tier).map(|r| r.bytes).max().unwrap_or(0);
                    let plural = if ranks.len() > 1 { "s" } else { "" };
                    from.push(format!("rank{plural} {} from {name}", list(&ranks)));
                    restore.push(format!("{} from {tier} ({:.2} GiB/s per rank)", fmt_s(s), gib_s(bytes, s)));
                }
                t.add_row(vec!["recovered from".to_string(), format!("step {step}: {}", from.join("; "))]);
                t.add_row(vec!["restore, checksums verified".to_string(), restore.join(", ")]);
                if let Some(rec) = f["recovery_s"].as_f64() {
                    let init = inc.init_s.map_or(String::new(), |i| format!(", model init {}", fmt_s(i)));
                    let nodes = f["nodes_killed"].as_array().map_or(1, Vec::len);
                    let replace = f["replace_s"].as_f64().map_or(String::new(), |r| {
                        if nodes > 1 {
                            format!("{nodes} empty nodes started in {}, ", fmt_s(r))
                        } else {
                            format!("empty node started in {}, ", fmt_s(r))
                        }
                    });
                    t.add_row(vec![
                        "recovery, kill to resumed".to_string(),
                        format!("{} ({replace}new processes{init})", fmt_s(rec)),
                    ]);
                }
                t.add_row(vec!["steps recomputed".to_string(), f["steps_recomputed"].to_string()]);
            };
        rows_for(
            &mut t,
            &failures[0],
            &inc1,
            format!("rank {crash_rank}'s trainer SIGKILLed after step {crash_step}; job restarted"),
            None,
        );
        rows_for(
            &mut t,
            &failures[1],
            &inc2,
            format!(
                "node {} lost after step {loss_step} (daemon and trainer SIGKILLed), replaced by an empty node",
                LocalCluster::node_id(lost)
            ),
            replication_wait_s.map(|w| format!("waited {} for every shard to have a copy on a peer", fmt_s(w))),
        );
        rows_for(
            &mut t,
            &failures[2],
            &inc3,
            format!(
                "every node's memory lost after step {total_step} ({world} daemons and {world} trainers SIGKILLed, memory wiped), \
                 replaced by empty nodes"
            ),
            Some(match (persisted, last_ckpt) {
                (true, Some(s)) => format!("waited {} for step {s} to be committed in the persistent tier", fmt_s(persist_wait_s)),
                _ => format!(
                    "waited {} for the drain; newest committed step {}",
                    fmt_s(persist_wait_s),
                    committed_at_kill.map_or("none".to_string(), |s| s.to_string())
                ),
            }),
        );
        t.add_row(vec![
            "final state".to_string(),
            if identical {
                "bitwise identical to the uninterrupted run".to_string()
            } else {
                "DIFFERS from the uninterrupted run".to_string()
            },
        ]);
        t.add_row(vec![
            "goodput".to_string(),
            format!(
                "{goodput:.2} with tierckpt, {baseline_goodput:.2} with the baseline: {useful_s:.1} s of training over {run_s:.1} s and {:.1} s",
                base.wall_s
            ),
        ]);
        if let Some(m) = median(&base_stalls) {
            t.add_row(vec![
                "baseline: paused per checkpoint".to_string(),
                format!(
                    "{} median (files written and fsynced); final state {}",
                    fmt_s(m),
                    if base_hash == ref_hash { "bitwise identical" } else { "DIFFERS" }
                ),
            ]);
        }
        t.add_row(vec!["wall time".to_string(), format!("{wall_s:.1} s")]);
        println!("{t}");
    }
    ensure!(
        identical,
        "the final state after the failures ({final_hash}) differs from the uninterrupted run's ({ref_hash})"
    );
    ensure!(
        base_hash == ref_hash,
        "the baseline's final state ({base_hash}) differs from the uninterrupted run's ({ref_hash})"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory checkpoint: what `with_checkpoint` hands to a save.
    fn snapshot(s: &TrainState) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, String>) {
        s.with_checkpoint(|tensors, meta| {
            (tensors.iter().map(|t| (t.name.to_string(), t.data.to_vec())).collect(), meta.clone())
        })
    }

    fn restore(s: &mut TrainState, snap: &(BTreeMap<String, Vec<u8>>, BTreeMap<String, String>)) -> Result<()> {
        s.restore_with(|targets| {
            for (name, buf) in targets.iter_mut() {
                let src = snap.0.get(*name).ok_or_else(|| anyhow!("no tensor {name}"))?;
                ensure!(src.len() == buf.len(), "tensor {name} has another size");
                buf.copy_from_slice(src);
            }
            Ok(snap.1.clone())
        })
    }

    fn whole() -> Shard {
        Shard::whole(&model_rows(3 << 20).unwrap())
    }

    fn trained_shard(seed: u64, shard: &Shard, steps: u64, threads: usize) -> TrainState {
        let mut s = TrainState::new(seed, shard, threads);
        for _ in 0..steps {
            s.train_step(threads);
        }
        s
    }

    fn trained(seed: u64, steps: u64, threads: usize) -> TrainState {
        trained_shard(seed, &whole(), steps, threads)
    }

    #[test]
    fn training_is_deterministic() {
        let a = trained(7, 25, 2);
        let b = trained(7, 25, 2);
        assert_eq!(a.state_hash(), b.state_hash());
        assert_eq!(a.params, b.params);
        // The thread split does not change the result.
        assert_eq!(trained(7, 25, 3).state_hash(), a.state_hash());
        assert_ne!(trained(8, 25, 2).state_hash(), a.state_hash());
        // It trains: the loss goes down.
        let mut s = TrainState::new(7, &whole(), 2);
        let first = s.train_step(2);
        let last = (0..30).map(|_| s.train_step(2)).last().unwrap();
        assert!(last < first, "loss went from {first} to {last}");
    }

    #[test]
    fn shards_partition_the_model_and_compute_what_one_process_would() {
        let rows = model_rows(3 << 20).unwrap();
        let total: usize = rows.iter().sum();
        for world in [1u32, 2, 3, 4, 7] {
            let shards: Vec<Shard> = (0..world).map(|r| Shard::of(&rows, r, world).unwrap()).collect();
            assert_eq!(shards.iter().map(Shard::rows).sum::<usize>(), total);
            let mut next = 0;
            for s in &shards {
                assert_eq!(s.base, next, "contiguous: {s:?}");
                next += s.params();
                assert!(s.rows() >= total / world as usize);
            }
        }
        assert!(Shard::of(&rows, 4, 4).is_err());
        assert!(Shard::of(&[1, 1], 0, 3).is_err());
        assert_eq!(Shard::of(&rows, 0, 1).unwrap(), Shard::whole(&rows));

        // Four ranks trained apart hold, end to end, the state of one process.
        let one = trained(7, 12, 2);
        let mut params = Vec::new();
        let mut m = Vec::new();
        for r in 0..4 {
            let s = trained_shard(7, &Shard::of(&rows, r, 4).unwrap(), 12, 1);
            assert_eq!((s.rng.clone(), s.loader.clone()), (one.rng.clone(), one.loader.clone()));
            params.extend_from_slice(&s.params);
            m.extend_from_slice(&s.exp_avg_sq);
        }
        assert!(params == one.params && m == one.exp_avg_sq);
        let hashes: Vec<String> =
            (0..4).map(|r| trained_shard(7, &Shard::of(&rows, r, 4).unwrap(), 12, 1).state_hash()).collect();
        assert_eq!(combined_hash(&hashes), combined_hash(&hashes.clone()));
        let mut swapped = hashes.clone();
        swapped.swap(0, 1);
        assert_ne!(combined_hash(&hashes), combined_hash(&swapped), "rank order counts");
    }

    #[test]
    fn resuming_from_a_checkpoint_is_bitwise_identical() {
        let rows = model_rows(3 << 20).unwrap();
        for shard in [whole(), Shard::of(&rows, 2, 4).unwrap()] {
            let reference = trained_shard(7, &shard, 23, 2);
            let at_10 = snapshot(&trained_shard(7, &shard, 10, 2));
            // A fresh process: newly initialised, then restored, then trained on.
            let mut resumed = TrainState::new(7, &shard, 2);
            restore(&mut resumed, &at_10).unwrap();
            assert_eq!(resumed.step(), 10);
            while resumed.step() < 23 {
                resumed.train_step(2);
            }
            assert_eq!(resumed.state_hash(), reference.state_hash());

            // Forgetting the RNG and data loader state is caught.
            let mut forgetful = TrainState::new(7, &shard, 2);
            restore(&mut forgetful, &at_10).unwrap();
            forgetful.rng = Rng::seeded(7);
            forgetful.loader = Loader::default();
            while forgetful.step() < 23 {
                forgetful.train_step(2);
            }
            assert_ne!(forgetful.state_hash(), reference.state_hash());

            // A checkpoint of another seed is refused.
            let mut other = TrainState::new(8, &shard, 2);
            assert!(restore(&mut other, &at_10).is_err());
        }
        // Another rank's shard is refused, even one of the same size.
        let at_5 = snapshot(&trained_shard(7, &Shard::of(&rows, 0, 2).unwrap(), 5, 2));
        let mut rank1 = TrainState::new(7, &Shard::of(&rows, 1, 2).unwrap(), 2);
        assert!(restore(&mut rank1, &at_5).is_err());
    }

    #[test]
    fn checkpoint_layout_matches_the_state() {
        let rows = model_rows(3 << 20).unwrap();
        for shard in [whole(), Shard::of(&rows, 1, 3).unwrap()] {
            let s = trained_shard(1, &shard, 3, 2);
            let specs = checkpoint_specs(&s.shard);
            let layout = ShardLayout::new(&specs, &s.metadata()).unwrap();
            assert!(layout.file_len > s.state_bytes());
            let (tensors, meta) = snapshot(&s);
            assert_eq!(tensors.len(), specs.len());
            assert_eq!(tensors.values().map(|t| t.len() as u64).sum::<u64>(), s.state_bytes() + 40);
            assert_eq!(meta["step"], "3");
            assert_eq!(meta["rank"], shard.rank.to_string());
        }
    }

    #[test]
    fn failure_steps_are_off_the_checkpoint_boundaries() {
        let pick = |steps, every, seed, chosen| pick_failure_steps(steps, every, seed, chosen);
        let free = [None; 3];
        for seed in 0..50 {
            let [c, l, t] = pick(30, 5, seed, free).unwrap();
            for s in [c, l, t] {
                assert!(s > 5 && s < 30 && s % 5 != 0 && (s + 1) % 5 != 0, "{c} {l} {t}");
            }
            assert!(2 * c <= 30 && l / 5 > c / 5 && t / 5 > l / 5, "a checkpoint between {c}, {l} and {t}");
            let [c, l, t] = pick(60, 10, seed, free).unwrap();
            assert!(c > 10 && c <= 30 && c % 10 != 0, "{c}");
            assert!(l / 10 > c / 10 && t / 10 > l / 10 && t < 60 && l % 10 != 0 && t % 10 != 0, "{c} {l} {t}");
            assert!(pick_crash_rank(4, seed) < 4);
        }
        assert_eq!(pick(30, 5, 3, free).unwrap(), pick(30, 5, 3, free).unwrap());
        let spread: std::collections::BTreeSet<[u64; 3]> =
            (0..50).map(|seed| pick(60, 10, seed, free).unwrap()).collect();
        assert!(spread.len() > 5, "the seed picks the steps: {spread:?}");
        // Chosen steps are kept; the others are fitted around them.
        assert_eq!(pick(30, 5, 0, [Some(19), Some(24), Some(28)]).unwrap(), [19, 24, 28]);
        let [c, l, t] = pick(30, 5, 0, [Some(19), Some(24), None]).unwrap();
        assert!(c == 19 && l == 24 && t > 25 && t < 29, "{t}");
        let [c, l, t] = pick(30, 5, 0, [Some(19), None, None]).unwrap();
        assert!(c == 19 && l > 20 && l < 24 && t > 25 && t < 29, "{l} {t}");
        let [c, l, t] = pick(30, 5, 0, [None, Some(12), None]).unwrap();
        assert!(c > 5 && c < 9 && l == 12 && t > 15 && t < 29, "{c} {t}");
        let [c, l, t] = pick(30, 5, 0, [None, None, Some(17)]).unwrap();
        assert!(c > 5 && c < 9 && l > 10 && l < 14 && t == 17, "{c} {l}");
        for bad in [
            [Some(24), Some(19), None],
            [None, Some(24), Some(19)],
            [Some(20), None, Some(20)],
            [Some(3), None, None],
            [None, None, Some(30)],
        ] {
            assert!(pick(30, 5, 0, bad).is_err(), "{bad:?}");
        }
        assert!(pick(30, 5, 0, [None, Some(6), None]).is_err(), "no room for the crash");
        assert!(pick(30, 5, 0, [None, Some(28), None]).is_ok());
        assert!(pick(30, 5, 0, [None, Some(29), None]).is_err(), "no room for the total loss");
        assert!(pick(8, 5, 0, free).is_err());
        assert_eq!(pick(9, 5, 0, free).unwrap(), [6, 7, 8]);
        assert_eq!(pick(5, 1, 0, free).unwrap(), [2, 3, 4]);
        assert!(pick(4, 1, 0, free).is_err());
    }

    #[test]
    fn resume_orders() {
        assert_eq!(parse_resume("resume 40").unwrap(), Some(40));
        assert_eq!(parse_resume("resume none").unwrap(), None);
        assert!(parse_resume("go").is_err());
        assert!(parse_resume("resume soon").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MB").unwrap(), 16_000_000);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size(" 2 GiB ").unwrap(), 2 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
        assert!(model_rows(1000).is_err());
        assert_eq!(model_rows(300_000_000).unwrap().iter().sum::<usize>(), 300_000_000 / 12 / HIDDEN);
    }
}
