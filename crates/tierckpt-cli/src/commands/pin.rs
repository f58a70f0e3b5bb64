//! `tierckpt pin`: keep a step from retention on every tier that holds it,
//! optionally naming it.

use anyhow::Result;
use serde_json::json;
use tierckpt_client::Client;

use crate::output::{escape, print_json};

/// Pins `step` of `ns`, with `name` if given.
pub fn pin(c: &mut Client, ns: &str, step: u64, name: Option<&str>, as_json: bool) -> Result<()> {
    let (pin, not_reached) = c.pin(ns, step, name)?;
    if as_json {
        print_json(&json!({ "namespace": ns, "pin": pin, "not_reached": not_reached }));
        return Ok(());
    }
    let names = if pin.names.is_empty() { String::new() } else { format!(" ({})", pin.names.join(", ")) };
    println!("pinned {}/step {}{} on {}", escape(ns), pin.step, escape(&names), pin.tiers.join(" and "));
    for n in &not_reached {
        println!("not reached: {}", escape(n));
    }
    Ok(())
}
