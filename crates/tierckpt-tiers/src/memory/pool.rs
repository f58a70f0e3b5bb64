//! The segment pool: free segment files whose tmpfs pages are already
//! allocated, so that a reservation served from one pays no page faults.
//! They come from dropped shards (recycled) and from the filler (pre-faulted):
//! a background thread that keeps up to `prefault_share` of the capacity
//! faulted in, sized after the latest reservations. Also the unlinks done off
//! the index lock.
//!
//! Invariants: every pooled byte, and the segment the filler is faulting in,
//! counts in `used`, so capacity is never exceeded; the filler fills only
//! free capacity, never faults while holding the index lock, gives its
//! segment up as soon as a reservation needs the room, and pauses while any
//! reservation is being written (it would compete with the copy a trainer
//! is blocked on).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::index::{Shard, State};
use super::{io_err, MemoryTier};
use crate::{Result, TierError};

/// How often the filler looks again while a reservation is being written.
const WRITER_POLL: Duration = Duration::from_millis(20);

/// A free segment in the pool.
#[derive(Debug)]
pub(super) struct Pooled {
    /// Its file under `pool/`.
    pub(super) path: PathBuf,
    /// Its size in bytes.
    pub(super) len: u64,
    /// Made by the filler (otherwise recycled from a dropped shard).
    pub(super) prefaulted: bool,
    /// Set aside by `prepare` for a client's coming reservation: others get
    /// it only when nothing else fits.
    pub(super) promised: bool,
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

/// The filler faults a segment in by pieces of this size, checking between
/// them whether it is to give up (a reservation needs the room, or shutdown).
const FILL_PIECE: u64 = 32 << 20;

/// Sizes of the latest reservations that the filler makes segments for.
const RECENT_SIZES: usize = 16;

/// Smallest segment the filler makes when it has nothing to go by.
const MIN_DEFAULT_SEGMENT: u64 = 1 << 20;

/// A pooled segment wasting more than this many times the reservation's
/// size (plus 1 MiB) is cut down only when there is no room for a fresh file:
/// freeing the tail costs about a twentieth of faulting as much, so beyond
/// this a fresh file of the right size is cheaper.
const MAX_WASTE_FACTOR: u64 = 8;

/// The background thread that keeps the pool filled (see
/// [`MemoryTier::start_filler`]); stops, promptly, when dropped.
pub struct PoolFiller {
    tier: Arc<MemoryTier>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PoolFiller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolFiller").field("root", &self.tier.cfg.root).finish()
    }
}

impl Drop for PoolFiller {
    fn drop(&mut self) {
        self.tier.lock().fill_stop = true;
        self.tier.fill_wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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
        match fs::rename(&path, &target).and_then(|()| self.cfg.access.set_segment_mode(&target, false)) {
            Ok(()) => st.pool.push(Pooled { path: target, len, prefaulted: false, promised: false }),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not recycle a segment");
                unlinks.push(path);
                st.used = st.used.saturating_sub(len);
            }
        }
    }

    /// Index of the smallest pooled segment of at least `len` bytes, one
    /// not set aside for another client if there is one.
    pub(super) fn pool_fit(st: &State, len: u64) -> Option<usize> {
        st.pool
            .iter()
            .enumerate()
            .filter(|(_, p)| p.len >= len)
            .min_by_key(|(_, p)| (p.promised, p.len))
            .map(|(i, _)| i)
    }

    /// Index of the largest pooled segment smaller than `len` but at least
    /// half of it, not set aside: worth growing to `len` when none is large
    /// enough.
    pub(super) fn pool_grow(st: &State, len: u64) -> Option<usize> {
        st.pool
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.promised && p.len < len && p.len >= len / 2)
            .max_by_key(|(_, p)| p.len)
            .map(|(i, _)| i)
    }

    /// Whether a pooled segment of `seg` bytes is worth cutting down to `len`
    /// rather than creating a fresh file (when there is room for one).
    pub(super) fn worth_cutting(seg: u64, len: u64) -> bool {
        seg - len <= len.saturating_mul(MAX_WASTE_FACTOR) + (1 << 20)
    }

    /// Remembers the size of a reservation, for the filler.
    pub(super) fn note_size(st: &mut State, len: u64) {
        st.recent_sizes.push_front(len);
        st.recent_sizes.truncate(RECENT_SIZES);
    }

    /// Sets a free segment of at least `len` bytes aside for a coming
    /// reservation of that size, so that the client can map and fault it in
    /// ahead of its save (`Reserve` then names it): the closest pooled fit
    /// not set aside already, else a new pool file if there is room. It
    /// stays pooled (counted in `used`, taken last by other reservations,
    /// reclaimed like any pooled segment). Returns its file and length.
    pub fn prepare(&self, len: u64) -> Result<(PathBuf, u64)> {
        let mut st = self.lock();
        Self::note_size(&mut st, len);
        let fit = st
            .pool
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.promised && p.len >= len && Self::worth_cutting(p.len, len))
            .min_by_key(|(_, p)| p.len)
            .map(|(i, _)| i);
        if let Some(i) = fit {
            st.pool[i].promised = true;
            return Ok((st.pool[i].path.clone(), st.pool[i].len));
        }
        if self.free(&st) < len || st.pool.len() >= self.cfg.max_pooled_segments {
            return Err(TierError::CapacityExceeded {
                requested: len,
                free: self.free(&st),
                capacity: self.cfg.capacity,
                detail: "; no free segment to set aside (a hint only: the save itself may still evict)".into(),
            });
        }
        let path = self.cfg.root.join("pool").join(format!("{}.seg", st.next_id));
        st.next_id += 1;
        let access = self.cfg.access;
        let f = access.create_options().write(true).create_new(true).open(&path).map_err(io_err("creating", &path))?;
        access.own_file(&f).map_err(io_err("giving a group to", &path))?;
        access.set_segment_mode(&path, false).map_err(io_err("opening to the group", &path))?;
        if let Err(e) = f.set_len(len) {
            drop(f);
            let _ = fs::remove_file(&path);
            return Err(io_err("sizing", &path)(e));
        }
        st.used += len;
        st.pool.push(Pooled { path: path.clone(), len, prefaulted: false, promised: true });
        Ok((path, len))
    }

    /// Runs the unlinks (off the index lock) and wakes the filler: the pool
    /// or the free capacity changed.
    pub(super) fn unlink_and_refill(&self, unlinks: Vec<PathBuf>) {
        Unlinks(unlinks).run();
        self.fill_wake.notify_all();
    }

    /// Bytes of pooled segments the filler aims to keep.
    pub(super) fn prefault_target(&self) -> u64 {
        (self.cfg.capacity as f64 * self.cfg.prefault_share) as u64
    }

    /// The sizes the filler wants pooled segments of (at least), most wanted
    /// first: the latest reservations' sizes; with none yet, the sizes of the
    /// newest step of each namespace held; with nothing held, halves of the
    /// target down to 16 MiB (target/2, target/4, ...), so that a first save
    /// of up to half the target finds a segment at most twice its size.
    fn wanted_sizes(&self, st: &State) -> Vec<u64> {
        if !st.recent_sizes.is_empty() {
            return st.recent_sizes.iter().copied().collect();
        }
        let mut held = Vec::new();
        let mut last_ns: Option<&str> = None;
        for ((ns, _), s) in st.steps.iter().rev() {
            if last_ns == Some(ns.as_str()) || s.deleted {
                continue;
            }
            last_ns = Some(ns.as_str());
            held.extend(s.shards.values().map(Shard::len));
        }
        if !held.is_empty() {
            return held;
        }
        let mut sizes = Vec::new();
        let mut s = self.prefault_target() / 2;
        while s >= MIN_DEFAULT_SEGMENT {
            sizes.push(s);
            s /= 2;
        }
        sizes
    }

    /// Whether a pooled segment of `len` bytes would serve one of the recent
    /// reservations (true while there are none).
    fn useful(st: &State, len: u64) -> bool {
        st.recent_sizes.is_empty() || st.recent_sizes.iter().any(|&s| s <= len && Self::worth_cutting(len, s))
    }

    /// Takes out of the pool the segments that no recent reservation would
    /// use (too small, or too large to be worth cutting), so that the
    /// target holds segments of the sizes being reserved; returns their
    /// files, to unlink off the lock. Nothing goes while there is no history.
    fn shed_useless(&self, st: &mut State) -> Vec<PathBuf> {
        if st.recent_sizes.is_empty() {
            return Vec::new();
        }
        let mut shed = Vec::new();
        let mut i = 0;
        while i < st.pool.len() {
            if Self::useful(st, st.pool[i].len) {
                i += 1;
            } else {
                let p = st.pool.swap_remove(i);
                st.used -= p.len;
                shed.push(p.path);
            }
        }
        shed
    }

    /// The size of the next segment the filler should make, if any: the
    /// first wanted size that no pooled segment covers and that fits both in
    /// free capacity and under the target; once all are covered, the newest
    /// reservation's size again while it fits.
    fn next_fill(&self, st: &State) -> Option<u64> {
        if self.cfg.prefault_share <= 0.0 || st.filling || st.pool.len() >= self.cfg.max_pooled_segments {
            return None;
        }
        let pooled: u64 = st.pool.iter().map(|p| p.len).sum();
        let room = self.prefault_target().saturating_sub(pooled).min(self.free(st));
        let mut have: Vec<u64> = st.pool.iter().map(|p| p.len).collect();
        have.sort_unstable();
        let wanted = self.wanted_sizes(st);
        for &want in &wanted {
            if let Some(i) = have.iter().position(|&h| h >= want) {
                have.remove(i);
            } else if want > 0 && want <= room {
                return Some(want);
            }
        }
        // Every wanted size is covered: more of the newest reservation's
        // size, for saves that come faster than retention recycles.
        Some(*st.recent_sizes.front()?).filter(|&s| s > 0 && s <= room)
    }

    /// Whether the filler has work left now.
    pub(super) fn prefault_pending(&self, st: &State) -> bool {
        let useless = st.pool.iter().any(|p| !Self::useful(st, p.len));
        st.filling || (self.cfg.prefault_share > 0.0 && useless) || self.next_fill(st).is_some()
    }

    /// Starts the filler: a thread at nice `nice` that keeps up to
    /// `prefault_share` of the capacity faulted in as free segments under
    /// `pool/`, at once and again whenever the pool is drawn down.
    pub fn start_filler(self: &Arc<Self>, nice: i32) -> std::io::Result<PoolFiller> {
        self.lock().fill_stop = false;
        let tier = self.clone();
        let thread = std::thread::Builder::new().name("tierckpt-prefault".into()).spawn(move || {
            if nice > 0 {
                // SAFETY: gettid and setpriority on the calling thread only.
                unsafe {
                    let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                    libc::setpriority(libc::PRIO_PROCESS, tid, nice);
                }
            }
            tier.fill_loop();
        })?;
        Ok(PoolFiller { tier: self.clone(), thread: Some(thread) })
    }

    /// The filler's loop: plan a segment under the lock (counting it in
    /// `used`), fault it in without the lock, then pool it.
    fn fill_loop(&self) {
        let mut backoff = false;
        loop {
            let (id, len) = {
                let mut st = self.lock();
                loop {
                    if st.fill_stop {
                        return;
                    }
                    // A reservation waiting for room goes first (it clears the flag),
                    // and a segment being written is not slowed down by a fill.
                    let writing = !st.reservations.is_empty();
                    if !backoff && !st.fill_yield && !writing {
                        let shed = self.shed_useless(&mut st);
                        if !shed.is_empty() {
                            drop(st);
                            Unlinks(shed).run();
                            st = self.lock();
                            continue;
                        }
                        if let Some(len) = self.next_fill(&st) {
                            let id = st.next_id;
                            st.next_id += 1;
                            st.used += len;
                            st.transient += len;
                            st.filling = true;
                            break (id, len);
                        }
                    }
                    let wait = match (backoff, writing) {
                        (true, _) => Duration::from_secs(10),
                        (false, true) => WRITER_POLL,
                        (false, false) => Duration::from_secs(1),
                    };
                    let (g, timeout) = self.fill_wake.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner());
                    st = g;
                    // After a failure, try again only once the back-off ran out.
                    backoff &= !timeout.timed_out();
                }
            };
            let path = self.cfg.root.join("pool").join(format!("{id}.seg"));
            let outcome = self.fault_in(&path, len);
            let mut st = self.lock();
            st.filling = false;
            st.transient -= len;
            let keep = matches!(outcome, Ok(true));
            if keep {
                st.pool.push(Pooled { path: path.clone(), len, prefaulted: true, promised: false });
                tracing::debug!(bytes = len, "pre-faulted a pool segment");
            } else {
                st.used -= len;
            }
            drop(st);
            self.changed.notify_all();
            if !keep {
                Unlinks(vec![path.clone()]).run();
            }
            if let Err(e) = outcome {
                tracing::warn!(path = %path.display(), error = %e, "could not pre-fault a pool segment; retrying in 10 s");
                backoff = true;
            }
        }
    }

    /// Creates `path` and allocates its `len` bytes, piece by piece; Ok(false)
    /// when it gave up for a reservation or a shutdown.
    fn fault_in(&self, path: &Path, len: u64) -> std::io::Result<bool> {
        let access = self.cfg.access;
        let f = access.create_options().write(true).create_new(true).open(path)?;
        access.own_file(&f)?;
        access.set_segment_mode(path, false)?;
        f.set_len(len)?;
        let mut off = 0;
        while off < len {
            let n = FILL_PIECE.min(len - off);
            allocate(&f, off, n)?;
            off += n;
            // Between pieces: give up for a reservation that needs the room
            // or a shutdown; pause while a client writes a segment (the copy
            // it is blocked on should have the cores and the memory bus).
            let mut st = self.lock();
            loop {
                if st.fill_stop || st.fill_yield {
                    return Ok(false);
                }
                if st.reservations.is_empty() {
                    break;
                }
                st = self.changed.wait_timeout(st, WRITER_POLL).unwrap_or_else(|p| p.into_inner()).0;
            }
        }
        Ok(true)
    }
}

/// Allocates the pages of `len` bytes at `off` of `f` by writing zeros
/// (`pwrite`, no mapping: no page faults). `fallocate` is cheaper here
/// (0.3 s/GiB against 0.45-0.55 on 4 KiB tmpfs pages) but leaves its pages
/// to be cleared at first touch, which then costs the writer 0.45-1.0 s/GiB
/// to populate against 0.15 after written zeros; with huge pages written
/// zeros leave the writer nothing to do (0.001 s/GiB).
fn allocate(f: &fs::File, off: u64, len: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        std::os::unix::fs::FileExt::write_all_at(f, &ZEROS[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}
