//! The `tierckpt` command-line tool as a library: inspection commands, the
//! demo (the main job), benchmarks, the supervisor (`tierckpt run`) and the
//! soak under random faults, and the goodput simulator.

pub mod bench;
pub mod commands;
pub mod demo;
pub mod output;
pub mod signals;
pub mod simulate;
pub mod soak;
pub mod supervise;
