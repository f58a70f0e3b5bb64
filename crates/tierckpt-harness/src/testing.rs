//! Helpers shared by the integration tests: real daemon processes on tmpfs,
//! a crash-test writer, raw HTTP exchanges.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::daemon::{binary, DaemonOptions, DaemonProcess};

/// A fresh directory on tmpfs, removed on drop.
pub fn shm_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("tierckpt-it-").tempdir_in("/dev/shm").expect("a directory in /dev/shm")
}

/// A daemon child on its own tmpfs directory; both go when dropped, the
/// daemon first (fields drop in order): a live daemon may still create
/// files (its pool filler) while the directory is being removed.
pub struct TestDaemon {
    /// The daemon.
    pub proc: DaemonProcess,
    /// The directory (the memory tier is `mem/` below it).
    pub dir: tempfile::TempDir,
}

impl TestDaemon {
    /// A daemon with a memory tier of `size`.
    pub fn start(size: &str) -> Self {
        Self::start_with(size, |_| {})
    }

    /// A daemon with a memory tier of `size` and the options `f` sets.
    pub fn start_with(size: &str, f: impl FnOnce(&mut DaemonOptions)) -> Self {
        let dir = shm_dir();
        let mut o = DaemonOptions::new(dir.path().join("mem"));
        o.settings.memory_tier_size = Some(size.into());
        f(&mut o);
        let proc = DaemonProcess::spawn(o).expect("daemon starts");
        Self { dir, proc }
    }

    /// A client connected to it.
    pub fn client(&self) -> tierckpt_client::Client {
        tierckpt_client::Client::connect(&self.proc.socket).expect("client connects")
    }

    /// The base URL of its HTTP API.
    pub fn http(&self) -> String {
        format!("http://{}", self.proc.http_addr.as_deref().expect("http enabled"))
    }

    /// The address of its HTTP API (host:port).
    pub fn http_addr(&self) -> String {
        self.proc.http_addr.clone().expect("http enabled")
    }

    /// The address of its HyperPod API (host:port).
    pub fn hyperpod_addr(&self) -> String {
        self.proc.hyperpod_addr.clone().expect("the HyperPod API is on (hyperpod_listen)")
    }

    /// The `Authorization` header value its HTTP API wants.
    pub fn bearer(&self) -> String {
        self.proc.bearer()
    }
}

/// Starts `tierckpt-test-writer` and waits for it to announce `phase`.
pub fn writer_paused_at(socket: &Path, ns: &str, step: u64, bytes: usize, phase: &str) -> Child {
    let mut child = Command::new(binary("tierckpt-test-writer"))
        .arg("--socket")
        .arg(socket)
        .args(["--namespace", ns, "--step", &step.to_string()])
        .args(["--bytes", &bytes.to_string(), "--pause-at", phase])
        .stdout(Stdio::piped())
        .spawn()
        .expect("writer starts");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("writer announces its phase");
    assert!(line.contains("phase"), "writer said {line:?}");
    child
}

/// The `tierckpt` command-line tool of this workspace.
pub fn tierckpt() -> Command {
    Command::new(binary("tierckpt"))
}

/// Runs the CLI against a daemon and returns (success, stdout, stderr).
pub fn cli(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tierckpt().arg("--socket").arg(socket).args(args).output().expect("tierckpt runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A minimal HTTP/1.1 exchange over a fresh connection: returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<u8>) {
    let (status, _, body) = http_exchange(addr, method, path, headers, body);
    (status, body)
}

/// [`http`], with the response head too: (status, head, body). A
/// `Content-Length` is added for a non-empty body unless `headers` frame it
/// (`Content-Length` or `Transfer-Encoding`);
/// a response without a head gives status 0 and the bytes as the body.
pub fn http_exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP API");
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let framed = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding"));
    if !framed && !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let _ = s.write_all(req.as_bytes());
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let Some(split) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, String::new(), resp);
    };
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head, resp[split + 4..].to_vec())
}

/// Sends a request head (with `headers`) and part of its body; dropping the
/// stream hangs up.
pub fn http_abandon(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_length: usize,
    partial: &[u8],
) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP API");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {content_length}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(partial).unwrap();
    s
}

/// A safetensors file of one 4-byte U8 tensor `name` (and `metadata`),
/// written as raw JSON: what a writer that checks no names would send.
pub fn raw_shard(name: &str, metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut header = serde_json::json!({ name: {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]} });
    if !metadata.is_empty() {
        header["__metadata__"] = metadata.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect();
    }
    let json = header.to_string();
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(json.as_bytes());
    file.extend_from_slice(&[1, 2, 3, 4]);
    file
}

/// The steps of `ns` committed in the `file://` persistent tier at `dir`
/// (a step exists there only through its COMMIT object), oldest first.
pub fn committed_steps(dir: &Path, ns: &str) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir.join(ns))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("COMMIT").is_file())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}
