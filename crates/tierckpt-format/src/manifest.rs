//! The per-shard manifest: identity, length, chunking and checksums.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::checksum::Checksum;
use crate::FormatError;

/// Format version written by this build. Readers accept any minor version of
/// the same major version and refuse other majors.
pub const FORMAT_VERSION: &str = "1.0";
/// The major version of [`FORMAT_VERSION`].
const FORMAT_MAJOR: u32 = 1;

/// Chunk size for checksums: large enough that hashing overhead is nil, small
/// enough that a mismatch names a narrow byte range and chunks parallelize.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

/// Identity of a shard: one rank's state at one step of one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardKey {
    /// The namespace (one training run or job; see [`crate::names`]).
    pub namespace: String,
    /// The training step.
    pub step: u64,
    /// The rank whose state the shard holds.
    pub rank: u32,
}

impl ShardKey {
    /// The key of `rank`'s shard at `step` in `namespace`.
    pub fn new(namespace: impl Into<String>, step: u64, rank: u32) -> Self {
        Self { namespace: namespace.into(), step, rank }
    }
}

impl fmt::Display for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/step {}/rank {}", self.namespace, self.step, self.rank)
    }
}

/// Manifest stored beside each shard's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The format version it was written with ([`FORMAT_VERSION`]).
    pub format_version: String,
    /// Which shard it describes.
    #[serde(flatten)]
    pub key: ShardKey,
    /// Ranks in the job at this step.
    pub world_size: u32,
    /// Length of the safetensors file in bytes.
    pub file_len: u64,
    /// Bytes per chunk checksummed.
    pub chunk_size: u64,
    /// xxh3-128 of each `chunk_size` slice of the file, the last one shorter.
    pub chunks: Vec<Checksum>,
    /// When the manifest was computed, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

impl Manifest {
    /// Builds a manifest for `data`, checksumming it (in parallel).
    pub fn compute(key: ShardKey, world_size: u32, data: &[u8], created_unix_ms: u64) -> Self {
        let chunk_size = DEFAULT_CHUNK_SIZE;
        Self {
            format_version: FORMAT_VERSION.to_string(),
            key,
            world_size,
            file_len: data.len() as u64,
            chunk_size,
            chunks: crate::chunk_checksums(data, chunk_size),
            created_unix_ms,
        }
    }

    /// Byte range of chunk `i` (empty, at the end, past the last chunk).
    /// Saturating: a parsed manifest may have a chunk size near 2^64.
    pub fn chunk_range(&self, i: usize) -> (u64, u64) {
        let a = (i as u64).saturating_mul(self.chunk_size).min(self.file_len);
        (a, a.saturating_add(self.chunk_size).min(self.file_len))
    }

    /// `Truncated` unless `len` is the file length this manifest describes.
    pub fn check_len(&self, len: usize) -> Result<(), FormatError> {
        if len as u64 != self.file_len {
            return Err(FormatError::Truncated {
                file: self.key.to_string(),
                expected: self.file_len,
                found: len as u64,
            });
        }
        Ok(())
    }

    /// The manifest as pretty-printed JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("manifest serializes")
    }

    /// Parses and checks a manifest; `file` names it in errors.
    pub fn from_json(bytes: &[u8], file: &str) -> Result<Self, FormatError> {
        #[derive(Deserialize)]
        struct VersionOnly {
            format_version: String,
        }
        let invalid = |reason: String| FormatError::InvalidManifest { file: file.to_string(), reason };
        let v: VersionOnly = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let major = v.format_version.split('.').next().and_then(|m| m.parse::<u32>().ok());
        if major != Some(FORMAT_MAJOR) {
            return Err(FormatError::UnsupportedVersion {
                file: file.to_string(),
                found: v.format_version,
                supported: FORMAT_MAJOR,
            });
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        m.check_consistent().map_err(invalid)?;
        Ok(m)
    }

    fn check_consistent(&self) -> Result<(), String> {
        crate::names::validate_namespace(&self.key.namespace).map_err(|e| e.to_string())?;
        crate::names::validate_rank(self.key.rank, self.world_size).map_err(|e| e.to_string())?;
        if self.chunk_size == 0 {
            return Err("chunk_size is 0".into());
        }
        let expected = self.file_len.div_ceil(self.chunk_size) as usize;
        if self.chunks.len() != expected {
            return Err(format!(
                "{} chunk checksums for {} bytes in chunks of {}; expected {expected}",
                self.chunks.len(),
                self.file_len,
                self.chunk_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest::compute(ShardKey::new("ns", 7, 1), 2, &vec![3u8; 10 << 20], 1)
    }

    #[test]
    fn json_round_trip() {
        let m = sample();
        assert_eq!(m.chunks.len(), 3);
        let back = Manifest::from_json(&m.to_json(), "m.json").unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn unknown_major_version_is_refused() {
        let mut m = sample();
        m.format_version = "2.0".into();
        let e = Manifest::from_json(&m.to_json(), "x/manifest.json").unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, FormatError::UnsupportedVersion { .. }));
        assert!(s.contains("x/manifest.json") && s.contains("2.0"), "{s}");
        m.format_version = "1.7".into();
        Manifest::from_json(&m.to_json(), "m").unwrap();
    }

    /// Found by the `manifest` fuzz target's invariant: chunk 1 of these
    /// ended past 2^64 (a panic with overflow checks, a wrapped range
    /// without).
    #[test]
    fn chunk_ranges_of_huge_chunks_stay_inside_the_file() {
        let mut m = Manifest::compute(ShardKey::new("ns", 3, 1), 2, &[1, 2, 3], 5);
        m.file_len = u64::MAX;
        m.chunk_size = (1 << 63) + 1;
        m.chunks = vec![m.chunks[0]; 2];
        let m = Manifest::from_json(&m.to_json(), "m").unwrap();
        assert_eq!(m.chunk_range(0), (0, (1 << 63) + 1));
        assert_eq!(m.chunk_range(1), ((1 << 63) + 1, u64::MAX));
        assert_eq!(m.chunk_range(2), (u64::MAX, u64::MAX));
        assert_eq!(sample().chunk_range(usize::MAX), (10 << 20, 10 << 20));
    }

    #[test]
    fn inconsistent_chunk_count_is_refused() {
        let mut m = sample();
        m.chunks.pop();
        let e = Manifest::from_json(&m.to_json(), "m").unwrap_err().to_string();
        assert!(e.contains("expected 3"), "{e}");
    }
}
