//! `tierckptd`: the node daemon. Settings come from `--config FILE`, then
//! `TIERCKPT_*` variables, then flags (see `tierckpt_daemon::config`). Prints one JSON line on stdout once it
//! serves (`{"event":"ready",...}`), and stops cleanly on SIGINT or SIGTERM (a cluster node first leaves the
//! cluster, handing its copies over).

use std::path::PathBuf;

use clap::Parser;
use tierckpt_daemon::config::LogFormat;
use tierckpt_daemon::{ConfigLayer, Daemon, DaemonConfig};

#[derive(Parser, Debug)]
#[command(name = "tierckptd", version, about = "tierckpt node daemon: checkpoints in CPU memory")]
struct Args {
    /// TOML config file; its keys are the flags' names with underscores (keep_last = 5).
    #[arg(long, env = "TIERCKPT_CONFIG")]
    config: Option<PathBuf>,
    /// Print the settings given (file, environment and flags merged; the token hidden) as TOML, check them, and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    settings: ConfigLayer,
}

/// The file's settings, overridden by the environment's and the flags' (clap
/// has already put flags over the environment).
fn settings(args: Args) -> anyhow::Result<ConfigLayer> {
    let file = match &args.config {
        Some(p) => ConfigLayer::from_file(p)?,
        None => ConfigLayer::default(),
    };
    Ok(file.merge(args.settings))
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

/// Logs to stderr, filtered by `TIERCKPT_LOG` (default info), as text or
/// JSON lines (`log_format`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIERCKPT_LOG").unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => fmt.json().with_ansi(false).with_current_span(false).init(),
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let print = args.print_config;
    let layer = settings(args)?;
    // Before anything logs: resolving the settings may warn.
    init_logging(layer.log_format()?);
    if !print {
        // Before resolving: the default cap on HTTP connections follows the limit.
        tierckpt_daemon::limits::raise_open_file_limit();
    }
    let cfg = DaemonConfig::resolve(layer.clone())?;
    if print {
        let shown = ConfigLayer { token: layer.token.as_ref().map(|_| "<hidden>".into()), ..layer };
        print!("{}", toml::to_string(&shown)?);
        return Ok(());
    }
    // A shard file truncated behind the daemon while it streams the file is refused by its reader's
    // checksums, instead of ending the daemon with SIGBUS.
    tierckpt_tiers::memory::tolerate_truncated_files();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let background = tierckpt_daemon::background_runtime(cfg.background_nice)?;
    let bg = background.handle().clone();
    let result = rt.block_on(async move {
        let running = Daemon::start_with_background(cfg, bg).await?;
        // Handlers first: whoever reads the ready line may signal at once.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        println!(
            "{}",
            serde_json::json!({
                "event": "ready",
                "pid": std::process::id(),
                "socket": running.socket,
                "http_addr": running.http_addr.map(|a| a.to_string()),
                "hyperpod_addr": running.hyperpod_addr.map(|a| a.to_string()),
                "capacity": running.daemon.cfg.capacity,
            })
        );
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
        running.leave_cluster().await;
        running.shutdown().await;
        anyhow::Ok(())
    });
    background.shutdown_background();
    result
}
