//! The fault-injecting adapter: which requests fail depends on the seed
//! only; requests over the rate are refused as a throttling server does.

use std::sync::Arc;

use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStoreExt;
use tierckpt_tiers::faults::{FaultSpec, FaultyStore};

/// Whether each of `n` puts through a store configured by `spec` failed.
async fn failures(spec: &str, n: usize) -> Vec<bool> {
    let store = FaultyStore::new(Arc::new(InMemory::new()), FaultSpec::parse(spec).unwrap());
    let mut failed = Vec::with_capacity(n);
    for i in 0..n {
        failed.push(store.put(&Path::from(format!("o/{i}")), vec![1u8].into()).await.is_err());
    }
    failed
}

#[tokio::test]
async fn the_same_seed_fails_the_same_requests() {
    let a = failures("fail=0.3,seed=7", 1000).await;
    assert_eq!(a, failures("fail=0.3,seed=7", 1000).await);
    assert_ne!(a, failures("fail=0.3,seed=8", 1000).await);
    let share = a.iter().filter(|&&f| f).count();
    assert!((200..400).contains(&share), "{share} of 1000 failed at fail=0.3");
}

#[tokio::test]
async fn no_share_fails_nothing_and_a_share_of_one_fails_everything() {
    assert!(failures("fail=0", 100).await.iter().all(|&f| !f));
    assert!(failures("fail=1", 100).await.iter().all(|&f| f));
}

#[tokio::test]
async fn requests_over_the_rate_are_refused_with_slow_down_and_taken_again_later() {
    let store = FaultyStore::new(Arc::new(InMemory::new()), FaultSpec::parse("rate=20").unwrap());
    let put = |i: usize| {
        let path = Path::from(format!("o/{i}"));
        let store = &store;
        async move { store.put(&path, vec![1u8].into()).await }
    };
    let mut refused = Vec::new();
    for i in 0..100 {
        if let Err(e) = put(i).await {
            refused.push(e.to_string());
        }
    }
    // A burst of 20 (and what trickled in meanwhile), then refusals.
    assert!((70..=80).contains(&refused.len()), "{} of 100 refused at rate=20", refused.len());
    assert!(refused.iter().all(|e| e.contains("SlowDown") && e.contains("over 20 requests a second")), "{refused:?}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(put(1000).await.is_ok(), "tokens come back with time");
}

#[test]
fn bad_specs_are_refused_by_name() {
    for bad in ["rate=0", "rate=-1", "rate=fast", "fail=2", "delay=5s", "speed=3"] {
        let e = FaultSpec::parse(bad).unwrap_err().to_string();
        assert!(e.contains(bad), "{bad}: {e}");
    }
    let f = FaultSpec::parse("fail=0.5,delay=3ms,rate=7.5,seed=2").unwrap();
    assert_eq!((f.fail, f.delay.as_millis(), f.rate, f.seed), (0.5, 3, Some(7.5), 2));
}
