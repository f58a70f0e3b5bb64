//! The pre-faulted pool of a real daemon: filled at start, saves in a tight
//! loop served from it, kept across a restart, shown in `status` and
//! `/metrics`; and huge pages by default as root where nothing is hidden.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tierckpt_client::{Client, TensorData};
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::daemon::daemon_binary;
use tierckpt_harness::testing::{http, shm_dir, TestDaemon};
use tierckpt_proto::MemoryUsage;

/// Polls `status` until the filler has nothing left to do.
fn pool_ready(c: &mut Client) -> MemoryUsage {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = c.status().unwrap().memory;
        if !m.prefault_pending {
            return m;
        }
        assert!(Instant::now() < deadline, "the pool never filled: {m:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Saves `bytes` of data that differ at every step.
fn save(c: &mut Client, ns: &str, step: u64, bytes: usize) {
    let data: Vec<u8> = (0..bytes).map(|i| (i as u64 * 31 + step) as u8).collect();
    let t = [TensorData { name: "w", dtype: Dtype::U8, shape: &[data.len()], data: &data }];
    c.save(&ShardKey::new(ns, step, 0), 1, &t, &Default::default(), false).unwrap();
}

#[test]
fn the_pool_fills_at_start_and_a_tight_loop_of_saves_stays_on_it() {
    let d = TestDaemon::start("512MiB");
    let mut c = d.client();
    let m = pool_ready(&mut c);
    // The default share: a quarter of the capacity.
    assert_eq!(m.prefault_target, 128 << 20, "{m:?}");
    assert!(m.prefaulted >= m.prefault_target / 2 && m.prefaulted <= m.prefault_target, "{m:?}");
    assert_eq!(m.used, m.pooled, "the pool counts in used: {m:?}");

    save(&mut c, "tight", 0, 4 << 20);
    pool_ready(&mut c);
    // Back to back, without waiting for seals between saves.
    for step in 1..=8 {
        save(&mut c, "tight", step, 4 << 20);
    }
    let m = c.status().unwrap().memory;
    assert_eq!((m.reserved_from_pool, m.reserved_fresh), (9, 0), "every save landed on pooled pages: {m:?}");
    assert!(m.used <= m.capacity, "{m:?}");

    let (ok, out, _) = tierckpt_harness::testing::cli(&d.proc.socket, &["status"]);
    assert!(ok && out.contains("pre-faulted") && out.contains("served from the pool 9"), "{out}");
    let auth = d.bearer();
    let (code, body) = http(&d.http_addr(), "GET", "/metrics", &[("Authorization", auth.as_str())], b"");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(code, 200, "{text}");
    assert!(
        text.contains("tierckpt_memory_prefaulted_bytes")
            && text.contains("tierckpt_memory_reserved_from_pool_total 9"),
        "{text}"
    );
}

#[test]
fn a_share_of_zero_faults_nothing_in() {
    let d = TestDaemon::start_with("256MiB", |o| o.settings.prefault_share = Some(0.0));
    let mut c = d.client();
    let m = pool_ready(&mut c);
    assert_eq!((m.prefault_target, m.pooled, m.used), (0, 0, 0), "{m:?}");
    save(&mut c, "off", 0, 1 << 20);
    let m = c.status().unwrap().memory;
    assert_eq!((m.reserved_from_pool, m.reserved_fresh), (0, 1), "{m:?}");
}

#[test]
fn a_killed_daemon_restarts_with_its_pool() {
    let d = TestDaemon::start("256MiB");
    let mut proc = d.proc;
    let before = pool_ready(&mut Client::connect(&proc.socket).unwrap());
    proc.kill().unwrap();
    proc.restart().unwrap();
    let mut c = Client::connect(&proc.socket).unwrap();
    let m = c.status().unwrap().memory;
    assert!(m.pooled >= before.pooled, "pool/ files come back as pool segments: {m:?} (before {before:?})");
    save(&mut c, "restart", 0, 2 << 20);
    let m = pool_ready(&mut c);
    assert_eq!((m.reserved_from_pool, m.reserved_fresh), (1, 0), "{m:?}");
    assert!(m.used <= m.capacity, "{m:?}");
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Unmounts on drop, before the directory above it is removed.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        tierckpt_daemon::hugepages::unmount_lazily(&self.0);
    }
}

/// A daemon on `mem` left to its defaults about huge pages (the
/// workspace's cargo config turns the root default off for tests).
fn spawn_with_page_defaults(mem: &Path) -> (Child, Client) {
    let mut cmd = Command::new(daemon_binary());
    cmd.args(["--memory-dir", mem.to_str().unwrap(), "--memory-tier-size", "64MiB", "--http-addr", "off"])
        .env_remove("TIERCKPT_MOUNT_HUGE_TMPFS")
        .env("TIERCKPT_LOG", "warn")
        .stdout(Stdio::piped());
    tierckpt_harness::daemon::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    let client = Client::connect(ready["socket"].as_str().unwrap()).unwrap();
    (child, client)
}

#[test]
fn as_root_a_new_directory_gets_huge_pages_by_default_and_files_are_never_hidden() {
    let dir = shm_dir();
    let (fresh, used) = (dir.path().join("fresh"), dir.path().join("used"));
    let _unmount = Unmount(fresh.clone());
    let already = tierckpt_daemon::hugepages::inspect(dir.path()).is_some_and(|p| p.huge_pages());
    let (mut d, mut c) = spawn_with_page_defaults(&fresh);
    assert_eq!(c.status().unwrap().huge_pages, is_root() || already, "a new directory as root gets huge pages");
    d.kill().unwrap();
    d.wait().unwrap();

    std::fs::create_dir_all(&used).unwrap();
    std::fs::write(used.join("keep.txt"), b"precious").unwrap();
    let (mut d, mut c) = spawn_with_page_defaults(&used);
    assert_eq!(c.status().unwrap().huge_pages, already, "a directory holding files is left as it is");
    assert_eq!(std::fs::read(used.join("keep.txt")).unwrap(), b"precious");
    d.kill().unwrap();
    d.wait().unwrap();
}

#[test]
fn a_prepared_segment_is_mapped_here_and_the_save_lands_in_it() {
    use std::os::unix::fs::MetadataExt;
    let d = TestDaemon::start("256MiB");
    let mut c = d.client();
    let data = vec![7u8; 3 << 20];
    let t = [TensorData { name: "w", dtype: Dtype::U8, shape: &[data.len()], data: &data }];
    let specs = [tierckpt_format::TensorSpec { name: "w".into(), dtype: Dtype::U8, shape: vec![data.len()] }];
    let prepared = c.prepare(&specs, &Default::default()).unwrap();
    let mem = d.dir.path().join("mem");
    assert!(prepared.starts_with(mem.join("pool")), "{}", prepared.display());
    let ino = std::fs::metadata(&prepared).unwrap().ino();
    let key = ShardKey::new("prep", 1, 0);
    c.save(&key, 1, &t, &Default::default(), true).unwrap();
    let step_dir = std::fs::read_dir(mem.join("ns/prep")).unwrap().next().unwrap().unwrap().path();
    let shard = step_dir.join("rank-00000-of-00001.safetensors");
    assert_eq!(std::fs::metadata(&shard).unwrap().ino(), ino, "the save used the prepared segment");
    let mut back = vec![0u8; data.len()];
    c.load_into(&key, &mut [("w", &mut back[..])]).unwrap();
    assert!(back == data, "the shard round trips");
    // A prepare larger than the tier is refused, naming the sizes, and the save after it still works.
    let big = [tierckpt_format::TensorSpec { name: "w".into(), dtype: Dtype::U8, shape: vec![1 << 30] }];
    let e = c.prepare(&big, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("capacity") || e.to_string().contains("1073"), "{e}");
    c.save(&ShardKey::new("prep", 2, 0), 1, &t, &Default::default(), true).unwrap();
}
