//! [`decode_into`]: a blob back to the shard's bytes, every chunk verified
//! against the manifest. Phase 1 decodes every chunk on worker threads;
//! phase 2 XORs the predictions into the chunks holding predicted v, once
//! the m they are predicted from is decoded, and verifies those.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use xxhash_rust::xxh3::xxh3_128;

use super::blob::{bad_header, manifest_identity, parse, ChunkRec, Header, Kind};
use super::planes::from_planes;
use super::predict::{self, Pair};
use super::{check_shape, worker_count};
use crate::error::Hex;
use crate::{FormatError, Manifest};

/// Rebuilds into `out` the bytes that `m` describes from `blob`, using
/// `base` (the bytes of the checkpoint [`base_of`](super::base_of) names)
/// where the blob is a delta. Every chunk is verified against `m`; `file`
/// names the shard in errors. On error `out` holds unspecified bytes.
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
    let base = needed_base(&h, base, file)?;
    let n = h.chunks.len();
    if n == 0 {
        return Ok(());
    }
    let job = Job { h: &h, pairs: &pairs, payload, base, m, file };
    let (first, deferred) = job.decode_chunks(out);
    // Phase 2, below the first bad chunk (every chunk below it is decoded).
    let limit = match &first {
        None => n,
        Some(FormatError::ChecksumMismatch { chunk, .. }) => *chunk,
        Some(_) => 0,
    };
    let deferred: Vec<usize> = deferred.into_iter().filter(|&i| i < limit).collect();
    if let (false, Some(b)) = (deferred.is_empty(), base) {
        if let Some(e) = finish_predicted(out, b, &pairs, m, deferred, limit, file)? {
            return Err(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// The base the blob needs, from `base`: none if it needs none, an error if
/// it needs one and `base` is missing or of another length.
fn needed_base<'a>(h: &Header, base: Option<&'a [u8]>, file: &str) -> Result<Option<&'a [u8]>, FormatError> {
    match (&h.base, base) {
        (None, _) => Ok(None),
        (Some(b), None) => Err(FormatError::InvalidArgument(format!(
            "{file}: delta of step {} needs its base, step {} ({} bytes), which is missing",
            h.step, b.step, b.file_len
        ))),
        (Some(b), Some(d)) if d.len() as u64 != b.file_len => Err(FormatError::InvalidArgument(format!(
            "{file}: delta of step {} needs its base, step {} of {} bytes; the base given has {} bytes",
            h.step,
            b.step,
            b.file_len,
            d.len()
        ))),
        (Some(_), Some(d)) => Ok(Some(d)),
    }
}

/// What every phase 1 worker reads.
struct Job<'a> {
    /// The blob's header, checked by `parse`.
    h: &'a Header,
    /// The predicted pairs, sorted by `v`.
    pairs: &'a [Pair],
    /// The blob's payload area.
    payload: &'a [u8],
    /// The base's bytes, if the blob needs them.
    base: Option<&'a [u8]>,
    /// The manifest to verify against.
    m: &'a Manifest,
    /// The shard's name, for errors.
    file: &'a str,
}

impl Job<'_> {
    /// Phase 1: decodes every chunk into `out` and verifies it, except Xor
    /// chunks holding predicted v, which keep the residual there and are
    /// returned to be finished and verified in phase 2. The lowest error.
    fn decode_chunks(&self, out: &mut [u8]) -> (Option<FormatError>, Vec<usize>) {
        let work = Mutex::new(out.chunks_mut(self.m.chunk_size as usize).enumerate());
        let stop = AtomicBool::new(false);
        let (errors, deferred): (Vec<Option<FormatError>>, Vec<Vec<usize>>) = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..worker_count(self.h.chunks.len())).map(|_| s.spawn(|| self.worker(&work, &stop))).collect();
            handles.into_iter().map(|h| h.join().expect("decode worker")).unzip()
        });
        let first = errors.into_iter().flatten().min_by_key(|e| match e {
            FormatError::ChecksumMismatch { chunk, .. } => *chunk,
            _ => 0,
        });
        (first, deferred.into_iter().flatten().collect())
    }

    /// One phase 1 worker: decodes the chunks it takes from `work` until
    /// none is left or `stop`; its first error and its deferred chunks.
    fn worker<'o, I>(&self, work: &Mutex<I>, stop: &AtomicBool) -> (Option<FormatError>, Vec<usize>)
    where
        I: Iterator<Item = (usize, &'o mut [u8])>,
    {
        let cs = self.m.chunk_size as usize;
        let mut zstd: Option<zstd::bulk::Decompressor<'static>> = None;
        let mut planes = Vec::new();
        let mut first: Option<FormatError> = None;
        let mut deferred = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let Some((i, dst)) = work.lock().unwrap().next() else { break };
            let ChunkRec(kind, offset, len) = self.h.chunks[i];
            let src = &self.payload[offset as usize..(offset + len) as usize]; // checked by parse
            let base_chunk = self.base.filter(|_| kind.uses_base()).map(|b| &b[i * cs..i * cs + dst.len()]);
            let decoded = match decode_chunk(kind, src, base_chunk, dst, &mut planes, &mut zstd, self.file) {
                Ok(d) => d,
                Err(e) => {
                    first.get_or_insert(e);
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
            };
            let a = i * cs;
            let predicted = decoded && kind.is_xor() && predict::pieces(self.pairs, a, a + dst.len()).next().is_some();
            if let Some(b) = self.base.filter(|_| predicted) {
                // Undo the XOR with the base: the residual against the prediction.
                for (_, x, y) in predict::pieces(self.pairs, a, a + dst.len()) {
                    dst[x - a..y - a].iter_mut().zip(&b[x..y]).for_each(|(d, b)| *d ^= b);
                }
                deferred.push(i);
                continue;
            }
            let found = xxh3_128(dst);
            if !decoded || found != self.m.chunks[i].0 {
                first.get_or_insert(mismatch(self.m, self.file, i, found));
                stop.store(true, Ordering::Relaxed);
            }
        }
        (first, deferred)
    }
}

/// The error for chunk `i` of `m`, whose bytes hash to `found`.
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
    // Each piece: its v (to XOR) and m (to read) in `out`.
    let pieces: Vec<Piece> = deferred
        .iter()
        .flat_map(|&i| pieces(i))
        .map(|(p, x, y)| Piece { v: x, m: p.m + (x - p.v), len: y - x, b1: p.b1, b2: p.b2 })
        .collect();
    apply_predictions(out, base, &pieces, file)?;
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

/// A predicted piece of v in one chunk, in file offsets.
struct Piece {
    /// Start of the v bytes (to XOR the prediction into).
    v: usize,
    /// Start of the m bytes it is predicted from.
    m: usize,
    /// Length of both.
    len: usize,
    /// beta1.
    b1: f64,
    /// beta2.
    b2: f64,
}

/// XORs each piece's prediction into its v bytes in `out`, from its m bytes
/// in `out` and the base's m and v, on worker threads. The pieces' ranges
/// must be disjoint (checked by `parse`; an error otherwise): they are split
/// off `out` in file order.
fn apply_predictions(out: &mut [u8], base: &[u8], pieces: &[Piece], file: &str) -> Result<(), FormatError> {
    let overlap = || bad_header(file, "reduced blob header: predicted ranges overlap");
    // (start, end, index in `parts`: 2 * piece, + 1 for m)
    let mut segs: Vec<(usize, usize, usize)> = Vec::with_capacity(2 * pieces.len());
    for (k, p) in pieces.iter().enumerate() {
        segs.extend([(p.v, p.v + p.len, 2 * k), (p.m, p.m + p.len, 2 * k + 1)]);
    }
    segs.sort_unstable();
    let mut parts: Vec<Option<&mut [u8]>> = (0..segs.len()).map(|_| None).collect();
    let (mut rest, mut pos) = (out, 0);
    for (a, b, k) in segs {
        if a < pos || b - pos > rest.len() {
            return Err(overlap());
        }
        let (seg, tail) = std::mem::take(&mut rest)[a - pos..].split_at_mut(b - a);
        (rest, pos) = (tail, b);
        parts[k] = Some(seg);
    }
    let mut parts = parts.into_iter();
    let mut tasks = Vec::with_capacity(pieces.len());
    for p in pieces {
        let (Some(Some(v)), Some(Some(m_new))) = (parts.next(), parts.next()) else {
            return Err(overlap());
        };
        tasks.push((v, &*m_new, &base[p.m..p.m + p.len], &base[p.v..p.v + p.len], p.b1, p.b2));
    }
    let work = Mutex::new(tasks.into_iter());
    std::thread::scope(|s| {
        for _ in 0..worker_count(pieces.len()) {
            s.spawn(|| loop {
                let Some((v, m_new, m_old, v_old, b1, b2)) = work.lock().unwrap().next() else { break };
                predict::apply(v, m_new, m_old, v_old, b1, b2, true);
            });
        }
    });
    Ok(())
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
        let b = kind.is_xor().then(base_chunk);
        from_planes(dst, planes, b);
    }
    Ok(ok)
}
