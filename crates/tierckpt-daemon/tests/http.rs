//! The HTTP API against a real daemon process: round trips, bad input,
//! tokens, and fuzzed requests that must never bring the daemon down.

use proptest::prelude::*;
use serde_json::Value;
use tierckpt_format::ShardKey;
use tierckpt_harness::testing::TestDaemon;
use tierckpt_tiers::conformance::sample_shard;

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

/// A daemon's HTTP API and the token it wants.
struct Api {
    addr: String,
    bearer: String,
}

fn addr(d: &TestDaemon) -> Api {
    Api { addr: d.http_addr(), bearer: d.bearer() }
}

/// An exchange that carries the daemon's token.
fn http(a: &Api, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<u8>) {
    let mut all = vec![("Authorization", a.bearer.as_str())];
    all.extend_from_slice(headers);
    tierckpt_harness::testing::http(&a.addr, method, path, &all, body)
}

#[test]
fn put_get_round_trip_and_listing() {
    let d = TestDaemon::start("64MiB");
    let a = addr(&d);
    let (_, data) = sample_shard(ShardKey::new("h", 3, 1), 2, 300_000, 5);
    let (st, body) = http(&a, "PUT", "/v1/shards/h/3/1?world_size=2", &[], &data);
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["file_len"], data.len());
    let (st, body) = http(&a, "GET", "/v1/shards/h/3/1", &[], b"");
    assert_eq!(st, 200);
    assert!(body == data, "GET returns the bytes PUT");
    let (st, body) = http(&a, "GET", "/v1/namespaces/h/latest", &[], b"");
    assert_eq!((st, json(&body)["step"].clone()), (200, Value::Null), "one of two ranks is not complete");
    let (_, data0) = sample_shard(ShardKey::new("h", 3, 0), 2, 10, 5);
    assert_eq!(http(&a, "PUT", "/v1/shards/h/3/0?world_size=2", &[], &data0).0, 201);
    let (_, body) = http(&a, "GET", "/v1/namespaces/h/latest", &[], b"");
    assert_eq!(json(&body)["step"], 3);
    let (_, body) = http(&a, "GET", "/v1/namespaces/h/steps", &[], b"");
    assert_eq!(json(&body)["steps"][0]["complete"], true);
    let (st, body) = http(&a, "GET", "/v1/shards/h/3/1/manifest", &[], b"");
    assert_eq!((st, json(&body)["world_size"].clone()), (200, Value::from(2)));
    // Written once: a second PUT of the key conflicts and changes nothing.
    let (_, other) = sample_shard(ShardKey::new("h", 3, 1), 2, 300_000, 6);
    assert_eq!(http(&a, "PUT", "/v1/shards/h/3/1?world_size=2", &[], &other).0, 409);
    assert!(http(&a, "GET", "/v1/shards/h/3/1", &[], b"").1 == data);
    assert_eq!(http(&a, "DELETE", "/v1/namespaces/h/steps/3", &[], b"").0, 200);
    assert_eq!(http(&a, "GET", "/v1/shards/h/3/1", &[], b"").0, 404);
    let (st, body) = http(&a, "GET", "/health", &[], b"");
    assert_eq!((st, json(&body)["status"].clone()), (200, Value::from("ok")));
}

#[test]
fn bad_requests_get_clear_errors_and_lose_nothing() {
    let d = TestDaemon::start("64MiB");
    let a = addr(&d);
    let (_, good) = sample_shard(ShardKey::new("ok", 1, 0), 1, 1000, 1);
    assert_eq!(http(&a, "PUT", "/v1/shards/ok/1/0?world_size=1", &[], &good).0, 201);
    // (method, path, headers, body, expected status, a word the error must contain)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("PUT", "/v1/shards/..%2Fetc/1/0?world_size=1", vec![], good.clone(), 400, "namespace"),
        ("PUT", "/v1/shards/ok/x/0?world_size=1", vec![], good.clone(), 400, "whole number"),
        ("PUT", "/v1/shards/ok/2/-1?world_size=1", vec![], good.clone(), 400, "rank"),
        ("PUT", "/v1/shards/ok/2/0", vec![], good.clone(), 400, "world_size"),
        ("PUT", "/v1/shards/ok/2/3?world_size=2", vec![], good.clone(), 400, "rank 3 is not below world_size 2"),
        (
            "PUT",
            "/v1/shards/ok/2/0?world_size=1",
            vec![],
            b"not a safetensors file".to_vec(),
            422,
            "invalid safetensors header",
        ),
        ("PUT", "/v1/shards/ok/2/0?world_size=1", vec![("Content-Length", "999999999999")], vec![], 507, "capacity"),
        ("GET", "/v1/shards/ok/9/0", vec![], vec![], 404, "not found"),
        ("GET", "/v1/nothing", vec![], vec![], 404, "no endpoint"),
        ("GET", "/v1/namespaces/a%20b/steps", vec![], vec![], 400, "namespace"),
        ("DELETE", "/v1/namespaces/ok/steps/2", vec![], vec![], 404, "not found"),
    ];
    for (method, path, headers, body, want, needle) in cases {
        let (st, resp) = http(&a, method, path, &headers, &body);
        let text = String::from_utf8_lossy(&resp);
        assert_eq!(st, want, "{method} {path}: {text}");
        assert!(text.to_lowercase().contains(&needle.to_lowercase()), "{method} {path}: {text}");
    }
    // A client that hangs up mid-body: the upload is dropped and its segment reclaimed.
    let reservations = || json(&http(&a, "GET", "/v1/status", &[], b"").1)["memory"]["reservations"].as_u64();
    let wait_reservations = |n: u64, what: &str| {
        for _ in 0..1000 {
            if reservations() == Some(n) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("timed out waiting for {what}");
    };
    let auth = [("Authorization", a.bearer.as_str())];
    let half_sent = tierckpt_harness::testing::http_abandon(
        &a.addr,
        "PUT",
        "/v1/shards/ok/3/0?world_size=1",
        &auth,
        5000,
        &good[..100],
    );
    wait_reservations(1, "the upload's reservation");
    drop(half_sent);
    wait_reservations(0, "the abandoned upload's reservation to be reclaimed");
    let steps = json(&http(&a, "GET", "/v1/namespaces/ok/steps", &[], b"").1);
    assert_eq!(steps["steps"].as_array().unwrap().len(), 1, "only the good step exists: {steps}");
    assert!(http(&a, "GET", "/v1/shards/ok/1/0", &[], b"").1 == good);
}

#[test]
fn every_request_but_health_needs_the_token() {
    let d = TestDaemon::start_with("64MiB", |o| o.token = Some("s3cret-token".into()));
    let a = addr(&d);
    assert_eq!(a.bearer, "Bearer s3cret-token");
    let raw = |method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]| {
        tierckpt_harness::testing::http(&a.addr, method, path, headers, body)
    };
    let (_, data) = sample_shard(ShardKey::new("t", 1, 0), 1, 100, 1);
    assert_eq!(http(&a, "PUT", "/v1/shards/t/1/0?world_size=1", &[], &data).0, 201);
    let (_, other) = sample_shard(ShardKey::new("t", 2, 0), 1, 100, 2);
    for auth in [None, Some("Bearer wrong"), Some("s3cret-token"), Some("Bearer s3cret-tokenX"), Some("Bearer ")] {
        let headers: Vec<(&str, &str)> = auth.map(|v| ("Authorization", v)).into_iter().collect();
        let (st, body) = raw("PUT", "/v1/shards/t/2/0?world_size=1", &headers, &other);
        assert_eq!(st, 401, "PUT with {auth:?}: {}", String::from_utf8_lossy(&body));
        assert!(String::from_utf8_lossy(&body).contains("bearer token"), "the refusal says why");
        let (st, body) = raw("GET", "/v1/shards/t/1/0", &headers, b"");
        assert_eq!(st, 401, "GET shard with {auth:?}");
        assert!(body.len() < 200, "no shard bytes without the token");
        assert_eq!(raw("DELETE", "/v1/namespaces/t/steps/1", &headers, b"").0, 401, "DELETE with {auth:?}");
        assert_eq!(raw("DELETE", "/v1/namespaces/t", &headers, b"").0, 401);
        assert_eq!(raw("GET", "/v1/namespaces", &headers, b"").0, 401);
    }
    let (_, body) = http(&a, "GET", "/v1/namespaces/t/steps", &[], b"");
    assert_eq!(json(&body)["steps"].as_array().unwrap().len(), 1, "refused requests changed nothing: {body:?}");
    assert!(http(&a, "GET", "/v1/shards/t/1/0", &[], b"").1 == data);
    assert_eq!(raw("GET", "/health", &[], b"").0, 200, "health needs no token");
}

#[test]
fn a_daemon_started_with_defaults_serves_no_http() {
    let dir = tierckpt_harness::testing::shm_dir();
    let mut o = tierckpt_harness::daemon::DaemonOptions::new(dir.path().join("m"));
    o.settings.http_addr = None;
    o.settings.memory_tier_size = Some("16MiB".into());
    let d = tierckpt_harness::daemon::DaemonProcess::spawn(o).expect("starts");
    assert_eq!(d.http_addr, None, "no HTTP address in the ready line");
    assert_eq!(d.opts.token, None, "the harness drew no token for it");
    // Nothing of the daemon's listens on TCP.
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(String::from))
        .collect();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st 0A: LISTEN; field 9: the socket's inode.
            assert!(!(f[3] == "0A" && inodes.iter().any(|i| i == f[9])), "the daemon listens on TCP: {line}");
        }
    }
    let (ok, out, err) = tierckpt_harness::testing::cli(&d.socket, &["status"]);
    assert!(ok && out.contains("http         off"), "{out}{err}");
}

#[test]
fn http_without_a_token_is_refused_by_name() {
    let dir = tierckpt_harness::testing::shm_dir();
    for addr in ["127.0.0.1:0", "0.0.0.0:0"] {
        let out = std::process::Command::new(tierckpt_harness::daemon::daemon_binary())
            .args(["--memory-dir", &dir.path().join("m").display().to_string(), "--memory-tier-size", "16MiB"])
            .args(["--http-addr", addr])
            .env_remove("TIERCKPT_TOKEN")
            .env_remove("TIERCKPT_TOKEN_FILE")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{addr}: {err}");
        assert!(err.contains("token_file") && err.contains("TIERCKPT_TOKEN"), "{addr}: {err}");
    }
    assert!(!dir.path().join("m").join("daemon.sock").exists());
}

fn arb_path() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        Just("v1".to_string()),
        Just("shards".to_string()),
        Just("namespaces".to_string()),
        Just("steps".to_string()),
        Just("latest".to_string()),
        Just("manifest".to_string()),
        Just("ns1".to_string()),
        Just("..".to_string()),
        Just("%2e%2e".to_string()),
        "[0-9]{1,25}",
        "[a-zA-Z0-9_%.-]{0,12}",
    ];
    (proptest::collection::vec(seg, 0..6), proptest::option::of("[a-z_]{1,10}=[0-9a-z-]{0,20}")).prop_map(
        |(segs, q)| {
            let mut p = format!("/{}", segs.join("/"));
            if let Some(q) = q {
                p.push('?');
                p.push_str(&q);
            }
            p
        },
    )
}

#[test]
fn fuzzed_requests_never_crash_the_daemon() {
    let mut d = TestDaemon::start("32MiB");
    let a = addr(&d);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
    let strategy = (
        prop_oneof![Just("GET"), Just("PUT"), Just("DELETE"), Just("POST"), Just("PATCH")],
        arb_path(),
        proptest::collection::vec(any::<u8>(), 0..300),
        any::<bool>(),
    );
    runner
        .run(&strategy, |(method, path, body, with_body)| {
            let body = if with_body { &body[..] } else { &[][..] };
            let (st, _) = http(&a, method, &path, &[], body);
            prop_assert!(st == 0 || (200..600).contains(&st), "{method} {path} -> {st}");
            prop_assert!(st < 500 || st == 507, "{method} {path} -> server error {st}");
            Ok(())
        })
        .unwrap();
    assert!(d.proc.alive(), "the daemon survived the fuzzing");
    assert_eq!(http(&a, "GET", "/health", &[], b"").0, 200);
}

#[test]
fn malformed_local_frames_never_crash_the_daemon() {
    use std::io::{Read, Write};
    let mut d = TestDaemon::start("32MiB");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(200));
    let frames = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        "\\{\"op\":\"[a-z_]{1,20}\"(,\"[a-z_]{1,12}\":(-?[0-9]{1,22}|\"[^\"]{0,20}\"|null|\\[\\]))*\\}"
            .prop_map(|s| s.into_bytes()),
    ];
    runner
        .run(&frames, |body| {
            let mut s = std::os::unix::net::UnixStream::connect(&d.proc.socket).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
            let _ = s.write_all(&(body.len() as u32).to_be_bytes());
            let _ = s.write_all(&body);
            let mut len = [0u8; 4];
            s.read_exact(&mut len).unwrap();
            let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
            s.read_exact(&mut reply).unwrap();
            let v: Value = serde_json::from_slice(&reply).unwrap();
            prop_assert!(v.get("Err").is_some() || v.get("Ok").is_some(), "{v}");
            Ok(())
        })
        .unwrap();
    // An oversized frame header is refused too.
    let mut s = std::os::unix::net::UnixStream::connect(&d.proc.socket).unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    assert!(d.proc.alive());
    assert!(d.client().status().is_ok());
}
