//! The demo's report: one JSON object with `--json`, else a table; both
//! from the three runs (the reference, the run with failures, the
//! baseline) and the goodput computed from them.

use anyhow::{ensure, Context, Result};
use comfy_table::Table;
use serde_json::{json, Value};
use tierckpt_harness::stats::{gibps, median};

use super::baseline::BaselineRun;
use super::failures::{Recovered, TieredRun};
use super::plan::Plan;
use super::ui::{fmt_s, list};
use super::{DemoArgs, Reference, PLACEMENT, REPLICATION_FACTOR};
use crate::output::{human_bytes, print_json};

/// The median of `v`, or none when it is empty (JSON null, no table row).
fn median_of(v: &[f64]) -> Option<f64> {
    Some(median(v)).filter(|m| !m.is_nan())
}

/// Everything the demo measured, and the goodput of both runs.
pub(super) struct Report<'a> {
    a: &'a DemoArgs,
    plan: &'a Plan,
    persist_url: &'a str,
    reference: Reference,
    tiered: TieredRun,
    /// The same failures, every rank restarted at each.
    restart: TieredRun,
    base: BaselineRun,
    /// The preemption with a notice, with and without the early checkpoint.
    preemption: Value,
    /// The training time an uninterrupted run without checkpoints needs.
    useful_s: f64,
    /// The run with failures' wall time, less the demo's own waits.
    run_s: f64,
    goodput: f64,
    restart_goodput: f64,
    baseline_goodput: f64,
    wall_s: f64,
}

impl<'a> Report<'a> {
    /// Computes the goodput of each run (`tiered` recovering in-process,
    /// `restart` restarting every rank): the training time an uninterrupted
    /// run without checkpoints needs, over the run's wall time. The demo's own waits
    /// (for a copy on a peer, for a commit) before a failure are not the job's.
    pub(super) fn new(
        a: &'a DemoArgs,
        plan: &'a Plan,
        persist_url: &'a str,
        reference: Reference,
        (tiered, restart, preemption): (TieredRun, TieredRun, Value),
        base: BaselineRun,
        started: std::time::Instant,
    ) -> Result<Self> {
        let useful_s = reference.log.useful_s().context("the reference run took no step")?;
        let run_s = tiered.wall_s - tiered.demo_waits_s;
        Ok(Self {
            goodput: useful_s / run_s,
            restart_goodput: useful_s / (restart.wall_s - restart.demo_waits_s),
            restart,
            preemption,
            baseline_goodput: useful_s / base.wall_s,
            a,
            plan,
            persist_url,
            reference,
            tiered,
            base,
            useful_s,
            run_s,
            wall_s: started.elapsed().as_secs_f64(),
        })
    }

    /// Prints the report: JSON with `json`, else a table.
    pub(super) fn print(&self, json: bool) {
        if json {
            print_json(&self.to_json());
        } else {
            println!("{}", self.table());
        }
    }

    /// Fails unless both runs ended in the reference's state.
    pub(super) fn check(&self) -> Result<()> {
        let (final_hash, ref_hash, base_hash) = (&self.tiered.hash, &self.reference.hash, &self.base.hash);
        ensure!(
            final_hash == ref_hash,
            "the final state after the failures ({final_hash}) differs from the uninterrupted run's ({ref_hash})"
        );
        ensure!(
            self.restart.hash == *ref_hash,
            "the final state after the failures with full restarts ({}) differs from the uninterrupted run's ({ref_hash})",
            self.restart.hash
        );
        ensure!(
            base_hash == ref_hash,
            "the baseline's final state ({base_hash}) differs from the uninterrupted run's ({ref_hash})"
        );
        Ok(())
    }

    fn to_json(&self) -> Value {
        let (a, plan, t) = (self.a, self.plan, &self.tiered);
        let [crash, node_loss, total_loss] = &t.recoveries;
        let log = &t.log;
        let stalls = log.stalls();
        let shard_stalls: Vec<f64> = log.checkpoints.iter().flat_map(|c| c.shard_stalls.clone()).collect();
        let ref_stalls = self.reference.log.stalls();
        let failures: Vec<&Value> = t.recoveries.iter().map(|r| &r.record).collect();
        // In parts: one `json!` this large exceeds the macro recursion limit.
        let tiers = json!({
            "restore_s_persistent": total_loss.inc.restore_s(Some("persistent")),
            "bytes_replicated": t.traffic.replicated,
            "bytes_replicated_wire": t.traffic.replicated_wire,
            "bytes_persisted": t.traffic.persisted,
            "bytes_persisted_stored": t.traffic.persisted_stored,
            "shards_persisted": t.traffic.persisted_shards,
            "persistent_last_committed": t.persisted_steps.last(),
            "persistent": {
                "url": self.persist_url,
                "persist_every": a.persist_every,
                "keep_last": a.keep_last,
                "steps_committed": t.persisted_steps,
                "last_committed": t.persisted_steps.last(),
                "final_wait_s": t.final_persist_wait_s,
            },
        });
        let mut report = json!({
            "bitwise_identical": t.hash == self.reference.hash,
            "state_hash": t.hash,
            "reference_state_hash": self.reference.hash,
            "rank_state_hashes": t.hashes,
            "nodes": plan.world,
            "ranks": plan.world,
            "replication_factor": REPLICATION_FACTOR,
            "placement": PLACEMENT,
            "state_bytes": plan.state_bytes,
            "shard_state_bytes": plan.shards.iter().map(|s| 12 * s.params() as u64).collect::<Vec<_>>(),
            "checkpoint_bytes": log.checkpoints.first().map_or(0, |c| c.bytes),
            "shard_bytes": plan.shard_bytes,
            "params": plan.params,
            "steps": a.steps,
            "checkpoint_every": a.checkpoint_every,
            "keep_last": a.keep_last,
            "persist_every": a.persist_every,
            "seed": a.seed,
            "threads": plan.threads,
            "checkpoints": log.checkpoints.len(),
            "checkpoint_steps": log.checkpoints.iter().map(|c| c.step).collect::<Vec<_>>(),
            "stall_s": stalls,
            "stall_s_median": median_of(&stalls),
            "stall_s_max": stalls.iter().copied().reduce(f64::max),
            "shard_stall_s_median": median_of(&shard_stalls),
            "step_s_median": median_of(&log.step_s),
            "job_step_s_median": median_of(&log.job_step_s),
            "job_step_s_mean": (!log.job_step_s.is_empty())
                .then(|| log.job_step_s.iter().sum::<f64>() / log.job_step_s.len() as f64),
            "start_s": t.start_s,
            "restore_s": crash.record["restore_s"],
            "recovery_s": crash.record["recovery_s"],
            "restore_s_memory": crash.inc.restore_s(Some("memory")),
            "restore_s_peer": node_loss.inc.restore_s(Some("peer")),
            "shards_fetched_from_peers": t.traffic.fetched,
            "failures": failures,
            "final_loss": log.loss,
            "reference": {
                "checkpoints": self.reference.log.checkpoints.len(),
                "stall_s": ref_stalls,
                "stall_s_median": median_of(&ref_stalls),
                "wall_s": self.reference.wall_s,
            },
            "wall_s": self.wall_s,
        });
        report["preemption"] = self.preemption.clone();
        for part in [tiers, self.goodput_json()] {
            if let (Some(r), Value::Object(t)) = (report.as_object_mut(), part) {
                r.extend(t);
            }
        }
        report
    }

    fn goodput_json(&self) -> Value {
        let base = &self.base;
        let base_stalls = base.log.stalls();
        json!({
            "compute_ms": self.a.compute_ms,
            "useful_s": self.useful_s,
            "run_s": self.run_s,
            "demo_waits_s": self.tiered.demo_waits_s,
            "goodput": self.goodput,
            "recovery": self.tiered.recovery.name(),
            "restart_goodput": self.restart_goodput,
            "full_restart": {
                "bitwise_identical": self.restart.hash == self.reference.hash,
                "goodput": self.restart_goodput,
                "run_s": self.restart.wall_s - self.restart.demo_waits_s,
                "demo_waits_s": self.restart.demo_waits_s,
                "failures": self.restart.recoveries.iter().map(|r| &r.record).collect::<Vec<_>>(),
            },
            "baseline_goodput": self.baseline_goodput,
            "baseline": {
                "storage": "files, written and fsynced by each trainer",
                "bitwise_identical": base.hash == self.reference.hash,
                "state_hash": base.hash,
                "checkpoints": base.log.checkpoints.len(),
                "stall_s": base_stalls,
                "stall_s_median": median_of(&base_stalls),
                "failures": base.failures,
                "wall_s": base.wall_s,
            },
        })
    }

    fn table(&self) -> Table {
        let mut t = Table::new();
        t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
        self.run_rows(&mut t);
        for r in &self.tiered.recoveries {
            recovery_rows(&mut t, r);
        }
        self.preemption_row(&mut t);
        self.outcome_rows(&mut t);
        t
    }

    /// The cluster, the state, the checkpoints and what moved in the background.
    fn run_rows(&self, t: &mut Table) {
        let (a, plan, run) = (self.a, self.plan, &self.tiered);
        let (world, log, traffic) = (plan.world, &run.log, &run.traffic);
        t.add_row(vec![
            "cluster".to_string(),
            format!(
                "{world} nodes (tierckptd on 127.0.0.1), {world} ranks; each shard copied to {REPLICATION_FACTOR} peer ({PLACEMENT}); \
                 {} drained to a persistent tier ({})",
                plan.drained, self.persist_url
            ),
        ]);
        t.add_row(vec![
            "training state".to_string(),
            format!(
                "{} ({:.1}M parameters, Adam, f32), {} per rank",
                human_bytes(plan.state_bytes),
                plan.params as f64 / 1e6,
                human_bytes(plan.state_bytes / world as u64)
            ),
        ]);
        t.add_row(vec![
            "checkpoints taken".to_string(),
            format!(
                "{} (every {} steps, {world} shards of {} each)",
                log.checkpoints.len(),
                a.checkpoint_every,
                human_bytes(plan.shard_bytes)
            ),
        ]);
        let stalls = log.stalls();
        if let Some(m) = median_of(&stalls) {
            let max = stalls.iter().copied().fold(0.0, f64::max);
            t.add_row(vec![
                "training paused per checkpoint".to_string(),
                format!("{} median, {} max (slowest rank)", fmt_s(m), fmt_s(max)),
            ]);
        }
        if let Some(m) = median_of(&log.step_s) {
            t.add_row(vec!["one training step".to_string(), format!("{} median", fmt_s(m))]);
        }
        t.add_row(vec![
            "copied in the background".to_string(),
            format!(
                "{} to peers ({} on the wire after deltas); {} ({} shards) to the persistent tier ({} stored after compression and deltas), newest committed step {}",
                human_bytes(traffic.replicated),
                human_bytes(traffic.replicated_wire),
                human_bytes(traffic.persisted),
                traffic.persisted_shards,
                human_bytes(traffic.persisted_stored),
                run.persisted_steps.last().map_or("none".to_string(), u64::to_string)
            ),
        ]);
    }

    /// The preemption: the notice, and the steps lost with and without the early checkpoint.
    fn preemption_row(&self, t: &mut Table) {
        let p = &self.preemption;
        let (with, without) = (&p["with_early_checkpoint"], &p["without_early_checkpoint"]);
        t.add_row(vec![
            "preemption with a notice".to_string(),
            format!(
                "notice to {} after step {}, reclaimed {} steps later: {} steps lost with the early checkpoint \
                 (step {} saved and on a peer {} after the notice), {} without it (resumed from step {})",
                p["node"].as_str().unwrap_or("?"),
                p["notice_after_step"],
                p["grace_steps"],
                with["steps_lost"],
                with["checkpoint_step"],
                with["notice_to_safe_s"].as_f64().map_or("-".into(), fmt_s),
                without["steps_lost"],
                without["resumed_from"],
            ),
        ]);
    }

    /// The final state, the goodput, the baseline and the wall time.
    fn outcome_rows(&self, t: &mut Table) {
        let (base, identical) = (&self.base, self.tiered.hash == self.reference.hash);
        t.add_row(vec![
            "final state".to_string(),
            if identical {
                "bitwise identical to the uninterrupted run".to_string()
            } else {
                "DIFFERS from the uninterrupted run".to_string()
            },
        ]);
        t.add_row(vec![
            "goodput".to_string(),
            format!(
                "{:.2} with tierckpt recovering in-process, {:.2} with full restarts, {:.2} with the baseline: \
                 {:.1} s of training over {:.1} s, {:.1} s and {:.1} s",
                self.goodput,
                self.restart_goodput,
                self.baseline_goodput,
                self.useful_s,
                self.run_s,
                self.restart.wall_s - self.restart.demo_waits_s,
                base.wall_s
            ),
        ]);
        if let Some(m) = median_of(&base.log.stalls()) {
            t.add_row(vec![
                "baseline: paused per checkpoint".to_string(),
                format!(
                    "{} median (files written and fsynced); final state {}",
                    fmt_s(m),
                    if base.hash == self.reference.hash { "bitwise identical" } else { "DIFFERS" }
                ),
            ]);
        }
        t.add_row(vec!["wall time".to_string(), format!("{:.1} s", self.wall_s)]);
    }
}

/// A failure's rows: what struck, what the demo waited for before, where
/// the ranks restored from and how fast, the recovery, the steps redone.
fn recovery_rows(t: &mut Table, r: &Recovered) {
    let (f, inc) = (&r.record, &r.inc);
    t.add_row(vec!["failure".to_string(), r.what.clone()]);
    if let Some(b) = &r.before {
        t.add_row(vec!["before the kill".to_string(), b.clone()]);
    }
    let Some(step) = inc.resume else {
        t.add_row(vec!["recovered from".to_string(), "nothing: started over".to_string()]);
        return;
    };
    let mut from = Vec::new();
    let mut restore = Vec::new();
    for (tier, name) in [("persistent", "the persistent tier"), ("peer", "a peer's memory"), ("memory", "local memory")]
    {
        let ranks = inc.ranks_from(tier);
        if ranks.is_empty() {
            continue;
        }
        let s = inc.restore_s(Some(tier)).unwrap_or(0.0);
        let plural = if ranks.len() > 1 { "s" } else { "" };
        from.push(format!("rank{plural} {} from {name}", list(&ranks)));
        restore.push(format!("{} from {tier} ({:.2} GiB/s per rank)", fmt_s(s), gibps(inc.bytes_from(tier), s)));
    }
    t.add_row(vec!["recovered from".to_string(), format!("step {step}: {}", from.join("; "))]);
    t.add_row(vec!["restore, checksums verified".to_string(), restore.join(", ")]);
    if let Some(rec) = f["recovery_s"].as_f64() {
        let init = inc.init_s.map_or(String::new(), |i| format!(", model init {}", fmt_s(i)));
        let nodes = f["nodes_killed"].as_array().map_or(1, Vec::len);
        let replace = f["replace_s"].as_f64().map_or(String::new(), |r| {
            if nodes > 1 {
                format!("{nodes} empty nodes started in {}, ", fmt_s(r))
            } else {
                format!("empty node started in {}, ", fmt_s(r))
            }
        });
        let rolled: Vec<usize> = inc.ranks.iter().filter(|r| r.in_process).map(|r| r.rank).collect::<Vec<_>>();
        let processes = if rolled.is_empty() {
            "new processes".to_string()
        } else {
            format!("ranks {} rolled back in their processes, 1 new process", list(&rolled))
        };
        t.add_row(vec![
            "recovery, kill to resumed".to_string(),
            format!("{} ({replace}{processes}{init})", fmt_s(rec)),
        ]);
        if let Some(first) = f["first_step_s"].as_f64() {
            t.add_row(vec!["kill to the first step done".to_string(), fmt_s(first)]);
        }
    }
    t.add_row(vec!["steps recomputed".to_string(), f["steps_recomputed"].to_string()]);
}
