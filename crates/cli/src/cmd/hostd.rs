//! `nitrile hostd`: run the host agent.

use anyhow::Context;
use nitrile_hostd::{Hostd, HostdConfig, HostdOptions};

use crate::Global;
use crate::service::{LogFormat, block_on, init_logging};

/// Run the host agent: the only management interface of this host.
///
/// It serves the closed admin API (host.describe, host.drain/undrain,
/// instance.launch/list/describe/stop/start/terminate,
/// volume.create/list/describe/attach/detach/delete) on one mTLS port,
/// verifies every caller's token itself, journals every request before it
/// acts, and runs instances as microVMs. The global `--config` names the
/// host agent's config file (TOML; `nitrile up` writes one to
/// `<state>/hosts/h1/hostd.toml`). Metrics are written to
/// `<state>/metrics.prom`, not served.
///
/// Volumes need the config's `kms = { addr = "HOST:PORT" }`, the key
/// service that makes, releases and destroys their keys (the host keeps
/// them only wrapped), and `volumes = DIR`, the cell's volume store, one
/// directory shared by the host agents of the cell.
///
/// When the config has a `[logd]` section, the journal is shipped to that
/// audit log service as it grows (resuming where the log stands after any
/// restart or disconnect); with its `log_vkey`, the agent also remembers the
/// last checkpoint that covered its journal (`<state>/log-anchor.json`) and
/// raises an alert in its journal when the log is not consistent with it.
///
/// On SIGINT or SIGTERM it stops accepting, finishes in-flight requests and
/// exits 0; instances keep running for the next host agent to adopt unless
/// `--stop-instances-on-exit` is given.
///
/// Example: `nitrile hostd --config ./nitrile-state/hosts/h1/hostd.toml`
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Stop running instances when the agent exits (recorded `stopped`,
    /// reason "host agent shut down").
    #[arg(long)]
    stop_instances_on_exit: bool,
    /// Get SIGTERM when process PID (the supervisor that started this agent)
    /// dies, and exit at once if it is already gone. `nitrile up` passes it.
    #[arg(long, value_name = "PID")]
    exit_with_parent: Option<i32>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

pub(crate) fn run(args: Args, global: &Global) -> anyhow::Result<()> {
    let path = global.config.as_deref().context(
        "no host agent config: pass --config FILE (e.g. ./nitrile-state/hosts/h1/hostd.toml)",
    )?;
    let config = HostdConfig::load(path)?;
    if let Some(parent) = args.exit_with_parent {
        // Set first, then check: a parent that died in between is seen by
        // the check.
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
            .context("cannot ask for a signal when the parent exits")?;
        if nix::unistd::getppid().as_raw() != parent {
            anyhow::bail!("the supervisor (pid {parent}) is gone; not starting");
        }
    }
    init_logging(args.log_format);
    let options = HostdOptions {
        stop_instances_on_exit: args.stop_instances_on_exit,
        ..HostdOptions::default()
    };
    block_on(async move {
        // Installed before the readiness line, so that a signal sent right
        // after it stops the agent cleanly.
        let signal = nitrile_net::shutdown_signal();
        let hostd = Hostd::open(&config, options)
            .await
            .context("host agent cannot start")?;
        let addr = hostd
            .local_addr()
            .map_or_else(|| config.listen.to_string(), |a| a.to_string());
        crate::output::errln!("nitrile hostd: {} serving on {addr}", config.host)?;
        hostd.serve(signal).await?;
        tracing::info!("host agent stopped");
        anyhow::Ok(())
    })?
}
