//! The peer tier with separate daemon processes on 127.0.0.1 ports:
//! replication, restore of an empty replacement from peers, corrupt replicas,
//! node loss before, during and after replication, tokens, re-replication,
//! a stopped peer not flooded with pushes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tierckpt_client::{Client, ErrorKind, TensorData};
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::daemon::{LocalCluster, LocalClusterOptions};
use tierckpt_harness::testing::shm_dir;
use tierckpt_proto::ClusterStatus;

fn payload(rank: u32, step: u64, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u64 * 7 + rank as u64 * 13 + step) as u8).collect()
}

fn save(c: &LocalCluster, node: usize, ns: &str, step: u64, rank: u32, world: u32, n: usize) -> Vec<u8> {
    let data = payload(rank, step, n);
    let t = [TensorData { name: "state", dtype: Dtype::U8, shape: &[n], data: &data }];
    let mut client = Client::connect(c.socket(node)).unwrap();
    client.save(&ShardKey::new(ns, step, rank), world, &t, &BTreeMap::new(), true).unwrap();
    data
}

fn load(
    c: &LocalCluster,
    node: usize,
    ns: &str,
    step: u64,
    rank: u32,
    n: usize,
) -> Result<Vec<u8>, tierckpt_client::Error> {
    let mut buf = vec![0u8; n];
    let mut client = Client::connect(c.socket(node)).unwrap();
    client.load_into(&ShardKey::new(ns, step, rank), &mut [("state", &mut buf[..])])?;
    Ok(buf)
}

fn cluster_status(c: &LocalCluster, node: usize) -> ClusterStatus {
    Client::connect(c.socket(node)).unwrap().status().unwrap().cluster.expect("clustered")
}

/// Live holders of (ns, step, rank) as `node` sees them.
fn holders(c: &LocalCluster, node: usize, ns: &str, step: u64, rank: u32) -> Vec<String> {
    cluster_status(c, node)
        .namespaces
        .get(ns)
        .and_then(|steps| steps.iter().find(|s| s.step == step))
        .and_then(|s| s.holders.get(&rank).cloned())
        .unwrap_or_default()
}

/// Polls `cond` until it holds or `limit` passes.
fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

const LIMIT: Duration = Duration::from_secs(30);

fn start(nodes: usize, k: usize, f: impl FnOnce(&mut LocalClusterOptions)) -> (tempfile::TempDir, LocalCluster) {
    let dir = shm_dir();
    let mut o = LocalClusterOptions { nodes, ..Default::default() };
    o.settings.replication_factor = Some(k);
    o.settings.memory_tier_size = Some("256MiB".into());
    f(&mut o);
    let c = LocalCluster::start(dir.path(), o).unwrap();
    (dir, c)
}

#[test]
fn every_shard_is_copied_to_k_ring_peers_bitwise() {
    let (_d, c) = start(4, 2, |_| {});
    let data = save(&c, 1, "rep", 10, 1, 4, 3 << 20);
    wait_for(LIMIT, "3 holders", || holders(&c, 0, "rep", 10, 1).len() == 3);
    let mut h = holders(&c, 0, "rep", 10, 1);
    h.sort();
    assert_eq!(h, ["n1", "n2", "n3"], "ring placement: n1 -> n2, n3");
    // The replica on n3 is a local, verified copy there.
    let mut client = Client::connect(c.socket(3)).unwrap();
    let s = client.open(&ShardKey::new("rep", 10, 1)).unwrap();
    assert!(s.tensor("state").unwrap() == &data[..]);
    let st = cluster_status(&c, 1);
    assert_eq!(st.replication.shards_sent, 2);
    let bearer = c.bearer();
    let (code, text) = tierckpt_harness::testing::http(
        &c.options(1).http_addr(),
        "GET",
        "/metrics",
        &[("Authorization", &bearer)],
        b"",
    );
    let text = String::from_utf8_lossy(&text);
    assert_eq!(code, 200);
    let sent = text
        .lines()
        .find(|l| l.starts_with("tierckpt_replicated_bytes_total "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok());
    assert_eq!(sent, Some(st.replication.bytes_sent as f64), "{text}");
    assert!(st.replication.bytes_sent > 2 * data.len() as u64, "two copies of the shard and its header");
    wait_for(LIMIT, "every node alive in n1's view", || {
        cluster_status(&c, 1).nodes.iter().all(|n| n.state == tierckpt_proto::NodeState::Alive)
    });
}

#[test]
fn group_placement_keeps_copies_inside_the_group() {
    let (_d, c) = start(4, 1, |o| o.settings.placement = Some("group".into()));
    save(&c, 2, "grp", 1, 2, 4, 1000);
    wait_for(LIMIT, "2 holders", || holders(&c, 0, "grp", 1, 2).len() == 2);
    let mut h = holders(&c, 0, "grp", 1, 2);
    h.sort();
    assert_eq!(h, ["n2", "n3"]);
}

#[test]
fn empty_replacement_restores_all_its_ranks_from_peers() {
    let (_d, mut c) = start(4, 1, |_| {});
    let n = 2 << 20;
    let mut expected = BTreeMap::new();
    for rank in 0..4u32 {
        expected.insert(rank, save(&c, rank as usize, "job", 100, rank, 4, n));
    }
    wait_for(LIMIT, "2 copies of every rank", || (0..4).all(|r| holders(&c, 0, "job", 100, r).len() == 2));
    c.replace_empty(2).unwrap();
    let mut client = Client::connect(c.socket(2)).unwrap();
    assert!(client.steps("job").unwrap().is_empty(), "the replacement starts empty");
    assert_eq!(client.latest("job").unwrap(), Some(100), "latest counts copies on live peers");
    assert!(load(&c, 2, "job", 100, 2, n).unwrap() == expected[&2], "rank 2 restored bitwise from n3");
    let st = cluster_status(&c, 2);
    assert_eq!(st.replication.shards_fetched, 1);
}

#[test]
fn corrupt_replica_is_detected_and_skipped_for_another_copy() {
    let (_d, mut c) = start(3, 2, |_| {});
    let n = 9 << 20;
    let data = save(&c, 0, "cor", 5, 0, 1, n);
    wait_for(LIMIT, "3 holders", || holders(&c, 0, "cor", 5, 0).len() == 3);
    // Flip a byte of n1's copy.
    let mut client = Client::connect(c.socket(1)).unwrap();
    let (path, _, _) = client.map_unverified(&ShardKey::new("cor", 5, 0)).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[6 << 20] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    c.replace_empty(0).unwrap();
    assert!(load(&c, 0, "cor", 5, 0, n).unwrap() == data, "restored from n2's good copy");
}

#[test]
fn losing_k_plus_1_nodes_gives_a_clear_answer_not_a_hang() {
    let (_d, mut c) = start(3, 1, |_| {});
    save(&c, 0, "lost", 1, 0, 2, 1000);
    save(&c, 2, "lost", 1, 1, 2, 1000);
    wait_for(LIMIT, "2 copies", || holders(&c, 2, "lost", 1, 0).len() == 2);
    c.kill(0).unwrap();
    c.kill(1).unwrap();
    let t = Instant::now();
    let e = load(&c, 2, "lost", 1, 0, 1000).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("no live copy"), "{e}");
    assert!(t.elapsed() < LIMIT, "answered in bounded time");
    let mut client = Client::connect(c.socket(2)).unwrap();
    assert_eq!(client.latest("lost").unwrap(), None, "no step is complete on live nodes");
}

#[test]
fn node_down_before_replication_gets_its_copy_when_back() {
    let (_d, mut c) = start(3, 1, |_| {});
    c.kill(1).unwrap();
    let data = save(&c, 0, "late", 1, 0, 1, 100_000);
    assert_eq!(holders(&c, 0, "late", 1, 0), ["n0"], "the save did not wait for the dead peer");
    c.restart(1).unwrap();
    // Re-replication brings the copy count back to k+1 on live nodes.
    wait_for(LIMIT, "a second copy", || holders(&c, 0, "late", 1, 0).len() == 2);
    c.kill(0).unwrap();
    let mut client = Client::connect(c.socket(2)).unwrap();
    assert_eq!(client.latest("late").unwrap(), Some(1));
    assert!(load(&c, 2, "late", 1, 0, 100_000).unwrap() == data);
}

#[test]
fn node_killed_during_replication_shows_no_partial_copy() {
    let (_d, mut c) = start(2, 1, |o| o.settings.replication_bandwidth = Some("8MB".into()));
    let n = 16 << 20;
    let data = save(&c, 0, "mid", 1, 0, 1, n);
    // The copy takes about two seconds at 8 MB/s; kill the receiver mid-way.
    let mut receiver = Client::connect(c.socket(1)).unwrap();
    wait_for(LIMIT, "the copy to start", || receiver.status().unwrap().memory.reservations == 1);
    c.kill(1).unwrap();
    c.restart(1).unwrap();
    let mut receiver = Client::connect(c.socket(1)).unwrap();
    let st = receiver.steps("mid").unwrap();
    assert!(st.iter().all(|s| s.ranks.is_empty()), "no partial replica is visible: {st:?}");
    wait_for(LIMIT, "the copy to be redone", || holders(&c, 0, "mid", 1, 0).len() == 2);
    let s = receiver.open(&ShardKey::new("mid", 1, 0)).unwrap();
    assert!(s.tensor("state").unwrap() == &data[..]);
}

#[test]
fn dead_node_triggers_re_replication_to_k_plus_1_live_copies() {
    let (_d, mut c) = start(4, 1, |_| {});
    for rank in 0..4u32 {
        save(&c, rank as usize, "rr", 7, rank, 4, 50_000);
    }
    wait_for(LIMIT, "2 copies of every rank", || (0..4).all(|r| holders(&c, 0, "rr", 7, r).len() == 2));
    c.kill(2).unwrap();
    wait_for(LIMIT, "2 live copies again", || {
        (0..4).all(|r| {
            let h = holders(&c, 0, "rr", 7, r);
            h.len() == 2 && !h.contains(&"n2".to_string())
        })
    });
    let st = cluster_status(&c, 0);
    assert_eq!(st.nodes[2].state, tierckpt_proto::NodeState::Dead);
    // People see the same in `tierckpt status`; programs get it with --json.
    let (ok, out, err) = tierckpt_harness::testing::cli(&c.socket(0), &["status"]);
    assert!(ok, "{err}");
    assert!(out.contains("n2") && out.contains("dead") && out.contains("rr"), "{out}");
    let (ok, out, _) = tierckpt_harness::testing::cli(&c.socket(0), &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(ok && v["cluster"]["nodes"][2]["state"] == "dead", "{v}");
    assert_eq!(v["cluster"]["namespaces"]["rr"][0]["complete"], true);
}

#[test]
fn peers_with_a_wrong_token_are_refused() {
    let (_d, mut c) = start(2, 1, |o| o.token = Some("right-token".into()));
    c.options_mut(1).token = Some("wrong-token".into());
    c.restart(1).unwrap();
    save(&c, 0, "tok", 1, 0, 1, 1000);
    // n1 cannot prove itself to n0, nor n0 to n1: no copy crosses.
    wait_for(LIMIT, "n1 to be seen as dead by n0", || {
        cluster_status(&c, 0).nodes[1].state == tierckpt_proto::NodeState::Dead
    });
    let mut client = Client::connect(c.socket(1)).unwrap();
    assert!(client.steps("tok").unwrap().is_empty());
    let addr = c.options(0).http_addr();
    let (st, _) = tierckpt_harness::testing::http(
        &addr,
        "GET",
        "/v1/peer/holdings",
        &[("Authorization", "Bearer wrong-token")],
        b"",
    );
    assert_eq!(st, 401);
    let (st, _) = tierckpt_harness::testing::http(&addr, "GET", "/v1/peer/holdings", &[], b"");
    assert_eq!(st, 401);
}

#[test]
fn rm_deletes_every_copy_across_the_cluster() {
    let (_d, c) = start(3, 1, |_| {});
    save(&c, 0, "del", 1, 0, 1, 1000);
    save(&c, 0, "del", 2, 0, 1, 1000);
    wait_for(LIMIT, "2 copies", || holders(&c, 2, "del", 2, 0).len() == 2);
    let (ok, out, err) = tierckpt_harness::testing::cli(&c.socket(2), &["rm", "del", "--step", "2", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["deleted_shards"], 2, "the shard on n0 and its replica on n1, asked from n2");
    for node in 0..3 {
        let steps: Vec<u64> =
            Client::connect(c.socket(node)).unwrap().steps("del").unwrap().iter().map(|s| s.step).collect();
        assert!(!steps.contains(&2), "n{node} still holds step 2");
    }
    let (ok, _, err) = tierckpt_harness::testing::cli(&c.socket(2), &["rm", "del", "--step", "2"]);
    assert!(!ok && err.contains("on any node"), "{err}");
}

#[test]
fn a_corrupt_local_copy_falls_through_to_a_peer() {
    let (_d, c) = start(2, 1, |_| {});
    let n = 6 << 20;
    let data = save(&c, 0, "fall", 3, 0, 1, n);
    wait_for(LIMIT, "2 holders", || holders(&c, 0, "fall", 3, 0).len() == 2);
    let mut client = Client::connect(c.socket(0)).unwrap();
    let (path, _, _) = client.map_unverified(&ShardKey::new("fall", 3, 0)).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[5 << 20] ^= 0x02;
    std::fs::write(&path, &bytes).unwrap();
    assert!(load(&c, 0, "fall", 3, 0, n).unwrap() == data, "restored from n1 after the local copy failed");
}

/// A 20 MiB shard (6 checksum chunks with the header) of which only 1 MiB
/// inside chunk `step % 5` changes from one step to the next (a delta then
/// leaves out 5/6, enough for a replica to be sent as one).
fn save_partly_changed(c: &LocalCluster, node: usize, ns: &str, step: u64) -> Vec<u8> {
    let chunk = 4 << 20;
    let mut data = payload(0, 0, 5 * chunk);
    for s in 1..=step {
        let at = (s % 5) as usize * chunk + chunk / 4;
        for (j, b) in data[at..at + chunk / 4].iter_mut().enumerate() {
            *b = b.wrapping_add((s as u8).wrapping_mul(13)).wrapping_add((j % 251) as u8);
        }
    }
    let t = [TensorData { name: "state", dtype: Dtype::U8, shape: &[data.len()], data: &data }];
    let mut client = Client::connect(c.socket(node)).unwrap();
    client.save(&ShardKey::new(ns, step, 0), 1, &t, &BTreeMap::new(), true).unwrap();
    data
}

#[test]
fn replicas_go_as_compressed_deltas_and_restore_bitwise() {
    let (_d, mut c) = start(2, 1, |o| o.settings.replication_compression = Some("zstd".into()));
    let mut last = Vec::new();
    for step in 1..=4 {
        last = save_partly_changed(&c, 0, "wire", step);
        wait_for(LIMIT, "the replica", || holders(&c, 0, "wire", step, 0).len() == 2);
    }
    let r = cluster_status(&c, 0).replication;
    assert_eq!(r.shards_sent, 4, "{r:?}");
    assert!(r.delta_shards_sent >= 2, "{r:?}");
    assert!(r.wire_bytes_sent < r.bytes_sent / 2, "{r:?}");
    // The replica decoded on n1's own copy of the base is the shard, bit for bit.
    let mut client = Client::connect(c.socket(1)).unwrap();
    assert!(client.open(&ShardKey::new("wire", 4, 0)).unwrap().tensor("state").unwrap() == &last[..]);
    // n0 comes back empty and restores step 4 from n1.
    c.replace_empty(0).unwrap();
    assert!(load(&c, 0, "wire", 4, 0, last.len()).unwrap() == last);
}

#[test]
fn a_delta_whose_base_the_peer_dropped_is_sent_whole() {
    let (_d, c) = start(2, 1, |o| {
        o.settings.heartbeat_interval = Some("5s".into());
        o.settings.heartbeat_timeout = Some("60s".into());
    });
    save_partly_changed(&c, 0, "gone", 1);
    wait_for(LIMIT, "the first replica", || {
        Client::connect(c.socket(1)).unwrap().steps("gone").unwrap().iter().any(|s| s.step == 1 && s.complete)
    });
    wait_for(LIMIT, "n0 to see it", || holders(&c, 0, "gone", 1, 0).len() == 2);
    // n1 drops step 1 alone; n0's view (heartbeats every 5 s) still has it there.
    let (status, _) = tierckpt_harness::testing::http(
        c.node(1).http_addr.as_deref().unwrap(),
        "DELETE",
        "/v1/namespaces/gone/steps/1?scope=node",
        &[("Authorization", &c.bearer())],
        b"",
    );
    assert_eq!(status, 200);
    let data = save_partly_changed(&c, 0, "gone", 2);
    wait_for(LIMIT, "the second replica", || {
        Client::connect(c.socket(1)).unwrap().steps("gone").unwrap().iter().any(|s| s.step == 2 && s.complete)
    });
    // n1 publishes before it answers n0, which then counts the replica.
    wait_for(LIMIT, "n0 to count it", || cluster_status(&c, 0).replication.shards_sent == 2);
    let r = cluster_status(&c, 0).replication;
    assert_eq!((r.shards_sent, r.delta_shards_sent, r.deltas_refused), (2, 0, 1), "{r:?}");
    let mut client = Client::connect(c.socket(1)).unwrap();
    assert!(client.open(&ShardKey::new("gone", 2, 0)).unwrap().tensor("state").unwrap() == &data[..]);
}

#[test]
fn every_compression_with_and_without_deltas_restores_bitwise_from_a_peer() {
    for compression in ["off", "lz4", "zstd:3"] {
        for delta in ["true", "false"] {
            let (_d, mut c) = start(2, 1, |o| {
                o.set_flags(&["--replication-compression", compression, "--replication-delta", delta]).unwrap()
            });
            let mut last = Vec::new();
            for step in 1..=3 {
                last = save_partly_changed(&c, 0, "combo", step);
                wait_for(LIMIT, "the replica", || holders(&c, 0, "combo", step, 0).len() == 2);
            }
            let r = cluster_status(&c, 0).replication;
            assert_eq!(r.delta_shards_sent > 0, delta == "true", "{compression} delta={delta}: {r:?}");
            c.replace_empty(0).unwrap();
            assert!(load(&c, 0, "combo", 3, 0, last.len()).unwrap() == last, "{compression} delta={delta}");
        }
    }
}

#[test]
fn unchanged_chunks_are_not_sent_again_and_restore_bitwise() {
    // Defaults: replicas are not compressed, but deltas are on.
    let (_d, mut c) = start(2, 1, |_| {});
    let mut last = Vec::new();
    for step in 1..=3 {
        last = save_partly_changed(&c, 0, "sparse", step);
        wait_for(LIMIT, "the replica", || holders(&c, 0, "sparse", step, 0).len() == 2);
    }
    wait_for(LIMIT, "n0 to count them", || cluster_status(&c, 0).replication.shards_sent == 3);
    let r = cluster_status(&c, 0).replication;
    assert_eq!((r.shards_sent, r.delta_shards_sent), (3, 2), "{r:?}");
    // Step 1 whole; steps 2 and 3 at most the two chunks their change touches.
    let shard = r.bytes_sent / 3;
    assert!(r.wire_bytes_sent <= shard + 2 * (8 << 20), "{r:?}");
    let mut client = Client::connect(c.socket(1)).unwrap();
    assert!(client.open(&ShardKey::new("sparse", 3, 0)).unwrap().tensor("state").unwrap() == &last[..]);
    c.replace_empty(0).unwrap();
    assert!(load(&c, 0, "sparse", 3, 0, last.len()).unwrap() == last);
}

#[test]
fn malformed_sparse_replicas_are_refused_and_store_nothing() {
    use tierckpt_format::{BaseRef, Manifest};
    let (_d, c) = start(2, 1, |_| {});
    let mut steps = Vec::new();
    for step in 1..=2 {
        steps.push(save_partly_changed(&c, 0, "bad", step));
        wait_for(LIMIT, "the replica", || holders(&c, 0, "bad", step, 0).len() == 2);
    }
    let (n0, n1) = (c.options(0).http_addr(), c.options(1).http_addr());
    let bearer = c.bearer();
    let auth = ("Authorization", bearer.as_str());
    let manifest = |step: u64| {
        let (st, body) =
            tierckpt_harness::testing::http(&n0, "GET", &format!("/v1/shards/bad/{step}/0/manifest"), &[auth], b"");
        assert_eq!(st, 200);
        Manifest::from_json(&body, "manifest").unwrap()
    };
    let (m1, m2) = (manifest(1), manifest(2));
    // Step 2's bytes as step 9 (a shard n1 does not hold), as a delta on step 1.
    let mut m9 = m2.clone();
    m9.key = ShardKey::new("bad", 9, 0);
    let mjson = serde_json::to_string(&m9).unwrap();
    let (st, file) = tierckpt_harness::testing::http(&n0, "GET", "/v1/shards/bad/2/0", &[auth], b"");
    assert_eq!(st, 200);
    let changed: Vec<u8> = (0..m9.chunks.len())
        .filter(|&i| m1.chunks[i] != m9.chunks[i])
        .flat_map(|i| {
            let (a, b) = m9.chunk_range(i);
            file[a as usize..b as usize].to_vec()
        })
        .collect();
    assert!(!changed.is_empty() && changed.len() < file.len());
    let base = serde_json::to_string(&BaseRef::of(&m1)).unwrap();
    let put = |base: &str, body: &[u8]| {
        let (st, resp) = tierckpt_harness::testing::http(
            &n1,
            "PUT",
            "/v1/replicas/bad/9/0",
            &[auth, ("x-tierckpt-manifest", &mjson), ("x-tierckpt-sparse-base", base)],
            body,
        );
        (st, String::from_utf8_lossy(&resp).into_owned())
    };
    let (st, msg) = put("not json", &changed);
    assert_eq!(st, 400, "{msg}");
    assert!(msg.contains("x-tierckpt-sparse-base"), "{msg}");
    let mut elsewhere = BaseRef::of(&m1);
    elsewhere.step = 7;
    let (st, msg) = put(&serde_json::to_string(&elsewhere).unwrap(), &changed);
    assert_eq!(st, 404, "{msg}");
    assert!(msg.contains("not held here"), "{msg}");
    let mut extra = changed.clone();
    extra.extend_from_slice(b"more");
    let (st, msg) = put(&base, &extra);
    assert!(st >= 400, "{st} {msg}");
    let mut flipped = changed.clone();
    flipped[changed.len() / 2] ^= 1;
    let (st, msg) = put(&base, &flipped);
    assert!(st >= 400 && msg.contains("checksum"), "{st} {msg}");
    let (st, msg) = put(&base, &changed[..changed.len() - 1]);
    assert!(st >= 400, "{st} {msg}");
    let mut client = Client::connect(c.socket(1)).unwrap();
    assert!(client.steps("bad").unwrap().iter().all(|s| s.step != 9));
    // The well-formed one is taken, and is step 2's bytes.
    let (st, msg) = put(&base, &changed);
    assert_eq!(st, 201, "{msg}");
    assert!(client.open(&ShardKey::new("bad", 9, 0)).unwrap().tensor("state").unwrap() == &steps[1][..]);
}

/// SIGSTOPs (or with `cont`, SIGCONTs) node `i`'s daemon.
fn signal(c: &LocalCluster, i: usize, cont: bool) {
    let sig = if cont { libc::SIGCONT } else { libc::SIGSTOP };
    // SAFETY: kill(2) on the pid of a child this test started; no memory is shared.
    let rc = unsafe { libc::kill(c.node(i).pid() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "signalling node {i}: {}", std::io::Error::last_os_error());
}

/// Node 0 saves a 64 MiB shard while node 1 (its ring target) is stopped
/// for 8 s; returns node 0's replication counters once `nodes - 1` peers
/// hold a verified copy.
fn push_to_a_stopped_peer(nodes: usize) -> tierckpt_proto::ReplicationStats {
    // Production heartbeats: every 500 ms, dead after 3 s.
    let (_d, c) = start(nodes, 1, |o| {
        o.settings.heartbeat_interval = Some("500ms".into());
        o.settings.heartbeat_timeout = Some("3s".into());
    });
    wait_for(LIMIT, "every node alive", || {
        cluster_status(&c, 0).nodes.iter().all(|n| n.state == tierckpt_proto::NodeState::Alive)
    });
    signal(&c, 1, false);
    let n = 64 << 20;
    let data = save(&c, 0, "stop", 1, 0, 1, n);
    std::thread::sleep(Duration::from_secs(8));
    signal(&c, 1, true);
    wait_for(LIMIT, "k+1 copies", || holders(&c, 0, "stop", 1, 0).len() == 2);
    // Whatever retry or re-replication was still due has run by now.
    std::thread::sleep(Duration::from_secs(3));
    let holder = holders(&c, 0, "stop", 1, 0).into_iter().find(|h| h != "n0").unwrap();
    let i: usize = holder[1..].parse().unwrap();
    let mut client = Client::connect(c.socket(i)).unwrap();
    assert!(client.open(&ShardKey::new("stop", 1, 0)).unwrap().tensor("state").unwrap() == &data[..]);
    let r = cluster_status(&c, 0).replication;
    assert!(r.wire_bytes_attempted <= 2 * (n as u64 + 4096), "at most two bodies sent: {r:?}");
    r
}

#[test]
fn a_stopped_peer_gets_its_replica_once_back_without_a_push_storm() {
    // n0 -> n1 only: the push in flight is dropped when n1 is declared dead,
    // and re-replication sends it once n1 answers heartbeats again.
    let r = push_to_a_stopped_peer(2);
    assert!(r.pushes_attempted <= 2, "pushes of one shard to a stopped peer: {r:?}");
    assert_eq!(r.shards_sent, 1, "{r:?}");
}

#[test]
fn re_replication_around_a_stopped_peer_sends_each_copy_once() {
    // n1 stopped: the copy goes to n2 instead, once, though n0's view of n2
    // lags a heartbeat behind (the re-replicator asks n2 before resending).
    let r = push_to_a_stopped_peer(3);
    assert!(r.pushes_attempted <= 2, "pushes of one shard: {r:?}");
    assert_eq!(r.shards_sent, 1, "{r:?}");
}
