//! Deletes across a cluster remove everything they name, on every node,
//! including replicas still in flight, or fail and say which nodes may
//! still hold copies.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tierckpt_client::{Client, ErrorKind, TensorData};
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::daemon::{LocalCluster, LocalClusterOptions};
use tierckpt_harness::testing::{cli, shm_dir};
use tierckpt_proto::NodeState;

fn start(nodes: usize, f: impl FnOnce(&mut LocalClusterOptions)) -> (tempfile::TempDir, LocalCluster) {
    let dir = shm_dir();
    let mut o = LocalClusterOptions { nodes, ..Default::default() };
    o.settings.replication_factor = Some(1);
    o.settings.memory_tier_size = Some("256MiB".into());
    f(&mut o);
    let c = LocalCluster::start(dir.path(), o).unwrap();
    (dir, c)
}

fn save(c: &LocalCluster, node: usize, ns: &str, step: u64, rank: u32, world: u32, n: usize) {
    let data: Vec<u8> = (0..n).map(|i| (i as u64 * 7 + rank as u64 + step) as u8).collect();
    let t = [TensorData { name: "state", dtype: Dtype::U8, shape: &[n], data: &data }];
    let mut client = Client::connect(c.socket(node)).unwrap();
    client.save(&ShardKey::new(ns, step, rank), world, &t, &BTreeMap::new(), true).unwrap();
}

#[test]
fn rm_right_after_a_save_leaves_nothing_on_any_node() {
    // Replication is slowed so that replicas are in flight when rm runs.
    let (_d, c) = start(3, |o| o.settings.replication_bandwidth = Some("16MB".into()));
    let n = 8 << 20;
    for step in [4, 6] {
        for node in 0..3 {
            save(&c, node, "job", step, node as u32, 3, n);
        }
    }
    let (ok, out, err) = cli(&c.socket(0), &["rm", "job"]);
    assert!(ok, "rm failed: {out}{err}");
    // Long enough for every replica in flight to land, were it not dropped.
    std::thread::sleep(Duration::from_secs(3));
    for node in 0..3 {
        let mut client = Client::connect(c.socket(node)).unwrap();
        assert_eq!(client.steps("job").unwrap(), [], "node {node} still holds steps of a deleted namespace");
        assert_eq!(client.latest("job").unwrap(), None, "node {node}");
    }
    // Writing the namespace again works.
    save(&c, 0, "job", 6, 0, 1, 1 << 10);
    assert_eq!(Client::connect(c.socket(1)).unwrap().latest("job").unwrap(), Some(6));
}

#[test]
fn a_delete_that_misses_a_node_says_so() {
    let (_d, mut c) = start(3, |o| {
        o.settings.heartbeat_interval = Some("100ms".into());
        o.settings.heartbeat_timeout = Some("600ms".into());
    });
    save(&c, 0, "half", 1, 0, 1, 1 << 20);
    c.kill(2).unwrap();
    let node2 = LocalCluster::node_id(2);
    let start = Instant::now();
    let dead = || {
        let status = Client::connect(c.socket(0)).unwrap().status().unwrap().cluster.expect("clustered");
        status.nodes.iter().any(|n| n.id == node2 && n.state == NodeState::Dead)
    };
    while !dead() {
        assert!(start.elapsed() < Duration::from_secs(30), "n0 never saw n2 dead");
        std::thread::sleep(Duration::from_millis(25));
    }
    let e = Client::connect(c.socket(0)).unwrap().delete_namespace("half").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains(&node2) && e.to_string().contains("may still hold"), "{e}");
    assert_eq!(Client::connect(c.socket(0)).unwrap().steps("half").unwrap(), [], "what could be deleted was");
}
