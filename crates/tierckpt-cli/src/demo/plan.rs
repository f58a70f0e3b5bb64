//! What the demo will do, settled from its flags before anything starts:
//! the model and its shards, the memory tiers' size, and the failures (the
//! steps after which they strike, the rank that crashes, the node lost).

use anyhow::{bail, ensure, Result};
use tierckpt_harness::daemon::LocalCluster;
use tierckpt_harness::rng::mix;

use super::model::{default_threads, largest_checkpoint_len, model_rows, Shard, HIDDEN, LAYERS};
use super::{DemoArgs, PLACEMENT, REPLICATION_FACTOR};
use crate::output::human_bytes;

/// The flags that choose the failure steps, in the order the failures strike.
const FAILURE_FLAGS: [&str; 3] = ["--kill-at-step", "--node-loss-at-step", "--total-loss-at-step"];

/// What the demo will do.
pub(super) struct Plan {
    /// Nodes, and ranks (one per node).
    pub(super) world: usize,
    pub(super) shards: Vec<Shard>,
    /// Parameters of the whole model.
    pub(super) params: usize,
    /// Bytes of weights and moments of the whole model.
    pub(super) state_bytes: u64,
    /// The largest shard's checkpoint file.
    pub(super) shard_bytes: u64,
    /// Each node's memory tier.
    pub(super) capacity: u64,
    /// Threads of each trainer's optimizer step.
    pub(super) threads: usize,
    /// The step after which a trainer crashes, and its rank.
    pub(super) crash_step: u64,
    pub(super) crash_rank: usize,
    /// The step after which a node is lost, and that node.
    pub(super) loss_step: u64,
    pub(super) lost: usize,
    /// The step after which every node's memory is lost.
    pub(super) total_step: u64,
    /// Which checkpoints drain to the persistent tier, in words.
    pub(super) drained: String,
}

/// The failures both runs go through: kind, the step after which it
/// strikes, and the ranks whose trainers it kills (the launcher then stops
/// the rest and restarts the job).
pub(super) struct Failure {
    pub(super) kind: &'static str,
    pub(super) step: u64,
    pub(super) ranks: Vec<usize>,
}

impl Plan {
    /// Checks the flags and settles the plan.
    pub(super) fn new(a: &DemoArgs) -> Result<Self> {
        ensure!(a.checkpoint_every > 0, "--checkpoint-every must be at least 1");
        ensure!(a.keep_last > 0, "--keep-last must be at least 1");
        ensure!(a.persist_every > 0, "--persist-every must be at least 1");
        ensure!(a.nodes >= 2, "--nodes must be at least 2: each shard is copied to {REPLICATION_FACTOR} peer");
        ensure!(a.nodes <= 64, "--nodes must be at most 64 on one machine");
        let notice = super::preemption::notice_step(a);
        ensure!(
            notice + super::preemption::GRACE_STEPS < a.steps,
            "--steps {} leaves no room for the preemption: its notice comes after step {notice} (--checkpoint-every \
             {} and a half) and the node goes {} steps later",
            a.steps,
            a.checkpoint_every,
            super::preemption::GRACE_STEPS
        );
        let world = a.nodes;
        let rows = model_rows(a.size)?;
        let shards: Vec<Shard> = (0..world as u32).map(|r| Shard::of(&rows, r, world as u32)).collect::<Result<_>>()?;
        let [crash_step, loss_step, total_step] = pick_failure_steps(
            a.steps,
            a.checkpoint_every,
            a.seed,
            [a.kill_at_step, a.node_loss_at_step, a.total_loss_at_step],
        )?;
        let params = rows.iter().sum::<usize>() * HIDDEN;
        let shard_bytes = largest_checkpoint_len(a.seed, a.steps, &rows, world)?;
        Ok(Self {
            world,
            shards,
            params,
            state_bytes: 12 * params as u64,
            shard_bytes,
            // Per node: its own rank's shards and a peer's replicas, each for the
            // steps kept, one being written, one more (a fetched or re-replicated
            // copy) and the step the drain holds past retention while it uploads it.
            capacity: 2 * (a.keep_last as u64 + 4) * (shard_bytes + (1 << 20)),
            threads: a.threads.unwrap_or_else(|| default_threads(world)).max(1),
            crash_step,
            crash_rank: pick_crash_rank(world, a.seed),
            loss_step,
            lost: 2.min(world - 1),
            total_step,
            drained: match a.persist_every {
                1 => "every checkpoint".to_string(),
                n => format!("one checkpoint in {n}"),
            },
        })
    }

    /// The failures, as the baseline goes through them.
    pub(super) fn failures(&self) -> [Failure; 3] {
        [
            Failure { kind: "trainer_crash", step: self.crash_step, ranks: vec![self.crash_rank] },
            Failure { kind: "node_loss", step: self.loss_step, ranks: vec![self.lost] },
            Failure { kind: "total_memory_loss", step: self.total_step, ranks: (0..self.world).collect() },
        ]
    }

    /// The demo's first lines: the cluster, the job, the failures, the tiers.
    pub(super) fn describe(&self, a: &DemoArgs, cluster: &LocalCluster, persist_url: &str) -> String {
        let world = self.world;
        let heartbeat = cluster.opts.settings.heartbeat_interval.as_deref().unwrap_or("500ms");
        let pids: Vec<String> =
            (0..world).map(|i| format!("{} (pid {})", LocalCluster::node_id(i), cluster.node(i).pid())).collect();
        let (crash_rank, crash_step, loss_step, total_step) =
            (self.crash_rank, self.crash_step, self.loss_step, self.total_step);
        let every_nth = &self.drained;
        format!(
            "tierckpt demo: a local cluster of {world} nodes, a job of {world} ranks (one per node)\n  \
             Adam over {:.1}M parameters ({} of weights, exp_avg and exp_avg_sq, f32, in {LAYERS} layers), \
             sharded as in ZeRO: each rank holds 1/{world} ({} per shard)\n  \
             {} steps, a checkpoint every {} steps, seed {}; each step is Adam on the host plus {} ms standing for \
             the accelerator's forward and backward pass\n  \
             failures: rank {crash_rank}'s trainer crashes after step {crash_step} (the job restarts); \
             node {} is lost after step {loss_step} (daemon and trainer), replaced by an empty node; \
             every node's memory is lost after step {total_step} (every daemon and trainer), replaced by empty nodes\n  \
             daemons: {}; each with a {} memory tier under {}, keeping {} checkpoints, \
             copying each shard to {REPLICATION_FACTOR} peer ({PLACEMENT}), heartbeat {heartbeat}\n  \
             persistent tier: {persist_url}, shared by every node: {every_nth} uploaded in the background and committed, {} kept\n  \
             then a baseline: the same job and failures, checkpointing only to files on that disk, synchronously\n",
            self.params as f64 / 1e6,
            human_bytes(self.state_bytes),
            human_bytes(self.shard_bytes),
            a.steps,
            a.checkpoint_every,
            a.seed,
            a.compute_ms,
            LocalCluster::node_id(self.lost),
            pids.join(", "),
            human_bytes(self.capacity),
            cluster.base.display(),
            a.keep_last,
            a.keep_last
        )
    }
}

fn candidates(steps: u64, every: u64) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    let all: Vec<u64> = (every + 1..steps).collect();
    let off: Vec<u64> = all.iter().copied().filter(|s| s % every != 0).collect();
    let clear: Vec<u64> = off.iter().copied().filter(|s| (s + 1) % every != 0).collect();
    (all, off, clear)
}

/// The steps after which the three failures strike: [trainer crash, node
/// loss, total memory loss]. All lie past the first checkpoint, in that
/// order, preferably neither on a checkpoint boundary nor right before one
/// (so work is lost and recomputed), the crash in the first half of the run
/// and a checkpoint between each failure and the next; picked from the seed
/// where not given, fitted around those given.
fn pick_failure_steps(steps: u64, every: u64, seed: u64, chosen: [Option<u64>; 3]) -> Result<[u64; 3]> {
    ensure!(every > 0, "--checkpoint-every must be at least 1");
    for (flag, s) in FAILURE_FLAGS.iter().zip(chosen) {
        if let Some(s) = s {
            ensure!(
                s > every && s < steps,
                "{flag} must lie after the first checkpoint (step {every}) and before the last step ({steps})"
            );
        }
    }
    let given: Vec<(&str, u64)> = FAILURE_FLAGS.iter().zip(chosen).filter_map(|(f, s)| Some((*f, s?))).collect();
    for w in given.windows(2) {
        let ((f0, s0), (f1, s1)) = (w[0], w[1]);
        ensure!(s0 < s1, "{f0} ({s0}) must come before {f1} ({s1})");
    }
    if let [Some(c), Some(l), Some(t)] = chosen {
        return Ok([c, l, t]);
    }
    ensure!(
        steps >= every + 4,
        "--steps ({steps}) must exceed --checkpoint-every ({every}) by at least 4, so that three failures can follow a checkpoint"
    );
    let (all, off, clear) = candidates(steps, every);
    // A checkpoint lies in (a, b].
    let between = |a: u64, b: u64| b / every > a / every;
    // Strictest first: (steps to pick from, a checkpoint between failures,
    // the crash in the first half).
    let levels: [(&[u64], bool, bool); 6] = [
        (&clear, true, true),
        (&clear, true, false),
        (&clear, false, false),
        (&off, true, false),
        (&off, false, false),
        (&all, false, false),
    ];
    for (pool, spaced, first_half) in levels {
        let pools: Vec<Vec<u64>> = (0..3)
            .map(|i| match chosen[i] {
                Some(s) => vec![s],
                None => pool.iter().copied().filter(|&s| !(i == 0 && first_half && 2 * s > steps)).collect(),
            })
            .collect();
        let follows = |prev: Option<u64>, s: u64| prev.is_none_or(|p| s > p && (!spaced || between(p, s)));
        // Whether failures i.. fit after one at `prev`: `follows` only gets
        // easier for later steps, so the earliest fitting step leaves the most room.
        let fits = |prev: Option<u64>, i: usize| {
            let mut prev = prev;
            for p in &pools[i..] {
                match p.iter().copied().find(|&s| follows(prev, s)) {
                    Some(s) => prev = Some(s),
                    None => return false,
                }
            }
            true
        };
        if !fits(None, 0) {
            continue;
        }
        let mut picked = [0; 3];
        let mut prev = None;
        for (i, salt) in [0xC2A5u64, 0x10557, 0x7074].into_iter().enumerate() {
            let ok: Vec<u64> = pools[i].iter().copied().filter(|&s| follows(prev, s) && fits(Some(s), i + 1)).collect();
            let s = ok[(mix(seed ^ salt) % ok.len() as u64) as usize];
            picked[i] = s;
            prev = Some(s);
        }
        return Ok(picked);
    }
    let chosen: Vec<String> = given.iter().map(|(f, s)| format!("{f} {s}")).collect();
    bail!(
        "three failures in order between the first checkpoint (step {every}) and the last step ({steps}) do not fit around {}: \
         choose other steps or use more --steps",
        chosen.join(", ")
    )
}

/// The rank whose trainer crashes first.
fn pick_crash_rank(world: usize, seed: u64) -> usize {
    (mix(seed ^ 0xDEAD) % world as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_steps_are_off_the_checkpoint_boundaries() {
        let pick = |steps, every, seed, chosen| pick_failure_steps(steps, every, seed, chosen);
        let free = [None; 3];
        for seed in 0..50 {
            let [c, l, t] = pick(30, 5, seed, free).unwrap();
            for s in [c, l, t] {
                assert!(s > 5 && s < 30 && s % 5 != 0 && (s + 1) % 5 != 0, "{c} {l} {t}");
            }
            assert!(2 * c <= 30 && l / 5 > c / 5 && t / 5 > l / 5, "a checkpoint between {c}, {l} and {t}");
            let [c, l, t] = pick(60, 10, seed, free).unwrap();
            assert!(c > 10 && c <= 30 && c % 10 != 0, "{c}");
            assert!(l / 10 > c / 10 && t / 10 > l / 10 && t < 60 && l % 10 != 0 && t % 10 != 0, "{c} {l} {t}");
            assert!(pick_crash_rank(4, seed) < 4);
        }
        assert_eq!(pick(30, 5, 3, free).unwrap(), pick(30, 5, 3, free).unwrap());
        let spread: std::collections::BTreeSet<[u64; 3]> =
            (0..50).map(|seed| pick(60, 10, seed, free).unwrap()).collect();
        assert!(spread.len() > 5, "the seed picks the steps: {spread:?}");
        // Chosen steps are kept; the others are fitted around them.
        assert_eq!(pick(30, 5, 0, [Some(19), Some(24), Some(28)]).unwrap(), [19, 24, 28]);
        let [c, l, t] = pick(30, 5, 0, [Some(19), Some(24), None]).unwrap();
        assert!(c == 19 && l == 24 && t > 25 && t < 29, "{t}");
        let [c, l, t] = pick(30, 5, 0, [Some(19), None, None]).unwrap();
        assert!(c == 19 && l > 20 && l < 24 && t > 25 && t < 29, "{l} {t}");
        let [c, l, t] = pick(30, 5, 0, [None, Some(12), None]).unwrap();
        assert!(c > 5 && c < 9 && l == 12 && t > 15 && t < 29, "{c} {t}");
        let [c, l, t] = pick(30, 5, 0, [None, None, Some(17)]).unwrap();
        assert!(c > 5 && c < 9 && l > 10 && l < 14 && t == 17, "{c} {l}");
        for bad in [
            [Some(24), Some(19), None],
            [None, Some(24), Some(19)],
            [Some(20), None, Some(20)],
            [Some(3), None, None],
            [None, None, Some(30)],
        ] {
            assert!(pick(30, 5, 0, bad).is_err(), "{bad:?}");
        }
        assert!(pick(30, 5, 0, [None, Some(6), None]).is_err(), "no room for the crash");
        assert!(pick(30, 5, 0, [None, Some(28), None]).is_ok());
        assert!(pick(30, 5, 0, [None, Some(29), None]).is_err(), "no room for the total loss");
        assert!(pick(8, 5, 0, free).is_err());
        assert_eq!(pick(9, 5, 0, free).unwrap(), [6, 7, 8]);
        assert_eq!(pick(5, 1, 0, free).unwrap(), [2, 3, 4]);
        assert!(pick(4, 1, 0, free).is_err());
    }
}
