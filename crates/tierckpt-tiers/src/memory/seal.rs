//! Reservations and seals: a writer reserves a segment, writes it, and seals
//! it; the seal checksums the bytes and publishes the shard.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tierckpt_format::names::{validate_namespace, validate_rank};
use tierckpt_format::{parse_shard, Manifest, ShardKey};

use super::index::{Shard, State, Step};
use super::read::{map_file, map_file_lazy};
use super::{io_err, MemoryTier};
use crate::private_fs::{open_read, open_write};
use crate::{now_unix_ms, Result, TierError};

/// A segment handed to a writer.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// Names the reservation in [`MemoryTier::seal`] and [`MemoryTier::abort`].
    pub id: u64,
    /// The shard being written.
    pub key: ShardKey,
    /// Ranks in the shard's step.
    pub world_size: u32,
    /// The segment file the writer fills.
    pub path: PathBuf,
    /// Size of the segment, the shard's exact length.
    pub len: u64,
}

/// Gives a reservation back when dropped, unless disarmed (the writer went on
/// to seal it): a writer that fails, or whose future is dropped, frees it.
pub struct ReservationGuard<'a> {
    tier: &'a MemoryTier,
    id: Option<u64>,
}

impl<'a> ReservationGuard<'a> {
    /// Guards reservation `id` of `tier`.
    pub fn new(tier: &'a MemoryTier, id: u64) -> Self {
        Self { tier, id: Some(id) }
    }

    /// The reservation is the writer's to seal: no longer given back on drop.
    pub fn disarm(&mut self) {
        self.id = None;
    }
}

impl Drop for ReservationGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let _ = self.tier.abort(id);
        }
    }
}

/// A sealed segment waiting for its checksums (see [`MemoryTier::finish_seal`]).
#[derive(Debug)]
pub struct SealJob {
    pub(super) key: ShardKey,
    pub(super) world_size: u32,
    /// The shard's file, in place in its step directory.
    pub(super) path: PathBuf,
    pub(super) len: u64,
}

impl SealJob {
    /// The shard being sealed.
    pub fn key(&self) -> &ShardKey {
        &self.key
    }
}

/// The error of a seal whose step was deleted while it was written.
fn deleted_while_written(key: &ShardKey) -> TierError {
    TierError::NotFound(format!(
        "{}/step {} was deleted while shard {key} was being written; nothing was stored",
        key.namespace, key.step
    ))
}

/// What a local writer may ask of [`MemoryTier::reserve_with`].
#[derive(Debug, Clone, Default)]
pub struct ReserveOptions {
    /// A segment [`MemoryTier::prepare`] set aside, to serve the
    /// reservation if it is still pooled and large enough.
    pub segment: Option<PathBuf>,
    /// How long to wait, when the reservation does not fit, for seals under
    /// way (which make older steps evictable) before refusing it.
    pub wait_for_seals: Duration,
}

impl MemoryTier {
    /// Asks for a segment of `len` bytes for `key`. A pooled segment (its
    /// pages already allocated) serves it when one is at least as large:
    /// the closest fit, cut down to `len` (the cut, which frees the tail's
    /// pages, runs off the index lock).
    pub fn reserve(&self, key: &ShardKey, world_size: u32, len: u64) -> Result<Reservation> {
        self.reserve_with(key, world_size, len, &ReserveOptions::default())
    }

    /// [`Self::reserve`], with the choices a local writer has.
    pub fn reserve_with(
        &self,
        key: &ShardKey,
        world_size: u32,
        len: u64,
        opts: &ReserveOptions,
    ) -> Result<Reservation> {
        validate_namespace(&key.namespace)?;
        validate_rank(key.rank, world_size)?;
        let mut unlinks = Vec::new();
        let result = self.reserve_locked(key, world_size, len, opts, &mut unlinks);
        let result = result.and_then(|(r, cut)| match cut {
            Some((file, seg_len)) => self.cut_to_size(r, file, seg_len),
            None => Ok(r),
        });
        self.unlink_and_refill(unlinks);
        result
    }

    /// Cuts the pooled segment of `seg_len` bytes that now serves `r` down
    /// to `r.len`; on failure the reservation is dropped.
    fn cut_to_size(&self, r: Reservation, file: fs::File, seg_len: u64) -> Result<Reservation> {
        let cut = file.set_len(r.len).map_err(io_err("resizing", &r.path));
        let mut st = self.lock();
        st.transient -= seg_len - r.len;
        match cut {
            Ok(()) => {
                st.used -= seg_len - r.len;
                Ok(r)
            }
            Err(e) => {
                st.used -= seg_len;
                if self.take_reservation(&mut st, r.id).is_ok() {
                    Self::remove_step_if_empty(&mut st, &r.key.namespace, r.key.step);
                }
                drop(st);
                self.unlink_and_refill(vec![r.path]);
                Err(e)
            }
        }
    }

    /// [`Self::reserve`] under the index lock; files to remove go to
    /// `unlinks`. Returns, besides the reservation, the pooled segment that
    /// serves it and its size when it still has to be cut down.
    fn reserve_locked(
        &self,
        key: &ShardKey,
        world_size: u32,
        len: u64,
        opts: &ReserveOptions,
        unlinks: &mut Vec<PathBuf>,
    ) -> Result<(Reservation, Option<(fs::File, u64)>)> {
        let mut st = self.lock();
        // A segment being faulted in that holds the room this reservation
        // needs is given up (the filler checks between pieces).
        while st.filling && Self::pool_fit(&st, len).is_none() && self.free(&st) < len {
            st.fill_yield = true;
            st = self.changed.wait_timeout(st, Duration::from_secs(1)).unwrap_or_else(|p| p.into_inner()).0;
        }
        // This reservation has the lock until it is done: the filler may go on after it.
        st.fill_yield = false;
        if let Some(s) = st.steps.get(&(key.namespace.clone(), key.step)) {
            if s.deleted {
                return Err(TierError::Unavailable(format!(
                    "{}/step {} is being deleted; write it again once its earlier writers are done",
                    key.namespace, key.step
                )));
            }
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
        // Evict only for a reservation that will then fit: a refusal leaves
        // every step in place. Seals under way make older steps evictable
        // when they finish: a writer that outruns them waits for them.
        let deadline = Instant::now() + opts.wait_for_seals;
        while Self::pool_fit(&st, len).is_none()
            && self.free(&st) + Self::reclaimable(&st) < len
            && st.steps.values().any(Step::sealing)
        {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self.changed.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        if Self::pool_fit(&st, len).is_none() && self.free(&st) + Self::reclaimable(&st) < len {
            return Err(self.capacity_error(&st, len, "; nothing else may be evicted (the newest complete step of each namespace and steps being written are kept)"));
        }
        let id = st.next_id;
        st.next_id += 1;
        let path = self.cfg.root.join("pending").join(format!("{id}.seg"));
        let mut cut = None;
        loop {
            let segment = opts.segment.as_deref();
            let prepared = segment.and_then(|seg| st.pool.iter().position(|p| p.path == seg && p.len >= len));
            // Another client's prepared segment only when no fresh file fits.
            let room = self.free(&st) >= len;
            let fit = prepared.or_else(|| Self::pool_fit(&st, len)).filter(|&i| {
                let p = &st.pool[i];
                (Self::worth_cutting(p.len, len) || !room) && (prepared == Some(i) || !p.promised || !room)
            });
            if let Some(i) = fit {
                let p = st.pool.swap_remove(i);
                fs::rename(&p.path, &path).map_err(io_err("reusing", &p.path))?;
                let f = open_write(&path).map_err(io_err("opening", &path))?;
                // A file truncated behind the daemon would fault its writer's
                // mapping (SIGBUS): give it its length back.
                if f.metadata().map_err(io_err("reading the size of", &path))?.len() < len {
                    tracing::warn!(path = %path.display(), "a pooled segment was shorter than recorded; resized");
                    f.set_len(len).map_err(io_err("resizing", &path))?;
                }
                if p.len > len {
                    // Still held until cut: counted as transient meanwhile.
                    st.transient += p.len - len;
                    cut = Some((f, p.len));
                }
                st.from_pool += 1;
                break;
            }
            // No pooled segment is large enough: grow the largest one of at
            // least half the size, so that only its tail is faulted in.
            if let Some(i) = Self::pool_grow(&st, len).filter(|&i| self.free(&st) >= len - st.pool[i].len) {
                let p = st.pool.swap_remove(i);
                fs::rename(&p.path, &path).map_err(io_err("reusing", &p.path))?;
                let f = open_write(&path).map_err(io_err("opening", &path))?;
                f.set_len(len).map_err(io_err("growing", &path))?;
                st.used += len - p.len;
                st.from_pool += 1;
                break;
            }
            if self.free(&st) >= len {
                let access = self.cfg.access;
                let f = access
                    .create_options()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(io_err("creating", &path))?;
                access.own_file(&f).map_err(io_err("giving a group to", &path))?;
                access.set_segment_mode(&path, false).map_err(io_err("opening to the group", &path))?;
                f.set_len(len).map_err(io_err("sizing", &path))?;
                st.used += len;
                st.fresh += 1;
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
        Self::note_size(&mut st, len);
        let step = st.steps.entry((key.namespace.clone(), key.step)).or_insert_with(|| Step::new(world_size));
        step.reserved.insert(key.rank);
        st.failed.remove(key);
        let r = Reservation { id, key: key.clone(), world_size, path, len };
        st.reservations.insert(id, r.clone());
        Ok((r, cut))
    }

    /// The error for a reservation of `requested` bytes that does not fit.
    fn capacity_error(&self, st: &State, requested: u64, detail: &str) -> TierError {
        TierError::CapacityExceeded {
            requested,
            free: self.free(st),
            capacity: self.cfg.capacity,
            detail: detail.to_string(),
        }
    }

    /// Removes reservation `id` from the index.
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
        self.unlink_and_refill(unlinks);
        Ok(())
    }

    /// First half of a seal: the writer is done; the shard is moved into place
    /// and awaits its checksums. Cheap; call [`Self::finish_seal`] off the
    /// writer's path.
    pub fn begin_seal(&self, id: u64) -> Result<SealJob> {
        let mut st = self.lock();
        let r = self.take_reservation(&mut st, id)?;
        if st.steps.get(&(r.key.namespace.clone(), r.key.step)).is_some_and(|s| s.deleted) {
            let mut unlinks = Vec::new();
            self.pool_file(&mut st, r.path, r.len, &mut unlinks);
            Self::remove_step_if_empty(&mut st, &r.key.namespace, r.key.step);
            drop(st);
            self.unlink_and_refill(unlinks);
            return Err(deleted_while_written(&r.key));
        }
        let dir = self.step_dir(&r.key.namespace, r.key.step);
        let path = self.data_path(&r.key, r.world_size);
        let moved = self
            .cfg
            .access
            .create_dir_all(&dir)
            .and_then(|()| fs::rename(&r.path, &path))
            .and_then(|()| self.cfg.access.set_segment_mode(&path, true))
            .map_err(io_err("moving a sealed segment to", &path));
        if let Err(e) = moved {
            let mut unlinks = Vec::new();
            self.pool_file(&mut st, r.path, r.len, &mut unlinks);
            Self::remove_step_if_empty(&mut st, &r.key.namespace, r.key.step);
            drop(st);
            self.unlink_and_refill(unlinks);
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
            self.cfg.access.write_atomically(&mpath, &m.to_json()).map_err(io_err("writing", &mpath))?;
            Ok(m)
        });
        let mut unlinks = Vec::new();
        let result = {
            let mut st = self.lock();
            let k = (job.key.namespace.clone(), job.key.step);
            // A step deleted while this shard was checksummed drops it.
            let result = match result {
                Ok(_) if st.steps.get(&k).is_none_or(|s| s.deleted) => Err(deleted_while_written(&job.key)),
                r => r,
            };
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
            result
        };
        self.changed.notify_all();
        self.unlink_and_refill(unlinks);
        if result.is_ok() {
            self.retain(&job.key.namespace);
        }
        result
    }

    /// Checks the length and the safetensors header of a sealed segment and
    /// computes its manifest.
    fn checksum(&self, job: &SealJob) -> Result<Arc<Manifest>> {
        let label = job.path.display().to_string();
        let file = open_read(&job.path).map_err(io_err("opening", &job.path))?;
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
            let file = open_read(&job.path).map_err(io_err("opening", &job.path))?;
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
}
