//! The chunk codec for compressed and delta checkpoints, pure and synchronous.
//!
//! [`encode`] turns a shard's bytes into a self-describing *blob*, chunk by
//! chunk along the manifest's chunks; [`decode_into`] rebuilds the bytes and
//! verifies every chunk against the manifest's xxh3-128 checksums, which
//! always cover the uncompressed bytes, so a restore is verified end to end.
//!
//! Blob layout: the magic `b"TCKPRED"`, one version byte ([`BLOB_VERSION`]),
//! the JSON header's length as a little-endian u64, the chunks' payloads back
//! to back (in the order the encoder's workers finished them, so that each
//! is written once, straight into the blob), then the JSON header (target
//! identity, the base it needs if any, one `[kind, payload offset, payload
//! length]` record per chunk, the predicted pairs if any: `{"m": [start,
//! end], "v": start, "b1": bits, "b2": bits}`, file offsets and the betas'
//! f64 bit patterns) at the end.
//!
//! Per chunk the smallest of these is stored (for chunks of 1 MiB and more,
//! the smallest as samples of the chunk predict, which saves compressing a
//! chunk twice, or at all when it does not shrink):
//! - `Same`: with delta, the base's chunk has the same length and checksum:
//!   no payload, the base's bytes are taken;
//! - `Xor`+lz4/zstd: with delta and compression, the XOR against the base's
//!   chunk of the same length (predicted in places, see below), split into
//!   byte planes, compressed;
//! - lz4/zstd: the chunk split into byte planes, compressed;
//! - `Raw`: the chunk as is, whenever nothing else is smaller.
//!
//! With [`Compression::Off`], delta gives only `Same` and `Raw`.
//!
//! Adam's second moment is predicted: with delta and compression, where both
//! shards are safetensors holding F32 tensors `P + "exp_avg"` (m) and `P +
//! "exp_avg_sq"` (v) at the same offsets, and sampling finds betas (from a
//! small grid) for which one Adam step from the base's m and v to the new m
//! reproduces the new v to about an ulp, `Xor` chunks XOR v's bytes against
//! that prediction instead of the base's (see `predict`). Lossless whatever
//! the prediction (the residual is stored exactly); mostly zero bits when it
//! is right (exp_avg_sq shrinks about 7-fold). The header lists each pair's
//! ranges and exact betas. The decoder leaves the residual in place, and
//! once every chunk is decoded (m is never predicted, so its bytes are
//! final), XORs in the same prediction, computed from the decoded m and the
//! base, identically on every platform; only then does it verify those
//! chunks, so a wrong prediction can only fail a checksum. Blobs of version
//! 1 have no predictions.
//!
//! Modules: `options` (what `encode` may use), `blob` (the container:
//! prefix, header, versions, its checks), `planes` (byte planes), `encoder`
//! (one chunk's smallest encoding), `encode`, `estimate`, `decode`, and
//! `predict` (Adam's second moment).

// `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

mod blob;
mod decode;
mod encode;
mod encoder;
mod estimate;
mod options;
mod planes;
mod predict;
#[cfg(test)]
mod tests;

pub use blob::{base_of, manifest_identity, BaseRef, BLOB_VERSION};
pub use decode::decode_into;
pub use encode::{encode, ReduceStats};
pub use estimate::estimate;
pub use options::{Compression, ReduceOptions, DEFAULT_ZSTD_LEVEL};

use crate::checksum::worker_count;
use crate::{FormatError, Manifest};

/// An error unless `m` has one checksum per chunk of a nonzero chunk size
/// (`what`: the manifest's role, for the message).
fn check_shape(m: &Manifest, what: &str) -> Result<(), FormatError> {
    if m.chunk_size == 0 || m.chunks.len() as u64 != m.file_len.div_ceil(m.chunk_size) {
        return Err(FormatError::InvalidManifest {
            file: m.key.to_string(),
            reason: format!(
                "{what}: {} chunk checksums for {} bytes in chunks of {}",
                m.chunks.len(),
                m.file_len,
                m.chunk_size
            ),
        });
    }
    Ok(())
}
