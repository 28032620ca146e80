//! `nitrile placed`: run the placement service.

use anyhow::Context;
use nitrile_placed::{PlacedConfig, PlacedServer};

use crate::Global;
use crate::service::{LogFormat, block_on, exit_with_parent, init_logging};

/// Run the placement service of a cell: customers' API for their
/// instances and images.
///
/// Only customers call it (`nitrile customer ...`), each with a token for
/// audience `placement` naming exactly its own resource; operators,
/// auditors and services are refused, journaled. To run an instance it
/// describes every host of its fleet (`[hosts]`), skips drained, unhealthy,
/// full and unreachable ones, picks the one with the fewest instances of
/// that customer, then the fewest in all, and launches there with its own
/// identity (`service/placement`) and a token for exactly that call. It
/// records which host runs what, gives each customer a network of its own
/// (a VNI, addresses in 10.80.0.0/24) and pushes the cell's network to
/// every host after each change. Images are imported into the cell's image
/// store, all or nothing. Every request and refusal is journaled before
/// the answer.
///
/// The global `--config` names its config file (TOML; `nitrile up` writes
/// one to `<state>/placed/placed.toml`). With `[logd]` in it, the journal
/// is shipped to the audit log. On SIGINT or SIGTERM it stops accepting,
/// finishes in-flight requests and exits 0.
///
/// Example: `nitrile placed --config ./nitrile-state/placed/placed.toml`
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Get SIGTERM when process PID (the supervisor that started the
    /// placement service) dies, and exit at once if it is already gone.
    /// `nitrile up` passes it.
    #[arg(long, value_name = "PID")]
    exit_with_parent: Option<i32>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

pub(crate) fn run(args: Args, global: &Global) -> anyhow::Result<()> {
    let path = global.config.as_deref().context(
        "no placement service config: pass --config FILE (e.g. ./nitrile-state/placed/placed.toml)",
    )?;
    let config = PlacedConfig::load(path)?;
    if let Some(parent) = args.exit_with_parent {
        exit_with_parent(parent)?;
    }
    init_logging(args.log_format);
    block_on(async move {
        // Installed before the readiness line, so that a signal sent right
        // after it stops the service cleanly.
        let signal = nitrile_net::shutdown_signal();
        let placed = PlacedServer::open(&config)
            .await
            .context("placement service cannot start")?;
        let addr = placed
            .local_addr()
            .map_or_else(|| config.listen.to_string(), |a| a.to_string());
        tracing::info!(hosts = config.hosts.len(), "placement service ready");
        crate::output::errln!("nitrile placed: serving on {addr}")?;
        placed.serve(signal).await?;
        tracing::info!("placement service stopped");
        anyhow::Ok(())
    })?
}
