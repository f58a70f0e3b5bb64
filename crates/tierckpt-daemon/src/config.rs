//! Daemon configuration: one struct, from a TOML file, then `TIERCKPT_*`
//! environment variables, then command-line flags, each layer overriding the
//! one before. Unknown keys in the file are errors that name the key.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::DaemonError;

pub const DEFAULT_MEMORY_DIR: &str = "/dev/shm/tierckpt";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7750";
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

/// One layer of settings; every field optional so layers can be merged.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    /// tmpfs directory holding the memory tier.
    pub memory_dir: Option<PathBuf>,
    /// "32GB", "512MiB", or "auto".
    pub memory_tier_size: Option<String>,
    /// Complete steps kept per namespace.
    pub keep_last: Option<usize>,
    /// Unix socket of the local API (default: `<memory_dir>/daemon.sock`).
    pub socket: Option<PathBuf>,
    /// "host:port" of the HTTP API, or "off".
    pub http_addr: Option<String>,
    /// File holding the bearer token for the HTTP API.
    pub token_file: Option<PathBuf>,
    /// The bearer token itself (prefer `token_file`; env `TIERCKPT_TOKEN`).
    pub token: Option<String>,
    /// This node's id in `nodes`; set it (and `nodes`) to form a cluster.
    pub node_id: Option<String>,
    /// Every node of the cluster, this one included, in a fixed order.
    pub nodes: Option<Vec<NodeSpec>>,
    /// Copies of each shard on other nodes (default 1).
    pub replication_factor: Option<usize>,
    /// "ring" or "group".
    pub placement: Option<String>,
    /// How often peers are probed ("500ms").
    pub heartbeat_interval: Option<String>,
    /// A peer silent this long is dead ("3s"); after half of it, suspect.
    pub heartbeat_timeout: Option<String>,
    /// Cap on replication traffic per second ("1GB"); none by default.
    pub replication_bandwidth: Option<String>,
    /// Compression of replicas on the wire, used where the link is measured
    /// to be slower than the codec: "auto" (default: zstd level 1 on a node
    /// with 8 cores or more, else off), "off", "lz4", "zstd", "zstd:N".
    pub replication_compression: Option<String>,
    /// Send only the chunks that changed since a step the peer holds (default true).
    pub replication_delta: Option<bool>,
    /// Where checkpoints are drained to: file:///dir, s3://bucket/prefix, gs://..., az://...
    pub persistent_path: Option<String>,
    /// Persist every N-th complete checkpoint (default 1: all).
    pub persist_every: Option<u64>,
    /// Also persist when this long has passed since the last one ("10m").
    pub persist_interval: Option<String>,
    /// Committed steps kept in the persistent tier (default 3).
    pub persist_keep_last: Option<usize>,
    /// Also keep every step that is a multiple of this (default 0: none).
    pub persist_keep_every: Option<u64>,
    /// Cap on upload bytes per second ("500MB"); none by default.
    pub persist_bandwidth: Option<String>,
    /// Compression of what is persisted: "auto" (default: zstd on 8 cores or
    /// more, else off), "off", "lz4", "zstd", "zstd:N".
    pub persist_compression: Option<String>,
    /// Persist only the chunks that changed since the rank's previous
    /// persisted step (default true).
    pub persist_delta: Option<bool>,
    /// Every N-th persisted shard of a rank is stored whole (default 8).
    pub persist_full_every: Option<u32>,
    /// Store options (for S3: endpoint, allow_http, region, ...).
    pub persistent_options: Option<std::collections::BTreeMap<String, String>>,
    /// Testing aid: inject faults into the store ("fail=0.3,delay=5ms,seed=1").
    pub persistent_faults: Option<String>,
    /// Nice value (0-19) of the threads doing background work (replication,
    /// drain, checksums, the HTTP API), so that they yield to training
    /// processes; the local API keeps normal priority. Default 10.
    pub background_nice: Option<i32>,
    /// Mount a tmpfs with huge pages on `memory_dir` unless it is on one
    /// (needs root); restores then skip most page-table work.
    pub mount_huge_tmpfs: Option<bool>,
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub id: String,
    pub addr: String,
}

fn parse_bool(key: &str, v: &str) -> Result<bool, DaemonError> {
    match v {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err(DaemonError::Config(format!("{key}={v:?} is not true or false"))),
    }
}

/// Parses "endpoint=http://127.0.0.1:9000,allow_http=true".
pub fn parse_options(s: &str) -> Result<std::collections::BTreeMap<String, String>, DaemonError> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| DaemonError::Config(format!("store option {p:?} is not key=value")))
        })
        .collect()
}

/// Parses "n0=127.0.0.1:7750,n1=127.0.0.1:7751".
pub fn parse_nodes(s: &str) -> Result<Vec<NodeSpec>, DaemonError> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (id, addr) = p
                .trim()
                .split_once('=')
                .ok_or_else(|| DaemonError::Config(format!("node {p:?} is not id=host:port")))?;
            Ok(NodeSpec { id: id.to_string(), addr: addr.to_string() })
        })
        .collect()
}

impl ConfigLayer {
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, DaemonError> {
        toml::from_str(text).map_err(|e| DaemonError::Config(format!("{}: {}", origin.display(), e.message())))
    }

    pub fn from_file(path: &Path) -> Result<Self, DaemonError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DaemonError::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_toml(&text, path)
    }

    /// Reads `TIERCKPT_MEMORY_DIR`, `TIERCKPT_MEMORY_TIER_SIZE`,
    /// `TIERCKPT_KEEP_LAST`, `TIERCKPT_SOCKET`, `TIERCKPT_HTTP_ADDR`,
    /// `TIERCKPT_TOKEN_FILE` and `TIERCKPT_TOKEN` from `vars`.
    pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, DaemonError> {
        let mut l = Self::default();
        for (k, v) in vars {
            match k.as_str() {
                "TIERCKPT_MEMORY_DIR" => l.memory_dir = Some(v.into()),
                "TIERCKPT_MEMORY_TIER_SIZE" => l.memory_tier_size = Some(v),
                "TIERCKPT_KEEP_LAST" => {
                    l.keep_last =
                        Some(v.parse().map_err(|_| {
                            DaemonError::Config(format!("TIERCKPT_KEEP_LAST={v:?} is not a whole number"))
                        })?)
                }
                "TIERCKPT_SOCKET" => l.socket = Some(v.into()),
                "TIERCKPT_HTTP_ADDR" => l.http_addr = Some(v),
                "TIERCKPT_TOKEN_FILE" => l.token_file = Some(v.into()),
                "TIERCKPT_TOKEN" => l.token = Some(v),
                "TIERCKPT_NODE_ID" => l.node_id = Some(v),
                "TIERCKPT_NODES" => l.nodes = Some(parse_nodes(&v)?),
                "TIERCKPT_REPLICATION_FACTOR" => {
                    l.replication_factor = Some(v.parse().map_err(|_| {
                        DaemonError::Config(format!("TIERCKPT_REPLICATION_FACTOR={v:?} is not a whole number"))
                    })?)
                }
                "TIERCKPT_PLACEMENT" => l.placement = Some(v),
                "TIERCKPT_HEARTBEAT_INTERVAL" => l.heartbeat_interval = Some(v),
                "TIERCKPT_HEARTBEAT_TIMEOUT" => l.heartbeat_timeout = Some(v),
                "TIERCKPT_REPLICATION_BANDWIDTH" => l.replication_bandwidth = Some(v),
                "TIERCKPT_REPLICATION_COMPRESSION" => l.replication_compression = Some(v),
                "TIERCKPT_REPLICATION_DELTA" => {
                    l.replication_delta = Some(parse_bool("TIERCKPT_REPLICATION_DELTA", &v)?)
                }
                "TIERCKPT_PERSISTENT_PATH" => l.persistent_path = Some(v),
                "TIERCKPT_PERSIST_EVERY" => {
                    l.persist_every = Some(v.parse().map_err(|_| {
                        DaemonError::Config(format!("TIERCKPT_PERSIST_EVERY={v:?} is not a whole number"))
                    })?)
                }
                "TIERCKPT_PERSIST_INTERVAL" => l.persist_interval = Some(v),
                "TIERCKPT_PERSIST_BANDWIDTH" => l.persist_bandwidth = Some(v),
                "TIERCKPT_PERSIST_COMPRESSION" => l.persist_compression = Some(v),
                "TIERCKPT_PERSIST_DELTA" => l.persist_delta = Some(parse_bool("TIERCKPT_PERSIST_DELTA", &v)?),
                "TIERCKPT_PERSIST_FULL_EVERY" => {
                    l.persist_full_every = Some(v.parse().map_err(|_| {
                        DaemonError::Config(format!("TIERCKPT_PERSIST_FULL_EVERY={v:?} is not a whole number"))
                    })?)
                }
                "TIERCKPT_PERSISTENT_OPTIONS" => l.persistent_options = Some(parse_options(&v)?),
                "TIERCKPT_PERSISTENT_FAULTS" => l.persistent_faults = Some(v),
                "TIERCKPT_MOUNT_HUGE_TMPFS" => l.mount_huge_tmpfs = Some(parse_bool("TIERCKPT_MOUNT_HUGE_TMPFS", &v)?),
                "TIERCKPT_BACKGROUND_NICE" => {
                    l.background_nice = Some(v.parse().map_err(|_| {
                        DaemonError::Config(format!("TIERCKPT_BACKGROUND_NICE={v:?} is not a whole number"))
                    })?)
                }
                _ => {}
            }
        }
        Ok(l)
    }

    /// `other`'s settings win where present.
    pub fn merge(mut self, other: ConfigLayer) -> Self {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(
            memory_dir,
            memory_tier_size,
            keep_last,
            socket,
            http_addr,
            token_file,
            token,
            node_id,
            nodes,
            replication_factor,
            placement,
            heartbeat_interval,
            heartbeat_timeout,
            replication_bandwidth,
            replication_compression,
            replication_delta,
            persistent_path,
            persist_every,
            persist_interval,
            persist_keep_last,
            persist_keep_every,
            persist_bandwidth,
            persist_compression,
            persist_delta,
            persist_full_every,
            persistent_options,
            persistent_faults,
            background_nice,
            mount_huge_tmpfs
        );
        self
    }
}

/// The resolved configuration of a daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub memory_dir: PathBuf,
    pub memory_tier_size: String,
    pub capacity: u64,
    pub keep_last: usize,
    pub socket: PathBuf,
    pub http_addr: Option<SocketAddr>,
    pub token: Option<String>,
    pub cluster: Option<ClusterConfig>,
    pub persist: Option<PersistConfig>,
    /// See [`ConfigLayer::background_nice`].
    pub background_nice: i32,
    /// See [`ConfigLayer::mount_huge_tmpfs`].
    pub mount_huge_tmpfs: bool,
}

/// Settings of the drain to the persistent tier.
#[derive(Debug, Clone)]
pub struct PersistConfig {
    pub url: String,
    pub every: u64,
    pub interval: Option<std::time::Duration>,
    pub keep_last: usize,
    pub keep_every: u64,
    pub bandwidth: Option<u64>,
    pub reduce: tierckpt_format::ReduceOptions,
    pub full_every: u32,
    pub options: Vec<(String, String)>,
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
        options: layer.persistent_options.clone().unwrap_or_default().into_iter().collect(),
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

/// Membership and replication settings of a clustered daemon.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_id: String,
    pub nodes: Vec<(String, SocketAddr)>,
    pub replication_factor: usize,
    pub placement: Placement,
    pub heartbeat_interval: std::time::Duration,
    pub heartbeat_timeout: std::time::Duration,
    pub replication_bandwidth: Option<u64>,
    /// Compression and deltas of replicas on the wire.
    pub replication_reduce: tierckpt_format::ReduceOptions,
}

impl ClusterConfig {
    pub fn my_index(&self) -> usize {
        self.nodes.iter().position(|(id, _)| *id == self.node_id).expect("validated")
    }
    pub fn my_addr(&self) -> SocketAddr {
        self.nodes[self.my_index()].1
    }
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
    let (node_id, nodes) = match (&layer.node_id, &layer.nodes) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(DaemonError::Config("node_id is set but nodes is not: list every node of the cluster".into()))
        }
        (None, Some(_)) => {
            return Err(DaemonError::Config("nodes is set but node_id is not: say which node this is".into()))
        }
        (Some(i), Some(n)) => (i.clone(), n.clone()),
    };
    let mut parsed = Vec::with_capacity(nodes.len());
    for n in &nodes {
        tierckpt_format::names::validate_namespace(&n.id)
            .map_err(|_| DaemonError::Config(format!("node id {:?} is invalid: use [A-Za-z0-9_-]", n.id)))?;
        if parsed.iter().any(|(id, _): &(String, SocketAddr)| *id == n.id) {
            return Err(DaemonError::Config(format!("node id {:?} appears twice in nodes", n.id)));
        }
        let addr: SocketAddr = n
            .addr
            .parse()
            .map_err(|_| DaemonError::Config(format!("node {} has address {:?}; expected host:port", n.id, n.addr)))?;
        parsed.push((n.id.clone(), addr));
    }
    if !parsed.iter().any(|(id, _)| *id == node_id) {
        return Err(DaemonError::Config(format!("node_id {node_id:?} is not among nodes")));
    }
    let k = layer.replication_factor.unwrap_or(1);
    if k >= parsed.len() {
        return Err(DaemonError::Config(format!(
            "replication_factor {k} needs at least {} nodes; nodes lists {}",
            k + 1,
            parsed.len()
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
        nodes: parsed,
        replication_factor: k,
        placement,
        heartbeat_interval,
        heartbeat_timeout,
        replication_bandwidth,
        replication_reduce,
    }))
}

impl DaemonConfig {
    pub fn resolve(layer: ConfigLayer) -> Result<Self, DaemonError> {
        let cluster = resolve_cluster(&layer)?;
        let persist = resolve_persist(&layer)?;
        let memory_dir = layer.memory_dir.unwrap_or_else(|| DEFAULT_MEMORY_DIR.into());
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
        let default_http = cluster.as_ref().map(|c| c.my_addr().to_string());
        let http_addr: Option<SocketAddr> =
            match layer.http_addr.as_deref().or(default_http.as_deref()).unwrap_or(DEFAULT_HTTP_ADDR) {
                "off" | "" => None,
                a => Some(a.parse().map_err(|_| {
                    DaemonError::Config(format!(
                        "http_addr {a:?} is not host:port (for example 127.0.0.1:7750) or \"off\""
                    ))
                })?),
            };
        let token = match (layer.token, layer.token_file) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => Some(
                std::fs::read_to_string(&f)
                    .map_err(|e| DaemonError::Config(format!("reading token_file {}: {e}", f.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if token.as_deref() == Some("") {
            return Err(DaemonError::Config("the bearer token is empty".into()));
        }
        if let Some(c) = &cluster {
            if http_addr.is_none() {
                return Err(DaemonError::Config("a cluster node needs its HTTP API: http_addr must not be off".into()));
            }
            if let Some((id, a)) = c.nodes.iter().find(|(_, a)| !a.ip().is_loopback()) {
                if token.is_none() {
                    return Err(DaemonError::Config(format!(
                        "node {id} at {a} is reached over the network: set token_file (or TIERCKPT_TOKEN) so peers authenticate"
                    )));
                }
            }
        }
        if let Some(a) = http_addr {
            if !a.ip().is_loopback() && token.is_none() {
                return Err(DaemonError::Config(format!(
                    "http_addr {a} is reachable from other hosts: set token_file (or TIERCKPT_TOKEN) so requests must carry a bearer token"
                )));
            }
        }
        Ok(Self {
            memory_dir,
            memory_tier_size,
            capacity,
            keep_last,
            socket,
            http_addr,
            token,
            cluster,
            persist,
            background_nice,
            mount_huge_tmpfs: layer.mount_huge_tmpfs.unwrap_or(false),
        })
    }
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

/// Half of the available RAM, bounded by the free space of the tmpfs.
fn auto_capacity(dir: &Path) -> u64 {
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kib| kib * 1024);
    let mut share = (mem as f64 * AUTO_SHARE) as u64;
    let probe = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if let Ok(c) = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()) {
        // SAFETY: statvfs writes into a zeroed struct we own.
        let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut sv) } == 0 {
            share = share.min(sv.f_bavail as u64 * sv.f_frsize as u64);
        }
    }
    share.max(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let env = ConfigLayer::from_env([("TIERCKPT_KEEP_LAST".to_string(), "2".to_string())]).unwrap();
        let flags = ConfigLayer { http_addr: Some("off".into()), ..Default::default() };
        let c = DaemonConfig::resolve(file.merge(env).merge(flags)).unwrap();
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
        let e = ConfigLayer::from_env([("TIERCKPT_KEEP_LAST".into(), "x".into())]).unwrap_err().to_string();
        assert!(e.contains("TIERCKPT_KEEP_LAST"), "{e}");
    }

    #[test]
    fn cluster_settings() {
        let text = "node_id = \"b\"\nreplication_factor = 1\nplacement = \"group\"\nmemory_tier_size = \"1MB\"\n[[nodes]]\nid = \"a\"\naddr = \"127.0.0.1:7001\"\n[[nodes]]\nid = \"b\"\naddr = \"127.0.0.1:7002\"\n";
        let l = ConfigLayer::from_toml(text, Path::new("c.toml")).unwrap();
        let c = DaemonConfig::resolve(l.clone()).unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!((cl.my_index(), cl.placement), (1, Placement::Group));
        assert_eq!(c.http_addr.unwrap().port(), 7002, "binds its own node address by default");
        let k2 = ConfigLayer { replication_factor: Some(2), ..Default::default() };
        let e = DaemonConfig::resolve(l.clone().merge(k2)).unwrap_err().to_string();
        assert!(e.contains("replication_factor 2 needs at least 3 nodes"), "{e}");
        let stranger = ConfigLayer { node_id: Some("z".into()), ..Default::default() };
        assert!(DaemonConfig::resolve(l.clone().merge(stranger)).unwrap_err().to_string().contains("\"z\""));
        let env = ConfigLayer::from_env([("TIERCKPT_NODES".into(), "a=10.0.0.1:1,b=10.0.0.2:1".into())]).unwrap();
        let e = DaemonConfig::resolve(l.merge(env)).unwrap_err().to_string();
        assert!(e.contains("token"), "{e}");
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
        let ok = l.merge(ConfigLayer { token: Some("s3cret".into()), ..Default::default() });
        assert!(DaemonConfig::resolve(ok).is_ok());
    }
}
