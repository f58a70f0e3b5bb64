//! `tierckpt`: the command-line tool.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use tierckpt_cli::{bench, commands, demo, output::escape, simulate, soak, supervise};
use tierckpt_client::Client;

#[derive(Parser, Debug)]
#[command(name = "tierckpt", version, about = "Tiered checkpointing for large-model training")]
struct Cli {
    /// Socket of the node daemon [default: $TIERCKPT_SOCKET or /dev/shm/tierckpt/daemon.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print one JSON object instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum ExportFormat {
    Safetensors,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The daemon, its memory tier, and its namespaces.
    Status,
    /// Namespaces, or the steps of one namespace.
    Ls { namespace: Option<String> },
    /// Tensors, metadata and checksums of a step's shards.
    Inspect {
        namespace: String,
        /// Step, or the name of a pinned step [default: newest complete].
        #[arg(long)]
        step: Option<String>,
        #[arg(long)]
        rank: Option<u32>,
    },
    /// Verify the checksums of every shard (of one step, or all steps).
    Verify {
        namespace: String,
        #[arg(long)]
        step: Option<u64>,
    },
    /// Write a step's shards as safetensors files into DIR.
    Export {
        namespace: String,
        /// Step, or the name of a pinned step [default: newest complete].
        #[arg(long)]
        step: Option<String>,
        #[arg(long, value_enum, default_value = "safetensors")]
        format: ExportFormat,
        dir: PathBuf,
    },
    /// Delete one step, or a whole namespace.
    Rm {
        namespace: String,
        #[arg(long)]
        step: Option<u64>,
    },
    /// Keep a step from retention on every tier that holds it, optionally naming it.
    Pin {
        namespace: String,
        #[arg(long)]
        step: u64,
        /// A name for the step (A-Z a-z 0-9 . _ -, not all digits); moves from another step if taken.
        #[arg(long)]
        name: Option<String>,
    },
    /// Make a pinned step ordinary again.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["step", "name"])))]
    Unpin {
        namespace: String,
        #[arg(long)]
        step: Option<u64>,
        #[arg(long)]
        name: Option<String>,
    },
    /// Run a training command, restarting it when it fails or hangs.
    Run(supervise::RunArgs),
    /// The main job: train, crash, restore, and check the result bit for bit.
    Demo(demo::DemoArgs),
    /// Benchmarks with ratios against a floor measured in the same run.
    Bench(bench::BenchArgs),
    /// The demo's job on a local cluster under a seeded random schedule of faults, checked bit for bit.
    Soak(soak::SoakArgs),
    /// Goodput of a training job under failures, by strategy, simulated.
    Simulate(simulate::SimulateArgs),
    /// The demo's training process (started by `tierckpt demo`).
    #[command(hide = true)]
    DemoTrainer(demo::TrainerArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Cmd::Run(a) = &cli.cmd {
        return supervise::run(a, cli.socket.as_deref()).unwrap_or_else(|e| {
            eprintln!("error: {}", escape(&format!("{e:#}")));
            std::process::ExitCode::FAILURE
        });
    }
    match run(&cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", escape(&format!("{e:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let connect = || -> Result<Client> {
        Ok(match &cli.socket {
            Some(s) => Client::connect(s)?,
            None => Client::connect_default()?,
        })
    };
    let j = cli.json;
    match &cli.cmd {
        Cmd::Status => commands::status(&mut connect()?, j),
        Cmd::Ls { namespace } => commands::ls(&mut connect()?, namespace.as_deref(), j),
        Cmd::Inspect { namespace, step, rank } => {
            let c = &mut connect()?;
            let step = commands::resolve_step(c, namespace, step.as_deref())?;
            commands::inspect(c, namespace, step, *rank, j)
        }
        Cmd::Verify { namespace, step } => commands::verify(&mut connect()?, namespace, *step, j),
        Cmd::Export { namespace, step, format: ExportFormat::Safetensors, dir } => {
            let c = &mut connect()?;
            let step = commands::resolve_step(c, namespace, step.as_deref())?;
            commands::export(c, namespace, step, dir, j)
        }
        Cmd::Pin { namespace, step, name } => commands::pin(&mut connect()?, namespace, *step, name.as_deref(), j),
        Cmd::Unpin { namespace, step, name } => commands::unpin(&mut connect()?, namespace, *step, name.as_deref(), j),
        Cmd::Rm { namespace, step } => commands::rm(&mut connect()?, namespace, *step, j),
        Cmd::Demo(a) => demo::run(a, j),
        Cmd::Bench(a) => bench::run(a, j),
        Cmd::Soak(a) => soak::run(a, j),
        Cmd::Simulate(a) => simulate::run(a, j),
        Cmd::DemoTrainer(a) => demo::run_trainer(a),
        Cmd::Run(_) => unreachable!("handled in main"),
    }
}
