//! A small JSON record kept in the memory directory (the HyperPod
//! namespaces, the unrestorable marks): read once at start, written whole
//! (a private temporary file renamed into place) after each change, so that
//! it survives a restart of the daemon as the memory tier does.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tierckpt_tiers::private_fs::{self, Access};

/// The record in `<memory dir>/<file>`, held in memory under a mutex.
pub(crate) struct JsonRecord<T> {
    path: PathBuf,
    access: Access,
    /// What it holds, in words, for the logs.
    what: &'static str,
    value: Mutex<T>,
}

impl<T: Serialize + DeserializeOwned + Default> JsonRecord<T> {
    /// The record `file` in `memory_dir`; a missing or unreadable file is the default.
    pub(crate) fn open(memory_dir: &Path, file: &str, access: Access, what: &'static str) -> Self {
        let path = memory_dir.join(file);
        let value = match private_fs::open_read(&path).and_then(std::io::read_to_string) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable record of {what}");
                T::default()
            }),
            Err(_) => T::default(),
        };
        Self { path, access, what, value: Mutex::new(value) }
    }

    /// The value, locked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.value.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `value` (the locked value, after a change); a failure is
    /// logged: the change holds until the daemon stops.
    pub(crate) fn save(&self, value: &T) {
        if let Err(e) = self.access.write_atomically(&self.path, &serde_json::to_vec(value).unwrap_or_default()) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not record {}", self.what);
        }
    }
}
