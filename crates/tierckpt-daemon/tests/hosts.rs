//! Several hosts in network namespaces around a bridge (the harness's
//! `hosts`): a cluster whose nodes reach each other over veth links, not
//! loopback; trainers on every host; a host lost and replaced under a new
//! address; names served by a real DNS server (dnsmasq) and changed at run
//! time. Needs root, iproute2 and dnsmasq (scripts/test.sh installs it).
//!
//! Membership: static lists of addresses or host names, and discovery from
//! dnsmasq's A and SRV records with nodes that join, leave gracefully, and
//! are lost and replaced under a new address, all over mutual TLS; a node
//! with a certificate of another CA is refused.

use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use tierckpt_client::Client;
use tierckpt_format::ShardKey;
use tierckpt_harness::daemon::{binary, DaemonProcess, LocalCluster, LocalClusterOptions};
use tierckpt_harness::hosts::{Hosts, HostsOptions, LinkShape, DAEMON_PORT, DOMAIN};
use tierckpt_harness::writer::payload;
use tierckpt_proto::{ClusterStatus, NodeState};

#[path = "common/certs.rs"]
mod certs;

const LIMIT: Duration = Duration::from_secs(30);

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn hosts(n: usize, dns: bool) -> Hosts {
    Hosts::new(HostsOptions { hosts: n, link_rate: None, dns }).expect("hosts in network namespaces")
}

/// Live holders of (ns, step, rank) as the daemon at `socket` sees them.
fn holders(socket: &std::path::Path, ns: &str, step: u64, rank: u32) -> Vec<String> {
    let st = Client::connect(socket).unwrap().status().unwrap().cluster.expect("clustered");
    let mut h = st
        .namespaces
        .get(ns)
        .and_then(|steps| steps.iter().find(|s| s.step == step))
        .and_then(|s| s.holders.get(&rank).cloned())
        .unwrap_or_default();
    h.sort();
    h
}

fn load(socket: &std::path::Path, key: &ShardKey, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    Client::connect(socket).unwrap().load_into(key, &mut [("payload", &mut buf[..])]).expect("load");
    buf
}

/// Runs a trainer (`tierckpt-test-writer`) inside host `i` that saves `rank`
/// of step `step` through the daemon at `socket`.
fn train(h: &Hosts, i: usize, socket: &std::path::Path, step: u64, rank: u32, world: u32, n: usize) {
    let out = h
        .command(i, binary("tierckpt-test-writer"))
        .arg("--socket")
        .arg(socket)
        .args(["--namespace", "job", "--step", &step.to_string(), "--rank", &rank.to_string()])
        .args(["--world-size", &world.to_string(), "--bytes", &n.to_string(), "--seed", &rank.to_string()])
        .output()
        .expect("trainer runs");
    assert!(out.status.success(), "trainer on host {i}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("visible"), "trainer on host {i} saw its shard visible");
}

/// Starts a daemon on host `i` (memory tier in the host's
/// directory, HTTP on the host's address at `DAEMON_PORT`, the shared
/// `token`) with `flags` on top, e.g. `--node-id n0 --nodes <members_by_name>`,
/// `--discover dns:peers.tierckpt.test:7070`, `--tls-cert ...`.
fn daemon_on_host(h: &Hosts, i: usize, token: &str, flags: &[&str]) -> DaemonProcess {
    let mut o = h.daemon_options(i).unwrap();
    o.token = Some(token.into());
    // Plain HTTP between these hosts unless TLS flags say otherwise: the
    // links exist only inside this test.
    o.settings.insecure_http = Some(true);
    o.settings.heartbeat_interval = Some("100ms".into());
    o.settings.heartbeat_timeout = Some("600ms".into());
    o.set_flags(flags).expect("daemon flags");
    DaemonProcess::spawn(o).unwrap_or_else(|e| panic!("daemon on host {i}: {e:#}"))
}

/// The `nodes` list naming every host by name
/// (`n0=host0.tierckpt.test:7070,...`).
fn members_by_name(h: &Hosts) -> String {
    (0..h.len()).map(|i| format!("n{i}={}:{DAEMON_PORT}", h.host(i).fqdn())).collect::<Vec<_>>().join(",")
}

/// Nodes named by host name (resolved through each host's /etc/hosts and
/// dnsmasq).
#[test]
fn nodes_named_by_host_name_replicate() {
    let h = hosts(3, true);
    let token = tierckpt_harness::daemon::random_token();
    let members = members_by_name(&h);
    let nodes: Vec<DaemonProcess> =
        (0..3).map(|i| daemon_on_host(&h, i, &token, &["--node-id", &format!("n{i}"), "--nodes", &members])).collect();
    train(&h, 0, &nodes[0].socket, 1, 0, 1, 1 << 20);
    wait_for("the copy on host 1", || holders(&nodes[0].socket, "job", 1, 0) == ["n0", "n1"]);
    assert!(load(&nodes[1].socket, &ShardKey::new("job", 1, 0), 1 << 20) == payload(1 << 20, 0));
}

// ---------------------------------------------------------------------------

#[test]
fn four_hosts_replicate_across_the_bridge_and_a_replacement_restores_from_a_peer() {
    let mut h = hosts(4, false);
    let mut o = LocalClusterOptions { nodes: 4, ..Default::default() };
    o.settings.memory_tier_size = Some("128MiB".into());
    o.settings.insecure_http = Some(true);
    let mut c = LocalCluster::start_at(h.base_dir(), o, h.places()).expect("a cluster on 4 hosts");
    for i in 0..4 {
        assert_eq!(c.node(i).http_addr.as_deref(), Some(h.host(i).socket_addr(DAEMON_PORT).as_str()));
    }

    // A trainer on every host saves its rank; ring with k = 1 puts rank i's
    // copy on the next host.
    let n = 2 << 20;
    for i in 0..4 {
        train(&h, i, &c.socket(i), 100, i as u32, 4, n);
    }
    for i in 0..4usize {
        let next = (i + 1) % 4;
        let mut want = vec![format!("n{i}"), format!("n{next}")];
        want.sort();
        wait_for("the copy on the next host", || holders(&c.socket(0), "job", 100, i as u32) == want);
        let key = ShardKey::new("job", 100, i as u32);
        assert!(load(&c.socket(next), &key, n) == payload(n, i as u8), "rank {i}'s copy on host {next} is bitwise");
    }
    for i in 0..4 {
        let r = Client::connect(c.socket(i)).unwrap().status().unwrap().cluster.unwrap().replication;
        assert_eq!(r.shards_sent, 1, "host {i} sent its rank over the bridge");
    }

    // Host 2 lost: its processes die, its link goes down.
    let old = h.host(2).socket_addr(DAEMON_PORT);
    h.kill(2).unwrap();
    c.kill(2).unwrap();
    let reach = h
        .enter(0, || std::net::TcpStream::connect_timeout(&old.parse().unwrap(), Duration::from_secs(2)).is_ok())
        .unwrap();
    assert!(!reach, "the lost host's daemon is unreachable");

    // A replacement under a new address, with an empty memory tier: its
    // daemon is n2 at the new address; the others still list the old one.
    let new_addr = h.replace(2).unwrap();
    assert_ne!(new_addr.to_string(), old.split(':').next().unwrap());
    let mut o = h.daemon_options(2).unwrap();
    let mut settings = c.options(2).settings.clone();
    let members: Vec<String> =
        (0..4)
            .map(|i| {
                if i == 2 {
                    format!("n2={new_addr}:{DAEMON_PORT}")
                } else {
                    format!("n{i}={}", c.options(i).http_addr())
                }
            })
            .collect();
    settings.nodes = Some(members.join(",").parse().unwrap());
    settings.http_addr = o.settings.http_addr.clone();
    settings.memory_dir = o.settings.memory_dir.clone();
    settings.socket = o.settings.socket.clone();
    o.settings = settings;
    o.token = c.options(2).token.clone();
    let replacement = DaemonProcess::spawn(o).expect("the replacement's daemon");
    let mut client = Client::connect(&replacement.socket).unwrap();
    assert!(client.steps("job").unwrap().is_empty(), "the replacement starts empty");
    let key = ShardKey::new("job", 100, 2);
    assert!(load(&replacement.socket, &key, n) == payload(n, 2), "rank 2 restored bitwise from host 3");
    let st = client.status().unwrap().cluster.unwrap();
    assert_eq!(st.replication.shards_fetched, 1, "fetched from a peer across the bridge");
}

#[test]
fn host_names_resolve_through_dnsmasq_and_follow_changes() {
    let mut h = hosts(3, true);
    let a: Vec<Ipv4Addr> = (0..3).map(|i| h.addr(i)).collect();
    assert_eq!(h.resolve(0, &format!("host2.{DOMAIN}")).unwrap(), vec![a[2]]);
    assert_eq!(h.resolve(1, "host0").unwrap(), vec![a[0]], "short names resolve too");

    // A records only dnsmasq knows, changed at run time.
    let peers = format!("peers.{DOMAIN}");
    assert!(h.resolve(0, &peers).unwrap().is_empty());
    h.set_dns(&peers, &a).unwrap();
    wait_for("3 peers in DNS", || h.resolve(0, &peers).unwrap() == a);
    h.set_dns(&peers, &[a[0], a[2]]).unwrap();
    wait_for("2 peers in DNS", || h.resolve(1, &peers).unwrap() == vec![a[0], a[2]]);

    // SRV records (dnsmasq restarts to read them).
    let srv = format!("_tierckpt._tcp.{DOMAIN}");
    let targets: Vec<String> = (0..3).map(|i| h.host(i).fqdn()).collect();
    h.set_srv(&srv, &targets.iter().map(|t| (t.as_str(), DAEMON_PORT)).collect::<Vec<_>>()).unwrap();
    assert_eq!(h.enter(0, || srv_answers(&srv)).unwrap(), 3, "3 SRV records for {srv}");
    assert_eq!(h.resolve(0, &peers).unwrap(), vec![a[0], a[2]], "A records survive the restart");

    // A replaced host keeps its name under its new address, for every host.
    let new = h.replace(1).unwrap();
    assert_eq!(h.resolve(0, "host1").unwrap(), vec![new]);
    assert_eq!(h.resolve(2, &format!("host1.{DOMAIN}")).unwrap(), vec![new]);
}

#[test]
fn links_are_capped_with_tbf_both_ways_and_a_delay_needs_netem() {
    let mut h = Hosts::new(HostsOptions { hosts: 2, link_rate: Some("1gbit".into()), dns: false }).unwrap();
    let qdisc = |args: &[&str]| {
        let out = std::process::Command::new("tc").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let host_side = qdisc(&["-n", &h.host(1).netns, "qdisc", "show", "dev", "eth0"]);
    assert!(host_side.contains("tbf") && host_side.contains("rate 1Gbit"), "{host_side}");
    let bridge = h.host(1).netns.replace(&format!("-h{}", h.addr(1).octets()[3]), "-br");
    let bridge_side = qdisc(&["-n", &bridge, "qdisc", "show"]);
    assert_eq!(bridge_side.matches("rate 1Gbit").count(), 2, "both bridge ports capped: {bridge_side}");

    let shape = LinkShape { rate: Some("4gbit".into()), delay: Some(Duration::from_millis(1)) };
    match h.set_links(shape) {
        Ok(()) => assert!(qdisc(&["-n", &h.host(0).netns, "qdisc", "show", "dev", "eth0"]).contains("netem")),
        Err(e) => assert!(format!("{e:#}").contains("sch_netem"), "the error names the missing module: {e:#}"),
    }
    h.set_links(LinkShape { rate: Some("4gbit".into()), delay: None }).unwrap();
    assert!(qdisc(&["-n", &h.host(0).netns, "qdisc", "show", "dev", "eth0"]).contains("rate 4Gbit"));
    assert!(Hosts::new(HostsOptions { hosts: 1, link_rate: Some("fast".into()), dns: false })
        .err()
        .is_some_and(|e| e.to_string().contains("gbit")));
}

/// The number of answers to an SRV query for `name` to the hosts' DNS
/// server (a minimal DNS query over UDP).
fn srv_answers(name: &str) -> u16 {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 33, 0, 1]);
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.send_to(&q, (tierckpt_harness::hosts::BRIDGE_ADDR, 53)).unwrap();
    let mut buf = [0u8; 1500];
    let (len, _) = s.recv_from(&mut buf).expect("an answer from dnsmasq");
    assert!(len >= 12 && buf[0..2] == [0x12, 0x34], "a DNS answer to our query");
    u16::from_be_bytes([buf[6], buf[7]])
}

#[test]
fn dropping_hosts_removes_namespaces_processes_and_files() {
    let (names, dir, dns_pid) = {
        let mut h = hosts(2, true);
        let sleeper = h.command(1, "sleep").arg("600").spawn().unwrap();
        let names: Vec<String> = (0..2).map(|i| h.host(i).netns.clone()).collect();
        // `ip netns exec` enters the namespace before it runs sleep: wait for that.
        let pid = sleeper.id().to_string();
        wait_for("the sleeper inside host 1", || {
            let out = std::process::Command::new("ip").args(["netns", "pids", &names[1]]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == pid)
        });
        h.kill(1).unwrap();
        let mut sleeper = sleeper;
        assert!(sleeper.wait().unwrap().code().is_none(), "killing a host SIGKILLs its processes");
        let pid = dnsmasq_pid(&names[0]);
        (names, h.base_dir().to_path_buf(), pid)
    };
    let listed =
        String::from_utf8(std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap();
    for n in &names {
        assert!(!listed.contains(n.as_str()), "namespace {n} removed");
        assert!(!std::path::Path::new("/etc/netns").join(n).exists(), "/etc/netns/{n} removed");
    }
    assert!(!listed.contains(&names[0].replace("-h10", "-br")), "the bridge's namespace removed");
    assert!(!dir.exists(), "the hosts' tmpfs directory removed");
    let dns_pid = dns_pid.expect("dnsmasq was running");
    wait_for("dnsmasq gone", || !std::path::Path::new(&format!("/proc/{dns_pid}")).exists());
}

#[test]
fn namespaces_left_by_a_killed_test_process_are_removed_by_the_next() {
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let stale = format!("tck{}-0-h10", gone.id());
    let out = std::process::Command::new("ip").args(["netns", "add", &stale]).output().unwrap();
    assert!(out.status.success(), "ip netns add {stale}: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::create_dir_all(format!("/etc/netns/{stale}")).unwrap();
    let _h = hosts(1, false);
    assert!(!std::path::Path::new("/var/run/netns").join(&stale).exists(), "stale namespace {stale} removed");
    assert!(!std::path::Path::new("/etc/netns").join(&stale).exists(), "/etc/netns/{stale} removed");
}

/// The pid of the dnsmasq serving the hosts whose first namespace is `first`.
fn dnsmasq_pid(first: &str) -> Option<u32> {
    let bridge = first.replace("-h10", "-br");
    let out = std::process::Command::new("ip").args(["netns", "pids", &bridge]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).split_whitespace().next()?.parse().ok()
}

fn cluster(socket: &std::path::Path) -> ClusterStatus {
    Client::connect(socket).unwrap().status().unwrap().cluster.expect("clustered")
}

/// Ids of the live members `socket`'s daemon knows, sorted.
fn live(socket: &std::path::Path) -> Vec<String> {
    let mut ids: Vec<String> =
        cluster(socket).nodes.into_iter().filter(|n| n.state == NodeState::Alive).map(|n| n.id).collect();
    ids.sort();
    ids
}

/// The name every peer certificate carries (`tls_server_name`), as a
/// cluster in Kubernetes would use: pod addresses are not known in advance.
const PEER_NAME: &str = "peers.tierckpt.test";

/// Flags for mutual TLS with a certificate for [`PEER_NAME`] signed by `ca`,
/// written into `dir` as `name`.
fn tls_flags(dir: &std::path::Path, name: &str, ca: &certs::Ca, cluster_ca: &certs::Ca) -> Vec<String> {
    let (cert, key) = ca.node_for(&[PEER_NAME], false);
    let file = |ext: &str, text: &str| certs::write(dir, &format!("{name}.{ext}"), text).display().to_string();
    vec![
        "--tls-cert".into(),
        file("crt", &cert),
        "--tls-key".into(),
        file("key", &key),
        "--tls-ca".into(),
        file("ca", &cluster_ca.pem()),
        "--tls-server-name".into(),
        PEER_NAME.into(),
    ]
}

/// A daemon on host `i` that discovers its peers from `peers`' A records,
/// is node `n<i>`, and talks mutual TLS with certificates of `ca`.
fn discovering_daemon(h: &Hosts, i: usize, token: &str, ca: &certs::Ca) -> DaemonProcess {
    let me = h.host(i).socket_addr(DAEMON_PORT);
    let mut flags: Vec<String> =
        ["--node-id", &format!("n{i}"), "--advertise-addr", &me, "--discover-interval", "200ms"]
            .map(String::from)
            .to_vec();
    flags.extend(["--discover".into(), format!("dns:{PEER_NAME}:{DAEMON_PORT}")]);
    flags.extend(tls_flags(h.base_dir(), &format!("n{i}-{}", h.addr(i)), ca, ca));
    daemon_on_host(h, i, token, &flags.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn discovered_by_dns_nodes_join_leave_and_are_replaced_over_mutual_tls() {
    let mut h = hosts(4, true);
    let ca = certs::Ca::new("cluster CA");
    let token = tierckpt_harness::daemon::random_token();
    let addrs = |h: &Hosts, which: &[usize]| which.iter().map(|&i| h.addr(i)).collect::<Vec<_>>();
    h.set_dns(PEER_NAME, &addrs(&h, &[0, 1, 2])).unwrap();
    wait_for("the peers' name", || h.resolve(0, PEER_NAME).unwrap().len() == 3);
    let mut nodes: Vec<Option<DaemonProcess>> = (0..3).map(|i| Some(discovering_daemon(&h, i, &token, &ca))).collect();
    let socket = |nodes: &[Option<DaemonProcess>], i: usize| nodes[i].as_ref().unwrap().socket.clone();
    // DNS gives addresses; each answers as n<i> over mutual TLS.
    for i in 0..3 {
        wait_for("three live members named by their ids", || live(&socket(&nodes, i)) == ["n0", "n1", "n2"]);
    }
    assert_eq!(cluster(&socket(&nodes, 0)).membership, format!("dns:{PEER_NAME}:{DAEMON_PORT}"));
    let n = 1 << 20;
    train(&h, 0, &socket(&nodes, 0), 1, 0, 1, n);
    wait_for("the copy of step 1", || holders(&socket(&nodes, 0), "job", 1, 0).len() == 2);

    // Host 3 joins: published in DNS, its daemon starts, every node takes it in.
    h.set_dns(PEER_NAME, &addrs(&h, &[0, 1, 2, 3])).unwrap();
    nodes.push(Some(discovering_daemon(&h, 3, &token, &ca)));
    for i in 0..4 {
        wait_for("n3 a live member everywhere", || live(&socket(&nodes, i)).contains(&"n3".to_string()));
    }

    // The node holding the copy leaves gracefully (SIGTERM): the copy stays
    // at two, and every node drops the leaver.
    let copy = holders(&socket(&nodes, 0), "job", 1, 0).into_iter().find(|id| id != "n0").unwrap();
    let leaver: usize = copy[1..].parse().unwrap();
    h.set_dns(PEER_NAME, &addrs(&h, &(0..4).filter(|&i| i != leaver).collect::<Vec<_>>())).unwrap();
    nodes[leaver].take().unwrap().stop().unwrap();
    wait_for("the leaver dropped", || cluster(&socket(&nodes, 0)).nodes.iter().all(|m| m.id != copy));
    wait_for("two copies without the leaver", || holders(&socket(&nodes, 0), "job", 1, 0).len() == 2);

    // Another host is lost and replaced under a new address, same node id;
    // the replacement restores step 1 from a peer over mutual TLS.
    let lost = (1..4).find(|&i| i != leaver).unwrap();
    h.kill(lost).unwrap();
    nodes[lost].take();
    let new_addr = h.replace(lost).unwrap();
    h.set_dns(PEER_NAME, &addrs(&h, &(0..4).filter(|&i| i != leaver).collect::<Vec<_>>())).unwrap();
    nodes[lost] = Some(discovering_daemon(&h, lost, &token, &ca));
    let id = format!("n{lost}");
    wait_for("the replacement known at its new address", || {
        cluster(&socket(&nodes, 0))
            .nodes
            .iter()
            .any(|m| m.id == id && m.addr == format!("{new_addr}:{DAEMON_PORT}") && m.state == NodeState::Alive)
    });
    let key = ShardKey::new("job", 1, 0);
    assert!(load(&socket(&nodes, lost), &key, n) == payload(n, 0), "restored bitwise over mutual TLS");
    assert_eq!(cluster(&socket(&nodes, lost)).replication.shards_fetched, 1);
}

#[test]
fn srv_records_name_the_members() {
    let mut h = hosts(2, true);
    let token = tierckpt_harness::daemon::random_token();
    let srv = format!("_peer._tcp.{PEER_NAME}");
    let targets: Vec<String> = (0..2).map(|i| h.host(i).fqdn()).collect();
    h.set_srv(&srv, &targets.iter().map(|t| (t.as_str(), DAEMON_PORT)).collect::<Vec<_>>()).unwrap();
    // Ids come from the SRV targets: each node advertises its own name.
    let nodes: Vec<DaemonProcess> = (0..2)
        .map(|i| {
            let me = format!("{}:{DAEMON_PORT}", targets[i]);
            daemon_on_host(&h, i, &token, &["--discover", &format!("srv:{srv}"), "--advertise-addr", &me])
        })
        .collect();
    let ids: Vec<String> = targets.iter().map(|t| format!("{t}-{DAEMON_PORT}")).collect();
    for p in &nodes {
        wait_for("both members through SRV", || live(&p.socket) == ids);
    }
    train(&h, 1, &nodes[1].socket, 1, 0, 1, 1 << 20);
    wait_for("the copy on host 0", || holders(&nodes[0].socket, "job", 1, 0).len() == 2);
}

#[test]
fn a_host_with_a_certificate_of_another_ca_is_refused_and_nothing_is_lost() {
    let h = hosts(2, true);
    let (ca, stranger) = (certs::Ca::new("cluster CA"), certs::Ca::new("another CA"));
    let token = tierckpt_harness::daemon::random_token();
    let members = members_by_name(&h);
    let start = |i: usize, signer: &certs::Ca| {
        let mut flags: Vec<String> = vec!["--node-id".into(), format!("n{i}"), "--nodes".into(), members.clone()];
        flags.extend(tls_flags(h.base_dir(), &format!("n{i}"), signer, &ca));
        daemon_on_host(&h, i, &token, &flags.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let good = start(0, &ca);
    let bad = start(1, &stranger);
    train(&h, 0, &good.socket, 1, 0, 1, 1 << 20);
    wait_for("n0 to name the certificate problem", || {
        cluster(&good.socket)
            .nodes
            .iter()
            .any(|m| m.id == "n1" && m.last_error.as_deref().is_some_and(|e| e.contains("certificate")))
    });
    assert!(live(&good.socket) == ["n0"], "the stranger is not a live member");
    assert!(holders(&bad.socket, "job", 1, 0).iter().all(|id| id != "n1"), "no replica went to the stranger");
    let key = ShardKey::new("job", 1, 0);
    assert!(load(&good.socket, &key, 1 << 20) == payload(1 << 20, 0), "nothing stored was lost");
}

#[test]
fn slurm_node_lists_name_the_members() {
    let h = hosts(2, true);
    let token = tierckpt_harness::daemon::random_token();
    // What Slurm sets in a job step: the job's hosts, compressed, and this node's name.
    let nodes: Vec<DaemonProcess> = (0..2)
        .map(|i| {
            let mut o = h.daemon_options(i).unwrap();
            o.token = Some(token.clone());
            o.settings.insecure_http = Some(true);
            o.settings.heartbeat_interval = Some("100ms".into());
            o.set_flags(&["--discover", &format!("slurm:{DAEMON_PORT}")]).unwrap();
            o.env =
                vec![("SLURM_JOB_NODELIST".into(), "host[0-1]".into()), ("SLURMD_NODENAME".into(), format!("host{i}"))];
            DaemonProcess::spawn(o).unwrap_or_else(|e| panic!("daemon on host {i}: {e:#}"))
        })
        .collect();
    let ids = ["host0-7070", "host1-7070"];
    for p in &nodes {
        wait_for("both members from the Slurm node list", || live(&p.socket) == ids);
    }
    train(&h, 0, &nodes[0].socket, 1, 0, 1, 1 << 20);
    wait_for("the copy on host1", || holders(&nodes[0].socket, "job", 1, 0) == ids);
}

/// Every copy of (step, rank) on the nodes that hold it, read from each.
fn copies(sockets: &[std::path::PathBuf], step: u64, rank: u32, n: usize) -> Vec<Vec<u8>> {
    let key = ShardKey::new("job", step, rank);
    sockets
        .iter()
        .filter(|s| {
            Client::connect(s).unwrap().steps("job").unwrap().iter().any(|x| x.step == step && x.ranks.contains(&rank))
        })
        .map(|s| load(s, &key, n))
        .collect()
}

#[test]
fn a_node_cut_off_from_its_peers_keeps_saving_and_the_cluster_heals_by_itself() {
    let mut h = hosts(3, false);
    let token = tierckpt_harness::daemon::random_token();
    let members: String =
        (0..3).map(|i| format!("n{i}={}", h.host(i).socket_addr(DAEMON_PORT))).collect::<Vec<_>>().join(",");
    let nodes: Vec<DaemonProcess> =
        (0..3).map(|i| daemon_on_host(&h, i, &token, &["--node-id", &format!("n{i}"), "--nodes", &members])).collect();
    let sockets: Vec<std::path::PathBuf> = nodes.iter().map(|p| p.socket.clone()).collect();
    let n = 1 << 20;
    for (i, socket) in sockets.iter().enumerate() {
        train(&h, i, socket, 1, i as u32, 3, n);
    }
    wait_for("step 1 copied", || (0..3).all(|r| holders(&sockets[0], "job", 1, r).len() == 2));

    // Host 2 is cut off from its peers; every trainer, host 2's too, saves step 2.
    h.link(2, false).unwrap();
    for (i, socket) in sockets.iter().enumerate() {
        train(&h, i, socket, 2, i as u32, 3, n);
    }
    wait_for("n2 seen dead by n0", || {
        cluster(&sockets[0]).nodes.iter().any(|m| m.id == "n2" && m.state == NodeState::Dead)
    });

    // Healed without an operator: every rank of step 2 reaches k+1 copies,
    // and every copy of every step is the same bytes everywhere.
    h.link(2, true).unwrap();
    wait_for("step 2 complete with two copies of each rank", || {
        (0..3).all(|r| holders(&sockets[0], "job", 2, r).len() >= 2)
    });
    for step in [1, 2] {
        for r in 0..3u32 {
            let all = copies(&sockets, step, r, n);
            assert!(all.len() >= 2, "step {step} rank {r}: {} copies", all.len());
            assert!(all.iter().all(|c| *c == payload(n, r as u8)), "step {step} rank {r}: one content everywhere");
        }
    }
    for s in &sockets {
        assert_eq!(Client::connect(s).unwrap().latest("job").unwrap(), Some(2));
    }
}
