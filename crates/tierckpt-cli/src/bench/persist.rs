//! `tierckpt bench persist`: the drain of a real daemon child to its
//! persistent tier, against a floor that writes the same number of bytes to
//! the same target in the same run (`floor::store`).
//!
//! A shard (pseudo-random bf16 tensors) is saved into the daemon's memory
//! tier, step after step; before every step but the first, a training step
//! rewrites `--changed` of the shard's chunks (outside the timed region).
//! Each step is timed from the moment its seal returns until the daemon
//! reports it committed in the store
//! (`status().persistent.namespaces[].last_committed`). That covers the
//! daemon's whole path: checksumming (the drainer only takes visible
//! shards), mapping from memory and verifying, the upload (multipart with
//! parallel parts), the rank record, COMMIT, and for `file://` the fsyncs.
//! What the store holds for each step is read from the drain's counters.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tierckpt_client::Client;
use tierckpt_format::ShardKey;
use tierckpt_harness::daemon::{DaemonOptions, DaemonProcess};
use tierckpt_harness::size::parse_size;
use tierckpt_harness::stats::{gibps, median, min};

use super::floor::store::{Boto3Floor, Moto, S3Target, StoreFloor};
use super::observe::{wait_committed, DrainCounters};
use super::state::{parse_changed, Buf, Change, FreshData, State};
use crate::output;

/// Rate that `bench persist` aims for, as a fraction of the floor's, for a
/// `file://` target (a raw write + fsync).
pub const PERSIST_FILE_TARGET_RATIO: f64 = 0.9;
/// The same for an `s3://` target (an upload with boto3).
pub const PERSIST_S3_TARGET_RATIO: f64 = 1.0;

/// Arguments of `bench persist`.
#[derive(Args, Debug, Clone)]
pub struct PersistArgs {
    /// Persistent tier to drain to: `file:///dir` or `s3://bucket/prefix`
    /// [default: a fresh `file://` directory under --tmp-dir, removed at the end].
    #[arg(long)]
    pub target: Option<String>,
    /// Total tensor bytes of the shard, like "1GiB", "256MiB" or a number of bytes.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Number of tensors the shard is split into (bf16, equal sizes).
    #[arg(long, default_value_t = 64)]
    pub tensors: usize,
    /// Measured steps (saved, then waited for until committed).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Unmeasured steps before the measured ones (the first is reported
    /// apart).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Steps the daemon keeps in memory (its retention).
    #[arg(long, default_value_t = 2)]
    pub keep_last: usize,
    /// Repetitions of the floor up front (one more runs before every measured
    /// step; the median of all is reported).
    #[arg(long, default_value_t = 2)]
    pub floor_reps: usize,
    /// Fraction of the shard's 4 MiB chunks that a training step rewrites
    /// before every step but the first (chosen at random at each step).
    #[arg(long, value_name = "FRACTION", default_value_t = 1.0, value_parser = parse_changed, allow_negative_numbers = true)]
    pub changed: f64,
    /// S3 endpoint (for `s3://` targets), passed to the daemon and to boto3.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Start `moto_server` on a free 127.0.0.1 port for the run (an `s3://`
    /// target's endpoint), and create the target's bucket.
    #[arg(long)]
    pub start_moto: bool,
    /// Region, and credentials, for `s3://` targets (moto accepts any).
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    #[arg(long, default_value = "testing")]
    /// Access key id for `s3://` targets.
    pub access_key_id: String,
    #[arg(long, default_value = "testing")]
    /// Secret access key for `s3://` targets.
    pub secret_access_key: String,
    /// Directory (on disk, so that fsync means something) for the default
    /// `file://` target.
    #[arg(long, default_value = "/tmp")]
    pub tmp_dir: PathBuf,
    /// Directory (a tmpfs) in which the daemon's memory tier is created, in a
    /// fresh subdirectory removed at the end.
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
}

/// What `bench persist` measured. Times are seconds; rates are of
/// `file_bytes`; stored bytes are what the drain reports it stored.
#[derive(Debug, Clone, Serialize)]
pub struct PersistReport {
    /// Which benchmark this is.
    pub benchmark: &'static str,
    /// "file" or "s3".
    pub scheme: &'static str,
    /// The persistent tier drained to.
    pub target: String,
    /// Tensor bytes of the shard.
    pub bytes: u64,
    /// Bytes of the shard file, what is uploaded and what the floor writes.
    pub file_bytes: u64,
    /// Number of bf16 tensors.
    pub tensors: usize,
    /// Their dtype.
    pub dtype: &'static str,
    /// Measured repetitions.
    pub iters: usize,
    /// Unmeasured repetitions before them.
    pub warmup: usize,
    /// What each training step rewrote.
    #[serde(flatten)]
    pub fresh: FreshData,
    /// Median time from the seal returning to the step committed in the store.
    pub persist_s: f64,
    /// Rate of the median step.
    pub persist_gibps: f64,
    /// Fastest measured step.
    pub persist_min_s: f64,
    /// Slowest measured step.
    pub persist_max_s: f64,
    /// Medians of the parts of `persist_s`: seal -> visible (the daemon's
    /// checksumming) and visible -> committed (the drain proper).
    pub visible_s: f64,
    /// Median visible -> committed.
    pub drain_s: f64,
    /// Its rate.
    pub drain_gibps: f64,
    /// Median bytes the store holds per measured step, and their sum; shard
    /// bytes uploaded (before delta and compression) over the same steps;
    /// stored over uploaded; measured steps stored as deltas.
    pub stored_bytes_per_step: u64,
    /// Bytes stored over the measured steps.
    pub stored_bytes: u64,
    /// Shard bytes uploaded over the same steps (before delta and compression).
    pub uploaded_bytes: u64,
    /// `stored_bytes / uploaded_bytes`.
    pub stored_ratio: f64,
    /// Steps stored as deltas.
    pub delta_shards: u64,
    /// The first step, into fresh tmpfs pages and a store without a base,
    /// apart from the steady state: time, rate, bytes stored.
    pub persist_first_s: f64,
    /// Rate of the first step.
    pub persist_first_gibps: f64,
    /// Bytes stored for the first step.
    pub persist_first_stored_bytes: u64,
    /// What the floor is.
    pub floor_tool: String,
    /// The floor: median seconds.
    pub floor_s: f64,
    /// The floor's rate.
    pub floor_gibps: f64,
    /// The floor's fastest repetition.
    pub floor_min_s: f64,
    /// Floor repetitions.
    pub floor_samples: usize,
    /// persist_gibps / floor_gibps.
    pub ratio: f64,
    /// drain_gibps / floor_gibps.
    pub drain_ratio: f64,
    /// The target ratio.
    pub target_ratio: f64,
    /// Whether the ratio reaches the target.
    pub meets_target: bool,
}

/// One step: its times and what the drain stored for it.
#[derive(Debug, Clone, Copy)]
struct Step {
    total_s: f64,
    visible_s: f64,
    drain_s: f64,
    drained: DrainCounters,
}

/// The persistent target of a run, its floor, and what to remove at the end.
struct Target<'a> {
    url: String,
    scheme: &'static str,
    floor: StoreFloor<'a>,
    target_ratio: f64,
    /// Flags of the daemon for this target.
    daemon_args: Vec<String>,
    default_dir: Option<tempfile::TempDir>,
    moto: Option<Moto>,
}

impl<'a> Target<'a> {
    /// The target of `a`; the floor writes `data`. An `s3://` floor reads
    /// it from a file it writes in `mem_dir` first.
    fn open(a: &PersistArgs, data: &'a [u8], mem_dir: &std::path::Path) -> Result<Self> {
        let mut default_dir = None;
        let url = match &a.target {
            Some(t) => t.trim_end_matches('/').to_string(),
            None => {
                let d = tempfile::Builder::new()
                    .prefix("tierckpt-bench-persist-")
                    .tempdir_in(&a.tmp_dir)
                    .with_context(|| format!("creating a directory under {}", a.tmp_dir.display()))?;
                let url = format!("file://{}", d.path().display());
                default_dir = Some(d);
                url
            }
        };
        let mut daemon_args = vec!["--persistent-path".to_string(), url.clone()];
        if let Some(path) = url.strip_prefix("file://") {
            if a.start_moto || a.endpoint.is_some() {
                bail!("--start-moto and --endpoint are for s3:// targets");
            }
            let dir = PathBuf::from(path);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let floor = StoreFloor::File { dir, data, n: 0 };
            let target_ratio = PERSIST_FILE_TARGET_RATIO;
            return Ok(Self { url, scheme: "file", floor, target_ratio, daemon_args, default_dir, moto: None });
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            bail!("--target must be file:///dir or s3://bucket/prefix; got {url:?}");
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("{url:?} names no bucket");
        }
        let mut moto = None;
        let endpoint = if a.start_moto {
            if a.endpoint.is_some() {
                bail!("--start-moto and --endpoint exclude each other");
            }
            let m = Moto::start()?;
            m.create_bucket(bucket)?;
            let e = m.endpoint();
            moto = Some(m);
            Some(e)
        } else {
            a.endpoint.clone()
        };
        let mut opts = vec![
            format!("region={}", a.region),
            format!("access_key_id={}", a.access_key_id),
            format!("secret_access_key={}", a.secret_access_key),
        ];
        if let Some(e) = &endpoint {
            opts.push(format!("endpoint={e}"));
            if e.starts_with("http://") {
                opts.push("allow_http=true".into());
            }
        }
        daemon_args.extend(["--persistent-options".to_string(), opts.join(",")]);
        // boto3 reads the bytes from a file in the memory directory (a tmpfs).
        let data_path = mem_dir.join("floor-source.bin");
        std::fs::write(&data_path, data).with_context(|| format!("writing {}", data_path.display()))?;
        let s3 = S3Target {
            endpoint: endpoint.as_deref().unwrap_or(""),
            region: &a.region,
            access_key_id: &a.access_key_id,
            secret_access_key: &a.secret_access_key,
            bucket,
            prefix,
        };
        let b = Boto3Floor::start(&s3, &data_path)?;
        std::fs::remove_file(&data_path)?;
        let (floor, target_ratio) = (StoreFloor::Boto3(b), PERSIST_S3_TARGET_RATIO);
        Ok(Self { url, scheme: "s3", floor, target_ratio, daemon_args, default_dir, moto })
    }
}

/// Runs `bench persist` and returns its figures.
pub fn measure(a: &PersistArgs) -> Result<PersistReport> {
    if a.iters == 0 {
        bail!("--iters must be at least 1");
    }
    if a.keep_last == 0 {
        bail!("--keep-last must be at least 1");
    }
    let mut state = State::new(a.size, a.tensors, 0, "persist")?;
    let file_bytes = state.file_bytes();
    let floor_src = Buf::random(file_bytes as usize, 0xF2);
    let mem_dir = tempfile::Builder::new()
        .prefix("tierckpt-bench-persist-")
        .tempdir_in(&a.dir)
        .with_context(|| format!("creating a directory under {}", a.dir.display()))?;
    let mut target = Target::open(a, floor_src.bytes(), mem_dir.path())?;
    let mut floor_s = Vec::with_capacity(a.floor_reps + a.iters);
    for _ in 0..a.floor_reps {
        floor_s.push(target.floor.rep()?);
    }

    let mut opts = DaemonOptions::new(mem_dir.path());
    opts.settings.memory_tier_size = Some(((a.keep_last as u64 + 2) * file_bytes).to_string());
    opts.settings.keep_last = Some(a.keep_last);
    opts.settings.http_addr = Some("off".into());
    opts.set_flags(&target.daemon_args)?;
    let daemon = DaemonProcess::spawn(opts)?;
    let mut client = Client::connect(&daemon.socket)?;
    let mut status_client = Client::connect(&daemon.socket)?;

    let ns = "bench-persist";
    let timeout = Duration::from_secs(1800);
    let (mut steps, mut change) = (Vec::with_capacity(a.warmup + a.iters), Change::default());
    let mut counted = DrainCounters::default();
    for step in 0..(a.warmup + a.iters) as u64 {
        if step > 0 {
            change = state.step(a.changed);
        }
        if step >= a.warmup as u64 {
            floor_s.push(target.floor.rep()?);
        }
        let key = ShardKey::new(ns, step, 0);
        client
            .save(&key, 1, &state.tensors(), &state.metadata, false)
            .with_context(|| format!("saving step {step}"))?;
        let t0 = Instant::now();
        client.wait_visible(&key, timeout)?;
        let t1 = Instant::now();
        let drained = DrainCounters::of(&wait_committed(&mut status_client, ns, step, timeout)?);
        let t2 = Instant::now();
        steps.push(Step {
            total_s: (t2 - t0).as_secs_f64(),
            visible_s: (t1 - t0).as_secs_f64(),
            drain_s: (t2 - t1).as_secs_f64(),
            drained: drained.since(counted),
        });
        counted = drained;
    }
    let floor_tool = target.floor.tool();
    drop((client, status_client, daemon));
    let Target { url, scheme, floor, target_ratio, default_dir, moto, .. } = target;
    drop((floor, moto));
    mem_dir.close().context("removing the benchmark's memory tier")?;
    if let Some(d) = default_dir {
        d.close().context("removing the benchmark's persistent tier")?;
    }
    let (first, measured) = (steps[0], &steps[a.warmup..]);
    let totals: Vec<f64> = measured.iter().map(|s| s.total_s).collect();
    let stored: Vec<f64> = measured.iter().map(|s| s.drained.stored_bytes as f64).collect();
    let sum = |f: fn(&Step) -> u64| measured.iter().map(f).sum::<u64>();
    let (stored_bytes, uploaded_bytes) = (sum(|s| s.drained.stored_bytes), sum(|s| s.drained.uploaded_bytes));
    let persist_s = median(&totals);
    let drain_s = median(&measured.iter().map(|s| s.drain_s).collect::<Vec<_>>());
    let floor_med = median(&floor_s);
    let persist_gibps = gibps(file_bytes, persist_s);
    let drain_gibps = gibps(file_bytes, drain_s);
    let floor_gibps = gibps(file_bytes, floor_med);
    let ratio = persist_gibps / floor_gibps;
    Ok(PersistReport {
        benchmark: "persist",
        scheme,
        target: url,
        bytes: state.bytes(),
        file_bytes,
        tensors: state.lens().len(),
        dtype: "BF16",
        iters: a.iters,
        warmup: a.warmup,
        fresh: FreshData::new(a.changed, state.chunks(), change),
        persist_s,
        persist_gibps,
        persist_min_s: min(&totals),
        persist_max_s: totals.iter().copied().fold(0.0, f64::max),
        visible_s: median(&measured.iter().map(|s| s.visible_s).collect::<Vec<_>>()),
        drain_s,
        drain_gibps,
        stored_bytes_per_step: median(&stored) as u64,
        stored_bytes,
        uploaded_bytes,
        stored_ratio: stored_bytes as f64 / uploaded_bytes as f64,
        delta_shards: sum(|s| s.drained.delta_shards),
        persist_first_s: first.total_s,
        persist_first_gibps: gibps(file_bytes, first.total_s),
        persist_first_stored_bytes: first.drained.stored_bytes,
        floor_tool,
        floor_s: floor_med,
        floor_gibps,
        floor_min_s: min(&floor_s),
        floor_samples: floor_s.len(),
        ratio,
        drain_ratio: drain_gibps / floor_gibps,
        target_ratio,
        meets_target: ratio >= target_ratio,
    })
}

/// Prints the report as tables.
pub fn print(r: &PersistReport) {
    println!(
        "bench persist: {} in {} {} tensors ({} shard file) to {}; {} warm-up steps, then medians of {}",
        output::human_bytes(r.bytes),
        r.tensors,
        r.dtype.to_lowercase(),
        output::human_bytes(r.file_bytes),
        r.target,
        r.warmup,
        r.iters
    );
    println!("{}", r.fresh.describe());
    let mut t = output::table(&["operation", "seconds", "GiB/s", "ratio to floor", "bytes stored"]);
    let row = |t: &mut comfy_table::Table, op: &str, s: f64, rate: bool, stored: Option<u64>| {
        let g = gibps(r.file_bytes, s);
        t.add_row(vec![
            op.to_string(),
            format!("{s:.4}"),
            if rate { format!("{g:.3}") } else { String::new() },
            if rate { format!("{:.3}", g / r.floor_gibps) } else { String::new() },
            stored.map(output::human_bytes).unwrap_or_default(),
        ]);
    };
    row(&mut t, "floor", r.floor_s, true, Some(r.file_bytes));
    row(&mut t, "persist: sealed -> committed", r.persist_s, true, Some(r.stored_bytes_per_step));
    row(&mut t, "  of which sealed -> visible (checksums)", r.visible_s, false, None);
    row(&mut t, "  of which visible -> committed (drain)", r.drain_s, true, None);
    row(
        &mut t,
        "persist: first (fresh tmpfs pages, no base)",
        r.persist_first_s,
        true,
        Some(r.persist_first_stored_bytes),
    );
    println!("{t}");
    println!(
        "measured steps: {} stored as deltas of {}; stored / uploaded bytes {:.3}",
        r.delta_shards, r.iters, r.stored_ratio
    );
    println!("floor: {}", r.floor_tool);
    println!(
        "target: rate at least {} of the floor -- persist {:.3} ({})",
        r.target_ratio,
        r.ratio,
        if r.meets_target { "met" } else { "missed" }
    );
}
