//! `bench reduce`'s codec part: each checkpoint encoded alone and against
//! the one before, decoded and compared, against a memcpy of the same bytes.

use std::time::Instant;

use anyhow::{bail, Result};
use tierckpt_format::{decode_into, encode, Compression, Manifest, ReduceOptions, ReduceStats};
use tierckpt_harness::stats::{gibps, median};

use super::{ReduceRow, Workload};

/// memcpy repetitions before each checkpoint's measurements (the median of
/// all is the floor).
const FLOOR_REPS: usize = 3;

pub(super) fn measure_workload(kind: Workload, c: Compression, shards: &[(Vec<u8>, Manifest)]) -> Result<ReduceRow> {
    let len = shards[0].0.len();
    let mut out = vec![0x5Au8; len];
    let (mut floor, mut ce, mut cd, mut de, mut dd) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut cr, mut dr) = (vec![], vec![]);
    let (mut cstats, mut dstats) = (ReduceStats::default(), ReduceStats::default());
    // One unmeasured round (threads, codec contexts, allocator).
    {
        let (data, m) = &shards[1];
        let (blob, _) = encode(data, m, None, &ReduceOptions { compression: c, delta: false })?;
        decode_into(&blob, m, None, &mut out, "warm-up")?;
    }
    for w in shards.windows(2) {
        let ((base, bm), (data, m)) = (&w[0], &w[1]);
        let file = m.key.to_string();
        if out.len() != data.len() {
            out = vec![0x5Au8; data.len()];
        }
        for _ in 0..FLOOR_REPS {
            let t = Instant::now();
            out.copy_from_slice(data);
            std::hint::black_box(&mut out);
            floor.push(t.elapsed().as_secs_f64());
        }
        out.fill(0);

        for delta in [false, true] {
            let opts = ReduceOptions { compression: c, delta };
            let b = delta.then_some((&base[..], bm));
            let t = Instant::now();
            let (blob, stats) = encode(data, m, b, &opts)?;
            let enc = t.elapsed().as_secs_f64();
            let t = Instant::now();
            decode_into(&blob, m, delta.then_some(&base[..]), &mut out, &file)?;
            let dec = t.elapsed().as_secs_f64();
            if out != *data {
                bail!("{file}: decoded bytes differ from the original ({c}, delta {delta})");
            }
            out.fill(0);
            let ratio = stats.encoded_bytes as f64 / stats.raw_bytes as f64;
            let (e, d, r, s) =
                if delta { (&mut de, &mut dd, &mut dr, &mut dstats) } else { (&mut ce, &mut cd, &mut cr, &mut cstats) };
            e.push(enc);
            d.push(dec);
            r.push(ratio);
            *s = stats;
        }
    }
    let bytes = len as u64;
    let fl = median(&floor);
    let target = kind.target_ratio();
    let delta_ratio = median(&dr);
    Ok(ReduceRow {
        workload: kind.name(),
        compression: c.to_string(),
        file_bytes: bytes,
        steps_measured: shards.len() - 1,
        compress_bytes_ratio: median(&cr),
        delta_bytes_ratio: delta_ratio,
        compress_encode_gibps: gibps(bytes, median(&ce)),
        compress_encode_ratio: median(&ce) / fl,
        compress_decode_gibps: gibps(bytes, median(&cd)),
        compress_decode_ratio: median(&cd) / fl,
        delta_encode_gibps: gibps(bytes, median(&de)),
        delta_encode_ratio: median(&de) / fl,
        delta_decode_gibps: gibps(bytes, median(&dd)),
        delta_decode_ratio: median(&dd) / fl,
        memcpy_floor_gibps: gibps(bytes, fl),
        delta_stats: dstats,
        compress_stats: cstats,
        target_ratio: target,
        meets_target: target.map(|t| delta_ratio <= t),
    })
}
