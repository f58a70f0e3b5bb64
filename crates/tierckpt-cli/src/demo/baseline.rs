//! The demo's baseline: the same job and failures, with checkpoints written
//! synchronously to files, as a job that checkpoints only to a file system
//! does (`torch.save` + fsync). The training step waits for the write and
//! the fsync; a restart reads the newest step whose every rank's file is
//! there.
//!
//! Layout: `<dir>/step-<step:020>/rank-<rank:05>.safetensors`, each file
//! written to a temporary name, fsynced, renamed into place, and its
//! directory fsynced.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tierckpt_client::TensorData;
use tierckpt_format::{parse_shard, ShardLayout, TensorSpec};

use super::failures::failure_json;
use super::job::{Job, Store};
use super::lockstep::{drive, Begin, Outcome};
use super::model::combined_hash;
use super::plan::{Failure, Plan};
use super::run_log::RunLog;
use super::ui::Ui;
use super::DemoArgs;

/// One rank's checkpoints as files in a directory shared by all ranks.
pub(super) struct FileCheckpoints {
    dir: PathBuf,
    rank: u32,
    world_size: u32,
    keep_last: usize,
    /// The storage's write rate for this rank in bytes per second: a save
    /// takes at least its bytes over this (none: as fast as the disk goes).
    bandwidth: Option<u64>,
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step:020}")
}

fn rank_file_name(rank: u32) -> String {
    format!("rank-{rank:05}.safetensors")
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync of directory {}", dir.display()))
}

impl FileCheckpoints {
    /// Rank `rank`'s checkpoints of a job of `world_size` ranks in `dir`,
    /// keeping the newest `keep_last` complete steps.
    pub(super) fn new(
        dir: impl Into<PathBuf>,
        rank: u32,
        world_size: u32,
        keep_last: usize,
        bandwidth: Option<u64>,
    ) -> Self {
        Self { dir: dir.into(), rank, world_size, keep_last: keep_last.max(1), bandwidth }
    }

    fn file(&self, step: u64, rank: u32) -> PathBuf {
        self.dir.join(step_dir_name(step)).join(rank_file_name(rank))
    }

    /// Steps with a file for every rank, oldest first.
    pub(super) fn complete_steps(&self) -> Result<Vec<u64>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.dir.display())),
        };
        let mut steps: Vec<u64> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
            .filter(|&s| (0..self.world_size).all(|r| self.file(s, r).is_file()))
            .collect();
        steps.sort_unstable();
        Ok(steps)
    }

    /// The newest step with a file for every rank.
    pub(super) fn latest(&self) -> Result<Option<u64>> {
        Ok(self.complete_steps()?.last().copied())
    }

    /// Writes this rank's file of `step` and waits for it to be durable;
    /// returns the bytes written. Then drops this rank's files of steps
    /// older than the newest `keep_last` complete ones.
    pub(super) fn save(&self, step: u64, tensors: &[TensorData<'_>], meta: &BTreeMap<String, String>) -> Result<u64> {
        let specs: Vec<TensorSpec> = tensors
            .iter()
            .map(|t| TensorSpec { name: t.name.to_string(), dtype: t.dtype, shape: t.shape.to_vec() })
            .collect();
        let layout = ShardLayout::new(&specs, meta)?;
        let started = Instant::now();
        let step_dir = self.dir.join(step_dir_name(step));
        fs::create_dir_all(&step_dir).with_context(|| format!("creating {}", step_dir.display()))?;
        let tmp = step_dir.join(format!(".{}.tmp", rank_file_name(self.rank)));
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let write = || -> std::io::Result<()> {
            f.write_all_at(&layout.header, 0)?;
            for (e, t) in layout.entries.iter().zip(tensors) {
                f.write_all_at(t.data, e.offset)?;
            }
            f.set_len(layout.file_len)?;
            f.sync_all()
        };
        write().with_context(|| format!("writing {}", tmp.display()))?;
        if let Some(bw) = self.bandwidth {
            let due = Duration::from_secs_f64(layout.file_len as f64 / bw.max(1) as f64);
            std::thread::sleep(due.saturating_sub(started.elapsed()));
        }
        let dest = self.file(step, self.rank);
        fs::rename(&tmp, &dest).with_context(|| format!("renaming {} into place", tmp.display()))?;
        fsync_dir(&step_dir)?;
        self.retain()?;
        Ok(layout.file_len)
    }

    fn retain(&self) -> Result<()> {
        let complete = self.complete_steps()?;
        let Some(&oldest_kept) = complete.iter().rev().nth(self.keep_last - 1) else { return Ok(()) };
        for e in fs::read_dir(&self.dir).with_context(|| format!("listing {}", self.dir.display()))?.flatten() {
            let Some(step) = e.file_name().to_str().and_then(|n| n.strip_prefix("step-")?.parse::<u64>().ok()) else {
                continue;
            };
            if step < oldest_kept {
                let _ = fs::remove_file(self.file(step, self.rank));
                // The last rank to leave removes the directory.
                let _ = fs::remove_dir(e.path());
            }
        }
        Ok(())
    }

    /// Reads this rank's file of `step` into `targets` (one buffer per
    /// tensor name); returns the file's metadata.
    pub(super) fn load_into(&self, step: u64, targets: &mut [(&str, &mut [u8])]) -> Result<BTreeMap<String, String>> {
        let path = self.file(step, self.rank);
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let view = parse_shard(&bytes, &path.display().to_string())?;
        for (name, buf) in targets.iter_mut() {
            let e = view.entry(name).with_context(|| format!("{} has no tensor {name:?}", path.display()))?;
            ensure!(
                e.len as usize == buf.len(),
                "{}: tensor {name:?} has {} bytes, expected {}",
                path.display(),
                e.len,
                buf.len()
            );
            buf.copy_from_slice(&bytes[e.range()]);
        }
        Ok(view.metadata)
    }
}

/// What the baseline run measured.
pub(super) struct BaselineRun {
    pub(super) log: RunLog,
    /// The job's final state hash.
    pub(super) hash: String,
    /// Each failure's record in the report.
    pub(super) failures: Vec<Value>,
    pub(super) wall_s: f64,
}

/// The baseline: the same job and the same failures, checkpointing only to
/// files on the persistent tier's disk (in `dir`), synchronously (write +
/// fsync); every restart reads the newest complete step's files.
pub(super) fn run_baseline(a: &DemoArgs, plan: &Plan, dir: &Path, ui: &Ui) -> Result<BaselineRun> {
    ui.line(format!(
        "[5/5] baseline: the same job and failures, checkpointing only to files on disk ({}), written and fsynced by the trainers",
        dir.display()
    ));
    let failures = plan.failures();
    let store = Store::Files(dir.to_path_buf(), plan.world);
    let ns = "demo-baseline";
    let mut log = RunLog::new("files (write + fsync)");
    let pb = ui.bar(a.steps, "baseline");
    let t = Instant::now();
    let mut job = Job::spawn(&store, ns, a, plan.threads)?;
    let mut reports = Vec::new();
    let mut pending: Option<(&Failure, Instant)> = None;
    for next in failures.iter().map(Some).chain([None]) {
        let (inc, out) = drive(&mut job, a.steps, ui, &pb, &mut log, next.map(|f| f.step), Begin::Start)?;
        if let Some((f, killed_at)) = pending.take() {
            reports.push(failure_json(f.kind, f.step, killed_at, &inc, json!({ "ranks_killed": f.ranks })));
        }
        let Some(f) = next else {
            let Outcome::Done { hashes } = out else { bail!("the baseline stopped without being asked to") };
            drop(job);
            pb.finish_and_clear();
            let wall_s = t.elapsed().as_secs_f64();
            let run = BaselineRun { log, hash: combined_hash(&hashes), failures: reports, wall_s };
            ui.line(format!("    done in {:.1} s, final state xxh3-128 {}\n", run.wall_s, run.hash));
            return Ok(run);
        };
        ensure!(matches!(out, Outcome::Stopped), "the baseline finished before its {}", f.kind);
        let killed_at = Instant::now();
        for &r in &f.ranks {
            job.kill(r)?;
        }
        job.kill_all()?;
        drop(job);
        log.killed_at = Some(killed_at);
        ui.say(&pb, format!("    {:<11} after step {}: the job restarts and reads its newest files", f.kind, f.step));
        pending = Some((f, killed_at));
        job = Job::spawn(&store, ns, a, plan.threads)?;
    }
    unreachable!("the loop returns after the last run")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tierckpt_format::Dtype;

    #[test]
    fn saves_restores_and_keeps_only_complete_steps() {
        let dir = tempfile::tempdir().unwrap();
        let ranks: Vec<FileCheckpoints> = (0..2).map(|r| FileCheckpoints::new(dir.path(), r, 2, 2, None)).collect();
        let data = |step: u64, r: u32| vec![(step as u8).wrapping_add(r as u8); 100];
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        for step in [5, 10, 15] {
            for (r, fc) in ranks.iter().enumerate() {
                let d = data(step, r as u32);
                let t = [TensorData { name: "w", dtype: Dtype::U8, shape: &[100], data: &d }];
                fc.save(step, &t, &meta).unwrap();
            }
        }
        // Rank 0 alone at step 20: not complete.
        let d = data(20, 0);
        ranks[0].save(20, &[TensorData { name: "w", dtype: Dtype::U8, shape: &[100], data: &d }], &meta).unwrap();
        assert_eq!(ranks[1].complete_steps().unwrap(), [10, 15]);
        assert_eq!(ranks[1].latest().unwrap(), Some(15));
        let mut buf = vec![0u8; 100];
        let m = ranks[1].load_into(15, &mut [("w", &mut buf[..])]).unwrap();
        assert_eq!(buf, data(15, 1));
        assert_eq!(m["k"], "v");
        let mut short = [0u8; 10];
        assert!(ranks[1].load_into(15, &mut [("w", &mut short[..])]).is_err());
        assert!(ranks[1].load_into(15, &mut [("nope", &mut buf[..])]).is_err());
        // A truncated file is refused, not loaded.
        let f = dir.path().join("step-00000000000000000010/rank-00001.safetensors");
        let len = fs::metadata(&f).unwrap().len();
        File::options().write(true).open(&f).unwrap().set_len(len - 1).unwrap();
        assert!(ranks[1].load_into(10, &mut [("w", &mut buf[..])]).is_err());
    }
}
