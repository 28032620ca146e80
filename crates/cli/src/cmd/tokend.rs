//! `nitrile tokend`: run the token service, and manage its signing keys.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use nitrile_api::{Name, PrincipalId};
use nitrile_cell::CellLayout;
use nitrile_logclient::LogdTarget;
use nitrile_tokend::{KeyRing, Tokend, TokendConfig};

use crate::Global;
use crate::output::{errln, outln};
use crate::service::{LogFormat, block_on, init_logging};

/// Run the token service of a cell.
///
/// It authenticates callers by their client certificate, checks the
/// reviewer-signed entitlements and quotas, and mints short-lived tokens
/// bound to the caller's certificate; every request is journaled before the
/// answer. Inputs are found in the cell's state directory (as made by
/// `nitrile up`, or by hand with `nitrile pki` and `nitrile entitlements`).
///
/// Example: `nitrile tokend --state ./nitrile-state --listen 127.0.0.1:7443`
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The cell's state directory.
    #[arg(long, value_name = "DIR", default_value = "nitrile-state")]
    state: PathBuf,
    /// The cell name (read from the state's cell.toml when omitted).
    #[arg(long)]
    cell: Option<Name>,
    /// mTLS listen address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Loopback address for Prometheus metrics (`GET /metrics`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// The longest lifetime of a token this service grants, in seconds:
    /// 1 to 300 [default: 300]. Requests for longer tokens are refused.
    #[arg(long, value_name = "SECS")]
    max_token_lifetime: Option<u64>,
    /// Ship the journal to the audit log service at ADDR (`host:port`,
    /// principal `nitrile://<cell>/service/logd`); without it the journal
    /// is not shipped.
    #[arg(long, value_name = "ADDR")]
    logd: Option<String>,
    /// The audit log's public key file (`log.vkey`): with `--logd`, the
    /// checkpoint that last covered the journal is remembered in
    /// `<state>/tokend/log-anchor.json` and an alert is journaled when the
    /// log is not consistent with it.
    #[arg(long, value_name = "FILE", requires = "logd")]
    log_key: Option<PathBuf>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    keys: Option<KeysCommand>,
}

#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// List the signing keys; the current one signs new tokens.
    ///
    /// Example: `nitrile tokend --state ./nitrile-state list-keys`
    ListKeys,
    /// Generate a new signing key and make it current. The old key stays
    /// published (its tokens stay valid) until retired.
    ///
    /// Example: `nitrile tokend --state ./nitrile-state rotate-key`
    RotateKey,
    /// Delete an old signing key; hosts that pin the new published set refuse
    /// its tokens.
    ///
    /// Example: `nitrile tokend --state ./nitrile-state retire-key Xy3...`
    RetireKey {
        /// The key id to retire.
        kid: String,
    },
}

/// The cell name recorded in a state directory.
pub(crate) fn cell_of(layout: &CellLayout) -> anyhow::Result<Name> {
    let path = layout.cell_file();
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} not found: is this a cell state directory (`nitrile up`)?",
            path.display()
        )
    })?;
    let name = text
        .lines()
        .find_map(|l| l.strip_prefix("cell = "))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .with_context(|| format!("{} names no cell", path.display()))?;
    Ok(Name::new(&name)?)
}

/// The token service configuration of a cell state directory; it ships its
/// journal to `logd` when given.
pub(crate) fn config_of(
    layout: &CellLayout,
    cell: &Name,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    max_token_lifetime_secs: Option<u64>,
    logd: Option<LogdTarget>,
) -> anyhow::Result<TokendConfig> {
    let me = PrincipalId::parse(&format!("nitrile://{cell}/service/tokend"))?;
    let (cert, key) = layout.cert_and_key(&me);
    Ok(TokendConfig {
        cell: cell.clone(),
        state_dir: layout.tokend_dir(),
        ca: layout.ca_cert(),
        cert,
        key,
        entitlements: layout.entitlements_dir(),
        reviewers: layout.reviewers_file(),
        listen,
        metrics,
        max_token_lifetime_secs,
        logd,
    })
}

pub(crate) fn run(args: Args, _global: &Global) -> anyhow::Result<()> {
    let layout = CellLayout::new(&args.state);
    let cell = match args.cell {
        Some(c) => c,
        None => cell_of(&layout)?,
    };
    let me = PrincipalId::parse(&format!("nitrile://{cell}/service/tokend"))?;
    if let Some(cmd) = args.keys {
        let mut ring = KeyRing::init_or_load(&layout.tokend_dir(), me, &mut rand_core::OsRng)?;
        match cmd {
            KeysCommand::ListKeys => {}
            KeysCommand::RotateKey => {
                let kid = ring.rotate(&mut rand_core::OsRng)?;
                errln!("new signing key {kid}; restart tokend to sign with it")?;
            }
            KeysCommand::RetireKey { kid } => {
                ring.retire(&kid)?;
                errln!("retired key {kid}")?;
            }
        }
        for kid in ring.key_ids() {
            let mark = if kid == ring.current() {
                "current"
            } else {
                "published"
            };
            outln!("{kid}  {mark}")?;
        }
        errln!(
            "published set: {}",
            KeyRing::issuer_file_path(&layout.tokend_dir()).display()
        )?;
        return Ok(());
    }
    init_logging(args.log_format);
    let log_vkey = match &args.log_key {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the log key {}", f.display()))?,
        ),
        None => None,
    };
    let logd = args.logd.map(|addr| LogdTarget { addr, log_vkey });
    let config = config_of(
        &layout,
        &cell,
        args.listen,
        args.metrics,
        args.max_token_lifetime,
        logd,
    )?;
    block_on(async move {
        let signal = nitrile_net::shutdown_signal();
        let tokend = Tokend::open(&config)
            .await
            .context("token service cannot start")?;
        tracing::info!(
            listen = ?tokend.local_addr(),
            metrics = ?tokend.metrics_addr(),
            entitlements = tokend.entitlements_digest(),
            entitlements_serial = tokend.entitlements_serial(),
            key_id = tokend.key_id(),
            "token service ready"
        );
        tokend.serve(signal).await?;
        tracing::info!("token service stopped");
        anyhow::Ok(())
    })?
}
