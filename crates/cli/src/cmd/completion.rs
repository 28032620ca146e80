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
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "nitrile", &mut script);
    crate::output::print_script(&String::from_utf8_lossy(&script))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    #[test]
    fn completion_scripts_reach_the_shell_unchanged() {
        for shell in clap_complete::Shell::value_variants() {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut crate::Cli::command(), "nitrile", &mut script);
            let script = String::from_utf8(script).unwrap();
            let odd: Vec<char> = script
                .chars()
                .filter(|&c| crate::output::is_unsafe(c) && c != '\n' && c != '\t')
                .collect();
            assert!(odd.is_empty(), "{shell}: {odd:?}");
        }
    }
}
