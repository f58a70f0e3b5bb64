//! `tierckpt bench reduce`: what compression and delta checkpoints save on
//! realistic training state, and what they cost against a memcpy of the same
//! bytes measured in the same run (the floor).
//!
//! Three workloads are generated in the run, deterministically, each as a
//! sequence of `--steps` checkpoints (safetensors shards with manifests):
//! - `finetune-frozen`: bf16 weights of which 90% (of the parameters) are
//!   frozen; the trainable 10% have fp32 Adam moments and take a real Adam
//!   step on synthetic gradients between checkpoints;
//! - `full-adam`: bf16 weights with fp32 exp_avg and exp_avg_sq, every
//!   parameter takes a real Adam step between checkpoints;
//! - `embedding`: an fp32 embedding table of which 5% of the rows (random
//!   ones) take a small update between checkpoints;
//!
//! plus `random`: incompressible bytes, new at every step, to show the cost
//! where nothing shrinks. Each checkpoint after the first is encoded without
//! a base (compression only) and against the previous one (delta), decoded
//! (every chunk verified), and compared with the original.
//!
//! End to end (unless `--no-end-to-end`): each workload's checkpoints are
//! saved, as rank 0 of world 1, into node 0 of a real two-node cluster of
//! daemon children (k = 1, ring, memory tiers in a fresh directory under
//! `--dir`, a `file://` persistent tier in a fresh directory under
//! `--tmp-dir` (default: `--dir`), both removed at the end), on two such
//! clusters at once, one per path, taking turns checkpoint by checkpoint
//! (alternating which goes first; with the default 5 steps each goes first
//! as often), after an untimed pause of 200 ms:
//! - the uncompressed path: `--replication-delta false
//!   --replication-compression off --persist-delta false
//!   --persist-compression off`;
//! - the reduced path: `--replication-delta true --persist-delta true
//!   --persist-compression C --replication-compression R`, where C is the
//!   first of `--compression` and R is `--replication-compression` (default:
//!   C). The daemon compresses a replica only where it measured that this is
//!   faster than sending it as it is (see `cluster::ReplicaCosts`); otherwise
//!   a delta replica leaves out the 4 MiB chunks that did not change at all.
//!
//! `--replication-bandwidth` and `--persist-bandwidth` cap both paths' link
//! and store (loopback and tmpfs are faster than most networks and stores).
//!
//! After each save returns (visible on node 0) the bench polls, every 2 ms,
//! node 1's steps until it holds the shard (replication time) and node 0's
//! drain status until the step is committed (persistence time), and waits
//! for both before the next save, and (untimed) until node 0's view of the
//! cluster, refreshed by heartbeats every 50 ms, has node 1 holding the step:
//! node 0 takes the base of a replication delta from that view, and in
//! training checkpoints are much further apart than heartbeats. Times are
//! the best over the checkpoints after the first (the first has no base):
//! on a shared machine, interference only ever adds time, and one stall of
//! a few hundred ms would swing a median of four; bytes come from the
//! daemons' counters over the same checkpoints. Throughput ratios are the
//! uncompressed path's time over the reduced path's (above 1: the reduced
//! path is faster).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tierckpt_client::{Client, TensorData};
use tierckpt_format::{
    decode_into, encode, Compression, Dtype, Manifest, ReduceOptions, ReduceStats, ShardKey, ShardLayout, TensorSpec,
};

use crate::bench::{gibps, median, parse_bytes};
use crate::bench_persist::drain_state;
use crate::output;
use tierckpt_harness::daemon::{LocalCluster, LocalClusterOptions};

/// Pause before each checkpoint end to end, untimed: the background work
/// of the one before (retention, heartbeats, the page cache) settles, as it
/// does in training, where checkpoints are seconds apart.
const SETTLE: Duration = Duration::from_millis(200);

/// memcpy repetitions before each checkpoint's measurements (the median of
/// all is the floor).
const FLOOR_REPS: usize = 3;

/// Delta+compression size that the issue aims for, as a fraction of the full
/// size, in the frozen fine-tuning case.
pub const FROZEN_TARGET_RATIO: f64 = 0.15;
/// The same for the embedding case.
pub const EMBEDDING_TARGET_RATIO: f64 = 0.10;
/// End to end, where nothing shrinks (`random`): the reduced path's
/// throughput at least this fraction of the uncompressed path's, for
/// replication and for persistence ("no loss of throughput", with room for
/// the noise of one run).
pub const NO_LOSS_TARGET_RATIO: f64 = 0.9;

/// Compression and delta checkpoints on generated training state.
#[derive(Args, Debug, Clone)]
pub struct ReduceArgs {
    /// Bytes of each checkpoint of each workload.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub size: u64,
    /// Checkpoints per workload; each one after the first is encoded against
    /// the one before.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// off, lz4, zstd, zstd:N (1..=19); a comma-separated list compares several.
    #[arg(long, default_value = "zstd:1")]
    pub compression: String,
    /// Workloads to run, comma-separated (finetune-frozen, full-adam,
    /// embedding, random) [default: all].
    #[arg(long)]
    pub workloads: Option<String>,
    /// Skip the end-to-end part (real daemons replicating and persisting).
    #[arg(long)]
    pub no_end_to_end: bool,
    /// Compression of replicas on the reduced path end to end [default: the
    /// first of --compression] (the daemon's default is auto).
    #[arg(long)]
    pub replication_compression: Option<String>,
    /// Cap on replication bytes per second on both paths end to end (the
    /// daemon's `--replication-bandwidth`, e.g. `200MB`), to see a link
    /// slower than loopback [default: none].
    #[arg(long)]
    pub replication_bandwidth: Option<String>,
    /// Directory (a tmpfs) for the nodes' memory tiers end to end, in a fresh
    /// subdirectory removed at the end.
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// Directory for the `file://` persistent tier end to end, in a fresh
    /// subdirectory removed at the end [default: --dir, a tmpfs, which keeps
    /// the noise of a shared disk out of the comparison; pass a directory on
    /// disk to include a disk].
    #[arg(long)]
    pub tmp_dir: Option<PathBuf>,
    /// Cap on upload bytes per second on both paths end to end (the daemon's
    /// `--persist-bandwidth`, e.g. `500MB`), to see a store slower than
    /// memory [default: none].
    #[arg(long)]
    pub persist_bandwidth: Option<String>,
}

/// One workload under one compression. Ratios of bytes are encoded over raw
/// (the whole blob, header included); time ratios are a time over the memcpy
/// floor of the same bytes; throughputs are GiB/s of raw bytes. Figures are
/// medians over the checkpoints after the first.
#[derive(Debug, Clone, Serialize)]
pub struct ReduceRow {
    pub workload: &'static str,
    pub compression: String,
    pub file_bytes: u64,
    pub steps_measured: usize,
    pub compress_bytes_ratio: f64,
    pub delta_bytes_ratio: f64,
    pub compress_encode_gibps: f64,
    pub compress_encode_ratio: f64,
    pub compress_decode_gibps: f64,
    pub compress_decode_ratio: f64,
    pub delta_encode_gibps: f64,
    pub delta_encode_ratio: f64,
    pub delta_decode_gibps: f64,
    pub delta_decode_ratio: f64,
    pub memcpy_floor_gibps: f64,
    /// Chunk kinds of the last delta encode.
    pub delta_stats: ReduceStats,
    pub compress_stats: ReduceStats,
    /// The target for this workload (delta bytes ratio), if any.
    pub target_ratio: Option<f64>,
    pub meets_target: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReduceReport {
    pub benchmark: &'static str,
    pub size: u64,
    pub steps: usize,
    /// Threads of encode and decode (all cores, at most 8).
    pub codec_threads: usize,
    /// Threads of the floor (one).
    pub floor_threads: usize,
    pub rows: Vec<ReduceRow>,
    /// Every decoded checkpoint was compared with the original.
    pub decoded_identical: bool,
    /// Daemon flags of the two paths end to end (empty when skipped).
    pub end_to_end_uncompressed_flags: String,
    pub end_to_end_reduced_flags: String,
    /// One row per workload; empty with `--no-end-to-end`.
    pub end_to_end: Vec<EndToEndRow>,
    /// The "no loss of throughput where nothing shrinks", on `random`.
    pub no_loss_check: Option<NoLossCheck>,
}

/// One path end to end on one workload. Times are the best of the
/// checkpoints after the first, from the save's return on node 0; bytes are
/// the daemons' counters over the same checkpoints.
#[derive(Debug, Clone, Serialize)]
pub struct EndToEndPath {
    /// Until node 1 holds the shard.
    pub replicate_s: f64,
    pub replicate_gibps: f64,
    /// Until node 0's drain reports the step committed.
    pub persist_s: f64,
    pub persist_gibps: f64,
    /// Shard bytes replicated (before delta and compression) and what went
    /// over the wire; ratio wire / sent.
    pub bytes_sent: u64,
    pub wire_bytes_sent: u64,
    pub replication_bytes_ratio: f64,
    pub delta_shards_sent: u64,
    /// Replicas the daemon sent compressed (where it measured that it pays).
    pub encoded_shards_sent: u64,
    pub shards_sent: u64,
    /// Shard bytes uploaded (before delta and compression) and what the store
    /// holds for them; ratio stored / uploaded.
    pub uploaded_bytes: u64,
    pub stored_bytes: u64,
    pub persistence_bytes_ratio: f64,
    pub delta_shards: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndToEndRow {
    pub workload: &'static str,
    pub file_bytes: u64,
    pub steps_measured: usize,
    pub persist_compression: String,
    pub replication_compression: String,
    pub uncompressed: EndToEndPath,
    pub reduced: EndToEndPath,
    /// Uncompressed time over reduced time: above 1, the reduced path is faster.
    pub replicate_throughput_ratio: f64,
    pub persist_throughput_ratio: f64,
    /// The target for this workload, for bytes sent and stored alike.
    pub target_ratio: Option<f64>,
    pub meets_target: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NoLossCheck {
    pub workload: &'static str,
    pub replicate_throughput_ratio: f64,
    pub persist_throughput_ratio: f64,
    pub target_ratio: f64,
    pub met: bool,
}

pub fn measure(a: &ReduceArgs) -> Result<ReduceReport> {
    if a.steps < 2 {
        bail!("--steps must be at least 2 (the first checkpoint is the base of the second)");
    }
    if a.size < 1 << 20 {
        bail!("--size must be at least 1MiB");
    }
    let compressions: Vec<Compression> = a
        .compression
        .split(',')
        .map(|s| s.trim().parse::<Compression>())
        .collect::<Result<_, _>>()
        .context("--compression")?;
    let persist_c = compressions[0];
    let replication_c: Compression = match &a.replication_compression {
        Some(c) => c.trim().parse().context("--replication-compression")?,
        None => persist_c,
    };
    let uncompressed_flags = vec![
        "--replication-delta",
        "false",
        "--replication-compression",
        "off",
        "--persist-delta",
        "false",
        "--persist-compression",
        "off",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    let reduced_flags = vec![
        "--replication-delta".to_string(),
        "true".into(),
        "--replication-compression".into(),
        replication_c.to_string(),
        "--persist-delta".into(),
        "true".into(),
        "--persist-compression".into(),
        persist_c.to_string(),
    ];
    let (mut uncompressed_flags, mut reduced_flags) = (uncompressed_flags, reduced_flags);
    for (flag, value) in
        [("--replication-bandwidth", &a.replication_bandwidth), ("--persist-bandwidth", &a.persist_bandwidth)]
    {
        if let Some(v) = value {
            for f in [&mut uncompressed_flags, &mut reduced_flags] {
                f.extend([flag.to_string(), v.clone()]);
            }
        }
    }
    let mut e2e = Vec::new();
    let mut rows = Vec::new();
    for kind in Workload::selected(a.workloads.as_deref())? {
        let mut gen = Generator::new(kind, a.size)?;
        let shards: Vec<(Vec<u8>, Manifest)> = (0..a.steps as u64)
            .map(|step| {
                if step > 0 {
                    gen.step();
                }
                let bytes = gen.shard_bytes();
                let m = Manifest::compute(ShardKey::new(kind.name(), step, 0), 1, &bytes, 0);
                (bytes, m)
            })
            .collect();
        for &c in &compressions {
            rows.push(measure_workload(kind, c, &shards)?);
        }
        if !a.no_end_to_end {
            let (specs, meta) = (gen.specs.clone(), gen.metadata());
            let [un, re] = end_to_end(a, kind, &specs, &meta, &shards, [&uncompressed_flags, &reduced_flags])?;
            let target = kind.target_ratio();
            e2e.push(EndToEndRow {
                workload: kind.name(),
                target_ratio: target,
                meets_target: target.map(|t| re.replication_bytes_ratio <= t && re.persistence_bytes_ratio <= t),
                file_bytes: shards[0].0.len() as u64,
                steps_measured: shards.len() - 1,
                persist_compression: persist_c.to_string(),
                replication_compression: replication_c.to_string(),
                replicate_throughput_ratio: un.replicate_s / re.replicate_s,
                persist_throughput_ratio: un.persist_s / re.persist_s,
                uncompressed: un,
                reduced: re,
            });
        }
    }
    let no_loss_check = e2e.iter().find(|r| r.workload == Workload::Random.name()).map(|r| NoLossCheck {
        workload: r.workload,
        replicate_throughput_ratio: r.replicate_throughput_ratio,
        persist_throughput_ratio: r.persist_throughput_ratio,
        target_ratio: NO_LOSS_TARGET_RATIO,
        met: r.replicate_throughput_ratio >= NO_LOSS_TARGET_RATIO && r.persist_throughput_ratio >= NO_LOSS_TARGET_RATIO,
    });
    let (end_to_end_uncompressed_flags, end_to_end_reduced_flags) = if a.no_end_to_end {
        (String::new(), String::new())
    } else {
        (uncompressed_flags.join(" "), reduced_flags.join(" "))
    };
    Ok(ReduceReport {
        benchmark: "reduce",
        size: a.size,
        steps: a.steps,
        codec_threads: std::thread::available_parallelism().map_or(1, |n| n.get()).min(8),
        floor_threads: 1,
        rows,
        decoded_identical: true,
        end_to_end_uncompressed_flags,
        end_to_end_reduced_flags,
        end_to_end: e2e,
        no_loss_check,
    })
}

/// Replication counters of node 0, the drain state of `ns` there, and
/// whether node 0's view of the cluster has node 1 holding `step`.
fn counters(
    c: &mut Client,
    ns: &str,
    step: u64,
) -> Result<(tierckpt_proto::ReplicationStats, serde_json::Value, bool)> {
    let cl = c.status()?.cluster.context("node 0 is not clustered")?;
    let seen = cl
        .namespaces
        .get(ns)
        .and_then(|steps| steps.iter().find(|s| s.step == step))
        .and_then(|s| s.holders.get(&0))
        .is_some_and(|h| h.iter().any(|n| *n == LocalCluster::node_id(1)));
    let drain = drain_state(c, ns)?;
    Ok((cl.replication, drain, seen))
}

/// One path end to end: a fresh two-node cluster started with `flags` (see
/// the module's documentation), fed one checkpoint at a time.
struct PathRun {
    file_bytes: u64,
    ns: String,
    c0: Client,
    s0: Client,
    c1: Client,
    cluster: LocalCluster,
    mem_dir: tempfile::TempDir,
    store_dir: tempfile::TempDir,
    reps: Vec<f64>,
    pers: Vec<f64>,
    first: Option<(tierckpt_proto::ReplicationStats, serde_json::Value, bool)>,
}

impl PathRun {
    fn start(a: &ReduceArgs, kind: Workload, file_bytes: u64, flags: &[String]) -> Result<Self> {
        let mem_dir = tempfile::Builder::new()
            .prefix("tierckpt-bench-reduce-")
            .tempdir_in(&a.dir)
            .with_context(|| format!("creating a directory under {}", a.dir.display()))?;
        let tmp = a.tmp_dir.clone().unwrap_or_else(|| a.dir.clone());
        let store_dir = tempfile::Builder::new()
            .prefix("tierckpt-bench-reduce-")
            .tempdir_in(&tmp)
            .with_context(|| format!("creating a directory under {}", tmp.display()))?;
        let keep_last = 3;
        let mut extra = vec!["--persistent-path".to_string(), format!("file://{}", store_dir.path().display())];
        extra.extend(flags.iter().cloned());
        // Each node holds keep_last steps, a step being received or saved, and
        // the base a delta is decoded against.
        let opts = LocalClusterOptions {
            nodes: 2,
            memory_tier_size: ((keep_last as u64 + 3) * file_bytes).max(64 << 20).to_string(),
            keep_last,
            replication_factor: 1,
            placement: "ring".into(),
            // Frequent heartbeats (the view of what the peer holds); a long
            // timeout keeps re-replication out.
            heartbeat_interval: "50ms".into(),
            heartbeat_timeout: "60s".into(),
            extra_args: extra,
            ..Default::default()
        };
        let cluster = LocalCluster::start(mem_dir.path(), opts)?;
        Ok(PathRun {
            file_bytes,
            ns: format!("bench-reduce-{}", kind.name()),
            c0: Client::connect(cluster.socket(0))?,
            s0: Client::connect(cluster.socket(0))?,
            c1: Client::connect(cluster.socket(1))?,
            cluster,
            mem_dir,
            store_dir,
            reps: vec![],
            pers: vec![],
            first: None,
        })
    }

    /// Saves `tensors` as `step` on node 0 and times its replication and
    /// persistence.
    fn checkpoint(&mut self, step: u64, tensors: &[TensorData<'_>], meta: &BTreeMap<String, String>) -> Result<()> {
        let ns = self.ns.clone();
        let key = ShardKey::new(&ns, step, 0);
        self.c0.save(&key, 1, tensors, meta, true).with_context(|| format!("saving step {step} on node 0"))?;
        let timeout = Duration::from_secs(600);
        let t0 = Instant::now();
        let (mut rep, mut per) = (None, None);
        while rep.is_none() || per.is_none() {
            if rep.is_none() {
                let steps = self.c1.steps(&ns)?;
                if steps.iter().any(|s| s.step == step && s.ranks.contains(&0)) {
                    rep = Some(t0.elapsed().as_secs_f64());
                }
            }
            if per.is_none() {
                let d = drain_state(&mut self.s0, &ns)?;
                if d["last_committed"].as_u64().is_some_and(|s| s >= step) {
                    per = Some(t0.elapsed().as_secs_f64());
                }
            }
            if t0.elapsed() > timeout {
                bail!("step {step}: not replicated and committed within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // Untimed: the sender counts a replica once node 1 answered, so wait
        // for that, so that the counters cover whole steps; and node 0 picks
        // the base of a delta from its view of what node 1 holds, refreshed
        // by heartbeats, so wait until that view has this step (in training,
        // checkpoints are much further apart than heartbeats).
        let deadline = Instant::now() + timeout;
        let now = loop {
            let c = counters(&mut self.s0, &ns, step)?;
            if c.0.shards_sent > step && c.2 {
                break c;
            }
            if Instant::now() >= deadline {
                bail!("node 0 did not count the replica of step {step}");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if now.0.failures > 0 {
            bail!("replication failures on node 0: {:?}", now.0);
        }
        if step == 0 {
            self.first = Some(now);
        } else {
            self.reps.push(rep.unwrap_or_default());
            self.pers.push(per.unwrap_or_default());
        }
        Ok(())
    }

    /// Stops the cluster, removes its directories, and sums up.
    fn finish(mut self) -> Result<EndToEndPath> {
        let (r0, d0, _) = self.first.take().context("no checkpoints")?;
        let (r1, d1, _) = counters(&mut self.s0, &self.ns, 0)?;
        let PathRun { file_bytes, c0, s0, c1, cluster, mem_dir, store_dir, reps, pers, .. } = self;
        drop((c0, s0, c1));
        drop(cluster);
        mem_dir.close().context("removing the benchmark's memory tiers")?;
        store_dir.close().context("removing the benchmark's persistent tier")?;
        let n = |v: &serde_json::Value, f: &str| v[f].as_u64().unwrap_or(0);
        let ratio = |a: u64, b: u64| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
        let bytes_sent = r1.bytes_sent - r0.bytes_sent;
        let wire_bytes_sent = r1.wire_bytes_sent - r0.wire_bytes_sent;
        let uploaded_bytes = n(&d1, "uploaded_bytes") - n(&d0, "uploaded_bytes");
        let stored_bytes = n(&d1, "stored_bytes") - n(&d0, "stored_bytes");
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let (replicate_s, persist_s) = (best(&reps), best(&pers));
        Ok(EndToEndPath {
            replicate_s,
            replicate_gibps: gibps(file_bytes, replicate_s),
            persist_s,
            persist_gibps: gibps(file_bytes, persist_s),
            bytes_sent,
            wire_bytes_sent,
            replication_bytes_ratio: ratio(wire_bytes_sent, bytes_sent),
            delta_shards_sent: r1.delta_shards_sent - r0.delta_shards_sent,
            encoded_shards_sent: r1.encoded_shards_sent - r0.encoded_shards_sent,
            shards_sent: r1.shards_sent - r0.shards_sent,
            uploaded_bytes,
            stored_bytes,
            persistence_bytes_ratio: ratio(stored_bytes, uploaded_bytes),
            delta_shards: n(&d1, "delta_shards") - n(&d0, "delta_shards"),
        })
    }
}

/// Runs the checkpoints through both paths, each on its own cluster, taking
/// turns checkpoint by checkpoint (and which goes first), so that both see
/// the same moments of a noisy disk or machine.
fn end_to_end(
    a: &ReduceArgs,
    kind: Workload,
    specs: &[TensorSpec],
    meta: &BTreeMap<String, String>,
    shards: &[(Vec<u8>, Manifest)],
    flags: [&[String]; 2],
) -> Result<[EndToEndPath; 2]> {
    let file_bytes = shards[0].0.len() as u64;
    let layout = ShardLayout::new(specs, meta)?;
    if layout.file_len != file_bytes {
        bail!("the layout of {} does not match its generated shards", kind.name());
    }
    let mut runs = [PathRun::start(a, kind, file_bytes, flags[0])?, PathRun::start(a, kind, file_bytes, flags[1])?];
    let shapes: Vec<&[usize]> = specs.iter().map(|t| &t.shape[..]).collect();
    for (step, (bytes, _)) in shards.iter().enumerate() {
        let tensors: Vec<TensorData<'_>> = specs
            .iter()
            .zip(&layout.entries)
            .zip(&shapes)
            .map(|((t, e), shape)| TensorData { name: &t.name, dtype: t.dtype, shape, data: &bytes[e.range()] })
            .collect();
        for i in [step % 2, 1 - step % 2] {
            // Untimed: the other cluster's last checkpoint has settled.
            std::thread::sleep(SETTLE);
            runs[i]
                .checkpoint(step as u64, &tensors, meta)
                .with_context(|| format!("{}: end to end, {} path", kind.name(), ["uncompressed", "reduced"][i]))?;
        }
    }
    let [u, r] = runs;
    Ok([u.finish()?, r.finish()?])
}

fn measure_workload(kind: Workload, c: Compression, shards: &[(Vec<u8>, Manifest)]) -> Result<ReduceRow> {
    let len = shards[0].0.len();
    let mut out = vec![0x5Au8; len];
    let (mut floor, mut ce, mut cd, mut de, mut dd) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut cr, mut dr) = (vec![], vec![]);
    let (mut cstats, mut dstats) = (ReduceStats::default(), ReduceStats::default());
    // One unmeasured round (threads, codec contexts, allocator).
    {
        let (data, m) = &shards[1];
        let (blob, _) = encode(data, m, None, &ReduceOptions { compression: c, delta: false })?;
        decode_into(&blob, m, None, &mut out, "warm-up")?;
    }
    for w in shards.windows(2) {
        let ((base, bm), (data, m)) = (&w[0], &w[1]);
        let file = m.key.to_string();
        if out.len() != data.len() {
            out = vec![0x5Au8; data.len()];
        }
        for _ in 0..FLOOR_REPS {
            let t = Instant::now();
            out.copy_from_slice(data);
            std::hint::black_box(&mut out);
            floor.push(t.elapsed().as_secs_f64());
        }
        out.fill(0);

        for delta in [false, true] {
            let opts = ReduceOptions { compression: c, delta };
            let b = delta.then_some((&base[..], bm));
            let t = Instant::now();
            let (blob, stats) = encode(data, m, b, &opts)?;
            let enc = t.elapsed().as_secs_f64();
            let t = Instant::now();
            decode_into(&blob, m, delta.then_some(&base[..]), &mut out, &file)?;
            let dec = t.elapsed().as_secs_f64();
            if out != *data {
                bail!("{file}: decoded bytes differ from the original ({c}, delta {delta})");
            }
            out.fill(0);
            let ratio = stats.encoded_bytes as f64 / stats.raw_bytes as f64;
            let (e, d, r, s) =
                if delta { (&mut de, &mut dd, &mut dr, &mut dstats) } else { (&mut ce, &mut cd, &mut cr, &mut cstats) };
            e.push(enc);
            d.push(dec);
            r.push(ratio);
            *s = stats;
        }
    }
    let bytes = len as u64;
    let fl = median(&floor);
    let target = kind.target_ratio();
    let delta_ratio = median(&dr);
    Ok(ReduceRow {
        workload: kind.name(),
        compression: c.to_string(),
        file_bytes: bytes,
        steps_measured: shards.len() - 1,
        compress_bytes_ratio: median(&cr),
        delta_bytes_ratio: delta_ratio,
        compress_encode_gibps: gibps(bytes, median(&ce)),
        compress_encode_ratio: median(&ce) / fl,
        compress_decode_gibps: gibps(bytes, median(&cd)),
        compress_decode_ratio: median(&cd) / fl,
        delta_encode_gibps: gibps(bytes, median(&de)),
        delta_encode_ratio: median(&de) / fl,
        delta_decode_gibps: gibps(bytes, median(&dd)),
        delta_decode_ratio: median(&dd) / fl,
        memcpy_floor_gibps: gibps(bytes, fl),
        delta_stats: dstats,
        compress_stats: cstats,
        target_ratio: target,
        meets_target: target.map(|t| delta_ratio <= t),
    })
}

pub fn print(r: &ReduceReport) {
    println!(
        "bench reduce: {} per checkpoint, {} checkpoints per workload; medians over the {} deltas; codec on {} threads, floor a {}-thread memcpy",
        output::human_bytes(r.size),
        r.steps,
        r.steps - 1,
        r.codec_threads,
        r.floor_threads
    );
    let mut t = output::table(&[
        "workload",
        "compression",
        "bytes: compressed",
        "bytes: delta",
        "encode GiB/s (x floor)",
        "decode GiB/s (x floor)",
        "delta encode GiB/s (x floor)",
        "delta decode GiB/s (x floor)",
        "floor GiB/s",
        "delta chunks same/xor/comp/raw",
    ]);
    for x in &r.rows {
        let s = &x.delta_stats;
        t.add_row(vec![
            x.workload.to_string(),
            x.compression.clone(),
            format!("{:.3}", x.compress_bytes_ratio),
            format!("{:.3}", x.delta_bytes_ratio),
            format!("{:.2} ({:.1})", x.compress_encode_gibps, x.compress_encode_ratio),
            format!("{:.2} ({:.1})", x.compress_decode_gibps, x.compress_decode_ratio),
            format!("{:.2} ({:.1})", x.delta_encode_gibps, x.delta_encode_ratio),
            format!("{:.2} ({:.1})", x.delta_decode_gibps, x.delta_decode_ratio),
            format!("{:.2}", x.memcpy_floor_gibps),
            format!("{}/{}/{}/{}", s.same_chunks, s.xor_chunks, s.compressed_chunks, s.raw_chunks),
        ]);
    }
    println!("{t}");
    println!(
        "bytes are encoded/raw, the blob's header included; (x floor) is the time over a memcpy of the same bytes"
    );
    for x in &r.rows {
        if let (Some(target), Some(ok)) = (x.target_ratio, x.meets_target) {
            println!(
                "target: {} with {}: delta at most {target} of the full size -- {:.3} ({})",
                x.workload,
                x.compression,
                x.delta_bytes_ratio,
                if ok { "met" } else { "missed" }
            );
        }
    }
    if r.end_to_end.is_empty() {
        return;
    }
    println!();
    println!(
        "end to end: 2 nodes, k=1, ring, file:// persistent tier; times are the best of the {} checkpoints after the first",
        r.steps - 1
    );
    println!("  uncompressed path: {}", r.end_to_end_uncompressed_flags);
    println!("  reduced path:      {}", r.end_to_end_reduced_flags);
    let mut t = output::table(&[
        "workload",
        "path",
        "replicate s (GiB/s)",
        "wire/sent bytes",
        "shards sent: delta/compressed/all",
        "persist s (GiB/s)",
        "stored/uploaded bytes",
        "delta shards stored",
    ]);
    for x in &r.end_to_end {
        for (name, p) in [("uncompressed", &x.uncompressed), ("reduced", &x.reduced)] {
            t.add_row(vec![
                x.workload.to_string(),
                name.to_string(),
                format!("{:.4} ({:.2})", p.replicate_s, p.replicate_gibps),
                format!("{:.3}", p.replication_bytes_ratio),
                format!("{}/{}/{}", p.delta_shards_sent, p.encoded_shards_sent, p.shards_sent),
                format!("{:.4} ({:.2})", p.persist_s, p.persist_gibps),
                format!("{:.3}", p.persistence_bytes_ratio),
                p.delta_shards.to_string(),
            ]);
        }
    }
    println!("{t}");
    let mut t = output::table(&[
        "workload",
        "replicate throughput, reduced/uncompressed",
        "persist throughput, reduced/uncompressed",
    ]);
    for x in &r.end_to_end {
        t.add_row(vec![
            x.workload.to_string(),
            format!("{:.2}", x.replicate_throughput_ratio),
            format!("{:.2}", x.persist_throughput_ratio),
        ]);
    }
    println!("{t}");
    println!("throughput ratios are the uncompressed path's time over the reduced path's: above 1, the reduced path is faster");
    for x in &r.end_to_end {
        if let (Some(target), Some(ok)) = (x.target_ratio, x.meets_target) {
            println!(
                "target: {} end to end: sent and stored at most {target} of the full size -- sent {:.3}, stored {:.3} ({})",
                x.workload,
                x.reduced.replication_bytes_ratio,
                x.reduced.persistence_bytes_ratio,
                if ok { "met" } else { "missed" }
            );
            let p = &x.reduced;
            if p.replication_bytes_ratio > target && p.encoded_shards_sent < p.shards_sent {
                println!(
                    "  replicas went compressed {} times of {}: the daemon measured that on this link ({:.2} GiB/s uncompressed) compressing is slower than sending; --replication-bandwidth emulates a slower one",
                    p.encoded_shards_sent, p.shards_sent, x.uncompressed.replicate_gibps
                );
            }
        }
    }
    if let Some(c) = &r.no_loss_check {
        println!(
            "target: no loss of throughput where nothing shrinks ({}): reduced at least {} of uncompressed -- replicate {:.2}, persist {:.2} ({})",
            c.workload,
            c.target_ratio,
            c.replicate_throughput_ratio,
            c.persist_throughput_ratio,
            if c.met { "met" } else { "missed" }
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    FinetuneFrozen,
    FullAdam,
    Embedding,
    Random,
}

impl Workload {
    /// The target for the delta's bytes over the full size, if any.
    fn target_ratio(self) -> Option<f64> {
        match self {
            Workload::FinetuneFrozen => Some(FROZEN_TARGET_RATIO),
            Workload::Embedding => Some(EMBEDDING_TARGET_RATIO),
            _ => None,
        }
    }

    const ALL: [Workload; 4] = [Workload::FinetuneFrozen, Workload::FullAdam, Workload::Embedding, Workload::Random];

    /// The workloads a `--workloads` list names, in the usual order.
    fn selected(list: Option<&str>) -> Result<Vec<Workload>> {
        let Some(list) = list else { return Ok(Self::ALL.to_vec()) };
        let names: Vec<&str> = list.split(',').map(str::trim).collect();
        if let Some(bad) = names.iter().find(|n| !Self::ALL.iter().any(|w| w.name() == **n)) {
            let known: Vec<&str> = Self::ALL.iter().map(|w| w.name()).collect();
            bail!("--workloads: unknown workload {bad:?}; known: {}", known.join(", "));
        }
        Ok(Self::ALL.into_iter().filter(|w| names.contains(&w.name())).collect())
    }

    fn name(self) -> &'static str {
        match self {
            Workload::FinetuneFrozen => "finetune-frozen",
            Workload::FullAdam => "full-adam",
            Workload::Embedding => "embedding",
            Workload::Random => "random",
        }
    }
}

/// splitmix64: deterministic and fast.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Approximately standard normal (Irwin-Hall of four 16-bit uniforms).
    fn normal(&mut self) -> f32 {
        let x = self.next_u64();
        let s = (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
        (s as f32 / 65536.0 - 2.0) * 1.732_050_8
    }
}

fn bf16_from_f32(x: f32) -> u16 {
    let b = x.to_bits();
    // Round to nearest even (no NaN in this data).
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn f32_from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// A tensor of the generated state.
enum Data {
    Bf16(Vec<u16>),
    F32(Vec<f32>),
    Bytes(Vec<u8>),
}

/// Adam state of one trainable tensor: indices of its weights, exp_avg and
/// exp_avg_sq in `Generator::tensors`, and its gradient's scale.
struct AdamGroup {
    w: usize,
    m: usize,
    v: usize,
    grad_scale: f32,
}

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;
/// Adam steps taken before the first checkpoint (bias correction ~ 1).
const STEP0: i32 = 1000;
const EMBED_DIM: usize = 128;

struct Generator {
    kind: Workload,
    specs: Vec<TensorSpec>,
    tensors: Vec<Data>,
    groups: Vec<AdamGroup>,
    lr: f32,
    t: i32,
    rng: Rng,
}

impl Generator {
    fn new(kind: Workload, size: u64) -> Result<Self> {
        let mut g =
            Generator { kind, specs: vec![], tensors: vec![], groups: vec![], lr: 0.0, t: STEP0, rng: Rng::new(7) };
        let weights = |g: &mut Generator, name: String, n: usize, trainable: bool| {
            let std = 0.02 * (0.5 + g.rng.uniform());
            let w: Vec<u16> = (0..n).map(|_| bf16_from_f32(std * g.rng.normal())).collect();
            g.specs.push(TensorSpec { name: format!("{name}.weight"), dtype: Dtype::BF16, shape: vec![n] });
            g.tensors.push(Data::Bf16(w));
            if trainable {
                // Gradient scales differ by layer; moments start in a steady state.
                let grad_scale = 10f32.powf(-4.0 + 2.0 * g.rng.uniform());
                let m: Vec<f32> = (0..n).map(|_| 0.3 * grad_scale * g.rng.normal()).collect();
                let v: Vec<f32> = (0..n).map(|_| grad_scale * grad_scale * (0.5 + g.rng.uniform())).collect();
                let wi = g.tensors.len() - 1;
                for (suffix, d) in [("exp_avg", m), ("exp_avg_sq", v)] {
                    g.specs.push(TensorSpec {
                        name: format!("optim.{name}.{suffix}"),
                        dtype: Dtype::F32,
                        shape: vec![n],
                    });
                    g.tensors.push(Data::F32(d));
                }
                g.groups.push(AdamGroup { w: wi, m: wi + 1, v: wi + 2, grad_scale });
            }
        };
        match kind {
            Workload::FinetuneFrozen => {
                // 100 equal bf16 tensors, every tenth trainable with two fp32
                // moments: 100 * 2p + 10 * 8p bytes.
                g.lr = 1e-4;
                let p = (size / 280).max(1) as usize;
                for i in 0..100 {
                    weights(&mut g, format!("layers.{i}"), p, i % 10 == 0);
                }
            }
            Workload::FullAdam => {
                // 32 tensors of 10 bytes per parameter.
                g.lr = 3e-4;
                let p = (size / 320).max(1) as usize;
                for i in 0..32 {
                    weights(&mut g, format!("layers.{i}"), p, true);
                }
            }
            Workload::Embedding => {
                g.lr = 1e-3;
                let rows = (size as usize / (4 * EMBED_DIM)).max(1);
                let t: Vec<f32> = (0..rows * EMBED_DIM).map(|_| g.rng.normal()).collect();
                g.specs.push(TensorSpec {
                    name: "embedding.weight".into(),
                    dtype: Dtype::F32,
                    shape: vec![rows, EMBED_DIM],
                });
                g.tensors.push(Data::F32(t));
            }
            Workload::Random => {
                let mut b = vec![0u8; size as usize];
                fill(&mut g.rng, &mut b);
                g.specs.push(TensorSpec { name: "random".into(), dtype: Dtype::U8, shape: vec![size as usize] });
                g.tensors.push(Data::Bytes(b));
            }
        }
        Ok(g)
    }

    /// One training step between checkpoints.
    fn step(&mut self) {
        self.t += 1;
        match self.kind {
            Workload::FinetuneFrozen | Workload::FullAdam => {
                let (bc1, bc2) = (1.0 - BETA1.powi(self.t), 1.0 - BETA2.powi(self.t));
                let groups = std::mem::take(&mut self.groups);
                for gr in &groups {
                    let mut w = std::mem::replace(&mut self.tensors[gr.w], Data::Bytes(vec![]));
                    let mut m = std::mem::replace(&mut self.tensors[gr.m], Data::Bytes(vec![]));
                    let mut v = std::mem::replace(&mut self.tensors[gr.v], Data::Bytes(vec![]));
                    if let (Data::Bf16(w), Data::F32(m), Data::F32(v)) = (&mut w, &mut m, &mut v) {
                        for ((w, m), v) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()) {
                            // A persistent part (sign of the moment) plus noise.
                            let g = gr.grad_scale * (0.3 * m.signum() + self.rng.normal());
                            *m = BETA1 * *m + (1.0 - BETA1) * g;
                            *v = BETA2 * *v + (1.0 - BETA2) * g * g;
                            let upd = self.lr * (*m / bc1) / ((*v / bc2).sqrt() + EPS);
                            *w = bf16_from_f32(f32_from_bf16(*w) - upd);
                        }
                    }
                    self.tensors[gr.w] = w;
                    self.tensors[gr.m] = m;
                    self.tensors[gr.v] = v;
                }
                self.groups = groups;
            }
            Workload::Embedding => {
                let lr = self.lr;
                if let Data::F32(t) = &mut self.tensors[0] {
                    let rows = t.len() / EMBED_DIM;
                    for r in 0..rows {
                        if self.rng.uniform() < 0.05 {
                            for x in &mut t[r * EMBED_DIM..(r + 1) * EMBED_DIM] {
                                *x -= lr * self.rng.normal();
                            }
                        }
                    }
                }
            }
            Workload::Random => {
                if let Data::Bytes(b) = &mut self.tensors[0] {
                    fill(&mut self.rng, b);
                }
            }
        }
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("workload".to_string(), self.kind.name().to_string())])
    }

    /// The safetensors file of the current state.
    fn shard_bytes(&self) -> Vec<u8> {
        let meta = self.metadata();
        let layout = ShardLayout::new(&self.specs, &meta).expect("generated layout is valid");
        let mut f = vec![0u8; layout.file_len as usize];
        f[..layout.header.len()].copy_from_slice(&layout.header);
        for (e, d) in layout.entries.iter().zip(&self.tensors) {
            let dst = &mut f[e.range()];
            match d {
                Data::Bf16(v) => dst.chunks_exact_mut(2).zip(v).for_each(|(o, x)| o.copy_from_slice(&x.to_le_bytes())),
                Data::F32(v) => dst.chunks_exact_mut(4).zip(v).for_each(|(o, x)| o.copy_from_slice(&x.to_le_bytes())),
                Data::Bytes(v) => dst.copy_from_slice(v),
            }
        }
        f
    }
}

fn fill(rng: &mut Rng, b: &mut [u8]) {
    let mut it = b.chunks_exact_mut(8);
    for c in &mut it {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    for x in it.into_remainder() {
        *x = rng.next_u64() as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_round_trips_and_reports() {
        let a = ReduceArgs {
            size: 2 << 20,
            steps: 2,
            compression: "off,zstd:1".into(),
            no_end_to_end: true,
            replication_compression: None,
            replication_bandwidth: None,
            workloads: None,
            dir: "/dev/shm".into(),
            tmp_dir: None,
            persist_bandwidth: None,
        };
        let r = measure(&a).unwrap();
        assert_eq!(r.rows.len(), 8);
        for x in &r.rows {
            assert!(x.delta_bytes_ratio <= x.compress_bytes_ratio + 0.01, "{x:?}");
            if x.workload == "random" {
                assert!(x.compress_bytes_ratio < 1.01, "{x:?}");
            }
        }
        serde_json::to_string(&r).unwrap();
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(bf16_from_f32(1.0), 0x3f80);
        assert_eq!(f32_from_bf16(bf16_from_f32(0.5)), 0.5);
        assert_eq!(bf16_from_f32(f32::from_bits(0x3f80_8000)), 0x3f80); // tie to even
        assert_eq!(bf16_from_f32(f32::from_bits(0x3f81_8000)), 0x3f82);
    }
}
