//! `tierckpt simulate`: the goodput of a training job under failures (process
//! crashes, node losses, rack losses, stragglers), by strategy, from a seeded
//! discrete-event simulation; or, with `--from-demo`, the goodput the demo's
//! own measured costs and failure schedule predict.
//!
//! `params` holds the job, the rates and the costs and refuses bad input;
//! `costs` reads measured rates from benchmark reports; `engine` is the event loop; `strategy` turns each strategy into tiers;
//! `demo_fit` reads a demo report; `report` prints the results.

mod costs;
pub mod demo_fit;
mod engine;
mod params;
pub mod report;
mod strategy;

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use tierckpt_harness::size::parse_size;

pub use engine::{daly, simulate, Outcome, Plan, Schedule, Tier};
pub use params::{Kind, Params, GIB};
pub use strategy::{build, steps_between, Strategy};

/// `tierckpt simulate`'s flags. Defaults: docs/GOODPUT.md names each one's source.
#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Nodes in the job.
    #[arg(long, default_value_t = 64)]
    pub nodes: u64,
    /// GPUs (ranks) per node.
    #[arg(long, default_value_t = 8)]
    pub gpus_per_node: u64,
    /// Nodes per rack: the nodes a rack loss takes together.
    #[arg(long, default_value_t = 2)]
    pub nodes_per_rack: u64,
    /// The whole training state (weights + optimizer), e.g. "1.12TB" (70B x 16 B/param).
    #[arg(long, default_value = "1120GB", value_parser = parse_size)]
    pub state_bytes: u64,
    /// Seconds per training step.
    #[arg(long, default_value_t = 5.0, allow_negative_numbers = true)]
    pub step_s: f64,
    /// Steps the job must complete.
    #[arg(long, default_value_t = 100_000)]
    pub steps: u64,
    /// Host memory per node for checkpoints.
    #[arg(long, default_value = "2TiB", value_parser = parse_size)]
    pub memory_per_node: u64,
    /// tierckpt's peer copies of each shard.
    #[arg(long, default_value_t = 1)]
    pub k: u64,
    /// Where tierckpt puts its peer copies: "rack" (other racks) or "ring" (the next nodes).
    #[arg(long, default_value = "rack", value_parser = ["rack", "ring"])]
    pub placement: String,
    /// Steps each node's memory tier keeps.
    #[arg(long, default_value_t = 2)]
    pub keep_last: u64,
    /// Process crashes per GPU-hour.
    #[arg(long, default_value_t = 2.97e-6, allow_negative_numbers = true)]
    pub crash_per_gpu_hour: f64,
    /// Node losses per node-hour.
    #[arg(long, default_value_t = 1.21e-4, allow_negative_numbers = true)]
    pub node_loss_per_node_hour: f64,
    /// Rack losses per rack-hour.
    #[arg(long, default_value_t = 2.64e-5, allow_negative_numbers = true)]
    pub rack_loss_per_rack_hour: f64,
    /// Stragglers per node-hour.
    #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true)]
    pub straggler_per_node_hour: f64,
    /// A straggler's step time over the normal one.
    #[arg(long, default_value_t = 1.5, allow_negative_numbers = true)]
    pub straggler_slowdown: f64,
    /// Seconds a straggler lasts before it is found and fixed.
    #[arg(long, default_value_t = 600.0, allow_negative_numbers = true)]
    pub straggler_s: f64,
    /// Device-to-host GiB/s per GPU (tierckpt's blocking copy) [default: --costs' save_gibps, else 51.3].
    #[arg(long, allow_negative_numbers = true)]
    pub d2h_gibps: Option<f64>,
    /// Host-to-device GiB/s per GPU (a restore from local memory) [default: --costs' restore_gibps, else 50.6].
    #[arg(long, allow_negative_numbers = true)]
    pub h2d_gibps: Option<f64>,
    /// DCP async_save GiB/s per GPU while the caller is blocked.
    #[arg(long, default_value_t = 1.41, allow_negative_numbers = true)]
    pub dcp_stage_gibps: f64,
    /// Network GiB/s per node for checkpoint copies [default: --costs' replicate_gibps, else 11.6].
    #[arg(long, allow_negative_numbers = true)]
    pub net_gibps: Option<f64>,
    /// Persistent storage GiB/s for the whole cluster.
    #[arg(long, default_value_t = 1862.0, allow_negative_numbers = true)]
    pub storage_gibps: f64,
    /// Persistent storage GiB/s per node at most [default: --costs' persist_gibps, else 2].
    #[arg(long, allow_negative_numbers = true)]
    pub storage_node_gibps: Option<f64>,
    /// Seconds from a failure until the job notices.
    #[arg(long, default_value_t = 30.0, allow_negative_numbers = true)]
    pub detect_s: f64,
    /// Seconds to bring in a spare node for a lost one.
    #[arg(long, default_value_t = 120.0, allow_negative_numbers = true)]
    pub replace_s: f64,
    /// Seconds of a full restart (processes, rendezvous, model), before the restore.
    #[arg(long, default_value_t = 900.0, allow_negative_numbers = true)]
    pub restart_s: f64,
    /// Seconds of an in-process recovery (survivors keep their processes), before the restore.
    #[arg(long, default_value_t = 90.0, allow_negative_numbers = true)]
    pub inprocess_s: f64,
    /// Peer copies HyperPod's managed tiered checkpointing keeps (adjacent nodes).
    #[arg(long, default_value_t = 1)]
    pub hyperpod_k: u64,
    /// Seconds between persistent copies of the tiered strategies (slower if the drain is).
    #[arg(long, default_value_t = 1800.0, allow_negative_numbers = true)]
    pub persist_s: f64,
    /// Runs (seeds) averaged.
    #[arg(long, default_value_t = 5)]
    pub runs: u64,
    /// The first run's seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A `tierckpt bench memory|replicate|persist --json` report whose measured
    /// rates replace the defaults of the bandwidth flags (repeatable; flags given win).
    #[arg(long, value_name = "BENCH.json")]
    pub costs: Vec<PathBuf>,
    /// Predict the goodput of a `tierckpt demo --json` report from its measured costs and failures
    /// (the other flags are then ignored).
    #[arg(long, value_name = "REPORT.json")]
    pub from_demo: Option<PathBuf>,
}

impl SimulateArgs {
    /// The parameters the flags describe, checked.
    pub fn params(&self) -> Result<Params> {
        let gib = |v: f64| v * GIB;
        let bench = costs::BenchCosts::read(&self.costs)?;
        let p = Params {
            nodes: self.nodes,
            gpus_per_node: self.gpus_per_node,
            nodes_per_rack: self.nodes_per_rack,
            state_bytes: self.state_bytes as f64,
            step_s: self.step_s,
            steps: self.steps,
            memory_per_node: self.memory_per_node as f64,
            k: self.k,
            rack_aware: self.placement == "rack",
            keep_last: self.keep_last,
            crash_per_gpu_hour: self.crash_per_gpu_hour,
            node_loss_per_node_hour: self.node_loss_per_node_hour,
            rack_loss_per_rack_hour: self.rack_loss_per_rack_hour,
            straggler_per_node_hour: self.straggler_per_node_hour,
            straggler_slowdown: self.straggler_slowdown,
            straggler_s: self.straggler_s,
            d2h_bps: gib(self.d2h_gibps.or(bench.save_gibps).unwrap_or(51.3)),
            h2d_bps: gib(self.h2d_gibps.or(bench.restore_gibps).unwrap_or(50.6)),
            dcp_stage_bps: gib(self.dcp_stage_gibps),
            net_bps: gib(self.net_gibps.or(bench.replicate_gibps).unwrap_or(11.6)),
            storage_bps: gib(self.storage_gibps),
            storage_node_bps: gib(self.storage_node_gibps.or(bench.persist_gibps).unwrap_or(2.0)),
            detect_s: self.detect_s,
            replace_s: self.replace_s,
            restart_s: self.restart_s,
            inprocess_s: self.inprocess_s,
            hyperpod_k: self.hyperpod_k,
        };
        p.validate()?;
        anyhow::ensure!(
            self.persist_s.is_finite() && self.persist_s >= 0.0,
            "--persist-s must be a finite number at least 0, got {}",
            self.persist_s
        );
        anyhow::ensure!(self.runs > 0, "--runs must be at least 1, got 0");
        Ok(p)
    }
}

/// Runs `tierckpt simulate`: JSON with `json`, else a table.
pub fn run(a: &SimulateArgs, json: bool) -> Result<()> {
    if let Some(path) = &a.from_demo {
        let fit = demo_fit::predict(path)?;
        report::print_demo(&fit, json);
        return Ok(());
    }
    let p = a.params()?;
    let results = report::compare(&p, a.persist_s, a.runs, a.seed);
    report::print(&p, &results, json);
    Ok(())
}

#[cfg(test)]
mod tests;
