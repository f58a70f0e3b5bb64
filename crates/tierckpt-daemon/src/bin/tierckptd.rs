//! `tierckptd`: the node daemon. Settings come from `--config FILE`, then
//! `TIERCKPT_*` variables, then flags. Prints one JSON line on stdout once it
//! serves (`{"event":"ready",...}`), and stops cleanly on SIGINT or SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use tierckpt_daemon::{ConfigLayer, Daemon, DaemonConfig};

#[derive(Parser, Debug)]
#[command(name = "tierckptd", version, about = "tierckpt node daemon: checkpoints in CPU memory")]
struct Args {
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// tmpfs directory of the memory tier [default: /dev/shm/tierckpt].
    #[arg(long)]
    memory_dir: Option<PathBuf>,
    /// Capacity of the memory tier: "32GB", "512MiB" or "auto" [default: auto].
    #[arg(long)]
    memory_tier_size: Option<String>,
    /// Complete steps kept per namespace [default: 3].
    #[arg(long)]
    keep_last: Option<usize>,
    /// Unix socket of the local API [default: <memory-dir>/daemon.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// host:port of the HTTP API, or "off" [default: 127.0.0.1:7750].
    #[arg(long)]
    http_addr: Option<String>,
    /// File holding the bearer token required by the HTTP API and peers.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// This node's id among --nodes.
    #[arg(long)]
    node_id: Option<String>,
    /// Every node of the cluster: "n0=127.0.0.1:7750,n1=127.0.0.1:7751".
    #[arg(long)]
    nodes: Option<String>,
    /// Copies of each shard on other nodes [default: 1].
    #[arg(long)]
    replication_factor: Option<usize>,
    /// "ring" or "group" [default: ring].
    #[arg(long)]
    placement: Option<String>,
    /// How often peers are probed [default: 500ms].
    #[arg(long)]
    heartbeat_interval: Option<String>,
    /// A peer silent this long is dead [default: 3s].
    #[arg(long)]
    heartbeat_timeout: Option<String>,
    /// Cap on replication traffic per second, e.g. "1GB" [default: none].
    #[arg(long)]
    replication_bandwidth: Option<String>,
    /// Compression of replicas on the wire, used where the link is measured to
    /// be slower than the codec: auto, off, lz4, zstd, zstd:N [default: auto:
    /// zstd:1 on 8 cores or more, else off].
    #[arg(long)]
    replication_compression: Option<String>,
    /// Send only the chunks that changed since a step the peer holds [default: true].
    #[arg(long)]
    replication_delta: Option<bool>,
    /// Drain checkpoints to file:///dir, s3://bucket/prefix, gs://... or az://...
    #[arg(long)]
    persistent_path: Option<String>,
    /// Persist every N-th complete checkpoint [default: 1].
    #[arg(long)]
    persist_every: Option<u64>,
    /// Also persist when this long has passed since the last one, e.g. "10m".
    #[arg(long)]
    persist_interval: Option<String>,
    /// Committed steps kept in the persistent tier [default: 3].
    #[arg(long)]
    persist_keep_last: Option<usize>,
    /// Also keep every step that is a multiple of this [default: 0, none].
    #[arg(long)]
    persist_keep_every: Option<u64>,
    /// Cap on upload bytes per second, e.g. "500MB" [default: none].
    #[arg(long)]
    persist_bandwidth: Option<String>,
    /// Compression of persisted shards: auto (zstd on 8+ cores, else off), off, lz4, zstd, zstd:N [default: auto].
    #[arg(long)]
    persist_compression: Option<String>,
    /// Persist only what changed since the rank's previous persisted step [default: true].
    #[arg(long)]
    persist_delta: Option<bool>,
    /// Store every N-th persisted shard of a rank whole [default: 8].
    #[arg(long)]
    persist_full_every: Option<u32>,
    /// Store options, e.g. "endpoint=http://127.0.0.1:9000,allow_http=true".
    #[arg(long)]
    persistent_options: Option<String>,
    /// Testing aid: inject store faults, e.g. "fail=0.3,delay=5ms,seed=1".
    #[arg(long, hide = true)]
    persistent_faults: Option<String>,
    /// Nice value (0-19) of the background work (replication, drain, checksums, HTTP) so it yields to training [default: 10].
    #[arg(long)]
    background_nice: Option<i32>,
    /// Mount a tmpfs with huge pages (huge=within_size) on the memory directory unless it is on one; needs root.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    mount_huge_tmpfs: Option<bool>,
}

fn config(args: Args) -> anyhow::Result<DaemonConfig> {
    let file = match &args.config {
        Some(p) => ConfigLayer::from_file(p)?,
        None => ConfigLayer::default(),
    };
    let env = ConfigLayer::from_env(std::env::vars())?;
    let flags = ConfigLayer {
        memory_dir: args.memory_dir,
        memory_tier_size: args.memory_tier_size,
        keep_last: args.keep_last,
        socket: args.socket,
        http_addr: args.http_addr,
        token_file: args.token_file,
        token: None,
        node_id: args.node_id,
        nodes: args.nodes.as_deref().map(tierckpt_daemon::config::parse_nodes).transpose()?,
        replication_factor: args.replication_factor,
        placement: args.placement,
        heartbeat_interval: args.heartbeat_interval,
        heartbeat_timeout: args.heartbeat_timeout,
        replication_bandwidth: args.replication_bandwidth,
        replication_compression: args.replication_compression,
        replication_delta: args.replication_delta,
        persistent_path: args.persistent_path,
        persist_every: args.persist_every,
        persist_interval: args.persist_interval,
        persist_keep_last: args.persist_keep_last,
        persist_keep_every: args.persist_keep_every,
        persist_bandwidth: args.persist_bandwidth,
        persist_compression: args.persist_compression,
        persist_delta: args.persist_delta,
        persist_full_every: args.persist_full_every,
        persistent_options: args
            .persistent_options
            .as_deref()
            .map(tierckpt_daemon::config::parse_options)
            .transpose()?,
        persistent_faults: args.persistent_faults,
        background_nice: args.background_nice,
        mount_huge_tmpfs: args.mount_huge_tmpfs,
    };
    Ok(DaemonConfig::resolve(file.merge(env).merge(flags))?)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tierckptd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TIERCKPT_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = config(Args::parse())?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let background = tierckpt_daemon::background_runtime(cfg.background_nice)?;
    let bg = background.handle().clone();
    let result = rt.block_on(async move {
        let running = Daemon::start_with_background(cfg, bg).await?;
        println!(
            "{}",
            serde_json::json!({
                "event": "ready",
                "pid": std::process::id(),
                "socket": running.socket,
                "http_addr": running.http_addr.map(|a| a.to_string()),
                "capacity": running.daemon.cfg.capacity,
            })
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
        running.shutdown().await;
        anyhow::Ok(())
    });
    background.shutdown_background();
    result
}
