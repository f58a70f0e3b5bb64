//! Per-tier costs measured by `tierckpt bench ... --json`: the rates the
//! simulator's bandwidth flags default to when a report is given.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

/// The rates found in benchmark reports, GiB/s.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct BenchCosts {
    /// `bench memory`: a save's blocking copy.
    pub(super) save_gibps: Option<f64>,
    /// `bench memory`: a restore from local memory.
    pub(super) restore_gibps: Option<f64>,
    /// `bench replicate`: a copy to a peer.
    pub(super) replicate_gibps: Option<f64>,
    /// `bench persist`: a shard to the persistent tier.
    pub(super) persist_gibps: Option<f64>,
}

/// The first positive number under `key` anywhere in `v` (depth first).
fn find(v: &Value, key: &str) -> Option<f64> {
    match v {
        Value::Object(m) => m
            .get(key)
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite() && *x > 0.0)
            .or_else(|| m.values().find_map(|x| find(x, key))),
        Value::Array(a) => a.iter().find_map(|x| find(x, key)),
        _ => None,
    }
}

impl BenchCosts {
    /// Reads every report in `paths`; a later report's rate replaces an earlier one's.
    pub(super) fn read(paths: &[PathBuf]) -> Result<Self> {
        let mut c = Self::default();
        for path in paths {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--costs: reading the benchmark report {}", path.display()))?;
            let v: Value = serde_json::from_str(text.trim())
                .with_context(|| format!("--costs: {} is not a `tierckpt bench ... --json` report", path.display()))?;
            let found = ["save_gibps", "restore_gibps", "replicate_gibps", "persist_gibps"].map(|k| find(&v, k));
            anyhow::ensure!(
                found.iter().any(Option::is_some),
                "--costs: {} has none of save_gibps, restore_gibps, replicate_gibps, persist_gibps",
                path.display()
            );
            let [save, restore, replicate, persist] = found;
            c.save_gibps = save.or(c.save_gibps);
            c.restore_gibps = restore.or(c.restore_gibps);
            c.replicate_gibps = replicate.or(c.replicate_gibps);
            c.persist_gibps = persist.or(c.persist_gibps);
        }
        Ok(c)
    }
}
