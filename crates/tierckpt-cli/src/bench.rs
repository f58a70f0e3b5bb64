//! `tierckpt bench`: benchmarks that report ratios against a floor measured
//! in the same run (see docs/BENCHMARKS.md).
//!
//! `bench memory` saves a state into the local memory tier of a real daemon
//! child and restores it, and compares both with a one-thread memcpy of the
//! same bytes.
//!
//! `bench replicate` starts a two-node cluster of daemon children and times
//! the copy of a shard to the peer (replication) and back from it (restore
//! from a peer), against a plain TCP copy of the same bytes between two
//! processes on loopback.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use tierckpt_client::{Client, TensorData};
use tierckpt_format::{Dtype, ShardKey, ShardLayout, TensorSpec};

use crate::output;
use tierckpt_harness::daemon::{DaemonOptions, DaemonProcess, LocalCluster, LocalClusterOptions};

/// Ratio to the floor that `bench memory` aims for, for saves and restores.
pub const MEMORY_TARGET_RATIO: f64 = 1.2;

/// Rate that `bench replicate` aims for, as a fraction of the TCP floor's,
/// for replication and for a restore from a peer.
pub const REPLICATE_TARGET_RATIO: f64 = 0.8;

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
    /// Replication of a shard to a peer's memory and restore from the peer
    /// (a two-node cluster), against a plain TCP copy of the same bytes.
    Replicate(ReplicateArgs),
    /// Drain of a shard to the persistent tier (file:// or s3://), against
    /// a raw write + fsync or a boto3 upload of the same bytes.
    Persist(crate::bench_persist::PersistArgs),
    /// Bytes replicated and persisted with compression and deltas, on three
    /// workloads made in the run, against the full size; codec speed against
    /// a memcpy of the same bytes.
    Reduce(crate::bench_reduce::ReduceArgs),
    /// The receiving end of `bench replicate`'s TCP floor.
    #[command(hide = true)]
    TcpSink(TcpSinkArgs),
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
    /// Have the daemon mount a tmpfs with huge pages for its memory tier
    /// (`--mount-huge-tmpfs`; needs root), unmounted at the end.
    #[arg(long)]
    pub huge_pages: bool,
}

/// Unmounts a directory when dropped (lazily: a mapping may still be open).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        tierckpt_daemon::hugepages::unmount_lazily(&self.0);
    }
}

#[derive(Args, Debug, Clone)]
pub struct ReplicateArgs {
    /// Total tensor bytes of the shard, like "1GiB", "512MB" or a number of bytes.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub size: u64,
    /// Number of tensors the shard is split into (bf16, equal sizes).
    #[arg(long, default_value_t = 64)]
    pub tensors: usize,
    /// Measured replications, and measured restores of each kind.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Unmeasured saves and replications before the measured ones
    /// [default: keep_last + 2, enough for both nodes to recycle segments].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Steps each daemon keeps (its retention).
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    /// Repetitions of the TCP floor up front (one more runs before every
    /// measured replication and restore; the median of all is reported).
    #[arg(long, default_value_t = 5)]
    pub floor_reps: usize,
    /// Directory (a tmpfs) in which the nodes' memory tiers are created, in a
    /// fresh subdirectory removed at the end.
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct TcpSinkArgs {
    /// Size of the receive buffer: the largest transfer.
    #[arg(long, value_parser = parse_bytes)]
    pub bytes: u64,
    /// Port on 127.0.0.1 to listen on; 0 for any. The port is printed.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
}

pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s).map_err(|e| format!("{s:?} is not a size ({e}); write it like \"1GiB\" or \"512MB\""))
}

pub fn run(args: &BenchArgs, json: bool) -> Result<()> {
    match &args.cmd {
        BenchCmd::Reduce(a) => output::emit(&crate::bench_reduce::measure(a)?, json, crate::bench_reduce::print),
        BenchCmd::Memory(a) => output::emit(&memory(a)?, json, print_memory),
        BenchCmd::Replicate(a) => output::emit(&replicate(a)?, json, print_replicate),
        BenchCmd::Persist(a) => {
            output::emit(&crate::bench_persist::persist(a)?, json, crate::bench_persist::print_persist)
        }
        BenchCmd::TcpSink(a) => tcp_sink(a)?,
    }
    Ok(())
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
    /// The memory tier's tmpfs gave huge pages.
    pub huge_pages: bool,
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

pub(crate) fn median(v: &[f64]) -> f64 {
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

pub(crate) fn gibps(bytes: u64, s: f64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / s
}

/// Fills `buf` with splitmix64 output seeded by `seed`, touching every page.
pub(crate) fn fill_random(buf: &mut [u8], seed: u64) {
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
    let tier_dir = dir.path().join("tier");
    let mut opts = DaemonOptions::new(&tier_dir);
    opts.memory_tier_size = ((a.keep_last as u64 + 2) * file_bytes).to_string();
    opts.keep_last = a.keep_last;
    opts.http_addr = "off".into();
    if a.huge_pages {
        opts.extra_args.push("--mount-huge-tmpfs".into());
    }
    let unmount = a.huge_pages.then(|| Unmount(tier_dir.clone()));
    let mut daemon = DaemonProcess::spawn(opts)?;
    let mut client = Client::connect(&daemon.socket)?;
    let huge_pages = client.status()?.huge_pages;

    // Saves: successive steps of one namespace, like a training loop.
    let ns = "bench-memory";
    let mut saves = Vec::with_capacity(warmup + a.iters);
    for step in 0..(warmup + a.iters) as u64 {
        if step >= warmup as u64 {
            floor_rep(&mut targets);
        }
        let key = ShardKey::new(ns, step, 0);
        let t = client.save(&key, 1, &tensors, &metadata, false).with_context(|| format!("saving step {step}"))?;
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
    drop(unmount);
    dir.close().context("removing the benchmark's memory tier")?;

    let threads = if bytes < 4 << 20 { 1 } else { cores().clamp(1, 8) };
    let chunks = file_bytes.div_ceil(tierckpt_format::DEFAULT_CHUNK_SIZE) as usize;
    let save_ratio = save_stall_s / memcpy_floor_s;
    let restore_ratio = restore_s / memcpy_floor_s;
    Ok(MemoryReport {
        benchmark: "memory",
        huge_pages,
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
        "bench memory: {} in {} {} tensors; {} warm-up saves, then medians of {} saves and {} restores; keep_last {}; memory tier on {}",
        output::human_bytes(r.bytes),
        r.tensors,
        r.dtype.to_lowercase(),
        r.warmup,
        r.iters,
        r.iters,
        r.keep_last,
        if r.huge_pages { "huge pages" } else { "4 KiB pages" }
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

/// What `bench replicate` measured. Times are seconds; rates are GiB/s of
/// shard-file bytes; ratios are a rate over the TCP floor's rate (higher is
/// better, 1.0 is as fast as a plain TCP copy).
#[derive(Debug, Clone, Serialize)]
pub struct ReplicateReport {
    pub benchmark: &'static str,
    /// Tensor bytes of the shard.
    pub bytes: u64,
    /// Bytes of the shard file (tensors plus the safetensors header): what
    /// replication, a restore from a peer and the TCP floor move.
    pub file_bytes: u64,
    pub tensors: usize,
    pub dtype: &'static str,
    pub nodes: usize,
    pub replication_factor: usize,
    pub placement: &'static str,
    pub iters: usize,
    pub warmup: usize,
    pub keep_last: usize,
    /// A plain TCP copy of `file_bytes` from this process to a child on
    /// 127.0.0.1, pre-faulted buffers at both ends: median, rate, fastest.
    pub tcp_floor_s: f64,
    pub tcp_floor_gibps: f64,
    pub tcp_floor_min_s: f64,
    /// Floor repetitions: `floor_reps` up front, then one before each
    /// measured replication and restore.
    pub floor_samples: usize,
    /// Median time from the save's return on node 0 (visible there) until
    /// the replica is visible on node 1.
    pub replicate_s: f64,
    pub replicate_gibps: f64,
    /// `replicate_gibps / tcp_floor_gibps`.
    pub ratio: f64,
    pub replicate_min_s: f64,
    pub replicate_max_s: f64,
    /// The first replication, into fresh tmpfs pages on node 1.
    pub replicate_first_s: f64,
    /// Median `Client::save` (wait = true) on node 0, for context.
    pub save_s: f64,
    /// Median `map_unverified` on node 1 after its copy was deleted: fetch
    /// from node 0 (verified chunk by chunk), then map and populate.
    pub restore_peer_s: f64,
    pub restore_peer_gibps: f64,
    /// `restore_peer_gibps / tcp_floor_gibps`.
    pub restore_ratio: f64,
    pub restore_peer_min_s: f64,
    /// Median `map_unverified` on node 1 of the shard it now holds: the part
    /// of `restore_peer_s` that is not the fetch.
    pub restore_local_map_s: f64,
    /// Median `load_into` on node 1 after its copy was deleted: fetch, map,
    /// then copy into caller buffers verifying every chunk.
    pub restore_peer_load_s: f64,
    pub restore_peer_load_gibps: f64,
    pub restore_peer_load_ratio: f64,
    pub target_ratio: f64,
    pub meets_target: bool,
    pub restore_meets_target: bool,
    /// The bytes restored through node 1 were compared with the saved ones.
    pub restored_identical: bool,
    pub steady_state: &'static str,
}

const REPLICATE_STEADY_STATE: &str = "each save waits until the replica is visible on node 1 before \
the next one; after keep_last + 2 warm-up saves both nodes write into recycled segments";

/// `bench tcp-sink`: accepts one connection on 127.0.0.1 and then, for each
/// transfer (a little-endian u64 length, then that many bytes), reads the
/// bytes into a pre-faulted buffer and answers one byte. Exits at EOF.
pub fn tcp_sink(a: &TcpSinkArgs) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", a.port)).context("binding the TCP sink")?;
    let mut buf = vec![0u8; a.bytes as usize];
    // `vec!` of zeros maps pages lazily: touch them all before any timing.
    buf.fill(1);
    std::hint::black_box(&mut buf);
    let port = listener.local_addr()?.port();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{port}")?;
        out.flush()?;
    }
    let (mut s, _) = listener.accept().context("accepting the sender")?;
    s.set_nodelay(true)?;
    loop {
        let mut hdr = [0u8; 8];
        match s.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("reading a transfer's length"),
        }
        let n = u64::from_le_bytes(hdr) as usize;
        if n > buf.len() {
            bail!("transfer of {n} bytes exceeds the sink's buffer of {}", buf.len());
        }
        s.read_exact(&mut buf[..n]).context("receiving a transfer")?;
        s.write_all(&[1]).context("acknowledging a transfer")?;
    }
}

/// The sending end of the TCP floor: a `bench tcp-sink` child and one
/// connection to it.
struct TcpFloor {
    child: Child,
    stream: TcpStream,
}

impl TcpFloor {
    fn start(bytes: u64) -> Result<Self> {
        let exe = std::env::current_exe().context("locating this executable for the TCP sink")?;
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "tcp-sink", "--bytes", &bytes.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        tierckpt_harness::daemon::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {} bench tcp-sink", exe.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line)?;
        let port: u16 = match line.trim().parse() {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                bail!("the TCP sink said {line:?} instead of its port ({status:?})");
            }
        };
        let stream = TcpStream::connect(("127.0.0.1", port)).context("connecting to the TCP sink")?;
        stream.set_nodelay(true)?;
        Ok(Self { child, stream })
    }

    /// Sends `data` and waits for the acknowledgement; returns the seconds
    /// from the first byte to the acknowledgement.
    fn rep(&mut self, data: &[u8]) -> Result<f64> {
        let t = Instant::now();
        self.stream.write_all(&(data.len() as u64).to_le_bytes())?;
        self.stream.write_all(data)?;
        let mut ack = [0u8; 1];
        self.stream.read_exact(&mut ack).context("waiting for the TCP sink's acknowledgement")?;
        Ok(t.elapsed().as_secs_f64())
    }

    fn finish(mut self) -> Result<()> {
        self.stream.shutdown(std::net::Shutdown::Write)?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the TCP sink failed: {status}");
        }
        Ok(())
    }
}

impl Drop for TcpFloor {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Deletes a step on the node at `http_addr` alone (its peers keep theirs).
fn delete_on_node(http_addr: &str, ns: &str, step: u64) -> Result<()> {
    let mut s = TcpStream::connect(http_addr).with_context(|| format!("connecting to {http_addr}"))?;
    write!(
        s,
        "DELETE /v1/namespaces/{ns}/steps/{step}?scope=node HTTP/1.1\r\nHost: {http_addr}\r\n\
         Connection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).with_context(|| format!("reading the answer of {http_addr}"))?;
    let status = resp.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("deleting {ns}/step {step} on {http_addr}: {}", resp.lines().next().unwrap_or("no answer"));
    }
    Ok(())
}

/// Waits until `key` is visible on the node of `client`: polls its steps
/// every millisecond until the shard is there or being received, then waits
/// for it to become visible without polling.
fn wait_replica(client: &mut Client, key: &ShardKey, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let steps = client.steps(&key.namespace)?;
        if let Some(s) = steps.iter().find(|s| s.step == key.step) {
            if s.ranks.contains(&key.rank) {
                return Ok(());
            }
            if s.in_progress.contains(&key.rank) {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                client.wait_visible(key, left).with_context(|| format!("waiting for the replica of {key}"))?;
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("no replica of {key} appeared on node 1 within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `bench replicate` and returns its figures.
pub fn replicate(a: &ReplicateArgs) -> Result<ReplicateReport> {
    if a.iters == 0 || a.floor_reps == 0 {
        bail!("--iters and --floor-reps must be at least 1");
    }
    if a.keep_last == 0 {
        bail!("--keep-last must be at least 1");
    }
    let warmup = a.warmup.unwrap_or(a.keep_last + 2);
    let lens = tensor_lens(a.size, a.tensors)?;
    let bytes = a.size;
    let names: Vec<String> = (0..lens.len()).map(|i| format!("layers.{i}.weight")).collect();
    let shapes: Vec<[usize; 1]> = lens.iter().map(|&l| [l / 2]).collect();
    let specs: Vec<TensorSpec> = (0..lens.len())
        .map(|i| TensorSpec { name: names[i].clone(), dtype: Dtype::BF16, shape: shapes[i].to_vec() })
        .collect();
    let metadata = BTreeMap::from([("bench".to_string(), "replicate".to_string())]);
    let file_bytes = ShardLayout::new(&specs, &metadata)?.file_len;

    // One pre-faulted buffer of file_bytes: the tensors are its first `bytes`
    // bytes, and the TCP floor sends all of it.
    let mut src = Buf::new(file_bytes as usize, 0);
    {
        let n = cores();
        let part = (file_bytes as usize).div_ceil(n);
        std::thread::scope(|s| {
            for (i, p) in src.bytes_mut().chunks_mut(part).enumerate() {
                s.spawn(move || fill_random(p, i as u64 + 1));
            }
        });
    }
    let src_bytes = src.bytes();
    let mut state: Vec<&[u8]> = Vec::with_capacity(lens.len());
    let mut off = 0;
    for &l in &lens {
        state.push(&src_bytes[off..off + l]);
        off += l;
    }
    let tensors: Vec<TensorData<'_>> = (0..lens.len())
        .map(|i| TensorData { name: &names[i], dtype: Dtype::BF16, shape: &shapes[i], data: state[i] })
        .collect();

    // The floor: a plain TCP copy of the same number of bytes to a child
    // process on loopback, `floor_reps` times up front and once right before
    // every measured replication and restore.
    let mut floor_link = TcpFloor::start(file_bytes)?;
    let mut floor = Vec::with_capacity(a.floor_reps + 3 * a.iters);
    for _ in 0..a.floor_reps {
        floor.push(floor_link.rep(src_bytes)?);
    }

    // Two nodes, k = 1, ring: node 0 writes, node 1 holds its replicas. Each
    // tier holds keep_last + 2 shards. The heartbeat timeout is long, so that
    // re-replication (only of shards older than twice the timeout) stays out.
    let dir = tempfile::Builder::new()
        .prefix("tierckpt-bench-replicate-")
        .tempdir_in(&a.dir)
        .with_context(|| format!("creating a directory under {}", a.dir.display()))?;
    let opts = LocalClusterOptions {
        nodes: 2,
        memory_tier_size: ((a.keep_last as u64 + 2) * file_bytes).to_string(),
        keep_last: a.keep_last,
        replication_factor: 1,
        placement: "ring".into(),
        heartbeat_interval: "500ms".into(),
        heartbeat_timeout: "60s".into(),
        replication_bandwidth: None,
        token: None,
        ..Default::default()
    };
    let cluster = LocalCluster::start(dir.path(), opts)?;
    let mut c0 = Client::connect(cluster.socket(0))?;
    let mut c1 = Client::connect(cluster.socket(1))?;
    let http1 = cluster.node(1).http_addr.clone().context("node 1 has no HTTP address")?;
    let timeout = Duration::from_secs(600);

    // Saves on node 0, each waited for on node 1 before the next.
    let ns = "bench-replicate";
    let (mut saves, mut reps) = (Vec::new(), Vec::new());
    let mut replicate_first_s = f64::NAN;
    for step in 0..(warmup + a.iters) as u64 {
        let measured = step >= warmup as u64;
        if measured {
            floor.push(floor_link.rep(src_bytes)?);
        }
        let key = ShardKey::new(ns, step, 0);
        let t0 = Instant::now();
        c0.save(&key, 1, &tensors, &metadata, true).with_context(|| format!("saving step {step} on node 0"))?;
        let t1 = Instant::now();
        wait_replica(&mut c1, &key, timeout)?;
        let dt = t1.elapsed().as_secs_f64();
        if step == 0 {
            replicate_first_s = dt;
        }
        if measured {
            saves.push((t1 - t0).as_secs_f64());
            reps.push(dt);
        }
    }
    let last = ShardKey::new(ns, (warmup + a.iters - 1) as u64, 0);

    // Restores from the peer: node 1 drops its copy of the newest step (over
    // HTTP with `scope=node`, so node 0 keeps its copy; the segment goes to
    // node 1's pool), then a client of node 1 opens it, which
    // makes node 1 fetch it from node 0 into that segment. `map_unverified`
    // leases the shard until its connection closes, and a leased shard is
    // unlinked rather than recycled when deleted: each open uses a connection
    // of its own, closed a moment before the next delete.
    let (mut peer, mut local_maps) = (Vec::new(), Vec::new());
    for _ in 0..a.iters {
        floor.push(floor_link.rep(src_bytes)?);
        delete_on_node(&http1, ns, last.step)?;
        let mut c = Client::connect(cluster.socket(1))?;
        let t = Instant::now();
        let m = c.map_unverified(&last).context("restoring from the peer (map_unverified on node 1)")?;
        peer.push(t.elapsed().as_secs_f64());
        drop(m);
        let t = Instant::now();
        let m = c.map_unverified(&last)?;
        local_maps.push(t.elapsed().as_secs_f64());
        drop(m);
        drop(c);
        std::thread::sleep(Duration::from_millis(50));
    }

    // The same, restored into pre-faulted caller buffers with load_into.
    let mut dst = Buf::new(bytes as usize, 0);
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
    let mut loads = Vec::new();
    for _ in 0..a.iters {
        floor.push(floor_link.rep(src_bytes)?);
        delete_on_node(&http1, ns, last.step)?;
        let t = Instant::now();
        c1.load_into(&last, &mut targets).context("restoring from the peer (load_into on node 1)")?;
        loads.push(t.elapsed().as_secs_f64());
    }
    let restored_identical = state.iter().zip(&targets).all(|(s, (_, d))| s[..] == d[..]);
    if !restored_identical {
        bail!("the bytes restored through node 1 differ from the saved ones");
    }
    drop(targets);

    drop(c0);
    drop(c1);
    drop(cluster);
    floor_link.finish()?;
    dir.close().context("removing the benchmark's memory tiers")?;

    let tcp_floor_s = median(&floor);
    let replicate_s = median(&reps);
    let restore_peer_s = median(&peer);
    let restore_peer_load_s = median(&loads);
    let tcp_floor_gibps = gibps(file_bytes, tcp_floor_s);
    let replicate_gibps = gibps(file_bytes, replicate_s);
    let restore_peer_gibps = gibps(file_bytes, restore_peer_s);
    let restore_peer_load_gibps = gibps(file_bytes, restore_peer_load_s);
    let ratio = replicate_gibps / tcp_floor_gibps;
    let restore_ratio = restore_peer_gibps / tcp_floor_gibps;
    Ok(ReplicateReport {
        benchmark: "replicate",
        bytes,
        file_bytes,
        tensors: lens.len(),
        dtype: "BF16",
        nodes: 2,
        replication_factor: 1,
        placement: "ring",
        iters: a.iters,
        warmup,
        keep_last: a.keep_last,
        tcp_floor_s,
        tcp_floor_gibps,
        tcp_floor_min_s: min(&floor),
        floor_samples: floor.len(),
        replicate_s,
        replicate_gibps,
        ratio,
        replicate_min_s: min(&reps),
        replicate_max_s: reps.iter().copied().fold(0.0, f64::max),
        replicate_first_s,
        save_s: median(&saves),
        restore_peer_s,
        restore_peer_gibps,
        restore_ratio,
        restore_peer_min_s: min(&peer),
        restore_local_map_s: median(&local_maps),
        restore_peer_load_s,
        restore_peer_load_gibps,
        restore_peer_load_ratio: restore_peer_load_gibps / tcp_floor_gibps,
        target_ratio: REPLICATE_TARGET_RATIO,
        meets_target: ratio >= REPLICATE_TARGET_RATIO,
        restore_meets_target: restore_ratio >= REPLICATE_TARGET_RATIO,
        restored_identical,
        steady_state: REPLICATE_STEADY_STATE,
    })
}

fn print_replicate(r: &ReplicateReport) {
    println!(
        "bench replicate: {} in {} {} tensors ({} shard file); {} nodes, k={}, {}; {} warm-up saves, then medians of {}",
        output::human_bytes(r.bytes),
        r.tensors,
        r.dtype.to_lowercase(),
        output::human_bytes(r.file_bytes),
        r.nodes,
        r.replication_factor,
        r.placement,
        r.warmup,
        r.iters
    );
    let mut t = output::table(&["operation", "seconds", "GiB/s", "ratio to floor"]);
    let row = |t: &mut comfy_table::Table, op: &str, s: f64, rate: bool| {
        let g = gibps(r.file_bytes, s);
        t.add_row(vec![
            op.to_string(),
            format!("{s:.4}"),
            if rate { format!("{g:.2}") } else { String::new() },
            if rate { format!("{:.3}", g / r.tcp_floor_gibps) } else { String::new() },
        ]);
    };
    row(&mut t, "TCP copy on loopback (the floor)", r.tcp_floor_s, true);
    row(&mut t, "replicate: visible on node 0 -> visible on node 1", r.replicate_s, true);
    row(&mut t, "replicate: first (fresh tmpfs pages)", r.replicate_first_s, true);
    row(&mut t, "restore from peer: map_unverified on node 1", r.restore_peer_s, true);
    row(&mut t, "  of which local map and populate", r.restore_local_map_s, false);
    row(&mut t, "restore from peer: load_into on node 1", r.restore_peer_load_s, true);
    row(&mut t, "save on node 0 (wait), for context", r.save_s, false);
    println!("{t}");
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "target: rate at least {} of the floor -- replicate {:.3} ({}), restore from peer {:.3} ({})",
        r.target_ratio,
        r.ratio,
        verdict(r.meets_target),
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
