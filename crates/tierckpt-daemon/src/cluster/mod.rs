//! The peer tier: cluster membership, heartbeats, replication of every sealed
//! shard to k peers, the cluster view (which live node holds which rank), restore
//! from a peer's copy, re-replication after a node dies, and joins and leaves.
//!
//! Each heartbeat a node probes only its placement neighbours and a few
//! others in turn (`placement::probe_set`): the cost per node stays flat
//! as the cluster grows. The answers carry the peer's holdings and its
//! member list with when it last heard from each (gossip), from which a
//! node knows of every member and its health. `latest` and peer restores
//! ask every live node first. Retention on every node follows
//! cluster-wide completeness.

mod lag;
mod members;
mod pins;
mod placement;
mod replicate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tierckpt_format::{Manifest, ShardKey};
use tierckpt_proto::{
    ClusterStatus, ClusterStep, HeldStep, Holdings, MemberSeen, NodeState, NodeStatus, ReplicationStats,
};
use tierckpt_tiers::{ErrorKind, MemoryTier, TierError};
use tokio::sync::{mpsc, watch};

use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::peer::PeerClient;
pub use lag::PeerLag;
use members::Members;
pub use placement::{probe_set, replica_targets, targets_of};
use replicate::ReplicaCosts;
use tierckpt_tiers::receive::receive;

/// Nodes probed each heartbeat besides the placement neighbours, in turn.
const PROBE_FANOUT: usize = 2;

/// A random number for backoff jitter (from the std hasher's random keys).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// A clustered daemon's view of its peers, and the work it does with them.
pub struct Cluster {
    /// The cluster settings this node runs with.
    pub cfg: ClusterConfig,
    me: MemberSeen,
    tier: Arc<MemoryTier>,
    peers: PeerClient,
    members: Mutex<Members>,
    stats: Mutex<ReplicationStats>,
    queue: mpsc::UnboundedSender<ShardKey>,
    started: Instant,
    rereplicating: AtomicBool,
    metrics: Arc<Metrics>,
    /// The newest step of each (target, namespace, rank) this node sent, so
    /// that a delta can use it before the next heartbeat shows it there.
    sent: Mutex<BTreeMap<(String, String, u32), u64>>,
    /// When each copy this node pushed landed (target, shard), so that
    /// re-replication counts it for two heartbeat timeouts (the view lags).
    pushed: Mutex<BTreeMap<(String, ShardKey), Instant>>,
    costs: Mutex<ReplicaCosts>,
    /// Where the round-robin part of the next probe round starts.
    probe_cursor: AtomicUsize,
    /// What each placement target is owed, for the lag metrics.
    backlog: Mutex<BTreeMap<String, lag::Backlog>>,
    /// Each member's change of state: (id, before, after).
    changes: tokio::sync::broadcast::Sender<(String, NodeState, NodeState)>,
}

/// Runs `round` every `interval`, the first at once (a late round delays
/// the next rather than bunching up), until `stop`.
pub(crate) async fn every<F, Fut>(interval: std::time::Duration, mut stop: watch::Receiver<bool>, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        round().await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Holdings of a memory tier: its visible shards.
pub fn holdings_of(tier: &MemoryTier, node_id: &str) -> Holdings {
    let mut h = Holdings { node_id: node_id.to_string(), namespaces: BTreeMap::new(), members: Vec::new() };
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
    /// Starts the heartbeat loop, the replicator, and discovery when the
    /// members are discovered; `peers` reaches the other nodes.
    pub fn start(
        cfg: ClusterConfig,
        tier: Arc<MemoryTier>,
        peers: PeerClient,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let me = MemberSeen {
            id: cfg.node_id.clone(),
            addr: cfg.advertise_addr.clone(),
            incarnation: tierckpt_tiers::now_unix_ms(),
            last_seen_unix_ms: None,
        };
        let members = Members::new(&me, &cfg.nodes);
        let c = Arc::new(Self {
            peers: peers.as_member(&me),
            me,
            cfg,
            tier,
            members: Mutex::new(members),
            stats: Mutex::new(ReplicationStats::default()),
            queue: tx,
            started: Instant::now(),
            rereplicating: AtomicBool::new(false),
            metrics,
            sent: Mutex::new(BTreeMap::new()),
            pushed: Mutex::new(BTreeMap::new()),
            costs: Mutex::new(ReplicaCosts::default()),
            probe_cursor: AtomicUsize::new(0),
            backlog: Mutex::new(BTreeMap::new()),
            changes: tokio::sync::broadcast::channel(64).0,
        });
        if let Some(source) = c.cfg.discover.clone() {
            tokio::spawn(c.clone().discover_loop(source, stop.clone()));
        }
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

    /// The address of member `id`; `Unavailable` if it is no longer one.
    fn addr_of(&self, id: &str) -> Result<String, TierError> {
        lock(&self.members)
            .get(id)
            .map(|m| m.addr.clone())
            .ok_or_else(|| TierError::Unavailable(format!("node {id} is no longer a member")))
    }

    /// True when `id` is dead or no longer a member.
    fn is_gone(&self, id: &str) -> bool {
        lock(&self.members).get(id).is_none_or(|m| matches!(m.state, NodeState::Dead | NodeState::Left))
    }

    /// Every other member: id, address, state.
    fn peers_now(&self) -> Vec<(String, String, NodeState)> {
        lock(&self.members)
            .list
            .iter()
            .filter(|m| m.id != self.cfg.node_id)
            .map(|m| (m.id.clone(), m.addr.clone(), m.state))
            .collect()
    }

    /// Member ids in placement order, and those reachable (this node too).
    fn live_order(&self) -> (Vec<String>, Vec<String>) {
        let members = lock(&self.members);
        let live = members.list.iter().filter(|m| m.reachable || m.id == self.cfg.node_id).map(|m| m.id.clone());
        (members.order(), live.collect())
    }

    /// Every later change of a member's state: (id, before, after).
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<(String, NodeState, NodeState)> {
        self.changes.subscribe()
    }

    /// Whether `id` is a placement neighbour now: a node this node copies
    /// its shards to, or one that copies its shards here.
    pub fn is_placement_neighbour(&self, id: &str) -> bool {
        let order = lock(&self.members).order();
        let (p, k) = (self.cfg.placement, self.cfg.replication_factor);
        targets_of(p, &order, &self.cfg.node_id, k).iter().any(|t| t == id)
            || targets_of(p, &order, id, k).contains(&self.cfg.node_id)
    }

    /// Where this node's shards are copied now.
    fn my_targets(&self) -> Vec<String> {
        let order = lock(&self.members).order();
        targets_of(self.cfg.placement, &order, &self.cfg.node_id, self.cfg.replication_factor)
    }

    /// Queues a freshly sealed local shard for replication.
    pub fn enqueue(&self, key: ShardKey) {
        lock(&self.stats).queued += 1;
        self.owe(&key);
        let _ = self.queue.send(key);
    }

    /// What this node answers a heartbeat with: its holdings and what it
    /// knows of every member.
    pub fn holdings(&self) -> Holdings {
        let mut h = holdings_of(&self.tier, &self.cfg.node_id);
        let members = lock(&self.members);
        h.members = members
            .list
            .iter()
            .map(|m| match m.id == self.cfg.node_id {
                true => MemberSeen { last_seen_unix_ms: Some(tierckpt_tiers::now_unix_ms()), ..self.me.clone() },
                false => m.seen(),
            })
            .collect();
        h
    }

    /// A peer's request named its sender (it probes us, or pushes): a node
    /// not yet a member joins.
    pub fn heard_from(&self, seen: &MemberSeen) {
        if seen.id == self.cfg.node_id {
            return;
        }
        if lock(&self.members).heard_of(seen, true) {
            tracing::info!(node = %seen.id, addr = %seen.addr, "a node joined");
            self.metrics.node_event(&seen.id, NodeState::Unknown);
        }
    }

    /// A peer says it leaves: it is dropped from the member set.
    pub fn left(&self, seen: &MemberSeen) {
        if lock(&self.members).leave(&seen.id, seen.incarnation) {
            tracing::info!(node = %seen.id, "a node left the cluster");
            self.metrics.node_event(&seen.id, NodeState::Left);
        }
    }

    async fn discover_loop(self: Arc<Self>, source: crate::membership::Discover, stop: watch::Receiver<bool>) {
        every(self.cfg.discover_interval, stop, || self.discover_once(&source)).await
    }

    /// Reads the discovery source once and takes in the members it lists
    /// (keeping those known when it fails, and saying why in `status`).
    pub async fn discover_once(&self, source: &crate::membership::Discover) {
        let found = crate::membership::discover(source).await;
        let mut members = lock(&self.members);
        match found {
            Ok(nodes) => {
                members.discovery_error = None;
                for id in members.set_configured(&nodes) {
                    tracing::info!(node = %id, "discovered a member");
                }
                // This node is a member whatever the source says yet.
                if let Some(m) = members.get_mut(&self.cfg.node_id) {
                    m.configured = true;
                }
            }
            Err(e) => {
                if members.discovery_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "discovery failed; keeping the members known");
                }
                members.discovery_error = Some(e);
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, stop: watch::Receiver<bool>) {
        every(self.cfg.heartbeat_interval, stop, || async {
            self.refresh().await;
            if !self.rereplicating.swap(true, Ordering::AcqRel) {
                let c = self.clone();
                tokio::spawn(async move {
                    c.rereplicate().await;
                    c.rereplicating.store(false, Ordering::Release);
                });
            }
        })
        .await
    }

    /// One heartbeat round: probes this node's neighbours and a few others.
    pub async fn refresh(&self) {
        let chosen = {
            let members = lock(&self.members);
            let n = members.list.len();
            let me = members.index(&self.cfg.node_id).unwrap_or(0);
            let cursor = self.probe_cursor.fetch_add(PROBE_FANOUT, Ordering::Relaxed);
            let set = probe_set(self.cfg.placement, n, me, self.cfg.replication_factor, PROBE_FANOUT, cursor);
            set.into_iter().map(|i| members.list[i].id.clone()).collect::<Vec<_>>()
        };
        self.probe(chosen).await;
    }

    /// Probes every member (before answering `latest` or finding a holder).
    pub async fn refresh_all(&self) {
        let all = self.peers_now().into_iter().map(|(id, _, _)| id).collect();
        self.probe(all).await;
    }

    /// Asks `ids` for their holdings, updates every member's state (those
    /// not asked from gossip), and applies cluster-wide completeness to
    /// local retention.
    async fn probe(&self, ids: Vec<String>) {
        // Generous, so a busy peer is not taken for a missing one.
        let timeout = self.cfg.heartbeat_interval.max(self.cfg.heartbeat_timeout / 2);
        let asks = ids.into_iter().filter_map(|id| {
            let addr = self.addr_of(&id).ok()?;
            let peers = self.peers.clone();
            Some(async move { (id, peers.holdings(&addr, timeout).await) })
        });
        let answers = futures_util::future::join_all(asks).await;
        let (now, now_ms) = (Instant::now(), tierckpt_tiers::now_unix_ms());
        let timeout_ms = self.cfg.heartbeat_timeout.as_millis() as u64;
        let mut events = Vec::new();
        {
            let mut members = lock(&self.members);
            let mut probed = BTreeSet::new();
            for (mut id, answer) in answers {
                if let Ok(h) = &answer {
                    let real = h.members.iter().find(|m| m.id == h.node_id && h.node_id != id);
                    if let Some(real) = real.filter(|r| members.rename_discovered(&id, r)) {
                        tracing::info!(discovered = %id, node = %real.id, "a discovered address is a node under its own id");
                        id = real.id.clone();
                    }
                }
                probed.insert(id.clone());
                let gossip = match &answer {
                    Ok(h) if h.node_id == id => h.members.clone(),
                    _ => Vec::new(),
                };
                let Some(m) = members.get_mut(&id) else { continue };
                let before = m.state;
                match answer {
                    Ok(h) if h.node_id == id => {
                        if matches!(m.state, NodeState::Suspect | NodeState::Dead) {
                            m.settled_at = Some(now + self.cfg.heartbeat_interval);
                        }
                        m.last_ok = Some(now);
                        m.last_seen_unix_ms = Some(now_ms);
                        m.reachable = true;
                        m.holdings = Some(h);
                        m.state = NodeState::Alive;
                        m.last_error = None;
                    }
                    answer => {
                        m.reachable = false;
                        let error = match answer {
                            Ok(h) => format!("it answers as node {:?}", h.node_id),
                            Err(e) => e.to_string(),
                        };
                        if m.last_error.as_ref() != Some(&error) {
                            tracing::warn!(node = %id, addr = %m.addr, error = %error, "a peer does not answer heartbeats");
                        }
                        m.last_error = Some(error);
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
                    events.push((id.clone(), before, m.state));
                }
                if !gossip.is_empty() {
                    members.compare(&id, &gossip);
                    for g in gossip.iter().filter(|g| g.id != self.cfg.node_id) {
                        let fresh = g.last_seen_unix_ms.is_some_and(|t| now_ms.saturating_sub(t) < timeout_ms);
                        if members.get(&g.id).is_none() && fresh && members.heard_of(g, false) {
                            tracing::info!(node = %g.id, via = %id, "learned of a member through gossip");
                        }
                        if let Some(m) = members.get_mut(&g.id) {
                            if g.incarnation >= m.incarnation {
                                m.last_seen_unix_ms = m.last_seen_unix_ms.max(g.last_seen_unix_ms);
                            }
                        }
                    }
                }
            }
            // Members not asked this round: their health as gossip tells it.
            for m in members.list.iter_mut().filter(|m| m.id != self.cfg.node_id && !probed.contains(&m.id)) {
                let before = m.state;
                let Some(seen) = m.last_seen_unix_ms else { continue };
                let silent = now_ms.saturating_sub(seen);
                m.state = if silent >= timeout_ms {
                    m.holdings = None;
                    NodeState::Dead
                } else if silent >= timeout_ms / 2 {
                    NodeState::Suspect
                } else {
                    NodeState::Alive
                };
                m.reachable = m.state == NodeState::Alive && m.holdings.is_some();
                if m.state != before {
                    events.push((m.id.clone(), before, m.state));
                }
            }
            for id in members.forget_dead() {
                tracing::info!(node = %id, "a member no source lists any more is dead: forgotten");
            }
        }
        for (id, before, state) in events {
            let _ = self.changes.send((id.clone(), before, state));
            match state {
                NodeState::Dead => tracing::warn!(node = %id, "node is dead"),
                NodeState::Suspect => tracing::warn!(node = %id, "node is suspect"),
                _ => tracing::info!(node = %id, state = ?state, "node state changed"),
            }
            self.metrics.node_event(&id, state);
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
        let order = {
            let members = lock(&self.members);
            all.extend(
                members
                    .list
                    .iter()
                    .filter(|m| m.reachable && m.id != self.cfg.node_id)
                    .filter_map(|m| m.holdings.clone()),
            );
            members.order()
        };
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
                            h.sort_by_key(|id| order.iter().position(|n| n == id));
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
        self.refresh_all().await;
        self.view().get(ns)?.iter().rev().find(|s| s.complete && !skip.contains(&s.step)).map(|s| s.step)
    }

    fn stats_update(&self, f: impl FnOnce(&mut ReplicationStats)) {
        f(&mut lock(&self.stats));
    }

    /// Waits until node `t` answered the last heartbeat (and, back from
    /// suspect or dead, has settled); `Unavailable` once it is dead or gone
    /// (re-replication sends it what it lacks when it is back).
    async fn until_answering(&self, t: &str) -> Result<(), TierError> {
        loop {
            let (gone, reachable) = {
                let members = lock(&self.members);
                match members.get(t) {
                    None => (true, false),
                    Some(m) => (
                        matches!(m.state, NodeState::Dead | NodeState::Left),
                        m.reachable && m.settled_at.is_none_or(|at| Instant::now() >= at),
                    ),
                }
            };
            if gone {
                return Err(TierError::Unavailable(format!(
                    "node {t} is dead or gone: no replica is pushed to it until it answers heartbeats again"
                )));
            }
            if reachable {
                return Ok(());
            }
            tokio::time::sleep(self.cfg.heartbeat_interval).await;
        }
    }

    /// Returns once node `t` is declared dead or leaves (never while it is alive).
    async fn until_dead(&self, t: &str) {
        while !self.is_gone(t) {
            tokio::time::sleep(self.cfg.heartbeat_interval).await;
        }
    }

    /// Whether node `t` holds `key`, as its holdings say now.
    async fn peer_holds(&self, t: &str, key: &ShardKey) -> Result<bool, TierError> {
        let timeout = self.cfg.heartbeat_interval.max(self.cfg.heartbeat_timeout / 2);
        let h = self.peers.holdings(&self.addr_of(t)?, timeout).await?;
        Ok(h.namespaces
            .get(&key.namespace)
            .is_some_and(|steps| steps.iter().any(|s| s.step == key.step && s.ranks.contains(&key.rank))))
    }

    /// The live peers holding `key`, in node order, as of a fresh probe;
    /// `NotFound` naming the dead nodes when there is none.
    pub(crate) async fn holders(&self, key: &ShardKey) -> Result<Vec<String>, TierError> {
        self.refresh_all().await;
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
            let dead: Vec<String> =
                lock(&self.members).list.iter().filter(|m| m.state == NodeState::Dead).map(|m| m.id.clone()).collect();
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
        let (m, stream) = self.peers.fetch(&self.addr_of(id)?, key).await?;
        if m.key != *key {
            return Err(TierError::InvalidArgument(format!("node {id} sent {} for {key}", m.key)));
        }
        Ok((m, stream))
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

    /// Deletes a step or namespace on every peer not known dead; returns
    /// what each deleted (failures are logged and count as nothing).
    pub async fn delete_on_peers(&self, ns: &str, step: Option<u64>) -> Vec<(String, Result<(u64, u64), TierError>)> {
        let calls = self.peers_now().into_iter().map(|(id, addr, state)| async move {
            let r = match state {
                NodeState::Dead => Err(TierError::Unavailable(format!("node {id} is dead and was not asked"))),
                _ => self.peers.delete(&addr, ns, step).await,
            };
            if let Err(e) = &r {
                tracing::warn!(node = %id, namespace = ns, ?step, error = %e, "delete on a peer failed");
            }
            (id, r)
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
        let calls = self.peers_now().into_iter().filter(|(_, _, s)| *s != NodeState::Dead).map(|(id, addr, _)| {
            let method = method.clone();
            async move { (id, self.peers.json(&addr, method, path).await) }
        });
        futures_util::future::join_all(calls).await
    }

    /// Leaves the cluster gracefully: first hands over this node's copies
    /// of each namespace's newest complete step that would fall below k+1
    /// live copies without it (to the nodes placement prefers once it is
    /// gone), within `leave_timeout`; then tells every member it leaves.
    /// Returns how many shards were handed over.
    pub async fn leave(&self) -> usize {
        let handed = tokio::time::timeout(self.cfg.leave_timeout, self.hand_over()).await.unwrap_or_else(|_| {
            tracing::warn!(timeout = ?self.cfg.leave_timeout, "leaving before every copy was handed over");
            0
        });
        let calls =
            self.peers_now().into_iter().filter(|(_, _, s)| *s != NodeState::Dead).map(|(id, addr, _)| async move {
                if let Err(e) = self.peers.leave(&addr, &self.me).await {
                    tracing::warn!(node = %id, error = %e, "could not tell a peer this node leaves");
                }
            });
        futures_util::future::join_all(calls).await;
        tracing::info!(handed_over = handed, "left the cluster");
        handed
    }

    async fn hand_over(&self) -> usize {
        self.refresh_all().await;
        let me = self.node_id().to_string();
        let (order, live) = self.live_order();
        let others: Vec<String> = order.iter().filter(|id| **id != me).cloned().collect();
        let live_others: Vec<String> = live.into_iter().filter(|id| *id != me).collect();
        let desired = (self.cfg.replication_factor + 1).min(live_others.len());
        let mut handed = 0;
        for (ns, steps) in self.view() {
            let Some(s) = steps.iter().rev().find(|s| s.complete) else { continue };
            for (rank, holders) in &s.holders {
                if !holders.contains(&me) {
                    continue;
                }
                let remaining: Vec<&String> = holders.iter().filter(|h| **h != me).collect();
                if remaining.len() >= desired {
                    continue;
                }
                let key = ShardKey::new(&ns, s.step, *rank);
                // Where placement puts the first remaining holder's copies once this node is gone.
                let owner =
                    remaining.first().map_or_else(|| others.first().cloned().unwrap_or_default(), |h| (*h).clone());
                let mut candidates = vec![owner.clone()];
                candidates.extend(targets_of(self.cfg.placement, &others, &owner, self.cfg.replication_factor));
                candidates.extend(others.iter().cloned());
                let mut wanted = desired - remaining.len();
                let mut tried = BTreeSet::new();
                for t in candidates {
                    if wanted == 0 {
                        break;
                    }
                    if !tried.insert(t.clone()) || remaining.contains(&&t) || !live_others.contains(&t) {
                        continue;
                    }
                    match self.push(&key, &t, true).await {
                        Ok(sent) => {
                            wanted -= 1;
                            handed += usize::from(sent);
                            tracing::info!(shard = %key, to = %t, "handed a copy over before leaving");
                        }
                        Err(e) => tracing::warn!(shard = %key, to = %t, error = %e, "handing a copy over failed"),
                    }
                }
            }
        }
        handed
    }

    /// Every member's status and the replicator's counters, without the
    /// cluster view (what the metrics read at each scrape).
    pub fn members_and_stats(&self) -> (Vec<NodeStatus>, ReplicationStats) {
        (self.status_nodes().0, *lock(&self.stats))
    }

    /// Every member's status, and the disagreements and discovery failure.
    fn status_nodes(&self) -> (Vec<NodeStatus>, Vec<String>) {
        let now = Instant::now();
        let members = lock(&self.members);
        let nodes = members
            .list
            .iter()
            .map(|m| NodeStatus {
                id: m.id.clone(),
                addr: m.addr.clone(),
                state: m.state,
                last_seen_ms_ago: match m.id == self.cfg.node_id {
                    true => Some(0),
                    false => m.last_ok.map(|t| (now - t).as_millis() as u64),
                },
                this_node: m.id == self.cfg.node_id,
                last_error: m.last_error.clone(),
            })
            .collect();
        let mut d: Vec<String> = members.disagreements.values().cloned().collect();
        d.extend(members.discovery_error.clone());
        (nodes, d)
    }

    /// Members, their states, the cluster view and the replicator's counters.
    pub fn status(&self) -> ClusterStatus {
        let (nodes, disagreements) = self.status_nodes();
        ClusterStatus {
            node_id: self.cfg.node_id.clone(),
            replication_factor: self.cfg.replication_factor,
            placement: format!("{:?}", self.cfg.placement).to_lowercase(),
            nodes,
            namespaces: self.view(),
            replication: *lock(&self.stats),
            membership: self.cfg.membership_source(),
            disagreements,
        }
    }
}
