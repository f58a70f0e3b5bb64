//! `tierckpt status`: the daemon, its memory tier, its namespaces, the
//! cluster view, the persistent tier and the recorded failures.

use anyhow::Result;
use tierckpt_client::Client;

use crate::output::{escape, human_bytes, print_json, table};

/// Prints the daemon's status.
pub fn status(c: &mut Client, as_json: bool) -> Result<()> {
    let s = c.status()?;
    if as_json {
        print_json(&s);
        return Ok(());
    }
    let m = &s.memory;
    println!("tierckptd {} (pid {}), up {:.0} s", escape(&s.version), s.pid, s.uptime_s);
    println!(
        "  memory tier  {} ({})",
        escape(&s.root),
        if s.huge_pages { "huge pages" } else { "4 KiB pages: restores build page tables; see mount_huge_tmpfs" }
    );
    println!("  socket       {}", escape(&s.socket));
    println!("  http         {}", escape(s.http_addr.as_deref().unwrap_or("off")));
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
    println!(
        "  pool         {} segments: {} pre-faulted in {} segments (target {}{}), {} recycled; \
         reservations served from the pool {}, from fresh pages {}",
        m.pooled_segments,
        human_bytes(m.prefaulted),
        m.prefaulted_segments,
        if m.prefault_target == 0 { "off".to_string() } else { human_bytes(m.prefault_target) },
        if m.prefault_pending { ", filling" } else { "" },
        human_bytes(m.recycled),
        m.reserved_from_pool,
        m.reserved_fresh
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
    print_advice(&s.advice);
    Ok(())
}

/// The checkpoint advice: the notice and health check polled, a standing
/// preemption, and the alerts not yet expired.
fn print_advice(a: &tierckpt_proto::AdviceStatus) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let ago = |ms: u64| format!("{:.0} s ago", now.saturating_sub(ms) as f64 / 1000.0);
    let source = |what: &str, s: &tierckpt_proto::AdviceSource| {
        let checked = s.checked_unix_ms.map_or("not checked yet".into(), |t| format!("checked {}", ago(t)));
        let error = s.last_error.as_deref().map_or(String::new(), |e| format!("; last error: {}", escape(e)));
        println!("  {what:<14}{} ({checked}{error})", escape(&s.source));
    };
    if a.notice.is_none() && a.health_check.is_none() && a.events.is_empty() {
        return;
    }
    println!("checkpoint advice:");
    if let Some(n) = &a.notice {
        source("notice", n);
    }
    if let Some(h) = &a.health_check {
        source("health check", h);
    }
    if let Some(p) = &a.preemption {
        let left = p.deadline_unix_ms.saturating_sub(now) as f64 / 1000.0;
        println!("  PREEMPTION    notice stands, {left:.0} s left: {}", escape(&p.detail));
    }
    if !a.events.is_empty() {
        let mut t = table(&["id", "when", "alert", "detail"]);
        for e in &a.events {
            t.add_row(vec![
                e.id.to_string(),
                ago(e.at_unix_ms),
                format!("{:?}", e.kind).to_lowercase(),
                escape(&e.detail.chars().take(80).collect::<String>()),
            ]);
        }
        println!("{t}");
    }
}

/// The jobs' starts and failures recorded by `tierckpt run` (newest few).
fn print_failures(f: &std::collections::BTreeMap<String, Vec<tierckpt_proto::FailureRecord>>) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    println!("recent job events (tierckpt run):");
    let mut t = table(&["namespace", "when", "event", "detail", "newest complete step", "run"]);
    for (ns, recs) in f {
        for r in recs {
            t.add_row(vec![
                escape(ns),
                format!("{:.0} s ago", now.saturating_sub(r.unix_ms) as f64 / 1000.0),
                format!("{:?}", r.kind).to_lowercase(),
                escape(&r.detail.chars().take(60).collect::<String>()),
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
        escape(p["url"].as_str().unwrap_or("?")),
        p["persist_every"],
        p["keep_last"],
        escape(p["compression"].as_str().unwrap_or("off")),
        if p["delta"].as_bool().unwrap_or(false) { "on" } else { "off" }
    );
    let mut t =
        table(&["namespace", "last committed", "uploading", "uploaded", "stored", "skipped", "failures", "last error"]);
    for n in p["namespaces"].as_array().into_iter().flatten() {
        let (raw, stored) = (n["uploaded_bytes"].as_u64().unwrap_or(0), n["stored_bytes"].as_u64().unwrap_or(0));
        t.add_row(vec![
            escape(n["namespace"].as_str().unwrap_or("")),
            n["last_committed"].as_u64().map_or("-".into(), |s| s.to_string()),
            escape(n["uploading"].as_str().unwrap_or("-")),
            format!("{} shards, {}", n["uploaded_shards"], human_bytes(raw)),
            format!(
                "{} ({:.2} of it; {} deltas)",
                human_bytes(stored),
                if raw > 0 { stored as f64 / raw as f64 } else { 1.0 },
                n["delta_shards"]
            ),
            n["skipped"].to_string(),
            n["failures"].to_string(),
            escape(&n["last_error"].as_str().unwrap_or("-").chars().take(80).collect::<String>()),
        ]);
    }
    println!("{t}");
}

fn print_cluster(c: &tierckpt_proto::ClusterStatus) {
    let r = &c.replication;
    println!(
        "cluster: node {}, replication factor {} ({} placement); sent {} shards ({}, {} on the wire, {} as deltas, {} compressed), fetched {} ({}), re-replicated {}, {} failures, {} queued",
        escape(&c.node_id),
        c.replication_factor,
        escape(&c.placement),
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
            if n.this_node { format!("{} (this node)", escape(&n.id)) } else { escape(&n.id) },
            escape(&n.addr),
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
                    Some(h) => format!("{r}: {}", escape(&h.join(","))),
                    None => format!("{r}: -"),
                })
                .collect();
            t.add_row(vec![
                escape(ns),
                s.step.to_string(),
                if s.complete { "yes".into() } else { "no".into() },
                holders.join("  "),
            ]);
        }
        println!("{t}");
    }
}

pub(super) fn print_namespaces(ns: &[tierckpt_proto::NamespaceSummary]) {
    if ns.is_empty() {
        println!("no checkpoints");
        return;
    }
    let mut t = table(&["namespace", "steps", "complete", "latest complete", "bytes", "pinned"]);
    for n in ns {
        t.add_row(vec![
            escape(&n.namespace),
            n.steps.to_string(),
            n.complete_steps.to_string(),
            n.latest_complete.map_or("-".into(), |s| s.to_string()),
            human_bytes(n.bytes),
            if n.pinned.is_empty() {
                "-".into()
            } else {
                n.pinned.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
            },
        ]);
    }
    println!("{t}");
}
