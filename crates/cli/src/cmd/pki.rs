//! `nitrile pki`.

use crate::Global;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {}

pub(crate) fn run(command: Command, _global: &Global) -> anyhow::Result<()> {
    match command {}
}
