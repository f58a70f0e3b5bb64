//! The launcher's side of the protocol with the trainers: one start of the
//! job, driven in lockstep as data-parallel ranks run (every rank finishes a
//! step before any starts the next), from the agreement on the step to
//! resume from until the ranks are done or stop where the launcher asked.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{anyhow, ensure, Result};
use indicatif::ProgressBar;
use serde_json::Value;
use tierckpt_harness::stats::gibps;

use super::check_interrupt;
use super::job::Job;
use super::run_log::{Checkpoint, Incarnation, RankRestore, RunLog};
use super::ui::{fmt_s, list, Ui};
use crate::output::human_bytes;

/// Where a rank's shard can come from, fastest first.
const TIERS: [&str; 3] = ["memory", "peer", "persistent"];

/// How a start of the job ended.
pub(crate) enum Outcome {
    /// Every rank finished the last step, with these state hashes in rank order.
    Done { hashes: Vec<String> },
    /// Every rank finished the step asked for and waits for the next `go`.
    Stopped,
}

impl Outcome {
    /// The final state hashes of a run asked to go to the end.
    pub(crate) fn into_hashes(self) -> Vec<String> {
        match self {
            Outcome::Done { hashes } => hashes,
            Outcome::Stopped => unreachable!("no stop was asked for"),
        }
    }
}

/// A step's reports, as they come in from the ranks.
#[derive(Default)]
struct StepIn {
    ranks: usize,
    loss_sum: f64,
    params: f64,
    checkpoint: Vec<(f64, u64)>,
}

fn num(v: &Value, k: &str) -> Result<f64> {
    v[k].as_f64().ok_or_else(|| anyhow!("a trainer sent {v} without a number {k:?}"))
}

/// How a drive of the job begins.
pub(crate) enum Begin<'r> {
    /// New processes: they agree on the step to resume from.
    Start,
    /// After in-process recovery: the ranks in `restarted` are new
    /// processes, told to resume from `step`; every other rank is still
    /// running, waiting for orders, and rolls back to `step` in its own
    /// process.
    RolledBack { step: u64, restarted: &'r [usize] },
    /// A drive that stopped (every rank waits for its next "go") goes on:
    /// the next step, checkpointed by every rank too when `checkpoint` (a
    /// preemption's early checkpoint).
    Stopped { checkpoint: bool },
}

/// Drives one start of the job, begun as `begin` says, in lockstep until
/// the ranks are done, or until every rank finished step `stop_at` (they
/// then wait for orders that never come).
pub(crate) fn drive(
    job: &mut Job,
    steps: u64,
    ui: &Ui,
    pb: &ProgressBar,
    log: &mut RunLog,
    stop_at: Option<u64>,
    begin: Begin,
) -> Result<(Incarnation, Outcome)> {
    let rolled_back = match begin {
        Begin::Start => None,
        Begin::RolledBack { step, restarted } => {
            for rank in (0..job.world()).filter(|r| !restarted.contains(r)) {
                job.tell(rank, &format!("rollback {step}"))?;
            }
            Some((step, restarted.to_vec()))
        }
        Begin::Stopped { checkpoint } => {
            log.go_at = Some(Instant::now());
            job.tell_all(if checkpoint { "go save" } else { "go" })?;
            None
        }
    };
    run(job, steps, ui, pb, log, stop_at, rolled_back)
}

fn run(
    job: &mut Job,
    steps: u64,
    ui: &Ui,
    pb: &ProgressBar,
    log: &mut RunLog,
    stop_at: Option<u64>,
    rolled_back: Option<(u64, Vec<usize>)>,
) -> Result<(Incarnation, Outcome)> {
    let world = job.world();
    let mut d = Lockstep {
        job,
        steps,
        ui,
        pb,
        log,
        stop_at,
        world,
        inc: Incarnation {
            latest_seen: vec![None; world],
            resume: rolled_back.as_ref().map(|r| r.0),
            ..Default::default()
        },
        restarted: rolled_back.map(|r| r.1),
        latest_n: 0,
        ready_n: 0,
        by_step: BTreeMap::new(),
        hashes: vec![None; world],
    };
    loop {
        let (rank, ev) = d.job.next_event()?;
        if let Some(out) = d.on_event(rank, &ev)? {
            return Ok((d.inc, out));
        }
    }
}

/// The launcher's state while it drives one start of the job.
struct Lockstep<'a> {
    job: &'a mut Job,
    steps: u64,
    ui: &'a Ui,
    pb: &'a ProgressBar,
    log: &'a mut RunLog,
    stop_at: Option<u64>,
    world: usize,
    inc: Incarnation,
    /// After in-process recovery: the ranks started anew (the others roll back).
    restarted: Option<Vec<usize>>,
    latest_n: usize,
    ready_n: usize,
    by_step: BTreeMap<u64, StepIn>,
    hashes: Vec<Option<String>>,
}

impl Lockstep<'_> {
    /// Takes in one event of rank `rank`; returns how the start ended, once it did.
    fn on_event(&mut self, rank: usize, ev: &Value) -> Result<Option<Outcome>> {
        match ev["event"].as_str().unwrap_or("") {
            "started" => {
                let i = num(ev, "init_s")?;
                self.inc.init_s = Some(self.inc.init_s.map_or(i, |m| m.max(i)));
            }
            "latest" => self.on_latest(rank, ev)?,
            "resumed" => self.on_resumed(rank, ev)?,
            "ready" => self.on_ready()?,
            "checkpoint" => {
                let step = num(ev, "step")? as u64;
                let e = self.by_step.entry(step).or_default();
                e.checkpoint.push((num(ev, "stall_s")?, num(ev, "bytes")? as u64));
            }
            "step" => return self.on_step(ev),
            "done" => return self.on_done(rank, ev),
            "exit" if self.hashes[rank].is_none() => {
                check_interrupt()?;
                return Err(self.job.early_exit(rank));
            }
            _ => {}
        }
        Ok(None)
    }

    fn on_latest(&mut self, rank: usize, ev: &Value) -> Result<()> {
        self.inc.latest_seen[rank] = ev["step"].as_u64();
        self.latest_n += 1;
        if let Some(restarted) = &self.restarted {
            // The step was settled by the launcher: the ranks still running roll back to it.
            if self.latest_n == restarted.len() {
                let order = format!("resume {}", self.inc.resume.expect("set with restarted"));
                for &r in restarted {
                    self.job.tell(r, &order)?;
                }
            }
            return Ok(());
        }
        if self.latest_n == self.world {
            // Every shard of a step some rank saw complete is still
            // held: retention never drops a newest complete step.
            self.inc.resume = self.inc.latest_seen.iter().copied().max().flatten();
            let order = self.inc.resume.map_or("resume none".to_string(), |s| format!("resume {s}"));
            self.job.tell_all(&order)?;
        }
        Ok(())
    }

    fn on_resumed(&mut self, rank: usize, ev: &Value) -> Result<()> {
        self.inc.ranks.push(RankRestore {
            rank,
            tier: ev["tier"].as_str().unwrap_or("memory").to_string(),
            expected_tier: ev["expected_tier"].as_str().unwrap_or("memory").to_string(),
            restore_s: num(ev, "restore_s")?,
            bytes: num(ev, "bytes")? as u64,
            peers: ev["peers"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p.as_str().map(String::from)).collect())
                .unwrap_or_default(),
            attempts: ev["attempts"].as_u64().unwrap_or(1),
            state_hash: ev["state_hash"].as_str().map(String::from),
            in_process: ev["in_process"].as_bool().unwrap_or(false),
        });
        if self.inc.ranks.len() == self.world {
            let now = Instant::now();
            self.inc.resumed_at = Some(now);
            self.ui.say(self.pb, self.resumed_line(now));
        }
        Ok(())
    }

    /// "resumed from step S: ranks ... from memory in ..., ...": where every
    /// rank's shard came from, how fast, and the steps to redo.
    fn resumed_line(&self, now: Instant) -> String {
        let inc = &self.inc;
        let step = inc.resume.unwrap_or(0);
        let lost = self.log.last_step.saturating_sub(step);
        let mut parts = Vec::new();
        for tier in TIERS {
            let ranks = inc.ranks_from(tier);
            if ranks.is_empty() {
                continue;
            }
            let s = inc.restore_s(Some(tier)).unwrap_or(0.0);
            let from = if tier == "peer" { peer_details(inc) } else { String::new() };
            parts.push(format!(
                "rank{} {} from {tier}{from} in {} ({:.2} GiB/s)",
                if ranks.len() > 1 { "s" } else { "" },
                list(&ranks),
                fmt_s(s),
                gibps(inc.bytes_from(tier), s)
            ));
        }
        let since_kill = self
            .log
            .killed_at
            .map_or(String::new(), |k| format!("; {} after the kill", fmt_s((now - k).as_secs_f64())));
        format!(
            "    resumed     from step {step}: {}{since_kill}; {lost} step{} to redo",
            parts.join(", "),
            if lost == 1 { "" } else { "s" }
        )
    }

    fn on_ready(&mut self) -> Result<()> {
        self.ready_n += 1;
        if self.ready_n == self.world {
            let step = self.inc.resume.unwrap_or(0);
            self.log.last_step = step;
            self.pb.set_position(step);
            if step < self.steps {
                self.log.trained_from.get_or_insert_with(Instant::now);
                self.log.go_at = Some(Instant::now());
                self.job.tell_all("go")?;
            }
        }
        Ok(())
    }

    fn on_step(&mut self, ev: &Value) -> Result<Option<Outcome>> {
        let step = num(ev, "step")? as u64;
        self.log.step_s.push(num(ev, "step_s")?);
        let e = self.by_step.entry(step).or_default();
        e.ranks += 1;
        e.loss_sum += num(ev, "loss")? * num(ev, "params")?;
        e.params += num(ev, "params")?;
        if e.ranks < self.world {
            return Ok(None);
        }
        let e = self.by_step.remove(&step).expect("present");
        let loss = e.loss_sum / e.params.max(1.0);
        let now = Instant::now();
        if let (Some(go), true) = (self.log.go_at, e.checkpoint.is_empty()) {
            self.log.job_step_s.push((now - go).as_secs_f64());
        }
        self.log.last_step_at = Some(now);
        self.inc.first_step_at.get_or_insert(now);
        self.log.last_step = step;
        self.log.loss = Some(loss);
        self.pb.set_position(step);
        self.pb.set_message(format!("loss {loss:.4}"));
        if !e.checkpoint.is_empty() {
            self.record_checkpoint(step, &e.checkpoint)?;
        }
        if self.stop_at == Some(step) {
            return Ok(Some(Outcome::Stopped));
        }
        if step < self.steps {
            self.log.go_at = Some(Instant::now());
            self.job.tell_all("go")?;
        }
        Ok(None)
    }

    /// Records the checkpoint of `step` once every rank finished the step:
    /// each rank's (stall, bytes).
    fn record_checkpoint(&mut self, step: u64, shards: &[(f64, u64)]) -> Result<()> {
        let w = self.world;
        ensure!(shards.len() == w, "only {} of {w} ranks checkpointed step {step}", shards.len());
        let c = Checkpoint {
            step,
            stall_s: shards.iter().map(|c| c.0).fold(0.0, f64::max),
            shard_stalls: shards.iter().map(|c| c.0).collect(),
            bytes: shards.iter().map(|c| c.1).sum(),
        };
        self.ui.say(
            self.pb,
            format!(
                "    checkpoint  step {step:>4}  {w} shards, {} into {}, training paused {}",
                human_bytes(c.bytes),
                self.log.into,
                fmt_s(c.stall_s)
            ),
        );
        self.log.checkpoints.push(c);
        Ok(())
    }

    fn on_done(&mut self, rank: usize, ev: &Value) -> Result<Option<Outcome>> {
        let hash = ev["state_hash"].as_str().ok_or_else(|| anyhow!("rank {rank} sent {ev} without a hash"))?;
        self.hashes[rank] = Some(hash.to_string());
        if !self.hashes.iter().all(Option::is_some) {
            return Ok(None);
        }
        self.job.wait_done()?;
        Ok(Some(Outcome::Done { hashes: std::mem::take(&mut self.hashes).into_iter().flatten().collect() }))
    }
}

/// " (held by n1, n3, 2 tries)": the peers the ranks restored from a peer
/// fetched from, and the most tries one of them took.
fn peer_details(inc: &Incarnation) -> String {
    let from_peer = || inc.ranks.iter().filter(|r| r.tier == "peer");
    let mut p: Vec<String> = from_peer().flat_map(|r| r.peers.clone()).collect();
    p.dedup();
    let tries = from_peer().map(|r| r.attempts).max().unwrap_or(1);
    let tries = if tries > 1 { format!(", {tries} tries") } else { String::new() };
    if p.is_empty() {
        tries
    } else {
        format!(" (held by {}{tries})", p.join(", "))
    }
}
