//! The ranks of the job on this node: one command, or `--nproc-per-node`
//! copies of it with torchrun's environment (`RANK`, `WORLD_SIZE`, ...),
//! each in a process group of its own, watched together. When ranks fail,
//! either only they start again and join the survivors' next process-group
//! generation (`--restart rank`, for jobs that recover in process with
//! `tierckpt.inprocess`), or every rank is stopped and all start again
//! (`--restart all`). Under `--restart rank`, `--spares K` keeps K warm
//! spares: copies of the command started ahead that wait in
//! `tierckpt.inprocess.run` for a rank, so that a replacement has already
//! paid for its interpreter, imports and model; the spare taken is started
//! again once every rank showed progress after the recovery.

use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use tierckpt_proto::FailureKind;

use super::procs::{exit_code, kill_group, signal_name};
use super::{Job, EXIT_PREEMPTED, STOP_GRACE, WATCH_EVERY};

/// What `tierckpt run` starts again when ranks fail.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Only the failed ranks; the others recover in their processes (`tierckpt.inprocess.run`).
    Rank,
    /// Every rank: the survivors are killed and all start anew.
    All,
}

impl Restart {
    fn name(self) -> &'static str {
        match self {
            Restart::Rank => "rank",
            Restart::All => "all",
        }
    }
}

/// One rank that failed, and how.
pub(crate) struct Failure {
    pub(crate) rank: usize,
    pub(crate) kind: FailureKind,
    pub(crate) detail: String,
    /// The exit code the supervisor leaves with if it gives up here.
    pub(crate) code: u8,
}

/// How watching the ranks ended.
pub(crate) enum Outcome {
    /// Every rank exited 0.
    Done,
    /// These ranks failed (all that were seen failing in one look).
    Failed(Vec<Failure>),
    /// Ctrl-C arrived, or a preemption signal after which no rank exited
    /// preempted: every rank was sent it, then killed after a grace period.
    Stopped(i32),
    /// Every rank ended, some of them preempted (exit 75: checkpointed, to
    /// be resumed later), none failed; the detail says what announced it.
    Preempted(String),
}

struct Running {
    child: Child,
    started: SystemTime,
    heartbeat: PathBuf,
}

/// A warm spare: it waits for `file` to name its rank and generation.
struct Spare {
    child: Child,
    file: PathBuf,
    heartbeat: PathBuf,
}

enum Slot {
    Running(Running),
    Done,
    Preempted,
    Dead,
}

/// The ranks of this node's job.
pub(crate) struct Gang<'a> {
    job: &'a Job<'a>,
    slots: Vec<Slot>,
    spares: Vec<Spare>,
    /// Spares started so far (names their files).
    spares_started: u32,
    /// Set when a spare exits on its own: no more are started.
    spares_broken: bool,
    /// When the spares taken at the last recovery may be replaced: once
    /// every rank's heartbeat is newer than this.
    replenish_after: Option<SystemTime>,
    generation: u32,
    /// The supervisor's restart count at the last (re)start.
    restart: u32,
    master_port: u16,
}

impl<'a> Gang<'a> {
    /// Starts every rank, in generation 0.
    pub(crate) fn start(job: &'a Job<'a>) -> Result<Self> {
        let n = job.args.nproc_per_node.unwrap_or(1) as usize;
        let mut gang = Gang {
            job,
            slots: (0..n).map(|_| Slot::Dead).collect(),
            spares: vec![],
            spares_started: 0,
            spares_broken: false,
            replenish_after: None,
            generation: 0,
            restart: 0,
            master_port: 0,
        };
        gang.spawn_all(0)?;
        Ok(gang)
    }

    fn ranked(&self) -> bool {
        self.job.args.nproc_per_node.is_some()
    }

    /// How the log and the failure record name `rank`.
    pub(crate) fn label(&self, rank: usize) -> String {
        if self.ranked() {
            format!("rank {rank}")
        } else {
            format!("{:?}", self.job.args.command[0])
        }
    }

    fn heartbeat(&self, rank: usize) -> PathBuf {
        if self.ranked() {
            self.job.dir.join(format!("heartbeat.{rank}"))
        } else {
            self.job.dir.join("heartbeat")
        }
    }

    fn generation_file(&self) -> PathBuf {
        self.job.dir.join("generation")
    }

    fn spawn_all(&mut self, restart: u32) -> Result<()> {
        self.master_port = free_port()?;
        for rank in 0..self.slots.len() {
            self.spawn(rank, restart)?;
        }
        self.replenish_after = None;
        self.top_up_spares(restart)
    }

    fn spawn(&mut self, rank: usize, restart: u32) -> Result<()> {
        let heartbeat = self.heartbeat(rank);
        let mut cmd = self.command(&heartbeat, restart)?;
        if self.ranked() {
            cmd.env("RANK", rank.to_string()).env("LOCAL_RANK", rank.to_string());
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {:?}", self.job.args.command[0]))?;
        eprintln!(
            "tierckpt run: started {} (pid {}, restart {restart}{})",
            self.label(rank),
            child.id(),
            if self.ranked() { format!(", generation {}", self.generation) } else { String::new() }
        );
        self.slots[rank] = Slot::Running(Running { child, started: SystemTime::now(), heartbeat });
        Ok(())
    }

    /// Starts spares until there are `--spares` of them.
    fn top_up_spares(&mut self, restart: u32) -> Result<()> {
        while !self.spares_broken && self.spares.len() < self.job.args.spares as usize {
            let id = self.spares_started;
            self.spares_started += 1;
            let heartbeat = self.job.dir.join(format!("heartbeat.spare{id}"));
            let file = self.job.dir.join(format!("spare.{id}"));
            let mut cmd = self.command(&heartbeat, restart)?;
            cmd.env("TIERCKPT_SPARE_FILE", &file);
            let child = cmd.spawn().with_context(|| format!("cannot start {:?}", self.job.args.command[0]))?;
            eprintln!("tierckpt run: started spare {id} (pid {})", child.id());
            self.spares.push(Spare { child, file, heartbeat });
        }
        Ok(())
    }

    /// The command with the environment every rank and spare gets.
    fn command(&self, heartbeat: &Path, restart: u32) -> Result<Command> {
        std::fs::write(heartbeat, b"")
            .with_context(|| format!("resetting the heartbeat file {}", heartbeat.display()))?;
        let args = self.job.args;
        let (prog, rest) = args.command.split_first().context("no command given after --")?;
        let mut cmd = Command::new(prog);
        cmd.args(rest)
            .env("TIERCKPT_SOCKET", &self.job.socket)
            .env("TIERCKPT_NAMESPACE", &args.namespace)
            .env("TIERCKPT_HEARTBEAT_FILE", heartbeat)
            .env("TIERCKPT_RESTART", restart.to_string())
            .process_group(0);
        if let Some(n) = args.nproc_per_node {
            let n = n.to_string();
            cmd.env("WORLD_SIZE", &n)
                .env("LOCAL_WORLD_SIZE", &n)
                .env("GROUP_RANK", "0")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", self.master_port.to_string())
                .env("TIERCKPT_STORE_FILE", self.job.dir.join("store"))
                .env("TIERCKPT_GENERATION", self.generation.to_string())
                .env("TIERCKPT_RESTART_POLICY", args.restart.name());
            if args.restart == Restart::Rank {
                cmd.env("TIERCKPT_GENERATION_FILE", self.generation_file());
            }
        }
        Ok(cmd)
    }

    /// Waits until every rank is done or preempted, some fail, or a signal
    /// arrives. A preemption signal is forwarded to every rank, which then
    /// has `--grace` to checkpoint and exit.
    pub(crate) fn watch(&mut self) -> Result<Outcome> {
        let mut stopping: Option<(i32, Instant)> = None;
        loop {
            let sig = crate::signals::take();
            if sig == libc::SIGINT || (sig != 0 && !self.job.args.preemption_signals.contains(&sig)) {
                self.stop_all(sig)?;
                return Ok(Outcome::Stopped(sig));
            }
            if sig != 0 && stopping.is_none() {
                eprintln!(
                    "tierckpt run: {} received: forwarded to every rank, which may take {:?} to checkpoint and exit",
                    signal_name(sig),
                    self.job.args.grace
                );
                self.kill_spares();
                self.signal_all(sig);
                stopping = Some((sig, Instant::now() + self.job.args.grace));
            }
            let mut failed = vec![];
            for rank in 0..self.slots.len() {
                if let Some(f) = self.look(rank)? {
                    failed.push(f);
                }
            }
            if let Some((sig, deadline)) = stopping {
                let running = self.slots.iter().any(|s| matches!(s, Slot::Running(_)));
                if !running || Instant::now() > deadline {
                    // Every rank must have checkpointed: one that failed or was still running is no preemption.
                    let all = self.slots.iter().all(|s| matches!(s, Slot::Done | Slot::Preempted));
                    let preempted = self.preempted();
                    self.kill_all();
                    return Ok(match preempted {
                        Some(n) if all => {
                            Outcome::Preempted(format!("{}: {n} rank(s) checkpointed and exited", signal_name(sig)))
                        }
                        _ => Outcome::Stopped(sig),
                    });
                }
            } else if !failed.is_empty() {
                return Ok(Outcome::Failed(failed));
            } else if self.slots.iter().all(|s| matches!(s, Slot::Done | Slot::Preempted)) {
                self.kill_all();
                return Ok(match self.preempted() {
                    Some(n) => Outcome::Preempted(format!("{n} rank(s) checkpointed and exited {EXIT_PREEMPTED}")),
                    None => Outcome::Done,
                });
            }
            self.look_at_spares()?;
            std::thread::sleep(WATCH_EVERY);
        }
    }

    /// How many ranks exited preempted, if any did.
    fn preempted(&self) -> Option<usize> {
        let n = self.slots.iter().filter(|s| matches!(s, Slot::Preempted)).count();
        (n > 0).then_some(n)
    }

    fn signal_all(&self, sig: i32) {
        for slot in &self.slots {
            if let Slot::Running(r) = slot {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(-(r.child.id() as i32), sig) };
            }
        }
    }

    fn kill_spares(&mut self) {
        for mut spare in self.spares.drain(..) {
            kill_group(spare.child.id() as i32);
            let _ = spare.child.wait();
        }
    }

    /// Notes a spare that exited (no more are started then: a spare must
    /// wait in `tierckpt.inprocess.run`), and replaces the spares taken once
    /// every rank showed progress after the recovery.
    fn look_at_spares(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.spares.len() {
            if let Some(status) = self.spares[i].child.try_wait()? {
                kill_group(self.spares[i].child.id() as i32);
                eprintln!(
                    "tierckpt run: spare pid {} exited ({status}) before it was given a rank; starting no more \
                     spares (a spare waits in tierckpt.inprocess.run for its rank: read RANK inside the function)",
                    self.spares[i].child.id()
                );
                self.spares.remove(i);
                self.spares_broken = true;
            } else {
                i += 1;
            }
        }
        if let Some(after) = self.replenish_after {
            let all_progressed = self.slots.iter().all(|s| match s {
                Slot::Running(r) => std::fs::metadata(&r.heartbeat).and_then(|m| m.modified()).is_ok_and(|t| t > after),
                _ => true,
            });
            if all_progressed {
                self.replenish_after = None;
                self.top_up_spares(self.restart)?;
            }
        }
        Ok(())
    }

    /// Looks at one rank: returns its failure if it failed since the last look.
    fn look(&mut self, rank: usize) -> Result<Option<Failure>> {
        let hang_timeout = self.job.args.hang_timeout;
        let Slot::Running(r) = &mut self.slots[rank] else { return Ok(None) };
        let pgid = r.child.id() as i32;
        let failure = if let Some(status) = r.child.try_wait()? {
            kill_group(pgid);
            if status.success() {
                self.slots[rank] = Slot::Done;
                return Ok(None);
            }
            if status.code() == Some(EXIT_PREEMPTED.into()) {
                eprintln!("tierckpt run: {} checkpointed and exited preempted ({EXIT_PREEMPTED})", self.label(rank));
                self.slots[rank] = Slot::Preempted;
                return Ok(None);
            }
            let (kind, detail) = match status.signal() {
                Some(sig) => (FailureKind::Signal, signal_name(sig)),
                None => (FailureKind::Exit, format!("exit code {}", status.code().unwrap_or(-1))),
            };
            Failure { rank, kind, detail, code: exit_code(status) }
        } else {
            let Some(limit) = hang_timeout else { return Ok(None) };
            let quiet = last_progress(&r.heartbeat, r.started).elapsed().unwrap_or_default();
            if quiet <= limit {
                return Ok(None);
            }
            kill_group(pgid);
            let status = r.child.wait()?;
            let detail = format!("no heartbeat for {:.1} s (hang timeout {limit:?}); killed", quiet.as_secs_f64());
            Failure { rank, kind: FailureKind::Hang, detail, code: exit_code(status) }
        };
        self.slots[rank] = Slot::Dead;
        Ok(Some(failure))
    }

    /// Starts the next generation: the dead ranks again under `--restart
    /// rank` while no rank has finished, otherwise every rank anew.
    pub(crate) fn restart(&mut self, restart: u32) -> Result<()> {
        // Before any rank can learn of the new generation: progress is what comes after this.
        let restarted_at = SystemTime::now();
        self.generation += 1;
        self.restart = restart;
        let finished = self.slots.iter().any(|s| matches!(s, Slot::Done | Slot::Preempted));
        if self.job.args.restart == Restart::Rank && self.ranked() && !finished {
            let tmp = self.generation_file().with_extension("tmp");
            std::fs::write(&tmp, format!("{}\n", self.generation))
                .and_then(|()| std::fs::rename(&tmp, self.generation_file()))
                .with_context(|| format!("writing {}", self.generation_file().display()))?;
            for rank in 0..self.slots.len() {
                if matches!(self.slots[rank], Slot::Dead) {
                    match self.spares.pop() {
                        Some(spare) => self.assign(spare, rank)?,
                        None => self.spawn(rank, restart)?,
                    }
                }
            }
            if self.spares.len() < self.job.args.spares as usize {
                self.replenish_after = Some(restarted_at);
            }
            return Ok(());
        }
        if finished && self.job.args.restart == Restart::Rank {
            eprintln!("tierckpt run: a rank had already finished; restarting every rank");
        }
        self.kill_all();
        self.spawn_all(restart)
    }

    /// Makes `spare` rank `rank` of the current generation.
    fn assign(&mut self, spare: Spare, rank: usize) -> Result<()> {
        let tmp = spare.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{rank} {}\n", self.generation))
            .and_then(|()| std::fs::rename(&tmp, &spare.file))
            .with_context(|| format!("writing {}", spare.file.display()))?;
        eprintln!(
            "tierckpt run: spare pid {} takes over rank {rank} (generation {})",
            spare.child.id(),
            self.generation
        );
        let started = SystemTime::now();
        self.slots[rank] = Slot::Running(Running { child: spare.child, started, heartbeat: spare.heartbeat });
        Ok(())
    }

    /// SIGKILLs every running rank and spare, and what they started.
    pub(crate) fn kill_all(&mut self) {
        self.kill_spares();
        for slot in &mut self.slots {
            if let Slot::Running(r) = slot {
                kill_group(r.child.id() as i32);
                let _ = r.child.wait();
                *slot = Slot::Dead;
            }
        }
    }

    /// Sends `sig` to every rank's process group, waits up to the grace
    /// period for them to end, then kills what is left.
    fn stop_all(&mut self, sig: i32) -> Result<()> {
        self.kill_spares();
        self.signal_all(sig);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            let mut running = false;
            for slot in &mut self.slots {
                if let Slot::Running(r) = slot {
                    if let Some(status) = r.child.try_wait()? {
                        eprintln!("tierckpt run: pid {} stopped ({status})", r.child.id());
                        kill_group(r.child.id() as i32);
                        *slot = Slot::Dead;
                    } else {
                        running = true;
                    }
                }
            }
            if !running {
                return Ok(());
            }
            std::thread::sleep(WATCH_EVERY);
        }
        self.kill_all();
        Ok(())
    }
}

/// The newest sign of progress: the heartbeat file's modification time, or
/// the start of this run if it is older.
fn last_progress(heartbeat: &Path, started: SystemTime) -> SystemTime {
    std::fs::metadata(heartbeat).and_then(|m| m.modified()).map_or(started, |t| t.max(started))
}

/// A TCP port free now on the loopback, for `MASTER_PORT`: a new one for
/// each full start, so that a restart does not meet the old port in TIME_WAIT.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port for MASTER_PORT")?;
    Ok(l.local_addr()?.port())
}

/// How long the supervisor waits before restarting after `without_progress`
/// failures in a row: under `--restart rank` the survivors wait in the
/// rendezvous, so the first replacement starts at once.
pub(crate) fn restart_delay(restart: Restart, ranked: bool, without_progress: u32, backoff: Duration) -> Duration {
    if restart == Restart::Rank && ranked && without_progress <= 1 {
        Duration::ZERO
    } else {
        backoff
    }
}
