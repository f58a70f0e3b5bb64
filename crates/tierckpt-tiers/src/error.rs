//! The error type of every tier.

use tierckpt_format::FormatError;
pub use tierckpt_proto::{ErrorKind, WireError};

/// Errors of a tier. Messages say what was asked, what was found, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("corrupt: {0}")]
    Corrupt(FormatError),
    #[error("capacity exceeded: asked for {requested} bytes, {free} of {capacity} bytes are free{detail}; raise memory_tier_size, lower keep_last, or delete old steps")]
    CapacityExceeded { requested: u64, free: u64, capacity: u64, detail: String },
    #[error("storage full: {0}; free space there, lower persist_keep_last, or persist less often")]
    StorageFull(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("cancelled")]
    Cancelled,
    #[error("{message}")]
    Remote { kind: ErrorKind, message: String },
}

impl TierError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            TierError::NotFound(_) => ErrorKind::NotFound,
            TierError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            TierError::Corrupt(_) => ErrorKind::Corrupt,
            TierError::CapacityExceeded { .. } | TierError::StorageFull(_) => ErrorKind::CapacityExceeded,
            TierError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            TierError::Unavailable(_) => ErrorKind::Unavailable,
            TierError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => ErrorKind::CapacityExceeded,
            TierError::Io { .. } => ErrorKind::Io,
            TierError::Cancelled => ErrorKind::Cancelled,
            TierError::Remote { kind, .. } => *kind,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TierError::Io { context: context.into(), source }
    }

    /// The error as sent over the wire.
    pub fn to_wire(&self) -> WireError {
        WireError { kind: self.kind(), message: self.to_string() }
    }
}

impl From<WireError> for TierError {
    fn from(w: WireError) -> Self {
        TierError::Remote { kind: w.kind, message: w.message }
    }
}

impl From<FormatError> for TierError {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::InvalidArgument(m) => TierError::InvalidArgument(m),
            e => TierError::Corrupt(e),
        }
    }
}
