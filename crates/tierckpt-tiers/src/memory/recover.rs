//! Rebuilding the index from the directory when the tier opens.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tierckpt_format::names::{validate_namespace, validate_rank};
use tierckpt_format::{Manifest, ShardKey};

use super::index::{Shard, State, Step};
use super::pool::Pooled;
use super::seal::SealJob;
use super::{io_err, MemoryTier};
use crate::private_fs::{is_own, open_read};
use crate::Result;

/// A small file of ours, read without following a symlink; None if it is
/// missing, not a regular file of this user, or unreadable.
fn read_private(path: &Path) -> Option<Vec<u8>> {
    let f = open_read(path).ok()?;
    let meta = f.metadata().ok().filter(|m| is_own(path, m, false))?;
    let mut out = Vec::with_capacity(meta.len() as usize);
    std::io::Read::read_to_end(&mut &f, &mut out).ok()?;
    Some(out)
}

/// Rank and world size from a file name made by `shard_file_stem`.
fn parse_shard_file_stem(stem: &str) -> Option<(u32, u32)> {
    let rest = stem.strip_prefix("rank-")?;
    let (r, w) = rest.split_once("-of-")?;
    Some((r.parse().ok()?, w.parse().ok()?))
}

impl MemoryTier {
    /// Rebuilds the index from the directory: pooled and pending segments go
    /// to the pool, shards without a manifest are sealed again, and retention
    /// applies.
    pub(super) fn recover(&self) -> Result<()> {
        let mut st = self.lock();
        let mut unlinks = Vec::new();
        let mut found = Vec::new();
        for dir in ["pool", "pending"] {
            let p = self.cfg.root.join(dir);
            for e in fs::read_dir(&p).map_err(io_err("listing", &p))? {
                let e = e.map_err(io_err("listing", &p))?;
                // DirEntry::metadata does not follow symlinks.
                match e.metadata() {
                    Ok(m) if is_own(&e.path(), &m, false) => found.push((dir, e.path(), m.len())),
                    _ => {}
                }
            }
        }
        // New segment names (`<id>.seg`) must not clobber those found.
        let id_of = |p: &Path| p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok());
        st.next_id = found.iter().filter_map(|(_, p, _)| id_of(p)).max().map_or(0, |m| m + 1);
        for (dir, path, len) in found {
            if dir == "pool" && st.pool.len() < self.cfg.max_pooled_segments {
                st.pool.push(Pooled { path, len, prefaulted: false, promised: false });
            } else {
                self.pool_file(&mut st, path, len, &mut unlinks);
            }
        }
        let mut reseal = Vec::new();
        let ns_root = self.cfg.root.join("ns");
        for ns_entry in fs::read_dir(&ns_root).map_err(io_err("listing", &ns_root))? {
            let ns_entry = ns_entry.map_err(io_err("listing", &ns_root))?;
            if !ns_entry.metadata().is_ok_and(|m| is_own(&ns_entry.path(), &m, true)) {
                continue;
            }
            let ns = ns_entry.file_name().to_string_lossy().into_owned();
            if validate_namespace(&ns).is_err() {
                tracing::warn!(dir = %ns_entry.path().display(), "ignoring a directory that is not a namespace");
                continue;
            }
            for step_entry in fs::read_dir(ns_entry.path()).map_err(io_err("listing", &ns_entry.path()))? {
                let step_entry = step_entry.map_err(io_err("listing", &ns_root))?;
                if !step_entry.metadata().is_ok_and(|m| is_own(&step_entry.path(), &m, true)) {
                    continue;
                }
                let Some(step) = step_entry.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
                    tracing::warn!(dir = %step_entry.path().display(), "ignoring a directory that is not a step");
                    continue;
                };
                self.recover_step(&mut st, &ns, step, &step_entry.path(), &mut reseal, &mut unlinks)?;
            }
        }
        st.used = st.steps.values().map(Step::bytes).sum::<u64>() + st.pool.iter().map(|p| p.len).sum::<u64>();
        drop(st);
        self.unlink_and_refill(unlinks);
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

    /// Indexes the shards of one step directory.
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
            let f = f.map_err(io_err("listing", dir))?;
            let path = f.path();
            let Some(meta) = f.metadata().ok().filter(|m| is_own(&path, m, false)) else { continue };
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
            let len = meta.len();
            let mpath = path.with_file_name(format!("{stem}.manifest.json"));
            let manifest = read_private(&mpath)
                .and_then(|b| Manifest::from_json(&b, &mpath.display().to_string()).ok())
                .filter(|m| m.key == key && m.world_size == world_size && m.file_len == len);
            let entry = st.steps.entry((ns.to_string(), step)).or_insert_with(|| Step::new(world_size));
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
}
