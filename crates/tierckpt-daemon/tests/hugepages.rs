//! `mount_huge_tmpfs`: the daemon mounts a huge-page tmpfs for its memory
//! tier, once, keeps it across its own restarts, and never hides files.

use std::path::{Path, PathBuf};
use std::process::Command;

use tierckpt_client::{Client, TensorData};
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::daemon::{daemon_binary, DaemonOptions, DaemonProcess};
use tierckpt_harness::testing::shm_dir;

/// Unmounts on drop, before the directory above it is removed.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        tierckpt_daemon::hugepages::unmount_lazily(&self.0);
    }
}

fn mounts_on(dir: &Path) -> usize {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
        .count()
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn mounted_once_with_huge_pages_and_kept_across_a_daemon_restart() {
    let dir = shm_dir();
    let mem = dir.path().join("mem");
    if !is_root() {
        let out = Command::new(daemon_binary())
            .args(["--memory-dir", mem.to_str().unwrap(), "--http-addr", "off", "--mount-huge-tmpfs"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"), "{out:?}");
        return;
    }
    let _unmount = Unmount(mem.clone());
    let mut opts = DaemonOptions::new(&mem);
    opts.settings.memory_tier_size = Some("64MiB".into());
    opts.settings.http_addr = Some("off".into());
    opts.settings.mount_huge_tmpfs = Some(true);
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    let key = ShardKey::new("huge", 1, 0);
    {
        let d = DaemonProcess::spawn(opts.clone()).unwrap();
        let mut c = Client::connect(&d.socket).unwrap();
        assert!(c.status().unwrap().huge_pages);
        let t = [TensorData { name: "w", dtype: Dtype::U8, shape: &[data.len()], data: &data }];
        c.save(&key, 1, &t, &Default::default(), true).unwrap();
    }
    assert_eq!(mounts_on(&mem), 1);
    // The daemon died; the mount and the shard did not. A new daemon mounts nothing more.
    let d = DaemonProcess::spawn(opts).unwrap();
    assert_eq!(mounts_on(&mem), 1);
    let mut c = Client::connect(&d.socket).unwrap();
    assert!(c.status().unwrap().huge_pages);
    let mut back = vec![0u8; data.len()];
    c.load_into(&key, &mut [("w", &mut back[..])]).unwrap();
    assert!(back == data);
}

#[test]
fn a_directory_holding_files_is_refused_not_hidden() {
    let dir = shm_dir();
    let mem = dir.path().join("mem");
    std::fs::create_dir_all(&mem).unwrap();
    std::fs::write(mem.join("keep.txt"), b"precious").unwrap();
    if tierckpt_daemon::hugepages::inspect(&mem).is_some_and(|p| p.huge_pages()) {
        // Already on huge pages: nothing to mount, so nothing to refuse.
        let mut o = DaemonOptions::new(&mem);
        o.settings.mount_huge_tmpfs = Some(true);
        drop(DaemonProcess::spawn(o).unwrap());
        assert_eq!(std::fs::read(mem.join("keep.txt")).unwrap(), b"precious");
        return;
    }
    let out = Command::new(daemon_binary())
        .args(["--memory-dir", mem.to_str().unwrap(), "--http-addr", "off", "--mount-huge-tmpfs"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already holds files") && err.contains(mem.to_str().unwrap()), "{err}");
    assert_eq!(mounts_on(&mem), 0);
    assert_eq!(std::fs::read(mem.join("keep.txt")).unwrap(), b"precious");
}

#[test]
fn status_tells_whether_the_tier_has_huge_pages() {
    let d = tierckpt_harness::testing::TestDaemon::start("16MiB");
    let expected = tierckpt_daemon::hugepages::inspect(d.proc.opts.memory_dir()).is_some_and(|p| p.huge_pages());
    assert_eq!(d.client().status().unwrap().huge_pages, expected);
    let (ok, out, _) = tierckpt_harness::testing::cli(&d.proc.socket, &["status"]);
    assert!(ok && out.contains(if expected { "huge pages" } else { "4 KiB pages" }), "{out}");
}
