//! The `tierckpt` command-line tool as a library: inspection commands, the
//! demo (the main job), benchmarks, and the supervisor (`tierckpt run`).

pub mod bench;
pub mod bench_persist;
pub mod bench_reduce;
pub mod commands;
pub mod demo;
pub mod output;
pub mod signals;
pub mod supervise;
