//! Summaries of repeated measurements and the units benchmarks report in.

/// The median of `v`; NaN when it is empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The smallest of `v`; infinity when it is empty.
pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// GiB per second for `bytes` in `s` seconds.
pub fn gibps(bytes: u64, s: f64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_minimums() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(min(&[3.0, 1.5]), 1.5);
        assert_eq!(gibps(1 << 30, 2.0), 0.5);
    }
}
