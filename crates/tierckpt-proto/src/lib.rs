//! The wire protocol of tierckpt, shared by the daemon and every client:
//! the local control frames over a Unix socket ([`frame`]), the requests and
//! replies they carry ([`Request`], [`Reply`]), the semantic error kinds that
//! travel with a failed reply or an HTTP error body ([`ErrorKind`],
//! [`WireError`]), and the status types the daemon reports.
//!
//! It depends on the shard format and serde only, so that a training process
//! linking a client links no storage backend and no async runtime.

mod advice;
mod error;
mod failure;
pub mod frame;
mod pins;
mod request;
mod status;

pub use advice::{Advice, AdviceEvent, AdviceKind, AdviceSource, AdviceStatus, Preemption};
pub use error::{ErrorKind, WireError};
pub use failure::{FailureKind, FailureRecord};
pub use frame::{check_frame_len, read_frame, write_frame, MAX_FRAME};
pub use pins::{validate_pin_name, PinInfo, MAX_PIN_NAME};
pub use request::{Reply, Request, WireResult};
pub use status::{
    ClusterStatus, ClusterStep, DaemonStatus, HeldStep, Holdings, MemberSeen, MemoryUsage, NamespaceSummary, NodeState,
    NodeStatus, ReplicationStats, StepSummary,
};
