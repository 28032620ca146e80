//! `nitrile deployd`: run the deployment service.

use anyhow::Context;
use nitrile_deployd::{DeploydConfig, DeploydServer};

use crate::Global;
use crate::service::{LogFormat, block_on, exit_with_parent, init_logging};

/// Run the deployment service of a cell: rollouts of signed releases to
/// the cell's hosts, in waves.
///
/// On-call operators call it (`nitrile deploy start|status|abort`), each
/// with a token for audience `deployer` naming `deployment/<cell>`. For a
/// rollout it calls each host of its fleet (`[hosts]`, in name order) with
/// its own identity (`service/deployer`) and a token for exactly that
/// call: `host.update` (the host fetches and checks the release from its
/// own pinned repository and hands over to it live), then `host.describe`
/// until the host serves the version, within `health_timeout_secs`. A wave
/// then bakes (`bake_secs`) and is checked again. At the first host that
/// fails, the rollout stops and no later host is called. Every request,
/// refusal and step is journaled; with `[logd]` the journal is shipped to
/// the audit log.
///
/// The global `--config` names its config file (TOML; `nitrile up` writes
/// one to `<state>/deployd/deployd.toml`). On SIGINT or SIGTERM it stops
/// accepting, finishes in-flight requests and exits 0; a rollout in progress
/// is recorded `interrupted` at its next start.
///
/// Example: `nitrile deployd --config ./nitrile-state/deployd/deployd.toml`
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Get SIGTERM when process PID (the supervisor that started the
    /// deployment service) dies, and exit at once if it is already gone.
    /// `nitrile up` passes it.
    #[arg(long, value_name = "PID")]
    exit_with_parent: Option<i32>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

pub(crate) fn run(args: Args, global: &Global) -> anyhow::Result<()> {
    let path = global.config.as_deref().context(
        "no deployment service config: pass --config FILE (e.g. ./nitrile-state/deployd/deployd.toml)",
    )?;
    let config = DeploydConfig::load(path)?;
    if let Some(parent) = args.exit_with_parent {
        exit_with_parent(parent)?;
    }
    init_logging(args.log_format);
    block_on(async move {
        let signal = nitrile_net::shutdown_signal();
        let deployd = DeploydServer::open(&config)
            .await
            .context("deployment service cannot start")?;
        let addr = deployd
            .local_addr()
            .map_or_else(|| config.listen.to_string(), |a| a.to_string());
        crate::output::errln!("nitrile deployd: serving on {addr}")?;
        deployd.serve(signal).await?;
        tracing::info!("deployment service stopped");
        anyhow::Ok(())
    })?
}
