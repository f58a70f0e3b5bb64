//! The engine against closed forms, the strategies' ordering on a known
//! case, placement under a rack loss, and bad input refused by flag.

use clap::Parser;

use super::engine::{daly, simulate, Plan, Schedule, Tier};
use super::params::Kind;
use super::strategy::{build, Strategy};
use super::{report, SimulateArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    a: SimulateArgs,
}

fn args(flags: &[&str]) -> SimulateArgs {
    Cli::try_parse_from(std::iter::once("simulate").chain(flags.iter().copied())).expect("flags parse").a
}

/// One tier every `every` steps stalling `stall_s`, surviving everything, no restart cost.
fn one_tier(every: u64, stall_s: f64) -> Plan {
    let tier = Tier {
        name: "t",
        every,
        stall_s,
        lag_s: 0.0,
        survives: [true; 3],
        restore_s: [0.0; 3],
        net_bytes_per_node: 0.0,
    };
    Plan { tiers: vec![tier], restart_s: [0.0; 3] }
}

fn poisson(rate: f64) -> Schedule {
    Schedule::Poisson { rates: [rate, 0.0, 0.0], straggler_rate: 0.0, slowdown: 1.0, straggler_s: 0.0 }
}

#[test]
fn without_failures_goodput_is_one_minus_stall_over_interval() {
    let o = simulate(&one_tier(10, 0.5), 1000, 1.0, &poisson(0.0), 1);
    // 100 checkpoints of 0.5 s over intervals of 10 s of work + 0.5 s of stall.
    assert_eq!(o.checkpoints, vec![100]);
    assert!((o.goodput() - (1.0 - 0.5 / 10.5)).abs() < 1e-12, "{o:?}");
    assert_eq!(o.failures, [0; 3]);
    assert_eq!(o.lost_s, 0.0);
}

#[test]
fn poisson_failures_lose_half_an_interval_each_on_average() {
    let (mut lost, mut n) = (0.0, 0);
    for seed in 0..20 {
        let o = simulate(&one_tier(100, 0.0), 100_000, 1.0, &poisson(1.0 / 5000.0), seed);
        lost += o.lost_s;
        n += o.failures[0];
    }
    let per = lost / n as f64;
    assert!(n > 300, "too few failures to average: {n}");
    assert!((per - 50.0).abs() < 5.0, "lost {per:.1} s per failure over {n} failures, expected about 50 s");
}

#[test]
fn wall_time_is_the_sum_of_its_parts_and_no_part_is_negative() {
    // Stalls longer than the mean time between failures: failures strike during stalls.
    let o = simulate(&one_tier(1, 100.0), 200, 1.0, &poisson(1.0 / 10.0), 3);
    assert!(o.failures[0] > 10 && o.lost_s >= 0.0, "{o:?}");
    let p =
        args(&["--nodes", "4096", "--steps", "20000", "--straggler-per-node-hour", "0.01"]).params().expect("valid");
    for r in report::compare(&p, 1800.0, 2, 5) {
        for o in &r.runs {
            let parts = [o.useful_s, o.stall_s, o.lost_s, o.recovery_s, o.straggler_s];
            assert!(parts.iter().all(|x| *x >= 0.0), "{o:?}");
            let sum: f64 = parts.iter().sum();
            assert!((sum - o.wall_s).abs() < 1e-6 * o.wall_s, "{}: {sum} != {}", r.strategy.name(), o.wall_s);
        }
    }
}

#[test]
fn a_seed_determines_the_run() {
    let p = args(&["--nodes", "1024", "--steps", "20000"]).params().expect("valid");
    let built = build(Strategy::Tierckpt, &p, 1800.0);
    let s = Schedule::Poisson {
        rates: p.rates_per_s(),
        straggler_rate: p.straggler_rate_per_s(),
        slowdown: 1.5,
        straggler_s: 600.0,
    };
    let a = simulate(&built.plan, p.steps, p.step_s, &s, 7);
    assert_eq!(a, simulate(&built.plan, p.steps, p.step_s, &s, 7));
    assert_ne!(a, simulate(&built.plan, p.steps, p.step_s, &s, 8));
}

#[test]
fn daly_matches_young_for_a_small_cost_and_caps_at_the_mtbf() {
    let (d, m): (f64, f64) = (1.0, 1e6);
    let young = (2.0 * d * m).sqrt();
    assert!((daly(d, m) - young).abs() / young < 0.01);
    assert_eq!(daly(5.0, 2.0), 2.0);
    assert!(daly(1.0, f64::INFINITY).is_infinite());
}

/// Mean goodput per strategy (tierckpt, DCP, HyperPod, bound) for `flags`.
fn goodputs(flags: &[&str]) -> [f64; 4] {
    let p = args(flags).params().expect("valid");
    let r = report::compare(&p, 1800.0, 3, 1);
    [0, 1, 2, 3].map(|i| r[i].goodput())
}

#[test]
fn strategies_order_bound_then_tierckpt_then_the_full_restarts_at_1024_nodes() {
    let [tier, dcp, hyper, bound] = goodputs(&["--nodes", "1024", "--state-bytes", "1120GB", "--steps", "50000"]);
    assert!(bound >= tier && tier > hyper && tier > dcp, "bound {bound} tierckpt {tier} hyperpod {hyper} dcp {dcp}");
}

#[test]
fn hyperpod_beats_dcp_when_storage_is_slow_and_racks_do_not_fail() {
    let flags = ["--nodes", "1024", "--steps", "50000", "--rack-loss-per-rack-hour", "0", "--storage-gibps", "20"];
    let [_, dcp, hyper, _] = goodputs(&flags);
    assert!(hyper > dcp, "hyperpod {hyper} dcp {dcp}");
}

#[test]
fn a_rack_loss_keeps_peer_copies_only_when_placed_on_other_racks() {
    for (placement, from) in [("rack", "peer"), ("ring", "persistent")] {
        let p = args(&["--nodes", "64", "--steps", "2000", "--placement", placement]).params().expect("valid");
        let plan = build(Strategy::Tierckpt, &p, 1800.0).plan;
        let o = simulate(&plan, p.steps, p.step_s, &Schedule::Fixed(vec![(1500, Kind::RackLoss)]), 1);
        let used = o.restored_from.iter().position(|&n| n == 1).expect("one failure");
        assert_eq!(plan.tiers[used].name, from, "placement {placement}: {o:?}");
    }
}

#[test]
fn bad_input_is_refused_naming_the_flag() {
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--crash-per-gpu-hour", "-1"], &["--crash-per-gpu-hour"]),
        (&["--nodes", "4", "--state-bytes", "100TB"], &["--state-bytes", "--memory-per-node"]),
        (&["--nodes", "4", "--k", "4"], &["--k"]),
        (&["--nodes", "0"], &["--nodes"]),
        (&["--step-s", "0"], &["--step-s"]),
    ];
    for (flags, names) in cases {
        let e = args(flags).params().expect_err("refused").to_string();
        for n in names {
            assert!(e.contains(n), "{flags:?}: {e}");
        }
    }
}

#[test]
fn a_demo_report_is_replayed_step_for_step() {
    let failure = |kind: &str, killed: u64, recomputed: u64, rec: f64| serde_json::json!({"kind": kind, "step_killed": killed, "steps_recomputed": recomputed, "recovery_s": rec});
    let v = serde_json::json!({
        "steps": 30, "checkpoint_every": 5, "persist_every": 2, "replication_factor": 1,
        "useful_s": 0.6, "goodput": 0.5, "job_step_s_mean": 0.02, "start_s": 0.1,
        "stall_s": [0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
        "failures": [failure("trainer_crash", 11, 1, 0.1), failure("node_loss", 17, 2, 0.2),
                     failure("total_memory_loss", 27, 7, 0.5)],
    });
    let fit = super::demo_fit::fit(&v).expect("a report");
    // Persistent every 10 steps: the total loss at 27 goes back to 20.
    assert_eq!(fit.outcome.recomputed, vec![1, 2, 7]);
    // start + (30 + 10 recomputed) steps + 7 checkpoints (25 twice) + recoveries.
    let wall = 0.1 + 40.0 * 0.02 + 7.0 * 0.01 + 0.8;
    assert!((fit.predicted() - 0.6 / wall).abs() < 1e-9, "{}", fit.predicted());
    assert!((fit.ratio() - 0.6 / wall / 0.5).abs() < 1e-9);
}
