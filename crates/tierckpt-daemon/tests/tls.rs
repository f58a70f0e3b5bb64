//! TLS and role tokens against real daemon processes: a cluster that
//! replicates and restores over mutual TLS, nodes refused for a certificate
//! of another CA or an expired one, plain HTTP to a TLS port, certificates
//! reloaded without a restart, tokens by role, and the `insecure_http`
//! rule. Certificates are made in the test (rcgen) into a tempdir.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/certs.rs"]
mod certs;

use certs::{node_files, replace, write, Ca, NODE_NAME};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tierckpt_client::{Client, TensorData};
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::daemon::{LocalCluster, LocalClusterOptions};
use tierckpt_harness::testing::{shm_dir, TestDaemon};
use tierckpt_proto::{ClusterStatus, NodeState};
use tierckpt_tiers::conformance::sample_shard;

const LIMIT: Duration = Duration::from_secs(30);

/// One HTTPS exchange with a blocking rustls client that trusts `ca_pem`
/// alone, presents `client` if given, and checks `name` on the server's
/// certificate: Ok((status, body)) or the error as text.
fn https(
    addr: &str,
    ca_pem: &str,
    client: Option<&(String, String)>,
    name: &str,
    method: &str,
    path: &str,
    bearer: &str,
) -> Result<(u16, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
            b.with_client_auth_cert(certs, PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap()).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    let conn = rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from(name.to_string()).unwrap())
        .map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: {bearer}\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    if let Err(e) = s.read_to_end(&mut resp) {
        if resp.is_empty() || e.kind() != std::io::ErrorKind::UnexpectedEof {
            return Err(e.to_string());
        }
    }
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| text.clone())?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

fn save(c: &LocalCluster, node: usize, ns: &str, step: u64, n: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..n).map(|i| (i * 7 + step as usize) as u8).collect();
    let t = [TensorData { name: "state", dtype: Dtype::U8, shape: &[n], data: &data }];
    let mut client = Client::connect(c.socket(node)).unwrap();
    client.save(&ShardKey::new(ns, step, 0), 1, &t, &BTreeMap::new(), true).unwrap();
    data
}

fn load(c: &LocalCluster, node: usize, ns: &str, step: u64, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut client = Client::connect(c.socket(node)).unwrap();
    client.load_into(&ShardKey::new(ns, step, 0), &mut [("state", &mut buf[..])]).unwrap();
    buf
}

fn cluster_status(c: &LocalCluster, node: usize) -> ClusterStatus {
    Client::connect(c.socket(node)).unwrap().status().unwrap().cluster.expect("clustered")
}

fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A 2-node cluster under mutual TLS with `ca` as the cluster CA and the
/// given node certificates.
fn tls_cluster(
    pki: &Path,
    ca: &Ca,
    certs: &[(String, String)],
    f: impl FnOnce(&mut LocalClusterOptions),
) -> (tempfile::TempDir, LocalCluster) {
    let dir = shm_dir();
    let mut o = LocalClusterOptions { nodes: certs.len(), ..Default::default() };
    o.settings.memory_tier_size = Some("64MiB".into());
    o.settings.tls_ca = Some(write(pki, "ca.crt", &ca.pem()));
    o.node_settings = certs.iter().enumerate().map(|(i, c)| node_files(pki, &format!("n{i}"), c)).collect();
    f(&mut o);
    let c = LocalCluster::start(dir.path(), o).unwrap();
    (dir, c)
}

#[test]
fn a_cluster_replicates_and_restores_over_mutual_tls() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let certs = [ca.node(false), ca.node(false)];
    let (_d, mut c) = tls_cluster(pki.path(), &ca, &certs, |_| {});
    let data = save(&c, 0, "tls", 5, 1 << 20);
    wait_for(LIMIT, "the replica on n1", || {
        Client::connect(c.socket(1)).unwrap().steps("tls").unwrap().iter().any(|s| s.step == 5 && s.complete)
    });
    // n0 comes back empty and restores its rank from n1's copy.
    c.replace_empty(0).unwrap();
    assert!(load(&c, 0, "tls", 5, 1 << 20) == data, "restored bitwise from the peer over TLS");
    assert_eq!(cluster_status(&c, 0).replication.shards_fetched, 1);

    let addr = c.options(1).http_addr();
    let bearer = c.bearer();
    // A peer endpoint needs the token and a client certificate of the CA.
    let (st, body) = https(&addr, &ca.pem(), None, "127.0.0.1", "GET", "/v1/peer/holdings", &bearer).unwrap();
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("client certificate") && body.contains("tls_ca"), "{body}");
    let (st, body) = https(&addr, &ca.pem(), Some(&certs[0]), NODE_NAME, "GET", "/v1/peer/holdings", &bearer).unwrap();
    assert_eq!(st, 200, "{body}");
    // A plain API client reaches the other endpoints with the token alone.
    let (st, body) = https(&addr, &ca.pem(), None, "127.0.0.1", "GET", "/v1/status", &bearer).unwrap();
    assert_eq!(st, 200, "{body}");
    // Plain HTTP to the TLS port is told to use https.
    let (st, body) = tierckpt_harness::testing::http(&addr, "GET", "/v1/status", &[("Authorization", &bearer)], b"");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("https://") && body.contains("tls_cert"), "{body}");
}

/// The error n`node`'s status gives for its peer `peer`.
fn peer_error(c: &LocalCluster, node: usize, peer: usize) -> Option<String> {
    cluster_status(c, node).nodes[peer].last_error.clone()
}

#[test]
fn a_node_with_a_certificate_of_another_ca_is_refused_and_nothing_is_lost() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let stranger = Ca::new("another CA");
    let certs = [ca.node(false), stranger.node(false)];
    let (_d, c) = tls_cluster(pki.path(), &ca, &certs, |o| o.settings.tls_server_name = Some(NODE_NAME.into()));
    let on0 = save(&c, 0, "ca", 1, 4096);
    let on1 = save(&c, 1, "ca", 2, 4096);
    wait_for(LIMIT, "n0 to find n1 dead", || cluster_status(&c, 0).nodes[1].state == NodeState::Dead);
    wait_for(LIMIT, "n1 to find n0 dead", || cluster_status(&c, 1).nodes[0].state == NodeState::Dead);
    let seen_by_0 = peer_error(&c, 0, 1).unwrap_or_default();
    assert!(seen_by_0.contains("certificate") && seen_by_0.contains(&c.options(1).http_addr()), "{seen_by_0}");
    let seen_by_1 = peer_error(&c, 1, 0).unwrap_or_default();
    assert!(seen_by_1.contains("certificate"), "{seen_by_1}");
    // No copy crossed, and each node keeps what it stored.
    let steps = |n: usize| -> Vec<u64> {
        Client::connect(c.socket(n)).unwrap().steps("ca").unwrap().iter().map(|s| s.step).collect()
    };
    assert_eq!((steps(0), steps(1)), (vec![1], vec![2]));
    assert!(load(&c, 0, "ca", 1, 4096) == on0 && load(&c, 1, "ca", 2, 4096) == on1);
}

#[test]
fn an_expired_certificate_is_refused_by_its_peers() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let certs = [ca.node(false), ca.node(true)];
    let (_d, c) = tls_cluster(pki.path(), &ca, &certs, |_| {});
    save(&c, 0, "old", 1, 4096);
    wait_for(LIMIT, "n0 to find n1 dead", || cluster_status(&c, 0).nodes[1].state == NodeState::Dead);
    let e = peer_error(&c, 0, 1).unwrap_or_default();
    let addr = c.options(1).http_addr();
    assert!(e.contains(&addr) && e.contains("certificate") && e.to_lowercase().contains("expired"), "{e}");
    assert!(Client::connect(c.socket(1)).unwrap().steps("old").unwrap().is_empty(), "no copy reached n1");
    // A client that trusts the CA refuses it too.
    let e = https(&addr, &ca.pem(), None, "127.0.0.1", "GET", "/v1/status", &c.bearer()).unwrap_err();
    assert!(e.to_lowercase().contains("expired"), "{e}");
}

#[test]
fn certificates_are_reloaded_without_a_restart() {
    let pki = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let (cert, key) = old_ca.node(false);
    let cert_path = write(pki.path(), "node.crt", &cert);
    let key_path = write(pki.path(), "node.key", &key);
    let d = TestDaemon::start_with("16MiB", |o| {
        o.settings.tls_cert = Some(cert_path.clone());
        o.settings.tls_key = Some(key_path.clone());
    });
    let (addr, bearer) = (d.http_addr(), d.bearer());
    let status = |ca: &Ca| https(&addr, &ca.pem(), None, "127.0.0.1", "GET", "/v1/status", &bearer);
    assert_eq!(status(&old_ca).unwrap().0, 200);
    assert!(status(&new_ca).is_err(), "the new CA did not sign the first certificate");
    // A bad new file keeps the old certificate.
    replace(&cert_path, "not a certificate\n");
    std::thread::sleep(tierckpt_daemon::tls::RELOAD_POLL * 3);
    assert_eq!(status(&old_ca).unwrap().0, 200, "the old certificate is still served");
    // A certificate of the new CA is taken up by new connections.
    let (cert, key) = new_ca.node(false);
    replace(&key_path, &key);
    replace(&cert_path, &cert);
    wait_for(LIMIT, "the new certificate", || status(&new_ca).is_ok_and(|(st, _)| st == 200));
    let e = status(&old_ca).unwrap_err();
    assert!(e.contains("certificate"), "{e}");
}

#[test]
fn tokens_by_role() {
    let files = tempfile::tempdir().unwrap();
    let d = TestDaemon::start_with("16MiB", |o| {
        o.settings.peer_token_file = Some(write(files.path(), "peer", "peer-token\n"));
        o.settings.write_token_file = Some(write(files.path(), "write", "write-token\n"));
        o.settings.read_token_file = Some(write(files.path(), "read", "read-token\n"));
    });
    let addr = d.http_addr();
    let call = |token: &str, method: &str, path: &str, body: &[u8]| {
        let bearer = format!("Bearer {token}");
        let (st, body) = tierckpt_harness::testing::http(&addr, method, path, &[("Authorization", &bearer)], body);
        (st, String::from_utf8_lossy(&body).into_owned())
    };
    for path in ["/v1/status", "/metrics", "/v1/namespaces"] {
        assert_eq!(call("read-token", "GET", path, b"").0, 200, "{path}");
    }
    let (_, shard) = sample_shard(ShardKey::new("r", 1, 0), 1, 10_000, 1);
    let (st, body) = call("read-token", "PUT", "/v1/shards/r/1/0?world_size=1", &shard);
    assert_eq!(st, 403, "{body}");
    let w: serde_json::Value = serde_json::from_str(&body).unwrap();
    let m = w["message"].as_str().unwrap();
    assert!(
        m.contains("needs the write (write_token_file) token") && m.contains("is the read (read_token_file)"),
        "{m}"
    );
    assert_eq!(call("write-token", "PUT", "/v1/shards/r/1/0?world_size=1", &shard).0, 201);
    assert_eq!(call("write-token", "GET", "/v1/shards/r/1/0", b"").0, 200);
    let (st, body) = call("write-token", "GET", "/v1/peer/holdings", b"");
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("needs the peer (peer_token_file) token"), "{body}");
    assert_eq!(call("write-token", "DELETE", "/v1/namespaces/r/steps/1?scope=node", b"").0, 403);
    assert_eq!(call("peer-token", "GET", "/v1/peer/holdings", b"").0, 200);
    assert_eq!(call("peer-token", "GET", "/v1/status", b"").0, 403, "the peer token is for peers only");
    assert_eq!(call("unknown", "GET", "/v1/status", b"").0, 401);
}

#[test]
fn peers_send_the_peer_token() {
    let files = tempfile::tempdir().unwrap();
    let peer = write(files.path(), "peer", "shared-peer-token");
    let dir = shm_dir();
    let mut o = LocalClusterOptions { nodes: 2, ..Default::default() };
    o.settings.memory_tier_size = Some("64MiB".into());
    o.settings.peer_token_file = Some(peer);
    let mut c = LocalCluster::start(dir.path(), o).unwrap();
    // Each node's every-role token differs: only the peer token is shared.
    c.options_mut(1).token = Some("another-every-role-token".into());
    c.restart(1).unwrap();
    save(&c, 0, "pt", 1, 4096);
    wait_for(LIMIT, "the replica on n1", || {
        Client::connect(c.socket(1)).unwrap().steps("pt").unwrap().iter().any(|s| s.step == 1 && s.complete)
    });
}

#[test]
fn plain_http_off_loopback_needs_insecure_http() {
    let dir = shm_dir();
    // Refused while resolving the settings, before any bind.
    let out = std::process::Command::new(tierckpt_harness::daemon::daemon_binary())
        .args(["--memory-dir", &dir.path().join("m").display().to_string(), "--memory-tier-size", "16MiB"])
        .args(["--http-addr", "0.0.0.0:0", "--mount-huge-tmpfs", "false"])
        .env("TIERCKPT_TOKEN", "t0ken")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("insecure_http") && err.contains("tls_cert"), "{err}");
    assert!(!dir.path().join("m").join("daemon.sock").exists());
}

#[test]
fn a_refused_node_joins_once_its_certificate_is_replaced_without_a_restart() {
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let stranger = Ca::new("another CA");
    let certs = [stranger.node(false), ca.node(false)];
    let (_d, c) = tls_cluster(pki.path(), &ca, &certs, |_| {});
    wait_for(LIMIT, "n1 to find n0 dead", || cluster_status(&c, 1).nodes[0].state == NodeState::Dead);
    // n0's server and its peer client both take up the new certificate: n1
    // reaches n0 again, and n0 (whose probes never got through) reaches n1.
    let (cert, key) = ca.node(false);
    replace(&pki.path().join("n0.key"), &key);
    replace(&pki.path().join("n0.crt"), &cert);
    wait_for(LIMIT, "n0 and n1 to see each other alive", || {
        cluster_status(&c, 1).nodes[0].state == NodeState::Alive
            && cluster_status(&c, 0).nodes[1].state == NodeState::Alive
    });
    assert_eq!(cluster_status(&c, 0).nodes[1].last_error, None);
    let data = save(&c, 0, "join", 1, 4096);
    wait_for(LIMIT, "the replica on n1", || {
        Client::connect(c.socket(1)).unwrap().steps("join").unwrap().iter().any(|s| s.step == 1 && s.complete)
    });
    assert!(load(&c, 1, "join", 1, 4096) == data);
}
