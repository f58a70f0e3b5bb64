//! Retention, eviction and deletion of steps.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::PathBuf;

use tierckpt_format::names::validate_namespace;
use tierckpt_format::{verify_chunks, ShardKey};

use super::index::{State, Step};
use super::pool::Unlinks;
use super::MemoryTier;
use crate::{Result, TierError};

impl MemoryTier {
    /// The step to evict under memory pressure, if any may go: first
    /// incomplete steps older than their namespace's newest complete step,
    /// then complete steps other than the newest, oldest first. Steps being
    /// written and incomplete steps newer than the newest complete are kept.
    pub(super) fn victim(st: &State) -> Option<(String, u64)> {
        let mut best: Option<(bool, u64, &(String, u64))> = None;
        for (k, s) in Self::evictable(st) {
            let rank = (st.settled(&k.0, k.1, s), s.summary(k.1).created_unix_ms, k);
            if best.as_ref().is_none_or(|b| (rank.0, rank.1) < (b.0, b.1)) {
                best = Some(rank);
            }
        }
        best.map(|b| b.2.clone())
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

    /// Removes a step from the index if it holds nothing and nothing is reserved in it.
    pub(super) fn remove_step_if_empty(st: &mut State, ns: &str, step: u64) {
        let k = (ns.to_string(), step);
        if st.steps.get(&k).is_some_and(|s| s.shards.is_empty() && s.reserved.is_empty()) {
            st.steps.remove(&k);
        }
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
        Unlinks(unlinks).run();
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
