//! Chunk checksums (xxh3-128), computed in parallel, and a copy that verifies
//! while it copies so that a restore reads the source bytes only once.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::ops::Range;
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::error::Hex;
use crate::{FormatError, Manifest};

/// Copy-and-hash granularity: small enough to stay in the L2 cache between the
/// copy and the hash of the same bytes.
const SUB_BLOCK: usize = 256 << 10;

/// An xxh3-128 checksum, serialized as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Checksum(pub u128);

impl Serialize for Checksum {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:032x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() != 32 {
            return Err(serde::de::Error::custom(format!("checksum {s:?} is not 32 hex digits")));
        }
        u128::from_str_radix(&s, 16)
            .map(Checksum)
            .map_err(|_| serde::de::Error::custom(format!("checksum {s:?} is not hex")))
    }
}

/// Threads to work on `chunks` items: one per core, at most 8, at least 1.
pub(crate) fn worker_count(chunks: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(8).min(chunks).max(1)
}

/// Splits `0..n` into `parts` contiguous ranges.
fn split(n: usize, parts: usize) -> Vec<Range<usize>> {
    (0..parts).map(|i| (n * i / parts)..(n * (i + 1) / parts)).collect()
}

/// Byte range of chunk `i` of a `len`-byte file.
fn chunk_bounds(i: usize, chunk_size: u64, len: usize) -> Range<usize> {
    let a = (i as u64 * chunk_size) as usize;
    a..(a + chunk_size as usize).min(len)
}

/// xxh3-128 of every `chunk_size` slice of `data`.
pub fn chunk_checksums(data: &[u8], chunk_size: u64) -> Vec<Checksum> {
    let n = (data.len() as u64).div_ceil(chunk_size) as usize;
    let mut out = vec![Checksum(0); n];
    let workers = worker_count(n);
    std::thread::scope(|s| {
        let mut rest = out.as_mut_slice();
        for r in split(n, workers) {
            let (mine, tail) = rest.split_at_mut(r.len());
            rest = tail;
            s.spawn(move || {
                for (slot, i) in mine.iter_mut().zip(r) {
                    *slot = Checksum(xxh3_128(&data[chunk_bounds(i, chunk_size, data.len())]));
                }
            });
        }
    });
    out
}

/// `Truncated` unless `data_len` is the manifest's file length.
fn check_len(data_len: usize, m: &Manifest, file: &str) -> Result<(), FormatError> {
    if data_len as u64 != m.file_len {
        return Err(FormatError::Truncated { file: file.to_string(), expected: m.file_len, found: data_len as u64 });
    }
    Ok(())
}

/// The error for chunk `chunk` of `m`, whose bytes hash to `found`.
fn mismatch(file: &str, m: &Manifest, chunk: usize, found: u128) -> FormatError {
    let (offset, end) = m.chunk_range(chunk);
    FormatError::ChecksumMismatch {
        file: file.to_string(),
        chunk,
        offset,
        end,
        expected: Hex(m.chunks[chunk].0),
        found: Hex(found),
    }
}

/// Checks `data` against the manifest; `file` names it in errors.
pub fn verify_chunks(data: &[u8], m: &Manifest, file: &str) -> Result<(), FormatError> {
    check_len(data.len(), m, file)?;
    let found = chunk_checksums(data, m.chunk_size);
    match found.iter().zip(&m.chunks).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(mismatch(file, m, i, found[i].0)),
    }
}

/// A destination for part of a shard: `dst` receives the file bytes starting
/// at `file_offset`.
pub struct CopyTarget<'a> {
    /// Offset in the file of the first byte `dst` receives.
    pub file_offset: u64,
    /// Where the bytes go; its length says how many.
    pub dst: &'a mut [u8],
}

/// A [`CopyTarget`] as the copy workers share it: a raw pointer, so that
/// each worker can write its own disjoint part.
#[derive(Clone, Copy)]
struct RawTarget {
    /// Offset in the file of the first byte.
    offset: usize,
    /// The destination's first byte.
    ptr: *mut u8,
    /// The destination's length.
    len: usize,
}
// SAFETY: targets are disjoint and each byte is written by exactly one worker
// (workers own disjoint chunk ranges, hence disjoint file ranges).
unsafe impl Send for RawTarget {}
// SAFETY: shared `&RawTarget`s only read the pointer; the bytes behind it are
// written through it by one worker each, as for `Send` above.
unsafe impl Sync for RawTarget {}

/// Copies the parts of `src` that `targets` ask for and verifies every chunk
/// of `src` against the manifest in the same pass: each 256 KiB block is
/// hashed, then copied from the cache with non-temporal stores (the
/// destination is never read). `src` must not change during the call (the
/// memory tier guarantees it: a leased segment is never recycled). On error
/// the destinations hold unspecified bytes.
pub fn copy_verified(src: &[u8], targets: &mut [CopyTarget<'_>], m: &Manifest, file: &str) -> Result<(), FormatError> {
    check_len(src.len(), m, file)?;
    let mut raw: Vec<RawTarget> = targets
        .iter_mut()
        .map(|t| RawTarget { offset: t.file_offset as usize, ptr: t.dst.as_mut_ptr(), len: t.dst.len() })
        .collect();
    raw.sort_by_key(|t| t.offset);
    let mut end = 0usize;
    for t in &raw {
        if t.offset < end || t.offset.saturating_add(t.len) > src.len() {
            return Err(FormatError::InvalidArgument(format!(
                "copy target at offset {} with {} bytes overlaps another or runs past the {}-byte file {file}",
                t.offset,
                t.len,
                src.len()
            )));
        }
        end = t.offset + t.len;
    }
    let n = m.chunks.len();
    let raw = &raw;
    let results: Vec<Result<(), (usize, u128)>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            split(n, worker_count(n)).into_iter().map(|r| s.spawn(move || copy_hash_chunks(src, raw, m, r))).collect();
        handles.into_iter().map(|h| h.join().expect("copy worker")).collect()
    });
    for r in results {
        if let Err((chunk, found)) = r {
            return Err(mismatch(file, m, chunk, found));
        }
    }
    Ok(())
}

/// One copy worker: hashes `chunks` of `src` and copies their bytes into the
/// `targets` (sorted by offset) that ask for them; the first bad chunk and
/// the checksum found.
fn copy_hash_chunks(
    src: &[u8],
    targets: &[RawTarget],
    m: &Manifest,
    chunks: Range<usize>,
) -> Result<(), (usize, u128)> {
    for c in chunks {
        let range = chunk_bounds(c, m.chunk_size, src.len());
        let mut h = Xxh3::new();
        let mut p = range.start;
        let mut ti = targets.partition_point(|t| t.offset + t.len <= p);
        while p < range.end {
            let block_end = (p + SUB_BLOCK).min(range.end);
            while p < block_end {
                match targets.get(ti) {
                    Some(t) if t.offset <= p && p < t.offset + t.len => {
                        let q = block_end.min(t.offset + t.len);
                        // SAFETY: [p, q) lies inside this target (checked above) and
                        // inside this worker's chunk range, which no other worker touches.
                        let dst = unsafe { std::slice::from_raw_parts_mut(t.ptr.add(p - t.offset), q - p) };
                        h.update(&src[p..q]);
                        copy_streaming(dst, &src[p..q]);
                        if q == t.offset + t.len {
                            ti += 1;
                        }
                        p = q;
                    }
                    Some(t) if t.len == 0 && t.offset <= p => ti += 1,
                    next => {
                        let q = next.map_or(block_end, |t| block_end.min(t.offset.max(p + 1)));
                        h.update(&src[p..q]);
                        p = q;
                    }
                }
            }
        }
        let found = h.digest128();
        if found != m.chunks[c].0 {
            return Err((c, found));
        }
    }
    store_fence();
    Ok(())
}

/// Copies with non-temporal stores where the CPU has them (SSE2 is part of
/// x86_64): the destination's cache lines are written without being read.
fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        dst[..head].copy_from_slice(&src[..head]);
        let body = (dst.len() - head) / 64 * 64;
        // SAFETY: SSE2 is baseline on x86_64; dst + head is 16-byte aligned and
        // every access stays inside [head, head + body) of both slices.
        unsafe {
            let (s, d) = (src.as_ptr().add(head), dst.as_mut_ptr().add(head));
            let mut i = 0;
            while i < body {
                for k in [0, 16, 32, 48] {
                    _mm_stream_si128(d.add(i + k) as *mut __m128i, _mm_loadu_si128(s.add(i + k) as *const __m128i));
                }
                i += 64;
            }
        }
        dst[head + body..].copy_from_slice(&src[head + body..]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Orders non-temporal stores before whatever follows.
fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is baseline on x86_64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// Verifies a shard's bytes as they stream in, chunk by chunk, so a receiver
/// learns of a mismatch as soon as the bad chunk ends.
pub struct StreamVerifier<'m> {
    /// The manifest verified against.
    m: &'m Manifest,
    /// The file's name, for errors.
    file: String,
    /// The chunk being fed.
    chunk: usize,
    /// Bytes of it fed so far.
    in_chunk: u64,
    /// Bytes fed in all.
    total: u64,
    /// Hash of the chunk's bytes fed so far.
    hasher: Xxh3,
}

impl<'m> StreamVerifier<'m> {
    /// A verifier of the bytes `m` describes; `file` names them in errors.
    pub fn new(m: &'m Manifest, file: impl Into<String>) -> Self {
        Self { m, file: file.into(), chunk: 0, in_chunk: 0, total: 0, hasher: Xxh3::new() }
    }

    /// Feeds the next bytes of the file.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), FormatError> {
        while !data.is_empty() {
            if self.chunk >= self.m.chunks.len() {
                return Err(FormatError::InvalidHeader {
                    file: self.file.clone(),
                    reason: format!("more than the {} bytes its manifest describes", self.m.file_len),
                });
            }
            let (a, b) = self.m.chunk_range(self.chunk);
            let take = ((b - a - self.in_chunk) as usize).min(data.len());
            self.hasher.update(&data[..take]);
            self.in_chunk += take as u64;
            self.total += take as u64;
            data = &data[take..];
            if self.in_chunk == b - a {
                let found = self.hasher.digest128();
                if found != self.m.chunks[self.chunk].0 {
                    return Err(mismatch(&self.file, self.m, self.chunk, found));
                }
                self.chunk += 1;
                self.in_chunk = 0;
                self.hasher.reset();
            }
        }
        Ok(())
    }

    /// Checks that the whole file arrived.
    pub fn finish(self) -> Result<(), FormatError> {
        check_len(self.total as usize, self.m, &self.file)?;
        if self.chunk != self.m.chunks.len() {
            return Err(FormatError::Truncated { file: self.file, expected: self.m.file_len, found: self.total });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ShardKey;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn streaming_hash_matches_one_shot() {
        let d = data(SUB_BLOCK * 3 + 17);
        let mut h = Xxh3::new();
        for part in d.chunks(1000) {
            h.update(part);
        }
        assert_eq!(h.digest128(), xxh3_128(&d));
    }

    #[test]
    fn verify_detects_flip_and_names_chunk() {
        let mut d = data(9 << 20);
        let m = Manifest::compute(ShardKey::new("n", 1, 0), 1, &d, 0);
        verify_chunks(&d, &m, "f").unwrap();
        d[5 << 20] ^= 1;
        let e = verify_chunks(&d, &m, "seg.safetensors").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("chunk 1") && s.contains("seg.safetensors"), "{s}");
        assert!(s.contains(&format!("{:032x}", m.chunks[1].0)), "{s}");
    }

    #[test]
    fn verify_detects_truncation() {
        let d = data(1000);
        let m = Manifest::compute(ShardKey::new("n", 1, 0), 1, &d, 0);
        let e = verify_chunks(&d[..999], &m, "f").unwrap_err();
        assert!(matches!(e, FormatError::Truncated { expected: 1000, found: 999, .. }));
    }

    #[test]
    fn copy_verified_scatters_and_verifies() {
        let d = data((9 << 20) + 5);
        let m = Manifest::compute(ShardKey::new("n", 1, 0), 1, &d, 0);
        let mut a = vec![0u8; 3 << 20];
        let mut b = vec![0u8; 0];
        let mut c = vec![0u8; (5 << 20) - 5];
        let (oa, ob, oc) = (100usize, 4 << 20, (4 << 20) + 10);
        let mut targets = [
            CopyTarget { file_offset: oc as u64, dst: &mut c },
            CopyTarget { file_offset: oa as u64, dst: &mut a },
            CopyTarget { file_offset: ob as u64, dst: &mut b },
        ];
        copy_verified(&d, &mut targets, &m, "f").unwrap();
        assert_eq!(&a[..], &d[oa..oa + a.len()]);
        assert_eq!(&c[..], &d[oc..oc + c.len()]);

        let mut bad = d.clone();
        bad[8 << 20] ^= 0x80;
        let mut c2 = vec![0u8; (5 << 20) - 5];
        let mut t2 = [CopyTarget { file_offset: oc as u64, dst: &mut c2 }];
        let e = copy_verified(&bad, &mut t2, &m, "f").unwrap_err();
        assert!(matches!(e, FormatError::ChecksumMismatch { chunk: 2, .. }), "{e}");
    }

    #[test]
    fn stream_verifier_accepts_any_split_and_names_bad_chunks() {
        let d = data((9 << 20) + 7);
        let m = Manifest::compute(ShardKey::new("n", 1, 0), 1, &d, 0);
        for piece in [1usize << 20, 3_000_001, 17] {
            let mut v = StreamVerifier::new(&m, "f");
            for p in d[..2 << 20].chunks(piece).chain(d[2 << 20..].chunks(1 << 22)) {
                v.feed(p).unwrap();
            }
            v.finish().unwrap();
        }
        let mut bad = d.clone();
        bad[5 << 20] ^= 4;
        let mut v = StreamVerifier::new(&m, "peer n1");
        let e = bad.chunks(1 << 20).try_for_each(|p| v.feed(p)).unwrap_err();
        assert!(matches!(e, FormatError::ChecksumMismatch { chunk: 1, .. }), "{e}");
        let mut short = StreamVerifier::new(&m, "f");
        short.feed(&d[..100]).unwrap();
        assert!(matches!(short.finish(), Err(FormatError::Truncated { .. })));
        let mut long = StreamVerifier::new(&m, "f");
        long.feed(&d).unwrap();
        assert!(long.feed(&[0]).is_err());
    }

    #[test]
    fn overlapping_targets_are_refused() {
        let d = data(100);
        let m = Manifest::compute(ShardKey::new("n", 1, 0), 1, &d, 0);
        let (mut a, mut b) = (vec![0u8; 10], vec![0u8; 10]);
        let mut t = [CopyTarget { file_offset: 0, dst: &mut a }, CopyTarget { file_offset: 5, dst: &mut b }];
        assert!(copy_verified(&d, &mut t, &m, "f").is_err());
    }
}
