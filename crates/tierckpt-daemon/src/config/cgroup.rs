//! The memory this process's cgroups leave it, so that `memory_tier_size =
//! "auto"` fits a container's limit and not only the host's RAM: the
//! smallest limit on the path from the process's cgroup to the root, less
//! what the cgroup already uses, over cgroup v2 (`memory.max`,
//! `memory.current`) and v1 (`memory.limit_in_bytes`, `memory.usage_in_bytes`).

use std::path::{Path, PathBuf};

/// A v1 limit this large (the kernel's "unlimited", page-rounded) is none.
const V1_UNLIMITED: u64 = 1 << 62;

/// Bytes the cgroups named in `self_cgroup` (the text of `/proc/self/cgroup`)
/// leave free under `sys` (`/sys/fs/cgroup`); None when no memory limit applies.
pub(crate) fn memory_available(sys: &Path, self_cgroup: &str) -> Option<u64> {
    let mut best: Option<u64> = None;
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let found = if id == "0" && controllers.is_empty() {
            // v2: the unified hierarchy, at the root or (hybrid) under `unified`.
            let root = if sys.join("cgroup.controllers").exists() { sys.to_path_buf() } else { sys.join("unified") };
            available(&root, rel, "memory.max", "memory.current", u64::MAX)
        } else if controllers.split(',').any(|c| c == "memory") {
            available(&sys.join("memory"), rel, "memory.limit_in_bytes", "memory.usage_in_bytes", V1_UNLIMITED)
        } else {
            None
        };
        if let Some(free) = found {
            best = Some(best.map_or(free, |b| b.min(free)));
        }
    }
    best
}

/// The smallest of the limits named `limit_file` from `root/rel` up to
/// `root`, less the usage in `root/rel`; None if none is set.
fn available(root: &Path, rel: &str, limit_file: &str, usage_file: &str, unlimited: u64) -> Option<u64> {
    let leaf: PathBuf = root.join(rel);
    let limit = leaf
        .ancestors()
        .take_while(|d| d.starts_with(root))
        .filter_map(|d| read_u64(&d.join(limit_file)))
        .filter(|&l| l < unlimited)
        .min()?;
    let used = read_u64(&leaf.join(usage_file)).unwrap_or(0);
    Some(limit.saturating_sub(used))
}

/// A number in a cgroup file ("max" and anything else: None).
fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, file: &str, value: &str) {
        std::fs::create_dir_all(dir.join(rel)).unwrap();
        std::fs::write(dir.join(rel).join(file), value).unwrap();
    }

    #[test]
    fn v2_takes_the_smallest_limit_up_the_tree_less_the_usage() {
        let sys = tempfile::tempdir().unwrap();
        let s = sys.path();
        write(s, "", "cgroup.controllers", "cpu memory");
        write(s, "kubepods", "memory.max", "8589934592");
        write(s, "kubepods/pod1/ctr", "memory.max", "max");
        write(s, "kubepods/pod1/ctr", "memory.current", "1073741824");
        assert_eq!(memory_available(s, "0::/kubepods/pod1/ctr\n"), Some(7 << 30));
        write(s, "kubepods/pod1", "memory.max", "4294967296");
        assert_eq!(memory_available(s, "0::/kubepods/pod1/ctr\n"), Some(3 << 30));
    }

    #[test]
    fn v1_and_hybrid_read_the_memory_controller_and_ignore_unlimited() {
        let sys = tempfile::tempdir().unwrap();
        let s = sys.path();
        let cg = "12:pids:/\n4:memory:/job/7\n0::/\n";
        write(s, "memory", "memory.limit_in_bytes", "9223372036854771712");
        write(s, "memory/job/7", "memory.limit_in_bytes", "9223372036854771712");
        write(s, "memory/job/7", "memory.usage_in_bytes", "100");
        write(s, "unified", "cgroup.procs", "");
        assert_eq!(memory_available(s, cg), None, "unlimited everywhere");
        write(s, "memory/job", "memory.limit_in_bytes", "2147483648");
        assert_eq!(memory_available(s, cg), Some((2 << 30) - 100));
    }

    #[test]
    fn unreadable_or_missing_files_are_no_limit() {
        let sys = tempfile::tempdir().unwrap();
        assert_eq!(memory_available(sys.path(), "0::/nowhere\n4:memory:/nowhere\ngarbage\n"), None);
    }
}
