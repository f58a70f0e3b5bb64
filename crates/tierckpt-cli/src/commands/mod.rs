//! Inspection and maintenance commands, one file each: status, ls, inspect,
//! verify, export, rm, pin, unpin. Each prints a table for people, or one JSON object
//! with `--json`.

mod export;
mod inspect;
mod ls;
mod pin;
mod rm;
mod status;
mod unpin;
mod verify;

use anyhow::{Context, Result};
use tierckpt_client::Client;

pub use export::export;
pub use inspect::inspect;
pub use ls::ls;
pub use pin::pin;
pub use rm::rm;
pub use status::status;
pub use unpin::unpin;
pub use verify::verify;

/// The step to act on: the one given, or the newest complete.
fn pick_step(c: &mut Client, ns: &str, step: Option<u64>) -> Result<u64> {
    match step {
        Some(s) => Ok(s),
        None => c.latest(ns)?.with_context(|| format!("namespace {ns} has no complete step; name one with --step")),
    }
}

/// A step given as a number or as a name of a pinned step (`best`).
pub fn resolve_step(c: &mut Client, ns: &str, step: Option<&str>) -> Result<Option<u64>> {
    match step {
        None => Ok(None),
        Some(s) => match s.parse::<u64>() {
            Ok(n) => Ok(Some(n)),
            Err(_) => Ok(Some(c.resolve(ns, s)?)),
        },
    }
}

fn ranks_of(c: &mut Client, ns: &str, step: u64) -> Result<(u32, Vec<u32>)> {
    let s = c.steps(ns)?.into_iter().find(|s| s.step == step).with_context(|| format!("{ns} has no step {step}"))?;
    Ok((s.world_size, s.ranks))
}
