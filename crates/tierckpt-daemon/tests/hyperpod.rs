//! The HyperPod in-memory checkpoint API (`hyperpod_listen`) against real
//! daemon processes: round trips, latest, deletion, namespaces, the cluster
//! reset, every refusal of bad input by name, corrupt and cut-short bodies,
//! a retry, a restart, `tierckpt ls`, a replica on a peer, and a restore
//! from the persistent tier.

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;
use tierckpt_harness::daemon::{DaemonOptions, LocalCluster, LocalClusterOptions};
use tierckpt_harness::testing::{cli, http_exchange, shm_dir, TestDaemon};

/// A daemon with the HyperPod API on an ephemeral loopback port.
fn daemon(size: &str) -> TestDaemon {
    TestDaemon::start_with(size, |o: &mut DaemonOptions| o.settings.hyperpod_listen = Some("127.0.0.1:0".into()))
}

/// One exchange over a fresh connection: (status, head, body); an empty
/// body is announced too (`Content-Length: 0`) unless told otherwise.
fn exchange(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, Vec<u8>) {
    let framed = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding"));
    let mut all = headers.to_vec();
    if !framed && body.is_empty() {
        all.push(("Content-Length", "0"));
    }
    http_exchange(addr, method, path, &all, body)
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

/// The `Shard-Meta` the client sends for `data`.
fn meta(data: &[u8]) -> String {
    let sum = xxhash_rust::xxh3::xxh3_128(data).to_be_bytes();
    serde_json::json!({ "checksum": base64::engine::general_purpose::STANDARD.encode(sum), "algorithm": "xxh3_128" })
        .to_string()
}

fn bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A client of one daemon's HyperPod API.
struct Hp(String);

impl Hp {
    fn of(d: &TestDaemon) -> Self {
        Hp(d.hyperpod_addr())
    }

    fn call(&self, method: &str, path: &str) -> (u16, Vec<u8>) {
        let (st, _, body) = exchange(&self.0, method, path, &[], b"");
        (st, body)
    }

    fn create(&self, ns: &str, ranks: u32) {
        let (st, body) = self.call("POST", &format!("/v1/cp/namespaces/{ns}?num_ranks={ranks}&steps_retained=2"));
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    }

    fn put(&self, ns: &str, rank: u32, step: u64, data: &[u8]) -> (u16, Vec<u8>) {
        let m = meta(data);
        let (st, _, body) =
            exchange(&self.0, "POST", &format!("/v1/cp/checkpoints/{ns}/{rank}/{step}"), &[("Shard-Meta", &m)], data);
        (st, body)
    }

    fn put_ok(&self, ns: &str, rank: u32, step: u64, data: &[u8]) {
        let (st, body) = self.put(ns, rank, step, data);
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    }

    /// (status, Shard-Meta header, body).
    fn get(&self, ns: &str, rank: u32, step: u64) -> (u16, Option<String>, Vec<u8>) {
        let (st, head, body) = exchange(&self.0, "GET", &format!("/v1/cp/checkpoints/{ns}/{rank}/{step}"), &[], b"");
        let meta = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("shard-meta").then(|| v.trim().to_string())
        });
        (st, meta, body)
    }

    fn latest(&self, ns: &str, query: &str) -> Vec<u64> {
        let (st, body) = self.call("GET", &format!("/v1/cp/checkpoints/{ns}/latest{query}"));
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }
}

/// The JSON error's message of a refused request, checked to carry `status`.
fn refused(r: (u16, Vec<u8>), status: u16) -> String {
    assert_eq!(r.0, status, "{}", String::from_utf8_lossy(&r.1));
    json(&r.1)["message"].as_str().expect("an error message").to_string()
}

#[test]
fn bytes_round_trip_latest_lists_complete_steps_and_delete_removes_them() {
    let d = daemon("128MiB");
    let hp = Hp::of(&d);
    assert_eq!(json(&hp.call("GET", "/health").1)["status"], "healthy");
    assert_eq!(hp.call("GET", "/v1/cp/namespaces/job").0, 404);
    assert_eq!(hp.call("GET", "/v1/cp/checkpoints/job/latest").0, 404);
    // Two DCP ranks and the metadata rank.
    hp.create("job", 3);
    let ns = json(&hp.call("GET", "/v1/cp/namespaces/job").1);
    assert_eq!((ns["num_ranks"].as_u64(), ns["steps_retained_requested"].as_u64()), (Some(3), Some(2)));
    assert_eq!(ns["steps_to_retain_per_rank"], 3, "the daemon's keep_last");
    assert!(refused(hp.call("POST", "/v1/cp/namespaces/job?num_ranks=3"), 409).contains("already exists"));

    // Rank 1 spans two 4 MiB chunks; the metadata rank is empty.
    let data: Vec<Vec<u8>> = vec![bytes(1, 1000), bytes(2, 5 << 20), Vec::new()];
    hp.put_ok("job", 0, 10, &data[0]);
    hp.put_ok("job", 1, 10, &data[1]);
    assert_eq!(hp.latest("job", ""), Vec::<u64>::new(), "the metadata rank is missing: not complete");
    hp.put_ok("job", 2, 10, &data[2]);
    assert_eq!(hp.latest("job", ""), vec![10]);
    for (rank, want) in data.iter().enumerate() {
        let (st, m, body) = hp.get("job", rank as u32, 10);
        assert_eq!(st, 200);
        assert!(body == *want, "rank {rank} comes back bitwise");
        assert_eq!(json(m.expect("a Shard-Meta header").as_bytes()), json(meta(want).as_bytes()));
    }
    // Written once, as native steps; the same bytes again (a retry) are taken as stored.
    assert!(refused(hp.put("job", 0, 10, &data[1]), 409).contains("already written"));
    assert!(hp.get("job", 0, 10).2 == data[0]);
    let (st, body) = hp.put("job", 1, 10, &data[1]);
    assert_eq!((st, json(&body)["already_stored"].clone()), (200, Value::Bool(true)));
    let (st, _, body) =
        exchange(&hp.0, "POST", "/v1/cp/checkpoints/job/1/10", &[("Shard-Meta", &meta(&data[1]))], &data[0][..]);
    assert!(refused((st, body), 400).contains("does not match its Shard-Meta"), "a retry is checked too");

    for r in 0..3 {
        hp.put_ok("job", r, 20, &bytes(r as u8 + 7, 300));
    }
    assert_eq!(hp.latest("job", ""), vec![20, 10]);
    assert_eq!(hp.latest("job", "?limit=1"), vec![20]);
    assert_eq!(hp.get("job", 0, 30).0, 404);

    // The shards are native shards: `tierckpt ls` lists them.
    let (ok, out, err) = cli(&d.proc.socket, &["ls", "job", "--json"]);
    assert!(ok, "{err}");
    let ls = json(out.as_bytes());
    let steps: Vec<u64> = ls["steps"].as_array().unwrap().iter().map(|s| s["step"].as_u64().unwrap()).collect();
    assert_eq!(steps.len(), 2, "{out}");
    assert!(steps.contains(&10) && steps.contains(&20), "{out}");

    // Deleting a rank deletes its step (it could never be restored again).
    assert_eq!(hp.call("DELETE", "/v1/cp/checkpoints/job/0/10").0, 200);
    assert_eq!(hp.get("job", 1, 10).0, 404);
    assert_eq!(hp.latest("job", ""), vec![20]);
    assert_eq!(hp.call("DELETE", "/v1/cp/checkpoints/job/0/10").0, 404);

    assert_eq!(hp.call("DELETE", "/v1/cp/namespaces/job").0, 200);
    assert_eq!(hp.call("GET", "/v1/cp/namespaces/job").0, 404);
    assert_eq!(hp.get("job", 0, 20).0, 404);
    assert_eq!(hp.call("DELETE", "/v1/cp/namespaces/job").0, 404);
}

#[test]
fn retention_is_keep_last_and_namespaces_survive_a_restart() {
    let mut d = daemon("64MiB");
    let hp = Hp::of(&d);
    hp.create("keep", 1);
    for step in 1..=5 {
        hp.put_ok("keep", 0, step, &bytes(step as u8, 100));
    }
    assert_eq!(hp.latest("keep", ""), vec![5, 4, 3], "keep_last 3");
    d.proc.restart().unwrap();
    let hp = Hp::of(&d);
    assert_eq!(json(&hp.call("GET", "/v1/cp/namespaces/keep").1)["num_ranks"], 1);
    assert!(hp.get("keep", 0, 5).2 == bytes(5, 100));
    hp.put_ok("keep", 0, 6, &bytes(6, 100));
    assert_eq!(hp.latest("keep", ""), vec![6, 5, 4]);
}

#[test]
fn cluster_reset_deletes_the_hyperpod_namespaces_only() {
    let d = daemon("64MiB");
    let hp = Hp::of(&d);
    hp.create("a", 1);
    hp.create("b", 1);
    hp.put_ok("a", 0, 1, b"one");
    let mut c = d.client();
    let t = [tierckpt_client::TensorData {
        name: "w",
        dtype: tierckpt_format::Dtype::U8,
        shape: &[4],
        data: &[1, 2, 3, 4],
    }];
    c.save(&tierckpt_format::ShardKey::new("native", 1, 0), 1, &t, &Default::default(), true).unwrap();
    let (st, body) = hp.call("POST", "/v1/cp/cluster/reset");
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["namespaces"], serde_json::json!(["a", "b"]));
    assert_eq!(hp.call("GET", "/v1/cp/namespaces/a").0, 404);
    assert_eq!(hp.get("a", 0, 1).0, 404);
    assert!(c.latest("native").unwrap().is_some(), "a native namespace is not the HyperPod API's to reset");
}

#[test]
fn bad_namespace_rank_step_and_shard_meta_are_refused_by_name() {
    let d = daemon("64MiB");
    let hp = Hp::of(&d);
    let at = |path: &str, headers: &[(&str, &str)], body: &[u8]| {
        let (st, _, b) = exchange(&hp.0, "POST", path, headers, body);
        (st, b)
    };
    // Namespaces.
    assert!(refused(hp.call("POST", "/v1/cp/namespaces/bad.ns?num_ranks=2"), 400).contains("namespace \"bad.ns\""));
    let long = "n".repeat(129);
    assert!(refused(hp.call("GET", &format!("/v1/cp/namespaces/{long}")), 400).contains("namespace"));
    assert!(refused(hp.call("POST", "/v1/cp/namespaces/j"), 400).contains("num_ranks is required"));
    assert!(refused(hp.call("POST", "/v1/cp/namespaces/j?num_ranks=0"), 400).contains("num_ranks \"0\""));
    assert!(refused(hp.call("POST", "/v1/cp/namespaces/j?num_ranks=x"), 400).contains("num_ranks \"x\""));
    assert!(refused(hp.call("POST", "/v1/cp/namespaces/j?num_ranks=2&steps_retained=-1"), 400)
        .contains("steps_retained \"-1\""));
    hp.create("j", 2);
    assert!(refused(hp.call("GET", "/v1/cp/checkpoints/j/latest?limit=0"), 400).contains("limit \"0\""));
    assert!(refused(hp.call("GET", "/v1/cp/checkpoints/bad%2Fns/latest"), 400).contains("namespace"));

    // Ranks and steps.
    let data = b"payload";
    let m = meta(data);
    let sm = [("Shard-Meta", m.as_str())];
    assert!(refused(at("/v1/cp/checkpoints/j/x/1", &sm, data), 400).contains("rank \"x\""));
    assert!(refused(at("/v1/cp/checkpoints/j/-1/1", &sm, data), 400).contains("rank \"-1\""));
    assert!(refused(at("/v1/cp/checkpoints/j/2/1", &sm, data), 400).contains("rank 2 is not below num_ranks 2"));
    assert!(refused(at("/v1/cp/checkpoints/j/0/abc", &sm, data), 400).contains("step \"abc\""));
    assert!(refused(at("/v1/cp/checkpoints/j/0/-5", &sm, data), 400).contains("step \"-5\""));
    let huge = format!("/v1/cp/checkpoints/j/0/{}", 1u64 << 53);
    assert!(refused(at(&huge, &sm, data), 400).contains("2^53"));
    assert!(refused(at("/v1/cp/checkpoints/nope/0/1", &sm, data), 404).contains("namespace \"nope\" not found"));
    assert!(refused(hp.call("GET", "/v1/cp/checkpoints/j/x/1"), 400).contains("rank \"x\""));
    assert!(refused(hp.call("DELETE", "/v1/cp/checkpoints/j/0/abc"), 400).contains("step \"abc\""));

    // Shard-Meta.
    let p = "/v1/cp/checkpoints/j/0/1";
    let sum16 = base64::engine::general_purpose::STANDARD.encode([0u8; 16]);
    let sum8 = base64::engine::general_purpose::STANDARD.encode([0u8; 8]);
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "Shard-Meta is required"),
        (Some("not json".into()), "not JSON"),
        (Some("[1]".into()), "not a JSON object"),
        (Some("{}".into()), "no checksum"),
        (Some(r#"{"checksum": 5}"#.into()), "checksum 5 is not a string"),
        (Some(r#"{"checksum": "***"}"#.into()), "is not base64"),
        (Some(format!(r#"{{"checksum": "{sum8}"}}"#)), "decodes to 8 bytes"),
        (Some(format!(r#"{{"checksum": "{sum16}", "algorithm": "md5"}}"#)), "algorithm \"md5\" is not supported"),
        (Some(format!(r#"{{"checksum": "{sum16}", "algorithm": "xxh3_128"}}"#)), "does not match its Shard-Meta"),
        (Some(format!(r#"{{"checksum": "{}"}}"#, "A".repeat(2000))), "more than 1024"),
    ];
    for (value, said) in cases {
        let headers: Vec<(&str, &str)> = value.iter().map(|v| ("Shard-Meta", v.as_str())).collect();
        let msg = refused(at(p, &headers, data), 400);
        assert!(msg.contains(said), "Shard-Meta {value:?}: {msg}");
    }
    assert_eq!(hp.get("j", 0, 1).0, 404, "nothing refused was stored");
    assert_eq!(d.client().status().unwrap().memory.shards, 0);

    // Sizes: announced, and within the memory tier.
    let chunked = [("Shard-Meta", m.as_str()), ("Transfer-Encoding", "chunked")];
    let (st, _, b) = exchange(&hp.0, "POST", p, &chunked, b"7\r\npayload\r\n0\r\n\r\n");
    assert!(refused((st, b), 411).contains("Content-Length is required"));
    let big = [("Shard-Meta", m.as_str()), ("Content-Length", "1099511627776")];
    let (st, _, b) = exchange(&hp.0, "POST", p, &big, b"");
    assert!(refused((st, b), 413).contains("larger than the memory tier"));
    hp.put_ok("j", 0, 1, data);
    assert!(hp.get("j", 0, 1).2 == data);
}

#[test]
fn a_body_cut_short_stores_nothing_and_leaves_what_was_stored() {
    let d = daemon("64MiB");
    let hp = Hp::of(&d);
    hp.create("cut", 1);
    let old = bytes(1, 3 << 20);
    hp.put_ok("cut", 0, 1, &old);
    let new = bytes(2, 3 << 20);
    let m = meta(&new);
    let s = tierckpt_harness::testing::http_abandon(
        &hp.0,
        "POST",
        "/v1/cp/checkpoints/cut/0/2",
        &[("Shard-Meta", &m)],
        new.len(),
        &new[..1 << 20],
    );
    let reservations = || d.client().status().unwrap().memory.reservations;
    let start = Instant::now();
    while reservations() == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the upload never reserved its space");
        std::thread::sleep(Duration::from_millis(25));
    }
    drop(s);
    while reservations() > 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the cut-short upload's space is never given back");
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(hp.get("cut", 0, 2).0, 404);
    assert!(hp.get("cut", 0, 1).2 == old, "the stored step is untouched");
    assert_eq!(hp.latest("cut", ""), vec![1]);
    hp.put_ok("cut", 0, 2, &new);
    assert!(hp.get("cut", 0, 2).2 == new);
}

#[test]
fn a_corrupt_shard_is_never_served() {
    let d = daemon("64MiB");
    let hp = Hp::of(&d);
    hp.create("flip", 1);
    let data = bytes(3, 100_000);
    hp.put_ok("flip", 0, 7, &data);
    let file = d.proc.memory_dir().join("ns/flip/00000000000000000007/rank-00000-of-00001.safetensors");
    let mut stored = std::fs::read(&file).unwrap();
    let n = stored.len();
    stored[n - 10] ^= 0x40;
    std::fs::write(&file, &stored).unwrap();
    let (st, _, body) = hp.get("flip", 0, 7);
    let msg = refused((st, body), 422);
    assert!(msg.contains("checksum") || msg.contains("corrupt"), "{msg}");
}

#[test]
fn namespaces_reach_the_peers_and_shards_are_replicated_and_served_by_them() {
    let dir = shm_dir();
    let mut o = LocalClusterOptions { nodes: 2, ..Default::default() };
    o.settings.memory_tier_size = Some("128MiB".into());
    o.settings.hyperpod_listen = Some("127.0.0.1:0".into());
    let mut c = LocalCluster::start(dir.path(), o).unwrap();
    let hp0 = Hp(c.node(0).hyperpod_addr.clone().unwrap());
    let hp1 = Hp(c.node(1).hyperpod_addr.clone().unwrap());
    // Created on node 0 only, as a writer's coordinator does; rank 1 writes to node 1, which takes the
    // namespace's record from node 0.
    hp0.create("rep", 2);
    let data = [bytes(5, 2 << 20), bytes(6, 10)];
    hp0.put_ok("rep", 0, 3, &data[0]);
    hp1.put_ok("rep", 1, 3, &data[1]);
    assert_eq!(json(&hp1.call("GET", "/v1/cp/namespaces/rep").1)["num_ranks"], 2);
    assert_eq!(hp0.latest("rep", ""), vec![3], "complete across the cluster");
    let start = Instant::now();
    let held = |node: usize| -> usize {
        let mut client = tierckpt_client::Client::connect(c.socket(node)).unwrap();
        client.steps("rep").map(|s| s.iter().map(|s| s.ranks.len()).sum()).unwrap_or(0)
    };
    while held(1) < 2 {
        assert!(start.elapsed() < Duration::from_secs(30), "node 1 never got the replicas");
        std::thread::sleep(Duration::from_millis(25));
    }
    // A namespace deleted through one node is forgotten by the others.
    hp0.create("gone", 1);
    hp1.put_ok("gone", 0, 1, b"x");
    assert_eq!(hp0.call("DELETE", "/v1/cp/namespaces/gone").0, 200);
    assert_eq!(hp1.call("GET", "/v1/cp/namespaces/gone").0, 404);
    assert_eq!(hp1.put("gone", 0, 2, b"y").0, 404);
    c.kill(0).unwrap();
    assert_eq!(hp1.latest("rep", ""), vec![3]);
    for (rank, want) in data.iter().enumerate() {
        let (st, m, body) = hp1.get("rep", rank as u32, 3);
        assert_eq!(st, 200);
        assert!(body == *want, "rank {rank} from the replica, bitwise");
        assert!(m.is_some());
    }
}

#[test]
fn a_step_is_drained_to_the_persistent_tier_and_served_from_it_after_all_memory_is_lost() {
    let store = shm_dir();
    let target = format!("file://{}", store.path().display());
    let mut d = TestDaemon::start_with("128MiB", |o: &mut DaemonOptions| {
        o.settings.hyperpod_listen = Some("127.0.0.1:0".into());
        o.set_flags(&["--persistent-path", &target, "--persist-every", "1"]).expect("valid flags");
    });
    let hp = Hp::of(&d);
    hp.create("drain", 2);
    let data = [bytes(8, 1 << 20), bytes(9, 77)];
    hp.put_ok("drain", 0, 4, &data[0]);
    hp.put_ok("drain", 1, 4, &data[1]);
    let start = Instant::now();
    while !std::fs::read_dir(store.path().join("drain"))
        .map(|rd| rd.filter_map(|e| e.ok()).any(|e| e.path().join("COMMIT").exists()))
        .unwrap_or(false)
    {
        assert!(start.elapsed() < Duration::from_secs(60), "step 4 was never committed");
        std::thread::sleep(Duration::from_millis(25));
    }
    d.proc.kill().unwrap();
    std::fs::remove_dir_all(d.proc.memory_dir()).unwrap();
    d.proc.restart().unwrap();
    let hp = Hp::of(&d);
    assert_eq!(hp.latest("drain", ""), vec![4], "the committed step, from the persistent tier");
    for (rank, want) in data.iter().enumerate() {
        let (st, m, body) = hp.get("drain", rank as u32, 4);
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        assert!(body == *want, "rank {rank} restored from the persistent tier, bitwise");
        assert_eq!(json(m.unwrap().as_bytes()), json(meta(want).as_bytes()));
    }
}
