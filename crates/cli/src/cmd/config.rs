//! `nitrile config`: what configuration is in effect and where it came from.

use serde::Serialize;

use crate::config;
use crate::{Global, output::Output};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Print the client config in effect and which file it came from.
    ///
    /// The file is found from `--config FILE`, else `$NITRILE_CONFIG`, else
    /// `~/.config/nitrile/config.toml`.
    ///
    /// Example: `nitrile config show -o json`
    Show,
}

#[derive(Serialize)]
struct Shown<'a> {
    path: String,
    source: String,
    config: &'a nitrile_cell::ClientConfig,
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    match command {
        Command::Show => {
            let loaded = config::load(global)?;
            let shown = Shown {
                path: loaded.path.display().to_string(),
                source: loaded.source.to_string(),
                config: &loaded.config,
            };
            match global.output {
                Output::Json => crate::output::print_json(&shown),
                Output::Table => {
                    crate::output::outln!("# {} (from {})", shown.path, shown.source)?;
                    crate::output::print_text(
                        crate::output::Stream::Stdout,
                        &toml::to_string_pretty(&loaded.config)?,
                    )?;
                    Ok(())
                }
            }
        }
    }
}
