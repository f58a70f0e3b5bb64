//! The demo's local cluster: its directories and daemon options, and what
//! the launcher asks its daemons (copies of a step, commits in the
//! persistent tier) to wait until a failure can strike without the resume
//! step depending on timing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;
use tierckpt_client::{Client, ErrorKind};
use tierckpt_harness::daemon::{LocalCluster, LocalClusterOptions};

use super::{check_interrupt, DemoArgs, PLACEMENT, REPLICATION_FACTOR};

/// The demo's directories, removed when closed or dropped.
pub(crate) struct Dirs {
    /// The memory tiers' parent, on a tmpfs (`--tmp-dir`).
    pub(crate) memory: TempDir,
    /// The persistent tier's and the baseline's parent, on a disk (`--persist-dir`).
    pub(crate) disk: TempDir,
    /// The persistent tier, shared by every node.
    pub(crate) persist_dir: PathBuf,
    /// The `file://` URL of `persist_dir`.
    pub(crate) persist_url: String,
    /// The baseline's checkpoint files.
    pub(crate) baseline_dir: PathBuf,
}

impl Dirs {
    /// Creates the memory tiers' directory and the persistent tier.
    pub(crate) fn create(a: &DemoArgs) -> Result<Self> {
        let tmp_dir = std::path::absolute(&a.tmp_dir).with_context(|| format!("resolving {}", a.tmp_dir.display()))?;
        let memory = tempfile::Builder::new()
            .prefix("tierckpt-demo-")
            .tempdir_in(&tmp_dir)
            .with_context(|| format!("creating the demo's memory tiers under {}", tmp_dir.display()))?;
        // The persistent tier, shared by every node, outlives their memory.
        // The persistent tier and the baseline's files live on a disk, as they would.
        let persist_root = a.persist_dir.clone().unwrap_or_else(std::env::temp_dir);
        let disk = tempfile::Builder::new()
            .prefix("tierckpt-demo-")
            .tempdir_in(&persist_root)
            .with_context(|| format!("creating the demo's persistent tier under {}", persist_root.display()))?;
        let persist_dir = disk.path().join("persistent");
        let baseline_dir = disk.path().join("baseline");
        std::fs::create_dir(&persist_dir).with_context(|| format!("creating {}", persist_dir.display()))?;
        let persist_url = format!("file://{}", persist_dir.display());
        Ok(Self { memory, disk, persist_dir, persist_url, baseline_dir })
    }
}

/// The daemons' settings: `capacity` bytes of memory tier each, replicas
/// on peers, and a drain to the persistent tier at `persist_url`.
pub(crate) fn options(a: &DemoArgs, world: usize, capacity: u64, persist_url: &str) -> LocalClusterOptions {
    let mut o = LocalClusterOptions { nodes: world, ..Default::default() };
    let s = &mut o.settings;
    s.memory_tier_size = Some(capacity.to_string());
    s.keep_last = Some(a.keep_last);
    s.replication_factor = Some(REPLICATION_FACTOR);
    s.placement = Some(PLACEMENT.into());
    s.persistent_path = Some(persist_url.to_string());
    s.persist_every = Some(a.persist_every);
    s.persist_keep_last = Some(a.keep_last);
    s.persist_bandwidth = a.storage_bandwidth.0.map(|b| b.to_string());
    o
}

/// Node `i` polls its own notice file, `<base>/n<i>.notice` (as a cloud
/// node polls its spot notice), for the demo's preemption.
pub(crate) fn with_notices(o: &mut LocalClusterOptions, base: &Path) {
    o.node_settings = (0..o.nodes)
        .map(|i| tierckpt_daemon::ConfigLayer {
            preemption_notice: Some(notice_path(base, i).display().to_string()),
            preemption_notice_every: Some(super::preemption::NOTICE_EVERY.into()),
            ..Default::default()
        })
        .collect();
}

/// The notice file node `i` of a cluster under `base` polls.
pub(crate) fn notice_path(base: &Path, i: usize) -> PathBuf {
    base.join(format!("{}.notice", LocalCluster::node_id(i)))
}

/// Live copies of every rank's shard of `step`, as node `from` sees them.
pub(crate) fn copies(cluster: &LocalCluster, from: usize, ns: &str, step: u64, world: usize) -> Result<Vec<usize>> {
    let st = Client::connect(cluster.socket(from))?.status()?;
    let c = st.cluster.ok_or_else(|| anyhow!("node {from} is not in a cluster"))?;
    let s = c.namespaces.get(ns).and_then(|steps| steps.iter().find(|s| s.step == step));
    Ok((0..world as u32).map(|r| s.and_then(|s| s.holders.get(&r)).map_or(0, Vec::len)).collect())
}

/// Waits until every shard of `step` has `want` live copies (replication is
/// asynchronous); returns how long that took, or None if it did not happen
/// within `limit`.
pub(crate) fn wait_replicated(
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
pub(crate) fn delete_everywhere(cluster: &LocalCluster, ns: &str) -> Result<()> {
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

pub(crate) use tierckpt_harness::testing::committed_steps;

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
pub(crate) fn wait_persisted(
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
