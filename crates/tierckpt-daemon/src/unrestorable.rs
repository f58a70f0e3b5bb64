//! Steps found corrupt on every tier. A read that finds no verified copy of
//! a shard anywhere (every tier answered, at least one with a corrupt copy)
//! marks its step here, and `latest` then names the newest step that can
//! still be restored, so that a restart does not fail on the same step again.
//! The marks live in `<memory dir>/unrestorable.json`, so they survive a
//! restart of the daemon, as the memory tier does. A new seal of a marked
//! step clears its mark.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tierckpt_tiers::private_fs::Access;

use crate::record::JsonRecord;

/// The marked steps of every namespace.
pub struct Unrestorable {
    steps: JsonRecord<BTreeMap<String, BTreeSet<u64>>>,
}

impl Unrestorable {
    /// The marks kept in `memory_dir`; a missing or unreadable file is none.
    pub fn open(memory_dir: &Path, access: Access) -> Self {
        Self { steps: JsonRecord::open(memory_dir, "unrestorable.json", access, "unrestorable steps") }
    }

    /// Marks `step` of `ns`; true if it was not marked before.
    pub fn mark(&self, ns: &str, step: u64) -> bool {
        let mut steps = self.steps.lock();
        let new = steps.entry(ns.to_string()).or_default().insert(step);
        if new {
            self.steps.save(&steps);
        }
        new
    }

    /// Clears the mark of `step` of `ns` (a new copy of it was sealed).
    pub fn clear(&self, ns: &str, step: u64) {
        let mut steps = self.steps.lock();
        let Some(set) = steps.get_mut(ns) else { return };
        if set.remove(&step) {
            if set.is_empty() {
                steps.remove(ns);
            }
            self.steps.save(&steps);
        }
    }

    /// The marked steps of `ns`.
    pub fn of(&self, ns: &str) -> BTreeSet<u64> {
        self.steps.lock().get(ns).cloned().unwrap_or_default()
    }

    /// Every marked step, by namespace.
    pub fn all(&self) -> BTreeMap<String, Vec<u64>> {
        self.steps.lock().iter().map(|(ns, s)| (ns.clone(), s.iter().copied().collect())).collect()
    }
}
