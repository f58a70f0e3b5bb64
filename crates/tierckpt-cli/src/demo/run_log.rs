//! What the launcher records of a run: its checkpoints and steps, and how
//! each start of the job resumed (from which step, each rank from which
//! tier, how fast).

use std::time::Instant;

/// One checkpoint of the job: every rank saved its shard of one step.
pub(crate) struct Checkpoint {
    pub(crate) step: u64,
    /// The job's pause: the slowest rank's (the next step waits for it).
    pub(crate) stall_s: f64,
    /// Each rank's pause.
    pub(crate) shard_stalls: Vec<f64>,
    /// Bytes of all ranks' shards.
    pub(crate) bytes: u64,
}

/// What one namespace's runs recorded.
#[derive(Default)]
pub(crate) struct RunLog {
    pub(crate) checkpoints: Vec<Checkpoint>,
    /// Every rank's time of every step.
    pub(crate) step_s: Vec<f64>,
    /// The newest step every rank finished.
    pub(crate) last_step: u64,
    /// The mean loss of the newest step.
    pub(crate) loss: Option<f64>,
    /// When the newest failure struck.
    pub(crate) killed_at: Option<Instant>,
    /// Where checkpoints go, as the progress lines say it.
    pub(crate) into: &'static str,
    /// When the first step was ordered, and when the newest step ended.
    pub(crate) trained_from: Option<Instant>,
    pub(crate) last_step_at: Option<Instant>,
    /// When the launcher last told the ranks to take a step.
    pub(crate) go_at: Option<Instant>,
    /// The job's steps without a checkpoint, from "go" to every rank done.
    pub(crate) job_step_s: Vec<f64>,
}

impl RunLog {
    /// An empty log of a run checkpointing `into` (as the progress lines say it).
    pub(crate) fn new(into: &'static str) -> Self {
        Self { into, ..Default::default() }
    }

    /// The training loop's time without its checkpoint pauses: what the
    /// job needs when nothing fails and nothing is saved.
    pub(crate) fn useful_s(&self) -> Option<f64> {
        let trained = (self.last_step_at? - self.trained_from?).as_secs_f64();
        Some(trained - self.stalls().iter().sum::<f64>())
    }

    /// The newest checkpoint's step.
    pub(crate) fn last_checkpoint(&self) -> Option<u64> {
        self.checkpoints.iter().map(|c| c.step).max()
    }

    /// The job's pause at each checkpoint.
    pub(crate) fn stalls(&self) -> Vec<f64> {
        self.checkpoints.iter().map(|c| c.stall_s).collect()
    }
}

/// How one rank resumed.
pub(crate) struct RankRestore {
    pub(crate) rank: usize,
    /// The tier it came from: memory, peer or persistent.
    pub(crate) tier: String,
    /// The tier the view before loading pointed to (memory, peer, persistent).
    pub(crate) expected_tier: String,
    pub(crate) restore_s: f64,
    pub(crate) bytes: u64,
    /// The peers that held it, when it came from one.
    pub(crate) peers: Vec<String>,
    /// Tries of the load.
    pub(crate) attempts: u64,
    /// The hash of the state it restored, when the trainers report it.
    pub(crate) state_hash: Option<String>,
    /// Restored by a process that kept running (in-process recovery).
    pub(crate) in_process: bool,
}

/// What one start of the job did before training.
#[derive(Default)]
pub(crate) struct Incarnation {
    /// Each rank's answer to `latest`.
    pub(crate) latest_seen: Vec<Option<u64>>,
    /// The step every rank resumed from.
    pub(crate) resume: Option<u64>,
    pub(crate) ranks: Vec<RankRestore>,
    /// When the last rank had restored its shard.
    pub(crate) resumed_at: Option<Instant>,
    /// When every rank had finished the first step after it.
    pub(crate) first_step_at: Option<Instant>,
    /// The slowest rank's model initialisation.
    pub(crate) init_s: Option<f64>,
}

impl Incarnation {
    /// The ranks restored from `tier`, in order.
    pub(crate) fn ranks_from(&self, tier: &str) -> Vec<usize> {
        let mut r: Vec<usize> = self.ranks.iter().filter(|r| r.tier == tier).map(|r| r.rank).collect();
        r.sort_unstable();
        r
    }

    /// The slowest restore from `tier` (from any tier: none).
    pub(crate) fn restore_s(&self, tier: Option<&str>) -> Option<f64> {
        self.ranks.iter().filter(|r| tier.is_none_or(|t| r.tier == t)).map(|r| r.restore_s).reduce(f64::max)
    }

    /// The most bytes one rank restored from `tier`.
    pub(crate) fn bytes_from(&self, tier: &str) -> u64 {
        self.ranks.iter().filter(|r| r.tier == tier).map(|r| r.bytes).max().unwrap_or(0)
    }

    /// The slowest tier any rank restored from.
    pub(crate) fn recovered_from(&self) -> &'static str {
        if self.resume.is_none() {
            return "none";
        }
        for tier in ["persistent", "peer"] {
            if self.ranks.iter().any(|r| r.tier == tier) {
                return tier;
            }
        }
        "memory"
    }
}
