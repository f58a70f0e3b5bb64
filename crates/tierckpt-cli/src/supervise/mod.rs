//! `tierckpt run -- CMD`: the supervisor. Makes sure a node daemon is
//! running, runs the training command in its own process group with the
//! namespace and the daemon's socket in its environment, and restarts it
//! (with backoff, up to a limit) when it exits non-zero, dies by a signal,
//! or stops sending progress heartbeats. The limit and the backoff count
//! failures in a row without progress: a failure after a new complete
//! checkpoint starts both over, so a job that fails once a day runs for
//! months while a crash loop still stops. Every start and failure is recorded
//! in the namespace through the daemon, where `tierckpt status` shows it and
//! adaptive checkpoint intervals read it. With `--nproc-per-node N` it is
//! the launcher of a single-node PyTorch job (see `gang`), and with
//! `--restart rank` it starts again only the ranks that failed.

mod gang;
mod procs;

pub use gang::Restart;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
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
/// After forwarding Ctrl-C, how long the command may take to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The exit code of a command that checkpointed and stopped for a
/// preemption (EX_TEMPFAIL: try again later); the Python Checkpointer exits
/// with it, and the supervisor passes it on without a restart.
pub const EXIT_PREEMPTED: u8 = 75;

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
    /// Wait before the first restart; doubles with each restart without progress, up to 1 min. Under
    /// `--restart rank` the first replacement after progress starts at once (the survivors wait for it).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub backoff: Duration,
    /// Start N ranks of the command on this node, with torchrun's environment (RANK, LOCAL_RANK,
    /// WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and a store file for `tierckpt.inprocess`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub nproc_per_node: Option<u32>,
    /// What starts again when ranks fail: only the failed ranks, which rejoin the survivors recovering
    /// in process (`tierckpt.inprocess.run`), or all of them.
    #[arg(long, value_enum, default_value_t = Restart::All, requires = "nproc_per_node")]
    pub restart: Restart,
    /// Under `--restart rank`, keep K warm spares started ahead, waiting in `tierckpt.inprocess.run`
    /// for the rank of one that fails (its interpreter, imports and model already loaded).
    #[arg(long, value_name = "K", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub spares: u32,
    /// Signals that announce a preemption (SIGTERM from Kubernetes, a Slurm `--signal`): forwarded to every
    /// rank, which checkpoints and exits 75; the supervisor then exits 75 ("preempted, resume later").
    #[arg(long, value_delimiter = ',', default_value = "TERM,USR1", value_parser = parse_signal)]
    pub preemption_signals: Vec<i32>,
    /// How long the ranks may take to checkpoint and exit after a preemption signal, before they are killed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Namespace of the job (passed on as TIERCKPT_NAMESPACE).
    #[arg(long, env = "TIERCKPT_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The training command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_signal(name: &str) -> Result<i32, String> {
    crate::signals::number(name)
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

/// What every run of the command shares: its arguments, the daemon, and a
/// directory for the ranks' heartbeat files, store file and generation.
struct Job<'a> {
    args: &'a RunArgs,
    socket: PathBuf,
    dir: PathBuf,
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
}

fn describe(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Exit => "non-zero exit",
        FailureKind::Signal => "killed by a signal",
        FailureKind::Hang => "no heartbeat",
        FailureKind::DaemonLost => "node daemon gone",
        FailureKind::Start => "start",
        FailureKind::Preempted => "preempted",
        FailureKind::Alert => "checkpoint asked for",
    }
}

/// Runs the supervisor; returns the exit code to leave with.
pub fn run(args: &RunArgs, socket_flag: Option<&Path>) -> Result<ExitCode> {
    tierckpt_format::names::validate_namespace(&args.namespace)
        .with_context(|| format!("--namespace {:?}", args.namespace))?;
    if args.spares > 0 && (args.restart != Restart::Rank || args.nproc_per_node.is_none()) {
        bail!("--spares {} needs --nproc-per-node and --restart rank (a spare takes over a failed rank)", args.spares);
    }
    crate::signals::catch_int_term();
    crate::signals::catch(&args.preemption_signals);
    let socket = resolve_socket(socket_flag);
    ensure_daemon(&socket)?;
    let dir = tempfile::Builder::new().prefix("tierckpt-run-").tempdir().context("creating a run directory")?;
    let job = Job { args, socket: socket.clone(), dir: dir.path().to_path_buf() };
    // The newest complete step at the start and at each failure: a newer one
    // at a failure means the job made progress since the one before.
    let mut last_step = job.record(FailureKind::Start, args.command.join(" "), 0);
    let mut backoff = args.backoff;
    let mut restart = 0u32;
    let mut without_progress = 0u32;
    let mut gang = gang::Gang::start(&job)?;
    loop {
        let failures = match gang.watch()? {
            gang::Outcome::Done => return Ok(ExitCode::SUCCESS),
            gang::Outcome::Stopped(sig) => {
                eprintln!("tierckpt run: {} received; stopped the command, not restarting", procs::signal_name(sig));
                return Ok(ExitCode::from((128 + sig) as u8));
            }
            gang::Outcome::Preempted(detail) => {
                let step = job.record(FailureKind::Preempted, detail.clone(), restart);
                eprintln!(
                    "tierckpt run: preempted ({detail}); newest complete step {}; exiting {EXIT_PREEMPTED} to be \
                     resumed later",
                    step.map_or("none".into(), |s| s.to_string())
                );
                return Ok(ExitCode::from(EXIT_PREEMPTED));
            }
            gang::Outcome::Failed(failures) => failures,
        };
        let mut step = None;
        for f in &failures {
            let detail =
                if args.nproc_per_node.is_some() { format!("rank {}: {}", f.rank, f.detail) } else { f.detail.clone() };
            step = job.record(f.kind, detail, restart);
        }
        let code = failures.last().map_or(1, |f| f.code);
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
            gang.kill_all();
            eprintln!(
                "tierckpt run: giving up after {without_progress} restart(s) without a new checkpoint (--max-restarts {})",
                args.max_restarts
            );
            return Ok(ExitCode::from(code));
        }
        restart += 1;
        without_progress += 1;
        let delay = gang::restart_delay(args.restart, args.nproc_per_node.is_some(), without_progress, backoff);
        eprintln!(
            "tierckpt run: restarting {} in {delay:?} ({without_progress} of {} without progress)",
            failures.iter().map(|f| gang.label(f.rank)).collect::<Vec<_>>().join(", "),
            args.max_restarts
        );
        let until = Instant::now() + delay;
        while Instant::now() < until {
            let sig = crate::signals::received();
            if sig != 0 {
                gang.kill_all();
                eprintln!("tierckpt run: {} received while waiting to restart; stopping", procs::signal_name(sig));
                return Ok(ExitCode::from((128 + sig) as u8));
            }
            std::thread::sleep(WATCH_EVERY.min(until.saturating_duration_since(Instant::now())));
        }
        if !delay.is_zero() {
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        if ensure_daemon(&socket)? {
            job.record(
                FailureKind::DaemonLost,
                format!("no daemon answered on {}; started a new one", socket.display()),
                restart,
            );
        }
        gang.restart(restart)?;
    }
}
