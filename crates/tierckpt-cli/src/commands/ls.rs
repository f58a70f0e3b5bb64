//! `tierckpt ls`: namespaces, or the steps of one namespace and its pinned
//! (and named) steps.

use anyhow::Result;
use serde_json::json;
use tierckpt_client::Client;

use super::status::print_namespaces;
use crate::output::{escape, human_bytes, print_json, table};

/// Lists the namespaces, or the steps of `namespace`.
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
    let pins = c.pins(ns)?;
    if as_json {
        print_json(&json!({ "namespace": ns, "steps": steps, "pins": pins }));
        return Ok(());
    }
    if steps.is_empty() && pins.is_empty() {
        println!("namespace {} has no steps", escape(ns));
        return Ok(());
    }
    let mut t = table(&["step", "ranks", "complete", "in progress", "bytes", "pinned"]);
    let pinned = |step: u64| match pins.iter().find(|p| p.step == step) {
        Some(p) if p.names.is_empty() => "yes".to_string(),
        Some(p) => escape(&p.names.join(", ")),
        None => "-".into(),
    };
    for s in &steps {
        t.add_row(vec![
            s.step.to_string(),
            format!("{}/{}", s.ranks.len(), s.world_size),
            if s.complete { "yes".into() } else { "no".into() },
            if s.in_progress.is_empty() { "-".into() } else { format!("{:?}", s.in_progress) },
            human_bytes(s.bytes),
            pinned(s.step),
        ]);
    }
    println!("{t}");
    for p in pins.iter().filter(|p| !steps.iter().any(|s| s.step == p.step)) {
        let names = if p.names.is_empty() { String::new() } else { format!(" ({})", p.names.join(", ")) };
        let tiers = if p.tiers.is_empty() { "no tier of this node".to_string() } else { p.tiers.join(" and ") };
        println!("pinned step {}{} is not in memory here; held by {tiers}", p.step, escape(&names));
    }
    Ok(())
}
