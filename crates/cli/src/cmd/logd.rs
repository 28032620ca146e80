//! `nitrile logd`: run the audit log service.

use std::sync::Arc;

use anyhow::Context;
use nitrile_logd::{Alert, AlertSink, Logd, LogdConfig, LogdOptions};

use crate::Global;
use crate::service::{LogFormat, block_on, init_logging};

/// Run the audit log service of a cell.
///
/// It ingests the journals that hosts and the token service ship to it
/// over mTLS (each source may ship only its own journal; a gap or a broken
/// hash chain is refused and raises an integrity alert), appends every
/// record to a Merkle tree laid out as C2SP tlog-tiles, signs a
/// checkpoint every interval in which it grew, and serves checkpoints,
/// tiles, entries, proofs and alerts to auditors (an `audit.read` token
/// for `log/<cell>` at audience `logd`; every read is journaled, and its
/// own journal goes into the log too). There is no delete or rewrite
/// operation. The global `--config` names its config file (TOML;
/// `nitrile up` writes one to `<state>/logd/logd.toml`). Alerts are printed
/// on stdout as JSON lines. With `metrics = "127.0.0.1:<port>"` in the
/// config it serves Prometheus metrics at `http://<addr>/metrics` (loopback
/// only; any other address is refused).
///
/// On SIGINT or SIGTERM it stops accepting, publishes a last checkpoint
/// and exits 0.
///
/// Example: `nitrile logd --config ./nitrile-state/logd/logd.toml`
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Alerts as JSON lines on stdout, through the output layer (JSON-safe:
/// no raw control or bidi character from a forged source reaches a
/// terminal). A reader that went away does not stop the service: every
/// alert is also journaled and served.
struct JsonLineAlerts;

impl AlertSink for JsonLineAlerts {
    fn alert(&self, alert: &Alert) {
        let _ = crate::output::print_json_lines([alert]);
    }
}

pub(crate) fn run(args: Args, global: &Global) -> anyhow::Result<()> {
    let path = global
        .config
        .as_deref()
        .context("no logd config: pass --config FILE (e.g. ./nitrile-state/logd/logd.toml)")?;
    let config = LogdConfig::load(path)?;
    init_logging(args.log_format);
    block_on(async move {
        // Installed before the readiness line, so that a signal sent right
        // after it stops the service cleanly.
        let signal = nitrile_net::shutdown_signal();
        let logd = Logd::open(
            &config,
            LogdOptions {
                stdout_alerts: false,
                alert_sinks: vec![Arc::new(JsonLineAlerts)],
                ..LogdOptions::default()
            },
        )
        .await
        .context("audit log service cannot start")?;
        let addr = logd
            .local_addr()
            .map_or_else(|| config.listen.to_string(), |a| a.to_string());
        tracing::info!(
            origin = logd.origin(),
            vkey = %logd.log_vkey(),
            metrics = ?logd.metrics_addr(),
            "audit log ready"
        );
        crate::output::errln!("nitrile logd: serving on {addr}")?;
        if let Some(m) = logd.metrics_addr() {
            crate::output::errln!("nitrile logd: metrics on http://{m}/metrics")?;
        }
        logd.serve(signal).await?;
        tracing::info!("audit log service stopped");
        anyhow::Ok(())
    })?
}
