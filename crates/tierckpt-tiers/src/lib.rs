//! Tiers of tierckpt: one [`Tier`] trait, the memory tier on tmpfs, the
//! persistent tier, the fault-injecting store adapter, and the conformance
//! suite that every tier passes.
//!
//! The conformance suite is compiled only with the `conformance` feature,
//! which tests enable: production builds never carry it.

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
pub mod faults;
pub mod memory;
pub mod persistent;
pub mod private_fs;
pub mod receive;
mod tier;

pub use error::{ErrorKind, TierError, WireError};
pub use memory::{LeasedMap, MemoryTier, MemoryTierConfig, Reservation, ReservationGuard, ReserveOptions};
pub use persistent::{PersistOptions, PersistentTier};
pub use tier::{ShardBytes, Tier};
pub use tierckpt_proto::StepSummary;

/// The result of a tier operation.
pub type Result<T, E = TierError> = std::result::Result<T, E>;

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
