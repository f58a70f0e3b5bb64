//! The simulated job and cluster: sizes, failure rates and per-tier costs,
//! with their defaults (each named, with its source, in docs/GOODPUT.md), and
//! the checks that refuse bad input by naming the flag.

use anyhow::{bail, Result};

/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;
/// Seconds in an hour.
pub(crate) const HOUR: f64 = 3600.0;

/// What a failure takes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A training process dies; its node and the node's memory survive.
    Crash,
    /// A node is lost with its memory; a spare replaces it.
    NodeLoss,
    /// Every node of one rack (failure domain) is lost with its memory.
    RackLoss,
}

impl Kind {
    /// Every kind, in the order of the per-kind arrays.
    pub const ALL: [Kind; 3] = [Kind::Crash, Kind::NodeLoss, Kind::RackLoss];

    /// The index into per-kind arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name in reports.
    pub fn name(self) -> &'static str {
        ["process_crash", "node_loss", "rack_loss"][self.index()]
    }
}

/// The job, the cluster, the failure rates and the costs of each tier.
#[derive(Debug, Clone)]
pub struct Params {
    /// Nodes in the job.
    pub nodes: u64,
    /// GPUs (ranks) per node.
    pub gpus_per_node: u64,
    /// Nodes per rack, the unit a rack loss takes.
    pub nodes_per_rack: u64,
    /// The whole training state (weights, optimizer), bytes.
    pub state_bytes: f64,
    /// Seconds per training step without failures or checkpoints.
    pub step_s: f64,
    /// Steps of useful work the job must do.
    pub steps: u64,
    /// Host memory per node available to checkpoints, bytes.
    pub memory_per_node: f64,
    /// Peer copies of each shard (tierckpt).
    pub k: u64,
    /// Peer copies on other racks (tierckpt), so a rack loss keeps them.
    pub rack_aware: bool,
    /// Steps each node's memory tier keeps.
    pub keep_last: u64,
    /// Process crashes per GPU-hour.
    pub crash_per_gpu_hour: f64,
    /// Node losses per node-hour.
    pub node_loss_per_node_hour: f64,
    /// Rack losses per rack-hour.
    pub rack_loss_per_rack_hour: f64,
    /// Stragglers per node-hour.
    pub straggler_per_node_hour: f64,
    /// A straggler's step time over the normal one.
    pub straggler_slowdown: f64,
    /// Seconds a straggler lasts before it is found and fixed.
    pub straggler_s: f64,
    /// Device-to-host copy per GPU, bytes/s (tierckpt's blocking copy).
    pub d2h_bps: f64,
    /// Host-to-device copy per GPU, bytes/s (a restore from local memory).
    pub h2d_bps: f64,
    /// DCP `async_save` staging per GPU, bytes/s (the time the caller is blocked).
    pub dcp_stage_bps: f64,
    /// Network per node for checkpoint copies, bytes/s.
    pub net_bps: f64,
    /// Persistent storage for the whole cluster, bytes/s.
    pub storage_bps: f64,
    /// Persistent storage per node at most, bytes/s.
    pub storage_node_bps: f64,
    /// Seconds from a failure until the job notices.
    pub detect_s: f64,
    /// Seconds to bring a spare node in for a lost one.
    pub replace_s: f64,
    /// Seconds for a full restart: every process anew, rendezvous, model built.
    pub restart_s: f64,
    /// Seconds for an in-process recovery: survivors keep their processes.
    pub inprocess_s: f64,
    /// Peer copies HyperPod's managed tiered checkpointing keeps.
    pub hyperpod_k: u64,
}

impl Params {
    /// GPUs in the job.
    pub fn gpus(&self) -> u64 {
        self.nodes * self.gpus_per_node
    }

    /// Racks in the job (the last may be partly filled).
    pub fn racks(&self) -> u64 {
        self.nodes.div_ceil(self.nodes_per_rack)
    }

    /// State bytes per node.
    pub fn node_bytes(&self) -> f64 {
        self.state_bytes / self.nodes as f64
    }

    /// State bytes per GPU.
    pub fn gpu_bytes(&self) -> f64 {
        self.node_bytes() / self.gpus_per_node as f64
    }

    /// Persistent storage bandwidth one node gets when every node reads or writes.
    pub fn storage_per_node_bps(&self) -> f64 {
        (self.storage_bps / self.nodes as f64).min(self.storage_node_bps)
    }

    /// Job-wide failure rates per second, by kind.
    pub fn rates_per_s(&self) -> [f64; 3] {
        [
            self.crash_per_gpu_hour * self.gpus() as f64 / HOUR,
            self.node_loss_per_node_hour * self.nodes as f64 / HOUR,
            self.rack_loss_per_rack_hour * self.racks() as f64 / HOUR,
        ]
    }

    /// Job-wide stragglers per second.
    pub fn straggler_rate_per_s(&self) -> f64 {
        self.straggler_per_node_hour * self.nodes as f64 / HOUR
    }

    /// Memory a node needs for tierckpt: its own kept steps and its peers'.
    pub fn memory_needed(&self, k: u64) -> f64 {
        (self.keep_last * (1 + k)) as f64 * self.node_bytes()
    }

    /// Refuses input that makes no sense, naming the flag.
    pub fn validate(&self) -> Result<()> {
        for (flag, n) in [("--nodes", self.nodes), ("--gpus-per-node", self.gpus_per_node), ("--steps", self.steps)] {
            if n == 0 {
                bail!("{flag} must be at least 1, got 0");
            }
        }
        if self.nodes_per_rack == 0 {
            bail!("--nodes-per-rack must be at least 1, got 0");
        }
        if self.keep_last == 0 {
            bail!("--keep-last must be at least 1, got 0");
        }
        let rates = [
            ("--crash-per-gpu-hour", self.crash_per_gpu_hour),
            ("--node-loss-per-node-hour", self.node_loss_per_node_hour),
            ("--rack-loss-per-rack-hour", self.rack_loss_per_rack_hour),
            ("--straggler-per-node-hour", self.straggler_per_node_hour),
            ("--straggler-s", self.straggler_s),
            ("--detect-s", self.detect_s),
            ("--replace-s", self.replace_s),
            ("--restart-s", self.restart_s),
            ("--inprocess-s", self.inprocess_s),
        ];
        for (flag, v) in rates {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{flag} must be a finite number at least 0, got {v}");
            }
        }
        let positive = [
            ("--state-bytes", self.state_bytes),
            ("--step-s", self.step_s),
            ("--memory-per-node", self.memory_per_node),
            ("--d2h-gibps", self.d2h_bps),
            ("--h2d-gibps", self.h2d_bps),
            ("--dcp-stage-gibps", self.dcp_stage_bps),
            ("--net-gibps", self.net_bps),
            ("--storage-gibps", self.storage_bps),
            ("--storage-node-gibps", self.storage_node_bps),
        ];
        for (flag, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                bail!("{flag} must be a finite number above 0, got {v}");
            }
        }
        if self.straggler_slowdown.is_nan() || self.straggler_slowdown < 1.0 {
            bail!("--straggler-slowdown must be at least 1 (a step time ratio), got {}", self.straggler_slowdown);
        }
        for (flag, k) in [("--k", self.k), ("--hyperpod-k", self.hyperpod_k)] {
            if k >= self.nodes {
                bail!(
                    "{flag} {k} must be less than --nodes {}: a node cannot hold a peer copy of its own shard",
                    self.nodes
                );
            }
        }
        let need = self.memory_needed(self.k);
        if need > self.memory_per_node {
            bail!(
                "--state-bytes {:.0} does not fit: each node needs {:.1} GiB ({} kept steps x (1 + --k {}) x {:.1} GiB per node) \
                 but --memory-per-node is {:.1} GiB; add nodes, lower --k or --keep-last, or raise --memory-per-node",
                self.state_bytes,
                need / GIB,
                self.keep_last,
                self.k,
                self.node_bytes() / GIB,
                self.memory_per_node / GIB
            );
        }
        Ok(())
    }
}
