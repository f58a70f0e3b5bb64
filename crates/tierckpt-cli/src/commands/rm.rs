//! `tierckpt rm`: delete one step, or a whole namespace, on every node.

use anyhow::Result;
use serde_json::json;
use tierckpt_client::Client;

use crate::output::{human_bytes, print_json};

/// Deletes a step, or with no step the whole namespace, on every reachable node.
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
