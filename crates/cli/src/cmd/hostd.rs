//! `nitrile hostd`: run the host agent.

use std::ffi::OsString;

use anyhow::Context;
use nitrile_hostd::live::{self, Takeover, Verdict};
use nitrile_hostd::{Hostd, HostdConfig, HostdOptions, Served};

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
/// With `[release]` in the config, `host.update` (by the deployment
/// service) checks and stages a signed release, then this agent hands its
/// listening socket and its instances to the staged binary and exits (a
/// live update: no instance stops, no connection is refused). When the new
/// agent does not report serving with every instance within
/// `health_deadline_secs`, this one serves again (rolled back, journaled).
///
/// A host whose identity is to be enrolled in its TPM (`[tpm] tls_key`
/// naming a file that does not exist yet) serves, with
/// `--await-enrollment`, the enrollment exchange on the agent's port until
/// the cell CA (`nitrile pki enroll-host` over the network) delivers certificates
/// for its TPM's keys, then serves the admin API with them. The host image
/// starts the agent this way.
///
/// Example: `nitrile hostd --config ./nitrile-state/hosts/h1/hostd.toml`
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// When the TPM key the config names does not exist yet, serve the
    /// enrollment exchange on the agent's address first (plain TCP: every
    /// message is checked by its receiver; see `nitrile pki enroll-host`).
    #[arg(long)]
    await_enrollment: bool,
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
    /// Not for people: set by a host agent handing over to this release in
    /// a live update. The two descriptor numbers it passed: its listening
    /// socket and the control socket on which this agent reports serving
    /// and learns whether to go on.
    #[arg(long, value_name = "LISTENER_FD,CONTROL_FD", value_parser = parse_takeover)]
    takeover: Option<(i32, i32)>,
}

fn parse_takeover(s: &str) -> Result<(i32, i32), String> {
    let (l, c) = s
        .split_once(',')
        .ok_or_else(|| "expected LISTENER_FD,CONTROL_FD".to_owned())?;
    let fd = |x: &str| {
        x.parse::<i32>()
            .ok()
            .filter(|n| *n > 2)
            .ok_or_else(|| format!("{x:?} is not a descriptor number above 2"))
    };
    Ok((fd(l)?, fd(c)?))
}

/// The arguments of the agent a live update starts: this one's, without
/// `--takeover` (the hand-over adds its own).
fn successor_args(args: &Args, config: &std::path::Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec!["hostd".into(), "--config".into(), config.into()];
    if args.stop_instances_on_exit {
        out.push("--stop-instances-on-exit".into());
    }
    if let Some(p) = args.exit_with_parent {
        out.push("--exit-with-parent".into());
        out.push(p.to_string().into());
    }
    out.push("--log-format".into());
    out.push(
        match args.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
        .into(),
    );
    out
}

pub(crate) fn run(args: Args, global: &Global) -> anyhow::Result<()> {
    // Inherited descriptors are taken first, before anything else opens one.
    let inherited = match args.takeover {
        None => None,
        Some((l, c)) => {
            let l =
                nitrile_vmm_sys::fd::take_inherited(l).context("the inherited listening socket")?;
            let c =
                nitrile_vmm_sys::fd::take_inherited(c).context("the inherited control socket")?;
            Some((
                std::net::TcpListener::from(l),
                std::os::unix::net::UnixStream::from(c),
            ))
        }
    };
    let path = global.config.as_deref().context(
        "no host agent config: pass --config FILE (e.g. ./nitrile-state/hosts/h1/hostd.toml)",
    )?;
    let config = HostdConfig::load(path)?;
    // The agent handing over is our parent until it exits: the supervisor
    // is followed once it has (see `follow_supervisor`).
    if args.takeover.is_none()
        && let Some(parent) = args.exit_with_parent
    {
        crate::service::exit_with_parent(parent)?;
    }
    init_logging(args.log_format);
    if args.takeover.is_none() && crate::cmd::enroll_exchange::needs_enrollment(&config) {
        if !args.await_enrollment {
            anyhow::bail!(
                "{} is not enrolled: the TPM key its config names does not exist (run with --await-enrollment and enroll it with nitrile pki enroll-host --address)",
                config.host
            );
        }
        crate::cmd::enroll_exchange::serve(&config, &mut |line| {
            let _ = crate::output::errln!("nitrile hostd: {line}");
        })?;
    }
    let options = HostdOptions {
        stop_instances_on_exit: args.stop_instances_on_exit,
        live_update: true,
        ..HostdOptions::default()
    };
    let successor = successor_args(&args, path);
    let deadline = config
        .release
        .as_ref()
        .map_or(nitrile_hostd::live::DEFAULT_HEALTH_DEADLINE, |r| {
            r.health_deadline()
        });
    let host = config.host.clone();
    let supervisor = args.exit_with_parent;
    block_on(async move {
        // Installed before the readiness line, so that a signal sent right
        // after it stops the agent cleanly; kept across a failed hand-over.
        let (signal_tx, signal_rx) = tokio::sync::watch::channel(false);
        let signal = nitrile_net::shutdown_signal();
        tokio::spawn(async move {
            signal.await;
            let _ = signal_tx.send(true);
        });
        let stopped = move || {
            let mut rx = signal_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let (mut listener, mut control) = match inherited {
            Some((l, c)) => (Some(l), Some(c)),
            None => (None, None),
        };
        let mut rolled_back: Option<(nitrile_release::Version, String)> = None;
        let mut first = true;
        loop {
            let opts = HostdOptions {
                takeover: control.is_some(),
                ..options.clone()
            };
            let hostd = Hostd::open_on(&config, opts, listener.take())
                .await
                .context("host agent cannot start")?;
            let handle = hostd.handle();
            let addr = hostd
                .local_addr()
                .map_or_else(|| config.listen.to_string(), |a| a.to_string());
            let (abort_tx, abort_rx) = tokio::sync::oneshot::channel::<()>();
            let stop = {
                let signal = stopped();
                async move {
                    tokio::select! {
                        () = signal => {}
                        Ok(()) = abort_rx => {}
                    }
                }
            };
            let serving = tokio::spawn(hostd.serve_updatable(stop));
            if let Some((to, reason)) = rolled_back.take() {
                handle.rolled_back(&to, &reason).await;
                crate::output::errln!(
                    "nitrile hostd: {host} live update to {to} rolled back ({reason}); version {} serving again on {addr}",
                    handle.version()
                )?;
            } else if let Some(control) = control.take() {
                let from_pid = u32::try_from(nix::unistd::getppid().as_raw()).unwrap_or(0);
                let mut takeover = Takeover::new(control).context("the control socket")?;
                match takeover.report(&handle.ready(), deadline).await {
                    Verdict::Commit => {
                        handle.committed(from_pid).await;
                        // Before confirming: a supervisor reading it learns
                        // the pid to stop before the previous agent exits.
                        crate::output::errln!(
                            "nitrile hostd: {host} took over as pid {} (release {}) on {addr}",
                            std::process::id(),
                            handle.version()
                        )?;
                        takeover.confirm().await;
                        if let Some(sup) = supervisor {
                            tokio::spawn(follow_supervisor(from_pid, sup));
                        }
                    }
                    Verdict::Abort => {
                        let _ = abort_tx.send(());
                        let _ = serving.await;
                        anyhow::bail!(
                            "the previous host agent aborted the hand-over; it serves again"
                        );
                    }
                }
            } else if first {
                crate::output::errln!("nitrile hostd: {host} serving on {addr}")?;
            }
            first = false;
            // The agent's state closes with its last handle: a successor
            // opens the same journal.
            drop(handle);
            let served = serving.await.context("the host agent's task failed")??;
            let Served::Handover {
                handover,
                listener: kept,
                running,
                from,
            } = served
            else {
                if matches!(served, Served::PowerOff) {
                    crate::output::errln!("nitrile hostd: {host} shut down by host.shutdown")?;
                }
                tracing::info!("host agent stopped");
                return anyhow::Ok(());
            };
            crate::output::errln!(
                "nitrile hostd: {host} handing over from {from} to release {} ({} instance(s) running)",
                handover.version,
                running.len()
            )?;
            match live::hand_over(&handover, &kept, &successor, &running, deadline, stopped()).await
            {
                Ok(pid) => {
                    crate::output::errln!(
                        "nitrile hostd: {host} handed over to pid {pid} (release {}); exiting",
                        handover.version
                    )?;
                    return anyhow::Ok(());
                }
                Err(e) => {
                    listener = Some(kept);
                    rolled_back = Some((handover.version, e.to_string()));
                }
            }
        }
    })?
}

/// After a hand-over, once the previous agent (`from`) exited, this agent
/// is no child of the supervisor (`--exit-with-parent`) any more: it stops
/// (SIGTERM to itself, the clean path) when the supervisor is gone.
async fn follow_supervisor(from: u32, supervisor: i32) {
    for _ in 0..200 {
        if u32::try_from(nix::unistd::getppid().as_raw()).ok() != Some(from) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let sup = nix::unistd::Pid::from_raw(supervisor);
    while nix::sys::signal::kill(sup, None).is_ok() {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    tracing::warn!(supervisor, "the supervisor is gone; stopping");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM);
}
