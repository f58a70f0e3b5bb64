//! Reads: locating and mapping shards, leases that keep a mapped shard's
//! bytes from being recycled, and summaries of what the tier holds.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tierckpt_format::names::validate_namespace;
use tierckpt_format::{Manifest, ShardKey};
use tierckpt_proto::{MemoryUsage, NamespaceSummary};

use super::index::Shard;
use super::{io_err, MemoryTier};
use crate::private_fs::open_read;
use crate::{Result, StepSummary, TierError};

impl MemoryTier {
    /// Path and manifest of a visible shard.
    pub fn locate(&self, key: &ShardKey) -> Result<(PathBuf, Arc<Manifest>)> {
        let st = self.lock();
        let step = st.steps.get(&(key.namespace.clone(), key.step));
        match step.and_then(|s| s.shards.get(&key.rank).map(|sh| (s.world_size, sh))) {
            Some((w, Shard::Sealed { manifest })) => Ok((self.data_path(key, w), manifest.clone())),
            Some((_, Shard::Sealing { .. })) => {
                Err(TierError::NotFound(format!("shard {key} is still being sealed; wait for it or read another step")))
            }
            None => Err(TierError::NotFound(format!("shard {key} in the memory tier"))),
        }
    }

    /// Like [`Self::locate`], and checks that the shard's file is still
    /// there, whole: a file removed or truncated behind the daemon's back is
    /// dropped from the index and the shard is `NotFound`, so that a read
    /// falls through to the next tier.
    pub fn locate_present(&self, key: &ShardKey) -> Result<(PathBuf, Arc<Manifest>)> {
        let (path, m) = self.locate(key)?;
        let found = std::fs::symlink_metadata(&path);
        let why = match &found {
            Ok(meta) if meta.file_type().is_file() && meta.len() == m.file_len => return Ok((path, m)),
            Ok(meta) if meta.file_type().is_file() => format!("holds {} of its {} bytes", meta.len(), m.file_len),
            Ok(_) => "is not a regular file".to_string(),
            Err(e) => e.to_string(),
        };
        self.forget(key);
        tracing::warn!(shard = %key, path = %path.display(), why, "dropped a shard whose file went away behind the daemon");
        Err(TierError::NotFound(format!("shard {key} in the memory tier: its file {} {why}", path.display())))
    }

    /// Opens a visible shard's file; one gone behind the daemon's back is
    /// dropped from the index (`NotFound`).
    fn open_shard(&self, key: &ShardKey, path: &Path) -> Result<File> {
        match open_read(path) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(key);
                tracing::warn!(shard = %key, path = %path.display(), "dropped a shard whose file went away behind the daemon");
                Err(TierError::NotFound(format!("shard {key} in the memory tier: its file {} is gone", path.display())))
            }
            Err(e) => Err(io_err("opening", path)(e)),
        }
    }

    /// Maps a visible shard read-only, without verifying it.
    pub fn map(&self, key: &ShardKey) -> Result<(Manifest, memmap2::Mmap)> {
        let (path, m) = self.locate(key)?;
        let f = self.open_shard(key, &path)?;
        Ok(((*m).clone(), map_file(&f, &path)?))
    }

    /// Like [`Self::locate`], and keeps the shard's bytes from being recycled
    /// until [`Self::release`]: a reader may map it and trust that the bytes
    /// it verifies stay the bytes it copies.
    pub fn lease(&self, key: &ShardKey) -> Result<(PathBuf, Arc<Manifest>)> {
        let found = self.locate(key)?;
        *self.lock().leases.entry(key.clone()).or_default() += 1;
        Ok(found)
    }

    /// Ends one lease taken by [`Self::lease`] on `key`.
    pub fn release(&self, key: &ShardKey) {
        let mut st = self.lock();
        if let Some(n) = st.leases.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                st.leases.remove(key);
            }
        }
    }

    /// Maps a visible shard under a lease that ends when the mapping drops.
    pub fn map_leased(self: &Arc<Self>, key: &ShardKey) -> Result<(Manifest, LeasedMap)> {
        let (path, m) = self.lease(key)?;
        let lease = Lease { tier: self.clone(), key: key.clone() };
        let f = self.open_shard(key, &path)?;
        // Not populated: its readers stream it once, and populating first
        // would delay the first byte by a whole pass over the page tables.
        Ok(((*m).clone(), LeasedMap { map: map_file_lazy(&f, &path)?, _lease: lease }))
    }

    /// Newest complete step of a namespace.
    pub fn latest(&self, ns: &str) -> Result<Option<u64>> {
        validate_namespace(ns)?;
        let st = self.lock();
        let r = st
            .steps
            .range((ns.to_string(), 0)..=(ns.to_string(), u64::MAX))
            .rev()
            .find(|(_, s)| s.complete())
            .map(|((_, step), _)| *step);
        Ok(r)
    }

    /// Every step of a namespace held here, complete or not, oldest first.
    pub fn steps(&self, ns: &str) -> Result<Vec<StepSummary>> {
        validate_namespace(ns)?;
        let st = self.lock();
        Ok(st
            .steps
            .range((ns.to_string(), 0)..=(ns.to_string(), u64::MAX))
            .filter(|(_, s)| !s.deleted)
            .map(|((_, step), s)| s.summary(*step))
            .collect())
    }

    /// Every namespace held here, with its counts of steps and bytes.
    pub fn namespaces(&self) -> Vec<NamespaceSummary> {
        let st = self.lock();
        let mut out: BTreeMap<&str, NamespaceSummary> = BTreeMap::new();
        for ((ns, step), s) in st.steps.iter().filter(|(_, s)| !s.deleted) {
            let e = out.entry(ns).or_insert_with(|| NamespaceSummary {
                namespace: ns.clone(),
                steps: 0,
                complete_steps: 0,
                latest_complete: None,
                bytes: 0,
                pinned: Vec::new(),
            });
            e.steps += 1;
            e.bytes += s.bytes();
            if s.complete() {
                e.complete_steps += 1;
                e.latest_complete = Some(*step);
            }
        }
        out.into_values().collect()
    }

    /// How the tier's capacity is used.
    pub fn usage(&self) -> MemoryUsage {
        let st = self.lock();
        let mut u = MemoryUsage {
            capacity: self.cfg.capacity,
            used: st.used,
            pooled: st.pool.iter().map(|p| p.len).sum(),
            reservations: st.reservations.len() as u64,
            keep_last: self.cfg.keep_last,
            pooled_segments: st.pool.len() as u64,
            recycled: st.pool.iter().filter(|p| !p.prefaulted).map(|p| p.len).sum(),
            prefaulted: st.pool.iter().filter(|p| p.prefaulted).map(|p| p.len).sum(),
            prefaulted_segments: st.pool.iter().filter(|p| p.prefaulted).count() as u64,
            prefault_target: self.prefault_target(),
            prefault_pending: self.prefault_pending(&st),
            transient: st.transient,
            reserved_from_pool: st.from_pool,
            reserved_fresh: st.fresh,
            ..Default::default()
        };
        u.in_progress = st.reservations.values().map(|r| r.len).sum();
        for s in st.steps.values() {
            for sh in s.shards.values() {
                match sh {
                    Shard::Sealed { manifest } => {
                        u.sealed += manifest.file_len;
                        u.shards += 1;
                    }
                    Shard::Sealing { len } => u.in_progress += len,
                }
            }
        }
        u
    }
}

/// One lease on a shard, ended when dropped.
struct Lease {
    tier: Arc<MemoryTier>,
    key: ShardKey,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.tier.release(&self.key);
    }
}

/// A read-only mapping of a shard that holds a lease on it.
pub struct LeasedMap {
    map: memmap2::Mmap,
    _lease: Lease,
}

impl AsRef<[u8]> for LeasedMap {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl std::ops::Deref for LeasedMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

/// Maps a whole file read-only without prefaulting it.
pub(super) fn map_file_lazy(file: &File, path: &Path) -> Result<memmap2::Mmap> {
    // SAFETY: the same contract as `map_file`: the file is not written while
    // mapped; only the page population differs.
    unsafe { memmap2::MmapOptions::new().map(file) }.map_err(io_err("mapping", path))
}

/// Maps a whole file read-only (an empty file maps to an empty slice).
pub(super) fn map_file(file: &File, path: &Path) -> Result<memmap2::Mmap> {
    // SAFETY: the file must not change while mapped. Shard files are written
    // only while reserved; a sealed file is not written again, a leased one
    // is unlinked rather than recycled when dropped, and readers verify
    // checksums over what they read.
    unsafe { memmap2::MmapOptions::new().populate().map(file) }.map_err(io_err("mapping", path))
}
