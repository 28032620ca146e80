//! What every service verb shares: logging and the async runtime.

use std::future::Future;
use std::io::IsTerminal;

/// How services write their log lines (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Starts structured logging to stderr; `RUST_LOG` overrides the level
/// (default `info`).
pub(crate) fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Runs `f` on a multi-threaded tokio runtime.
pub(crate) fn block_on<F: Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}

/// Asks for SIGTERM when the supervisor `parent` (the process that started
/// this one) exits, and fails if it is already gone: a service started by
/// `nitrile up` does not outlive it.
pub(crate) fn exit_with_parent(parent: i32) -> anyhow::Result<()> {
    use anyhow::Context as _;
    // Set first, then check: a parent that died in between is seen by the
    // check.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
        .context("cannot ask for a signal when the parent exits")?;
    if nix::unistd::getppid().as_raw() != parent {
        anyhow::bail!("the supervisor (pid {parent}) is gone; not starting");
    }
    Ok(())
}
