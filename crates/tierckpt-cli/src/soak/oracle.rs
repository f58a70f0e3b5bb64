//! What the soak checks the cluster against: the fault-free run's state at
//! every checkpoint (computed in this process, without any storage), and
//! the steps a fault must not lose, read off the nodes and the persistent
//! tier just before it strikes.

// `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use tierckpt_client::Client;
use tierckpt_harness::daemon::LocalCluster;

use super::report::Problem;
use crate::demo::cluster::committed_steps;
use crate::demo::model::{model_rows, Shard, TrainState};
use crate::demo::run_log::Incarnation;

/// The fault-free run: each rank's state hash after every checkpoint step,
/// and at the end.
pub(crate) struct Reference {
    /// `at[step][rank]`.
    pub(crate) at: BTreeMap<u64, Vec<String>>,
    pub(crate) last: Vec<String>,
}

impl Reference {
    /// Trains every rank's shard alone, as the job does (each rank's step
    /// depends only on its own shard, the seed and the step).
    pub(crate) fn compute(size: u64, world: usize, seed: u64, steps: u64, every: u64) -> Result<Self> {
        let rows = model_rows(size)?;
        let mut at: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        let mut last = Vec::new();
        for rank in 0..world as u32 {
            let shard = Shard::of(&rows, rank, world as u32)?;
            let mut state = TrainState::new(seed, &shard, 1);
            while state.step() < steps {
                state.train_step(1);
                if state.step() % every == 0 {
                    at.entry(state.step()).or_default().push(state.state_hash());
                }
            }
            last.push(state.state_hash());
        }
        Ok(Self { at, last })
    }
}

/// The visible shards of `ns` on each running node: `(step, rank)` pairs.
pub(crate) fn holdings(cluster: &LocalCluster, ns: &str) -> Result<Vec<BTreeSet<(u64, u32)>>> {
    (0..cluster.nodes.len())
        .map(|i| {
            if cluster.nodes[i].is_none() {
                return Ok(BTreeSet::new());
            }
            let steps = Client::connect(cluster.socket(i))
                .and_then(|mut c| c.steps(ns))
                .with_context(|| format!("listing node {i}'s checkpoints"))?;
            Ok(steps.iter().flat_map(|s| s.ranks.iter().map(move |&r| (s.step, r))).collect())
        })
        .collect()
}

/// The newest step the cluster must still hold once the nodes in `lost`
/// lose their memory: every rank's shard visible on a node not lost, or the
/// step committed in the persistent tier at `persist_dir`.
pub(crate) fn survives(
    held: &[BTreeSet<(u64, u32)>],
    lost: &[usize],
    world: usize,
    persist_dir: &Path,
    ns: &str,
) -> Option<u64> {
    let mut kept: BTreeMap<u64, BTreeSet<u32>> = BTreeMap::new();
    for (_, h) in held.iter().enumerate().filter(|(i, _)| !lost.contains(i)) {
        for &(step, rank) in h {
            kept.entry(step).or_default().insert(rank);
        }
    }
    let in_memory = kept.iter().rev().find(|(_, ranks)| ranks.len() == world).map(|(s, _)| *s);
    let committed = committed_steps(persist_dir, ns).last().copied();
    in_memory.max(committed)
}

/// A shard of node `node`'s own rank that has another copy (on another
/// node or committed in the persistent tier), newest first: one a fault may
/// damage without losing it.
pub(crate) fn shard_with_another_copy(
    held: &[BTreeSet<(u64, u32)>],
    node: usize,
    persist_dir: &Path,
    ns: &str,
) -> Option<u64> {
    let rank = node as u32;
    let committed = committed_steps(persist_dir, ns);
    held.get(node)?
        .iter()
        .rev()
        .filter(|(_, r)| *r == rank)
        .map(|(s, _)| *s)
        .find(|s| committed.contains(s) || held.iter().enumerate().any(|(j, h)| j != node && h.contains(&(*s, rank))))
}

/// What is wrong with a start of the job: ranks whose restored state is
/// not the fault-free run's at the step resumed from, and, when a fault
/// must have kept step `k` (`must_keep`: the step and the fault in words),
/// a resume from before it.
pub(crate) fn judge(
    reference: &Reference,
    every: u64,
    inc: &Incarnation,
    must_keep: Option<(u64, &str)>,
) -> Vec<Problem> {
    let mut found = Vec::new();
    for r in &inc.ranks {
        let want = inc.resume.and_then(|s| reference.at.get(&s)).map(|h| &h[r.rank]);
        if r.state_hash.as_ref() != want {
            found.push(Problem::CorruptRestore {
                step: inc.resume,
                rank: r.rank,
                tier: r.tier.clone(),
                got: r.state_hash.clone(),
                want: want.cloned(),
            });
        }
    }
    if let Some((keep, after)) = must_keep {
        if inc.resume.is_none_or(|s| s < keep) {
            let lost = keep / every - inc.resume.unwrap_or(0) / every;
            found.push(Problem::LostSteps { after: after.to_string(), kept: keep, resumed: inc.resume, lost });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::run_log::RankRestore;

    #[test]
    fn a_wrong_restored_state_or_an_older_resume_is_a_problem() {
        let reference = Reference::compute(12 * 1024 * 8 * 2, 2, 3, 6, 2).unwrap();
        let restored = |rank: usize, hash: &str| RankRestore {
            rank,
            tier: "peer".into(),
            expected_tier: "peer".into(),
            restore_s: 0.0,
            bytes: 0,
            peers: Vec::new(),
            attempts: 1,
            state_hash: Some(hash.to_string()),
            in_process: false,
        };
        let inc = |resume: Option<u64>, hashes: [&str; 2]| Incarnation {
            resume,
            ranks: (0..2).map(|r| restored(r, hashes[r])).collect(),
            ..Default::default()
        };
        let at4 = [reference.at[&4][0].as_str(), reference.at[&4][1].as_str()];
        assert!(judge(&reference, 2, &inc(Some(4), at4), Some((4, "a fault"))).is_empty());
        let p = judge(&reference, 2, &inc(Some(4), [at4[0], at4[0]]), None);
        assert!(matches!(p[..], [Problem::CorruptRestore { rank: 1, .. }]), "rank 1 got rank 0's state");
        let p = judge(&reference, 2, &inc(Some(2), at4), None);
        assert_eq!(p.len(), 2, "step 4's states are not step 2's");
        let at2 = [reference.at[&2][0].as_str(), reference.at[&2][1].as_str()];
        let p = judge(&reference, 2, &inc(Some(2), at2), Some((6, "a node loss")));
        assert!(matches!(p[..], [Problem::LostSteps { kept: 6, lost: 2, .. }]));
        let p = judge(&reference, 2, &Incarnation::default(), Some((2, "a node loss")));
        assert!(matches!(p[..], [Problem::LostSteps { lost: 1, .. }]), "nothing resumed at all");
    }

    #[test]
    fn what_survives_a_loss() {
        let dir = tempfile::tempdir().unwrap();
        let held: Vec<BTreeSet<(u64, u32)>> = vec![
            [(1, 0), (2, 0), (3, 0), (1, 1), (2, 1)].into(),
            [(1, 1), (2, 1), (3, 1), (1, 0), (2, 0), (3, 0)].into(),
        ];
        assert_eq!(survives(&held, &[], 2, dir.path(), "ns"), Some(3));
        assert_eq!(survives(&held, &[1], 2, dir.path(), "ns"), Some(2), "rank 1 of step 3 only on node 1");
        assert_eq!(survives(&held, &[0], 2, dir.path(), "ns"), Some(3));
        assert_eq!(survives(&held, &[0, 1], 2, dir.path(), "ns"), None);
        let step_dir = dir.path().join("ns/00000000000000000001");
        std::fs::create_dir_all(&step_dir).unwrap();
        std::fs::write(step_dir.join("COMMIT"), b"").unwrap();
        assert_eq!(survives(&held, &[0, 1], 2, dir.path(), "ns"), Some(1), "committed in the persistent tier");
        assert_eq!(shard_with_another_copy(&held, 0, dir.path(), "ns"), Some(3));
        assert_eq!(shard_with_another_copy(&held, 1, dir.path(), "ns"), Some(2), "step 3 rank 1 has one copy");
        let alone: Vec<BTreeSet<(u64, u32)>> = vec![[(5, 0)].into(), BTreeSet::new()];
        assert_eq!(shard_with_another_copy(&alone, 0, dir.path(), "ns"), None);
    }

    #[test]
    fn the_reference_is_deterministic_and_checkpoints_every_k_steps() {
        let size = 12 * 1024 * 8 * 2;
        let a = Reference::compute(size, 2, 3, 6, 2).unwrap();
        assert_eq!(a.at.keys().copied().collect::<Vec<_>>(), [2, 4, 6]);
        assert!(a.at.values().all(|h| h.len() == 2 && h[0] != h[1]));
        assert_eq!(a.at[&6], a.last);
        let b = Reference::compute(size, 2, 3, 6, 2).unwrap();
        assert_eq!((a.at, a.last), (b.at, b.last));
    }
}
