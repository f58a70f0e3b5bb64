//! The results: each strategy averaged over seeded runs, as one JSON object
//! or a table; and the demo prediction beside the demo's measured goodput.

use comfy_table::Table;
use serde_json::{json, Value};

use super::demo_fit::DemoFit;
use super::engine::{simulate, Outcome, Schedule};
use super::params::{Kind, Params, GIB};
use super::strategy::{build, Strategy};
use crate::output::print_json;

/// One strategy's results, averaged over runs.
pub struct StrategyResult {
    /// Which strategy.
    pub strategy: Strategy,
    /// Each run's outcome.
    pub runs: Vec<Outcome>,
    /// Seconds of work between checkpoints, by tier name.
    pub intervals: Vec<(&'static str, f64)>,
    /// Memory per node held by checkpoints, bytes.
    pub memory_per_node: f64,
}

impl StrategyResult {
    fn mean(&self, f: impl Fn(&Outcome) -> f64) -> f64 {
        self.runs.iter().map(f).sum::<f64>() / self.runs.len() as f64
    }

    /// Mean goodput over the runs.
    pub fn goodput(&self) -> f64 {
        self.mean(Outcome::goodput)
    }

    fn failures(&self) -> f64 {
        self.mean(|o| o.failures.iter().sum::<u64>() as f64)
    }

    fn to_json(&self) -> Value {
        let share = |f: fn(&Outcome) -> f64| self.mean(|o| f(o) / o.wall_s);
        let per_failure = |f: fn(&Outcome) -> f64| {
            let n: u64 = self.runs.iter().map(|o| o.failures.iter().sum::<u64>()).sum();
            (n > 0).then(|| self.runs.iter().map(f).sum::<f64>() / n as f64)
        };
        let goodputs: Vec<f64> = self.runs.iter().map(Outcome::goodput).collect();
        json!({
            "strategy": self.strategy.name(),
            "goodput": self.goodput(),
            "goodput_min": goodputs.iter().copied().fold(f64::INFINITY, f64::min),
            "goodput_max": goodputs.iter().copied().fold(0.0, f64::max),
            "checkpoint_overhead": share(|o| o.stall_s),
            "lost_work": share(|o| o.lost_s),
            "recovery": share(|o| o.recovery_s),
            "straggler": share(|o| o.straggler_s),
            "lost_s_per_failure": per_failure(|o| o.lost_s),
            "recovery_s_per_failure": per_failure(|o| o.recovery_s),
            "failures": self.failures(),
            "failures_by_kind": Kind::ALL.iter().map(|k| (k.name().to_string(), json!(self.mean(|o| o.failures[k.index()] as f64))))
                .collect::<serde_json::Map<_, _>>(),
            "interval_s": self.intervals.iter().map(|(n, s)| (n.to_string(), json!(s))).collect::<serde_json::Map<_, _>>(),
            "wall_s": self.mean(|o| o.wall_s),
            "network_bytes_per_s_per_node": self.mean(|o| o.net_bytes_per_node / o.wall_s),
            "memory_bytes_per_node": self.memory_per_node,
        })
    }
}

/// Runs every strategy `runs` times (seeds `seed..`), the same failures for each seed.
pub fn compare(p: &Params, persist_s: f64, runs: u64, seed: u64) -> Vec<StrategyResult> {
    let schedule = Schedule::Poisson {
        rates: p.rates_per_s(),
        straggler_rate: p.straggler_rate_per_s(),
        slowdown: p.straggler_slowdown,
        straggler_s: p.straggler_s,
    };
    Strategy::ALL
        .iter()
        .map(|&s| {
            let built = build(s, p, persist_s);
            let runs = (seed..seed + runs).map(|sd| simulate(&built.plan, p.steps, p.step_s, &schedule, sd)).collect();
            let intervals = built.plan.tiers.iter().map(|t| (t.name, t.every as f64 * p.step_s)).collect();
            StrategyResult { strategy: s, runs, intervals, memory_per_node: built.memory_per_node }
        })
        .collect()
}

/// The inputs, as the JSON echoes them.
fn params_json(p: &Params) -> Value {
    let rates = p.rates_per_s();
    json!({
        "nodes": p.nodes, "gpus_per_node": p.gpus_per_node, "nodes_per_rack": p.nodes_per_rack,
        "state_bytes": p.state_bytes, "state_bytes_per_node": p.node_bytes(), "step_s": p.step_s, "steps": p.steps,
        "k": p.k, "placement": if p.rack_aware { "rack" } else { "ring" }, "keep_last": p.keep_last,
        "mtbf_s": 1.0 / rates.iter().sum::<f64>(),
        "failures_per_hour": Kind::ALL.iter().map(|k| (k.name().to_string(), json!(rates[k.index()] * 3600.0)))
            .collect::<serde_json::Map<_, _>>(),
        "storage_bytes_per_s_per_node": p.storage_per_node_bps(),
        "d2h_gibps": p.d2h_bps / GIB, "h2d_gibps": p.h2d_bps / GIB, "net_gibps": p.net_bps / GIB,
        "storage_node_gibps": p.storage_node_bps / GIB,
    })
}

/// Prints the comparison: JSON with `json`, else a table.
pub fn print(p: &Params, results: &[StrategyResult], json: bool) {
    if json {
        print_json(&json!({
            "params": params_json(p),
            "strategies": results.iter().map(StrategyResult::to_json).collect::<Vec<_>>(),
        }));
        return;
    }
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(vec![
        "strategy",
        "goodput",
        "ckpt overhead",
        "lost work",
        "recovery",
        "interval",
        "network/node",
        "memory/node",
    ]);
    for r in results {
        let v = r.to_json();
        let pct = |k: &str| format!("{:.1}%", v[k].as_f64().unwrap_or(0.0) * 100.0);
        let interval = r.intervals.iter().map(|(n, s)| format!("{n} {s:.0} s")).collect::<Vec<_>>().join(", ");
        t.add_row(vec![
            r.strategy.name().to_string(),
            format!("{:.3}", r.goodput()),
            pct("checkpoint_overhead"),
            pct("lost_work"),
            pct("recovery"),
            interval,
            format!("{:.2} GiB/s", v["network_bytes_per_s_per_node"].as_f64().unwrap_or(0.0) / GIB),
            format!("{:.0} GiB", r.memory_per_node / GIB),
        ]);
    }
    println!(
        "{} nodes x {} GPUs, {:.0} GiB of state, {} steps of {} s, {:.1} failures per day",
        p.nodes,
        p.gpus_per_node,
        p.state_bytes / GIB,
        p.steps,
        p.step_s,
        p.rates_per_s().iter().sum::<f64>() * 86400.0
    );
    println!("{t}");
}

/// Prints the demo prediction beside the demo's measured goodput.
pub fn print_demo(fit: &DemoFit, json: bool) {
    let v = fit.to_json();
    if json {
        print_json(&v);
    } else {
        println!(
            "demo: measured goodput {:.3}, predicted {:.3} (ratio {:.3}); {} failures, steps recomputed {:?} (demo: {:?})",
            fit.measured_goodput,
            fit.predicted(),
            fit.ratio(),
            fit.outcome.recomputed.len(),
            fit.outcome.recomputed,
            fit.demo_recomputed
        );
    }
}
