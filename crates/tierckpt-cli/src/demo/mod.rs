//! `tierckpt demo`: the main job, on a local cluster.
//!
//! It starts a cluster of N node daemons (`tierckptd`, default 4) on
//! 127.0.0.1, each with a fresh memory tier under `/dev/shm`, replicating
//! every sealed shard to k=1 peer (ring: node i -> i+1), and draining every
//! complete checkpoint (`--persist-every`) to a persistent tier shared by all
//! nodes: a `file://` directory beside the memory tiers. Then it runs a job
//! of N training processes (`tierckpt demo-trainer`, this same executable),
//! rank r talking to node r's daemon. Each rank owns one shard of the model,
//! as in ZeRO: a 1/N slice of the weights and of Adam's two moments
//! (`--size` is the total across ranks), and checkpoints it every K steps.
//!
//! The demo runs the job once uninterrupted for a reference, then again with
//! three failures, each between two checkpoints (so work is lost and redone),
//! recovering in-process where it can:
//!
//! 1. **trainer crash**: one rank's trainer is SIGKILLed; only that rank's
//!    trainer starts again and restores from its node's memory tier, while
//!    the other ranks, still running, roll back to the same checkpoint in
//!    their own processes (`rollback <step>`, no new process, no model
//!    construction).
//! 2. **node loss**: node 2's daemon and its trainer are SIGKILLed together,
//!    and an empty daemon with the same node id and address takes the lost
//!    node's place. Rank 2's new trainer restores from the peer that holds
//!    its replica; the other ranks roll back in place.
//! 3. **total memory loss**: once the newest checkpoint is committed in the
//!    persistent tier (the demo waits for it, and reports the wait), every
//!    daemon and every trainer is SIGKILLed, every node's memory tier wiped,
//!    and empty daemons start in their place. The job restarts; every rank's
//!    shard comes from the persistent tier.
//!
//! Then it runs the same failures again with full restarts (every rank's
//! trainer killed and started again at each, as job launchers do), for
//! comparison. At the end it compares each run's final state with the
//! reference bit for bit (the xxh3-128 of the ranks' state hashes in rank
//! order).
//!
//! The workload is deterministic: the gradient of step t is a function of the
//! weights, of a data batch picked by a shuffling data loader, and of noise
//! seeded from an RNG whose state, like the loader's, travels in every
//! shard. Every rank runs the same RNG and loader and updates its own slice
//! of the flat parameter vector by global index, so the N-rank job computes
//! exactly what one process holding the whole model would. A resumed run is
//! identical to an uninterrupted one only if every piece of that state was
//! saved and restored exactly.
//!
//! The ranks run in lockstep, as data-parallel ranks do (a collective per
//! step): the demo is their launcher and their barrier. Each trainer talks to
//! it over its stdin and stdout, one line per message:
//!
//! - trainer -> demo (JSON): `started`, `latest` (the newest complete step
//!   its daemon knows of: in memory on a live node, or committed in the
//!   persistent tier), `resumed` (step, tier, restore time), `ready`,
//!   `checkpoint`, `step`, `done` (state hash).
//! - demo -> trainer: `resume <step>` or `resume none` once every rank said
//!   `latest` (the newest step any rank saw complete, so that all ranks
//!   resume from the same step, as rank 0's broadcast does in a real job),
//!   then `go` before every step, once every rank finished the previous one.
//!
//! The modules: `plan` (what the demo will do), `model` (the workload and
//! its checkpoint), `trainer` (the trainer process), `job` and `lockstep`
//! (the launcher: its processes and its side of the protocol), `run_log`
//! (what it records), `cluster` and `traffic` (the local cluster, and what
//! its daemons are asked), `failures` (the run through the failures),
//! `baseline` (the same job checkpointing to files), `report` and `ui` (what
//! people and programs are told).

// `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tierckpt_harness::daemon::LocalCluster;
use tierckpt_harness::size::{parse_rate, parse_size, Rate};

use self::baseline::run_baseline;
use self::cluster::{delete_everywhere, wait_replicated, Dirs};
use self::failures::{run_with_failures, Recovery};
use self::job::{Job, Store};
use self::lockstep::{drive, Begin};
use self::model::combined_hash;
use self::plan::Plan;
use self::report::Report;
use self::run_log::RunLog;
use self::ui::Ui;

mod baseline;
pub(crate) mod cluster;
mod failures;
pub(crate) mod job;
pub(crate) mod lockstep;
pub(crate) mod model;
mod plan;
mod preemption;
mod report;
pub(crate) mod run_log;
mod traffic;
mod trainer;
pub(crate) mod ui;

/// Copies of each shard on peers.
const REPLICATION_FACTOR: usize = 1;
const PLACEMENT: &str = "ring";

/// The flags of `tierckpt demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Training state to checkpoint, across all ranks: weights plus Adam's two moments, all f32 ("300MB", "1GiB").
    #[arg(long, default_value = "300MB", value_parser = parse_size)]
    pub size: u64,
    /// Nodes of the local cluster (one daemon each); the job has one rank per node.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Training steps.
    #[arg(long, default_value_t = 60)]
    pub steps: u64,
    /// Checkpoint every K steps.
    #[arg(long, value_name = "K", default_value_t = 10)]
    pub checkpoint_every: u64,
    /// Seed of the workload; it also picks the steps after which the failures strike and the rank that crashes.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Crash a trainer after this step instead of one picked from the seed.
    #[arg(long, value_name = "STEP")]
    pub kill_at_step: Option<u64>,
    /// Lose node 2 (daemon and trainer) after this step instead of one picked from the seed.
    #[arg(long, value_name = "STEP")]
    pub node_loss_at_step: Option<u64>,
    /// Lose every node's memory (every daemon and trainer) after this step instead of one picked from the seed.
    #[arg(long, value_name = "STEP")]
    pub total_loss_at_step: Option<u64>,
    /// Complete checkpoints each memory tier keeps (and the persistent tier too).
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    /// Drain every Nth complete checkpoint to the persistent tier.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub persist_every: u64,
    /// Threads of each trainer's optimizer step [default: the cores shared among the ranks].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Directory (a tmpfs) in which the demo's memory tiers are created and removed.
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    pub tmp_dir: PathBuf,
    /// Directory (a disk) in which the persistent tier and the baseline's checkpoint files are created and removed [default: the system's temporary directory].
    #[arg(long, value_name = "DIR")]
    pub persist_dir: Option<PathBuf>,
    /// Milliseconds of each training step standing for the forward and backward pass on an accelerator (the host's cores are idle meanwhile).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub compute_ms: u64,
    /// Write rate of the persistent storage per node, per second ("off": as fast as the local disk goes). It paces the drain to the persistent tier and the baseline's checkpoint writes alike. The default is what torch.save reached on an H100 node's local disk (8 GiB in 10.3 s).
    #[arg(long, value_name = "RATE", default_value = "800MB", value_parser = parse_rate)]
    pub storage_bandwidth: Rate,
    /// Whether the trainers report the hash of the state they restored (`tierckpt soak` checks it).
    #[arg(skip)]
    pub state_hashes: bool,
}

/// The flags of `tierckpt demo-trainer`, the demo's training process (one rank).
#[derive(clap::Args, Debug, Clone)]
pub struct TrainerArgs {
    /// Socket of the daemon to checkpoint into.
    #[arg(long, required_unless_present = "checkpoint_dir", conflicts_with = "checkpoint_dir")]
    pub daemon_socket: Option<PathBuf>,
    /// Checkpoint synchronously to files in this directory instead (the baseline).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Complete checkpoints kept in --checkpoint-dir.
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    /// Milliseconds each step waits, standing for the accelerator's forward and backward pass.
    #[arg(long, default_value_t = 0)]
    pub compute_ms: u64,
    /// Write rate of the storage behind --checkpoint-dir, bytes per second.
    #[arg(long)]
    pub storage_bandwidth: Option<u64>,
    /// Namespace of the checkpoints.
    #[arg(long)]
    pub namespace: String,
    /// Bytes of training state (weights + two moments) across all ranks.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Training steps.
    #[arg(long)]
    pub steps: u64,
    /// Checkpoint every K steps.
    #[arg(long)]
    pub checkpoint_every: u64,
    /// Seed of the workload (every rank the same).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// This process's rank.
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    /// Ranks of the job.
    #[arg(long, default_value_t = 1)]
    pub world_size: u32,
    /// Threads of the optimizer step [default: the cores shared among the ranks].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Report the hash of the restored state in the `resumed` event.
    #[arg(long)]
    pub state_hashes: bool,
}

/// Runs one rank of the demo's job (`tierckpt demo-trainer`), talking to
/// the demo over stdin and stdout.
pub fn run_trainer(a: &TrainerArgs) -> Result<()> {
    trainer::run(a)
}

/// Runs the demo (`tierckpt demo`): the reference run, the run through three
/// failures, the baseline, and the report (JSON with `json`); fails if a
/// run's final state differs from the reference's.
pub fn run(a: &DemoArgs, json: bool) -> Result<()> {
    let wall = Instant::now();
    let plan = Plan::new(a)?;
    // Ctrl-C or SIGTERM end the demo through its normal error path, so the
    // children are killed and the memory tiers removed.
    crate::signals::catch_int_term();
    let dirs = Dirs::create(a)?;
    let mut opts = cluster::options(a, plan.world, plan.capacity, &dirs.persist_url);
    cluster::with_notices(&mut opts, dirs.memory.path());
    let mut cluster = LocalCluster::start(dirs.memory.path(), opts).context("starting the cluster's daemons")?;
    let store = Store::Daemons((0..plan.world).map(|i| cluster.socket(i)).collect());
    let ui = Ui { json };
    ui.line(plan.describe(a, &cluster, &dirs.persist_url));

    // 1. The reference: the same job, never interrupted.
    let reference = run_reference(a, &plan, &cluster, &store, &ui)?;
    // 2. The same job, with three failures, recovering in-process where it can.
    let tiered = run_with_failures(a, &plan, &mut cluster, &store, &dirs.persist_dir, &ui, Recovery::InProcess)?;
    // Its memory goes back to the pools for the next run (the persistent tier keeps its steps).
    delete_everywhere(&cluster, Recovery::InProcess.namespace()).context("deleting the first run's checkpoints")?;
    // 3. Again, restarting every rank at each failure, for comparison.
    let restart = run_with_failures(a, &plan, &mut cluster, &store, &dirs.persist_dir, &ui, Recovery::FullRestart)?;
    // 4. A preemption announced by a notice, with and without the early checkpoint.
    let preempted = preemption::run(a, &plan, &mut cluster, &store, &ui)?;
    drop(cluster);
    dirs.memory.close().context("removing the demo's memory tiers")?;
    // 3. The baseline: the same job and failures, checkpointing to files only.
    let base = run_baseline(a, &plan, &dirs.baseline_dir, &ui)?;
    dirs.disk.close().context("removing the demo's persistent tier and baseline files")?;

    let report = Report::new(a, &plan, &dirs.persist_url, reference, (tiered, restart, preempted), base, wall)?;
    report.print(json);
    report.check()
}

/// What the reference run measured.
struct Reference {
    log: RunLog,
    /// The job's final state hash.
    hash: String,
    wall_s: f64,
}

/// The reference run: the job on the cluster, never interrupted. Its
/// checkpoints are deleted afterwards.
fn run_reference(a: &DemoArgs, plan: &Plan, cluster: &LocalCluster, store: &Store, ui: &Ui) -> Result<Reference> {
    let ns = "demo-reference";
    ui.line("[1/5] reference run, uninterrupted");
    let mut log = RunLog::new("node memory");
    let t = Instant::now();
    let pb = ui.bar(a.steps, "reference");
    let mut job = Job::spawn(store, ns, a, plan.threads)?;
    let hashes = drive(&mut job, a.steps, ui, &pb, &mut log, None, Begin::Start)?.1.into_hashes();
    drop(job);
    let hash = combined_hash(&hashes);
    let wall_s = t.elapsed().as_secs_f64();
    pb.finish_and_clear();
    ui.line(format!("    done in {wall_s:.1} s, final state xxh3-128 {hash}\n"));
    // Its segments go back to the daemons' pools, for the next run to
    // reuse; first let replication finish, so no copy lands after the delete.
    // (What the reference left in the persistent tier stays there, under
    // its own namespace.)
    if let Some(s) = log.last_checkpoint() {
        wait_replicated(cluster, 0, ns, s, plan.world, REPLICATION_FACTOR + 1, Duration::from_secs(30))?;
    }
    delete_everywhere(cluster, ns).context("deleting the reference run's checkpoints")?;
    Ok(Reference { log, hash, wall_s })
}

/// Fails once Ctrl-C or SIGTERM arrived.
pub(crate) fn check_interrupt() -> Result<()> {
    if crate::signals::received() != 0 {
        bail!("interrupted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoArgs,
    }

    #[test]
    fn sizes_and_rates_on_the_command_line() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["demo"], args].concat()).map(|c| c.demo);
        let d = parse(&[]).unwrap();
        assert_eq!((d.size, d.storage_bandwidth), (300_000_000, Rate(Some(800_000_000))));
        let d = parse(&["--size", "512MiB", "--storage-bandwidth", "off"]).unwrap();
        assert_eq!((d.size, d.storage_bandwidth), (512 << 20, Rate(None)));
        assert_eq!(parse(&["--size", "1.5GB"]).unwrap().size, 1_500_000_000);
        assert_eq!(parse(&["--size", "16MB"]).unwrap().size, 16_000_000);
        assert!(parse(&["--size", "lots"]).is_err());
        assert!(parse(&["--storage-bandwidth", "3 parsecs"]).is_err());
    }
}
