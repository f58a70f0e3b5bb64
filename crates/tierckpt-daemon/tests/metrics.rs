//! Observability on real daemons: the Grafana dashboard's queries against
//! what a 2-node cluster draining to a `file://` store exposes at `/metrics`
//! after saves, replication, a drain and restores from every tier; and JSON
//! log lines (`log_format = "json"`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tierckpt_client::{Client, TensorData};
use tierckpt_format::{Dtype, ShardKey};
use tierckpt_harness::daemon::{daemon_binary, LocalCluster, LocalClusterOptions};
use tierckpt_harness::testing::{http, shm_dir};

const LIMIT: Duration = Duration::from_secs(60);
const NS: &str = "obs";
const LEN: usize = 1 << 20;

fn payload(rank: u32, step: u64) -> Vec<u8> {
    (0..LEN).map(|i| (i as u64 * 7 + rank as u64 * 13 + step) as u8).collect()
}

fn save(c: &LocalCluster, node: usize, step: u64, rank: u32) {
    let data = payload(rank, step);
    let t = [TensorData { name: "state", dtype: Dtype::U8, shape: &[LEN], data: &data }];
    let mut client = Client::connect(c.socket(node)).unwrap();
    client.save(&ShardKey::new(NS, step, rank), 2, &t, &BTreeMap::new(), true).unwrap();
}

/// Loads rank `rank` of `step` through node `node` and checks its bytes.
fn load(c: &LocalCluster, node: usize, step: u64, rank: u32) {
    let mut buf = vec![0u8; LEN];
    let mut client = Client::connect(c.socket(node)).unwrap();
    client.load_into(&ShardKey::new(NS, step, rank), &mut [("state", &mut buf[..])]).unwrap();
    assert!(buf == payload(rank, step), "node {node} restored step {step} rank {rank} intact");
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn scrape(c: &LocalCluster, node: usize) -> String {
    let bearer = c.bearer();
    let (code, body) = http(&c.options(node).http_addr(), "GET", "/metrics", &[("Authorization", &bearer)], b"");
    let text = String::from_utf8(body).unwrap();
    assert_eq!(code, 200, "{text}");
    text
}

/// A scrape: the type of each family, and every sample (series with its
/// labels -> value).
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<(String, String, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').unwrap();
                types.insert(name.to_string(), kind.to_string());
            } else if !line.starts_with('#') && !line.is_empty() {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let (name, labels) = series.split_once('{').unwrap_or((series, ""));
                samples.push((name.to_string(), labels.to_string(), value.parse().unwrap()));
            }
        }
        Scrape { types, samples }
    }

    /// The family a queried name belongs to: counters are queried with
    /// `_total`, histograms with `_bucket`, `_sum` or `_count`.
    fn family<'a>(&self, queried: &'a str) -> Option<&'a str> {
        let stripped = ["_bucket", "_sum", "_count", "_total"].iter().find_map(|s| queried.strip_suffix(s));
        [Some(queried), stripped].into_iter().flatten().find(|f| self.types.contains_key(*f))
    }

    fn has_series(&self, family: &str) -> bool {
        let suffixes = ["", "_total", "_bucket", "_sum", "_count", "_created"];
        self.samples.iter().any(|(n, ..)| n.strip_prefix(family).is_some_and(|r| suffixes.contains(&r)))
    }

    /// Observations of a histogram with `label` (all when empty).
    fn count(&self, family: &str, label: &str) -> f64 {
        let name = format!("{family}_count");
        self.samples.iter().filter(|(n, l, _)| *n == name && l.contains(label)).map(|(.., v)| v).sum()
    }

    fn value(&self, name: &str, label: &str) -> Option<f64> {
        self.samples.iter().find(|(n, l, _)| n == name && l.contains(label)).map(|(.., v)| *v)
    }
}

/// Every metric name the dashboard's panels query, with the panel's title.
fn dashboard_queries() -> BTreeMap<String, BTreeSet<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/tierckpt-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    for p in panels {
        let title = p["title"].as_str().expect("a title").to_string();
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {title} has targets"));
        assert!(!targets.is_empty(), "panel {title} queries something");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("a target of {title} has an expr"));
            let found = metric_names(expr);
            assert!(!found.is_empty(), "{title}: {expr} queries no tierckpt metric");
            for n in found {
                names.entry(n).or_default().insert(title.clone());
            }
        }
    }
    names
}

/// The `tierckpt_*` names a PromQL expression selects (functions, label
/// matchers and ranges are not names; label values may not start so).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tierckpt_") {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '"') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn metric_names_are_taken_from_promql() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le, tier) (rate(tierckpt_restore_duration_seconds_bucket\
         {instance=~\"$instance\"}[$__rate_interval]))) / time() - tierckpt_x_total",
    );
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["tierckpt_restore_duration_seconds_bucket", "tierckpt_x_total"]);
}

#[test]
fn every_dashboard_query_is_served_by_a_cluster_at_work() {
    let dir = shm_dir();
    let store = shm_dir();
    let mut o = LocalClusterOptions { nodes: 2, ..Default::default() };
    o.settings.memory_tier_size = Some("128MiB".into());
    o.settings.persistent_path = Some(format!("file://{}", store.path().display()));
    let mut c = LocalCluster::start(dir.path(), o).unwrap();
    // Step 1 of a 2-rank job, one rank per node, copied to the other node and
    // drained; then both nodes are replaced by empty ones.
    save(&c, 0, 1, 0);
    save(&c, 1, 1, 1);
    let committed = |step: u64| store.path().join(NS).join(format!("{step:020}")).join("COMMIT").exists();
    wait_for("step 1 committed", || committed(1));
    c.replace_all_empty().unwrap();
    // Restores: node 0 from the persistent tier, node 1 from node 0's copy,
    // node 0 again from its own memory.
    load(&c, 0, 1, 0);
    load(&c, 1, 1, 0);
    load(&c, 0, 1, 0);
    // Step 2: seals, replication and a drain on the new nodes.
    save(&c, 0, 2, 0);
    save(&c, 1, 2, 1);
    wait_for("step 2 committed", || committed(2));
    // The counters move when the work is done, a moment after the commit.
    let mut scrapes = Vec::new();
    wait_for("both nodes to count their pushes and the commit", || {
        scrapes = (0..2).map(|i| Scrape::parse(&scrape(&c, i))).collect();
        scrapes.iter().all(|s| {
            s.count("tierckpt_replicate_push_duration_seconds", "") >= 1.0
                && s.value("tierckpt_persist_commits_total", "namespace=\"obs\"") >= Some(1.0)
                && s.value("tierckpt_persist_steps_waiting", "namespace=\"obs\"") == Some(0.0)
        })
    });
    let queries = dashboard_queries();
    let mut histograms = BTreeSet::new();
    for (queried, panels) in &queries {
        for (i, s) in scrapes.iter().enumerate() {
            let family = s.family(queried).unwrap_or_else(|| panic!("node {i} exposes no {queried} ({panels:?})"));
            assert!(s.has_series(family), "node {i} has no series of {family} ({panels:?})");
            if s.types[family] == "histogram" {
                assert!(queried.ends_with("_bucket") || queried.ends_with("_count"), "{queried}: a histogram");
                histograms.insert(family.to_string());
            }
        }
    }
    // Each histogram the dashboard charts saw the workload on some node.
    for h in &histograms {
        let seen: f64 = scrapes.iter().map(|s| s.count(h, "")).sum();
        assert!(seen > 0.0, "{h} has no observations on either node");
    }
    for h in ["reserve", "write", "seal", "replicate_push", "persist_upload", "persist_commit", "restore"] {
        assert!(histograms.contains(&format!("tierckpt_{h}_duration_seconds")), "the dashboard charts {h}");
    }
    for tier in ["memory", "peer", "persistent"] {
        let label = format!("tier=\"{tier}\"");
        let seen: f64 = scrapes.iter().map(|s| s.count("tierckpt_restore_duration_seconds", &label)).sum();
        assert!(seen >= 1.0, "a restore from the {tier} tier was timed");
    }
    // The lag of a caught-up peer is zero; its last push is recent.
    for (i, s) in scrapes.iter().enumerate() {
        let peer = format!("peer=\"n{}\"", 1 - i);
        assert_eq!(s.value("tierckpt_replication_pending_shards", &peer), Some(0.0), "node {i}");
        assert_eq!(s.value("tierckpt_replication_lag_seconds", &peer), Some(0.0), "node {i}");
        let last = s.value("tierckpt_replication_last_success_timestamp_seconds", &peer).expect("a push");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((now - last).abs() < 600.0, "node {i}: last push at {last}, now {now}");
        assert_eq!(s.value("tierckpt_cluster_nodes", "state=\"alive\""), Some(2.0), "node {i}");
        let sealed = s.value("tierckpt_memory_category_bytes", "category=\"sealed\"").unwrap();
        assert!(sealed >= 2.0 * LEN as f64, "node {i} holds both ranks of step 2: {sealed}");
    }
}

#[test]
fn replication_lag_grows_while_a_peer_is_down_and_clears_when_it_has_the_copy() {
    let dir = shm_dir();
    let mut o = LocalClusterOptions { nodes: 2, ..Default::default() };
    o.settings.memory_tier_size = Some("64MiB".into());
    let mut c = LocalCluster::start(dir.path(), o).unwrap();
    let lag = |c: &LocalCluster| {
        let s = Scrape::parse(&scrape(c, 0));
        let peer = "peer=\"n1\"";
        let pending = s.value("tierckpt_replication_pending_shards", peer).expect("n1 is a target");
        let age = s.value("tierckpt_replication_lag_seconds", peer).expect("n1 is a target");
        (pending, age, s.value("tierckpt_replication_last_success_timestamp_seconds", peer))
    };
    assert_eq!(lag(&c), (0.0, 0.0, None), "nothing owed, nothing pushed yet");
    c.kill(1).unwrap();
    let data = payload(0, 1);
    let t = [TensorData { name: "state", dtype: Dtype::U8, shape: &[LEN], data: &data }];
    let mut client = Client::connect(c.socket(0)).unwrap();
    client.save(&ShardKey::new(NS, 1, 0), 1, &t, &BTreeMap::new(), true).unwrap();
    wait_for("the shard owed to n1 to age", || {
        let (pending, age, _) = lag(&c);
        pending == 1.0 && age > 0.2
    });
    // Back (without the copy): the push waiting for it, or re-replication,
    // sends it, and the lag clears.
    c.restart(1).unwrap();
    wait_for("n1 to hold the copy", || {
        let (pending, age, last) = lag(&c);
        pending == 0.0 && age == 0.0 && last.is_some()
    });
}

/// `tierckptd` with none of the caller's `TIERCKPT_*` variables.
fn tierckptd() -> Command {
    let mut c = Command::new(daemon_binary());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TIERCKPT_")) {
        c.env_remove(k);
    }
    c
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let dir = shm_dir();
    let mem = dir.path().join("mem");
    let mut child = tierckptd()
        .args(["--memory-dir", mem.to_str().unwrap(), "--memory-tier-size", "64MiB", "--http-addr", "off"])
        .args(["--mount-huge-tmpfs", "false", "--prefault-share", "0"])
        .env("TIERCKPT_LOG_FORMAT", "json")
        .env("TIERCKPT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    assert!(ready.contains("\"ready\""), "ready line: {ready:?}");
    // SAFETY: signals our own child, whose pid is live until we wait on it.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(child.wait().unwrap().success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{stderr}")))
        .collect();
    let ready = lines.iter().find(|l| l["fields"]["message"] == "daemon ready").expect("a ready line in the log");
    assert_eq!(ready["level"], "INFO", "{ready}");
    assert_eq!(ready["fields"]["capacity"], 64 << 20, "fields are typed: {ready}");
    assert!(ready["timestamp"].is_string() && ready["target"].is_string(), "{ready}");
    assert!(lines.iter().any(|l| l["fields"]["message"] == "stopping"), "{stderr}");
}

#[test]
fn an_unknown_log_format_is_refused_by_name() {
    let o = tierckptd().args(["--log-format", "xml", "--print-config"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("log_format") && err.contains("\"xml\"") && err.contains("json"), "{err}");
}
