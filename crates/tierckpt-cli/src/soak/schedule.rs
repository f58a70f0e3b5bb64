//! The soak's fault schedule, drawn from its seed before anything starts:
//! after which step each fault strikes, its kind, and the node it hits.

use std::fmt;

use tierckpt_harness::rng::Rng;

/// A fault the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// One rank's trainer SIGKILLed; the launcher restarts the job.
    TrainerKill,
    /// A node's daemon SIGKILLed and restarted on its memory (and the job restarted).
    DaemonKill,
    /// A node's daemon SIGSTOPped beyond the heartbeat timeout while the job
    /// goes on, then SIGCONTinued.
    DaemonStop,
    /// A node lost (daemon and trainer SIGKILLed, memory wiped), replaced by an empty node.
    NodeLoss,
    /// Every node's memory lost; the job comes back from the persistent tier.
    TotalLoss,
    /// One byte flipped in a node's copy of a shard that has another copy; the job restarts.
    FlipByte,
    /// A node's copy of such a shard truncated; the job restarts.
    Truncate,
    /// A node's copy of such a shard removed; the job restarts.
    RemoveFile,
}

impl Kind {
    /// Every kind, in the order of the report.
    pub(crate) const ALL: [Kind; 8] = [
        Kind::TrainerKill,
        Kind::DaemonKill,
        Kind::DaemonStop,
        Kind::NodeLoss,
        Kind::TotalLoss,
        Kind::FlipByte,
        Kind::Truncate,
        Kind::RemoveFile,
    ];

    /// Its name in the report.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::TrainerKill => "trainer_sigkill",
            Kind::DaemonKill => "daemon_sigkill",
            Kind::DaemonStop => "daemon_sigstop",
            Kind::NodeLoss => "node_loss",
            Kind::TotalLoss => "total_memory_loss",
            Kind::FlipByte => "memory_flipped_byte",
            Kind::Truncate => "memory_truncated",
            Kind::RemoveFile => "memory_missing",
        }
    }

    /// Relative frequency in the random part of the schedule: the losses of
    /// every node's memory are rarer, as they are in a data center.
    fn weight(self) -> u64 {
        match self {
            Kind::TotalLoss => 1,
            Kind::NodeLoss | Kind::DaemonStop => 3,
            _ => 4,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One fault of the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fault {
    /// It strikes once every rank finished this step.
    pub(crate) step: u64,
    pub(crate) kind: Kind,
    /// The node (and rank) it hits; unused by a total loss.
    pub(crate) node: usize,
}

/// The faults of a run of `steps` steps on `nodes` nodes, about one every
/// `every` steps (gaps drawn from 1 to 2·every−1). The first faults go
/// through every kind once, in an order drawn from the seed, so that a short
/// run meets each; then kinds are drawn by weight.
pub(crate) fn schedule(seed: u64, steps: u64, every: u64, nodes: usize) -> Vec<Fault> {
    let mut rng = Rng::seeded(seed ^ 0x50A4_5C4E_D01E);
    let mut first = Kind::ALL.to_vec();
    for i in (1..first.len()).rev() {
        first.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let total: u64 = Kind::ALL.iter().map(|k| k.weight()).sum();
    let every = every.max(1);
    let mut faults = Vec::new();
    let mut step = 0;
    loop {
        step += 1 + rng.below(2 * every - 1);
        // A fault after the last step would strike a finished job.
        if step >= steps {
            return faults;
        }
        let kind = match first.get(faults.len()) {
            Some(&k) => k,
            None => by_weight(rng.below(total)),
        };
        faults.push(Fault { step, kind, node: rng.below(nodes as u64) as usize });
    }
}

/// The kind whose share of the summed weights holds `x`.
fn by_weight(mut x: u64) -> Kind {
    for k in Kind::ALL {
        if x < k.weight() {
            return k;
        }
        x -= k.weight();
    }
    unreachable!("x is below the sum of the weights")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_seeded_spread_and_meets_every_kind() {
        let s = schedule(7, 1000, 10, 4);
        assert_eq!(s, schedule(7, 1000, 10, 4), "the seed decides");
        assert_ne!(s, schedule(8, 1000, 10, 4));
        assert!(s.windows(2).all(|w| w[0].step < w[1].step) && s.last().unwrap().step < 1000);
        assert!((70..=130).contains(&s.len()), "about one fault in 10 steps: {}", s.len());
        let first: std::collections::BTreeSet<Kind> = s[..Kind::ALL.len()].iter().map(|f| f.kind).collect();
        assert_eq!(first.len(), Kind::ALL.len(), "the first faults go through every kind");
        for k in Kind::ALL {
            assert!(s.iter().filter(|f| f.kind == k).count() >= 2, "{k} drawn again later");
        }
        assert!(s.iter().all(|f| f.node < 4) && (0..4).all(|n| s.iter().any(|f| f.node == n)));
        assert!(schedule(1, 1, 10, 4).is_empty(), "no fault after the last step");
        assert_eq!(schedule(1, 100, 1, 2).len(), 99, "every step when every is 1");
    }
}
