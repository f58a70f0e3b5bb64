//! The floors of `bench persist`, writing the same bytes to the same target
//! in the same run:
//! - `file://`: one sequential `write` of the bytes to a fresh file in the
//!   target directory, then `fsync`;
//! - `s3://`: the bytes uploaded to the same bucket with boto3's
//!   `upload_fileobj` (default `TransferConfig`, multipart), timed inside a
//!   long-lived Python process, so start-up and imports are not counted.
//!
//! Also `moto_server` for `--start-moto` (a CLI must fail with a message,
//! so this is not the harness's panicking test helper).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

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
pub(crate) struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    pub(crate) fn start() -> Result<Self> {
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

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto accepts unsigned requests).
    pub(crate) fn create_bucket(&self, name: &str) -> Result<()> {
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

/// Where and as whom the boto3 floor uploads.
pub(crate) struct S3Target<'a> {
    pub(crate) endpoint: &'a str,
    pub(crate) region: &'a str,
    pub(crate) access_key_id: &'a str,
    pub(crate) secret_access_key: &'a str,
    pub(crate) bucket: &'a str,
    pub(crate) prefix: &'a str,
}

/// A long-lived Python process uploading with boto3 on request.
pub(crate) struct Boto3Floor {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    tool: String,
    n: usize,
}

impl Boto3Floor {
    /// Starts the uploader on the bytes of `data_path` (read once).
    pub(crate) fn start(s3: &S3Target<'_>, data_path: &Path) -> Result<Self> {
        let py = python_binary();
        let prefix = s3.prefix;
        let floor_prefix =
            format!("{}bench-floor/", if prefix.is_empty() { String::new() } else { format!("{prefix}/") });
        let mut cmd = Command::new(&py);
        cmd.arg("-c")
            .arg(BOTO3_FLOOR)
            .args([s3.endpoint, s3.region, s3.access_key_id, s3.secret_access_key, s3.bucket, &floor_prefix])
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

/// The floor of a persistent target.
pub(crate) enum StoreFloor<'a> {
    /// Write + fsync of `data` to a fresh file in `dir`.
    File {
        dir: PathBuf,
        data: &'a [u8],
        n: usize,
    },
    Boto3(Boto3Floor),
}

impl StoreFloor<'_> {
    /// One repetition; its seconds.
    pub(crate) fn rep(&mut self) -> Result<f64> {
        match self {
            StoreFloor::File { dir, data, n } => {
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
            StoreFloor::Boto3(b) => b.rep(),
        }
    }

    /// What the floor is, for the report.
    pub(crate) fn tool(&self) -> String {
        match self {
            StoreFloor::File { .. } => {
                "one write() of the whole file, then fsync, to a fresh file in the target directory".into()
            }
            StoreFloor::Boto3(b) => b.tool.clone(),
        }
    }
}
