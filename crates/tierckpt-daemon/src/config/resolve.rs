//! Resolution of a merged [`ConfigLayer`] into the checked settings a
//! daemon runs with, defaults filled in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::ConfigLayer;
use crate::membership::{id_for_addr, parse_addr, validate_node_id, Discover, Node};
use crate::DaemonError;

/// Where the memory tier lives unless configured.
pub const DEFAULT_MEMORY_DIR: &str = "/dev/shm/tierckpt";
/// A client's step may be at most this far above its namespace's newest
/// step held here unless configured (`max_step_advance`).
pub const DEFAULT_MAX_STEP_ADVANCE: u64 = 1_000_000;
/// Steps from here up are always refused: above it, integers stop being
/// exact in JSON readers and Python floats.
pub const STEP_LIMIT: u64 = 1 << 53;
/// HTTP connections at most, whatever the open-file limit.
const MAX_HTTP_CONNECTIONS: usize = 1024;
/// Compression of persisted shards unless configured: "auto" is zstd at
/// level 1 on a node with at least `AUTO_COMPRESSION_CORES` cores, else off;
/// see docs/BENCHMARKS.md (bench reduce, and the demo's goodput).
pub const DEFAULT_PERSIST_COMPRESSION: &str = "auto";
/// Below this many cores the codec would take cycles from training.
pub const AUTO_COMPRESSION_CORES: usize = 8;

/// "auto" resolved for this node; anything else as written.
fn resolve_compression(key: &str, s: &str) -> Result<tierckpt_format::Compression, DaemonError> {
    let s = match s {
        "auto" => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if cores >= AUTO_COMPRESSION_CORES {
                "zstd"
            } else {
                "off"
            }
        }
        s => s,
    };
    s.parse().map_err(|e| DaemonError::Config(format!("{key}: {e}; or \"auto\"")))
}
/// Share of available RAM that `memory_tier_size = "auto"` takes.
const AUTO_SHARE: f64 = 0.5;

/// The resolved configuration of a daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// tmpfs directory of the memory tier.
    pub memory_dir: PathBuf,
    /// Who may read what is stored: this user, and the configured group.
    pub access: tierckpt_tiers::private_fs::Access,
    /// The capacity as configured ("auto", "32GB").
    pub memory_tier_size: String,
    /// The capacity in bytes.
    pub capacity: u64,
    /// Complete steps kept per namespace.
    pub keep_last: usize,
    /// Unix socket of the local API.
    pub socket: PathBuf,
    /// A group whose members may use the socket (see [`ConfigLayer::socket_group`]).
    pub socket_group: Option<u32>,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    /// Address of the HTTP API; none when off.
    pub http_addr: Option<SocketAddr>,
    /// Bearer token good for every role (`token`, `token_file`).
    pub token: Option<String>,
    /// Token of the peer role (`peer_token_file`).
    pub peer_token: Option<String>,
    /// Token of the write role (`write_token_file`).
    pub write_token: Option<String>,
    /// Token of the read role (`read_token_file`).
    pub read_token: Option<String>,
    /// TLS of the HTTP API and between peers; none: plain HTTP.
    pub tls: Option<crate::tls::TlsConfig>,
    /// See [`ConfigLayer::insecure_http`].
    pub insecure_http: bool,
    /// Membership and replication, when this node is in a cluster.
    pub cluster: Option<ClusterConfig>,
    /// The drain to a persistent tier, when one is configured.
    pub persist: Option<PersistConfig>,
    /// See [`ConfigLayer::background_nice`].
    pub background_nice: i32,
    /// See [`ConfigLayer::mount_huge_tmpfs`].
    pub mount_huge_tmpfs: bool,
    /// See [`ConfigLayer::max_step_advance`]; 0: unbounded.
    pub max_step_advance: u64,
    /// See [`ConfigLayer::http_max_connections`].
    pub http_max_connections: usize,
    /// See [`ConfigLayer::http_idle_timeout`].
    pub http_idle_timeout: std::time::Duration,
    /// Least upload bytes per second (see [`ConfigLayer::min_upload_rate`]).
    pub min_upload_rate: u64,
    /// See [`ConfigLayer::upload_grace`].
    pub upload_grace: std::time::Duration,
    /// See [`ConfigLayer::prefault_share`].
    pub prefault_share: f64,
    /// `mount_huge_tmpfs` was not set and the daemon runs as root: it
    /// mounts a huge-page tmpfs where that hides nothing (a new or empty
    /// directory), and otherwise keeps what is there.
    pub mount_huge_tmpfs_by_default: bool,
    /// Address of the HyperPod API (see [`ConfigLayer::hyperpod_listen`]); none when off.
    pub hyperpod_listen: Option<SocketAddr>,
    /// The sources of the checkpoint advice.
    pub advice: AdviceConfig,
}

impl DaemonConfig {
    /// How long an upload of `len` bytes may take: the grace, plus `len`
    /// at the least rate (at most a year, whatever a client declares).
    pub fn upload_deadline(&self, len: u64) -> std::time::Duration {
        const YEAR: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);
        let transfer = std::time::Duration::try_from_secs_f64(len as f64 / self.min_upload_rate as f64).unwrap_or(YEAR);
        self.upload_grace.saturating_add(transfer).min(YEAR)
    }
}

/// The soft limit on open files of this process.
pub fn open_file_limit() -> u64 {
    // SAFETY: getrlimit writes into a struct we own.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `r` is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    r.rlim_cur
}

/// Settings of the drain to the persistent tier.
#[derive(Debug, Clone)]
pub struct PersistConfig {
    /// The store's URL (file://, s3://, gs://, az://).
    pub url: String,
    /// Persist every N-th complete checkpoint.
    pub every: u64,
    /// Also persist when this long has passed since the last one.
    pub interval: Option<std::time::Duration>,
    /// Committed steps kept.
    pub keep_last: usize,
    /// Also keep every step that is a multiple of this (0: none).
    pub keep_every: u64,
    /// Cap on upload bytes per second.
    pub bandwidth: Option<u64>,
    /// Compression and deltas of what is stored.
    pub reduce: tierckpt_format::ReduceOptions,
    /// Every N-th persisted shard of a rank is stored whole.
    pub full_every: u32,
    /// Options of the object store.
    pub options: Vec<(String, String)>,
    /// Faults injected into the store (a testing aid).
    pub faults: Option<String>,
}

fn resolve_persist(layer: &ConfigLayer) -> Result<Option<PersistConfig>, DaemonError> {
    let Some(url) = layer.persistent_path.clone() else {
        return Ok(None);
    };
    let every = layer.persist_every.unwrap_or(1);
    if every == 0 {
        return Err(DaemonError::Config("persist_every must be at least 1".into()));
    }
    let interval = layer.persist_interval.as_deref().map(|s| parse_duration("persist_interval", s)).transpose()?;
    let bandwidth = parse_rate("persist_bandwidth", layer.persist_bandwidth.as_deref())?;
    let compression = resolve_compression(
        "persist_compression",
        layer.persist_compression.as_deref().unwrap_or(DEFAULT_PERSIST_COMPRESSION),
    )?;
    let full_every = layer.persist_full_every.unwrap_or(8);
    if full_every == 0 {
        return Err(DaemonError::Config("persist_full_every must be at least 1 (1: every shard stored whole)".into()));
    }
    Ok(Some(PersistConfig {
        url,
        every,
        interval,
        keep_last: layer.persist_keep_last.unwrap_or(3).max(1),
        keep_every: layer.persist_keep_every.unwrap_or(0),
        bandwidth,
        reduce: tierckpt_format::ReduceOptions { compression, delta: layer.persist_delta.unwrap_or(true) },
        full_every,
        options: layer.persistent_options.clone().unwrap_or_default().0.into_iter().collect(),
        faults: layer.persistent_faults.clone(),
    }))
}

/// Where the copies of a shard go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Node i copies to nodes i+1 .. i+k (mod n).
    Ring,
    /// Nodes form groups of k+1 consecutive nodes; a shard goes to its whole group.
    Group,
}

/// Where the preemption notice is read (`preemption_notice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeSource {
    /// A file: a notice while it exists and is not empty.
    File(PathBuf),
    /// An http:// URL: a notice while it answers 200 with a body other than FALSE.
    Url {
        /// The URL as configured.
        url: String,
        /// Its host:port (port 80 unless given), connected to at start.
        authority: String,
    },
}

impl std::fmt::Display for NoticeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoticeSource::File(p) => write!(f, "{}", p.display()),
            NoticeSource::Url { url, .. } => f.write_str(url),
        }
    }
}

/// The health check (`health_check_command` and its timings).
#[derive(Debug, Clone)]
pub struct HealthCheckConfig {
    /// Run with `sh -c`.
    pub command: String,
    /// How often.
    pub every: std::time::Duration,
    /// Killed and failed after this long.
    pub timeout: std::time::Duration,
}

/// The sources of the checkpoint advice (see `crate::advice`).
#[derive(Debug, Clone)]
pub struct AdviceConfig {
    /// The preemption notice polled, if any.
    pub notice: Option<NoticeSource>,
    /// How often it is polled.
    pub notice_every: std::time::Duration,
    /// The time a notice leaves unless it says.
    pub grace: std::time::Duration,
    /// The health check, if any.
    pub health_check: Option<HealthCheckConfig>,
}

/// A duration setting that must be above 0, `default` unless set.
fn positive_duration(key: &str, s: Option<&str>, default: &str) -> Result<std::time::Duration, DaemonError> {
    let d = parse_duration(key, s.unwrap_or(default))?;
    if d.is_zero() {
        return Err(DaemonError::Config(format!("{key} must be above 0")));
    }
    Ok(d)
}

fn resolve_notice(v: &str) -> Result<NoticeSource, DaemonError> {
    let v = v.trim();
    let bad = |why: String| DaemonError::Config(format!("preemption_notice {v:?} {why}"));
    if v.is_empty() {
        return Err(bad("is empty: give a file path or an http:// URL".into()));
    }
    if v.starts_with("https://") {
        return Err(bad("is https, which the notice poller does not speak: give an http:// URL (the cloud \
             metadata services are plain http) or a file"
            .into()));
    }
    if !v.starts_with("http://") {
        let path = v.strip_prefix("file://").unwrap_or(v);
        return Ok(NoticeSource::File(PathBuf::from(path)));
    }
    let uri: hyper::Uri = v.parse().map_err(|e| bad(format!("is not a URL ({e})")))?;
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| bad("names no host".into()))?;
    let authority = format!("{host}:{}", uri.port_u16().unwrap_or(80));
    Ok(NoticeSource::Url { url: v.to_string(), authority })
}

fn resolve_advice(layer: &ConfigLayer) -> Result<AdviceConfig, DaemonError> {
    let notice = layer.preemption_notice.as_deref().map(resolve_notice).transpose()?;
    let notice_every = positive_duration("preemption_notice_every", layer.preemption_notice_every.as_deref(), "1s")?;
    let grace = parse_duration("preemption_grace", layer.preemption_grace.as_deref().unwrap_or("30s"))?;
    let every = positive_duration("health_check_every", layer.health_check_every.as_deref(), "10s")?;
    let timeout = positive_duration("health_check_timeout", layer.health_check_timeout.as_deref(), "5s")?;
    let health_check = match layer.health_check_command.as_deref().map(str::trim) {
        None => None,
        Some("") => {
            return Err(DaemonError::Config(
                "health_check_command is empty: give a command (run with sh -c), or leave it unset".into(),
            ))
        }
        Some(c) => Some(HealthCheckConfig { command: c.to_string(), every, timeout }),
    };
    Ok(AdviceConfig { notice, notice_every, grace, health_check })
}

/// Membership and replication settings of a clustered daemon.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's id.
    pub node_id: String,
    /// This node's host:port as its peers reach it.
    pub advertise_addr: String,
    /// The members listed in the configuration, this node included, in
    /// their order; empty when they are discovered.
    pub nodes: Vec<Node>,
    /// Where the members come from when not listed.
    pub discover: Option<Discover>,
    /// How often the discovery source is read again.
    pub discover_interval: std::time::Duration,
    /// How long a graceful leave may take to hand this node's copies over.
    pub leave_timeout: std::time::Duration,
    /// Copies of each shard on other nodes (k).
    pub replication_factor: usize,
    /// Which nodes get the copies.
    pub placement: Placement,
    /// How often peers are probed.
    pub heartbeat_interval: std::time::Duration,
    /// A peer silent this long is dead; after half of it, suspect.
    pub heartbeat_timeout: std::time::Duration,
    /// Cap on replication bytes per second.
    pub replication_bandwidth: Option<u64>,
    /// Compression and deltas of replicas on the wire.
    pub replication_reduce: tierckpt_format::ReduceOptions,
}

impl ClusterConfig {
    /// This node as a member.
    pub fn me(&self) -> Node {
        Node { id: self.node_id.clone(), addr: self.advertise_addr.clone() }
    }

    /// Where the members come from, for `status`.
    pub fn membership_source(&self) -> String {
        self.discover.as_ref().map_or_else(|| "static".to_string(), |d| d.to_string())
    }
}

/// This host's name as Slurm knows it: `SLURMD_NODENAME`, else the host name.
fn slurm_host() -> Result<String, String> {
    if let Ok(n) = std::env::var("SLURMD_NODENAME") {
        return Ok(n);
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return Err("discover slurm: SLURMD_NODENAME is not set and the host name cannot be read".into());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The address to bind for a node advertised as `addr` (a name is resolved
/// now; an error names it).
fn bind_addr_of(addr: &str) -> Result<SocketAddr, DaemonError> {
    use std::net::ToSocketAddrs;
    let found = addr.to_socket_addrs().map_err(|e| {
        DaemonError::Config(format!(
            "this node's address {addr} does not resolve ({e}): fix the name, or set http_addr to bind explicitly"
        ))
    })?;
    let mut found: Vec<SocketAddr> = found.collect();
    found.sort_by_key(|a| !a.is_ipv4());
    found.into_iter().next().ok_or_else(|| DaemonError::Config(format!("this node's address {addr} has no address")))
}

/// An optional bytes-per-second setting such as "1GB".
fn parse_rate(key: &str, s: Option<&str>) -> Result<Option<u64>, DaemonError> {
    s.map(|b| {
        parse_size::parse_size(b)
            .map_err(|e| DaemonError::Config(format!("{key} {b:?} is not a size per second ({e})")))
    })
    .transpose()
}

fn parse_duration(key: &str, s: &str) -> Result<std::time::Duration, DaemonError> {
    humantime::parse_duration(s).map_err(|e| {
        DaemonError::Config(format!("{key} {s:?} is not a duration ({e}); write it like \"500ms\" or \"3s\""))
    })
}

fn resolve_cluster(layer: &ConfigLayer) -> Result<Option<ClusterConfig>, DaemonError> {
    let cfg = |m: String| DaemonError::Config(m);
    let discover = layer.discover.as_deref().map(Discover::parse).transpose().map_err(cfg)?;
    let advertise = match layer.advertise_addr.as_deref() {
        Some(a) => {
            parse_addr(a).map_err(|e| cfg(format!("advertise_addr {e}")))?;
            Some(a.to_string())
        }
        None => None,
    };
    let (node_id, nodes, advertise_addr) = match (&discover, &layer.node_id, &layer.nodes) {
        (None, None, None) => return Ok(None),
        (Some(d), _, Some(_)) => {
            return Err(cfg(format!("nodes and discover ({d}) are both set: list the members or discover them")))
        }
        (None, Some(_), None) => {
            return Err(cfg("node_id is set but nodes is not: list every node of the cluster (or set discover)".into()))
        }
        (None, None, Some(_)) => return Err(cfg("nodes is set but node_id is not: say which node this is".into())),
        (None, Some(i), Some(n)) => {
            let mut parsed: Vec<Node> = Vec::with_capacity(n.0.len());
            for n in &n.0 {
                validate_node_id(&n.id).map_err(cfg)?;
                if parsed.iter().any(|p| p.id == n.id) {
                    return Err(cfg(format!("node id {:?} appears twice in nodes", n.id)));
                }
                parse_addr(&n.addr).map_err(|e| cfg(format!("node {} has address {e}", n.id)))?;
                parsed.push(Node { id: n.id.clone(), addr: n.addr.clone() });
            }
            let Some(me) = parsed.iter().find(|n| n.id == *i) else {
                return Err(cfg(format!("node_id {i:?} is not among nodes")));
            };
            let addr = advertise.clone().unwrap_or_else(|| me.addr.clone());
            (i.clone(), parsed, addr)
        }
        (Some(d), id, None) => {
            let addr = match (advertise, d) {
                (Some(a), _) => a,
                (None, Discover::Slurm { port }) => format!("{}:{port}", slurm_host().map_err(cfg)?),
                (None, _) => match layer.http_addr.as_deref().map(str::parse::<SocketAddr>) {
                    Some(Ok(a)) if !a.ip().is_unspecified() && a.port() != 0 => a.to_string(),
                    _ => {
                        return Err(cfg(format!(
                            "discover ({d}) needs advertise_addr: this node's host:port as its peers reach it \
                             (in Kubernetes, $(POD_IP):7750 from the downward API)"
                        )))
                    }
                },
            };
            let id = id.clone().unwrap_or_else(|| id_for_addr(&addr));
            validate_node_id(&id).map_err(cfg)?;
            (id, Vec::new(), addr)
        }
    };
    let discover_interval = parse_duration("discover_interval", layer.discover_interval.as_deref().unwrap_or("10s"))?;
    if discover_interval.is_zero() {
        return Err(cfg("discover_interval must be above 0".into()));
    }
    let leave_timeout = parse_duration("leave_timeout", layer.leave_timeout.as_deref().unwrap_or("60s"))?;
    let k = layer.replication_factor.unwrap_or(1);
    if discover.is_none() && k >= nodes.len() {
        return Err(DaemonError::Config(format!(
            "replication_factor {k} needs at least {} nodes; nodes lists {}",
            k + 1,
            nodes.len()
        )));
    }
    let placement = match layer.placement.as_deref().unwrap_or("ring") {
        "ring" => Placement::Ring,
        "group" => Placement::Group,
        p => return Err(DaemonError::Config(format!("placement {p:?} is not \"ring\" or \"group\""))),
    };
    let heartbeat_interval =
        parse_duration("heartbeat_interval", layer.heartbeat_interval.as_deref().unwrap_or("500ms"))?;
    let heartbeat_timeout = parse_duration("heartbeat_timeout", layer.heartbeat_timeout.as_deref().unwrap_or("3s"))?;
    if heartbeat_timeout <= heartbeat_interval {
        return Err(DaemonError::Config(format!(
            "heartbeat_timeout {heartbeat_timeout:?} must exceed heartbeat_interval {heartbeat_interval:?}"
        )));
    }
    let replication_bandwidth = parse_rate("replication_bandwidth", layer.replication_bandwidth.as_deref())?;
    let replication_reduce = tierckpt_format::ReduceOptions {
        compression: resolve_compression(
            "replication_compression",
            layer.replication_compression.as_deref().unwrap_or("auto"),
        )?,
        delta: layer.replication_delta.unwrap_or(true),
    };
    Ok(Some(ClusterConfig {
        node_id,
        advertise_addr,
        nodes,
        discover,
        discover_interval,
        leave_timeout,
        replication_factor: k,
        placement,
        heartbeat_interval,
        heartbeat_timeout,
        replication_bandwidth,
        replication_reduce,
    }))
}

impl DaemonConfig {
    /// Checks a merged layer and fills in defaults; errors name the setting.
    pub fn resolve(layer: ConfigLayer) -> Result<Self, DaemonError> {
        let cluster = resolve_cluster(&layer)?;
        let advice = resolve_advice(&layer)?;
        let persist = resolve_persist(&layer)?;
        let tls = resolve_tls(&layer, cluster.is_some())?;
        let memory_dir = layer.memory_dir.unwrap_or_else(|| DEFAULT_MEMORY_DIR.into());
        let socket_group = layer.socket_group.as_deref().map(resolve_group).transpose()?;
        let group = layer.group.as_deref().map(resolve_group).transpose()?.or(socket_group);
        let access =
            tierckpt_tiers::private_fs::Access { group, group_writes: socket_group.is_some() && socket_group == group };
        let socket_mode =
            match layer.socket_mode.as_deref() {
                None => match socket_group {
                    Some(_) => 0o660,
                    None => 0o600,
                },
                Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8).ok().filter(|&m| m <= 0o777).ok_or_else(
                    || DaemonError::Config(format!("socket_mode {m:?} is not octal permission bits like 0660")),
                )?,
            };
        let memory_tier_size = layer.memory_tier_size.unwrap_or_else(|| "auto".into());
        let keep_last = layer.keep_last.unwrap_or(3);
        if keep_last == 0 {
            return Err(DaemonError::Config("keep_last must be at least 1".into()));
        }
        let capacity = parse_capacity(&memory_tier_size, &memory_dir)?;
        let background_nice = layer.background_nice.unwrap_or(10);
        if !(0..=19).contains(&background_nice) {
            return Err(DaemonError::Config(format!(
                "background_nice {background_nice} is outside 0..=19 (0: background work at normal priority)"
            )));
        }
        let socket = layer.socket.unwrap_or_else(|| memory_dir.join("daemon.sock"));
        let http_addr: Option<SocketAddr> = match (layer.http_addr.as_deref(), &cluster) {
            (None | Some("off" | ""), None) | (Some("off" | ""), Some(_)) => None,
            (Some(a), _) => Some(a.parse().map_err(|_| {
                DaemonError::Config(format!("http_addr {a:?} is not host:port (for example 127.0.0.1:7750) or \"off\""))
            })?),
            // A cluster node serves where its peers reach it.
            (None, Some(c)) => Some(bind_addr_of(&c.advertise_addr)?),
        };
        let token = match (layer.token, &layer.token_file) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => Some(read_token("token_file", f)?),
            (None, None) => None,
        };
        if token.as_deref() == Some("") {
            return Err(DaemonError::Config("the bearer token is empty".into()));
        }
        let role_token = |key: &str, f: &Option<PathBuf>| f.as_ref().map(|f| read_token(key, f)).transpose();
        let peer_token = role_token("peer_token_file", &layer.peer_token_file)?;
        let write_token = role_token("write_token_file", &layer.write_token_file)?;
        let read_token = role_token("read_token_file", &layer.read_token_file)?;
        let named = [
            ("token (token_file)", &token),
            ("peer_token_file", &peer_token),
            ("write_token_file", &write_token),
            ("read_token_file", &read_token),
        ];
        for (i, (a, ta)) in named.iter().enumerate() {
            for (b, tb) in &named[i + 1..] {
                if ta.is_some() && ta == tb {
                    return Err(DaemonError::Config(format!(
                        "{a} and {b} hold the same token: each role needs its own (or set token alone for every role)"
                    )));
                }
            }
        }
        if cluster.is_some() && http_addr.is_none() {
            return Err(DaemonError::Config("a cluster node needs its HTTP API: http_addr must not be off".into()));
        }
        // Any local user can reach a loopback port: the HTTP API serves only
        // requests that carry a token.
        let any_token = named.iter().any(|(_, t)| t.is_some());
        if let (Some(a), false) = (http_addr, any_token) {
            let why = match &cluster {
                Some(_) => format!("a cluster node serves its peers over HTTP (at {a})"),
                None => format!("http_addr {a} is set"),
            };
            return Err(DaemonError::Config(format!(
                "{why}, but no bearer token is: set token_file (or TIERCKPT_TOKEN); the HTTP API serves only \
                 requests that carry it"
            )));
        }
        if cluster.is_some() && token.is_none() && peer_token.is_none() {
            return Err(DaemonError::Config(
                "a cluster node sends its peers the peer token: set peer_token_file (or token_file)".into(),
            ));
        }
        let insecure_http = layer.insecure_http.unwrap_or(false);
        if let (Some(a), None, false) = (http_addr, &tls, insecure_http) {
            if !a.ip().is_loopback() {
                return Err(DaemonError::Config(format!(
                    "http_addr {a} is not a loopback address and tls_cert is not set: tokens and checkpoints would \
                     cross the network in clear; set tls_cert and tls_key (and tls_ca in a cluster), or \
                     insecure_http = true to serve plain HTTP there anyway"
                )));
            }
        }
        let max_step_advance = layer.max_step_advance.unwrap_or(DEFAULT_MAX_STEP_ADVANCE);
        let http_max_connections = layer
            .http_max_connections
            .unwrap_or_else(|| MAX_HTTP_CONNECTIONS.min((open_file_limit() / 4) as usize).max(1));
        if http_max_connections == 0 {
            return Err(DaemonError::Config("http_max_connections must be at least 1".into()));
        }
        let http_idle_timeout =
            parse_duration("http_idle_timeout", layer.http_idle_timeout.as_deref().unwrap_or("60s"))?;
        if http_idle_timeout.is_zero() {
            return Err(DaemonError::Config("http_idle_timeout must be above 0".into()));
        }
        let min_upload_rate =
            parse_rate("min_upload_rate", Some(layer.min_upload_rate.as_deref().unwrap_or("1MiB")))?.expect("given");
        if min_upload_rate == 0 {
            return Err(DaemonError::Config("min_upload_rate must be above 0 bytes per second".into()));
        }
        if let Some(b) = cluster.as_ref().and_then(|c| c.replication_bandwidth) {
            if b < min_upload_rate {
                return Err(DaemonError::Config(format!(
                    "replication_bandwidth {b} B/s is below min_upload_rate {min_upload_rate} B/s: peers would drop \
                     the replicas; lower min_upload_rate"
                )));
            }
        }
        let upload_grace = parse_duration("upload_grace", layer.upload_grace.as_deref().unwrap_or("10s"))?;
        let prefault_share = layer.prefault_share.unwrap_or(0.25);
        if !(0.0..=1.0).contains(&prefault_share) {
            return Err(DaemonError::Config(format!(
                "prefault_share {prefault_share} is outside 0..=1 (a share of memory_tier_size; 0: no pre-faulting)"
            )));
        }
        let hyperpod_listen = resolve_hyperpod_listen(layer.hyperpod_listen.as_deref())?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        Ok(Self {
            memory_dir,
            access,
            memory_tier_size,
            capacity,
            keep_last,
            socket,
            socket_group,
            socket_mode,
            http_addr,
            token,
            peer_token,
            write_token,
            read_token,
            tls,
            insecure_http,
            cluster,
            persist,
            background_nice,
            mount_huge_tmpfs: layer.mount_huge_tmpfs.unwrap_or(false),
            max_step_advance,
            http_max_connections,
            http_idle_timeout,
            min_upload_rate,
            upload_grace,
            prefault_share,
            mount_huge_tmpfs_by_default: layer.mount_huge_tmpfs.is_none() && root,
            hyperpod_listen,
            advice,
        })
    }
}

/// A token file's content, trimmed; an empty one is refused by name.
fn read_token(key: &str, f: &Path) -> Result<String, DaemonError> {
    let t = std::fs::read_to_string(f)
        .map_err(|e| DaemonError::Config(format!("reading {key} {}: {e}", f.display())))?
        .trim()
        .to_string();
    if t.is_empty() {
        return Err(DaemonError::Config(format!("{key} {} is empty: it must hold a token", f.display())));
    }
    Ok(t)
}

/// The TLS settings, checked (the files load) when given.
fn resolve_tls(layer: &ConfigLayer, clustered: bool) -> Result<Option<crate::tls::TlsConfig>, DaemonError> {
    let (cert, key) = match (&layer.tls_cert, &layer.tls_key) {
        (None, None) => {
            for (k, set) in [("tls_ca", layer.tls_ca.is_some()), ("tls_server_name", layer.tls_server_name.is_some())] {
                if set {
                    return Err(DaemonError::Config(format!(
                        "{k} is set but tls_cert is not: TLS needs tls_cert and tls_key"
                    )));
                }
            }
            return Ok(None);
        }
        (Some(_), None) => {
            return Err(DaemonError::Config("tls_cert is set but tls_key is not: give its private key".into()))
        }
        (None, Some(_)) => {
            return Err(DaemonError::Config("tls_key is set but tls_cert is not: give its certificate".into()))
        }
        (Some(c), Some(k)) => (c.clone(), k.clone()),
    };
    if clustered && layer.tls_ca.is_none() {
        return Err(DaemonError::Config(
            "a cluster node with tls_cert needs tls_ca, the CA that signed its peers' certificates".into(),
        ));
    }
    if layer.tls_server_name.is_some() && layer.tls_ca.is_none() {
        return Err(DaemonError::Config("tls_server_name is checked on peers' certificates: it needs tls_ca".into()));
    }
    if let Some(n) = &layer.tls_server_name {
        rustls::pki_types::ServerName::try_from(n.as_str())
            .map_err(|_| DaemonError::Config(format!("tls_server_name {n:?} is not a DNS name or IP address")))?;
    }
    let cfg = crate::tls::TlsConfig { cert, key, ca: layer.tls_ca.clone(), server_name: layer.tls_server_name.clone() };
    cfg.check()?;
    Ok(Some(cfg))
}

/// The port the HyperPod client's examples use.
pub const DEFAULT_HYPERPOD_PORT: u16 = 9202;

/// `hyperpod_listen`: "off" (or unset), "on", a port on loopback, or host:port.
fn resolve_hyperpod_listen(v: Option<&str>) -> Result<Option<SocketAddr>, DaemonError> {
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    match v.map(str::trim) {
        None | Some("off" | "") => Ok(None),
        Some("on") => Ok(Some(loopback(DEFAULT_HYPERPOD_PORT))),
        Some(a) => match (a.parse::<u16>(), a.parse::<SocketAddr>()) {
            (Ok(port), _) => Ok(Some(loopback(port))),
            (_, Ok(addr)) => Ok(Some(addr)),
            _ => Err(DaemonError::Config(format!(
                "hyperpod_listen {a:?} is not \"off\", \"on\" (127.0.0.1:{DEFAULT_HYPERPOD_PORT}), a port or \
                 host:port (for example 127.0.0.1:9202)"
            ))),
        },
    }
}

/// A group's id from its name or number.
fn resolve_group(g: &str) -> Result<u32, DaemonError> {
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(g).map_err(|_| DaemonError::Config(format!("group {g:?} holds a NUL byte")))?;
    // SAFETY: `name` is NUL-terminated; getgrnam returns null or a pointer to a
    // static entry, read at once before any other call could replace it.
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(DaemonError::Config(format!("group {g:?} does not exist (give a group name or a gid)")));
    }
    // SAFETY: checked non-null above; gr_gid is a plain field.
    Ok(unsafe { (*entry).gr_gid })
}

/// Parses "32GB", "512MiB", a plain byte count, or "auto".
pub fn parse_capacity(s: &str, dir: &Path) -> Result<u64, DaemonError> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(auto_capacity(dir));
    }
    let n = parse_size::parse_size(s).map_err(|e| {
        DaemonError::Config(format!(
            "memory_tier_size {s:?} is not a size ({e}); write it like \"32GB\", \"512MiB\" or \"auto\""
        ))
    })?;
    if n == 0 {
        return Err(DaemonError::Config("memory_tier_size must be above 0".into()));
    }
    Ok(n)
}

/// Half of the available RAM (or of what this process's cgroup memory limit
/// leaves, if less), bounded by the free space of the tmpfs.
fn auto_capacity(dir: &Path) -> u64 {
    let mut mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kib| kib * 1024);
    if let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") {
        if let Some(free) = super::cgroup::memory_available(Path::new("/sys/fs/cgroup"), &own) {
            mem = mem.min(free);
        }
    }
    let mut share = (mem as f64 * AUTO_SHARE) as u64;
    let probe = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if let Ok(c) = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()) {
        // SAFETY: statvfs writes into a zeroed struct we own.
        let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `sv` a struct we own.
        if unsafe { libc::statvfs(c.as_ptr(), &mut sv) } == 0 {
            share = share.min(sv.f_bavail as u64 * sv.f_frsize as u64);
        }
    }
    share.max(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        layer: ConfigLayer,
    }

    fn flags(args: &[&str]) -> Result<ConfigLayer, clap::Error> {
        Flags::try_parse_from(std::iter::once("tierckptd").chain(args.iter().copied())).map(|f| f.layer)
    }

    #[test]
    fn compression_settings() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let auto = resolve_compression("persist_compression", "auto").unwrap();
        let expected = if cores >= AUTO_COMPRESSION_CORES {
            tierckpt_format::Compression::Zstd(1)
        } else {
            tierckpt_format::Compression::Off
        };
        assert_eq!(auto, expected);
        assert_eq!(resolve_compression("k", "zstd:3").unwrap(), tierckpt_format::Compression::Zstd(3));
        let e = resolve_compression("persist_compression", "gzip").unwrap_err().to_string();
        assert!(e.contains("persist_compression") && e.contains("gzip") && e.contains("auto"), "{e}");
        let layer = ConfigLayer {
            persistent_path: Some("file:///tmp/x".into()),
            persist_full_every: Some(0),
            ..Default::default()
        };
        assert!(resolve_persist(&layer).unwrap_err().to_string().contains("persist_full_every"));
    }

    #[test]
    fn layers_override_in_order() {
        let file = ConfigLayer::from_toml("memory_tier_size = \"1GiB\"\nkeep_last = 5\n", Path::new("t.toml")).unwrap();
        let flags = flags(&["--keep-last", "2", "--http-addr", "off"]).unwrap();
        let c = DaemonConfig::resolve(file.merge(flags)).unwrap();
        assert!(c.cluster.is_none());
        assert_eq!(c.capacity, 1 << 30);
        assert_eq!(c.keep_last, 2);
        assert_eq!(c.http_addr, None);
        assert_eq!(c.socket, Path::new(DEFAULT_MEMORY_DIR).join("daemon.sock"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = ConfigLayer::from_toml("memory_tier_sise = \"1GB\"", Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("memory_tier_sise") && e.contains("c.toml"), "{e}");
        let bad = ConfigLayer { memory_tier_size: Some("lots".into()), ..Default::default() };
        let e = DaemonConfig::resolve(bad).unwrap_err().to_string();
        assert!(e.contains("\"lots\""), "{e}");
        let e = flags(&["--keep-last", "x"]).expect_err("refused").to_string();
        assert!(e.contains("--keep-last") && e.contains("'x'"), "{e}");
        let e = flags(&["--nodes", "a=1.2.3.4:1,b"]).expect_err("refused").to_string();
        assert!(e.contains("\"b\" is not id=host:port"), "{e}");
    }

    #[test]
    fn cluster_settings() {
        let text = "node_id = \"b\"\nreplication_factor = 1\nplacement = \"group\"\nmemory_tier_size = \"1MB\"\n[[nodes]]\nid = \"a\"\naddr = \"127.0.0.1:7001\"\n[[nodes]]\nid = \"b\"\naddr = \"127.0.0.1:7002\"\n";
        let l = ConfigLayer::from_toml(text, Path::new("c.toml")).unwrap();
        let e = DaemonConfig::resolve(l.clone()).unwrap_err().to_string();
        assert!(e.contains("token_file") && e.contains("TIERCKPT_TOKEN"), "a loopback cluster needs a token too: {e}");
        let l = l.merge(ConfigLayer { token: Some("t0ken".into()), ..Default::default() });
        let c = DaemonConfig::resolve(l.clone()).unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!((cl.me().addr.as_str(), cl.placement), ("127.0.0.1:7002", Placement::Group));
        assert_eq!(c.http_addr.unwrap().port(), 7002, "binds its own node address by default");
        let k2 = ConfigLayer { replication_factor: Some(2), ..Default::default() };
        let e = DaemonConfig::resolve(l.clone().merge(k2)).unwrap_err().to_string();
        assert!(e.contains("replication_factor 2 needs at least 3 nodes"), "{e}");
        let stranger = ConfigLayer { node_id: Some("z".into()), ..Default::default() };
        assert!(DaemonConfig::resolve(l.clone().merge(stranger)).unwrap_err().to_string().contains("\"z\""));
        let slow = flags(&["--replication-bandwidth", "100KB"]).unwrap();
        let e = DaemonConfig::resolve(l.merge(slow)).unwrap_err().to_string();
        assert!(e.contains("min_upload_rate"), "{e}");
    }

    #[test]
    fn the_socket_is_private_unless_a_group_is_given() {
        let c = DaemonConfig::resolve(flags(&["--memory-tier-size", "1MB"]).unwrap()).unwrap();
        assert_eq!((c.socket_mode, c.socket_group, c.access.group_writes), (0o600, None, false));
        let g =
            DaemonConfig::resolve(flags(&["--memory-tier-size", "1MB", "--socket-group", "4242"]).unwrap()).unwrap();
        assert_eq!(
            (g.socket_mode, g.socket_group, g.access.group, g.access.group_writes),
            (0o660, Some(4242), Some(4242), true)
        );
        let other = flags(&["--memory-tier-size", "1MB", "--socket-group", "4242", "--group", "7"]).unwrap();
        let o = DaemonConfig::resolve(other).unwrap();
        assert_eq!((o.access.group, o.access.group_writes), (Some(7), false), "readers of another group do not write");
        let e =
            DaemonConfig::resolve(flags(&["--memory-tier-size", "1MB", "--socket-mode", "rw"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("socket_mode \"rw\""), "{e}");
    }

    #[test]
    fn http_is_off_by_default_and_needs_a_token() {
        let c =
            DaemonConfig::resolve(ConfigLayer { memory_tier_size: Some("1MB".into()), ..Default::default() }).unwrap();
        assert_eq!(c.http_addr, None);
        let loopback = flags(&["--memory-tier-size", "1MB", "--http-addr", "127.0.0.1:7750"]).unwrap();
        let e = DaemonConfig::resolve(loopback.clone()).unwrap_err().to_string();
        assert!(e.contains("token_file") && e.contains("TIERCKPT_TOKEN") && e.contains("127.0.0.1:7750"), "{e}");
        let with = loopback.merge(ConfigLayer { token: Some("t0ken".into()), ..Default::default() });
        assert_eq!(DaemonConfig::resolve(with).unwrap().http_addr.unwrap().port(), 7750);
    }

    #[test]
    fn hyperpod_api_is_off_by_default_and_on_loopback_unless_given_a_host() {
        let l = |v: &str| flags(&["--memory-tier-size", "1MB", "--hyperpod-listen", v]).unwrap();
        let plain = ConfigLayer { memory_tier_size: Some("1MB".into()), ..Default::default() };
        assert_eq!(DaemonConfig::resolve(plain).unwrap().hyperpod_listen, None);
        assert_eq!(DaemonConfig::resolve(l("off")).unwrap().hyperpod_listen, None);
        let on = DaemonConfig::resolve(l("on")).unwrap().hyperpod_listen.unwrap();
        assert_eq!(on.to_string(), "127.0.0.1:9202");
        assert_eq!(DaemonConfig::resolve(l("9300")).unwrap().hyperpod_listen.unwrap().to_string(), "127.0.0.1:9300");
        let any = DaemonConfig::resolve(l("0.0.0.0:9202")).unwrap().hyperpod_listen.unwrap();
        assert_eq!(any.to_string(), "0.0.0.0:9202");
        let e = DaemonConfig::resolve(l("localhost")).unwrap_err().to_string();
        assert!(e.contains("hyperpod_listen \"localhost\""), "{e}");
    }

    #[test]
    fn hardening_settings() {
        let c =
            DaemonConfig::resolve(ConfigLayer { memory_tier_size: Some("1MB".into()), ..Default::default() }).unwrap();
        assert_eq!(c.max_step_advance, DEFAULT_MAX_STEP_ADVANCE);
        assert!((1..=1024).contains(&c.http_max_connections));
        assert_eq!(c.min_upload_rate, 1 << 20);
        assert_eq!(c.upload_deadline(10 << 20), std::time::Duration::from_secs(20));
        let l = flags(&[
            "--memory-tier-size",
            "1MB",
            "--max-step-advance",
            "0",
            "--http-max-connections",
            "7",
            "--http-idle-timeout",
            "2s",
            "--min-upload-rate",
            "1KiB",
            "--upload-grace",
            "1s",
        ])
        .unwrap();
        let c = DaemonConfig::resolve(l).unwrap();
        assert_eq!((c.max_step_advance, c.http_max_connections), (0, 7));
        assert_eq!(c.http_idle_timeout, std::time::Duration::from_secs(2));
        assert_eq!(c.upload_deadline(2048), std::time::Duration::from_secs(3));
        let _ = std::time::Instant::now() + c.upload_deadline(u64::MAX);
        for bad in [["--min-upload-rate", "0"], ["--http-max-connections", "0"], ["--upload-grace", "soon"]] {
            let e = DaemonConfig::resolve(flags(&bad).unwrap()).unwrap_err().to_string();
            assert!(e.contains(&bad[0][2..].replace('-', "_")), "{e}");
        }
    }

    #[test]
    fn advice_settings() {
        let c = DaemonConfig::resolve(flags(&["--memory-tier-size", "1MB"]).unwrap()).unwrap();
        assert!(c.advice.notice.is_none() && c.advice.health_check.is_none());
        assert_eq!(c.advice.grace, std::time::Duration::from_secs(30));
        let l = flags(&[
            "--memory-tier-size",
            "1MB",
            "--preemption-notice",
            "http://169.254.169.254/latest/meta-data/spot/instance-action",
            "--health-check-command",
            "nvidia-smi",
        ])
        .unwrap();
        let c = DaemonConfig::resolve(l).unwrap();
        let Some(NoticeSource::Url { authority, .. }) = c.advice.notice else { panic!("{:?}", c.advice.notice) };
        assert_eq!(authority, "169.254.169.254:80");
        assert_eq!(c.advice.health_check.unwrap().timeout, std::time::Duration::from_secs(5));
        let file =
            DaemonConfig::resolve(flags(&["--memory-tier-size", "1MB", "--preemption-notice", "/run/x"]).unwrap());
        assert_eq!(file.unwrap().advice.notice, Some(NoticeSource::File("/run/x".into())));
        for (bad, named) in [
            (["--preemption-notice-every", "often"], "preemption_notice_every \"often\""),
            (["--preemption-grace", "1 fortnight"], "preemption_grace"),
            (["--health-check-every", "0s"], "health_check_every must be above 0"),
            (["--health-check-timeout", "x"], "health_check_timeout \"x\""),
            (["--health-check-command", " "], "health_check_command is empty"),
            (["--preemption-notice", "https://metadata/x"], "preemption_notice \"https://metadata/x\" is https"),
            (["--preemption-notice", "http://"], "preemption_notice \"http://\""),
        ] {
            let e = DaemonConfig::resolve(flags(&bad).unwrap()).unwrap_err().to_string();
            assert!(e.contains(named), "{bad:?}: {e}");
        }
    }

    #[test]
    fn sizes() {
        let d = Path::new("/tmp");
        assert_eq!(parse_capacity("32GB", d).unwrap(), 32_000_000_000);
        assert_eq!(parse_capacity("512MiB", d).unwrap(), 512 << 20);
        assert!(parse_capacity("auto", d).unwrap() >= 1 << 20);
        assert!(parse_capacity("0", d).is_err());
    }

    #[test]
    fn public_address_needs_a_token() {
        let l = ConfigLayer {
            http_addr: Some("0.0.0.0:7750".into()),
            memory_tier_size: Some("1MB".into()),
            ..Default::default()
        };
        let e = DaemonConfig::resolve(l.clone()).unwrap_err().to_string();
        assert!(e.contains("token"), "{e}");
        let with_token = l.merge(ConfigLayer { token: Some("s3cret".into()), ..Default::default() });
        let e = DaemonConfig::resolve(with_token.clone()).unwrap_err().to_string();
        assert!(e.contains("insecure_http") && e.contains("tls_cert") && e.contains("0.0.0.0:7750"), "{e}");
        let insecure = with_token.merge(ConfigLayer { insecure_http: Some(true), ..Default::default() });
        assert!(DaemonConfig::resolve(insecure).unwrap().insecure_http);
        let flagged = flags(&["--memory-tier-size", "1MB", "--http-addr", "[::1]:7750", "--insecure-http"]).unwrap();
        assert_eq!(flagged.insecure_http, Some(true));
        let loopback = flagged.merge(ConfigLayer {
            token: Some("s3cret".into()),
            insecure_http: Some(false),
            ..Default::default()
        });
        assert!(DaemonConfig::resolve(loopback).is_ok(), "loopback needs no TLS");
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn role_tokens_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let base = || ConfigLayer {
            memory_tier_size: Some("1MB".into()),
            http_addr: Some("127.0.0.1:7750".into()),
            ..Default::default()
        };
        let empty = write(dir.path(), "empty", " \n");
        let l = ConfigLayer { peer_token_file: Some(empty.clone()), ..base() };
        let e = DaemonConfig::resolve(l).unwrap_err().to_string();
        assert!(
            e.contains("peer_token_file") && e.contains(&empty.display().to_string()) && e.contains("empty"),
            "{e}"
        );
        let (a, b) = (write(dir.path(), "a", "same\n"), write(dir.path(), "b", "same"));
        let l = ConfigLayer { write_token_file: Some(a.clone()), read_token_file: Some(b), ..base() };
        let e = DaemonConfig::resolve(l).unwrap_err().to_string();
        assert!(e.contains("write_token_file and read_token_file hold the same token"), "{e}");
        let l = ConfigLayer { token: Some("same".into()), peer_token_file: Some(a.clone()), ..base() };
        let e = DaemonConfig::resolve(l).unwrap_err().to_string();
        assert!(e.contains("token (token_file) and peer_token_file"), "{e}");
        // A role token alone serves the HTTP API.
        let c = DaemonConfig::resolve(ConfigLayer { read_token_file: Some(a.clone()), ..base() }).unwrap();
        assert_eq!((c.token, c.read_token.as_deref()), (None, Some("same")));
        // A cluster node needs a token to send its peers.
        let text = "node_id = \"a\"\nreplication_factor = 1\nmemory_tier_size = \"1MB\"\n[[nodes]]\nid = \"a\"\naddr = \"127.0.0.1:7001\"\n[[nodes]]\nid = \"b\"\naddr = \"127.0.0.1:7002\"\n";
        let cl = ConfigLayer::from_toml(text, Path::new("c.toml")).unwrap();
        let e = DaemonConfig::resolve(
            cl.clone().merge(ConfigLayer { write_token_file: Some(a.clone()), ..Default::default() }),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("peer_token_file"), "{e}");
        let c =
            DaemonConfig::resolve(cl.merge(ConfigLayer { peer_token_file: Some(a), ..Default::default() })).unwrap();
        assert_eq!(c.peer_token.as_deref(), Some("same"));
    }

    #[test]
    fn tls_files_are_checked_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let node = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let cert = write(dir.path(), "node.crt", &node.cert.pem());
        let key = write(dir.path(), "node.key", &node.signing_key.serialize_pem());
        let other_key = write(dir.path(), "other.key", &other.serialize_pem());
        let base = ConfigLayer {
            memory_tier_size: Some("1MB".into()),
            http_addr: Some("127.0.0.1:7750".into()),
            token: Some("t0ken".into()),
            ..Default::default()
        };
        let tls =
            |c: &Path, k: &Path| ConfigLayer { tls_cert: Some(c.into()), tls_key: Some(k.into()), ..base.clone() };
        let c = DaemonConfig::resolve(tls(&cert, &key)).unwrap();
        assert_eq!(c.tls.unwrap().cert, cert);
        let e = DaemonConfig::resolve(tls(&cert, &cert)).unwrap_err().to_string();
        assert!(e.contains("tls_key") && e.contains("node.crt") && e.contains("no private key"), "{e}");
        let e = DaemonConfig::resolve(tls(&key, &key)).unwrap_err().to_string();
        assert!(e.contains("tls_cert") && e.contains("node.key") && e.contains("no certificate"), "{e}");
        let e = DaemonConfig::resolve(tls(&cert, &other_key)).unwrap_err().to_string();
        assert!(e.contains("node.crt") && e.contains("other.key") && e.contains("do not go together"), "{e}");
        let e = DaemonConfig::resolve(tls(&cert, &dir.path().join("missing.key"))).unwrap_err().to_string();
        assert!(e.contains("tls_key") && e.contains("missing.key"), "{e}");
        let half = ConfigLayer { tls_cert: Some(cert.clone()), ..base.clone() };
        assert!(DaemonConfig::resolve(half).unwrap_err().to_string().contains("tls_key is not"));
        let named = ConfigLayer { tls_server_name: Some("node".into()), ..tls(&cert, &key) };
        assert!(DaemonConfig::resolve(named).unwrap_err().to_string().contains("needs tls_ca"));
        let ca = ConfigLayer { tls_ca: Some(cert.clone()), tls_server_name: Some("node".into()), ..tls(&cert, &key) };
        assert!(DaemonConfig::resolve(ca).unwrap().tls.unwrap().ca.is_some());
    }
}
