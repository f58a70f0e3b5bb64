//! The checkpoint advice: whether a trainer should save at its next step
//! boundary, and why. Three sources raise alerts, each checked by a task of
//! its own in the background: a preemption notice (a file or an http:// URL
//! polled every `preemption_notice_every`, the form cloud spot notices
//! take), a placement neighbour turning suspect or dead (from the
//! cluster's heartbeats), and a failing health check (`health_check_command`).
//!
//! Each alert is an event with an id that only grows (at least its time in
//! Unix ms, so across daemon restarts too), kept for [`EVENT_TTL`]; it is
//! also recorded as a `FailureKind::Alert` in every namespace held or recorded here.
//! The `advice` request reads the state under one mutex: no I/O on the
//! request path, so a trainer may ask every step.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tierckpt_proto::{
    Advice, AdviceEvent, AdviceKind, AdviceSource, AdviceStatus, FailureKind, FailureRecord, NodeState, Preemption,
};
use tokio::sync::watch;

use crate::config::{AdviceConfig, HealthCheckConfig, NoticeSource};
use crate::{Daemon, DaemonError};

/// How long an event asks for a save.
pub const EVENT_TTL: Duration = Duration::from_secs(300);
/// Events kept at most (the oldest go first).
const MAX_EVENTS: usize = 64;
/// Longest notice text or detail kept, in characters.
const MAX_TEXT: usize = 512;
/// Longest notice body read.
const MAX_BODY: usize = 64 << 10;
/// How long the start waits to connect to a notice URL.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A notice error that does not change is logged again after this long.
const LOG_AGAIN: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    tierckpt_tiers::now_unix_ms()
}

fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(MAX_TEXT) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[derive(Default)]
struct State {
    last_id: u64,
    events: VecDeque<AdviceEvent>,
    preemption: Option<Preemption>,
    notice: Option<AdviceSource>,
    health_check: Option<AdviceSource>,
}

impl State {
    fn expire(&mut self, now: u64) {
        let ttl = EVENT_TTL.as_millis() as u64;
        while self.events.front().is_some_and(|e| now.saturating_sub(e.at_unix_ms) >= ttl) {
            self.events.pop_front();
        }
    }
}

/// The advice's state, shared by the background checks and the requests.
pub struct Advisor {
    state: Mutex<State>,
    grace: Duration,
}

impl Advisor {
    /// No events yet; the configured sources shown as not yet checked.
    pub fn new(cfg: &AdviceConfig) -> Self {
        let source = |s: String| AdviceSource { source: s, checked_unix_ms: None, last_error: None };
        let state = State {
            notice: cfg.notice.as_ref().map(|n| source(n.to_string())),
            health_check: cfg.health_check.as_ref().map(|h| source(h.command.clone())),
            ..Default::default()
        };
        Self { state: Mutex::new(state), grace: cfg.grace }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an event; returns it.
    pub fn raise(&self, kind: AdviceKind, detail: String) -> AdviceEvent {
        let now = now_ms();
        let mut s = self.lock();
        s.expire(now);
        s.last_id = (s.last_id + 1).max(now);
        let e = AdviceEvent { id: s.last_id, kind, detail: clip(&detail), at_unix_ms: now };
        s.events.push_back(e.clone());
        while s.events.len() > MAX_EVENTS {
            s.events.pop_front();
        }
        e
    }

    /// The answer to `advice`, with the namespace's drain estimate.
    pub fn advice(&self, drain_estimate_ms: Option<u64>) -> Advice {
        let mut s = self.lock();
        s.expire(now_ms());
        let events: Vec<AdviceEvent> = s.events.iter().cloned().collect();
        Advice { save_now: !events.is_empty(), events, preemption: s.preemption.clone(), drain_estimate_ms }
    }

    /// What `status` shows.
    pub fn status(&self) -> AdviceStatus {
        let mut s = self.lock();
        s.expire(now_ms());
        AdviceStatus {
            events: s.events.iter().cloned().collect(),
            preemption: s.preemption.clone(),
            notice: s.notice.clone(),
            health_check: s.health_check.clone(),
        }
    }

    /// Takes one poll of the notice: `Ok(Some(text))` a notice, `Ok(None)`
    /// none, `Err` the poll failed (a standing notice stays). Returns the
    /// notice's text when it is new.
    fn noticed(&self, polled: Result<Option<String>, String>) -> Option<String> {
        let now = now_ms();
        let mut s = self.lock();
        if let Some(n) = s.notice.as_mut() {
            n.checked_unix_ms = Some(now);
            n.last_error = polled.as_ref().err().cloned();
        }
        match polled {
            Err(_) => None,
            Ok(None) => {
                if let Some(p) = s.preemption.take() {
                    tracing::info!(detail = %p.detail, "the preemption notice is gone");
                }
                None
            }
            Ok(Some(text)) => {
                let detail = clip(&text);
                let at = notice_time(&text);
                match s.preemption.as_mut() {
                    Some(p) => {
                        if p.detail != detail {
                            p.detail = detail;
                            p.deadline_unix_ms = at.unwrap_or(p.deadline_unix_ms);
                        }
                        None
                    }
                    None => {
                        let deadline_unix_ms = at.unwrap_or_else(|| now.saturating_add(self.grace.as_millis() as u64));
                        s.preemption = Some(Preemption { deadline_unix_ms, detail: detail.clone() });
                        Some(detail)
                    }
                }
            }
        }
    }

    fn health_checked(&self, result: &Result<(), String>) {
        let mut s = self.lock();
        if let Some(h) = s.health_check.as_mut() {
            h.checked_unix_ms = Some(now_ms());
            h.last_error = result.as_ref().err().cloned();
        }
    }
}

/// The deadline a notice gives: a JSON object's `time` (EC2's
/// `{"action":"terminate","time":"2026-12-05T08:30:00Z"}`), in Unix ms.
fn notice_time(text: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    let t = humantime::parse_rfc3339_weak(v.get("time")?.as_str()?).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
}

/// Records an alert: an event, a log line, and an `Alert` in the failure
/// record of every namespace held or recorded here.
fn alert(d: &Daemon, kind: AdviceKind, detail: String) {
    let e = d.advice.raise(kind, detail);
    tracing::warn!(id = e.id, kind = ?e.kind, detail = %e.detail, "checkpoint advised");
    let kind = serde_json::to_value(e.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    d.metrics.advised(&kind);
    // The namespaces held here, and those of jobs recorded here (a job that has not saved yet).
    let mut namespaces: std::collections::BTreeMap<String, Option<u64>> =
        d.failures.recent(1).into_keys().map(|ns| (ns, None)).collect();
    namespaces.extend(d.tier.namespaces().into_iter().map(|ns| (ns.namespace, ns.latest_complete)));
    for (ns, step) in namespaces {
        let rec = FailureRecord {
            unix_ms: e.at_unix_ms,
            kind: FailureKind::Alert,
            detail: e.detail.clone(),
            step,
            restart: 0,
        };
        if let Err(err) = d.failures.record(&ns, &rec) {
            tracing::warn!(namespace = %ns, error = %err, "could not record an alert");
        }
    }
}

/// At start: a notice URL must accept a connection (a wrong address is a
/// configuration error, not a notice that never comes).
pub(crate) async fn check_notice(cfg: &AdviceConfig) -> Result<(), DaemonError> {
    let Some(NoticeSource::Url { url, authority }) = &cfg.notice else { return Ok(()) };
    let refused = |why: String| {
        DaemonError::Config(format!(
            "preemption_notice {url} cannot be reached ({why}): check the address, or leave preemption_notice unset"
        ))
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(authority.as_str())).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(refused(format!("connecting to {authority}: {e}"))),
        Err(_) => Err(refused(format!("no connection to {authority} within {CONNECT_TIMEOUT:?}"))),
    }
}

impl Daemon {
    /// Whether `ns` should checkpoint at its next step, and why (the
    /// `advice` request and `GET /v1/namespaces/{ns}/advice`).
    pub fn advice_for(&self, ns: &str) -> tierckpt_tiers::Result<Advice> {
        tierckpt_format::names::validate_namespace(ns)?;
        let estimate = self.drainer.as_ref().and_then(|d| d.estimate_ms(ns));
        Ok(self.advice.advice(estimate))
    }
}

/// Starts the background checks configured, on the current runtime.
pub(crate) fn start(d: Arc<Daemon>, stop: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let cfg = d.cfg.advice.clone();
    if let Some(n) = cfg.notice.clone() {
        tasks.push(tokio::spawn(poll_notice(d.clone(), n, cfg.notice_every, stop.clone())));
    }
    if let Some(h) = cfg.health_check.clone() {
        tasks.push(tokio::spawn(health_checks(d.clone(), h, stop.clone())));
    }
    if d.cluster.is_some() {
        tasks.push(tokio::spawn(watch_neighbours(d, stop)));
    }
    tasks
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

async fn poll_notice(d: Arc<Daemon>, source: NoticeSource, interval: Duration, stop: watch::Receiver<bool>) {
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let timeout = interval.clamp(Duration::from_secs(1), Duration::from_secs(5));
    // The last error logged and when: the same one is logged again only after LOG_AGAIN.
    let logged: Mutex<Option<(String, Instant)>> = Mutex::new(None);
    crate::cluster::every(interval, stop, || async {
        let polled = match &source {
            NoticeSource::File(p) => read_notice_file(p).await,
            NoticeSource::Url { url, .. } => get_notice(&client, url, timeout).await,
        };
        {
            let mut logged = logged.lock().unwrap_or_else(|p| p.into_inner());
            match &polled {
                Err(e) if logged.as_ref().is_none_or(|(l, at)| l != e || at.elapsed() >= LOG_AGAIN) => {
                    tracing::warn!(source = %source, error = %e, "the preemption notice could not be checked");
                    *logged = Some((e.clone(), Instant::now()));
                }
                Err(_) => {}
                Ok(_) => *logged = None,
            }
        }
        if let Some(detail) = d.advice.noticed(polled) {
            alert(&d, AdviceKind::Preemption, format!("preemption notice: {detail}"));
        }
    })
    .await
}

async fn read_notice_file(p: &std::path::Path) -> Result<Option<String>, String> {
    let p = p.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        match std::fs::File::open(&p) {
            Ok(f) => f.take(MAX_BODY as u64).read_to_string(&mut text).map(|_| text),
            Err(e) => Err(e),
        }
        .map_err(|e| (e.kind(), format!("reading {}: {e}", p.display())))
    })
    .await
    .map_err(|e| format!("reading the notice file: {e}"))?;
    match read {
        Ok(t) if t.trim().is_empty() => Ok(None),
        Ok(t) => Ok(Some(t)),
        Err((std::io::ErrorKind::NotFound, _)) => Ok(None),
        Err((_, e)) => Err(e),
    }
}

async fn get_notice(client: &HttpClient, url: &str, timeout: Duration) -> Result<Option<String>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url} is not a URL: {e}"))?;
    let ask = async {
        let resp = client.get(uri).await.map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("GET {url}: reading the body: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let (status, body) =
        tokio::time::timeout(timeout, ask).await.map_err(|_| format!("GET {url}: no answer within {timeout:?}"))??;
    match status.as_u16() {
        404 => Ok(None),
        200 if body.trim().is_empty() || body.trim().eq_ignore_ascii_case("false") => Ok(None),
        200 => Ok(Some(body)),
        _ => Err(format!("GET {url} answered {status}: {}", clip(&body))),
    }
}

async fn health_checks(d: Arc<Daemon>, cfg: HealthCheckConfig, mut stop: watch::Receiver<bool>) {
    use std::sync::atomic::{AtomicI32, Ordering};
    // The process group of the check running now (0: none), killed if the daemon stops meanwhile.
    let running = Arc::new(AtomicI32::new(0));
    let mut failing = false;
    let mut tick = tokio::time::interval(cfg.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let (c, r) = (cfg.clone(), running.clone());
        let job = tokio::task::spawn_blocking(move || run_check(&c, &r));
        let result = tokio::select! {
            _ = stop.changed() => {
                let group = running.load(Ordering::Acquire);
                if group > 0 {
                    // SAFETY: signals the process group of the check this task started, and only it.
                    unsafe { libc::kill(-group, libc::SIGKILL) };
                }
                return;
            }
            r = job => r.unwrap_or_else(|e| Err(format!("the check's worker failed: {e}"))),
        };
        d.advice.health_checked(&result);
        let was = std::mem::replace(&mut failing, result.is_err());
        match result {
            // One alert when the check starts failing, not one per failed run.
            Err(why) if !was => alert(&d, AdviceKind::HealthCheck, format!("health check failed: {why}")),
            Ok(()) if was => tracing::info!(command = %cfg.command, "the health check passes again"),
            _ => {}
        }
    }
}

/// Runs the health check once: `Err` says how it failed (exit code,
/// signal, timeout, or why it did not start; with its last stderr line).
fn run_check(cfg: &HealthCheckConfig, running: &std::sync::atomic::AtomicI32) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&cfg.command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; it only sets this child's
    // parent-death signal, so a check does not outlive the daemon.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("could not start sh -c {:?}: {e}", cfg.command))?;
    running.store(child.id() as i32, std::sync::atomic::Ordering::Release);
    let result = wait_check(cfg, &mut child);
    running.store(0, std::sync::atomic::Ordering::Release);
    result
}

/// Waits for a started check (see [`run_check`]).
fn wait_check(cfg: &HealthCheckConfig, child: &mut std::process::Child) -> Result<(), String> {
    use std::os::unix::process::ExitStatusExt;
    let mut stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keep the tail only: a chatty check must not block on a full pipe.
        let (mut tail, mut buf) = (Vec::new(), [0u8; 4096]);
        while let Ok(n @ 1..) = stderr.read(&mut buf) {
            tail.extend_from_slice(&buf[..n]);
            let cut = tail.len().saturating_sub(4096);
            tail.drain(..cut);
        }
        let _ = tx.send(tail);
    });
    let deadline = Instant::now() + cfg.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
    };
    let Some(status) = status else {
        // SAFETY: signals the process group this check leads, and only it.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        return Err(format!("timed out after {}", humantime::format_duration(cfg.timeout)));
    };
    if status.success() {
        return Ok(());
    }
    let how = match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => format!("{status}"),
    };
    // A background grandchild may hold stderr open: wait only a moment.
    let tail = rx.recv_timeout(Duration::from_millis(200)).unwrap_or_default();
    let text = String::from_utf8_lossy(&tail);
    match text.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => Err(format!("{how} ({})", clip(line))),
        None => Err(how),
    }
}

async fn watch_neighbours(d: Arc<Daemon>, mut stop: watch::Receiver<bool>) {
    let Some(cluster) = d.cluster.clone() else { return };
    let mut changes = cluster.subscribe_changes();
    loop {
        let change = tokio::select! {
            _ = stop.changed() => return,
            c = changes.recv() => c,
        };
        let (id, before, after) = match change {
            Ok(c) => c,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let turned = before == NodeState::Alive && matches!(after, NodeState::Suspect | NodeState::Dead);
        if turned && cluster.is_placement_neighbour(&id) {
            let state = format!("{after:?}").to_lowercase();
            alert(&d, AdviceKind::SuspectNeighbour, format!("neighbour {id} {state}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_gives_its_deadline_when_it_has_one() {
        let t = notice_time(r#"{"action":"terminate","time":"2026-12-05T08:30:00Z"}"#).unwrap();
        assert_eq!(t, 1_796_459_400_000);
        assert_eq!(notice_time("TRUE"), None);
        assert_eq!(notice_time(r#"{"action":"stop"}"#), None);
    }

    #[test]
    fn ids_grow_and_events_expire() {
        let cfg = AdviceConfig {
            notice: None,
            notice_every: Duration::from_secs(1),
            grace: Duration::from_secs(30),
            health_check: None,
        };
        let a = Advisor::new(&cfg);
        assert!(!a.advice(None).save_now);
        let (e1, e2) = (a.raise(AdviceKind::HealthCheck, "x".into()), a.raise(AdviceKind::HealthCheck, "y".into()));
        assert!(e2.id > e1.id && e1.id >= e1.at_unix_ms, "{e1:?} {e2:?}");
        assert!(a.advice(Some(5)).save_now);
        a.lock().events.iter_mut().for_each(|e| e.at_unix_ms -= EVENT_TTL.as_millis() as u64);
        assert!(!a.advice(None).save_now, "expired");
        assert_eq!(a.noticed(Ok(Some("TRUE".into()))), Some("TRUE".into()));
        let p = a.advice(None).preemption.unwrap();
        assert!(p.deadline_unix_ms >= now_ms() + 29_000, "{p:?}");
        assert_eq!(a.noticed(Ok(Some("TRUE".into()))), None, "a standing notice is one alert");
        assert_eq!(a.noticed(Err("down".into())), None);
        assert!(a.advice(None).preemption.is_some(), "an error keeps a standing notice");
        a.noticed(Ok(None));
        assert!(a.advice(None).preemption.is_none());
    }
}
