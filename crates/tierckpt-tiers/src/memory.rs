//! The memory tier: shards as files in a tmpfs directory, so they outlive the
//! training process and a restart of the daemon.
//!
//! Layout under `root`:
//! ```text
//! .lock                                   one daemon per directory (flock)
//! pending/<id>.seg                        reserved, being written by a client
//! pool/<n>.seg                            recycled segments, pages kept for reuse
//! ns/<namespace>/<step:020>/rank-RRRRR-of-WWWWW.safetensors
//! ns/<namespace>/<step:020>/rank-RRRRR-of-WWWWW.manifest.json   (commit point)
//! ```
//! A shard is visible once its manifest exists; the index is rebuilt from the
//! directory at open. Data files without a manifest were sealed by a client
//! but not yet checksummed when the daemon stopped: they are sealed again at
//! open. Pending segments belonged to writers that never sealed: they are
//! reclaimed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tierckpt_format::names::{validate_namespace, validate_rank};
use tierckpt_format::{parse_shard, verify_chunks, Manifest, ShardKey};

use crate::{now_unix_ms, Result, ShardBytes, StepSummary, Tier, TierError};
use tierckpt_proto::{MemoryUsage, NamespaceSummary};

/// Settings of a memory tier.
#[derive(Debug, Clone)]
pub struct MemoryTierConfig {
    pub root: PathBuf,
    /// Bytes the tier may hold, pooled segments included.
    pub capacity: u64,
    /// Complete steps kept per namespace (at least 1).
    pub keep_last: usize,
    /// Recycled segments kept for reuse.
    pub max_pooled_segments: usize,
}

impl MemoryTierConfig {
    pub fn new(root: impl Into<PathBuf>, capacity: u64) -> Self {
        Self { root: root.into(), capacity, keep_last: 3, max_pooled_segments: 32 }
    }
}

/// A segment handed to a writer.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub id: u64,
    pub key: ShardKey,
    pub world_size: u32,
    pub path: PathBuf,
    pub len: u64,
}

/// A sealed segment waiting for its checksums (see [`MemoryTier::finish_seal`]).
#[derive(Debug)]
pub struct SealJob {
    key: ShardKey,
    world_size: u32,
    path: PathBuf,
    len: u64,
}

impl SealJob {
    pub fn key(&self) -> &ShardKey {
        &self.key
    }
}

#[derive(Debug)]
enum Shard {
    Sealing { len: u64 },
    Sealed { manifest: Arc<Manifest> },
}

impl Shard {
    fn len(&self) -> u64 {
        match self {
            Shard::Sealing { len } => *len,
            Shard::Sealed { manifest } => manifest.file_len,
        }
    }
}

#[derive(Debug)]
struct Step {
    world_size: u32,
    shards: BTreeMap<u32, Shard>,
    reserved: BTreeSet<u32>,
}

impl Step {
    fn sealed(&self) -> impl Iterator<Item = (&u32, &Arc<Manifest>)> {
        self.shards.iter().filter_map(|(r, s)| match s {
            Shard::Sealed { manifest } => Some((r, manifest)),
            Shard::Sealing { .. } => None,
        })
    }
    fn complete(&self) -> bool {
        self.sealed().count() == self.world_size as usize
    }
    fn busy(&self) -> bool {
        !self.reserved.is_empty() || self.shards.values().any(|s| matches!(s, Shard::Sealing { .. }))
    }
    fn bytes(&self) -> u64 {
        self.shards.values().map(Shard::len).sum()
    }
    fn summary(&self, step: u64) -> StepSummary {
        let ranks: Vec<u32> = self.sealed().map(|(r, _)| *r).collect();
        let mut in_progress: Vec<u32> = self
            .shards
            .iter()
            .filter(|(_, s)| matches!(s, Shard::Sealing { .. }))
            .map(|(r, _)| *r)
            .chain(self.reserved.iter().copied())
            .collect();
        in_progress.sort_unstable();
        StepSummary {
            step,
            world_size: self.world_size,
            complete: ranks.len() == self.world_size as usize,
            ranks,
            in_progress,
            bytes: self.bytes(),
            created_unix_ms: self.sealed().map(|(_, m)| m.created_unix_ms).max().unwrap_or(0),
        }
    }
}

#[derive(Debug)]
struct Pooled {
    path: PathBuf,
    len: u64,
}

#[derive(Debug, Default)]
struct State {
    steps: BTreeMap<(String, u64), Step>,
    reservations: HashMap<u64, Reservation>,
    failed: HashMap<ShardKey, String>,
    pool: Vec<Pooled>,
    next_id: u64,
    used: u64,
    /// Steps known to be complete across a cluster (every rank held by some
    /// live node), though this node holds only some ranks of them.
    known_complete: HashMap<String, BTreeSet<u64>>,
    /// Shards mapped by readers: when dropped they are unlinked, never
    /// recycled, so what a reader maps never changes under it.
    leases: HashMap<ShardKey, usize>,
}

impl State {
    /// Complete here, or known complete across the cluster.
    fn settled(&self, ns: &str, step: u64, s: &Step) -> bool {
        s.complete() || self.known_complete.get(ns).is_some_and(|set| set.contains(&step))
    }
}

/// Files to remove once the index lock is released (unlinking a large tmpfs
/// file frees its pages, which takes a while).
#[must_use]
struct Unlinks(Vec<PathBuf>);

impl Unlinks {
    fn run(self) {
        for p in self.0 {
            if let Err(e) = fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "could not remove segment");
                }
            }
        }
    }
}

/// The memory tier. Cheap operations take one mutex; checksumming happens in
/// [`MemoryTier::finish_seal`] without it.
pub struct MemoryTier {
    cfg: MemoryTierConfig,
    state: Mutex<State>,
    changed: Condvar,
    _lock: File,
}

impl std::fmt::Debug for MemoryTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTier").field("root", &self.cfg.root).finish()
    }
}

fn shard_file_stem(rank: u32, world_size: u32) -> String {
    format!("rank-{rank:05}-of-{world_size:05}")
}

fn parse_shard_file_stem(stem: &str) -> Option<(u32, u32)> {
    let rest = stem.strip_prefix("rank-")?;
    let (r, w) = rest.split_once("-of-")?;
    Some((r.parse().ok()?, w.parse().ok()?))
}

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
        for d in ["pending", "pool", "ns"] {
            let p = cfg.root.join(d);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        let lock_path = cfg.root.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        // SAFETY: flock on an open descriptor.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(TierError::Unavailable(format!(
                "another daemon holds {}; stop it or choose another memory directory",
                lock_path.display()
            )));
        }
        let tier = Self { cfg, state: Mutex::new(State::default()), changed: Condvar::new(), _lock: lock };
        tier.recover()?;
        Ok(tier)
    }

    pub fn config(&self) -> &MemoryTierConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn step_dir(&self, ns: &str, step: u64) -> PathBuf {
        self.cfg.root.join("ns").join(ns).join(format!("{step:020}"))
    }

    fn data_path(&self, key: &ShardKey, world_size: u32) -> PathBuf {
        self.step_dir(&key.namespace, key.step).join(format!("{}.safetensors", shard_file_stem(key.rank, world_size)))
    }

    fn manifest_path(&self, key: &ShardKey, world_size: u32) -> PathBuf {
        self.step_dir(&key.namespace, key.step).join(format!("{}.manifest.json", shard_file_stem(key.rank, world_size)))
    }

    fn recover(&self) -> Result<()> {
        let mut st = self.lock();
        let mut unlinks = Vec::new();
        for dir in ["pool", "pending"] {
            let p = self.cfg.root.join(dir);
            for e in fs::read_dir(&p).map_err(io_err("listing", &p))? {
                let e = e.map_err(io_err("listing", &p))?;
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                self.pool_file(&mut st, e.path(), len, &mut unlinks);
            }
        }
        let mut reseal = Vec::new();
        let ns_root = self.cfg.root.join("ns");
        for ns_entry in fs::read_dir(&ns_root).map_err(io_err("listing", &ns_root))? {
            let ns_entry = ns_entry.map_err(io_err("listing", &ns_root))?;
            let ns = ns_entry.file_name().to_string_lossy().into_owned();
            if validate_namespace(&ns).is_err() {
                tracing::warn!(dir = %ns_entry.path().display(), "ignoring a directory that is not a namespace");
                continue;
            }
            for step_entry in fs::read_dir(ns_entry.path()).map_err(io_err("listing", &ns_entry.path()))? {
                let step_entry = step_entry.map_err(io_err("listing", &ns_root))?;
                let Some(step) = step_entry.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
                    tracing::warn!(dir = %step_entry.path().display(), "ignoring a directory that is not a step");
                    continue;
                };
                self.recover_step(&mut st, &ns, step, &step_entry.path(), &mut reseal, &mut unlinks)?;
            }
        }
        st.used = st.steps.values().map(Step::bytes).sum::<u64>() + st.pool.iter().map(|p| p.len).sum::<u64>();
        drop(st);
        Unlinks(unlinks).run();
        for job in reseal {
            let key = job.key.clone();
            match self.finish_seal(job) {
                Ok(_) => tracing::info!(shard = %key, "sealed a shard left unchecksummed by the last daemon"),
                Err(e) => tracing::warn!(shard = %key, error = %e, "dropped an unsealable shard"),
            }
        }
        let namespaces: BTreeSet<String> = self.lock().steps.keys().map(|(n, _)| n.clone()).collect();
        for ns in namespaces {
            self.retain(&ns);
        }
        let st = self.lock();
        if st.used > self.cfg.capacity {
            tracing::warn!(used = st.used, capacity = self.cfg.capacity, "memory tier holds more than its capacity");
        }
        Ok(())
    }

    fn recover_step(
        &self,
        st: &mut State,
        ns: &str,
        step: u64,
        dir: &Path,
        reseal: &mut Vec<SealJob>,
        unlinks: &mut Vec<PathBuf>,
    ) -> Result<()> {
        for f in fs::read_dir(dir).map_err(io_err("listing", dir))? {
            let path = f.map_err(io_err("listing", dir))?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                unlinks.push(path);
                continue;
            }
            let Some(stem) = name.strip_suffix(".safetensors") else {
                continue;
            };
            let Some((rank, world_size)) = parse_shard_file_stem(stem) else {
                tracing::warn!(file = %path.display(), "ignoring an unknown file");
                continue;
            };
            let key = ShardKey::new(ns, step, rank);
            if validate_rank(rank, world_size).is_err() {
                unlinks.push(path);
                continue;
            }
            let len = fs::metadata(&path).map_err(io_err("reading", &path))?.len();
            let mpath = path.with_file_name(format!("{stem}.manifest.json"));
            let manifest = fs::read(&mpath)
                .ok()
                .and_then(|b| Manifest::from_json(&b, &mpath.display().to_string()).ok())
                .filter(|m| m.key == key && m.world_size == world_size && m.file_len == len);
            let entry = st.steps.entry((ns.to_string(), step)).or_insert_with(|| Step {
                world_size,
                shards: BTreeMap::new(),
                reserved: BTreeSet::new(),
            });
            if entry.world_size != world_size {
                tracing::warn!(file = %path.display(), "dropping a shard whose world_size disagrees with its step");
                unlinks.push(path);
                continue;
            }
            match manifest {
                Some(m) => {
                    entry.shards.insert(rank, Shard::Sealed { manifest: Arc::new(m) });
                }
                None => {
                    let _ = fs::remove_file(&mpath);
                    entry.shards.insert(rank, Shard::Sealing { len });
                    reseal.push(SealJob { key, world_size, path, len });
                }
            }
        }
        Ok(())
    }

    fn free(&self, st: &State) -> u64 {
        self.cfg.capacity.saturating_sub(st.used)
    }

    /// Adds a file to the pool, or marks it for removal if the pool is full.
    fn pool_file(&self, st: &mut State, path: PathBuf, len: u64, unlinks: &mut Vec<PathBuf>) {
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
    fn pool_fit(st: &State, len: u64) -> Option<usize> {
        let slack = (len / 16).max(1 << 20);
        st.pool
            .iter()
            .enumerate()
            .filter(|(_, p)| p.len >= len && p.len - len <= slack)
            .min_by_key(|(_, p)| p.len)
            .map(|(i, _)| i)
    }

    /// The step to evict under memory pressure, if any may go: first
    /// incomplete steps older than their namespace's newest complete step,
    /// then complete steps other than the newest, oldest first. Steps being
    /// written and incomplete steps newer than the newest complete are kept.
    fn victim(st: &State) -> Option<(String, u64)> {
        let mut newest_complete: HashMap<&str, u64> = HashMap::new();
        for ((ns, step), s) in &st.steps {
            if st.settled(ns, *step, s) {
                newest_complete.insert(ns, *step);
            }
        }
        let evictable = st
            .steps
            .iter()
            .filter(|((ns, step), s)| !s.busy() && newest_complete.get(ns.as_str()).is_some_and(|&n| *step < n));
        let mut best: Option<(bool, u64, &(String, u64))> = None;
        for (k, s) in evictable {
            let rank = (st.settled(&k.0, k.1, s), s.summary(k.1).created_unix_ms, k);
            if best.as_ref().is_none_or(|b| (rank.0, rank.1) < (b.0, b.1)) {
                best = Some(rank);
            }
        }
        best.map(|b| b.2.clone())
    }

    /// Removes a step from the index; its files go to the pool.
    fn drop_step(&self, st: &mut State, ns: &str, step: u64, unlinks: &mut Vec<PathBuf>) -> (u64, u64) {
        let Some(s) = st.steps.remove(&(ns.to_string(), step)) else {
            return (0, 0);
        };
        let (mut n, mut bytes) = (0, 0);
        for (rank, shard) in s.shards {
            let key = ShardKey::new(ns, step, rank);
            let len = shard.len();
            let _ = fs::remove_file(self.manifest_path(&key, s.world_size));
            if st.leases.contains_key(&key) {
                unlinks.push(self.data_path(&key, s.world_size));
                st.used = st.used.saturating_sub(len);
            } else {
                self.pool_file(st, self.data_path(&key, s.world_size), len, unlinks);
            }
            n += 1;
            bytes += len;
        }
        let _ = fs::remove_dir(self.step_dir(ns, step));
        tracing::debug!(namespace = ns, step, shards = n, "dropped step");
        (n, bytes)
    }

    /// Asks for a segment of `len` bytes for `key`.
    pub fn reserve(&self, key: &ShardKey, world_size: u32, len: u64) -> Result<Reservation> {
        validate_namespace(&key.namespace)?;
        validate_rank(key.rank, world_size)?;
        let mut unlinks = Vec::new();
        let result = self.reserve_locked(key, world_size, len, &mut unlinks);
        Unlinks(unlinks).run();
        result
    }

    fn reserve_locked(
        &self,
        key: &ShardKey,
        world_size: u32,
        len: u64,
        unlinks: &mut Vec<PathBuf>,
    ) -> Result<Reservation> {
        let mut st = self.lock();
        if let Some(s) = st.steps.get(&(key.namespace.clone(), key.step)) {
            if s.world_size != world_size {
                return Err(TierError::InvalidArgument(format!(
                    "{}/step {} was started with world_size {}, not {world_size}",
                    key.namespace, key.step, s.world_size
                )));
            }
            if s.shards.contains_key(&key.rank) || s.reserved.contains(&key.rank) {
                return Err(TierError::AlreadyExists(format!(
                    "shard {key} is already written or being written; a step is written once (delete it first to replace it)"
                )));
            }
        }
        if len > self.cfg.capacity {
            return Err(self.capacity_error(&st, len, ""));
        }
        let id = st.next_id;
        st.next_id += 1;
        let path = self.cfg.root.join("pending").join(format!("{id}.seg"));
        loop {
            if let Some(i) = Self::pool_fit(&st, len) {
                let p = st.pool.swap_remove(i);
                fs::rename(&p.path, &path).map_err(io_err("reusing", &p.path))?;
                let f = OpenOptions::new().write(true).open(&path).map_err(io_err("opening", &path))?;
                f.set_len(len).map_err(io_err("resizing", &path))?;
                st.used = st.used - p.len + len;
                break;
            }
            if self.free(&st) >= len {
                let f = File::create(&path).map_err(io_err("creating", &path))?;
                f.set_len(len).map_err(io_err("sizing", &path))?;
                st.used += len;
                break;
            }
            if let Some(i) = (0..st.pool.len()).max_by_key(|&i| st.pool[i].len) {
                let p = st.pool.swap_remove(i);
                st.used -= p.len;
                unlinks.push(p.path);
                continue;
            }
            match Self::victim(&st) {
                Some((ns, step)) => {
                    tracing::info!(namespace = %ns, step, "evicting under memory pressure");
                    self.drop_step(&mut st, &ns, step, unlinks);
                }
                None => return Err(self.capacity_error(&st, len, "; nothing else may be evicted (the newest complete step of each namespace and steps being written are kept)")),
            }
        }
        let step = st.steps.entry((key.namespace.clone(), key.step)).or_insert_with(|| Step {
            world_size,
            shards: BTreeMap::new(),
            reserved: BTreeSet::new(),
        });
        step.reserved.insert(key.rank);
        st.failed.remove(key);
        let r = Reservation { id, key: key.clone(), world_size, path, len };
        st.reservations.insert(id, r.clone());
        Ok(r)
    }

    fn capacity_error(&self, st: &State, requested: u64, detail: &str) -> TierError {
        TierError::CapacityExceeded {
            requested,
            free: self.free(st),
            capacity: self.cfg.capacity,
            detail: detail.to_string(),
        }
    }

    fn take_reservation(&self, st: &mut State, id: u64) -> Result<Reservation> {
        let r = st.reservations.remove(&id).ok_or_else(|| {
            TierError::NotFound(format!(
                "reservation {id} (it was sealed, aborted, or belongs to a client that went away)"
            ))
        })?;
        if let Some(s) = st.steps.get_mut(&(r.key.namespace.clone(), r.key.step)) {
            s.reserved.remove(&r.key.rank);
        }
        Ok(r)
    }

    fn remove_step_if_empty(st: &mut State, ns: &str, step: u64) {
        let k = (ns.to_string(), step);
        if st.steps.get(&k).is_some_and(|s| s.shards.is_empty() && s.reserved.is_empty()) {
            st.steps.remove(&k);
        }
    }

    /// Gives a reservation back; its segment is recycled.
    pub fn abort(&self, id: u64) -> Result<()> {
        let mut unlinks = Vec::new();
        {
            let mut st = self.lock();
            let r = self.take_reservation(&mut st, id)?;
            Self::remove_step_if_empty(&mut st, &r.key.namespace, r.key.step);
            self.pool_file(&mut st, r.path, r.len, &mut unlinks);
            tracing::debug!(shard = %r.key, "reservation aborted");
        }
        self.changed.notify_all();
        Unlinks(unlinks).run();
        Ok(())
    }

    /// First half of a seal: the writer is done; the shard is moved into place
    /// and awaits its checksums. Cheap; call [`Self::finish_seal`] off the
    /// writer's path.
    pub fn begin_seal(&self, id: u64) -> Result<SealJob> {
        let mut st = self.lock();
        let r = self.take_reservation(&mut st, id)?;
        let dir = self.step_dir(&r.key.namespace, r.key.step);
        let path = self.data_path(&r.key, r.world_size);
        let moved = fs::create_dir_all(&dir)
            .and_then(|()| fs::rename(&r.path, &path))
            .map_err(io_err("moving a sealed segment to", &path));
        if let Err(e) = moved {
            let mut unlinks = Vec::new();
            self.pool_file(&mut st, r.path, r.len, &mut unlinks);
            Self::remove_step_if_empty(&mut st, &r.key.namespace, r.key.step);
            drop(st);
            Unlinks(unlinks).run();
            return Err(e);
        }
        let step = st.steps.get_mut(&(r.key.namespace.clone(), r.key.step)).expect("reserved step is indexed");
        step.shards.insert(r.key.rank, Shard::Sealing { len: r.len });
        Ok(SealJob { key: r.key, world_size: r.world_size, path, len: r.len })
    }

    /// Second half of a seal: validates the safetensors header, checksums the
    /// bytes and publishes the shard by writing its manifest.
    pub fn finish_seal(&self, job: SealJob) -> Result<Arc<Manifest>> {
        let result = self.checksum(&job);
        self.commit(job, result)
    }

    /// Writes the manifest (the commit point) and updates the index, or on
    /// error drops the sealed segment.
    fn commit(&self, job: SealJob, manifest: Result<Arc<Manifest>>) -> Result<Arc<Manifest>> {
        let result = manifest.and_then(|m| {
            let mpath = self.manifest_path(&job.key, job.world_size);
            let tmp = mpath.with_extension("json.tmp");
            fs::write(&tmp, m.to_json()).and_then(|()| fs::rename(&tmp, &mpath)).map_err(io_err("writing", &mpath))?;
            Ok(m)
        });
        let mut unlinks = Vec::new();
        {
            let mut st = self.lock();
            let k = (job.key.namespace.clone(), job.key.step);
            match &result {
                Ok(m) => {
                    if let Some(s) = st.steps.get_mut(&k) {
                        s.shards.insert(job.key.rank, Shard::Sealed { manifest: m.clone() });
                    }
                    tracing::debug!(shard = %job.key, bytes = job.len, "shard visible");
                }
                Err(e) => {
                    tracing::warn!(shard = %job.key, error = %e, "seal failed; shard dropped");
                    if let Some(s) = st.steps.get_mut(&k) {
                        s.shards.remove(&job.key.rank);
                    }
                    Self::remove_step_if_empty(&mut st, &job.key.namespace, job.key.step);
                    let _ = fs::remove_file(self.manifest_path(&job.key, job.world_size));
                    self.pool_file(&mut st, job.path.clone(), job.len, &mut unlinks);
                    st.failed.insert(job.key.clone(), e.to_string());
                }
            }
        }
        self.changed.notify_all();
        Unlinks(unlinks).run();
        if result.is_ok() {
            self.retain(&job.key.namespace);
        }
        result
    }

    fn checksum(&self, job: &SealJob) -> Result<Arc<Manifest>> {
        let label = job.path.display().to_string();
        let file = File::open(&job.path).map_err(io_err("opening", &job.path))?;
        let actual = file.metadata().map_err(io_err("reading", &job.path))?.len();
        if actual != job.len {
            return Err(
                tierckpt_format::FormatError::Truncated { file: label, expected: job.len, found: actual }.into()
            );
        }
        let bytes = map_file(&file, &job.path)?;
        parse_shard(&bytes, &label)?;
        Ok(Arc::new(Manifest::compute(job.key.clone(), job.world_size, &bytes, now_unix_ms())))
    }

    /// Seals a segment whose bytes the caller has already verified against
    /// `manifest` while receiving them (a replica): checks the length and the
    /// safetensors header, then publishes with that manifest.
    pub fn seal_verified(&self, id: u64, manifest: &Manifest) -> Result<()> {
        let job = self.begin_seal(id)?;
        let expected = Arc::new(manifest.clone());
        let checked = (|| {
            if job.key != manifest.key || job.world_size != manifest.world_size || job.len != manifest.file_len {
                return Err(TierError::InvalidArgument(format!(
                    "manifest of {} does not describe reservation {}",
                    manifest.key, job.key
                )));
            }
            let file = File::open(&job.path).map_err(io_err("opening", &job.path))?;
            // Only the header is read: no need to populate the whole segment.
            parse_shard(&map_file_lazy(&file, &job.path)?, &job.path.display().to_string())?;
            Ok(())
        })();
        self.commit(job, checked.map(|()| expected)).map(|_| ())
    }

    /// Seal in one call (both halves).
    pub fn seal(&self, id: u64) -> Result<Arc<Manifest>> {
        let job = self.begin_seal(id)?;
        self.finish_seal(job)
    }

    /// Waits until no shard of `ns` is being sealed (sealing takes one
    /// checksum pass), so that [`Self::latest`] reflects every seal already
    /// acknowledged to a writer. Gives up quietly after `timeout`.
    pub fn settle(&self, ns: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            let sealing = st
                .steps
                .range((ns.to_string(), 0)..=(ns.to_string(), u64::MAX))
                .any(|(_, s)| s.shards.values().any(|sh| matches!(sh, Shard::Sealing { .. })));
            let now = Instant::now();
            if !sealing || now >= deadline {
                return;
            }
            st = self.changed.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Waits until `key` is visible; fails if its seal failed, if nothing is
    /// reserved or sealing for it, or after `timeout`.
    pub fn wait_visible(&self, key: &ShardKey, timeout: Duration) -> Result<Arc<Manifest>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(msg) = st.failed.get(key) {
                return Err(TierError::Corrupt(tierckpt_format::FormatError::InvalidHeader {
                    file: key.to_string(),
                    reason: format!("seal failed: {msg}"),
                }));
            }
            let step = st.steps.get(&(key.namespace.clone(), key.step));
            match (step.and_then(|s| s.shards.get(&key.rank)), step) {
                (Some(Shard::Sealed { manifest }), _) => return Ok(manifest.clone()),
                (Some(Shard::Sealing { .. }), _) => {}
                (None, Some(s)) if s.reserved.contains(&key.rank) => {}
                _ => return Err(TierError::NotFound(format!("shard {key} in the memory tier"))),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TierError::Unavailable(format!("shard {key} was not visible within {timeout:?}")));
            }
            st = self.changed.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

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

    /// Maps a visible shard read-only, without verifying it.
    pub fn map(&self, key: &ShardKey) -> Result<(Manifest, memmap2::Mmap)> {
        let (path, m) = self.locate(key)?;
        let f = File::open(&path).map_err(io_err("opening", &path))?;
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
        let f = File::open(&path).map_err(io_err("opening", &path))?;
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

    pub fn steps(&self, ns: &str) -> Result<Vec<StepSummary>> {
        validate_namespace(ns)?;
        let st = self.lock();
        Ok(st
            .steps
            .range((ns.to_string(), 0)..=(ns.to_string(), u64::MAX))
            .map(|((_, step), s)| s.summary(*step))
            .collect())
    }

    pub fn namespaces(&self) -> Vec<NamespaceSummary> {
        let st = self.lock();
        let mut out: BTreeMap<&str, NamespaceSummary> = BTreeMap::new();
        for ((ns, step), s) in &st.steps {
            let e = out.entry(ns).or_insert_with(|| NamespaceSummary {
                namespace: ns.clone(),
                steps: 0,
                complete_steps: 0,
                latest_complete: None,
                bytes: 0,
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

    pub fn usage(&self) -> MemoryUsage {
        let st = self.lock();
        let mut u = MemoryUsage {
            capacity: self.cfg.capacity,
            used: st.used,
            pooled: st.pool.iter().map(|p| p.len).sum(),
            reservations: st.reservations.len() as u64,
            keep_last: self.cfg.keep_last,
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

    /// Deletes a step; refused while a rank of it is being written.
    pub fn delete_step(&self, ns: &str, step: u64) -> Result<(u64, u64)> {
        validate_namespace(ns)?;
        let mut unlinks = Vec::new();
        let r = {
            let mut st = self.lock();
            match st.steps.get(&(ns.to_string(), step)) {
                None => return Err(TierError::NotFound(format!("{ns}/step {step} in the memory tier"))),
                Some(s) if s.busy() => {
                    return Err(TierError::InvalidArgument(format!(
                        "{ns}/step {step} is being written; delete it once its writers are done"
                    )))
                }
                Some(_) => self.drop_step(&mut st, ns, step, &mut unlinks),
            }
        };
        Unlinks(unlinks).run();
        Ok(r)
    }

    /// Deletes every idle step of a namespace; steps being written stay.
    pub fn delete_namespace(&self, ns: &str) -> Result<(u64, u64)> {
        let steps: Vec<u64> = self.steps(ns)?.iter().map(|s| s.step).collect();
        if steps.is_empty() {
            return Err(TierError::NotFound(format!("namespace {ns} in the memory tier")));
        }
        let mut total = (0, 0);
        for step in steps {
            if let Ok((n, b)) = self.delete_step(ns, step) {
                total = (total.0 + n, total.1 + b);
            }
        }
        let _ = fs::remove_dir(self.cfg.root.join("ns").join(ns));
        Ok(total)
    }

    /// Verifies one visible shard; if its bytes do not match its manifest,
    /// removes it (its segment is unlinked, never recycled) and returns the
    /// mismatch. `Ok(())` when the copy is sound.
    pub fn quarantine_if_corrupt(&self, key: &ShardKey) -> Result<()> {
        let (m, bytes) = self.map(key)?;
        let Err(bad) = verify_chunks(&bytes, &m, &key.to_string()) else { return Ok(()) };
        drop(bytes);
        let mut unlinks = Vec::new();
        {
            let mut st = self.lock();
            let k = (key.namespace.clone(), key.step);
            if let Some(s) = st.steps.get_mut(&k) {
                let w = s.world_size;
                if let Some(sh) = s.shards.remove(&key.rank) {
                    st.used = st.used.saturating_sub(sh.len());
                    let _ = fs::remove_file(self.manifest_path(key, w));
                    unlinks.push(self.data_path(key, w));
                }
            }
            Self::remove_step_if_empty(&mut st, &key.namespace, key.step);
        }
        Unlinks(unlinks).run();
        tracing::warn!(shard = %key, error = %bad, "dropped a corrupt copy from memory");
        Err(bad.into())
    }

    /// Drops incomplete, idle steps newer than `step`.
    pub fn discard_incomplete_after(&self, ns: &str, step: u64) -> Result<(u64, u64)> {
        validate_namespace(ns)?;
        let mut unlinks = Vec::new();
        let mut total = (0, 0);
        {
            let mut st = self.lock();
            let stale: Vec<u64> = st
                .steps
                .range((ns.to_string(), step.saturating_add(1))..=(ns.to_string(), u64::MAX))
                .filter(|((n, step), s)| !st.settled(n, *step, s) && !s.busy())
                .map(|((_, s), _)| *s)
                .collect();
            for s in stale {
                let (n, b) = self.drop_step(&mut st, ns, s, &mut unlinks);
                total = (total.0 + n, total.1 + b);
            }
        }
        Unlinks(unlinks).run();
        Ok(total)
    }

    /// Tells the tier which steps of `ns` are complete across the cluster
    /// (retention and eviction treat them as complete), then applies retention.
    pub fn set_known_complete(&self, ns: &str, steps: BTreeSet<u64>) {
        self.lock().known_complete.insert(ns.to_string(), steps);
        self.retain(ns);
    }

    /// Keeps the newest `keep_last` complete steps of `ns`; drops older
    /// complete steps and idle incomplete steps older than the oldest kept.
    pub fn retain(&self, ns: &str) {
        let mut unlinks = Vec::new();
        {
            let mut st = self.lock();
            let range = (ns.to_string(), 0)..=(ns.to_string(), u64::MAX);
            let complete: Vec<u64> = st
                .steps
                .range(range.clone())
                .filter(|((n, step), s)| st.settled(n, *step, s))
                .map(|((_, step), _)| *step)
                .collect();
            if complete.len() < self.cfg.keep_last {
                return;
            }
            let oldest_kept = complete[complete.len() - self.cfg.keep_last];
            let doomed: Vec<u64> = st
                .steps
                .range(range)
                .filter(|((_, step), s)| *step < oldest_kept && !s.busy())
                .map(|((_, step), _)| *step)
                .collect();
            for step in doomed {
                self.drop_step(&mut st, ns, step, &mut unlinks);
            }
        }
        Unlinks(unlinks).run();
    }
}

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
fn map_file_lazy(file: &File, path: &Path) -> Result<memmap2::Mmap> {
    // SAFETY: as for `map_file`.
    unsafe { memmap2::MmapOptions::new().map(file) }.map_err(io_err("mapping", path))
}

/// Maps a whole file read-only (an empty file maps to an empty slice).
fn map_file(file: &File, path: &Path) -> Result<memmap2::Mmap> {
    // SAFETY: shard files are only written through reservations; a sealed file
    // is not written again, and readers verify checksums over what they read.
    unsafe { memmap2::MmapOptions::new().populate().map(file) }.map_err(io_err("mapping", path))
}

#[async_trait]
impl Tier for MemoryTier {
    fn name(&self) -> &str {
        "memory"
    }

    async fn put(&self, manifest: &Manifest, data: &[u8]) -> Result<()> {
        manifest.check_len(data.len())?;
        verify_chunks(data, manifest, &manifest.key.to_string())?;
        let r = self.reserve(&manifest.key, manifest.world_size, manifest.file_len)?;
        let written = OpenOptions::new()
            .write(true)
            .open(&r.path)
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
