//! The persistent tier behind a real daemon: background drain, atomic
//! commit, retention, restore after all memory is lost, crashes mid-upload
//! (and the staging files they leave),
//! a flaky store, a full file system, corrupted persisted bytes, and a real
//! S3-protocol server.

use tierckpt_harness::moto;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tierckpt_client::{Client, ErrorKind, TensorData};
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::daemon::{LocalCluster, LocalClusterOptions};
use tierckpt_harness::testing::{committed_steps, shm_dir, TestDaemon};

const LIMIT: Duration = Duration::from_secs(60);

fn payload(step: u64, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u64 * 31 + step * 7) as u8).collect()
}

fn save(c: &mut Client, ns: &str, step: u64, n: usize) -> Vec<u8> {
    let data = payload(step, n);
    let t = [TensorData { name: "w", dtype: Dtype::U8, shape: &[n], data: &data }];
    c.save(&ShardKey::new(ns, step, 0), 1, &t, &BTreeMap::new(), true).unwrap();
    data
}

fn load(c: &mut Client, ns: &str, step: u64, n: usize) -> Result<Vec<u8>, tierckpt_client::Error> {
    let mut buf = vec![0u8; n];
    c.load_into(&ShardKey::new(ns, step, 0), &mut [("w", &mut buf[..])])?;
    Ok(buf)
}

fn drain_status(c: &mut Client, ns: &str) -> serde_json::Value {
    let s = c.status().unwrap();
    let p = s.persistent.expect("the daemon drains");
    p["namespaces"].as_array().unwrap().iter().find(|n| n["namespace"] == ns).cloned().unwrap_or_default()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn daemon(target: &str, extra: &[&str]) -> TestDaemon {
    let mut args = vec!["--persistent-path".to_string(), target.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    TestDaemon::start_with("256MiB", |o| o.set_flags(&args).expect("valid flags"))
}

/// SIGKILLs the daemon, deletes its memory tier, and starts it again.
fn lose_all_memory(d: &mut TestDaemon) {
    d.proc.kill().unwrap();
    std::fs::remove_dir_all(d.proc.memory_dir()).unwrap();
    d.proc.restart().unwrap();
}

/// A daemon draining to a `file://` store in a fresh tmpfs directory.
fn file_daemon(extra: &[&str]) -> (tempfile::TempDir, TestDaemon) {
    let store = shm_dir();
    let d = daemon(&format!("file://{}", store.path().display()), extra);
    (store, d)
}

/// The shard file of `ns`/`step` rank 0 in a daemon's memory tier.
fn memory_file(d: &TestDaemon, ns: &str, step: u64) -> std::path::PathBuf {
    d.proc.memory_dir().join("ns").join(ns).join(format!("{step:020}")).join("rank-00000-of-00001.safetensors")
}

/// Flips one byte of a file.
fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 1;
    std::fs::write(path, b).unwrap();
}

/// The file holding `ns`/`step` rank 0 in a `file://` store.
fn stored_file(store: &Path, ns: &str, step: u64) -> std::path::PathBuf {
    let data_dir = store.join(ns).join(format!("{step:020}")).join("data");
    let writer = std::fs::read_dir(&data_dir).unwrap().next().unwrap().unwrap().path();
    std::fs::read_dir(&writer).unwrap().next().unwrap().unwrap().path()
}

#[test]
fn a_shard_file_removed_behind_the_daemon_falls_through_to_the_persistent_tier() {
    let (store, d) = file_daemon(&["--persist-compression", "off"]);
    let mut c = d.client();
    let n = 3 << 20;
    let data = save(&mut c, "gone", 4, n);
    wait_for("committed", || committed_steps(store.path(), "gone") == [4]);
    std::fs::remove_file(memory_file(&d, "gone", 4)).unwrap();
    assert!(load(&mut c, "gone", 4, n).unwrap() == data, "restored from the persistent tier");
    // A truncated copy is dropped and replaced the same way.
    std::fs::OpenOptions::new().write(true).open(memory_file(&d, "gone", 4)).unwrap().set_len(10).unwrap();
    assert!(load(&mut c, "gone", 4, n).unwrap() == data, "restored again after a truncation");
}

#[test]
fn a_step_corrupt_on_every_tier_is_skipped_by_latest() {
    let (store, mut d) = file_daemon(&["--persist-compression", "off", "--persist-delta", "false"]);
    let mut c = d.client();
    let n = 5 << 20;
    let good = save(&mut c, "rot2", 14, n);
    save(&mut c, "rot2", 15, n);
    wait_for("committed", || committed_steps(store.path(), "rot2") == [14, 15]);
    flip_byte(&memory_file(&d, "rot2", 15), n / 2);
    flip_byte(&stored_file(store.path(), "rot2", 15), n / 2);
    assert_eq!(c.latest("rot2").unwrap(), Some(15));
    let e = load(&mut c, "rot2", 15, n).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_eq!(c.latest("rot2").unwrap(), Some(14), "latest moves to the newest restorable step");
    assert_eq!(c.status().unwrap().unrestorable.get("rot2"), Some(&vec![15]));
    assert!(load(&mut c, "rot2", 14, n).unwrap() == good);
    // The mark outlives a restart of the daemon.
    d.proc.kill().unwrap();
    d.proc.restart().unwrap();
    assert_eq!(d.client().latest("rot2").unwrap(), Some(14));
    // A new copy of the step, sealed again, clears it.
    let mut c = d.client();
    c.delete_step("rot2", 15).ok();
    let again = save(&mut c, "rot2", 15, n);
    assert_eq!(c.latest("rot2").unwrap(), Some(15));
    assert!(load(&mut c, "rot2", 15, n).unwrap() == again);
}

#[test]
fn drains_in_the_background_and_restores_after_all_memory_is_lost() {
    let (store, mut d) = file_daemon(&["--persist-keep-last", "2", "--persist-delta", "false"]);
    let n = 3 << 20;
    let mut c = d.client();
    let mut last = Vec::new();
    for step in [10, 20, 30] {
        last = save(&mut c, "job", step, n);
        // One at a time: the drainer persists the newest complete step it sees.
        wait_for("the step committed", || drain_status(&mut c, "job")["last_committed"] == step);
    }
    let (ok, out, _) = tierckpt_harness::testing::cli(&d.proc.socket, &["status"]);
    assert!(
        ok && out.contains("persistent tier") && out.contains(&format!("file://{}", store.path().display())),
        "{out}"
    );
    assert_eq!(committed_steps(store.path(), "job"), [20, 30], "persistent retention keeps 2");
    // Total memory loss: the daemon dies and its tmpfs directory is wiped.
    lose_all_memory(&mut d);
    let mut c = d.client();
    assert!(c.steps("job").unwrap().is_empty(), "memory is empty");
    assert_eq!(c.latest("job").unwrap(), Some(30), "latest comes from the persistent tier");
    assert!(load(&mut c, "job", 30, n).unwrap() == last, "restored bitwise from file://");
    // The shard is now back in memory too.
    assert_eq!(c.steps("job").unwrap().len(), 1);
}

#[test]
fn persist_every_skips_checkpoints_between() {
    let (store, d) = file_daemon(&["--persist-every", "2", "--persist-keep-last", "10"]);
    let mut c = d.client();
    for step in 1..=4 {
        save(&mut c, "every", step, 1000);
        // One at a time, so each is seen complete before the next.
        wait_for("the drainer to decide", || {
            let s = drain_status(&mut c, "every");
            s["last_committed"].as_u64().unwrap_or(0) + s["skipped"].as_u64().unwrap_or(0) >= step
                || s["last_committed"] == step
        });
    }
    wait_for("step 3 committed", || committed_steps(store.path(), "every").contains(&3));
    assert_eq!(committed_steps(store.path(), "every"), [1, 3]);
}

#[test]
fn killed_mid_upload_leaves_no_committed_partial_step_and_finishes_after_restart() {
    let store = shm_dir();
    let url = format!("file://{}", store.path().display());
    // Every store request takes 300 ms, so the kill lands mid-upload.
    let mut d = daemon(&url, &["--persistent-faults", "delay=300ms"]);
    let n = 40 << 20;
    let mut c = d.client();
    let data = save(&mut c, "mid", 7, n);
    wait_for("the upload to start", || drain_status(&mut c, "mid")["uploading"].is_string());
    d.proc.kill().unwrap();
    assert!(committed_steps(store.path(), "mid").is_empty(), "nothing committed");
    d.proc.opts.settings.persistent_path = Some(url.clone());
    d.proc.restart().unwrap();
    let c = d.client();
    wait_for("step 7 committed after restart", || committed_steps(store.path(), "mid") == [7]);
    // Only the committed upload is left under the step.
    let data_dir = store.path().join("mid").join(format!("{:020}", 7)).join("data");
    wait_for("leftovers cleaned", || std::fs::read_dir(&data_dir).map(|r| r.count()).unwrap_or(0) == 1);
    lose_all_memory(&mut d);
    let mut c2 = d.client();
    assert!(load(&mut c2, "mid", 7, n).unwrap() == data);
    drop(c);
}

/// Files under `dir` named like object_store's staging files (`<name>#<digits>`).
fn staging_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                stack.push(p);
            } else if name.rsplit_once('#').is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn a_sigkill_mid_upload_leaves_no_staging_file_once_the_step_is_committed() {
    let store = shm_dir();
    let url = format!("file://{}", store.path().display());
    // 48 MiB at 16 MB/s: three parts, the last due after 2 s.
    let args = ["--persist-bandwidth", "16MB", "--persist-compression", "off", "--persist-delta", "false"];
    let mut d = daemon(&url, &args);
    // Not ours (no shard name before the '#'): never removed.
    std::fs::write(store.path().join("README#1"), b"keep").unwrap();
    let n = 48 << 20;
    let mut c = d.client();
    let data = save(&mut c, "orphan", 7, n);
    wait_for("the upload to start", || drain_status(&mut c, "orphan")["uploading"].is_string());
    let step_dir = store.path().join("orphan").join(format!("{:020}", 7));
    wait_for("the staging file", || !staging_files(&step_dir).is_empty());
    d.proc.kill().unwrap();
    let left = staging_files(&step_dir);
    assert!(!left.is_empty() && committed_steps(store.path(), "orphan").is_empty(), "killed mid-upload");

    d.proc.opts.settings.persist_bandwidth = None;
    d.proc.restart().unwrap();
    wait_for("step 7 committed after restart", || committed_steps(store.path(), "orphan") == [7]);
    wait_for("the staging files removed", || staging_files(store.path()).len() == 1);
    assert_eq!(staging_files(store.path()), [store.path().join("README#1")], "only ours removed");
    let writers = std::fs::read_dir(step_dir.join("data")).unwrap().count();
    assert_eq!(writers, 1, "only the committed upload's directory is left");
    lose_all_memory(&mut d);
    let mut c2 = d.client();
    assert!(load(&mut c2, "orphan", 7, n).unwrap() == data, "restored bitwise");
}

#[test]
fn a_store_failing_30_percent_of_requests_still_commits() {
    let (store, d) = file_daemon(&["--persistent-faults", "fail=0.3,seed=3"]);
    let mut c = d.client();
    for step in 1..=3 {
        save(&mut c, "flaky", step, 200_000);
    }
    wait_for("step 3 committed", || committed_steps(store.path(), "flaky").contains(&3));
}

#[test]
fn a_throttled_slow_store_still_commits_and_restores_while_saves_go_on_in_memory() {
    // 10 requests a second, each 30 ms late; over the rate: 503 SlowDown.
    let (store, mut d) = file_daemon(&[
        "--persistent-faults",
        "rate=10,delay=30ms,seed=5",
        "--persist-delta",
        "false",
        "--persist-keep-last",
        "10",
    ]);
    let mut c = d.client();
    let n = 300_000;
    let mut saved = Vec::new();
    for step in 1..=6 {
        saved.push(save(&mut c, "slow", step, n));
        // Saves land in memory whatever the store does.
        assert_eq!(c.latest("slow").unwrap(), Some(step));
    }
    wait_for("step 6 committed", || committed_steps(store.path(), "slow").contains(&6));
    lose_all_memory(&mut d);
    let mut c = d.client();
    assert_eq!(c.latest("slow").unwrap(), Some(6), "latest read through the throttled store");
    assert!(load(&mut c, "slow", 6, n).unwrap() == saved[5], "restored bitwise through the throttled store");
    for step in committed_steps(store.path(), "slow") {
        assert!(load(&mut c, "slow", step, n).unwrap() == saved[step as usize - 1], "step {step}");
    }
}

/// The steps of `ns` in a `file://` store with rank records but no COMMIT.
fn begun_not_committed(dir: &Path, ns: &str) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir.join(ns))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| !e.path().join("COMMIT").exists() && e.path().join("ranks").is_dir())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

#[test]
fn a_cluster_whose_drain_is_slower_than_its_checkpoints_keeps_committing_steps() {
    let dir = shm_dir();
    let store = shm_dir();
    let mut o = LocalClusterOptions { nodes: 3, ..Default::default() };
    o.settings.memory_tier_size = Some("256MiB".into());
    o.settings.keep_last = Some(100);
    o.settings.persistent_path = Some(format!("file://{}", store.path().display()));
    o.settings.persist_keep_last = Some(100);
    o.settings.persist_delta = Some(false);
    // Every request to the store takes 40 ms: a step's drain takes several
    // times longer than the 25 ms between checkpoints.
    o.settings.persistent_faults = Some("delay=40ms".into());
    let c = LocalCluster::start(dir.path(), o).unwrap();
    let mut clients: Vec<Client> = (0..3).map(|i| Client::connect(c.socket(i)).unwrap()).collect();
    let n = 100_000;
    for step in 1..=120u64 {
        for (rank, client) in clients.iter_mut().enumerate() {
            let data = payload(step * 3 + rank as u64, n);
            let t = [TensorData { name: "w", dtype: Dtype::U8, shape: &[n], data: &data }];
            client.save(&ShardKey::new("fast", step, rank as u32), 3, &t, &BTreeMap::new(), true).unwrap();
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    // Nodes that each went for their own newest step committed 0 to 3 steps
    // here in seven runs; finishing what another node began before beginning
    // another, 5 or 6 (the saves pace it: a slower machine commits more).
    let while_saving = committed_steps(store.path(), "fast");
    assert!(while_saving.len() >= 4, "steps committed while checkpoints came faster than the drain: {while_saving:?}");
    wait_for("the newest step committed", || committed_steps(store.path(), "fast").contains(&120));
    wait_for("no step begun and left uncommitted", || begun_not_committed(store.path(), "fast").is_empty());
}

#[test]
fn a_cluster_node_holding_steps_newer_than_the_last_commit_lists_the_store_rarely() {
    let (dir, store) = (shm_dir(), shm_dir());
    let mut o = LocalClusterOptions { nodes: 2, ..Default::default() };
    o.settings.memory_tier_size = Some("256MiB".into());
    o.settings.persistent_path = Some(format!("file://{}", store.path().display()));
    // Step 1 is persisted, 2 and 3 are not: n0 holds steps newer than the
    // last commit for as long as it runs.
    o.settings.persist_every = Some(1000);
    let c = LocalCluster::start(dir.path(), o).unwrap();
    let mut n0 = Client::connect(c.socket(0)).unwrap();
    for step in 1..=3 {
        save(&mut n0, "idle", step, 1000);
        wait_for("the drainer to decide", || {
            let s = drain_status(&mut n0, "idle");
            s["last_committed"] == 1 && s["skipped"].as_u64().unwrap_or(0) + 1 >= step
        });
    }
    let lists = || drain_status(&mut Client::connect(c.socket(0)).unwrap(), "idle")["store_lists"].as_u64().unwrap();
    let before = lists();
    // 20 drain rounds of 200 ms; a listing holds for 2 s while no step comes.
    std::thread::sleep(Duration::from_secs(4));
    let during = lists() - before;
    assert!(during <= 3, "{during} listings of the store in 4 s while nothing changed");
}

#[test]
fn a_full_file_system_is_a_clear_error_and_memory_keeps_working() {
    let mnt = shm_dir();
    let target = mnt.path().join("small");
    std::fs::create_dir_all(&target).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&target)
        .status()
        .expect("mount runs");
    assert!(mounted.success(), "this test mounts a 2 MiB tmpfs as the target (needs root)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(target.clone());
    let url = format!("file://{}", target.display());
    // Stored whole: the payload would compress into the 2 MiB otherwise.
    let d = daemon(&url, &["--persist-compression", "off", "--persist-delta", "false"]);
    let mut c = d.client();
    let data = save(&mut c, "full", 1, 4 << 20);
    wait_for("the failure to be reported", || drain_status(&mut c, "full")["failures"].as_u64().unwrap_or(0) > 0);
    let s = drain_status(&mut c, "full");
    let err = s["last_error"].as_str().unwrap_or("");
    assert!(err.contains("storage full") && err.contains("No space left"), "{s}");
    assert!(committed_steps(&target, "full").is_empty());
    // Training goes on in memory.
    assert!(load(&mut c, "full", 1, 4 << 20).unwrap() == data);
    save(&mut c, "full", 2, 4 << 20);
    assert_eq!(c.latest("full").unwrap(), Some(2));
}

#[test]
fn corrupted_persisted_bytes_are_detected_not_served() {
    let (store, mut d) = file_daemon(&["--persist-compression", "off"]);
    let mut c = d.client();
    save(&mut c, "rot", 1, 5 << 20);
    drop(c);
    wait_for("committed", || committed_steps(store.path(), "rot") == [1]);
    let data_dir = store.path().join("rot").join(format!("{:020}", 1)).join("data");
    let writer = std::fs::read_dir(&data_dir).unwrap().next().unwrap().unwrap().path();
    let file = std::fs::read_dir(&writer).unwrap().next().unwrap().unwrap().path();
    let mut b = std::fs::read(&file).unwrap();
    b[4 << 20] ^= 1;
    std::fs::write(&file, b).unwrap();
    lose_all_memory(&mut d);
    let mut c = d.client();
    let e = load(&mut c, "rot", 1, 5 << 20).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("checksum mismatch in chunk 1"), "{e}");
    assert!(c.steps("rot").unwrap().is_empty(), "nothing corrupt entered memory");
}

#[test]
fn drains_to_and_restores_from_a_real_s3_server() {
    let m = moto::Moto::start();
    m.create_bucket("tierckpt-ci");
    let opts: Vec<String> = m.options().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut d = daemon("s3://tierckpt-ci/checkpoints", &["--persistent-options", &opts.join(",")]);
    let mut c = d.client();
    let n = 20 << 20;
    let data = save(&mut c, "s3job", 5, n);
    wait_for("committed to S3", || drain_status(&mut c, "s3job")["last_committed"] == 5);
    lose_all_memory(&mut d);
    let mut c = d.client();
    assert_eq!(c.latest("s3job").unwrap(), Some(5));
    assert!(load(&mut c, "s3job", 5, n).unwrap() == data, "restored bitwise from S3");
}

/// Step `step` of a 12 MiB shard (3 checksum chunks) of which only chunk
/// `step % 3` changes from one step to the next.
fn save_partly_changed(c: &mut Client, ns: &str, step: u64) -> Vec<u8> {
    let chunk = 4 << 20;
    let mut data = payload(0, 3 * chunk);
    for s in 1..=step {
        let i = (s % 3) as usize;
        for (j, b) in data[i * chunk..(i + 1) * chunk].iter_mut().enumerate() {
            *b = b.wrapping_add((s as u8).wrapping_mul(13)).wrapping_add((j % 251) as u8);
        }
    }
    let t = [TensorData { name: "w", dtype: Dtype::U8, shape: &[data.len()], data: &data }];
    c.save(&ShardKey::new(ns, step, 0), 1, &t, &BTreeMap::new(), true).unwrap();
    data
}

fn rank_record(store: &Path, ns: &str, step: u64) -> serde_json::Value {
    let p = store.join(ns).join(format!("{step:020}")).join("ranks").join("rank-00000-of-00001.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn data_file(store: &Path, ns: &str, step: u64) -> std::path::PathBuf {
    let r = rank_record(store, ns, step);
    store.join(r["data"].as_str().unwrap())
}

#[test]
fn deltas_restore_bitwise_and_retention_keeps_their_bases() {
    let (store, mut d) =
        file_daemon(&["--persist-keep-last", "1", "--persist-full-every", "3", "--persist-compression", "zstd"]);
    let mut c = d.client();
    let mut last = Vec::new();
    for step in 1..=5 {
        last = save_partly_changed(&mut c, "delta", step);
        wait_for("the step committed", || drain_status(&mut c, "delta")["last_committed"] == step);
    }
    let s = drain_status(&mut c, "delta");
    let (raw, stored) = (s["uploaded_bytes"].as_u64().unwrap(), s["stored_bytes"].as_u64().unwrap());
    assert!(s["delta_shards"].as_u64().unwrap() >= 3 && stored < raw / 2, "{s}");
    // Chains are at most 3 long: 1 <- 2 <- 3, then 4 whole, 5 on 4.
    let bases: Vec<Option<u64>> =
        [4, 5].iter().map(|&st| rank_record(store.path(), "delta", st)["reduced"]["base_step"].as_u64()).collect();
    assert_eq!(bases, [None, Some(4)]);
    assert_eq!(rank_record(store.path(), "delta", 5)["reduced"]["stats"]["same_chunks"], 2);
    // keep_last 1 keeps step 5 and the base it needs, nothing else.
    wait_for("retention", || committed_steps(store.path(), "delta") == [4, 5]);
    // Every memory copy gone: step 5 is rebuilt from 4's blob and its own.
    lose_all_memory(&mut d);
    let mut c = d.client();
    let mut back = vec![0u8; last.len()];
    c.load_into(&ShardKey::new("delta", 5, 0), &mut [("w", &mut back[..])]).unwrap();
    assert!(back == last, "restored bitwise through the delta");
    let (ok, out, _) = tierckpt_harness::testing::cli(&d.proc.socket, &["status"]);
    assert!(ok && out.contains("zstd"), "{out}");
}

#[test]
fn a_corrupt_compressed_chunk_or_a_missing_base_is_detected_never_served() {
    let (store, mut d) = file_daemon(&["--persist-keep-last", "5", "--persist-compression", "zstd"]);
    let mut c = d.client();
    for step in 1..=2 {
        save_partly_changed(&mut c, "rotz", step);
        wait_for("the step committed", || drain_status(&mut c, "rotz")["last_committed"] == step);
    }
    assert_eq!(rank_record(store.path(), "rotz", 2)["reduced"]["base_step"], 1);
    lose_all_memory(&mut d);
    let mut c = d.client();
    let n = 12 << 20;
    // A flipped byte inside the base's compressed payload.
    let base = data_file(store.path(), "rotz", 1);
    let good = std::fs::read(&base).unwrap();
    let mut bad = good.clone();
    let at = bad.len() - 100;
    bad[at] ^= 0x40;
    std::fs::write(&base, &bad).unwrap();
    let e = load(&mut c, "rotz", 2, n).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(c.steps("rotz").unwrap().is_empty(), "nothing corrupt entered memory");
    // The base gone altogether.
    std::fs::remove_file(&base).unwrap();
    let e = load(&mut c, "rotz", 2, n).unwrap_err();
    assert!(e.to_string().contains("rotz/step 1"), "{e}");
    assert!(c.steps("rotz").unwrap().is_empty());
    // Put back, it restores.
    std::fs::write(&base, &good).unwrap();
    assert_eq!(load(&mut c, "rotz", 2, n).unwrap().len(), n);
}

#[test]
fn every_compression_with_and_without_deltas_restores_bitwise_from_the_persistent_tier() {
    for compression in ["off", "lz4", "zstd:3"] {
        for delta in ["true", "false"] {
            let ns = "combo";
            let (_store, mut d) = file_daemon(&[
                "--persist-compression",
                compression,
                "--persist-delta",
                delta,
                "--persist-keep-last",
                "1",
            ]);
            let mut c = d.client();
            let mut last = Vec::new();
            for step in 1..=3 {
                last = save_partly_changed(&mut c, ns, step);
                wait_for("the step committed", || drain_status(&mut c, ns)["last_committed"] == step);
            }
            let s = drain_status(&mut c, ns);
            let deltas = s["delta_shards"].as_u64().unwrap();
            assert_eq!(deltas > 0, delta == "true", "{compression} delta={delta}: {s}");
            lose_all_memory(&mut d);
            let mut c = d.client();
            let mut back = vec![0u8; last.len()];
            c.load_into(&ShardKey::new(ns, 3, 0), &mut [("w", &mut back[..])]).unwrap();
            assert!(back == last, "{compression} delta={delta}: restored bitwise");
        }
    }
}

#[test]
fn the_trainers_choice_of_tiers_decides_what_is_persisted() {
    let (store, d) = file_daemon(&["--persist-every", "1", "--persist-keep-last", "10"]);
    let mut c = d.client();
    let data = payload(0, 1000);
    let t = [TensorData { name: "w", dtype: Dtype::U8, shape: &[1000], data: &data }];
    // As the Python Checkpointer marks them; step 4 says nothing (persist_every decides).
    for (step, tiers) in [(1, Some("memory")), (2, Some("memory,persistent")), (3, Some("memory")), (4, None)] {
        let meta: BTreeMap<String, String> = tiers.map(|t| ("tiers".to_string(), t.to_string())).into_iter().collect();
        c.save(&ShardKey::new("chosen", step, 0), 1, &t, &meta, true).unwrap();
        wait_for("the drainer to decide", || {
            let s = drain_status(&mut c, "chosen");
            s["last_committed"] == step
                || s["skipped"].as_u64().unwrap_or(0) + committed_steps(store.path(), "chosen").len() as u64 >= step
        });
    }
    assert_eq!(committed_steps(store.path(), "chosen"), [2, 4]);
    assert_eq!(drain_status(&mut c, "chosen")["skipped"], 2);
}

/// Adam state after `step` steps on pseudo-random gradients, in f32 as
/// PyTorch computes it: (exp_avg, exp_avg_sq) of `n` parameters.
fn adam_state(step: u64, n: usize) -> (Vec<f32>, Vec<f32>) {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f32 / (1u64 << 53) as f32
    };
    let (mut m, mut v) = (vec![0f32; n], vec![1e-6f32; n]);
    for _ in 0..step {
        for (m, v) in m.iter_mut().zip(v.iter_mut()) {
            let g = 1e-3 * (uniform() + uniform() + uniform() - 1.5);
            *m = 0.9 * *m + 0.1 * g;
            *v = 0.999 * *v + 0.001 * g * g;
        }
    }
    (m, v)
}

#[test]
fn adam_moments_are_predicted_and_restore_bitwise_from_the_persistent_tier() {
    let (store, mut d) = file_daemon(&["--persist-compression", "zstd", "--persist-keep-last", "3"]);
    let mut c = d.client();
    let n = 1 << 20;
    let bytes = |x: &[f32]| x.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let mut last = (Vec::new(), Vec::new());
    for step in 1..=3 {
        let (m, v) = adam_state(step, n);
        last = (bytes(&m), bytes(&v));
        let t = [
            TensorData { name: "optim.w.exp_avg", dtype: Dtype::F32, shape: &[n], data: &last.0 },
            TensorData { name: "optim.w.exp_avg_sq", dtype: Dtype::F32, shape: &[n], data: &last.1 },
        ];
        c.save(&ShardKey::new("adam", step, 0), 1, &t, &BTreeMap::new(), true).unwrap();
        wait_for("the step committed", || drain_status(&mut c, "adam")["last_committed"] == step);
    }
    // Step 3 is a delta on step 2 whose exp_avg_sq was predicted from exp_avg.
    let r = rank_record(store.path(), "adam", 3);
    assert_eq!(r["reduced"]["base_step"], 2, "{r}");
    assert_eq!(r["reduced"]["stats"]["predicted_pairs"], 1, "{r}");
    let stored = r["reduced"]["stored_bytes"].as_u64().unwrap();
    assert!(stored < (8 * n as u64) * 7 / 10, "{r}");
    // Every memory copy gone: rebuilt from the persisted chain, bit for bit.
    lose_all_memory(&mut d);
    let mut c = d.client();
    let (mut m, mut v) = (vec![0u8; 4 * n], vec![0u8; 4 * n]);
    c.load_into(
        &ShardKey::new("adam", 3, 0),
        &mut [("optim.w.exp_avg", &mut m[..]), ("optim.w.exp_avg_sq", &mut v[..])],
    )
    .unwrap();
    assert!(m == last.0 && v == last.1, "restored bitwise through the predicted delta");
}
