//! [`FormatError`], the one error type of the shard format.

use std::fmt;

/// Errors of the shard format. Every variant names the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A manifest or reduced blob of a version this build does not read.
    #[error("{file}: format version {found} is not supported (this build reads major version {supported}); upgrade tierckpt to read it")]
    UnsupportedVersion {
        /// The file concerned.
        file: String,
        /// The version found, as the file spells it.
        found: String,
        /// The (major) version this build reads.
        supported: u32,
    },
    /// The file has another length than it should (usually fewer bytes).
    #[error("{file}: truncated: expected {expected} bytes, found {found}")]
    Truncated {
        /// The file concerned.
        file: String,
        /// Bytes expected.
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// A chunk's bytes do not hash to the manifest's checksum.
    #[error("{file}: checksum mismatch in chunk {chunk} (bytes {offset}..{end}): expected {expected}, found {found}")]
    ChecksumMismatch {
        /// The file concerned.
        file: String,
        /// Index of the chunk.
        chunk: usize,
        /// The chunk's first byte in the file.
        offset: u64,
        /// The chunk's end (exclusive) in the file.
        end: u64,
        /// The manifest's checksum.
        expected: Hex,
        /// The checksum of the bytes found.
        found: Hex,
    },
    /// A malformed header: a shard's safetensors header or a reduced blob's.
    #[error("{file}: invalid safetensors header: {reason}")]
    InvalidHeader {
        /// The file concerned.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A malformed or inconsistent manifest.
    #[error("{file}: invalid manifest: {reason}")]
    InvalidManifest {
        /// The file concerned.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A bad request from the caller (not bad bytes).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl FormatError {
    /// True when the bytes themselves are bad (as opposed to a bad request).
    pub fn is_corruption(&self) -> bool {
        !matches!(self, FormatError::InvalidArgument(_))
    }
}

/// A 128-bit checksum printed as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hex(pub u128);

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}
