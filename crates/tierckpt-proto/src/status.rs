//! What a daemon reports about itself: memory, namespaces, steps, the
//! cluster view and replication counters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::FailureRecord;

/// One namespace at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceSummary {
    pub namespace: String,
    pub steps: u64,
    pub complete_steps: u64,
    pub latest_complete: Option<u64>,
    pub bytes: u64,
}

/// What `tierckpt status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub version: String,
    pub pid: u32,
    pub root: String,
    pub socket: String,
    pub http_addr: Option<String>,
    pub uptime_s: f64,
    pub memory: MemoryUsage,
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
}

/// What one node holds in memory: visible shards per namespace and step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holdings {
    pub node_id: String,
    pub namespaces: BTreeMap<String, Vec<HeldStep>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldStep {
    pub step: u64,
    pub world_size: u32,
    pub ranks: Vec<u32>,
    pub created_unix_ms: u64,
}

/// Health of a node as its peers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Not heard from yet.
    Unknown,
    Alive,
    /// Silent for more than half the heartbeat timeout.
    Suspect,
    /// Silent for more than the heartbeat timeout.
    Dead,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: String,
    pub addr: String,
    pub state: NodeState,
    /// Milliseconds since the last answer (none if never heard from).
    pub last_seen_ms_ago: Option<u64>,
    pub this_node: bool,
}

/// One step across the cluster: which live nodes hold each rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStep {
    pub step: u64,
    pub world_size: u32,
    /// Every rank is held by at least one live node.
    pub complete: bool,
    pub holders: BTreeMap<u32, Vec<String>>,
}

/// Counters of the replicator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationStats {
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
    pub failures: u64,
    pub queued: u64,
    pub shards_fetched: u64,
    pub bytes_fetched: u64,
    pub rereplicated: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: String,
    pub replication_factor: usize,
    pub placement: String,
    pub nodes: Vec<NodeStatus>,
    pub namespaces: BTreeMap<String, Vec<ClusterStep>>,
    pub replication: ReplicationStats,
}

/// Byte accounting of the memory tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUsage {
    pub capacity: u64,
    /// Everything below counts against capacity.
    pub used: u64,
    pub sealed: u64,
    pub in_progress: u64,
    /// Recycled segments kept for reuse (their pages stay allocated, so the
    /// next save of the same size does not pay for page faults).
    pub pooled: u64,
    pub shards: u64,
    pub reservations: u64,
    pub keep_last: usize,
}

/// One step of one namespace as a tier sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSummary {
    pub step: u64,
    pub world_size: u32,
    /// Ranks whose shard is visible (sealed and checksummed).
    pub ranks: Vec<u32>,
    /// Ranks reserved or sealing but not yet visible.
    pub in_progress: Vec<u32>,
    /// Every rank of `world_size` is visible.
    pub complete: bool,
    pub bytes: u64,
    pub created_unix_ms: u64,
}
