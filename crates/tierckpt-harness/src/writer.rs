//! A client that writes one shard through the zero-copy path and
//! can pause at any phase, so that crash tests can SIGKILL a real client
//! process at that moment (the `tierckpt-test-writer` binary).

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;
use tierckpt_client::Client;
use tierckpt_format::{Dtype, ShardKey, TensorSpec};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
/// Where the writer pauses.
pub enum Phase {
    /// After the reservation, before writing.
    Reserved,
    /// Half the bytes written.
    HalfWritten,
    /// All bytes written, before seal.
    Written,
    /// Seal acknowledged, before the shard is known to be visible.
    Sealed,
    /// Do not pause: write, seal, wait until visible, exit.
    Never,
}

#[derive(clap::Args, Debug, Clone)]
/// What the writer writes, and where it pauses.
pub struct WriterArgs {
    #[arg(long)]
    /// Namespace of the shard.
    pub namespace: String,
    #[arg(long)]
    /// Its step.
    pub step: u64,
    #[arg(long, default_value_t = 0)]
    /// Its rank.
    pub rank: u32,
    #[arg(long, default_value_t = 1)]
    /// Ranks of the step.
    pub world_size: u32,
    /// Payload bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub bytes: usize,
    #[arg(long, default_value_t = 1)]
    /// Seed of the payload's bytes.
    pub seed: u8,
    #[arg(long, value_enum, default_value = "never")]
    /// The phase to pause at (forever, until killed).
    pub pause_at: Phase,
}

/// The payload the writer stores: byte i is `i * 131 + seed` (mod 256).
pub fn payload(bytes: usize, seed: u8) -> Vec<u8> {
    (0..bytes).map(|i| (i as u8).wrapping_mul(131).wrapping_add(seed)).collect()
}

fn announce(phase: &str) {
    println!("{}", serde_json::json!({ "phase": phase }));
    let _ = std::io::stdout().flush();
}

fn pause(at: Phase, now: Phase) {
    if at == now {
        announce(&format!("{now:?}"));
        loop {
            std::thread::park();
        }
    }
}

/// Writes the shard through `c`, pausing at `a.pause_at` and announcing each pause on stdout.
pub fn run_writer(a: &WriterArgs, mut c: Client) -> Result<()> {
    let key = ShardKey::new(&a.namespace, a.step, a.rank);
    let spec = [TensorSpec { name: "payload".into(), dtype: Dtype::U8, shape: vec![a.bytes] }];
    let meta = BTreeMap::from([("seed".to_string(), a.seed.to_string())]);
    let data = payload(a.bytes, a.seed);
    let mut p = c.begin_save(&key, a.world_size, &spec, &meta)?;
    pause(a.pause_at, Phase::Reserved);
    let dst = p.tensor_mut("payload").expect("payload tensor");
    let half = a.bytes / 2;
    dst[..half].copy_from_slice(&data[..half]);
    pause(a.pause_at, Phase::HalfWritten);
    dst[half..].copy_from_slice(&data[half..]);
    pause(a.pause_at, Phase::Written);
    p.seal(a.pause_at != Phase::Sealed)?;
    pause(a.pause_at, Phase::Sealed);
    announce("visible");
    Ok(())
}
