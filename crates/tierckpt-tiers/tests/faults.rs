//! The fault-injecting adapter: which requests fail depends on the seed only.

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
