//! The [`Tier`] trait every place that holds shards implements, and the
//! bytes a tier hands out.

use async_trait::async_trait;
use std::ops::Deref;
use std::sync::Arc;
use tierckpt_format::{Manifest, ShardKey};
use tierckpt_proto::StepSummary;

use crate::{ErrorKind, MemoryTier, Result};

/// Bytes of a shard: mapped from the tier or owned.
pub enum ShardBytes {
    /// A read-only mapping of the tier's own file.
    Mapped(memmap2::Mmap),
    /// Bytes read into memory.
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
/// the conformance suite (`conformance`, a cargo feature): a shard is visible only once whole and verified,
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

    /// The manifest of a visible shard.
    async fn manifest(&self, key: &ShardKey) -> Result<Manifest>;

    /// Namespaces holding at least one shard.
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

    /// Makes a verified copy of `key` present in `memory`, this node's memory
    /// tier, taking it from this tier (the memory tier itself only checks
    /// that it holds it). The daemon reads through an ordered list of tiers,
    /// fastest first, calling this on each until one succeeds. A copy that
    /// another request brought in meanwhile counts as success.
    async fn copy_to_memory(&self, key: &ShardKey, memory: &Arc<MemoryTier>) -> Result<()> {
        copy_whole(self, key, memory).await
    }
}

/// [`Tier::copy_to_memory`] through [`Tier::get`]: the whole shard read,
/// verified, then written into `memory`.
pub(crate) async fn copy_whole<T: Tier + ?Sized>(tier: &T, key: &ShardKey, memory: &MemoryTier) -> Result<()> {
    let (m, bytes) = tier.get(key).await?;
    match memory.put(&m, &bytes).await {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}
