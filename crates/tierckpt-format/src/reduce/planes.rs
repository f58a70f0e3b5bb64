//! Byte planes: compressed kinds compress a chunk (or its XOR against the
//! base) split into [`PLANES`] planes, byte k of every 4-byte word in plane
//! k. Tensor data starts 64-byte aligned and chunks are 4-MiB aligned, so for
//! fp32 the sign and exponent bytes, and for bf16 the high bytes, land in
//! planes of their own, which compress far better than interleaved with
//! random mantissa bytes (and XOR deltas of small updates are zero there).

/// Width of the byte planes.
pub(super) const PLANES: usize = 4;

/// `dst` = the planes of `a` (XOR `b` where given); a tail of fewer than
/// [`PLANES`] bytes is appended as is.
pub(super) fn to_planes(dst: &mut Vec<u8>, a: &[u8], b: Option<&[u8]>) {
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
pub(super) fn from_planes(dst: &mut [u8], src: &[u8], b: Option<&[u8]>) {
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
