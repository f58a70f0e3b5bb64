//! Writes the seed corpora under `fuzz/corpus/<target>/`: real frames,
//! shards, manifests and blobs made by the project's own code, plus a few
//! edge cases. Run from the repository root with
//! `cargo run --manifest-path fuzz/Cargo.toml --bin gen_corpus` (a plain
//! build, not the instrumented one); the output is committed.

use std::collections::BTreeMap;
use std::path::Path;

use tierckpt_format::{encode, Compression, Manifest, ReduceOptions, ShardKey};
use tierckpt_fuzz::{manifest_of, pair};
use tierckpt_proto::{write_frame, ErrorKind, HeldStep, Holdings, MemberSeen, Reply, Request, WireError, WireResult};

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).expect("create the corpus folder");
    std::fs::write(dir.join(name), bytes).expect("write a seed");
}

fn frame(v: &impl serde::Serialize) -> Vec<u8> {
    let mut b = Vec::new();
    write_frame(&mut b, v).expect("a frame encodes");
    b
}

fn frames() {
    let ns = || "job-1".to_string();
    let requests = [
        Request::Reserve { namespace: ns(), step: 7, rank: 1, world_size: 2, len: 4096, segment: None },
        Request::Reserve { namespace: ns(), step: 7, rank: 0, world_size: 2, len: 1, segment: Some("seg-3".into()) },
        Request::Prepare { len: 1 << 20 },
        Request::Seal { id: 3, wait: true },
        Request::Abort { id: 3 },
        Request::WaitVisible { namespace: ns(), step: 7, rank: 1, timeout_ms: 100 },
        Request::Open { namespace: ns(), step: 7, rank: 1 },
        Request::Release { namespace: ns(), step: 7, rank: 1 },
        Request::ReportCorrupt { namespace: ns(), step: 7, rank: 1 },
        Request::Latest { namespace: ns() },
        Request::ListNamespaces,
        Request::ListSteps { namespace: ns() },
        Request::DeleteStep { namespace: ns(), step: 7 },
        Request::DeleteNamespace { namespace: ns() },
        Request::DiscardIncompleteAfter { namespace: ns(), step: 7 },
        Request::Status,
        Request::Failures { namespace: ns() },
    ];
    let mut all = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let f = frame(r);
        all.extend_from_slice(&f);
        put("frame", &format!("request-{i:02}"), &f);
    }
    put("frame", "all-requests", &all);
    let m = pair().manifest.clone();
    let replies: [WireResult; 5] = [
        Ok(Reply::Reserved { id: 1, path: "/dev/shm/x".into(), len: 10 }),
        Ok(Reply::Opened { path: "/dev/shm/y".into(), manifest: m }),
        Ok(Reply::Latest { step: Some(7) }),
        Ok(Reply::Done),
        Err(WireError { kind: ErrorKind::NotFound, message: "no shard".into() }),
    ];
    for (i, r) in replies.iter().enumerate() {
        put("frame", &format!("reply-{i}"), &frame(r));
    }
    // Edge cases: an empty frame, a length past the limit, a header cut
    // short, a body shorter than its length, and a frame of bad JSON.
    put("frame", "edge-empty", &[0, 0, 0, 0]);
    put("frame", "edge-huge", &[0xff, 0xff, 0xff, 0xff, b'{']);
    put("frame", "edge-short-header", &[0, 0]);
    put("frame", "edge-short-body", &[0, 0, 0, 9, b'{', b'"']);
    put("frame", "edge-bad-json", &[0, 0, 0, 3, b'{', b'"', b'}']);
}

fn shards() {
    let p = pair();
    put("shard", "fixture", &p.data);
    let mut cut = p.data.clone();
    cut.truncate(cut.len() - 1);
    put("shard", "edge-truncated", &cut);
    let empty = tierckpt_format::ShardLayout::new(&[], &BTreeMap::new()).expect("an empty layout");
    put("shard", "empty", &empty.header);
    // A small real one, header only and data.
    let spec = |name: &str, dtype, shape: Vec<usize>| tierckpt_format::TensorSpec { name: name.into(), dtype, shape };
    use tierckpt_format::Dtype;
    let specs = [
        spec("a", Dtype::F32, vec![2, 3]),
        spec("b.weight", Dtype::BF16, vec![5]),
        spec("scalar", Dtype::F64, vec![]),
        spec("f4", Dtype::F4, vec![4]),
    ];
    let l = tierckpt_format::ShardLayout::new(&specs, &[("step".into(), "7".into())].into()).expect("layout");
    let mut f = vec![7u8; l.file_len as usize];
    f[..l.header.len()].copy_from_slice(&l.header);
    put("shard", "small", &f);
    put("shard", "edge-huge-header-len", &u64::MAX.to_le_bytes());
}

fn manifests() {
    let p = pair();
    put("manifest", "fixture", &p.manifest.to_json());
    let small = Manifest::compute(ShardKey::new("ns", 3, 1), 2, &[1, 2, 3], 5);
    put("manifest", "small", &small.to_json());
    let empty = manifest_of(&[], 0);
    put("manifest", "empty", &empty.to_json());
    let mut v2 = small.clone();
    v2.format_version = "2.0".into();
    put("manifest", "edge-version-2", &v2.to_json());
    let mut m = small.clone();
    m.chunks.clear();
    put("manifest", "edge-no-chunks", &serde_json::to_vec(&m).expect("json"));
}

fn blobs() {
    let p = pair();
    let base = Some((&p.base[..], &p.base_manifest));
    for (name, compression, delta) in [
        ("off", Compression::Off, false),
        ("off-delta", Compression::Off, true),
        ("lz4", Compression::Lz4, false),
        ("lz4-delta", Compression::Lz4, true),
        ("zstd", Compression::Zstd(1), false),
        ("zstd-delta", Compression::Zstd(3), true),
    ] {
        let (blob, stats) = encode(&p.data, &p.manifest, base, &ReduceOptions { compression, delta }).expect("encode");
        eprintln!("blob {name}: {} bytes, version {}, {stats:?}", blob.len(), blob[7]);
        put("blob", name, &blob);
    }
    put("blob", "edge-magic-only", b"TCKPRED\x02");
}

fn http_parts() {
    put("http_parts", "path", b"job-1/7/1/2");
    put("http_parts", "path-bad", b"../x/18446744073709551616/4294967296/0");
    let h = Holdings {
        node_id: "node-a".into(),
        namespaces: [(
            "job-1".into(),
            vec![HeldStep { step: 7, world_size: 2, ranks: vec![0, 1], created_unix_ms: 5 }],
        )]
        .into(),
        members: vec![MemberSeen {
            id: "node-b".into(),
            addr: "127.0.0.1:9000".into(),
            incarnation: 3,
            last_seen_unix_ms: Some(9),
        }],
    };
    put("http_parts", "holdings", &serde_json::to_vec(&h).expect("json"));
    put("http_parts", "member", &serde_json::to_vec(&h.members[0]).expect("json"));
    let e = WireError { kind: ErrorKind::Corrupt, message: "chunk 3".into() };
    put("http_parts", "error", &serde_json::to_vec(&e).expect("json"));
}

fn main() {
    frames();
    shards();
    manifests();
    blobs();
    http_parts();
}
