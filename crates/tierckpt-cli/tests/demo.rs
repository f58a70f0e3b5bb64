//! `tierckpt demo` end to end: a real cluster of daemons draining to a
//! `file://` persistent tier, real trainer processes (one per node) SIGKILLed
//! and restarted, a node SIGKILLed and replaced by an empty one, every node's
//! memory lost and restored from the persistent tier, and the final state
//! compared bit for bit.

// `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use serde_json::Value;

/// The demos run one at a time: the goodput comparison needs the cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_demo(extra: &[&str]) -> (std::process::Output, String, String) {
    run_demo_with(&["--size", "16MB", "--steps", "30", "--checkpoint-every", "5", "--compute-ms", "10"], extra)
}

fn run_demo_with(base: &[&str], extra: &[&str]) -> (std::process::Output, String, String) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let out = tierckpt_harness::testing::tierckpt()
        .arg("demo")
        .args(base)
        .arg("--json")
        .args(extra)
        .output()
        .expect("running tierckpt demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

fn parse(stdout: &str, stderr: &str) -> Value {
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one JSON object on stdout, got:\n{stdout}\nstderr:\n{stderr}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stdout}"))
}

fn ranks(v: &Value) -> Vec<u64> {
    v.as_array().unwrap_or_else(|| panic!("{v} is not a list")).iter().map(|r| r.as_u64().expect("a rank")).collect()
}

/// Checks one failure's record; returns (step_killed, step_resumed).
fn check_failure(f: &Value, kind: &str, from: &str, every: u64, steps: u64) -> (u64, u64) {
    assert_eq!(f["kind"], kind, "{f:#}");
    assert_eq!(f["recovered_from"], from, "{f:#}");
    let killed = f["step_killed"].as_u64().expect("step_killed");
    let resumed = f["step_resumed"].as_u64().expect("step_resumed");
    assert!(resumed > 0 && resumed % every == 0, "resumed from a checkpoint step: {f:#}");
    assert!(resumed <= killed && killed < steps, "{f:#}");
    assert_eq!(f["steps_recomputed"].as_u64(), Some(killed - resumed), "{f:#}");
    assert!(f["recovery_s"].as_f64().is_some_and(|s| s > 0.0), "{f:#}");
    assert!(f["restore_s"].as_f64().is_some_and(|s| s > 0.0), "{f:#}");
    f["ranks"]
        .as_array()
        .expect("ranks")
        .iter()
        .for_each(|r| assert!(r["restore_s"].as_f64().is_some_and(|s| s > 0.0), "{r:#}"));
    (killed, resumed)
}

#[test]
fn demo_survives_a_crash_a_node_loss_and_a_total_memory_loss_bitwise_identical() {
    let (out, stdout, stderr) = run_demo(&[]);
    assert!(out.status.success(), "tierckpt demo failed ({}):\n{stderr}\n{stdout}", out.status);
    let v = parse(&stdout, &stderr);

    assert_eq!(v["bitwise_identical"], true, "{v:#}");
    assert_eq!(v["state_hash"], v["reference_state_hash"], "{v:#}");
    assert_eq!(v["nodes"], 4, "{v:#}");
    assert_eq!(v["ranks"], 4, "{v:#}");
    assert_eq!(v["replication_factor"], 1, "{v:#}");
    assert_eq!(v["rank_state_hashes"].as_array().map(Vec::len), Some(4), "{v:#}");

    let failures = v["failures"].as_array().expect("failures is a list");
    assert_eq!(failures.len(), 3, "{v:#}");

    // A trainer crash: the job restarts, every rank from its own node's memory.
    let crash = &failures[0];
    let (crash_killed, _) = check_failure(crash, "trainer_crash", "memory", 5, 30);
    assert_eq!(ranks(&crash["restored_from"]["memory"]), [0, 1, 2, 3], "{crash:#}");
    assert!(ranks(&crash["restored_from"]["peer"]).is_empty(), "{crash:#}");
    assert!(ranks(&crash["restored_from"]["persistent"]).is_empty(), "{crash:#}");

    // A node loss: node 2's daemon and trainer die, an empty node replaces
    // it, and rank 2's shard comes from the peer holding its replica.
    let loss = &failures[1];
    let (loss_killed, loss_resumed) = check_failure(loss, "node_loss", "peer", 5, 30);
    assert!(loss_resumed > crash_killed, "a checkpoint lies between the failures: {v:#}");
    assert_eq!(loss["node_killed"], "n2", "{loss:#}");
    assert_eq!(ranks(&loss["restored_from"]["peer"]), [2], "{loss:#}");
    assert_eq!(ranks(&loss["restored_from"]["memory"]), [0, 1, 3], "{loss:#}");
    assert!(ranks(&loss["restored_from"]["persistent"]).is_empty(), "{loss:#}");
    let rank2 = &loss["ranks"][2];
    assert_eq!((&rank2["rank"], &rank2["tier"]), (&Value::from(2), &Value::from("peer")), "{loss:#}");
    assert_eq!(rank2["peers"], serde_json::json!(["n3"]), "ring placement: n2 -> n3: {loss:#}");
    assert_eq!(loss["replicated_before_kill"], true, "{loss:#}");
    assert!(v["shards_fetched_from_peers"].as_u64().is_some_and(|n| n >= 1), "{v:#}");

    // A total memory loss: every daemon and trainer dies, every node comes
    // back empty, and every rank's shard comes from the persistent tier, at
    // the newest checkpoint (the demo waits for its commit first).
    let total = &failures[2];
    let (_, total_resumed) = check_failure(total, "total_memory_loss", "persistent", 5, 30);
    assert!(total_resumed > loss_killed, "a checkpoint lies between the failures: {v:#}");
    assert_eq!(ranks(&total["restored_from"]["persistent"]), [0, 1, 2, 3], "{total:#}");
    assert!(ranks(&total["restored_from"]["memory"]).is_empty(), "{total:#}");
    assert!(ranks(&total["restored_from"]["peer"]).is_empty(), "{total:#}");
    assert_eq!(total["nodes_killed"], serde_json::json!(["n0", "n1", "n2", "n3"]), "{total:#}");
    assert_eq!(total["persisted_before_kill"], true, "{total:#}");
    assert_eq!(total["last_checkpoint_at_kill"].as_u64(), Some(total_resumed), "{total:#}");
    assert_eq!(total["persistent_last_committed_at_kill"].as_u64(), Some(total_resumed), "{total:#}");
    for f in failures {
        for r in f["ranks"].as_array().expect("ranks") {
            assert_eq!(r["tier"], r["expected_tier"], "the view before loading named the tier: {f:#}");
        }
    }

    // The background copies: to peers and to the persistent tier.
    assert_eq!(v["persist_every"], 1, "{v:#}");
    let checkpoint_bytes = v["checkpoint_bytes"].as_u64().expect("checkpoint_bytes");
    assert!(v["bytes_replicated"].as_u64().is_some_and(|b| b >= checkpoint_bytes), "{v:#}");
    assert!(v["bytes_persisted"].as_u64().is_some_and(|b| b >= checkpoint_bytes), "{v:#}");
    assert!(v["shards_persisted"].as_u64().is_some_and(|n| n >= 4), "{v:#}");
    // Before and after deltas and compression, per tier.
    let (rep, wire) = (v["bytes_replicated"].as_u64().unwrap(), v["bytes_replicated_wire"].as_u64().unwrap());
    assert!(wire > 0 && wire <= rep, "{v:#}");
    let (per, stored) = (v["bytes_persisted"].as_u64().unwrap(), v["bytes_persisted_stored"].as_u64().unwrap());
    assert!(stored > 0 && stored <= per, "{v:#}");
    assert_eq!(v["persistent_last_committed"], 30, "the last checkpoint is committed too: {v:#}");
    assert!(v["persistent"]["url"].as_str().is_some_and(|u| u.starts_with("file://")), "{v:#}");

    let checkpoints = v["checkpoints"].as_u64().expect("checkpoints");
    assert!(checkpoints > 0, "{v:#}");
    let median = v["stall_s_median"].as_f64().expect("stall_s_median is a number");
    assert!(median > 0.0, "{v:#}");
    assert_eq!(v["state_bytes"].as_u64(), Some(12 * v["params"].as_u64().unwrap()), "{v:#}");
    // The baseline went through the same failures to the same final state.
    let b = &v["baseline"];
    assert_eq!(b["bitwise_identical"], true, "{b:#}");
    assert_eq!(b["state_hash"], v["reference_state_hash"], "{b:#}");
    assert_eq!(b["checkpoints"], v["checkpoints"], "{b:#}");
    let bf = b["failures"].as_array().expect("baseline failures");
    assert_eq!(bf.len(), 3, "{b:#}");
    for (f, base) in failures.iter().zip(bf) {
        assert_eq!(f["kind"], base["kind"], "{b:#}");
        assert_eq!(f["step_killed"], base["step_killed"], "{b:#}");
        assert_eq!(f["step_resumed"], base["step_resumed"], "same checkpoints, same resume step: {b:#}");
        assert_eq!(base["recovered_from"], "persistent", "{b:#}");
    }
    for k in ["goodput", "restart_goodput", "baseline_goodput"] {
        assert!(v[k].as_f64().is_some_and(|g| g > 0.0 && g <= 1.0), "{k}: {v:#}");
    }
    // In-process recovery: after the crash and the node loss only the lost
    // rank's trainer started anew; the others rolled back in their processes.
    assert_eq!(v["recovery"], "in_process", "{v:#}");
    let lost_rank = crash["rank_killed"].as_u64().expect("rank_killed");
    let survivors: Vec<u64> = (0..4).filter(|&r| r != lost_rank).collect();
    assert_eq!(
        (&crash["recovery"], ranks(&crash["ranks_rolled_back_in_process"])),
        (&Value::from("in_process"), survivors),
        "{crash:#}"
    );
    assert_eq!(ranks(&loss["ranks_rolled_back_in_process"]), [0, 1, 3], "{loss:#}");
    assert_eq!(total["recovery"], "full_restart", "every process died: {total:#}");
    for f in failures {
        assert!(f["first_step_s"].as_f64().is_some_and(|s| s >= f["recovery_s"].as_f64().unwrap()), "{f:#}");
    }
    // The same failures with full restarts, side by side, to the same state.
    let restart = &v["full_restart"];
    assert_eq!(restart["bitwise_identical"], true, "{restart:#}");
    let rf = restart["failures"].as_array().expect("full restart failures");
    for (f, r) in failures.iter().zip(rf) {
        assert_eq!(
            (&r["kind"], &r["step_killed"], &r["step_resumed"]),
            (&f["kind"], &f["step_killed"], &f["step_resumed"]),
            "{restart:#}"
        );
        assert_eq!(r["recovery"], "full_restart", "{restart:#}");
        assert!(ranks(&r["ranks_rolled_back_in_process"]).is_empty(), "{restart:#}");
    }

    // A preemption announced by a notice: with the early checkpoint nothing is lost.
    let p = &v["preemption"];
    let (with, without) = (&p["with_early_checkpoint"], &p["without_early_checkpoint"]);
    let notice = p["notice_after_step"].as_u64().expect("notice step");
    assert_eq!(with["checkpoint_step"].as_u64(), Some(notice + 1), "{p:#}");
    assert_eq!(with["resumed_from"], with["checkpoint_step"], "resumed from the early checkpoint: {p:#}");
    assert_eq!(with["steps_lost"], 0, "{p:#}");
    let late = without["reclaimed_after_step"].as_u64().unwrap();
    assert_eq!(late, notice + p["grace_steps"].as_u64().unwrap(), "{p:#}");
    let resumed = without["resumed_from"].as_u64().expect("a periodic checkpoint to resume from");
    assert!(resumed % 5 == 0 && resumed <= notice, "the last periodic checkpoint: {p:#}");
    assert_eq!(without["steps_lost"].as_u64(), Some(late - resumed), "{p:#}");
    assert!(with["notice_to_advice_s"].as_f64().is_some_and(|s| s < 10.0), "{p:#}");

    let shards: u64 =
        v["shard_state_bytes"].as_array().expect("shard_state_bytes").iter().map(|b| b.as_u64().unwrap()).sum();
    assert_eq!(Some(shards), v["state_bytes"].as_u64(), "the shards partition the state: {v:#}");
}

#[test]
fn demo_with_chosen_failure_steps_on_three_nodes() {
    // The crash comes right before a checkpoint boundary; one checkpoint kept.
    let (out, stdout, stderr) = run_demo(&[
        "--nodes",
        "3",
        "--kill-at-step",
        "19",
        "--node-loss-at-step",
        "24",
        "--total-loss-at-step",
        "27",
        "--seed",
        "3",
        "--keep-last",
        "1",
    ]);
    assert!(out.status.success(), "tierckpt demo failed ({}):\n{stderr}\n{stdout}", out.status);
    let v = parse(&stdout, &stderr);
    assert_eq!(v["bitwise_identical"], true, "{v:#}");
    assert_eq!(v["seed"], 3);
    assert_eq!(v["nodes"], 3);
    let f = &v["failures"];
    assert_eq!(check_failure(&f[0], "trainer_crash", "memory", 5, 30), (19, 15), "{f:#}");
    assert_eq!(check_failure(&f[1], "node_loss", "peer", 5, 30), (24, 20), "{f:#}");
    assert_eq!(ranks(&f[1]["restored_from"]["peer"]), [2], "{f:#}");
    assert_eq!(f[1]["ranks"][2]["peers"], serde_json::json!(["n0"]), "ring: n2 -> n0: {f:#}");
    assert_eq!(check_failure(&f[2], "total_memory_loss", "persistent", 5, 30), (27, 25), "{f:#}");
    assert_eq!(ranks(&f[2]["restored_from"]["persistent"]), [0, 1, 2], "{f:#}");
    assert_eq!(v["persistent"]["keep_last"], 1, "{v:#}");
    assert_eq!(v["persistent_last_committed"], 30, "{v:#}");
}

/// Checkpoints every 2 steps of 16 MB per rank, on storage that writes
/// 100 MB/s per node (a node's share of a shared file system at scale:
/// 100 GB/s over 1000 nodes): the baseline's trainers wait for every write,
/// tierckpt's wait for a copy into memory while the drain writes behind.
#[test]
fn demo_goodput_beats_the_baseline_that_checkpoints_to_storage_only() {
    let (out, stdout, stderr) = run_demo_with(
        &["--size", "64MB", "--steps", "30", "--checkpoint-every", "2", "--compute-ms", "50"],
        &["--storage-bandwidth", "100MB"],
    );
    assert!(out.status.success(), "tierckpt demo failed ({}):\n{stderr}\n{stdout}", out.status);
    let v = parse(&stdout, &stderr);
    assert_eq!(v["bitwise_identical"], true, "{v:#}");
    assert_eq!(v["baseline"]["bitwise_identical"], true, "{v:#}");
    let (g, b) = (v["goodput"].as_f64().unwrap(), v["baseline_goodput"].as_f64().unwrap());
    assert!(g > b, "goodput {g} with tierckpt, {b} with the baseline: {v:#}");
    let (stall, base_stall) =
        (v["stall_s_median"].as_f64().unwrap(), v["baseline"]["stall_s_median"].as_f64().unwrap());
    assert!(
        stall < base_stall,
        "pause per checkpoint {stall} s with tierckpt, {base_stall} s with the baseline: {v:#}"
    );
}

#[test]
fn demo_refuses_what_it_cannot_run() {
    for (args, says) in [
        // Too short for three failures after a checkpoint.
        (&["--steps", "8", "--checkpoint-every", "5"][..], "--steps"),
        (&["--nodes", "1"][..], "--nodes"),
        (&["--kill-at-step", "20", "--node-loss-at-step", "12"][..], "--node-loss-at-step"),
        (&["--node-loss-at-step", "20", "--total-loss-at-step", "12"][..], "--total-loss-at-step"),
        // No room for the total loss after the node loss.
        (&["--node-loss-at-step", "59"][..], "--steps"),
        (&["--persist-every", "0"][..], "--persist-every"),
        (&["--storage-bandwidth", "fast"][..], "--storage-bandwidth"),
    ] {
        let out = tierckpt_harness::testing::tierckpt()
            .args(["demo", "--size", "16MB", "--json"])
            .args(args)
            .output()
            .expect("running tierckpt demo");
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
