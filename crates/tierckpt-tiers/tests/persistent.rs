//! The persistent tier on a real file system (file://), plain and behind the
//! fault-injecting adapter.

use std::sync::Arc;

use tierckpt_format::ShardKey;
use tierckpt_tiers::conformance::{run_all, sample_shard};
use tierckpt_tiers::faults::{FaultSpec, FaultyStore};
use tierckpt_tiers::{ErrorKind, PersistOptions, PersistentTier, Tier};

fn flip_data_byte(root: std::path::PathBuf) -> impl Fn(&ShardKey) + Sync {
    move |key: &ShardKey| {
        let step_dir = root.join(&key.namespace).join(format!("{:020}", key.step)).join("data");
        let mut stack = vec![step_dir];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "safetensors") {
                    let mut b = std::fs::read(&p).unwrap();
                    let n = b.len();
                    b[n - 2] ^= 0x10;
                    std::fs::write(&p, b).unwrap();
                    return;
                }
            }
        }
        panic!("no data object for {key}");
    }
}

/// A tier on the file:// store at `url` whose requests go through a
/// [`FaultyStore`] configured by `spec`.
fn behind_faults(url: &str, spec: &str, opts: PersistOptions) -> PersistentTier {
    let base = PersistentTier::open(url, "test", PersistOptions::default()).unwrap();
    let faulty = Arc::new(FaultyStore::new(base.store(), FaultSpec::parse(spec).unwrap()));
    PersistentTier::with_store(faulty, "", url, "faulty", opts).unwrap()
}

#[tokio::test]
async fn file_tier_passes_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let t = PersistentTier::open(&url, "test", PersistOptions::default()).unwrap();
    run_all(&t, &flip_data_byte(dir.path().to_path_buf())).await;
}

#[tokio::test]
async fn file_tier_behind_a_failing_slow_store_passes_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    // Single-request uploads: a request fails 12 times in a row once in 2e8.
    // Multipart uploads under faults: a_store_failing_30_percent_of_requests_still_completes.
    let t = behind_faults(&url, "fail=0.2,delay=1ms,seed=3", PersistOptions { attempts: 12, ..Default::default() });
    run_all(&t, &flip_data_byte(dir.path().to_path_buf())).await;
}

#[tokio::test]
async fn multipart_uploads_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let opts = PersistOptions { multipart_threshold: 1 << 20, part_size: 1 << 20, ..Default::default() };
    let t = PersistentTier::open(&url, "test", opts).unwrap();
    let key = ShardKey::new("mp", 1, 0);
    let (m, data) = sample_shard(key.clone(), 1, 1_500_000, 3);
    t.put(&m, &data).await.unwrap();
    let (_, got) = t.get(&key).await.unwrap();
    assert!(got[..] == data[..]);
}

#[tokio::test]
async fn a_store_failing_30_percent_of_requests_still_completes() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    // A multipart upload is retried whole: of 2 parts (4 requests) it fails
    // 20 times in a row once in 250.
    let opts = PersistOptions { multipart_threshold: 1 << 20, part_size: 1 << 20, attempts: 20, ..Default::default() };
    let t = behind_faults(&url, "fail=0.3,seed=11", opts);
    for step in 1..=3u64 {
        let key = ShardKey::new("flaky", step, 0);
        let (m, data) = sample_shard(key.clone(), 1, 400_000, step as u8);
        t.put(&m, &data).await.unwrap();
        let (_, got) = t.get(&key).await.unwrap();
        assert!(got[..] == data[..]);
    }
    assert_eq!(t.latest("flaky").await.unwrap(), Some(3));
    let stored = t.commit_record("flaky", 3).await.unwrap().shards[0].stored_bytes();
    assert!(stored > 1 << 20, "shards went up in parts ({stored} bytes)");
}

#[tokio::test]
async fn a_store_failing_every_request_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let t = behind_faults(&url, "fail=1", PersistOptions { attempts: 3, ..Default::default() });
    let (m, data) = sample_shard(ShardKey::new("down", 1, 0), 1, 100, 1);
    let e = t.put(&m, &data).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.to_string().contains("503") && e.to_string().contains(&url), "{e}");
}

#[tokio::test]
async fn two_writers_of_one_step_commit_it_once_and_intact() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let a = PersistentTier::open(&url, "a", PersistOptions::default()).unwrap();
    let b = PersistentTier::open(&url, "b", PersistOptions::default()).unwrap();
    let (m0, d0) = sample_shard(ShardKey::new("two", 5, 0), 2, 1000, 1);
    let (m1, d1) = sample_shard(ShardKey::new("two", 5, 1), 2, 1000, 2);
    let (m1b, d1b) = sample_shard(ShardKey::new("two", 5, 1), 2, 1000, 9);
    a.put(&m0, &d0).await.unwrap();
    let (ra, rb) = tokio::join!(a.put(&m1, &d1), b.put(&m1b, &d1b));
    assert!(ra.is_ok() != rb.is_ok(), "exactly one writer of rank 1 wins: {ra:?} {rb:?}");
    let winner = if ra.is_ok() { &d1 } else { &d1b };
    assert_eq!(a.latest("two").await.unwrap(), Some(5));
    let (_, got) = b.get(&ShardKey::new("two", 5, 1)).await.unwrap();
    assert!(got[..] == winner[..]);
    let c = a.commit_record("two", 5).await.unwrap();
    assert_eq!(c.shards.len(), 2);
}

#[tokio::test]
async fn retention_keeps_newest_and_every_mth_and_never_zero() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let t = PersistentTier::open(&url, "t", PersistOptions::default()).unwrap();
    for step in [10u64, 20, 30, 40, 50] {
        let (m, d) = sample_shard(ShardKey::new("ret", step, 0), 1, 10, 1);
        t.put(&m, &d).await.unwrap();
    }
    // An uncommitted leftover older than the newest commit.
    let (m, d) = sample_shard(ShardKey::new("ret", 35, 0), 2, 10, 1);
    t.upload(&m, d.into()).await.unwrap();
    let deleted = t.retain("ret", 2, 20).await.unwrap();
    assert_eq!(deleted, [10, 30, 35]);
    let left: Vec<u64> = t.steps("ret").await.unwrap().iter().map(|s| s.step).collect();
    assert_eq!(left, [20, 40, 50]);
    t.retain("ret", 0, 0).await.unwrap();
    assert_eq!(t.latest("ret").await.unwrap(), Some(50), "the newest committed step always stays");
}

#[test]
fn bad_urls_are_named() {
    for (url, needle) in [("nope", "not a URL"), ("ftp://x/y", "\"ftp\""), ("file://relative/dir", "absolute")] {
        let e = PersistentTier::open(url, "t", PersistOptions::default()).unwrap_err().to_string();
        assert!(e.contains(needle), "{url}: {e}");
    }
    assert!(FaultSpec::parse("fail=2").is_err());
    assert!(FaultSpec::parse("bogus=1").unwrap_err().to_string().contains("bogus"));
}
