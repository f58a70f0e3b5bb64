//! `tierckpt soak`: the demo's job on a local cluster, under a seeded random
//! schedule of faults, for as many checkpoints as asked.
//!
//! The job is the demo's (deterministic Adam, one rank per node, sharded
//! as in ZeRO), with a checkpoint every K steps into each node's daemon,
//! one copy on a peer and a drain to a shared `file://` persistent tier.
//! After the steps the schedule names, a fault strikes (see
//! [`schedule::Kind`]): trainers, daemons or whole nodes SIGKILLed, a
//! daemon SIGSTOPped past the heartbeat timeout, every node's memory lost,
//! or a node's copy of a shard flipped, truncated or removed. The launcher
//! then restarts the job as a job launcher would, and it resumes from the
//! newest step its daemons report.
//!
//! Every resume is checked against what no fault may take away, read off
//! the nodes just before it struck ([`oracle`]): the newest step every
//! rank saved (after a trainer or daemon kill, a stop, or damage to one
//! copy), the newest step with every shard on a surviving node or in the
//! persistent tier (after a node or memory loss). A resume from an older
//! step counts its checkpoints in `lost_committed_steps`. Every rank's
//! restored state is compared with the fault-free run's at that step
//! (computed in this process): a difference is a `corrupt_restore`. At the
//! end the job's state must equal the fault-free run's bit for bit.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use indicatif::ProgressBar;
use tierckpt_harness::daemon::LocalCluster;
use tierckpt_harness::size::{parse_size, Rate};
use tierckpt_tiers::faults::FaultSpec;

use self::oracle::judge;
use self::oracle::Reference;
use self::report::Report;
use self::schedule::{schedule, Fault};
use crate::demo::cluster::{options, Dirs};
use crate::demo::job::{Job, Store};
use crate::demo::lockstep::{drive, Begin, Outcome};
use crate::demo::model::{largest_checkpoint_len, model_rows};
use crate::demo::run_log::{Incarnation, RunLog};
use crate::demo::ui::{fmt_s, list, Ui};
use crate::demo::DemoArgs;

mod oracle;
mod report;
mod schedule;
mod strike;

/// The soak job's namespace.
const NS: &str = "soak";
/// Failed starts of the job in a row before the soak gives up.
const MAX_FAILED_STARTS: usize = 5;

/// The flags of `tierckpt soak`.
#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// Checkpoints of the job, without faults (steps = checkpoints × --checkpoint-every).
    #[arg(long, default_value_t = 200)]
    pub checkpoints: u64,
    /// Nodes of the local cluster (one daemon each); the job has one rank per node.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Seed of the fault schedule and of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A fault about every this many steps (drawn from 1 to twice as many, minus one).
    #[arg(long, value_name = "STEPS", default_value_t = 10)]
    pub fault_every: u64,
    /// Checkpoint every K steps.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub checkpoint_every: u64,
    /// Milliseconds of each step standing for the accelerator's work: the
    /// pace of checkpoints against the cluster's heartbeats, replication and drain.
    #[arg(long, value_name = "MS", default_value_t = 30)]
    pub step_ms: u64,
    /// Training state across all ranks ("1MB", "64MiB").
    #[arg(long, default_value = "1MB", value_parser = parse_size)]
    pub size: u64,
    /// Complete checkpoints each memory tier and the persistent tier keep.
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    /// Drain every Nth complete checkpoint to the persistent tier.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub persist_every: u64,
    /// Faults of the persistent tier's store for the whole run: a share of
    /// requests failing, a delay, a rate limit ("fail=0.3,delay=2ms,rate=200"; "off": none).
    #[arg(long, value_name = "SPEC", default_value = "fail=0.3,delay=2ms")]
    pub store_faults: String,
    /// Directory (a tmpfs) of the memory tiers.
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    pub tmp_dir: PathBuf,
    /// Directory of the persistent tier [default: the system's temporary directory].
    #[arg(long, value_name = "DIR")]
    pub persist_dir: Option<PathBuf>,
}

impl SoakArgs {
    /// The demo's flags for the same job.
    fn job(&self) -> DemoArgs {
        DemoArgs {
            size: self.size,
            nodes: self.nodes,
            steps: self.checkpoints * self.checkpoint_every,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
            kill_at_step: None,
            node_loss_at_step: None,
            total_loss_at_step: None,
            keep_last: self.keep_last,
            persist_every: self.persist_every,
            threads: Some(1),
            tmp_dir: self.tmp_dir.clone(),
            persist_dir: self.persist_dir.clone(),
            compute_ms: self.step_ms,
            storage_bandwidth: Rate(None),
            state_hashes: true,
        }
    }
}

/// Runs the soak (`tierckpt soak`) and prints its report (JSON with
/// `json`); fails if a committed step was lost, a restore was corrupt, or
/// the final state differs from the fault-free run's.
pub fn run(a: &SoakArgs, json: bool) -> Result<()> {
    ensure!(a.checkpoints > 0, "--checkpoints must be at least 1");
    ensure!(a.checkpoint_every > 0, "--checkpoint-every must be at least 1");
    ensure!(a.fault_every > 0, "--fault-every must be at least 1");
    ensure!(a.keep_last > 0, "--keep-last must be at least 1");
    ensure!(a.persist_every > 0, "--persist-every must be at least 1");
    ensure!((2..=16).contains(&a.nodes), "--nodes must be from 2 to 16: each shard is copied to a peer");
    let wall = Instant::now();
    crate::signals::catch_int_term();
    let job = a.job();
    let rows = model_rows(a.size).context("--size")?;
    let reference = Reference::compute(a.size, a.nodes, a.seed, job.steps, a.checkpoint_every)?;
    let shard_bytes = largest_checkpoint_len(a.seed, job.steps, &rows, a.nodes)?;
    // Each node: its rank's steps kept and a peer's, one being written, and
    // room for copies fetched or re-replicated while nodes come and go.
    let capacity = 4 * (a.keep_last as u64 + 3) * (shard_bytes + (1 << 20));
    let dirs = Dirs::create(&job)?;
    let mut opts = options(&job, a.nodes, capacity, &dirs.persist_url);
    opts.log = std::env::var("SOAK_LOG").unwrap_or_else(|_| "error".into());
    if a.store_faults != "off" {
        let spec = format!("{},seed={}", a.store_faults, a.seed);
        FaultSpec::parse(&spec).map_err(|e| anyhow::anyhow!("--store-faults: {e}"))?;
        opts.settings.persistent_faults = Some(spec);
    }
    let heartbeat_timeout = humantime::parse_duration(opts.settings.heartbeat_timeout.as_deref().unwrap_or("600ms"))?;
    let cluster = LocalCluster::start(dirs.memory.path(), opts).context("starting the cluster's daemons")?;
    let store = Store::Daemons((0..a.nodes).map(|i| cluster.socket(i)).collect());
    let faults = schedule(a.seed, job.steps, a.fault_every, a.nodes);
    let ui = Ui { json };
    ui.line(format!(
        "tierckpt soak: {} checkpoints (one every {} steps) of a {}-rank job on {} local nodes, {} faults drawn from seed {}; \
         store faults: {}",
        a.checkpoints,
        a.checkpoint_every,
        a.nodes,
        a.nodes,
        faults.len(),
        a.seed,
        a.store_faults
    ));
    let mut soak = Soak {
        job,
        cluster,
        store,
        persist_dir: dirs.persist_dir.clone(),
        reference,
        log: RunLog::new("node memory"),
        quiet: Ui { json: true },
        pb: ProgressBar::hidden(),
        ui,
        stop_for: heartbeat_timeout * 5 / 2,
        report: Report::new(a),
        newest_saved: None,
        cont: None,
    };
    let result = soak.run(&faults);
    if let Some(t) = soak.cont.take() {
        let _ = t.join();
    }
    let Soak { cluster, mut report, reference, log, .. } = soak;
    drop(cluster);
    dirs.memory.close().context("removing the soak's memory tiers")?;
    dirs.disk.close().context("removing the soak's persistent tier")?;
    let final_hashes = result?;
    report.finish(&final_hashes, &reference.last, &log, wall.elapsed());
    report.print(json);
    report.check()
}

/// A fault that struck, waiting for the job to come back.
struct Struck {
    fault: Fault,
    at: Instant,
    /// The job must resume from this step or a newer one.
    must_keep: Option<u64>,
    /// What struck, in words.
    what: String,
}

/// The launcher while the soak runs.
struct Soak {
    job: DemoArgs,
    cluster: LocalCluster,
    store: Store,
    persist_dir: PathBuf,
    reference: Reference,
    log: RunLog,
    /// The job's own progress lines stay quiet; the soak prints one line a fault.
    quiet: Ui,
    pb: ProgressBar,
    ui: Ui,
    /// How long a SIGSTOPped daemon stays stopped.
    stop_for: Duration,
    report: Report,
    /// The newest checkpoint every rank saved since the job last resumed.
    newest_saved: Option<u64>,
    /// The thread that SIGCONTs a stopped daemon.
    cont: Option<JoinHandle<()>>,
}

impl Soak {
    /// Runs the job through `faults`; returns its final state hashes.
    fn run(&mut self, faults: &[Fault]) -> Result<Vec<String>> {
        let mut next = 0;
        let mut job: Option<Job> = None;
        let mut pending: Option<Struck> = None;
        let mut failed_in_a_row = 0;
        loop {
            crate::demo::check_interrupt()?;
            let stop_at = faults.get(next).map(|f| f.step);
            let checkpoints_before = self.log.checkpoints.len();
            let driven = match job.as_mut() {
                Some(j) => {
                    // A job stopped at a fault it survived goes on.
                    let begin = Begin::Stopped { checkpoint: false };
                    drive(j, self.job.steps, &self.quiet, &self.pb, &mut self.log, stop_at, begin)
                }
                None => {
                    self.report.job_starts += 1;
                    let mut j = Job::spawn(&self.store, NS, &self.job, 1)?;
                    let d = drive(&mut j, self.job.steps, &self.quiet, &self.pb, &mut self.log, stop_at, Begin::Start);
                    if let Ok((inc, _)) = &d {
                        self.check_resume(inc, pending.take())?;
                    }
                    job = Some(j);
                    d
                }
            };
            let out = match driven {
                Ok((_, out)) => {
                    failed_in_a_row = 0;
                    out
                }
                Err(e) => {
                    // A rank exited: the launcher stops the rest and starts the job again.
                    crate::demo::check_interrupt()?;
                    failed_in_a_row += 1;
                    self.report.failed_start(format!("{e:#}"));
                    if let Some(mut j) = job.take() {
                        j.kill_all()?;
                    }
                    self.join_cont();
                    self.check_daemons()?;
                    if failed_in_a_row >= MAX_FAILED_STARTS {
                        bail!("the job failed {MAX_FAILED_STARTS} times in a row; the last time: {e:#}");
                    }
                    continue;
                }
            };
            self.newest_saved =
                self.log.checkpoints[checkpoints_before..].iter().map(|c| c.step).max().or(self.newest_saved);
            match out {
                Outcome::Done { hashes } => {
                    if let Some(mut j) = job.take() {
                        j.kill_all()?;
                    }
                    return Ok(hashes);
                }
                Outcome::Stopped => {
                    let fault = faults[next].clone();
                    next += 1;
                    self.join_cont();
                    self.check_daemons()?;
                    let struck = self.strike(&fault, &mut job)?;
                    self.ui.line(format!("  after step {:>5}: {}", fault.step, struck.what));
                    if job.is_none() {
                        pending = Some(struck);
                    }
                }
            }
        }
    }

    /// Checks a start of the job against the fault before it: the step it
    /// resumed from, and every rank's restored state.
    fn check_resume(&mut self, inc: &Incarnation, struck: Option<Struck>) -> Result<()> {
        self.newest_saved = inc.resume;
        for r in &inc.ranks {
            *self.report.restores.entry(r.tier.clone()).or_default() += 1;
        }
        let must_keep = struck.as_ref().and_then(|s| s.must_keep.map(|k| (k, s.what.as_str())));
        for p in judge(&self.reference, self.job.checkpoint_every, inc, must_keep) {
            self.report.problem(p);
        }
        let Some(struck) = struck else { return Ok(()) };
        let recovery_s = inc.resumed_at.map(|t| (t - struck.at).as_secs_f64());
        let tiers: Vec<String> = ["memory", "peer", "persistent"]
            .iter()
            .filter_map(|t| {
                let ranks = inc.ranks_from(t);
                (!ranks.is_empty()).then(|| format!("{t} {}", list(&ranks)))
            })
            .collect();
        self.ui.line(format!(
            "                    resumed from step {}{}{}",
            inc.resume.map_or("none (no checkpoint)".to_string(), |s| s.to_string()),
            if tiers.is_empty() { String::new() } else { format!(", ranks from {}", tiers.join(", ")) },
            recovery_s.map_or(String::new(), |s| format!(", {} after the fault", fmt_s(s)))
        ));
        self.report.recovered(&struck.fault, recovery_s);
        Ok(())
    }

    /// Waits for a stopped daemon to be continued.
    fn join_cont(&mut self) {
        if let Some(t) = self.cont.take() {
            let _ = t.join();
        }
    }

    /// Fails if a daemon died without being killed.
    fn check_daemons(&mut self) -> Result<()> {
        for (i, n) in self.cluster.nodes.iter_mut().enumerate() {
            if let Some(n) = n {
                if let Some(status) = n.ended() {
                    bail!("node n{i}'s daemon (pid {}) died without being killed ({status})", n.pid());
                }
            }
        }
        Ok(())
    }
}
