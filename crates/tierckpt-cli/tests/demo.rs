//! `tierckpt demo` end to end: a real daemon, a real trainer process killed
//! with SIGKILL and restarted, and the final state compared bit for bit.

// `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::process::Command;

use serde_json::Value;

fn run_demo(extra: &[&str]) -> (std::process::Output, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tierckpt"))
        .args([
            "demo",
            "--size",
            "16MB",
            "--steps",
            "30",
            "--checkpoint-every",
            "5",
            "--json",
        ])
        .args(extra)
        .output()
        .expect("running tierckpt demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

fn parse(stdout: &str, stderr: &str) -> Value {
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one JSON object on stdout, got:\n{stdout}\nstderr:\n{stderr}"
    );
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stdout}"))
}

#[test]
fn demo_survives_a_crash_bitwise_identical() {
    let (out, stdout, stderr) = run_demo(&[]);
    assert!(
        out.status.success(),
        "tierckpt demo failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    let v = parse(&stdout, &stderr);

    assert_eq!(v["bitwise_identical"], true, "{v:#}");
    assert_eq!(v["state_hash"], v["reference_state_hash"], "{v:#}");

    let failures = v["failures"].as_array().expect("failures is a list");
    assert_eq!(failures.len(), 1, "{v:#}");
    let f = &failures[0];
    assert_eq!(f["kind"], "trainer_crash", "{f:#}");
    assert_eq!(f["recovered_from"], "memory", "{f:#}");
    let killed = f["step_killed"].as_u64().expect("step_killed");
    let resumed = f["step_resumed"].as_u64().expect("step_resumed");
    assert!(resumed > 0 && resumed % 5 == 0, "resumed from a checkpoint step: {f:#}");
    assert!(resumed <= killed && killed < 30, "{f:#}");
    assert!(f["recovery_s"].as_f64().is_some_and(|s| s > 0.0), "{f:#}");

    let checkpoints = v["checkpoints"].as_u64().expect("checkpoints");
    assert!(checkpoints > 0, "{v:#}");
    let median = v["stall_s_median"].as_f64().expect("stall_s_median is a number");
    assert!(median > 0.0, "{v:#}");
    assert_eq!(
        v["state_bytes"].as_u64(),
        Some(12 * v["params"].as_u64().unwrap()),
        "{v:#}"
    );
}

#[test]
fn demo_with_a_chosen_crash_step() {
    // Killed right after a step that is followed by a checkpoint boundary.
    let (out, stdout, stderr) = run_demo(&["--kill-at-step", "19", "--seed", "3", "--keep-last", "1"]);
    assert!(
        out.status.success(),
        "tierckpt demo failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    let v = parse(&stdout, &stderr);
    assert_eq!(v["bitwise_identical"], true, "{v:#}");
    assert_eq!(v["seed"], 3);
    let f = &v["failures"][0];
    assert_eq!(f["recovered_from"], "memory", "{f:#}");
    assert!(f["step_killed"].as_u64().unwrap() >= 19, "{f:#}");
}

#[test]
fn demo_refuses_a_run_too_short_to_crash() {
    let out = Command::new(env!("CARGO_BIN_EXE_tierckpt"))
        .args([
            "demo",
            "--size",
            "16MB",
            "--steps",
            "5",
            "--checkpoint-every",
            "5",
            "--json",
        ])
        .output()
        .expect("running tierckpt demo");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--steps"), "{stderr}");
}
