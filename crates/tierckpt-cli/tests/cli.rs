//! The `tierckpt` inspection commands against a real daemon: tables for
//! people, JSON for programs, exports readable by safetensors.

use std::collections::BTreeMap;

use serde_json::Value;
use tierckpt_client::TensorData;
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::testing::{cli, raw_shard, TestDaemon};

fn seed(d: &TestDaemon) -> Vec<u8> {
    let mut c = d.client();
    let w: Vec<u8> = (0..4096u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    for step in [10u64, 20] {
        for rank in 0..2u32 {
            let t = [TensorData { name: "layer.0.weight", dtype: Dtype::F32, shape: &[64, 64], data: &w }];
            let meta = BTreeMap::from([("step".to_string(), step.to_string())]);
            c.save(&ShardKey::new("job", step, rank), 2, &t, &meta, true).unwrap();
        }
    }
    w
}

fn run_json(d: &TestDaemon, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out, err) = cli(&d.proc.socket, &all);
    assert!(ok, "tierckpt {args:?} failed: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn status_ls_inspect_in_json_and_tables() {
    let d = TestDaemon::start("64MiB");
    seed(&d);
    let s = run_json(&d, &["status"]);
    assert_eq!(s["memory"]["shards"], 4);
    assert_eq!(s["namespaces"][0]["latest_complete"], 20);
    let ls = run_json(&d, &["ls", "job"]);
    assert_eq!(ls["steps"].as_array().unwrap().len(), 2);
    let i = run_json(&d, &["inspect", "job", "--rank", "1"]);
    assert_eq!(i["step"], 20);
    assert_eq!(i["shards"][0]["verified"], true);
    assert_eq!(i["shards"][0]["tensors"][0]["name"], "layer.0.weight");
    assert_eq!(i["shards"][0]["metadata"]["step"], "20");

    let (ok, out, _) = cli(&d.proc.socket, &["ls", "job"]);
    assert!(ok && out.contains("2/2") && out.contains("yes"), "{out}");
    let (ok, out, _) = cli(&d.proc.socket, &["inspect", "job", "--step", "10"]);
    assert!(ok && out.contains("layer.0.weight") && out.contains("checksums ok"), "{out}");
    let (ok, out, _) = cli(&d.proc.socket, &["status"]);
    assert!(ok && out.contains("job") && out.contains("memory"), "{out}");
}

#[test]
fn export_writes_safetensors_files_any_reader_opens() {
    let d = TestDaemon::start("64MiB");
    let w = seed(&d);
    let out = tierckpt_harness::testing::shm_dir();
    let dir = out.path().to_str().unwrap();
    let e = run_json(&d, &["export", "job", "--format", "safetensors", dir]);
    assert_eq!(e["step"], 20);
    let files = e["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    for f in files {
        let bytes = std::fs::read(f.as_str().unwrap()).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("layer.0.weight").unwrap();
        assert_eq!(t.shape(), &[64, 64]);
        assert_eq!(t.data(), &w[..]);
    }
}

#[test]
fn rm_and_bad_input_errors_name_the_problem() {
    let d = TestDaemon::start("64MiB");
    seed(&d);
    let r = run_json(&d, &["rm", "job", "--step", "10"]);
    assert_eq!(r["deleted_shards"], 2);
    let (ok, _, err) = cli(&d.proc.socket, &["rm", "job", "--step", "10"]);
    assert!(!ok && err.contains("not found") && err.contains("step 10"), "{err}");
    let (ok, _, err) = cli(&d.proc.socket, &["ls", "../etc"]);
    assert!(!ok && err.contains("namespace") && err.contains("../etc"), "{err}");
    let (ok, _, err) = cli(&d.proc.socket, &["inspect", "job", "--step", "20", "--rank", "7"]);
    assert!(!ok && err.contains("rank 7"), "{err}");
    let (ok, _, err) = cli(&d.dir.path().join("nope.sock"), &["status"]);
    assert!(!ok && err.contains("nope.sock") && err.contains("tierckptd"), "{err}");
    let r = run_json(&d, &["rm", "job"]);
    assert_eq!(r["deleted_shards"], 2);
    assert_eq!(run_json(&d, &["status"])["memory"]["shards"], 0);
}

/// Places a sealed shard (bytes and manifest) straight into a stopped
/// daemon's memory tier, as if a writer that checks nothing had put it there.
fn plant(mem: &std::path::Path, ns: &str, step: u64, bytes: &[u8]) {
    let key = ShardKey::new(ns, step, 0);
    let dir = mem.join("ns").join(ns).join(format!("{step:020}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rank-00000-of-00001.safetensors"), bytes).unwrap();
    let m = tierckpt_format::Manifest::compute(key, 1, bytes, 1);
    std::fs::write(dir.join("rank-00000-of-00001.manifest.json"), m.to_json()).unwrap();
}

#[test]
fn inspect_prints_control_characters_escaped_never_raw() {
    let mut d = TestDaemon::start("64MiB");
    d.proc.kill().unwrap();
    let mem = d.proc.memory_dir().to_path_buf();
    plant(&mem, "evil", 1, &raw_shard("w\u{1b}[31m", &[]));
    plant(&mem, "evil", 2, &raw_shard("w.0", &[("note\u{1b}]0;title\u{7}", "red\u{1b}[31m\nline")]));
    d.proc.restart().unwrap();

    let (ok, out, err) = cli(&d.proc.socket, &["inspect", "evil", "--step", "1"]);
    assert!(ok, "{err}");
    assert!(!out.contains('\u{1b}') && !err.contains('\u{1b}'), "raw escape sequence printed: {out:?}");
    assert!(out.contains(r#"tensor name "w\u{1b}[31m" is invalid"#) && out.contains("UNREADABLE"), "{out}");

    let (ok, out, err) = cli(&d.proc.socket, &["inspect", "evil", "--step", "2"]);
    assert!(ok, "{err}");
    assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "raw control character printed: {out:?}");
    assert!(out.contains(r"note\u{1b}]0;title\u{7} = red\u{1b}[31m\nline"), "{out}");
    assert!(out.contains("w.0") && out.contains("checksums ok"), "{out}");
}
