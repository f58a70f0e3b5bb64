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

mod codec;
mod end_to_end;
mod report;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tierckpt_format::{Compression, Manifest, ShardKey};
use tierckpt_harness::size::parse_size;

pub use report::{print, EndToEndPath, EndToEndRow, NoLossCheck, ReduceReport, ReduceRow};
use workload::{Generator, Workload};

/// Pause before each checkpoint end to end, untimed: the background work
/// of the one before (retention, heartbeats, the page cache) settles, as it
/// does in training, where checkpoints are seconds apart.
const SETTLE: Duration = Duration::from_millis(200);

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
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
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

/// Runs `bench reduce` and returns its figures.
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
            rows.push(codec::measure_workload(kind, c, &shards)?);
        }
        if !a.no_end_to_end {
            let (specs, meta) = (gen.specs.clone(), gen.metadata());
            let [un, re] = end_to_end::run(a, kind, &specs, &meta, &shards, [&uncompressed_flags, &reduced_flags])?;
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
}
