//! The peer tier: cluster membership, heartbeats, replication of every sealed
//! shard to k peers, the cluster view (which live node holds which rank), restore
//! from a peer's copy, and re-replication after a node dies.
//!
//! Heartbeats carry each node's holdings, so every node keeps a view of the
//! cluster that is at most one heartbeat old; `latest` and peer restores refresh
//! it first. Retention on every node follows cluster-wide completeness.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use tierckpt_format::{BaseRef, Manifest, ShardKey};
use tierckpt_proto::{ClusterStatus, ClusterStep, HeldStep, Holdings, NodeState, NodeStatus, ReplicationStats};
use tierckpt_tiers::{ErrorKind, MemoryTier, TierError};
use tokio::sync::{mpsc, watch};

use crate::config::{ClusterConfig, Placement};
use crate::metrics::Metrics;
use crate::peer::{Pace, PeerClient, ReplicaBody};
use tierckpt_tiers::receive::{receive, unchanged_chunk};

/// Indices of the nodes that receive copies of `owner`'s shards.
pub fn replica_targets(placement: Placement, n: usize, owner: usize, k: usize) -> Vec<usize> {
    let ring = |count: usize| (1..=count).map(|j| (owner + j) % n).collect::<Vec<_>>();
    match placement {
        Placement::Ring => ring(k.min(n - 1)),
        Placement::Group => {
            let size = k + 1;
            let groups = (n / size).max(1);
            // The last group absorbs the remainder so that no group is short.
            let g = (owner / size).min(groups - 1);
            let start = g * size;
            let end = if g == groups - 1 { n } else { start + size };
            (start..end).filter(|&i| i != owner).collect()
        }
    }
}

/// The first wait before a replica push is retried; it doubles per retry.
const PUSH_BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// The longest wait between two tries of a replica push.
const PUSH_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Retries of a replica push after its first try.
const PUSH_RETRIES: u32 = 3;

/// A random number for backoff jitter (from the std hasher's random keys).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

struct Member {
    state: NodeState,
    last_ok: Option<Instant>,
    /// The last probe was answered; only such nodes count in the view.
    reachable: bool,
    /// When a node back from suspect or dead may be pushed to again: one
    /// heartbeat after it first answered (it may still be working off what
    /// piled up while it was silent, such as a push cut off then).
    settled_at: Option<Instant>,
    holdings: Option<Holdings>,
}

/// What pushing replicas has cost so far, to decide whether encoding one
/// pays: compressing saves wire time and costs codec time (encoding here,
/// decoding on the peer), so it pays on a slow or capped link and not on a
/// fast one. Both costs are moving averages of what pushes measured.
#[derive(Debug, Default, Clone, Copy)]
struct ReplicaCosts {
    /// Seconds per byte on the wire, from pushes the peer does not decode
    /// (whole or sparse).
    wire_s_per_byte: Option<f64>,
    /// Seconds per shard byte that encoding and decoding add.
    codec_s_per_byte: Option<f64>,
}

/// Weight of the newest measurement in [`ReplicaCosts`].
const COST_WEIGHT: f64 = 0.3;
/// Until both costs are measured, a replica is encoded if expected to take
/// at most this share of the bytes it would send otherwise.
const ENCODE_UNMEASURED_BELOW: f64 = 0.5;

impl ReplicaCosts {
    fn blend(old: Option<f64>, new: f64) -> Option<f64> {
        Some(old.map_or(new, |o| o + COST_WEIGHT * (new - o)))
    }

    /// A push of `wire` bytes the peer took as they are, in `secs`.
    fn observe_plain(&mut self, wire: u64, secs: f64) {
        if wire >= 1 << 20 {
            self.wire_s_per_byte = Self::blend(self.wire_s_per_byte, secs / wire as f64);
        }
    }

    /// An encoded push of a `raw`-byte shard as `wire` bytes, `secs` from
    /// the start of encoding to the peer's answer (after decoding).
    fn observe_encoded(&mut self, raw: u64, wire: u64, secs: f64) {
        if raw >= 1 << 20 {
            let on_wire = self.wire_s_per_byte.unwrap_or(0.0) * wire as f64;
            self.codec_s_per_byte = Self::blend(self.codec_s_per_byte, (secs - on_wire).max(0.0) / raw as f64);
        }
    }

    /// Whether sending a `raw`-byte shard encoded, expected at `ratio` of
    /// `raw`, should beat sending `plain` bytes as they are.
    fn encode_pays(&self, raw: u64, plain: u64, ratio: f64) -> bool {
        let encoded = ratio * raw as f64;
        match (self.wire_s_per_byte, self.codec_s_per_byte) {
            (Some(w), Some(c)) => c * raw as f64 + w * encoded < w * plain as f64,
            _ => encoded < ENCODE_UNMEASURED_BELOW * plain as f64,
        }
    }
}

/// A clustered daemon's view of its peers, and the work it does with them.
pub struct Cluster {
    /// The cluster settings this node runs with.
    pub cfg: ClusterConfig,
    me: usize,
    tier: Arc<MemoryTier>,
    peers: PeerClient,
    members: Mutex<Vec<Member>>,
    stats: Mutex<ReplicationStats>,
    queue: mpsc::UnboundedSender<ShardKey>,
    started: Instant,
    rereplicating: AtomicBool,
    metrics: Arc<Metrics>,
    /// The newest step of each (target, namespace, rank) this node sent, so
    /// that a delta can use it before the next heartbeat shows it there.
    sent: Mutex<BTreeMap<(usize, String, u32), u64>>,
    costs: Mutex<ReplicaCosts>,
    /// What each placement target is owed, for the lag metrics.
    backlog: Mutex<BTreeMap<usize, Backlog>>,
}

/// Shards queued for one target and not known there yet (since when), and
/// its last successful push.
#[derive(Default)]
struct Backlog {
    pending: BTreeMap<ShardKey, Instant>,
    last_success: Option<SystemTime>,
}

/// Entries a backlog keeps before it drops those no longer held here.
const BACKLOG_PRUNE_AT: usize = 1024;

/// Replication owed to one peer (see [`Cluster::peer_lag`]).
#[derive(Debug, Clone)]
pub struct PeerLag {
    /// The peer's id.
    pub peer: String,
    /// Shards sealed here and queued for it that it does not hold yet.
    pub pending: u64,
    /// How long the oldest of them has waited.
    pub oldest_pending: Option<Duration>,
    /// When a push to it last succeeded.
    pub last_success: Option<SystemTime>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Holdings of a memory tier: its visible shards.
pub fn holdings_of(tier: &MemoryTier, node_id: &str) -> Holdings {
    let mut h = Holdings { node_id: node_id.to_string(), namespaces: BTreeMap::new() };
    for ns in tier.namespaces() {
        let steps: Vec<HeldStep> = tier
            .steps(&ns.namespace)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| !s.ranks.is_empty())
            .map(|s| HeldStep {
                step: s.step,
                world_size: s.world_size,
                ranks: s.ranks,
                created_unix_ms: s.created_unix_ms,
            })
            .collect();
        if !steps.is_empty() {
            h.namespaces.insert(ns.namespace, steps);
        }
    }
    h
}

impl Cluster {
    /// Starts the heartbeat loop and the replicator.
    pub fn start(
        cfg: ClusterConfig,
        tier: Arc<MemoryTier>,
        token: Option<String>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let me = cfg.my_index();
        let members = (0..cfg.nodes.len())
            .map(|i| Member {
                state: if i == me { NodeState::Alive } else { NodeState::Unknown },
                last_ok: None,
                reachable: i == me,
                settled_at: None,
                holdings: None,
            })
            .collect();
        let c = Arc::new(Self {
            cfg,
            me,
            tier,
            peers: PeerClient::new(token),
            members: Mutex::new(members),
            stats: Mutex::new(ReplicationStats::default()),
            queue: tx,
            started: Instant::now(),
            rereplicating: AtomicBool::new(false),
            metrics,
            sent: Mutex::new(BTreeMap::new()),
            costs: Mutex::new(ReplicaCosts::default()),
            backlog: Mutex::new(BTreeMap::new()),
        });
        tokio::spawn(c.clone().heartbeat_loop(stop.clone()));
        tokio::spawn(c.clone().replicate_loop(rx, stop));
        c
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    /// This node's memory tier, which peers' copies are received into.
    pub fn memory(&self) -> &Arc<MemoryTier> {
        &self.tier
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.cfg.nodes[i].1
    }

    fn id(&self, i: usize) -> &str {
        &self.cfg.nodes[i].0
    }

    /// Queues a freshly sealed local shard for replication.
    pub fn enqueue(&self, key: ShardKey) {
        lock(&self.stats).queued += 1;
        let targets = replica_targets(self.cfg.placement, self.cfg.nodes.len(), self.me, self.cfg.replication_factor);
        let mut backlog = lock(&self.backlog);
        for t in targets {
            let b = backlog.entry(t).or_default();
            if b.pending.len() >= BACKLOG_PRUNE_AT {
                b.pending.retain(|k, _| self.tier.locate(k).is_ok());
            }
            b.pending.entry(key.clone()).or_insert_with(Instant::now);
        }
        drop(backlog);
        let _ = self.queue.send(key);
    }

    async fn heartbeat_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            self.refresh().await;
            if !self.rereplicating.swap(true, Ordering::AcqRel) {
                let c = self.clone();
                tokio::spawn(async move {
                    c.rereplicate().await;
                    c.rereplicating.store(false, Ordering::Release);
                });
            }
        }
    }

    /// Asks every peer for its holdings once, updates node states, and
    /// applies cluster-wide completeness to local retention.
    pub async fn refresh(&self) {
        // Generous, so a busy peer is not taken for a missing one.
        let timeout = self.cfg.heartbeat_interval.max(self.cfg.heartbeat_timeout / 2);
        let asks = (0..self.cfg.nodes.len()).filter(|&i| i != self.me).map(|i| {
            let peers = self.peers.clone();
            let addr = self.addr(i);
            async move { (i, peers.holdings(addr, timeout).await) }
        });
        let answers = futures_util::future::join_all(asks).await;
        let now = Instant::now();
        {
            let mut members = lock(&self.members);
            for (i, answer) in answers {
                let m = &mut members[i];
                let before = m.state;
                match answer {
                    Ok(h) if h.node_id == self.cfg.nodes[i].0 => {
                        if matches!(m.state, NodeState::Suspect | NodeState::Dead) {
                            m.settled_at = Some(now + self.cfg.heartbeat_interval);
                        }
                        m.last_ok = Some(now);
                        m.reachable = true;
                        m.holdings = Some(h);
                        m.state = NodeState::Alive;
                    }
                    answer => {
                        m.reachable = false;
                        if let Ok(h) = answer {
                            tracing::warn!(node = self.id(i), answered_as = %h.node_id, "a peer answers with another node id");
                        }
                        let silent = now - m.last_ok.unwrap_or(self.started);
                        if silent >= self.cfg.heartbeat_timeout {
                            m.state = NodeState::Dead;
                            m.holdings = None;
                        } else if silent >= self.cfg.heartbeat_timeout / 2 && m.state != NodeState::Unknown {
                            m.state = NodeState::Suspect;
                        }
                    }
                }
                if m.state != before {
                    let (id, state) = (self.id(i), m.state);
                    match state {
                        NodeState::Dead => tracing::warn!(node = id, "node is dead"),
                        NodeState::Suspect => tracing::warn!(node = id, "node is suspect"),
                        _ => tracing::info!(node = id, state = ?state, "node state changed"),
                    }
                    self.metrics.node_event(id, state);
                }
            }
        }
        for (ns, steps) in self.view() {
            let complete: BTreeSet<u64> = steps.iter().filter(|s| s.complete).map(|s| s.step).collect();
            self.tier.set_known_complete(&ns, complete);
        }
    }

    /// Which reachable node holds which rank of every step (this node, and
    /// the peers that answered the last probe).
    pub fn view(&self) -> BTreeMap<String, Vec<ClusterStep>> {
        let mut all = vec![holdings_of(&self.tier, &self.cfg.node_id)];
        all.extend(lock(&self.members).iter().filter(|m| m.reachable).filter_map(|m| m.holdings.clone()));
        let mut out: BTreeMap<String, BTreeMap<u64, ClusterStep>> = BTreeMap::new();
        for h in all {
            for (ns, steps) in h.namespaces {
                for s in steps {
                    let e = out.entry(ns.clone()).or_default().entry(s.step).or_insert_with(|| ClusterStep {
                        step: s.step,
                        world_size: s.world_size,
                        complete: false,
                        holders: BTreeMap::new(),
                    });
                    for r in s.ranks {
                        e.holders.entry(r).or_default().push(h.node_id.clone());
                    }
                }
            }
        }
        out.into_iter()
            .map(|(ns, steps)| {
                let steps = steps
                    .into_values()
                    .map(|mut s| {
                        s.complete = (0..s.world_size).all(|r| s.holders.contains_key(&r));
                        // Holders in node order: "the first holder" means the same node everywhere.
                        for h in s.holders.values_mut() {
                            h.sort_by_key(|id| self.cfg.nodes.iter().position(|(n, _)| n == id));
                        }
                        s
                    })
                    .collect();
                (ns, steps)
            })
            .collect()
    }

    /// Newest step whose every rank is held by some live node, other than those in `skip`.
    pub async fn latest(&self, ns: &str, skip: &std::collections::BTreeSet<u64>) -> Option<u64> {
        self.refresh().await;
        self.view().get(ns)?.iter().rev().find(|s| s.complete && !skip.contains(&s.step)).map(|s| s.step)
    }

    fn stats_update(&self, f: impl FnOnce(&mut ReplicationStats)) {
        f(&mut lock(&self.stats));
    }

    async fn replicate_loop(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<ShardKey>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let key = tokio::select! {
                _ = stop.changed() => return,
                k = rx.recv() => match k { Some(k) => k, None => return },
            };
            self.stats_update(|s| s.queued = s.queued.saturating_sub(1));
            let targets =
                replica_targets(self.cfg.placement, self.cfg.nodes.len(), self.me, self.cfg.replication_factor);
            let pushes = targets.into_iter().map(|t| self.push(&key, t, false));
            for r in futures_util::future::join_all(pushes).await {
                if let Err(e) = r {
                    tracing::warn!(shard = %key, error = %e, "replication failed; re-replication will retry");
                }
            }
        }
    }

    /// Waits until node `t` answered the last heartbeat (and, back from
    /// suspect or dead, has settled); `Unavailable` once it is dead
    /// (re-replication sends it what it lacks when it is back).
    async fn until_answering(&self, t: usize) -> Result<(), TierError> {
        loop {
            let (state, reachable) = {
                let m = &lock(&self.members)[t];
                (m.state, m.reachable && m.settled_at.is_none_or(|at| Instant::now() >= at))
            };
            if state == NodeState::Dead {
                return Err(TierError::Unavailable(format!(
                    "node {} is dead: no replica is pushed to it until it answers heartbeats again",
                    self.id(t)
                )));
            }
            if reachable {
                return Ok(());
            }
            tokio::time::sleep(self.cfg.heartbeat_interval).await;
        }
    }

    /// Returns once node `t` is declared dead (never while it is alive).
    async fn until_dead(&self, t: usize) {
        while lock(&self.members)[t].state != NodeState::Dead {
            tokio::time::sleep(self.cfg.heartbeat_interval).await;
        }
    }

    /// Whether node `t` holds `key`, as its holdings say now.
    async fn peer_holds(&self, t: usize, key: &ShardKey) -> Result<bool, TierError> {
        let timeout = self.cfg.heartbeat_interval.max(self.cfg.heartbeat_timeout / 2);
        let h = self.peers.holdings(self.addr(t), timeout).await?;
        Ok(h.namespaces
            .get(&key.namespace)
            .is_some_and(|steps| steps.iter().any(|s| s.step == key.step && s.ranks.contains(&key.rank))))
    }

    /// Sends a local shard to node `t`; true if sent, false if `t` held it
    /// already. Pushes only to a node that answers heartbeats (waiting while
    /// it does not, giving up once it is dead, and abandoning a push when it
    /// dies meanwhile); retries transient failures with exponential backoff
    /// (capped, with jitter), each retry, and with `check_first` the first
    /// try too, first asking the node whether it holds the shard already.
    async fn push(&self, key: &ShardKey, t: usize, check_first: bool) -> Result<bool, TierError> {
        let fail = |e: TierError| {
            self.stats_update(|s| s.failures += 1);
            e
        };
        self.until_answering(t).await?;
        let tier = self.tier.clone();
        let k = key.clone();
        let (m, map) = tokio::task::spawn_blocking(move || tier.map_leased(&k))
            .await
            .map_err(|e| TierError::Unavailable(e.to_string()))??;
        let data = Bytes::from_owner(map);
        let pace = self.cfg.replication_bandwidth.map(|b| Pace { bytes_per_s: b });
        let started = Instant::now();
        let mut body = self.replica_body(t, &m, &data).await;
        let prepared = started.elapsed();
        let mut delay = PUSH_BACKOFF_FIRST;
        let mut attempt = 0;
        loop {
            let outcome = async {
                self.until_answering(t).await?;
                if (attempt > 0 || check_first) && self.peer_holds(t, key).await? {
                    return Ok(false);
                }
                self.stats_update(|s| {
                    s.pushes_attempted += 1;
                    s.wire_bytes_attempted += body.wire_len();
                });
                let dead = async {
                    self.until_dead(t).await;
                    Err(TierError::Unavailable(format!("node {} died during the push", self.id(t))))
                };
                tokio::select! {
                    r = self.peers.put_replica(self.addr(t), &m, &body, pace) => r.map(|()| true),
                    r = dead => r,
                }
            }
            .await;
            let delta = body.is_delta();
            match outcome {
                Ok(false) => {
                    tracing::debug!(shard = %key, to = self.id(t), "the peer holds it already; not sent");
                    self.delivered(t, key, false);
                    return Ok(false);
                }
                Ok(true) => {
                    let mut sent = lock(&self.sent);
                    let last = sent.entry((t, key.namespace.clone(), key.rank)).or_insert(key.step);
                    *last = (*last).max(key.step);
                    drop(sent);
                    let wire = body.wire_len();
                    let secs = started.elapsed().as_secs_f64();
                    let encoded = matches!(body, ReplicaBody::Reduced { .. });
                    match encoded {
                        true => lock(&self.costs).observe_encoded(m.file_len, wire, secs),
                        false => lock(&self.costs).observe_plain(wire, secs - prepared.as_secs_f64()),
                    }
                    self.stats_update(|s| {
                        s.encoded_shards_sent += u64::from(encoded);
                        s.shards_sent += 1;
                        s.bytes_sent += m.file_len;
                        s.wire_bytes_sent += wire;
                        s.delta_shards_sent += u64::from(delta);
                    });
                    self.metrics.replicated(started.elapsed());
                    self.delivered(t, key, true);
                    tracing::debug!(
                        shard = %key,
                        to = self.id(t),
                        bytes = m.file_len,
                        wire,
                        delta,
                        prepare_ms = prepared.as_millis() as u64,
                        total_ms = started.elapsed().as_millis() as u64,
                        "replicated"
                    );
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    self.delivered(t, key, false);
                    return Ok(false);
                }
                // The peer no longer holds the base: send the shard whole.
                Err(e) if delta && e.kind() == ErrorKind::NotFound => {
                    tracing::debug!(shard = %key, to = self.id(t), error = %e, "delta refused; sending whole");
                    self.stats_update(|s| s.deltas_refused += 1);
                    body = ReplicaBody::Whole(data.clone());
                }
                Err(e) if lock(&self.members)[t].state == NodeState::Dead => return Err(fail(e)),
                Err(e) if e.is_retryable() && attempt < PUSH_RETRIES => {
                    tracing::debug!(shard = %key, to = self.id(t), attempt, error = %e, "push failed; backing off");
                    let jitter = random_u64() % (delay.as_millis() as u64 / 2 + 1);
                    tokio::time::sleep(delay + Duration::from_millis(jitter)).await;
                    delay = (delay * 2).min(PUSH_BACKOFF_CAP);
                    attempt += 1;
                }
                Err(e) => return Err(fail(e)),
            }
        }
    }

    /// The newest step before `key`'s of which this node and node `t` hold
    /// the same rank: the base of a delta to `t`. Mapped here under a lease.
    async fn shared_base(&self, t: usize, key: &ShardKey) -> Option<(Manifest, tierckpt_tiers::LeasedMap)> {
        let target = self.id(t).to_string();
        let me = self.cfg.node_id.clone();
        let seen = self
            .view()
            .remove(&key.namespace)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.step < key.step)
            .filter(|s| s.holders.get(&key.rank).is_some_and(|h| h.contains(&target) && h.contains(&me)))
            .map(|s| s.step)
            .max();
        // What this node sent there lately, which the view may not show yet.
        let sent = lock(&self.sent).get(&(t, key.namespace.clone(), key.rank)).copied().filter(|&s| s < key.step);
        let mut candidates: Vec<u64> = [sent, seen].into_iter().flatten().collect();
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        candidates.dedup();
        for step in candidates {
            let (tier, k) = (self.tier.clone(), ShardKey::new(key.namespace.clone(), step, key.rank));
            if let Ok(Ok(held)) = tokio::task::spawn_blocking(move || tier.map_leased(&k)).await {
                return Some(held);
            }
        }
        None
    }

    /// What to send node `t` for `m`:
    /// - with delta on, the chunks that differ from a base both nodes hold
    ///   (sparse: no encoding, no copy), else the shard whole;
    /// - unless, with compression on, the reduced blob
    ///   (`tierckpt_format::encode`) is expected to be faster to send, as
    ///   [`ReplicaCosts`] measured.
    async fn replica_body(&self, t: usize, m: &Manifest, data: &Bytes) -> ReplicaBody {
        let opts = self.cfg.replication_reduce;
        let base = match opts.delta {
            true => self.shared_base(t, &m.key).await,
            false => None,
        };
        let base = base.map(|(bm, map)| (bm, Bytes::from_owner(map)));
        let sparse = base.as_ref().and_then(|(bm, _)| {
            let changed: Vec<usize> = (0..m.chunks.len()).filter(|&i| !unchanged_chunk(bm, m, i)).collect();
            let pieces = changed.iter().map(|&i| {
                let (a, b) = m.chunk_range(i);
                data.slice(a as usize..b as usize)
            });
            (changed.len() < m.chunks.len())
                .then(|| ReplicaBody::Sparse { base: BaseRef::of(bm), pieces: pieces.collect() })
        });
        let plain = sparse.unwrap_or_else(|| ReplicaBody::Whole(data.clone()));
        if opts.compression == tierckpt_format::Compression::Off {
            return plain;
        }
        let (m2, d2, plain_len, costs) = (m.clone(), data.clone(), plain.wire_len(), *lock(&self.costs));
        let encoded = tokio::task::spawn_blocking(move || {
            let b = base.as_ref().map(|(bm, b)| (&b[..], bm));
            let ratio = tierckpt_format::estimate(&d2, &m2, b, &opts);
            if !costs.encode_pays(m2.file_len, plain_len, ratio) {
                return None;
            }
            tierckpt_format::encode(&d2, &m2, b, &opts).ok()
        })
        .await
        .ok()
        .flatten();
        match encoded {
            Some((blob, stats)) if (blob.len() as u64) < plain_len => {
                ReplicaBody::Reduced { blob: Bytes::from(blob), delta: stats.same_chunks + stats.xor_chunks > 0 }
            }
            _ => plain,
        }
    }

    /// The live peers holding `key`, in node order, as of a fresh probe;
    /// `NotFound` naming the dead nodes when there is none.
    pub(crate) async fn holders(&self, key: &ShardKey) -> Result<Vec<String>, TierError> {
        self.refresh().await;
        let holders: Vec<String> = self
            .view()
            .get(&key.namespace)
            .and_then(|steps| steps.iter().find(|s| s.step == key.step))
            .and_then(|s| s.holders.get(&key.rank))
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|id| *id != self.cfg.node_id)
            .collect();
        if holders.is_empty() {
            let dead: Vec<&str> = {
                let members = lock(&self.members);
                (0..members.len()).filter(|&i| members[i].state == NodeState::Dead).map(|i| self.id(i)).collect()
            };
            return Err(TierError::NotFound(format!(
                "no live copy of shard {key}: no live node holds it (dead nodes: {dead:?})"
            )));
        }
        Ok(holders)
    }

    /// A stream of `key`'s bytes from the live peer `id` (unverified: the
    /// caller verifies while receiving), with its manifest.
    pub(crate) async fn fetch_from(
        &self,
        id: &str,
        key: &ShardKey,
    ) -> Result<(Manifest, impl futures_util::Stream<Item = Result<bytes::Bytes, TierError>> + use<>), TierError> {
        let i = self.cfg.nodes.iter().position(|(n, _)| n == id).expect("holder is a member");
        let (m, stream) = self.peers.fetch(self.addr(i), key).await?;
        if m.key != *key {
            return Err(TierError::InvalidArgument(format!("node {id} sent {} for {key}", m.key)));
        }
        Ok((m, stream))
    }

    /// Stores a whole copy of a shard on each of this node's placement
    /// targets (what the replicator does for shards sealed here).
    pub(crate) async fn put_copies(&self, m: &Manifest, data: Bytes) -> Result<(), TierError> {
        let n = self.cfg.nodes.len();
        let body = ReplicaBody::Whole(data);
        for t in replica_targets(self.cfg.placement, n, self.me, self.cfg.replication_factor) {
            self.peers.put_replica(self.addr(t), m, &body, None).await?;
        }
        Ok(())
    }

    /// Fetches `key` from a live peer into local memory, verifying it; tries
    /// every live holder before giving up.
    pub async fn fetch_from_peers(&self, key: &ShardKey) -> Result<(), TierError> {
        let fetched = self
            .try_holders(key, |id| async move {
                let (m, stream) = self.fetch_from(&id, key).await?;
                match receive(&self.tier, &m, &format!("node {id}"), stream, None).await {
                    Ok(_) => {
                        tracing::info!(shard = %key, from = %id, bytes = m.file_len, "restored a shard from a peer");
                        Ok(Some(m.file_len))
                    }
                    // Another request brought the same copy in meanwhile.
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        if let Some(bytes) = fetched {
            self.stats_update(|s| {
                s.shards_fetched += 1;
                s.bytes_fetched += bytes;
            });
        }
        Ok(())
    }

    /// Runs `attempt` on each live holder of `key`, in node order, until one
    /// succeeds. When none does, the error lists what each answered, and is
    /// `NotFound` if none was reachable, `Corrupt` if a copy was corrupt,
    /// else `Unavailable`.
    pub(crate) async fn try_holders<T, F, Fut>(&self, key: &ShardKey, mut attempt: F) -> Result<T, TierError>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, TierError>>,
    {
        let mut errors = Vec::new();
        let (mut all_unreachable, mut any_corrupt) = (true, false);
        for id in self.holders(key).await? {
            match attempt(id.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::warn!(shard = %key, from = %id, error = %e, "peer copy unusable; trying the next");
                    all_unreachable &= e.kind() == ErrorKind::Unavailable;
                    any_corrupt |= e.kind() == ErrorKind::Corrupt;
                    errors.push(format!("{id}: {e}"));
                }
            }
        }
        let msg = format!("no live copy of shard {key}: every copy failed: {}", errors.join("; "));
        Err(if all_unreachable {
            TierError::NotFound(msg)
        } else if any_corrupt {
            TierError::Remote { kind: ErrorKind::Corrupt, message: msg }
        } else {
            TierError::Unavailable(msg)
        })
    }

    /// Restores k+1 copies of the newest complete step of each namespace on
    /// live nodes. Among the live holders of a shard, the first in node order
    /// does the work; shards younger than twice the heartbeat timeout are left
    /// to the replicator.
    async fn rereplicate(&self) {
        let live: Vec<usize> = {
            let members = lock(&self.members);
            (0..members.len()).filter(|&i| i == self.me || members[i].reachable).collect()
        };
        let desired = (self.cfg.replication_factor + 1).min(live.len());
        let grace_ms = 2 * self.cfg.heartbeat_timeout.as_millis() as u64;
        let now_ms = tierckpt_tiers::now_unix_ms();
        for (ns, steps) in self.view() {
            let Some(s) = steps.iter().rev().find(|s| s.complete) else { continue };
            for (rank, holders) in &s.holders {
                if holders.len() >= desired || holders.first().map(String::as_str) != Some(self.node_id()) {
                    continue;
                }
                let key = ShardKey::new(&ns, s.step, *rank);
                let young = self.tier.locate(&key).map(|(_, m)| now_ms.saturating_sub(m.created_unix_ms) < grace_ms);
                if young.unwrap_or(true) {
                    continue;
                }
                let order = (1..self.cfg.nodes.len()).map(|j| (self.me + j) % self.cfg.nodes.len());
                let targets: Vec<usize> = order
                    .filter(|i| live.contains(i) && !holders.iter().any(|h| h == self.id(*i)))
                    .take(desired - holders.len())
                    .collect();
                for t in targets {
                    // The view may be a heartbeat old: ask the target first.
                    match self.push(&key, t, true).await {
                        Ok(false) => {}
                        Ok(true) => {
                            self.stats_update(|s| s.rereplicated += 1);
                            tracing::info!(shard = %key, to = self.id(t), "re-replicated to restore k+1 copies");
                        }
                        Err(e) => tracing::warn!(shard = %key, to = self.id(t), error = %e, "re-replication failed"),
                    }
                }
            }
        }
    }

    /// Deletes a step or namespace on every peer not known dead; returns
    /// what each deleted (failures are logged and count as nothing).
    pub async fn delete_on_peers(&self, ns: &str, step: Option<u64>) -> Vec<(String, Result<(u64, u64), TierError>)> {
        let dead: Vec<bool> = lock(&self.members).iter().map(|m| m.state == NodeState::Dead).collect();
        let calls = (0..dead.len()).filter(|&i| i != self.me).map(|i| {
            let dead = dead[i];
            async move {
                let r = match dead {
                    true => Err(TierError::Unavailable(format!("node {} is dead and was not asked", self.id(i)))),
                    false => self.peers.delete(self.addr(i), ns, step).await,
                };
                if let Err(e) = &r {
                    tracing::warn!(node = self.id(i), namespace = ns, ?step, error = %e, "delete on a peer failed");
                }
                (self.id(i).to_string(), r)
            }
        });
        futures_util::future::join_all(calls).await
    }

    /// Sends a bodiless request to every peer not known dead; returns each
    /// node's JSON answer or error.
    pub async fn ask_peers(
        &self,
        method: hyper::Method,
        path: &str,
    ) -> Vec<(String, Result<serde_json::Value, TierError>)> {
        let dead: Vec<bool> = lock(&self.members).iter().map(|m| m.state == NodeState::Dead).collect();
        let calls = (0..dead.len()).filter(|&i| i != self.me && !dead[i]).map(|i| {
            let method = method.clone();
            async move { (self.id(i).to_string(), self.peers.json(self.addr(i), method, path).await) }
        });
        futures_util::future::join_all(calls).await
    }

    /// `t` holds `key` now; `pushed`: a push to it just succeeded.
    fn delivered(&self, t: usize, key: &ShardKey, pushed: bool) {
        let mut backlog = lock(&self.backlog);
        let b = backlog.entry(t).or_default();
        b.pending.remove(key);
        if pushed {
            b.last_success = Some(SystemTime::now());
        }
    }

    /// What each placement target is owed: shards queued for it that it does
    /// not hold yet (neither pushed nor shown in its last heartbeat, and
    /// still held here), the oldest one's wait, and its last good push.
    pub fn peer_lag(&self) -> Vec<PeerLag> {
        let targets = replica_targets(self.cfg.placement, self.cfg.nodes.len(), self.me, self.cfg.replication_factor);
        let held_there: Vec<Option<Holdings>> = {
            let members = lock(&self.members);
            targets.iter().map(|&t| members[t].holdings.clone()).collect()
        };
        let mut backlog = lock(&self.backlog);
        let now = Instant::now();
        targets
            .iter()
            .zip(held_there)
            .map(|(&t, holdings)| {
                let b = backlog.entry(t).or_default();
                b.pending.retain(|k, _| {
                    let there = holdings.as_ref().is_some_and(|h| {
                        h.namespaces
                            .get(&k.namespace)
                            .is_some_and(|steps| steps.iter().any(|s| s.step == k.step && s.ranks.contains(&k.rank)))
                    });
                    !there && self.tier.locate(k).is_ok()
                });
                PeerLag {
                    peer: self.id(t).to_string(),
                    pending: b.pending.len() as u64,
                    oldest_pending: b.pending.values().min().map(|&at| now - at),
                    last_success: b.last_success,
                }
            })
            .collect()
    }

    /// Every member's status and the replicator's counters, without the
    /// cluster view (what the metrics read at each scrape).
    pub fn members_and_stats(&self) -> (Vec<NodeStatus>, ReplicationStats) {
        (self.status_nodes(), *lock(&self.stats))
    }

    fn status_nodes(&self) -> Vec<NodeStatus> {
        let now = Instant::now();
        let members = lock(&self.members);
        members
            .iter()
            .enumerate()
            .map(|(i, m)| NodeStatus {
                id: self.id(i).to_string(),
                addr: self.addr(i).to_string(),
                state: m.state,
                last_seen_ms_ago: if i == self.me { Some(0) } else { m.last_ok.map(|t| (now - t).as_millis() as u64) },
                this_node: i == self.me,
            })
            .collect()
    }

    /// Members, their states, the cluster view and the replicator's counters.
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            node_id: self.cfg.node_id.clone(),
            replication_factor: self.cfg.replication_factor,
            placement: format!("{:?}", self.cfg.placement).to_lowercase(),
            nodes: self.status_nodes(),
            namespaces: self.view(),
            replication: *lock(&self.stats),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_placement() {
        assert_eq!(replica_targets(Placement::Ring, 4, 0, 1), [1]);
        assert_eq!(replica_targets(Placement::Ring, 4, 3, 2), [0, 1]);
        assert_eq!(replica_targets(Placement::Ring, 2, 1, 5), [0]);
    }

    #[test]
    fn group_placement() {
        // Groups {0,1} {2,3}.
        assert_eq!(replica_targets(Placement::Group, 4, 0, 1), [1]);
        assert_eq!(replica_targets(Placement::Group, 4, 3, 1), [2]);
        // 5 nodes, k=1: groups {0,1} {2,3,4}: the last group takes the remainder.
        assert_eq!(replica_targets(Placement::Group, 5, 4, 1), [2, 3]);
        // 6 nodes, k=2: groups {0,1,2} {3,4,5}.
        assert_eq!(replica_targets(Placement::Group, 6, 4, 2), [3, 5]);
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn encoding_replicas_pays_on_slow_links_only() {
        // Unmeasured: only a large saving is tried.
        let fresh = ReplicaCosts::default();
        assert!(fresh.encode_pays(GIB, GIB, 0.3));
        assert!(!fresh.encode_pays(GIB, GIB / 2, 0.3));
        // A 1.25 GiB/s link (0.8 s/GiB) and a codec adding 0.6 s/GiB.
        let mut fast = ReplicaCosts::default();
        fast.observe_plain(GIB, 0.8);
        fast.observe_encoded(GIB, GIB / 10, 0.68);
        assert!((fast.codec_s_per_byte.unwrap() * GIB as f64 - 0.6).abs() < 1e-9, "{fast:?}");
        // A 0.14 delta against a sparse 0.6: 0.6 + 0.11 s against 0.48 s.
        assert!(!fast.encode_pays(GIB, GIB * 6 / 10, 0.14));
        // A 0.03 delta against the whole shard: 0.62 s against 0.8 s.
        assert!(fast.encode_pays(GIB, GIB, 0.03));
        // The same on a 200 MB/s link (5 s/GiB): the 0.14 delta pays too.
        let mut slow = fast;
        for _ in 0..20 {
            slow.observe_plain(GIB, 5.0);
        }
        assert!(slow.encode_pays(GIB, GIB * 6 / 10, 0.14));
        assert!(!slow.encode_pays(GIB, GIB, 0.95));
    }

    #[test]
    fn small_pushes_do_not_move_the_costs() {
        let mut c = ReplicaCosts::default();
        c.observe_plain(1000, 5.0);
        c.observe_encoded(1000, 10, 5.0);
        assert!(c.wire_s_per_byte.is_none() && c.codec_s_per_byte.is_none());
        c.observe_plain(GIB, 1.0);
        c.observe_plain(GIB, 2.0);
        assert!((c.wire_s_per_byte.unwrap() * GIB as f64 - 1.3).abs() < 1e-9);
    }
}
