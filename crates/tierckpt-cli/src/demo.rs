//! `tierckpt demo`: the main job, on one node.
//!
//! It starts a daemon on a fresh memory tier under `/dev/shm`, then a
//! training process (`tierckpt demo-trainer`, this same executable) that runs
//! Adam over a few hundred MB of f32 state (weights and both moments) and
//! checkpoints every K steps into the daemon. The demo runs the workload once
//! uninterrupted for a reference, then again, SIGKILLs the trainer between two
//! checkpoints, restarts it, lets it resume from the memory tier and finish,
//! and compares the final state with the reference bit for bit.
//!
//! The workload is deterministic: the gradient of step t is a function of the
//! weights, of a data batch picked by a shuffling data loader, and of noise
//! seeded from an RNG whose state, like the loader's, travels in the
//! checkpoint. A resumed run is identical to an uninterrupted one only if
//! every piece of that state was saved and restored exactly.
//!
//! The trainer reports to the demo through its stdout, one JSON object per
//! line: `started`, `resumed`, `step`, `checkpoint`, `done`.

// `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use tierckpt_client::{Client, TensorData};
use tierckpt_format::{Dtype, ShardKey, ShardLayout, TensorSpec};

use crate::daemon_proc::{DaemonOptions, DaemonProcess};
use crate::output::{human_bytes, print_json};

// Tensors are saved as their in-memory bytes: safetensors is little-endian.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "the demo trainer assumes a little-endian host"
);

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Training state to checkpoint: weights plus Adam's two moments, all f32 ("300MB", "1GiB").
    #[arg(long, default_value = "300MB", value_parser = parse_size_arg)]
    pub size: u64,
    /// Training steps.
    #[arg(long, default_value_t = 60)]
    pub steps: u64,
    /// Checkpoint every K steps.
    #[arg(long, value_name = "K", default_value_t = 10)]
    pub checkpoint_every: u64,
    /// Seed of the workload; it also picks the step after which the trainer is killed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Kill the trainer after this step instead of one picked from the seed.
    #[arg(long, value_name = "STEP")]
    pub kill_at_step: Option<u64>,
    /// Complete checkpoints the memory tier keeps.
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    /// Threads of the trainer's optimizer step [default: one per core].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Directory (a tmpfs) in which the demo's memory tier is created and removed.
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    pub tmp_dir: PathBuf,
}

#[derive(clap::Args, Debug, Clone)]
pub struct TrainerArgs {
    /// Socket of the daemon to checkpoint into.
    #[arg(long)]
    pub daemon_socket: PathBuf,
    #[arg(long)]
    pub namespace: String,
    /// Bytes of training state (weights + two moments).
    #[arg(long, value_parser = parse_size_arg)]
    pub size: u64,
    #[arg(long)]
    pub steps: u64,
    #[arg(long)]
    pub checkpoint_every: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
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
    Ok((0..LAYERS)
        .map(|l| rows / LAYERS + usize::from(l < rows % LAYERS))
        .collect())
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

/// Everything a training process holds: weights, Adam's moments, step
/// counter, RNG and data loader.
pub struct TrainState {
    seed: u64,
    step: u64,
    rng: Rng,
    loader: Loader,
    rows: Vec<usize>,
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

/// The tensors of a checkpoint of a model with these layer rows.
pub fn checkpoint_specs(rows: &[usize]) -> Vec<TensorSpec> {
    let mut specs = Vec::with_capacity(3 * rows.len() + 2);
    for (l, &r) in rows.iter().enumerate() {
        for name in layer_names(l) {
            specs.push(TensorSpec {
                name,
                dtype: Dtype::F32,
                shape: vec![r, HIDDEN],
            });
        }
    }
    specs.push(TensorSpec {
        name: STEP_TENSOR.into(),
        dtype: Dtype::I64,
        shape: vec![1],
    });
    specs.push(TensorSpec {
        name: RNG_TENSOR.into(),
        dtype: Dtype::U8,
        shape: vec![32],
    });
    specs
}

/// Byte buffers of the small tensors, filled by a restore.
#[derive(Default)]
struct Scalars {
    step: [u8; 8],
    rng: [u8; 32],
}

impl TrainState {
    /// A freshly initialised model (every page of the state touched).
    pub fn new(seed: u64, rows: &[usize], threads: usize) -> Self {
        let n = rows.iter().sum::<usize>() * HIDDEN;
        let mut params = vec![0f32; n];
        let mut exp_avg = vec![0f32; n];
        let mut exp_avg_sq = vec![0f32; n];
        let mut blocks = vec![0f64; n.div_ceil(BLOCK)];
        let init_seed = mix(seed ^ 0x1417);
        parallel_blocks(
            threads,
            &mut params,
            &mut exp_avg,
            &mut exp_avg_sq,
            &mut blocks,
            |at, p, m, v, _| {
                for (j, x) in p.iter_mut().enumerate() {
                    *x = 0.5 * unit(mix(init_seed ^ ((at + j) as u64).wrapping_mul(GOLDEN)));
                }
                m.fill(0.0);
                v.fill(0.0);
            },
        );
        Self {
            seed,
            step: 0,
            rng: Rng::seeded(seed),
            loader: Loader::default(),
            rows: rows.to_vec(),
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

    /// One training step; returns the mean loss before the update.
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
        parallel_blocks(
            threads,
            &mut self.params,
            &mut self.exp_avg,
            &mut self.exp_avg_sq,
            &mut losses,
            |at, p, m, v, l| adam_range(at, p, m, v, l, k),
        );
        losses.iter().sum::<f64>() / self.params.len() as f64
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
            ("format".to_string(), "tierckpt-demo/1".to_string()),
            ("step".to_string(), self.step.to_string()),
            ("seed".to_string(), self.seed.to_string()),
            ("params".to_string(), self.params.len().to_string()),
            (
                "optimizer".to_string(),
                format!("adam lr={LR} betas=({BETA1},{BETA2}) eps={EPS}"),
            ),
            ("data.epoch".to_string(), self.loader.epoch.to_string()),
            ("data.position".to_string(), self.loader.position.to_string()),
            ("data.order".to_string(), order.join(",")),
            ("rng".to_string(), format!("xoshiro256** state in tensor {RNG_TENSOR}")),
        ])
    }

    /// The checkpoint's tensors, borrowing the state, and its metadata.
    fn with_checkpoint<R>(&self, f: impl FnOnce(&[TensorData<'_>], &BTreeMap<String, String>) -> R) -> R {
        let specs = checkpoint_specs(&self.rows);
        let step = (self.step as i64).to_le_bytes();
        let rng = self.rng.to_bytes();
        let mut data: Vec<&[u8]> = Vec::with_capacity(specs.len());
        let mut at = 0;
        for &r in &self.rows {
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
            .map(|(s, d)| TensorData {
                name: &s.name,
                dtype: s.dtype,
                shape: &s.shape,
                data: d,
            })
            .collect();
        f(&tensors, &self.metadata())
    }

    /// Fills the state from a checkpoint: `load` gets one buffer per tensor
    /// name and returns the checkpoint's metadata.
    fn restore_with(
        &mut self,
        load: impl FnOnce(&mut [(&str, &mut [u8])]) -> Result<BTreeMap<String, String>>,
    ) -> Result<()> {
        let specs = checkpoint_specs(&self.rows);
        let mut sc = Scalars::default();
        let meta = {
            let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(specs.len());
            let (mut p, mut m, mut v) = (&mut self.params[..], &mut self.exp_avg[..], &mut self.exp_avg_sq[..]);
            for &r in &self.rows {
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
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| anyhow!("the checkpoint has no metadata {k:?}"))
        };
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
        let order = get("data.order")?;
        let order: Vec<u32> = if order.is_empty() {
            Vec::new()
        } else {
            order
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .context("metadata \"data.order\"")?
        };
        self.loader = Loader {
            epoch: num("data.epoch")?,
            position: num("data.position")? as usize,
            order,
        };
        self.rng = Rng::from_bytes(&sc.rng);
        self.step = step;
        Ok(())
    }
}

/// Default trainer threads: one per core.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

// ---------------------------------------------------------------------------
// The trainer process

/// One JSON object per line on stdout, flushed.
fn emit(v: Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}")
        .and_then(|()| out.flush())
        .context("writing to the demo")
}

pub fn run_trainer(a: &TrainerArgs) -> Result<()> {
    ensure!(a.checkpoint_every > 0, "--checkpoint-every must be at least 1");
    let threads = a.threads.unwrap_or_else(default_threads).max(1);
    let rows = model_rows(a.size)?;
    let ns = a.namespace.as_str();
    let t0 = Instant::now();
    let mut state = TrainState::new(a.seed, &rows, threads);
    emit(json!({
        "event": "started",
        "pid": std::process::id(),
        "params": state.params(),
        "state_bytes": state.state_bytes(),
        "init_s": t0.elapsed().as_secs_f64(),
    }))?;
    let mut client = Client::connect(&a.daemon_socket)?;
    if let Some(step) = client.latest(ns).context("asking for the latest checkpoint")? {
        let key = ShardKey::new(ns, step, 0);
        let t = Instant::now();
        state
            .restore_with(|targets| Ok(client.load_into(&key, targets)?.1.metadata))
            .with_context(|| format!("restoring {key}"))?;
        let restore_s = t.elapsed().as_secs_f64();
        emit(json!({
            "event": "resumed",
            "step": state.step(),
            "restore_s": restore_s,
            "bytes": state.state_bytes(),
            "tier": "memory",
        }))?;
    }
    client
        .discard_incomplete_after(ns, state.step())
        .context("discarding leftovers of a crashed run")?;
    while state.step() < a.steps {
        let t = Instant::now();
        let loss = state.train_step(threads);
        let step = state.step();
        emit(json!({ "event": "step", "step": step, "loss": loss, "step_s": t.elapsed().as_secs_f64() }))?;
        if step % a.checkpoint_every == 0 {
            let key = ShardKey::new(ns, step, 0);
            let timing = state
                .with_checkpoint(|tensors, meta| client.save(&key, 1, tensors, meta, false))
                .with_context(|| format!("saving {key}"))?;
            emit(json!({
                "event": "checkpoint",
                "step": step,
                "stall_s": timing.total_s(),
                "copy_s": timing.copy_s,
                "bytes": timing.bytes,
            }))?;
        }
    }
    emit(json!({ "event": "done", "step": state.step(), "state_hash": state.state_hash() }))
}

// ---------------------------------------------------------------------------
// The demo

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C or SIGTERM end the demo through its normal error path, so the
/// children are killed and the memory tier removed.
fn catch_interrupts() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// A trainer child process: its stdout events arrive on a channel, the tail
/// of its stderr is kept for error messages. Killed on drop.
struct Trainer {
    child: Child,
    events: Receiver<Value>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Trainer {
    fn spawn(socket: &Path, namespace: &str, a: &DemoArgs, threads: usize) -> Result<Self> {
        // This very binary, even if a rebuild replaced the file meanwhile:
        // the reference and the crashed run must run the same code.
        let self_exe = Path::new("/proc/self/exe");
        let exe = if self_exe.exists() {
            self_exe.to_path_buf()
        } else {
            std::env::current_exe().context("locating the tierckpt executable")?
        };
        let mut cmd = Command::new(&exe);
        cmd.arg0("tierckpt")
            .arg("demo-trainer")
            .arg("--daemon-socket")
            .arg(socket)
            .args(["--namespace", namespace])
            .args(["--size", &a.size.to_string()])
            .args(["--steps", &a.steps.to_string()])
            .args(["--checkpoint-every", &a.checkpoint_every.to_string()])
            .args(["--seed", &a.seed.to_string()])
            .args(["--threads", &threads.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe. The trainer dies with the demo.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} demo-trainer", exe.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "event": "text", "text": line }));
                if tx.send(v).is_err() {
                    break;
                }
            }
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
        Ok(Self {
            child,
            events,
            stderr: tail,
        })
    }

    /// The next event, or None once the trainer closed its stdout.
    fn next_event(&self) -> Result<Option<Value>> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            check_interrupt()?;
            match self.events.recv_timeout(Duration::from_millis(100)) {
                Ok(v) => return Ok(Some(v)),
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!("the trainer (pid {}) said nothing for 10 minutes", self.child.id())
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn stderr_tail(&self) -> String {
        // Give the reader a moment to collect what a dying trainer wrote.
        std::thread::sleep(Duration::from_millis(50));
        let q = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn wait(&mut self) -> Result<ExitStatus> {
        self.child.wait().context("waiting for the trainer")
    }

    fn kill(&mut self) -> Result<()> {
        self.child.kill().context("killing the trainer")?;
        self.wait()?;
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

/// What one namespace's runs recorded.
#[derive(Default)]
struct RunLog {
    checkpoints: Vec<(u64, f64)>,
    step_s: Vec<f64>,
    last_step: u64,
    loss: Option<f64>,
    /// (step, restore_s, when the event arrived)
    resumed: Option<(u64, f64, Instant)>,
    /// Model initialisation of the latest trainer process.
    init_s: Option<f64>,
    killed_at: Option<Instant>,
}

enum Outcome {
    Done { hash: String },
    Killed { at: Instant },
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

fn num(v: &Value, k: &str) -> Result<f64> {
    v[k].as_f64()
        .ok_or_else(|| anyhow!("the trainer sent {v} without a number {k:?}"))
}

/// Follows a trainer until it is done, or kills it once it reports a step at
/// or past `kill_at`.
fn drive(tr: &mut Trainer, ui: &Ui, pb: &ProgressBar, log: &mut RunLog, kill_at: Option<u64>) -> Result<Outcome> {
    loop {
        let Some(ev) = tr.next_event()? else {
            check_interrupt()?;
            let status = tr.wait()?;
            bail!(
                "the trainer (pid {}) exited ({status}) before it was done:\n{}",
                tr.child.id(),
                tr.stderr_tail()
            );
        };
        match ev["event"].as_str().unwrap_or("") {
            "started" => log.init_s = ev["init_s"].as_f64(),
            "resumed" => {
                let now = Instant::now();
                let (step, restore_s) = (num(&ev, "step")? as u64, num(&ev, "restore_s")?);
                log.resumed = Some((step, restore_s, now));
                let lost = log.last_step.saturating_sub(step);
                log.last_step = step;
                pb.set_position(step);
                let since_kill = log.killed_at.map_or(String::new(), |k| {
                    format!(", {} after the kill", fmt_s((now - k).as_secs_f64()))
                });
                ui.say(
                    pb,
                    format!(
                        "    resumed     from step {step} in the memory tier: restore {} ({:.2} GiB/s){since_kill}; {lost} steps to redo",
                        fmt_s(restore_s),
                        num(&ev, "bytes")? / restore_s / (1u64 << 30) as f64,
                    ),
                );
            }
            "step" => {
                let step = num(&ev, "step")? as u64;
                let loss = num(&ev, "loss")?;
                log.last_step = step;
                log.loss = Some(loss);
                log.step_s.push(num(&ev, "step_s")?);
                pb.set_position(step);
                pb.set_message(format!("loss {loss:.4}"));
                if kill_at.is_some_and(|k| step >= k) {
                    let at = Instant::now();
                    tr.kill()?;
                    return Ok(Outcome::Killed { at });
                }
            }
            "checkpoint" => {
                let (step, stall) = (num(&ev, "step")? as u64, num(&ev, "stall_s")?);
                log.checkpoints.push((step, stall));
                ui.say(
                    pb,
                    format!(
                        "    checkpoint  step {step:>4}  {} into the memory tier, training paused {}",
                        human_bytes(num(&ev, "bytes")? as u64),
                        fmt_s(stall)
                    ),
                );
            }
            "done" => {
                let hash = ev["state_hash"]
                    .as_str()
                    .ok_or_else(|| anyhow!("the trainer sent {ev} without a hash"))?;
                let status = tr.wait()?;
                ensure!(
                    status.success(),
                    "the trainer exited ({status}) after it was done:\n{}",
                    tr.stderr_tail()
                );
                return Ok(Outcome::Done { hash: hash.to_string() });
            }
            _ => {}
        }
    }
}

/// Runs a trainer in `ns` from start to end; returns the final state hash.
fn run_through(tr: &mut Trainer, ui: &Ui, pb: &ProgressBar, log: &mut RunLog) -> Result<String> {
    match drive(tr, ui, pb, log, None)? {
        Outcome::Done { hash } => Ok(hash),
        Outcome::Killed { .. } => unreachable!("no kill was asked for"),
    }
}

/// The step after which the trainer is killed: past the first checkpoint,
/// neither on a checkpoint boundary nor right before one (so work is lost and
/// recomputed), in the middle third of the run if possible; picked from the
/// seed.
pub fn pick_kill_step(steps: u64, every: u64, seed: u64) -> Result<u64> {
    ensure!(
        steps > every + 1,
        "--steps ({steps}) must exceed --checkpoint-every ({every}) by at least 2, so the crash can follow a checkpoint"
    );
    let all: Vec<u64> = (every + 1..steps).collect();
    let off_boundary: Vec<u64> = all.iter().copied().filter(|s| s % every != 0).collect();
    let clear: Vec<u64> = off_boundary.iter().copied().filter(|s| (s + 1) % every != 0).collect();
    let middle: Vec<u64> = clear
        .iter()
        .copied()
        .filter(|&s| 3 * s >= steps && 3 * s <= 2 * steps)
        .collect();
    let pool = [middle, clear, off_boundary, all]
        .into_iter()
        .find(|c| !c.is_empty())
        .expect("steps > every + 1 leaves at least one step");
    Ok(pool[(mix(seed ^ 0xC2A5) % pool.len() as u64) as usize])
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

pub fn run(args: &DemoArgs, json: bool) -> Result<()> {
    let wall = Instant::now();
    let a = args;
    ensure!(a.checkpoint_every > 0, "--checkpoint-every must be at least 1");
    ensure!(a.keep_last > 0, "--keep-last must be at least 1");
    let rows = model_rows(a.size)?;
    let kill_step = match a.kill_at_step {
        Some(s) => {
            ensure!(
                s > a.checkpoint_every && s < a.steps,
                "--kill-at-step must lie after the first checkpoint (step {}) and before the last step ({})",
                a.checkpoint_every,
                a.steps
            );
            s
        }
        None => pick_kill_step(a.steps, a.checkpoint_every, a.seed)?,
    };
    let threads = a.threads.unwrap_or_else(default_threads).max(1);
    let params = rows.iter().sum::<usize>() * HIDDEN;
    let state_bytes = 12 * params as u64;
    // One shard per checkpoint; metadata grows a little with the step number.
    let probe = TrainState {
        seed: a.seed,
        step: a.steps,
        rng: Rng::seeded(0),
        loader: Loader {
            epoch: a.steps,
            position: 0,
            order: (0..BATCHES).collect(),
        },
        rows: rows.clone(),
        params: Vec::new(),
        exp_avg: Vec::new(),
        exp_avg_sq: Vec::new(),
    };
    let shard_bytes = ShardLayout::new(&checkpoint_specs(&rows), &probe.metadata())?.file_len;
    let capacity = (a.keep_last as u64 + 2) * (shard_bytes + (1 << 20));
    catch_interrupts();

    let tmp = tempfile::Builder::new()
        .prefix("tierckpt-demo-")
        .tempdir_in(&a.tmp_dir)
        .with_context(|| format!("creating the demo's memory tier under {}", a.tmp_dir.display()))?;
    let mut opts = DaemonOptions::new(tmp.path());
    opts.memory_tier_size = capacity.to_string();
    opts.keep_last = a.keep_last;
    opts.http_addr = "off".into();
    let daemon = DaemonProcess::spawn(opts).context("starting the daemon")?;
    let ui = Ui { json };
    let hidden = ProgressBar::hidden();
    ui.say(
        &hidden,
        format!(
            "tierckpt demo: Adam over {:.1}M parameters ({} of weights, exp_avg and exp_avg_sq, f32, in {LAYERS} layers)\n  \
             {} steps, a checkpoint every {} steps, seed {}; the trainer will be killed after step {kill_step}\n  \
             daemon tierckptd (pid {}) with a {} memory tier in {}, keeping {} checkpoints\n",
            params as f64 / 1e6,
            human_bytes(state_bytes),
            a.steps,
            a.checkpoint_every,
            a.seed,
            daemon.pid(),
            human_bytes(capacity),
            tmp.path().display(),
            a.keep_last
        ),
    );

    // 1. The reference: the same workload, never interrupted.
    let ref_ns = "demo-reference";
    ui.say(&hidden, "[1/2] reference run, uninterrupted");
    let mut ref_log = RunLog::default();
    let t_ref = Instant::now();
    let pb = ui.bar(a.steps, "reference");
    let ref_hash = run_through(
        &mut Trainer::spawn(&daemon.socket, ref_ns, a, threads)?,
        &ui,
        &pb,
        &mut ref_log,
    )?;
    let ref_wall_s = t_ref.elapsed().as_secs_f64();
    pb.finish_and_clear();
    ui.say(
        &hidden,
        format!("    done in {ref_wall_s:.1} s, final state xxh3-128 {ref_hash}\n"),
    );
    {
        // Its segments go back to the daemon's pool, for the next run to reuse.
        let mut c = Client::connect(&daemon.socket)?;
        c.delete_namespace(ref_ns)
            .context("deleting the reference run's checkpoints")?;
    }

    // 2. The same workload, with a crash.
    let ns = "demo";
    ui.say(&hidden, format!("[2/2] training, with a crash after step {kill_step}"));
    let mut log = RunLog::default();
    let t_main = Instant::now();
    let pb = ui.bar(a.steps, "training");
    let mut first = Trainer::spawn(&daemon.socket, ns, a, threads)?;
    let killed_at = match drive(&mut first, &ui, &pb, &mut log, Some(kill_step))? {
        Outcome::Killed { at } => at,
        Outcome::Done { .. } => bail!("the trainer finished before it could be killed"),
    };
    log.killed_at = Some(killed_at);
    let pid_killed = first.child.id();
    // The supervisor's job: restart at once.
    let mut second = Trainer::spawn(&daemon.socket, ns, a, threads)?;
    // What the killed trainer said before it died.
    while let Ok(ev) = first.events.recv() {
        match ev["event"].as_str() {
            Some("step") => log.last_step = log.last_step.max(num(&ev, "step")? as u64),
            Some("checkpoint") => log.checkpoints.push((num(&ev, "step")? as u64, num(&ev, "stall_s")?)),
            _ => {}
        }
    }
    drop(first);
    let step_killed = log.last_step;
    let last_ckpt = log.checkpoints.iter().map(|c| c.0).max();
    ui.say(
        &pb,
        format!(
            "    SIGKILL     trainer pid {pid_killed} after step {step_killed} (last checkpoint: step {})",
            last_ckpt.map_or("none".into(), |s| s.to_string())
        ),
    );
    let final_hash = run_through(&mut second, &ui, &pb, &mut log)?;
    let main_wall_s = t_main.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let failure = match log.resumed {
        Some((step, restore_s, at)) => {
            let recovery_s = (at - killed_at).as_secs_f64();
            json!({
                "kind": "trainer_crash",
                "signal": "SIGKILL",
                "step_killed": step_killed,
                "step_resumed": step,
                "steps_recomputed": step_killed.saturating_sub(step),
                "recovered_from": "memory",
                "restore_s": restore_s,
                "init_s": log.init_s,
                "recovery_s": recovery_s,
            })
        }
        None => json!({
            "kind": "trainer_crash",
            "signal": "SIGKILL",
            "step_killed": step_killed,
            "step_resumed": 0,
            "steps_recomputed": step_killed,
            "recovered_from": "none",
            "restore_s": null,
            "recovery_s": null,
        }),
    };
    if log.resumed.is_none() {
        ui.say(
            &hidden,
            "    the restarted trainer found no checkpoint and started over",
        );
    }
    ui.say(
        &hidden,
        format!("    done in {main_wall_s:.1} s, final state xxh3-128 {final_hash}\n"),
    );

    drop(daemon);
    tmp.close().context("removing the demo's memory tier")?;

    let identical = final_hash == ref_hash;
    let stalls: Vec<f64> = log.checkpoints.iter().map(|c| c.1).collect();
    let ref_stalls: Vec<f64> = ref_log.checkpoints.iter().map(|c| c.1).collect();
    let stall_median = median(&stalls);
    let wall_s = wall.elapsed().as_secs_f64();
    let restore_s = failure["restore_s"].as_f64();
    let recovery_s = failure["recovery_s"].as_f64();
    if json {
        print_json(&json!({
            "bitwise_identical": identical,
            "state_hash": final_hash,
            "reference_state_hash": ref_hash,
            "state_bytes": state_bytes,
            "checkpoint_bytes": shard_bytes,
            "params": params,
            "steps": a.steps,
            "checkpoint_every": a.checkpoint_every,
            "keep_last": a.keep_last,
            "seed": a.seed,
            "threads": threads,
            "checkpoints": log.checkpoints.len(),
            "checkpoint_steps": log.checkpoints.iter().map(|c| c.0).collect::<Vec<_>>(),
            "stall_s": stalls,
            "stall_s_median": stall_median,
            "stall_s_max": stalls.iter().copied().reduce(f64::max),
            "step_s_median": median(&log.step_s),
            "restore_s": restore_s,
            "recovery_s": recovery_s,
            "failures": [failure],
            "final_loss": log.loss,
            "reference": {
                "checkpoints": ref_log.checkpoints.len(),
                "stall_s": ref_stalls,
                "stall_s_median": median(&ref_stalls),
                "wall_s": ref_wall_s,
            },
            "wall_s": wall_s,
        }));
    } else {
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
        t.add_row(vec![
            "training state".to_string(),
            format!(
                "{} ({:.1}M parameters, Adam, f32)",
                human_bytes(state_bytes),
                params as f64 / 1e6
            ),
        ]);
        t.add_row(vec![
            "checkpoints taken".to_string(),
            format!(
                "{} (every {} steps, {} each)",
                log.checkpoints.len(),
                a.checkpoint_every,
                human_bytes(shard_bytes)
            ),
        ]);
        if let Some(m) = stall_median {
            let max = stalls.iter().copied().fold(0.0, f64::max);
            t.add_row(vec![
                "training paused per checkpoint".to_string(),
                format!("{} median, {} max", fmt_s(m), fmt_s(max)),
            ]);
        }
        if let Some(m) = median(&log.step_s) {
            t.add_row(vec!["one training step".to_string(), format!("{} median", fmt_s(m))]);
        }
        t.add_row(vec![
            "failure".to_string(),
            format!("trainer SIGKILLed after step {step_killed}"),
        ]);
        match (restore_s, recovery_s) {
            (Some(r), Some(rec)) => {
                t.add_row(vec![
                    "recovered from".to_string(),
                    format!("memory tier, step {}", failure["step_resumed"]),
                ]);
                t.add_row(vec![
                    "restore".to_string(),
                    format!(
                        "{} ({:.2} GiB/s, checksums verified)",
                        fmt_s(r),
                        state_bytes as f64 / r / (1u64 << 30) as f64
                    ),
                ]);
                let init = log
                    .init_s
                    .map_or(String::new(), |i| format!(", model init {},", fmt_s(i)));
                t.add_row(vec![
                    "recovery, kill to resumed".to_string(),
                    format!("{} (new process{init} restore {})", fmt_s(rec), fmt_s(r)),
                ]);
                t.add_row(vec![
                    "steps recomputed".to_string(),
                    failure["steps_recomputed"].to_string(),
                ]);
            }
            _ => {
                t.add_row(vec!["recovered from".to_string(), "nothing: started over".to_string()]);
            }
        }
        t.add_row(vec![
            "final state".to_string(),
            if identical {
                "bitwise identical to the uninterrupted run".to_string()
            } else {
                "DIFFERS from the uninterrupted run".to_string()
            },
        ]);
        t.add_row(vec!["wall time".to_string(), format!("{wall_s:.1} s")]);
        println!("{t}");
    }
    ensure!(
        identical,
        "the final state after the crash ({final_hash}) differs from the uninterrupted run's ({ref_hash})"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory checkpoint: what `with_checkpoint` hands to a save.
    fn snapshot(s: &TrainState) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, String>) {
        s.with_checkpoint(|tensors, meta| {
            (
                tensors.iter().map(|t| (t.name.to_string(), t.data.to_vec())).collect(),
                meta.clone(),
            )
        })
    }

    fn restore(s: &mut TrainState, snap: &(BTreeMap<String, Vec<u8>>, BTreeMap<String, String>)) -> Result<()> {
        s.restore_with(|targets| {
            for (name, buf) in targets.iter_mut() {
                buf.copy_from_slice(&snap.0[*name]);
            }
            Ok(snap.1.clone())
        })
    }

    fn trained(seed: u64, steps: u64, threads: usize) -> TrainState {
        let mut s = TrainState::new(seed, &model_rows(3 << 20).unwrap(), threads);
        for _ in 0..steps {
            s.train_step(threads);
        }
        s
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
        let mut s = TrainState::new(7, &model_rows(3 << 20).unwrap(), 2);
        let first = s.train_step(2);
        let last = (0..30).map(|_| s.train_step(2)).last().unwrap();
        assert!(last < first, "loss went from {first} to {last}");
    }

    #[test]
    fn resuming_from_a_checkpoint_is_bitwise_identical() {
        let rows = model_rows(3 << 20).unwrap();
        let reference = trained(7, 23, 2);
        let at_10 = snapshot(&trained(7, 10, 2));
        // A fresh process: newly initialised, then restored, then trained on.
        let mut resumed = TrainState::new(7, &rows, 2);
        restore(&mut resumed, &at_10).unwrap();
        assert_eq!(resumed.step(), 10);
        while resumed.step() < 23 {
            resumed.train_step(2);
        }
        assert_eq!(resumed.state_hash(), reference.state_hash());

        // Forgetting the RNG and data loader state is caught.
        let mut forgetful = TrainState::new(7, &rows, 2);
        restore(&mut forgetful, &at_10).unwrap();
        forgetful.rng = Rng::seeded(7);
        forgetful.loader = Loader::default();
        while forgetful.step() < 23 {
            forgetful.train_step(2);
        }
        assert_ne!(forgetful.state_hash(), reference.state_hash());

        // A checkpoint of another seed is refused.
        let mut other = TrainState::new(8, &rows, 2);
        assert!(restore(&mut other, &at_10).is_err());
    }

    #[test]
    fn checkpoint_layout_matches_the_state() {
        let s = trained(1, 3, 2);
        let specs = checkpoint_specs(&s.rows);
        let layout = ShardLayout::new(&specs, &s.metadata()).unwrap();
        assert!(layout.file_len > s.state_bytes());
        let (tensors, meta) = snapshot(&s);
        assert_eq!(tensors.len(), specs.len());
        assert_eq!(
            tensors.values().map(|t| t.len() as u64).sum::<u64>(),
            s.state_bytes() + 40
        );
        assert_eq!(meta["step"], "3");
    }

    #[test]
    fn kill_step_is_off_the_checkpoint_boundaries() {
        for seed in 0..50 {
            let s = pick_kill_step(30, 5, seed).unwrap();
            assert!(s > 5 && s < 30 && s % 5 != 0 && (s + 1) % 5 != 0, "{s}");
            let s = pick_kill_step(60, 10, seed).unwrap();
            assert!((20..=40).contains(&s) && s % 10 != 0, "{s}");
        }
        assert_eq!(pick_kill_step(30, 5, 3).unwrap(), pick_kill_step(30, 5, 3).unwrap());
        assert!(pick_kill_step(6, 5, 0).is_err());
        assert_eq!(pick_kill_step(3, 1, 0).unwrap(), 2);
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
        assert_eq!(
            model_rows(300_000_000).unwrap().iter().sum::<usize>(),
            300_000_000 / 12 / HIDDEN
        );
    }
}
