//! The memory tier on a real tmpfs directory.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use tierckpt_format::ShardKey;
use tierckpt_tiers::conformance::{run_all, sample_shard};
use tierckpt_tiers::{ErrorKind, MemoryTier, MemoryTierConfig, ReserveOptions};

fn shm_dir() -> tempfile::TempDir {
    let base = std::path::Path::new("/dev/shm");
    if base.is_dir() {
        tempfile::Builder::new().prefix("tierckpt-test-").tempdir_in(base).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn tier(dir: &std::path::Path, capacity: u64, keep_last: usize) -> MemoryTier {
    let mut cfg = MemoryTierConfig::new(dir, capacity);
    cfg.keep_last = keep_last;
    MemoryTier::open(cfg).unwrap()
}

/// Writes a sample shard through reserve / write / seal, as a client would.
fn save(t: &MemoryTier, ns: &str, step: u64, rank: u32, world: u32, n: usize) -> Vec<u8> {
    let (_, data) = sample_shard(ShardKey::new(ns, step, rank), world, n, step as u8);
    let r = t.reserve(&ShardKey::new(ns, step, rank), world, data.len() as u64).unwrap();
    std::fs::write(&r.path, &data).unwrap();
    t.seal(r.id).unwrap();
    data
}

#[tokio::test]
async fn memory_tier_passes_conformance() {
    let dir = shm_dir();
    let t = tier(dir.path(), 1 << 30, 3);
    let root = dir.path().to_path_buf();
    let corrupt = move |key: &ShardKey| {
        let step_dir = root.join("ns").join(&key.namespace).join(format!("{:020}", key.step));
        let f = std::fs::read_dir(&step_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .unwrap();
        let mut file = OpenOptions::new().read(true).write(true).open(f).unwrap();
        let len = file.metadata().unwrap().len();
        file.seek(SeekFrom::Start(len - 3)).unwrap();
        file.write_all(&[0xAB]).unwrap();
    };
    run_all(&t, &corrupt).await;
}

#[test]
fn restart_keeps_sealed_shards_and_reclaims_pending() {
    let dir = shm_dir();
    let data = {
        let t = tier(dir.path(), 64 << 20, 3);
        let d = save(&t, "job", 1, 0, 1, 1000);
        let r = t.reserve(&ShardKey::new("job", 2, 0), 1, 100).unwrap();
        std::fs::write(&r.path, b"partial").unwrap();
        d
    };
    let t = tier(dir.path(), 64 << 20, 3);
    let (_, bytes) = t.map(&ShardKey::new("job", 1, 0)).unwrap();
    assert!(bytes[..] == data[..]);
    assert_eq!(t.latest("job").unwrap(), Some(1));
    assert_eq!(t.steps("job").unwrap().len(), 1, "the unsealed step 2 must not be visible");
    assert_eq!(t.usage().reservations, 0);
    // The key the dead writer held is free again.
    save(&t, "job", 2, 0, 1, 10);
}

#[test]
fn restart_seals_segments_left_unchecksummed() {
    let dir = shm_dir();
    {
        let t = tier(dir.path(), 64 << 20, 3);
        let (_, data) = sample_shard(ShardKey::new("job", 7, 0), 1, 100, 1);
        let r = t.reserve(&ShardKey::new("job", 7, 0), 1, data.len() as u64).unwrap();
        std::fs::write(&r.path, &data).unwrap();
        // The daemon stops between the two halves of a seal.
        let _job = t.begin_seal(r.id).unwrap();
    }
    let t = tier(dir.path(), 64 << 20, 3);
    assert_eq!(t.latest("job").unwrap(), Some(7));
}

#[test]
fn second_daemon_on_same_directory_is_refused() {
    let dir = shm_dir();
    let _t = tier(dir.path(), 1 << 20, 3);
    let e = MemoryTier::open(MemoryTierConfig::new(dir.path(), 1 << 20)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.to_string().contains(".lock"), "{e}");
}

#[test]
fn retention_keeps_newest_complete_steps_and_recycles_segments() {
    let dir = shm_dir();
    let t = tier(dir.path(), 64 << 20, 2);
    for step in 1..=5 {
        save(&t, "job", step, 0, 1, 10_000);
    }
    let steps: Vec<u64> = t.steps("job").unwrap().iter().map(|s| s.step).collect();
    assert_eq!(steps, [4, 5]);
    let u = t.usage();
    assert!(u.pooled > 0, "evicted segments are pooled for reuse: {u:?}");
    assert_eq!(u.used, u.sealed + u.pooled);
}

#[test]
fn a_recycled_segment_truncated_behind_the_tier_is_handed_out_at_full_length() {
    let dir = shm_dir();
    let t = tier(dir.path(), 64 << 20, 1);
    let data = save(&t, "job", 1, 0, 1, 100_000);
    save(&t, "job", 2, 0, 1, 100_000);
    // Step 1's file went to the pool; cut it short, as a fault or another process might.
    let pooled: Vec<_> = std::fs::read_dir(dir.path().join("pool")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(pooled.len(), 1, "{pooled:?}");
    OpenOptions::new().write(true).open(&pooled[0]).unwrap().set_len(10).unwrap();
    let r = t.reserve(&ShardKey::new("job", 3, 0), 1, data.len() as u64).unwrap();
    assert_eq!(t.usage().pooled, 0, "the pooled segment was reused");
    // A writer maps the reservation at its full length; a shorter file would fault it.
    assert!(std::fs::metadata(&r.path).unwrap().len() >= data.len() as u64);
    std::fs::write(&r.path, &data).unwrap();
    t.seal(r.id).unwrap();
}

#[test]
fn a_step_pinned_for_the_drain_outlives_retention_until_unpinned() {
    let dir = shm_dir();
    let t = tier(dir.path(), 64 << 20, 2);
    let steps = |t: &MemoryTier| t.steps("job").unwrap().iter().map(|s| s.step).collect::<Vec<_>>();
    save(&t, "job", 1, 0, 1, 10_000);
    save(&t, "job", 2, 0, 1, 10_000);
    t.pin_for_drain("job", Some(1));
    save(&t, "job", 3, 0, 1, 10_000);
    save(&t, "job", 4, 0, 1, 10_000);
    assert_eq!(steps(&t), [1, 3, 4], "the pinned step stays, the others follow keep_last");
    t.pin_for_drain("job", None);
    assert_eq!(steps(&t), [3, 4], "unpinned, retention applies at once");
}

#[test]
fn a_pinned_step_outlives_retention_and_goes_at_the_next_pass_once_unpinned() {
    let dir = shm_dir();
    let steps = |t: &MemoryTier| t.steps("job").unwrap().iter().map(|s| s.step).collect::<Vec<_>>();
    {
        let t = tier(dir.path(), 64 << 20, 2);
        save(&t, "job", 1, 0, 1, 10_000);
        t.pin("job", 1).unwrap();
        for step in 2..=6 {
            save(&t, "job", step, 0, 1, 10_000);
        }
        assert_eq!(steps(&t), [1, 5, 6], "the pinned step stays, the others follow keep_last");
        // The drain's pin and a client's pin do not undo each other.
        t.pin_for_drain("job", Some(1));
        t.pin_for_drain("job", None);
        assert_eq!(steps(&t), [1, 5, 6]);
        assert_eq!(t.pinned_steps("job").into_iter().collect::<Vec<_>>(), [1]);
    }
    // Pins given at open hold through the retention that runs at open.
    let mut cfg = MemoryTierConfig::new(dir.path(), 64 << 20);
    cfg.keep_last = 1;
    cfg.pinned.insert("job".into(), [1].into());
    let t = MemoryTier::open(cfg).unwrap();
    assert_eq!(steps(&t), [1, 6], "keep_last 1 at open keeps the pinned step");
    assert!(t.unpin("job", 1).unwrap(), "it was pinned");
    assert_eq!(steps(&t), [6], "unpinned, retention applies at once");
    assert!(!t.unpin("job", 1).unwrap(), "no longer pinned");
    assert!(t.pin("bad/ns", 1).is_err(), "the namespace is checked");
}

#[test]
fn under_memory_pressure_a_pinned_step_is_evicted_last() {
    let dir = shm_dir();
    let shard = sample_shard(ShardKey::new("a", 1, 0), 1, 100_000, 0).1.len() as u64;
    let t = tier(dir.path(), shard * 3 + shard / 2, 10);
    let steps = |t: &MemoryTier| t.steps("job").unwrap().iter().map(|s| s.step).collect::<Vec<_>>();
    save(&t, "job", 1, 0, 1, 100_000);
    t.pin("job", 1).unwrap();
    save(&t, "job", 2, 0, 1, 100_000);
    save(&t, "job", 3, 0, 1, 100_000);
    // Step 4 fits only by evicting one step: not the pinned one, though oldest.
    save(&t, "job", 4, 0, 1, 100_000);
    assert_eq!(steps(&t), [1, 3, 4]);
    save(&t, "job", 5, 0, 1, 100_000);
    assert_eq!(steps(&t), [1, 4, 5]);
    // When nothing else may go, the pinned step goes too (last).
    let big = t.reserve(&ShardKey::new("job", 6, 0), 1, shard * 2).unwrap();
    assert_eq!(steps(&t), [5, 6], "the pinned step went last (6 is being written)");
    t.abort(big.id).unwrap();
}

#[test]
fn full_tier_gives_capacity_exceeded_and_keeps_newest_complete() {
    let dir = shm_dir();
    let shard = sample_shard(ShardKey::new("a", 1, 0), 1, 100_000, 0).1.len() as u64;
    let t = tier(dir.path(), shard * 2 + shard / 2, 3);
    save(&t, "job", 1, 0, 1, 100_000);
    save(&t, "job", 2, 0, 1, 100_000);
    // A third step fits only by evicting step 1 (step 2 is the newest complete).
    save(&t, "job", 3, 0, 1, 100_000);
    assert_eq!(t.latest("job").unwrap(), Some(3));
    let steps: Vec<u64> = t.steps("job").unwrap().iter().map(|s| s.step).collect();
    assert_eq!(steps, [2, 3]);
    // Step 4 of a two-rank world: rank 0 fits by evicting step 2, rank 1 cannot
    // fit: step 3 is the newest complete, and step 4 is being written.
    let k0 = ShardKey::new("job", 4, 0);
    let r0 = t.reserve(&k0, 2, shard).unwrap();
    let e = t.reserve(&ShardKey::new("job", 4, 1), 2, shard).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CapacityExceeded);
    let msg = e.to_string();
    assert!(msg.contains(&format!("asked for {shard} bytes")), "{msg}");
    assert_eq!(t.latest("job").unwrap(), Some(3));
    t.abort(r0.id).unwrap();
    // Bigger than the whole tier.
    let e = t.reserve(&ShardKey::new("job", 9, 0), 1, u64::MAX / 2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CapacityExceeded);
}

#[test]
fn a_step_the_job_declares_complete_settles_retention_and_eviction_before_the_cluster_view() {
    let dir = shm_dir();
    let shard = sample_shard(ShardKey::new("a", 1, 0), 2, 100_000, 0).1.len() as u64;
    // Room for three of this node's shards; keep_last 1.
    let t = tier(dir.path(), shard * 3 + shard / 2, 1);
    let steps = |t: &MemoryTier| t.steps("job").unwrap().iter().map(|s| s.step).collect::<Vec<_>>();
    // A node of a two-rank job holds rank 0 only: no step is complete here.
    for step in 1..=3 {
        save(&t, "job", step, 0, 2, 100_000);
    }
    assert_eq!(steps(&t), [1, 2, 3], "nothing settled: every step is kept");
    let e = t.reserve(&ShardKey::new("job", 4, 0), 2, shard).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CapacityExceeded, "and nothing may be evicted: {e}");
    t.declare_complete("job", 2).unwrap();
    assert_eq!(steps(&t), [2, 3], "keep_last 1 counts step 2 complete");
    save(&t, "job", 4, 0, 2, 100_000);
    t.declare_complete("job", 4).unwrap();
    assert_eq!(steps(&t), [4]);
    // A step this node holds no part of is refused, named.
    let e = t.declare_complete("job", 2).unwrap_err();
    assert!(e.kind() == ErrorKind::NotFound && e.to_string().contains("job/step 2"), "{e}");
}

#[test]
fn concurrent_writers_of_one_key_exactly_one_wins() {
    let dir = shm_dir();
    let t = Arc::new(tier(dir.path(), 64 << 20, 3));
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (t, b) = (t.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                t.reserve(&ShardKey::new("race", 1, 0), 1, 1000)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.kind(), ErrorKind::AlreadyExists);
    }
}

#[test]
fn a_seal_of_invalid_bytes_fails_and_frees_the_key() {
    let dir = shm_dir();
    let t = tier(dir.path(), 1 << 20, 3);
    let key = ShardKey::new("job", 1, 0);
    let r = t.reserve(&key, 1, 64).unwrap();
    std::fs::write(&r.path, [0xFFu8; 64]).unwrap();
    let e = t.seal(r.id).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let e = t.wait_visible(&key, Duration::from_millis(10)).unwrap_err();
    assert!(e.to_string().contains("seal failed"), "{e}");
    assert!(t.steps("job").unwrap().is_empty());
    save(&t, "job", 1, 0, 1, 4);
}

#[test]
fn world_size_must_agree_within_a_step() {
    let dir = shm_dir();
    let t = tier(dir.path(), 1 << 20, 3);
    save(&t, "job", 1, 0, 2, 4);
    let e = t.reserve(&ShardKey::new("job", 1, 1), 3, 100).unwrap_err();
    assert!(e.to_string().contains("world_size 2"), "{e}");
    let e = t.reserve(&ShardKey::new("../x", 1, 0), 1, 100).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn discard_incomplete_after_drops_stale_steps_only() {
    let dir = shm_dir();
    let t = tier(dir.path(), 1 << 20, 3);
    save(&t, "job", 10, 0, 2, 4);
    save(&t, "job", 10, 1, 2, 4);
    save(&t, "job", 20, 0, 2, 4);
    t.discard_incomplete_after("job", 10).unwrap();
    let steps: Vec<u64> = t.steps("job").unwrap().iter().map(|s| s.step).collect();
    assert_eq!(steps, [10]);
    save(&t, "job", 20, 0, 2, 4);
}

#[test]
fn settle_waits_for_acknowledged_seals_before_latest_answers() {
    let dir = shm_dir();
    let t = Arc::new(tier(dir.path(), 1 << 20, 3));
    let key = ShardKey::new("job", 3, 0);
    let (_, data) = sample_shard(key.clone(), 1, 100, 1);
    let r = t.reserve(&key, 1, data.len() as u64).unwrap();
    std::fs::write(&r.path, &data).unwrap();
    let job = t.begin_seal(r.id).unwrap();
    assert_eq!(t.latest("job").unwrap(), None, "not visible before its checksums");
    let t2 = t.clone();
    let finisher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        t2.finish_seal(job).unwrap();
    });
    t.settle("job", Duration::from_secs(30));
    assert_eq!(t.latest("job").unwrap(), Some(3));
    finisher.join().unwrap();
}

#[test]
fn leased_shards_are_unlinked_not_recycled() {
    let dir = shm_dir();
    let t = tier(dir.path(), 64 << 20, 1);
    let first = save(&t, "job", 1, 0, 1, 10_000);
    let (path, _) = t.lease(&ShardKey::new("job", 1, 0)).unwrap();
    let held = std::fs::File::open(&path).unwrap();
    // Retention drops step 1; the next save of the same size must not reuse
    // (and overwrite) the leased segment.
    save(&t, "job", 2, 0, 1, 10_000);
    save(&t, "job", 3, 0, 1, 10_000);
    let mut still = Vec::new();
    std::io::Read::read_to_end(&mut &held, &mut still).unwrap();
    assert!(still == first, "a leased segment was rewritten");
    t.release(&ShardKey::new("job", 1, 0));
    // Unleased, dropped segments go back to the pool.
    save(&t, "job", 4, 0, 1, 10_000);
    assert!(t.usage().pooled > 0);
}

#[test]
fn a_refused_reservation_evicts_nothing() {
    let dir = shm_dir();
    let (_, probe) = sample_shard(ShardKey::new("c", 1, 0), 1, 4, 1);
    let l = probe.len() as u64;
    let t = tier(dir.path(), 3 * l + l / 2, 3);
    for step in 1..=3 {
        save(&t, "c", step, 0, 1, 4);
    }
    // Evicting steps 1 and 2 would still leave too little room for 3 shards.
    let e = t.reserve(&ShardKey::new("d", 1, 0), 1, 3 * l).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CapacityExceeded, "{e}");
    let held: Vec<u64> = t.steps("c").unwrap().iter().map(|s| s.step).collect();
    assert_eq!(held, [1, 2, 3], "a refused reservation evicted steps");
    // One that fits once old steps go still evicts them.
    t.reserve(&ShardKey::new("d", 1, 0), 1, 2 * l).unwrap();
    let held: Vec<u64> = t.steps("c").unwrap().iter().map(|s| s.step).collect();
    assert_eq!(held, [3]);
}

#[test]
fn a_delete_drops_what_is_being_written_when_it_is_sealed() {
    let dir = shm_dir();
    let t = tier(dir.path(), 64 << 20, 3);
    save(&t, "del", 6, 0, 3, 4);
    // Rank 1 is reserved, rank 2 is being checksummed, when the step is deleted.
    let (_, d1) = sample_shard(ShardKey::new("del", 6, 1), 3, 4, 1);
    let r1 = t.reserve(&ShardKey::new("del", 6, 1), 3, d1.len() as u64).unwrap();
    std::fs::write(&r1.path, &d1).unwrap();
    let (_, d2) = sample_shard(ShardKey::new("del", 6, 2), 3, 4, 2);
    let r2 = t.reserve(&ShardKey::new("del", 6, 2), 3, d2.len() as u64).unwrap();
    std::fs::write(&r2.path, &d2).unwrap();
    let job = t.begin_seal(r2.id).unwrap();
    assert_eq!(t.delete_step("del", 6).unwrap().0, 1, "the visible shard goes at once");
    assert!(t.steps("del").unwrap().is_empty(), "a deleted step is hidden while its writers finish");
    let e = t.seal(r1.id).unwrap_err();
    assert!(e.kind() == ErrorKind::NotFound && e.to_string().contains("deleted while"), "{e}");
    let e = t.finish_seal(job).unwrap_err();
    assert!(e.to_string().contains("deleted while"), "{e}");
    assert!(t.steps("del").unwrap().is_empty() && t.latest("del").unwrap().is_none());
    let step_dir = dir.path().join("ns/del/00000000000000000006");
    let left: Vec<_> =
        std::fs::read_dir(&step_dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "files of a deleted step remain: {left:?}");
    // The step can be written again by a writer.
    save(&t, "del", 6, 0, 1, 4);
    assert_eq!(t.latest("del").unwrap(), Some(6));
}

#[test]
fn a_deleted_namespace_refuses_replicas_sealed_before_the_delete() {
    let dir = shm_dir();
    let t = tier(dir.path(), 64 << 20, 3);
    let (mut old, _) = sample_shard(ShardKey::new("gone", 6, 1), 2, 4, 1);
    old.created_unix_ms -= 1; // sealed before the delete, whatever the clock's resolution
    save(&t, "gone", 5, 0, 1, 4);
    t.delete_namespace("gone").unwrap();
    let e = t.refuse_deleted(&old).unwrap_err();
    assert!(e.kind() == ErrorKind::NotFound && e.to_string().contains("sealed before"), "{e}");
    let (mut new, _) = sample_shard(ShardKey::new("gone", 6, 1), 2, 4, 1);
    new.created_unix_ms += 1; // sealed after it
    t.refuse_deleted(&new).expect("a copy sealed after the delete is new data");
    // Other namespaces are not concerned.
    let (other, _) = sample_shard(ShardKey::new("kept", 6, 1), 2, 4, 1);
    let (mut older, _) = sample_shard(ShardKey::new("kept", 6, 1), 2, 4, 1);
    older.created_unix_ms = 1;
    t.refuse_deleted(&other).unwrap();
    t.refuse_deleted(&older).unwrap();
}

#[tokio::test]
async fn a_copy_whose_future_is_dropped_gives_its_segment_back() {
    let dir = shm_dir();
    let t = Arc::new(tier(dir.path(), 64 << 20, 3));
    let (m, _) = sample_shard(ShardKey::new("cut", 1, 0), 1, 4, 1);
    let never = futures_util::stream::pending::<Result<bytes::Bytes, tierckpt_tiers::TierError>>();
    let copy = tierckpt_tiers::receive::receive(&t, &m, "a peer that stalls", never, None);
    assert!(tokio::time::timeout(Duration::from_millis(50), copy).await.is_err(), "the copy cannot finish");
    assert_eq!(t.usage().reservations, 0, "the dropped copy's reservation was given back");
    assert!(t.reserve(&m.key, 1, m.file_len).is_ok(), "the key is free again");
}

/// A tier with a filler keeping `share` of `capacity` pre-faulted.
fn prefaulting_tier(dir: &std::path::Path, capacity: u64, keep_last: usize, share: f64) -> Arc<MemoryTier> {
    let mut cfg = MemoryTierConfig::new(dir, capacity);
    cfg.keep_last = keep_last;
    cfg.prefault_share = share;
    Arc::new(MemoryTier::open(cfg).unwrap())
}

/// Waits until the filler has nothing left to do; returns the usage then.
fn pool_ready(t: &MemoryTier) -> tierckpt_proto::MemoryUsage {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let u = t.usage();
        if !u.prefault_pending {
            return u;
        }
        assert!(std::time::Instant::now() < deadline, "the filler never finished: {u:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Saves a sample shard of `n` floats writing into the segment in place
/// (no truncation, as a client's mapping would), returning its length.
fn save_in_place(t: &MemoryTier, ns: &str, step: u64, n: usize) -> u64 {
    let key = ShardKey::new(ns, step, 0);
    let (_, data) = sample_shard(key.clone(), 1, n, step as u8);
    let r = t.reserve(&key, 1, data.len() as u64).unwrap();
    let f = OpenOptions::new().write(true).open(&r.path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).unwrap();
    t.seal(r.id).unwrap();
    data.len() as u64
}

/// `used` is exactly what the usage's parts add up to.
fn assert_exact(u: &tierckpt_proto::MemoryUsage) {
    assert_eq!(u.used, u.sealed + u.in_progress + u.pooled + u.transient, "{u:?}");
    assert_eq!(u.pooled, u.recycled + u.prefaulted, "{u:?}");
    assert!(u.used <= u.capacity, "{u:?}");
}

#[test]
fn the_filler_fills_the_pool_and_a_tight_loop_of_saves_stays_on_it() {
    let dir = shm_dir();
    let t = prefaulting_tier(dir.path(), 256 << 20, 50, 0.5);
    assert_eq!(t.usage().prefaulted, 0, "nothing is faulted in before the filler starts");
    let filler = t.start_filler(0).unwrap();
    let u = pool_ready(&t);
    assert_exact(&u);
    assert_eq!(u.prefault_target, 128 << 20);
    // No history: halves of the target (64, 32, ... 1 MiB).
    assert_eq!((u.prefaulted, u.prefaulted_segments), (127 << 20, 7), "{u:?}");

    // The first save of a size takes the closest pooled segment, cut down;
    // the filler then makes segments of that size up to the target.
    let len = save_in_place(&t, "tight", 0, 1 << 20);
    let u = pool_ready(&t);
    assert_exact(&u);
    assert_eq!((u.reserved_from_pool, u.reserved_fresh), (1, 0), "{u:?}");
    assert!(u.pooled + len > u.prefault_target, "the pool is refilled up to its target: {u:?}");
    // Segments no recent reservation would use are shed for the room.
    let ready = u.pooled / len;
    assert!(ready >= 8, "{ready} segments of the saved size are ready: {u:?}");
    assert!(u.pooled_segments >= 8, "{u:?}");

    // Saves of fresh data one after another, faster than anything is
    // recycled (keep_last 50): each lands on a pre-faulted segment.
    for step in 1..=8 {
        save_in_place(&t, "tight", step, 1 << 20);
    }
    let u = t.usage();
    assert_exact(&u);
    assert_eq!((u.reserved_from_pool, u.reserved_fresh), (9, 0), "every save was served from the pool: {u:?}");
    drop(filler);
}

#[test]
fn the_filler_never_takes_capacity_a_racing_reservation_needs() {
    let dir = shm_dir();
    // The filler may fill the whole tier: every reservation must make it
    // give room back.
    let t = prefaulting_tier(dir.path(), 64 << 20, 1, 1.0);
    let filler = t.start_filler(0).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (t, stop) = (t.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut samples = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_exact(&t.usage());
                samples += 1;
            }
            samples
        })
    };
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let t = t.clone();
            std::thread::spawn(move || {
                // Shards of 1-8 MiB; each namespace holds its newest step and
                // the one being written: at most 48 MiB in all.
                for step in 0..30u64 {
                    let n = (((w * 7 + step * 13) % 8) as usize + 1) << 18;
                    save_in_place(&t, &format!("race-{w}"), step, n);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("a reservation failed while the filler ran");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(watcher.join().unwrap() > 0);
    let u = pool_ready(&t);
    assert_exact(&u);
    assert_eq!(u.reserved_from_pool + u.reserved_fresh, 90, "{u:?}");
    drop(filler);
    // Stopped: nothing is being faulted in any more.
    let u = t.usage();
    assert_eq!(u.transient, 0, "{u:?}");
}

#[test]
fn pre_faulted_segments_survive_a_restart_as_pool_segments() {
    let dir = shm_dir();
    let before = {
        let t = prefaulting_tier(dir.path(), 128 << 20, 3, 0.5);
        let _filler = t.start_filler(0).unwrap();
        pool_ready(&t)
    };
    assert!(before.pooled > 0, "{before:?}");
    let t = prefaulting_tier(dir.path(), 128 << 20, 3, 0.5);
    let u = t.usage();
    assert_exact(&u);
    assert_eq!((u.pooled, u.pooled_segments), (before.pooled, before.pooled_segments), "{u:?}");
    // A save is served from a recovered segment; the restarted filler
    // tops the pool up again.
    save_in_place(&t, "restart", 1, 1 << 20);
    assert_eq!((t.usage().reserved_from_pool, t.usage().reserved_fresh), (1, 0));
    let _filler = t.start_filler(0).unwrap();
    let u = pool_ready(&t);
    assert_exact(&u);
    assert!(u.pooled >= before.pooled / 2, "{u:?}");
}

#[test]
fn a_reservation_larger_than_any_pooled_segment_grows_one_of_half_its_size() {
    let dir = shm_dir();
    let t = tier(dir.path(), 64 << 20, 1);
    save(&t, "grow", 1, 0, 1, 4096);
    save(&t, "grow", 2, 0, 1, 4096); // retention recycles step 1's segment
    let before = t.usage();
    assert_eq!(before.pooled_segments, 1, "{before:?}");
    let (_, bigger) = sample_shard(ShardKey::new("grow", 3, 0), 1, 6000, 3);
    let r = t.reserve(&ShardKey::new("grow", 3, 0), 1, bigger.len() as u64).unwrap();
    let after = t.usage();
    assert_eq!(after.reserved_from_pool, before.reserved_from_pool + 1, "{after:?}");
    assert_eq!(after.reserved_fresh, before.reserved_fresh, "{after:?}");
    assert_eq!(std::fs::metadata(&r.path).unwrap().len(), bigger.len() as u64);
    std::fs::write(&r.path, &bigger).unwrap();
    t.seal(r.id).unwrap();
    assert_eq!(t.latest("grow").unwrap(), Some(3));
    assert_eq!(t.usage().used, t.usage().sealed + t.usage().pooled, "accounting stays exact");
}

fn prepared(segment: &std::path::Path) -> ReserveOptions {
    ReserveOptions { segment: Some(segment.to_path_buf()), ..Default::default() }
}

#[test]
fn a_prepared_segment_serves_the_reservation_that_names_it_and_no_other_while_others_fit() {
    let dir = shm_dir();
    let t = tier(dir.path(), 64 << 20, 3);
    let len = 1 << 20;
    let (a, a_len) = t.prepare(len).unwrap();
    let (b, _) = t.prepare(len).unwrap();
    assert_ne!(a, b, "two prepares get two segments");
    assert!(a_len >= len && a.exists());
    assert_exact(&t.usage());
    assert_eq!(t.usage().pooled, 2 * len);
    let ino = |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let (ia, ib) = (ino(&a), ino(&b));
    // A reservation naming b gets b, even though a fits as well.
    let rb = t.reserve_with(&ShardKey::new("p", 1, 1), 2, len - 64, &prepared(&b)).unwrap();
    assert_eq!(ino(&rb.path), ib);
    assert_eq!(std::fs::metadata(&rb.path).unwrap().len(), len - 64, "cut to the size asked for");
    // One naming nothing, with a fresh file possible, leaves a (set aside) alone.
    let other = t.reserve(&ShardKey::new("q", 1, 0), 1, len).unwrap();
    assert_ne!(ino(&other.path), ia);
    let ra = t.reserve_with(&ShardKey::new("p", 1, 0), 2, len, &prepared(&a)).unwrap();
    assert_eq!(ino(&ra.path), ia);
    assert_exact(&t.usage());
    // A stale or made-up name is only a hint.
    let r = t.reserve_with(&ShardKey::new("r", 1, 0), 1, 4096, &prepared(std::path::Path::new("/etc/passwd"))).unwrap();
    assert!(r.path.starts_with(dir.path()));
    assert_exact(&t.usage());
}

#[test]
fn a_prepare_that_cannot_fit_is_refused_naming_the_sizes_and_changes_nothing() {
    let dir = shm_dir();
    let t = tier(dir.path(), 8 << 20, 3);
    let before = t.usage();
    match t.prepare(16 << 20) {
        Err(tierckpt_tiers::TierError::CapacityExceeded { requested, capacity, .. }) => {
            assert_eq!((requested, capacity), (16 << 20, 8 << 20))
        }
        other => panic!("expected CapacityExceeded, got {other:?}"),
    }
    assert_eq!(t.usage().used, before.used);
    assert_eq!(std::fs::read_dir(dir.path().join("pool")).unwrap().count(), 0);
}

#[test]
fn a_writer_that_outruns_the_seals_waits_for_them_instead_of_failing() {
    let dir = shm_dir();
    let (_, data) = sample_shard(ShardKey::new("fast", 1, 0), 1, 64 << 10, 1);
    let len = data.len() as u64;
    // Room for two shards: step 1 visible, step 2 being checksummed.
    let t = Arc::new(tier(dir.path(), 2 * len + len / 2, 1));
    save(&t, "fast", 1, 0, 1, 64 << 10);
    let (_, data2) = sample_shard(ShardKey::new("fast", 2, 0), 1, 64 << 10, 2);
    let r2 = t.reserve(&ShardKey::new("fast", 2, 0), 1, len).unwrap();
    std::fs::write(&r2.path, &data2).unwrap();
    let job = t.begin_seal(r2.id).unwrap();
    // Step 3 fits only once step 2 is visible and step 1 may go: without a wait it is refused...
    let refused = t.reserve(&ShardKey::new("fast", 3, 0), 1, len).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::CapacityExceeded, "{refused}");
    // ...with one, it waits for the seal under way.
    let waiting = {
        let t = t.clone();
        std::thread::spawn(move || {
            let opts = ReserveOptions { wait_for_seals: Duration::from_secs(60), ..Default::default() };
            t.reserve_with(&ShardKey::new("fast", 3, 0), 1, len, &opts)
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!waiting.is_finished(), "the reservation waits while step 2 is sealing");
    t.finish_seal(job).unwrap();
    let r3 = waiting.join().unwrap().expect("served once the seal finished");
    assert_eq!(r3.len, len);
    assert!(t.wait_visible(&ShardKey::new("fast", 2, 0), Duration::from_secs(1)).is_ok(), "step 2 kept");
    // With nothing sealing, a reservation that cannot fit is refused at once, waiting or not.
    let opts = ReserveOptions { wait_for_seals: Duration::from_secs(60), ..Default::default() };
    let started = std::time::Instant::now();
    let e = t.reserve_with(&ShardKey::new("fast", 4, 0), 1, 3 * len, &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CapacityExceeded, "{e}");
    assert!(started.elapsed() < Duration::from_secs(30), "refused without waiting for nothing");
}

#[test]
fn the_filler_waits_while_a_segment_is_being_written() {
    let dir = shm_dir();
    let t = prefaulting_tier(dir.path(), 64 << 20, 3, 0.5);
    let held = t.reserve(&ShardKey::new("w", 1, 0), 1, 1 << 20).unwrap();
    let _filler = t.start_filler(0).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let u = t.usage();
    assert_eq!(u.prefaulted, 0, "nothing is faulted in while a client copies into its segment: {u:?}");
    assert!(u.prefault_pending, "{u:?}");
    t.abort(held.id).unwrap();
    let u = pool_ready(&t);
    assert!(u.prefaulted > 0, "the filler went on once the writer was done: {u:?}");
    assert_exact(&u);
}

/// A shard file truncated behind the tier while a reader holds its mapping
/// (an operator's `truncate`, a tampering process): with
/// `tolerate_truncated_files`, as tierckptd installs it, the pages past the
/// new end read as zeros instead of ending the process with SIGBUS, and the
/// reader's checksums refuse the shard.
#[test]
fn a_shard_truncated_under_its_mapping_reads_as_zeros_and_fails_verification() {
    tierckpt_tiers::memory::tolerate_truncated_files();
    let dir = shm_dir();
    let t = Arc::new(tier(dir.path(), 64 << 20, 3));
    let data = save(&t, "cut", 1, 0, 1, 1_000_000);
    let key = ShardKey::new("cut", 1, 0);
    let (m, map) = t.map_leased(&key).unwrap();
    tierckpt_format::verify_chunks(&map, &m, "cut/1/0").expect("intact before the cut");
    let path = dir.path().join("ns/cut").join(format!("{:020}", 1)).join("rank-00000-of-00001.safetensors");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), data.len() as u64, "{}", path.display());
    OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();

    let before = tierckpt_tiers::memory::truncated_pages_read();
    assert!(map[map.len() - 100..].iter().all(|&b| b == 0), "past the new end: zeros");
    assert!(tierckpt_tiers::memory::truncated_pages_read() > before);
    let err = tierckpt_format::verify_chunks(&map, &m, "cut/1/0").expect_err("the cut shard is refused");
    assert!(err.to_string().contains("cut/1/0"), "{err}");
}
