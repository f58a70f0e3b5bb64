use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use xxhash_rust::xxh3::xxh3_128;

use super::blob::{check_predict, parse, ChunkRec, Header, Kind, PREFIX_LEN};
use super::planes::{from_planes, to_planes};
use super::*;
use crate::{
    chunk_checksums, parse_shard, Dtype, FormatError, Manifest, ShardKey, ShardLayout, TensorSpec, DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
};

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

/// A roughly normal f32 (sum of the four uniform 16-bit parts of `x`).
fn normal_of(x: u64) -> f32 {
    let s = (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
    (s as f32 / 65536.0 - 2.0) * 1.732_050_8
}

/// A roughly normal f32 from `rng`.
fn normal(rng: &mut SmallRng) -> f32 {
    normal_of(rng.random())
}

/// bf16-like weights: random mantissas, few exponents (compressible).
fn weights(n_bytes: usize, seed: u64) -> Vec<u8> {
    let mut r = SmallRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(n_bytes);
    while v.len() < n_bytes {
        let x: u64 = r.random();
        let exp = 0x3c + (x >> 60) as u16 % 3; // |w| ~ 2^-7..2^-5
        let bf = ((x & 1) as u16) << 15 | exp << 7 | ((x >> 8) & 0x7f) as u16;
        v.extend_from_slice(&bf.to_le_bytes());
    }
    v.truncate(n_bytes);
    v
}

/// `n` uniformly random bytes.
fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
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
    let (h, _, _) = parse(blob, "t").unwrap();
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
    for v in [0u8, 3, 255] {
        let mut other = blob.clone();
        other[7] = v;
        let e = decode_into(&other, &m, None, &mut out, "f").unwrap_err();
        assert!(matches!(e, FormatError::UnsupportedVersion { .. }), "{e}");
    }
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
    for (s, c) in [
        ("off", Compression::Off),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd(DEFAULT_ZSTD_LEVEL)),
        ("zstd:1", Compression::Zstd(1)),
        ("zstd:19", Compression::Zstd(19)),
    ] {
        assert_eq!(s.parse::<Compression>().unwrap(), c);
        assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
    }
    for bad in ["", "gzip", "zstd:", "zstd:0", "zstd:20", "zstd:-1", "zstd:+3", "ZSTD", "lz4:1", "zstd:1x"] {
        let e = bad.parse::<Compression>().unwrap_err();
        let s = e.to_string();
        assert!(
            matches!(e, FormatError::InvalidArgument(_)) && s.contains(&format!("{bad:?}")) && s.contains("zstd:N"),
            "{s}"
        );
    }
    assert_eq!(serde_json::to_string(&Compression::Zstd(3)).unwrap(), "\"zstd:3\"");
    assert_eq!(serde_json::from_str::<Compression>("\"lz4\"").unwrap(), Compression::Lz4);
    let data = weights(100, 1);
    let m = man(&data, 1, CS);
    assert!(encode(&data, &m, None, &opts(Compression::Zstd(40), false)).is_err());
}

/// A small training state, stepped like PyTorch's Adam in f32: a frozen
/// bf16 tensor and three trainable bf16 tensors of `n` parameters with
/// fp32 moments `optim.layers.{i}.exp_avg` and `.exp_avg_sq` (betas 0.9
/// and 0.999, the last 0.9 and 0.95).
struct Train {
    frozen: Vec<u16>,
    layers: Vec<Layer>,
    rng: SmallRng,
}

struct Layer {
    w: Vec<u16>,
    m: Vec<f32>,
    v: Vec<f32>,
    b1: f32,
    b2: f32,
    scale: f32,
}

fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

impl Train {
    fn new(n: usize, frozen: usize, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let frozen = (0..frozen).map(|_| bf16(0.02 * normal(&mut rng))).collect();
        let layers = [(0.9, 0.999, 1e-3), (0.9, 0.999, 3e-5), (0.9, 0.95, 1e-2)]
            .into_iter()
            .map(|(b1, b2, scale): (f32, f32, f32)| Layer {
                w: (0..n).map(|_| bf16(0.02 * normal(&mut rng))).collect(),
                m: (0..n).map(|_| 0.3 * scale * normal(&mut rng)).collect(),
                v: (0..n).map(|_| scale * scale * (0.5 + rng.random::<f32>())).collect(),
                b1,
                b2,
                scale,
            })
            .collect();
        Train { frozen, layers, rng }
    }

    fn step(&mut self) {
        for l in &mut self.layers {
            for ((w, m), v) in l.w.iter_mut().zip(&mut l.m).zip(&mut l.v) {
                let g = l.scale * (0.3 * m.signum() + normal(&mut self.rng));
                *m = l.b1 * *m + (1.0 - l.b1) * g;
                *v = l.b2 * *v + (1.0 - l.b2) * g * g;
                *w = bf16(f32::from_bits((*w as u32) << 16) - 1e-4 * *m / (v.sqrt() + 1e-8));
            }
        }
    }

    /// The safetensors bytes; with `hide`, `exp_avg_sq` is spelled
    /// `exp_avg_sQ` (same layout, nothing to predict).
    fn bytes(&self, hide: bool) -> Vec<u8> {
        let sq = if hide { "exp_avg_sQ" } else { "exp_avg_sq" };
        let spec = |name: String, dtype, n| TensorSpec { name, dtype, shape: vec![n] };
        // 3 bytes at the end: the last chunk ends in a tail of under 4 bytes.
        let mut specs =
            vec![spec("frozen.weight".into(), Dtype::BF16, self.frozen.len()), spec("odd".into(), Dtype::U8, 3)];
        let mut tensors: Vec<Vec<u8>> = vec![self.frozen.iter().flat_map(|x| x.to_le_bytes()).collect(), vec![1, 2, 3]];
        for (i, l) in self.layers.iter().enumerate() {
            specs.push(spec(format!("layers.{i}.weight"), Dtype::BF16, l.w.len()));
            tensors.push(l.w.iter().flat_map(|x| x.to_le_bytes()).collect());
            specs.push(spec(format!("optim.layers.{i}.exp_avg"), Dtype::F32, l.m.len()));
            tensors.push(l.m.iter().flat_map(|x| x.to_le_bytes()).collect());
            specs.push(spec(format!("optim.layers.{i}.{sq}"), Dtype::F32, l.v.len()));
            tensors.push(l.v.iter().flat_map(|x| x.to_le_bytes()).collect());
        }
        let layout = ShardLayout::new(&specs, &Default::default()).unwrap();
        let mut f = vec![0u8; layout.file_len as usize];
        f[..layout.header.len()].copy_from_slice(&layout.header);
        for (e, t) in layout.entries.iter().zip(&tensors) {
            f[e.range()].copy_from_slice(t);
        }
        f
    }
}

/// Base and new shard `steps` Adam steps apart, with their manifests in
/// chunks of `cs`; with `hide`, nothing is recognised as Adam.
fn adam_pair(t: &mut Train, steps: usize, cs: u64, hide: bool) -> (Vec<u8>, Manifest, Vec<u8>, Manifest) {
    let base = t.bytes(hide);
    for _ in 0..steps {
        t.step();
    }
    let data = t.bytes(hide);
    let (mb, m) = (man(&base, 10, cs), man(&data, 11, cs));
    (base, mb, data, m)
}

#[test]
fn adam_second_moments_are_predicted_and_round_trip() {
    for cs in [64 << 10, 1 << 20, DEFAULT_CHUNK_SIZE] {
        for c in [Compression::Lz4, Compression::Zstd(1)] {
            let (base, mb, data, m) = adam_pair(&mut Train::new(300_000, 2_000_000, 1), 1, cs, false);
            let s = round_trip(&data, &m, Some((&base, &mb)), &opts(c, true));
            let (hbase, hmb, hdata, hm) = adam_pair(&mut Train::new(300_000, 2_000_000, 1), 1, cs, true);
            assert_eq!(hdata.len(), data.len());
            let plain = round_trip(&hdata, &hm, Some((&hbase, &hmb)), &opts(c, true));
            eprintln!(
                "chunks of {cs}, {c}: {:.3} of the raw size predicted, {:.3} not ({} and {} bytes)",
                s.encoded_bytes as f64 / s.raw_bytes as f64,
                plain.encoded_bytes as f64 / plain.raw_bytes as f64,
                s.encoded_bytes,
                plain.encoded_bytes
            );
            assert_eq!(s.predicted_pairs, 3, "{cs} {c}: {s:?}");
            assert_eq!(plain.predicted_pairs, 0);
            // The second moments, 2/7 of the bytes, nearly vanish.
            assert!(s.encoded_bytes * 10 < plain.encoded_bytes * 7, "{cs} {c}: {s:?} against {plain:?}");
            // Estimates see it too.
            let z = opts(c, true);
            let (est, hest) =
                (estimate(&data, &m, Some((&base, &mb)), &z), estimate(&hdata, &hm, Some((&hbase, &hmb)), &z));
            assert!(est < hest * 0.85, "{cs} {c}: {est} against {hest}");
            // Without delta or compression, nothing is predicted.
            for o in [opts(c, false), opts(Compression::Off, true)] {
                assert_eq!(round_trip(&data, &m, Some((&base, &mb)), &o).predicted_pairs, 0);
            }
        }
    }
    // The header lists each pair with its exact betas.
    let (base, mb, data, m) = adam_pair(&mut Train::new(10_000, 100, 2), 1, 4096, false);
    let (blob, _) = encode(&data, &m, Some((&base, &mb)), &opts(Compression::Zstd(1), true)).unwrap();
    let (h, pairs, _) = parse(&blob, "t").unwrap();
    let betas: Vec<(f64, f64)> = h.predict.iter().map(|p| (f64::from_bits(p.b1), f64::from_bits(p.b2))).collect();
    assert_eq!(betas, [(0.9, 0.999), (0.9, 0.999), (0.9, 0.95)]);
    assert_eq!(pairs.len(), 3);
    let view = parse_shard(&data, "t").unwrap();
    for (p, i) in h.predict.iter().zip(0..) {
        let (em, ev) = (
            view.entry(&format!("optim.layers.{i}.exp_avg")).unwrap(),
            view.entry(&format!("optim.layers.{i}.exp_avg_sq")).unwrap(),
        );
        assert_eq!((p.m, p.v), ((em.offset, em.offset + em.len), ev.offset));
    }
}

#[test]
fn adam_steps_apart_stay_exact_and_do_not_grow() {
    for steps in [0, 3, 20] {
        for c in [Compression::Lz4, Compression::Zstd(1)] {
            let (base, mb, data, m) = adam_pair(&mut Train::new(100_000, 10_000, 3), steps, 64 << 10, false);
            let s = round_trip(&data, &m, Some((&base, &mb)), &opts(c, true));
            let (hbase, hmb, hdata, hm) = adam_pair(&mut Train::new(100_000, 10_000, 3), steps, 64 << 10, true);
            let plain = round_trip(&hdata, &hm, Some((&hbase, &hmb)), &opts(c, true));
            assert_eq!(s.predicted_pairs, 0, "{steps} {c}: {s:?}");
            assert!(
                s.encoded_bytes <= plain.encoded_bytes + plain.encoded_bytes / 100,
                "{steps} {c}: {s:?} against {plain:?}"
            );
        }
    }
}

#[test]
fn non_finite_moments_round_trip() {
    let mut t = Train::new(50_000, 1000, 4);
    t.step();
    let specials = [
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7fa0_0001),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::from_bits(1),
        0.0,
        -0.0,
    ];
    for (k, x) in specials.into_iter().enumerate() {
        for l in &mut t.layers {
            l.m[100 * k] = x; // in base and new
            l.v[100 * k + 7] = x;
            l.v[100 * k + 50] = x;
        }
    }
    let (base, mb, mut data, m) = {
        let base = t.bytes(false);
        t.step();
        for (k, x) in specials.into_iter().enumerate() {
            for l in &mut t.layers {
                l.m[100 * k + 50] = x; // in new only
                l.v[100 * k + 7] = x;
                l.m[100 * k + 9] = f32::from_bits(x.to_bits() ^ 1);
            }
        }
        let data = t.bytes(false);
        (base.clone(), man(&base, 1, 4096), data.clone(), man(&data, 2, 4096))
    };
    for c in [Compression::Lz4, Compression::Zstd(1)] {
        let s = round_trip(&data, &m, Some((&base, &mb)), &opts(c, true));
        assert_eq!(s.predicted_pairs, 3, "{c}: {s:?}");
        // One chunk: v and the 3-byte tail in the same Xor chunk.
        let (mb1, m1) = (man(&base, 1, 2 << 20), man(&data, 2, 2 << 20));
        assert_eq!((m1.chunks.len(), data.len() % 4), (1, 3));
        let s = round_trip(&data, &m1, Some((&base, &mb1)), &opts(c, true));
        assert_eq!((s.predicted_pairs, s.xor_chunks), (3, 1), "{c}: {s:?}");
    }
    // Chunks that are not whole words: no prediction.
    let (mb, m) = (man(&base, 1, 4098), man(&data, 2, 4098));
    let s = round_trip(&data, &m, Some((&base, &mb)), &opts(Compression::Zstd(1), true));
    assert_eq!(s.predicted_pairs, 0, "{s:?}");
    // Not safetensors any more: no prediction.
    data.truncate(data.len() - 3);
    let (mb, m) = (man(&base, 1, 4096), man(&data, 2, 4096));
    let s = round_trip(&data, &m, Some((&base, &mb)), &opts(Compression::Zstd(1), true));
    assert_eq!(s.predicted_pairs, 0, "{s:?}");
}

/// A predicted blob of a small state, with its shard, base and manifests.
fn predicted_sample() -> (Vec<u8>, Manifest, Vec<u8>, Vec<u8>) {
    let (base, mb, data, m) = adam_pair(&mut Train::new(3000, 100, 5), 1, 4096, false);
    let (blob, s) = encode(&data, &m, Some((&base, &mb)), &opts(Compression::Zstd(1), true)).unwrap();
    assert_eq!(s.predicted_pairs, 3);
    (data, m, base, blob)
}

/// `blob` with its header replaced by `h` and its version byte by `version`.
fn with_header(blob: &[u8], h: &Header, version: u8) -> Vec<u8> {
    let (_, _, payload) = parse(blob, "t").unwrap();
    let json = serde_json::to_vec(h).unwrap();
    let mut b = b"TCKPRED".to_vec();
    b.push(version);
    b.extend_from_slice(&(json.len() as u64).to_le_bytes());
    b.extend_from_slice(payload);
    b.extend_from_slice(&json);
    b
}

#[test]
fn tampered_predictions_are_refused() {
    let (data, m, base, blob) = predicted_sample();
    let mut out = vec![0u8; data.len()];
    decode_into(&with_header(&blob, &parse(&blob, "t").unwrap().0, 2), &m, Some(&base), &mut out, "f").unwrap();
    assert!(out == data);
    let h = || parse(&blob, "t").unwrap().0;
    let p0 = h().predict[0];
    let file_len = data.len() as u64 & !3; // whole words
    type Tamper = (&'static str, Box<dyn Fn(&mut Header)>);
    let invalid: Vec<Tamper> = vec![
        ("betas", Box::new(|h| h.predict[0].b2 = 1.0f64.to_bits())),
        ("betas", Box::new(|h| h.predict[1].b1 = f64::NAN.to_bits())),
        ("betas", Box::new(|h| h.predict[2].b1 = 0)),
        ("aligned", Box::new(move |h| h.predict[0].v = p0.v + 2)),
        ("aligned", Box::new(move |h| h.predict[0].m = (p0.m.0 + 1, p0.m.1 + 1))),
        ("empty", Box::new(move |h| h.predict[0].m = (p0.m.1, p0.m.1))),
        ("empty", Box::new(move |h| h.predict[0].m = (p0.m.1, p0.m.0))),
        ("outside", Box::new(move |h| h.predict[0].v = file_len - 4)),
        ("outside", Box::new(move |h| h.predict[0].v = u64::MAX - 3)),
        ("outside", Box::new(move |h| h.predict[0].m = (file_len, file_len + p0.m.1 - p0.m.0))),
        ("m and v ranges overlap", Box::new(move |h| h.predict[0].v = p0.m.0 + 4)),
        ("predictions 0 and 1 overlap", Box::new(|h| h.predict[1].m = h.predict[0].m)),
        ("predictions 0 and 1 overlap", Box::new(|h| h.predict[0].v = h.predict[1].v - 8)),
        ("overlap", Box::new(|h| h.predict[2].v = h.predict[1].m.0)),
        (
            "overlap",
            Box::new(|h| {
                let p = h.predict[0];
                h.predict.push(p);
            }),
        ),
        ("base", Box::new(|h| h.base = None)),
    ];
    for (what, f) in &invalid {
        let mut t = h();
        f(&mut t);
        let e = decode_into(&with_header(&blob, &t, 2), &m, Some(&base), &mut out, "f").unwrap_err();
        assert!(matches!(e, FormatError::InvalidHeader { .. }) && e.to_string().contains(what), "{what}: {e}");
    }
    // Version 1 has no predictions.
    let e = decode_into(&with_header(&blob, &h(), 1), &m, Some(&base), &mut out, "f").unwrap_err();
    assert!(e.to_string().contains("version 1 blob lists predictions"), "{e}");
    // Valid but wrong: the checksums catch it.
    let wrong: Vec<Tamper> = vec![
        ("other betas", Box::new(|h| h.predict[0].b1 = 0.95f64.to_bits())),
        (
            "dropped",
            Box::new(|h| {
                h.predict.remove(1);
            }),
        ),
        (
            "swapped v",
            Box::new(|h| {
                let v = h.predict[0].v;
                h.predict[0].v = h.predict[1].v;
                h.predict[1].v = v;
            }),
        ),
        ("shorter", Box::new(|h| h.predict[1].m.1 -= 4)),
    ];
    for (what, f) in &wrong {
        let mut t = h();
        f(&mut t);
        let e = decode_into(&with_header(&blob, &t, 2), &m, Some(&base), &mut out, "f").unwrap_err();
        assert!(matches!(e, FormatError::ChecksumMismatch { .. }), "{what}: {e}");
    }
    // Betas one f64 ulp off predict the same f32 almost always: exact or a mismatch.
    let mut t = h();
    t.predict[2].b2 ^= 1;
    out.fill(0);
    match decode_into(&with_header(&blob, &t, 2), &m, Some(&base), &mut out, "f") {
        Ok(()) => assert!(out == data),
        Err(e) => assert!(matches!(e, FormatError::ChecksumMismatch { .. }), "{e}"),
    }
    // Straight to the check: predictions of a header that names no base.
    let mut t = h();
    t.base = None;
    assert!(check_predict(&t, 2).unwrap_err().contains("without a base"));
    t.chunk_size = 4098;
    t.base = h().base;
    assert!(check_predict(&t, 2).unwrap_err().contains("multiple of 4"));
}

#[test]
fn a_damaged_predicted_chunk_is_named() {
    let (base, mb, data, m) = adam_pair(&mut Train::new(20_000, 100, 6), 1, 4096, false);
    let (blob, _) = encode(&data, &m, Some((&base, &mb)), &opts(Compression::Zstd(1), true)).unwrap();
    let (h, pairs, _) = parse(&blob, "t").unwrap();
    // A chunk inside a predicted v range, and one of m.
    let cs = 4096;
    let v_chunk = (pairs[1].v + pairs[1].len / 2) / cs;
    let m_chunk = (pairs[1].m + pairs[1].len / 2) / cs;
    for i in [v_chunk, m_chunk] {
        assert_eq!(h.chunks[i].0, Kind::XorZstd);
        let mut bad = blob.clone();
        let at = payload_offset(&bad, i) + h.chunks[i].2 as usize / 2;
        bad[at] ^= 0x10;
        let mut out = vec![0u8; data.len()];
        let e = decode_into(&bad, &m, Some(&base), &mut out, "f").unwrap_err();
        assert!(matches!(e, FormatError::ChecksumMismatch { chunk, .. } if chunk == i), "{i}: {e}");
    }
    // The wrong base: no silent success.
    let mut other = base.clone();
    let r = pairs[0].m..pairs[0].m + 400;
    other[r.clone()].iter_mut().for_each(|b| *b ^= 0x01);
    let mut out = vec![0u8; data.len()];
    assert!(decode_into(&blob, &m, Some(&other), &mut out, "f").is_err());
}

#[test]
fn stats_of_older_builds_parse() {
    let old = r#"{"raw_bytes":10,"encoded_bytes":5,"chunks":1,"same_chunks":0,"xor_chunks":1,"compressed_chunks":0,"raw_chunks":0}"#;
    let s: ReduceStats = serde_json::from_str(old).unwrap();
    assert_eq!((s.encoded_bytes, s.predicted_pairs), (5, 0));
    let s = ReduceStats { predicted_pairs: 2, ..s };
    assert_eq!(serde_json::from_str::<ReduceStats>(&serde_json::to_string(&s).unwrap()).unwrap(), s);
}

#[test]
fn version_1_blobs_still_decode() {
    let base = weights(6 * CS as usize, 51);
    let mb = man(&base, 1, CS);
    let mut data = base.clone();
    data[CS as usize + 5] ^= 7;
    let m = man(&data, 2, CS);
    for c in [Compression::Off, Compression::Lz4, Compression::Zstd(1)] {
        // Without predictions the encoder writes version 1.
        let (blob, _) = encode(&data, &m, Some((&base, &mb)), &opts(c, true)).unwrap();
        assert_eq!(blob[7], 1);
        assert!(!String::from_utf8_lossy(&blob).contains("predict"));
        let mut out = vec![0u8; data.len()];
        decode_into(&blob, &m, Some(&base), &mut out, "f").unwrap();
        assert!(out == data);
    }
    // A version 1 blob as written by the previous build.
    let v1 = {
        let data = b"0123456789abcdefghij".to_vec();
        let m = man(&data, 1, 8);
        let json = format!(
            r#"{{"step":1,"file_len":20,"chunk_size":8,"identity":"{}","base":null,"chunks":[["raw",0,8],["raw",8,8],["raw",16,4]]}}"#,
            serde_json::to_value(manifest_identity(&m)).unwrap().as_str().unwrap()
        );
        let mut b = b"TCKPRED\x01".to_vec();
        b.extend_from_slice(&(json.len() as u64).to_le_bytes());
        b.extend_from_slice(&data);
        b.extend_from_slice(json.as_bytes());
        (b, m, data)
    };
    let mut out = vec![0u8; 20];
    decode_into(&v1.0, &v1.1, None, &mut out, "f").unwrap();
    assert_eq!(out, v1.2);
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

/// Noise for the frozen fixtures below: xxh3 of a counter, so that their
/// bytes never change with a `rand` upgrade or the platform.
fn noise(seed: u64, i: usize) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&(i as u64).to_le_bytes(), seed)
}

/// A roughly normal f32 (sum of four uniform 16-bit parts) from `noise`.
fn noise_normal(seed: u64, i: usize) -> f32 {
    normal_of(noise(seed, i))
}

/// A frozen base and new shard for the golden blobs: a frozen bf16 tensor
/// (`Same` chunks), random bytes (`Raw`), a tensor of new bf16 weights
/// (plain compressed), and two Adam layers one step apart (`Xor`, their
/// `exp_avg_sq` predicted).
fn golden_pair() -> (Vec<u8>, Vec<u8>) {
    const N: usize = 200_000;
    let bf16_noise = |seed: u64, n: usize| -> Vec<u8> {
        (0..n).flat_map(|i| bf16(0.02 * noise_normal(seed, i)).to_le_bytes()).collect()
    };
    let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let shard = |layers: &[(Vec<u16>, Vec<f32>, Vec<f32>)], fresh_seed: u64| -> Vec<u8> {
        let spec = |name: &str, dtype, n| TensorSpec { name: name.into(), dtype, shape: vec![n] };
        let mut specs = vec![spec("frozen", Dtype::BF16, 300_000), spec("noise", Dtype::U8, 1 << 20)];
        let mut tensors =
            vec![bf16_noise(1, 300_000), (0..(1 << 17)).flat_map(|i| noise(2, i).to_le_bytes()).collect::<Vec<u8>>()];
        specs.push(spec("fresh", Dtype::BF16, 600_000));
        tensors.push(bf16_noise(fresh_seed, 600_000));
        for (i, (w, m, v)) in layers.iter().enumerate() {
            specs.push(spec(&format!("l{i}.weight"), Dtype::BF16, N));
            tensors.push(w.iter().flat_map(|x| x.to_le_bytes()).collect());
            specs.push(spec(&format!("l{i}.exp_avg"), Dtype::F32, N));
            tensors.push(f32s(m));
            specs.push(spec(&format!("l{i}.exp_avg_sq"), Dtype::F32, N));
            tensors.push(f32s(v));
        }
        specs.push(spec("odd", Dtype::U8, 3));
        tensors.push(vec![1, 2, 3]);
        let layout = ShardLayout::new(&specs, &Default::default()).unwrap();
        let mut f = vec![0u8; layout.file_len as usize];
        f[..layout.header.len()].copy_from_slice(&layout.header);
        for (e, t) in layout.entries.iter().zip(&tensors) {
            f[e.range()].copy_from_slice(t);
        }
        f
    };
    let mut layers: Vec<(Vec<u16>, Vec<f32>, Vec<f32>)> = [(10u64, 1e-3f32), (20, 1e-2)]
        .iter()
        .map(|&(seed, scale)| {
            let w = (0..N).map(|i| bf16(0.02 * noise_normal(seed, i))).collect();
            let m = (0..N).map(|i| 0.3 * scale * noise_normal(seed + 1, i)).collect();
            let v = (0..N).map(|i| scale * scale * (0.5 + (noise(seed + 2, i) >> 40) as f32 / (1u64 << 24) as f32));
            (w, m, v.collect())
        })
        .collect();
    let base = shard(&layers, 3);
    for (k, ((w, m, v), (b1, b2, scale))) in
        layers.iter_mut().zip([(0.9f32, 0.999f32, 1e-3f32), (0.9, 0.95, 1e-2)]).enumerate()
    {
        for i in 0..N {
            let g = scale * (0.3 * m[i].signum() + noise_normal(30 + k as u64, i));
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            w[i] = bf16(f32::from_bits((w[i] as u32) << 16) - 1e-4 * m[i] / (v[i].sqrt() + 1e-8));
        }
    }
    (base, shard(&layers, 4))
}

/// `blob` with its payloads in chunk order: encode's workers append them
/// in the order they finish, which alone varies between runs.
fn canonical(blob: &[u8]) -> Vec<u8> {
    let (mut h, _, payload) = parse(blob, "t").unwrap();
    let mut ordered = Vec::with_capacity(payload.len());
    for c in &mut h.chunks {
        ordered.extend_from_slice(&payload[c.1 as usize..(c.1 + c.2) as usize]);
        c.1 = (ordered.len() as u64) - c.2;
    }
    let json = serde_json::to_vec(&h).unwrap();
    let mut b = blob[..8].to_vec();
    b.extend_from_slice(&(json.len() as u64).to_le_bytes());
    b.extend_from_slice(&ordered);
    b.extend_from_slice(&json);
    b
}

/// The blobs' bytes (in canonical payload order) stay what this build's
/// encoder wrote when the test was recorded: a change of the format, or of
/// what the encoder picks, fails here. A zstd or lz4_flex upgrade that
/// compresses differently would too; then check the decoder still reads
/// the old blobs and record the new hashes.
#[test]
fn golden_blobs_stay_bit_for_bit() {
    let (base, data) = golden_pair();
    let mut got = Vec::new();
    for cs in [64u64 << 10, 1 << 20] {
        let (mb, m) = (man(&base, 1, cs), man(&data, 2, cs));
        for c in [Compression::Off, Compression::Lz4, Compression::Zstd(1), Compression::Zstd(3)] {
            for delta in [false, true] {
                let (blob, s) = encode(&data, &m, Some((&base, &mb)), &opts(c, delta)).unwrap();
                let canon = canonical(&blob);
                let mut out = vec![0u8; data.len()];
                decode_into(&canon, &m, Some(&base), &mut out, "f").unwrap();
                assert!(out == data);
                got.push(format!(
                    "{cs} {c} {delta}: v{} {} same {} xor {} comp {} raw {} pred {} {:032x}",
                    blob[7],
                    canon.len(),
                    s.same_chunks,
                    s.xor_chunks,
                    s.compressed_chunks,
                    s.raw_chunks,
                    s.predicted_pairs,
                    xxh3_128(&canon)
                ));
            }
        }
    }
    let want = [
        "65536 off false: v1 6851832 same 0 xor 0 comp 0 raw 105 pred 0 f7ddf22f6ef050b77366aed5d873ec32",
        "65536 off true: v1 5310855 same 24 xor 0 comp 0 raw 81 pred 0 df857e31bec8c0073f67adaf95f08fb7",
        "65536 lz4 false: v1 6117807 same 0 xor 0 comp 89 raw 16 pred 0 053715870bf56b11872c5361b7abae55",
        "65536 lz4 true: v2 2971003 same 24 xor 63 comp 18 raw 0 pred 2 b47eec814677ee1571c3264cb774798f",
        "65536 zstd:1 false: v1 5794975 same 0 xor 0 comp 88 raw 17 pred 0 79578816031d8bd11f9e01618197f0a6",
        "65536 zstd:1 true: v2 2605932 same 24 xor 63 comp 18 raw 0 pred 2 03286a95a0e831ac05b0fe34e5c840c9",
        "65536 zstd:3 false: v1 5730804 same 0 xor 0 comp 89 raw 16 pred 0 a4bda61dffc4425f9214c3001fe9cb59",
        "65536 zstd:3 true: v2 2570568 same 24 xor 63 comp 18 raw 0 pred 2 7bfd93f6cb0d258f0babe370c2abef44",
        "1048576 off false: v1 6849707 same 0 xor 0 comp 0 raw 7 pred 0 10d7092a8adc410b1d8366f4e99baef1",
        "1048576 off true: v1 6291840 same 1 xor 0 comp 0 raw 6 pred 0 ea588559ca0caefec31c4a797280ac96",
        "1048576 lz4 false: v1 6023681 same 0 xor 0 comp 6 raw 1 pred 0 e2ea30db9c1f750e7704b8a0d26bf3bf",
        "1048576 lz4 true: v2 2998541 same 1 xor 6 comp 0 raw 0 pred 2 b6c69525fbfa3ff6e95462af60c78aac",
        "1048576 zstd:1 false: v1 5414490 same 0 xor 0 comp 6 raw 1 pred 0 ec124803faf6ce30437d9888dd1a94b5",
        "1048576 zstd:1 true: v2 2450951 same 1 xor 6 comp 0 raw 0 pred 2 fc78ccbc71b7e449b166514214e219f0",
        "1048576 zstd:3 false: v1 5483838 same 0 xor 0 comp 6 raw 1 pred 0 f75920ba8959a7eaff8d70100bb61a0f",
        "1048576 zstd:3 true: v2 2496355 same 1 xor 6 comp 0 raw 0 pred 2 dee75c072064937320cb77f55bae09ea",
    ];
    assert_eq!(got, want, "\n{}", got.join("\n"));
}

thread_local! {
    static PREDICTED: (Vec<u8>, Manifest, Vec<u8>, Vec<u8>) = predicted_sample();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000), prefix in any::<bool>(), v2 in any::<bool>()) {
        let (data, m, base, _, _) = sample();
        let mut blob = bytes;
        if prefix {
            let mut b = if v2 { b"TCKPRED\x02".to_vec() } else { b"TCKPRED\x01".to_vec() };
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
    fn damaged_predicted_blobs_fail_or_decode_exactly(at in any::<prop::sample::Index>(), xor in 1u8..=255, cut in any::<bool>(), in_header in any::<bool>()) {
        let (data, m, base, blob) = PREDICTED.with(|p| p.clone());
        let mut bad = blob.clone();
        // Half the time in the JSON header (the last 2 KiB or so).
        let i = if in_header { bad.len() - 1 - at.index(2048.min(bad.len())) } else { at.index(bad.len()) };
        if cut { bad.truncate(i) } else { bad[i] ^= xor }
        let mut out = vec![0u8; data.len()];
        if decode_into(&bad, &m, Some(&base), &mut out, "f").is_ok() {
            prop_assert!(out == data);
        }
    }

    #[test]
    fn prediction_tampering_never_panics(k in 0usize..3, field in 0usize..5, x in any::<u64>(), small in any::<bool>()) {
        let (data, m, base, blob) = PREDICTED.with(|p| p.clone());
        let (mut h, _, _) = parse(&blob, "t").unwrap();
        let x = if small { x % (2 * data.len() as u64) } else { x };
        let p = &mut h.predict[k];
        match field {
            0 => p.m.0 = x,
            1 => p.m.1 = x,
            2 => p.v = x,
            3 => p.b1 = if small { p.b1 ^ (x & 0xffff) } else { x },
            _ => p.b2 = if small { p.b2 ^ (x & 0xffff) } else { x },
        }
        let mut out = vec![0u8; data.len()];
        if decode_into(&with_header(&blob, &h, 2), &m, Some(&base), &mut out, "f").is_ok() {
            prop_assert!(out == data);
        }
    }

    #[test]
    fn header_tampering_never_panics(step in any::<u64>(), len in any::<u64>(), kind in 0usize..6) {
        let (data, m, base, _, blob) = sample();
        let (mut h, _, payload) = parse(&blob, "t").unwrap();
        let kinds = [Kind::Raw, Kind::Same, Kind::Lz4, Kind::Zstd, Kind::XorLz4, Kind::XorZstd];
        let k = (step % h.chunks.len() as u64) as usize;
        let offset = if len % 2 == 0 { h.chunks[k].1 } else { (len >> 8) % 8192 };
        h.chunks[k] = ChunkRec(kinds[kind], offset, len % 4096);
        if let Some(b) = h.base.as_mut() { if len % 3 == 0 { b.file_len = len; } }
        let json = serde_json::to_vec(&h).unwrap();
        let mut b = b"TCKPRED\x02".to_vec();
        b.extend_from_slice(&(json.len() as u64).to_le_bytes());
        b.extend_from_slice(payload);
        b.extend_from_slice(&json);
        let mut out = vec![0u8; data.len()];
        if decode_into(&b, &m, Some(&base), &mut out, "f").is_ok() {
            prop_assert!(out == data);
        }
    }
}
