//! A rolling restart of a 4-node cluster while a job checkpoints: each node
//! in turn stops gracefully (SIGTERM: it hands its copies over and leaves)
//! and comes back on its memory directory, between saves. Nothing is lost:
//! every step kept is complete, bitwise, with at least k+1 copies, and every node
//! names the newest step as `latest`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tierckpt_client::{Client, TensorData};
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::daemon::{DaemonProcess, LocalCluster, LocalClusterOptions};
use tierckpt_harness::testing::shm_dir;

const WORLD: u32 = 4;
const BYTES: usize = 256 << 10;

fn payload(step: u64, rank: u32) -> Vec<u8> {
    (0..BYTES).map(|i| (i as u64 * 31 + step * 7 + rank as u64 * 13) as u8).collect()
}

fn holders(c: &LocalCluster, node: usize, step: u64, rank: u32) -> Vec<String> {
    let st = Client::connect(c.socket(node)).unwrap().status().unwrap().cluster.expect("clustered");
    st.namespaces
        .get("job")
        .and_then(|s| s.iter().find(|s| s.step == step))
        .and_then(|s| s.holders.get(&rank).cloned())
        .unwrap_or_default()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn a_rolling_restart_during_training_loses_nothing() {
    let dir = shm_dir();
    let mut o = LocalClusterOptions { nodes: WORLD as usize, ..Default::default() };
    o.settings.memory_tier_size = Some("64MiB".into());
    let mut c = LocalCluster::start(dir.path(), o).unwrap();
    let save = |c: &LocalCluster, step: u64| {
        for rank in 0..WORLD {
            let data = payload(step, rank);
            let t = [TensorData { name: "state", dtype: Dtype::U8, shape: &[BYTES], data: &data }];
            let mut client = Client::connect(c.socket(rank as usize)).unwrap();
            client.save(&ShardKey::new("job", step, rank), WORLD, &t, &BTreeMap::new(), true).unwrap();
        }
        for rank in 0..WORLD {
            wait_for("k+1 copies", || holders(c, 0, step, rank).len() >= 2);
        }
    };
    let mut step = 0;
    for node in 0..WORLD as usize {
        step += 1;
        save(&c, step);
        // Node `node` is upgraded: a graceful stop, then a new process on
        // the same memory directory (a new incarnation).
        c.nodes[node].take().unwrap().stop().unwrap();
        c.nodes[node] = Some(DaemonProcess::spawn(c.options(node).clone()).unwrap());
        for other in 0..WORLD as usize {
            wait_for("every node to see the restarted one alive", || {
                let st = Client::connect(c.socket(other)).unwrap().status().unwrap().cluster.unwrap();
                st.nodes.iter().filter(|n| n.state == tierckpt_proto::NodeState::Alive).count() == WORLD as usize
            });
        }
    }
    step += 1;
    save(&c, step);

    // Every kept step (keep_last 3) is complete with k+1 copies, bitwise on
    // every node that holds a copy, and `latest` is the newest everywhere.
    for s in step - 2..=step {
        for rank in 0..WORLD {
            let h = holders(&c, 0, s, rank);
            // A node that handed its copy over and came back with it makes a
            // third copy until retention drops the step.
            assert!(h.len() >= 2, "step {s} rank {rank}: {h:?}");
            for id in h {
                let node: usize = id[1..].parse().unwrap();
                let mut buf = vec![0u8; BYTES];
                let mut client = Client::connect(c.socket(node)).unwrap();
                client.load_into(&ShardKey::new("job", s, rank), &mut [("state", &mut buf[..])]).unwrap();
                assert!(buf == payload(s, rank), "step {s} rank {rank} on {id} is bitwise");
            }
        }
    }
    for node in 0..WORLD as usize {
        assert_eq!(Client::connect(c.socket(node)).unwrap().latest("job").unwrap(), Some(step), "node {node}");
    }
}
