//! The persistent tier against a real S3-protocol server (moto_server on
//! 127.0.0.1), plain and behind the fault-injecting adapter.

use std::sync::Arc;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tierckpt_format::ShardKey;
use tierckpt_harness::moto;
use tierckpt_tiers::conformance::{run_all, sample_shard};
use tierckpt_tiers::faults::{FaultSpec, FaultyStore};
use tierckpt_tiers::{PersistOptions, PersistentTier, Tier};

fn tier(m: &moto::Moto, bucket: &str, opts: PersistOptions) -> PersistentTier {
    m.create_bucket(bucket);
    PersistentTier::open_with(&format!("s3://{bucket}/ckpt"), "test", opts, &m.options()).unwrap()
}

/// Flips a byte of the stored data of a shard, through `store` (under the
/// prefix `ckpt`). Needs a multi-threaded runtime.
fn flip_data_byte(store: Arc<dyn ObjectStore>) -> impl Fn(&ShardKey) + Sync {
    let handle = tokio::runtime::Handle::current();
    move |key: &ShardKey| {
        let store = store.clone();
        let key = key.clone();
        // The hook is synchronous: run the edit on a helper thread.
        let h = handle.clone();
        std::thread::spawn(move || {
            h.block_on(async {
                let dir = Path::from(format!("ckpt/{}/{:020}/data", key.namespace, key.step));
                let objs: Vec<_> =
                    futures_util::TryStreamExt::try_collect::<Vec<_>>(store.list(Some(&dir))).await.unwrap();
                let obj = &objs.iter().find(|o| o.location.as_ref().ends_with(".safetensors")).unwrap().location;
                let mut b = store.get(obj).await.unwrap().bytes().await.unwrap().to_vec();
                let n = b.len();
                b[n - 2] ^= 0x10;
                store.put(obj, b.into()).await.unwrap();
            })
        })
        .join()
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_tier_passes_conformance() {
    let m = moto::Moto::start();
    let opts = PersistOptions { multipart_threshold: 5 << 20, part_size: 5 << 20, ..Default::default() };
    let t = tier(&m, "conf", opts);
    run_all(&t, &flip_data_byte(t.store())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_tier_behind_a_failing_slow_store_passes_conformance() {
    let m = moto::Moto::start();
    let base = tier(&m, "conf-faults", PersistOptions::default());
    let faulty = Arc::new(FaultyStore::new(base.store(), FaultSpec::parse("fail=0.2,delay=1ms,seed=3").unwrap()));
    // Single-request uploads (below the multipart threshold), as on file://.
    let opts = PersistOptions { attempts: 12, ..Default::default() };
    let t = PersistentTier::with_store(faulty, "ckpt", "s3://conf-faults/ckpt", "faulty", opts).unwrap();
    run_all(&t, &flip_data_byte(base.store())).await;
}

#[tokio::test]
async fn s3_multipart_upload_of_a_large_shard() {
    let m = moto::Moto::start();
    let opts = PersistOptions { multipart_threshold: 5 << 20, part_size: 5 << 20, ..Default::default() };
    let t = tier(&m, "multipart", opts);
    let key = ShardKey::new("big", 1, 0);
    let (man, data) = sample_shard(key.clone(), 1, 4 << 20, 5);
    t.put(&man, &data).await.unwrap();
    let (_, got) = t.get(&key).await.unwrap();
    assert!(got[..] == data[..]);
}

#[tokio::test]
async fn s3_with_30_percent_failures_still_completes() {
    let m = moto::Moto::start();
    let base = tier(&m, "flaky", PersistOptions::default());
    let faulty = Arc::new(FaultyStore::new(base.store(), FaultSpec::parse("fail=0.3,seed=5").unwrap()));
    // A multipart upload is retried whole: of 2 parts (4 requests) it fails
    // 20 times in a row once in 250.
    let opts = PersistOptions { multipart_threshold: 5 << 20, part_size: 5 << 20, attempts: 20, ..Default::default() };
    let t = PersistentTier::with_store(faulty, "ckpt", "s3://flaky/ckpt", "faulty", opts).unwrap();
    // 4 MiB in one request, then 8 MiB in two parts.
    for step in 1..=2u64 {
        let key = ShardKey::new("f", step, 0);
        let (man, data) = sample_shard(key.clone(), 1, (1 << 20) * step as usize, step as u8);
        t.put(&man, &data).await.unwrap();
        let (_, got) = t.get(&key).await.unwrap();
        assert!(got[..] == data[..]);
    }
    let stored = t.commit_record("f", 2).await.unwrap().shards[0].stored_bytes();
    assert!(stored > 5 << 20, "step 2 went up in parts ({stored} bytes)");
}
