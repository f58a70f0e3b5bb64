//! The index of the memory tier: its steps, their shards, reservations and
//! leases, all under one mutex.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use tierckpt_format::{Manifest, ShardKey};

use super::pool::Pooled;
use super::seal::Reservation;
use crate::StepSummary;

/// A shard of a step: being checksummed, or visible.
#[derive(Debug)]
pub(super) enum Shard {
    Sealing { len: u64 },
    Sealed { manifest: Arc<Manifest> },
}

impl Shard {
    /// Bytes of the shard's file.
    pub(super) fn len(&self) -> u64 {
        match self {
            Shard::Sealing { len } => *len,
            Shard::Sealed { manifest } => manifest.file_len,
        }
    }
}

/// One step of a namespace.
#[derive(Debug)]
pub(super) struct Step {
    /// Ranks in the step, fixed by its first writer.
    pub(super) world_size: u32,
    /// Shards by rank, sealed or being sealed.
    pub(super) shards: BTreeMap<u32, Shard>,
    /// Ranks reserved and being written.
    pub(super) reserved: BTreeSet<u32>,
    /// Deleted while ranks were being written: hidden, and what they seal
    /// is dropped.
    pub(super) deleted: bool,
}

impl Step {
    /// An empty step of `world_size` ranks.
    pub(super) fn new(world_size: u32) -> Self {
        Step { world_size, shards: BTreeMap::new(), reserved: BTreeSet::new(), deleted: false }
    }
}

impl Step {
    /// The visible shards and their manifests.
    pub(super) fn sealed(&self) -> impl Iterator<Item = (&u32, &Arc<Manifest>)> {
        self.shards.iter().filter_map(|(r, s)| match s {
            Shard::Sealed { manifest } => Some((r, manifest)),
            Shard::Sealing { .. } => None,
        })
    }

    /// Every rank is visible.
    pub(super) fn complete(&self) -> bool {
        self.sealed().count() == self.world_size as usize
    }

    /// A rank is being checksummed.
    pub(super) fn sealing(&self) -> bool {
        self.shards.values().any(|s| matches!(s, Shard::Sealing { .. }))
    }

    /// A rank is being written or sealed.
    pub(super) fn busy(&self) -> bool {
        !self.reserved.is_empty() || self.sealing()
    }

    /// Bytes of every shard of the step.
    pub(super) fn bytes(&self) -> u64 {
        self.shards.values().map(Shard::len).sum()
    }

    /// The step as listed to clients.
    pub(super) fn summary(&self, step: u64) -> StepSummary {
        let ranks: Vec<u32> = self.sealed().map(|(r, _)| *r).collect();
        let mut in_progress: Vec<u32> = self
            .shards
            .iter()
            .filter(|(_, s)| matches!(s, Shard::Sealing { .. }))
            .map(|(r, _)| *r)
            .chain(self.reserved.iter().copied())
            .collect();
        in_progress.sort_unstable();
        StepSummary {
            step,
            world_size: self.world_size,
            complete: ranks.len() == self.world_size as usize,
            ranks,
            in_progress,
            bytes: self.bytes(),
            created_unix_ms: self.sealed().map(|(_, m)| m.created_unix_ms).max().unwrap_or(0),
        }
    }
}

/// Everything the tier holds, under [`super::MemoryTier`]'s one mutex.
#[derive(Debug, Default)]
pub(super) struct State {
    /// Steps by namespace and number.
    pub(super) steps: BTreeMap<(String, u64), Step>,
    /// Open reservations by id.
    pub(super) reservations: HashMap<u64, Reservation>,
    /// Shards whose last seal failed, and why.
    pub(super) failed: HashMap<ShardKey, String>,
    /// Recycled segments.
    pub(super) pool: Vec<Pooled>,
    /// Next id of a reservation or a pooled file.
    pub(super) next_id: u64,
    /// Bytes held: shards, reservations and pooled segments.
    pub(super) used: u64,
    /// Steps known to be complete across a cluster (every rank held by some
    /// live node), though this node holds only some ranks of them.
    pub(super) known_complete: HashMap<String, BTreeSet<u64>>,
    /// Steps the job declared complete (its ranks agreed every shard is
    /// visible), before the cluster view shows it; dropped with the step.
    pub(super) declared_complete: HashMap<String, BTreeSet<u64>>,
    /// Shards mapped by readers: when dropped they are unlinked, never
    /// recycled, so what a reader maps never changes under it.
    pub(super) leases: HashMap<ShardKey, usize>,
    /// When a namespace (step `None`) or a step was deleted here, in ms since
    /// the epoch: a replica sealed before then is refused.
    pub(super) tombstones: HashMap<(String, Option<u64>), u64>,
    /// Bytes held for a moment and counted in `used`: the segment the
    /// filler is faulting in, tails of pooled segments being cut off.
    pub(super) transient: u64,
    /// The filler is faulting a segment in now.
    pub(super) filling: bool,
    /// A reservation waits for room: the filler gives its segment up.
    pub(super) fill_yield: bool,
    /// The filler is to stop.
    pub(super) fill_stop: bool,
    /// Sizes of the latest reservations, newest first.
    pub(super) recent_sizes: VecDeque<u64>,
    /// Reservations served from a pooled segment.
    pub(super) from_pool: u64,
    /// Reservations served from a fresh file.
    pub(super) fresh: u64,
    /// Per namespace, the steps retention keeps and memory pressure evicts
    /// last: the one the drain to the persistent tier works on, and those
    /// pinned by hand or by a training signal.
    pub(super) pinned: HashMap<String, Pinned>,
}

/// The pinned steps of one namespace.
#[derive(Debug, Default)]
pub(super) struct Pinned {
    /// The step the drain works on.
    pub(super) drain: Option<u64>,
    /// Steps pinned by a client (`pin`), until unpinned.
    pub(super) kept: BTreeSet<u64>,
}

impl State {
    /// Whether retention must keep `step` of `ns` (and eviction take it last).
    pub(super) fn is_pinned(&self, ns: &str, step: u64) -> bool {
        self.pinned.get(ns).is_some_and(|p| p.drain == Some(step) || p.kept.contains(&step))
    }

    /// Complete here, known complete across the cluster, or declared
    /// complete by the job.
    pub(super) fn settled(&self, ns: &str, step: u64, s: &Step) -> bool {
        let has = |sets: &HashMap<String, BTreeSet<u64>>| sets.get(ns).is_some_and(|set| set.contains(&step));
        s.complete() || has(&self.known_complete) || has(&self.declared_complete)
    }
}
