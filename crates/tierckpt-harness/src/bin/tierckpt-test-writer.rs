//! `tierckpt-test-writer`: writes one shard through the zero-copy path,
//! pausing at the phase asked for, so that crash tests can SIGKILL a real
//! client process at that moment. A testing aid only.

use clap::Parser;
use tierckpt_client::Client;
use tierckpt_harness::writer::{run_writer, WriterArgs};

#[derive(Parser, Debug)]
struct Args {
    /// Socket of the node daemon.
    #[arg(long)]
    socket: std::path::PathBuf,
    #[command(flatten)]
    writer: WriterArgs,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    run_writer(&a.writer, Client::connect(&a.socket)?)
}
