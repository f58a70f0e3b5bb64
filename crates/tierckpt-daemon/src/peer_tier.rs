//! The peer tier: the memory of the cluster's other nodes, seen as one
//! [`Tier`]. Reads go to a live holder of the shard (the next one on any
//! error), every chunk verified; writes place whole copies on this node's
//! placement targets; listings come from the cluster view, refreshed
//! first; deletes reach every node not known dead.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tierckpt_format::{Manifest, ShardKey};
use tierckpt_proto::{ClusterStep, StepSummary};
use tierckpt_tiers::receive::collect_verified;
use tierckpt_tiers::{ErrorKind, MemoryTier, Result, ShardBytes, Tier, TierError};

use crate::cluster::Cluster;

/// The other nodes' memory, through a running [`Cluster`].
pub struct PeerTier {
    cluster: Arc<Cluster>,
}

impl PeerTier {
    /// The peer tier of `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }

    /// The steps of `namespace` in `view` with, for each rank, only the
    /// holders that are not this node.
    fn peer_steps(&self, view: &mut BTreeMap<String, Vec<ClusterStep>>, namespace: &str) -> Vec<ClusterStep> {
        let me = self.cluster.node_id();
        let mut steps = view.remove(namespace).unwrap_or_default();
        for s in &mut steps {
            s.holders.values_mut().for_each(|h| h.retain(|id| id != me));
            s.holders.retain(|_, h| !h.is_empty());
            s.complete = (0..s.world_size).all(|r| s.holders.contains_key(&r));
        }
        steps.retain(|s| !s.holders.is_empty());
        steps
    }

    /// Reads `key` whole from its first live holder that sends it intact.
    async fn read(&self, key: &ShardKey) -> Result<(Manifest, Vec<u8>)> {
        self.cluster
            .try_holders(key, |id| async move {
                let (m, stream) = self.cluster.fetch_from(&id, key).await?;
                let bytes = collect_verified(&m, format!("{key} from node {id}"), stream).await?;
                Ok((m, bytes))
            })
            .await
    }
}

#[async_trait]
impl Tier for PeerTier {
    fn name(&self) -> &str {
        "peer"
    }

    async fn put(&self, manifest: &Manifest, data: &[u8]) -> Result<()> {
        manifest.check_len(data.len())?;
        tierckpt_format::verify_chunks(data, manifest, &manifest.key.to_string())?;
        self.cluster.put_copies(manifest, Bytes::copy_from_slice(data)).await
    }

    async fn get(&self, key: &ShardKey) -> Result<(Manifest, ShardBytes)> {
        let (m, bytes) = self.read(key).await?;
        Ok((m, ShardBytes::Owned(bytes)))
    }

    async fn manifest(&self, key: &ShardKey) -> Result<Manifest> {
        let fetched = self.cluster.try_holders(key, |id| async move { self.cluster.fetch_from(&id, key).await });
        Ok(fetched.await?.0)
    }

    async fn list_namespaces(&self) -> Result<Vec<String>> {
        self.cluster.refresh().await;
        let mut view = self.cluster.view();
        let names: Vec<String> = view.keys().cloned().collect();
        Ok(names.into_iter().filter(|ns| !self.peer_steps(&mut view, ns).is_empty()).collect())
    }

    async fn list_steps(&self, namespace: &str) -> Result<Vec<StepSummary>> {
        self.cluster.refresh().await;
        Ok(self
            .peer_steps(&mut self.cluster.view(), namespace)
            .into_iter()
            .map(|s| StepSummary {
                step: s.step,
                world_size: s.world_size,
                ranks: s.holders.keys().copied().collect(),
                in_progress: Vec::new(),
                complete: s.complete,
                bytes: 0,
                created_unix_ms: 0,
            })
            .collect())
    }

    async fn delete_step(&self, namespace: &str, step: u64) -> Result<()> {
        let mut deleted = 0;
        for (node, r) in self.cluster.delete_on_peers(namespace, Some(step)).await {
            match r {
                Ok((shards, _)) => deleted += shards,
                Err(e) => return Err(TierError::Unavailable(format!("deleting on {node}: {e}"))),
            }
        }
        match deleted {
            0 => Err(TierError::NotFound(format!("{namespace}/step {step} on any peer"))),
            _ => Ok(()),
        }
    }

    /// Streams the shard from a live holder straight into `memory`, every
    /// chunk verified on the way in, trying each holder in turn.
    async fn copy_to_memory(&self, key: &ShardKey, memory: &Arc<MemoryTier>) -> Result<()> {
        debug_assert!(Arc::ptr_eq(memory, self.cluster.memory()), "peers copy into this node's memory");
        match self.cluster.fetch_from_peers(key).await {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            r => r,
        }
    }
}
