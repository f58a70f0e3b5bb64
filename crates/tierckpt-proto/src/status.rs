//! What a daemon reports about itself: memory, namespaces, steps, the
//! cluster view and replication counters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{AdviceStatus, FailureRecord};

/// One namespace at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceSummary {
    /// The namespace.
    pub namespace: String,
    /// Steps held, complete or not.
    pub steps: u64,
    /// Steps of which every rank is visible.
    pub complete_steps: u64,
    /// The newest complete step, if any.
    pub latest_complete: Option<u64>,
    /// Bytes of its shards, sealed or being sealed.
    pub bytes: u64,
    /// Its steps pinned on this node (filled in by the daemon).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pinned: Vec<u64>,
}

/// What `tierckpt status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// The memory tier's directory.
    pub root: String,
    /// The Unix socket clients connect to.
    pub socket: String,
    /// The address its HTTP server listens on, if it has one.
    pub http_addr: Option<String>,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// The memory tier's byte accounting.
    pub memory: MemoryUsage,
    /// Every namespace in the memory tier.
    pub namespaces: Vec<NamespaceSummary>,
    /// Present when the daemon is a member of a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
    /// Present when the daemon drains to a persistent tier (see
    /// `tierckpt_daemon::drain::PersistStatus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<serde_json::Value>,
    /// The newest recorded events of each namespace (see `FailureRecord`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, Vec<FailureRecord>>,
    /// The memory tier's tmpfs gives huge pages (see `mount_huge_tmpfs`).
    #[serde(default)]
    pub huge_pages: bool,
    /// Steps found corrupt on every tier, by namespace: `latest` skips them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unrestorable: BTreeMap<String, Vec<u64>>,
    /// The checkpoint advice: alerts, a standing preemption notice, the
    /// state of the notice and the health check (see `advice`).
    #[serde(default)]
    pub advice: AdviceStatus,
}

/// What one node holds in memory: visible shards per namespace and step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holdings {
    /// The node.
    pub node_id: String,
    /// Its steps, by namespace.
    pub namespaces: BTreeMap<String, Vec<HeldStep>>,
    /// The members it knows and when it last heard from each (gossip: a
    /// node probes only its neighbours and learns of the others from them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberSeen>,
}

/// One member as a node knows it, in the heartbeat's gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSeen {
    /// Its id.
    pub id: String,
    /// The address its peers reach it at (host:port).
    pub addr: String,
    /// When that node started (Unix ms): a restarted node is a new
    /// incarnation, which a leave of the old one does not cover.
    pub incarnation: u64,
    /// When the reporting node last heard from it directly or through
    /// gossip (Unix ms); none if never.
    pub last_seen_unix_ms: Option<u64>,
}

/// One step a node holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldStep {
    /// The step.
    pub step: u64,
    /// Ranks in the job at this step.
    pub world_size: u32,
    /// Ranks whose shard is visible on the node.
    pub ranks: Vec<u32>,
    /// The newest `created_unix_ms` of those shards' manifests.
    pub created_unix_ms: u64,
}

/// Health of a node as its peers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Not heard from yet.
    Unknown,
    /// Heard from within half the heartbeat timeout.
    Alive,
    /// Silent for more than half the heartbeat timeout.
    Suspect,
    /// Silent for more than the heartbeat timeout.
    Dead,
    /// Left the cluster gracefully (its copies were handed over first).
    Left,
}

/// One member of the cluster, as this node sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's id.
    pub id: String,
    /// The address its peers reach it at.
    pub addr: String,
    /// Its health.
    pub state: NodeState,
    /// Milliseconds since the last answer (none if never heard from).
    pub last_seen_ms_ago: Option<u64>,
    /// Whether it is the node reporting.
    pub this_node: bool,
    /// Why the last probe of it failed (unresolvable name, refused
    /// connection, wrong token or certificate), while it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One step across the cluster: which live nodes hold each rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStep {
    /// The step.
    pub step: u64,
    /// Ranks in the job at this step.
    pub world_size: u32,
    /// Every rank is held by at least one live node.
    pub complete: bool,
    /// The ids of the live nodes holding each rank, in the cluster's node order.
    pub holders: BTreeMap<u32, Vec<String>>,
}

/// Counters of the replicator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationStats {
    /// Shard copies sent to peers.
    pub shards_sent: u64,
    /// Shard bytes replicated, before compression and delta.
    pub bytes_sent: u64,
    /// What went over the wire for them.
    #[serde(default)]
    pub wire_bytes_sent: u64,
    /// Shards sent as deltas against a step the peer held.
    #[serde(default)]
    pub delta_shards_sent: u64,
    /// Shards sent encoded (compressed, and a delta where counted above),
    /// where the measured link made that faster.
    #[serde(default)]
    pub encoded_shards_sent: u64,
    /// Deltas a peer refused (it no longer held the base); sent whole instead.
    #[serde(default)]
    pub deltas_refused: u64,
    /// Copies to a peer that failed for good (after retries).
    pub failures: u64,
    /// Replica requests started (every try of every copy, re-replication
    /// included): more than `shards_sent` means retries.
    #[serde(default)]
    pub pushes_attempted: u64,
    /// Bytes those requests carried (each whole body, finished or not).
    #[serde(default)]
    pub wire_bytes_attempted: u64,
    /// Sealed shards waiting to be replicated.
    pub queued: u64,
    /// Shards restored from a peer's copy.
    pub shards_fetched: u64,
    /// Their bytes.
    pub bytes_fetched: u64,
    /// Copies made to bring a shard back to its number of live copies (after
    /// a node died).
    pub rereplicated: u64,
}

/// A clustered daemon's view of its cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node's id.
    pub node_id: String,
    /// Copies of each shard on other nodes.
    pub replication_factor: usize,
    /// Where the copies go (`ring` or `group`).
    pub placement: String,
    /// Every member, this node included.
    pub nodes: Vec<NodeStatus>,
    /// The steps that live nodes hold, by namespace.
    pub namespaces: BTreeMap<String, Vec<ClusterStep>>,
    /// The replicator's counters.
    pub replication: ReplicationStats,
    /// Where the member list comes from: "static", "dns:...", "srv:...",
    /// "slurm", "file:...".
    #[serde(default)]
    pub membership: String,
    /// Peers whose member list differs from this node's, and how.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disagreements: Vec<String>,
}

/// Byte accounting of the memory tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUsage {
    /// Bytes the tier may hold, pooled segments included.
    pub capacity: u64,
    /// Everything below counts against capacity.
    pub used: u64,
    /// Bytes of sealed shards.
    pub sealed: u64,
    /// Bytes of shards reserved or being sealed.
    pub in_progress: u64,
    /// Recycled segments kept for reuse (their pages stay allocated, so the
    /// next save of the same size does not pay for page faults).
    pub pooled: u64,
    /// Sealed shards.
    pub shards: u64,
    /// Open reservations.
    pub reservations: u64,
    /// Complete steps kept per namespace.
    pub keep_last: usize,
    /// Free segments in the pool (recycled and pre-faulted).
    #[serde(default)]
    pub pooled_segments: u64,
    /// Bytes of pooled segments recycled from dropped shards (part of `pooled`).
    #[serde(default)]
    pub recycled: u64,
    /// Bytes of pooled segments the filler faulted in ahead of need (part of
    /// `pooled`).
    #[serde(default)]
    pub prefaulted: u64,
    /// How many pooled segments the filler made.
    #[serde(default)]
    pub prefaulted_segments: u64,
    /// Pooled bytes the filler aims to keep (`prefault_share` of the
    /// capacity; 0: no filler).
    #[serde(default)]
    pub prefault_target: u64,
    /// The filler has work left (a segment to fault in, or one under way).
    #[serde(default)]
    pub prefault_pending: bool,
    /// Bytes held for a moment and counted in `used`: a segment being
    /// faulted in, tails of pooled segments being cut off. `used` is
    /// `sealed + in_progress + pooled + transient`.
    #[serde(default)]
    pub transient: u64,
    /// Reservations served from a pooled segment since the daemon started.
    #[serde(default)]
    pub reserved_from_pool: u64,
    /// Reservations that had to create a fresh file (its pages faulted in
    /// by the writer) since the daemon started.
    #[serde(default)]
    pub reserved_fresh: u64,
}

/// One step of one namespace as a tier sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSummary {
    /// The step.
    pub step: u64,
    /// Ranks in the job at this step.
    pub world_size: u32,
    /// Ranks whose shard is visible (sealed and checksummed).
    pub ranks: Vec<u32>,
    /// Ranks reserved or sealing but not yet visible.
    pub in_progress: Vec<u32>,
    /// Every rank of `world_size` is visible.
    pub complete: bool,
    /// Bytes of its shards, sealed or being sealed (0 where the tier does
    /// not count them).
    pub bytes: u64,
    /// The newest `created_unix_ms` of its visible shards' manifests (0
    /// where unknown).
    pub created_unix_ms: u64,
}
