//! The client's error type: what the daemon answered, or what went wrong
//! on this side of the socket.

use tierckpt_format::FormatError;
use tierckpt_proto::{ErrorKind, WireError};

/// Errors of the client. [`Error::kind`] gives the semantic kind, the same
/// whether the failure happened here or in the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No daemon answered, or the connection to it was lost.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The caller asked for something impossible (a wrong buffer size, a
    /// tensor not in the shard).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The bytes of a shard did not match its manifest, or did not parse.
    #[error("corrupt: {0}")]
    Corrupt(FormatError),
    /// A file system call on this side failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The daemon refused the request; its kind and message travel unchanged.
    #[error("{0}")]
    Remote(WireError),
}

impl Error {
    /// The semantic kind of the failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Corrupt(_) => ErrorKind::Corrupt,
            Error::Io { .. } => ErrorKind::Io,
            Error::Remote(w) => w.kind,
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    pub(crate) fn remote(kind: ErrorKind, message: String) -> Self {
        Error::Remote(WireError { kind, message })
    }
}

impl From<WireError> for Error {
    fn from(w: WireError) -> Self {
        Error::Remote(w)
    }
}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::InvalidArgument(m) => Error::InvalidArgument(m),
            e => Error::Corrupt(e),
        }
    }
}
