//! Steps found corrupt on every tier. A read that finds no verified copy of
//! a shard anywhere (every tier answered, at least one with a corrupt copy)
//! marks its step here, and `latest` then names the newest step that can
//! still be restored, so that a restart does not fail on the same step again.
//! The marks live in `<memory dir>/unrestorable.json`, so they survive a
//! restart of the daemon, as the memory tier does. A new seal of a marked
//! step clears its mark.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tierckpt_tiers::private_fs::{self, Access};

/// The marked steps of every namespace.
pub struct Unrestorable {
    path: PathBuf,
    access: Access,
    steps: Mutex<BTreeMap<String, BTreeSet<u64>>>,
}

impl Unrestorable {
    /// The marks kept in `memory_dir`; a missing or unreadable file is none.
    pub fn open(memory_dir: &Path, access: Access) -> Self {
        let path = memory_dir.join("unrestorable.json");
        let steps = match private_fs::open_read(&path).and_then(std::io::read_to_string) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable record of unrestorable steps");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Self { path, access, steps: Mutex::new(steps) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<u64>>> {
        self.steps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `step` of `ns`; true if it was not marked before.
    pub fn mark(&self, ns: &str, step: u64) -> bool {
        let mut steps = self.lock();
        let new = steps.entry(ns.to_string()).or_default().insert(step);
        if new {
            self.save(&steps);
        }
        new
    }

    /// Clears the mark of `step` of `ns` (a new copy of it was sealed).
    pub fn clear(&self, ns: &str, step: u64) {
        let mut steps = self.lock();
        let Some(set) = steps.get_mut(ns) else { return };
        if set.remove(&step) {
            if set.is_empty() {
                steps.remove(ns);
            }
            self.save(&steps);
        }
    }

    /// The marked steps of `ns`.
    pub fn of(&self, ns: &str) -> BTreeSet<u64> {
        self.lock().get(ns).cloned().unwrap_or_default()
    }

    /// Every marked step, by namespace.
    pub fn all(&self) -> BTreeMap<String, Vec<u64>> {
        self.lock().iter().map(|(ns, s)| (ns.clone(), s.iter().copied().collect())).collect()
    }

    /// Writes the marks (a temporary file renamed into place); a failure is
    /// logged: the marks still hold until the daemon stops.
    fn save(&self, steps: &BTreeMap<String, BTreeSet<u64>>) {
        if let Err(e) = self.access.write_atomically(&self.path, &serde_json::to_vec(steps).unwrap_or_default()) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not record unrestorable steps");
        }
    }
}
