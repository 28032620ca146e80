//! `nitrile kms`: run the key service.

use anyhow::Context;
use nitrile_kms::{KmsConfig, KmsServer};

use crate::Global;
use crate::service::{LogFormat, block_on, exit_with_parent, init_logging};

/// Run the key service of a cell.
///
/// It holds the cell's key-encryption keys (`kms-key/<name>`), which never
/// leave it. A host relays the token its caller presented for
/// `volume.create`, `volume.attach` or `volume.delete` over the host's own
/// certificate; the key service checks that token itself (signature,
/// expiry, the host as audience, the volume, single use) and makes the
/// volume's data key (returned wrapped), releases it sealed to the key the
/// VMM made inside its jail (the host cannot open it), or destroys the
/// volume's key record (crypto-erase). Customers create, disable, enable
/// and schedule the deletion of their own keys with tokens for audience
/// `kms`; no other principal changes a customer's key or uses it. A
/// disabled key refuses every new attach, naming the key; volumes attached
/// before keep running until detached. Keys whose deletion window ended
/// are destroyed with every volume key under them. Every request and
/// refusal is journaled before the answer.
///
/// The global `--config` names its config file (TOML; `nitrile up` writes
/// one to `<state>/kms/kms.toml`). With `[logd]` in it, the journal is
/// shipped to the audit log. On SIGINT or SIGTERM it stops accepting,
/// finishes in-flight requests and exits 0.
///
/// Example: `nitrile kms --config ./nitrile-state/kms/kms.toml`
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Get SIGTERM when process PID (the supervisor that started the key
    /// service) dies, and exit at once if it is already gone. `nitrile up`
    /// passes it.
    #[arg(long, value_name = "PID")]
    exit_with_parent: Option<i32>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

pub(crate) fn run(args: Args, global: &Global) -> anyhow::Result<()> {
    let path = global
        .config
        .as_deref()
        .context("no key service config: pass --config FILE (e.g. ./nitrile-state/kms/kms.toml)")?;
    let config = KmsConfig::load(path)?;
    if let Some(parent) = args.exit_with_parent {
        exit_with_parent(parent)?;
    }
    init_logging(args.log_format);
    block_on(async move {
        // Installed before the readiness line, so that a signal sent right
        // after it stops the service cleanly.
        let signal = nitrile_net::shutdown_signal();
        let kms = KmsServer::open(&config)
            .await
            .context("key service cannot start")?;
        let addr = kms
            .local_addr()
            .map_or_else(|| config.listen.to_string(), |a| a.to_string());
        let opened = kms.kms().open_report();
        tracing::info!(
            keys = opened.keys,
            volumes = opened.volumes,
            metrics = ?kms.metrics_addr(),
            "key service ready"
        );
        crate::output::errln!("nitrile kms: serving on {addr}")?;
        if let Some(m) = kms.metrics_addr() {
            crate::output::errln!("nitrile kms: metrics on http://{m}/metrics")?;
        }
        kms.serve(signal).await?;
        tracing::info!("key service stopped");
        anyhow::Ok(())
    })?
}
