//! Retention, eviction and deletion of steps.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::PathBuf;

use tierckpt_format::names::validate_namespace;
use tierckpt_format::{verify_chunks, ShardKey};

use super::index::{State, Step};
use super::MemoryTier;
use crate::{Result, TierError};

impl MemoryTier {
    /// The step to evict under memory pressure, if any may go: first
    /// incomplete steps older than their namespace's newest complete step,
    /// then complete steps other than the newest, oldest first. Steps being
    /// written and incomplete steps newer than the newest complete are kept.
    pub(super) fn victim(st: &State) -> Option<(String, u64)> {
        let mut best: Option<(bool, bool, u64, &(String, u64))> = None;
        for (k, s) in Self::evictable(st) {
            let pinned = st.is_pinned(&k.0, k.1);
            let rank = (pinned, st.settled(&k.0, k.1, s), s.summary(k.1).created_unix_ms, k);
            if best.as_ref().is_none_or(|b| (rank.0, rank.1, rank.2) < (b.0, b.1, b.2)) {
                best = Some(rank);
            }
        }
        best.map(|b| b.3.clone())
    }

    /// Keeps `step` of `ns` from retention while the drain to the
    /// persistent tier works on it (memory pressure still evicts it, last);
    /// `None` lets it go. One step per namespace.
    pub fn pin_for_drain(&self, ns: &str, step: Option<u64>) {
        {
            let mut st = self.lock();
            st.pinned.entry(ns.to_string()).or_default().drain = step;
        }
        if step.is_none() {
            self.retain(ns);
        }
    }

    /// Pins `step` of `ns` (held here or not, so a pin can precede a copy):
    /// retention keeps it and memory pressure evicts it last, as the
    /// drain's pin, until [`Self::unpin`]. Pins live in memory only: the
    /// daemon records them and gives them back at open
    /// ([`super::MemoryTierConfig::pinned`]).
    pub fn pin(&self, ns: &str, step: u64) -> Result<()> {
        validate_namespace(ns)?;
        self.lock().pinned.entry(ns.to_string()).or_default().kept.insert(step);
        Ok(())
    }

    /// Makes a pinned step ordinary again; retention applies at once.
    /// Returns whether it was pinned.
    pub fn unpin(&self, ns: &str, step: u64) -> Result<bool> {
        validate_namespace(ns)?;
        let was = self.lock().pinned.get_mut(ns).is_some_and(|p| p.kept.remove(&step));
        self.retain(ns);
        Ok(was)
    }

    /// The steps of `ns` pinned with [`Self::pin`].
    pub fn pinned_steps(&self, ns: &str) -> BTreeSet<u64> {
        self.lock().pinned.get(ns).map(|p| p.kept.clone()).unwrap_or_default()
    }

    /// Bytes that pooled segments and every step [`Self::victim`] would
    /// give up hold (eviction never changes which steps may go: only steps
    /// older than their namespace's newest complete one do).
    pub(super) fn reclaimable(st: &State) -> u64 {
        Self::evictable(st).map(|(_, s)| s.bytes()).sum::<u64>() + st.pool.iter().map(|p| p.len).sum::<u64>()
    }

    /// Steps that may be evicted: idle, and older than their namespace's
    /// newest complete step.
    fn evictable(st: &State) -> impl Iterator<Item = (&(String, u64), &Step)> {
        let mut newest_complete: HashMap<&str, u64> = HashMap::new();
        for ((ns, step), s) in &st.steps {
            if st.settled(ns, *step, s) {
                newest_complete.insert(ns, *step);
            }
        }
        st.steps
            .iter()
            .filter(move |((ns, step), s)| !s.busy() && newest_complete.get(ns.as_str()).is_some_and(|&n| *step < n))
    }

    /// Removes a step from the index; its files go to the pool.
    pub(super) fn drop_step(&self, st: &mut State, ns: &str, step: u64, unlinks: &mut Vec<PathBuf>) -> (u64, u64) {
        let Some(s) = st.steps.remove(&(ns.to_string(), step)) else {
            return (0, 0);
        };
        if let Some(set) = st.declared_complete.get_mut(ns) {
            set.remove(&step);
        }
        let (mut n, mut bytes) = (0, 0);
        for (rank, shard) in s.shards {
            bytes += self.drop_shard_files(st, &ShardKey::new(ns, step, rank), s.world_size, shard.len(), unlinks);
            n += 1;
        }
        let _ = fs::remove_dir(self.step_dir(ns, step));
        tracing::debug!(namespace = ns, step, shards = n, "dropped step");
        (n, bytes)
    }

    /// Removes a dropped shard's manifest; its data goes to the pool, or is
    /// unlinked while a reader maps it. Returns its length.
    pub(super) fn drop_shard_files(
        &self,
        st: &mut State,
        key: &ShardKey,
        world_size: u32,
        len: u64,
        unlinks: &mut Vec<PathBuf>,
    ) -> u64 {
        let _ = fs::remove_file(self.manifest_path(key, world_size));
        if st.leases.contains_key(key) {
            unlinks.push(self.data_path(key, world_size));
            st.used = st.used.saturating_sub(len);
        } else {
            self.pool_file(st, self.data_path(key, world_size), len, unlinks);
        }
        len
    }

    /// Removes a step from the index if it holds nothing and nothing is reserved in it.
    pub(super) fn remove_step_if_empty(st: &mut State, ns: &str, step: u64) {
        let k = (ns.to_string(), step);
        if st.steps.get(&k).is_some_and(|s| s.shards.is_empty() && s.reserved.is_empty()) {
            st.steps.remove(&k);
        }
    }

    /// Deletes a step: its visible shards at once; ranks being written or
    /// sealed are dropped when their writers finish (their seal fails). A
    /// replica of the step sealed before now is refused from then on (see
    /// [`Self::refuse_deleted`]). Returns the shards and bytes removed now.
    pub fn delete_step(&self, ns: &str, step: u64) -> Result<(u64, u64)> {
        validate_namespace(ns)?;
        let mut unlinks = Vec::new();
        let r = {
            let mut st = self.lock();
            Self::tombstone(&mut st, ns, Some(step));
            self.delete_step_locked(&mut st, ns, step, &mut unlinks)
        };
        self.unlink_and_refill(unlinks);
        r.ok_or_else(|| TierError::NotFound(format!("{ns}/step {step} in the memory tier")))
    }

    /// Deletes every step of a namespace, as [`Self::delete_step`] does.
    pub fn delete_namespace(&self, ns: &str) -> Result<(u64, u64)> {
        validate_namespace(ns)?;
        let mut unlinks = Vec::new();
        let total = {
            let mut st = self.lock();
            Self::tombstone(&mut st, ns, None);
            let range = (ns.to_string(), 0)..=(ns.to_string(), u64::MAX);
            let steps: Vec<u64> = st.steps.range(range).map(|((_, s), _)| *s).collect();
            let removed = steps.into_iter().filter_map(|s| self.delete_step_locked(&mut st, ns, s, &mut unlinks));
            removed.reduce(|a, b| (a.0 + b.0, a.1 + b.1))
        };
        self.unlink_and_refill(unlinks);
        let _ = fs::remove_dir(self.cfg.root.join("ns").join(ns));
        total.ok_or_else(|| TierError::NotFound(format!("namespace {ns} in the memory tier")))
    }

    /// [`Self::delete_step`] under the index lock; None if the step is not held.
    fn delete_step_locked(
        &self,
        st: &mut State,
        ns: &str,
        step: u64,
        unlinks: &mut Vec<PathBuf>,
    ) -> Option<(u64, u64)> {
        let s = st.steps.get_mut(&(ns.to_string(), step))?;
        if !s.busy() {
            return Some(self.drop_step(st, ns, step, unlinks));
        }
        s.deleted = true;
        let world_size = s.world_size;
        let sealed: Vec<(u32, u64)> = s.sealed().map(|(r, m)| (*r, m.file_len)).collect();
        for (rank, _) in &sealed {
            s.shards.remove(rank);
        }
        let mut removed = (0, 0);
        for (rank, len) in sealed {
            removed.0 += 1;
            removed.1 += self.drop_shard_files(st, &ShardKey::new(ns, step, rank), world_size, len, unlinks);
        }
        tracing::info!(namespace = ns, step, "deleted a step being written: its writers' seals will be dropped");
        Some(removed)
    }

    /// How long a tombstone refuses replicas sealed before it.
    const TOMBSTONE_LIFE_MS: u64 = 3_600_000;

    /// Records that `step` of `ns` (every step with `None`) was deleted now,
    /// and forgets tombstones older than [`Self::TOMBSTONE_LIFE_MS`].
    fn tombstone(st: &mut State, ns: &str, step: Option<u64>) {
        let now = crate::now_unix_ms();
        st.tombstones.retain(|_, at| now.saturating_sub(*at) < Self::TOMBSTONE_LIFE_MS);
        st.tombstones.insert((ns.to_string(), step), now);
    }

    /// Refuses a replica (a copy pushed by a peer) of a shard that was
    /// sealed before its step or namespace was deleted here, so that a
    /// delete is not undone by copies still in flight. Copies sealed after
    /// the delete are new data and pass. (Seal times come from the origin's
    /// clock: keep the nodes' clocks in sync.)
    pub fn refuse_deleted(&self, m: &tierckpt_format::Manifest) -> Result<()> {
        let st = self.lock();
        let ns = m.key.namespace.clone();
        let at = [st.tombstones.get(&(ns.clone(), None)), st.tombstones.get(&(ns, Some(m.key.step)))]
            .into_iter()
            .flatten()
            .max();
        match at {
            Some(&at) if m.created_unix_ms <= at => Err(TierError::NotFound(format!(
                "{}/step {} was deleted on this node (at {at} ms since the epoch); a copy of {} sealed before then \
                 (at {} ms) is refused",
                m.key.namespace, m.key.step, m.key, m.created_unix_ms
            ))),
            _ => Ok(()),
        }
    }

    /// Verifies one visible shard; if its bytes do not match its manifest,
    /// removes it (its segment is unlinked, never recycled) and returns the
    /// mismatch. `Ok(())` when the copy is sound.
    pub fn quarantine_if_corrupt(&self, key: &ShardKey) -> Result<()> {
        let (m, bytes) = self.map(key)?;
        let Err(bad) = verify_chunks(&bytes, &m, &key.to_string()) else { return Ok(()) };
        drop(bytes);
        self.forget(key);
        tracing::warn!(shard = %key, error = %bad, "dropped a corrupt copy from memory");
        Err(bad.into())
    }

    /// Drops one shard from the index and unlinks its files (never recycled:
    /// its bytes are not to be trusted).
    pub(super) fn forget(&self, key: &ShardKey) {
        let mut unlinks = Vec::new();
        {
            let mut st = self.lock();
            let k = (key.namespace.clone(), key.step);
            if let Some(s) = st.steps.get_mut(&k) {
                let w = s.world_size;
                if let Some(sh) = s.shards.remove(&key.rank) {
                    st.used = st.used.saturating_sub(sh.len());
                    unlinks.push(self.manifest_path(key, w));
                    unlinks.push(self.data_path(key, w));
                }
            }
            Self::remove_step_if_empty(&mut st, &key.namespace, key.step);
        }
        self.unlink_and_refill(unlinks);
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
        self.unlink_and_refill(unlinks);
        Ok(total)
    }

    /// Tells the tier which steps of `ns` are complete across the cluster
    /// (retention and eviction treat them as complete), then applies retention.
    pub fn set_known_complete(&self, ns: &str, steps: BTreeSet<u64>) {
        self.lock().known_complete.insert(ns.to_string(), steps);
        self.retain(ns);
    }

    /// The job declares `step` of `ns` complete: its ranks agreed that every
    /// rank's shard of it is visible on its node. Retention and eviction
    /// treat it as complete here at once, where the cluster view may take
    /// many heartbeat rounds to show it; then retention applies. `NotFound`
    /// when this node holds no part of the step.
    pub fn declare_complete(&self, ns: &str, step: u64) -> Result<()> {
        validate_namespace(ns)?;
        {
            let mut st = self.lock();
            if st.steps.get(&(ns.to_string(), step)).is_none_or(|s| s.deleted) {
                return Err(TierError::NotFound(format!(
                    "{ns}/step {step} to declare complete: this node holds no shard of it"
                )));
            }
            st.declared_complete.entry(ns.to_string()).or_default().insert(step);
        }
        self.retain(ns);
        Ok(())
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
                .filter(|((_, step), s)| *step < oldest_kept && !s.busy() && !st.is_pinned(ns, *step))
                .map(|((_, step), _)| *step)
                .collect();
            for step in doomed {
                self.drop_step(&mut st, ns, step, &mut unlinks);
            }
        }
        self.unlink_and_refill(unlinks);
    }
}
