//! Placement over the current member order: which nodes receive copies of
//! a node's shards, and which nodes a node probes each heartbeat.

use std::collections::BTreeSet;

use crate::config::Placement;

/// Indices of the nodes that receive copies of `owner`'s shards.
pub fn replica_targets(placement: Placement, n: usize, owner: usize, k: usize) -> Vec<usize> {
    let ring = |count: usize| (1..=count).map(|j| (owner + j) % n).collect::<Vec<_>>();
    match placement {
        Placement::Ring => ring(k.min(n - 1)),
        Placement::Group => {
            let size = k + 1;
            let groups = (n / size).max(1);
            // The last group absorbs the remainder so that no group is short.
            let g = (owner / size).min(groups - 1);
            let start = g * size;
            let end = if g == groups - 1 { n } else { start + size };
            (start..end).filter(|&i| i != owner).collect()
        }
    }
}

/// The ids that receive copies of `owner`'s shards, `order` being the
/// members in placement order (empty if `owner` is not among them).
pub fn targets_of(placement: Placement, order: &[String], owner: &str, k: usize) -> Vec<String> {
    match order.iter().position(|id| id == owner) {
        Some(i) if order.len() > 1 => {
            replica_targets(placement, order.len(), i, k).into_iter().map(|t| order[t].clone()).collect()
        }
        _ => Vec::new(),
    }
}

/// Whom node `me` probes in one heartbeat round: its placement neighbours
/// (the nodes it copies to and those that copy to it, and the ring's
/// nearest `max(k, 1)` on each side), plus `fanout` others taken in turn
/// from `cursor`. The cost per node per round is at most 2k + the group +
/// `fanout`, whatever the cluster's size; the other nodes' health comes
/// from what the probed ones report (gossip).
pub fn probe_set(placement: Placement, n: usize, me: usize, k: usize, fanout: usize, cursor: usize) -> Vec<usize> {
    if n <= 1 {
        return Vec::new();
    }
    let mut set = BTreeSet::new();
    let near = k.max(1).min(n - 1);
    for d in 1..=near {
        set.insert((me + d) % n);
        set.insert((me + n - d) % n);
    }
    set.extend(replica_targets(placement, n, me, k));
    set.extend((0..n).filter(|&o| o != me && replica_targets(placement, n, o, k).contains(&me)));
    let others: Vec<usize> = (0..n).filter(|&o| o != me && !set.contains(&o)).collect();
    for j in 0..fanout.min(others.len()) {
        set.insert(others[(cursor + j) % others.len()]);
    }
    set.remove(&me);
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_placement() {
        assert_eq!(replica_targets(Placement::Ring, 4, 0, 1), [1]);
        assert_eq!(replica_targets(Placement::Ring, 4, 3, 2), [0, 1]);
        assert_eq!(replica_targets(Placement::Ring, 2, 1, 5), [0]);
    }

    #[test]
    fn group_placement() {
        // Groups {0,1} {2,3}.
        assert_eq!(replica_targets(Placement::Group, 4, 0, 1), [1]);
        assert_eq!(replica_targets(Placement::Group, 4, 3, 1), [2]);
        // 5 nodes, k=1: groups {0,1} {2,3,4}: the last group takes the remainder.
        assert_eq!(replica_targets(Placement::Group, 5, 4, 1), [2, 3]);
        // 6 nodes, k=2: groups {0,1,2} {3,4,5}.
        assert_eq!(replica_targets(Placement::Group, 6, 4, 2), [3, 5]);
    }

    #[test]
    fn placement_follows_the_member_order() {
        let order: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert_eq!(targets_of(Placement::Ring, &order, "c", 1), ["a"]);
        let joined: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        assert_eq!(targets_of(Placement::Ring, &joined, "c", 1), ["d"], "a join moves c's copies to d");
        assert!(targets_of(Placement::Ring, &order, "z", 1).is_empty());
    }

    #[test]
    fn probing_cost_stays_flat_as_the_cluster_grows() {
        for n in [4usize, 64, 1024, 4096] {
            let set = probe_set(Placement::Ring, n, 7 % n, 1, 2, 0);
            assert!(set.len() <= 4, "n={n}: {set:?}");
            assert!(set.contains(&((7 + 1) % n)) && set.contains(&((7 + n - 1) % n)), "n={n}: {set:?}");
        }
        // Every node is probed by someone within n / fanout rounds.
        let n = 10;
        let mut seen = BTreeSet::new();
        for round in 0..n {
            seen.extend(probe_set(Placement::Group, n, 0, 1, 2, round * 2));
        }
        assert_eq!(seen.len(), n - 1, "{seen:?}");
        assert!(probe_set(Placement::Ring, 1, 0, 1, 2, 0).is_empty());
    }
}
