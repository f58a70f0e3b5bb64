//! The persistent tier as a [`Tier`].

use super::*;

#[async_trait]
impl Tier for PersistentTier {
    fn name(&self) -> &str {
        "persistent"
    }

    /// Streams the shard into memory, each chunk verified on the way in.
    async fn copy_to_memory(&self, key: &ShardKey, memory: &Arc<MemoryTier>) -> Result<()> {
        let (m, stream) = self.fetch(key).await?;
        match crate::receive::receive(memory, &m, self.url(), stream, None).await {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Uploads and claims the shard, then commits its step if complete.
    async fn put(&self, manifest: &Manifest, data: &[u8]) -> Result<()> {
        manifest.check_len(data.len())?;
        self.upload(manifest, Bytes::copy_from_slice(data)).await?;
        self.try_commit(&manifest.key.namespace, manifest.key.step, manifest.world_size).await?;
        Ok(())
    }

    async fn get(&self, key: &ShardKey) -> Result<(Manifest, ShardBytes)> {
        let (m, stream) = self.fetch(key).await?;
        let out = crate::receive::collect_verified(&m, format!("{}/{}", self.url, key), stream).await?;
        Ok((m, ShardBytes::Owned(out)))
    }

    async fn manifest(&self, key: &ShardKey) -> Result<Manifest> {
        Ok(self.committed_rank(key).await?.manifest)
    }

    async fn list_namespaces(&self) -> Result<Vec<String>> {
        self.namespaces().await
    }

    async fn list_steps(&self, namespace: &str) -> Result<Vec<StepSummary>> {
        Ok(self
            .steps(namespace)
            .await?
            .into_iter()
            .map(|s| StepSummary {
                step: s.step,
                world_size: s.world_size,
                complete: s.committed,
                ranks: s.ranks,
                in_progress: vec![],
                bytes: 0,
                created_unix_ms: 0,
            })
            .collect())
    }

    async fn delete_step(&self, namespace: &str, step: u64) -> Result<()> {
        if self.delete(namespace, step).await? == 0 {
            return Err(TierError::NotFound(format!("{namespace}/step {step} in {}", self.url)));
        }
        Ok(())
    }

    async fn latest(&self, namespace: &str) -> Result<Option<u64>> {
        self.latest_committed(namespace).await
    }
}
