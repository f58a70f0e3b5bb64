//! `tierckpt export`: a step's verified shards as safetensors files.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tierckpt_client::Client;
use tierckpt_format::ShardKey;

use super::{pick_step, ranks_of};
use crate::output::{escape, print_json};

/// Writes a step's verified shards, as safetensors files with their
/// manifests, into `dir/<namespace>/step-<step>/`.
pub fn export(c: &mut Client, ns: &str, step: Option<u64>, dir: &Path, as_json: bool) -> Result<()> {
    let step = pick_step(c, ns, step)?;
    let (world, ranks) = ranks_of(c, ns, step)?;
    if ranks.len() != world as usize {
        bail!("{ns}/step {step} is incomplete ({} of {world} ranks); export a complete step", ranks.len());
    }
    let out = dir.join(ns).join(format!("step-{step}"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let bar = if as_json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(ranks.len() as u64) };
    let mut files = Vec::new();
    for r in ranks {
        let shard = c.open(&ShardKey::new(ns, step, r))?;
        let stem = format!("rank-{r:05}-of-{world:05}");
        let path = out.join(format!("{stem}.safetensors"));
        write_atomically(&path, shard.bytes())?;
        write_atomically(&out.join(format!("{stem}.manifest.json")), &shard.manifest.to_json())?;
        files.push(path.display().to_string());
        bar.inc(1);
    }
    bar.finish_and_clear();
    if as_json {
        print_json(&json!({ "namespace": ns, "step": step, "dir": out, "files": files }));
    } else {
        println!(
            "exported {}/step {step} ({} shards) to {}",
            escape(ns),
            files.len(),
            escape(&out.display().to_string())
        );
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
