//! `tierckpt unpin`: make a pinned step ordinary again (retention may then
//! drop it).

use anyhow::Result;
use serde_json::json;
use tierckpt_client::Client;

use crate::output::{escape, print_json};

/// Unpins the step given by number or by name (exactly one).
pub fn unpin(c: &mut Client, ns: &str, step: Option<u64>, name: Option<&str>, as_json: bool) -> Result<()> {
    let (pin, not_reached) = c.unpin(ns, step, name)?;
    if as_json {
        print_json(&json!({ "namespace": ns, "step": pin.step, "not_reached": not_reached }));
        return Ok(());
    }
    println!("unpinned {}/step {}", escape(ns), pin.step);
    for n in &not_reached {
        println!("not reached: {}", escape(n));
    }
    Ok(())
}
