//! The name rules of `tierckpt_format::names` hold for every shard the memory
//! tier seals, however its bytes were written (HTTP PUT, Python, a replica):
//! a tensor name with control characters is refused at seal time.

use tierckpt_format::{Manifest, ShardKey};
use tierckpt_harness::testing::{raw_shard, shm_dir};
use tierckpt_tiers::{ErrorKind, MemoryTier, MemoryTierConfig};

#[test]
fn seal_refuses_tensor_names_with_control_characters_and_stores_nothing() {
    let dir = shm_dir();
    let t = MemoryTier::open(MemoryTierConfig::new(dir.path(), 64 << 20)).unwrap();
    let bad = raw_shard("w\u{1b}[31m", &[]);

    // Sealed by a writer (local socket or HTTP PUT).
    let key = ShardKey::new("names", 1, 0);
    let r = t.reserve(&key, 1, bad.len() as u64).unwrap();
    std::fs::write(&r.path, &bad).unwrap();
    let e = t.seal(r.id).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let msg = e.to_string();
    assert!(msg.contains(r#"tensor name "w\u{1b}[31m""#), "names the tensor, escaped: {msg}");
    assert!(!msg.chars().any(char::is_control), "no raw control character in {msg:?}");

    // Received as a replica (already verified against its manifest).
    let key = ShardKey::new("names", 2, 0);
    let m = Manifest::compute(key.clone(), 1, &bad, 0);
    let r = t.reserve(&key, 1, bad.len() as u64).unwrap();
    std::fs::write(&r.path, &bad).unwrap();
    let e = t.seal_verified(r.id, &m).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");

    let visible: usize = t.steps("names").unwrap_or_default().iter().map(|s| s.ranks.len()).sum();
    assert_eq!(visible, 0, "nothing stored");
    assert_eq!(t.usage().shards, 0);

    // The same shard with a printable name is sealed.
    let good = raw_shard("w.0", &[]);
    let key = ShardKey::new("names", 3, 0);
    let r = t.reserve(&key, 1, good.len() as u64).unwrap();
    std::fs::write(&r.path, &good).unwrap();
    t.seal(r.id).unwrap();
    assert_eq!(t.steps("names").unwrap().iter().map(|s| s.ranks.len()).sum::<usize>(), 1);
}
