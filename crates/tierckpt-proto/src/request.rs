//! Requests a client sends to its node daemon and the replies it gets.

use serde::{Deserialize, Serialize};
use tierckpt_format::Manifest;

use crate::{DaemonStatus, FailureRecord, NamespaceSummary, StepSummary, WireError};

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
    Seal {
        id: u64,
        wait: bool,
    },
    /// Give a reservation back unwritten.
    Abort {
        id: u64,
    },
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
    Open {
        namespace: String,
        step: u64,
        rank: u32,
    },
    Release {
        namespace: String,
        step: u64,
        rank: u32,
    },
    /// The client found this node's copy corrupt: the daemon checks it and,
    /// if it is, drops it, so the next `Open` fetches another copy.
    ReportCorrupt {
        namespace: String,
        step: u64,
        rank: u32,
    },
    /// Newest complete step.
    Latest {
        namespace: String,
    },
    ListNamespaces,
    ListSteps {
        namespace: String,
    },
    DeleteStep {
        namespace: String,
        step: u64,
    },
    DeleteNamespace {
        namespace: String,
    },
    /// Drop incomplete steps newer than `step` (left by a run that crashed
    /// before every rank saved); a resumed job calls this before saving again.
    DiscardIncompleteAfter {
        namespace: String,
        step: u64,
    },
    Status,
    /// Appends an event of a job's life (a start or a failure), as the
    /// supervisor `tierckpt run` sees it, to the namespace's record.
    RecordFailure {
        namespace: String,
        record: FailureRecord,
    },
    /// The namespace's recorded events, oldest first.
    Failures {
        namespace: String,
    },
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

pub type WireResult = Result<Reply, WireError>;
