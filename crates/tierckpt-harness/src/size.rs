//! Sizes and rates as people write them on a command line: "300MB" (powers
//! of 1000), "512MiB" (powers of 1024), "1.5GB", a byte count, and for a
//! rate also "off". The daemon reads its own settings with the same crate.

/// Parses a size such as "300MB", "512MiB" or "1.5GB".
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s.trim())
        .map_err(|e| format!("{s:?} is not a size ({e}); write it like \"300MB\", \"512MiB\" or a byte count"))
}

/// Bytes per second, or none ("off").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub Option<u64>);

/// Parses a rate: a size per second, or "off".
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    match s.trim() {
        "off" => Ok(Rate(None)),
        r => parse_size(r).map(|b| Rate(Some(b))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates() {
        assert_eq!(parse_size("300MB").unwrap(), 300_000_000);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size(" 4096 ").unwrap(), 4096);
        assert!(parse_size("lots").unwrap_err().contains("\"lots\""));
        assert_eq!(parse_rate("off").unwrap(), Rate(None));
        assert_eq!(parse_rate("1GB").unwrap(), Rate(Some(1_000_000_000)));
    }
}
