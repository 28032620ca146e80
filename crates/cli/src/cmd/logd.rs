//! `nitrile logd`: run the audit log service; and shipping a service's
//! journal to it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use nitrile_api::Name;
use nitrile_audit::Journal;
use nitrile_logclient::{AnchorOptions, Shipper, ShipperHandle, ShipperOptions};
use nitrile_logd::{Alert, AlertSink, Logd, LogdConfig, LogdOptions};
use nitrile_pki::tls::{CaRoots, TlsIdentity};

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

/// Starts shipping the journal at `journal` to logd at `addr`, as the
/// principal of the certificate `cert` (the journal's source); `writer` is
/// the journal open in this process, whose durable head goes with each batch.
/// With `log_vkey` (the log's pinned key) the journal is also anchored in the
/// log: the checkpoint last found covering it is remembered in
/// `anchor_file`. Must be called within a tokio runtime; stop it with
/// [`ShipperHandle::stop`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn ship_journal(
    journal: PathBuf,
    writer: Arc<Journal>,
    addr: &str,
    cell: &Name,
    ca: &Path,
    cert: &Path,
    key: &Path,
    log_vkey: Option<(&str, PathBuf)>,
) -> anyhow::Result<ShipperHandle> {
    let anchor = match log_vkey {
        Some((vkey, state_file)) => Some(AnchorOptions {
            origin: nitrile_logd::log_origin(cell),
            verifier: nitrile_tlog::NoteVerifier::from_vkey(vkey.trim())
                .context("the audit log's key (log_vkey) is not a signed-note vkey")?,
            state_file,
            interval: nitrile_logclient::shipper::DEFAULT_ANCHOR_INTERVAL,
        }),
        None => None,
    };
    let roots = CaRoots::load(ca).with_context(|| format!("cell CA {}", ca.display()))?;
    let identity = TlsIdentity::load(cert, key)
        .with_context(|| format!("certificate {} and key {}", cert.display(), key.display()))?;
    let tls = nitrile_pki::tls::client_config(&roots, &identity)?;
    Ok(Shipper::spawn_with(
        journal,
        addr.to_owned(),
        crate::logapi::logd_principal(cell),
        tls,
        ShipperOptions {
            journal: Some(writer),
            anchor,
            ..ShipperOptions::default()
        },
    ))
}
