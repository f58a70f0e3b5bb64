//! `tierckptd` as a library: the node daemon that holds checkpoints in CPU
//! memory. It serves a local API on a Unix socket (the zero-copy save path:
//! reserve, write into the mapped segment, seal) and an HTTP API (axum) with
//! the native `/v1` endpoints and `/health`. Binaries are thin wrappers.

pub mod advice;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod drain;
pub mod failures;
mod http;
pub mod hugepages;
mod hyperpod;
pub mod limits;
pub mod membership;
pub mod metrics;
pub mod peer;
pub mod peer_tier;
pub mod pins;
mod record;
mod service;
pub mod tls;
mod uds;
pub mod unrestorable;

pub use config::{ConfigLayer, DaemonConfig};
pub use service::{background_runtime, Connection, Daemon, RunningDaemon};

use tierckpt_tiers::TierError;

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("configuration: {0}")]
    /// A setting is missing, malformed or contradicts another.
    Config(String),
    #[error(transparent)]
    /// The memory tier or a store failed.
    Tier(#[from] TierError),
    #[error("{context}: {source}")]
    /// A file or socket operation failed.
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        source: std::io::Error,
    },
}

impl DaemonError {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DaemonError::Io { context: context.into(), source }
    }
}
