//! Huge pages for the memory tier. On a tmpfs of 4 KiB pages, every process
//! that maps a shard first builds a page-table entry per 4 KiB: about 30 ms
//! per GiB, which a restore pays on top of its copy. On a tmpfs mounted with
//! `huge=within_size` the same GiB takes 512 entries. This module tells
//! which kind of tmpfs holds the memory directory and, when asked
//! (`mount_huge_tmpfs`; by default as root where nothing would be hidden),
//! mounts a huge-page tmpfs there; the mount outlives the daemon, so the
//! tier still survives a restart of the daemon.

use std::path::{Path, PathBuf};

use crate::DaemonError;

/// The file system holding a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageInfo {
    /// The mount point the directory is on.
    pub mount_point: PathBuf,
    /// Its file system type ("tmpfs").
    pub fs_type: String,
    /// Its `huge=` option, if any ("within_size", "always", ...).
    pub huge: Option<String>,
}

impl PageInfo {
    /// Whether files there get huge pages without an madvise.
    pub fn huge_pages(&self) -> bool {
        self.fs_type == "tmpfs" && matches!(self.huge.as_deref(), Some("always" | "within_size"))
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds the mount holding `dir` in the text of `/proc/self/mountinfo`:
/// the longest mount point above it, the newest of stacked ones.
pub fn find_mount(mountinfo: &str, dir: &Path) -> Option<PageInfo> {
    let mut best: Option<PageInfo> = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let Some(mount_point) = left.split(' ').nth(4).map(unescape) else { continue };
        let mut r = right.split(' ');
        let (Some(fs_type), _source, Some(opts)) = (r.next(), r.next(), r.next()) else { continue };
        let mp = PathBuf::from(&mount_point);
        if !dir.starts_with(&mp) {
            continue;
        }
        if best.as_ref().is_some_and(|b| b.mount_point.as_os_str().len() > mp.as_os_str().len()) {
            continue;
        }
        let huge = opts.split(',').find_map(|o| o.strip_prefix("huge=")).map(String::from);
        best = Some(PageInfo { mount_point: mp, fs_type: fs_type.to_string(), huge });
    }
    best
}

/// The mount holding `dir` (or its nearest existing ancestor).
pub fn inspect(dir: &Path) -> Option<PageInfo> {
    let existing = dir.ancestors().find(|a| a.exists())?;
    let canonical = existing.canonicalize().ok()?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    find_mount(&text, &canonical)
}

/// Mounts a tmpfs with `huge=within_size` of `size` bytes on `dir` unless
/// `dir` already is on one. Refuses a directory that holds files (they
/// would be hidden under the mount). Needs CAP_SYS_ADMIN.
pub fn ensure_huge_tmpfs(dir: &Path, size: u64) -> Result<PageInfo, DaemonError> {
    if let Some(info) = inspect(dir).filter(PageInfo::huge_pages) {
        return Ok(info);
    }
    std::fs::create_dir_all(dir).map_err(|e| DaemonError::io(format!("creating {}", dir.display()), e))?;
    let used =
        std::fs::read_dir(dir).map_err(|e| DaemonError::io(format!("listing {}", dir.display()), e))?.next().is_some();
    if used {
        return Err(DaemonError::Config(format!(
            "mount_huge_tmpfs: {} already holds files on a file system without huge pages; \
             move them away (or drop mount_huge_tmpfs) so nothing is hidden under the new mount",
            dir.display()
        )));
    }
    let c = |s: &str| std::ffi::CString::new(s).map_err(|_| DaemonError::Config(format!("{s:?} holds a NUL byte")));
    let target = c(&dir.display().to_string())?;
    let (fstype, opts) = (c("tmpfs")?, c(&format!("huge=within_size,size={size},mode=0700"))?);
    // SAFETY: every pointer is a valid NUL-terminated string for the call.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, opts.as_ptr().cast()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::EPERM) {
            "; mounting needs root (CAP_SYS_ADMIN): run the daemon as root, or mount the tmpfs beforehand \
             (mount -t tmpfs -o huge=within_size,size=... tmpfs DIR) and drop mount_huge_tmpfs"
        } else {
            ""
        };
        return Err(DaemonError::Config(format!("mounting a huge-page tmpfs on {}: {e}{hint}", dir.display())));
    }
    tracing::info!(dir = %dir.display(), size, "mounted a tmpfs with huge pages (huge=within_size) for the memory tier");
    inspect(dir).ok_or_else(|| DaemonError::Config(format!("{} is not listed in /proc/self/mountinfo", dir.display())))
}

/// What a daemon running as root does without `mount_huge_tmpfs` set:
/// mounts a huge-page tmpfs on `dir` only where that hides nothing (`dir`
/// is new or empty) and the mount succeeds; otherwise keeps what is there.
/// Returns the pages `dir` then has.
pub fn huge_tmpfs_where_harmless(dir: &Path, size: u64) -> Option<PageInfo> {
    let info = inspect(dir);
    if info.as_ref().is_some_and(PageInfo::huge_pages) {
        return info;
    }
    let holds_files = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    if holds_files {
        tracing::info!(
            dir = %dir.display(),
            "not mounting a huge-page tmpfs on the memory directory: it holds files that the mount would hide"
        );
        return info;
    }
    match ensure_huge_tmpfs(dir, size) {
        Ok(info) => Some(info),
        Err(e) => {
            tracing::warn!(error = %e, "could not mount a huge-page tmpfs; the memory tier keeps the pages it has");
            inspect(dir)
        }
    }
}

/// Unmounts `dir` lazily (a mapping of it may still be open); for tests and
/// benchmarks that mounted a tier of their own. Errors are ignored.
pub fn unmount_lazily(dir: &Path) {
    if let Ok(p) = std::ffi::CString::new(dir.display().to_string()) {
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime - ext4 /dev/vda rw
25 22 0:21 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24684092k
40 25 0:30 / /dev/shm/tier rw,relatime - tmpfs tmpfs rw,size=6291456k,huge=within_size
41 22 0:31 / /mnt/with\\040space rw - tmpfs tmpfs rw,huge=always
42 25 0:32 / /dev/shm/tier rw,relatime - tmpfs tmpfs rw,size=1k
";

    #[test]
    fn finds_the_mount_and_its_page_size() {
        let m = find_mount(INFO, Path::new("/dev/shm/other/x")).unwrap();
        assert_eq!(
            (m.mount_point.as_path(), m.fs_type.as_str(), m.huge_pages()),
            (Path::new("/dev/shm"), "tmpfs", false)
        );
        // Stacked mounts: the newest one counts.
        let m = find_mount(INFO, Path::new("/dev/shm/tier/ns")).unwrap();
        assert_eq!(m.mount_point, Path::new("/dev/shm/tier"));
        assert!(!m.huge_pages(), "{m:?}");
        let m = find_mount(INFO, Path::new("/mnt/with space/a")).unwrap();
        assert!(m.huge_pages() && m.huge.as_deref() == Some("always"), "{m:?}");
        // A longer name is no parent: /dev/shmx is not under /dev/shm.
        assert_eq!(find_mount(INFO, Path::new("/dev/shmx")).unwrap().mount_point, Path::new("/"));
        assert_eq!(find_mount(INFO, Path::new("/home")).unwrap().fs_type, "ext4");
    }
}
