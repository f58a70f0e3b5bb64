//! The tierckpt shard format, pure and synchronous.
//!
//! A *shard* is one rank's state at one step. Its bytes are a plain
//! safetensors file (readable by any safetensors reader); non-tensor state
//! lives in the safetensors `__metadata__` map. Beside the bytes sits a
//! versioned [`Manifest`] with per-chunk xxh3-128 checksums, computed once at
//! seal and checked at every hop.

mod checksum;
mod error;
mod layout;
mod manifest;
pub mod names;
mod reduce;

pub use checksum::{chunk_checksums, copy_verified, verify_chunks, Checksum, CopyTarget, StreamVerifier};
pub use error::FormatError;
pub use layout::{parse_shard, ShardLayout, ShardView, TensorEntry, TensorSpec};
pub use manifest::{Manifest, ShardKey, DEFAULT_CHUNK_SIZE, FORMAT_VERSION};
pub use reduce::{
    base_of, decode_into, encode, estimate, manifest_identity, BaseRef, Compression, ReduceOptions, ReduceStats,
    BLOB_VERSION, DEFAULT_ZSTD_LEVEL,
};
pub use safetensors::Dtype;

/// Byte length of `numel` elements of `dtype`, or an error if it is not a whole
/// number of bytes or overflows.
pub fn byte_len(dtype: Dtype, shape: &[usize]) -> Result<usize, FormatError> {
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| FormatError::InvalidArgument(format!("shape {shape:?} overflows")))?;
    let bits = numel
        .checked_mul(dtype.bitsize())
        .ok_or_else(|| FormatError::InvalidArgument(format!("shape {shape:?} overflows")))?;
    if bits % 8 != 0 {
        return Err(FormatError::InvalidArgument(format!(
            "{numel} elements of {dtype} are not a whole number of bytes"
        )));
    }
    Ok(bits / 8)
}

/// Parses a dtype name as safetensors spells it ("F32", "BF16", ...).
pub fn parse_dtype(name: &str) -> Result<Dtype, FormatError> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| FormatError::InvalidArgument(format!("unknown dtype {name:?}")))
}
