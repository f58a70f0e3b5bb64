//! The drainer: copies complete checkpoints from this node's memory tier to
//! the persistent tier in the background, commits them, and applies the
//! persistent tier's retention. It reads from memory, so a checkpoint is
//! persisted even when its trainer died right after staging it.
//!
//! In a cluster every node uploads the ranks it holds and is the first
//! reachable holder of (so each rank is uploaded once), and whoever sees every
//! rank recorded writes the COMMIT.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tierckpt_format::ShardKey;
use tierckpt_tiers::faults::{FaultSpec, FaultyStore};
use tierckpt_tiers::persistent::{DeltaBase, RankRecord};
use tierckpt_tiers::{ErrorKind, MemoryTier, PersistOptions, PersistentTier, TierError};
use tokio::sync::{watch, Notify};

use crate::cluster::Cluster;
use crate::config::PersistConfig;
use crate::metrics::Metrics;

/// Drain state of one namespace, for `tierckpt status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NamespaceDrain {
    /// The namespace.
    pub namespace: String,
    /// Newest step this drainer saw committed.
    pub last_committed: Option<u64>,
    /// Complete steps not persisted because of `persist_every`.
    pub skipped: u64,
    /// What is being uploaded now ("step 40 rank 1, 1.0 GiB").
    pub uploading: Option<String>,
    /// Shards uploaded from this node.
    pub uploaded_shards: u64,
    /// Shard bytes uploaded, before compression and delta.
    pub uploaded_bytes: u64,
    /// What they took in the store, after compression and delta.
    #[serde(default)]
    pub stored_bytes: u64,
    /// Shards stored as deltas against an earlier step.
    #[serde(default)]
    pub delta_shards: u64,
    /// Steps this node saw committed after uploading its ranks of them (the
    /// COMMIT written by it or by another node).
    #[serde(default)]
    pub commits: u64,
    /// When this node last saw a step committed (Unix ms).
    #[serde(default)]
    pub last_commit_unix_ms: Option<u64>,
    /// Listings of the store's steps to see what other nodes began (in a
    /// cluster): at most one per new step, per own upload and per `RELIST`.
    #[serde(default)]
    pub store_lists: u64,
    /// Failed attempts to persist.
    pub failures: u64,
    /// The last failure, as a person reads it.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// What `tierckpt status` shows of the drain to the persistent tier.
pub struct PersistStatus {
    /// The store's URL.
    pub url: String,
    /// Persist every N-th complete checkpoint.
    pub persist_every: u64,
    /// Committed steps kept.
    pub keep_last: usize,
    /// "zstd:1", "lz4" or "off".
    #[serde(default)]
    pub compression: String,
    #[serde(default)]
    /// Only changed chunks are stored.
    pub delta: bool,
    /// Per namespace.
    pub namespaces: Vec<NamespaceDrain>,
}

/// What the steps other nodes began ask of this node's drainer.
enum Begun {
    /// Upload this node's ranks of this step not up yet (step, world size,
    /// ranks), then commit it if it is whole: the oldest begun step that
    /// lacks some of them, or only its commit.
    Join(u64, u32, Vec<u32>),
    /// A begun step lacks only other nodes' ranks: begin no newer step.
    Wait,
    /// Go on with the newest complete step.
    Nothing,
}

/// How long a drainer waits for other nodes to finish a step it did its
/// part of before it begins a newer one anyway.
const PENDING_LIMIT: Duration = Duration::from_secs(30);

/// How long what a listing of the store showed holds while no new step
/// comes: a listing every drain round (200 ms) on every node would cost a
/// cluster of thousands of nodes more LIST requests than a store serves.
const RELIST: Duration = Duration::from_secs(2);

#[derive(Default)]
struct NsState {
    shown: NamespaceDrain,
    /// Newest step decided on (persisted or skipped).
    decided: Option<u64>,
    since_last: u64,
    last_time: Option<Instant>,
    /// The begun step this node waits for others to finish, since when.
    waiting: Option<(u64, Instant)>,
    /// The last listing of the store: the newest step it was made for,
    /// when, and whether it said to wait.
    listed: Option<(u64, Instant, bool)>,
    /// Bytes of this node's ranks of the last step it uploaded any of.
    step_bytes: u64,
}

/// Drains complete checkpoints from the memory tier to the persistent tier, in the background.
pub struct Drainer {
    /// The persistent tier.
    pub store: Arc<PersistentTier>,
    cfg: PersistConfig,
    tier: Arc<MemoryTier>,
    cluster: Option<Arc<Cluster>>,
    state: Mutex<BTreeMap<String, NsState>>,
    wake: Notify,
    metrics: Arc<Metrics>,
    /// Recent upload throughput, bytes per second (a moving average).
    throughput: Mutex<Option<f64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drainer {
    /// Opens the store and starts the drain loop; it stops when `stop` changes.
    pub fn start(
        cfg: PersistConfig,
        node: &str,
        tier: Arc<MemoryTier>,
        cluster: Option<Arc<Cluster>>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, TierError> {
        let opts = PersistOptions {
            bandwidth: cfg.bandwidth,
            reduce: cfg.reduce,
            full_every: cfg.full_every,
            ..Default::default()
        };
        let mut store = PersistentTier::open_with(&cfg.url, node, opts.clone(), &cfg.options)?;
        if let Some(spec) = &cfg.faults {
            let faulty = Arc::new(FaultyStore::new(store.store(), FaultSpec::parse(spec)?));
            let prefix = cfg.url.split_once("://").map_or("", |(_, r)| r);
            let prefix =
                if cfg.url.starts_with("file://") { "" } else { prefix.split_once('/').map_or("", |(_, p)| p) };
            store = PersistentTier::with_store(faulty, prefix, &cfg.url, node, opts)?;
        }
        let d = Arc::new(Self {
            store: Arc::new(store),
            cfg,
            tier,
            cluster,
            state: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
            metrics,
            throughput: Mutex::new(None),
        });
        tokio::spawn(d.clone().run(stop));
        Ok(d)
    }

    /// A shard became visible here: look for work.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Counters and the last error per namespace.
    pub fn status(&self) -> PersistStatus {
        PersistStatus {
            url: self.cfg.url.clone(),
            persist_every: self.cfg.every,
            keep_last: self.cfg.keep_last,
            compression: self.cfg.reduce.compression.to_string(),
            delta: self.cfg.reduce.delta,
            namespaces: lock(&self.state).values().map(|s| s.shown.clone()).collect(),
        }
    }

    /// How long persisting one step of `ns` from this node takes, in ms:
    /// the bytes of its ranks of the last step uploaded over the recent
    /// upload throughput; none before an upload of `ns` was measured.
    pub fn estimate_ms(&self, ns: &str) -> Option<u64> {
        let bytes = lock(&self.state).get(ns).map(|s| s.step_bytes).filter(|&b| b > 0)?;
        let rate = (*lock(&self.throughput)).filter(|&r| r > 0.0)?;
        Some((bytes as f64 / rate * 1000.0).ceil() as u64)
    }

    /// Complete steps per namespace newer than the last one persisted or
    /// skipped: what the drain has yet to decide on.
    pub fn steps_waiting(&self) -> Vec<(String, u64)> {
        self.tier
            .namespaces()
            .into_iter()
            .map(|n| {
                let decided = lock(&self.state).get(&n.namespace).and_then(|s| s.decided);
                let work = self.work(&n.namespace);
                let count = work.iter().filter(|(step, ..)| decided.is_none_or(|d| *step > d)).count();
                (n.namespace, count as u64)
            })
            .collect()
    }

    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        // Uploads this node's previous run was killed in the middle of.
        match self.store.clean_interrupted_uploads().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(url = %self.cfg.url, files = n, "removed leftovers of interrupted uploads"),
            Err(e) => {
                tracing::warn!(url = %self.cfg.url, error = %e, "removing leftovers of interrupted uploads failed")
            }
        }
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = self.wake.notified() => {}
                // Often enough to see steps completed on other nodes soon.
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            for ns in self.tier.namespaces().into_iter().map(|n| n.namespace) {
                if let Err(e) = self.drain_namespace(&ns).await {
                    tracing::warn!(namespace = %ns, url = %self.cfg.url, error = %e, "persisting failed; will retry");
                    let mut st = lock(&self.state);
                    let s = st.entry(ns.clone()).or_default();
                    s.shown.failures += 1;
                    s.shown.last_error = Some(e.to_string());
                    s.shown.uploading = None;
                }
            }
        }
    }

    /// Complete steps of `ns` (across the cluster when clustered) and, for
    /// each, the ranks this node should upload.
    fn work(&self, ns: &str) -> Vec<(u64, u32, Vec<u32>)> {
        match &self.cluster {
            Some(c) => c
                .view()
                .remove(ns)
                .unwrap_or_default()
                .into_iter()
                .filter(|s| s.complete)
                .map(|s| {
                    let mine = s
                        .holders
                        .iter()
                        .filter(|(_, h)| h.first().map(String::as_str) == Some(c.node_id()))
                        .map(|(r, _)| *r)
                        .collect();
                    (s.step, s.world_size, mine)
                })
                .collect(),
            None => self
                .tier
                .steps(ns)
                .unwrap_or_default()
                .into_iter()
                .filter(|s| s.complete)
                .map(|s| (s.step, s.world_size, s.ranks))
                .collect(),
        }
    }

    /// Whether the trainer asked for `step` to be persisted: the `tiers`
    /// metadata of its shards held here ("memory" or "memory,persistent", as
    /// the Python `Checkpointer` writes it); None when they do not say.
    async fn requested(&self, ns: &str, step: u64) -> Option<bool> {
        let tier = self.tier.clone();
        let ns = ns.to_string();
        tokio::task::spawn_blocking(move || {
            let s = tier.steps(&ns).ok()?.into_iter().find(|s| s.step == step)?;
            let rank = *s.ranks.first()?;
            let (_, map) = tier.map_leased(&ShardKey::new(ns.clone(), step, rank)).ok()?;
            let view = tierckpt_format::parse_shard(&map, "a shard being drained").ok()?;
            let tiers = view.metadata.get("tiers")?;
            Some(tiers.split(',').any(|t| t.trim() == "persistent"))
        })
        .await
        .ok()
        .flatten()
    }

    async fn drain_namespace(&self, ns: &str) -> Result<(), TierError> {
        let mut work = self.work(ns);
        // Finish what the cluster began first: a step commits only once
        // every rank is up, and nodes that each went for their own newest
        // step, while checkpoints come faster than the drain, would commit none.
        match self.begun(ns, &work).await? {
            Begun::Join(step, world, mine) => return self.persist(ns, step, world, mine).await,
            Begun::Wait => return Ok(()),
            Begun::Nothing => {}
        }
        let Some((step, world, mine)) = work.pop() else { return Ok(()) };
        if lock(&self.state).get(ns).is_some_and(|s| s.decided.is_some_and(|d| d >= step)) {
            return Ok(());
        }
        let requested = self.requested(ns, step).await;
        let due = {
            let mut st = lock(&self.state);
            let s = st.entry(ns.to_string()).or_default();
            s.shown.namespace = ns.to_string();
            if s.decided.is_some_and(|d| d >= step) {
                return Ok(());
            }
            let due_by_count = s.since_last + 1 >= self.cfg.every || s.last_time.is_none();
            let due_by_time = self.cfg.interval.zip(s.last_time).is_some_and(|(i, t)| t.elapsed() >= i);
            // The trainer's own choice (adaptive intervals) wins over the count.
            requested.unwrap_or(due_by_count || due_by_time)
        };
        if !due {
            // (Had another node begun it, `begun_elsewhere` would have joined in.)
            let mut st = lock(&self.state);
            let s = st.entry(ns.to_string()).or_default();
            s.decided = Some(step);
            s.since_last += 1;
            s.shown.skipped += 1;
            return Ok(());
        }
        self.persist(ns, step, world, mine).await
    }

    /// What the steps begun in the store and not committed ask of this node
    /// (in a cluster). The store is listed only while this node holds a
    /// complete step newer than the last commit it saw, and then again only
    /// for a newer step, after this node's own upload, or after `RELIST`.
    async fn begun(&self, ns: &str, work: &[(u64, u32, Vec<u32>)]) -> Result<Begun, TierError> {
        if self.cluster.is_none() {
            return Ok(Begun::Nothing);
        }
        let (seen, listed) = lock(&self.state).get(ns).map_or((None, None), |s| (s.shown.last_committed, s.listed));
        let newest = work
            .iter()
            .filter(|(step, _, mine)| !mine.is_empty() && seen.is_none_or(|c| *step > c))
            .map(|(step, ..)| *step)
            .max();
        let Some(newest) = newest else { return Ok(Begun::Nothing) };
        match listed {
            Some((n, at, wait)) if n >= newest && at.elapsed() < RELIST => {
                return Ok(if wait { Begun::Wait } else { Begun::Nothing });
            }
            _ => {}
        }
        let begun = self.begun_in_store(ns, work, seen).await?;
        let mut st = lock(&self.state);
        let state = st.entry(ns.to_string()).or_default();
        state.shown.store_lists += 1;
        state.listed = match begun {
            Begun::Join(..) => None,
            Begun::Wait => Some((newest, Instant::now(), true)),
            Begun::Nothing => Some((newest, Instant::now(), false)),
        };
        Ok(begun)
    }

    /// [`Self::begun`] from a listing of the store made now (`seen`: the
    /// last commit this node saw).
    async fn begun_in_store(
        &self,
        ns: &str,
        work: &[(u64, u32, Vec<u32>)],
        seen: Option<u64>,
    ) -> Result<Begun, TierError> {
        let stored = self.store.steps(ns).await?;
        let committed = stored.iter().filter(|s| s.committed).map(|s| s.step).max();
        let mut st = lock(&self.state);
        let state = st.entry(ns.to_string()).or_default();
        if let Some(c) = committed.filter(|&c| seen.is_none_or(|s| c > s)) {
            state.shown.last_committed = Some(c);
        }
        // Begun and still complete here (not evicted), oldest first.
        let mut pending = work.iter().filter(|(step, ..)| {
            committed.is_none_or(|c| *step > c)
                && stored.iter().any(|s| s.step == *step && !s.committed && !s.ranks.is_empty())
        });
        let up = |step: u64| stored.iter().find(|s| s.step == step).map_or(&[][..], |s| &s.ranks[..]);
        let Some(oldest) = pending.clone().next() else { return Ok(Begun::Nothing) };
        // The oldest that lacks ranks of this node, or lacks only its COMMIT
        // (the commit failed: any node may write it).
        let join = pending.find(|(step, world, mine)| {
            mine.iter().any(|r| !up(*step).contains(r)) || up(*step).len() == *world as usize
        });
        if let Some((step, world, mine)) = join {
            let missing = mine.iter().copied().filter(|r| !up(*step).contains(r)).collect();
            return Ok(Begun::Join(*step, *world, missing));
        }
        // Only other nodes' ranks are missing: start no new step meanwhile
        // (a newer one would leave this one unfinished), unless they have
        // not come for `PENDING_LIMIT` (a node lost, its copies not yet moved).
        match state.waiting {
            Some((step, since)) if step == oldest.0 && since.elapsed() > PENDING_LIMIT => Ok(Begun::Nothing),
            Some((step, _)) if step == oldest.0 => Ok(Begun::Wait),
            _ => {
                state.waiting = Some((oldest.0, Instant::now()));
                drop(st);
                self.tier.pin_for_drain(ns, Some(oldest.0));
                Ok(Begun::Wait)
            }
        }
    }

    /// Uploads this node's ranks (`mine`) of `step` and commits the step if
    /// they were the last ones missing.
    async fn persist(&self, ns: &str, step: u64, world: u32, mine: Vec<u32>) -> Result<(), TierError> {
        // Retention must not drop this node's ranks of the step before they are up.
        self.tier.pin_for_drain(ns, Some(step));
        // What the store shows changes with this upload: list it again next.
        lock(&self.state).entry(ns.to_string()).or_default().listed = None;
        let taken = Instant::now();
        // The step this drainer saw committed last: a delta base for the
        // ranks whose shard of it this node still holds in memory.
        let last = lock(&self.state).get(ns).and_then(|s| s.shown.last_committed).filter(|&s| s < step);
        let base_commit = match last {
            Some(s) if self.cfg.reduce.delta => self.store.commit_record(ns, s).await.ok(),
            _ => None,
        };
        let mut step_bytes = 0;
        for rank in mine {
            let key = ShardKey::new(ns, step, rank);
            let t = self.tier.clone();
            let k = key.clone();
            let mapped = tokio::task::spawn_blocking(move || t.map_leased(&k))
                .await
                .map_err(|e| TierError::Unavailable(e.to_string()))?;
            let (m, map) = match mapped {
                Ok(x) => x,
                // Evicted meanwhile: a newer step will be persisted instead.
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            self.set_uploading(ns, Some(format!("step {step} rank {rank}, {} bytes", m.file_len)));
            let t0 = Instant::now();
            let base_record = base_commit.as_ref().and_then(|c| c.shards.iter().find(|r| r.manifest.key.rank == rank));
            let base_map = match base_record {
                Some(r) => self.base_in_memory(r).await,
                None => None,
            };
            let base = base_record
                .zip(base_map)
                .map(|(record, map)| DeltaBase { record, bytes: bytes::Bytes::from_owner(map) });
            match self.store.upload_with_base(&m, bytes::Bytes::from_owner(map), base).await {
                Ok(up) => {
                    self.metrics.uploaded(t0.elapsed());
                    step_bytes += m.file_len;
                    let rate = m.file_len as f64 / t0.elapsed().as_secs_f64().max(1e-6);
                    let mut avg = lock(&self.throughput);
                    *avg = Some(avg.map_or(rate, |a| 0.7 * a + 0.3 * rate));
                    drop(avg);
                    tracing::info!(
                        shard = %key,
                        bytes = m.file_len,
                        stored = up.stored_bytes,
                        base = ?up.base_step,
                        secs = t0.elapsed().as_secs_f64(),
                        "uploaded"
                    );
                    let mut st = lock(&self.state);
                    let s = st.entry(ns.to_string()).or_default();
                    s.shown.uploaded_shards += 1;
                    s.shown.uploaded_bytes += m.file_len;
                    s.shown.stored_bytes += up.stored_bytes;
                    s.shown.delta_shards += u64::from(up.base_step.is_some());
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        self.set_uploading(ns, None);
        if step_bytes > 0 {
            lock(&self.state).entry(ns.to_string()).or_default().step_bytes = step_bytes;
        }
        if self.store.try_commit(ns, step, world).await? {
            {
                let mut st = lock(&self.state);
                let s = st.entry(ns.to_string()).or_default();
                s.decided = s.decided.max(Some(step));
                s.since_last = 0;
                s.last_time = Some(Instant::now());
                s.shown.last_committed = Some(step);
                s.shown.last_error = None;
                s.shown.commits += 1;
                s.shown.last_commit_unix_ms = Some(tierckpt_tiers::now_unix_ms());
            }
            self.metrics.committed(taken.elapsed());
            self.tier.pin_for_drain(ns, None);
            // Clean-up after the commit point, reported separately from it.
            let _ = self.store.clean_unreferenced(ns, step).await;
            let deleted = self.store.retain(ns, self.cfg.keep_last, self.cfg.keep_every).await?;
            if !deleted.is_empty() {
                tracing::info!(namespace = ns, steps = ?deleted, "persistent retention deleted steps");
            }
        }
        Ok(())
    }

    /// This node's copy of the shard `r` describes, if it holds exactly
    /// those bytes (same manifest), mapped under a lease.
    async fn base_in_memory(&self, r: &RankRecord) -> Option<tierckpt_tiers::LeasedMap> {
        let (t, k) = (self.tier.clone(), r.manifest.key.clone());
        let (m, map) = tokio::task::spawn_blocking(move || t.map_leased(&k)).await.ok()?.ok()?;
        (m.chunks == r.manifest.chunks && m.file_len == r.manifest.file_len).then_some(map)
    }

    fn set_uploading(&self, ns: &str, what: Option<String>) {
        lock(&self.state).entry(ns.to_string()).or_default().shown.uploading = what;
    }
}
