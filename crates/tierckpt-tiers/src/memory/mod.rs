//! The memory tier: shards as files in a tmpfs directory, so they outlive the
//! training process and a restart of the daemon.
//!
//! Layout under `root`:
//! ```text
//! .lock                                   one daemon per directory (flock)
//! pending/<id>.seg                        reserved, being written by a client
//! pool/<n>.seg                            recycled and pre-faulted segments, pages kept for reuse
//! ns/<namespace>/<step:020>/rank-RRRRR-of-WWWWW.safetensors
//! ns/<namespace>/<step:020>/rank-RRRRR-of-WWWWW.manifest.json   (commit point)
//! ```
//! A shard is visible once its manifest exists; the index is rebuilt from the
//! directory at open. Data files without a manifest were sealed by a client
//! but not yet checksummed when the daemon stopped: they are sealed again at
//! open. Pending segments belonged to writers that never sealed: they are
//! reclaimed.
//!
//! The code is split by concern: `index` (what the tier holds), `recover`
//! (rebuilding the index at open), `seal` (reservations and seals),
//! `retention` (retention, eviction, deletion), `pool` (recycled and
//! pre-faulted segments, and the filler that faults them in),
//! `read` (locating, mapping, leases, summaries) and `tier_impl` (the
//! [`Tier`] implementation).

mod index;
mod pool;
mod read;
mod recover;
mod retention;
mod seal;
mod sigbus;
mod tier_impl;

pub use pool::PoolFiller;
pub use read::LeasedMap;
pub use seal::{Reservation, ReservationGuard, ReserveOptions, SealJob};
pub use sigbus::{tolerate_truncated_files, truncated_pages_read};

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use tierckpt_format::ShardKey;

use self::index::State;
use crate::private_fs::Access;
#[cfg(doc)]
use crate::Tier;
use crate::{Result, TierError};

/// Settings of a memory tier.
#[derive(Debug, Clone)]
pub struct MemoryTierConfig {
    /// The tmpfs directory that holds the shards.
    pub root: PathBuf,
    /// Bytes the tier may hold, pooled segments included.
    pub capacity: u64,
    /// Complete steps kept per namespace (at least 1).
    pub keep_last: usize,
    /// Recycled segments kept for reuse.
    pub max_pooled_segments: usize,
    /// Who may read the files: this user alone, or also a group.
    pub access: Access,
    /// Share of `capacity` that [`MemoryTier::start_filler`] keeps faulted
    /// in as free pooled segments (0: no filler work).
    pub prefault_share: f64,
    /// Steps pinned at open, by namespace (see [`MemoryTier::pin`]):
    /// retention at open keeps them.
    pub pinned: std::collections::BTreeMap<String, std::collections::BTreeSet<u64>>,
}

impl MemoryTierConfig {
    /// Settings for a tier at `root` holding up to `capacity` bytes, keeping
    /// the last 3 complete steps and up to 32 recycled segments, with no
    /// pre-faulted share.
    pub fn new(root: impl Into<PathBuf>, capacity: u64) -> Self {
        Self {
            root: root.into(),
            capacity,
            keep_last: 3,
            max_pooled_segments: 32,
            access: Access::default(),
            prefault_share: 0.0,
            pinned: Default::default(),
        }
    }
}

/// The memory tier. Cheap operations take one mutex; checksumming happens in
/// [`MemoryTier::finish_seal`] without it.
pub struct MemoryTier {
    cfg: MemoryTierConfig,
    state: Mutex<State>,
    changed: Condvar,
    /// Wakes the filler: the pool may have been drawn down.
    fill_wake: Condvar,
    _lock: File,
}

impl std::fmt::Debug for MemoryTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTier").field("root", &self.cfg.root).finish()
    }
}

/// File name, without extension, of the shard of `rank` in a step of `world_size` ranks.
fn shard_file_stem(rank: u32, world_size: u32) -> String {
    format!("rank-{rank:05}-of-{world_size:05}")
}

/// Maps an I/O error to a [`TierError`] that names the operation and the path.
fn io_err(context: impl std::fmt::Display, path: &Path) -> impl FnOnce(std::io::Error) -> TierError {
    let context = format!("{context} {}", path.display());
    move |e| TierError::io(context, e)
}

impl MemoryTier {
    /// Opens (creating if needed) the tier at `cfg.root` and rebuilds its index.
    pub fn open(cfg: MemoryTierConfig) -> Result<Self> {
        if cfg.keep_last == 0 {
            return Err(TierError::InvalidArgument("keep_last must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&cfg.prefault_share) {
            return Err(TierError::InvalidArgument(format!(
                "prefault_share must lie between 0 and 1, not {}",
                cfg.prefault_share
            )));
        }
        crate::private_fs::prepare_dir(&cfg.root, cfg.access)?;
        for d in ["pending", "pool", "ns"] {
            crate::private_fs::prepare_subdir(&cfg.root.join(d), cfg.access)?;
        }
        let lock_path = cfg.root.join(".lock");
        let lock = cfg
            .access
            .create_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        // SAFETY: flock reads no memory of ours; `lock` is an open descriptor
        // for the whole call (and for the tier's life, which holds the lock).
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(TierError::Unavailable(format!(
                "another daemon holds {}; stop it or choose another memory directory",
                lock_path.display()
            )));
        }
        let mut state = State::default();
        for (ns, steps) in &cfg.pinned {
            state.pinned.entry(ns.clone()).or_default().kept.extend(steps);
        }
        let tier =
            Self { cfg, state: Mutex::new(state), changed: Condvar::new(), fill_wake: Condvar::new(), _lock: lock };
        tier.recover()?;
        Ok(tier)
    }

    /// The settings the tier was opened with.
    pub fn config(&self) -> &MemoryTierConfig {
        &self.cfg
    }

    /// Locks the index; a panic of another holder does not poison it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Directory of a step's shards.
    fn step_dir(&self, ns: &str, step: u64) -> PathBuf {
        self.cfg.root.join("ns").join(ns).join(format!("{step:020}"))
    }

    /// Where the bytes of a shard lie once sealed.
    fn data_path(&self, key: &ShardKey, world_size: u32) -> PathBuf {
        self.step_dir(&key.namespace, key.step).join(format!("{}.safetensors", shard_file_stem(key.rank, world_size)))
    }

    /// Where the manifest of a shard lies once published.
    fn manifest_path(&self, key: &ShardKey, world_size: u32) -> PathBuf {
        self.step_dir(&key.namespace, key.step).join(format!("{}.manifest.json", shard_file_stem(key.rank, world_size)))
    }
}
