//! Private files and directories for the memory tier and the daemon's own
//! records: a directory is trusted only if this user owns it and no one else
//! can write it, everything is created owner-only (or group-readable when a
//! group is configured), and nothing is opened through a symlink.
//!
//! `/dev/shm` is writable by every user: another user could create the memory
//! directory first, or plant symlinks in it, to make a daemon move or append
//! to files it should not touch. [`prepare_dir`] refuses such a directory.

use std::fs::{self, DirBuilder, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{Result, TierError};

/// Who may read what the daemon stores: its own user alone, or also the
/// members of one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    /// A group (gid) whose members may read shards; none: owner only.
    pub group: Option<u32>,
    /// The group's members also write segments (trainers of other users
    /// that connect through a socket group): free and reserved segments
    /// are group-writable (0660); sealed shards are not.
    pub group_writes: bool,
}

impl Access {
    /// Mode of new files: 0600, or 0640 with a group.
    pub fn file_mode(self) -> u32 {
        if self.group.is_some() {
            0o640
        } else {
            0o600
        }
    }

    /// Mode of new directories: 0700, or 0750 with a group.
    pub fn dir_mode(self) -> u32 {
        if self.group.is_some() {
            0o750
        } else {
            0o700
        }
    }

    /// Options that create (or open) a file with [`Self::file_mode`], never
    /// through a symlink.
    pub fn create_options(self) -> OpenOptions {
        let mut o = OpenOptions::new();
        o.mode(self.file_mode()).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
        o
    }

    /// Creates `dir` and its missing parents below an already trusted one,
    /// with [`Self::dir_mode`] (and the group when configured).
    pub fn create_dir_all(self, dir: &Path) -> io::Result<()> {
        DirBuilder::new().recursive(true).mode(self.dir_mode()).create(dir)?;
        if let Some(gid) = self.group {
            chown_group(dir, gid)?;
        }
        Ok(())
    }

    /// Replaces `path` with `bytes` at once: written to `<path>.tmp`, then
    /// renamed over it, so a reader sees the old file or the new one.
    pub fn write_atomically(self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = self.create_options().write(true).create(true).truncate(true).open(&tmp)?;
        self.own_file(&f)?;
        std::io::Write::write_all(&mut f, bytes)?;
        fs::rename(&tmp, path)
    }

    /// Gives a file just created the configured group.
    pub fn own_file(self, file: &File) -> io::Result<()> {
        if let Some(gid) = self.group {
            std::os::unix::fs::fchown(file, None, Some(gid))?;
        }
        Ok(())
    }

    /// Mode of a free or reserved segment: 0660 when the group writes,
    /// else [`Self::file_mode`].
    pub fn segment_mode(self) -> u32 {
        match self.group.is_some() && self.group_writes {
            true => 0o660,
            false => self.file_mode(),
        }
    }

    /// Gives the segment at `path` (ours, in a trusted directory) the
    /// segment mode, or with `sealed` the mode of a stored shard.
    pub fn set_segment_mode(self, path: &Path, sealed: bool) -> io::Result<()> {
        if !self.group_writes {
            return Ok(());
        }
        let mode = if sealed { self.file_mode() } else { self.segment_mode() };
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
    }
}

fn chown_group(path: &Path, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, None, Some(gid))
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Opens an existing file for reading, never through a symlink.
pub fn open_read(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

/// Opens an existing file for writing, never through a symlink.
pub fn open_write(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

/// Why a directory cannot be trusted, if it cannot: it is not a directory
/// (a symlink, a file), another user owns it, or others may write it.
fn untrusted(meta: &Metadata, me: u32) -> Option<String> {
    if !meta.file_type().is_dir() {
        return Some("is not a directory (a symlink or a file)".into());
    }
    if meta.uid() != me {
        return Some(format!("belongs to uid {}, not to this daemon's user (uid {me})", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!("may be written by others (mode {:o})", meta.mode() & 0o7777));
    }
    None
}

/// Whether a directory above a trusted one may hold it: owned by this user or
/// root and not writable by others, or writable by all but sticky (`/tmp`,
/// `/dev/shm`), where no user may replace what another created.
fn safe_parent(meta: &Metadata, me: u32) -> bool {
    let mode = meta.mode();
    let sticky = mode & libc::S_ISVTX != 0;
    meta.file_type().is_dir() && (sticky || ((meta.uid() == me || meta.uid() == 0) && mode & 0o022 == 0))
}

/// Makes `dir` a private directory of this user, creating it if needed:
/// refuses one that is a symlink, belongs to another user, or that others
/// may write, and one below a parent where another user could replace it.
/// An existing directory of ours is narrowed to [`Access::dir_mode`].
pub fn prepare_dir(dir: &Path, access: Access) -> Result<()> {
    let me = effective_uid();
    let refuse = |why: String| {
        TierError::InvalidArgument(format!(
            "refusing the directory {}: it {why}; another user may have prepared it. Remove it (or fix its owner \
             and mode: chown to this user, chmod 700) or choose another directory",
            dir.display()
        ))
    };
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Err(e) = fs::create_dir_all(parent) {
        return Err(TierError::io(format!("creating {}", parent.display()), e));
    }
    check_ancestors(parent, me).map_err(refuse)?;
    match DirBuilder::new().mode(access.dir_mode()).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(TierError::io(format!("creating {}", dir.display()), e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(|e| TierError::io(format!("inspecting {}", dir.display()), e))?;
    if let Some(why) = untrusted(&meta, me) {
        return Err(refuse(why));
    }
    if let Some(gid) = access.group {
        chown_group(dir, gid).map_err(|e| TierError::io(format!("giving {} to group {gid}", dir.display()), e))?;
    }
    if meta.mode() & 0o777 != access.dir_mode() {
        fs::set_permissions(dir, fs::Permissions::from_mode(access.dir_mode()))
            .map_err(|e| TierError::io(format!("narrowing the mode of {}", dir.display()), e))?;
    }
    Ok(())
}

/// Checks that no user but this one (or root) could replace `dir` or one
/// of its ancestors (symlinks resolved).
fn check_ancestors(dir: &Path, me: u32) -> std::result::Result<(), String> {
    let real =
        dir.canonicalize().map_err(|e| format!("has a parent {} that cannot be resolved: {e}", dir.display()))?;
    let mut at: Option<&Path> = Some(&real);
    while let Some(p) = at {
        let meta = fs::metadata(p).map_err(|e| format!("has a parent {} that cannot be read: {e}", p.display()))?;
        if !safe_parent(&meta, me) {
            return Err(format!(
                "lies in {}, which another user may write (owner uid {}, mode {:o})",
                p.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
        at = p.parent();
    }
    Ok(())
}

/// A private subdirectory of a trusted directory: created if missing; an
/// existing entry must be a real directory of this user.
pub fn prepare_subdir(dir: &Path, access: Access) -> Result<PathBuf> {
    match DirBuilder::new().mode(access.dir_mode()).create(dir) {
        Ok(()) => {
            if let Some(gid) = access.group {
                chown_group(dir, gid).map_err(|e| TierError::io(format!("giving {} a group", dir.display()), e))?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta =
                fs::symlink_metadata(dir).map_err(|e| TierError::io(format!("inspecting {}", dir.display()), e))?;
            if let Some(why) = untrusted(&meta, effective_uid()) {
                return Err(TierError::InvalidArgument(format!(
                    "refusing {}: it {why}; remove it and start again",
                    dir.display()
                )));
            }
        }
        Err(e) => return Err(TierError::io(format!("creating {}", dir.display()), e)),
    }
    Ok(dir.to_path_buf())
}

/// Whether an entry found in a private directory is what it should be: of
/// this user, and a real directory (`want_dir`) or a regular file, never a
/// symlink. Logs and returns false otherwise.
pub fn is_own(path: &Path, meta: &Metadata, want_dir: bool) -> bool {
    let ft = meta.file_type();
    let kind_ok = if want_dir { ft.is_dir() } else { ft.is_file() };
    if kind_ok && meta.uid() == effective_uid() {
        return true;
    }
    tracing::warn!(
        path = %path.display(),
        uid = meta.uid(),
        symlink = ft.is_symlink(),
        "ignoring an entry that is not a {} of this user",
        if want_dir { "directory" } else { "regular file" }
    );
    false
}
