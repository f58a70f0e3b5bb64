//! What the soak tells people and programs: faults by kind, restores by
//! tier, recoveries, and the two counts that must be zero
//! (`corrupt_restores`, `lost_committed_steps`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::schedule::{Fault, Kind};
use super::SoakArgs;
use crate::demo::model::combined_hash;
use crate::demo::run_log::RunLog;

/// Error messages of failed starts kept in the report.
const ERRORS_KEPT: usize = 5;

/// Something the soak found wrong.
pub(crate) enum Problem {
    /// A rank restored a state other than the fault-free run's at that step.
    CorruptRestore { step: Option<u64>, rank: usize, tier: String, got: Option<String>, want: Option<String> },
    /// The job resumed from before a step the fault must not have lost.
    LostSteps { after: String, kept: u64, resumed: Option<u64>, lost: u64 },
}

impl Problem {
    fn describe(&self) -> String {
        match self {
            Problem::CorruptRestore { step, rank, tier, got, want } => format!(
                "rank {rank} restored step {step:?} from {tier} with state {} instead of {}",
                got.as_deref().unwrap_or("(no hash)"),
                want.as_deref().unwrap_or("(no such checkpoint)")
            ),
            Problem::LostSteps { after, kept, resumed, lost } => {
                format!(
                    "after {after}: resumed from {resumed:?}, not from step {kept} or newer ({lost} checkpoints lost)"
                )
            }
        }
    }
}

/// The soak's counts, filled in as it runs.
pub(crate) struct Report {
    args: SoakArgs,
    faults: BTreeMap<Kind, u64>,
    /// Damage faults that found no shard with another copy to damage.
    without_target: BTreeMap<Kind, u64>,
    pub(crate) restores: BTreeMap<String, u64>,
    pub(crate) job_starts: u64,
    failed_starts: u64,
    errors: Vec<String>,
    corrupt_restores: u64,
    lost_committed_steps: u64,
    problems: Vec<String>,
    /// (kind, seconds from the fault to every rank restored).
    recoveries: Vec<(Kind, f64)>,
    checkpoints: u64,
    final_hash: String,
    reference_hash: String,
    wall_s: f64,
}

impl Report {
    pub(crate) fn new(a: &SoakArgs) -> Self {
        Self {
            args: a.clone(),
            faults: BTreeMap::new(),
            without_target: BTreeMap::new(),
            restores: BTreeMap::new(),
            job_starts: 0,
            failed_starts: 0,
            errors: Vec::new(),
            corrupt_restores: 0,
            lost_committed_steps: 0,
            problems: Vec::new(),
            recoveries: Vec::new(),
            checkpoints: 0,
            final_hash: String::new(),
            reference_hash: String::new(),
            wall_s: 0.0,
        }
    }

    pub(crate) fn struck(&mut self, f: &Fault) {
        *self.faults.entry(f.kind).or_default() += 1;
    }

    pub(crate) fn skipped(&mut self, f: &Fault) {
        *self.without_target.entry(f.kind).or_default() += 1;
    }

    pub(crate) fn recovered(&mut self, f: &Fault, recovery_s: Option<f64>) {
        if let Some(s) = recovery_s {
            self.recoveries.push((f.kind, s));
        }
    }

    pub(crate) fn failed_start(&mut self, error: String) {
        self.failed_starts += 1;
        if self.errors.len() < ERRORS_KEPT {
            self.errors.push(error);
        }
    }

    pub(crate) fn problem(&mut self, p: Problem) {
        match &p {
            Problem::CorruptRestore { .. } => self.corrupt_restores += 1,
            Problem::LostSteps { lost, .. } => self.lost_committed_steps += lost,
        }
        eprintln!("soak: {}", p.describe());
        self.problems.push(p.describe());
    }

    /// Records the end: the job's final state, the fault-free run's, the log.
    pub(crate) fn finish(&mut self, hashes: &[String], reference: &[String], log: &RunLog, wall: Duration) {
        self.final_hash = combined_hash(hashes);
        self.reference_hash = combined_hash(reference);
        self.checkpoints = log.checkpoints.len() as u64;
        self.wall_s = wall.as_secs_f64();
    }

    fn longest(&self) -> Option<(Kind, f64)> {
        self.recoveries.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1))
    }

    fn median_recovery_s(&self) -> Option<f64> {
        let mut r: Vec<f64> = self.recoveries.iter().map(|r| r.1).collect();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 2).copied()
    }

    fn counts(m: &BTreeMap<Kind, u64>) -> Value {
        Kind::ALL.iter().map(|k| (k.name().to_string(), json!(m.get(k).copied().unwrap_or(0)))).collect()
    }

    pub(crate) fn to_json(&self) -> Value {
        let a = &self.args;
        let longest = self.longest();
        json!({
            "seed": a.seed,
            "nodes": a.nodes,
            "size": a.size,
            "checkpoint_every": a.checkpoint_every,
            "fault_every": a.fault_every,
            "store_faults": a.store_faults,
            "steps": a.checkpoints * a.checkpoint_every,
            "checkpoints_planned": a.checkpoints,
            "checkpoints": self.checkpoints,
            "faults": Self::counts(&self.faults),
            "faults_total": self.faults.values().sum::<u64>(),
            "faults_without_a_target": Self::counts(&self.without_target),
            "restores": {
                "memory": self.restores.get("memory").copied().unwrap_or(0),
                "peer": self.restores.get("peer").copied().unwrap_or(0),
                "persistent": self.restores.get("persistent").copied().unwrap_or(0),
            },
            "job_starts": self.job_starts,
            "failed_starts": self.failed_starts,
            "failed_start_errors": self.errors,
            "corrupt_restores": self.corrupt_restores,
            "lost_committed_steps": self.lost_committed_steps,
            "problems": self.problems,
            "longest_recovery_s": longest.map(|l| l.1),
            "longest_recovery_fault": longest.map(|l| l.0.name()),
            "median_recovery_s": self.median_recovery_s(),
            "final_state_equal": self.final_hash == self.reference_hash,
            "final_state_xxh3": self.final_hash,
            "reference_state_xxh3": self.reference_hash,
            "wall_s": self.wall_s,
        })
    }

    pub(crate) fn print(&self, json: bool) {
        let v = self.to_json();
        if json {
            println!("{v}");
            return;
        }
        let list = |m: &Value| {
            m.as_object().map_or(String::new(), |o| {
                o.iter()
                    .filter(|(_, n)| n.as_u64() != Some(0))
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
        };
        println!(
            "soak: {} checkpoints ({} planned) in {:.0} s, {} faults: {}",
            v["checkpoints"],
            v["checkpoints_planned"],
            self.wall_s,
            v["faults_total"],
            list(&v["faults"])
        );
        println!(
            "  job starts {} ({} failed); ranks restored from: {}",
            self.job_starts,
            self.failed_starts,
            list(&v["restores"])
        );
        let skipped = list(&v["faults_without_a_target"]);
        if !skipped.is_empty() {
            println!("  damage faults that found no shard with another copy (nothing damaged): {skipped}");
        }
        if let Some((k, s)) = self.longest() {
            println!(
                "  longest recovery {s:.2} s (after {k}), median {:.2} s",
                self.median_recovery_s().unwrap_or(0.0)
            );
        }
        println!(
            "  corrupt restores {}, lost committed steps {}; final state {} the fault-free run's (xxh3-128 {})",
            self.corrupt_restores,
            self.lost_committed_steps,
            if self.final_hash == self.reference_hash { "equals" } else { "DIFFERS FROM" },
            self.final_hash
        );
        for p in &self.problems {
            println!("  problem: {p}");
        }
    }

    /// Fails on a corrupt restore, a lost committed step or a final state
    /// other than the fault-free run's.
    pub(crate) fn check(&self) -> Result<()> {
        if self.corrupt_restores > 0 || self.lost_committed_steps > 0 || self.final_hash != self.reference_hash {
            bail!(
                "the soak failed: {} corrupt restores, {} lost committed steps, final state {} the fault-free run's",
                self.corrupt_restores,
                self.lost_committed_steps,
                if self.final_hash == self.reference_hash { "equal to" } else { "different from" }
            );
        }
        Ok(())
    }
}
