//! The demo's preemption with a notice. A node is told it will be reclaimed
//! (a notice file its daemon polls, the form a cloud's spot notice takes);
//! the launcher sees it in the daemon's advice, has every rank checkpoint
//! the next step, waits until that step has its copies on peers, and the
//! node is then reclaimed: the job resumes from that very step. The same
//! preemption again without the early checkpoint: the job trains on until
//! the node is reclaimed at the end of the grace period and resumes from
//! the last periodic checkpoint. The report gives the steps lost each way.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tierckpt_client::Client;
use tierckpt_harness::daemon::LocalCluster;

use super::cluster::{delete_everywhere, notice_path, wait_replicated};
use super::job::{Job, Store};
use super::lockstep::{drive, Begin, Outcome};
use super::plan::Plan;
use super::run_log::RunLog;
use super::ui::{fmt_s, Ui};
use super::{DemoArgs, REPLICATION_FACTOR};

/// Steps the job trains between the notice and the node's reclaim when it
/// ignores the notice (the grace period, in steps).
pub(super) const GRACE_STEPS: u64 = 2;
/// How often the demo's daemons look at their notice file.
pub(super) const NOTICE_EVERY: &str = "50ms";

/// What one run of the preemption measured.
struct Reclaimed {
    /// The step after which the node was reclaimed, and the step resumed from.
    reclaimed_after: u64,
    resumed_from: Option<u64>,
    /// From the notice to the daemon's advice naming it, and to the early checkpoint safe on peers.
    advice_s: f64,
    safe_s: Option<f64>,
}

/// The step after which the notice comes: halfway between two periodic checkpoints.
pub(super) fn notice_step(a: &DemoArgs) -> u64 {
    a.checkpoint_every + a.checkpoint_every / 2
}

/// Runs the preemption with and without the early checkpoint on `cluster`;
/// returns its record for the report and a line for the table.
pub(super) fn run(a: &DemoArgs, plan: &Plan, cluster: &mut LocalCluster, store: &Store, ui: &Ui) -> Result<Value> {
    let node = plan.lost;
    let at = notice_step(a);
    ensure!(at + GRACE_STEPS < a.steps, "--steps {} leaves no room for the preemption after step {at}", a.steps);
    ui.line(format!(
        "[4/5] a preemption announced by a notice to {} after step {at} (the node is reclaimed {GRACE_STEPS} steps \
         later): with the early checkpoint, then without it",
        LocalCluster::node_id(node)
    ));
    let early = once(a, plan, cluster, store, ui, true)?;
    let late = once(a, plan, cluster, store, ui, false)?;
    let lost = |o: &Reclaimed| o.reclaimed_after - o.resumed_from.unwrap_or(0);
    let (with, without) = (lost(&early), lost(&late));
    ui.line(format!(
        "    steps lost: {with} with the early checkpoint (notice to a safe checkpoint in {}), {without} without it\n",
        early.safe_s.map_or("-".into(), fmt_s)
    ));
    Ok(json!({
        "node": LocalCluster::node_id(node),
        "notice_after_step": at,
        "grace_steps": GRACE_STEPS,
        "with_early_checkpoint": {
            "checkpoint_step": at + 1,
            "reclaimed_after_step": early.reclaimed_after,
            "resumed_from": early.resumed_from,
            "steps_lost": with,
            "notice_to_advice_s": early.advice_s,
            "notice_to_safe_s": early.safe_s,
        },
        "without_early_checkpoint": {
            "reclaimed_after_step": late.reclaimed_after,
            "resumed_from": late.resumed_from,
            "steps_lost": without,
            "notice_to_advice_s": late.advice_s,
        },
    }))
}

fn once(
    a: &DemoArgs,
    plan: &Plan,
    cluster: &mut LocalCluster,
    store: &Store,
    ui: &Ui,
    early: bool,
) -> Result<Reclaimed> {
    let ns = if early { "demo-preempt" } else { "demo-preempt-ignored" };
    let (node, at) = (plan.lost, notice_step(a));
    let mut log = RunLog::new("node memory");
    let pb = ui.bar(a.steps, if early { "preemption" } else { "preemption, notice ignored" });
    let mut job = Job::spawn(store, ns, a, plan.threads)?;
    let (_, out) = drive(&mut job, a.steps, ui, &pb, &mut log, Some(at), Begin::Start)?;
    ensure!(matches!(out, Outcome::Stopped), "the job finished before the notice");

    let notice = notice_path(&cluster.base, node);
    std::fs::write(&notice, "spot instance reclaimed in 2 steps (the demo)\n")
        .with_context(|| format!("writing the notice {}", notice.display()))?;
    let t_notice = Instant::now();
    let advice_s = wait_for_notice(cluster, node, ns)?;
    let (reclaimed_after, safe_s) = if early {
        let (_, out) = drive(&mut job, a.steps, ui, &pb, &mut log, Some(at + 1), Begin::Stopped { checkpoint: true })?;
        ensure!(matches!(out, Outcome::Stopped), "the job finished before its early checkpoint");
        let watcher = (node + 1) % plan.world;
        wait_replicated(cluster, watcher, ns, at + 1, plan.world, REPLICATION_FACTOR + 1, Duration::from_secs(30))?;
        (at + 1, Some(t_notice.elapsed().as_secs_f64()))
    } else {
        let stop = Some(at + GRACE_STEPS);
        let (_, out) = drive(&mut job, a.steps, ui, &pb, &mut log, stop, Begin::Stopped { checkpoint: false })?;
        ensure!(matches!(out, Outcome::Stopped), "the job finished before the reclaim");
        (at + GRACE_STEPS, None)
    };
    // The node is reclaimed: its daemon and trainer go, an empty node takes its place; the job stops.
    cluster.kill(node)?;
    job.kill_all()?;
    drop(job);
    std::fs::remove_file(&notice).with_context(|| format!("removing {}", notice.display()))?;
    cluster.replace_empty(node).context("starting an empty node in the reclaimed one's place")?;
    ui.say(
        &pb,
        format!(
            "    reclaimed   {} after step {reclaimed_after}{}",
            LocalCluster::node_id(node),
            match safe_s {
                Some(s) => format!("; step {} was saved and copied to a peer {} after the notice", at + 1, fmt_s(s)),
                None => "; the notice was ignored".to_string(),
            }
        ),
    );
    let mut job = Job::spawn(store, ns, a, plan.threads)?;
    let (inc, out) = drive(&mut job, a.steps, ui, &pb, &mut log, Some(reclaimed_after + 1), Begin::Start)?;
    ensure!(matches!(out, Outcome::Stopped), "the job finished before it was stopped after the preemption");
    job.kill_all()?;
    drop(job);
    pb.finish_and_clear();
    // Copies still on their way would land after the delete.
    if let Some(s) = log.last_checkpoint() {
        wait_replicated(cluster, 0, ns, s, plan.world, REPLICATION_FACTOR + 1, Duration::from_secs(30))?;
    }
    delete_everywhere(cluster, ns).context("deleting the preemption run's checkpoints")?;
    Ok(Reclaimed { reclaimed_after, resumed_from: inc.resume, advice_s, safe_s })
}

/// Waits until node `i`'s daemon advises a checkpoint for a preemption;
/// returns how long that took.
fn wait_for_notice(cluster: &LocalCluster, i: usize, ns: &str) -> Result<f64> {
    let t = Instant::now();
    let mut client = Client::connect(cluster.socket(i)).context("connecting to the notified node's daemon")?;
    while t.elapsed() < Duration::from_secs(10) {
        super::check_interrupt()?;
        if client.advice(ns).context("asking the daemon's advice")?.preemption.is_some() {
            return Ok(t.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("{}'s daemon did not see its preemption notice within 10 s", LocalCluster::node_id(i))
}
