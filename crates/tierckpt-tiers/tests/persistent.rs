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

/// Every file under `dir`, relative to it.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn plant(root: &std::path::Path, rel: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, b"partial upload").unwrap();
}

#[tokio::test]
async fn staging_files_of_interrupted_uploads_are_removed_at_commit_and_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let url = format!("file://{}", root.display());
    let (old, other) = ("n1-0123456789abcdef-01234567", "n2-0123456789abcdef-89abcdef");
    let s7 = format!("job/{:020}", 7);
    let s9 = format!("job/{:020}", 9);
    // Left by a killed run of node n1 (staging files of object_store's
    // LocalFileSystem), in a step that gets committed and in one that does not.
    let ours = [
        format!("{s7}/data/{old}/rank-00000-of-00001.safetensors#1"),
        format!("{s7}/data/{other}/rank-00000-of-00001.tcz#3"),
        format!("{s7}/ranks/rank-00000-of-00001.json#1"),
        format!("{s7}/COMMIT#2"),
        format!("{s9}/data/{old}/rank-00001-of-00002.safetensors#1"),
    ];
    // Not ours, or not object_store's staging pattern: left alone.
    let foreign = [
        format!("{s7}/data/{old}/notes.txt#1"),
        format!("{s9}/data/{old}/rank-00001-of-00002.safetensors#x1"),
        format!("{s7}/README#1"),
        "job/elsewhere/rank-00000-of-00001.safetensors#1".to_string(),
        "not a namespace/rank-00000-of-00001.safetensors#1".to_string(),
        // Another node's upload may still be running in an uncommitted step.
        format!("{s9}/data/{other}/rank-00000-of-00002.safetensors#1"),
        format!("{s9}/ranks/rank-00000-of-00002.json#1"),
    ];
    for rel in ours.iter().chain(&foreign) {
        plant(root, rel);
    }

    // Node n1 starts again and commits step 7.
    let t = PersistentTier::open(&url, "n1", PersistOptions::default()).unwrap();
    let (m, d) = sample_shard(ShardKey::new("job", 7, 0), 1, 1000, 1);
    t.put(&m, &d).await.unwrap();
    assert!(t.clean_unreferenced("job", 7).await.unwrap() >= 4);
    let left = files_under(root);
    for rel in &ours[..4] {
        assert!(!left.contains(rel), "{rel} is removed once step 7 is committed: {left:?}");
    }
    assert!(left.contains(&ours[4]), "step 9 is not committed: only the start cleans it");

    // At start: n1's earlier writers' files in uncommitted steps go too.
    assert_eq!(t.clean_interrupted_uploads().await.unwrap(), 1);
    let left = files_under(root);
    assert!(!left.iter().any(|f| ours.contains(f)), "{left:?}");
    for rel in &foreign {
        assert!(left.contains(rel), "{rel} is not ours to remove: {left:?}");
    }
    assert!(!root.join(&s7).join("data").join(other).exists(), "empty directories go with them");
    let (_, got) = t.get(&ShardKey::new("job", 7, 0)).await.unwrap();
    assert!(got[..] == d[..], "the committed shard is intact");

    // Deleting a step removes its staging files as well.
    t.delete("job", 9).await.unwrap();
    assert!(!files_under(root).iter().any(|f| f.starts_with(&s9)), "{:?}", files_under(root));
}
