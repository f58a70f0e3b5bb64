//! `tierckpt verify`: every chunk of every shard checked against its manifest.

use anyhow::{bail, Result};
use serde_json::json;
use tierckpt_client::Client;
use tierckpt_format::ShardKey;

use super::ranks_of;
use crate::output::{escape, print_json, table};

/// Verifies shards; fails if any is corrupt.
pub fn verify(c: &mut Client, ns: &str, step: Option<u64>, as_json: bool) -> Result<()> {
    let steps: Vec<u64> = match step {
        Some(s) => vec![s],
        None => c.steps(ns)?.iter().map(|s| s.step).collect(),
    };
    if steps.is_empty() {
        bail!("namespace {ns} has no steps");
    }
    let mut results = Vec::new();
    for step in steps {
        let (_, ranks) = ranks_of(c, ns, step)?;
        for r in ranks {
            let key = ShardKey::new(ns, step, r);
            let res = c.open(&key).map(|s| s.manifest.file_len);
            results.push(json!({
                "step": step,
                "rank": r,
                "ok": res.is_ok(),
                "bytes": res.as_ref().ok(),
                "error": res.err().map(|e| e.to_string()),
            }));
        }
    }
    let bad = results.iter().filter(|r| r["ok"] == false).count();
    if as_json {
        print_json(&json!({ "namespace": ns, "shards": results, "corrupt": bad }));
    } else {
        let mut t = table(&["step", "rank", "result"]);
        for r in &results {
            t.add_row(vec![
                r["step"].to_string(),
                r["rank"].to_string(),
                if r["ok"] == true { "ok".into() } else { escape(r["error"].as_str().unwrap_or("")) },
            ]);
        }
        println!("{t}");
    }
    if bad > 0 {
        bail!("{bad} of {} shards failed verification", results.len());
    }
    if !as_json {
        println!("all {} shards verified", results.len());
    }
    Ok(())
}
