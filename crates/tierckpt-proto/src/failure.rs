//! Starts and failures of a job, as the supervisor records them.

use serde::{Deserialize, Serialize};

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
    /// The job checkpointed and stopped for a preemption, to be resumed
    /// later (not a failure).
    Preempted,
    /// The daemon asked for a checkpoint at the next step: a preemption
    /// notice, a suspect placement neighbour or a failed health check (not a
    /// failure; the detail says which).
    Alert,
}

impl FailureKind {
    /// Whether the event is a failure (anything but a start, a preemption or an alert).
    pub fn is_failure(self) -> bool {
        !matches!(self, FailureKind::Start | FailureKind::Preempted | FailureKind::Alert)
    }
}

/// One recorded event of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureRecord {
    /// When it happened, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// What happened.
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
