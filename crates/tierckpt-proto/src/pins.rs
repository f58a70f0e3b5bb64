//! Pinned and named steps: the wire types of `pin`, `unpin` and `pins`, and
//! the rule a step's name follows.

use serde::{Deserialize, Serialize};

/// Longest name of a step, in bytes.
pub const MAX_PIN_NAME: usize = 64;

/// A pinned step as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinInfo {
    /// The step.
    pub step: u64,
    /// Its names (`best`, `pre-spike-1200`), if any.
    #[serde(default)]
    pub names: Vec<String>,
    /// The tiers that hold it for this node: `memory` (this node's memory
    /// tier, at least one shard) and `persistent` (committed in the store).
    #[serde(default)]
    pub tiers: Vec<String>,
}

/// Checks a step's name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not all digits
/// (so a name never reads as a step number). The error says what is wrong.
pub fn validate_pin_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > MAX_PIN_NAME {
        return Err(format!("step name {name:?} must be 1 to {MAX_PIN_NAME} bytes long"));
    }
    if let Some(c) = name.chars().find(|&c| !ok_char(c)) {
        return Err(format!("step name {name:?} has {c:?}: names use only A-Z a-z 0-9 . _ -"));
    }
    if name.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("step name {name:?} is all digits and would read as a step number"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_pin_name;

    #[test]
    fn names_are_checked() {
        for good in ["best", "pre-spike-1200", "a.b_c", "1e3"] {
            assert!(validate_pin_name(good).is_ok(), "{good}");
        }
        for (bad, said) in [("", "1 to 64"), ("a/b", "'/'"), ("1200", "all digits"), (&"x".repeat(65), "1 to 64")] {
            let e = validate_pin_name(bad).unwrap_err();
            assert!(e.contains(said), "{bad:?}: {e}");
        }
    }
}
