//! `tierckpt demo`: the main job (being written).

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {}

#[derive(clap::Args, Debug, Clone)]
pub struct TrainerArgs {}

pub fn run(_args: &DemoArgs, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("the demo is not built yet")
}

pub fn run_trainer(_args: &TrainerArgs) -> anyhow::Result<()> {
    anyhow::bail!("the demo trainer is not built yet")
}
