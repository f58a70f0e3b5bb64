//! Parallel copies between caller memory and mapped segments, with page
//! tables populated in bulk (one `madvise` per worker instead of a fault per page).

use std::ops::Range;

const PARALLEL_MIN: usize = 4 << 20;

pub(crate) fn workers(bytes: usize) -> usize {
    if bytes < PARALLEL_MIN {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8)
}

/// Prefaults `range` of a mapping starting at `base`.
pub(crate) fn populate(base: *const u8, range: Range<usize>, write: bool) {
    const PAGE: usize = 4096;
    let start = range.start / PAGE * PAGE;
    if range.end <= start {
        return;
    }
    let advice = if write { 23 } else { 22 }; // MADV_POPULATE_WRITE / _READ (Linux 5.14+)
                                              // SAFETY: the range lies inside a live mapping; on older kernels the call
                                              // fails with EINVAL and pages fault in on first touch instead.
    unsafe {
        libc::madvise(base.add(start) as *mut libc::c_void, range.end - start, advice);
    }
}

#[derive(Clone, Copy)]
struct Dst(*mut u8);
// SAFETY: workers write disjoint ranges.
unsafe impl Send for Dst {}
// SAFETY: as for Send: each worker writes only its own range.
unsafe impl Sync for Dst {}

/// Copies each `(offset, bytes)` piece into `dst` at `offset`, split evenly
/// over worker threads. Pieces must not overlap and must fit in `dst`.
pub(crate) fn scatter(dst: &mut [u8], pieces: &[(usize, &[u8])], prefault: bool) {
    let total: usize = pieces.iter().map(|(_, s)| s.len()).sum();
    for (off, s) in pieces {
        assert!(off + s.len() <= dst.len(), "piece past the end of its segment");
    }
    let n = workers(total);
    let base = Dst(dst.as_mut_ptr());
    // Cut the concatenated pieces into n spans of equal size.
    let spans: Vec<Vec<(usize, &[u8])>> = (0..n)
        .map(|w| {
            let (lo, hi) = (total * w / n, total * (w + 1) / n);
            let mut out = Vec::new();
            let mut pos = 0usize;
            for (off, s) in pieces {
                let (a, b) = (pos.max(lo), (pos + s.len()).min(hi));
                if a < b {
                    out.push((off + a - pos, &s[a - pos..b - pos]));
                }
                pos += s.len();
            }
            out
        })
        .collect();
    let run = move |span: &[(usize, &[u8])]| {
        let base = base;
        for (off, s) in span {
            if prefault {
                populate(base.0, *off..off + s.len(), true);
            }
            // SAFETY: in bounds (asserted) and disjoint across workers.
            unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), base.0.add(*off), s.len()) };
        }
    };
    if n == 1 {
        run(&spans[0]);
        return;
    }
    std::thread::scope(|sc| {
        for span in &spans[1..] {
            sc.spawn(move || run(span));
        }
        run(&spans[0]);
    });
}

/// Prefaults a whole mapping with parallel workers (writable with `write`).
pub(crate) fn populate_parallel(map: &[u8], write: bool) {
    let n = workers(map.len());
    let base = Dst(map.as_ptr() as *mut u8);
    let len = map.len();
    std::thread::scope(|sc| {
        for w in 0..n {
            sc.spawn(move || {
                let base = base;
                populate(base.0, len * w / n..len * (w + 1) / n, write)
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_places_every_byte() {
        let a: Vec<u8> = (0..5_000_000u32).map(|i| i as u8).collect();
        let b = vec![9u8; 3_000_001];
        let mut dst = vec![0u8; 8_000_200];
        scatter(&mut dst, &[(100, &a), (100 + a.len(), &b)], true);
        assert_eq!(&dst[100..100 + a.len()], &a[..]);
        assert_eq!(&dst[100 + a.len()..100 + a.len() + b.len()], &b[..]);
        assert!(dst[..100].iter().all(|&x| x == 0));
    }
}
