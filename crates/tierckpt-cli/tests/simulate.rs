//! `tierckpt simulate` end to end: a real demo's report fed to `--from-demo`
//! predicts the demo's measured goodput within 10%; the comparison prints
//! every strategy as JSON; bad input is refused naming the flag.

use serde_json::Value;

fn simulate(args: &[&str]) -> std::process::Output {
    tierckpt_harness::testing::tierckpt().arg("simulate").args(args).output().expect("running tierckpt simulate")
}

fn json_of(out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "failed ({}):\n{}\n{stdout}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stdout}"))
}

#[test]
fn the_demo_goodput_is_predicted_within_ten_percent() {
    let demo = tierckpt_harness::testing::tierckpt()
        .args(["demo", "--size", "16MB", "--steps", "30", "--checkpoint-every", "5", "--compute-ms", "10", "--json"])
        .output()
        .expect("running tierckpt demo");
    let report = json_of(&demo);
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("demo.json");
    std::fs::write(&path, report.to_string()).expect("writing the demo report");

    let v = json_of(&simulate(&["--json", "--from-demo", path.to_str().expect("utf-8 path")]));
    let ratio = v["ratio"].as_f64().expect("ratio");
    eprintln!("demo goodput measured {} predicted {} ratio {ratio:.3}", v["measured_goodput"], v["predicted_goodput"]);
    assert!((0.9..=1.1).contains(&ratio), "prediction off by more than 10%: {v:#}");
    assert_eq!(v["measured_goodput"], report["goodput"], "{v:#}");
    // The tier model rolls back to the same steps the demo did.
    assert_eq!(v["steps_recomputed"], v["demo_steps_recomputed"], "{v:#}");
}

#[test]
fn the_comparison_reports_every_strategy() {
    let v = json_of(&simulate(&["--json", "--nodes", "128", "--steps", "5000", "--runs", "2"]));
    let names: Vec<&str> = v["strategies"]
        .as_array()
        .expect("strategies")
        .iter()
        .map(|s| s["strategy"].as_str().expect("a name"))
        .collect();
    assert_eq!(names, ["tierckpt", "dcp_async_persistent", "hyperpod_tiered", "bound_free_checkpoints"], "{v:#}");
    for s in v["strategies"].as_array().expect("strategies") {
        let g = s["goodput"].as_f64().expect("goodput");
        assert!(g > 0.0 && g <= 1.0, "{s:#}");
        for key in
            ["checkpoint_overhead", "lost_work", "recovery", "network_bytes_per_s_per_node", "memory_bytes_per_node"]
        {
            assert!(s[key].as_f64().is_some_and(|x| x >= 0.0), "{key}: {s:#}");
        }
    }
}

#[test]
fn bad_input_is_refused_naming_the_flag() {
    for (args, flag) in [
        (&["--rack-loss-per-rack-hour", "-0.5"][..], "--rack-loss-per-rack-hour"),
        (&["--nodes", "2", "--state-bytes", "10TB"][..], "--memory-per-node"),
        (&["--nodes", "8", "--k", "9"][..], "--k"),
        (&["--nodes", "0"][..], "--nodes"),
    ] {
        let out = simulate(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(flag), "{args:?}: the error does not name {flag}: {stderr}");
    }
}

#[test]
fn costs_come_from_a_benchmark_report_unless_a_flag_is_given() {
    let bench = tierckpt_harness::testing::tierckpt()
        .args(["bench", "memory", "--size", "4MiB", "--tensors", "4", "--iters", "3", "--warmup", "1", "--json"])
        .output()
        .expect("running tierckpt bench memory");
    let b = json_of(&bench);
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("bench.json");
    std::fs::write(&path, b.to_string()).expect("writing the bench report");
    let path = path.to_str().expect("utf-8 path");

    let v = json_of(&simulate(&["--json", "--steps", "1000", "--costs", path]));
    assert_eq!(v["params"]["d2h_gibps"], b["save_gibps"], "{v:#}");
    assert_eq!(v["params"]["h2d_gibps"], b["restore_gibps"], "{v:#}");
    let v = json_of(&simulate(&["--json", "--steps", "1000", "--costs", path, "--d2h-gibps", "7"]));
    assert_eq!(v["params"]["d2h_gibps"], 7.0, "{v:#}");

    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "{}").expect("writing");
    let out = simulate(&["--costs", empty.to_str().expect("utf-8 path")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--costs"), "{out:?}");
}
