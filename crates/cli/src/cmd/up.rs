//! `nitrile up`: a whole cell on this machine.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use nitrile_api::Name;
use nitrile_cell::{CellLayout, bootstrap};
use nitrile_tokend::Tokend;

use crate::Global;
use crate::service::{LogFormat, block_on, init_logging};

/// Run a whole cell on this machine: the cell CA, a reviewer-signed sample
/// entitlement bundle, the token service with its audit journal, and client
/// configs for the sample principals, all on loopback mutual TLS under one
/// state directory.
///
/// The first start creates everything; later starts reuse the state and
/// renew the short-lived certificates. When ready it prints what runs where
/// and a line `export NITRILE_CONFIG=<path>` for the CLI. Ctrl-C stops it.
///
/// Example: `nitrile up --state ./nitrile-state`
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// State directory of the cell.
    #[arg(long, value_name = "DIR", default_value = "nitrile-state")]
    state: PathBuf,
    /// Cell name (the sample entitlements are written for `local`).
    #[arg(long, default_value = nitrile_cell::sample::SAMPLE_CELL)]
    cell: Name,
    /// Token service mTLS address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    tokend_listen: SocketAddr,
    /// Loopback address for the token service's Prometheus metrics.
    #[arg(long, default_value = "127.0.0.1:9443")]
    tokend_metrics: SocketAddr,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

pub(crate) fn run(args: Args, _global: &Global) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let layout = CellLayout::new(&args.state);
    let now = time::OffsetDateTime::now_utc();
    eprintln!(
        "nitrile up: preparing cell {:?} in {}",
        args.cell.as_str(),
        layout.root().display()
    );
    let cell = bootstrap(&layout, &args.cell, &args.tokend_listen.to_string(), now)
        .context("cannot prepare the cell")?;
    let tokend_config = super::tokend::config_of(
        &layout,
        &cell.cell,
        args.tokend_listen,
        Some(args.tokend_metrics),
    )?;
    block_on(async move {
        let tokend = Tokend::open(&tokend_config)
            .await
            .with_context(|| format!("token service cannot start on {}", args.tokend_listen))?;
        let listen = tokend
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let clients = nitrile_cell::write_client_configs(&layout, &cell.cell, &listen)?;
        let alice = clients
            .iter()
            .find(|(p, _)| p.name.as_str() == "alice")
            .map(|(_, path)| path.clone())
            .context("no client config for alice")?;
        let listen = tokend
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let metrics = tokend
            .metrics_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        println!(
            "nitrile cell {:?} is up ({})",
            cell.cell.as_str(),
            if cell.first_start {
                "created"
            } else {
                "reused"
            }
        );
        println!();
        println!("  state          {}", layout.root().display());
        println!("  cell CA        {}", layout.ca_cert().display());
        println!("  tokend         {listen} (mTLS)   metrics http://{metrics}/metrics");
        println!("  journal        {}", layout.tokend_journal().display());
        println!(
            "  entitlements   {} (sha256 {}, signed by {})",
            layout.entitlements_dir().display(),
            &cell.bundle_digest[..16],
            cell.reviewers
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("  issuer keys    {}", layout.issuer_keys_file().display());
        println!("  clients        {}", layout.clients_dir().display());
        println!();
        println!("Try, in another shell:");
        println!("  nitrile token request --op host.describe --resource host/h1 --audience h1");
        println!(
            "  nitrile token request --op host.drain --resource host/h1 --audience h1 | nitrile token inspect --issuer-keys {}",
            layout.issuer_keys_file().display()
        );
        println!(
            "  nitrile audit show-journal {}",
            layout.tokend_journal().display()
        );
        println!();
        println!("Ctrl-C stops the cell.");
        println!("export NITRILE_CONFIG={}", alice.display());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokend.serve(nitrile_net::shutdown_signal()).await?;
        eprintln!(
            "nitrile up: stopped; state kept in {}",
            layout.root().display()
        );
        anyhow::Ok(())
    })?
}
