//! `tierckpt inspect`: tensors, metadata and checksums of a step's shards.

use anyhow::{bail, Result};
use serde_json::json;
use tierckpt_client::Client;
use tierckpt_format::{parse_shard, verify_chunks, ShardKey};

use super::{pick_step, ranks_of};
use crate::output::{escape, human_bytes, print_json, table};

/// Prints the tensors, metadata and chunk checksums of a step's shards (one rank, or all).
pub fn inspect(c: &mut Client, ns: &str, step: Option<u64>, rank: Option<u32>, as_json: bool) -> Result<()> {
    let step = pick_step(c, ns, step)?;
    let (world, ranks) = ranks_of(c, ns, step)?;
    let ranks: Vec<u32> = match rank {
        Some(r) if ranks.contains(&r) => vec![r],
        Some(r) => bail!("{ns}/step {step} has no visible rank {r} (visible: {ranks:?})"),
        None => ranks,
    };
    let mut out = Vec::new();
    for r in ranks {
        let key = ShardKey::new(ns, step, r);
        let (path, manifest, map) = c.map_unverified(&key)?;
        let label = path.display().to_string();
        let view = parse_shard(&map, &label);
        let verified = verify_chunks(&map, &manifest, &label);
        let tensors: Vec<_> = view
            .as_ref()
            .map(|v| {
                v.entries
                    .iter()
                    .map(|e| json!({"name": e.name, "dtype": e.dtype.to_string(), "shape": e.shape, "bytes": e.len}))
                    .collect()
            })
            .unwrap_or_default();
        out.push(json!({
            "rank": r,
            "world_size": world,
            "path": label,
            "format_version": manifest.format_version,
            "bytes": manifest.file_len,
            "chunks": manifest.chunks.len(),
            "chunk_size": manifest.chunk_size,
            "created_unix_ms": manifest.created_unix_ms,
            "verified": verified.is_ok(),
            "error": verified.err().map(|e| e.to_string()).or(view.as_ref().err().map(|e| e.to_string())),
            "metadata": view.as_ref().map(|v| v.metadata.clone()).unwrap_or_default(),
            "tensors": tensors,
        }));
    }
    if as_json {
        print_json(&json!({ "namespace": ns, "step": step, "shards": out }));
        return Ok(());
    }
    for s in &out {
        println!(
            "{}/step {step}/rank {} of {}: {} in {} chunks, format {}, {}",
            escape(ns),
            s["rank"],
            world,
            human_bytes(s["bytes"].as_u64().unwrap_or(0)),
            s["chunks"],
            escape(s["format_version"].as_str().unwrap_or("?")),
            if s["verified"] == true && s["error"].is_null() {
                "checksums ok".to_string()
            } else if s["verified"] == true {
                format!("checksums ok, UNREADABLE: {}", escape(s["error"].as_str().unwrap_or("")))
            } else {
                format!("CORRUPT: {}", escape(s["error"].as_str().unwrap_or("")))
            }
        );
        println!("  {}", escape(s["path"].as_str().unwrap_or("")));
        if let Some(m) = s["metadata"].as_object().filter(|m| !m.is_empty()) {
            for (k, v) in m {
                let v = v.as_str().unwrap_or_default();
                let shown: String = v.chars().take(80).collect();
                let more = if v.len() > shown.len() { "..." } else { "" };
                println!("  metadata {} = {}{more}", escape(k), escape(&shown));
            }
        }
        let mut t = table(&["tensor", "dtype", "shape", "bytes"]);
        for e in s["tensors"].as_array().into_iter().flatten() {
            t.add_row(vec![
                escape(e["name"].as_str().unwrap_or("")),
                escape(e["dtype"].as_str().unwrap_or("")),
                e["shape"].to_string(),
                human_bytes(e["bytes"].as_u64().unwrap_or(0)),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}
