//! `tierckpt soak` end to end: a real local cluster and real trainer
//! processes under a seeded schedule of faults (SIGKILLs, SIGSTOP, lost
//! nodes and memory, damaged shard files), each resume checked against the
//! fault-free run, and the final state compared bit for bit.

use std::collections::BTreeMap;

use serde_json::Value;

/// Runs a short soak; returns its JSON report (the run must succeed).
fn soak(seed: u64) -> Value {
    let out = tierckpt_harness::testing::tierckpt()
        .args(["soak", "--checkpoints", "150", "--nodes", "3", "--fault-every", "8", "--json"])
        .args(["--seed", &seed.to_string()])
        .output()
        .expect("running tierckpt soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak seed {seed} failed:\n{stdout}\n{stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\n{stderr}"))
}

#[test]
fn three_seeds_of_faults_lose_nothing_and_end_bitwise_equal() {
    let reports: Vec<Value> = std::thread::scope(|s| {
        let runs: Vec<_> = (1..=3).map(|seed| s.spawn(move || soak(seed))).collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut restores: BTreeMap<String, u64> = BTreeMap::new();
    for v in &reports {
        assert_eq!(v["corrupt_restores"], 0, "{v:#}");
        assert_eq!(v["lost_committed_steps"], 0, "{v:#}");
        assert_eq!(v["final_state_equal"], true, "{v:#}");
        assert_eq!(v["final_state_xxh3"], v["reference_state_xxh3"], "{v:#}");
        assert!(v["checkpoints"].as_u64().unwrap() >= 150, "{v:#}");
        // The schedule goes through every kind first: each struck at least once.
        let faults = v["faults"].as_object().unwrap();
        assert_eq!(faults.len(), 8, "{v:#}");
        for (kind, n) in faults {
            assert!(n.as_u64().unwrap() >= 1, "{kind} never struck: {v:#}");
        }
        for (tier, n) in v["restores"].as_object().unwrap() {
            *restores.entry(tier.clone()).or_default() += n.as_u64().unwrap();
        }
        assert!(v["longest_recovery_s"].as_f64().unwrap() > 0.0, "{v:#}");
    }
    for tier in ["memory", "peer", "persistent"] {
        assert!(restores[tier] > 0, "no rank restored from {tier}: {restores:?}");
    }
    let seeds: std::collections::BTreeSet<String> =
        reports.iter().map(|v| v["final_state_xxh3"].as_str().unwrap().to_string()).collect();
    assert_eq!(seeds.len(), 3, "each seed trains its own model");
}

#[test]
fn soak_refuses_what_it_cannot_run() {
    for (args, needle) in [
        (&["--nodes", "1"][..], "--nodes"),
        (&["--checkpoints", "0"][..], "--checkpoints"),
        (&["--fault-every", "0"][..], "--fault-every"),
        (&["--size", "1KB"][..], "too small"),
    ] {
        let out = tierckpt_harness::testing::tierckpt().arg("soak").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
    }
}
