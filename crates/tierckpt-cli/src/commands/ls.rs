//! `tierckpt ls`: namespaces, or the steps of one namespace.

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
    if as_json {
        print_json(&json!({ "namespace": ns, "steps": steps }));
        return Ok(());
    }
    if steps.is_empty() {
        println!("namespace {} has no steps", escape(ns));
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
