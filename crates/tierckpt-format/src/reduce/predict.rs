//! Prediction of Adam's second moment for delta blobs (see `reduce`).
//!
//! One Adam step updates `m' = b1*m + (1-b1)*g` and `v' = b2*v + (1-b2)*g*g`
//! with the same gradient `g`, so from the new `exp_avg` (m') and the base's
//! `exp_avg` and `exp_avg_sq` (m, v), `v'` is known to about an ulp. The
//! codec XORs the new `exp_avg_sq` against that prediction instead of the
//! base's bytes, which leaves mostly zero bits.

// `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::HashMap;

use safetensors::Dtype;

use crate::layout::{parse_shard, TensorEntry};

/// A predicted pair, in file byte offsets (the same in the base and the new
/// shard): `exp_avg` at `m..m + len`, `exp_avg_sq` at `v..v + len`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Pair {
    pub m: usize,
    pub v: usize,
    pub len: usize,
    pub b1: f64,
    pub b2: f64,
}

/// Betas tried, most common first.
pub(crate) const B1_GRID: [f64; 6] = [0.9, 0.95, 0.8, 0.85, 0.98, 0.99];
pub(crate) const B2_GRID: [f64; 8] = [0.999, 0.95, 0.98, 0.99, 0.995, 0.9999, 0.997, 0.9];
/// Betas are chosen on this many runs of `RUN` consecutive elements spread
/// over the tensor (runs rather than single elements: fewer cache misses).
const RUNS: usize = 16;
const RUN: usize = 32;

/// The predicted bits of `v'` from the bits of `m'`, `m` and `v`: f64 with
/// only `+ - * /` (never contracted to FMA by Rust), so identical on every
/// platform; `v` itself where an input or the result is not finite (NaN
/// payloads differ between architectures).
#[inline]
pub(crate) fn predict(m_new: u32, m_old: u32, v_old: u32, b1: f64, b2: f64) -> u32 {
    let (mn, mo, vo) = (f32::from_bits(m_new), f32::from_bits(m_old), f32::from_bits(v_old));
    let g = (mn as f64 - b1 * mo as f64) / (1.0 - b1);
    let p = (b2 * vo as f64 + (1.0 - b2) * g * g) as f32;
    // `&`, not `&&`: no branches, so the loops vectorize.
    if mn.is_finite() & mo.is_finite() & vo.is_finite() & p.is_finite() {
        p.to_bits()
    } else {
        v_old
    }
}

fn word(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Writes (or with `xor`, XORs) into `dst` the predictions from the
/// little-endian f32 words of `m_new`, `m_old` and `v_old`; all four have
/// the same length, a multiple of 4.
pub(crate) fn apply(dst: &mut [u8], m_new: &[u8], m_old: &[u8], v_old: &[u8], b1: f64, b2: f64, xor: bool) {
    debug_assert!(
        dst.len() % 4 == 0 && m_new.len() == dst.len() && m_old.len() == dst.len() && v_old.len() == dst.len()
    );
    let words =
        dst.chunks_exact_mut(4).zip(m_new.chunks_exact(4).zip(m_old.chunks_exact(4)).zip(v_old.chunks_exact(4)));
    if xor {
        for (d, ((a, b), c)) in words {
            let p = predict(word(a), word(b), word(c), b1, b2) ^ word(d);
            d.copy_from_slice(&p.to_le_bytes());
        }
    } else {
        for (d, ((a, b), c)) in words {
            d.copy_from_slice(&predict(word(a), word(b), word(c), b1, b2).to_le_bytes());
        }
    }
}

/// The pieces of the pairs' `v` ranges inside `a..b` (file offsets), with
/// their pair: `pairs` sorted by `v`, their `v` ranges disjoint.
pub(crate) fn pieces(pairs: &[Pair], a: usize, b: usize) -> impl Iterator<Item = (&Pair, usize, usize)> {
    let first = pairs.partition_point(|p| p.v + p.len <= a);
    pairs[first..].iter().take_while(move |p| p.v < b).map(move |p| (p, p.v.max(a), (p.v + p.len).min(b)))
}

/// Distance in ulps between two f32 bit patterns (sign-magnitude to
/// two's complement order; NaNs are merely far).
fn ulps(a: u32, b: u32) -> u64 {
    let ord = |x: u32| if x >> 31 == 1 { -((x & 0x7fff_ffff) as i64) } else { x as i64 };
    ord(a).abs_diff(ord(b))
}

/// The betas of the grid whose predictions of the sampled elements are most
/// often within 1 ulp; none when under half are within 2 ulps (checkpoints
/// several steps apart, other optimizers).
fn choose_betas(m_new: &[u8], m_old: &[u8], v_old: &[u8], v_new: &[u8]) -> Option<(f64, f64)> {
    let n = v_new.len() / 4;
    let run = RUN.min(n);
    let runs = RUNS.min(n / run.max(1));
    let mut s: Vec<[u32; 4]> = Vec::with_capacity(runs * run);
    for r in 0..runs {
        let start = if runs == 1 { 0 } else { (n - run) * r / (runs - 1) };
        for i in start..start + run {
            let w = |b: &[u8]| word(&b[4 * i..]);
            s.push([w(m_new), w(m_old), w(v_old), w(v_new)]);
        }
    }
    if s.is_empty() {
        return None;
    }
    let mut best: Option<(usize, usize, f64, f64)> = None; // within 1, within 2, b1, b2
    for b1 in B1_GRID {
        for b2 in B2_GRID {
            let (mut one, mut two) = (0, 0);
            for [mn, mo, vo, vn] in &s {
                let d = ulps(predict(*mn, *mo, *vo, b1, b2), *vn);
                one += (d <= 1) as usize;
                two += (d <= 2) as usize;
            }
            if best.is_none_or(|b| one > b.0) {
                best = Some((one, two, b1, b2));
            }
            if one * 32 >= s.len() * 31 {
                // Near perfect: no other betas do materially better.
                return Some((b1, b2));
            }
        }
    }
    best.filter(|b| 2 * b.1 >= s.len()).map(|b| (b.2, b.3))
}

/// The pairs of `data` worth predicting against `base`: tensors `P +
/// "exp_avg_sq"` and `P + "exp_avg"`, both F32 of the same length, at the
/// same 4-byte aligned offsets with the same dtype and shape in both shards,
/// whose `exp_avg_sq` follows Adam for some betas of the grid. Sorted by `v`.
/// Empty when either shard is not safetensors.
pub(crate) fn find_pairs(data: &[u8], base: &[u8]) -> Vec<Pair> {
    let (Ok(new), Ok(old)) = (parse_shard(data, "new"), parse_shard(base, "base")) else {
        return Vec::new();
    };
    let old: HashMap<&str, &TensorEntry> = old.entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let by_name: HashMap<&str, &TensorEntry> = new.entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut pairs = Vec::new();
    for v in &new.entries {
        let Some(prefix) = v.name.strip_suffix("exp_avg_sq") else { continue };
        let Some(m) = by_name.get(format!("{prefix}exp_avg").as_str()) else { continue };
        let same_in_base = |e: &TensorEntry| old.get(e.name.as_str()).is_some_and(|o| **o == *e);
        let ok = v.dtype == Dtype::F32
            && m.dtype == Dtype::F32
            && v.len == m.len
            && v.len > 0
            && (v.offset | m.offset) % 4 == 0
            && (v.offset + v.len <= m.offset || m.offset + m.len <= v.offset)
            && same_in_base(v)
            && same_in_base(m);
        if !ok {
            continue;
        }
        let (vr, mr) = (v.range(), m.range());
        if let Some((b1, b2)) = choose_betas(&data[mr.clone()], &base[mr.clone()], &base[vr.clone()], &data[vr]) {
            pairs.push(Pair { m: m.offset as usize, v: v.offset as usize, len: v.len as usize, b1, b2 });
        }
    }
    pairs.sort_by_key(|p| p.v);
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prediction_is_exact_math_and_falls_back_on_non_finite() {
        let f = |x: f32| x.to_bits();
        // g = (0.19 - 0.9 * 0.1) / 0.1 = 1, v' = 0.999 * 2 + 0.001 * 1.
        let p = f32::from_bits(predict(f(0.19), f(0.1), f(2.0), 0.9, 0.999));
        assert!((p - 1.999).abs() <= 2.0 * f32::EPSILON, "{p}");
        for (mn, mo, vo) in
            [(f32::NAN, 0.1, 2.0), (0.1, f32::INFINITY, 2.0), (0.1, 0.1, f32::NAN), (f32::MAX, -f32::MAX, f32::MAX)]
        {
            assert_eq!(predict(f(mn), f(mo), f(vo), 0.9, 0.999), f(vo), "{mn} {mo} {vo}");
        }
        // Betas from a hostile header: still no panic, a finite result or v.
        assert_eq!(predict(f(1.0), f(1.0), f(3.0), 1.0, 0.5), f(3.0));
        assert_eq!(ulps(f(1.0), f(1.0)), 0);
        assert_eq!(ulps(f(-0.0), f(0.0)), 0);
        assert_eq!(ulps(f(1.0), f32::from_bits(f(1.0) + 2).to_bits()), 2);
        assert_eq!(ulps(f(-f32::from_bits(1)), f(f32::from_bits(1))), 2);
    }

    #[test]
    fn apply_writes_or_xors() {
        let words = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (mn, mo, vo) = (words(&[0.19, 1.0, f32::NAN]), words(&[0.1, 2.0, 1.0]), words(&[2.0, 3.0, 4.0]));
        let mut d = vec![0u8; 12];
        apply(&mut d, &mn, &mo, &vo, 0.9, 0.999, false);
        assert_eq!(d[8..], 4.0f32.to_le_bytes());
        let mut x = d.clone();
        apply(&mut x, &mn, &mo, &vo, 0.9, 0.999, true);
        assert_eq!(x, vec![0u8; 12]);
    }

    #[test]
    fn pieces_clip_to_the_range() {
        let p = |v, len| Pair { m: 0, v, len, b1: 0.9, b2: 0.999 };
        let pairs = [p(100, 40), p(200, 8), p(300, 100)];
        let got = |a, b| pieces(&pairs, a, b).map(|(p, x, y)| (p.v, x, y)).collect::<Vec<_>>();
        assert_eq!(got(0, 100), vec![]);
        assert_eq!(got(0, 104), vec![(100, 100, 104)]);
        assert_eq!(got(120, 320), vec![(100, 120, 140), (200, 200, 208), (300, 300, 320)]);
        assert_eq!(got(140, 200), vec![]);
        assert_eq!(got(396, 1000), vec![(300, 396, 400)]);
    }
}
