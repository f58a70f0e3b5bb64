//! `tierckpt bench`: benchmarks (being written).

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {}

pub fn run(_args: &BenchArgs, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("benchmarks are not built yet")
}
