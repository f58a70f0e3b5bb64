//! Pinned and named steps (issue 19): a pinned step survives retention on
//! every tier that holds it (memory, the peers' copies, the persistent
//! tier), pins survive a restart, names resolve and move, and bad input is
//! refused with errors that name it.

use tierckpt_harness::moto;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tierckpt_client::{Client, ErrorKind, TensorData};
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::daemon::{LocalCluster, LocalClusterOptions};
use tierckpt_harness::testing::{cli, committed_steps, shm_dir, TestDaemon};

const LIMIT: Duration = Duration::from_secs(60);
const N: usize = 1 << 20;

fn payload(step: u64) -> Vec<u8> {
    (0..N).map(|i| (i as u64 * 31 + step * 7) as u8).collect()
}

fn save_to(socket: &Path, ns: &str, step: u64) -> Vec<u8> {
    let data = payload(step);
    let t = [TensorData { name: "w", dtype: Dtype::U8, shape: &[N], data: &data }];
    Client::connect(socket).unwrap().save(&ShardKey::new(ns, step, 0), 1, &t, &BTreeMap::new(), true).unwrap();
    data
}

fn load(c: &mut Client, ns: &str, step: u64) -> Result<Vec<u8>, tierckpt_client::Error> {
    let mut buf = vec![0u8; N];
    c.load_into(&ShardKey::new(ns, step, 0), &mut [("w", &mut buf[..])])?;
    Ok(buf)
}

fn held(c: &mut Client, ns: &str) -> Vec<u64> {
    c.steps(ns).unwrap().iter().map(|s| s.step).collect()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn daemon(flags: &[&str]) -> TestDaemon {
    TestDaemon::start_with("256MiB", |o| o.set_flags(flags).expect("valid flags"))
}

#[test]
fn a_pinned_step_survives_memory_retention_and_a_restart_until_unpinned() {
    let mut d = daemon(&["--keep-last", "2"]);
    let mut c = d.client();
    let one = save_to(&d.proc.socket, "job", 1);
    let (pin, not_reached) = c.pin("job", 1, None).unwrap();
    assert_eq!((pin.step, pin.tiers.clone(), not_reached.len()), (1, vec!["memory".to_string()], 0), "{pin:?}");
    for step in 2..=6 {
        save_to(&d.proc.socket, "job", step);
    }
    assert_eq!(held(&mut c, "job"), [1, 5, 6], "keep_last 2 and the pinned step");
    assert!(load(&mut c, "job", 1).unwrap() == one, "the pinned step loads bitwise");
    // The pin outlives a restart of the daemon (retention runs at open).
    d.proc.kill().unwrap();
    d.proc.restart().unwrap();
    let mut c = d.client();
    assert_eq!(held(&mut c, "job"), [1, 5, 6], "after a restart");
    assert_eq!(c.pins("job").unwrap().iter().map(|p| p.step).collect::<Vec<_>>(), [1]);
    // Unpinned, it goes at the next retention pass.
    c.unpin("job", Some(1), None).unwrap();
    assert_eq!(held(&mut c, "job"), [5, 6]);
    assert!(c.pins("job").unwrap().is_empty());
    let e = c.unpin("job", Some(1), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("job/step 1") && e.to_string().contains("not pinned"), "{e}");
}

#[test]
fn names_resolve_move_and_bad_input_is_refused_by_name() {
    let d = daemon(&["--keep-last", "5"]);
    let mut c = d.client();
    for step in 1..=3 {
        save_to(&d.proc.socket, "nm", step);
    }
    c.pin("nm", 1, Some("best")).unwrap();
    c.pin("nm", 2, Some("pre-spike-3")).unwrap();
    assert_eq!(c.resolve("nm", "best").unwrap(), 1);
    // A name moves like `git tag -f`; the step it left stays pinned.
    let (pin, _) = c.pin("nm", 3, Some("best")).unwrap();
    assert_eq!(pin.names, ["best"]);
    assert_eq!(c.resolve("nm", "best").unwrap(), 3);
    let pins = c.pins("nm").unwrap();
    let by_step: Vec<(u64, Vec<String>)> = pins.iter().map(|p| (p.step, p.names.clone())).collect();
    assert_eq!(by_step, [(1, vec![]), (2, vec!["pre-spike-3".to_string()]), (3, vec!["best".to_string()])], "{pins:?}");
    let bearer = d.bearer();
    let auth = [("Authorization", bearer.as_str())];
    let (code, body) = tierckpt_harness::testing::http(&d.http_addr(), "GET", "/v1/namespaces/nm/pins", &auth, b"");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((code, v["pins"][2]["names"][0].as_str()), (200, Some("best")), "the HTTP API lists them too: {v}");
    // Unpin by name unpins the step it names.
    let (pin, _) = c.unpin("nm", None, Some("pre-spike-3")).unwrap();
    assert_eq!(pin.step, 2);
    let e = c.resolve("nm", "pre-spike-3").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("pre-spike-3"), "{e}");
    let e = c.unpin("nm", None, Some("nothing-here")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("nothing-here"), "{e}");
    // Bad names are refused, named in the error.
    for (bad, said) in [("1200", "all digits"), ("a/b", "'/'"), ("", "1 to 64")] {
        let e = c.pin("nm", 1, Some(bad)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad:?}: {e}");
        assert!(e.to_string().contains(said) && e.to_string().contains(&format!("{bad:?}")), "{e}");
    }
    // A step nobody holds.
    let e = c.pin("nm", 99, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("nm/step 99"), "{e}");
    // Unpin takes exactly one of a step and a name.
    let e = c.unpin("nm", Some(1), Some("best")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let e = c.unpin("nm", None, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    // Deleting a step forgets its pins and names.
    c.delete_step("nm", 3).unwrap();
    assert_eq!(c.pins("nm").unwrap().iter().map(|p| p.step).collect::<Vec<_>>(), [1]);
    assert_eq!(c.resolve("nm", "best").unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn the_cli_pins_unpins_and_lists_names_as_json() {
    let d = daemon(&["--keep-last", "2"]);
    for step in 1..=2 {
        save_to(&d.proc.socket, "cli", step);
    }
    let run = |args: &[&str]| {
        let (ok, out, err) = cli(&d.proc.socket, args);
        assert!(ok, "tierckpt {args:?}: {out}{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let v = run(&["--json", "pin", "cli", "--step", "1", "--name", "best"]);
    assert_eq!(v["pin"]["step"], 1, "{v}");
    assert_eq!(v["pin"]["names"][0], "best", "{v}");
    assert_eq!(v["pin"]["tiers"][0], "memory", "{v}");
    save_to(&d.proc.socket, "cli", 3);
    let v = run(&["--json", "ls", "cli"]);
    let steps: Vec<u64> = v["steps"].as_array().unwrap().iter().map(|s| s["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3], "{v}");
    assert_eq!(v["pins"][0]["names"][0], "best", "{v}");
    let (ok, out, _) = cli(&d.proc.socket, &["ls", "cli"]);
    assert!(ok && out.contains("best"), "{out}");
    // Status and the list of namespaces show the steps pinned here.
    let v = run(&["--json", "status"]);
    assert_eq!(v["namespaces"][0]["pinned"], serde_json::json!([1]), "{v}");
    let (ok, out, _) = cli(&d.proc.socket, &["status"]);
    let row = out.lines().find(|l| l.contains(" cli ")).map(|l| l.split_whitespace().filter(|w| *w != "│").collect());
    assert!(ok && out.contains("pinned") && row.is_some_and(|w: Vec<&str>| w.last() == Some(&"1")), "{out}");
    // A name where inspect takes a step.
    let v = run(&["--json", "inspect", "cli", "--step", "best"]);
    assert!(v.to_string().contains("\"step\":1"), "{v}");
    let (ok, _, err) = cli(&d.proc.socket, &["unpin", "cli"]);
    assert!(!ok && err.contains("--step") && err.contains("--name"), "{err}");
    let v = run(&["--json", "unpin", "cli", "--name", "best"]);
    assert_eq!(v["step"], 1, "{v}");
    let v = run(&["--json", "ls", "cli"]);
    assert_eq!(v["pins"], serde_json::json!([]), "{v}");
    let (ok, _, err) = cli(&d.proc.socket, &["pin", "cli", "--step", "2", "--name", "12"]);
    assert!(!ok && err.contains("\"12\"") && err.contains("all digits"), "{err}");
}

#[test]
fn a_pin_is_forwarded_and_the_peer_keeps_its_replica_beyond_keep_last() {
    let dir = shm_dir();
    let mut o = LocalClusterOptions { nodes: 2, ..Default::default() };
    o.settings.keep_last = Some(2);
    o.settings.memory_tier_size = Some("256MiB".into());
    let mut c = LocalCluster::start(dir.path(), o).unwrap();
    let one = save_to(&c.socket(0), "rep", 1);
    let mut n1 = Client::connect(c.socket(1)).unwrap();
    wait_for("the replica on n1", || held(&mut n1, "rep") == [1]);
    let (_, not_reached) = Client::connect(c.socket(0)).unwrap().pin("rep", 1, Some("keep")).unwrap();
    assert!(not_reached.is_empty(), "{not_reached:?}");
    for step in 2..=5 {
        save_to(&c.socket(0), "rep", step);
    }
    wait_for("n1's replicas", || held(&mut n1, "rep") == [1, 4, 5]);
    assert!(n1.open(&ShardKey::new("rep", 1, 0)).unwrap().tensor("w").unwrap() == &one[..], "bitwise on n1");
    assert_eq!(n1.pins("rep").unwrap()[0].names, ["keep"], "the peer knows the name");
    // A member that is down is reported, not an error.
    c.kill(1).unwrap();
    let (_, not_reached) = Client::connect(c.socket(0)).unwrap().pin("rep", 5, None).unwrap();
    assert!(not_reached.len() == 1 && not_reached[0].starts_with(&LocalCluster::node_id(1)), "{not_reached:?}");
}

#[test]
fn a_pin_on_this_node_alone_is_neither_forwarded_nor_stored() {
    let (dir, store) = (shm_dir(), shm_dir());
    let mut o = LocalClusterOptions { nodes: 2, ..Default::default() };
    o.settings.memory_tier_size = Some("256MiB".into());
    o.settings.persistent_path = Some(format!("file://{}", store.path().display()));
    let c = LocalCluster::start(dir.path(), o).unwrap();
    save_to(&c.socket(0), "solo", 1);
    let (mut n0, mut n1) = (Client::connect(c.socket(0)).unwrap(), Client::connect(c.socket(1)).unwrap());
    wait_for("the replica on n1", || n1.steps("solo").unwrap().iter().any(|s| s.complete));
    let pin = n0.pin_on_this_node("solo", 1, Some("here")).unwrap();
    assert_eq!((pin.tiers, pin.names), (vec!["memory".to_string()], vec!["here".to_string()]));
    assert_eq!(n0.resolve("solo", "here").unwrap(), 1);
    assert!(n1.pins("solo").unwrap().is_empty(), "not forwarded to the member");
    assert!(!store.path().join("solo/pins").exists(), "no pin object in the store");
    let e = n0.pin_on_this_node("solo", 9, None).unwrap_err();
    assert!(e.kind() == ErrorKind::NotFound && e.to_string().contains("solo/step 9"), "{e}");
}

fn last_committed(c: &mut Client, ns: &str) -> serde_json::Value {
    let p = c.status().unwrap().persistent.expect("the daemon drains");
    let n = p["namespaces"].as_array().unwrap().iter().find(|n| n["namespace"] == ns).cloned();
    n.unwrap_or_default()["last_committed"].clone()
}

/// Saves step 1, pins it as `best`, saves 2..=5 (each committed before the
/// next), and checks that step 1 is still in the store: then, with the
/// memory tier wiped, that the name resolves and step 1 loads bitwise.
fn pinned_step_survives_persistent_retention(mut d: TestDaemon, committed: impl Fn() -> Option<Vec<u64>>) {
    let mut c = d.client();
    let one = save_to(&d.proc.socket, "dur", 1);
    wait_for("step 1 committed", || last_committed(&mut c, "dur") == 1);
    let (pin, _) = c.pin("dur", 1, Some("best")).unwrap();
    assert_eq!(pin.tiers, ["memory", "persistent"]);
    for step in 2..=5 {
        save_to(&d.proc.socket, "dur", step);
        wait_for("the step committed", || last_committed(&mut c, "dur") == step);
    }
    assert_eq!(held(&mut c, "dur"), [1, 4, 5], "memory: keep_last 2 and the pin");
    if let Some(steps) = committed() {
        assert_eq!(steps, [1, 4, 5], "the store: persist_keep_last 2 and the pin");
    }
    // Every copy in memory goes: the daemon restarts on an empty memory dir.
    d.proc.kill().unwrap();
    std::fs::remove_dir_all(d.proc.memory_dir()).unwrap();
    d.proc.restart().unwrap();
    let mut c = d.client();
    assert!(held(&mut c, "dur").is_empty());
    let pins = c.pins("dur").unwrap();
    assert_eq!((pins[0].step, pins[0].tiers.clone()), (1, vec!["persistent".to_string()]), "{pins:?}");
    assert_eq!(c.resolve("dur", "best").unwrap(), 1, "the store's pin names the step");
    assert!(load(&mut c, "dur", 1).unwrap() == one, "restored bitwise from the persistent tier");
    // A step held only by the store can be pinned too.
    let (pin, _) = c.pin("dur", 4, Some("later")).unwrap();
    assert_eq!(pin.tiers, ["persistent"]);
    // Unpinned, the store's next retention pass drops step 1; 4 stays.
    c.unpin("dur", None, Some("best")).unwrap();
    save_to(&d.proc.socket, "dur", 6);
    wait_for("step 6 committed", || last_committed(&mut c, "dur") == 6);
    if let Some(steps) = committed() {
        assert_eq!(steps, [4, 5, 6], "retention applies once unpinned");
    }
    assert_eq!(c.resolve("dur", "later").unwrap(), 4);
}

#[test]
fn a_pinned_step_survives_persistent_retention_on_file_and_loads_after_memory_is_lost() {
    let store = shm_dir();
    let target = format!("file://{}", store.path().display());
    let d = daemon(&["--keep-last", "2", "--persistent-path", &target, "--persist-keep-last", "2"]);
    pinned_step_survives_persistent_retention(d, || Some(committed_steps(store.path(), "dur")));
    let pins: Vec<_> =
        std::fs::read_dir(store.path().join("dur/pins")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(pins, [format!("{:020}.json", 4).as_str()], "step 1's pin object is gone");
}

#[test]
fn a_pinned_step_survives_persistent_retention_on_s3() {
    let m = moto::Moto::start();
    m.create_bucket("tierckpt-pins");
    let opts: Vec<String> = m.options().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let d = daemon(&[
        "--keep-last",
        "2",
        "--persistent-path",
        "s3://tierckpt-pins/ck",
        "--persistent-options",
        &opts.join(","),
        "--persist-keep-last",
        "2",
    ]);
    pinned_step_survives_persistent_retention(d, || None);
}
