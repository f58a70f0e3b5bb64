//! The memory tier's directory belongs to its user: another user's or a
//! world-writable directory is refused, planted symlinks are never
//! followed, and what it stores is private (or group-readable when asked).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use tierckpt_format::ShardKey;
use tierckpt_tiers::conformance::sample_shard;
use tierckpt_tiers::private_fs::Access;
use tierckpt_tiers::{MemoryTier, MemoryTierConfig};

/// A fresh directory of this user under /dev/shm (mode 0700).
fn shm_dir() -> tempfile::TempDir {
    let base = Path::new("/dev/shm");
    let b = tempfile::Builder::new().prefix("tierckpt-private-").to_owned();
    if base.is_dir() { b.tempdir_in(base) } else { b.tempdir() }.unwrap()
}

fn open(root: &Path) -> tierckpt_tiers::Result<MemoryTier> {
    MemoryTier::open(MemoryTierConfig::new(root, 64 << 20))
}

fn save(t: &MemoryTier, key: &ShardKey) -> Vec<u8> {
    let (_, data) = sample_shard(key.clone(), 1, 3, 7);
    let r = t.reserve(key, 1, data.len() as u64).unwrap();
    std::fs::write(&r.path, &data).unwrap();
    t.seal(r.id).unwrap();
    data
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn refuses_a_directory_others_can_write_or_a_symlink() {
    let base = shm_dir();
    let open_dir = base.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = open(&open_dir).unwrap_err().to_string();
    assert!(e.contains("may be written by others") && e.contains("open"), "{e}");
    assert!(std::fs::read_dir(&open_dir).unwrap().next().is_none(), "nothing was created in a refused directory");

    let link = base.path().join("link");
    std::os::unix::fs::symlink(base.path().join("elsewhere"), &link).unwrap();
    std::fs::create_dir(base.path().join("elsewhere")).unwrap();
    let e = open(&link).unwrap_err().to_string();
    assert!(e.contains("is not a directory (a symlink"), "{e}");

    // A parent that others may write (not sticky) is refused too.
    let shared = base.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = open(&shared.join("tier")).unwrap_err().to_string();
    assert!(e.contains("which another user may write"), "{e}");
}

#[test]
fn refuses_a_directory_another_user_prepared() {
    if !is_root() {
        eprintln!("needs root to give a directory to another user; CI runs as root");
        return;
    }
    let base = shm_dir();
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let e = open(&theirs).unwrap_err().to_string();
    assert!(e.contains("belongs to uid 65534"), "{e}");
}

#[test]
fn planted_symlinks_are_never_followed() {
    let base = shm_dir();
    let root = base.path().join("tier");
    let victim = base.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    drop(open(&root).unwrap());
    // A step directory and a pending segment that point outside the tier,
    // at a directory holding a well-formed shard and its manifest.
    let stolen = {
        let other = base.path().join("other");
        let t = open(&other).unwrap();
        let key = ShardKey::new("evil", 1, 0);
        save(&t, &key);
        let step_dir = other.join("ns/evil/00000000000000000001");
        for f in std::fs::read_dir(&step_dir).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), victim.join(f.file_name())).unwrap();
        }
        std::fs::read_dir(&victim).unwrap().count()
    };
    assert_eq!(stolen, 2, "the victim directory holds a shard and its manifest");
    std::fs::create_dir_all(root.join("ns/evil")).unwrap();
    std::os::unix::fs::symlink(&victim, root.join("ns/evil/00000000000000000001")).unwrap();
    let secret = victim.join("secret.seg");
    std::fs::write(&secret, b"secret").unwrap();
    std::os::unix::fs::symlink(&secret, root.join("pending/7.seg")).unwrap();

    let t = open(&root).unwrap();
    assert!(t.namespaces().is_empty(), "a symlinked step was indexed: {:?}", t.namespaces());
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 3, "files were moved out of the victim directory");
    assert_eq!(std::fs::read(&secret).unwrap(), b"secret");
    // A new reservation never reuses the planted pending link.
    let key = ShardKey::new("job", 1, 0);
    save(&t, &key);
    assert_eq!(std::fs::read(&secret).unwrap(), b"secret");
}

#[test]
fn stored_files_are_private_or_group_readable() {
    let base = shm_dir();
    let root = base.path().join("tier");
    // An existing directory of ours with a wider mode is narrowed.
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let t = open(&root).unwrap();
    let key = ShardKey::new("job", 3, 0);
    save(&t, &key);
    let (data, _) = t.locate(&key).unwrap();
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(data.parent().unwrap()), 0o700, "the step directory");
    assert_eq!(mode(&root.join("ns/job")), 0o700, "the namespace directory");
    assert_eq!(mode(&data), 0o600, "the shard");
    assert_eq!(mode(&data.with_extension("").with_extension("manifest.json")), 0o600, "the manifest");
    drop(t);

    let gid = 65534;
    let groupdir = base.path().join("group");
    let mut cfg = MemoryTierConfig::new(&groupdir, 64 << 20);
    cfg.access = Access { group: Some(gid), ..Default::default() };
    if !is_root() {
        eprintln!("needs root to give files to another group; CI runs as root");
        return;
    }
    let t = MemoryTier::open(cfg).unwrap();
    save(&t, &key);
    let (data, _) = t.locate(&key).unwrap();
    for (p, want) in [(groupdir.clone(), 0o750), (data.parent().unwrap().to_path_buf(), 0o750), (data.clone(), 0o640)] {
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.mode() & 0o7777, m.gid()), (want, gid), "{}", p.display());
    }
}
