//! `nitrile audit witness`: run a checkpoint witness, and make its key.

use std::path::PathBuf;

use anyhow::Context;
use nitrile_witness::{Witness, WitnessConfig, WitnessService, write_signing_key};

use crate::Global;
use crate::service::{LogFormat, block_on, init_logging};

/// Run a checkpoint witness (C2SP tlog-witness over the cell's mTLS).
///
/// It cosigns a log's checkpoint only if the log signed it and it extends,
/// by a verified consistency proof, the checkpoint it last cosigned for
/// that log; the new state is on disk before the cosignature leaves. Two
/// different checkpoints of the same size are refused and reported as a
/// split view.
///
/// Example: `nitrile audit witness --config witness.toml`
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct Args {
    /// The witness configuration (TOML: cell, name, listen, state, ca,
    /// cert, key, [[logs]] origin and vkey).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Get SIGTERM when process PID (the supervisor that started this
    /// witness) dies, and exit at once if it is already gone. `nitrile up`
    /// passes it.
    #[arg(long, value_name = "PID")]
    exit_with_parent: Option<i32>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Generate a witness cosigning key (cosignature/v1, Ed25519). Writes
    /// the private key to FILE (mode 0600; never replaces a file) and
    /// prints the public vkey to give to the logs.
    ///
    /// Example: `nitrile audit witness keygen --name local.nitrile/witness/w1 --out witness/cosigner.skey`
    Keygen {
        /// The key name, a schema-less URL (e.g. `local.nitrile/witness/w1`).
        #[arg(long, value_name = "N")]
        name: String,
        /// Where to write the private key.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

pub(crate) fn run(args: Args, global: &Global) -> anyhow::Result<()> {
    if let Some(Command::Keygen { name, out }) = args.command {
        let key = Witness::generate_key(&name)
            .with_context(|| format!("cannot make a key named {name:?}"))?;
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        write_signing_key(&out, &key)?;
        crate::output::errln!("private key written to {}", out.display())?;
        crate::output::outln!("{}", key.verifier().to_vkey())?;
        return Ok(());
    }
    // `--config` after `witness`, or the global one before it.
    let Some(path) = args.config.or_else(|| global.config.clone()) else {
        anyhow::bail!(
            "--config FILE is required to run the witness (or use `nitrile audit witness keygen`)"
        );
    };
    init_logging(args.log_format);
    let config = WitnessConfig::load(&path)?;
    if let Some(parent) = args.exit_with_parent {
        crate::service::exit_with_parent(parent)?;
    }
    block_on(async move {
        // Installed before the readiness line, so that a signal sent right
        // after it stops the witness cleanly.
        let signal = nitrile_net::shutdown_signal();
        let service = WitnessService::open(&config)
            .await
            .context("witness cannot start")?;
        let addr = service
            .local_addr()
            .map_or_else(|| config.listen.to_string(), |a| a.to_string());
        tracing::info!(
            listen = %addr,
            principal = %config.principal(),
            "witness ready"
        );
        crate::output::errln!("nitrile audit witness: serving on {addr}")?;
        service.serve(signal).await?;
        tracing::info!("witness stopped");
        anyhow::Ok(())
    })?
}
