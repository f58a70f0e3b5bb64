//! Replication owed to each placement target, for the lag metrics: shards
//! queued for it that it does not hold yet, and its last successful push.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use tierckpt_format::ShardKey;
use tierckpt_proto::Holdings;

use super::{lock, Cluster};

/// Shards queued for one target and not known there yet (since when), and
/// its last successful push.
#[derive(Default)]
pub(super) struct Backlog {
    pending: BTreeMap<ShardKey, Instant>,
    last_success: Option<SystemTime>,
}

/// Entries a backlog keeps before it drops those no longer held here.
const BACKLOG_PRUNE_AT: usize = 1024;

/// Replication owed to one peer (see [`Cluster::peer_lag`]).
#[derive(Debug, Clone)]
pub struct PeerLag {
    /// The peer's id.
    pub peer: String,
    /// Shards sealed here and queued for it that it does not hold yet.
    pub pending: u64,
    /// How long the oldest of them has waited.
    pub oldest_pending: Option<Duration>,
    /// When a push to it last succeeded.
    pub last_success: Option<SystemTime>,
}

impl Cluster {
    /// Notes `key` as owed to each of this node's placement targets.
    pub(super) fn owe(&self, key: &ShardKey) {
        let mut backlog = lock(&self.backlog);
        for t in self.my_targets() {
            let b = backlog.entry(t).or_default();
            if b.pending.len() >= BACKLOG_PRUNE_AT {
                b.pending.retain(|k, _| self.tier.locate(k).is_ok());
            }
            b.pending.entry(key.clone()).or_insert_with(Instant::now);
        }
    }

    /// `t` holds `key` now; `pushed`: a push to it just succeeded.
    pub(super) fn delivered(&self, t: &str, key: &ShardKey, pushed: bool) {
        let mut backlog = lock(&self.backlog);
        let b = backlog.entry(t.to_string()).or_default();
        b.pending.remove(key);
        if pushed {
            b.last_success = Some(SystemTime::now());
        }
    }

    /// What each placement target is owed: shards queued for it that it does
    /// not hold yet (neither pushed nor shown in its last heartbeat, and
    /// still held here), the oldest one's wait, and its last good push.
    pub fn peer_lag(&self) -> Vec<PeerLag> {
        let targets = self.my_targets();
        let held_there: Vec<Option<Holdings>> = {
            let members = lock(&self.members);
            targets.iter().map(|t| members.get(t).and_then(|m| m.holdings.clone())).collect()
        };
        let mut backlog = lock(&self.backlog);
        backlog.retain(|t, _| targets.contains(t));
        let now = Instant::now();
        targets
            .iter()
            .zip(held_there)
            .map(|(t, holdings)| {
                let b = backlog.entry(t.clone()).or_default();
                b.pending.retain(|k, _| {
                    let there = holdings.as_ref().is_some_and(|h| {
                        h.namespaces
                            .get(&k.namespace)
                            .is_some_and(|steps| steps.iter().any(|s| s.step == k.step && s.ranks.contains(&k.rank)))
                    });
                    !there && self.tier.locate(k).is_ok()
                });
                PeerLag {
                    peer: t.clone(),
                    pending: b.pending.len() as u64,
                    oldest_pending: b.pending.values().min().map(|&at| now - at),
                    last_success: b.last_success,
                }
            })
            .collect()
    }
}
