//! The trainer process (`tierckpt demo-trainer`): one rank of the job. It
//! builds its shard of the model, resumes from the step the launcher names,
//! trains a step on every `go`, and checkpoints into its node's daemon (or,
//! for the baseline, into files). Its side of the protocol with the
//! launcher: JSON events on stdout, orders on stdin, one per line.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tierckpt_client::{Client, ErrorKind};
use tierckpt_format::ShardKey;

use super::baseline::FileCheckpoints;
use super::model::{default_threads, model_rows, Shard, TrainState};
use super::TrainerArgs;

/// Tries of a restore from a peer before giving up.
const PEER_ATTEMPTS: u32 = 5;

/// One JSON object per line on stdout, flushed.
fn emit(v: Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}").and_then(|()| out.flush()).context("writing to the demo")
}

/// Parses the demo's `resume <step>` / `resume none`.
fn parse_resume(line: &str) -> Result<Option<u64>> {
    match line.strip_prefix("resume ") {
        Some("none") => Ok(None),
        Some(s) => Ok(Some(s.parse().with_context(|| format!("the demo said {line:?}"))?)),
        None => bail!("the demo said {line:?}, expected \"resume <step>\" or \"resume none\""),
    }
}

/// The launcher's orders, one line of stdin each.
fn stdin_orders() -> impl FnMut() -> Result<String> {
    let mut orders = std::io::stdin().lock().lines();
    move || match orders.next() {
        Some(line) => Ok(line.context("reading from the demo")?.trim().to_string()),
        None => bail!("the demo closed the trainer's stdin"),
    }
}

/// Runs one rank: builds its state, then trains and checkpoints into its
/// daemon or into files.
pub(super) fn run(a: &TrainerArgs) -> Result<()> {
    ensure!(a.checkpoint_every > 0, "--checkpoint-every must be at least 1");
    let threads = a.threads.unwrap_or_else(|| default_threads(a.world_size as usize)).max(1);
    let rows = model_rows(a.size)?;
    let shard = Shard::of(&rows, a.rank, a.world_size)?;
    let t0 = Instant::now();
    let state = TrainState::new(a.seed, &shard, threads);
    emit(json!({
        "event": "started",
        "pid": std::process::id(),
        "rank": a.rank,
        "params": state.params(),
        "state_bytes": state.state_bytes(),
        "init_s": t0.elapsed().as_secs_f64(),
    }))?;
    match (&a.daemon_socket, &a.checkpoint_dir) {
        (Some(socket), _) => run_daemon_trainer(a, state, Client::connect(socket)?, threads),
        (None, Some(dir)) => {
            let files = FileCheckpoints::new(dir, a.rank, a.world_size, a.keep_last, a.storage_bandwidth);
            run_file_trainer(a, state, files, threads)
        }
        (None, None) => bail!("give --daemon-socket or --checkpoint-dir"),
    }
}

/// The trainer with tierckpt: resumes through its node's daemon and
/// checkpoints into its memory tier.
fn run_daemon_trainer(a: &TrainerArgs, mut state: TrainState, mut client: Client, threads: usize) -> Result<()> {
    let (ns, rank) = (a.namespace.as_str(), a.rank);
    // The newest step complete across the cluster's live nodes.
    let latest = client.latest(ns).context("asking for the latest checkpoint")?;
    emit(json!({ "event": "latest", "step": latest }))?;
    let mut order = stdin_orders();
    if let Some(step) = parse_resume(&order()?)? {
        let mut resumed = restore_from_daemon(&mut client, &mut state, ns, step, rank)?;
        if a.state_hashes {
            resumed["state_hash"] = state.state_hash().into();
        }
        emit(resumed)?;
    }
    client.discard_incomplete_after(ns, state.step()).context("discarding leftovers of a crashed run")?;
    emit(json!({ "event": "ready", "step": state.step() }))?;
    let client = std::cell::RefCell::new(client);
    let save = |state: &TrainState, step: u64| {
        let key = ShardKey::new(ns, step, rank);
        let timing = state
            .with_checkpoint(|tensors, meta| client.borrow_mut().save(&key, a.world_size, tensors, meta, false))
            .with_context(|| format!("saving {key}"))?;
        Ok((timing.total_s(), timing.copy_s, timing.bytes))
    };
    // In-process recovery: another rank died; this process stays, rolls its
    // state back from its node's memory and drops what was saved after.
    let rollback = |state: &mut TrainState, step: u64| {
        let mut c = client.borrow_mut();
        let mut resumed = restore_from_daemon(&mut c, state, ns, step, rank)?;
        resumed["in_process"] = true.into();
        if a.state_hashes {
            resumed["state_hash"] = state.state_hash().into();
        }
        c.discard_incomplete_after(ns, step).context("discarding what was saved after the rollback step")?;
        Ok(resumed)
    };
    train(a, &mut state, threads, &mut order, save, Some(rollback))
}

/// Where the daemon will find a shard it is asked for, seen before asking.
struct Whereabouts {
    /// In this node's memory tier.
    local: bool,
    /// The live peers holding it, in this node's view of the cluster.
    peers: Vec<String>,
    /// Shards this node had fetched from peers so far.
    fetched_before: Option<u64>,
    /// The tier this view points to: memory, peer or persistent.
    expected: &'static str,
}

impl Whereabouts {
    fn of(client: &mut Client, ns: &str, step: u64, rank: u32) -> Result<Self> {
        // `steps` lists only this node's shards: is ours here, or does the
        // daemon have to fetch it, from a live peer or the persistent tier?
        let local = client
            .steps(ns)
            .context("listing this node's checkpoints")?
            .iter()
            .any(|s| s.step == step && s.ranks.contains(&rank));
        let status = client.status().ok();
        let cluster = status.as_ref().and_then(|s| s.cluster.as_ref());
        let peers: Vec<String> = cluster
            .and_then(|c| {
                let s = c.namespaces.get(ns)?.iter().find(|s| s.step == step)?;
                Some(s.holders.get(&rank)?.iter().filter(|h| **h != c.node_id).cloned().collect())
            })
            .unwrap_or_default();
        let fetched_before = cluster.map(|c| c.replication.shards_fetched);
        let expected = if local {
            "memory"
        } else if !peers.is_empty() {
            "peer"
        } else {
            "persistent"
        };
        Ok(Self { local, peers, fetched_before, expected })
    }

    /// Where the daemon found it: a fetch from a peer is counted (also when
    /// the local copy was found corrupt and dropped); a shard this node did
    /// not hold and no peer sent came from the persistent tier.
    fn found_in(&self, client: &mut Client) -> &'static str {
        let fetched_after = client.status().ok().and_then(|s| s.cluster).map(|c| c.replication.shards_fetched);
        match (self.fetched_before, fetched_after) {
            (Some(b), Some(a)) if a > b => "peer",
            _ if self.local => "memory",
            (Some(_), Some(_)) => "persistent",
            // No counters to tell by: trust the view taken before.
            _ => self.expected,
        }
    }
}

/// Restores this rank's shard of `step` through the daemon; returns the
/// `resumed` event.
fn restore_from_daemon(client: &mut Client, state: &mut TrainState, ns: &str, step: u64, rank: u32) -> Result<Value> {
    let key = ShardKey::new(ns, step, rank);
    let seen = Whereabouts::of(client, ns, step, rank)?;
    let t = Instant::now();
    let mut attempts = 0;
    state
        .restore_with(|targets| loop {
            attempts += 1;
            match client.load_into(&key, targets) {
                Ok((_, view)) => return Ok(view.metadata),
                // The daemon's view of its peers comes from its last
                // probe of them; one probe answered late hides a holder.
                Err(e)
                    if !seen.local
                        && attempts < PEER_ATTEMPTS
                        && matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Unavailable) =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e.into()),
            }
        })
        .with_context(|| format!("restoring {key}"))?;
    let restore_s = t.elapsed().as_secs_f64();
    ensure!(state.step() == step, "restored step {} for {key}", state.step());
    let tier = seen.found_in(client);
    Ok(json!({
        "event": "resumed",
        "step": step,
        "restore_s": restore_s,
        "bytes": state.state_bytes(),
        "tier": tier,
        "expected_tier": seen.expected,
        "peers": if tier == "peer" { seen.peers } else { Vec::new() },
        "attempts": attempts,
    }))
}

/// The baseline's trainer: checkpoints to files, synchronously, and resumes
/// from the newest step every rank's file is there for.
fn run_file_trainer(a: &TrainerArgs, mut state: TrainState, files: FileCheckpoints, threads: usize) -> Result<()> {
    let latest = files.latest()?;
    emit(json!({ "event": "latest", "step": latest }))?;
    let mut order = stdin_orders();
    if let Some(step) = parse_resume(&order()?)? {
        let t = Instant::now();
        state.restore_with(|targets| files.load_into(step, targets))?;
        ensure!(state.step() == step, "restored step {} from the files of step {step}", state.step());
        emit(json!({
            "event": "resumed",
            "step": step,
            "restore_s": t.elapsed().as_secs_f64(),
            "bytes": state.state_bytes(),
            "tier": "persistent",
            "expected_tier": "persistent",
            "peers": [],
            "attempts": 1,
        }))?;
    }
    emit(json!({ "event": "ready", "step": state.step() }))?;
    let save = |state: &TrainState, step: u64| {
        let t = Instant::now();
        let bytes = state
            .with_checkpoint(|tensors, meta| files.save(step, tensors, meta))
            .with_context(|| format!("saving step {step} of rank {} to files", a.rank))?;
        let s = t.elapsed().as_secs_f64();
        Ok((s, s, bytes))
    };
    // The baseline restarts every rank: it has no in-process rollback.
    train(a, &mut state, threads, &mut order, save, None::<fn(&mut TrainState, u64) -> Result<Value>>)
}

/// The training loop shared by both kinds of trainer: a step on each "go",
/// a checkpoint (by `save`, returning stall, copy time and bytes) every
/// `checkpoint_every` steps and after a "go save", and on "rollback <step>"
/// (where `rollback` is given) the state of that step again, restored in
/// this process.
fn train(
    a: &TrainerArgs,
    state: &mut TrainState,
    threads: usize,
    order: &mut impl FnMut() -> Result<String>,
    mut save: impl FnMut(&TrainState, u64) -> Result<(f64, f64, u64)>,
    mut rollback: Option<impl FnMut(&mut TrainState, u64) -> Result<Value>>,
) -> Result<()> {
    while state.step() < a.steps {
        let o = order()?;
        if let (Some(step), Some(roll)) = (o.strip_prefix("rollback "), rollback.as_mut()) {
            let step = step.parse().with_context(|| format!("the demo said {o:?}"))?;
            emit(roll(state, step)?)?;
            emit(json!({ "event": "ready", "step": state.step() }))?;
            continue;
        }
        // "go save": the launcher asks for a checkpoint of this step too (a preemption's early checkpoint).
        ensure!(o == "go" || o == "go save", "the demo said {o:?}, expected \"go\" or \"go save\"");
        let t = Instant::now();
        let loss = state.train_step(threads);
        // The accelerator's share of the step: the host's cores are free meanwhile.
        std::thread::sleep(Duration::from_millis(a.compute_ms));
        let step_s = t.elapsed().as_secs_f64();
        let step = state.step();
        if step % a.checkpoint_every == 0 || o == "go save" {
            let (stall_s, copy_s, bytes) = save(state, step)?;
            emit(json!({
                "event": "checkpoint",
                "step": step,
                "stall_s": stall_s,
                "copy_s": copy_s,
                "bytes": bytes,
            }))?;
        }
        emit(json!({
            "event": "step",
            "step": step,
            "loss": loss,
            "params": state.params(),
            "step_s": step_s,
        }))?;
    }
    emit(json!({ "event": "done", "step": state.step(), "state_hash": state.state_hash() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_orders() {
        assert_eq!(parse_resume("resume 40").unwrap(), Some(40));
        assert_eq!(parse_resume("resume none").unwrap(), None);
        assert!(parse_resume("go").is_err());
        assert!(parse_resume("resume soon").is_err());
    }
}
