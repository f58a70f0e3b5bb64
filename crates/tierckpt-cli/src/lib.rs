//! The `tierckpt` command-line tool as a library: inspection commands, the
//! demo (the main job), benchmarks, and the supervisor (`tierckpt run`).

pub mod bench;
pub mod commands;
pub mod demo;
pub mod output;
pub mod signals;
pub mod supervise;
