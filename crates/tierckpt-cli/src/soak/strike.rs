//! The soak's faults, struck at the cluster and the job: what each does,
//! and the step the job must still resume from (or after) once it is back.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tierckpt_harness::daemon::LocalCluster;
use tierckpt_harness::rng::mix;

use super::oracle::{holdings, shard_with_another_copy, survives};
use super::schedule::{Fault, Kind};
use super::{Soak, Struck, NS};
use crate::demo::cluster::committed_steps;
use crate::demo::job::Job;

/// How long a damage fault waits for the newest step to have another copy.
const DAMAGE_WAIT: Duration = Duration::from_secs(2);

impl Soak {
    /// Strikes `fault`. A fault that kills trainers leaves `job` empty (the
    /// launcher restarts it); a stopped daemon leaves it running.
    pub(super) fn strike(&mut self, fault: &Fault, job: &mut Option<Job>) -> Result<Struck> {
        let node = fault.node;
        let id = LocalCluster::node_id(node);
        let world = self.cluster.nodes.len();
        let mut at = Instant::now();
        let (must_keep, what) = match fault.kind {
            Kind::TrainerKill => {
                kill_job(job, Some(node))?;
                (self.newest_saved, format!("rank {node}'s trainer SIGKILLed; the job restarts"))
            }
            Kind::DaemonKill => {
                self.cluster.restart(node).with_context(|| format!("restarting node {id}"))?;
                kill_job(job, None)?;
                (self.newest_saved, format!("{id}'s daemon SIGKILLed and restarted on its memory; the job restarts"))
            }
            Kind::DaemonStop => {
                let pid = self.cluster.node(node).pid() as i32;
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                let stop_for = self.stop_for;
                self.cont = Some(std::thread::spawn(move || {
                    std::thread::sleep(stop_for);
                    // SAFETY: as above; the child is reaped only by the cluster, after this thread is joined.
                    unsafe { libc::kill(pid, libc::SIGCONT) };
                }));
                // Nothing to recover: the job goes on.
                self.report.struck(fault);
                return Ok(Struck {
                    fault: fault.clone(),
                    at,
                    must_keep: None,
                    what: format!("{id}'s daemon SIGSTOPped for {:?}, then SIGCONT; the job goes on", self.stop_for),
                });
            }
            Kind::NodeLoss => {
                let held = holdings(&self.cluster, NS)?;
                let keep = survives(&held, &[node], world, &self.persist_dir, NS);
                self.cluster.kill(node)?;
                kill_job(job, Some(node))?;
                self.cluster.replace_empty(node).with_context(|| format!("replacing node {id}"))?;
                (keep, format!("{id} lost (daemon and trainer SIGKILLed, memory wiped), replaced by an empty node"))
            }
            Kind::TotalLoss => {
                let keep = committed_steps(&self.persist_dir, NS).last().copied();
                for i in 0..world {
                    self.cluster.kill(i)?;
                }
                kill_job(job, None)?;
                self.cluster.replace_all_empty().context("replacing every node")?;
                (
                    keep,
                    format!(
                        "every node's memory lost ({world} daemons and trainers SIGKILLed), replaced by empty nodes"
                    ),
                )
            }
            Kind::FlipByte | Kind::Truncate | Kind::RemoveFile => {
                let target = self.damage_target(node)?;
                // The recovery counts from the damage, not from the wait for a copy.
                at = Instant::now();
                let damaged = match target {
                    Some(step) => damage(fault.kind, &self.shard_file(node, step), mix(fault.step ^ node as u64))?,
                    None => false,
                };
                let what = match target {
                    Some(step) if damaged => {
                        format!("{} in {id}'s copy of step {step} rank {node}; the job restarts", fault.kind)
                    }
                    _ => {
                        self.report.skipped(fault);
                        format!("{}: no shard of {id} had another copy, nothing damaged; the job restarts", fault.kind)
                    }
                };
                kill_job(job, None)?;
                (self.newest_saved, what)
            }
        };
        self.report.struck(fault);
        Ok(Struck { fault: fault.clone(), at, must_keep, what })
    }

    /// The shard of node `node`'s own rank to damage: that of the newest
    /// step saved, once it has another copy (replication and the drain are
    /// asynchronous; waits up to `DAMAGE_WAIT`), so that the restart meets
    /// the damage; else the newest that has one.
    fn damage_target(&self, node: usize) -> Result<Option<u64>> {
        let deadline = Instant::now() + DAMAGE_WAIT;
        loop {
            let held = holdings(&self.cluster, NS)?;
            let target = shard_with_another_copy(&held, node, &self.persist_dir, NS);
            if target.is_some() && target >= self.newest_saved || Instant::now() > deadline {
                return Ok(target);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The file of node `node`'s own rank's shard of `step` in its memory tier.
    fn shard_file(&self, node: usize, step: u64) -> PathBuf {
        let world = self.cluster.nodes.len();
        self.cluster
            .options(node)
            .memory_dir()
            .join("ns")
            .join(NS)
            .join(format!("{step:020}"))
            .join(format!("rank-{node:05}-of-{world:05}.safetensors"))
    }
}

/// SIGKILLs rank `rank`'s trainer first, if given, then the rest, as a
/// launcher does when one rank dies.
fn kill_job(job: &mut Option<Job>, rank: Option<usize>) -> Result<()> {
    if let Some(mut j) = job.take() {
        if let Some(r) = rank {
            j.kill(r)?;
        }
        j.kill_all()?;
    }
    Ok(())
}

/// Flips one byte of the file at `path` in place, truncates it, or removes
/// it; `r` picks the byte or the length. False if the file was gone already
/// (retention dropped the step meanwhile).
fn damage(kind: Kind, path: &Path, r: u64) -> Result<bool> {
    let ctx = || format!("{kind} of {}", path.display());
    let done = match kind {
        Kind::FlipByte => (|| {
            let f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
            let len = f.metadata()?.len();
            let at = r % len.max(1);
            let mut b = [0u8];
            f.read_exact_at(&mut b, at)?;
            f.write_all_at(&[b[0] ^ (1 << (r % 8))], at)
        })(),
        Kind::Truncate => (|| {
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            let len = f.metadata()?.len();
            f.set_len(r % len.max(1))
        })(),
        _ => std::fs::remove_file(path),
    };
    match done {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(ctx),
    }
}
