//! The local control protocol between a client and its node daemon: one JSON
//! request and one JSON reply per frame, each frame a big-endian u32 length
//! followed by that many bytes, over a Unix socket.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use tierckpt_format::Manifest;

use crate::{StepSummary, WireError};

/// Largest frame accepted; requests and replies are small (bytes travel by mapping).
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Ask for a segment of exactly `len` bytes for one shard.
    Reserve {
        namespace: String,
        step: u64,
        rank: u32,
        world_size: u32,
        len: u64,
    },
    /// The segment is written: checksum, index and publish it. With `wait`, the
    /// reply comes once the shard is visible (or failed); otherwise at once.
    Seal { id: u64, wait: bool },
    /// Give a reservation back unwritten.
    Abort { id: u64 },
    /// Wait until a sealed shard is visible or its seal failed.
    WaitVisible {
        namespace: String,
        step: u64,
        rank: u32,
        timeout_ms: u64,
    },
    /// Where a visible shard's bytes are, and its manifest. The shard is
    /// leased to this connection: never recycled while leased, so what the
    /// client maps stays what it verifies. Leases end with `Release` or when
    /// the connection closes.
    Open { namespace: String, step: u64, rank: u32 },
    Release { namespace: String, step: u64, rank: u32 },
    /// The client found this node's copy corrupt: the daemon checks it and,
    /// if it is, drops it, so the next `Open` fetches another copy.
    ReportCorrupt { namespace: String, step: u64, rank: u32 },
    /// Newest complete step.
    Latest { namespace: String },
    ListNamespaces,
    ListSteps { namespace: String },
    DeleteStep { namespace: String, step: u64 },
    DeleteNamespace { namespace: String },
    /// Drop incomplete steps newer than `step` (left by a run that crashed
    /// before every rank saved); a resumed job calls this before saving again.
    DiscardIncompleteAfter { namespace: String, step: u64 },
    Status,
    /// Appends an event of a job's life (a start or a failure), as the
    /// supervisor `tierckpt run` sees it, to the namespace's record.
    RecordFailure { namespace: String, record: FailureRecord },
    /// The namespace's recorded events, oldest first.
    Failures { namespace: String },
}

/// What happened to a job, as the supervisor saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The supervisor started the job (not a failure: the start of the
    /// observed time that failure rates are measured over).
    Start,
    /// The command exited with a non-zero code.
    Exit,
    /// The command was killed by a signal.
    Signal,
    /// No progress heartbeat within the hang timeout.
    Hang,
    /// The node daemon was gone, and with it the node's memory tier.
    DaemonLost,
}

impl FailureKind {
    pub fn is_failure(self) -> bool {
        self != FailureKind::Start
    }
}

/// One recorded event of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureRecord {
    pub unix_ms: u64,
    pub kind: FailureKind,
    /// Exit code, signal name, or what was waited for.
    #[serde(default)]
    pub detail: String,
    /// Newest complete step of the namespace when it happened.
    #[serde(default)]
    pub step: Option<u64>,
    /// How many restarts preceded it.
    #[serde(default)]
    pub restart: u32,
}

/// Externally tagged, so that maps with integer keys inside deserialize.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Reserved { id: u64, path: String, len: u64 },
    Done,
    Opened { path: String, manifest: Manifest },
    Latest { step: Option<u64> },
    Namespaces { namespaces: Vec<NamespaceSummary> },
    Steps { steps: Vec<StepSummary> },
    Deleted { shards: u64, bytes: u64 },
    Status(Box<DaemonStatus>),
    Failures { records: Vec<FailureRecord> },
}

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

pub type WireResult = Result<Reply, WireError>;

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, value: &impl Serialize) -> std::io::Result<()> {
    let body = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    w.write_all(&(body.len() as u32).to_be_bytes())?;
    w.write_all(&body)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` on a clean end of stream.
pub fn read_frame<R: Read>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    check_frame_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

pub fn check_frame_len(len: usize) -> std::io::Result<()> {
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
        ));
    }
    Ok(())
}
