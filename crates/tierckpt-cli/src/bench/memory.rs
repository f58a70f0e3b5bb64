//! `tierckpt bench memory`: saves a state into the local memory tier of a
//! real daemon child and restores it, against a one-thread memcpy of the
//! same bytes. Before every save but the first, a training step rewrites
//! `--changed` of the shard's chunks (outside the timed region). The first
//! save waits for the daemon's pre-faulted pool; back-to-back saves (no pause
//! at all between them) are measured apart.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tierckpt_client::{Client, SaveTiming};
use tierckpt_format::{ShardKey, TensorSpec};
use tierckpt_harness::daemon::{DaemonOptions, DaemonProcess};
use tierckpt_harness::stats::{gibps, median, min};

use super::floor;
use super::state::{cores, restore_targets, Buf, Change, FreshData, ShardArgs, State};
use crate::output;

/// Ratio to the floor that `bench memory` aims for, for saves and restores.
pub const MEMORY_TARGET_RATIO: f64 = 1.2;

/// Arguments of `bench memory`.
#[derive(Args, Debug, Clone)]
pub struct MemoryArgs {
    /// The shard and how it is measured.
    #[command(flatten)]
    pub shard: ShardArgs,
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
    /// The daemon's `--prefault-share` (0: no pre-faulted pool, as before
    /// it existed) [default: the daemon's, 0.25].
    #[arg(long)]
    pub prefault_share: Option<f64>,
    /// No `Client::prepare` before the first save: the save then maps and
    /// populates its segment itself.
    #[arg(long)]
    pub no_prepare: bool,
}

/// What `bench memory` measured. Times are seconds; ratios are a time over
/// `memcpy_floor_s`.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// Which benchmark this is.
    pub benchmark: &'static str,
    /// Tensor bytes of the state (what the floor copies).
    pub bytes: u64,
    /// Bytes of the shard file (tensor bytes plus the safetensors header).
    pub file_bytes: u64,
    /// Number of bf16 tensors.
    pub tensors: usize,
    /// The memory tier's tmpfs gave huge pages.
    pub huge_pages: bool,
    /// The daemon's pre-faulted share of its capacity (0: none).
    pub prefault_share: f64,
    /// Their dtype.
    pub dtype: &'static str,
    /// Measured repetitions.
    pub iters: usize,
    /// Unmeasured repetitions before them.
    pub warmup: usize,
    /// Steps each daemon keeps (its retention).
    pub keep_last: usize,
    /// What each training step rewrote.
    #[serde(flatten)]
    pub fresh: FreshData,
    /// Copy workers the client uses for a save and for a restore of this size.
    pub threads: usize,
    /// Copy workers of a restore.
    pub restore_threads: usize,
    /// Threads of the floor (one, by definition).
    pub floor_threads: usize,
    /// Offset of the caller's buffers from a page boundary.
    pub buffer_offset: usize,
    /// The floor: median seconds.
    pub memcpy_floor_s: f64,
    /// The floor's rate.
    pub memcpy_floor_gibps: f64,
    /// The floor's fastest repetition.
    pub memcpy_floor_min_s: f64,
    /// Floor repetitions: `floor_reps` up front, then one before each
    /// measured save and restore.
    pub floor_samples: usize,
    /// Median time the caller is blocked by a save, in steady state.
    pub save_stall_s: f64,
    /// Rate of the median save.
    pub save_gibps: f64,
    /// `save_stall_s / memcpy_floor_s`.
    pub save_ratio: f64,
    /// Medians of each phase of the measured saves (they need not add up to
    /// the median total).
    pub save_reserve_s: f64,
    /// Median copy into the segment.
    pub save_copy_s: f64,
    /// Median seal (a round trip).
    pub save_seal_s: f64,
    /// Fastest measured save.
    pub save_stall_min_s: f64,
    /// Slowest measured save.
    pub save_stall_max_s: f64,
    /// The very first save of the shard's size, once the daemon's pool was
    /// pre-faulted.
    pub save_stall_first_s: f64,
    /// Rate of the first save.
    pub save_first_gibps: f64,
    /// `save_stall_first_s / memcpy_floor_s`.
    pub save_first_ratio: f64,
    /// The first save's reserve (with mapping the segment).
    pub save_first_reserve_s: f64,
    /// The first save's copy (with populating its page tables).
    pub save_first_copy_s: f64,
    /// Seconds from the daemon's start until its filler had pre-faulted its
    /// pool (before the first save).
    pub prefault_wait_s: f64,
    /// Bytes the pool held pre-faulted when the first save began.
    pub prefaulted_bytes: u64,
    /// The first save was served from a pooled segment.
    pub first_save_from_pool: bool,
    /// Seconds `Client::prepare` took before the first save (setting its
    /// segment aside, mapping and faulting it in), as a trainer would call
    /// it before training; null with `--no-prepare`.
    pub prepare_s: Option<f64>,
    /// Median time the caller is blocked by a save that follows the
    /// previous one at once (no training step, no wait for its seal).
    pub back_to_back_s: f64,
    /// `back_to_back_s / memcpy_floor_s`.
    pub back_to_back_ratio: f64,
    /// Slowest back-to-back save.
    pub back_to_back_max_s: f64,
    /// Reservations the daemon served from pooled (pre-faulted or recycled)
    /// segments during the run.
    pub reserved_from_pool: u64,
    /// Reservations that had to create a fresh segment (its pages faulted in
    /// by the copy).
    pub reserved_fresh: u64,
    /// Median time of `load_into` (map, copy and verify every checksum).
    pub restore_s: f64,
    /// Rate of the median restore.
    pub restore_gibps: f64,
    /// `restore_s / memcpy_floor_s`.
    pub restore_ratio: f64,
    /// Median time to map and populate the shard, a part of `restore_s`.
    pub restore_map_s: f64,
    /// Fastest measured restore.
    pub restore_min_s: f64,
    /// The first restore.
    pub restore_first_s: f64,
    /// The target ratio.
    pub target_ratio: f64,
    /// Whether `save_ratio` is within the target.
    pub save_meets_target: bool,
    /// Whether `save_first_ratio` is within the target.
    pub first_save_meets_target: bool,
    /// Whether `back_to_back_ratio` is within the target.
    pub back_to_back_meets_target: bool,
    /// Whether the restore's ratio is within the target.
    pub restore_meets_target: bool,
    /// The restored bytes were compared with the saved ones.
    pub restored_identical: bool,
    /// How the steady state was obtained.
    pub steady_state: &'static str,
}

const STEADY_STATE: &str = "before every save but the first, a training step rewrites the changed chunks \
outside the timed region; checksumming happens between saves, as between training steps: each save is \
waited for (wait_visible) outside the timed region";

/// Unmounts a directory when dropped (lazily: a mapping may still be open).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        tierckpt_daemon::hugepages::unmount_lazily(&self.0);
    }
}

/// The daemon of a run, on a fresh directory under `--dir`.
struct Node {
    daemon: DaemonProcess,
    dir: tempfile::TempDir,
    unmount: Option<Unmount>,
}

impl Node {
    fn start(a: &MemoryArgs, file_bytes: u64) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tierckpt-bench-")
            .tempdir_in(&a.dir)
            .with_context(|| format!("creating a directory under {}", a.dir.display()))?;
        let tier_dir = dir.path().join("tier");
        // Room for keep_last + 2 shards, and at least 8: with the default
        // prefault_share (a quarter), the pool's first segment (half of its
        // target) then holds a shard.
        let mut opts = DaemonOptions::new(&tier_dir);
        let s = &mut opts.settings;
        s.memory_tier_size = Some(((a.shard.keep_last as u64 + 2).max(8) * file_bytes).to_string());
        s.keep_last = Some(a.shard.keep_last);
        s.http_addr = Some("off".into());
        s.mount_huge_tmpfs = Some(a.huge_pages);
        s.prefault_share = a.prefault_share;
        let unmount = a.huge_pages.then(|| Unmount(tier_dir.clone()));
        Ok(Self { daemon: DaemonProcess::spawn(opts)?, dir, unmount })
    }

    fn stop(mut self) -> Result<()> {
        self.daemon.kill()?;
        drop(self.daemon);
        drop(self.unmount);
        self.dir.close().context("removing the benchmark's memory tier")
    }
}

/// Runs `bench memory` and returns its figures.
pub fn measure(a: &MemoryArgs) -> Result<MemoryReport> {
    if a.shard.iters == 0 || a.shard.floor_reps == 0 {
        bail!("--iters and --floor-reps must be at least 1");
    }
    if a.shard.keep_last == 0 {
        bail!("--keep-last must be at least 1");
    }
    let warmup = a.shard.warmup.unwrap_or(a.shard.keep_last + 2);
    let mut state = State::new(a.shard.size, a.shard.tensors, a.buffer_offset, "memory")?;
    let (bytes, file_bytes) = (state.bytes(), state.file_bytes());

    // The floor: one thread copies the same bytes into pre-faulted memory,
    // the buffer that later receives the restores. Besides `floor_reps`
    // repetitions up front, one repetition runs right before each measured
    // save and restore, so that floor and measurement see the same machine
    // (a VM's memory bandwidth drifts).
    let names = state.names().to_vec();
    let mut dst = Buf::new(bytes as usize, a.buffer_offset, 0x5A);
    let mut targets = restore_targets(&names, &state.lens(), &mut dst);
    let mut floor: Vec<f64> = (0..a.shard.floor_reps).map(|_| floor::memcpy(&state.data(), &mut targets)).collect();

    let started = Instant::now();
    let node = Node::start(a, file_bytes)?;
    let mut client = Client::connect(&node.daemon.socket)?;
    let huge_pages = client.status()?.huge_pages;
    // A daemon starts before training does: its pool is faulted in by then.
    let prefaulted_bytes = loop {
        let m = client.status()?.memory;
        if !m.prefault_pending {
            break m.prefaulted;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the daemon's pool was not pre-faulted within 600 s: {m:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let prefault_wait_s = started.elapsed().as_secs_f64();
    let prepare_s = match a.no_prepare {
        true => None,
        false => {
            let specs: Vec<TensorSpec> = state
                .tensors()
                .iter()
                .map(|t| TensorSpec { name: t.name.to_string(), dtype: t.dtype, shape: t.shape.to_vec() })
                .collect();
            let t = Instant::now();
            client.prepare(&specs, &state.metadata).context("preparing the first save")?;
            let prepare_s = t.elapsed().as_secs_f64();
            // The filler now makes segments of this size: let it finish, as training steps would.
            while client.status()?.memory.prefault_pending && started.elapsed() < Duration::from_secs(600) {
                std::thread::sleep(Duration::from_millis(10));
            }
            Some(prepare_s)
        }
    };

    // Saves: successive steps of one namespace, like a training loop.
    let ns = "bench-memory";
    let mut saves = Vec::with_capacity(warmup + a.shard.iters);
    let mut change = Change::default();
    let mut first_save_from_pool = false;
    for step in 0..(warmup + a.shard.iters) as u64 {
        if step > 0 {
            change = state.step(a.shard.changed);
        }
        if step >= warmup as u64 {
            floor.push(floor::memcpy(&state.data(), &mut targets));
        }
        let key = ShardKey::new(ns, step, 0);
        let t = client
            .save(&key, 1, &state.tensors(), &state.metadata, false)
            .with_context(|| format!("saving step {step}"))?;
        // Outside the timed region: the daemon checksums before the next save.
        client.wait_visible(&key, Duration::from_secs(600))?;
        if step == 0 {
            first_save_from_pool = client.status()?.memory.reserved_from_pool == 1;
        }
        saves.push(t);
    }
    let mut next_step = (warmup + a.shard.iters) as u64;
    let last = ShardKey::new(ns, next_step - 1, 0);

    // Restores of the newest step into the pre-faulted buffer, verified.
    // The first one is reported apart; the floor runs before the others.
    let mut restores = Vec::with_capacity(a.shard.iters + 1);
    for i in 0..=a.shard.iters {
        if i > 0 {
            floor.push(floor::memcpy(&state.data(), &mut targets));
        }
        let t = Instant::now();
        client.load_into(&last, &mut targets).context("restoring")?;
        restores.push(t.elapsed().as_secs_f64());
    }
    let restored_identical = state.matches(&targets);
    if !restored_identical {
        bail!("the restored bytes differ from the saved ones");
    }
    drop(targets);
    let mut maps = Vec::with_capacity(a.shard.iters.min(5));
    for _ in 0..a.shard.iters.min(5) {
        let t = Instant::now();
        let m = client.map_unverified(&last)?;
        maps.push(t.elapsed().as_secs_f64());
        drop(m);
    }
    // Back to back: each save right after the previous one returned, with
    // no training step and no wait for its seal in between.
    // (No floor repetition between them: that would be a pause.)
    let mut back_to_back = Vec::with_capacity(a.shard.iters);
    for _ in 0..a.shard.iters {
        let t = Instant::now();
        client
            .save(&ShardKey::new(ns, next_step, 0), 1, &state.tensors(), &state.metadata, false)
            .with_context(|| format!("saving step {next_step} back to back"))?;
        back_to_back.push(t.elapsed().as_secs_f64());
        next_step += 1;
    }
    let memory = client.status()?.memory;
    drop(client);
    node.stop()?;

    let runs = Runs {
        prefault_wait_s,
        prepare_s,
        prefaulted_bytes,
        first_save_from_pool,
        back_to_back: &back_to_back,
        memory,
        warmup,
        huge_pages,
        change,
        saves: &saves[warmup..],
        first: saves[0],
        restores: &restores,
        maps: &maps,
        floor: &floor,
        restored_identical,
    };
    Ok(report(a, &state, runs))
}

/// What the loops measured.
struct Runs<'a> {
    prefault_wait_s: f64,
    prepare_s: Option<f64>,
    prefaulted_bytes: u64,
    first_save_from_pool: bool,
    /// The back-to-back saves.
    back_to_back: &'a [f64],
    /// The daemon's accounting at the end.
    memory: tierckpt_proto::MemoryUsage,
    warmup: usize,
    huge_pages: bool,
    /// What the last step changed.
    change: Change,
    /// The measured saves.
    saves: &'a [SaveTiming],
    first: SaveTiming,
    /// The first restore, then the measured ones.
    restores: &'a [f64],
    maps: &'a [f64],
    floor: &'a [f64],
    restored_identical: bool,
}

fn report(a: &MemoryArgs, state: &State, runs: Runs<'_>) -> MemoryReport {
    let memcpy_floor_s = median(runs.floor);
    let (bytes, file_bytes) = (state.bytes(), state.file_bytes());
    let totals: Vec<f64> = runs.saves.iter().map(SaveTiming::total_s).collect();
    let phase = |f: fn(&SaveTiming) -> f64| median(&runs.saves.iter().map(f).collect::<Vec<_>>());
    let save_stall_s = median(&totals);
    let restore_s = median(&runs.restores[1..]);
    let threads = if bytes < 4 << 20 { 1 } else { cores().clamp(1, 8) };
    let chunks = state.chunks();
    let (save_ratio, restore_ratio) = (save_stall_s / memcpy_floor_s, restore_s / memcpy_floor_s);
    let first = runs.first.total_s();
    let back_to_back_s = median(runs.back_to_back);
    MemoryReport {
        benchmark: "memory",
        huge_pages: runs.huge_pages,
        prefault_share: runs.memory.prefault_target as f64 / runs.memory.capacity.max(1) as f64,
        bytes,
        file_bytes,
        tensors: state.lens().len(),
        dtype: "BF16",
        iters: a.shard.iters,
        warmup: runs.warmup,
        keep_last: a.shard.keep_last,
        fresh: FreshData::new(a.shard.changed, chunks, runs.change),
        threads,
        restore_threads: cores().min(8).min(chunks).max(1),
        floor_threads: 1,
        buffer_offset: a.buffer_offset % 4096,
        memcpy_floor_s,
        memcpy_floor_gibps: gibps(bytes, memcpy_floor_s),
        memcpy_floor_min_s: min(runs.floor),
        floor_samples: runs.floor.len(),
        save_stall_s,
        save_gibps: gibps(bytes, save_stall_s),
        save_ratio,
        save_reserve_s: phase(|t| t.reserve_s),
        save_copy_s: phase(|t| t.copy_s),
        save_seal_s: phase(|t| t.seal_s),
        save_stall_min_s: min(&totals),
        save_stall_max_s: totals.iter().copied().fold(0.0, f64::max),
        save_stall_first_s: first,
        save_first_gibps: gibps(bytes, first),
        save_first_ratio: first / memcpy_floor_s,
        save_first_reserve_s: runs.first.reserve_s,
        save_first_copy_s: runs.first.copy_s,
        prefault_wait_s: runs.prefault_wait_s,
        prefaulted_bytes: runs.prefaulted_bytes,
        first_save_from_pool: runs.first_save_from_pool,
        prepare_s: runs.prepare_s,
        back_to_back_s,
        back_to_back_ratio: back_to_back_s / memcpy_floor_s,
        back_to_back_max_s: runs.back_to_back.iter().copied().fold(0.0, f64::max),
        reserved_from_pool: runs.memory.reserved_from_pool,
        reserved_fresh: runs.memory.reserved_fresh,
        restore_s,
        restore_gibps: gibps(bytes, restore_s),
        restore_ratio,
        restore_map_s: median(runs.maps),
        restore_min_s: min(&runs.restores[1..]),
        restore_first_s: runs.restores[0],
        target_ratio: MEMORY_TARGET_RATIO,
        save_meets_target: save_ratio <= MEMORY_TARGET_RATIO,
        first_save_meets_target: first / memcpy_floor_s <= MEMORY_TARGET_RATIO,
        back_to_back_meets_target: back_to_back_s / memcpy_floor_s <= MEMORY_TARGET_RATIO,
        restore_meets_target: restore_ratio <= MEMORY_TARGET_RATIO,
        restored_identical: runs.restored_identical,
        steady_state: STEADY_STATE,
    }
}

/// Prints the report as tables.
pub fn print(r: &MemoryReport) {
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
    println!("{}", r.fresh.describe());
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
    let first = match r.prepare_s {
        Some(_) => "save: first of its size (prepared)",
        None => "save: first of its size (pre-faulted pool)",
    };
    row(&mut t, first, r.threads.to_string(), r.save_stall_first_s, true);
    if let Some(p) = r.prepare_s {
        row(&mut t, "  prepare, before it (not blocking a save)", String::new(), p, false);
    }
    row(&mut t, "save: back to back (no pause)", r.threads.to_string(), r.back_to_back_s, true);
    row(&mut t, "  slowest back to back", String::new(), r.back_to_back_max_s, true);
    row(&mut t, "restore: load_into, checksums verified", r.restore_threads.to_string(), r.restore_s, true);
    row(&mut t, "  map and populate", String::new(), r.restore_map_s, false);
    row(&mut t, "restore: first", r.restore_threads.to_string(), r.restore_first_s, true);
    println!("{t}");
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "target: ratio at most {} -- save {:.3} ({}), first save {:.3} ({}), back to back {:.3} ({}), restore {:.3} ({})",
        r.target_ratio,
        r.save_ratio,
        verdict(r.save_meets_target),
        r.save_first_ratio,
        verdict(r.first_save_meets_target),
        r.back_to_back_ratio,
        verdict(r.back_to_back_meets_target),
        r.restore_ratio,
        verdict(r.restore_meets_target)
    );
    println!(
        "pool: {} pre-faulted {:.2} s after the daemon started; reservations served from the pool {}, from fresh pages {}",
        output::human_bytes(r.prefaulted_bytes),
        r.prefault_wait_s,
        r.reserved_from_pool,
        r.reserved_fresh
    );
    println!("steady state: {}", r.steady_state);
}
