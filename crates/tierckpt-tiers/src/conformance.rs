//! The conformance suite: every tier must pass it. A tier's test calls
//! [`run_all`] with the tier and a hook that flips a byte of a stored shard.
//! Compiled only with the `conformance` feature, for tests.

use std::collections::BTreeMap;
use tierckpt_format::{Dtype, Manifest, ShardKey, ShardLayout, TensorSpec};

use crate::{ErrorKind, Tier};

/// Builds a valid shard of `n` f32 values whose bytes depend on `seed`.
pub fn sample_shard(key: ShardKey, world_size: u32, n: usize, seed: u8) -> (Manifest, Vec<u8>) {
    let specs = [
        TensorSpec { name: "weight".into(), dtype: Dtype::F32, shape: vec![n] },
        TensorSpec { name: "step".into(), dtype: Dtype::I64, shape: vec![] },
    ];
    let meta = BTreeMap::from([("seed".to_string(), seed.to_string())]);
    let layout = ShardLayout::new(&specs, &meta).expect("sample layout");
    let mut data = vec![0u8; layout.file_len as usize];
    data[..layout.header.len()].copy_from_slice(&layout.header);
    for (i, b) in data[layout.header.len()..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    let m = Manifest::compute(key, world_size, &data, crate::now_unix_ms());
    (m, data)
}

fn expect_kind<T>(r: crate::Result<T>, kind: ErrorKind, what: &str) {
    match r {
        Ok(_) => panic!("{what}: expected {kind:?}, got success"),
        Err(e) => assert_eq!(e.kind(), kind, "{what}: {e}"),
    }
}

/// Runs every check against `tier`. `corrupt(key)` must flip one byte of the
/// stored bytes of `key`. Uses namespaces starting with `conf-`.
pub async fn run_all(tier: &dyn Tier, corrupt: &(dyn Fn(&ShardKey) + Sync)) {
    round_trip(tier).await;
    write_once(tier).await;
    missing(tier).await;
    mismatched_bytes_are_refused(tier).await;
    latest_counts_complete_steps_only(tier).await;
    delete(tier).await;
    corruption_is_detected(tier, corrupt).await;
}

async fn round_trip(tier: &dyn Tier) {
    for n in [0usize, 1, 3, 1 << 20] {
        let key = ShardKey::new("conf-rt", n as u64, 0);
        let (m, data) = sample_shard(key.clone(), 1, n, 7);
        tier.put(&m, &data).await.expect("put");
        let (m2, got) = tier.get(&key).await.expect("get");
        assert_eq!(m2.chunks, m.chunks);
        assert!(got[..] == data[..], "{} round trip of {n} values differs", tier.name());
        assert_eq!(tier.manifest(&key).await.unwrap().file_len, data.len() as u64);
    }
}

async fn write_once(tier: &dyn Tier) {
    let key = ShardKey::new("conf-once", 1, 0);
    let (m, data) = sample_shard(key.clone(), 1, 10, 1);
    tier.put(&m, &data).await.unwrap();
    let (m2, data2) = sample_shard(key.clone(), 1, 10, 2);
    expect_kind(tier.put(&m2, &data2).await, ErrorKind::AlreadyExists, "second put");
    let (_, got) = tier.get(&key).await.unwrap();
    assert!(got[..] == data[..], "the first write must survive a second one");
}

async fn missing(tier: &dyn Tier) {
    expect_kind(tier.get(&ShardKey::new("conf-none", 1, 0)).await, ErrorKind::NotFound, "get");
    expect_kind(tier.delete_step("conf-none", 1).await, ErrorKind::NotFound, "delete");
    assert_eq!(tier.latest("conf-none").await.unwrap(), None);
}

async fn mismatched_bytes_are_refused(tier: &dyn Tier) {
    let key = ShardKey::new("conf-bad", 1, 0);
    let (m, mut data) = sample_shard(key.clone(), 1, 100, 1);
    let last = data.len() - 1;
    data[last] ^= 0xff;
    expect_kind(tier.put(&m, &data).await, ErrorKind::Corrupt, "put of bytes that do not match");
    expect_kind(tier.put(&m, &data[..10]).await, ErrorKind::Corrupt, "put of truncated bytes");
    expect_kind(tier.get(&key).await, ErrorKind::NotFound, "get after refused put");
}

async fn latest_counts_complete_steps_only(tier: &dyn Tier) {
    let ns = "conf-latest";
    for (step, ranks) in [(10u64, vec![0u32, 1]), (20, vec![0])] {
        for r in ranks {
            let (m, d) = sample_shard(ShardKey::new(ns, step, r), 2, 8, r as u8);
            tier.put(&m, &d).await.unwrap();
        }
    }
    assert_eq!(tier.latest(ns).await.unwrap(), Some(10));
    let steps = tier.list_steps(ns).await.unwrap();
    assert_eq!(steps.iter().map(|s| (s.step, s.complete)).collect::<Vec<_>>(), [(10, true), (20, false)]);
    let (m, d) = sample_shard(ShardKey::new(ns, 20, 1), 2, 8, 1);
    tier.put(&m, &d).await.unwrap();
    assert_eq!(tier.latest(ns).await.unwrap(), Some(20));
    assert!(tier.list_namespaces().await.unwrap().iter().any(|n| n == ns));
}

async fn delete(tier: &dyn Tier) {
    let key = ShardKey::new("conf-del", 5, 0);
    let (m, d) = sample_shard(key.clone(), 1, 8, 1);
    tier.put(&m, &d).await.unwrap();
    tier.delete_step("conf-del", 5).await.unwrap();
    expect_kind(tier.get(&key).await, ErrorKind::NotFound, "get after delete");
    // New data, sealed after the delete (a tier may refuse a copy sealed
    // before it: the peer tier does, so that a delete is not undone by
    // replicas in flight).
    let (mut m, d) = sample_shard(key.clone(), 1, 8, 2);
    m.created_unix_ms += 1; // sealed after the delete, whatever the clock's resolution
    tier.put(&m, &d).await.expect("a deleted key can be written again");
}

async fn corruption_is_detected(tier: &dyn Tier, corrupt: &(dyn Fn(&ShardKey) + Sync)) {
    let key = ShardKey::new("conf-corrupt", 1, 0);
    let (m, d) = sample_shard(key.clone(), 1, 1000, 3);
    tier.put(&m, &d).await.unwrap();
    corrupt(&key);
    expect_kind(tier.get(&key).await, ErrorKind::Corrupt, "get of a corrupted shard");
}
