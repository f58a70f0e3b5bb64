//! The `tierckpt` command-line tool as a library: inspection commands, the
//! demo (the main job), benchmarks, and helpers to run a daemon process.

pub mod bench;
pub mod bench_persist;
pub mod commands;
pub mod daemon_proc;
pub mod demo;
pub mod output;
pub mod testkit;
