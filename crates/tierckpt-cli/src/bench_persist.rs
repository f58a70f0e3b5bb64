//! `tierckpt bench persist`: the drain of a real daemon child to its
//! persistent tier, against a floor that writes the same bytes to the same
//! target in the same run.
//!
//! A shard (pseudo-random bf16 tensors) is saved into the daemon's memory
//! tier, step after step; each measured step is timed from the moment its
//! seal returns until the daemon reports it committed in the store
//! (`status().persistent.namespaces[].last_committed`). That covers the
//! daemon's whole path: checksumming (the drainer only takes visible
//! shards), mapping from memory and verifying, the upload (multipart with
//! parallel parts), the rank record, COMMIT, and for `file://` the fsyncs.
//!
//! The floor, one repetition before each measured step (plus `floor_reps` up
//! front), the median reported:
//! - `file://`: one sequential `write` of the same bytes to a fresh file in
//!   the target directory, then `fsync`.
//! - `s3://`: the same bytes uploaded to the same bucket with boto3's
//!   `upload_fileobj` (default `TransferConfig`, multipart), timed inside a
//!   long-lived Python process, so start-up and imports are not counted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tierckpt_client::{Client, TensorData};

use crate::bench::{fill_random, gibps, median, parse_bytes, tensor_lens};
use tierckpt_format::{Dtype, ShardKey, ShardLayout, TensorSpec};

use crate::output;
use tierckpt_harness::daemon::{DaemonOptions, DaemonProcess};

/// Rate that `bench persist` aims for, as a fraction of the floor's, for a
/// `file://` target (a raw write + fsync).
pub const PERSIST_FILE_TARGET_RATIO: f64 = 0.8;
/// The same for an `s3://` target (an upload with boto3).
pub const PERSIST_S3_TARGET_RATIO: f64 = 1.0;

#[derive(Args, Debug, Clone)]
pub struct PersistArgs {
    /// Persistent tier to drain to: `file:///dir` or `s3://bucket/prefix`
    /// [default: a fresh `file://` directory under --tmp-dir, removed at the end].
    #[arg(long)]
    pub target: Option<String>,
    /// Total tensor bytes of the shard, like "1GiB", "256MiB" or a number of bytes.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub size: u64,
    /// Number of tensors the shard is split into (bf16, equal sizes).
    #[arg(long, default_value_t = 64)]
    pub tensors: usize,
    /// Measured steps (saved, then waited for until committed).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Unmeasured steps before the measured ones.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Steps the daemon keeps in memory (its retention).
    #[arg(long, default_value_t = 2)]
    pub keep_last: usize,
    /// Repetitions of the floor up front (one more runs before every measured
    /// step; the median of all is reported).
    #[arg(long, default_value_t = 2)]
    pub floor_reps: usize,
    /// S3 endpoint (for `s3://` targets), passed to the daemon and to boto3.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Start `moto_server` on a free 127.0.0.1 port for the run (an `s3://`
    /// target's endpoint), and create the target's bucket.
    #[arg(long)]
    pub start_moto: bool,
    /// Region, and credentials, for `s3://` targets (moto accepts any).
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    #[arg(long, default_value = "testing")]
    pub access_key_id: String,
    #[arg(long, default_value = "testing")]
    pub secret_access_key: String,
    /// Directory (on disk, so that fsync means something) for the default
    /// `file://` target.
    #[arg(long, default_value = "/tmp")]
    pub tmp_dir: PathBuf,
    /// Directory (a tmpfs) in which the daemon's memory tier is created, in a
    /// fresh subdirectory removed at the end.
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
}

/// What `bench persist` measured. Times are seconds; rates are of `file_bytes`.
#[derive(Debug, Clone, Serialize)]
pub struct PersistReport {
    pub benchmark: &'static str,
    /// "file" or "s3".
    pub scheme: &'static str,
    pub target: String,
    /// Tensor bytes of the shard.
    pub bytes: u64,
    /// Bytes of the shard file, what is uploaded and what the floor writes.
    pub file_bytes: u64,
    pub tensors: usize,
    pub dtype: &'static str,
    pub iters: usize,
    pub warmup: usize,
    /// Median time from the seal returning to the step committed in the store.
    pub persist_s: f64,
    pub persist_gibps: f64,
    pub persist_min_s: f64,
    pub persist_max_s: f64,
    /// Medians of the parts of `persist_s`: seal -> visible (the daemon's
    /// checksumming) and visible -> committed (the drain proper).
    pub visible_s: f64,
    pub drain_s: f64,
    pub drain_gibps: f64,
    /// What the floor is.
    pub floor_tool: String,
    pub floor_s: f64,
    pub floor_gibps: f64,
    pub floor_min_s: f64,
    pub floor_samples: usize,
    /// persist_gibps / floor_gibps.
    pub ratio: f64,
    /// drain_gibps / floor_gibps.
    pub drain_ratio: f64,
    pub target_ratio: f64,
    pub meets_target: bool,
}

/// Looks up an executable: `$env`, then candidates that exist, then `fallback` (from `$PATH`).
fn find_tool(env: &str, candidates: &[PathBuf], fallback: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return p.into();
    }
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| fallback.into())
}

fn workspace_venv(bin: &str) -> PathBuf {
    // Only the directory is made canonical: a venv's `python` is a symlink
    // that must be run through the venv to see its packages.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin");
    std::fs::canonicalize(&dir).unwrap_or(dir).join(bin)
}

fn moto_binary() -> PathBuf {
    find_tool("TIERCKPT_MOTO_SERVER", &[workspace_venv("moto_server")], "moto_server")
}

/// A Python with boto3: `$TIERCKPT_PYTHON`, the one beside
/// `$TIERCKPT_MOTO_SERVER`, the workspace's `.venv`, then `python3`.
fn python_binary() -> PathBuf {
    let mut c = Vec::new();
    if let Some(m) = std::env::var_os("TIERCKPT_MOTO_SERVER") {
        if let Some(d) = Path::new(&m).parent() {
            c.push(d.join("python"));
        }
    }
    c.push(workspace_venv("python"));
    find_tool("TIERCKPT_PYTHON", &c, "python3")
}

/// `moto_server` on a free port of 127.0.0.1, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Result<Self> {
        let bin = moto_binary();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let mut cmd = Command::new(&bin);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            tierckpt_harness::daemon::die_with_parent(&mut cmd);
            let child = cmd.spawn().with_context(|| {
                format!(
                    "starting {} (pip install 'moto[server]' and set TIERCKPT_MOTO_SERVER, or run ./scripts/test.sh)",
                    bin.display()
                )
            })?;
            let mut m = Moto { child, port };
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(m);
                }
                if let Ok(Some(_)) = m.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
        bail!("{} did not start on 127.0.0.1", bin.display())
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto accepts unsigned requests).
    fn create_bucket(&self, name: &str) -> Result<()> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        if !resp.starts_with("HTTP/1.1 200") {
            bail!("creating bucket {name} on moto: {}", resp.lines().next().unwrap_or(""));
        }
        Ok(())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python side of the S3 floor: reads the bytes once, then for every
/// line on stdin uploads them and prints the seconds the upload took.
const BOTO3_FLOOR: &str = r#"
import io, sys, time
import boto3, botocore
from boto3.s3.transfer import TransferConfig
endpoint, region, ak, sk, bucket, prefix, path = sys.argv[1:8]
s3 = boto3.client("s3", endpoint_url=endpoint or None, region_name=region,
                  aws_access_key_id=ak, aws_secret_access_key=sk)
with open(path, "rb") as f:
    data = f.read()
cfg = TransferConfig()
print("ready boto3 %s botocore %s, upload_fileobj, multipart_chunksize %d, max_concurrency %d"
      % (boto3.__version__, botocore.__version__, cfg.multipart_chunksize, cfg.max_concurrency), flush=True)
for line in sys.stdin:
    key = prefix + "floor-" + line.strip()
    t = time.perf_counter()
    s3.upload_fileobj(io.BytesIO(data), bucket, key, Config=cfg)
    dt = time.perf_counter() - t
    s3.delete_object(Bucket=bucket, Key=key)
    print(dt, flush=True)
"#;

struct Boto3Floor {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    tool: String,
    n: usize,
}

impl Boto3Floor {
    fn start(a: &PersistArgs, endpoint: &str, bucket: &str, prefix: &str, data_path: &Path) -> Result<Self> {
        let py = python_binary();
        let floor_prefix =
            format!("{}bench-floor/", if prefix.is_empty() { String::new() } else { format!("{prefix}/") });
        let mut cmd = Command::new(&py);
        cmd.arg("-c")
            .arg(BOTO3_FLOOR)
            .args([endpoint, &a.region, &a.access_key_id, &a.secret_access_key, bucket, &floor_prefix])
            .arg(data_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        tierckpt_harness::daemon::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| {
            format!("starting {} for the boto3 floor (set TIERCKPT_PYTHON to a Python with boto3)", py.display())
        })?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let Some(desc) = line.trim().strip_prefix("ready ") else {
            let _ = child.kill();
            let status = child.wait().ok();
            bail!("the boto3 floor ({}) did not start: {line:?} ({status:?}); see its error above", py.display());
        };
        let tool = format!("{desc} ({})", py.display());
        Ok(Self { child, stdin, stdout, tool, n: 0 })
    }

    fn rep(&mut self) -> Result<f64> {
        self.n += 1;
        writeln!(self.stdin, "{}", self.n)?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        line.trim().parse().with_context(|| format!("the boto3 floor said {line:?}; see its error above"))
    }
}

impl Drop for Boto3Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Floor<'a> {
    File { dir: PathBuf, data: &'a [u8], n: usize },
    Boto3(Boto3Floor),
}

impl Floor<'_> {
    fn rep(&mut self) -> Result<f64> {
        match self {
            Floor::File { dir, data, n } => {
                *n += 1;
                let path = dir.join(format!("bench-floor-{n}.bin"));
                let t = Instant::now();
                let mut f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
                f.write_all(data)?;
                f.sync_all()?;
                let dt = t.elapsed().as_secs_f64();
                drop(f);
                std::fs::remove_file(&path)?;
                Ok(dt)
            }
            Floor::Boto3(b) => b.rep(),
        }
    }

    fn tool(&self) -> String {
        match self {
            Floor::File { .. } => {
                "one write() of the whole file, then fsync, to a fresh file in the target directory".into()
            }
            Floor::Boto3(b) => b.tool.clone(),
        }
    }
}

/// The drain state of `ns` in the daemon's status.
pub(crate) fn drain_state(client: &mut Client, ns: &str) -> Result<serde_json::Value> {
    let s = client.status()?;
    let p = s.persistent.context("the daemon does not drain to a persistent tier")?;
    Ok(p["namespaces"].as_array().and_then(|a| a.iter().find(|n| n["namespace"] == ns).cloned()).unwrap_or_default())
}

/// Polls the daemon's status until `step` of `ns` is committed.
fn wait_committed(client: &mut Client, ns: &str, step: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = drain_state(client, ns)?;
        if n["last_committed"].as_u64().is_some_and(|s| s >= step) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("step {step} of {ns} was not committed within {timeout:?}; drain state: {n}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `bench persist` and returns its figures.
pub fn persist(a: &PersistArgs) -> Result<PersistReport> {
    if a.iters == 0 {
        bail!("--iters must be at least 1");
    }
    if a.keep_last == 0 {
        bail!("--keep-last must be at least 1");
    }
    let lens = tensor_lens(a.size, a.tensors)?;
    let bytes = a.size;
    let names: Vec<String> = (0..lens.len()).map(|i| format!("layers.{i}.weight")).collect();
    let shapes: Vec<[usize; 1]> = lens.iter().map(|&l| [l / 2]).collect();
    let specs: Vec<TensorSpec> = (0..lens.len())
        .map(|i| TensorSpec { name: names[i].clone(), dtype: Dtype::BF16, shape: shapes[i].to_vec() })
        .collect();
    let metadata = BTreeMap::from([("bench".to_string(), "persist".to_string())]);
    let file_bytes = ShardLayout::new(&specs, &metadata)?.file_len;

    // One buffer of file_bytes: the tensors are its first `bytes` bytes, and
    // the floor writes all of it.
    let mut src = vec![0u8; file_bytes as usize];
    {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let part = (file_bytes as usize).div_ceil(n);
        std::thread::scope(|s| {
            for (i, p) in src.chunks_mut(part).enumerate() {
                s.spawn(move || fill_random(p, i as u64 + 1));
            }
        });
    }
    let mut state: Vec<&[u8]> = Vec::with_capacity(lens.len());
    let mut off = 0;
    for &l in &lens {
        state.push(&src[off..off + l]);
        off += l;
    }
    let tensors: Vec<TensorData<'_>> = (0..lens.len())
        .map(|i| TensorData { name: &names[i], dtype: Dtype::BF16, shape: &shapes[i], data: state[i] })
        .collect();

    // The target.
    let mut default_dir = None;
    let target = match &a.target {
        Some(t) => t.trim_end_matches('/').to_string(),
        None => {
            let d = tempfile::Builder::new()
                .prefix("tierckpt-bench-persist-")
                .tempdir_in(&a.tmp_dir)
                .with_context(|| format!("creating a directory under {}", a.tmp_dir.display()))?;
            let url = format!("file://{}", d.path().display());
            default_dir = Some(d);
            url
        }
    };
    let mem_dir = tempfile::Builder::new()
        .prefix("tierckpt-bench-persist-")
        .tempdir_in(&a.dir)
        .with_context(|| format!("creating a directory under {}", a.dir.display()))?;
    let mut extra = vec!["--persistent-path".to_string(), target.clone()];
    let mut moto = None;
    let (scheme, mut floor, target_ratio) = if let Some(path) = target.strip_prefix("file://") {
        if a.start_moto || a.endpoint.is_some() {
            bail!("--start-moto and --endpoint are for s3:// targets");
        }
        let dir = PathBuf::from(path);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        ("file", Floor::File { dir, data: &src[..], n: 0 }, PERSIST_FILE_TARGET_RATIO)
    } else if let Some(rest) = target.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("{target:?} names no bucket");
        }
        let endpoint = if a.start_moto {
            if a.endpoint.is_some() {
                bail!("--start-moto and --endpoint exclude each other");
            }
            let m = Moto::start()?;
            m.create_bucket(bucket)?;
            let e = m.endpoint();
            moto = Some(m);
            Some(e)
        } else {
            a.endpoint.clone()
        };
        let mut opts = vec![
            format!("region={}", a.region),
            format!("access_key_id={}", a.access_key_id),
            format!("secret_access_key={}", a.secret_access_key),
        ];
        if let Some(e) = &endpoint {
            opts.push(format!("endpoint={e}"));
            if e.starts_with("http://") {
                opts.push("allow_http=true".into());
            }
        }
        extra.extend(["--persistent-options".to_string(), opts.join(",")]);
        // boto3 reads the bytes from a file in the memory directory (a tmpfs).
        let data_path = mem_dir.path().join("floor-source.bin");
        std::fs::write(&data_path, &src).with_context(|| format!("writing {}", data_path.display()))?;
        let b = Boto3Floor::start(a, endpoint.as_deref().unwrap_or(""), bucket, prefix, &data_path)?;
        std::fs::remove_file(&data_path)?;
        ("s3", Floor::Boto3(b), PERSIST_S3_TARGET_RATIO)
    } else {
        bail!("--target must be file:///dir or s3://bucket/prefix; got {target:?}");
    };

    let mut floor_s = Vec::with_capacity(a.floor_reps + a.iters);
    for _ in 0..a.floor_reps {
        floor_s.push(floor.rep()?);
    }

    let mut opts = DaemonOptions::new(mem_dir.path());
    opts.memory_tier_size = ((a.keep_last as u64 + 2) * file_bytes).to_string();
    opts.keep_last = a.keep_last;
    opts.http_addr = "off".into();
    opts.extra_args = extra;
    let daemon = DaemonProcess::spawn(opts)?;
    let mut client = Client::connect(&daemon.socket)?;
    let mut status_client = Client::connect(&daemon.socket)?;

    let ns = "bench-persist";
    let timeout = Duration::from_secs(1800);
    let (mut totals, mut visible, mut drains) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..(a.warmup + a.iters) as u64 {
        let measured = step >= a.warmup as u64;
        if measured {
            floor_s.push(floor.rep()?);
        }
        let key = ShardKey::new(ns, step, 0);
        client.save(&key, 1, &tensors, &metadata, false).with_context(|| format!("saving step {step}"))?;
        let t0 = Instant::now();
        client.wait_visible(&key, timeout)?;
        let t1 = Instant::now();
        wait_committed(&mut status_client, ns, step, timeout)?;
        let t2 = Instant::now();
        if measured {
            totals.push((t2 - t0).as_secs_f64());
            visible.push((t1 - t0).as_secs_f64());
            drains.push((t2 - t1).as_secs_f64());
        }
    }
    let floor_tool = floor.tool();
    drop(floor);
    drop(client);
    drop(status_client);
    drop(daemon);
    drop(moto);
    mem_dir.close().context("removing the benchmark's memory tier")?;
    if let Some(d) = default_dir {
        d.close().context("removing the benchmark's persistent tier")?;
    }

    let persist_s = median(&totals);
    let drain_s = median(&drains);
    let floor_med = median(&floor_s);
    let persist_gibps = gibps(file_bytes, persist_s);
    let drain_gibps = gibps(file_bytes, drain_s);
    let floor_gibps = gibps(file_bytes, floor_med);
    let ratio = persist_gibps / floor_gibps;
    Ok(PersistReport {
        benchmark: "persist",
        scheme,
        target,
        bytes,
        file_bytes,
        tensors: lens.len(),
        dtype: "BF16",
        iters: a.iters,
        warmup: a.warmup,
        persist_s,
        persist_gibps,
        persist_min_s: totals.iter().copied().fold(f64::INFINITY, f64::min),
        persist_max_s: totals.iter().copied().fold(0.0, f64::max),
        visible_s: median(&visible),
        drain_s,
        drain_gibps,
        floor_tool,
        floor_s: floor_med,
        floor_gibps,
        floor_min_s: floor_s.iter().copied().fold(f64::INFINITY, f64::min),
        floor_samples: floor_s.len(),
        ratio,
        drain_ratio: drain_gibps / floor_gibps,
        target_ratio,
        meets_target: ratio >= target_ratio,
    })
}

pub fn print_persist(r: &PersistReport) {
    println!(
        "bench persist: {} in {} {} tensors ({} shard file) to {}; {} warm-up steps, then medians of {}",
        output::human_bytes(r.bytes),
        r.tensors,
        r.dtype.to_lowercase(),
        output::human_bytes(r.file_bytes),
        r.target,
        r.warmup,
        r.iters
    );
    let mut t = output::table(&["operation", "seconds", "GiB/s", "ratio to floor"]);
    let row = |t: &mut comfy_table::Table, op: &str, s: f64, rate: bool| {
        let g = gibps(r.file_bytes, s);
        t.add_row(vec![
            op.to_string(),
            format!("{s:.4}"),
            if rate { format!("{g:.3}") } else { String::new() },
            if rate { format!("{:.3}", g / r.floor_gibps) } else { String::new() },
        ]);
    };
    row(&mut t, "floor", r.floor_s, true);
    row(&mut t, "persist: sealed -> committed", r.persist_s, true);
    row(&mut t, "  of which sealed -> visible (checksums)", r.visible_s, false);
    row(&mut t, "  of which visible -> committed (drain)", r.drain_s, true);
    println!("{t}");
    println!("floor: {}", r.floor_tool);
    println!(
        "target: rate at least {} of the floor -- persist {:.3} ({})",
        r.target_ratio,
        r.ratio,
        if r.meets_target { "met" } else { "missed" }
    );
}
