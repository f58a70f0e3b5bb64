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
//! length]` record per chunk) at the end.
//!
//! Per chunk the smallest of these is stored (for chunks of 1 MiB and more,
//! the smallest as samples of the chunk predict, which saves compressing a
//! chunk twice, or at all when it does not shrink):
//! - `Same`: with delta, the base's chunk has the same length and checksum:
//!   no payload, the base's bytes are taken;
//! - `Xor`+lz4/zstd: with delta and compression, the XOR against the base's
//!   chunk of the same length, split into byte planes, compressed;
//! - lz4/zstd: the chunk split into byte planes, compressed;
//! - `Raw`: the chunk as is, whenever nothing else is smaller.
//!
//! With [`Compression::Off`], delta gives only `Same` and `Raw`.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use xxhash_rust::xxh3::xxh3_128;

use crate::error::Hex;
use crate::{Checksum, FormatError, Manifest};

const MAGIC: &[u8; 7] = b"TCKPRED";
/// Version byte written after the magic; readers refuse any other.
pub const BLOB_VERSION: u8 = 1;
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
            for ((((x0, x1), x2), x3), (w, v)) in planes.zip(body.chunks_exact_mut(PLANES).zip(b.chunks_exact(PLANES))) {
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
            Compression::Zstd(level) => Some(zstd::bulk::Compressor::new(level).map_err(|e| {
                FormatError::InvalidArgument(format!("zstd level {level}: {e}"))
            })?),
            _ => None,
        };
        Ok(Self { compression, zstd, planes: Vec::new(), out_a: Vec::new(), out_b: Vec::new() })
    }

    /// Compresses `src` into `dst` (grown as needed); the compressed length.
    fn compress(compression: Compression, zstd: &mut Option<zstd::bulk::Compressor<'static>>, src: &[u8], dst: &mut Vec<u8>) -> Option<usize> {
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
            let a = (chunk.len() - SAMPLE_LEN) * k / (SAMPLES - 1) / PLANES * PLANES;
            let r = a..a + SAMPLE_LEN;
            to_planes(&mut self.planes, &chunk[r.clone()], base.map(|b| &b[r]));
            n += Self::compress(self.compression, &mut self.zstd, &self.planes, &mut self.out_b).unwrap_or(SAMPLE_LEN);
            of += SAMPLE_LEN;
        }
        (n, of)
    }

    /// The smallest encoding of `chunk` given the base's chunk of the same
    /// length, if any, and whether the two have the same checksum.
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
        let best = match base_chunk(i) {
            Some((bc, _)) => plain.min(enc.sample(c, Some(bc)).0),
            None => plain,
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
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<FormatError>> = Mutex::new(None);
    // The blob: prefix, payloads in the order workers finish them, header.
    // Zeroed memory comes untouched from the allocator: only the pages the
    // payloads take are faulted in, by the workers that write them.
    let header_room = 1024 + 64 * n;
    let mut blob = vec![0u8; PREFIX_LEN + data.len() + header_room];
    let (prefix, space) = blob.split_at_mut(PREFIX_LEN);
    let space_len = space.len();
    let free = Mutex::new(space);
    let mut results: Vec<(usize, ChunkRec)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..worker_count(n))
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
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
    let header = Header {
        step: m.key.step,
        file_len: m.file_len,
        chunk_size: m.chunk_size,
        identity: manifest_identity(m),
        base: base.filter(|_| needs_base).map(|(_, bm)| BaseRef::of(bm)),
        chunks: recs,
    };
    let json = serde_json::to_vec(&header).expect("reduce header serializes");
    prefix[..7].copy_from_slice(MAGIC);
    prefix[7] = BLOB_VERSION;
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

/// Splits a blob into its header and payload; never panics.
fn parse<'a>(blob: &'a [u8], file: &str) -> Result<(Header, &'a [u8]), FormatError> {
    if blob.len() < PREFIX_LEN {
        return Err(FormatError::Truncated { file: file.to_string(), expected: PREFIX_LEN as u64, found: blob.len() as u64 });
    }
    if &blob[..7] != MAGIC {
        return Err(bad_header(file, "not a tierckpt reduced blob (bad magic)"));
    }
    if blob[7] != BLOB_VERSION {
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
            format!("reduced blob header: {} chunks for {} bytes in chunks of {}", h.chunks.len(), h.file_len, h.chunk_size),
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
            return Err(bad_header(file, format!("reduced blob header: chunk {i} ({kind:?}) of {clen} bytes has a payload of {len}")));
        }
        if kind.uses_base() {
            match &h.base {
                None => return Err(bad_header(file, format!("reduced blob header: chunk {i} refers to a base the blob does not name"))),
                Some(b) => {
                    let end = (i as u64).checked_mul(h.chunk_size).and_then(|a| a.checked_add(clen));
                    if b.chunk_size != h.chunk_size || end.is_none_or(|e| e > b.file_len) {
                        return Err(bad_header(file, format!("reduced blob header: chunk {i} lies outside its base of {} bytes", b.file_len)));
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
            return Err(bad_header(file, format!("reduced blob header: payloads leave a gap or overlap at byte {end} of {}", payload.len())));
        }
        end = offset + len;
    }
    if end != payload.len() as u64 {
        return Err(bad_header(file, format!("reduced blob header: payloads cover {end} of the {} payload bytes", payload.len())));
    }
    Ok((h, payload))
}

/// The checkpoint `blob` needs as its base, if any.
pub fn base_of(blob: &[u8]) -> Result<Option<BaseRef>, FormatError> {
    Ok(parse(blob, "reduced blob")?.0.base)
}

/// Rebuilds into `out` the bytes that `m` describes from `blob`, using
/// `base` (the bytes of the checkpoint [`base_of`] names) where the blob is a
/// delta. Every chunk is verified against `m`; `file` names the shard in
/// errors. On error `out` holds unspecified bytes.
pub fn decode_into(blob: &[u8], m: &Manifest, base: Option<&[u8]>, out: &mut [u8], file: &str) -> Result<(), FormatError> {
    check_shape(m, "decode")?;
    let (h, payload) = parse(blob, file)?;
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
    let work = Mutex::new(out.chunks_mut(cs).enumerate());
    let stop = AtomicBool::new(false);
    let errors: Vec<FormatError> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..worker_count(n))
            .map(|_| {
                s.spawn(|| {
                    let mut zstd: Option<zstd::bulk::Decompressor<'static>> = None;
                    let mut planes = Vec::new();
                    let mut first: Option<FormatError> = None;
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
                        let found = xxh3_128(dst);
                        if !decoded || found != m.chunks[i].0 {
                            let (offset, end) = m.chunk_range(i);
                            first.get_or_insert(FormatError::ChecksumMismatch {
                                file: file.to_string(),
                                chunk: i,
                                offset,
                                end,
                                expected: Hex(m.chunks[i].0),
                                found: Hex(found),
                            });
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    first
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().expect("decode worker")).collect()
    });
    match errors.into_iter().min_by_key(|e| match e {
        FormatError::ChecksumMismatch { chunk, .. } => *chunk,
        _ => 0,
    }) {
        None => Ok(()),
        Some(e) => Err(e),
    }
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
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| bad_header(file, format!("zstd decompressor: {e}")))?,
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
    use crate::{chunk_checksums, ShardKey, FORMAT_VERSION};
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
        let (h, _) = parse(blob, "t").unwrap();
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
        let mut v2 = blob.clone();
        v2[7] = 2;
        let e = decode_into(&v2, &m, None, &mut out, "f").unwrap_err();
        assert!(matches!(e, FormatError::UnsupportedVersion { .. }), "{e}");
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
        for (s, c) in [("off", Compression::Off), ("lz4", Compression::Lz4), ("zstd", Compression::Zstd(DEFAULT_ZSTD_LEVEL)), ("zstd:1", Compression::Zstd(1)), ("zstd:19", Compression::Zstd(19))] {
            assert_eq!(s.parse::<Compression>().unwrap(), c);
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
        }
        for bad in ["", "gzip", "zstd:", "zstd:0", "zstd:20", "zstd:-1", "zstd:+3", "ZSTD", "lz4:1", "zstd:1x"] {
            let e = bad.parse::<Compression>().unwrap_err();
            let s = e.to_string();
            assert!(matches!(e, FormatError::InvalidArgument(_)) && s.contains(&format!("{bad:?}")) && s.contains("zstd:N"), "{s}");
        }
        assert_eq!(serde_json::to_string(&Compression::Zstd(3)).unwrap(), "\"zstd:3\"");
        assert_eq!(serde_json::from_str::<Compression>("\"lz4\"").unwrap(), Compression::Lz4);
        let data = weights(100, 1);
        let m = man(&data, 1, CS);
        assert!(encode(&data, &m, None, &opts(Compression::Zstd(40), false)).is_err());
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000), prefix in any::<bool>()) {
            let (data, m, base, _, _) = sample();
            let mut blob = bytes;
            if prefix {
                let mut b = b"TCKPRED\x01".to_vec();
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
        fn header_tampering_never_panics(step in any::<u64>(), len in any::<u64>(), kind in 0usize..6) {
            let (data, m, base, _, blob) = sample();
            let (mut h, payload) = parse(&blob, "t").unwrap();
            let kinds = [Kind::Raw, Kind::Same, Kind::Lz4, Kind::Zstd, Kind::XorLz4, Kind::XorZstd];
            let k = (step % h.chunks.len() as u64) as usize;
            let offset = if len % 2 == 0 { h.chunks[k].1 } else { (len >> 8) % 8192 };
            h.chunks[k] = ChunkRec(kinds[kind], offset, len % 4096);
            if let Some(b) = h.base.as_mut() { if len % 3 == 0 { b.file_len = len; } }
            let json = serde_json::to_vec(&h).unwrap();
            let mut b = b"TCKPRED\x01".to_vec();
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
