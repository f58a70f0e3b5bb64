//! [`estimate`]: a cheap guess of what [`encode`](super::encode) would save.

use super::encoder::{pairs_for, predict_base, sample_range, Encoder, SAMPLES, SAMPLE_LEN};
use super::predict;
use super::{Compression, ReduceOptions};
use crate::Manifest;

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
