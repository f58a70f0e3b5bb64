//! The memory tier as a [`Tier`].

use std::io::Write;
use std::sync::Arc;

use async_trait::async_trait;
use tierckpt_format::{verify_chunks, Manifest, ShardKey};

use super::{io_err, MemoryTier};
use crate::{Result, ShardBytes, StepSummary, Tier};

#[async_trait]
impl Tier for MemoryTier {
    fn name(&self) -> &str {
        "memory"
    }

    /// Into itself: a check that the shard is here, its file whole; into another memory
    /// tier: a whole verified copy.
    async fn copy_to_memory(&self, key: &ShardKey, memory: &Arc<MemoryTier>) -> Result<()> {
        match std::ptr::eq(self, Arc::as_ptr(memory)) {
            true => self.locate_present(key).map(|_| ()),
            false => crate::tier::copy_whole(self, key, memory).await,
        }
    }

    async fn put(&self, manifest: &Manifest, data: &[u8]) -> Result<()> {
        manifest.check_len(data.len())?;
        verify_chunks(data, manifest, &manifest.key.to_string())?;
        let r = self.reserve(&manifest.key, manifest.world_size, manifest.file_len)?;
        let written = crate::private_fs::open_write(&r.path)
            .and_then(|mut f| f.write_all(data))
            .map_err(io_err("writing", &r.path));
        if let Err(e) = written {
            let _ = self.abort(r.id);
            return Err(e);
        }
        self.seal(r.id).map(|_| ())
    }

    async fn get(&self, key: &ShardKey) -> Result<(Manifest, ShardBytes)> {
        let (m, bytes) = self.map(key)?;
        verify_chunks(&bytes, &m, &key.to_string())?;
        Ok((m, ShardBytes::Mapped(bytes)))
    }

    async fn manifest(&self, key: &ShardKey) -> Result<Manifest> {
        Ok((*self.locate(key)?.1).clone())
    }

    async fn list_namespaces(&self) -> Result<Vec<String>> {
        Ok(self.namespaces().into_iter().map(|n| n.namespace).collect())
    }

    async fn list_steps(&self, namespace: &str) -> Result<Vec<StepSummary>> {
        self.steps(namespace)
    }

    async fn delete_step(&self, namespace: &str, step: u64) -> Result<()> {
        MemoryTier::delete_step(self, namespace, step).map(|_| ())
    }

    async fn latest(&self, namespace: &str) -> Result<Option<u64>> {
        MemoryTier::latest(self, namespace)
    }
}
