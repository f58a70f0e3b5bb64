//! The peer tier (the other nodes' memory, through a running cluster)
//! passes the conformance suite that every tier passes.

use std::path::Path;

use tierckpt_daemon::peer_tier::PeerTier;
use tierckpt_daemon::{ConfigLayer, Daemon, DaemonConfig};
use tierckpt_format::ShardKey;
use tierckpt_harness::daemon::free_ports;
use tierckpt_harness::testing::shm_dir;

fn layer(dir: &Path, id: &str, nodes: &str) -> ConfigLayer {
    ConfigLayer {
        memory_dir: Some(dir.join(id)),
        memory_tier_size: Some("256MiB".into()),
        node_id: Some(id.into()),
        nodes: Some(nodes.parse().unwrap()),
        heartbeat_interval: Some("200ms".into()),
        // Long enough that no re-replication runs during the suite.
        heartbeat_timeout: Some("5s".into()),
        background_nice: Some(0),
        token: Some("peer-tier-token".into()),
        // A mount (the default as root) would outlive the test's directory.
        mount_huge_tmpfs: Some(false),
        ..Default::default()
    }
}

/// Flips the last byte of `key`'s file in a node's memory directory.
fn flip(memory_dir: &Path, key: &ShardKey) {
    let file = memory_dir
        .join("ns")
        .join(&key.namespace)
        .join(format!("{:020}", key.step))
        .join(format!("rank-{:05}-of-{:05}.safetensors", key.rank, 1));
    let mut bytes = std::fs::read(&file).expect("the peer holds the shard");
    *bytes.last_mut().unwrap() ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_tier_passes_the_conformance_suite() {
    let dir = shm_dir();
    let ports = free_ports(2).unwrap();
    let nodes = format!("n0=127.0.0.1:{},n1=127.0.0.1:{}", ports[0], ports[1]);
    let mut running = Vec::new();
    for id in ["n0", "n1"] {
        let cfg = DaemonConfig::resolve(layer(dir.path(), id, &nodes)).unwrap();
        running.push(Daemon::start(cfg).await.expect("daemon starts"));
    }
    let peer = PeerTier::new(running[0].daemon.cluster.clone().expect("clustered"));
    let n1_memory = dir.path().join("n1");
    tierckpt_tiers::conformance::run_all(&peer, &|key: &ShardKey| flip(&n1_memory, key)).await;
    assert!(running[0].daemon.tier.steps("conf-rt").unwrap().is_empty(), "puts go to peers, not to this node");
    for r in running {
        r.shutdown().await;
    }
}
