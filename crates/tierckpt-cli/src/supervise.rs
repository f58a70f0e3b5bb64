//! `tierckpt run -- CMD`: the supervisor. Makes sure a node daemon is
//! running, runs the training command in its own process group with the
//! namespace and the daemon's socket in its environment, and restarts it
//! (with backoff, up to a limit) when it exits non-zero, dies by a signal,
//! or stops sending progress heartbeats. The limit and the backoff count
//! failures in a row without progress: a failure after a new complete
//! checkpoint starts both over, so a job that fails once a day runs for
//! months while a crash loop still stops. Every start and failure is recorded
//! in the namespace through the daemon, where `tierckpt status` shows it and
//! adaptive checkpoint intervals read it.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tierckpt_client::Client;
use tierckpt_proto::{FailureKind, FailureRecord};

/// Longest wait between restarts; the backoff doubles up to it.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often the supervisor looks at its child, the heartbeat and signals.
const WATCH_EVERY: Duration = Duration::from_millis(50);
/// How long a daemon started by the supervisor may take to answer.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(30);
/// After forwarding Ctrl-C or SIGTERM, how long the command may take to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
/// The arguments of `tierckpt run`.
pub struct RunArgs {
    /// Restarts in a row without a new complete checkpoint before giving up (0: never restart); a failure
    /// after the job made progress starts the count and the backoff over.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Restart the command when it sends no progress heartbeat for this long
    /// (e.g. "90s", "10m"; off unless set). Counted from each start, so it
    /// must exceed the command's start-up time.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub hang_timeout: Option<Duration>,
    /// Wait before the first restart; doubles with each restart without progress, up to 1 min.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub backoff: Duration,
    /// Namespace of the job (passed on as TIERCKPT_NAMESPACE).
    #[arg(long, env = "TIERCKPT_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The training command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// The socket a job on this node uses: the flag, `$TIERCKPT_SOCKET`,
/// `$TIERCKPT_MEMORY_DIR/daemon.sock`, then the default.
pub fn resolve_socket(flag: Option<&Path>) -> PathBuf {
    if let Some(s) = flag {
        return s.to_path_buf();
    }
    if let Some(s) = std::env::var_os("TIERCKPT_SOCKET") {
        return s.into();
    }
    if let Some(d) = std::env::var_os("TIERCKPT_MEMORY_DIR") {
        return PathBuf::from(d).join("daemon.sock");
    }
    tierckpt_client::default_socket()
}

fn answers(socket: &Path) -> bool {
    Client::connect(socket).and_then(|mut c| c.status()).is_ok()
}

/// Starts `tierckptd` on `socket` unless a daemon answers there. The daemon
/// is detached (its own session) so that it outlives the command and the
/// supervisor: the memory tier is what a restarted job resumes from. Its
/// configuration comes from the `TIERCKPT_*` environment; its log goes
/// beside the socket. Returns whether it had to start one.
pub fn ensure_daemon(socket: &Path) -> Result<bool> {
    if answers(socket) {
        return Ok(false);
    }
    let log_path = socket.with_extension("log");
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening the daemon log {}", log_path.display()))?;
    let mut cmd = Command::new(tierckpt_harness::daemon::daemon_binary());
    cmd.arg("--socket").arg(socket).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "starting {} (set TIERCKPT_DAEMON_BIN or put it on PATH)",
            tierckpt_harness::daemon::daemon_binary().display()
        )
    })?;
    let started = Instant::now();
    while started.elapsed() < DAEMON_START_TIMEOUT {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the node daemon exited at start ({status}); its log {} ends with:\n{}",
                log_path.display(),
                tail(&log_path)
            );
        }
        if answers(socket) {
            eprintln!(
                "tierckpt run: started the node daemon (pid {}) on {}; it keeps running after the job, log {}",
                child.id(),
                socket.display(),
                log_path.display()
            );
            // The daemon is reaped by init once the supervisor is gone.
            std::mem::forget(child);
            return Ok(true);
        }
        std::thread::sleep(WATCH_EVERY);
    }
    let _ = child.kill();
    bail!(
        "the node daemon did not answer on {} within {DAEMON_START_TIMEOUT:?}; see {}",
        socket.display(),
        log_path.display()
    )
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGPIPE => "SIGPIPE".into(),
        s => format!("signal {s}"),
    }
}

/// Exit code of the supervisor for the command's final status: its own code,
/// or 128 + the signal, as a shell reports it.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => (128 + s) as u8,
        _ => 1,
    }
}

/// How one run of the command ended.
enum Outcome {
    Exited(ExitStatus),
    Hung(Duration),
    Stopped(i32, ExitStatus),
}

struct Job<'a> {
    args: &'a RunArgs,
    socket: PathBuf,
    heartbeat: PathBuf,
}

impl Job<'_> {
    /// Records `kind`; returns the namespace's newest complete step then.
    fn record(&self, kind: FailureKind, detail: String, restart: u32) -> Option<u64> {
        let ns = &self.args.namespace;
        let mut client = Client::connect(&self.socket);
        let step = client.as_mut().ok().and_then(|c| c.latest(ns).ok()).flatten();
        let rec = FailureRecord { unix_ms: now_ms(), kind, detail: detail.clone(), step, restart };
        if let Err(e) = client.and_then(|mut c| c.record_failure(ns, rec)) {
            eprintln!("tierckpt run: could not record {kind:?} in namespace {}: {e}", self.args.namespace);
        }
        if kind.is_failure() {
            let at = step.map_or("before any complete checkpoint".into(), |s| format!("newest complete step {s}"));
            eprintln!("tierckpt run: {} ({detail}) in run {restart}; {at}", describe(kind));
        }
        step
    }

    fn spawn(&self, restart: u32) -> Result<Child> {
        std::fs::write(&self.heartbeat, b"")
            .with_context(|| format!("resetting the heartbeat file {}", self.heartbeat.display()))?;
        let (prog, rest) = self.args.command.split_first().context("no command given after --")?;
        let mut cmd = Command::new(prog);
        cmd.args(rest)
            .env("TIERCKPT_SOCKET", &self.socket)
            .env("TIERCKPT_NAMESPACE", &self.args.namespace)
            .env("TIERCKPT_HEARTBEAT_FILE", &self.heartbeat)
            .env("TIERCKPT_RESTART", restart.to_string())
            .process_group(0);
        cmd.spawn().with_context(|| format!("cannot start {prog:?}"))
    }

    /// The newest sign of progress: the heartbeat file's modification time,
    /// or the start of this run if it is older.
    fn last_progress(&self, started: SystemTime) -> SystemTime {
        std::fs::metadata(&self.heartbeat).and_then(|m| m.modified()).map_or(started, |t| t.max(started))
    }

    fn watch(&self, child: &mut Child) -> Result<Outcome> {
        let started = SystemTime::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Outcome::Exited(status));
            }
            let sig = crate::signals::take();
            if sig != 0 {
                let status = stop_group(child, sig)?;
                return Ok(Outcome::Stopped(sig, status));
            }
            if let Some(limit) = self.args.hang_timeout {
                let quiet = self.last_progress(started).elapsed().unwrap_or_default();
                if quiet > limit {
                    return Ok(Outcome::Hung(quiet));
                }
            }
            std::thread::sleep(WATCH_EVERY);
        }
    }
}

fn describe(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Exit => "non-zero exit",
        FailureKind::Signal => "killed by a signal",
        FailureKind::Hang => "no heartbeat",
        FailureKind::DaemonLost => "node daemon gone",
        FailureKind::Start => "start",
    }
}

/// Sends `sig` to the command's process group, gives it a grace period,
/// then kills what is left.
fn stop_group(child: &mut Child, sig: i32) -> Result<ExitStatus> {
    let pgid = child.id() as i32;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(-pgid, sig) };
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait()? {
            kill_group(pgid);
            return Ok(s);
        }
        std::thread::sleep(WATCH_EVERY);
    }
    kill_group(pgid);
    Ok(child.wait()?)
}

/// SIGKILLs every process left in the group (workers of a dead launcher),
/// and every descendant of the command that left the group: torchrun
/// starts its workers in sessions of their own.
fn kill_group(pgid: i32) {
    let tree = descendants(pgid);
    // SAFETY: as above; an empty group gives ESRCH, which is fine.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    for pid in tree {
        // SAFETY: as above; a process gone meanwhile gives ESRCH.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The processes below `root` now (children, their children, ...), from
/// the parent ids in /proc.
fn descendants(root: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let parents: Vec<(i32, i32)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": the name may hold spaces and parentheses.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut out = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == p && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// Runs the supervisor; returns the exit code to leave with.
pub fn run(args: &RunArgs, socket_flag: Option<&Path>) -> Result<ExitCode> {
    tierckpt_format::names::validate_namespace(&args.namespace)
        .with_context(|| format!("--namespace {:?}", args.namespace))?;
    crate::signals::catch_int_term();
    let socket = resolve_socket(socket_flag);
    ensure_daemon(&socket)?;
    let beat_dir =
        tempfile::Builder::new().prefix("tierckpt-run-").tempdir().context("creating a heartbeat directory")?;
    let job = Job { args, socket: socket.clone(), heartbeat: beat_dir.path().join("heartbeat") };
    // The newest complete step at the start and at each failure: a newer one
    // at a failure means the job made progress since the one before.
    let mut last_step = job.record(FailureKind::Start, args.command.join(" "), 0);
    let mut backoff = args.backoff;
    let mut restart = 0u32;
    let mut without_progress = 0u32;
    loop {
        if ensure_daemon(&socket)? {
            job.record(
                FailureKind::DaemonLost,
                format!("no daemon answered on {}; started a new one", socket.display()),
                restart,
            );
        }
        let mut child = job.spawn(restart)?;
        eprintln!("tierckpt run: started {:?} (pid {}, restart {restart})", args.command[0], child.id());
        let outcome = job.watch(&mut child)?;
        let pgid = child.id() as i32;
        let (kind, detail, code) = match outcome {
            Outcome::Stopped(sig, status) => {
                eprintln!(
                    "tierckpt run: {} received; stopped the command ({status}), not restarting",
                    signal_name(sig)
                );
                return Ok(ExitCode::from((128 + sig) as u8));
            }
            Outcome::Exited(status) if status.success() => {
                kill_group(pgid);
                return Ok(ExitCode::SUCCESS);
            }
            Outcome::Exited(status) => {
                kill_group(pgid);
                match status.signal() {
                    Some(sig) => (FailureKind::Signal, signal_name(sig), exit_code(status)),
                    None => {
                        (FailureKind::Exit, format!("exit code {}", status.code().unwrap_or(-1)), exit_code(status))
                    }
                }
            }
            Outcome::Hung(quiet) => {
                kill_group(pgid);
                let status = child.wait()?;
                let detail = format!(
                    "no heartbeat for {:.1} s (hang timeout {:?}); killed",
                    quiet.as_secs_f64(),
                    args.hang_timeout.unwrap_or_default()
                );
                (FailureKind::Hang, detail, exit_code(status))
            }
        };
        let step = job.record(kind, detail, restart);
        if step > last_step && restart > 0 {
            eprintln!(
                "tierckpt run: the job made progress since the last failure (newest complete step {} -> {}): the \
                 restart count and the backoff start over",
                last_step.map_or("none".into(), |s| s.to_string()),
                step.map_or("none".into(), |s| s.to_string()),
            );
            without_progress = 0;
            backoff = args.backoff;
        }
        last_step = last_step.max(step);
        if without_progress >= args.max_restarts {
            eprintln!(
                "tierckpt run: giving up after {without_progress} restart(s) without a new checkpoint (--max-restarts {})",
                args.max_restarts
            );
            return Ok(ExitCode::from(code));
        }
        restart += 1;
        without_progress += 1;
        eprintln!(
            "tierckpt run: restarting in {backoff:?} ({without_progress} of {} without progress)",
            args.max_restarts
        );
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            let sig = crate::signals::received();
            if sig != 0 {
                eprintln!("tierckpt run: {} received while waiting to restart; stopping", signal_name(sig));
                return Ok(ExitCode::from((128 + sig) as u8));
            }
            std::thread::sleep(WATCH_EVERY.min(until.saturating_duration_since(Instant::now())));
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
