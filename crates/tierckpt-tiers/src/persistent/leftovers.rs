//! Leftovers of interrupted uploads, and their removal.
//!
//! `object_store`'s `LocalFileSystem` (file://) writes every upload to a
//! staging file `<path>#<n>` and renames it into place when complete. A
//! daemon killed mid-upload leaves that file behind, and listings never show
//! it (`list` skips names ending in `#<digits>`), so neither
//! `clean_unreferenced` nor `delete` would find it. Here the directories
//! are read directly, and only that staging pattern next to this tier's own
//! names is removed: `COMMIT#<n>`, `ranks/rank-R-of-W.json#<n>` and
//! `data/<writer>/rank-R-of-W.{safetensors,tcz}#<n>`. Anything else, even
//! with a `#` in its name, is left alone.
//!
//! When: for a committed step (after its commit, or at start), every such
//! file under the step (an upload still running there lost its race anyway:
//! its rename fails and its retry finds the rank claimed); for a step being
//! deleted, every one; at start, in uncommitted steps, only those in the data
//! directories of this node's earlier writers (`<node>-<16 hex>-<8 hex>`),
//! which no live process writes, so that other nodes' running uploads are
//! not cut off.
//!
//! Object stores: an interrupted S3 (or GCS) multipart upload leaves parts
//! that are invisible but billed. `object_store` 0.14 can abort an upload it
//! started (this tier does, on every failure) but cannot list the uploads
//! a killed process left, so those are not removed here: configure the
//! bucket's lifecycle rule `AbortIncompleteMultipartUpload` (for example
//! after 1 day) on the tier's prefix. Azure drops uncommitted blocks itself
//! after 7 days.

use std::path::{Path, PathBuf};

use super::*;

/// Which staging files of a step to remove.
#[derive(Clone, Copy)]
enum Scope<'a> {
    /// All of them (a committed or deleted step).
    All,
    /// Those in data directories of `node`'s writers other than `current`.
    EarlierWritersOf { node: &'a str, current: &'a str },
}

/// `name` is object_store's staging name for one of `base`'s uploads:
/// `<base>#<digits>`, with `base` accepted by `ours`.
fn is_staging_of(name: &str, ours: impl Fn(&str) -> bool) -> bool {
    name.rsplit_once('#').is_some_and(|(base, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && ours(base))
}

fn is_rank_file(base: &str, exts: &[&str]) -> bool {
    exts.iter().any(|ext| base.strip_suffix(ext).and_then(|s| s.strip_suffix('.')).and_then(parse_rank_stem).is_some())
}

/// `dir` names a data directory of one of `node`'s writers:
/// `<node>-<16 hex>-<8 hex>`.
fn is_writer_dir_of(dir: &str, node: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    dir.strip_prefix(node)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| r.split_once('-'))
        .is_some_and(|(a, b)| hex(a, 16) && hex(b, 8))
}

fn entries(dir: &Path) -> Vec<(String, PathBuf)> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()).filter_map(|e| Some((e.file_name().into_string().ok()?, e.path()))).collect()
        })
        .unwrap_or_default()
}

/// The staging files under one step directory that `scope` covers.
fn staging_files(step_dir: &Path, scope: Scope<'_>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if matches!(scope, Scope::All) {
        for (name, p) in entries(step_dir) {
            if is_staging_of(&name, |b| b == "COMMIT") {
                out.push(p);
            }
        }
        for (name, p) in entries(&step_dir.join("ranks")) {
            if is_staging_of(&name, |b| is_rank_file(b, &["json"])) {
                out.push(p);
            }
        }
    }
    for (writer, dir) in entries(&step_dir.join("data")) {
        let covered = match scope {
            Scope::All => true,
            Scope::EarlierWritersOf { node, current } => {
                is_writer_dir_of(&writer, node) && !writer.starts_with(&format!("{current}-"))
            }
        };
        if covered {
            for (name, p) in entries(&dir) {
                if is_staging_of(&name, |b| is_rank_file(b, &["safetensors", "tcz"])) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Removes `files`, then the directories they leave empty up to `step_dir`
/// (as `LocalFileSystem` does on delete). Returns how many were removed.
fn remove_staging(step_dir: &Path, files: Vec<PathBuf>) -> Result<u64> {
    let mut n = 0;
    for f in files {
        match std::fs::remove_file(&f) {
            Ok(()) => {
                tracing::info!(file = %f.display(), "removed the leftover of an interrupted upload");
                n += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(TierError::io(format!("removing {}", f.display()), e)),
        }
        let mut dir = f.parent();
        while let Some(d) = dir.filter(|d| d.starts_with(step_dir)) {
            // Fails (and stops) at the first directory still holding something.
            if std::fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
    }
    Ok(n)
}

impl PersistentTier {
    /// The local directory of a step, for a `file://` tier.
    fn local_step_dir(&self, ns: &str, step: u64) -> Option<PathBuf> {
        let root = self.local_root.as_ref()?;
        Some(root.join(self.step_dir(ns, step).as_ref()))
    }

    /// Removes every leftover of an interrupted upload under a step (one that
    /// is committed, or being deleted). Returns how many; 0 for object stores.
    pub async fn clean_interrupted_in_step(&self, ns: &str, step: u64) -> Result<u64> {
        let Some(dir) = self.local_step_dir(ns, step) else { return Ok(0) };
        tokio::task::spawn_blocking(move || remove_staging(&dir, staging_files(&dir, Scope::All)))
            .await
            .map_err(|e| TierError::Unavailable(format!("clean-up worker failed: {e}")))?
    }

    /// At start: removes the leftovers of uploads interrupted by a crash,
    /// all of them in committed steps, and in the others those of this
    /// node's earlier writers. Returns how many; 0 for object stores (see
    /// the module docs for their incomplete multipart uploads).
    pub async fn clean_interrupted_uploads(&self) -> Result<u64> {
        let Some(root) = self.local_root.clone() else { return Ok(0) };
        let base = root.join(self.prefix.as_ref());
        let node = self.writer.rsplit_once('-').map_or(self.writer.clone(), |(n, _)| n.to_string());
        let current = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut n = 0;
            for (ns, ns_dir) in entries(&base) {
                if validate_namespace(&ns).is_err() || !ns_dir.is_dir() {
                    continue;
                }
                for (step, step_dir) in entries(&ns_dir) {
                    if step.len() != 20 || step.parse::<u64>().is_err() {
                        continue;
                    }
                    let scope = match step_dir.join("COMMIT").is_file() {
                        true => Scope::All,
                        false => Scope::EarlierWritersOf { node: &node, current: &current },
                    };
                    n += remove_staging(&step_dir, staging_files(&step_dir, scope))?;
                }
            }
            Ok(n)
        })
        .await
        .map_err(|e| TierError::Unavailable(format!("clean-up worker failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_staging_pattern_of_our_own_names_matches() {
        let data = |b: &str| is_rank_file(b, &["safetensors", "tcz"]);
        assert!(is_staging_of("rank-00000-of-00001.safetensors#1", data));
        assert!(is_staging_of("rank-00003-of-00004.tcz#17", data));
        assert!(is_staging_of("COMMIT#2", |b| b == "COMMIT"));
        for other in [
            "rank-00000-of-00001.safetensors",
            "rank-00000-of-00001.safetensors#",
            "rank-00000-of-00001.safetensors#x1",
            "rank-00000-of-00001.json#1",
            "notes.safetensors#1",
            "my#model.safetensors",
        ] {
            assert!(!is_staging_of(other, data), "{other}");
        }
        assert!(is_writer_dir_of("node-0123456789abcdef-01234567", "node"));
        assert!(is_writer_dir_of("n-1-0123456789abcdef-01234567", "n-1"));
        assert!(!is_writer_dir_of("n-1-0123456789abcdef-01234567", "n"));
        assert!(!is_writer_dir_of("node2-0123456789abcdef-01234567", "node"));
        assert!(!is_writer_dir_of("node-0123456789abcdef", "node"));
    }
}
