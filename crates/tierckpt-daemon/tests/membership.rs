//! Membership with real daemons on 127.0.0.1: host names in `nodes`,
//! members discovered from a file that changes at runtime (a node joins, a
//! node leaves gracefully and hands its copies over, a node is lost and
//! replaced under a new address), member lists that disagree, names that
//! do not resolve, and a malformed member header.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tierckpt_client::{Client, TensorData};
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::daemon::{free_ports, random_token, DaemonOptions, DaemonProcess};
use tierckpt_harness::testing::{http, shm_dir};
use tierckpt_proto::{ClusterStatus, NodeState};

fn status(p: &DaemonProcess) -> ClusterStatus {
    Client::connect(&p.socket).unwrap().status().unwrap().cluster.expect("clustered")
}

fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn save(p: &DaemonProcess, ns: &str, step: u64, n: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..n).map(|i| (i as u64 * 31 + step) as u8).collect();
    let t = [TensorData { name: "state", dtype: Dtype::U8, shape: &[n], data: &data }];
    Client::connect(&p.socket).unwrap().save(&ShardKey::new(ns, step, 0), 1, &t, &BTreeMap::new(), true).unwrap();
    data
}

fn load(p: &DaemonProcess, ns: &str, step: u64, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    Client::connect(&p.socket).unwrap().load_into(&ShardKey::new(ns, step, 0), &mut [("state", &mut buf[..])]).unwrap();
    buf
}

/// Nodes that hold rank 0 of `step`, as `p` sees them.
fn holders(p: &DaemonProcess, ns: &str, step: u64) -> Vec<String> {
    status(p)
        .namespaces
        .get(ns)
        .and_then(|s| s.iter().find(|s| s.step == step))
        .and_then(|s| s.holders.get(&0).cloned())
        .unwrap_or_default()
}

fn members(p: &DaemonProcess) -> Vec<(String, NodeState)> {
    status(p).nodes.into_iter().map(|n| (n.id, n.state)).collect()
}

fn alive(p: &DaemonProcess, id: &str) -> bool {
    members(p).iter().any(|(n, s)| n == id && *s == NodeState::Alive)
}

/// Node `id` of a cluster listed in `list`, serving on 127.0.0.1:`port`.
fn listed_node(dir: &Path, id: &str, port: u16, list: &str, token: &str) -> DaemonProcess {
    let mut o = DaemonOptions::new(dir.join(id));
    let flags = ["--node-id", id, "--nodes", list, "--heartbeat-interval", "100ms", "--memory-tier-size", "64MiB"];
    o.set_flags(&flags).unwrap();
    o.settings.http_addr = Some(format!("127.0.0.1:{port}"));
    o.token = Some(token.to_string());
    DaemonProcess::spawn(o).unwrap()
}

/// A node of a cluster whose members are read from `members_file`.
struct Node {
    id: String,
    addr: String,
    opts: DaemonOptions,
}

fn discovered_node(dir: &Path, port: u16, members_file: &Path, token: &str) -> Node {
    let addr = format!("127.0.0.1:{port}");
    let mut opts = DaemonOptions::new(dir.join(format!("node-{port}")));
    opts.set_flags(&[
        "--discover",
        &format!("file:{}", members_file.display()),
        "--discover-interval",
        "100ms",
        "--advertise-addr",
        &addr,
        "--http-addr",
        &addr,
        "--heartbeat-interval",
        "100ms",
        // Re-replication leaves shards younger than twice this alone, so a
        // copy that shows up at once after a leave was handed over.
        "--heartbeat-timeout",
        "3s",
        "--memory-tier-size",
        "256MiB",
    ])
    .unwrap();
    opts.token = Some(token.to_string());
    Node { id: format!("127.0.0.1-{port}"), addr, opts }
}

fn write_members(path: &PathBuf, nodes: &[&Node]) {
    let text: String = nodes.iter().map(|n| format!("{}\n", n.addr)).collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn host_names_in_nodes_form_a_cluster() {
    let dir = shm_dir();
    let ports = free_ports(2).unwrap();
    let list = format!("a=localhost:{},b=localhost:{}", ports[0], ports[1]);
    let token = random_token();
    let spawn = |id: &str, port: u16| listed_node(dir.path(), id, port, &list, &token);
    let (a, b) = (spawn("a", ports[0]), spawn("b", ports[1]));
    let data = save(&a, "job", 1, 1 << 20);
    wait_for(Duration::from_secs(20), "the replica on b", || holders(&b, "job", 1).contains(&"b".to_string()));
    assert_eq!(load(&b, "job", 1, 1 << 20), data);
    let nodes = status(&a).nodes;
    assert!(nodes.iter().any(|n| n.id == "b" && n.addr == format!("localhost:{}", ports[1])), "{nodes:?}");
}

#[test]
fn nodes_join_leave_gracefully_and_are_replaced_under_a_new_address() {
    let dir = shm_dir();
    let file = dir.path().join("members");
    let token = random_token();
    let ports = free_ports(4).unwrap();
    let nodes: Vec<Node> = ports.iter().map(|&p| discovered_node(dir.path(), p, &file, &token)).collect();
    let [a, b, c, d] = [&nodes[0], &nodes[1], &nodes[2], &nodes[3]];
    write_members(&file, &[a, b]);
    let pa = DaemonProcess::spawn(a.opts.clone()).unwrap();
    let mut pb = DaemonProcess::spawn(b.opts.clone()).unwrap();
    wait_for(Duration::from_secs(10), "a and b to see each other", || alive(&pa, &b.id) && alive(&pb, &a.id));
    assert_eq!(status(&pa).membership, format!("file:{}", file.display()));
    let one = save(&pa, "job", 1, 1 << 20);
    wait_for(Duration::from_secs(20), "step 1 on b", || holders(&pa, "job", 1).len() == 2);

    // c joins: listed in the file, it starts and every node takes it in.
    write_members(&file, &[a, b, c]);
    let mut pc = DaemonProcess::spawn(c.opts.clone()).unwrap();
    for p in [&pa, &pb, &pc] {
        wait_for(Duration::from_secs(10), "c to be a live member everywhere", || alive(p, &c.id));
    }
    let two = save(&pa, "job", 2, 1 << 20);
    wait_for(Duration::from_secs(20), "step 2 copied", || holders(&pa, "job", 2).len() == 2);

    // The node holding a's copy of step 2 leaves gracefully: it hands the
    // copy over first, then every node drops it.
    let copy_on = holders(&pa, "job", 2).into_iter().find(|h| *h != a.id).unwrap();
    let (stays, leaving, staying) = if copy_on == b.id { (c, &mut pb, &mut pc) } else { (b, &mut pc, &mut pb) };
    leaving.stop().unwrap();
    // The leaver exits once it handed over: the copy is there already
    // (before any node took it for lost and re-replicated).
    assert!(holders(staying, "job", 2).contains(&stays.id), "the copy was handed over before leaving");
    wait_for(Duration::from_secs(10), "the leaver to be dropped", || members(&pa).iter().all(|(n, _)| *n != copy_on));

    // The remaining peer is lost (SIGKILL) and replaced by d, a new node
    // under a new address: a's copies are back to two, on d.
    staying.kill().unwrap();
    write_members(&file, &[a, d]);
    let pd = DaemonProcess::spawn(d.opts.clone()).unwrap();
    wait_for(Duration::from_secs(10), "the lost node to be forgotten", || {
        members(&pa).iter().all(|(n, _)| *n != stays.id)
    });
    wait_for(Duration::from_secs(30), "step 2 re-replicated to d", || holders(&pa, "job", 2).contains(&d.id));
    assert_eq!(load(&pd, "job", 2, 1 << 20), two);
    // Nothing stored was lost on the way.
    assert_eq!(load(&pa, "job", 1, 1 << 20), one);
}

#[test]
fn member_lists_that_disagree_and_unresolvable_names_are_named() {
    let dir = shm_dir();
    let ports = free_ports(2).unwrap();
    let token = random_token();
    let spawn = |id: &str, port: u16, list: &str| listed_node(dir.path(), id, port, list, &token);
    let short = format!("a=127.0.0.1:{},b=127.0.0.1:{}", ports[0], ports[1]);
    let long = format!("{short},z=no-such-host.invalid:7750");
    let a = spawn("a", ports[0], &short);
    let b = spawn("b", ports[1], &long);
    wait_for(Duration::from_secs(10), "a to see b's list differ", || !status(&a).disagreements.is_empty());
    let d = status(&a).disagreements.join("; ");
    assert!(d.contains("node b") && d.contains("\"z\""), "{d}");
    wait_for(Duration::from_secs(10), "b to name why z fails", || {
        status(&b).nodes.iter().any(|n| n.id == "z" && n.last_error.is_some())
    });
    let z = status(&b).nodes.into_iter().find(|n| n.id == "z").unwrap();
    assert!(z.last_error.as_deref().unwrap().contains("no-such-host.invalid"), "{z:?}");
    // z never answered: a does not take it in from b's gossip.
    assert!(members(&a).iter().all(|(n, _)| n != "z"));

    // A malformed member header is refused, naming it.
    let auth = format!("Bearer {token}");
    let (code, body) = http(
        &format!("127.0.0.1:{}", ports[0]),
        "GET",
        "/v1/peer/holdings",
        &[("authorization", &auth), ("x-tierckpt-member", "c 127.0.0.1")],
        b"",
    );
    let body = String::from_utf8_lossy(&body);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("x-tierckpt-member"), "{body}");

    // A node whose own address does not resolve refuses to start, naming it.
    let out = std::process::Command::new(tierckpt_harness::daemon::daemon_binary())
        .args(["--print-config", "--node-id", "c", "--nodes", "c=no-such-host.invalid:7750,a=127.0.0.1:1"])
        .env("TIERCKPT_TOKEN", &token)
        .env("TIERCKPT_MEMORY_TIER_SIZE", "64MiB")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("no-such-host.invalid:7750 does not resolve"), "{e}");
}
