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

// `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use xxhash_rust::xxh3::xxh3_128;

use crate::error::Hex;
mod predict;

use self::predict::Pair;
use crate::{Checksum, FormatError, Manifest};

const MAGIC: &[u8; 7] = b"TCKPRED";
/// Version byte written after the magic; readers accept it and 1 (version
/// 1: without predictions), and refuse any other.
pub const BLOB_VERSION: u8 = 2;
/// Magic, version byte and header length.
const PREFIX_LEN: usize = 7 + 1 + 8;
/// Zstd level used by `"zstd"` without a level. Measured by `tierckpt bench
/// reduce` (256 MiB checkpoints, 2 cores): level 3 compresses no better than
/// level 1 on checkpoint data (floats shrink through their sign and exponent
/// bytes, which level 1 already entropy-codes) and encodes 1.4-2x slower;
/// lz4 compresses worse (0.84-0.92 of the size against 0.72-0.84) and
/// decodes XOR deltas of sparse changes slower than zstd.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
const MAX_ZSTD_LEVEL: i32 = 19;

/// How chunks are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    Off,
    Lz4,
    /// Zstd at a level in 1..=19.
    Zstd(i32),
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

impl FromStr for Compression {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, FormatError> {
        let bad = || {
            FormatError::InvalidArgument(format!(
                "compression {s:?} is not one of \"off\", \"lz4\", \"zstd\" (level {DEFAULT_ZSTD_LEVEL}) or \"zstd:N\" with N in 1..={MAX_ZSTD_LEVEL}"
            ))
        };
        match s {
            "off" => Ok(Compression::Off),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd(DEFAULT_ZSTD_LEVEL)),
            _ => {
                let level = s.strip_prefix("zstd:").ok_or_else(bad)?;
                if level.is_empty() || !level.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let level: i32 = level.parse().map_err(|_| bad())?;
                if !(1..=MAX_ZSTD_LEVEL).contains(&level) {
                    return Err(bad());
                }
                Ok(Compression::Zstd(level))
            }
        }
    }
}

impl Serialize for Compression {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Compression {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// What [`encode`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReduceOptions {
    pub compression: Compression,
    /// Encode against a base (the previous checkpoint) where one is given.
    pub delta: bool,
}

/// What [`encode`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReduceStats {
    pub raw_bytes: u64,
    /// The whole blob, header included.
    pub encoded_bytes: u64,
    pub chunks: u64,
    pub same_chunks: u64,
    pub xor_chunks: u64,
    pub compressed_chunks: u64,
    pub raw_chunks: u64,
    /// Adam `exp_avg_sq` tensors XORed against their prediction.
    #[serde(default)]
    pub predicted_pairs: u64,
}

/// The checkpoint a delta blob needs to be decoded: its step and identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    pub step: u64,
    pub file_len: u64,
    pub chunk_size: u64,
    /// xxh3-128 of the base's chunk checksums (see [`manifest_identity`]).
    pub identity: Checksum,
}

impl BaseRef {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Kind {
    #[serde(rename = "raw")]
    Raw,
    #[serde(rename = "same")]
    Same,
    #[serde(rename = "lz4")]
    Lz4,
    #[serde(rename = "zstd")]
    Zstd,
    #[serde(rename = "xor-lz4")]
    XorLz4,
    #[serde(rename = "xor-zstd")]
    XorZstd,
}

impl Kind {
    fn uses_base(self) -> bool {
        matches!(self, Kind::Same | Kind::XorLz4 | Kind::XorZstd)
    }

    fn is_xor(self) -> bool {
        matches!(self, Kind::XorLz4 | Kind::XorZstd)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// Kind, offset of the payload in the payload area, payload length.
struct ChunkRec(Kind, u64, u64);

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    /// Step of the encoded shard (for messages).
    step: u64,
    file_len: u64,
    chunk_size: u64,
    identity: Checksum,
    base: Option<BaseRef>,
    chunks: Vec<ChunkRec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    predict: Vec<PredRec>,
}

/// A predicted pair in file byte offsets: `exp_avg` at `m.0..m.1`,
/// `exp_avg_sq` at `v..v + m.1 - m.0`, and the betas' f64 bit patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredRec {
    m: (u64, u64),
    v: u64,
    b1: u64,
    b2: u64,
}

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

fn worker_count(chunks: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(8).min(chunks).max(1)
}

/// Width of the byte planes: compressed kinds compress the chunk (or its
/// XOR against the base) split into 4 planes, byte k of every 4-byte word in
/// plane k. Tensor data starts 64-byte aligned and chunks are 4-MiB aligned,
/// so for fp32 the sign and exponent bytes, and for bf16 the high bytes, land
/// in planes of their own, which compress far better than interleaved with
/// random mantissa bytes (and XOR deltas of small updates are zero there).
const PLANES: usize = 4;

/// `dst` = the planes of `a` (XOR `b` where given); a tail of fewer than
/// [`PLANES`] bytes is appended as is.
fn to_planes(dst: &mut Vec<u8>, a: &[u8], b: Option<&[u8]>) {
    let q = a.len() / PLANES;
    dst.clear();
    dst.resize(a.len(), 0);
    let (body, tail) = dst.split_at_mut(q * PLANES);
    let (p0, rest) = body.split_at_mut(q);
    let (p1, rest) = rest.split_at_mut(q);
    let (p2, p3) = rest.split_at_mut(q);
    let planes = p0.iter_mut().zip(p1.iter_mut()).zip(p2.iter_mut()).zip(p3.iter_mut());
    match b {
        None => {
            for ((((x0, x1), x2), x3), w) in planes.zip(a.chunks_exact(PLANES)) {
                (*x0, *x1, *x2, *x3) = (w[0], w[1], w[2], w[3]);
            }
            tail.copy_from_slice(&a[q * PLANES..]);
        }
        Some(b) => {
            for ((((x0, x1), x2), x3), (w, v)) in planes.zip(a.chunks_exact(PLANES).zip(b.chunks_exact(PLANES))) {
                (*x0, *x1, *x2, *x3) = (w[0] ^ v[0], w[1] ^ v[1], w[2] ^ v[2], w[3] ^ v[3]);
            }
            for ((t, x), y) in tail.iter_mut().zip(&a[q * PLANES..]).zip(&b[q * PLANES..]) {
                *t = x ^ y;
            }
        }
    }
}

/// Inverse of [`to_planes`]: `dst` from the planes in `src` (XOR `b`).
fn from_planes(dst: &mut [u8], src: &[u8], b: Option<&[u8]>) {
    debug_assert_eq!(dst.len(), src.len());
    let q = src.len() / PLANES;
    let (p0, rest) = src.split_at(q);
    let (p1, rest) = rest.split_at(q);
    let (p2, rest) = rest.split_at(q);
    let (p3, tail) = rest.split_at(q);
    let (body, dtail) = dst.split_at_mut(q * PLANES);
    let planes = p0.iter().zip(p1).zip(p2).zip(p3);
    match b {
        None => {
            for ((((x0, x1), x2), x3), w) in planes.zip(body.chunks_exact_mut(PLANES)) {
                w.copy_from_slice(&[*x0, *x1, *x2, *x3]);
            }
            dtail.copy_from_slice(tail);
        }
        Some(b) => {
            for ((((x0, x1), x2), x3), (w, v)) in planes.zip(body.chunks_exact_mut(PLANES).zip(b.chunks_exact(PLANES)))
            {
                w.copy_from_slice(&[x0 ^ v[0], x1 ^ v[1], x2 ^ v[2], x3 ^ v[3]]);
            }
            for ((d, x), y) in dtail.iter_mut().zip(tail).zip(&b[q * PLANES..]) {
                *d = x ^ y;
            }
        }
    }
}

/// Chunks of at least this many bytes are encoded after sampling (see
/// [`Encoder::sample`]); smaller ones are compressed every way and the
/// smallest kept.
const SAMPLED_CHUNK: usize = 1 << 20;
/// Samples: this many slices of `SAMPLE_LEN` bytes spread over the chunk.
const SAMPLES: usize = 4;
const SAMPLE_LEN: usize = 64 << 10;
/// Samples that compress to more than this fraction of their size: the chunk
/// is stored raw without compressing it whole.
const INCOMPRESSIBLE: f64 = 0.97;

/// Sample `k` of a chunk of `len` (at least `SAMPLE_LEN`) bytes: a multiple
/// of [`PLANES`] bytes into the chunk.
fn sample_range(len: usize, k: usize) -> std::ops::Range<usize> {
    let a = (len - SAMPLE_LEN) * k / (SAMPLES - 1) / PLANES * PLANES;
    a..a + SAMPLE_LEN
}

/// Overwrites `dst`, which holds the base's bytes at file offsets `a..a +
/// dst.len()`, with the predictions of the `pairs`' v positions there, from
/// the new m in `data` and the base's m and v.
fn predict_base(pairs: &[Pair], data: &[u8], base: &[u8], a: usize, dst: &mut [u8]) {
    for (p, x, y) in predict::pieces(pairs, a, a + dst.len()) {
        let m = p.m + (x - p.v)..p.m + (y - p.v);
        predict::apply(&mut dst[x - a..y - a], &data[m.clone()], &base[m], &base[x..y], p.b1, p.b2, false);
    }
}

/// Pairs to predict in `data` against `base`, if any: only with compression
/// and chunks of whole f32 words.
fn pairs_for(data: &[u8], m: &Manifest, base: Option<&[u8]>, compression: Compression) -> Vec<Pair> {
    match base {
        Some(b) if compression != Compression::Off && m.chunk_size % 4 == 0 => predict::find_pairs(data, b),
        _ => Vec::new(),
    }
}

/// Per-worker compression state.
struct Encoder {
    compression: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    planes: Vec<u8>,
    out_a: Vec<u8>,
    out_b: Vec<u8>,
}

impl Encoder {
    fn new(compression: Compression) -> Result<Self, FormatError> {
        let zstd = match compression {
            Compression::Zstd(level) => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| FormatError::InvalidArgument(format!("zstd level {level}: {e}")))?,
            ),
            _ => None,
        };
        Ok(Self { compression, zstd, planes: Vec::new(), out_a: Vec::new(), out_b: Vec::new() })
    }

    /// Compresses `src` into `dst` (grown as needed); the compressed length.
    fn compress(
        compression: Compression,
        zstd: &mut Option<zstd::bulk::Compressor<'static>>,
        src: &[u8],
        dst: &mut Vec<u8>,
    ) -> Option<usize> {
        match compression {
            Compression::Off => None,
            Compression::Lz4 => {
                let need = lz4_flex::block::get_maximum_output_size(src.len());
                if dst.len() < need {
                    dst.resize(need, 0);
                }
                lz4_flex::block::compress_into(src, dst).ok()
            }
            Compression::Zstd(_) => {
                let need = zstd::zstd_safe::compress_bound(src.len());
                if dst.len() < need {
                    dst.resize(need, 0);
                }
                zstd.as_mut()?.compress_to_buffer(src, &mut dst[..]).ok()
            }
        }
    }

    /// Compressed size of samples of `chunk` (XOR `base`), and their size.
    fn sample(&mut self, chunk: &[u8], base: Option<&[u8]>) -> (usize, usize) {
        let (mut n, mut of) = (0, 0);
        for k in 0..SAMPLES {
            let r = sample_range(chunk.len(), k);
            to_planes(&mut self.planes, &chunk[r.clone()], base.map(|b| &b[r]));
            n += Self::compress(self.compression, &mut self.zstd, &self.planes, &mut self.out_b).unwrap_or(SAMPLE_LEN);
            of += SAMPLE_LEN;
        }
        (n, of)
    }

    /// The smallest encoding of `chunk` given the base's chunk of the same
    /// length (with predictions where any), if any, and whether the two have
    /// the same checksum.
    /// The kind and, for compressed kinds, where the bytes are (`out_a` or
    /// `out_b`, and their length).
    fn encode_chunk(&mut self, chunk: &[u8], base: Option<(&[u8], bool)>) -> (Kind, Option<(bool, usize)>) {
        if let Some((_, true)) = base {
            return (Kind::Same, None);
        }
        if self.compression == Compression::Off {
            return (Kind::Raw, None);
        }
        let (plain_kind, xor_kind) = match self.compression {
            Compression::Lz4 => (Kind::Lz4, Kind::XorLz4),
            _ => (Kind::Zstd, Kind::XorZstd),
        };
        let mut best: Option<(Kind, usize, bool)> = None; // (kind, len, in out_a)
        if chunk.len() >= SAMPLED_CHUNK {
            // Compress samples both ways; compress the whole chunk only the
            // way that wins, and not at all when nothing shrinks.
            let plain = self.sample(chunk, None);
            let xor = base.map(|(b, _)| self.sample(chunk, Some(b)));
            let (use_xor, (n, of)) = match xor {
                Some(x) if x.0 <= plain.0 => (true, x),
                _ => (false, plain),
            };
            if n as f64 >= of as f64 * INCOMPRESSIBLE {
                return (Kind::Raw, None);
            }
            to_planes(&mut self.planes, chunk, base.filter(|_| use_xor).map(|b| b.0));
            if let Some(n) = Self::compress(self.compression, &mut self.zstd, &self.planes, &mut self.out_a) {
                if n < chunk.len() {
                    best = Some((if use_xor { xor_kind } else { plain_kind }, n, true));
                }
            }
        } else {
            if let Some((b, _)) = base {
                to_planes(&mut self.planes, chunk, Some(b));
                if let Some(n) = Self::compress(self.compression, &mut self.zstd, &self.planes, &mut self.out_a) {
                    if n < chunk.len() {
                        best = Some((xor_kind, n, true));
                    }
                }
            }
            to_planes(&mut self.planes, chunk, None);
            if let Some(n) = Self::compress(self.compression, &mut self.zstd, &self.planes, &mut self.out_b) {
                if n < best.map_or(chunk.len(), |b| b.1) {
                    best = Some((plain_kind, n, false));
                }
            }
        }
        match best {
            None => (Kind::Raw, None),
            Some((kind, n, in_a)) => (kind, Some((in_a, n))),
        }
    }
}

/// Chunks sampled by [`estimate`], evenly spread over the shard.
const ESTIMATE_CHUNKS: usize = 8;

/// A cheap guess of `encode`'s size over the raw size: chunks the base holds
/// unchanged (same checksum) count as free, exactly; the others as what 64 KiB
/// samples of up to 8 of them compress to. A caller skips encoding where it
/// would not pay, so that data that does not shrink costs almost nothing.
/// About a hundredth of the work of `encode`.
pub fn estimate(data: &[u8], m: &Manifest, base: Option<(&[u8], &Manifest)>, opts: &ReduceOptions) -> f64 {
    if m.check_len(data.len()).is_err() || m.chunks.is_empty() {
        return 1.0;
    }
    let base = base.filter(|(b, bm)| opts.delta && bm.chunk_size == m.chunk_size && bm.check_len(b.len()).is_ok());
    let chunk = |i: usize| {
        let (a, b) = m.chunk_range(i);
        &data[a as usize..b as usize]
    };
    // The base's chunk of the same length, and whether it is unchanged.
    let base_chunk = |i: usize| {
        let (bd, bm) = base?;
        let (ba, bb) = bm.chunk_range(i);
        (i < bm.chunks.len() && (bb - ba) as usize == chunk(i).len())
            .then(|| (&bd[ba as usize..bb as usize], bm.chunks[i] == m.chunks[i]))
    };
    let changed: Vec<usize> = (0..m.chunks.len()).filter(|&i| !base_chunk(i).is_some_and(|(_, same)| same)).collect();
    let changed_bytes: usize = changed.iter().map(|&i| chunk(i).len()).sum();
    let total = data.len().max(1) as f64;
    if changed.is_empty() || opts.compression == Compression::Off {
        return changed_bytes as f64 / total;
    }
    let Ok(mut enc) = Encoder::new(opts.compression) else { return 1.0 };
    let pairs = pairs_for(data, m, base.map(|b| b.0), opts.compression);
    let mut pbase = Vec::new();
    let picks = ESTIMATE_CHUNKS.min(changed.len());
    let (mut est, mut of) = (0.0f64, 0.0f64);
    for k in 0..picks {
        let i = changed[if picks == 1 { 0 } else { k * (changed.len() - 1) / (picks - 1) }];
        let c = chunk(i);
        of += c.len() as f64;
        if c.len() < SAMPLE_LEN {
            est += c.len() as f64;
            continue;
        }
        let (plain, size) = enc.sample(c, None);
        let best = match (base_chunk(i), base) {
            (Some((bc, _)), Some((bd, _))) => {
                let a = m.chunk_range(i).0 as usize;
                let bc = if predict::pieces(&pairs, a, a + c.len()).next().is_some() {
                    // The base as encode XORs against, in the sampled ranges.
                    pbase.resize(c.len(), 0);
                    for k in 0..SAMPLES {
                        let r = sample_range(c.len(), k);
                        pbase[r.clone()].copy_from_slice(&bc[r.clone()]);
                        predict_base(&pairs, data, bd, a + r.start, &mut pbase[r]);
                    }
                    &pbase[..]
                } else {
                    bc
                };
                plain.min(enc.sample(c, Some(bc)).0)
            }
            _ => plain,
        };
        est += c.len() as f64 * (best as f64 / size as f64).min(1.0);
    }
    changed_bytes as f64 * (est / of.max(1.0)) / total
}

/// Encodes `data` (described by `m`) into a self-describing blob, against
/// `base` (the previous checkpoint's bytes and manifest) when `opts.delta`.
/// The blob names the base only if some chunk needs it.
pub fn encode(
    data: &[u8],
    m: &Manifest,
    base: Option<(&[u8], &Manifest)>,
    opts: &ReduceOptions,
) -> Result<(Vec<u8>, ReduceStats), FormatError> {
    m.check_len(data.len())?;
    check_shape(m, "encode")?;
    if let Compression::Zstd(level) = opts.compression {
        if !(1..=MAX_ZSTD_LEVEL).contains(&level) {
            return Err(FormatError::InvalidArgument(format!("zstd level {level} is not in 1..={MAX_ZSTD_LEVEL}")));
        }
    }
    let base = match base {
        Some((b, bm)) if opts.delta => {
            bm.check_len(b.len())?;
            check_shape(bm, "base")?;
            (bm.chunk_size == m.chunk_size).then_some((b, bm))
        }
        _ => None,
    };
    let n = m.chunks.len();
    let pairs = pairs_for(data, m, base.map(|b| b.0), opts.compression);
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<FormatError>> = Mutex::new(None);
    // The blob: prefix, payloads in the order workers finish them, header.
    // Zeroed memory comes untouched from the allocator: only the pages the
    // payloads take are faulted in, by the workers that write them.
    let header_room = 1024 + 64 * n + 128 * pairs.len();
    let mut blob = vec![0u8; PREFIX_LEN + data.len() + header_room];
    let (prefix, space) = blob.split_at_mut(PREFIX_LEN);
    let space_len = space.len();
    let free = Mutex::new(space);
    let mut results: Vec<(usize, ChunkRec)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..worker_count(n))
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    let mut pred = Vec::new(); // the predicted base's chunk
                    let mut enc = match Encoder::new(opts.compression) {
                        Ok(e) => e,
                        Err(e) => {
                            *failed.lock().unwrap() = Some(e);
                            return out;
                        }
                    };
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let (a, b) = m.chunk_range(i);
                        let chunk = &data[a as usize..b as usize];
                        let base_chunk = base.and_then(|(bd, bm)| {
                            if i >= bm.chunks.len() {
                                return None;
                            }
                            let (ba, bb) = bm.chunk_range(i);
                            (bb - ba == b - a).then(|| (&bd[ba as usize..bb as usize], bm.chunks[i] == m.chunks[i]))
                        });
                        let (a, b) = (a as usize, b as usize);
                        let base_chunk = match (base_chunk, base) {
                            (Some((bc, false)), Some((bd, _))) if predict::pieces(&pairs, a, b).next().is_some() => {
                                pred.clear();
                                pred.extend_from_slice(bc);
                                predict_base(&pairs, data, bd, a, &mut pred);
                                Some((&pred[..], false))
                            }
                            (other, _) => other,
                        };
                        let (kind, at) = enc.encode_chunk(chunk, base_chunk);
                        let src: &[u8] = match (kind, at) {
                            (Kind::Same, _) => &[],
                            (_, Some((true, n))) => &enc.out_a[..n],
                            (_, Some((false, n))) => &enc.out_b[..n],
                            (_, None) => chunk,
                        };
                        let (offset, dst) = {
                            let mut f = free.lock().unwrap();
                            let rest = std::mem::take(&mut *f);
                            let offset = space_len - rest.len();
                            let (dst, rest) = rest.split_at_mut(src.len());
                            *f = rest;
                            (offset, dst)
                        };
                        dst.copy_from_slice(src);
                        out.push((i, ChunkRec(kind, offset as u64, src.len() as u64)));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("encode worker")).collect()
    });
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e);
    }
    let payload_len = space_len - free.into_inner().unwrap().len();
    results.sort_unstable_by_key(|r| r.0);
    debug_assert_eq!(results.len(), n);

    let mut stats = ReduceStats { raw_bytes: data.len() as u64, chunks: n as u64, ..Default::default() };
    for (_, ChunkRec(kind, _, _)) in &results {
        match kind {
            Kind::Same => stats.same_chunks += 1,
            Kind::Raw => stats.raw_chunks += 1,
            Kind::Lz4 | Kind::Zstd => stats.compressed_chunks += 1,
            Kind::XorLz4 | Kind::XorZstd => stats.xor_chunks += 1,
        }
    }
    let recs: Vec<ChunkRec> = results.into_iter().map(|r| r.1).collect();
    let needs_base = recs.iter().any(|r| r.0.uses_base());
    // The pairs some Xor chunk was predicted with.
    let cs = m.chunk_size as usize;
    let predict: Vec<PredRec> = pairs
        .iter()
        .filter(|p| recs[p.v / cs..=(p.v + p.len - 1) / cs].iter().any(|r| r.0.is_xor()))
        .map(|p| PredRec {
            m: (p.m as u64, (p.m + p.len) as u64),
            v: p.v as u64,
            b1: p.b1.to_bits(),
            b2: p.b2.to_bits(),
        })
        .collect();
    stats.predicted_pairs = predict.len() as u64;
    let header = Header {
        step: m.key.step,
        file_len: m.file_len,
        chunk_size: m.chunk_size,
        identity: manifest_identity(m),
        base: base.filter(|_| needs_base).map(|(_, bm)| BaseRef::of(bm)),
        chunks: recs,
        predict,
    };
    let json = serde_json::to_vec(&header).expect("reduce header serializes");
    prefix[..7].copy_from_slice(MAGIC);
    // Without predictions the blob is one that version 1 readers decode.
    prefix[7] = if header.predict.is_empty() { 1 } else { BLOB_VERSION };
    prefix[8..PREFIX_LEN].copy_from_slice(&(json.len() as u64).to_le_bytes());
    blob.truncate(PREFIX_LEN + payload_len);
    blob.extend_from_slice(&json);
    blob.shrink_to_fit();
    stats.encoded_bytes = blob.len() as u64;
    Ok((blob, stats))
}

fn bad_header(file: &str, reason: impl Into<String>) -> FormatError {
    FormatError::InvalidHeader { file: file.to_string(), reason: reason.into() }
}

/// Checks the header's predictions (`version`: the blob's); the pairs,
/// sorted by `v`.
fn check_predict(h: &Header, version: u8) -> Result<Vec<Pair>, String> {
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

/// Splits a blob into its header, validated predictions and payload; never
/// panics.
fn parse<'a>(blob: &'a [u8], file: &str) -> Result<(Header, Vec<Pair>, &'a [u8]), FormatError> {
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
    if h.chunk_size == 0 || h.chunks.len() as u64 != h.file_len.div_ceil(h.chunk_size) {
        return Err(bad_header(
            file,
            format!(
                "reduced blob header: {} chunks for {} bytes in chunks of {}",
                h.chunks.len(),
                h.file_len,
                h.chunk_size
            ),
        ));
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
            return Err(bad_header(
                file,
                format!("reduced blob header: chunk {i} ({kind:?}) of {clen} bytes has a payload of {len}"),
            ));
        }
        if kind.uses_base() {
            match &h.base {
                None => {
                    return Err(bad_header(
                        file,
                        format!("reduced blob header: chunk {i} refers to a base the blob does not name"),
                    ))
                }
                Some(b) => {
                    let end = (i as u64).checked_mul(h.chunk_size).and_then(|a| a.checked_add(clen));
                    if b.chunk_size != h.chunk_size || end.is_none_or(|e| e > b.file_len) {
                        return Err(bad_header(
                            file,
                            format!("reduced blob header: chunk {i} lies outside its base of {} bytes", b.file_len),
                        ));
                    }
                }
            }
        }
        if offset.checked_add(*len).is_none_or(|e| e > payload.len() as u64) {
            return Err(FormatError::Truncated {
                file: file.to_string(),
                expected: (PREFIX_LEN as u64 + hlen).saturating_add(*offset).saturating_add(*len),
                found: blob.len() as u64,
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
            return Err(bad_header(
                file,
                format!("reduced blob header: payloads leave a gap or overlap at byte {end} of {}", payload.len()),
            ));
        }
        end = offset + len;
    }
    if end != payload.len() as u64 {
        return Err(bad_header(
            file,
            format!("reduced blob header: payloads cover {end} of the {} payload bytes", payload.len()),
        ));
    }
    let pairs = check_predict(&h, blob[7]).map_err(|r| bad_header(file, format!("reduced blob header: {r}")))?;
    Ok((h, pairs, payload))
}

/// The checkpoint `blob` needs as its base, if any.
pub fn base_of(blob: &[u8]) -> Result<Option<BaseRef>, FormatError> {
    Ok(parse(blob, "reduced blob")?.0.base)
}

/// Rebuilds into `out` the bytes that `m` describes from `blob`, using
/// `base` (the bytes of the checkpoint [`base_of`] names) where the blob is a
/// delta. Every chunk is verified against `m`; `file` names the shard in
/// errors. On error `out` holds unspecified bytes.
pub fn decode_into(
    blob: &[u8],
    m: &Manifest,
    base: Option<&[u8]>,
    out: &mut [u8],
    file: &str,
) -> Result<(), FormatError> {
    check_shape(m, "decode")?;
    let (h, pairs, payload) = parse(blob, file)?;
    if h.file_len != m.file_len || h.chunk_size != m.chunk_size || h.identity != manifest_identity(m) {
        return Err(bad_header(
            file,
            format!(
                "the reduced blob encodes step {} ({} bytes in chunks of {}), not the shard its manifest describes ({}: {} bytes in chunks of {})",
                h.step, h.file_len, h.chunk_size, m.key, m.file_len, m.chunk_size
            ),
        ));
    }
    if out.len() as u64 != m.file_len {
        return Err(FormatError::InvalidArgument(format!(
            "{file}: output buffer of {} bytes for a {}-byte shard",
            out.len(),
            m.file_len
        )));
    }
    let base = match (&h.base, base) {
        (None, _) => None,
        (Some(b), None) => {
            return Err(FormatError::InvalidArgument(format!(
                "{file}: delta of step {} needs its base, step {} ({} bytes), which is missing",
                h.step, b.step, b.file_len
            )))
        }
        (Some(b), Some(d)) if d.len() as u64 != b.file_len => {
            return Err(FormatError::InvalidArgument(format!(
                "{file}: delta of step {} needs its base, step {} of {} bytes; the base given has {} bytes",
                h.step,
                b.step,
                b.file_len,
                d.len()
            )))
        }
        (Some(_), Some(d)) => Some(d),
    };
    let n = h.chunks.len();
    if n == 0 {
        return Ok(());
    }
    let cs = m.chunk_size as usize;
    // Phase 1: every chunk. Xor chunks holding predicted v keep the residual
    // there, and are verified in phase 2.
    let work = Mutex::new(out.chunks_mut(cs).enumerate());
    let stop = AtomicBool::new(false);
    let (errors, deferred): (Vec<Option<FormatError>>, Vec<Vec<usize>>) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..worker_count(n))
            .map(|_| {
                s.spawn(|| {
                    let mut zstd: Option<zstd::bulk::Decompressor<'static>> = None;
                    let mut planes = Vec::new();
                    let mut first: Option<FormatError> = None;
                    let mut deferred = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let Some((i, dst)) = work.lock().unwrap().next() else { break };
                        let ChunkRec(kind, offset, len) = h.chunks[i];
                        let src = &payload[offset as usize..(offset + len) as usize]; // checked by parse
                        let base_chunk = base.filter(|_| kind.uses_base()).map(|b| &b[i * cs..i * cs + dst.len()]);
                        let decoded = match decode_chunk(kind, src, base_chunk, dst, &mut planes, &mut zstd, file) {
                            Ok(d) => d,
                            Err(e) => {
                                first.get_or_insert(e);
                                stop.store(true, Ordering::Relaxed);
                                break;
                            }
                        };
                        let a = i * cs;
                        let predicted =
                            decoded && kind.is_xor() && predict::pieces(&pairs, a, a + dst.len()).next().is_some();
                        if let Some(b) = base.filter(|_| predicted) {
                            // Undo the XOR with the base: the residual against the prediction.
                            for (_, x, y) in predict::pieces(&pairs, a, a + dst.len()) {
                                dst[x - a..y - a].iter_mut().zip(&b[x..y]).for_each(|(d, b)| *d ^= b);
                            }
                            deferred.push(i);
                            continue;
                        }
                        let found = xxh3_128(dst);
                        if !decoded || found != m.chunks[i].0 {
                            first.get_or_insert(mismatch(m, file, i, found));
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    (first, deferred)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("decode worker")).unzip()
    });
    let first = errors.into_iter().flatten().min_by_key(|e| match e {
        FormatError::ChecksumMismatch { chunk, .. } => *chunk,
        _ => 0,
    });
    // Phase 2, below the first bad chunk (every chunk below it is decoded).
    let limit = match &first {
        None => n,
        Some(FormatError::ChecksumMismatch { chunk, .. }) => *chunk,
        Some(_) => 0,
    };
    let deferred: Vec<usize> = deferred.into_iter().flatten().filter(|&i| i < limit).collect();
    if let (false, Some(b)) = (deferred.is_empty(), base) {
        if let Some(e) = finish_predicted(out, b, &pairs, m, deferred, limit, file)? {
            return Err(e);
        }
    }
    first.map_or(Ok(()), Err)
}

fn mismatch(m: &Manifest, file: &str, i: usize, found: u128) -> FormatError {
    let (offset, end) = m.chunk_range(i);
    FormatError::ChecksumMismatch {
        file: file.to_string(),
        chunk: i,
        offset,
        end,
        expected: Hex(m.chunks[i].0),
        found: Hex(found),
    }
}

/// Phase 2 of [`decode_into`]: XORs the predictions into the v pieces of the
/// `deferred` chunks, from the decoded m (which must lie below chunk `limit`,
/// all decoded; chunks whose m does not are skipped) and the base, then
/// verifies those chunks; the lowest mismatch.
fn finish_predicted(
    out: &mut [u8],
    base: &[u8],
    pairs: &[Pair],
    m: &Manifest,
    mut deferred: Vec<usize>,
    limit: usize,
    file: &str,
) -> Result<Option<FormatError>, FormatError> {
    let cs = m.chunk_size as usize;
    let len = out.len();
    let decoded_end = limit.saturating_mul(cs).min(len);
    let range = |i: usize| i * cs..((i + 1) * cs).min(len);
    let pieces = |i: usize| predict::pieces(pairs, range(i).start, range(i).end);
    deferred.retain(|&i| pieces(i).all(|(p, _, y)| p.m + (y - p.v) <= decoded_end));
    deferred.sort_unstable();
    // Each piece: its v (to XOR) and m (to read) in `out`, all disjoint
    // (checked by parse), split off `out` in file order.
    let mut items = Vec::new(); // (v offset, m offset, length, b1, b2)
    let mut segs = Vec::new(); // (start, end, index in `parts`: 2 * item, + 1 for m)
    for &i in &deferred {
        for (p, x, y) in pieces(i) {
            let mx = p.m + (x - p.v);
            segs.extend([(x, y, 2 * items.len()), (mx, mx + (y - x), 2 * items.len() + 1)]);
            items.push((x, mx, y - x, p.b1, p.b2));
        }
    }
    segs.sort_unstable();
    {
        let mut parts: Vec<Option<&mut [u8]>> = (0..segs.len()).map(|_| None).collect();
        let (mut rest, mut pos) = (&mut *out, 0);
        for (a, b, k) in segs {
            if a < pos || b - pos > rest.len() {
                return Err(bad_header(file, "reduced blob header: predicted ranges overlap"));
            }
            let (seg, tail) = std::mem::take(&mut rest)[a - pos..].split_at_mut(b - a);
            (rest, pos) = (tail, b);
            parts[k] = Some(seg);
        }
        let mut parts = parts.into_iter();
        let mut tasks = Vec::with_capacity(items.len());
        for &(x, mx, len, b1, b2) in &items {
            let (Some(Some(v)), Some(Some(m_new))) = (parts.next(), parts.next()) else {
                return Err(bad_header(file, "reduced blob header: predicted ranges overlap"));
            };
            tasks.push((v, &*m_new, &base[mx..mx + len], &base[x..x + len], b1, b2));
        }
        let work = Mutex::new(tasks.into_iter());
        std::thread::scope(|s| {
            for _ in 0..worker_count(items.len()) {
                s.spawn(|| loop {
                    let Some((v, m_new, m_old, v_old, b1, b2)) = work.lock().unwrap().next() else { break };
                    predict::apply(v, m_new, m_old, v_old, b1, b2, true);
                });
            }
        });
    }
    let out: &[u8] = out;
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let bad = std::thread::scope(|s| {
        let handles: Vec<_> = (0..worker_count(deferred.len()))
            .map(|_| {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(&i) = deferred.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                        let found = xxh3_128(&out[range(i)]);
                        if found != m.chunks[i].0 {
                            stop.store(true, Ordering::Relaxed);
                            return Some(mismatch(m, file, i, found));
                        }
                    }
                    None
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().expect("verify worker")).collect::<Vec<_>>()
    });
    Ok(bad.into_iter().min_by_key(|e| match e {
        FormatError::ChecksumMismatch { chunk, .. } => *chunk,
        _ => 0,
    }))
}

/// Fills `dst` from one chunk's payload (`planes` is scratch); false when
/// the payload does not decompress to exactly `dst.len()` bytes (the caller
/// reports the chunk as a checksum mismatch, with the checksum of whatever
/// `dst` then holds).
fn decode_chunk(
    kind: Kind,
    src: &[u8],
    base: Option<&[u8]>,
    dst: &mut [u8],
    planes: &mut Vec<u8>,
    zstd: &mut Option<zstd::bulk::Decompressor<'static>>,
    file: &str,
) -> Result<bool, FormatError> {
    let base_chunk = || base.expect("parse checked that chunks using the base have one");
    match kind {
        Kind::Raw => {
            dst.copy_from_slice(src);
            return Ok(true);
        }
        Kind::Same => {
            dst.copy_from_slice(base_chunk());
            return Ok(true);
        }
        _ => {}
    }
    planes.clear();
    planes.resize(dst.len(), 0);
    let ok = match kind {
        Kind::Lz4 | Kind::XorLz4 => matches!(lz4_flex::block::decompress_into(src, planes), Ok(n) if n == dst.len()),
        _ => {
            if zstd.is_none() {
                *zstd = Some(
                    zstd::bulk::Decompressor::new().map_err(|e| bad_header(file, format!("zstd decompressor: {e}")))?,
                );
            }
            let z = zstd.as_mut().unwrap();
            matches!(z.decompress_to_buffer(src, &mut planes[..]), Ok(n) if n == dst.len())
        }
    };
    if ok {
        let b = matches!(kind, Kind::XorLz4 | Kind::XorZstd).then(base_chunk);
        from_planes(dst, planes, b);
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        chunk_checksums, parse_shard, Dtype, ShardKey, ShardLayout, TensorSpec, DEFAULT_CHUNK_SIZE, FORMAT_VERSION,
    };
    use proptest::prelude::*;

    const CS: u64 = 4096;

    fn man(data: &[u8], step: u64, chunk_size: u64) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION.to_string(),
            key: ShardKey::new("ns", step, 0),
            world_size: 1,
            file_len: data.len() as u64,
            chunk_size,
            chunks: chunk_checksums(data, chunk_size),
            created_unix_ms: 0,
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// bf16-like weights: random mantissas, few exponents (compressible).
    fn weights(n_bytes: usize, seed: u64) -> Vec<u8> {
        let mut r = Rng(seed | 1);
        let mut v = Vec::with_capacity(n_bytes);
        while v.len() < n_bytes {
            let x = r.next();
            let exp = 0x3c + (x >> 60) as u16 % 3; // |w| ~ 2^-7..2^-5
            let bf = ((x & 1) as u16) << 15 | exp << 7 | ((x >> 8) & 0x7f) as u16;
            v.extend_from_slice(&bf.to_le_bytes());
        }
        v.truncate(n_bytes);
        v
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut r = Rng(seed | 1);
        (0..n).map(|_| r.next() as u8).collect()
    }

    fn opts(compression: Compression, delta: bool) -> ReduceOptions {
        ReduceOptions { compression, delta }
    }

    fn round_trip(data: &[u8], m: &Manifest, base: Option<(&[u8], &Manifest)>, o: &ReduceOptions) -> ReduceStats {
        let (blob, stats) = encode(data, m, base, o).unwrap();
        assert_eq!(stats.encoded_bytes, blob.len() as u64);
        assert_eq!(stats.raw_bytes, data.len() as u64);
        assert_eq!(stats.chunks, m.chunks.len() as u64);
        assert_eq!(stats.same_chunks + stats.xor_chunks + stats.compressed_chunks + stats.raw_chunks, stats.chunks);
        let needs = base_of(&blob).unwrap();
        if let Some(b) = needs {
            let (_, bm) = base.expect("a blob needs a base only if it got one");
            assert!(b.matches(bm));
            assert!(o.delta);
        }
        let mut out = vec![0xAAu8; data.len()];
        decode_into(&blob, m, needs.and(base.map(|b| b.0)), &mut out, "f").unwrap();
        assert!(out == data, "round trip differs ({o:?})");
        // Extra base given to a blob that needs none: ignored.
        if needs.is_none() {
            let mut out2 = vec![0u8; data.len()];
            decode_into(&blob, m, Some(&[1, 2, 3]), &mut out2, "f").unwrap();
            assert!(out2 == data);
        }
        stats
    }

    #[test]
    fn round_trip_every_combination() {
        let len = 10 * CS as usize + 123;
        let base = weights(len, 1);
        let m_base = man(&base, 1, CS);
        let mut partly = base.clone();
        for i in (0..len).step_by(3 * CS as usize) {
            partly[i + 7] ^= 0x5a; // chunks 0, 3, 6, 9 change
        }
        let longer = {
            let mut v = base.clone();
            v.extend_from_slice(&weights(5000, 9));
            v
        };
        let shorter = base[..len - 5000].to_vec();
        let other_cs = man(&base, 1, CS * 2);
        type Case<'a> = (&'a str, Vec<u8>, Option<(&'a [u8], &'a Manifest)>);
        let cases: Vec<Case> = vec![
            ("none", partly.clone(), None),
            ("identical", base.clone(), Some((&base, &m_base))),
            ("partly changed", partly.clone(), Some((&base, &m_base))),
            ("longer than base", longer.clone(), Some((&base, &m_base))),
            ("shorter than base", shorter.clone(), Some((&base, &m_base))),
            ("base of another chunk size", partly.clone(), Some((&base, &other_cs))),
            ("empty", Vec::new(), Some((&base, &m_base))),
        ];
        for c in [Compression::Off, Compression::Lz4, Compression::Zstd(1), Compression::Zstd(3)] {
            for delta in [false, true] {
                for (name, data, b) in &cases {
                    let m = man(data, 2, CS);
                    let s = round_trip(data, &m, *b, &opts(c, delta));
                    if !delta || b.is_none() || *name == "base of another chunk size" {
                        assert_eq!(s.same_chunks + s.xor_chunks, 0, "{name} {c} {delta}");
                    }
                    if c == Compression::Off {
                        assert_eq!(s.compressed_chunks + s.xor_chunks, 0);
                    }
                    if delta && *name == "identical" {
                        assert_eq!(s.same_chunks, s.chunks, "{c}");
                        assert!(s.encoded_bytes < 2000, "{s:?}");
                    }
                    if delta && *name == "partly changed" {
                        assert_eq!(s.same_chunks, 7, "{c}");
                        if c != Compression::Off {
                            assert_eq!(s.xor_chunks, 4, "{c}");
                        }
                    }
                    if delta && name.contains("than base") {
                        // All full chunks in common are Same; the tail is not.
                        assert!(s.same_chunks >= 8, "{name} {s:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn planes_round_trip() {
        for n in 0..20 {
            let a = random(n, 1 + n as u64);
            let b = random(n, 100 + n as u64);
            for base in [None, Some(&b[..])] {
                let mut p = Vec::new();
                to_planes(&mut p, &a, base);
                let mut back = vec![0u8; n];
                from_planes(&mut back, &p, base);
                assert_eq!(back, a, "{n}");
            }
        }
        let mut p = Vec::new();
        to_planes(&mut p, &[1, 2, 3, 4, 5, 6, 7, 8, 9], None);
        assert_eq!(p, [1, 5, 2, 6, 3, 7, 4, 8, 9]);
    }

    #[test]
    fn large_chunks_are_sampled_and_round_trip() {
        let cs = 1u64 << 20;
        let base = weights(5 * cs as usize + 1001, 41);
        let mb = man(&base, 1, cs);
        let mut data = base.clone();
        for i in (0..data.len()).step_by(4096) {
            data[i] ^= 1; // every chunk changes a little: XOR wins
        }
        data[2 * cs as usize..3 * cs as usize].copy_from_slice(&random(cs as usize, 3)); // raw
        data[3 * cs as usize..4 * cs as usize].copy_from_slice(&weights(cs as usize, 77)); // plain wins
        let m = man(&data, 2, cs);
        for c in [Compression::Lz4, Compression::Zstd(1)] {
            let s = round_trip(&data, &m, Some((&base, &mb)), &opts(c, true));
            assert_eq!(s.raw_chunks, 1, "{c}: {s:?}");
            assert_eq!(s.xor_chunks, 4, "{c}: {s:?}");
            // The new weights (a fifth) stay about their size, the rest shrinks.
            assert!(s.encoded_bytes < s.raw_bytes / 2, "{c}: {s:?}");
            let s = round_trip(&data, &m, None, &opts(c, false));
            assert_eq!(s.raw_chunks, 1, "{c}: {s:?}");
        }
        let s = round_trip(&data, &m, Some((&base, &mb)), &opts(Compression::Zstd(1), true));
        assert_eq!(s.compressed_chunks, 1, "{s:?}");
    }

    #[test]
    fn weights_compress() {
        let data = weights(64 * CS as usize, 3);
        let m = man(&data, 1, CS);
        // lz4 finds no 4-byte repeats in random mantissas: raw; zstd's
        // entropy coding takes the exponent bytes' redundancy.
        let s = round_trip(&data, &m, None, &opts(Compression::Lz4, false));
        assert!(s.encoded_bytes <= s.raw_bytes + 2048, "{s:?}");
        let s = round_trip(&data, &m, None, &opts(Compression::Zstd(1), false));
        assert!(s.encoded_bytes < s.raw_bytes * 85 / 100, "{s:?}");
        assert!(s.compressed_chunks == s.chunks, "{s:?}");
    }

    #[test]
    fn estimate_tells_what_shrinks() {
        let r = random(8 << 20, 5);
        let mr = man(&r, 1, 4 << 20);
        let z = ReduceOptions { compression: Compression::Zstd(1), delta: true };
        assert!(estimate(&r, &mr, None, &z) > 0.97);
        let w = weights(8 << 20, 5);
        let mw = man(&w, 1, 4 << 20);
        let plain = estimate(&w, &mw, None, &z);
        assert!(plain < 0.95, "{plain}");
        // Against itself every chunk is unchanged: free.
        assert_eq!(estimate(&r, &mr, Some((&r, &mr)), &z), 0.0);
        let off = ReduceOptions { compression: Compression::Off, delta: true };
        assert_eq!(estimate(&w, &mw, None, &off), 1.0);
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let data = random(50 * CS as usize + 17, 5);
        let m = man(&data, 1, CS);
        let other = random(data.len(), 6);
        let mo = man(&other, 0, CS);
        for c in [Compression::Off, Compression::Lz4, Compression::Zstd(1), Compression::Zstd(3)] {
            for base in [None, Some((&other[..], &mo))] {
                let s = round_trip(&data, &m, base, &opts(c, true));
                assert_eq!(s.raw_chunks, s.chunks, "{c}: {s:?}");
                // Header: a fixed part plus about 25 bytes per chunk record.
                assert!(s.encoded_bytes <= s.raw_bytes + 256 + 32 * s.chunks, "{c}: {s:?}");
            }
        }
    }

    /// Byte offset in the blob of chunk `i`'s payload.
    fn payload_offset(blob: &[u8], i: usize) -> usize {
        let (h, _, _) = parse(blob, "t").unwrap();
        PREFIX_LEN + h.chunks[i].1 as usize
    }

    #[test]
    fn flipped_payload_byte_names_the_chunk() {
        let base = weights(8 * CS as usize, 11);
        let mb = man(&base, 4, CS);
        let mut data = base.clone();
        data[5 * CS as usize + 10] ^= 1;
        data[6 * CS as usize + 10] ^= 1;
        let m = man(&data, 5, CS);
        for c in [Compression::Off, Compression::Lz4, Compression::Zstd(1)] {
            for delta in [false, true] {
                let (blob, _) = encode(&data, &m, Some((&base, &mb)), &opts(c, delta)).unwrap();
                let len5 = parse(&blob, "t").unwrap().0.chunks[5].2 as usize;
                for k in [0usize, 10, 100, len5 / 2, len5 - 1] {
                    let mut bad = blob.clone();
                    let at = payload_offset(&bad, 5) + k.min(len5 - 1);
                    bad[at] ^= 0x40;
                    let mut out = vec![0u8; data.len()];
                    let e = decode_into(&bad, &m, Some(&base), &mut out, "step5.safetensors").unwrap_err();
                    let s = e.to_string();
                    assert!(matches!(e, FormatError::ChecksumMismatch { chunk: 5, .. }), "{c} {delta} {k}: {s}");
                    assert!(s.contains("step5.safetensors") && s.contains(&format!("{:032x}", m.chunks[5].0)), "{s}");
                    assert!(s.contains(&format!("bytes {}..{}", 5 * CS, 6 * CS)), "{s}");
                }
            }
        }
    }

    #[test]
    fn missing_or_wrong_base_is_detected() {
        let base = weights(6 * CS as usize, 21);
        let mb = man(&base, 7, CS);
        let mut data = base.clone();
        data[100] ^= 3;
        let m = man(&data, 8, CS);
        for c in [Compression::Off, Compression::Zstd(1)] {
            let (blob, _) = encode(&data, &m, Some((&base, &mb)), &opts(c, true)).unwrap();
            let r = base_of(&blob).unwrap().unwrap();
            assert_eq!((r.step, r.file_len), (7, base.len() as u64));
            let mut out = vec![0u8; data.len()];
            let s = decode_into(&blob, &m, None, &mut out, "f8").unwrap_err().to_string();
            assert!(s.contains("f8") && s.contains("step 8") && s.contains("step 7") && s.contains("missing"), "{s}");
            let s = decode_into(&blob, &m, Some(&base[1..]), &mut out, "f8").unwrap_err().to_string();
            assert!(s.contains("step 7") && s.contains(&format!("{} bytes", base.len() - 1)), "{s}");
            // A base of the right length but other bytes: the first chunk taken from it fails.
            let wrong = weights(base.len(), 22);
            let e = decode_into(&blob, &m, Some(&wrong), &mut out, "f8").unwrap_err();
            assert!(matches!(e, FormatError::ChecksumMismatch { .. }), "{e}");
            // The blob of another shard.
            let e = decode_into(&blob, &mb, Some(&base), &mut out, "f8").unwrap_err();
            assert!(matches!(e, FormatError::InvalidHeader { .. }), "{e}");
        }
    }

    #[test]
    fn bad_prefixes_are_refused() {
        let data = weights(3 * CS as usize, 2);
        let m = man(&data, 1, CS);
        let (blob, _) = encode(&data, &m, None, &opts(Compression::Lz4, false)).unwrap();
        let mut out = vec![0u8; data.len()];
        for v in [0u8, 3, 255] {
            let mut other = blob.clone();
            other[7] = v;
            let e = decode_into(&other, &m, None, &mut out, "f").unwrap_err();
            assert!(matches!(e, FormatError::UnsupportedVersion { .. }), "{e}");
        }
        let mut magic = blob.clone();
        magic[0] = b'X';
        assert!(matches!(base_of(&magic), Err(FormatError::InvalidHeader { .. })));
        for cut in [0, 5, 16, 40, blob.len() - 1] {
            let e = decode_into(&blob[..cut], &m, None, &mut out, "f").unwrap_err();
            assert!(e.is_corruption(), "{e}");
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(decode_into(&long, &m, None, &mut out, "f").unwrap_err().is_corruption());
        let mut short_out = vec![0u8; data.len() - 1];
        assert!(decode_into(&blob, &m, None, &mut short_out, "f").is_err());
    }

    #[test]
    fn compression_parses_and_displays() {
        for (s, c) in [
            ("off", Compression::Off),
            ("lz4", Compression::Lz4),
            ("zstd", Compression::Zstd(DEFAULT_ZSTD_LEVEL)),
            ("zstd:1", Compression::Zstd(1)),
            ("zstd:19", Compression::Zstd(19)),
        ] {
            assert_eq!(s.parse::<Compression>().unwrap(), c);
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
        }
        for bad in ["", "gzip", "zstd:", "zstd:0", "zstd:20", "zstd:-1", "zstd:+3", "ZSTD", "lz4:1", "zstd:1x"] {
            let e = bad.parse::<Compression>().unwrap_err();
            let s = e.to_string();
            assert!(
                matches!(e, FormatError::InvalidArgument(_)) && s.contains(&format!("{bad:?}")) && s.contains("zstd:N"),
                "{s}"
            );
        }
        assert_eq!(serde_json::to_string(&Compression::Zstd(3)).unwrap(), "\"zstd:3\"");
        assert_eq!(serde_json::from_str::<Compression>("\"lz4\"").unwrap(), Compression::Lz4);
        let data = weights(100, 1);
        let m = man(&data, 1, CS);
        assert!(encode(&data, &m, None, &opts(Compression::Zstd(40), false)).is_err());
    }

    /// A small training state, stepped like PyTorch's Adam in f32: a frozen
    /// bf16 tensor and three trainable bf16 tensors of `n` parameters with
    /// fp32 moments `optim.layers.{i}.exp_avg` and `.exp_avg_sq` (betas 0.9
    /// and 0.999, the last 0.9 and 0.95).
    struct Train {
        frozen: Vec<u16>,
        layers: Vec<Layer>,
        rng: Rng,
    }

    struct Layer {
        w: Vec<u16>,
        m: Vec<f32>,
        v: Vec<f32>,
        b1: f32,
        b2: f32,
        scale: f32,
    }

    fn bf16(x: f32) -> u16 {
        let b = x.to_bits();
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }

    impl Rng {
        fn uniform(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32
        }

        fn normal(&mut self) -> f32 {
            let x = self.next();
            let s = (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
            (s as f32 / 65536.0 - 2.0) * 1.732_050_8
        }
    }

    impl Train {
        fn new(n: usize, frozen: usize, seed: u64) -> Self {
            let mut rng = Rng(seed | 1);
            let frozen = (0..frozen).map(|_| bf16(0.02 * rng.normal())).collect();
            let layers = [(0.9, 0.999, 1e-3), (0.9, 0.999, 3e-5), (0.9, 0.95, 1e-2)]
                .into_iter()
                .map(|(b1, b2, scale): (f32, f32, f32)| Layer {
                    w: (0..n).map(|_| bf16(0.02 * rng.normal())).collect(),
                    m: (0..n).map(|_| 0.3 * scale * rng.normal()).collect(),
                    v: (0..n).map(|_| scale * scale * (0.5 + rng.uniform())).collect(),
                    b1,
                    b2,
                    scale,
                })
                .collect();
            Train { frozen, layers, rng }
        }

        fn step(&mut self) {
            for l in &mut self.layers {
                for ((w, m), v) in l.w.iter_mut().zip(&mut l.m).zip(&mut l.v) {
                    let g = l.scale * (0.3 * m.signum() + self.rng.normal());
                    *m = l.b1 * *m + (1.0 - l.b1) * g;
                    *v = l.b2 * *v + (1.0 - l.b2) * g * g;
                    *w = bf16(f32::from_bits((*w as u32) << 16) - 1e-4 * *m / (v.sqrt() + 1e-8));
                }
            }
        }

        /// The safetensors bytes; with `hide`, `exp_avg_sq` is spelled
        /// `exp_avg_sQ` (same layout, nothing to predict).
        fn bytes(&self, hide: bool) -> Vec<u8> {
            let sq = if hide { "exp_avg_sQ" } else { "exp_avg_sq" };
            let spec = |name: String, dtype, n| TensorSpec { name, dtype, shape: vec![n] };
            // 3 bytes at the end: the last chunk ends in a tail of under 4 bytes.
            let mut specs =
                vec![spec("frozen.weight".into(), Dtype::BF16, self.frozen.len()), spec("odd".into(), Dtype::U8, 3)];
            let mut tensors: Vec<Vec<u8>> =
                vec![self.frozen.iter().flat_map(|x| x.to_le_bytes()).collect(), vec![1, 2, 3]];
            for (i, l) in self.layers.iter().enumerate() {
                specs.push(spec(format!("layers.{i}.weight"), Dtype::BF16, l.w.len()));
                tensors.push(l.w.iter().flat_map(|x| x.to_le_bytes()).collect());
                specs.push(spec(format!("optim.layers.{i}.exp_avg"), Dtype::F32, l.m.len()));
                tensors.push(l.m.iter().flat_map(|x| x.to_le_bytes()).collect());
                specs.push(spec(format!("optim.layers.{i}.{sq}"), Dtype::F32, l.v.len()));
                tensors.push(l.v.iter().flat_map(|x| x.to_le_bytes()).collect());
            }
            let layout = ShardLayout::new(&specs, &Default::default()).unwrap();
            let mut f = vec![0u8; layout.file_len as usize];
            f[..layout.header.len()].copy_from_slice(&layout.header);
            for (e, t) in layout.entries.iter().zip(&tensors) {
                f[e.range()].copy_from_slice(t);
            }
            f
        }
    }

    /// Base and new shard `steps` Adam steps apart, with their manifests in
    /// chunks of `cs`; with `hide`, nothing is recognised as Adam.
    fn adam_pair(t: &mut Train, steps: usize, cs: u64, hide: bool) -> (Vec<u8>, Manifest, Vec<u8>, Manifest) {
        let base = t.bytes(hide);
        for _ in 0..steps {
            t.step();
        }
        let data = t.bytes(hide);
        let (mb, m) = (man(&base, 10, cs), man(&data, 11, cs));
        (base, mb, data, m)
    }

    #[test]
    fn adam_second_moments_are_predicted_and_round_trip() {
        for cs in [64 << 10, 1 << 20, DEFAULT_CHUNK_SIZE] {
            for c in [Compression::Lz4, Compression::Zstd(1)] {
                let (base, mb, data, m) = adam_pair(&mut Train::new(300_000, 2_000_000, 1), 1, cs, false);
                let s = round_trip(&data, &m, Some((&base, &mb)), &opts(c, true));
                let (hbase, hmb, hdata, hm) = adam_pair(&mut Train::new(300_000, 2_000_000, 1), 1, cs, true);
                assert_eq!(hdata.len(), data.len());
                let plain = round_trip(&hdata, &hm, Some((&hbase, &hmb)), &opts(c, true));
                eprintln!(
                    "chunks of {cs}, {c}: {:.3} of the raw size predicted, {:.3} not ({} and {} bytes)",
                    s.encoded_bytes as f64 / s.raw_bytes as f64,
                    plain.encoded_bytes as f64 / plain.raw_bytes as f64,
                    s.encoded_bytes,
                    plain.encoded_bytes
                );
                assert_eq!(s.predicted_pairs, 3, "{cs} {c}: {s:?}");
                assert_eq!(plain.predicted_pairs, 0);
                // The second moments, 2/7 of the bytes, nearly vanish.
                assert!(s.encoded_bytes * 10 < plain.encoded_bytes * 7, "{cs} {c}: {s:?} against {plain:?}");
                // Estimates see it too.
                let z = opts(c, true);
                let (est, hest) =
                    (estimate(&data, &m, Some((&base, &mb)), &z), estimate(&hdata, &hm, Some((&hbase, &hmb)), &z));
                assert!(est < hest * 0.85, "{cs} {c}: {est} against {hest}");
                // Without delta or compression, nothing is predicted.
                for o in [opts(c, false), opts(Compression::Off, true)] {
                    assert_eq!(round_trip(&data, &m, Some((&base, &mb)), &o).predicted_pairs, 0);
                }
            }
        }
        // The header lists each pair with its exact betas.
        let (base, mb, data, m) = adam_pair(&mut Train::new(10_000, 100, 2), 1, 4096, false);
        let (blob, _) = encode(&data, &m, Some((&base, &mb)), &opts(Compression::Zstd(1), true)).unwrap();
        let (h, pairs, _) = parse(&blob, "t").unwrap();
        let betas: Vec<(f64, f64)> = h.predict.iter().map(|p| (f64::from_bits(p.b1), f64::from_bits(p.b2))).collect();
        assert_eq!(betas, [(0.9, 0.999), (0.9, 0.999), (0.9, 0.95)]);
        assert_eq!(pairs.len(), 3);
        let view = parse_shard(&data, "t").unwrap();
        for (p, i) in h.predict.iter().zip(0..) {
            let (em, ev) = (
                view.entry(&format!("optim.layers.{i}.exp_avg")).unwrap(),
                view.entry(&format!("optim.layers.{i}.exp_avg_sq")).unwrap(),
            );
            assert_eq!((p.m, p.v), ((em.offset, em.offset + em.len), ev.offset));
        }
    }

    #[test]
    fn adam_steps_apart_stay_exact_and_do_not_grow() {
        for steps in [0, 3, 20] {
            for c in [Compression::Lz4, Compression::Zstd(1)] {
                let (base, mb, data, m) = adam_pair(&mut Train::new(100_000, 10_000, 3), steps, 64 << 10, false);
                let s = round_trip(&data, &m, Some((&base, &mb)), &opts(c, true));
                let (hbase, hmb, hdata, hm) = adam_pair(&mut Train::new(100_000, 10_000, 3), steps, 64 << 10, true);
                let plain = round_trip(&hdata, &hm, Some((&hbase, &hmb)), &opts(c, true));
                assert_eq!(s.predicted_pairs, 0, "{steps} {c}: {s:?}");
                assert!(
                    s.encoded_bytes <= plain.encoded_bytes + plain.encoded_bytes / 100,
                    "{steps} {c}: {s:?} against {plain:?}"
                );
            }
        }
    }

    #[test]
    fn non_finite_moments_round_trip() {
        let mut t = Train::new(50_000, 1000, 4);
        t.step();
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7fa0_0001),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::from_bits(1),
            0.0,
            -0.0,
        ];
        for (k, x) in specials.into_iter().enumerate() {
            for l in &mut t.layers {
                l.m[100 * k] = x; // in base and new
                l.v[100 * k + 7] = x;
                l.v[100 * k + 50] = x;
            }
        }
        let (base, mb, mut data, m) = {
            let base = t.bytes(false);
            t.step();
            for (k, x) in specials.into_iter().enumerate() {
                for l in &mut t.layers {
                    l.m[100 * k + 50] = x; // in new only
                    l.v[100 * k + 7] = x;
                    l.m[100 * k + 9] = f32::from_bits(x.to_bits() ^ 1);
                }
            }
            let data = t.bytes(false);
            (base.clone(), man(&base, 1, 4096), data.clone(), man(&data, 2, 4096))
        };
        for c in [Compression::Lz4, Compression::Zstd(1)] {
            let s = round_trip(&data, &m, Some((&base, &mb)), &opts(c, true));
            assert_eq!(s.predicted_pairs, 3, "{c}: {s:?}");
            // One chunk: v and the 3-byte tail in the same Xor chunk.
            let (mb1, m1) = (man(&base, 1, 2 << 20), man(&data, 2, 2 << 20));
            assert_eq!((m1.chunks.len(), data.len() % 4), (1, 3));
            let s = round_trip(&data, &m1, Some((&base, &mb1)), &opts(c, true));
            assert_eq!((s.predicted_pairs, s.xor_chunks), (3, 1), "{c}: {s:?}");
        }
        // Chunks that are not whole words: no prediction.
        let (mb, m) = (man(&base, 1, 4098), man(&data, 2, 4098));
        let s = round_trip(&data, &m, Some((&base, &mb)), &opts(Compression::Zstd(1), true));
        assert_eq!(s.predicted_pairs, 0, "{s:?}");
        // Not safetensors any more: no prediction.
        data.truncate(data.len() - 3);
        let (mb, m) = (man(&base, 1, 4096), man(&data, 2, 4096));
        let s = round_trip(&data, &m, Some((&base, &mb)), &opts(Compression::Zstd(1), true));
        assert_eq!(s.predicted_pairs, 0, "{s:?}");
    }

    /// A predicted blob of a small state, with its shard, base and manifests.
    fn predicted_sample() -> (Vec<u8>, Manifest, Vec<u8>, Vec<u8>) {
        let (base, mb, data, m) = adam_pair(&mut Train::new(3000, 100, 5), 1, 4096, false);
        let (blob, s) = encode(&data, &m, Some((&base, &mb)), &opts(Compression::Zstd(1), true)).unwrap();
        assert_eq!(s.predicted_pairs, 3);
        (data, m, base, blob)
    }

    /// `blob` with its header replaced by `h` and its version byte by `version`.
    fn with_header(blob: &[u8], h: &Header, version: u8) -> Vec<u8> {
        let (_, _, payload) = parse(blob, "t").unwrap();
        let json = serde_json::to_vec(h).unwrap();
        let mut b = b"TCKPRED".to_vec();
        b.push(version);
        b.extend_from_slice(&(json.len() as u64).to_le_bytes());
        b.extend_from_slice(payload);
        b.extend_from_slice(&json);
        b
    }

    #[test]
    fn tampered_predictions_are_refused() {
        let (data, m, base, blob) = predicted_sample();
        let mut out = vec![0u8; data.len()];
        decode_into(&with_header(&blob, &parse(&blob, "t").unwrap().0, 2), &m, Some(&base), &mut out, "f").unwrap();
        assert!(out == data);
        let h = || parse(&blob, "t").unwrap().0;
        let p0 = h().predict[0];
        let file_len = data.len() as u64 & !3; // whole words
        type Tamper = (&'static str, Box<dyn Fn(&mut Header)>);
        let invalid: Vec<Tamper> = vec![
            ("betas", Box::new(|h| h.predict[0].b2 = 1.0f64.to_bits())),
            ("betas", Box::new(|h| h.predict[1].b1 = f64::NAN.to_bits())),
            ("betas", Box::new(|h| h.predict[2].b1 = 0)),
            ("aligned", Box::new(move |h| h.predict[0].v = p0.v + 2)),
            ("aligned", Box::new(move |h| h.predict[0].m = (p0.m.0 + 1, p0.m.1 + 1))),
            ("empty", Box::new(move |h| h.predict[0].m = (p0.m.1, p0.m.1))),
            ("empty", Box::new(move |h| h.predict[0].m = (p0.m.1, p0.m.0))),
            ("outside", Box::new(move |h| h.predict[0].v = file_len - 4)),
            ("outside", Box::new(move |h| h.predict[0].v = u64::MAX - 3)),
            ("outside", Box::new(move |h| h.predict[0].m = (file_len, file_len + p0.m.1 - p0.m.0))),
            ("m and v ranges overlap", Box::new(move |h| h.predict[0].v = p0.m.0 + 4)),
            ("predictions 0 and 1 overlap", Box::new(|h| h.predict[1].m = h.predict[0].m)),
            ("predictions 0 and 1 overlap", Box::new(|h| h.predict[0].v = h.predict[1].v - 8)),
            ("overlap", Box::new(|h| h.predict[2].v = h.predict[1].m.0)),
            (
                "overlap",
                Box::new(|h| {
                    let p = h.predict[0];
                    h.predict.push(p);
                }),
            ),
            ("base", Box::new(|h| h.base = None)),
        ];
        for (what, f) in &invalid {
            let mut t = h();
            f(&mut t);
            let e = decode_into(&with_header(&blob, &t, 2), &m, Some(&base), &mut out, "f").unwrap_err();
            assert!(matches!(e, FormatError::InvalidHeader { .. }) && e.to_string().contains(what), "{what}: {e}");
        }
        // Version 1 has no predictions.
        let e = decode_into(&with_header(&blob, &h(), 1), &m, Some(&base), &mut out, "f").unwrap_err();
        assert!(e.to_string().contains("version 1 blob lists predictions"), "{e}");
        // Valid but wrong: the checksums catch it.
        let wrong: Vec<Tamper> = vec![
            ("other betas", Box::new(|h| h.predict[0].b1 = 0.95f64.to_bits())),
            (
                "dropped",
                Box::new(|h| {
                    h.predict.remove(1);
                }),
            ),
            (
                "swapped v",
                Box::new(|h| {
                    let v = h.predict[0].v;
                    h.predict[0].v = h.predict[1].v;
                    h.predict[1].v = v;
                }),
            ),
            ("shorter", Box::new(|h| h.predict[1].m.1 -= 4)),
        ];
        for (what, f) in &wrong {
            let mut t = h();
            f(&mut t);
            let e = decode_into(&with_header(&blob, &t, 2), &m, Some(&base), &mut out, "f").unwrap_err();
            assert!(matches!(e, FormatError::ChecksumMismatch { .. }), "{what}: {e}");
        }
        // Betas one f64 ulp off predict the same f32 almost always: exact or a mismatch.
        let mut t = h();
        t.predict[2].b2 ^= 1;
        out.fill(0);
        match decode_into(&with_header(&blob, &t, 2), &m, Some(&base), &mut out, "f") {
            Ok(()) => assert!(out == data),
            Err(e) => assert!(matches!(e, FormatError::ChecksumMismatch { .. }), "{e}"),
        }
        // Straight to the check: predictions of a header that names no base.
        let mut t = h();
        t.base = None;
        assert!(check_predict(&t, 2).unwrap_err().contains("without a base"));
        t.chunk_size = 4098;
        t.base = h().base;
        assert!(check_predict(&t, 2).unwrap_err().contains("multiple of 4"));
    }

    #[test]
    fn a_damaged_predicted_chunk_is_named() {
        let (base, mb, data, m) = adam_pair(&mut Train::new(20_000, 100, 6), 1, 4096, false);
        let (blob, _) = encode(&data, &m, Some((&base, &mb)), &opts(Compression::Zstd(1), true)).unwrap();
        let (h, pairs, _) = parse(&blob, "t").unwrap();
        // A chunk inside a predicted v range, and one of m.
        let cs = 4096;
        let v_chunk = (pairs[1].v + pairs[1].len / 2) / cs;
        let m_chunk = (pairs[1].m + pairs[1].len / 2) / cs;
        for i in [v_chunk, m_chunk] {
            assert_eq!(h.chunks[i].0, Kind::XorZstd);
            let mut bad = blob.clone();
            let at = payload_offset(&bad, i) + h.chunks[i].2 as usize / 2;
            bad[at] ^= 0x10;
            let mut out = vec![0u8; data.len()];
            let e = decode_into(&bad, &m, Some(&base), &mut out, "f").unwrap_err();
            assert!(matches!(e, FormatError::ChecksumMismatch { chunk, .. } if chunk == i), "{i}: {e}");
        }
        // The wrong base: no silent success.
        let mut other = base.clone();
        let r = pairs[0].m..pairs[0].m + 400;
        other[r.clone()].iter_mut().for_each(|b| *b ^= 0x01);
        let mut out = vec![0u8; data.len()];
        assert!(decode_into(&blob, &m, Some(&other), &mut out, "f").is_err());
    }

    #[test]
    fn stats_of_older_builds_parse() {
        let old = r#"{"raw_bytes":10,"encoded_bytes":5,"chunks":1,"same_chunks":0,"xor_chunks":1,"compressed_chunks":0,"raw_chunks":0}"#;
        let s: ReduceStats = serde_json::from_str(old).unwrap();
        assert_eq!((s.encoded_bytes, s.predicted_pairs), (5, 0));
        let s = ReduceStats { predicted_pairs: 2, ..s };
        assert_eq!(serde_json::from_str::<ReduceStats>(&serde_json::to_string(&s).unwrap()).unwrap(), s);
    }

    #[test]
    fn version_1_blobs_still_decode() {
        let base = weights(6 * CS as usize, 51);
        let mb = man(&base, 1, CS);
        let mut data = base.clone();
        data[CS as usize + 5] ^= 7;
        let m = man(&data, 2, CS);
        for c in [Compression::Off, Compression::Lz4, Compression::Zstd(1)] {
            // Without predictions the encoder writes version 1.
            let (blob, _) = encode(&data, &m, Some((&base, &mb)), &opts(c, true)).unwrap();
            assert_eq!(blob[7], 1);
            assert!(!String::from_utf8_lossy(&blob).contains("predict"));
            let mut out = vec![0u8; data.len()];
            decode_into(&blob, &m, Some(&base), &mut out, "f").unwrap();
            assert!(out == data);
        }
        // A version 1 blob as written by the previous build.
        let v1 = {
            let data = b"0123456789abcdefghij".to_vec();
            let m = man(&data, 1, 8);
            let json = format!(
                r#"{{"step":1,"file_len":20,"chunk_size":8,"identity":"{}","base":null,"chunks":[["raw",0,8],["raw",8,8],["raw",16,4]]}}"#,
                serde_json::to_value(manifest_identity(&m)).unwrap().as_str().unwrap()
            );
            let mut b = b"TCKPRED\x01".to_vec();
            b.extend_from_slice(&(json.len() as u64).to_le_bytes());
            b.extend_from_slice(&data);
            b.extend_from_slice(json.as_bytes());
            (b, m, data)
        };
        let mut out = vec![0u8; 20];
        decode_into(&v1.0, &v1.1, None, &mut out, "f").unwrap();
        assert_eq!(out, v1.2);
    }

    fn sample() -> (Vec<u8>, Manifest, Vec<u8>, Manifest, Vec<u8>) {
        let base = weights(5 * 512 + 100, 31);
        let mb = man(&base, 1, 512);
        let mut data = base.clone();
        data[600] ^= 9;
        data[2000..2600].copy_from_slice(&random(600, 4));
        let m = man(&data, 2, 512);
        let (blob, _) = encode(&data, &m, Some((&base, &mb)), &opts(Compression::Zstd(1), true)).unwrap();
        (data, m, base, mb, blob)
    }

    /// Noise for the frozen fixtures below: xxh3 of a counter, so that their
    /// bytes never change with a `rand` upgrade or the platform.
    fn noise(seed: u64, i: usize) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(&(i as u64).to_le_bytes(), seed)
    }

    /// A roughly normal f32 (sum of four uniform 16-bit parts) from `noise`.
    fn noise_normal(seed: u64, i: usize) -> f32 {
        let x = noise(seed, i);
        let s = (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
        (s as f32 / 65536.0 - 2.0) * 1.732_050_8
    }

    /// A frozen base and new shard for the golden blobs: a frozen bf16 tensor
    /// (`Same` chunks), random bytes (`Raw`), a tensor of new bf16 weights
    /// (plain compressed), and two Adam layers one step apart (`Xor`, their
    /// `exp_avg_sq` predicted).
    fn golden_pair() -> (Vec<u8>, Vec<u8>) {
        const N: usize = 200_000;
        let bf16_noise = |seed: u64, n: usize| -> Vec<u8> {
            (0..n).flat_map(|i| bf16(0.02 * noise_normal(seed, i)).to_le_bytes()).collect()
        };
        let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let shard = |layers: &[(Vec<u16>, Vec<f32>, Vec<f32>)], fresh_seed: u64| -> Vec<u8> {
            let spec = |name: &str, dtype, n| TensorSpec { name: name.into(), dtype, shape: vec![n] };
            let mut specs = vec![spec("frozen", Dtype::BF16, 300_000), spec("noise", Dtype::U8, 1 << 20)];
            let mut tensors = vec![
                bf16_noise(1, 300_000),
                (0..(1 << 17)).flat_map(|i| noise(2, i).to_le_bytes()).collect::<Vec<u8>>(),
            ];
            specs.push(spec("fresh", Dtype::BF16, 600_000));
            tensors.push(bf16_noise(fresh_seed, 600_000));
            for (i, (w, m, v)) in layers.iter().enumerate() {
                specs.push(spec(&format!("l{i}.weight"), Dtype::BF16, N));
                tensors.push(w.iter().flat_map(|x| x.to_le_bytes()).collect());
                specs.push(spec(&format!("l{i}.exp_avg"), Dtype::F32, N));
                tensors.push(f32s(m));
                specs.push(spec(&format!("l{i}.exp_avg_sq"), Dtype::F32, N));
                tensors.push(f32s(v));
            }
            specs.push(spec("odd", Dtype::U8, 3));
            tensors.push(vec![1, 2, 3]);
            let layout = ShardLayout::new(&specs, &Default::default()).unwrap();
            let mut f = vec![0u8; layout.file_len as usize];
            f[..layout.header.len()].copy_from_slice(&layout.header);
            for (e, t) in layout.entries.iter().zip(&tensors) {
                f[e.range()].copy_from_slice(t);
            }
            f
        };
        let mut layers: Vec<(Vec<u16>, Vec<f32>, Vec<f32>)> = [(10u64, 1e-3f32), (20, 1e-2)]
            .iter()
            .map(|&(seed, scale)| {
                let w = (0..N).map(|i| bf16(0.02 * noise_normal(seed, i))).collect();
                let m = (0..N).map(|i| 0.3 * scale * noise_normal(seed + 1, i)).collect();
                let v = (0..N).map(|i| scale * scale * (0.5 + (noise(seed + 2, i) >> 40) as f32 / (1u64 << 24) as f32));
                (w, m, v.collect())
            })
            .collect();
        let base = shard(&layers, 3);
        for (k, ((w, m, v), (b1, b2, scale))) in
            layers.iter_mut().zip([(0.9f32, 0.999f32, 1e-3f32), (0.9, 0.95, 1e-2)]).enumerate()
        {
            for i in 0..N {
                let g = scale * (0.3 * m[i].signum() + noise_normal(30 + k as u64, i));
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                w[i] = bf16(f32::from_bits((w[i] as u32) << 16) - 1e-4 * m[i] / (v[i].sqrt() + 1e-8));
            }
        }
        (base, shard(&layers, 4))
    }

    /// `blob` with its payloads in chunk order: encode's workers append them
    /// in the order they finish, which alone varies between runs.
    fn canonical(blob: &[u8]) -> Vec<u8> {
        let (mut h, _, payload) = parse(blob, "t").unwrap();
        let mut ordered = Vec::with_capacity(payload.len());
        for c in &mut h.chunks {
            ordered.extend_from_slice(&payload[c.1 as usize..(c.1 + c.2) as usize]);
            c.1 = (ordered.len() as u64) - c.2;
        }
        let json = serde_json::to_vec(&h).unwrap();
        let mut b = blob[..8].to_vec();
        b.extend_from_slice(&(json.len() as u64).to_le_bytes());
        b.extend_from_slice(&ordered);
        b.extend_from_slice(&json);
        b
    }

    /// The blobs' bytes (in canonical payload order) stay what this build's
    /// encoder wrote when the test was recorded: a change of the format, or of
    /// what the encoder picks, fails here. A zstd or lz4_flex upgrade that
    /// compresses differently would too; then check the decoder still reads
    /// the old blobs and record the new hashes.
    #[test]
    fn golden_blobs_stay_bit_for_bit() {
        let (base, data) = golden_pair();
        let mut got = Vec::new();
        for cs in [64u64 << 10, 1 << 20] {
            let (mb, m) = (man(&base, 1, cs), man(&data, 2, cs));
            for c in [Compression::Off, Compression::Lz4, Compression::Zstd(1), Compression::Zstd(3)] {
                for delta in [false, true] {
                    let (blob, s) = encode(&data, &m, Some((&base, &mb)), &opts(c, delta)).unwrap();
                    let canon = canonical(&blob);
                    let mut out = vec![0u8; data.len()];
                    decode_into(&canon, &m, Some(&base), &mut out, "f").unwrap();
                    assert!(out == data);
                    got.push(format!(
                        "{cs} {c} {delta}: v{} {} same {} xor {} comp {} raw {} pred {} {:032x}",
                        blob[7],
                        canon.len(),
                        s.same_chunks,
                        s.xor_chunks,
                        s.compressed_chunks,
                        s.raw_chunks,
                        s.predicted_pairs,
                        xxh3_128(&canon)
                    ));
                }
            }
        }
        let want = [
            "65536 off false: v1 6851832 same 0 xor 0 comp 0 raw 105 pred 0 f7ddf22f6ef050b77366aed5d873ec32",
            "65536 off true: v1 5310855 same 24 xor 0 comp 0 raw 81 pred 0 df857e31bec8c0073f67adaf95f08fb7",
            "65536 lz4 false: v1 6117807 same 0 xor 0 comp 89 raw 16 pred 0 053715870bf56b11872c5361b7abae55",
            "65536 lz4 true: v2 2971003 same 24 xor 63 comp 18 raw 0 pred 2 b47eec814677ee1571c3264cb774798f",
            "65536 zstd:1 false: v1 5794975 same 0 xor 0 comp 88 raw 17 pred 0 79578816031d8bd11f9e01618197f0a6",
            "65536 zstd:1 true: v2 2605932 same 24 xor 63 comp 18 raw 0 pred 2 03286a95a0e831ac05b0fe34e5c840c9",
            "65536 zstd:3 false: v1 5730804 same 0 xor 0 comp 89 raw 16 pred 0 a4bda61dffc4425f9214c3001fe9cb59",
            "65536 zstd:3 true: v2 2570568 same 24 xor 63 comp 18 raw 0 pred 2 7bfd93f6cb0d258f0babe370c2abef44",
            "1048576 off false: v1 6849707 same 0 xor 0 comp 0 raw 7 pred 0 10d7092a8adc410b1d8366f4e99baef1",
            "1048576 off true: v1 6291840 same 1 xor 0 comp 0 raw 6 pred 0 ea588559ca0caefec31c4a797280ac96",
            "1048576 lz4 false: v1 6023681 same 0 xor 0 comp 6 raw 1 pred 0 e2ea30db9c1f750e7704b8a0d26bf3bf",
            "1048576 lz4 true: v2 2998541 same 1 xor 6 comp 0 raw 0 pred 2 b6c69525fbfa3ff6e95462af60c78aac",
            "1048576 zstd:1 false: v1 5414490 same 0 xor 0 comp 6 raw 1 pred 0 ec124803faf6ce30437d9888dd1a94b5",
            "1048576 zstd:1 true: v2 2450951 same 1 xor 6 comp 0 raw 0 pred 2 fc78ccbc71b7e449b166514214e219f0",
            "1048576 zstd:3 false: v1 5483838 same 0 xor 0 comp 6 raw 1 pred 0 f75920ba8959a7eaff8d70100bb61a0f",
            "1048576 zstd:3 true: v2 2496355 same 1 xor 6 comp 0 raw 0 pred 2 dee75c072064937320cb77f55bae09ea",
        ];
        assert_eq!(got, want, "\n{}", got.join("\n"));
    }

    thread_local! {
        static PREDICTED: (Vec<u8>, Manifest, Vec<u8>, Vec<u8>) = predicted_sample();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000), prefix in any::<bool>(), v2 in any::<bool>()) {
            let (data, m, base, _, _) = sample();
            let mut blob = bytes;
            if prefix {
                let mut b = if v2 { b"TCKPRED\x02".to_vec() } else { b"TCKPRED\x01".to_vec() };
                b.extend_from_slice(&(blob.len() as u64 / 2).to_le_bytes());
                b.extend_from_slice(&blob);
                blob = b;
            }
            let _ = base_of(&blob);
            let mut out = vec![0u8; data.len()];
            prop_assert!(decode_into(&blob, &m, Some(&base), &mut out, "f").is_err());
        }

        #[test]
        fn damaged_blobs_fail_or_decode_exactly(at in any::<prop::sample::Index>(), xor in 1u8..=255, cut in any::<bool>()) {
            let (data, m, base, _, blob) = sample();
            let mut bad = blob.clone();
            let i = at.index(bad.len());
            if cut { bad.truncate(i) } else { bad[i] ^= xor }
            let _ = base_of(&bad);
            let mut out = vec![0u8; data.len()];
            if decode_into(&bad, &m, Some(&base), &mut out, "f").is_ok() {
                prop_assert!(out == data);
            }
        }

        #[test]
        fn damaged_predicted_blobs_fail_or_decode_exactly(at in any::<prop::sample::Index>(), xor in 1u8..=255, cut in any::<bool>(), in_header in any::<bool>()) {
            let (data, m, base, blob) = PREDICTED.with(|p| p.clone());
            let mut bad = blob.clone();
            // Half the time in the JSON header (the last 2 KiB or so).
            let i = if in_header { bad.len() - 1 - at.index(2048.min(bad.len())) } else { at.index(bad.len()) };
            if cut { bad.truncate(i) } else { bad[i] ^= xor }
            let mut out = vec![0u8; data.len()];
            if decode_into(&bad, &m, Some(&base), &mut out, "f").is_ok() {
                prop_assert!(out == data);
            }
        }

        #[test]
        fn prediction_tampering_never_panics(k in 0usize..3, field in 0usize..5, x in any::<u64>(), small in any::<bool>()) {
            let (data, m, base, blob) = PREDICTED.with(|p| p.clone());
            let (mut h, _, _) = parse(&blob, "t").unwrap();
            let x = if small { x % (2 * data.len() as u64) } else { x };
            let p = &mut h.predict[k];
            match field {
                0 => p.m.0 = x,
                1 => p.m.1 = x,
                2 => p.v = x,
                3 => p.b1 = if small { p.b1 ^ (x & 0xffff) } else { x },
                _ => p.b2 = if small { p.b2 ^ (x & 0xffff) } else { x },
            }
            let mut out = vec![0u8; data.len()];
            if decode_into(&with_header(&blob, &h, 2), &m, Some(&base), &mut out, "f").is_ok() {
                prop_assert!(out == data);
            }
        }

        #[test]
        fn header_tampering_never_panics(step in any::<u64>(), len in any::<u64>(), kind in 0usize..6) {
            let (data, m, base, _, blob) = sample();
            let (mut h, _, payload) = parse(&blob, "t").unwrap();
            let kinds = [Kind::Raw, Kind::Same, Kind::Lz4, Kind::Zstd, Kind::XorLz4, Kind::XorZstd];
            let k = (step % h.chunks.len() as u64) as usize;
            let offset = if len % 2 == 0 { h.chunks[k].1 } else { (len >> 8) % 8192 };
            h.chunks[k] = ChunkRec(kinds[kind], offset, len % 4096);
            if let Some(b) = h.base.as_mut() { if len % 3 == 0 { b.file_len = len; } }
            let json = serde_json::to_vec(&h).unwrap();
            let mut b = b"TCKPRED\x02".to_vec();
            b.extend_from_slice(&(json.len() as u64).to_le_bytes());
            b.extend_from_slice(payload);
            b.extend_from_slice(&json);
            let mut out = vec![0u8; data.len()];
            if decode_into(&b, &m, Some(&base), &mut out, "f").is_ok() {
                prop_assert!(out == data);
            }
        }
    }
}
