//! The launcher's processes: one trainer child per rank, started from this
//! same executable, its stdout read as events and its stdin written with
//! orders; and the job, the trainers of one start of it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};

use super::{check_interrupt, DemoArgs};

/// Lines of a trainer's stderr kept for error messages.
const STDERR_TAIL: usize = 20;

/// This very binary, even if a rebuild replaced the file meanwhile: the
/// reference and the interrupted runs must run the same code.
fn trainer_exe() -> Result<PathBuf> {
    let self_exe = Path::new("/proc/self/exe");
    if self_exe.exists() {
        Ok(self_exe.to_path_buf())
    } else {
        std::env::current_exe().context("locating the tierckpt executable")
    }
}

/// Where a job's ranks checkpoint.
#[derive(Clone)]
pub(crate) enum Store {
    /// Into the memory tier of each rank's node daemon (one socket per rank).
    Daemons(Vec<PathBuf>),
    /// Synchronously into files in one directory (the baseline), for `world` ranks.
    Files(PathBuf, usize),
}

impl Store {
    fn world(&self) -> usize {
        match self {
            Store::Daemons(s) => s.len(),
            Store::Files(_, w) => *w,
        }
    }

    fn trainer_args(&self, rank: usize) -> Vec<OsString> {
        match self {
            Store::Daemons(s) => vec!["--daemon-socket".into(), s[rank].clone().into()],
            Store::Files(dir, _) => vec!["--checkpoint-dir".into(), dir.clone().into()],
        }
    }
}

/// A trainer's line: its rank, its process id (a rank's trainer started again
/// has another), what it said.
type Event = (usize, u32, Value);

/// One rank's trainer process: its stdout events go to the job's channel,
/// the tail of its stderr is kept for error messages. Killed on drop.
struct Trainer {
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Trainer {
    fn spawn(
        rank: usize,
        store: &Store,
        namespace: &str,
        a: &DemoArgs,
        threads: usize,
        events: Sender<Event>,
    ) -> Result<Self> {
        let exe = trainer_exe()?;
        let mut cmd = Command::new(&exe);
        cmd.arg0("tierckpt")
            .arg("demo-trainer")
            .args(store.trainer_args(rank))
            .args(["--namespace", namespace])
            .args(["--keep-last", &a.keep_last.to_string()])
            .args(["--compute-ms", &a.compute_ms.to_string()])
            .args(a.storage_bandwidth.0.iter().flat_map(|b| ["--storage-bandwidth".to_string(), b.to_string()]))
            .args(["--size", &a.size.to_string()])
            .args(["--steps", &a.steps.to_string()])
            .args(["--checkpoint-every", &a.checkpoint_every.to_string()])
            .args(["--seed", &a.seed.to_string()])
            .args(["--rank", &rank.to_string()])
            .args(["--world-size", &store.world().to_string()])
            .args(["--threads", &threads.to_string()])
            .args(a.state_hashes.then_some("--state-hashes"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The trainer dies with the demo.
        tierckpt_harness::daemon::die_with_parent(&mut cmd);
        let mut child =
            cmd.spawn().with_context(|| format!("starting {} demo-trainer --rank {rank}", exe.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let pid = child.id();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "event": "text", "text": line }));
                if events.send((rank, pid, v)).is_err() {
                    return;
                }
            }
            let _ = events.send((rank, pid, json!({ "event": "exit" })));
        });
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let t = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut q = t.lock().unwrap_or_else(|p| p.into_inner());
                if q.len() == STDERR_TAIL {
                    q.pop_front();
                }
                q.push_back(line);
            }
        });
        Ok(Self { stdin: child.stdin.take(), child, stderr: tail })
    }

    fn stderr_tail(&self) -> String {
        // Give the reader a moment to collect what a dying trainer wrote.
        std::thread::sleep(Duration::from_millis(50));
        let q = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// SIGKILL, then reap (nothing if it already exited).
    fn kill(&mut self) -> Result<()> {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.child.kill().context("killing a trainer")?;
        }
        self.stdin = None;
        self.child.wait().context("waiting for a trainer")?;
        Ok(())
    }
}

impl Drop for Trainer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The trainers of one incarnation of the job, rank r on node r.
pub(crate) struct Job {
    trainers: Vec<Trainer>,
    events: Receiver<Event>,
    /// What a trainer is started with, to start one rank again.
    store: Store,
    namespace: String,
    args: DemoArgs,
    threads: usize,
    sender: Sender<Event>,
}

impl Job {
    /// Starts one trainer per rank of `store`, checkpointing into `namespace`.
    pub(crate) fn spawn(store: &Store, namespace: &str, a: &DemoArgs, threads: usize) -> Result<Self> {
        let (tx, events) = mpsc::channel();
        let trainers = (0..store.world())
            .map(|rank| Trainer::spawn(rank, store, namespace, a, threads, tx.clone()))
            .collect::<Result<_>>()?;
        Ok(Self {
            trainers,
            events,
            store: store.clone(),
            namespace: namespace.to_string(),
            args: a.clone(),
            threads,
            sender: tx,
        })
    }

    /// Starts rank `rank`'s trainer again, after it died or was killed (the
    /// other ranks keep running).
    pub(crate) fn respawn(&mut self, rank: usize) -> Result<()> {
        self.trainers[rank].kill()?;
        self.trainers[rank] =
            Trainer::spawn(rank, &self.store, &self.namespace, &self.args, self.threads, self.sender.clone())?;
        Ok(())
    }

    /// Sends one line to rank `rank`.
    pub(crate) fn tell(&mut self, rank: usize, line: &str) -> Result<()> {
        let stdin = self.trainers[rank].stdin.as_mut().ok_or_else(|| anyhow!("rank {rank}'s stdin is closed"))?;
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).with_context(|| format!("telling rank {rank} {line:?}"))
    }

    /// Ranks of the job.
    pub(crate) fn world(&self) -> usize {
        self.trainers.len()
    }

    /// The process id of rank `rank`'s trainer.
    pub(crate) fn pid(&self, rank: usize) -> u32 {
        self.trainers[rank].child.id()
    }

    /// The next event of any rank's current trainer (what a trainer that
    /// was replaced said last, its exit among it, is dropped).
    pub(crate) fn next_event(&self) -> Result<(usize, Value)> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            check_interrupt()?;
            match self.events.recv_timeout(Duration::from_millis(100)) {
                Ok((rank, pid, v)) if pid == self.trainers[rank].child.id() => return Ok((rank, v)),
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => bail!("every trainer closed its stdout"),
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!("the trainers said nothing for 10 minutes")
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Sends one line to every rank.
    pub(crate) fn tell_all(&mut self, line: &str) -> Result<()> {
        (0..self.trainers.len()).try_for_each(|rank| self.tell(rank, line))
    }

    /// SIGKILLs rank `rank`'s trainer.
    pub(crate) fn kill(&mut self, rank: usize) -> Result<()> {
        self.trainers[rank].kill()
    }

    /// What a job launcher does when a rank fails: SIGKILL the rest.
    pub(crate) fn kill_all(&mut self) -> Result<()> {
        self.trainers.iter_mut().try_for_each(Trainer::kill)
    }

    /// Once every rank said it is done: closes their stdin and checks that
    /// each exited cleanly.
    pub(crate) fn wait_done(&mut self) -> Result<()> {
        for (r, t) in self.trainers.iter_mut().enumerate() {
            t.stdin = None;
            let status = t.child.wait().context("waiting for a trainer")?;
            ensure!(status.success(), "rank {r}'s trainer exited ({status}) after it was done:\n{}", t.stderr_tail());
        }
        Ok(())
    }

    /// The error of rank `rank`'s trainer having exited before it was done,
    /// with the tail of its stderr.
    pub(crate) fn early_exit(&mut self, rank: usize) -> anyhow::Error {
        let t = &mut self.trainers[rank];
        match t.child.wait().context("waiting for a trainer") {
            Ok(status) => anyhow!(
                "rank {rank}'s trainer (pid {}) exited ({status}) before it was done:\n{}",
                t.child.id(),
                t.stderr_tail()
            ),
            Err(e) => e,
        }
    }
}
