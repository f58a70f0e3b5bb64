//! The record of each job's starts and failures, kept by the daemon for the
//! supervisor (`tierckpt run`) and for adaptive checkpoint intervals (which
//! estimate the mean time between failures from it). One JSON line per
//! event in `<memory dir>/failures/<namespace>.jsonl`, so it survives the
//! trainer and a restart of the daemon, as the memory tier does.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use tierckpt_proto::FailureRecord;
use tierckpt_tiers::private_fs::{self, Access};
use tierckpt_tiers::{Result, TierError};

/// Longest `detail` accepted, in bytes.
pub const MAX_DETAIL: usize = 4096;

/// The record of each namespace's starts and failures, one JSON line each.
pub struct FailureLog {
    dir: PathBuf,
    access: Access,
    append: Mutex<()>,
}

impl FailureLog {
    /// The record kept under `memory_dir/failures` (a directory the memory
    /// tier has checked is this user's), its files created with `access`.
    pub fn new(memory_dir: &std::path::Path, access: Access) -> Self {
        Self { dir: memory_dir.join("failures"), access, append: Mutex::new(()) }
    }

    fn file(&self, ns: &str) -> Result<PathBuf> {
        tierckpt_format::names::validate_namespace(ns)?;
        Ok(self.dir.join(format!("{ns}.jsonl")))
    }

    /// Appends one event.
    pub fn record(&self, ns: &str, rec: &FailureRecord) -> Result<()> {
        let path = self.file(ns)?;
        if rec.detail.len() > MAX_DETAIL {
            return Err(TierError::InvalidArgument(format!(
                "failure detail of {} bytes exceeds the {MAX_DETAIL}-byte limit",
                rec.detail.len()
            )));
        }
        let mut line = serde_json::to_vec(rec).map_err(|e| TierError::InvalidArgument(e.to_string()))?;
        line.push(b'\n');
        let io = |what: &str, e: std::io::Error| TierError::io(format!("{what} {}", path.display()), e);
        let _guard = self.append.lock().unwrap_or_else(|p| p.into_inner());
        private_fs::prepare_subdir(&self.dir, self.access)?;
        // Never through a symlink: an append must land in our own file.
        let mut f = self.access.create_options().create(true).append(true).open(&path).map_err(|e| io("opening", e))?;
        self.access.own_file(&f).map_err(|e| io("giving a group to", e))?;
        f.write_all(&line).map_err(|e| io("appending to", e))
    }

    /// Every event of `ns`, oldest first; none if nothing was recorded. A
    /// line that does not parse (torn by a crash mid-append) is skipped.
    pub fn read(&self, ns: &str) -> Result<Vec<FailureRecord>> {
        let path = self.file(ns)?;
        let text = match private_fs::open_read(&path).and_then(std::io::read_to_string) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(TierError::io(format!("reading {}", path.display()), e)),
        };
        Ok(text
            .lines()
            .filter_map(|l| match serde_json::from_str(l) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(namespace = ns, error = %e, "skipping an unreadable failure record");
                    None
                }
            })
            .collect())
    }

    /// The newest `n` events of every namespace that has any.
    pub fn recent(&self, n: usize) -> BTreeMap<String, Vec<FailureRecord>> {
        let mut out = BTreeMap::new();
        let Ok(entries) = fs::read_dir(&self.dir) else { return out };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(ns) = name.strip_suffix(".jsonl") else { continue };
            if let Ok(mut recs) = self.read(ns) {
                let skip = recs.len().saturating_sub(n);
                recs.drain(..skip);
                out.insert(ns.to_string(), recs);
            }
        }
        out
    }
}
