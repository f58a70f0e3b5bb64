//! Runs `tierckptd` as a child process (for the demo, benchmarks and tests):
//! starts it on a directory and an ephemeral port, waits for its ready line,
//! and SIGKILLs it when asked or dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// The variable that names the `tierckptd` binary to run, here and in the
/// Python package.
pub const DAEMON_BIN_VAR: &str = "TIERCKPT_DAEMON_BIN";

/// Locates the `tierckptd` binary: `$TIERCKPT_DAEMON_BIN`, then as [`binary`].
pub fn daemon_binary() -> PathBuf {
    match std::env::var_os(DAEMON_BIN_VAR) {
        Some(p) => p.into(),
        None => binary("tierckptd"),
    }
}

/// Locates a binary of this workspace: beside this executable (or one
/// directory up, for test binaries in `deps/`), then on `$PATH`.
pub fn binary(name: &str) -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    name.into()
}

/// Cluster membership of a daemon child.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub node_id: String,
    /// "n0=127.0.0.1:7001,n1=127.0.0.1:7002".
    pub nodes: String,
    pub replication_factor: usize,
    pub placement: String,
    pub heartbeat_interval: String,
    pub heartbeat_timeout: String,
    pub replication_bandwidth: Option<String>,
}

/// Makes a child SIGKILLed when the thread that started it ends, so that
/// daemons, trainers and helpers never outlive a killed demo, bench or test.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Settings for a daemon child.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub memory_dir: PathBuf,
    pub memory_tier_size: String,
    pub keep_last: usize,
    /// "127.0.0.1:0" for an ephemeral port, or "off".
    pub http_addr: String,
    pub token: Option<String>,
    pub log: String,
    pub cluster: Option<ClusterOptions>,
    /// More `tierckptd` flags (e.g. `--persistent-path file:///...`).
    pub extra_args: Vec<String>,
}

impl DaemonOptions {
    pub fn new(memory_dir: impl Into<PathBuf>) -> Self {
        Self {
            memory_dir: memory_dir.into(),
            memory_tier_size: "1GiB".into(),
            keep_last: 3,
            http_addr: "127.0.0.1:0".into(),
            token: None,
            log: "warn".into(),
            cluster: None,
            extra_args: Vec::new(),
        }
    }
}

/// A running daemon child; killed on drop.
pub struct DaemonProcess {
    child: Child,
    pub socket: PathBuf,
    pub http_addr: Option<String>,
    pub opts: DaemonOptions,
}

impl DaemonProcess {
    /// Starts the daemon; [`Starting::wait_ready`] waits for its ready line.
    /// The child dies with the thread that calls this.
    pub fn launch(opts: DaemonOptions) -> Result<Starting> {
        let socket = opts.memory_dir.join("daemon.sock");
        let mut cmd = Command::new(daemon_binary());
        cmd.arg("--memory-dir")
            .arg(&opts.memory_dir)
            .arg("--memory-tier-size")
            .arg(&opts.memory_tier_size)
            .arg("--keep-last")
            .arg(opts.keep_last.to_string())
            .arg("--socket")
            .arg(&socket)
            .arg("--http-addr")
            .arg(&opts.http_addr)
            .env("TIERCKPT_LOG", &opts.log)
            .env_remove("TIERCKPT_TOKEN")
            .env_remove("TIERCKPT_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(t) = &opts.token {
            cmd.env("TIERCKPT_TOKEN", t);
        }
        if let Some(c) = &opts.cluster {
            cmd.args(["--node-id", &c.node_id, "--nodes", &c.nodes])
                .args(["--replication-factor", &c.replication_factor.to_string()])
                .args(["--placement", &c.placement])
                .args(["--heartbeat-interval", &c.heartbeat_interval])
                .args(["--heartbeat-timeout", &c.heartbeat_timeout]);
            if let Some(b) = &c.replication_bandwidth {
                cmd.args(["--replication-bandwidth", b]);
            }
        }
        cmd.args(&opts.extra_args);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", daemon_binary().display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            for _ in lines {}
        });
        Ok(Starting { child, socket, opts, ready: rx })
    }

    /// Starts the daemon and waits (up to 30 s) for its ready line.
    pub fn spawn(opts: DaemonOptions) -> Result<Self> {
        Self::launch(opts)?.wait_ready()
    }
}

/// A daemon child started, its ready line not yet read.
pub struct Starting {
    child: Child,
    socket: PathBuf,
    opts: DaemonOptions,
    ready: mpsc::Receiver<Option<std::io::Result<String>>>,
}

impl Starting {
    pub fn wait_ready(self) -> Result<DaemonProcess> {
        let Starting { mut child, socket, opts, ready: rx } = self;
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(Ok(l))) => l,
            Ok(_) => {
                let status = child.wait().ok();
                bail!("tierckptd exited before it was ready ({status:?}); see its log above")
            }
            Err(_) => {
                let _ = child.kill();
                bail!("tierckptd was not ready within 30 s")
            }
        };
        let ready: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("tierckptd said {line:?}"))?;
        if ready["event"] != "ready" {
            bail!("tierckptd said {line:?} instead of its ready line");
        }
        Ok(DaemonProcess { child, socket, http_addr: ready["http_addr"].as_str().map(String::from), opts })
    }
}

impl DaemonProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn memory_dir(&self) -> &Path {
        &self.opts.memory_dir
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().map_err(|e| anyhow!("killing tierckptd: {e}"))?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then reap.
    pub fn stop(&mut self) -> Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait()?;
        Ok(())
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Starts a new daemon on the same directory (after a kill or stop).
    pub fn restart(&mut self) -> Result<()> {
        if self.alive() {
            self.kill()?;
        }
        let fresh = Self::spawn(self.opts.clone())?;
        drop(std::mem::replace(self, fresh));
        Ok(())
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `n` distinct free ports on 127.0.0.1, drawn below the kernel's ephemeral
/// range (32768 and up) so that outgoing connections do not take them
/// between this check and the daemon's bind.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    use std::hash::{BuildHasher, Hasher};
    let mut held = Vec::new();
    for _ in 0..n * 50 {
        if held.len() == n {
            break;
        }
        let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let port = 20000 + (r % 12000) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    if held.len() < n {
        bail!("could not find {n} free ports on 127.0.0.1");
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Settings shared by the nodes of a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct LocalClusterOptions {
    pub nodes: usize,
    pub memory_tier_size: String,
    pub keep_last: usize,
    pub replication_factor: usize,
    pub placement: String,
    pub heartbeat_interval: String,
    pub heartbeat_timeout: String,
    pub replication_bandwidth: Option<String>,
    pub token: Option<String>,
    /// `TIERCKPT_LOG` of every daemon ("warn", "error", ...).
    pub log: String,
    /// More flags for every daemon (e.g. `--persistent-path`).
    pub extra_args: Vec<String>,
}

impl Default for LocalClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 4,
            memory_tier_size: "1GiB".into(),
            keep_last: 3,
            replication_factor: 1,
            placement: "ring".into(),
            heartbeat_interval: "100ms".into(),
            heartbeat_timeout: "600ms".into(),
            replication_bandwidth: None,
            token: None,
            log: "warn".into(),
            extra_args: Vec::new(),
        }
    }
}

/// Several daemons on one machine, each with its own memory directory under
/// `base` and its own port on 127.0.0.1, forming one cluster.
pub struct LocalCluster {
    pub base: PathBuf,
    pub opts: LocalClusterOptions,
    pub nodes: Vec<Option<DaemonProcess>>,
    node_opts: Vec<DaemonOptions>,
}

impl LocalCluster {
    pub fn node_id(i: usize) -> String {
        format!("n{i}")
    }

    /// Starts every node; on a port taken meanwhile, tries again with others.
    pub fn start(base: &Path, opts: LocalClusterOptions) -> Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(base, opts.clone()) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried"))
    }

    fn start_once(base: &Path, opts: LocalClusterOptions) -> Result<Self> {
        let ports = free_ports(opts.nodes)?;
        let members: Vec<String> =
            ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", Self::node_id(i))).collect();
        let node_opts: Vec<DaemonOptions> = (0..opts.nodes)
            .map(|i| {
                let mut o = DaemonOptions::new(base.join(Self::node_id(i)));
                o.memory_tier_size = opts.memory_tier_size.clone();
                o.keep_last = opts.keep_last;
                o.http_addr = format!("127.0.0.1:{}", ports[i]);
                o.token = opts.token.clone();
                o.log = opts.log.clone();
                o.extra_args = opts.extra_args.clone();
                o.cluster = Some(ClusterOptions {
                    node_id: Self::node_id(i),
                    nodes: members.join(","),
                    replication_factor: opts.replication_factor,
                    placement: opts.placement.clone(),
                    heartbeat_interval: opts.heartbeat_interval.clone(),
                    heartbeat_timeout: opts.heartbeat_timeout.clone(),
                    replication_bandwidth: opts.replication_bandwidth.clone(),
                });
                o
            })
            .collect();
        let mut nodes = Vec::new();
        for o in &node_opts {
            nodes.push(Some(DaemonProcess::spawn(o.clone())?));
        }
        Ok(Self { base: base.to_path_buf(), opts, nodes, node_opts })
    }

    pub fn node(&self, i: usize) -> &DaemonProcess {
        self.nodes[i].as_ref().expect("node is running")
    }

    pub fn options(&self, i: usize) -> &DaemonOptions {
        &self.node_opts[i]
    }

    /// Options of node `i`, to change before [`Self::restart`].
    pub fn options_mut(&mut self, i: usize) -> &mut DaemonOptions {
        &mut self.node_opts[i]
    }

    pub fn socket(&self, i: usize) -> PathBuf {
        self.node_opts[i].memory_dir.join("daemon.sock")
    }

    /// SIGKILLs node `i` (its memory directory stays).
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut p) = self.nodes[i].take() {
            p.kill()?;
        }
        Ok(())
    }

    /// Restarts node `i` on its memory directory.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i)?;
        self.nodes[i] = Some(DaemonProcess::spawn(self.node_opts[i].clone())?);
        Ok(())
    }

    /// Replaces node `i` by an empty one: same id and address, memory wiped
    /// (a new machine in the old one's place).
    pub fn replace_empty(&mut self, i: usize) -> Result<()> {
        self.kill(i)?;
        let dir = &self.node_opts[i].memory_dir;
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("wiping {}", dir.display()))?;
        }
        self.nodes[i] = Some(DaemonProcess::spawn(self.node_opts[i].clone())?);
        Ok(())
    }

    /// Replaces every node by an empty one, starting them all at once (as
    /// replacement machines boot in parallel).
    pub fn replace_all_empty(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.kill(i)?;
            let dir = &self.node_opts[i].memory_dir;
            if dir.exists() {
                std::fs::remove_dir_all(dir).with_context(|| format!("wiping {}", dir.display()))?;
            }
        }
        let starting = self.node_opts.iter().map(|o| DaemonProcess::launch(o.clone())).collect::<Result<Vec<_>>>()?;
        for (i, s) in starting.into_iter().enumerate() {
            self.nodes[i] =
                Some(s.wait_ready().with_context(|| format!("starting an empty node in place of node {i}"))?);
        }
        Ok(())
    }
}
