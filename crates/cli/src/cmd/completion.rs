//! `nitrile completion`: shell completions generated from the CLI definition.

use clap::CommandFactory;

/// Print a completion script for a shell.
///
/// Example: `nitrile completion bash > /etc/bash_completion.d/nitrile`
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The shell to generate completions for.
    shell: clap_complete::Shell,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "nitrile", &mut std::io::stdout());
    Ok(())
}
