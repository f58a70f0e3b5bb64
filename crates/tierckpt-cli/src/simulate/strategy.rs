//! The four strategies compared, as tier plans for the engine: tierckpt
//! (memory + k peers + persistent, adaptive interval, in-process recovery),
//! persistent-only with DCP async saves, HyperPod's managed tiered
//! checkpointing as published (memory + a fixed replication + S3, full
//! restarts), and the bound (checkpoints free, nothing lost).

use super::engine::{daly, Plan, Tier};
use super::params::{Kind, Params};

/// Which strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Memory + k peers + persistent, Daly interval, in-process recovery.
    Tierckpt,
    /// DCP `async_save` to persistent storage only, full restarts.
    DcpAsync,
    /// HyperPod managed tiered checkpointing: memory + adjacent copies + S3, full restarts.
    HyperPod,
    /// No checkpoint cost, no work lost; recovery as tierckpt's without a restore.
    Bound,
}

impl Strategy {
    /// Every strategy, in report order.
    pub const ALL: [Strategy; 4] = [Strategy::Tierckpt, Strategy::DcpAsync, Strategy::HyperPod, Strategy::Bound];

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Tierckpt => "tierckpt",
            Strategy::DcpAsync => "dcp_async_persistent",
            Strategy::HyperPod => "hyperpod_tiered",
            Strategy::Bound => "bound_free_checkpoints",
        }
    }
}

/// The plan for a strategy, and the memory each node gives it (bytes).
pub struct Built {
    /// The tiers and restart costs.
    pub plan: Plan,
    /// Memory per node held by checkpoints, bytes.
    pub memory_per_node: f64,
}

/// Steps between checkpoints whose blocking cost is `stall_s`, by Daly's
/// optimum against every failure's rate.
pub fn steps_between(p: &Params, stall_s: f64) -> u64 {
    let m = 1.0 / p.rates_per_s().iter().sum::<f64>();
    let tau = daly(stall_s, m);
    if tau.is_finite() {
        ((tau / p.step_s).round() as u64).clamp(1, p.steps)
    } else {
        p.steps
    }
}

/// Steps between persistent copies: every `persist_s` seconds, or slower when
/// the drain takes longer; a multiple of the memory interval.
fn persist_steps(p: &Params, every: u64, persist_s: f64) -> u64 {
    let drain = p.node_bytes() / p.storage_per_node_bps();
    let per = (persist_s.max(drain) / (every as f64 * p.step_s)).ceil().max(1.0) as u64;
    per * every
}

/// A memory tier: a device-to-host copy (at `stage_bps`) that survives a process crash.
fn memory(p: &Params, every: u64, stage_bps: f64) -> Tier {
    Tier {
        name: "memory",
        every,
        stall_s: p.gpu_bytes() / stage_bps,
        lag_s: 0.0,
        survives: [true, false, false],
        restore_s: [p.gpu_bytes() / p.h2d_bps; 3],
        net_bytes_per_node: 0.0,
    }
}

/// A peer tier: `k` copies streamed to other nodes (on other racks with `rack_aware`).
fn peers(p: &Params, every: u64, k: u64, rack_aware: bool) -> Tier {
    let fetch = p.node_bytes() / p.net_bps;
    Tier {
        name: "peer",
        every,
        stall_s: 0.0,
        lag_s: k as f64 * p.node_bytes() / p.net_bps,
        survives: [true, true, rack_aware && p.racks() > 1],
        restore_s: [fetch; 3],
        net_bytes_per_node: k as f64 * p.node_bytes(),
    }
}

/// The persistent tier: drained in the background unless `stall_s` says otherwise.
fn persistent(p: &Params, every: u64, stall_s: f64) -> Tier {
    let io = p.node_bytes() / p.storage_per_node_bps();
    Tier {
        name: "persistent",
        every,
        stall_s,
        lag_s: io,
        survives: [true; 3],
        restore_s: [io; 3],
        net_bytes_per_node: p.node_bytes(),
    }
}

/// Restart costs by kind: detection, a spare for lost nodes, then `restart_s`.
fn restarts(p: &Params, restart_s: f64) -> [f64; 3] {
    Kind::ALL.map(|k| p.detect_s + if k == Kind::Crash { 0.0 } else { p.replace_s } + restart_s)
}

/// Builds a strategy's plan for `p`; `persist_s` is the persistent interval of the tiered ones.
pub fn build(s: Strategy, p: &Params, persist_s: f64) -> Built {
    let node = p.node_bytes();
    match s {
        Strategy::Tierckpt => {
            let every = steps_between(p, p.gpu_bytes() / p.d2h_bps);
            let mut tiers = vec![memory(p, every, p.d2h_bps)];
            if p.k > 0 {
                tiers.push(peers(p, every, p.k, p.rack_aware));
            }
            tiers.push(persistent(p, persist_steps(p, every, persist_s), 0.0));
            Built { plan: Plan { tiers, restart_s: restarts(p, p.inprocess_s) }, memory_per_node: p.memory_needed(p.k) }
        }
        Strategy::DcpAsync => {
            let stall = p.gpu_bytes() / p.dcp_stage_bps;
            let every = steps_between(p, stall);
            // The next save waits for the previous upload: never more often than it takes.
            let every = every.max(persist_steps(p, 1, 0.0));
            Built {
                plan: Plan { tiers: vec![persistent(p, every, stall)], restart_s: restarts(p, p.restart_s) },
                memory_per_node: node,
            }
        }
        Strategy::HyperPod => {
            let every = steps_between(p, p.gpu_bytes() / p.dcp_stage_bps);
            let mut tiers = vec![memory(p, every, p.dcp_stage_bps)];
            if p.hyperpod_k > 0 {
                tiers.push(peers(p, every, p.hyperpod_k, false));
            }
            tiers.push(persistent(p, persist_steps(p, every, persist_s), 0.0));
            Built {
                plan: Plan { tiers, restart_s: restarts(p, p.restart_s) },
                memory_per_node: p.memory_needed(p.hyperpod_k),
            }
        }
        Strategy::Bound => {
            let free = Tier {
                name: "free",
                every: 1,
                stall_s: 0.0,
                lag_s: 0.0,
                survives: [true; 3],
                restore_s: [0.0; 3],
                net_bytes_per_node: 0.0,
            };
            Built { plan: Plan { tiers: vec![free], restart_s: restarts(p, p.inprocess_s) }, memory_per_node: 0.0 }
        }
    }
}
