//! Inspection and maintenance commands: status, ls, inspect, verify, export, rm.
//! Each prints a table for people, or one JSON object with `--json`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tierckpt_client::Client;
use tierckpt_format::{parse_shard, verify_chunks, ShardKey};

use crate::output::{human_bytes, print_json, table};

pub fn status(c: &mut Client, as_json: bool) -> Result<()> {
    let s = c.status()?;
    if as_json {
        print_json(&s);
        return Ok(());
    }
    let m = &s.memory;
    println!("tierckptd {} (pid {}), up {:.0} s", s.version, s.pid, s.uptime_s);
    println!(
        "  memory tier  {} ({})",
        s.root,
        if s.huge_pages { "huge pages" } else { "4 KiB pages: restores build page tables; see mount_huge_tmpfs" }
    );
    println!("  socket       {}", s.socket);
    println!("  http         {}", s.http_addr.as_deref().unwrap_or("off"));
    println!(
        "  memory       {} used of {} ({} sealed in {} shards, {} in progress, {} pooled for reuse), keep_last {}",
        human_bytes(m.used),
        human_bytes(m.capacity),
        human_bytes(m.sealed),
        m.shards,
        human_bytes(m.in_progress),
        human_bytes(m.pooled),
        m.keep_last
    );
    print_namespaces(&s.namespaces);
    if let Some(c) = &s.cluster {
        print_cluster(c);
    }
    if let Some(p) = &s.persistent {
        print_persistent(p);
    }
    if !s.failures.is_empty() {
        print_failures(&s.failures);
    }
    Ok(())
}

/// The jobs' starts and failures recorded by `tierckpt run` (newest few).
fn print_failures(f: &std::collections::BTreeMap<String, Vec<tierckpt_proto::FailureRecord>>) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    println!("recent job events (tierckpt run):");
    let mut t = table(&["namespace", "when", "event", "detail", "newest complete step", "run"]);
    for (ns, recs) in f {
        for r in recs {
            t.add_row(vec![
                ns.clone(),
                format!("{:.0} s ago", now.saturating_sub(r.unix_ms) as f64 / 1000.0),
                format!("{:?}", r.kind).to_lowercase(),
                r.detail.chars().take(60).collect(),
                r.step.map_or("-".into(), |s| s.to_string()),
                r.restart.to_string(),
            ]);
        }
    }
    println!("{t}");
}

fn print_persistent(p: &serde_json::Value) {
    println!(
        "persistent tier: {} (every {} complete checkpoint(s), keep {}; compression {}, deltas {})",
        p["url"].as_str().unwrap_or("?"),
        p["persist_every"],
        p["keep_last"],
        p["compression"].as_str().unwrap_or("off"),
        if p["delta"].as_bool().unwrap_or(false) { "on" } else { "off" }
    );
    let mut t =
        table(&["namespace", "last committed", "uploading", "uploaded", "stored", "skipped", "failures", "last error"]);
    for n in p["namespaces"].as_array().into_iter().flatten() {
        let (raw, stored) = (n["uploaded_bytes"].as_u64().unwrap_or(0), n["stored_bytes"].as_u64().unwrap_or(0));
        t.add_row(vec![
            n["namespace"].as_str().unwrap_or("").to_string(),
            n["last_committed"].as_u64().map_or("-".into(), |s| s.to_string()),
            n["uploading"].as_str().unwrap_or("-").to_string(),
            format!("{} shards, {}", n["uploaded_shards"], human_bytes(raw)),
            format!(
                "{} ({:.2} of it; {} deltas)",
                human_bytes(stored),
                if raw > 0 { stored as f64 / raw as f64 } else { 1.0 },
                n["delta_shards"]
            ),
            n["skipped"].to_string(),
            n["failures"].to_string(),
            n["last_error"].as_str().unwrap_or("-").chars().take(80).collect(),
        ]);
    }
    println!("{t}");
}

fn print_cluster(c: &tierckpt_proto::ClusterStatus) {
    let r = &c.replication;
    println!(
        "cluster: node {}, replication factor {} ({} placement); sent {} shards ({}, {} on the wire, {} as deltas, {} compressed), fetched {} ({}), re-replicated {}, {} failures, {} queued",
        c.node_id,
        c.replication_factor,
        c.placement,
        r.shards_sent,
        human_bytes(r.bytes_sent),
        human_bytes(r.wire_bytes_sent),
        r.delta_shards_sent,
        r.encoded_shards_sent,
        r.shards_fetched,
        human_bytes(r.bytes_fetched),
        r.rereplicated,
        r.failures,
        r.queued
    );
    let mut t = table(&["node", "address", "state", "last seen"]);
    for n in &c.nodes {
        t.add_row(vec![
            if n.this_node { format!("{} (this node)", n.id) } else { n.id.clone() },
            n.addr.clone(),
            format!("{:?}", n.state).to_lowercase(),
            n.last_seen_ms_ago.map_or("never".into(), |ms| format!("{:.1} s ago", ms as f64 / 1000.0)),
        ]);
    }
    println!("{t}");
    for (ns, steps) in &c.namespaces {
        let mut t = table(&["namespace", "step", "complete", "rank: nodes holding it"]);
        for s in steps {
            let holders: Vec<String> = (0..s.world_size)
                .map(|r| match s.holders.get(&r) {
                    Some(h) => format!("{r}: {}", h.join(",")),
                    None => format!("{r}: -"),
                })
                .collect();
            t.add_row(vec![
                ns.clone(),
                s.step.to_string(),
                if s.complete { "yes".into() } else { "no".into() },
                holders.join("  "),
            ]);
        }
        println!("{t}");
    }
}

fn print_namespaces(ns: &[tierckpt_proto::NamespaceSummary]) {
    if ns.is_empty() {
        println!("no checkpoints");
        return;
    }
    let mut t = table(&["namespace", "steps", "complete", "latest complete", "bytes"]);
    for n in ns {
        t.add_row(vec![
            n.namespace.clone(),
            n.steps.to_string(),
            n.complete_steps.to_string(),
            n.latest_complete.map_or("-".into(), |s| s.to_string()),
            human_bytes(n.bytes),
        ]);
    }
    println!("{t}");
}

pub fn ls(c: &mut Client, namespace: Option<&str>, as_json: bool) -> Result<()> {
    let Some(ns) = namespace else {
        let list = c.namespaces()?;
        if as_json {
            print_json(&json!({ "namespaces": list }));
        } else {
            print_namespaces(&list);
        }
        return Ok(());
    };
    let steps = c.steps(ns)?;
    if as_json {
        print_json(&json!({ "namespace": ns, "steps": steps }));
        return Ok(());
    }
    if steps.is_empty() {
        println!("namespace {ns} has no steps");
        return Ok(());
    }
    let mut t = table(&["step", "ranks", "complete", "in progress", "bytes"]);
    for s in &steps {
        t.add_row(vec![
            s.step.to_string(),
            format!("{}/{}", s.ranks.len(), s.world_size),
            if s.complete { "yes".into() } else { "no".into() },
            if s.in_progress.is_empty() { "-".into() } else { format!("{:?}", s.in_progress) },
            human_bytes(s.bytes),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// The step to act on: the one given, or the newest complete.
fn pick_step(c: &mut Client, ns: &str, step: Option<u64>) -> Result<u64> {
    match step {
        Some(s) => Ok(s),
        None => c.latest(ns)?.with_context(|| format!("namespace {ns} has no complete step; name one with --step")),
    }
}

fn ranks_of(c: &mut Client, ns: &str, step: u64) -> Result<(u32, Vec<u32>)> {
    let s = c.steps(ns)?.into_iter().find(|s| s.step == step).with_context(|| format!("{ns} has no step {step}"))?;
    Ok((s.world_size, s.ranks))
}

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
            "{ns}/step {step}/rank {} of {}: {} in {} chunks, format {}, {}",
            s["rank"],
            world,
            human_bytes(s["bytes"].as_u64().unwrap_or(0)),
            s["chunks"],
            s["format_version"].as_str().unwrap_or("?"),
            if s["verified"] == true {
                "checksums ok".to_string()
            } else {
                format!("CORRUPT: {}", s["error"].as_str().unwrap_or(""))
            }
        );
        println!("  {}", s["path"].as_str().unwrap_or(""));
        if let Some(m) = s["metadata"].as_object().filter(|m| !m.is_empty()) {
            for (k, v) in m {
                let v = v.as_str().unwrap_or_default();
                let shown: String = v.chars().take(80).collect();
                println!("  metadata {k} = {shown}{}", if v.len() > shown.len() { "..." } else { "" });
            }
        }
        let mut t = table(&["tensor", "dtype", "shape", "bytes"]);
        for e in s["tensors"].as_array().into_iter().flatten() {
            t.add_row(vec![
                e["name"].as_str().unwrap_or("").to_string(),
                e["dtype"].as_str().unwrap_or("").to_string(),
                e["shape"].to_string(),
                human_bytes(e["bytes"].as_u64().unwrap_or(0)),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}

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
                if r["ok"] == true { "ok".into() } else { r["error"].as_str().unwrap_or("").to_string() },
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
        println!("exported {ns}/step {step} ({} shards) to {}", files.len(), out.display());
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

pub fn rm(c: &mut Client, ns: &str, step: Option<u64>, as_json: bool) -> Result<()> {
    let (shards, bytes) = match step {
        Some(s) => c.delete_step(ns, s)?,
        None => c.delete_namespace(ns)?,
    };
    if as_json {
        print_json(&json!({ "namespace": ns, "step": step, "deleted_shards": shards, "deleted_bytes": bytes }));
    } else {
        println!("deleted {shards} shards ({})", human_bytes(bytes));
    }
    Ok(())
}
