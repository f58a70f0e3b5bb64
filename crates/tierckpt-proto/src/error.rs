//! Error kinds as they travel between a daemon and its clients.

use serde::{Deserialize, Serialize};

/// Semantic error kinds, shared by every tier and carried over the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// What was asked for does not exist (or no tier holds a copy).
    NotFound,
    /// A key is written once; this one already was.
    AlreadyExists,
    /// Bytes did not match their checksums, or a file could not be parsed.
    Corrupt,
    /// Not enough room in a tier (memory or storage).
    CapacityExceeded,
    /// The request itself was wrong.
    InvalidArgument,
    /// The daemon, a peer or a store did not answer; trying again may work.
    Unavailable,
    /// A missing or wrong token.
    Unauthorized,
    /// A file system error.
    Io,
    /// The operation was cancelled.
    Cancelled,
    /// A bug or an unexpected answer.
    Internal,
}

impl ErrorKind {
    /// Whether the same request may succeed if tried again.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Unavailable | ErrorKind::Io)
    }
}

/// An error as carried in a protocol reply or an HTTP body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// What kind of failure it is.
    pub kind: ErrorKind,
    /// What was asked, what was found, and what to do.
    pub message: String,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WireError {}
