//! The segment pool: files of dropped shards kept, pages and all, for the
//! next reservation of about their size; and the unlinks done off the lock.

use std::fs;
use std::path::PathBuf;

use super::index::State;
use super::MemoryTier;

/// A recycled segment.
#[derive(Debug)]
pub(super) struct Pooled {
    /// Its file under `pool/`.
    pub(super) path: PathBuf,
    /// Its size in bytes.
    pub(super) len: u64,
}

/// Files to remove once the index lock is released (unlinking a large tmpfs
/// file frees its pages, which takes a while).
#[must_use]
pub(super) struct Unlinks(pub(super) Vec<PathBuf>);

impl Unlinks {
    /// Removes the files; a file already gone is no error.
    pub(super) fn run(self) {
        for p in self.0 {
            if let Err(e) = fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "could not remove segment");
                }
            }
        }
    }
}

impl MemoryTier {
    /// Bytes of capacity not held.
    pub(super) fn free(&self, st: &State) -> u64 {
        self.cfg.capacity.saturating_sub(st.used)
    }

    /// Adds a file to the pool, or marks it for removal if the pool is full.
    pub(super) fn pool_file(&self, st: &mut State, path: PathBuf, len: u64, unlinks: &mut Vec<PathBuf>) {
        if st.pool.len() >= self.cfg.max_pooled_segments {
            unlinks.push(path);
            st.used = st.used.saturating_sub(len);
            return;
        }
        let target = self.cfg.root.join("pool").join(format!("{}.seg", st.next_id));
        st.next_id += 1;
        match fs::rename(&path, &target) {
            Ok(()) => st.pool.push(Pooled { path: target, len }),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not recycle a segment");
                unlinks.push(path);
                st.used = st.used.saturating_sub(len);
            }
        }
    }

    /// Index of a pooled segment close enough in size to be reused for `len`.
    pub(super) fn pool_fit(st: &State, len: u64) -> Option<usize> {
        let slack = (len / 16).max(1 << 20);
        st.pool
            .iter()
            .enumerate()
            .filter(|(_, p)| p.len >= len && p.len - len <= slack)
            .min_by_key(|(_, p)| p.len)
            .map(|(i, _)| i)
    }
}
