//! The validation against the demo: a `tierckpt demo --json` report's
//! measured step time, checkpoint stall, recovery times and failure schedule
//! fed to the engine, and the goodput it predicts beside the measured one.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::engine::{simulate, Outcome, Plan, Schedule, Tier};
use super::params::Kind;

/// The prediction for one demo report.
pub struct DemoFit {
    /// The demo's measured goodput.
    pub measured_goodput: f64,
    /// The demo's useful time: its uninterrupted run's training time.
    pub useful_s: f64,
    /// The engine's run of the demo's schedule.
    pub outcome: Outcome,
    /// The time before the first step (process start), added to the engine's wall time.
    pub start_s: f64,
    /// The job's step time, as measured in the run with failures.
    pub step_s: f64,
    /// The mean checkpoint stall.
    pub stall_s: f64,
    /// The steps the demo recomputed after each failure.
    pub demo_recomputed: Vec<u64>,
}

impl DemoFit {
    /// The predicted goodput: the demo's useful time (its uninterrupted
    /// run's) over the predicted wall time, the start included.
    pub fn predicted(&self) -> f64 {
        self.useful_s / (self.outcome.wall_s + self.start_s)
    }

    /// Predicted over measured goodput.
    pub fn ratio(&self) -> f64 {
        self.predicted() / self.measured_goodput
    }

    /// The prediction as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "measured_goodput": self.measured_goodput,
            "predicted_goodput": self.predicted(),
            "ratio": self.ratio(),
            "step_s": self.step_s,
            "stall_s_mean": self.stall_s,
            "start_s": self.start_s,
            "predicted_wall_s": self.outcome.wall_s + self.start_s,
            "useful_s": self.useful_s,
            "simulated_useful_s": self.outcome.useful_s,
            "checkpoint_stall_s": self.outcome.stall_s,
            "lost_s": self.outcome.lost_s,
            "recovery_s": self.outcome.recovery_s,
            "steps_recomputed": self.outcome.recomputed,
            "demo_steps_recomputed": self.demo_recomputed,
        })
    }
}

fn num(v: &Value, key: &str) -> Result<f64> {
    v[key].as_f64().with_context(|| format!("the demo report has no number {key:?}"))
}

fn int(v: &Value, key: &str) -> Result<u64> {
    v[key].as_u64().with_context(|| format!("the demo report has no whole number {key:?}"))
}

/// Reads a demo report and predicts its goodput.
pub fn predict(path: &Path) -> Result<DemoFit> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the demo report {}", path.display()))?;
    let v: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("{} is not a `tierckpt demo --json` report", path.display()))?;
    fit(&v)
}

/// Predicts the goodput of the demo report `v`.
pub fn fit(v: &Value) -> Result<DemoFit> {
    let steps = int(v, "steps")?;
    let every = int(v, "checkpoint_every")?.max(1);
    let persist_every = v["persist_every"].as_u64().unwrap_or(1).max(1);
    let replicas = v["replication_factor"].as_u64().unwrap_or(0);
    // The job's step in the run with failures (launcher's "go" to every rank
    // done, steps without a checkpoint); older reports: the uninterrupted
    // run's training time per step.
    let step_s = match v["job_step_s_mean"].as_f64() {
        Some(s) => s,
        None => num(v, "useful_s")? / steps as f64,
    };
    let stalls: Vec<f64> =
        v["stall_s"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
    let stall_s = if stalls.is_empty() { 0.0 } else { stalls.iter().sum::<f64>() / stalls.len() as f64 };
    let mut restart_s = [0.0; 3];
    let mut schedule = Vec::new();
    let mut demo_recomputed = Vec::new();
    for f in v["failures"].as_array().context("the demo report has no \"failures\" list")? {
        let kind = match f["kind"].as_str() {
            Some("trainer_crash") => Kind::Crash,
            Some("node_loss") => Kind::NodeLoss,
            // Every node's memory lost: one rack holding the whole cluster.
            Some("total_memory_loss") => Kind::RackLoss,
            other => bail!("the demo report has a failure of unknown kind {other:?}"),
        };
        // Measured kill to resumed: detection, restart and restore together.
        restart_s[kind.index()] = num(f, "recovery_s")?;
        schedule.push((int(f, "step_killed")?, kind));
        demo_recomputed.push(int(f, "steps_recomputed")?);
    }
    schedule.sort_by_key(|s| s.0);
    let tier = |name, every, stall_s, survives| Tier {
        name,
        every,
        stall_s,
        lag_s: 0.0,
        survives,
        restore_s: [0.0; 3],
        net_bytes_per_node: 0.0,
    };
    let mut tiers = vec![tier("memory", every, stall_s, [true, false, false])];
    if replicas > 0 {
        tiers.push(tier("peer", every, 0.0, [true, true, false]));
    }
    tiers.push(tier("persistent", every * persist_every, 0.0, [true; 3]));
    let plan = Plan { tiers, restart_s };
    let outcome = simulate(&plan, steps, step_s, &Schedule::Fixed(schedule), 0);
    Ok(DemoFit {
        measured_goodput: num(v, "goodput")?,
        useful_s: num(v, "useful_s")?,
        outcome,
        start_s: v["start_s"].as_f64().unwrap_or(0.0),
        step_s,
        stall_s,
        demo_recomputed,
    })
}
