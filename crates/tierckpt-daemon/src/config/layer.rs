//! [`ConfigLayer`]: every daemon setting, declared once as a flag, an
//! environment variable and a TOML key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::builder::BoolishValueParser;
use serde::{Deserialize, Serialize};

use crate::DaemonError;

/// One layer of settings; every field optional so that layers merge. The
/// doc comment of each field is its `--help` text.
#[derive(Debug, Default, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    /// tmpfs directory of the memory tier [default: /dev/shm/tierckpt].
    #[arg(long, env = "TIERCKPT_MEMORY_DIR")]
    pub memory_dir: Option<PathBuf>,
    /// A group (name or gid) whose members may read the stored shards; by default only this user can [default: none].
    #[arg(long, env = "TIERCKPT_GROUP")]
    pub group: Option<String>,
    /// Capacity of the memory tier: "32GB", "512MiB" or "auto" (half the available RAM) [default: auto].
    #[arg(long, env = "TIERCKPT_MEMORY_TIER_SIZE")]
    pub memory_tier_size: Option<String>,
    /// Complete steps kept per namespace [default: 3].
    #[arg(long, env = "TIERCKPT_KEEP_LAST")]
    pub keep_last: Option<usize>,
    /// Unix socket of the local API [default: <memory-dir>/daemon.sock].
    #[arg(long, env = "TIERCKPT_SOCKET")]
    pub socket: Option<PathBuf>,
    /// A group (name or gid) whose members may use the local socket, e.g. trainer containers running as other
    /// users; they write their segments, so it is also --group unless that names another [default: none: only
    /// this user and root].
    #[arg(long, env = "TIERCKPT_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// Permission bits of the socket file, octal [default: 0600, or 0660 with --socket-group].
    #[arg(long, env = "TIERCKPT_SOCKET_MODE")]
    pub socket_mode: Option<String>,
    /// host:port of the HTTP API, or "off"; needs a token (--token-file) [default: off, or this node's address
    /// in --nodes].
    #[arg(long, env = "TIERCKPT_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// File holding a bearer token good for every role (peer, write, read; see --peer-token-file and the
    /// others); the HTTP API (and so a cluster) serves only with a token.
    #[arg(long, env = "TIERCKPT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The bearer token itself (prefer --token-file: a flag shows in the process list).
    #[arg(long, env = "TIERCKPT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the token of the peer role: daemons calling each other's peer endpoints (replicas,
    /// holdings, node-scoped deletes) send it and nothing else may call those [default: the token].
    #[arg(long, env = "TIERCKPT_PEER_TOKEN_FILE")]
    pub peer_token_file: Option<PathBuf>,
    /// File holding the token of the write role: shard writes, reads and deletes, and what the read role
    /// may call [default: the token].
    #[arg(long, env = "TIERCKPT_WRITE_TOKEN_FILE")]
    pub write_token_file: Option<PathBuf>,
    /// File holding the token of the read role: status, metrics and listings only [default: the token].
    #[arg(long, env = "TIERCKPT_READ_TOKEN_FILE")]
    pub read_token_file: Option<PathBuf>,
    /// PEM certificate chain: with --tls-key the HTTP API serves HTTPS, and peers present it as their client
    /// certificate; reloaded when the file changes [default: none, plain HTTP].
    #[arg(long, env = "TIERCKPT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TIERCKPT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM bundle of the cluster's CA: peers' certificates are verified against it, and the peer endpoints
    /// require a client certificate it signed (mutual TLS) [default: none].
    #[arg(long, env = "TIERCKPT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The name every peer's certificate must carry [default: the host of the peer's address].
    #[arg(long, env = "TIERCKPT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Serve plain HTTP on an address other than loopback (refused without TLS unless set) [default: false].
    #[arg(long, env = "TIERCKPT_INSECURE_HTTP", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub insecure_http: Option<bool>,
    /// This node's id among --nodes (set both to form a cluster); with --discover, its id [default: derived from
    /// --advertise-addr].
    #[arg(long, env = "TIERCKPT_NODE_ID")]
    pub node_id: Option<String>,
    /// Every node of the cluster, this one included, in a fixed order: "n0=node0.example:7750,n1=10.0.0.2:7750"
    /// (in the file: [[nodes]] tables with id and addr); or set --discover.
    #[arg(long, env = "TIERCKPT_NODES")]
    pub nodes: Option<NodeList>,
    /// Discover the members instead of listing them: "dns:NAME[:PORT]" (every A/AAAA record of NAME, e.g. a
    /// Kubernetes headless Service), "srv:NAME" (its SRV records), "slurm[:PORT]" (SLURM_JOB_NODELIST) or
    /// "file:PATH" (lines of host:port or id=host:port); read again every --discover-interval.
    #[arg(long, env = "TIERCKPT_DISCOVER")]
    pub discover: Option<String>,
    /// How often the discovery source is read again [default: 10s].
    #[arg(long, env = "TIERCKPT_DISCOVER_INTERVAL")]
    pub discover_interval: Option<String>,
    /// This node's host:port as its peers reach it [default: its entry in --nodes; with --discover, --http-addr
    /// if it names one address, or <host name>:7750 under Slurm].
    #[arg(long, env = "TIERCKPT_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// How long a node that stops (SIGTERM) may take to hand its copies over to the remaining nodes before it
    /// leaves the cluster [default: 60s].
    #[arg(long, env = "TIERCKPT_LEAVE_TIMEOUT")]
    pub leave_timeout: Option<String>,
    /// Copies of each shard on other nodes [default: 1].
    #[arg(long, env = "TIERCKPT_REPLICATION_FACTOR")]
    pub replication_factor: Option<usize>,
    /// Where the copies go: "ring" or "group" [default: ring].
    #[arg(long, env = "TIERCKPT_PLACEMENT")]
    pub placement: Option<String>,
    /// How often peers are probed [default: 500ms].
    #[arg(long, env = "TIERCKPT_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<String>,
    /// A peer silent this long is dead; after half of it, suspect [default: 3s].
    #[arg(long, env = "TIERCKPT_HEARTBEAT_TIMEOUT")]
    pub heartbeat_timeout: Option<String>,
    /// Cap on replication traffic per second, e.g. "1GB" [default: none].
    #[arg(long, env = "TIERCKPT_REPLICATION_BANDWIDTH")]
    pub replication_bandwidth: Option<String>,
    /// Compression of replicas on the wire, used where the link is measured to be slower than the codec:
    /// auto, off, lz4, zstd, zstd:N [default: auto: zstd:1 on 8 cores or more, else off].
    #[arg(long, env = "TIERCKPT_REPLICATION_COMPRESSION")]
    pub replication_compression: Option<String>,
    /// Send only the chunks that changed since a step the peer holds [default: true].
    #[arg(long, env = "TIERCKPT_REPLICATION_DELTA", value_parser = BoolishValueParser::new())]
    pub replication_delta: Option<bool>,
    /// Drain checkpoints to file:///dir, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix.
    #[arg(long, env = "TIERCKPT_PERSISTENT_PATH")]
    pub persistent_path: Option<String>,
    /// Persist every N-th complete checkpoint [default: 1].
    #[arg(long, env = "TIERCKPT_PERSIST_EVERY")]
    pub persist_every: Option<u64>,
    /// Also persist when this long has passed since the last one, e.g. "10m".
    #[arg(long, env = "TIERCKPT_PERSIST_INTERVAL")]
    pub persist_interval: Option<String>,
    /// Committed steps kept in the persistent tier [default: 3].
    #[arg(long, env = "TIERCKPT_PERSIST_KEEP_LAST")]
    pub persist_keep_last: Option<usize>,
    /// Also keep every step that is a multiple of this [default: 0, none].
    #[arg(long, env = "TIERCKPT_PERSIST_KEEP_EVERY")]
    pub persist_keep_every: Option<u64>,
    /// Cap on upload bytes per second, e.g. "500MB" [default: none].
    #[arg(long, env = "TIERCKPT_PERSIST_BANDWIDTH")]
    pub persist_bandwidth: Option<String>,
    /// Compression of persisted shards: auto (zstd on 8+ cores, else off), off, lz4, zstd, zstd:N [default: auto].
    #[arg(long, env = "TIERCKPT_PERSIST_COMPRESSION")]
    pub persist_compression: Option<String>,
    /// Persist only what changed since the rank's previous persisted step [default: true].
    #[arg(long, env = "TIERCKPT_PERSIST_DELTA", value_parser = BoolishValueParser::new())]
    pub persist_delta: Option<bool>,
    /// Store every N-th persisted shard of a rank whole [default: 8].
    #[arg(long, env = "TIERCKPT_PERSIST_FULL_EVERY")]
    pub persist_full_every: Option<u32>,
    /// Store options, e.g. "endpoint=http://127.0.0.1:9000,allow_http=true" (in the file: a table).
    #[arg(long, env = "TIERCKPT_PERSISTENT_OPTIONS")]
    pub persistent_options: Option<StoreOptions>,
    /// Testing aid: inject store faults, e.g. "fail=0.3,delay=5ms,seed=1".
    #[arg(long, env = "TIERCKPT_PERSISTENT_FAULTS", hide = true)]
    pub persistent_faults: Option<String>,
    /// Nice value (0-19) of the background work (replication, drain, checksums, HTTP), so that it yields to
    /// training; the local API keeps normal priority [default: 10].
    #[arg(long, env = "TIERCKPT_BACKGROUND_NICE")]
    pub background_nice: Option<i32>,
    /// Mount a tmpfs with huge pages (huge=within_size) on the memory directory unless it is on one; needs root
    /// [default: as root, when the directory is new or empty (nothing is hidden); else off].
    #[arg(long, env = "TIERCKPT_MOUNT_HUGE_TMPFS", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub mount_huge_tmpfs: Option<bool>,
    /// A client write (local reserve, HTTP PUT) may name a step at most this far above the newest step of its
    /// namespace held here; 0: unbounded. Steps of 2^53 and above are always refused [default: 1000000].
    #[arg(long, env = "TIERCKPT_MAX_STEP_ADVANCE")]
    pub max_step_advance: Option<u64>,
    /// Cap on concurrent HTTP connections (the HTTP and HyperPod APIs together), so that the local socket always finds file descriptors
    /// [default: min(1024, a quarter of the open-file limit)].
    #[arg(long, env = "TIERCKPT_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// An HTTP connection that has not sent a complete request head within this long (a new connection, or a
    /// keep-alive one idle between requests) is closed [default: 60s].
    #[arg(long, env = "TIERCKPT_HTTP_IDLE_TIMEOUT")]
    pub http_idle_timeout: Option<String>,
    /// Slowest accepted upload (HTTP PUT of a shard, a replica from a peer): one declaring N bytes is dropped,
    /// its space freed, if not done within --upload-grace + N / this rate [default: 1MiB].
    #[arg(long, env = "TIERCKPT_MIN_UPLOAD_RATE")]
    pub min_upload_rate: Option<String>,
    /// The time every upload gets on top of its size over --min-upload-rate [default: 10s].
    #[arg(long, env = "TIERCKPT_UPLOAD_GRACE")]
    pub upload_grace: Option<String>,
    /// Share (0 to 1) of the memory tier's capacity kept faulted in, in the background, as free segments, so
    /// that saves, replicas and restores do not pay page faults; 0: off [default: 0.25].
    #[arg(long, env = "TIERCKPT_PREFAULT_SHARE")]
    pub prefault_share: Option<f64>,
    /// The SageMaker HyperPod in-memory checkpoint API (`/v1/cp/...`, for the unchanged
    /// `amzn-sagemaker-checkpointing` client): "off", "on" (127.0.0.1:9202), a port (on 127.0.0.1) or
    /// host:port. It takes no token (the client sends none): bind it to loopback unless every host that can
    /// reach the address may write checkpoints [default: off].
    #[arg(long, env = "TIERCKPT_HYPERPOD_LISTEN")]
    pub hyperpod_listen: Option<String>,
    /// Log lines on stderr: "text" (for people) or "json" (one JSON object per line: timestamp, level,
    /// fields, target) [default: text].
    #[arg(long, env = "TIERCKPT_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// A preemption notice to poll: a file (a notice while it exists and is not empty) or an http:// URL (a
    /// notice when it answers 200 with a body other than FALSE; 404 or FALSE: none), e.g. the EC2 metadata
    /// http://169.254.169.254/latest/meta-data/spot/instance-action; a notice asks trainers to checkpoint
    /// now [default: none].
    #[arg(long, env = "TIERCKPT_PREEMPTION_NOTICE")]
    pub preemption_notice: Option<String>,
    /// How often the preemption notice is polled [default: 1s].
    #[arg(long, env = "TIERCKPT_PREEMPTION_NOTICE_EVERY")]
    pub preemption_notice_every: Option<String>,
    /// The time a notice leaves before the node goes, unless the notice gives it (EC2's "time") [default: 30s].
    #[arg(long, env = "TIERCKPT_PREEMPTION_GRACE")]
    pub preemption_grace: Option<String>,
    /// A command (run with sh -c, e.g. a GPU probe) whose failure (a non-zero exit, a timeout) asks trainers
    /// to checkpoint now [default: none].
    #[arg(long, env = "TIERCKPT_HEALTH_CHECK_COMMAND")]
    pub health_check_command: Option<String>,
    /// How often the health check runs [default: 10s].
    #[arg(long, env = "TIERCKPT_HEALTH_CHECK_EVERY")]
    pub health_check_every: Option<String>,
    /// A health check running longer than this is killed and failed [default: 5s].
    #[arg(long, env = "TIERCKPT_HEALTH_CHECK_TIMEOUT")]
    pub health_check_timeout: Option<String>,
}

/// How the daemon writes its log (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = DaemonError;
    fn from_str(s: &str) -> Result<Self, DaemonError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(DaemonError::Config(format!("log_format {s:?} is not \"text\" or \"json\""))),
        }
    }
}

impl ConfigLayer {
    /// Parses a TOML file's text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, DaemonError> {
        toml::from_str(text).map_err(|e| DaemonError::Config(format!("{}: {}", origin.display(), e.message())))
    }

    /// The `log_format` setting, checked.
    pub fn log_format(&self) -> Result<LogFormat, DaemonError> {
        self.log_format.as_deref().map_or(Ok(LogFormat::Text), str::parse)
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, DaemonError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DaemonError::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_toml(&text, path)
    }

    /// This layer with `other`'s settings where `other` has them.
    pub fn merge(self, other: ConfigLayer) -> Self {
        let (Ok(serde_json::Value::Object(mut base)), Ok(serde_json::Value::Object(over))) =
            (serde_json::to_value(self), serde_json::to_value(other))
        else {
            unreachable!("a ConfigLayer serializes to an object")
        };
        base.extend(over.into_iter().filter(|(_, v)| !v.is_null()));
        serde_json::from_value(serde_json::Value::Object(base)).expect("merged layers deserialize")
    }

    /// The `tierckptd` flags that set what this layer sets (the token goes
    /// by environment instead: it is left out).
    pub fn to_args(&self) -> Vec<String> {
        let serde_json::Value::Object(fields) = serde_json::to_value(self).expect("a ConfigLayer serializes") else {
            unreachable!("a ConfigLayer serializes to an object")
        };
        let mut args = Vec::new();
        for (key, value) in fields {
            let value = match value {
                serde_json::Value::Null => continue,
                _ if key == "token" => continue,
                serde_json::Value::String(s) => s,
                v => v.to_string(),
            };
            args.push(format!("--{}", key.replace('_', "-")));
            args.push(value);
        }
        args
    }
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// The node's id, unique in the cluster.
    pub id: String,
    /// host:port of its HTTP API.
    pub addr: String,
}

/// The members of a cluster: "n0=127.0.0.1:7750,n1=127.0.0.1:7751" on a
/// command line, `[[nodes]]` tables in the file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeList(pub Vec<NodeSpec>);

impl FromStr for NodeList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                let (id, addr) = p.trim().split_once('=').ok_or_else(|| format!("node {p:?} is not id=host:port"))?;
                Ok(NodeSpec { id: id.to_string(), addr: addr.to_string() })
            })
            .collect::<Result<_, String>>()
            .map(NodeList)
    }
}

impl std::fmt::Display for NodeList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|n| format!("{}={}", n.id, n.addr)).collect();
        f.write_str(&parts.join(","))
    }
}

impl Serialize for NodeList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text_or_structure(d, NodeList)
    }
}

/// Options of the object store: "endpoint=http://127.0.0.1:9000,allow_http=true"
/// on a command line, a table in the file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreOptions(pub BTreeMap<String, String>);

impl FromStr for StoreOptions {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                p.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .ok_or_else(|| format!("store option {p:?} is not key=value"))
            })
            .collect::<Result<_, String>>()
            .map(StoreOptions)
    }
}

impl std::fmt::Display for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(","))
    }
}

impl Serialize for StoreOptions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StoreOptions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text_or_structure(d, StoreOptions)
    }
}

/// A setting written as text on a command line or in a variable, and as
/// TOML structure (tables, a list of tables) in the file: a string is
/// parsed, anything else deserialized as `S` and wrapped.
fn text_or_structure<'de, D, T, S>(d: D, wrap: fn(S) -> T) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: FromStr<Err = String>,
    S: serde::de::DeserializeOwned,
{
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => s.parse().map_err(D::Error::custom),
        v => serde_json::from_value(v).map(wrap).map_err(D::Error::custom),
    }
}
