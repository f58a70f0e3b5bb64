//! The error type of every tier.

use tierckpt_format::FormatError;
pub use tierckpt_proto::{ErrorKind, WireError};

/// Errors of a tier. Messages say what was asked, what was found, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("not found: {0}")]
    /// Nothing holds what was asked for.
    NotFound(String),
    #[error("already exists: {0}")]
    /// The key is taken: a shard is written once.
    AlreadyExists(String),
    #[error("corrupt: {0}")]
    /// Bytes that do not match their manifest, or that do not parse.
    Corrupt(FormatError),
    #[error("capacity exceeded: asked for {requested} bytes, {free} of {capacity} bytes are free{detail}; raise memory_tier_size, lower keep_last, or delete old steps")]
    /// The memory tier cannot fit the shard, even after eviction.
    CapacityExceeded {
        /// Bytes asked for.
        requested: u64,
        /// Bytes free.
        free: u64,
        /// The tier's capacity.
        capacity: u64,
        /// What holds the rest, for the message.
        detail: String,
    },
    #[error("storage full: {0}; free space there, lower persist_keep_last, or persist less often")]
    /// The persistent tier's target is full.
    StorageFull(String),
    #[error("invalid argument: {0}")]
    /// The request itself is wrong.
    InvalidArgument(String),
    #[error("unavailable: {0}")]
    /// A peer, a store or a worker did not answer; trying again may work.
    Unavailable(String),
    #[error("{context}: {source}")]
    /// A file system call failed.
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    #[error("cancelled")]
    /// The operation was cancelled.
    Cancelled,
    #[error("{message}")]
    /// An error another node or process reported.
    Remote {
        /// Its kind.
        kind: ErrorKind,
        /// Its message.
        message: String,
    },
}

impl TierError {
    /// The semantic kind, as carried over the wire.
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

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// An I/O error with what was being done.
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
