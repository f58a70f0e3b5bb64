//! `bench reduce` end to end: the checkpoints of a workload through two
//! real two-node clusters at once, one per path (see the module above).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tierckpt_client::{Client, TensorData};
use tierckpt_format::{Manifest, ShardKey, ShardLayout, TensorSpec};
use tierckpt_harness::daemon::{LocalCluster, LocalClusterOptions};
use tierckpt_harness::stats::gibps;

use super::{EndToEndPath, ReduceArgs, Workload, SETTLE};
use crate::bench::observe::drain_state;

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
        let mut opts = LocalClusterOptions { nodes: 2, ..Default::default() };
        let s = &mut opts.settings;
        s.memory_tier_size = Some(((keep_last as u64 + 3) * file_bytes).max(64 << 20).to_string());
        s.keep_last = Some(keep_last);
        s.replication_factor = Some(1);
        s.placement = Some("ring".into());
        // Frequent heartbeats (the view of what the peer holds); a long
        // timeout keeps re-replication out.
        s.heartbeat_interval = Some("50ms".into());
        s.heartbeat_timeout = Some("60s".into());
        opts.set_flags(&extra)?;
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
pub(super) fn run(
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
