use async_trait::async_trait;
use std::ops::Deref;
use tierckpt_format::{Manifest, ShardKey};
use tierckpt_proto::StepSummary;

use crate::Result;

/// Bytes of a shard: mapped from the tier or owned.
pub enum ShardBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for ShardBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ShardBytes::Mapped(m) => m,
            ShardBytes::Owned(v) => v,
        }
    }
}

/// A place that holds shards. Every tier gives the same guarantees, checked by
/// [`crate::conformance`]: a shard is visible only once whole and verified,
/// a key is written once, and reads are verified against the manifest.
#[async_trait]
pub trait Tier: Send + Sync {
    /// Short name for logs and reports ("memory", "peer", "persistent").
    fn name(&self) -> &str;

    /// Stores a shard whose bytes must match `manifest`; `AlreadyExists` if the
    /// key is taken, `Corrupt` if the bytes do not match.
    async fn put(&self, manifest: &Manifest, data: &[u8]) -> Result<()>;

    /// Reads a visible shard and verifies it.
    async fn get(&self, key: &ShardKey) -> Result<(Manifest, ShardBytes)>;

    async fn manifest(&self, key: &ShardKey) -> Result<Manifest>;

    async fn list_namespaces(&self) -> Result<Vec<String>>;

    /// Steps of a namespace, oldest first.
    async fn list_steps(&self, namespace: &str) -> Result<Vec<StepSummary>>;

    /// Deletes every shard of a step; `NotFound` if there is none.
    async fn delete_step(&self, namespace: &str, step: u64) -> Result<()>;

    /// Newest step whose every rank is visible.
    async fn latest(&self, namespace: &str) -> Result<Option<u64>> {
        let steps = self.list_steps(namespace).await?;
        Ok(steps.iter().rev().find(|s| s.complete).map(|s| s.step))
    }
}
