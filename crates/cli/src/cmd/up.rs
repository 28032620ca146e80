//! `nitrile up`: a whole cell on this machine.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use nitrile_api::Name;
use nitrile_cell::{CellLayout, Endpoints, bootstrap, provision_host, provision_logd};
use nitrile_hostd::{HostdConfig, LogdTarget};
use nitrile_logd::config::{MetricsAddr, MonitorSource};
use nitrile_logd::{Alert, AlertSink, Logd, LogdConfig, LogdOptions};
use nitrile_tokend::Tokend;

use crate::Global;
use crate::service::{LogFormat, block_on, init_logging};

/// The one host of a one-machine cell.
const HOST: &str = "h1";
/// Longest the host agent may take to start serving.
const HOSTD_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an exit of the host agent waits for a Ctrl-C that reached both.
const SIGNAL_GRACE: Duration = Duration::from_secs(2);

/// Run a whole cell on this machine: the cell CA, a reviewer-signed sample
/// entitlement bundle, the token service with its audit journal, the audit
/// log service (logd) that the token service and the host ship their
/// journals to, one host agent (`h1`, a child process) with the guest
/// image, and client configs for the sample principals, all on loopback
/// mutual TLS under one state directory.
///
/// The first start creates everything; later starts reuse the state and
/// renew the short-lived certificates. When ready it prints what runs where,
/// three commands to try, and a line `export NITRILE_CONFIG=<path>` for the
/// CLI. Ctrl-C (or SIGTERM) stops the host agent, which stops its instances,
/// then the token service, then the audit log service.
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
    /// The host agent's mTLS address (its only port).
    #[arg(long, default_value = "127.0.0.1:7444")]
    hostd_listen: SocketAddr,
    /// The audit log service's mTLS address.
    #[arg(long, default_value = "127.0.0.1:7445")]
    logd_listen: SocketAddr,
    /// Loopback address for the audit log service's Prometheus metrics
    /// [default: the one in an existing logd.toml, else 127.0.0.1:9445].
    #[arg(long, value_name = "ADDR")]
    logd_metrics: Option<SocketAddr>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

pub(crate) fn run(args: Args, _global: &Global) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let layout = CellLayout::new(&args.state);
    let now = time::OffsetDateTime::now_utc();
    let host = Name::new(HOST)?;
    eprintln!(
        "nitrile up: preparing cell {:?} in {}",
        args.cell.as_str(),
        layout.root().display()
    );
    let cell = bootstrap(&layout, &args.cell, &args.tokend_listen.to_string(), now)
        .context("cannot prepare the cell")?;
    if cell.bundle_migrated {
        eprintln!(
            "nitrile up: the entitlement bundle {} now has a serial (bundle.toml, serial 1) and \
             the monitor rules (rules/, moved from {}); the local reviewers signed it",
            layout.entitlements_dir().display(),
            layout.rules_dir().display()
        );
    }
    let image = import_guest_image(&layout);
    let tokend_config = super::tokend::config_of(
        &layout,
        &cell.cell,
        args.tokend_listen,
        Some(args.tokend_metrics),
        None,
    )?;
    block_on(async move {
        // Installed before anything is announced, so that a signal sent
        // right after the export line stops the cell cleanly.
        let signal = nitrile_net::shutdown_signal();
        let tokend = Tokend::open(&tokend_config)
            .await
            .with_context(|| format!("token service cannot start on {}", args.tokend_listen))?;
        // After the token service opened: its published issuer keys exist
        // and are pinned into logd and the host.
        provision_logd(&layout, &cell.cell, now).context("cannot provision the audit log")?;
        let logd_config_path =
            write_logd_config(&layout, &cell.cell, args.logd_listen, args.logd_metrics)?;
        let logd_config = LogdConfig::load(&logd_config_path)?;
        let logd = Logd::open(
            &logd_config,
            LogdOptions {
                stdout_alerts: false,
                alert_sinks: vec![std::sync::Arc::new(StderrAlerts)],
                ..LogdOptions::default()
            },
        )
        .await
        .with_context(|| format!("audit log service cannot start on {}", args.logd_listen))?;
        let logd_addr = logd
            .local_addr()
            .map_or_else(|| args.logd_listen.to_string(), |a| a.to_string());
        let log_vkey = logd.log_vkey();
        let logd_metrics = logd
            .metrics_addr()
            .map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics"));
        let (logd_stop, logd_stopped) = tokio::sync::oneshot::channel::<()>();
        let logd_task = tokio::spawn(logd.serve(async move {
            let _ = logd_stopped.await;
        }));
        let tokend_shipper = super::logd::ship_journal(
            layout.tokend_journal(),
            std::sync::Arc::clone(tokend.service().journal()),
            &logd_addr,
            &cell.cell,
            &tokend_config.ca,
            &tokend_config.cert,
            &tokend_config.key,
        )?;

        provision_host(&layout, &cell.cell, &host, now)
            .with_context(|| format!("cannot provision host {host}"))?;
        let hostd_config = write_hostd_config(
            &layout,
            &cell.cell,
            &host,
            args.hostd_listen,
            Some(&logd_addr),
        )?;
        let mut hostd = HostdChild::spawn(&hostd_config, args.log_format)?;

        let listen = tokend
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let hosts = BTreeMap::from([(host.to_string(), hostd.addr.to_string())]);
        let endpoints = Endpoints {
            tokend: listen.clone(),
            logd: Some(logd_addr.clone()),
        };
        let clients = nitrile_cell::write_client_configs(
            &layout,
            &cell.cell,
            &endpoints,
            &hosts,
            Some(&log_vkey),
        )?;
        let config_of = |name: &str| {
            clients
                .iter()
                .find(|(p, _)| p.name.as_str() == name)
                .map(|(_, path)| path.clone())
                .with_context(|| format!("no client config for {name}"))
        };
        let alice = config_of("alice")?;
        let placement = config_of("placement")?;
        let carol = config_of("carol")?;
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
            "  hostd {host}       {} (mTLS, pid {})   config {}",
            hostd.addr,
            hostd.child.id(),
            hostd_config.display()
        );
        println!("  host journal   {}", layout.host_journal(&host).display());
        println!(
            "  logd           {logd_addr} (mTLS)   metrics {logd_metrics}   config {}",
            logd_config_path.display()
        );
        println!(
            "  audit log      {} (tlog-tiles; key {})",
            layout.log_store().display(),
            layout.log_vkey().display()
        );
        println!(
            "  host metrics   {} (Prometheus text file)",
            layout.host_metrics(&host).display()
        );
        match &image {
            Some(digest) => println!(
                "  images         {} (guest image {digest})",
                layout.images_dir().display()
            ),
            None => println!(
                "  images         {} (none yet: see above)",
                layout.images_dir().display()
            ),
        }
        println!(
            "  entitlements   {} (serial {}, sha256 {}, signed by {})",
            layout.entitlements_dir().display(),
            cell.bundle_serial,
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
        println!("  nitrile host describe");
        println!(
            "  nitrile instance launch web1 --image {} --config {}",
            image.as_deref().unwrap_or("DIGEST"),
            placement.display()
        );
        println!("  nitrile audit tail --config {}", carol.display());
        println!();
        println!("Ctrl-C stops the cell.");
        println!("export NITRILE_CONFIG={}", alice.display());
        let _ = std::io::stdout().flush();

        // Stop order: the host agent first (it stops its instances), then
        // the token service, then the audit log service.
        let exited = hostd.exited.take();
        let (outcome_tx, outcome_rx) = tokio::sync::oneshot::channel();
        let stop = async move {
            tokio::pin!(signal);
            let mut unexpected = false;
            if let Some(exited) = exited {
                tokio::select! {
                    biased;
                    () = &mut signal => {}
                    _ = exited => {
                        // A Ctrl-C on a terminal reaches both processes.
                        unexpected = tokio::time::timeout(SIGNAL_GRACE, &mut signal)
                            .await
                            .is_err();
                    }
                }
            } else {
                signal.await;
            }
            let status = tokio::task::spawn_blocking(move || hostd.stop()).await;
            let _ = outcome_tx.send((unexpected, status));
        };
        let served = tokend.serve(stop).await;
        tokend_shipper.stop().await;
        let _ = logd_stop.send(());
        let logd_result = logd_task.await;
        served?;
        match logd_result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("nitrile up: the audit log service stopped with: {e:#}"),
            Err(e) => eprintln!("nitrile up: the audit log service failed: {e}"),
        }
        let (unexpected, status) = outcome_rx
            .await
            .context("the cell stopped without stopping the host agent")?;
        let status = status.context("waiting for the host agent")?;
        if unexpected {
            anyhow::bail!(
                "the host agent {host} exited unexpectedly ({}); the cell stopped, state kept in {}",
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string()),
                layout.root().display()
            );
        }
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("nitrile up: the host agent {host} stopped with {s}"),
            Err(e) => eprintln!("nitrile up: cannot wait for the host agent {host}: {e}"),
        }
        eprintln!(
            "nitrile up: stopped; state kept in {}",
            layout.root().display()
        );
        anyhow::Ok(())
    })?
}

/// Imports the guest image build's output into the cell's image store and
/// returns its digest; without a build, says how to make one.
fn import_guest_image(layout: &CellLayout) -> Option<String> {
    let built = nitrile_image::default_cache_dir()
        .map(|cache| nitrile_image::output_dir(&cache))
        .and_then(|dir| nitrile_image::read_output(&dir));
    let built = match built {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "nitrile up: no guest image to launch ({e}); build one with \
                 `scripts/guest-image.sh` (or `nitrile image build --state {}`) and start \
                 again. Going on without it.",
                layout.root().display()
            );
            return None;
        }
    };
    let imported = nitrile_image::ImageStore::open(layout.images_dir())
        .and_then(|store| store.import(&built.kernel, &built.initramfs, &built.cmdline));
    match imported {
        Ok(image) => Some(image.digest().to_string()),
        Err(e) => {
            eprintln!(
                "nitrile up: cannot import the guest image from {}: {e}; going on without it",
                built.kernel.display()
            );
            None
        }
    }
}

/// Alerts of the in-process audit log service, as JSON lines on stderr
/// (stdout is what scripts read for the export line).
struct StderrAlerts;

impl AlertSink for StderrAlerts {
    fn alert(&self, alert: &Alert) {
        if let Ok(line) = serde_json::to_string(alert) {
            eprintln!("logd alert: {line}");
        }
    }
}

/// Default loopback address of logd's metrics in a new cell.
const DEFAULT_LOGD_METRICS: &str = "127.0.0.1:9445";

/// Writes `logd/logd.toml` with paths relative to it; the first time, the
/// monitor runs the rules of the cell's signed entitlement bundle
/// (`[monitor]`) and metrics are served on [`DEFAULT_LOGD_METRICS`]. The
/// witnesses, quorum, intervals, webhook, monitor, storage and metrics
/// address of an existing file are kept, so edits to them survive restarts;
/// the unreviewed `rules = <dir>` of earlier versions becomes `[monitor]`
/// with the cell's bundle (whose `rules/` the bootstrap moved them into);
/// `metrics`, when given, replaces the metrics address.
fn write_logd_config(
    layout: &CellLayout,
    cell: &Name,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
) -> anyhow::Result<PathBuf> {
    let path = layout.logd_config();
    let dir = layout.logd_dir();
    let me = crate::logapi::logd_principal(cell);
    let (cert, key) = layout.cert_and_key(&me);
    let rel = |p: &Path| relative_to(&dir, p);
    let mut config = LogdConfig::new(
        cell.clone(),
        listen,
        PathBuf::from("."),
        rel(&layout.ca_cert()),
        rel(&cert),
        rel(&key),
        rel(&layout.logd_issuer_keys()),
    );
    let cell_bundle = MonitorSource {
        bundle: rel(&layout.entitlements_dir()),
        reviewers: rel(&layout.reviewers_file()),
    };
    if path.exists() {
        let (old, legacy_rules) = LogdConfig::load_migrating(&path).with_context(|| {
            format!(
                "cannot reuse {}; fix or remove it to have it written anew",
                path.display()
            )
        })?;
        config.checkpoint_interval_ms = old.checkpoint_interval_ms;
        config.max_checkpoint_age_ms = old.max_checkpoint_age_ms;
        config.witnesses = old.witnesses;
        config.witness_quorum = old.witness_quorum;
        config.webhook = old.webhook;
        config.monitor = match (old.monitor, legacy_rules) {
            (Some(m), _) => Some(MonitorSource {
                bundle: relative_to(&dir, &m.bundle),
                reviewers: relative_to(&dir, &m.reviewers),
            }),
            (None, Some(rules)) => {
                eprintln!(
                    "nitrile up: {}: the monitor's rules now come from the signed entitlement \
                     bundle {} (rules = {} replaced by [monitor])",
                    path.display(),
                    layout.entitlements_dir().display(),
                    rules.display()
                );
                Some(cell_bundle)
            }
            (None, None) => None,
        };
        config.storage = old.storage;
        config.metrics = old.metrics;
    } else {
        config.monitor = Some(cell_bundle);
        config.metrics = Some(MetricsAddr::new(
            DEFAULT_LOGD_METRICS
                .parse()
                .unwrap_or_else(|_| unreachable!("a socket address")),
        )?);
    }
    if let Some(addr) = metrics {
        config.metrics =
            Some(MetricsAddr::new(addr).context("--logd-metrics must be a loopback address")?);
    }
    let text = format!(
        "# nitrile audit log service config (`nitrile logd --config`)\n{}",
        config.to_toml()
    );
    write_private(&path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Writes `bytes` to `path` owner-only and atomically: a temporary file
/// beside it, fsync, rename.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("toml.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Writes `hosts/<host>/hostd.toml` with paths relative to it, shipping
/// the journal to logd at `logd` when given. The `[hypervisor]` and
/// `[capacity]` sections of an existing file are kept, so edits to them
/// survive restarts.
fn write_hostd_config(
    layout: &CellLayout,
    cell: &Name,
    host: &Name,
    listen: SocketAddr,
    logd: Option<&str>,
) -> anyhow::Result<PathBuf> {
    let path = layout.hostd_config(host);
    let dir = layout.host_dir(host);
    let principal =
        nitrile_api::PrincipalId::new(cell.clone(), nitrile_api::PrincipalKind::Host, host.clone());
    let (cert, key) = layout.cert_and_key(&principal);
    let rel = |p: &Path| relative_to(&dir, p);
    let mut config = HostdConfig::new(
        cell.clone(),
        host.clone(),
        listen,
        PathBuf::from("."),
        rel(&layout.ca_cert()),
        rel(&cert),
        rel(&key),
        rel(&layout.host_issuer_keys(host)),
        rel(&layout.images_dir()),
    );
    if path.exists() {
        let old = HostdConfig::load(&path).with_context(|| {
            format!(
                "cannot reuse {}; fix or remove it to have it written anew",
                path.display()
            )
        })?;
        config.hypervisor = old.hypervisor;
        config.capacity = old.capacity;
    }
    config.logd = logd.map(|addr| LogdTarget {
        addr: addr.to_owned(),
    });
    config
        .write(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// `target` relative to directory `base` when both are under a common root
/// (`../../pki/ca.pem`), else `target` as it is.
fn relative_to(base: &Path, target: &Path) -> PathBuf {
    let b: Vec<_> = base.components().collect();
    let t: Vec<_> = target.components().collect();
    let common = b.iter().zip(&t).take_while(|(x, y)| x == y).count();
    if common == 0 {
        return target.to_owned();
    }
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

/// What the host agent's stderr reader reports before it serves.
enum Startup {
    /// The `serving on <addr>` line.
    Serving(SocketAddr),
    /// Its stderr closed: it exited.
    Exited,
}

/// The host agent running as a child process.
struct HostdChild {
    child: Child,
    /// Where it serves.
    addr: SocketAddr,
    /// Fires when its stderr closes after it served, i.e. it exited.
    exited: Option<tokio::sync::oneshot::Receiver<()>>,
    stopped: bool,
}

impl HostdChild {
    /// Starts `nitrile hostd --config <config> --stop-instances-on-exit`
    /// and waits for its "serving on" line; its other stderr lines are
    /// forwarded prefixed `hostd: `.
    fn spawn(config: &Path, log_format: LogFormat) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        // The child's stdout goes to our stderr: our stdout is what scripts
        // read for the export line.
        let stdout = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate stderr")?;
        let log_format = match log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let mut child = Command::new(&exe)
            .arg("hostd")
            .arg("--config")
            .arg(config)
            .arg("--stop-instances-on-exit")
            .arg("--exit-with-parent")
            .arg(std::process::id().to_string())
            .args(["--log-format", log_format])
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} hostd", exe.display()))?;
        let stderr = child
            .stderr
            .take()
            .context("the host agent's stderr is not piped")?;
        let (startup_tx, startup_rx) = mpsc::channel();
        let (exited_tx, exited_rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || forward_stderr(stderr, startup_tx, exited_tx));

        let mut me = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            exited: Some(exited_rx),
            stopped: false,
        };
        let early = match startup_rx.recv_timeout(HOSTD_START_TIMEOUT) {
            Ok((Startup::Serving(addr), _)) => {
                me.addr = addr;
                return Ok(me);
            }
            Ok((Startup::Exited, lines)) => lines,
            Err(_) => {
                let _ = me.stop();
                anyhow::bail!(
                    "the host agent did not start serving within {}s; it was stopped",
                    HOSTD_START_TIMEOUT.as_secs()
                );
            }
        };
        let status = me.stop();
        anyhow::bail!(
            "the host agent exited before serving ({}):\n{}",
            status
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string()),
            early.join("\n")
        )
    }

    /// SIGTERM, then wait: it stops its instances and exits.
    fn stop(&mut self) -> std::io::Result<std::process::ExitStatus> {
        if !self.stopped {
            let pid =
                nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
            // Already exited (e.g. Ctrl-C on a terminal reached it): fine.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let status = self.child.wait();
        self.stopped = true;
        status
    }
}

impl Drop for HostdChild {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.stop();
        }
    }
}

/// Reads the host agent's stderr: before it serves, lines are forwarded and
/// kept (to explain an early exit); its "serving on" line is reported;
/// afterwards lines are forwarded until it closes.
fn forward_stderr(
    stderr: std::process::ChildStderr,
    startup: mpsc::Sender<(Startup, Vec<String>)>,
    exited: tokio::sync::oneshot::Sender<()>,
) {
    let mut serving = false;
    let mut kept = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if !serving && let Some(addr) = serving_addr(&line) {
            serving = true;
            let _ = startup.send((Startup::Serving(addr), Vec::new()));
            continue;
        }
        eprintln!("hostd: {line}");
        if !serving {
            kept.push(line);
        }
    }
    if serving {
        let _ = exited.send(());
    } else {
        let _ = startup.send((Startup::Exited, kept));
    }
}

/// The address of `nitrile hostd: <host> serving on <addr>`.
fn serving_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.strip_prefix("nitrile hostd: ")?;
    let (_, addr) = rest.split_once(" serving on ")?;
    addr.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serving_line_gives_the_address() {
        assert_eq!(
            serving_addr("nitrile hostd: h1 serving on 127.0.0.1:7444"),
            Some(SocketAddr::from(([127, 0, 0, 1], 7444)))
        );
        assert_eq!(serving_addr("hostd: h1 serving on 127.0.0.1:7444"), None);
        assert_eq!(serving_addr("nitrile hostd: h1 serving on nowhere"), None);
        assert_eq!(serving_addr("INFO listening"), None);
    }

    #[test]
    fn host_paths_are_relative_to_the_host_dir() {
        let dir = Path::new("/s/hosts/h1");
        assert_eq!(
            relative_to(dir, Path::new("/s/pki/ca.pem")),
            PathBuf::from("../../pki/ca.pem")
        );
        assert_eq!(
            relative_to(dir, Path::new("/s/hosts/h1/issuer-keys.toml")),
            PathBuf::from("issuer-keys.toml")
        );
        assert_eq!(
            relative_to(dir, Path::new("/s/images")),
            PathBuf::from("../../images")
        );
    }

    #[test]
    fn the_logd_config_keeps_its_metrics_address() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&tmp.path().join("state"));
        std::fs::create_dir_all(layout.logd_dir()).unwrap();
        let cell = Name::new("local").unwrap();
        let listen: SocketAddr = "127.0.0.1:7445".parse().unwrap();
        let metrics = |path: &Path| LogdConfig::load(path).unwrap().metrics.map(|m| m.addr());
        let path = write_logd_config(&layout, &cell, listen, None).unwrap();
        assert_eq!(metrics(&path), DEFAULT_LOGD_METRICS.parse().ok());
        let other: SocketAddr = "127.0.0.1:9555".parse().unwrap();
        write_logd_config(&layout, &cell, listen, Some(other)).unwrap();
        assert_eq!(metrics(&path), Some(other));
        // Kept when not given.
        write_logd_config(&layout, &cell, listen, None).unwrap();
        assert_eq!(metrics(&path), Some(other));
        // Refused when not loopback; the file is left as it was.
        let wild: SocketAddr = "0.0.0.0:9445".parse().unwrap();
        assert!(write_logd_config(&layout, &cell, listen, Some(wild)).is_err());
        assert_eq!(metrics(&path), Some(other));
    }

    #[test]
    fn the_logd_config_of_an_older_cell_moves_to_the_reviewed_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&tmp.path().join("state"));
        std::fs::create_dir_all(layout.logd_dir()).unwrap();
        let cell = Name::new("local").unwrap();
        let listen: SocketAddr = "127.0.0.1:7445".parse().unwrap();
        let path = write_logd_config(&layout, &cell, listen, None).unwrap();
        // A new file runs the monitor on the cell's bundle.
        let fresh = LogdConfig::load(&path).unwrap();
        let monitor = fresh.monitor.clone().unwrap();
        assert_eq!(monitor.bundle, layout.logd_dir().join("../entitlements"));
        assert_eq!(
            monitor.reviewers,
            layout.logd_dir().join("../reviewers.toml")
        );

        // A file of an earlier version: `rules = dir`, and settings of its own.
        let text = std::fs::read_to_string(&path).unwrap();
        let old = text
            .replacen(
                "checkpoint_interval_ms",
                "rules = \"../rules\"\nwebhook = \"http://127.0.0.1:9000/alerts\"\ncheckpoint_interval_ms",
                1,
            )
            .replace("checkpoint_interval_ms = 500", "checkpoint_interval_ms = 700");
        let old = old[..old.find("[monitor]").unwrap()].to_owned();
        std::fs::write(&path, &old).unwrap();
        let err = LogdConfig::load(&path).unwrap_err();
        assert!(
            err.to_string().contains("`rules` is no longer read"),
            "{err}"
        );
        write_logd_config(&layout, &cell, listen, None).unwrap();
        let migrated = LogdConfig::load(&path).unwrap();
        assert_eq!(migrated.monitor, fresh.monitor);
        assert_eq!(migrated.checkpoint_interval_ms, 700);
        assert_eq!(
            migrated.webhook.as_deref(),
            Some("http://127.0.0.1:9000/alerts")
        );
        assert_eq!(migrated.metrics, fresh.metrics);
        assert!(!std::fs::read_to_string(&path).unwrap().contains("rules ="));
    }

    #[test]
    fn the_hostd_config_keeps_hypervisor_edits() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&tmp.path().join("state"));
        let cell = Name::new("local").unwrap();
        let h1 = Name::new("h1").unwrap();
        let listen: SocketAddr = "127.0.0.1:7444".parse().unwrap();
        let path = write_hostd_config(&layout, &cell, &h1, listen, None).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("ca = \"../../pki/ca.pem\""), "{text}");
        let loaded = HostdConfig::load(&path).unwrap();
        assert_eq!(
            loaded.cert,
            layout.host_dir(&h1).join("../../pki/host-h1.pem")
        );
        assert_eq!(loaded.state, layout.host_dir(&h1).join("."));

        let mut edited = loaded.clone();
        edited.hypervisor.backend = nitrile_hostd::BackendName::Qemu;
        edited.capacity.vcpus = Some(1);
        edited.write(&path).unwrap();
        let other: SocketAddr = "127.0.0.1:7555".parse().unwrap();
        write_hostd_config(&layout, &cell, &h1, other, Some("127.0.0.1:7445")).unwrap();
        let again = HostdConfig::load(&path).unwrap();
        assert_eq!(again.logd.unwrap().addr, "127.0.0.1:7445");
        assert_eq!(again.listen, other);
        assert_eq!(again.hypervisor.backend, nitrile_hostd::BackendName::Qemu);
        assert_eq!(again.capacity.vcpus, Some(1));
        assert_eq!(again.ca, loaded.ca);
    }
}
