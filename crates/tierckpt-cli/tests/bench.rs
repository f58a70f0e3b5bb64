//! `tierckpt bench memory` end to end: a real daemon child, a small state,
//! and the shape of the JSON report. Never asserts on wall-clock values.

use std::process::Command;

use serde_json::Value;

fn bench_memory_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tierckpt"))
        .args(["bench", "memory"])
        .args(args)
        .output()
        .expect("running tierckpt");
    assert!(
        out.status.success(),
        "tierckpt bench memory failed: {}\nstdout: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one JSON object, got {stdout:?}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn positive(v: &Value, field: &str) -> f64 {
    let x = v[field].as_f64().unwrap_or_else(|| panic!("{field} missing or not a number in {v}"));
    assert!(x.is_finite() && x > 0.0, "{field} = {x} should be positive and finite");
    x
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs())
}

#[test]
fn memory_reports_ratios_against_the_floor() {
    let v = bench_memory_json(&["--size", "8MiB", "--tensors", "8", "--iters", "3", "--json"]);
    assert_eq!(v["benchmark"], "memory");
    assert_eq!(v["bytes"].as_u64(), Some(8 << 20));
    assert_eq!(v["tensors"].as_u64(), Some(8));
    assert_eq!(v["iters"].as_u64(), Some(3));
    assert!(v["file_bytes"].as_u64().unwrap() > 8 << 20);
    assert!(v["threads"].as_u64().unwrap() >= 1);
    assert!(v["restore_threads"].as_u64().unwrap() >= 1);
    assert_eq!(v["floor_threads"].as_u64(), Some(1));
    assert_eq!(v["buffer_offset"].as_u64(), Some(0));
    assert_eq!(v["restored_identical"], true);
    assert!(v["steady_state"].as_str().unwrap().contains("checksumming"));

    for f in [
        "memcpy_floor_s",
        "memcpy_floor_gibps",
        "save_stall_s",
        "save_gibps",
        "save_ratio",
        "save_copy_s",
        "save_stall_first_s",
        "save_first_ratio",
        "save_stall_min_s",
        "save_stall_max_s",
        "restore_s",
        "restore_gibps",
        "restore_ratio",
        "restore_map_s",
        "restore_first_s",
        "target_ratio",
    ] {
        positive(&v, f);
    }
    // Reserve and seal are round trips to the daemon: positive too.
    positive(&v, "save_reserve_s");
    positive(&v, "save_seal_s");
    assert!(v["save_meets_target"].is_boolean());
    assert!(v["restore_meets_target"].is_boolean());

    let floor = positive(&v, "memcpy_floor_s");
    let save = positive(&v, "save_stall_s");
    let restore = positive(&v, "restore_s");
    assert!(close(positive(&v, "save_ratio"), save / floor), "save_ratio is not save_stall_s / memcpy_floor_s: {v}");
    assert!(close(positive(&v, "restore_ratio"), restore / floor), "restore_ratio is not restore_s / memcpy_floor_s: {v}");
    assert!(close(positive(&v, "save_first_ratio"), positive(&v, "save_stall_first_s") / floor));
    assert!(close(positive(&v, "target_ratio"), 1.2));
    let gib = (8u64 << 20) as f64 / (1u64 << 30) as f64;
    assert!(close(positive(&v, "save_gibps"), gib / save));
    assert!(close(positive(&v, "restore_gibps"), gib / restore));
    let (lo, hi) = (positive(&v, "save_stall_min_s"), positive(&v, "save_stall_max_s"));
    assert!(lo <= save && save <= hi, "median {save} outside [{lo}, {hi}]");
}

#[test]
fn memory_prints_a_table_without_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_tierckpt"))
        .args(["bench", "memory", "--size", "1MiB", "--tensors", "4", "--iters", "2", "--warmup", "1"])
        .args(["--buffer-offset", "16"])
        .output()
        .expect("running tierckpt");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["the floor", "caller blocked", "load_into", "target: ratio at most 1.2", "steady state"] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}

#[test]
fn memory_rejects_a_bad_size() {
    let out = Command::new(env!("CARGO_BIN_EXE_tierckpt"))
        .args(["bench", "memory", "--size", "lots", "--json"])
        .output()
        .expect("running tierckpt");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a size"));
}
