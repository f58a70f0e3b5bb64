//! Per-chunk encoding: [`Encoder`] picks the smallest kind for one chunk,
//! compressing samples first for large chunks; [`predict_base`] builds the
//! predicted base a chunk holding Adam's second moment is XORed against.

// `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::ops::Range;

use super::blob::Kind;
use super::planes::{to_planes, PLANES};
use super::predict::{self, Pair};
use super::Compression;
use crate::{FormatError, Manifest};

/// Chunks of at least this many bytes are encoded after sampling (see
/// [`Encoder::sample`]); smaller ones are compressed every way and the
/// smallest kept.
const SAMPLED_CHUNK: usize = 1 << 20;
/// Samples: this many slices of `SAMPLE_LEN` bytes spread over the chunk.
pub(super) const SAMPLES: usize = 4;
/// Length of one sample.
pub(super) const SAMPLE_LEN: usize = 64 << 10;
/// Samples that compress to more than this fraction of their size: the chunk
/// is stored raw without compressing it whole.
const INCOMPRESSIBLE: f64 = 0.97;

/// Sample `k` of a chunk of `len` (at least `SAMPLE_LEN`) bytes: a multiple
/// of [`PLANES`] bytes into the chunk.
pub(super) fn sample_range(len: usize, k: usize) -> Range<usize> {
    let a = (len - SAMPLE_LEN) * k / (SAMPLES - 1) / PLANES * PLANES;
    a..a + SAMPLE_LEN
}

/// Overwrites `dst`, which holds the base's bytes at file offsets `a..a +
/// dst.len()`, with the predictions of the `pairs`' v positions there, from
/// the new m in `data` and the base's m and v.
pub(super) fn predict_base(pairs: &[Pair], data: &[u8], base: &[u8], a: usize, dst: &mut [u8]) {
    for (p, x, y) in predict::pieces(pairs, a, a + dst.len()) {
        let m = p.m + (x - p.v)..p.m + (y - p.v);
        predict::apply(&mut dst[x - a..y - a], &data[m.clone()], &base[m], &base[x..y], p.b1, p.b2, false);
    }
}

/// Pairs to predict in `data` against `base`, if any: only with compression
/// and chunks of whole f32 words.
pub(super) fn pairs_for(data: &[u8], m: &Manifest, base: Option<&[u8]>, compression: Compression) -> Vec<Pair> {
    match base {
        Some(b) if compression != Compression::Off && m.chunk_size % 4 == 0 => predict::find_pairs(data, b),
        _ => Vec::new(),
    }
}

/// Where [`Encoder::encode_chunk`] left a chunk's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Payload {
    /// None (`Same`).
    Empty,
    /// The chunk itself (`Raw`).
    Chunk,
    /// The first this many bytes of [`Encoder::out_a`].
    OutA(usize),
    /// The first this many bytes of [`Encoder::out_b`].
    OutB(usize),
}

/// Per-worker compression state.
pub(super) struct Encoder {
    /// How chunks are compressed.
    compression: Compression,
    /// The zstd compressor, with `Compression::Zstd`.
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Scratch: the planes being compressed.
    planes: Vec<u8>,
    /// Compressed bytes (the XOR, for small chunks).
    out_a: Vec<u8>,
    /// Compressed bytes (plain, for small chunks; samples).
    out_b: Vec<u8>,
}

impl Encoder {
    /// An encoder for `compression`; an error if zstd refuses its level.
    pub(super) fn new(compression: Compression) -> Result<Self, FormatError> {
        let zstd = match compression {
            Compression::Zstd(level) => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| FormatError::InvalidArgument(format!("zstd level {level}: {e}")))?,
            ),
            _ => None,
        };
        Ok(Self { compression, zstd, planes: Vec::new(), out_a: Vec::new(), out_b: Vec::new() })
    }

    /// The bytes of a payload [`encode_chunk`](Self::encode_chunk) left,
    /// given the `chunk` it encoded.
    pub(super) fn payload<'a>(&'a self, at: Payload, chunk: &'a [u8]) -> &'a [u8] {
        match at {
            Payload::Empty => &[],
            Payload::Chunk => chunk,
            Payload::OutA(n) => &self.out_a[..n],
            Payload::OutB(n) => &self.out_b[..n],
        }
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

    /// Compresses the planes of `chunk` (XOR `base`) into `out_a` or
    /// `out_b`; the length if smaller than `limit`.
    fn try_compress(&mut self, chunk: &[u8], base: Option<&[u8]>, into_a: bool, limit: usize) -> Option<usize> {
        to_planes(&mut self.planes, chunk, base);
        let out = if into_a { &mut self.out_a } else { &mut self.out_b };
        Self::compress(self.compression, &mut self.zstd, &self.planes, out).filter(|&n| n < limit)
    }

    /// Compressed size of samples of `chunk` (XOR `base`), and their size.
    pub(super) fn sample(&mut self, chunk: &[u8], base: Option<&[u8]>) -> (usize, usize) {
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
    /// the same checksum: the kind and where its payload is.
    pub(super) fn encode_chunk(&mut self, chunk: &[u8], base: Option<(&[u8], bool)>) -> (Kind, Payload) {
        if let Some((_, true)) = base {
            return (Kind::Same, Payload::Empty);
        }
        if self.compression == Compression::Off {
            return (Kind::Raw, Payload::Chunk);
        }
        let (plain_kind, xor_kind) = match self.compression {
            Compression::Lz4 => (Kind::Lz4, Kind::XorLz4),
            _ => (Kind::Zstd, Kind::XorZstd),
        };
        let base = base.map(|b| b.0);
        if chunk.len() >= SAMPLED_CHUNK {
            // Compress samples both ways; compress the whole chunk only the
            // way that wins, and not at all when nothing shrinks.
            let plain = self.sample(chunk, None);
            let xor = base.map(|b| self.sample(chunk, Some(b)));
            let (use_xor, (n, of)) = match xor {
                Some(x) if x.0 <= plain.0 => (true, x),
                _ => (false, plain),
            };
            if n as f64 >= of as f64 * INCOMPRESSIBLE {
                return (Kind::Raw, Payload::Chunk);
            }
            return match self.try_compress(chunk, base.filter(|_| use_xor), true, chunk.len()) {
                Some(n) => (if use_xor { xor_kind } else { plain_kind }, Payload::OutA(n)),
                None => (Kind::Raw, Payload::Chunk),
            };
        }
        let mut best = (Kind::Raw, Payload::Chunk, chunk.len());
        if let Some(n) = base.and_then(|b| self.try_compress(chunk, Some(b), true, best.2)) {
            best = (xor_kind, Payload::OutA(n), n);
        }
        if let Some(n) = self.try_compress(chunk, None, false, best.2) {
            best = (plain_kind, Payload::OutB(n), n);
        }
        (best.0, best.1)
    }
}
