//! `tierckpt bench`: benchmarks that report ratios against a floor measured
//! in the same run (see docs/BENCHMARKS.md). One module per benchmark; what
//! they share is the training state they save ([`state`]), the floors
//! ([`floor`]) and what they read from their daemons ([`observe`]).

pub mod memory;
pub mod persist;
pub mod reduce;
pub mod replicate;
pub mod tcp_sink;

pub(crate) mod floor;
pub(crate) mod observe;
pub(crate) mod state;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::output;

/// Benchmarks with ratios against a floor measured in the same run.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    /// Which benchmark.
    pub cmd: BenchCmd,
}

/// The benchmarks.
#[derive(Subcommand, Debug, Clone)]
pub enum BenchCmd {
    /// Save into and restore from the local memory tier, against a
    /// one-thread memcpy of the same bytes.
    Memory(memory::MemoryArgs),
    /// Replication of a shard to a peer's memory and restore from the peer
    /// (a two-node cluster), against a plain TCP copy of the same bytes.
    Replicate(replicate::ReplicateArgs),
    /// Drain of a shard to the persistent tier (file:// or s3://), against
    /// a raw write + fsync or a boto3 upload of the same bytes.
    Persist(persist::PersistArgs),
    /// Bytes replicated and persisted with compression and deltas, on three
    /// workloads made in the run, against the full size; codec speed against
    /// a memcpy of the same bytes.
    Reduce(reduce::ReduceArgs),
    /// The receiving end of `bench replicate`'s TCP floor.
    #[command(hide = true)]
    TcpSink(tcp_sink::TcpSinkArgs),
}

/// Runs a benchmark and prints its report (one JSON object with `json`,
/// else tables).
pub fn run(args: &BenchArgs, json: bool) -> Result<()> {
    match &args.cmd {
        BenchCmd::Memory(a) => output::emit(&memory::measure(a)?, json, memory::print),
        BenchCmd::Replicate(a) => output::emit(&replicate::measure(a)?, json, replicate::print),
        BenchCmd::Persist(a) => output::emit(&persist::measure(a)?, json, persist::print),
        BenchCmd::Reduce(a) => output::emit(&reduce::measure(a)?, json, reduce::print),
        BenchCmd::TcpSink(a) => tcp_sink::run(a)?,
    }
    Ok(())
}
