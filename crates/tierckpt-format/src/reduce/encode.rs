//! [`encode`]: a shard's bytes to a blob, chunk by chunk on worker threads,
//! each payload written once, straight into the blob.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::blob::{self, manifest_identity, BaseRef, ChunkRec, Header, Kind, PredRec, PREFIX_LEN};
use super::encoder::{pairs_for, predict_base, Encoder};
use super::predict::{self, Pair};
use super::{check_shape, worker_count, Compression, ReduceOptions};
use crate::{FormatError, Manifest};

/// What [`encode`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReduceStats {
    /// Length of the shard encoded.
    pub raw_bytes: u64,
    /// The whole blob, header included.
    pub encoded_bytes: u64,
    /// Chunks in the shard.
    pub chunks: u64,
    /// Chunks taken unchanged from the base (no payload).
    pub same_chunks: u64,
    /// Chunks stored as their compressed XOR against the base.
    pub xor_chunks: u64,
    /// Chunks stored compressed, without the base.
    pub compressed_chunks: u64,
    /// Chunks stored as they are.
    pub raw_chunks: u64,
    /// Adam `exp_avg_sq` tensors XORed against their prediction.
    #[serde(default)]
    pub predicted_pairs: u64,
}

impl ReduceStats {
    /// Counts one chunk of `kind`.
    fn count(&mut self, kind: Kind) {
        match kind {
            Kind::Same => self.same_chunks += 1,
            Kind::Raw => self.raw_chunks += 1,
            Kind::Lz4 | Kind::Zstd => self.compressed_chunks += 1,
            Kind::XorLz4 | Kind::XorZstd => self.xor_chunks += 1,
        }
    }
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
    opts.compression.check()?;
    let base = match base {
        Some((b, bm)) if opts.delta => {
            bm.check_len(b.len())?;
            check_shape(bm, "base")?;
            (bm.chunk_size == m.chunk_size).then_some((b, bm))
        }
        _ => None,
    };
    let pairs = pairs_for(data, m, base.map(|b| b.0), opts.compression);
    let job = Job { data, m, base, pairs: &pairs, compression: opts.compression };
    // The blob: prefix, payloads in the order workers finish them, header.
    // Zeroed memory comes untouched from the allocator: only the pages the
    // payloads take are faulted in, by the workers that write them.
    let header_room = 1024 + 64 * m.chunks.len() + 128 * pairs.len();
    let mut blob = vec![0u8; PREFIX_LEN + data.len() + header_room];
    let (recs, payload_len) = job.encode_chunks(&mut blob[PREFIX_LEN..])?;

    let mut stats = ReduceStats { raw_bytes: data.len() as u64, chunks: recs.len() as u64, ..Default::default() };
    recs.iter().for_each(|r| stats.count(r.0));
    let needs_base = recs.iter().any(|r| r.0.uses_base());
    // The pairs some Xor chunk was predicted with.
    let cs = m.chunk_size as usize;
    let predict: Vec<PredRec> = pairs
        .iter()
        .filter(|p| recs[p.v / cs..=(p.v + p.len - 1) / cs].iter().any(|r| r.0.is_xor()))
        .map(PredRec::from)
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
    blob.truncate(PREFIX_LEN + payload_len);
    blob::finish(&mut blob, &header);
    blob.shrink_to_fit();
    stats.encoded_bytes = blob.len() as u64;
    Ok((blob, stats))
}

/// What every encode worker reads.
struct Job<'a> {
    /// The shard's bytes.
    data: &'a [u8],
    /// The shard's manifest.
    m: &'a Manifest,
    /// The base's bytes and manifest, of the same chunk size, if delta.
    base: Option<(&'a [u8], &'a Manifest)>,
    /// The pairs to predict, sorted by `v`.
    pairs: &'a [Pair],
    /// How chunks are compressed.
    compression: Compression,
}

impl Job<'_> {
    /// Encodes every chunk into `space` (payloads back to back from its
    /// start); the chunk records in chunk order and the bytes used.
    fn encode_chunks(&self, space: &mut [u8]) -> Result<(Vec<ChunkRec>, usize), FormatError> {
        let n = self.m.chunks.len();
        let next = AtomicUsize::new(0);
        let area = PayloadArea::new(space);
        let done: Vec<Result<Vec<(usize, ChunkRec)>, FormatError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..worker_count(n)).map(|_| s.spawn(|| self.worker(&next, &area))).collect();
            handles.into_iter().map(|h| h.join().expect("encode worker")).collect()
        });
        let mut results = Vec::with_capacity(n);
        for d in done {
            results.extend(d?);
        }
        results.sort_unstable_by_key(|r| r.0);
        debug_assert_eq!(results.len(), n);
        Ok((results.into_iter().map(|r| r.1).collect(), area.used()))
    }

    /// One worker: encodes the chunks it takes from `next` into `area`.
    fn worker(&self, next: &AtomicUsize, area: &PayloadArea<'_>) -> Result<Vec<(usize, ChunkRec)>, FormatError> {
        let mut enc = Encoder::new(self.compression)?;
        let mut out = Vec::new();
        let mut pred = Vec::new(); // the predicted base's chunk
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= self.m.chunks.len() {
                return Ok(out);
            }
            let (a, b) = self.m.chunk_range(i);
            let chunk = &self.data[a as usize..b as usize];
            let (kind, at) = enc.encode_chunk(chunk, self.base_chunk(i, &mut pred));
            let src = enc.payload(at, chunk);
            let (offset, dst) = area.take(src.len());
            dst.copy_from_slice(src);
            out.push((i, ChunkRec(kind, offset as u64, src.len() as u64)));
        }
    }

    /// The base's chunk `i` if it has the length of the shard's (with the
    /// predictions written over it, in `pred`, where it holds predicted v
    /// and changed), and whether the two have the same checksum.
    fn base_chunk<'s>(&'s self, i: usize, pred: &'s mut Vec<u8>) -> Option<(&'s [u8], bool)> {
        let (bd, bm) = self.base?;
        if i >= bm.chunks.len() {
            return None;
        }
        let (a, b) = self.m.chunk_range(i);
        let (ba, bb) = bm.chunk_range(i);
        if bb - ba != b - a {
            return None;
        }
        let chunk = &bd[ba as usize..bb as usize];
        let same = bm.chunks[i] == self.m.chunks[i];
        let (a, b) = (a as usize, b as usize);
        if same || predict::pieces(self.pairs, a, b).next().is_none() {
            return Some((chunk, same));
        }
        pred.clear();
        pred.extend_from_slice(chunk);
        predict_base(self.pairs, self.data, bd, a, pred);
        Some((&pred[..], false))
    }
}

/// The blob's payload area, handed out to the workers front to back.
struct PayloadArea<'a> {
    /// The part not handed out yet.
    free: Mutex<&'a mut [u8]>,
    /// The whole area's length.
    len: usize,
}

impl<'a> PayloadArea<'a> {
    /// The whole of `space`, free.
    fn new(space: &'a mut [u8]) -> Self {
        Self { len: space.len(), free: Mutex::new(space) }
    }

    /// The next `n` bytes, and their offset in the area.
    fn take(&self, n: usize) -> (usize, &'a mut [u8]) {
        let mut free = self.free.lock().unwrap();
        let rest = std::mem::take(&mut *free);
        let offset = self.len - rest.len();
        let (dst, rest) = rest.split_at_mut(n);
        *free = rest;
        (offset, dst)
    }

    /// Bytes handed out.
    fn used(self) -> usize {
        self.len - self.free.into_inner().unwrap().len()
    }
}
