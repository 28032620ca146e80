//! `nitrile up`.

use crate::Global;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

pub(crate) fn run(_args: Args, _global: &Global) -> anyhow::Result<()> {
    anyhow::bail!("nitrile up is not built yet")
}
