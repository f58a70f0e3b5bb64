//! The checkpoint advice on real daemons: a preemption notice file and URL
//! (served by a small HTTP server in the test), a failing health check, a
//! suspect placement neighbour, the drain estimate, and the startup errors
//! of bad settings.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tierckpt_client::{Client, TensorData};
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::daemon::{daemon_binary, LocalCluster, LocalClusterOptions};
use tierckpt_harness::testing::{http, shm_dir, TestDaemon};
use tierckpt_proto::{Advice, AdviceKind, FailureKind, NodeState};

const LIMIT: Duration = Duration::from_secs(30);

fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = probe() {
            return t;
        }
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn save(socket: &std::path::Path, ns: &str, step: u64) {
    let data = vec![step as u8; 64 << 10];
    let t = [TensorData { name: "state", dtype: Dtype::U8, shape: &[data.len()], data: &data }];
    let mut c = Client::connect(socket).unwrap();
    c.save(&ShardKey::new(ns, step, 0), 1, &t, &BTreeMap::new(), true).unwrap();
}

/// When the daemon last finished polling its notice.
fn notice_checked(d: &TestDaemon) -> Option<u64> {
    d.client().status().unwrap().advice.notice.and_then(|n| n.checked_unix_ms)
}

fn advice(d: &TestDaemon) -> Advice {
    d.client().advice("job").unwrap()
}

#[test]
fn a_notice_file_asks_for_a_save_with_a_deadline_until_it_goes() {
    let notice = shm_dir();
    let file = notice.path().join("preempt");
    let d = TestDaemon::start_with("64MiB", |o| {
        o.set_flags(&["--preemption-notice", file.to_str().unwrap(), "--preemption-notice-every", "50ms"]).unwrap();
        o.set_flags(&["--preemption-grace", "45s"]).unwrap();
    });
    save(&d.proc.socket, "job", 1);
    let quiet = advice(&d);
    assert!(!quiet.save_now && quiet.events.is_empty() && quiet.preemption.is_none(), "{quiet:?}");
    // An empty file is no notice.
    std::fs::write(&file, "").unwrap();
    let written = now_ms();
    wait_for("a poll after the empty file", || notice_checked(&d).filter(|&t| t > written));
    assert!(!advice(&d).save_now);
    let before = now_ms();
    std::fs::write(&file, "terminate in 45 s\n").unwrap();
    let a = wait_for("the notice", || Some(advice(&d)).filter(|a| a.preemption.is_some()));
    assert!(a.save_now, "{a:?}");
    let p = a.preemption.unwrap();
    assert_eq!(p.detail, "terminate in 45 s");
    assert!((before + 44_000..now_ms() + 46_000).contains(&p.deadline_unix_ms), "{p:?}");
    assert_eq!(a.events.len(), 1, "{:?}", a.events);
    let e = &a.events[0];
    assert_eq!((e.kind, e.detail.as_str()), (AdviceKind::Preemption, "preemption notice: terminate in 45 s"));
    assert!(e.id >= e.at_unix_ms && e.at_unix_ms >= before, "{e:?}");
    // The failure record of the namespace held says why.
    let records = d.client().failures("job").unwrap();
    let alert = records.iter().find(|r| r.kind == FailureKind::Alert).expect("an alert recorded");
    assert_eq!((alert.detail.as_str(), alert.step), ("preemption notice: terminate in 45 s", Some(1)));
    assert!(!alert.kind.is_failure());
    // So does the HTTP API.
    let (code, body) = http(&d.http_addr(), "GET", "/v1/namespaces/job/advice", &[("Authorization", &d.bearer())], b"");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let over_http: Advice = serde_json::from_slice(&body).unwrap();
    assert!(over_http.save_now && over_http.preemption.unwrap().detail == "terminate in 45 s");
    // Status shows it too.
    let s = d.client().status().unwrap().advice;
    assert!(s.preemption.is_some() && s.events.len() == 1, "{s:?}");
    assert_eq!(s.notice.unwrap().source, file.display().to_string());
    // Gone: the preemption clears; the event stays until it expires.
    std::fs::remove_file(&file).unwrap();
    let a = wait_for("the notice to clear", || Some(advice(&d)).filter(|a| a.preemption.is_none()));
    assert!(a.save_now && a.events.len() == 1 && a.events[0].id == e.id, "{a:?}");
    // A second notice is a new event with a larger id.
    std::fs::write(&file, "again").unwrap();
    let a = wait_for("the second notice", || Some(advice(&d)).filter(|a| a.events.len() == 2));
    assert!(a.events[1].id > e.id, "{a:?}");
}

/// A notice endpoint as the cloud metadata services answer: the status and
/// body of every answer, set by the test.
struct NoticeServer {
    addr: String,
    answer: Arc<Mutex<(u16, String)>>,
    asked: Arc<Mutex<u64>>,
}

impl NoticeServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let answer = Arc::new(Mutex::new((404, "Not Found".to_string())));
        let asked = Arc::new(Mutex::new(0));
        let (a, n) = (answer.clone(), asked.clone());
        // Ends with the test process (it only answers).
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let (status, body) = a.lock().unwrap().clone();
                *n.lock().unwrap() += 1;
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { addr, answer, asked }
    }

    fn set(&self, status: u16, body: &str) {
        *self.answer.lock().unwrap() = (status, body.to_string());
    }

    /// Waits for three more requests: the daemon polls one at a time, so
    /// it has taken in an answer given after `set` (the second) once the
    /// third arrives.
    fn polled(&self) {
        let from = *self.asked.lock().unwrap();
        wait_for("three polls", || Some(()).filter(|_| *self.asked.lock().unwrap() >= from + 3));
    }
}

#[test]
fn a_notice_url_is_polled_as_the_metadata_services_answer() {
    let server = NoticeServer::start();
    let url = format!("http://{}/latest/meta-data/spot/instance-action", server.addr);
    let d = TestDaemon::start_with("64MiB", |o| {
        o.set_flags(&["--preemption-notice", &url, "--preemption-notice-every", "50ms"]).unwrap();
    });
    // 404: no notice.
    server.polled();
    let a = advice(&d);
    assert!(!a.save_now && a.preemption.is_none(), "{a:?}");
    assert_eq!(d.client().status().unwrap().advice.notice.unwrap().last_error, None);
    // 200 FALSE (GCE's answer while not preempted): no notice.
    server.set(200, "FALSE");
    server.polled();
    assert!(!advice(&d).save_now);
    // 500: an error shown in status, no notice.
    server.set(500, "metadata service broken");
    server.polled();
    let s = d.client().status().unwrap().advice;
    let err = s.notice.unwrap().last_error.expect("the error is shown");
    assert!(err.contains("500") && err.contains(&url) && err.contains("metadata service broken"), "{err}");
    assert!(!advice(&d).save_now);
    // 200 with EC2's JSON: a notice with its own deadline.
    let body = r#"{"action":"terminate","time":"2031-01-02T03:04:05Z"}"#;
    server.set(200, body);
    let a = wait_for("the notice", || Some(advice(&d)).filter(|a| a.preemption.is_some()));
    let p = a.preemption.unwrap();
    assert_eq!((p.deadline_unix_ms, p.detail.as_str()), (1_925_089_445_000, body));
    assert!(a.save_now && a.events[0].kind == AdviceKind::Preemption, "{:?}", a.events);
    assert_eq!(d.client().status().unwrap().advice.notice.unwrap().last_error, None, "cleared once it answers");
    // Back to 404: the notice is gone.
    server.set(404, "");
    wait_for("the notice to clear", || Some(advice(&d)).filter(|a| a.preemption.is_none()));
}

/// `tierckptd` with `args`, no `TIERCKPT_*` from the caller: its stderr,
/// once it has exited (it must).
fn refused(args: &[&str]) -> String {
    let dir = shm_dir();
    let mut c = Command::new(daemon_binary());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TIERCKPT_")) {
        c.env_remove(k);
    }
    let mem = dir.path().join("mem");
    let out = c
        .args(["--memory-dir", mem.to_str().unwrap(), "--memory-tier-size", "16MiB", "--mount-huge-tmpfs", "false"])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} started");
    assert!(!mem.join("daemon.sock").exists(), "no socket left behind");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_advice_settings_are_named_at_start() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/spot");
    let e = refused(&["--preemption-notice", &url]);
    assert!(e.contains("preemption_notice") && e.contains(&url) && e.contains("cannot be reached"), "{e}");
    let e = refused(&["--preemption-notice", "http://no-such-host.invalid/x"]);
    assert!(e.contains("preemption_notice") && e.contains("no-such-host.invalid"), "{e}");
    let e = refused(&["--preemption-notice-every", "soon"]);
    assert!(e.contains("preemption_notice_every \"soon\" is not a duration"), "{e}");
    let e = refused(&["--preemption-grace", "forever"]);
    assert!(e.contains("preemption_grace \"forever\" is not a duration"), "{e}");
    let e = refused(&["--health-check-timeout", "0s"]);
    assert!(e.contains("health_check_timeout must be above 0"), "{e}");
    let e = refused(&["--health-check-command", ""]);
    assert!(e.contains("health_check_command is empty"), "{e}");
}

#[test]
fn a_health_check_that_starts_failing_asks_for_a_save_once() {
    let dir = shm_dir();
    let flag = dir.path().join("gpu-gone");
    let cmd = format!("test ! -e {} || {{ echo 'Xid 79: GPU fell off the bus' >&2; exit 3; }}", flag.display());
    let d = TestDaemon::start_with("64MiB", |o| {
        o.set_flags(&["--health-check-command", &cmd, "--health-check-every", "50ms"]).unwrap();
    });
    save(&d.proc.socket, "job", 4);
    wait_for("a passing check", || {
        d.client().status().unwrap().advice.health_check.filter(|h| h.checked_unix_ms.is_some())
    });
    assert!(!advice(&d).save_now);
    std::fs::write(&flag, "").unwrap();
    let a = wait_for("the failed check", || Some(advice(&d)).filter(|a| a.save_now));
    assert_eq!(a.events.len(), 1);
    let detail = "health check failed: exit code 3 (Xid 79: GPU fell off the bus)";
    assert_eq!((a.events[0].kind, a.events[0].detail.as_str()), (AdviceKind::HealthCheck, detail));
    assert!(a.preemption.is_none());
    let records = d.client().failures("job").unwrap();
    let alert = records.iter().find(|r| r.kind == FailureKind::Alert).expect("an alert recorded");
    assert_eq!((alert.detail.as_str(), alert.step), (detail, Some(4)));
    let (code, body) = http(&d.http_addr(), "GET", "/metrics", &[("Authorization", &d.bearer())], b"");
    let text = String::from_utf8_lossy(&body);
    assert!(code == 200 && text.contains("tierckpt_advice_events_total{kind=\"health_check\"} 1"), "{text}");
    // Still failing at the next check: no new event; the status shows why.
    let seen = now_ms();
    wait_for("a later check", || {
        d.client().status().unwrap().advice.health_check.and_then(|h| h.checked_unix_ms).filter(|&t| t > seen)
    });
    assert_eq!(advice(&d).events.len(), 1);
    let h = d.client().status().unwrap().advice.health_check.unwrap();
    assert_eq!((h.source.as_str(), h.last_error.as_deref()), (cmd.as_str(), Some(&detail[21..])));
    // It passes again, then fails again: a second event.
    std::fs::remove_file(&flag).unwrap();
    wait_for("a passing check", || d.client().status().unwrap().advice.health_check.filter(|h| h.last_error.is_none()));
    std::fs::write(&flag, "").unwrap();
    wait_for("a second event", || Some(advice(&d)).filter(|a| a.events.len() == 2));
}

#[test]
fn a_hung_health_check_is_killed_and_failed() {
    let d = TestDaemon::start_with("64MiB", |o| {
        o.set_flags(&["--health-check-command", "exec sleep 30", "--health-check-every", "100ms"]).unwrap();
        o.set_flags(&["--health-check-timeout", "200ms"]).unwrap();
    });
    let a = wait_for("the timed-out check", || Some(advice(&d)).filter(|a| a.save_now));
    assert_eq!(a.events[0].detail, "health check failed: timed out after 200ms");
}

#[test]
fn a_daemon_that_stops_kills_the_check_it_runs() {
    let dir = shm_dir();
    let pid_file = dir.path().join("check.pid");
    // sh forks sleep: the check is a process group of two.
    let cmd = format!("echo $$ > {}; sleep 30; true", pid_file.display());
    let mut d = TestDaemon::start_with("64MiB", |o| {
        o.set_flags(&["--health-check-command", &cmd, "--health-check-timeout", "60s"]).unwrap();
    });
    let group: i32 = wait_for("the check running", || std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok());
    // SAFETY: signal 0 only asks whether the group exists.
    let alive = || unsafe { libc::kill(-group, 0) } == 0;
    assert!(alive());
    d.proc.stop().unwrap();
    wait_for("the check's processes gone", || Some(()).filter(|_| !alive()));
}

/// SIGSTOPs (or with `cont`, SIGCONTs) node `i`'s daemon.
fn signal(c: &LocalCluster, i: usize, cont: bool) {
    let sig = if cont { libc::SIGCONT } else { libc::SIGSTOP };
    // SAFETY: kill(2) on the pid of a child this test started; no memory is shared.
    let rc = unsafe { libc::kill(c.node(i).pid() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "signalling node {i}: {}", std::io::Error::last_os_error());
}

/// Resumes a stopped node however the test ends.
struct Resume<'a>(&'a LocalCluster, usize);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        signal(self.0, self.1, true);
    }
}

#[test]
fn a_suspect_placement_neighbour_asks_for_a_save() {
    let dir = shm_dir();
    let mut o = LocalClusterOptions { nodes: 3, ..Default::default() };
    o.settings.memory_tier_size = Some("64MiB".into());
    let c = LocalCluster::start(dir.path(), o).unwrap();
    let client = |i: usize| Client::connect(c.socket(i)).unwrap();
    wait_for("every node alive", || {
        let nodes = client(0).status().unwrap().cluster.unwrap().nodes;
        Some(()).filter(|_| nodes.iter().all(|n| n.state == NodeState::Alive))
    });
    // Node n0 copies to n1 (ring, k = 1).
    save(&c.socket(0), "job", 7);
    signal(&c, 1, false);
    let _resume = Resume(&c, 1);
    let e = wait_for("the suspect neighbour", || {
        client(0).advice("job").unwrap().events.into_iter().find(|e| e.detail.starts_with("neighbour n1 "))
    });
    assert_eq!(e.kind, AdviceKind::SuspectNeighbour, "{e:?}");
    assert!(client(0).advice("job").unwrap().save_now);
    let records = client(0).failures("job").unwrap();
    assert!(
        records.iter().any(|r| r.kind == FailureKind::Alert && r.detail.starts_with("neighbour n1 ")),
        "{records:?}"
    );
}

#[test]
fn the_drain_estimate_follows_the_uploads() {
    let store = shm_dir();
    let d = TestDaemon::start_with("64MiB", |o| {
        o.settings.persistent_path = Some(format!("file://{}", store.path().display()));
    });
    assert_eq!(advice(&d).drain_estimate_ms, None, "unknown before an upload");
    save(&d.proc.socket, "job", 3);
    let committed = store.path().join("job").join(format!("{:020}", 3)).join("COMMIT");
    wait_for("step 3 committed", || Some(()).filter(|_| committed.exists()));
    let ms = wait_for("an estimate", || advice(&d).drain_estimate_ms);
    assert!(ms < 30_000, "{ms} ms for 64 KiB");
    assert_eq!(d.client().advice("other").unwrap().drain_estimate_ms, None, "per namespace");
    let e = d.client().advice("bad/name").unwrap_err().to_string();
    assert!(e.contains("bad/name"), "{e}");
}
