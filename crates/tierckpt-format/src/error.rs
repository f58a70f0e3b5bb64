use std::fmt;

/// Errors of the shard format. Every variant names the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{file}: format version {found} is not supported (this build reads major version {supported}); upgrade tierckpt to read it")]
    UnsupportedVersion { file: String, found: String, supported: u32 },
    #[error("{file}: truncated: expected {expected} bytes, found {found}")]
    Truncated { file: String, expected: u64, found: u64 },
    #[error("{file}: checksum mismatch in chunk {chunk} (bytes {offset}..{end}): expected {expected}, found {found}")]
    ChecksumMismatch { file: String, chunk: usize, offset: u64, end: u64, expected: Hex, found: Hex },
    #[error("{file}: invalid safetensors header: {reason}")]
    InvalidHeader { file: String, reason: String },
    #[error("{file}: invalid manifest: {reason}")]
    InvalidManifest { file: String, reason: String },
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
