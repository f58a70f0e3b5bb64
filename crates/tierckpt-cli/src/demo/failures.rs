//! The run with tierckpt through three failures: a trainer crash, the loss
//! of a node (daemon and trainer), and the loss of every node's memory. The
//! launcher strikes each after its step, restarts the job, and records how
//! it came back.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use indicatif::ProgressBar;
use serde_json::{json, Value};
use tierckpt_harness::daemon::LocalCluster;

use super::cluster::{committed_steps, copies, wait_persisted, wait_replicated};
use super::job::{Job, Store};
use super::lockstep::{drive, Begin, Outcome};
use super::model::combined_hash;
use super::plan::Plan;
use super::run_log::{Incarnation, RankRestore, RunLog};
use super::traffic::{Meter, Traffic};
use super::ui::{fmt_s, Ui};
use super::{DemoArgs, REPLICATION_FACTOR};

/// How the launcher brings the job back from a trainer crash or a node loss.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Recovery {
    /// The surviving ranks keep running and roll back in their own
    /// processes; only the lost rank's trainer starts anew.
    InProcess,
    /// Every rank's trainer is stopped and started again.
    FullRestart,
}

impl Recovery {
    /// The namespace of the run, and its name in the report.
    pub(super) fn namespace(self) -> &'static str {
        match self {
            Recovery::InProcess => "demo",
            Recovery::FullRestart => "demo-restart",
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Recovery::InProcess => "in_process",
            Recovery::FullRestart => "full_restart",
        }
    }
}

/// A failure the job came back from.
pub(super) struct Recovered {
    /// Its record in the JSON report.
    pub(super) record: Value,
    /// How the job started again.
    pub(super) inc: Incarnation,
    /// What struck, in words.
    pub(super) what: String,
    /// What the demo waited for before it struck, in words.
    pub(super) before: Option<String>,
}

/// What the run with tierckpt measured.
pub(super) struct TieredRun {
    pub(super) log: RunLog,
    /// The ranks' final state hashes, and the job's.
    pub(super) hashes: Vec<String>,
    pub(super) hash: String,
    /// [trainer crash, node loss, total memory loss].
    pub(super) recoveries: [Recovered; 3],
    /// How it came back from the crash and the node loss.
    pub(super) recovery: Recovery,
    pub(super) wall_s: f64,
    /// From the start of the run to the first step ordered (processes started).
    pub(super) start_s: Option<f64>,
    /// The demo's own waits before failures (for a replica, for a commit):
    /// not the job's time.
    pub(super) demo_waits_s: f64,
    /// What the daemons moved in the background.
    pub(super) traffic: Traffic,
    /// The steps committed in the persistent tier at the end.
    pub(super) persisted_steps: Vec<u64>,
    /// The wait for the last checkpoint's commit, when every one drains.
    pub(super) final_persist_wait_s: Option<f64>,
}

/// Runs the job on `cluster` through the three failures of `plan`.
pub(super) fn run_with_failures(
    a: &DemoArgs,
    plan: &Plan,
    cluster: &mut LocalCluster,
    store: &Store,
    persist_dir: &Path,
    ui: &Ui,
    recovery: Recovery,
) -> Result<TieredRun> {
    let ns = recovery.namespace();
    let meter = Meter::start(cluster, ns)?;
    ui.line(format!(
        "[{}/5] training, with a trainer crash after step {}, the loss of node {} after step {} \
         and the loss of every node's memory after step {}; {}",
        if recovery == Recovery::InProcess { 2 } else { 3 },
        plan.crash_step,
        LocalCluster::node_id(plan.lost),
        plan.loss_step,
        plan.total_step,
        match recovery {
            Recovery::InProcess => "after the crash and the node loss the other ranks roll back in-process",
            Recovery::FullRestart => "every failure restarts every rank (for comparison)",
        }
    ));
    let log = RunLog::new("node memory");
    let t_main = Instant::now();
    let pb = ui.bar(a.steps, "training");
    let mut run = Strikes { a, plan, cluster, store, persist_dir, ui, log, meter, pb, demo_waits_s: 0.0, recovery };

    let mut job = Job::spawn(store, ns, a, plan.threads)?;
    let (_, out) = drive(&mut job, a.steps, ui, &run.pb, &mut run.log, Some(plan.crash_step), Begin::Start)?;
    ensure!(matches!(out, Outcome::Stopped), "the job finished before the crash");
    let (job, crash) = run.crash_trainer(job)?;
    let (job, node_loss) = run.lose_node(job)?;
    let (hashes, total_loss) = run.lose_all_memory(job)?;

    let hash = combined_hash(&hashes);
    let wall_s = t_main.elapsed().as_secs_f64();
    run.pb.finish_and_clear();
    ui.line(format!("    done in {wall_s:.1} s, final state xxh3-128 {hash}\n"));
    // The last checkpoint drains too; wait for it (bounded) so that the
    // counts below include it.
    let final_persist_wait_s = match run.log.last_checkpoint() {
        Some(s) if a.persist_every == 1 => {
            Some(wait_persisted(run.cluster, persist_dir, ns, s, 1, Duration::from_secs(30))?.0)
        }
        _ => None,
    };
    run.meter.read_all(run.cluster)?;
    let start_s = run.log.trained_from.map(|f| (f - t_main).as_secs_f64());
    Ok(TieredRun {
        log: run.log,
        hashes,
        hash,
        recoveries: [crash, node_loss, total_loss],
        recovery,
        wall_s,
        start_s,
        demo_waits_s: run.demo_waits_s,
        traffic: run.meter.total,
        persisted_steps: committed_steps(persist_dir, ns),
        final_persist_wait_s,
    })
}

/// The launcher while it takes the job through its failures.
struct Strikes<'a> {
    a: &'a DemoArgs,
    plan: &'a Plan,
    cluster: &'a mut LocalCluster,
    store: &'a Store,
    persist_dir: &'a Path,
    ui: &'a Ui,
    log: RunLog,
    meter: Meter,
    pb: ProgressBar,
    demo_waits_s: f64,
    recovery: Recovery,
}

impl Strikes<'_> {
    /// Starts the job again and drives it until every rank finished
    /// `stop_at`, the step of the `next` failure.
    fn restart(&mut self, stop_at: u64, next: &str) -> Result<(Job, Incarnation)> {
        let mut job = Job::spawn(self.store, self.recovery.namespace(), self.a, self.plan.threads)?;
        let (inc, out) = drive(&mut job, self.a.steps, self.ui, &self.pb, &mut self.log, Some(stop_at), Begin::Start)?;
        ensure!(matches!(out, Outcome::Stopped), "the job finished before {next}");
        Ok((job, inc))
    }

    /// Brings the job back after rank(s) `lost` died: in-process (their
    /// trainers start anew, the others roll back to the newest checkpoint
    /// in their own processes) or by a full restart; then drives it to
    /// `stop_at`. Returns the job, how it came back, and the words for it.
    fn bring_back(&mut self, mut job: Job, lost: usize, stop_at: u64, next: &str) -> Result<(Job, Incarnation)> {
        match (self.recovery, self.log.last_checkpoint()) {
            (Recovery::InProcess, Some(step)) => {
                job.respawn(lost)?;
                let begin = Begin::RolledBack { step, restarted: &[lost] };
                let (inc, out) = drive(&mut job, self.a.steps, self.ui, &self.pb, &mut self.log, Some(stop_at), begin)?;
                ensure!(matches!(out, Outcome::Stopped), "the job finished before {next}");
                Ok((job, inc))
            }
            _ => {
                job.kill_all()?;
                drop(job);
                self.restart(stop_at, next)
            }
        }
    }

    /// How [`Self::bring_back`] will bring the job back, in words.
    fn how(&self) -> &'static str {
        match (self.recovery, self.log.last_checkpoint()) {
            (Recovery::InProcess, Some(_)) => {
                "the other ranks roll back in their processes; only its trainer starts again"
            }
            _ => "the launcher stops the other ranks and restarts the job",
        }
    }

    /// Failure 1: a trainer crash.
    fn crash_trainer(&mut self, mut job: Job) -> Result<(Job, Recovered)> {
        let (rank, step, world) = (self.plan.crash_rank, self.plan.crash_step, self.plan.world);
        let last_ckpt = self.log.last_checkpoint();
        let pid = job.pid(rank);
        let killed_at = Instant::now();
        job.kill(rank)?;
        self.log.killed_at = Some(killed_at);
        let how = self.how();
        self.ui.say(
            &self.pb,
            format!(
                "    SIGKILL     rank {rank}'s trainer (pid {pid}) after step {step} (last checkpoint: step {}); {how}",
                last_ckpt.map_or("none".into(), |s| s.to_string())
            ),
        );
        let (job, inc) = self.bring_back(job, rank, self.plan.loss_step, "the node loss")?;
        let record = failure_json(
            "trainer_crash",
            step,
            killed_at,
            &inc,
            json!({ "rank_killed": rank, "ranks_stopped": (0..world).filter(|&r| r != rank).collect::<Vec<_>>() }),
        );
        let what = match inc.ranks.iter().any(|r| r.in_process) {
            true => format!(
                "rank {rank}'s trainer SIGKILLed after step {step}; its trainer restarted, the others rolled back"
            ),
            false => format!("rank {rank}'s trainer SIGKILLed after step {step}; job restarted"),
        };
        Ok((job, Recovered { record, inc, what, before: None }))
    }

    /// Failure 2: node `lost` goes away with its trainer; an empty node takes its place.
    fn lose_node(&mut self, mut job: Job) -> Result<(Job, Recovered)> {
        let (lost, step, world) = (self.plan.lost, self.plan.loss_step, self.plan.world);
        let node = LocalCluster::node_id(lost);
        let last_ckpt = self.log.last_checkpoint();
        // Replication runs in the background and takes well under a step; the
        // demo makes sure of it, so that the resume step does not depend on timing.
        let watcher = (lost + 1) % world;
        let want = REPLICATION_FACTOR + 1;
        let replication_wait_s = match last_ckpt {
            Some(s) => wait_replicated(
                self.cluster,
                watcher,
                self.recovery.namespace(),
                s,
                world,
                want,
                Duration::from_secs(30),
            )?,
            None => None,
        };
        let copies_at_kill = match last_ckpt {
            Some(s) => copies(self.cluster, watcher, self.recovery.namespace(), s, world)?,
            None => Vec::new(),
        };
        let daemon_pid = self.cluster.node(lost).pid();
        let trainer_pid = job.pid(lost);
        self.meter.read(self.cluster, lost)?;
        let killed_at = Instant::now();
        self.cluster.kill(lost)?;
        job.kill(lost)?;
        self.log.killed_at = Some(killed_at);
        let t = Instant::now();
        self.cluster.replace_empty(lost).context("starting an empty replacement node")?;
        self.meter.replaced(lost);
        let replace_s = t.elapsed().as_secs_f64();
        self.ui.say(
            &self.pb,
            format!(
                "    node loss   {node}: tierckptd (pid {daemon_pid}) and rank {lost}'s trainer (pid {trainer_pid}) SIGKILLed after step {step} \
                 (last checkpoint: step {}, {}); an empty tierckptd (pid {}) took its place in {}; {}",
                last_ckpt.map_or("none".into(), |s| s.to_string()),
                match replication_wait_s {
                    Some(w) => format!("every shard on {want} nodes, waited {} for it", fmt_s(w)),
                    None => format!("copies per shard {copies_at_kill:?}"),
                },
                self.cluster.node(lost).pid(),
                fmt_s(replace_s),
                self.how()
            ),
        );
        let (job, inc) = self.bring_back(job, lost, self.plan.total_step, "the total memory loss")?;
        let record = failure_json(
            "node_loss",
            step,
            killed_at,
            &inc,
            json!({
                "node_killed": node,
                "rank_killed": lost,
                "ranks_stopped": (0..world).filter(|&r| r != lost).collect::<Vec<_>>(),
                "replacement": "empty",
                "replace_s": replace_s,
                "replicated_before_kill": replication_wait_s.is_some(),
                "replication_wait_s": replication_wait_s,
                "copies_at_kill": copies_at_kill,
            }),
        );
        self.demo_waits_s += replication_wait_s.unwrap_or(0.0);
        let what =
            format!("node {node} lost after step {step} (daemon and trainer SIGKILLed), replaced by an empty node");
        let before =
            replication_wait_s.map(|w| format!("waited {} for every shard to have a copy on a peer", fmt_s(w)));
        Ok((job, Recovered { record, inc, what, before }))
    }

    /// Failure 3: every node loses its memory (and every trainer dies); empty
    /// nodes take their places and the job restores from the persistent tier
    /// and runs to the end. Returns the ranks' final state hashes.
    fn lose_all_memory(&mut self, mut job: Job) -> Result<(Vec<String>, Recovered)> {
        let (step, world) = (self.plan.total_step, self.plan.world);
        let last_ckpt = self.log.last_checkpoint();
        // The drain runs in the background, a second or so behind the trainers;
        // the demo waits for the newest checkpoint's commit so that the resume
        // step does not depend on timing.
        let (persist_wait_s, persisted) = match last_ckpt {
            Some(s) => wait_persisted(
                self.cluster,
                self.persist_dir,
                self.recovery.namespace(),
                s,
                self.a.persist_every,
                Duration::from_secs(60),
            )?,
            None => (0.0, false),
        };
        let committed_at_kill = committed_steps(self.persist_dir, self.recovery.namespace()).last().copied();
        let daemon_pids: Vec<u32> = (0..world).map(|i| self.cluster.node(i).pid()).collect();
        self.meter.read_all(self.cluster)?;
        let killed_at = Instant::now();
        for i in 0..world {
            self.cluster.kill(i)?;
        }
        job.kill_all()?;
        drop(job);
        self.log.killed_at = Some(killed_at);
        let t = Instant::now();
        self.cluster.replace_all_empty()?;
        for i in 0..world {
            self.meter.replaced(i);
        }
        let replace_s = t.elapsed().as_secs_f64();
        let newest = committed_at_kill.map_or("none".to_string(), |s| s.to_string());
        self.ui.say(
            &self.pb,
            format!(
                "    total loss  every node: {world} tierckptd (pids {}) and {world} trainers SIGKILLed after step {step}, \
                 every memory tier wiped (last checkpoint: step {}, {}); {world} empty tierckptd took their places in {}",
                daemon_pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
                last_ckpt.map_or("none".into(), |s| s.to_string()),
                match (persisted, committed_at_kill) {
                    (true, _) => format!("committed in the persistent tier, waited {} for it", fmt_s(persist_wait_s)),
                    (false, Some(c)) => format!("not persisted after {}; newest committed: step {c}", fmt_s(persist_wait_s)),
                    (false, None) => format!("nothing committed in the persistent tier after {}", fmt_s(persist_wait_s)),
                },
                fmt_s(replace_s)
            ),
        );
        let mut job = Job::spawn(self.store, self.recovery.namespace(), self.a, self.plan.threads)?;
        let (inc, out) = drive(&mut job, self.a.steps, self.ui, &self.pb, &mut self.log, None, Begin::Start)?;
        let hashes = out.into_hashes();
        drop(job);
        let record = failure_json(
            "total_memory_loss",
            step,
            killed_at,
            &inc,
            json!({
                "nodes_killed": (0..world).map(LocalCluster::node_id).collect::<Vec<_>>(),
                "ranks_killed": (0..world).collect::<Vec<_>>(),
                "replacement": "empty",
                "replace_s": replace_s,
                "last_checkpoint_at_kill": last_ckpt,
                "persisted_before_kill": persisted,
                "persist_wait_s": persist_wait_s,
                "persistent_last_committed_at_kill": committed_at_kill,
            }),
        );
        self.demo_waits_s += persist_wait_s;
        let what = format!(
            "every node's memory lost after step {step} ({world} daemons and {world} trainers SIGKILLed, memory wiped), \
             replaced by empty nodes"
        );
        let before = Some(match (persisted, last_ckpt) {
            (true, Some(s)) => {
                format!("waited {} for step {s} to be committed in the persistent tier", fmt_s(persist_wait_s))
            }
            _ => format!("waited {} for the drain; newest committed step {newest}", fmt_s(persist_wait_s)),
        });
        Ok((hashes, Recovered { record, inc, what, before }))
    }
}

/// A failure's record in the report: what struck after which step, where
/// the job resumed from and how fast, and `extra` fields of its kind.
pub(super) fn failure_json(kind: &str, step_killed: u64, killed_at: Instant, inc: &Incarnation, extra: Value) -> Value {
    let step = inc.resume.unwrap_or(0);
    let mut rolled_back: Vec<usize> = inc.ranks.iter().filter(|r| r.in_process).map(|r| r.rank).collect();
    rolled_back.sort_unstable();
    let ranks: Vec<Value> = {
        let mut r: Vec<&RankRestore> = inc.ranks.iter().collect();
        r.sort_by_key(|r| r.rank);
        r.iter()
            .map(|r| {
                json!({
                    "rank": r.rank,
                    "node": LocalCluster::node_id(r.rank),
                    "tier": r.tier,
                    "expected_tier": r.expected_tier,
                    "restore_s": r.restore_s,
                    "bytes": r.bytes,
                    "peers": r.peers,
                    "attempts": r.attempts,
                    "in_process": r.in_process,
                })
            })
            .collect()
    };
    let mut v = json!({
        "kind": kind,
        "signal": "SIGKILL",
        "step_killed": step_killed,
        "step_resumed": step,
        "steps_recomputed": step_killed.saturating_sub(step),
        "recovered_from": inc.recovered_from(),
        "restored_from": {
            "memory": inc.ranks_from("memory"),
            "peer": inc.ranks_from("peer"),
            "persistent": inc.ranks_from("persistent"),
        },
        "restore_s": inc.restore_s(None),
        "restore_s_memory": inc.restore_s(Some("memory")),
        "restore_s_peer": inc.restore_s(Some("peer")),
        "restore_s_persistent": inc.restore_s(Some("persistent")),
        "init_s": inc.init_s,
        "recovery_s": inc.resumed_at.map(|t| (t - killed_at).as_secs_f64()),
        "first_step_s": inc.first_step_at.map(|t| (t - killed_at).as_secs_f64()),
        "recovery": if inc.ranks.iter().any(|r| r.in_process) { "in_process" } else { "full_restart" },
        "ranks_rolled_back_in_process": rolled_back,
        "latest_seen": inc.latest_seen,
        "ranks": ranks,
    });
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}
