//! Runs `tierckptd` as a child process (for the demo, benchmarks and tests):
//! starts it on a directory and an ephemeral port, waits for its ready line,
//! and SIGKILLs it when asked or dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tierckpt_daemon::ConfigLayer;

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

/// Settings for a daemon child: the daemon's own settings
/// ([`ConfigLayer`], passed as flags), and how the harness runs it.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Every daemon setting given to the child; `memory_dir`, `socket` and
    /// `http_addr` are always set.
    pub settings: ConfigLayer,
    /// The bearer token, passed by environment (never on the command line);
    /// when HTTP is on and none is given, [`DaemonProcess::launch`] draws one.
    pub token: Option<String>,
    /// `TIERCKPT_LOG` of the child ("warn", "info", ...).
    pub log: String,
    /// The network namespace to run it in (through `ip netns exec`, see
    /// [`crate::hosts`]); none: this process's.
    pub netns: Option<String>,
    /// More environment for the child, e.g. a launcher's (`SLURM_JOB_NODELIST`).
    pub env: Vec<(String, String)>,
}

impl DaemonOptions {
    /// A daemon on `memory_dir` with 1 GiB of memory tier, keeping 3
    /// steps, its HTTP API on an ephemeral port of 127.0.0.1 (with a token
    /// drawn at launch), mounting no huge-page tmpfs.
    pub fn new(memory_dir: impl Into<PathBuf>) -> Self {
        let memory_dir = memory_dir.into();
        let settings = ConfigLayer {
            socket: Some(memory_dir.join("daemon.sock")),
            memory_dir: Some(memory_dir),
            memory_tier_size: Some("1GiB".into()),
            keep_last: Some(3),
            http_addr: Some("127.0.0.1:0".into()),
            // As root a daemon mounts a tmpfs on a new directory by default;
            // a test removes its directory, which a mount would outlive.
            mount_huge_tmpfs: Some(false),
            ..Default::default()
        };
        Self { settings, token: None, log: "warn".into(), netns: None, env: Vec::new() }
    }

    /// The memory tier's directory.
    pub fn memory_dir(&self) -> &Path {
        self.settings.memory_dir.as_deref().expect("set by DaemonOptions::new")
    }

    /// The HTTP address asked for ("127.0.0.1:0" until a port is chosen).
    pub fn http_addr(&self) -> String {
        self.settings.http_addr.clone().unwrap_or_default()
    }

    /// Sets what `tierckptd` flags set, parsed as `tierckptd` parses them.
    pub fn set_flags<S: AsRef<str>>(&mut self, flags: &[S]) -> Result<()> {
        self.settings = std::mem::take(&mut self.settings).merge(parse_flags(flags)?);
        Ok(())
    }

    /// Whether the daemon will serve HTTP (an address not "off", or a cluster).
    pub fn http_on(&self) -> bool {
        let s = &self.settings;
        s.node_id.is_some() || s.http_addr.as_deref().is_some_and(|a| !a.is_empty() && a != "off")
    }

    /// The `Authorization` header value its HTTP API wants (once a token is set).
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.token.as_deref().unwrap_or_default())
    }
}

/// A fresh random bearer token (128 bits from the kernel, hex).
pub fn random_token() -> String {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").expect("/dev/urandom opens"), &mut b)
        .expect("/dev/urandom reads");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `tierckptd` flags as the [`ConfigLayer`] they set.
pub fn parse_flags<S: AsRef<str>>(flags: &[S]) -> Result<ConfigLayer> {
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        layer: ConfigLayer,
    }
    let argv = std::iter::once("tierckptd").chain(flags.iter().map(AsRef::as_ref));
    // Only the flags count here, not this process's TIERCKPT_* variables.
    let cmd = <Flags as clap::CommandFactory>::command();
    let cmd = cmd.mut_args(|a| a.env(None::<&str>));
    let matches = cmd.try_get_matches_from(argv).context("tierckptd flags")?;
    let flags = <Flags as clap::FromArgMatches>::from_arg_matches(&matches).context("tierckptd flags")?;
    Ok(flags.layer)
}

/// A running daemon child; killed on drop.
pub struct DaemonProcess {
    child: Child,
    /// The daemon's local socket.
    pub socket: PathBuf,
    /// Where its HTTP API listens, as its ready line said.
    pub http_addr: Option<String>,
    /// Where its HyperPod API listens (`hyperpod_listen`), as its ready line said.
    pub hyperpod_addr: Option<String>,
    /// What it was started with (changed before a restart, it counts at the restart).
    pub opts: DaemonOptions,
}

impl DaemonProcess {
    /// Starts the daemon; [`Starting::wait_ready`] waits for its ready line.
    /// The child dies with the thread that calls this. With HTTP on and no
    /// token given, a random one is drawn (kept in `opts` for restarts).
    pub fn launch(mut opts: DaemonOptions) -> Result<Starting> {
        if opts.http_on() && opts.token.is_none() {
            opts.token = Some(random_token());
        }
        let socket = opts.settings.socket.clone().expect("set by DaemonOptions::new");
        let mut cmd = match &opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(daemon_binary());
                c
            }
            None => Command::new(daemon_binary()),
        };
        // The child's settings are these flags alone, not this process's TIERCKPT_* variables.
        for (k, _) in std::env::vars_os().filter(|(k, _)| k.to_string_lossy().starts_with("TIERCKPT_")) {
            cmd.env_remove(k);
        }
        // No huge-page mount unless asked: as root a daemon mounts one on a
        // new directory by default, and a test's directory, removed at its
        // end, would leave the mount behind.
        let mut settings = opts.settings.clone();
        settings.mount_huge_tmpfs.get_or_insert(false);
        cmd.args(settings.to_args())
            .env("TIERCKPT_LOG", &opts.log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(t) = &opts.token {
            cmd.env("TIERCKPT_TOKEN", t);
        }
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| match &opts.netns {
            Some(ns) => format!("starting {} in network namespace {ns} (ip netns exec)", daemon_binary().display()),
            None => format!("starting {}", daemon_binary().display()),
        })?;
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
    /// Waits (up to 30 s) for the ready line; an error says why the daemon did not start.
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
        let addr = |k: &str| ready[k].as_str().map(String::from);
        Ok(DaemonProcess { child, socket, http_addr: addr("http_addr"), hyperpod_addr: addr("hyperpod_addr"), opts })
    }
}

impl DaemonProcess {
    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its memory tier's directory.
    pub fn memory_dir(&self) -> &Path {
        self.opts.memory_dir()
    }

    /// The `Authorization` header value its HTTP API wants.
    pub fn bearer(&self) -> String {
        self.opts.bearer()
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

    /// How the process ended, if it did ("signal: 7 (SIGBUS)", "exit status: 1").
    pub fn ended(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
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

/// Where a node of a [`LocalCluster`] runs.
#[derive(Debug, Clone)]
pub struct NodePlace {
    /// Its network namespace; none: this process's.
    pub netns: Option<String>,
    /// Its HTTP address (host:port), as the other nodes reach it.
    pub http_addr: String,
}

/// Settings shared by the nodes of a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct LocalClusterOptions {
    /// How many nodes.
    pub nodes: usize,
    /// The daemon settings every node shares; each node's `memory_dir`,
    /// `socket`, `http_addr`, `node_id` and `nodes` are set by the cluster.
    pub settings: ConfigLayer,
    /// The bearer token of every node; one is drawn when none is given.
    pub token: Option<String>,
    /// `TIERCKPT_LOG` of every daemon ("warn", "error", ...).
    pub log: String,
    /// Settings of single nodes, by index, over `settings`: each node's own
    /// certificate (`tls_cert`, `tls_key`), for one.
    pub node_settings: Vec<ConfigLayer>,
}

impl Default for LocalClusterOptions {
    /// 4 nodes of 1 GiB keeping 3 steps, one copy of each shard on the next
    /// node, heartbeats every 100 ms and a peer dead after 600 ms.
    fn default() -> Self {
        let settings = ConfigLayer {
            memory_tier_size: Some("1GiB".into()),
            keep_last: Some(3),
            replication_factor: Some(1),
            placement: Some("ring".into()),
            heartbeat_interval: Some("100ms".into()),
            heartbeat_timeout: Some("600ms".into()),
            mount_huge_tmpfs: Some(false),
            ..Default::default()
        };
        Self { nodes: 4, settings, token: None, log: "warn".into(), node_settings: Vec::new() }
    }
}

impl LocalClusterOptions {
    /// Sets what `tierckptd` flags set, for every node.
    pub fn set_flags<S: AsRef<str>>(&mut self, flags: &[S]) -> Result<()> {
        self.settings = std::mem::take(&mut self.settings).merge(parse_flags(flags)?);
        Ok(())
    }
}

/// Several daemons on one machine, each with its own memory directory under
/// `base` and its own port on 127.0.0.1, forming one cluster.
pub struct LocalCluster {
    /// The directory holding every node's memory directory.
    pub base: PathBuf,
    /// What the cluster was started with.
    pub opts: LocalClusterOptions,
    /// The running nodes; none where a node was killed.
    pub nodes: Vec<Option<DaemonProcess>>,
    node_opts: Vec<DaemonOptions>,
}

impl LocalCluster {
    /// The id of node `i` ("n0", "n1", ...).
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
        let places = ports.iter().map(|p| NodePlace { netns: None, http_addr: format!("127.0.0.1:{p}") }).collect();
        Self::start_at(base, opts, places)
    }

    /// Starts node `i` at `places[i]` (its namespace and HTTP address), for
    /// example on the hosts of [`crate::hosts::Hosts`] (see
    /// [`crate::hosts::Hosts::places`]).
    pub fn start_at(base: &Path, mut opts: LocalClusterOptions, places: Vec<NodePlace>) -> Result<Self> {
        if places.len() != opts.nodes {
            bail!("{} nodes asked for but {} places given", opts.nodes, places.len());
        }
        opts.token.get_or_insert_with(random_token);
        let members: Vec<String> =
            places.iter().enumerate().map(|(i, p)| format!("{}={}", Self::node_id(i), p.http_addr)).collect();
        let node_opts: Vec<DaemonOptions> = (0..opts.nodes)
            .map(|i| {
                let mut o = DaemonOptions::new(base.join(Self::node_id(i)));
                o.netns = places[i].netns.clone();
                let own = ConfigLayer {
                    http_addr: Some(places[i].http_addr.clone()),
                    node_id: Some(Self::node_id(i)),
                    nodes: Some(members.join(",").parse().expect("node list")),
                    ..Default::default()
                };
                let single = opts.node_settings.get(i).cloned().unwrap_or_default();
                o.settings = std::mem::take(&mut o.settings).merge(opts.settings.clone()).merge(single).merge(own);
                o.token = opts.token.clone();
                o.log = opts.log.clone();
                o
            })
            .collect();
        let mut nodes = Vec::new();
        for o in &node_opts {
            nodes.push(Some(DaemonProcess::spawn(o.clone())?));
        }
        Ok(Self { base: base.to_path_buf(), opts, nodes, node_opts })
    }

    /// Node `i`, which must be running.
    pub fn node(&self, i: usize) -> &DaemonProcess {
        self.nodes[i].as_ref().expect("node is running")
    }

    /// The options node `i` runs with.
    pub fn options(&self, i: usize) -> &DaemonOptions {
        &self.node_opts[i]
    }

    /// Options of node `i`, to change before [`Self::restart`].
    pub fn options_mut(&mut self, i: usize) -> &mut DaemonOptions {
        &mut self.node_opts[i]
    }

    /// The `Authorization` header value every node's HTTP API wants.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.opts.token.as_deref().unwrap_or_default())
    }

    /// Node `i`'s local socket.
    pub fn socket(&self, i: usize) -> PathBuf {
        self.node_opts[i].settings.socket.clone().expect("set by DaemonOptions::new")
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
        let dir = self.node_opts[i].memory_dir();
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
            let dir = self.node_opts[i].memory_dir();
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
