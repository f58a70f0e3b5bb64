//! Requests a client sends to its node daemon and the replies it gets.

use serde::{Deserialize, Serialize};
use tierckpt_format::Manifest;

use crate::{Advice, DaemonStatus, FailureRecord, NamespaceSummary, PinInfo, StepSummary, WireError};

/// A request from a client to its node daemon, one per frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Ask for a segment of exactly `len` bytes for one shard.
    Reserve {
        /// The shard's namespace.
        namespace: String,
        /// The shard's step.
        step: u64,
        /// The shard's rank.
        rank: u32,
        /// Ranks in the job at this step.
        world_size: u32,
        /// The shard's length in bytes.
        len: u64,
        /// A segment `Prepare` set aside for this client, to use if it is
        /// still free and large enough (its pages are mapped there already).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        segment: Option<String>,
    },
    /// Set aside a free segment of at least `len` bytes for a coming
    /// `Reserve`, so the client can map and fault it in beforehand. A hint:
    /// the segment stays in the pool, and is given to others only when no
    /// other segment fits.
    Prepare {
        /// The coming shard's length in bytes.
        len: u64,
    },
    /// The segment is written: checksum, index and publish it. With `wait`, the
    /// reply comes once the shard is visible (or failed); otherwise at once.
    Seal {
        /// The reservation, as `Reserved` named it.
        id: u64,
        /// Reply once the shard is visible (or its seal failed).
        wait: bool,
    },
    /// Give a reservation back unwritten.
    Abort {
        /// The reservation, as `Reserved` named it.
        id: u64,
    },
    /// Wait until a sealed shard is visible or its seal failed.
    WaitVisible {
        /// The shard's namespace.
        namespace: String,
        /// The shard's step.
        step: u64,
        /// The shard's rank.
        rank: u32,
        /// How long to wait, in milliseconds.
        timeout_ms: u64,
    },
    /// Where a visible shard's bytes are, and its manifest. The shard is
    /// leased to this connection: never recycled while leased, so what the
    /// client maps stays what it verifies. Leases end with `Release` or when
    /// the connection closes.
    Open {
        /// The shard's namespace.
        namespace: String,
        /// The shard's step.
        step: u64,
        /// The shard's rank.
        rank: u32,
    },
    /// End this connection's lease of a shard it opened.
    Release {
        /// The shard's namespace.
        namespace: String,
        /// The shard's step.
        step: u64,
        /// The shard's rank.
        rank: u32,
    },
    /// The client found this node's copy corrupt: the daemon checks it and,
    /// if it is, drops it, so the next `Open` fetches another copy.
    ReportCorrupt {
        /// The shard's namespace.
        namespace: String,
        /// The shard's step.
        step: u64,
        /// The shard's rank.
        rank: u32,
    },
    /// Newest complete step.
    Latest {
        /// The namespace.
        namespace: String,
    },
    /// Every namespace at a glance. (Variants without fields are written
    /// `{}` so that serde refuses unknown fields on them too.)
    ListNamespaces {},
    /// The steps of a namespace.
    ListSteps {
        /// The namespace.
        namespace: String,
    },
    /// Delete a step, here and on every reachable peer.
    DeleteStep {
        /// The namespace.
        namespace: String,
        /// The step.
        step: u64,
    },
    /// Delete a namespace, here and on every reachable peer.
    DeleteNamespace {
        /// The namespace.
        namespace: String,
    },
    /// Drop incomplete steps newer than `step` (left by a run that crashed
    /// before every rank saved); a resumed job calls this before saving again.
    DiscardIncompleteAfter {
        /// The namespace.
        namespace: String,
        /// Incomplete steps after this one go.
        step: u64,
    },
    /// The daemon's status.
    Status {},
    /// Appends an event of a job's life (a start or a failure), as the
    /// supervisor `tierckpt run` sees it, to the namespace's record.
    RecordFailure {
        /// The job's namespace.
        namespace: String,
        /// The event.
        record: FailureRecord,
    },
    /// The namespace's recorded events, oldest first.
    Failures {
        /// The namespace.
        namespace: String,
    },
    /// Whether to checkpoint at the next step boundary, and why (cheap: the
    /// daemon checks its sources in the background).
    Advice {
        /// The namespace (for its drain estimate).
        namespace: String,
    },
    /// Pins a step held here or in the persistent tier, optionally naming
    /// it: retention keeps it on this node, on the peers (forwarded) and in
    /// the store. A name already on another step moves to this one.
    Pin {
        /// The namespace.
        namespace: String,
        /// The step.
        step: u64,
        /// A name for it (`best`), see [`crate::validate_pin_name`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Pin this node's memory copy only: nothing is forwarded to the
        /// members or written to the store (each rank of a job pins its
        /// own node; one of them pins the step everywhere).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        node_only: bool,
    },
    /// Unpins a step, given by number or by one of its names (exactly one).
    Unpin {
        /// The namespace.
        namespace: String,
        /// The step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<u64>,
        /// A name of the step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// The pinned steps of a namespace, with their names and tiers.
    Pins {
        /// The namespace.
        namespace: String,
    },
    /// The job's ranks agreed that every rank's shard of `step` is visible:
    /// this node's retention counts the step complete at once, before its
    /// cluster view shows it (which takes up to n/(2(k+1)) heartbeat rounds).
    DeclareComplete {
        /// The namespace.
        namespace: String,
        /// The step.
        step: u64,
    },
}

/// The daemon's answer to a [`Request`] that succeeded. Externally tagged,
/// so that maps with integer keys inside deserialize.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// To `Reserve`: the segment to write the shard into.
    Reserved {
        /// The reservation, for `Seal` or `Abort`.
        id: u64,
        /// The segment's file, to map and write.
        path: String,
        /// Its length in bytes.
        len: u64,
    },
    /// To `Prepare`: the segment set aside.
    Prepared {
        /// The segment's file, to map and fault in; name it in `Reserve`.
        path: String,
        /// Its length in bytes (at least the length asked for).
        len: u64,
    },
    /// Done, nothing to tell.
    Done,
    /// To `Open`: the leased shard.
    Opened {
        /// The shard's file, to map and read.
        path: String,
        /// Its manifest, to verify the bytes against.
        manifest: Manifest,
    },
    /// To `Latest`.
    Latest {
        /// The newest complete step, if any.
        step: Option<u64>,
    },
    /// To `ListNamespaces`.
    Namespaces {
        /// One summary per namespace.
        namespaces: Vec<NamespaceSummary>,
    },
    /// To `ListSteps`.
    Steps {
        /// One summary per step.
        steps: Vec<StepSummary>,
    },
    /// To the deletes and `DiscardIncompleteAfter`: what went.
    Deleted {
        /// Shards deleted.
        shards: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// To `Status`.
    Status(Box<DaemonStatus>),
    /// To `Failures`.
    Failures {
        /// The namespace's recorded events, oldest first.
        records: Vec<FailureRecord>,
    },
    /// To `Advice`.
    Advice(Advice),
    /// To `Pin` and `Unpin`: the step as it now stands (unpinned: no names).
    Pinned {
        /// The step, its names and the tiers holding it.
        pin: PinInfo,
        /// Cluster members the change could not reach, with why: they may
        /// still drop (or keep) their copies by their own retention.
        not_reached: Vec<String>,
    },
    /// To `Pins`: oldest step first.
    Pins {
        /// The pinned steps.
        pins: Vec<PinInfo>,
    },
}

/// A reply as it travels: the reply, or the error the request met.
pub type WireResult = Result<Reply, WireError>;

#[cfg(test)]
mod tests {
    use super::Request;

    #[test]
    fn an_unknown_field_is_refused_by_name_on_every_kind_of_request() {
        for op in [r#"{"op":"status""#, r#"{"op":"list_namespaces""#, r#"{"op":"latest","namespace":"j""#] {
            let ok: Request = serde_json::from_str(&format!("{op}}}")).unwrap();
            assert_eq!(serde_json::to_string(&ok).unwrap(), format!("{op}}}"));
            let err = serde_json::from_str::<Request>(&format!(r#"{op},"extra":1}}"#)).unwrap_err().to_string();
            assert!(err.contains("unknown field `extra`"), "{op}: {err}");
        }
    }
}
