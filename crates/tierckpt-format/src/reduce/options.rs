//! What the codec may use: [`Compression`] (parsed from and shown as
//! `"off"`, `"lz4"`, `"zstd"` or `"zstd:N"`) and [`ReduceOptions`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::FormatError;

/// Zstd level used by `"zstd"` without a level. Measured by `tierckpt bench
/// reduce` (256 MiB checkpoints, 2 cores): level 3 compresses no better than
/// level 1 on checkpoint data (floats shrink through their sign and exponent
/// bytes, which level 1 already entropy-codes) and encodes 1.4-2x slower;
/// lz4 compresses worse (0.84-0.92 of the size against 0.72-0.84) and
/// decodes XOR deltas of sparse changes slower than zstd.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// The highest zstd level accepted.
pub(super) const MAX_ZSTD_LEVEL: i32 = 19;

/// How chunks are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Not at all: chunks are stored raw (or taken from the base).
    #[default]
    Off,
    /// lz4 block compression.
    Lz4,
    /// Zstd at a level in 1..=19.
    Zstd(i32),
}

impl Compression {
    /// An error unless a zstd level is in 1..=19.
    pub(super) fn check(self) -> Result<(), FormatError> {
        match self {
            Compression::Zstd(level) if !(1..=MAX_ZSTD_LEVEL).contains(&level) => {
                Err(FormatError::InvalidArgument(format!("zstd level {level} is not in 1..={MAX_ZSTD_LEVEL}")))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

impl FromStr for Compression {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, FormatError> {
        let bad = || {
            FormatError::InvalidArgument(format!(
                "compression {s:?} is not one of \"off\", \"lz4\", \"zstd\" (level {DEFAULT_ZSTD_LEVEL}) or \"zstd:N\" with N in 1..={MAX_ZSTD_LEVEL}"
            ))
        };
        match s {
            "off" => Ok(Compression::Off),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd(DEFAULT_ZSTD_LEVEL)),
            _ => {
                let level = s.strip_prefix("zstd:").ok_or_else(bad)?;
                if level.is_empty() || !level.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let level: i32 = level.parse().map_err(|_| bad())?;
                if !(1..=MAX_ZSTD_LEVEL).contains(&level) {
                    return Err(bad());
                }
                Ok(Compression::Zstd(level))
            }
        }
    }
}

impl Serialize for Compression {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Compression {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// What [`encode`](super::encode) may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReduceOptions {
    /// How chunks are compressed.
    pub compression: Compression,
    /// Encode against a base (the previous checkpoint) where one is given.
    pub delta: bool,
}
