//! The daemon's checkpoint advice: events that make the next step worth
//! saving (a preemption notice, a suspect placement neighbour, a failed
//! health check), the standing preemption, and how long persisting a step
//! takes, as the `advice` request answers and `status` shows them.

use serde::{Deserialize, Serialize};

/// What an advice event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdviceKind {
    /// A preemption notice appeared (the configured file or URL).
    Preemption,
    /// A placement neighbour (a node this node copies to, or that copies to
    /// it) turned suspect or dead.
    SuspectNeighbour,
    /// This node's health check failed.
    HealthCheck,
}

/// One alert: save at the next step boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdviceEvent {
    /// Increases with each event (across daemon restarts too: at least the
    /// time of the event in Unix ms), so a client acts once per id.
    pub id: u64,
    /// What it is about.
    pub kind: AdviceKind,
    /// What happened, as a person reads it ("neighbour n2 suspect").
    pub detail: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// A standing preemption notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preemption {
    /// When the node goes, in Unix ms: the notice's own time if it gives
    /// one, else when it appeared plus `preemption_grace`.
    pub deadline_unix_ms: u64,
    /// The notice's text (a file's content, a URL's body).
    pub detail: String,
}

/// The answer to `advice {namespace}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Advice {
    /// Save at the next step boundary: some event has not expired.
    pub save_now: bool,
    /// The events not yet expired, oldest first.
    pub events: Vec<AdviceEvent>,
    /// Set while a preemption notice stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preemption: Option<Preemption>,
    /// The measured time to persist one step of the namespace from this
    /// node (its bytes over the drain's recent throughput); absent if unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_estimate_ms: Option<u64>,
}

/// A checked source (the preemption notice, the health check), for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AdviceSource {
    /// The file, URL or command.
    pub source: String,
    /// When it was last checked (Unix ms); none before the first check.
    #[serde(default)]
    pub checked_unix_ms: Option<u64>,
    /// Why the last check could not be made (the notice) or failed (the
    /// health check); none while it works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What `tierckpt status` shows of the advice.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AdviceStatus {
    /// The events not yet expired, oldest first.
    pub events: Vec<AdviceEvent>,
    /// Set while a preemption notice stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preemption: Option<Preemption>,
    /// The preemption notice polled, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<AdviceSource>,
    /// The health check run, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<AdviceSource>,
}
