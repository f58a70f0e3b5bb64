//! The blob container: prefix (magic, version byte, header length), the
//! JSON [`Header`] with one record per chunk and the predicted pairs, and
//! [`parse`], which checks all of it before the decoder reads a payload.

// `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

use super::predict::Pair;
use crate::{Checksum, FormatError, Manifest};

/// The first bytes of every blob.
const MAGIC: &[u8; 7] = b"TCKPRED";
/// Version byte written after the magic; readers accept it and 1 (version
/// 1: without predictions), and refuse any other.
pub const BLOB_VERSION: u8 = 2;
/// Magic, version byte and header length.
pub(super) const PREFIX_LEN: usize = 7 + 1 + 8;

/// The checkpoint a delta blob needs to be decoded: its step and identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    /// The base's step.
    pub step: u64,
    /// The base's length in bytes.
    pub file_len: u64,
    /// The base's chunk size.
    pub chunk_size: u64,
    /// xxh3-128 of the base's chunk checksums (see [`manifest_identity`]).
    pub identity: Checksum,
}

impl BaseRef {
    /// The reference to the checkpoint that `m` describes.
    pub fn of(m: &Manifest) -> Self {
        Self { step: m.key.step, file_len: m.file_len, chunk_size: m.chunk_size, identity: manifest_identity(m) }
    }

    /// True when `m` describes exactly the bytes this reference names.
    pub fn matches(&self, m: &Manifest) -> bool {
        *self == Self::of(m)
    }
}

/// xxh3-128 of a manifest's chunk size, length and chunk checksums: two
/// manifests with the same identity describe the same bytes.
pub fn manifest_identity(m: &Manifest) -> Checksum {
    let mut b = Vec::with_capacity(16 + 16 * m.chunks.len());
    b.extend_from_slice(&m.file_len.to_le_bytes());
    b.extend_from_slice(&m.chunk_size.to_le_bytes());
    for c in &m.chunks {
        b.extend_from_slice(&c.0.to_le_bytes());
    }
    Checksum(xxh3_128(&b))
}

/// How one chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Kind {
    /// The chunk as is.
    #[serde(rename = "raw")]
    Raw,
    /// No payload: the base's chunk, which has the same checksum.
    #[serde(rename = "same")]
    Same,
    /// The chunk's planes, lz4-compressed.
    #[serde(rename = "lz4")]
    Lz4,
    /// The chunk's planes, zstd-compressed.
    #[serde(rename = "zstd")]
    Zstd,
    /// The planes of the XOR against the base's chunk, lz4-compressed.
    #[serde(rename = "xor-lz4")]
    XorLz4,
    /// The planes of the XOR against the base's chunk, zstd-compressed.
    #[serde(rename = "xor-zstd")]
    XorZstd,
}

impl Kind {
    /// Whether decoding the chunk reads the base.
    pub(super) fn uses_base(self) -> bool {
        matches!(self, Kind::Same | Kind::XorLz4 | Kind::XorZstd)
    }

    /// Whether the chunk is XORed against the base (or a prediction).
    pub(super) fn is_xor(self) -> bool {
        matches!(self, Kind::XorLz4 | Kind::XorZstd)
    }
}

/// Kind, offset of the payload in the payload area, payload length.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ChunkRec(pub(super) Kind, pub(super) u64, pub(super) u64);

/// The JSON header at the end of a blob.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Header {
    /// Step of the encoded shard (for messages).
    pub(super) step: u64,
    /// Length of the encoded shard.
    pub(super) file_len: u64,
    /// Chunk size of the encoded shard's manifest.
    pub(super) chunk_size: u64,
    /// [`manifest_identity`] of the encoded shard's manifest.
    pub(super) identity: Checksum,
    /// The base that some chunk needs, if any.
    pub(super) base: Option<BaseRef>,
    /// One record per chunk, in chunk order.
    pub(super) chunks: Vec<ChunkRec>,
    /// The pairs some `Xor` chunk was predicted with (version 2 only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) predict: Vec<PredRec>,
}

impl Header {
    /// The version byte to write: 1 without predictions, so that version 1
    /// readers decode the blob.
    fn version(&self) -> u8 {
        if self.predict.is_empty() {
            1
        } else {
            BLOB_VERSION
        }
    }
}

/// A predicted pair in file byte offsets: `exp_avg` at `m.0..m.1`,
/// `exp_avg_sq` at `v..v + m.1 - m.0`, and the betas' f64 bit patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PredRec {
    /// The `exp_avg` range.
    pub(super) m: (u64, u64),
    /// Start of the `exp_avg_sq` range.
    pub(super) v: u64,
    /// beta1's f64 bits.
    pub(super) b1: u64,
    /// beta2's f64 bits.
    pub(super) b2: u64,
}

impl From<&Pair> for PredRec {
    fn from(p: &Pair) -> Self {
        PredRec { m: (p.m as u64, (p.m + p.len) as u64), v: p.v as u64, b1: p.b1.to_bits(), b2: p.b2.to_bits() }
    }
}

/// Completes a blob whose payloads fill `blob[PREFIX_LEN..]`: writes the
/// prefix and appends the header.
pub(super) fn finish(blob: &mut Vec<u8>, header: &Header) {
    let json = serde_json::to_vec(header).expect("reduce header serializes");
    blob[..7].copy_from_slice(MAGIC);
    blob[7] = header.version();
    blob[8..PREFIX_LEN].copy_from_slice(&(json.len() as u64).to_le_bytes());
    blob.extend_from_slice(&json);
}

/// An [`FormatError::InvalidHeader`] for `file`.
pub(super) fn bad_header(file: &str, reason: impl Into<String>) -> FormatError {
    FormatError::InvalidHeader { file: file.to_string(), reason: reason.into() }
}

/// The checkpoint `blob` needs as its base, if any.
pub fn base_of(blob: &[u8]) -> Result<Option<BaseRef>, FormatError> {
    Ok(parse(blob, "reduced blob")?.0.base)
}

/// Splits a blob into its header, validated predictions and payload; never
/// panics.
pub(super) fn parse<'a>(blob: &'a [u8], file: &str) -> Result<(Header, Vec<Pair>, &'a [u8]), FormatError> {
    if blob.len() < PREFIX_LEN {
        return Err(FormatError::Truncated {
            file: file.to_string(),
            expected: PREFIX_LEN as u64,
            found: blob.len() as u64,
        });
    }
    if &blob[..7] != MAGIC {
        return Err(bad_header(file, "not a tierckpt reduced blob (bad magic)"));
    }
    if blob[7] != 1 && blob[7] != BLOB_VERSION {
        return Err(FormatError::UnsupportedVersion {
            file: file.to_string(),
            found: format!("reduced blob {}", blob[7]),
            supported: BLOB_VERSION as u32,
        });
    }
    let hlen = u64::from_le_bytes(blob[8..16].try_into().unwrap());
    let rest = &blob[PREFIX_LEN..];
    if hlen > rest.len() as u64 {
        return Err(FormatError::Truncated {
            file: file.to_string(),
            expected: (PREFIX_LEN as u64).saturating_add(hlen),
            found: blob.len() as u64,
        });
    }
    let (payload, json) = rest.split_at(rest.len() - hlen as usize);
    let h: Header = serde_json::from_slice(json).map_err(|e| bad_header(file, format!("reduced blob header: {e}")))?;
    check_chunks(&h, payload, hlen, blob.len(), file)?;
    let pairs = check_predict(&h, blob[7]).map_err(|r| bad_header(file, format!("reduced blob header: {r}")))?;
    Ok((h, pairs, payload))
}

/// Checks the header's chunk records against the shard's length, the base
/// and the `payload` area (`hlen`: the header's length, `blob_len`: the
/// blob's, for messages): every payload in it, and together tiling it.
fn check_chunks(h: &Header, payload: &[u8], hlen: u64, blob_len: usize, file: &str) -> Result<(), FormatError> {
    let bad = |reason: String| bad_header(file, format!("reduced blob header: {reason}"));
    if h.chunk_size == 0 || h.chunks.len() as u64 != h.file_len.div_ceil(h.chunk_size) {
        return Err(bad(format!("{} chunks for {} bytes in chunks of {}", h.chunks.len(), h.file_len, h.chunk_size)));
    }
    let mut extents = Vec::with_capacity(h.chunks.len());
    for (i, ChunkRec(kind, offset, len)) in h.chunks.iter().enumerate() {
        let clen = (h.file_len - i as u64 * h.chunk_size).min(h.chunk_size);
        let ok = match kind {
            Kind::Same => *len == 0,
            Kind::Raw => *len == clen,
            _ => true,
        };
        if !ok {
            return Err(bad(format!("chunk {i} ({kind:?}) of {clen} bytes has a payload of {len}")));
        }
        if kind.uses_base() {
            let Some(b) = &h.base else {
                return Err(bad(format!("chunk {i} refers to a base the blob does not name")));
            };
            let end = (i as u64).checked_mul(h.chunk_size).and_then(|a| a.checked_add(clen));
            if b.chunk_size != h.chunk_size || end.is_none_or(|e| e > b.file_len) {
                return Err(bad(format!("chunk {i} lies outside its base of {} bytes", b.file_len)));
            }
        }
        if offset.checked_add(*len).is_none_or(|e| e > payload.len() as u64) {
            return Err(FormatError::Truncated {
                file: file.to_string(),
                expected: (PREFIX_LEN as u64 + hlen).saturating_add(*offset).saturating_add(*len),
                found: blob_len as u64,
            });
        }
        if *len > 0 {
            extents.push((*offset, *len));
        }
    }
    // The payloads tile the payload area exactly.
    extents.sort_unstable();
    let mut end = 0u64;
    for (offset, len) in extents {
        if offset != end {
            return Err(bad(format!("payloads leave a gap or overlap at byte {end} of {}", payload.len())));
        }
        end = offset + len;
    }
    if end != payload.len() as u64 {
        return Err(bad(format!("payloads cover {end} of the {} payload bytes", payload.len())));
    }
    Ok(())
}

/// Checks the header's predictions (`version`: the blob's); the pairs,
/// sorted by `v`.
pub(super) fn check_predict(h: &Header, version: u8) -> Result<Vec<Pair>, String> {
    if h.predict.is_empty() {
        return Ok(Vec::new());
    }
    if version < 2 {
        return Err(format!("a version {version} blob lists predictions"));
    }
    let Some(base) = &h.base else { return Err("predictions without a base".into()) };
    if h.chunk_size % 4 != 0 {
        return Err(format!("predictions in chunks of {} bytes, not a multiple of 4", h.chunk_size));
    }
    let mut pairs = Vec::with_capacity(h.predict.len());
    let mut ranges = Vec::with_capacity(2 * h.predict.len());
    for (k, &PredRec { m: (ms, me), v, b1, b2 }) in h.predict.iter().enumerate() {
        let what = |reason: &str| format!("prediction {k} (m {ms}..{me}, v at {v}): {reason}");
        if ms >= me {
            return Err(what("empty m range"));
        }
        if (ms | me | v) % 4 != 0 {
            return Err(what("not 4-byte aligned"));
        }
        let len = me - ms;
        let Some(ve) = v.checked_add(len).filter(|&ve| me.max(ve) <= h.file_len.min(base.file_len)) else {
            return Err(what(&format!("outside the shard's {} bytes or the base's {}", h.file_len, base.file_len)));
        };
        if ms < ve && v < me {
            return Err(what("m and v ranges overlap"));
        }
        let (b1, b2) = (f64::from_bits(b1), f64::from_bits(b2));
        if !(b1 > 0.0 && b1 < 1.0 && b2 > 0.0 && b2 < 1.0) {
            return Err(what(&format!("betas {b1} and {b2} are not both in (0, 1)")));
        }
        let size = |x: u64| usize::try_from(x).map_err(|_| what("offsets do not fit in memory"));
        pairs.push(Pair { m: size(ms)?, v: size(v)?, len: size(len)?, b1, b2 });
        ranges.extend([(ms, me, k), (v, ve, k)]);
    }
    ranges.sort_unstable();
    if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
        let (a, b) = (w[0].2.min(w[1].2), w[0].2.max(w[1].2));
        return Err(format!("the ranges of predictions {a} and {b} overlap"));
    }
    pairs.sort_unstable_by_key(|p| p.v);
    Ok(pairs)
}
