//! Fixtures shared by the fuzz targets and the seed corpus generator
//! (`gen_corpus`): a small base shard and the next step's shard, real
//! safetensors files holding Adam moments one step apart, so that their
//! blobs use every chunk kind and the second moment's prediction.

use std::sync::OnceLock;

use tierckpt_format::{chunk_checksums, Dtype, Manifest, ShardKey, ShardLayout, TensorSpec, FORMAT_VERSION};

/// Chunk size of the fixtures' manifests: small, so a decode is quick.
pub const CHUNK: u64 = 4096;
/// Elements per Adam moment tensor.
const N: usize = 4096;

/// A base shard and the next step's, with their manifests.
pub struct Pair {
    /// The base's bytes (step 1).
    pub base: Vec<u8>,
    /// The base's manifest.
    pub base_manifest: Manifest,
    /// The new shard's bytes (step 2).
    pub data: Vec<u8>,
    /// The new shard's manifest.
    pub manifest: Manifest,
}

/// The fixtures, built once.
pub fn pair() -> &'static Pair {
    static PAIR: OnceLock<Pair> = OnceLock::new();
    PAIR.get_or_init(build)
}

/// A manifest of `data` at `step` in chunks of [`CHUNK`].
pub fn manifest_of(data: &[u8], step: u64) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION.to_string(),
        key: ShardKey::new("fuzz", step, 0),
        world_size: 1,
        file_len: data.len() as u64,
        chunk_size: CHUNK,
        chunks: chunk_checksums(data, CHUNK),
        created_unix_ms: 1,
    }
}

/// splitmix64 of `i` under `seed`: fixed bytes on every platform.
fn noise(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(i).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Roughly normal, from four 16-bit parts of `noise`.
fn normal(seed: u64, i: u64) -> f32 {
    let x = noise(seed, i);
    let s = (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
    (s as f32 / 65536.0 - 2.0) * 1.7
}

/// A safetensors shard: frozen bytes, random bytes, then `m` and `v`.
fn shard(m: &[f32], v: &[f32], fresh: u64) -> Vec<u8> {
    let spec = |name: &str, dtype, n| TensorSpec { name: name.into(), dtype, shape: vec![n] };
    let specs = [
        spec("frozen", Dtype::U8, 8192),
        spec("noise", Dtype::U8, 4096),
        spec("fresh", Dtype::F32, 1024),
        spec("l0.exp_avg", Dtype::F32, N),
        spec("l0.exp_avg_sq", Dtype::F32, N),
    ];
    let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let fresh: Vec<f32> = (0..1024).map(|i| 0.02 * normal(fresh, i)).collect();
    let tensors = [
        (0..8192u64).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
        (0..4096u64).map(|i| noise(7, i) as u8).collect(),
        f32s(&fresh),
        f32s(m),
        f32s(v),
    ];
    let meta = [("kind".to_string(), "fuzz fixture".to_string())].into();
    let layout = ShardLayout::new(&specs, &meta).expect("the fixture's layout");
    let mut f = vec![0u8; layout.file_len as usize];
    f[..layout.header.len()].copy_from_slice(&layout.header);
    for (e, t) in layout.entries.iter().zip(&tensors) {
        f[e.range()].copy_from_slice(t);
    }
    f
}

fn build() -> Pair {
    let scale = 1e-3f32;
    let mut m: Vec<f32> = (0..N as u64).map(|i| 0.3 * scale * normal(11, i)).collect();
    let mut v: Vec<f32> =
        (0..N as u64).map(|i| scale * scale * (0.5 + (noise(12, i) >> 40) as f32 / (1u64 << 24) as f32)).collect();
    let base = shard(&m, &v, 3);
    let (b1, b2) = (0.9f32, 0.999f32);
    for i in 0..N {
        let g = scale * (0.3 * m[i].signum() + normal(13, i as u64));
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
    }
    let data = shard(&m, &v, 4);
    Pair { base_manifest: manifest_of(&base, 1), manifest: manifest_of(&data, 2), base, data }
}
