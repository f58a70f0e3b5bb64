//! The daemon's network surfaces under abuse, against real daemon
//! processes: steps far beyond the newest, uploads that trickle, idle and
//! half-sent HTTP connections, a port already taken, and a flood of TCP
//! connections under a low open-file limit; arbitrary bytes on both
//! sockets (`garbage`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tierckpt_client::{ErrorKind, TensorData};
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::daemon::{daemon_binary, DaemonOptions, DaemonProcess};
use tierckpt_harness::testing::{http, shm_dir, TestDaemon};
use tierckpt_tiers::conformance::sample_shard;

#[path = "hardening/garbage.rs"]
mod garbage;

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

/// A GET, PUT or DELETE carrying the daemon's token: (status, body as text).
fn call(d: &TestDaemon, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let bearer = d.bearer();
    let mut all = vec![("Authorization", bearer.as_str())];
    all.extend_from_slice(headers);
    let (st, body) = http(&d.http_addr(), method, path, &all, body);
    (st, String::from_utf8_lossy(&body).into_owned())
}

fn save(c: &mut tierckpt_client::Client, ns: &str, step: u64) -> tierckpt_client::Result<()> {
    let data = [7u8; 16];
    let t = [TensorData { name: "x", dtype: Dtype::U8, shape: &[16], data: &data }];
    c.save(&ShardKey::new(ns, step, 0), 1, &t, &BTreeMap::new(), true).map(|_| ())
}

/// Polls `f` until it holds (up to 30 s).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn steps_far_beyond_the_newest_are_refused() {
    let d = TestDaemon::start_with("64MiB", |o| o.set_flags(&["--max-step-advance", "1000"]).unwrap());
    let mut c = d.client();
    save(&mut c, "s", 5).unwrap();
    // Over the socket: up to the bound is fine, one more is refused by name.
    save(&mut c, "s", 1005).unwrap();
    let e = save(&mut c, "s", 2006).unwrap_err();
    let text = e.to_string();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{text}");
    assert!(text.contains("2006") && text.contains("1005") && text.contains("max_step_advance"), "{text}");
    // 2^53 and up never, not even as a namespace's first step.
    let e = save(&mut c, "fresh", 1 << 53).unwrap_err();
    assert!(e.kind() == ErrorKind::InvalidArgument && e.to_string().contains("2^53"), "{e}");
    save(&mut c, "fresh", (1 << 53) - 1).expect("a first step below 2^53 has no bound");
    // Over HTTP, the same.
    let (_, data) = sample_shard(ShardKey::new("s", 18446744073709551615, 0), 1, 10, 1);
    let (st, body) = call(&d, "PUT", "/v1/shards/s/18446744073709551615/0?world_size=1", &[], &data);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("18446744073709551615") && body.contains("2^53"), "{body}");
    let (_, data) = sample_shard(ShardKey::new("s", 3000, 0), 1, 10, 1);
    let (st, body) = call(&d, "PUT", "/v1/shards/s/3000/0?world_size=1", &[], &data);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("3000") && body.contains("1005") && body.contains("max_step_advance"), "{body}");
    let (_, data) = sample_shard(ShardKey::new("s", 2005, 0), 1, 10, 1);
    assert_eq!(call(&d, "PUT", "/v1/shards/s/2005/0?world_size=1", &[], &data).0, 201);
    // Nothing refused was kept: latest is the newest step allowed.
    assert_eq!(c.latest("s").unwrap(), Some(2005));
}

/// Sends a PUT head declaring `len` bytes, then one byte every 100 ms until
/// the daemon hangs up or `stop` is set.
fn trickle(addr: String, path: String, headers: Vec<(String, String)>, len: u64) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        let mut head = format!("PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {len}\r\n");
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        s.write_all(format!("{head}\r\n").as_bytes()).unwrap();
        for _ in 0..300 {
            if s.write_all(b"x").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

#[test]
fn trickling_uploads_are_dropped_and_their_space_freed() {
    let d = TestDaemon::start_with("16MiB", |o| {
        o.set_flags(&["--min-upload-rate", "8MiB", "--upload-grace", "1s"]).unwrap();
    });
    let reservations = || json(call(&d, "GET", "/v1/status", &[], b"").1.as_bytes())["memory"]["reservations"].as_u64();
    let (_, big) = sample_shard(ShardKey::new("fast", 1, 0), 1, 1 << 20, 1);
    let auth = vec![("Authorization".to_string(), d.bearer())];

    // A shard upload declaring 12 MiB at 10 bytes a second: allowed 2.5 s.
    let slow = trickle(d.http_addr(), "/v1/shards/slow/1/0?world_size=1".into(), auth.clone(), 12 << 20);
    eventually("the trickling upload's reservation", || reservations() == Some(1));
    let (st, body) = call(&d, "PUT", "/v1/shards/fast/1/0?world_size=1", &[], &big);
    assert_eq!(st, 507, "the trickle holds the space meanwhile: {body}");
    eventually("the trickling upload to be dropped", || reservations() == Some(0));
    let (st, body) = call(&d, "PUT", "/v1/shards/fast/1/0?world_size=1", &[], &big);
    assert_eq!(st, 201, "the space is free again: {body}");
    slow.join().unwrap();
    call(&d, "DELETE", "/v1/namespaces/fast", &[], b"");

    // A replica from a "peer" trickling in the same way.
    let (m, _) = sample_shard(ShardKey::new("rep", 1, 0), 1, 3 << 20, 2);
    let mut headers = auth;
    headers.push((tierckpt_daemon::peer::MANIFEST_HEADER.to_string(), serde_json::to_string(&m).unwrap()));
    let slow = trickle(d.http_addr(), "/v1/replicas/rep/1/0".into(), headers, m.file_len);
    eventually("the trickling replica's reservation", || reservations() == Some(1));
    eventually("the trickling replica to be dropped", || reservations() == Some(0));
    let (st, body) = call(&d, "PUT", "/v1/shards/fast/1/0?world_size=1", &[], &big);
    assert_eq!(st, 201, "{body}");
    slow.join().unwrap();
    let (_, body) = call(&d, "GET", "/v1/namespaces/rep/steps", &[], b"");
    assert!(!body.contains("\"step\""), "the dropped replica is not held: {body}");
}

/// Reads until the daemon closes the connection (or 30 s pass): what came.
fn read_until_closed(s: &mut TcpStream) -> Result<Vec<u8>, std::io::Error> {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).map(|_| got)
}

#[test]
fn idle_and_half_sent_connections_are_closed() {
    let d = TestDaemon::start_with("16MiB", |o| o.set_flags(&["--http-idle-timeout", "1s"]).unwrap());
    // Half a request line, then nothing.
    let mut half = TcpStream::connect(d.http_addr()).unwrap();
    half.write_all(b"GET /v1/sta").unwrap();
    read_until_closed(&mut half).expect("a half-sent request head is closed");
    // A keep-alive connection, idle after one answer.
    let mut idle = TcpStream::connect(d.http_addr()).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let got = read_until_closed(&mut idle).expect("an idle keep-alive connection is closed");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"), "answered first: {got:?}");
}

#[test]
fn a_daemon_that_cannot_have_its_port_leaves_no_socket() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = shm_dir();
    let mut o = DaemonOptions::new(dir.path().join("m"));
    o.settings.http_addr = Some(taken.local_addr().unwrap().to_string());
    let socket = o.settings.socket.clone().unwrap();
    let e = DaemonProcess::spawn(o).err().expect("the port is taken");
    assert!(e.to_string().contains("exited before it was ready"), "{e}");
    assert!(!socket.exists(), "{} was left behind", socket.display());
}

/// A `tierckptd` child under an open-file limit of `soft`/`hard`, its stderr
/// in `dir/stderr`, HTTP on 127.0.0.1 with a token and `extra` flags; returns
/// it with its HTTP address once ready.
fn limited_daemon(
    dir: &std::path::Path,
    soft: u64,
    hard: u64,
    extra: &[&str],
) -> (std::process::Child, std::net::SocketAddr) {
    let mem = dir.join("mem");
    let mut cmd = Command::new(daemon_binary());
    cmd.args(["--memory-dir", mem.to_str().unwrap(), "--memory-tier-size", "16MiB"])
        .args(["--socket", mem.join("daemon.sock").to_str().unwrap(), "--http-addr", "127.0.0.1:0"])
        .args(extra)
        .env("TIERCKPT_TOKEN", "flood-token")
        .env("TIERCKPT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
    tierckpt_harness::daemon::die_with_parent(&mut cmd);
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            let r = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut ready).unwrap();
    let ready: Value = serde_json::from_str(&ready).unwrap_or_else(|e| panic!("{e}: {ready:?}"));
    (child, ready["http_addr"].as_str().unwrap().parse().unwrap())
}

/// Up to `n` connections to `addr`, each with half a request line (until
/// the listen backlog is full: then connecting times out).
fn flood(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut flood = Vec::new();
    while flood.len() < n {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { break };
        let _ = s.write_all(b"GET /v1/namesp");
        flood.push(s);
    }
    flood
}

#[test]
fn a_flood_of_tcp_connections_leaves_the_local_socket_answering() {
    let dir = shm_dir();
    let (mut child, addr) = limited_daemon(dir.path(), 48, 96, &["--http-max-connections", "8"]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let nofile = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    assert_eq!(nofile.split_whitespace().collect::<Vec<_>>()[3..5], ["96", "96"], "soft raised to hard: {nofile}");

    // More connections than the daemon has descriptors.
    let flood = flood(addr, 200);
    assert!(flood.len() > 96, "only {} connections were made", flood.len());
    let (tx, rx) = std::sync::mpsc::channel();
    let sock = dir.path().join("mem").join("daemon.sock");
    std::thread::spawn(move || {
        let _ = tx.send(tierckpt_client::Client::connect(&sock).and_then(|mut c| c.status()).map(|s| s.pid));
    });
    let answer = rx.recv_timeout(Duration::from_secs(20)).expect("status over the local socket answers");
    assert_eq!(answer.expect("status succeeds"), child.id());
    std::thread::sleep(Duration::from_secs(1));
    drop(flood);
    let _ = child.kill();
    let _ = child.wait();
    let logged = std::fs::read(dir.path().join("stderr")).unwrap();
    assert!(logged.len() < 8192, "the daemon logged {} bytes: {}", logged.len(), String::from_utf8_lossy(&logged));
}

#[test]
fn accept_failures_back_off_and_are_logged_briefly() {
    // No cap that fits the limit: accepting runs out of descriptors.
    let dir = shm_dir();
    let (mut child, addr) = limited_daemon(dir.path(), 48, 48, &["--http-max-connections", "1000"]);
    let flood = flood(addr, 100);
    // Local clients knock meanwhile: their accepts fail too.
    let sock = dir.path().join("mem").join("daemon.sock");
    let knocks: Vec<_> = (0..20).filter_map(|_| std::os::unix::net::UnixStream::connect(&sock).ok()).collect();
    std::thread::sleep(Duration::from_secs(3));
    assert!(matches!(child.try_wait(), Ok(None)), "the daemon still runs");
    drop((flood, knocks));
    let _ = child.kill();
    let _ = child.wait();
    let logged = String::from_utf8_lossy(&std::fs::read(dir.path().join("stderr")).unwrap()).into_owned();
    assert!(logged.contains("accepting a connection"), "the failure is logged: {logged}");
    assert!(logged.len() < 8192, "the daemon logged {} bytes: {logged}", logged.len());
}
