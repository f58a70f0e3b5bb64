//! Validation of every name that comes from outside: namespaces, tensor names,
//! ranks. Names end up in file paths, so nothing here may allow traversal.

use crate::FormatError;

/// Longest namespace accepted.
pub const MAX_NAMESPACE_LEN: usize = 128;

/// A namespace is `[A-Za-z0-9_-]{1,128}`.
pub fn validate_namespace(ns: &str) -> Result<(), FormatError> {
    let ok = !ns.is_empty()
        && ns.len() <= MAX_NAMESPACE_LEN
        && ns.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(FormatError::InvalidArgument(format!(
            "namespace {:?} is invalid: use 1 to {MAX_NAMESPACE_LEN} characters from [A-Za-z0-9_-]",
            truncate_for_message(ns)
        )))
    }
}

/// `rank` must be below `world_size`, and `world_size` at least 1.
pub fn validate_rank(rank: u32, world_size: u32) -> Result<(), FormatError> {
    if world_size == 0 {
        return Err(FormatError::InvalidArgument("world_size must be at least 1".into()));
    }
    if rank >= world_size {
        return Err(FormatError::InvalidArgument(format!("rank {rank} is not below world_size {world_size}")));
    }
    Ok(())
}

/// Tensor names: non-empty, at most 1024 bytes, no control characters, and not
/// the reserved `__metadata__`. The one rule for every interface: writers
/// check it when planning a shard (`ShardLayout::new`, the Rust client), and
/// `parse_shard` checks it for every shard read, so the memory tier's seal
/// refuses shards written by anything else (HTTP, Python, replicas).
/// Errors show the name escaped (`{:?}`), never raw.
pub fn validate_tensor_name(name: &str) -> Result<(), FormatError> {
    if name.is_empty() || name.len() > 1024 || name.chars().any(char::is_control) {
        return Err(FormatError::InvalidArgument(format!(
            "tensor name {:?} is invalid: use 1 to 1024 printable characters",
            truncate_for_message(name)
        )));
    }
    if name == "__metadata__" {
        return Err(FormatError::InvalidArgument("tensor name \"__metadata__\" is reserved by safetensors".into()));
    }
    Ok(())
}

fn truncate_for_message(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        for good in ["a", "job-1_A", &"x".repeat(128)] {
            validate_namespace(good).unwrap();
        }
        for bad in ["", "..", "a/b", "a b", "é", &"x".repeat(129), "a\0"] {
            let e = validate_namespace(bad).unwrap_err().to_string();
            assert!(e.contains("namespace"), "{e}");
        }
    }

    #[test]
    fn ranks() {
        validate_rank(0, 1).unwrap();
        assert!(validate_rank(1, 1).unwrap_err().to_string().contains("rank 1"));
        assert!(validate_rank(0, 0).is_err());
    }

    #[test]
    fn tensor_names() {
        validate_tensor_name("model.layers.0.weight").unwrap();
        assert!(validate_tensor_name("__metadata__").is_err());
        assert!(validate_tensor_name("").is_err());
        assert!(validate_tensor_name("a\nb").is_err());
    }
}
