//! `tierckpt bench` end to end: real daemon children, a small state, and
//! the shape of the JSON reports; with `--changed` the bytes on the wire and
//! in the store follow the fresh data. Never asserts on wall-clock values.

use serde_json::Value;

/// Chunks of a shard file of `file_bytes` (4 MiB each).
fn chunks(file_bytes: u64) -> u64 {
    file_bytes.div_ceil(4 << 20)
}

/// Runs `tierckpt bench ARGS`, expecting it to fail; returns its stderr.
fn bench_fails(args: &[&str]) -> String {
    let out = tierckpt_harness::testing::tierckpt().arg("bench").args(args).output().expect("running tierckpt");
    assert!(!out.status.success(), "tierckpt bench {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn bench_memory_json(args: &[&str]) -> Value {
    bench_json("memory", args)
}

fn bench_json(which: &str, args: &[&str]) -> Value {
    let out =
        tierckpt_harness::testing::tierckpt().args(["bench", which]).args(args).output().expect("running tierckpt");
    assert!(
        out.status.success(),
        "tierckpt bench {which} failed: {}\nstdout: {}",
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
    // Fresh data by default: every chunk rewritten before every save.
    let file_bytes = v["file_bytes"].as_u64().unwrap();
    assert_eq!(v["changed_fraction"].as_f64(), Some(1.0));
    assert_eq!(v["chunk_size"].as_u64(), Some(4 << 20));
    assert_eq!(v["chunks"].as_u64(), Some(chunks(file_bytes)));
    assert_eq!(v["changed_chunks_per_step"].as_u64(), Some(chunks(file_bytes)));
    assert_eq!(v["changed_bytes_per_step"].as_u64(), Some(8 << 20));

    for f in [
        "save_first_gibps",
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
    assert!(
        close(positive(&v, "restore_ratio"), restore / floor),
        "restore_ratio is not restore_s / memcpy_floor_s: {v}"
    );
    assert!(close(positive(&v, "save_first_ratio"), positive(&v, "save_stall_first_s") / floor));
    assert!(close(
        positive(&v, "save_first_gibps"),
        (8u64 << 20) as f64 / (1u64 << 30) as f64 / positive(&v, "save_stall_first_s")
    ));
    assert!(close(positive(&v, "target_ratio"), 1.2));
    let gib = (8u64 << 20) as f64 / (1u64 << 30) as f64;
    assert!(close(positive(&v, "save_gibps"), gib / save));
    assert!(close(positive(&v, "restore_gibps"), gib / restore));
    let (lo, hi) = (positive(&v, "save_stall_min_s"), positive(&v, "save_stall_max_s"));
    assert!(lo <= save && save <= hi, "median {save} outside [{lo}, {hi}]");
}

#[test]
fn memory_prints_a_table_without_json() {
    let out = tierckpt_harness::testing::tierckpt()
        .args(["bench", "memory", "--size", "1MiB", "--tensors", "4", "--iters", "2", "--warmup", "1"])
        .args(["--buffer-offset", "16"])
        .output()
        .expect("running tierckpt");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "the floor",
        "caller blocked",
        "save: first",
        "back to back",
        "pool:",
        "load_into",
        "target: ratio at most 1.2",
        "steady state",
        "rewrites",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}

#[test]
fn memory_rejects_a_bad_size() {
    let out = tierckpt_harness::testing::tierckpt()
        .args(["bench", "memory", "--size", "lots", "--json"])
        .output()
        .expect("running tierckpt");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a size"));
}

#[test]
fn a_changed_fraction_outside_zero_to_one_is_refused_naming_the_flag() {
    for which in ["memory", "replicate", "persist"] {
        for bad in ["1.5", "-0.25", "most"] {
            let err = bench_fails(&[which, "--size", "1MiB", "--changed", bad, "--json"]);
            assert!(err.contains("--changed"), "bench {which} --changed {bad}: {err}");
            assert!(err.contains("[0, 1]"), "bench {which} --changed {bad}: {err}");
        }
    }
}

#[test]
fn replicate_reports_rates_against_the_tcp_floor() {
    let v = bench_json("replicate", &["--size", "8MiB", "--iters", "3", "--json"]);
    assert_eq!(v["benchmark"], "replicate");
    assert_eq!(v["bytes"].as_u64(), Some(8 << 20));
    let file_bytes = v["file_bytes"].as_u64().unwrap();
    assert!(file_bytes > 8 << 20);
    assert_eq!(v["tensors"].as_u64(), Some(64));
    assert_eq!(v["nodes"].as_u64(), Some(2));
    assert_eq!(v["replication_factor"].as_u64(), Some(1));
    assert_eq!(v["placement"], "ring");
    assert_eq!(v["iters"].as_u64(), Some(3));
    assert_eq!(v["keep_last"].as_u64(), Some(3));
    assert_eq!(v["warmup"].as_u64(), Some(5), "warm-up defaults to keep_last + 2");
    // 5 floor repetitions up front, then one before each of 3 replications,
    // 3 restores with map_unverified and 3 with load_into.
    assert_eq!(v["floor_samples"].as_u64(), Some(5 + 3 * 3));
    assert_eq!(v["restored_identical"], true);
    assert!(v["steady_state"].as_str().unwrap().contains("recycled segments"));

    for f in [
        "tcp_floor_s",
        "tcp_floor_gibps",
        "tcp_floor_min_s",
        "replicate_s",
        "replicate_gibps",
        "ratio",
        "replicate_min_s",
        "replicate_max_s",
        "replicate_first_s",
        "save_s",
        "restore_peer_s",
        "restore_peer_gibps",
        "restore_ratio",
        "restore_peer_min_s",
        "restore_local_map_s",
        "restore_peer_load_s",
        "restore_peer_load_gibps",
        "restore_peer_load_ratio",
        "target_ratio",
    ] {
        positive(&v, f);
    }
    assert!(v["meets_target"].is_boolean());
    assert!(v["restore_meets_target"].is_boolean());
    assert!(close(positive(&v, "target_ratio"), 0.9));
    assert!(close(
        positive(&v, "replicate_first_gibps"),
        file_bytes as f64 / (1u64 << 30) as f64 / positive(&v, "replicate_first_s")
    ));

    // Fresh data: every chunk changed before every save, so every replica
    // goes whole (no chunk of the base is left out), and the first, without
    // a base, too; a restore from the peer fetches the whole shard.
    assert_eq!(v["changed_fraction"].as_f64(), Some(1.0));
    assert_eq!(v["chunks"].as_u64(), Some(chunks(file_bytes)));
    assert_eq!(v["changed_chunks_per_step"].as_u64(), Some(chunks(file_bytes)));
    assert_eq!(v["shard_bytes_replicated"].as_u64(), Some(3 * file_bytes));
    assert!(v["wire_bytes_sent"].as_u64().unwrap() >= 3 * file_bytes, "{v}");
    assert!(v["wire_bytes_per_replication"].as_u64().unwrap() >= file_bytes, "{v}");
    assert!(v["wire_ratio"].as_f64().unwrap() >= 1.0, "{v}");
    assert_eq!(v["delta_shards_sent"].as_u64(), Some(0), "{v}");
    assert!(v["replicate_first_wire_bytes"].as_u64().unwrap() >= file_bytes, "{v}");
    assert_eq!(v["restore_peer_fetched_bytes"].as_u64(), Some(file_bytes), "{v}");

    let floor = positive(&v, "tcp_floor_gibps");
    assert!(
        close(positive(&v, "ratio"), positive(&v, "replicate_gibps") / floor),
        "ratio is not replicate_gibps / tcp_floor_gibps: {v}"
    );
    assert!(
        close(positive(&v, "restore_ratio"), positive(&v, "restore_peer_gibps") / floor),
        "restore_ratio is not restore_peer_gibps / tcp_floor_gibps: {v}"
    );
    assert!(close(positive(&v, "restore_peer_load_ratio"), positive(&v, "restore_peer_load_gibps") / floor));
    // Rates are shard-file bytes over the median times.
    let gib = file_bytes as f64 / (1u64 << 30) as f64;
    for (rate, time) in [
        ("tcp_floor_gibps", "tcp_floor_s"),
        ("replicate_gibps", "replicate_s"),
        ("restore_peer_gibps", "restore_peer_s"),
        ("restore_peer_load_gibps", "restore_peer_load_s"),
    ] {
        assert!(close(positive(&v, rate), gib / positive(&v, time)), "{rate} is not file_bytes / {time}: {v}");
    }
    let (lo, med, hi) = (positive(&v, "replicate_min_s"), positive(&v, "replicate_s"), positive(&v, "replicate_max_s"));
    assert!(lo <= med && med <= hi, "median {med} outside [{lo}, {hi}]");
    assert!(positive(&v, "tcp_floor_min_s") <= positive(&v, "tcp_floor_s"));
    assert!(positive(&v, "restore_peer_min_s") <= positive(&v, "restore_peer_s"));
}

#[test]
fn replicate_across_two_hosts_on_a_capped_link_reports_the_link() {
    let args = ["--size", "1MiB", "--tensors", "4", "--iters", "1", "--warmup", "1", "--floor-reps", "1"];
    let v = bench_json("replicate", &[&args[..], &["--netns", "--link-rate", "1gbit", "--json"]].concat());
    assert_eq!(v["netns"], true);
    assert_eq!(v["link_rate"], "1gbit");
    assert!(close(positive(&v, "link_rate_gibps"), 1e9 / 8.0 / (1u64 << 30) as f64), "{v}");
    assert_eq!(v["floor"], "TCP copy between the two hosts (link capped at 1gbit)");
    assert_eq!(v["restored_identical"], true);
    assert_eq!(v["nodes"].as_u64(), Some(2));
    for f in ["tcp_floor_gibps", "replicate_gibps", "ratio", "restore_peer_gibps", "restore_ratio"] {
        positive(&v, f);
    }
    let file_bytes = v["file_bytes"].as_u64().unwrap();
    assert_eq!(v["restore_peer_fetched_bytes"].as_u64(), Some(file_bytes), "node 1 fetched the shard across the link");

    // On loopback the fields say so.
    let v = bench_json("replicate", &[&args[..], &["--json"]].concat());
    assert_eq!(v["netns"], false);
    assert!(v["link_rate"].is_null() && v["link_rate_gibps"].is_null(), "{v}");
    assert_eq!(v["floor"], "TCP copy on loopback");
}

#[test]
fn replicate_link_rate_needs_netns_and_a_rate() {
    let err = bench_fails(&["replicate", "--size", "1MiB", "--link-rate", "1gbit"]);
    assert!(err.contains("--netns"), "{err}");
    let err = bench_fails(&["replicate", "--size", "1MiB", "--netns", "--link-rate", "fast"]);
    assert!(err.contains("--link-rate") && err.contains("gbit"), "{err}");
}

#[test]
fn replicate_prints_a_table_without_json() {
    let out = tierckpt_harness::testing::tierckpt()
        .args(["bench", "replicate", "--size", "1MiB", "--tensors", "4", "--iters", "1", "--warmup", "1"])
        .args(["--floor-reps", "1"])
        .output()
        .expect("running tierckpt");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "the floor",
        "visible on node 1",
        "replicate: first",
        "bytes on the wire",
        "restore from peer",
        "target: rate at least 0.9",
        "steady state",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}

#[test]
fn replicate_with_nothing_changed_sends_almost_nothing() {
    // The same bytes at every step: the sparse replicas leave out every
    // chunk, which is what the benchmark measured before --changed.
    let v = bench_json("replicate", &["--size", "8MiB", "--iters", "3", "--warmup", "1", "--changed", "0", "--json"]);
    let file_bytes = v["file_bytes"].as_u64().unwrap();
    assert_eq!(v["changed_fraction"].as_f64(), Some(0.0));
    assert_eq!(v["changed_chunks_per_step"].as_u64(), Some(0));
    assert_eq!(v["shard_bytes_replicated"].as_u64(), Some(3 * file_bytes));
    assert_eq!(v["delta_shards_sent"].as_u64(), Some(3), "{v}");
    assert!(v["wire_bytes_sent"].as_u64().unwrap() < file_bytes / 10, "{v}");
    assert!(v["replicate_first_wire_bytes"].as_u64().unwrap() >= file_bytes, "the first has no base: {v}");
}

#[test]
fn the_tcp_sink_is_hidden() {
    let out = tierckpt_harness::testing::tierckpt().args(["bench", "--help"]).output().expect("running tierckpt");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("replicate"), "{text}");
    assert!(!text.contains("tcp-sink"), "{text}");
}

fn check_persist(v: &Value, scheme: &str, target_ratio: f64) {
    assert_eq!(v["benchmark"], "persist", "{v}");
    assert_eq!(v["scheme"], scheme, "{v}");
    assert_eq!(v["bytes"].as_u64(), Some(8 << 20));
    assert_eq!(v["tensors"].as_u64(), Some(64));
    assert_eq!(v["iters"].as_u64(), Some(2));
    assert!(v["file_bytes"].as_u64().unwrap() > 8 << 20);
    assert!(!v["floor_tool"].as_str().unwrap().is_empty());
    for f in ["persist_s", "persist_gibps", "floor_s", "floor_gibps", "ratio", "drain_s", "drain_gibps", "drain_ratio"]
    {
        positive(v, f);
    }
    let (p, f, r) = (positive(v, "persist_gibps"), positive(v, "floor_gibps"), positive(v, "ratio"));
    assert!(close(r, p / f), "ratio {r} should be persist_gibps / floor_gibps = {}", p / f);
    assert_eq!(v["target_ratio"].as_f64(), Some(target_ratio));
    assert_eq!(v["meets_target"].as_bool(), Some(r >= target_ratio));
    let file_bytes = v["file_bytes"].as_u64().unwrap();
    assert_eq!(v["chunks"].as_u64(), Some(chunks(file_bytes)));
    assert_eq!(v["uploaded_bytes"].as_u64(), Some(2 * file_bytes), "{v}");
    positive(v, "persist_first_s");
    positive(v, "persist_first_gibps");
    // The first step has no base: stored whole.
    assert!(v["persist_first_stored_bytes"].as_u64().unwrap() >= file_bytes, "{v}");
}

#[test]
fn persist_to_a_file_target_reports_a_ratio_against_write_and_fsync() {
    let v = bench_json("persist", &["--size", "8MiB", "--iters", "2", "--json"]);
    check_persist(&v, "file", 0.9);
    assert!(v["target"].as_str().unwrap().starts_with("file://"));
    assert!(v["floor_tool"].as_str().unwrap().contains("fsync"));
    // Fresh data: nothing to take from the step before, every byte stored.
    let file_bytes = v["file_bytes"].as_u64().unwrap();
    assert_eq!(v["changed_chunks_per_step"].as_u64(), Some(chunks(file_bytes)));
    assert!(v["stored_bytes"].as_u64().unwrap() >= 2 * file_bytes, "{v}");
    assert!(v["stored_bytes_per_step"].as_u64().unwrap() >= file_bytes, "{v}");
    assert_eq!(v["delta_shards"].as_u64(), Some(0), "{v}");
}

#[test]
fn persist_with_nothing_changed_stores_almost_nothing() {
    let v = bench_json("persist", &["--size", "8MiB", "--iters", "2", "--changed", "0", "--json"]);
    check_persist(&v, "file", 0.9);
    let file_bytes = v["file_bytes"].as_u64().unwrap();
    assert_eq!(v["changed_chunks_per_step"].as_u64(), Some(0));
    assert_eq!(v["delta_shards"].as_u64(), Some(2), "{v}");
    assert!(v["stored_bytes"].as_u64().unwrap() < file_bytes / 10, "{v}");
}

#[test]
fn persist_prints_a_table_without_json() {
    let out = tierckpt_harness::testing::tierckpt()
        .args(["bench", "persist", "--size", "1MiB", "--tensors", "4", "--iters", "1", "--warmup", "1"])
        .args(["--floor-reps", "1", "--changed", "0.5"])
        .output()
        .expect("running tierckpt");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["floor", "sealed -> committed", "persist: first", "bytes stored", "target: rate at least 0.9"] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}

#[test]
fn persist_to_s3_reports_a_ratio_against_boto3() {
    let v = bench_json(
        "persist",
        &["--start-moto", "--target", "s3://bench-bucket/p", "--size", "8MiB", "--iters", "2", "--json"],
    );
    check_persist(&v, "s3", 1.0);
    assert_eq!(v["target"], "s3://bench-bucket/p");
    assert!(v["floor_tool"].as_str().unwrap().contains("boto3"));
}

fn ratio(v: &Value, field: &str) -> f64 {
    let x = v[field].as_f64().unwrap_or_else(|| panic!("{field} missing or not a number in {v}"));
    assert!(x.is_finite() && x > 0.0, "{field} = {x} should be positive and finite in {v}");
    x
}

fn count(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("{field} missing or not a count in {v}"))
}

#[test]
fn reduce_reports_codec_rows_and_end_to_end_paths() {
    // A 40 MB/s link: the daemon measures that compressing replicas pays.
    let v = bench_json("reduce", &["--size", "8MiB", "--steps", "3", "--replication-bandwidth", "40MB", "--json"]);
    assert_eq!(v["benchmark"], "reduce");
    assert_eq!(v["size"].as_u64(), Some(8 << 20));
    assert_eq!(v["steps"].as_u64(), Some(3));
    assert_eq!(v["decoded_identical"], true);
    let workloads = ["finetune-frozen", "full-adam", "embedding", "random"];

    // The codec part: one row per workload (one compression, zstd:1).
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4);
    for (r, w) in rows.iter().zip(workloads) {
        assert_eq!(r["workload"], w);
        assert_eq!(r["compression"], "zstd:1");
        assert_eq!(r["steps_measured"].as_u64(), Some(2));
        assert!(count(r, "file_bytes") > 7 << 20, "{r}");
        for f in [
            "compress_bytes_ratio",
            "delta_bytes_ratio",
            "compress_encode_gibps",
            "delta_decode_gibps",
            "memcpy_floor_gibps",
        ] {
            ratio(r, f);
        }
    }
    assert!(ratio(&rows[2], "delta_bytes_ratio") < 0.1, "embedding delta: {}", rows[2]);
    assert!(ratio(&rows[3], "delta_bytes_ratio") >= 0.99, "random delta: {}", rows[3]);
    assert!(ratio(&rows[3], "compress_bytes_ratio") >= 0.99, "random compressed: {}", rows[3]);

    // End to end: the flags of both paths, one row per workload.
    let un = v["end_to_end_uncompressed_flags"].as_str().unwrap();
    assert!(un.contains("--replication-delta false") && un.contains("--persist-compression off"), "{un}");
    let re = v["end_to_end_reduced_flags"].as_str().unwrap();
    assert!(re.contains("--persist-delta true") && re.contains("--persist-compression zstd:1"), "{re}");
    assert!(un.contains("--replication-bandwidth 40MB") && re.contains("--replication-bandwidth 40MB"), "{re}");
    let e2e = v["end_to_end"].as_array().expect("end_to_end");
    assert_eq!(e2e.len(), 4);
    for (r, w) in e2e.iter().zip(workloads) {
        assert_eq!(r["workload"], w);
        assert_eq!(r["steps_measured"].as_u64(), Some(2));
        assert_eq!(r["persist_compression"], "zstd:1");
        assert_eq!(r["replication_compression"], "zstd:1");
        let file_bytes = count(r, "file_bytes");
        for path in ["uncompressed", "reduced"] {
            let p = &r[path];
            for f in [
                "replicate_s",
                "replicate_gibps",
                "persist_s",
                "persist_gibps",
                "replication_bytes_ratio",
                "persistence_bytes_ratio",
            ] {
                ratio(p, f);
            }
            // Counters over the 2 checkpoints after the first.
            assert_eq!(count(p, "shards_sent"), 2, "{w} {path}: {p}");
            assert_eq!(count(p, "bytes_sent"), 2 * file_bytes, "{w} {path}: {p}");
            assert_eq!(count(p, "uploaded_bytes"), 2 * file_bytes, "{w} {path}: {p}");
            let (sent, wire) = (count(p, "bytes_sent"), count(p, "wire_bytes_sent"));
            let (up, stored) = (count(p, "uploaded_bytes"), count(p, "stored_bytes"));
            assert!(close(ratio(p, "replication_bytes_ratio"), wire as f64 / sent as f64), "{p}");
            assert!(close(ratio(p, "persistence_bytes_ratio"), stored as f64 / up as f64), "{p}");
        }
        // The uncompressed path sends and stores the shards as they are.
        let u = &r["uncompressed"];
        assert_eq!(count(u, "delta_shards_sent"), 0);
        assert_eq!(count(u, "delta_shards"), 0);
        assert!(ratio(u, "replication_bytes_ratio") >= 0.99 && ratio(u, "replication_bytes_ratio") <= 1.01, "{w}: {u}");
        assert!(ratio(u, "persistence_bytes_ratio") >= 0.99 && ratio(u, "persistence_bytes_ratio") <= 1.01, "{w}: {u}");
        let red = &r["reduced"];
        assert!(close(ratio(r, "replicate_throughput_ratio"), ratio(u, "replicate_s") / ratio(red, "replicate_s")));
        assert!(close(ratio(r, "persist_throughput_ratio"), ratio(u, "persist_s") / ratio(red, "persist_s")));
    }
    // The embedding shrinks end to end, replicated as deltas and stored as
    // deltas; random bytes go as they are.
    let emb = &e2e[2]["reduced"];
    assert_eq!(count(emb, "delta_shards_sent"), 2, "{emb}");
    assert_eq!(count(emb, "delta_shards"), 2, "{emb}");
    assert!(ratio(emb, "replication_bytes_ratio") < 0.1, "{emb}");
    assert!(ratio(emb, "persistence_bytes_ratio") < 0.1, "{emb}");
    let rnd = &e2e[3]["reduced"];
    assert!(ratio(rnd, "replication_bytes_ratio") >= 0.99 && ratio(rnd, "replication_bytes_ratio") <= 1.01, "{rnd}");
    assert!(ratio(rnd, "persistence_bytes_ratio") >= 0.99 && ratio(rnd, "persistence_bytes_ratio") <= 1.01, "{rnd}");

    // The byte targets end to end: their verdicts follow the figures.
    for (i, target) in [(0, 0.15), (2, 0.1)] {
        let (r, red) = (&e2e[i], &e2e[i]["reduced"]);
        assert_eq!(r["target_ratio"].as_f64(), Some(target), "{r}");
        let met = ratio(red, "replication_bytes_ratio") <= target && ratio(red, "persistence_bytes_ratio") <= target;
        assert_eq!(r["meets_target"].as_bool(), Some(met), "{r}");
    }
    assert!(e2e[1]["target_ratio"].is_null() && e2e[3]["meets_target"].is_null());

    // The no-loss check is on random; its verdict follows its figures.
    let c = &v["no_loss_check"];
    assert_eq!(c["workload"], "random");
    assert_eq!(c["target_ratio"].as_f64(), Some(0.9));
    let (rr, pr) = (ratio(c, "replicate_throughput_ratio"), ratio(c, "persist_throughput_ratio"));
    assert!(close(rr, ratio(&e2e[3], "replicate_throughput_ratio")));
    assert_eq!(c["met"].as_bool(), Some(rr >= 0.9 && pr >= 0.9));
}

#[test]
fn reduce_without_end_to_end_prints_the_codec_table_only() {
    let out = tierckpt_harness::testing::tierckpt()
        .args(["bench", "reduce", "--size", "1MiB", "--steps", "2", "--no-end-to-end"])
        .output()
        .expect("running tierckpt");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("bytes: delta"), "{text}");
    assert!(!text.contains("end to end"), "{text}");
    assert!(!text.contains("no loss of throughput"), "{text}");
}

#[test]
fn memory_reports_the_first_save_on_the_pool_and_back_to_back_saves() {
    let v = bench_memory_json(&["--size", "8MiB", "--tensors", "8", "--iters", "3", "--json"]);
    let floor = positive(&v, "memcpy_floor_s");
    let b2b = positive(&v, "back_to_back_s");
    assert!(close(positive(&v, "back_to_back_ratio"), b2b / floor), "{v}");
    assert!(positive(&v, "back_to_back_max_s") >= b2b, "{v}");
    assert!(v["back_to_back_meets_target"].is_boolean() && v["first_save_meets_target"].is_boolean(), "{v}");
    // The daemon pre-faulted a pool before the first save, which landed on it.
    positive(&v, "prefault_wait_s");
    assert!(v["prefaulted_bytes"].as_u64().unwrap() >= v["file_bytes"].as_u64().unwrap(), "{v}");
    assert_eq!(v["first_save_from_pool"], true, "{v}");
    assert!(v["reserved_from_pool"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["reserved_fresh"].is_u64(), "{v}");
    positive(&v, "prepare_s");
    let v = bench_memory_json(&["--size", "8MiB", "--tensors", "8", "--iters", "1", "--no-prepare", "--json"]);
    assert!(v["prepare_s"].is_null(), "{v}");
}
