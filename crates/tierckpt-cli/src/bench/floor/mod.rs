//! The floors: the cheapest way to move the same bytes as a benchmark,
//! measured in the same run so that a ratio can be read on any machine:
//! a one-thread memcpy ([`memcpy`]), a plain TCP copy on loopback
//! ([`tcp`]), a raw write + fsync or a boto3 upload ([`store`]).

pub(crate) mod store;
pub(crate) mod tcp;

use std::time::Instant;

/// One thread copies each source into its target, one tensor at a time;
/// returns the seconds it took.
pub(crate) fn memcpy(sources: &[&[u8]], targets: &mut [(&str, &mut [u8])]) -> f64 {
    let t = Instant::now();
    for (src, (_, d)) in sources.iter().zip(targets.iter_mut()) {
        d.copy_from_slice(src);
    }
    std::hint::black_box(&mut *targets);
    t.elapsed().as_secs_f64()
}
