//! `nitrile up`: a whole cell on this machine.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::Context;
use nitrile_api::{Name, PrincipalId, PrincipalKind};
use nitrile_cell::{
    CellLayout, Endpoints, KMS, PLACEMENT, WITNESS, bootstrap, provision_deployd, provision_host,
    provision_kms, provision_logd, provision_placed, provision_witness,
};
use nitrile_hostd::network::NetworkConfig;
use nitrile_hostd::{HostdConfig, ReleaseConfig};
use nitrile_kms::KmsConfig;
use nitrile_kms_api::KmsTarget;
use nitrile_logclient::LogdTarget;
use nitrile_logd::config::{MetricsAddr, MonitorSource, WitnessConfig as LogdWitness};
use nitrile_logd::{Alert, AlertSink, Logd, LogdConfig, LogdOptions};
use nitrile_placed::PlacedConfig;
use nitrile_tlog::NoteVerifier;
use nitrile_tokend::Tokend;
use nitrile_witness::{LogConfig, WitnessConfig};

use crate::Global;
use crate::output::{errln, outln};
use crate::service::{LogFormat, block_on, init_logging};

/// Most host agents `--hosts` runs: the sample entitlements' fleet is
/// `h1` to `h8`.
const MAX_HOSTS: u8 = 8;
/// Longest the host agent or the witness may take to start serving.
const CHILD_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an exit of the host agent waits for a Ctrl-C that reached both.
const SIGNAL_GRACE: Duration = Duration::from_secs(2);
/// How long a host agent's successor after a live update has to stop.
const SUCCESSOR_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// The readiness line prefix of `nitrile hostd`.
const HOSTD_READY: &str = "nitrile hostd: ";
/// The readiness line prefix of `nitrile audit witness`.
const WITNESS_READY: &str = "nitrile audit witness: ";
/// The readiness line prefix of `nitrile kms`.
const KMS_READY: &str = "nitrile kms: ";
/// The readiness line prefix of `nitrile placed`.
const PLACED_READY: &str = "nitrile placed: ";
/// The readiness line prefix of `nitrile deployd`.
const DEPLOYD_READY: &str = "nitrile deployd: ";
/// How long a host agent of a one-machine cell gives a new release to
/// serve in a live update.
const HOST_HEALTH_DEADLINE_SECS: u64 = 20;

/// Run a whole cell on this machine: the cell CA, a reviewer-signed sample
/// entitlement bundle, the token service with its audit journal, the audit
/// log service (logd) that the token service, the key service and the host
/// ship their journals to, a checkpoint witness (a child process with its
/// own state directory and key) whose cosignature logd needs to publish a
/// checkpoint, the key service (`nitrile kms`, a child process holding the
/// cell's keys, with the default key `kms-key/default` it owns), one host
/// agent (`h1`, a child process) with the guest image, and client configs
/// for the sample principals, all on loopback mutual TLS under one state
/// directory.
///
/// The first start creates everything; later starts reuse the state and
/// renew the short-lived certificates. When ready it prints what runs where,
/// three commands to try, and a line `export NITRILE_CONFIG=<path>` for the
/// CLI. Ctrl-C (or SIGTERM) stops the host agent, which stops its instances,
/// then the key service, then the token service, then the audit log
/// service, then the witness.
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
    /// The host agent's mTLS address (its only admin port; its data path
    /// adds a UDP port for the tunnels to other hosts, and instances'
    /// published ports).
    #[arg(long, default_value = "127.0.0.1:7444")]
    hostd_listen: SocketAddr,
    /// The audit log service's mTLS address.
    #[arg(long, default_value = "127.0.0.1:7445")]
    logd_listen: SocketAddr,
    /// Loopback address for the audit log service's Prometheus metrics
    /// [default: the one in an existing logd.toml, else 127.0.0.1:9445].
    #[arg(long, value_name = "ADDR")]
    logd_metrics: Option<SocketAddr>,
    /// The checkpoint witness's mTLS address.
    #[arg(long, default_value = "127.0.0.1:7446")]
    witness_listen: SocketAddr,
    /// The key service's mTLS address.
    #[arg(long, default_value = "127.0.0.1:7447")]
    kms_listen: SocketAddr,
    /// How many host agents to run (`h1` to `hN`, each its own process,
    /// state directory `<state>/hosts/hN`, config and port), 1 to 8.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_HOSTS)))]
    hosts: u8,
    /// Host `hK` listens on PORT+K-1 (h1 included) [default: h1 on
    /// --hostd-listen, the others on a free port of its address].
    #[arg(long, value_name = "PORT")]
    hosts_listen_base: Option<u16>,
    /// Run the host agents without an instance network (no `[network]`:
    /// launches with a NIC, i.e. every customer run, are refused). The
    /// data path needs the privilege to make network namespaces.
    #[arg(long)]
    no_network: bool,
    /// The placement service's mTLS address (customers' API).
    #[arg(long, default_value = "127.0.0.1:7448")]
    placed_listen: SocketAddr,
    /// The deployment service's mTLS address (rollouts of releases).
    #[arg(long, default_value = "127.0.0.1:7449")]
    deployd_listen: SocketAddr,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

pub(crate) fn run(args: Args, _global: &Global) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let layout = CellLayout::new(&args.state);
    let now = time::OffsetDateTime::now_utc();
    let hosts: Vec<Name> = (1..=args.hosts)
        .map(|k| Name::new(&format!("h{k}")))
        .collect::<Result<_, _>>()?;
    errln!(
        "nitrile up: preparing cell {:?} in {}",
        args.cell.as_str(),
        layout.root().display()
    )?;
    let cell = bootstrap(&layout, &args.cell, &args.tokend_listen.to_string(), now)
        .context("cannot prepare the cell")?;
    if cell.bundle_migrated {
        errln!(
            "nitrile up: the entitlement bundle {} now has a serial (bundle.toml, serial 1) and \
             the monitor rules (rules/, moved from {}); the local reviewers signed it",
            layout.entitlements_dir().display(),
            layout.rules_dir().display()
        )?;
    }
    let image = import_guest_image(&layout);
    let tokend_config = super::tokend::config_of(
        &layout,
        &cell.cell,
        args.tokend_listen,
        Some(args.tokend_metrics),
        None,
        // Set once logd is bound (its port may be chosen then).
        None,
    )?;
    block_on(async move {
        // Installed before anything is announced, so that a signal sent
        // right after the export line stops the cell cleanly.
        let signal = nitrile_net::shutdown_signal();
        let mut tokend = Tokend::open(&tokend_config)
            .await
            .with_context(|| format!("token service cannot start on {}", args.tokend_listen))?;
        // After the token service opened: its published issuer keys exist
        // and are pinned into logd and the host.
        provision_logd(&layout, &cell.cell, now).context("cannot provision the audit log")?;
        // The witness before logd: logd's config names the witness's key
        // and address, the witness's config the log's key (made now if
        // this is the first start, as logd would).
        provision_witness(&layout, &cell.cell, now).context("cannot provision the witness")?;
        let witness_vkey = witness_key(&layout, &cell.cell)?;
        let log_key = nitrile_logd::service::ensure_log_key(&layout.logd_dir(), &cell.cell)
            .context("cannot make the audit log's key")?;
        let witness_config =
            write_witness_config(&layout, &cell.cell, args.witness_listen, &log_key)?;
        let mut witness = ServiceChild::spawn(
            "the witness",
            &["audit", "witness", "--config"],
            &witness_config,
            (WITNESS_READY, "witness: "),
            // A Ctrl-C on the terminal must not stop the witness before
            // logd's last checkpoint: the cell stops it after logd (and
            // --exit-with-parent if the cell dies).
            true,
            args.log_format,
        )?;
        let logd_config_path = write_logd_config(
            &layout,
            &cell.cell,
            &hosts,
            args.logd_listen,
            args.logd_metrics,
            &LogdWitness {
                name: Name::new(WITNESS)?,
                vkey: witness_vkey.clone(),
                addr: witness.addr.to_string(),
            },
        )?;
        let logd_config = LogdConfig::load(&logd_config_path)?;
        // The auditors check the cosignature of the witnesses logd needs.
        let witness_vkeys: Vec<String> = if logd_config.witness_quorum > 0 {
            logd_config
                .witnesses
                .iter()
                .map(|w| w.vkey.clone())
                .collect()
        } else {
            Vec::new()
        };
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
        // The token service ships its journal to logd while it serves.
        tokend.ship_journal_to(&LogdTarget {
            addr: logd_addr.clone(),
            log_vkey: Some(log_vkey.clone()),
        })?;

        // The key service: its own process, state and keys; it makes the
        // cell's default key the first time and ships its journal to logd.
        provision_kms(&layout, &cell.cell, now).context("cannot provision the key service")?;
        let kms_config = write_kms_config(
            &layout,
            &cell.cell,
            args.kms_listen,
            Some((&logd_addr, &log_vkey)),
        )?;
        let mut kms = ServiceChild::spawn(
            "the key service",
            &["kms", "--config"],
            &kms_config,
            (KMS_READY, "kms: "),
            // Stopped by the cell after the host agent and before logd, so
            // that its last records are shipped.
            true,
            args.log_format,
        )?;

        // The host agents h1..hN: each its own process, state directory,
        // config and port, all with the cell's volume and image stores.
        let mut host_children: Vec<(Name, PathBuf, ServiceChild)> = Vec::new();
        // The cell's `dev` release repository; every host pins its root
        // and CI key at provisioning.
        let releases =
            dev_releases(&layout, now).context("cannot prepare the release repository")?;
        // The data path makes network namespaces: root's privilege. Without
        // it the cell runs, and says that customers cannot run instances.
        let no_network = args.no_network || {
            let root = nix::unistd::geteuid().is_root();
            if !root {
                errln!(
                    "nitrile up: not running as root, so the hosts get no instance network \
                     (their data paths make network namespaces); customer runs will be \
                     refused. Run as root for it, or pass --no-network to say so."
                )?;
            }
            !root
        };
        for (k, host) in hosts.iter().enumerate() {
            provision_host(&layout, &cell.cell, host, now)
                .with_context(|| format!("cannot provision host {host}"))?;
            let listen = host_listen(&args, k)?;
            let network = (!no_network).then(|| NetworkConfig {
                wireguard_listen: SocketAddr::new(listen.ip(), 0),
                ingress_address: listen.ip(),
                netns: Some(netns_name(&layout, host)),
            });
            let pins = releases.pin(&layout, host)?;
            let config = write_hostd_config(
                &layout,
                &cell.cell,
                host,
                listen,
                Some((&logd_addr, &log_vkey)),
                Some(&kms.addr.to_string()),
                network,
                Some(release_section(&layout.host_dir(host), pins)),
            )?;
            let child = ServiceChild::spawn(
                format!("the host agent {host}"),
                &["hostd", "--stop-instances-on-exit", "--config"],
                &config,
                (HOSTD_READY, format!("{host}: ")),
                false,
                args.log_format,
            )?;
            host_children.push((host.clone(), config, child));
        }
        let fleet: BTreeMap<String, String> = host_children
            .iter()
            .map(|(h, _, c)| (h.to_string(), c.addr.to_string()))
            .collect();

        // The placement service: customers' API, placing on the fleet.
        provision_placed(&layout, &cell.cell, now)
            .context("cannot provision the placement service")?;
        let listen = tokend
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let placed_config = write_placed_config(
            &layout,
            &cell.cell,
            args.placed_listen,
            &listen,
            &fleet,
            Some((&logd_addr, &log_vkey)),
        )?;
        let mut placed = ServiceChild::spawn(
            "the placement service",
            &["placed", "--config"],
            &placed_config,
            (PLACED_READY, "placed: "),
            // Stopped by the cell first, before the hosts it calls.
            true,
            args.log_format,
        )?;

        // The deployment service: rollouts of releases to the fleet.
        provision_deployd(&layout, &cell.cell, now)
            .context("cannot provision the deployment service")?;
        let deployd_config = write_deployd_config(
            &layout,
            &cell.cell,
            args.deployd_listen,
            &listen,
            &fleet,
            Some((&logd_addr, &log_vkey)),
        )?;
        let mut deployd = ServiceChild::spawn(
            "the deployment service",
            &["deployd", "--config"],
            &deployd_config,
            (DEPLOYD_READY, "deployd: "),
            // Stopped by the cell first, with placement, before the hosts.
            true,
            args.log_format,
        )?;

        let endpoints = Endpoints {
            tokend: listen.clone(),
            logd: Some(logd_addr.clone()),
            kms: Some(kms.addr.to_string()),
            placement: Some(placed.addr.to_string()),
            deployer: Some(deployd.addr.to_string()),
        };
        let clients = nitrile_cell::write_client_configs(
            &layout,
            &cell.cell,
            &endpoints,
            &fleet,
            Some(&log_vkey),
            &witness_vkeys,
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
        let acme = config_of("acme")?;
        let carol = config_of("carol")?;
        let metrics = tokend
            .metrics_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        outln!(
            "nitrile cell {:?} is up ({})",
            cell.cell.as_str(),
            if cell.first_start {
                "created"
            } else {
                "reused"
            }
        )?;
        outln!()?;
        outln!("  state          {}", layout.root().display())?;
        outln!("  cell CA        {}", layout.ca_cert().display())?;
        outln!("  tokend         {listen} (mTLS)   metrics http://{metrics}/metrics")?;
        outln!("  journal        {}", layout.tokend_journal().display())?;
        for (host, config, child) in &host_children {
            outln!(
                "  hostd {:<9}{} (mTLS, pid {})   config {}",
                host.as_str(),
                child.addr,
                child.child.id(),
                config.display()
            )?;
            outln!(
                "  host journal   {}   metrics {} (Prometheus text file)",
                layout.host_journal(host).display(),
                layout.host_metrics(host).display()
            )?;
        }
        outln!(
            "  network        {}",
            if no_network {
                "none (customer runs are refused)".to_owned()
            } else {
                "instance networks on every host (WireGuard between hosts, published ports on \
                 the host's address)"
                    .to_owned()
            }
        )?;
        outln!(
            "  placed         {} (mTLS, pid {})   config {}",
            placed.addr,
            placed.child.id(),
            placed_config.display()
        )?;
        outln!("  placed journal {}", layout.placed_journal().display())?;
        outln!(
            "  deployd        {} (mTLS, pid {})   config {}",
            deployd.addr,
            deployd.child.id(),
            deployd_config.display()
        )?;
        outln!(
            "  releases       environment dev: repository {}, keys in {} (2 of s1, s2, s3 sign)",
            releases.repo.display(),
            layout.root().join("release").join("keys").display()
        )?;
        outln!(
            "  kms            {} (mTLS, pid {})   config {}",
            kms.addr,
            kms.child.id(),
            kms_config.display()
        )?;
        outln!(
            "  kms journal    {} (keys in {})",
            layout.kms_journal().display(),
            layout.kms_store().display()
        )?;
        outln!(
            "  logd           {logd_addr} (mTLS)   metrics {logd_metrics}   config {}",
            logd_config_path.display()
        )?;
        outln!(
            "  audit log      {} (tlog-tiles; key {})",
            layout.log_store().display(),
            layout.log_vkey().display()
        )?;
        outln!(
            "  witness        {} (mTLS, pid {})   state {}",
            witness.addr,
            witness.child.id(),
            layout.witness_dir().display()
        )?;
        outln!(
            "  checkpoints    {}",
            witnessing(&logd_config, &witness_vkey)
        )?;
        outln!(
            "  volumes        {} (volume store of the cell: ciphertext and wrapped keys only)",
            volume_store(&layout).display()
        )?;
        match &image {
            Some(digest) => outln!(
                "  images         {} (guest image {digest})",
                layout.images_dir().display()
            ),
            None => outln!(
                "  images         {} (none yet: see above)",
                layout.images_dir().display()
            ),
        }?;
        outln!(
            "  entitlements   {} (serial {}, sha256 {}, signed by {})",
            layout.entitlements_dir().display(),
            cell.bundle_serial,
            &cell.bundle_digest[..16],
            cell.reviewers
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        outln!("  issuer keys    {}", layout.issuer_keys_file().display())?;
        outln!("  clients        {}", layout.clients_dir().display())?;
        outln!()?;
        outln!("Try, in another shell:")?;
        outln!("  nitrile host describe")?;
        outln!(
            "  nitrile instance launch web1 --image {} --config {}",
            image.as_deref().unwrap_or("DIGEST"),
            placement.display()
        )?;
        // As a customer: the same image, imported by acme (the digest is
        // the same: content-addressed), then run with acme's SSH key.
        let built = nitrile_image::default_cache_dir()
            .map(|cache| nitrile_image::output_dir(&cache))
            .and_then(|dir| nitrile_image::read_output(&dir))
            .ok();
        outln!(
            "  nitrile customer image import --kernel {} --initramfs {} --cmdline '{}' --config {}",
            built
                .as_ref()
                .map_or("VMLINUX".into(), |b| b.kernel.display().to_string()),
            built
                .as_ref()
                .map_or("INITRAMFS".into(), |b| b.initramfs.display().to_string()),
            built.as_ref().map_or("CMDLINE", |b| b.cmdline.as_str()),
            acme.display()
        )?;
        outln!(
            "  nitrile customer run web2 --image {} --ssh-key ~/.ssh/id_ed25519.pub --publish 22 --config {}",
            image.as_deref().unwrap_or("DIGEST"),
            acme.display()
        )?;
        outln!(
            "  ssh -p <port from `nitrile customer describe web2`> root@127.0.0.1   (with that key)"
        )?;
        outln!("  nitrile audit tail --config {}", carol.display())?;
        outln!(
            "  nitrile deploy start VERSION --wait   (a release built, signed with the keys in {} and published; see the README)",
            layout.root().join("release").join("keys").display()
        )?;
        outln!()?;
        outln!("Ctrl-C stops the cell.")?;
        outln!("export NITRILE_CONFIG={}", alice.display())?;

        // Stop order: the placement service first (no more host calls),
        // then the host agents (they stop their instances), then the key
        // service, then the token service, then the audit log service,
        // then the witness (logd's last checkpoint needs its cosignature).
        let (exit_tx, mut exit_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let watch = |child: &mut ServiceChild| {
            let exited = child.exited.take();
            let who = child.what.clone();
            let tx = exit_tx.clone();
            tokio::spawn(async move {
                exit_of(exited).await;
                let _ = tx.send(who);
            });
        };
        watch(&mut placed);
        watch(&mut deployd);
        for (_, _, child) in &mut host_children {
            watch(child);
        }
        watch(&mut kms);
        watch(&mut witness);
        drop(exit_tx);
        let (outcome_tx, outcome_rx) = tokio::sync::oneshot::channel();
        let stop = async move {
            tokio::pin!(signal);
            let mut unexpected = None;
            tokio::select! {
                biased;
                () = &mut signal => {}
                Some(who) = exit_rx.recv() => unexpected = Some(who),
            }
            // A Ctrl-C on a terminal reaches the host agents too.
            if unexpected.is_some()
                && tokio::time::timeout(SIGNAL_GRACE, &mut signal)
                    .await
                    .is_ok()
            {
                unexpected = None;
            }
            let statuses = tokio::task::spawn_blocking(move || {
                let mut statuses = vec![
                    (placed.what.clone(), placed.stop()),
                    (deployd.what.clone(), deployd.stop()),
                ];
                for (_, _, mut child) in host_children {
                    statuses.push((child.what.clone(), child.stop()));
                }
                statuses.push((kms.what.clone(), kms.stop()));
                statuses
            })
            .await;
            let _ = outcome_tx.send((unexpected, statuses));
        };
        let served = tokend.serve(stop).await;
        let _ = logd_stop.send(());
        let logd_result = logd_task.await;
        let witness_what = witness.what.clone();
        let witness_status = tokio::task::spawn_blocking(move || witness.stop()).await;
        served?;
        match logd_result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = errln!("nitrile up: the audit log service stopped with: {e:#}");
            }
            Err(e) => {
                let _ = errln!("nitrile up: the audit log service failed: {e}");
            }
        }
        let (unexpected, statuses) = outcome_rx
            .await
            .context("the cell stopped without stopping the host agents")?;
        let mut statuses = statuses.context("waiting for the host agents")?;
        statuses.push((
            witness_what,
            witness_status.context("waiting for the witness")?,
        ));
        if let Some(who) = unexpected {
            let how = statuses
                .iter()
                .find(|(w, _)| *w == who)
                .map(|(_, s)| match s {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                })
                .unwrap_or_default();
            anyhow::bail!(
                "{who} exited unexpectedly ({how}); the cell stopped, state kept in {}",
                layout.root().display()
            );
        }
        for (who, status) in statuses {
            match status {
                Ok(s) if s.success() => {}
                Ok(s) => {
                    let _ = errln!("nitrile up: {who} stopped with {s}");
                }
                Err(e) => {
                    let _ = errln!("nitrile up: cannot wait for {who}: {e}");
                }
            }
        }
        let _ = errln!(
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
            let _ = errln!(
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
            let _ = errln!(
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
            let _ = errln!("logd alert: {}", crate::output::json_safe(&line));
        }
    }
}

/// Default loopback address of logd's metrics in a new cell.
const DEFAULT_LOGD_METRICS: &str = "127.0.0.1:9445";

/// Writes `logd/logd.toml` with paths relative to it; the first time, the
/// monitor runs the rules of the cell's signed entitlement bundle
/// (`[monitor]`), metrics are served on [`DEFAULT_LOGD_METRICS`] and a
/// checkpoint needs the cosignature of the cell's `witness`. The witnesses,
/// quorum, intervals, webhook, monitor, storage and metrics address of an
/// existing file are kept, so edits to them survive restarts; the
/// unreviewed `rules = <dir>` of earlier versions becomes `[monitor]` with
/// the cell's bundle (whose `rules/` the bootstrap moved them into);
/// `metrics`, when given, replaces the metrics address. The cell's
/// `witness` is added to a file that names no witness (a cell made before
/// it existed) with a quorum of 1, and its address and key are brought up
/// to date where the file names it; a file naming other witnesses keeps
/// them and its quorum as they are.
fn write_logd_config(
    layout: &CellLayout,
    cell: &Name,
    hosts: &[Name],
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    witness: &LogdWitness,
) -> anyhow::Result<PathBuf> {
    let path = layout.logd_config();
    let dir = layout.logd_dir();
    let me = nitrile_logclient::logd_principal(cell);
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
                errln!(
                    "nitrile up: {}: the monitor's rules now come from the signed entitlement \
                     bundle {} (rules = {} replaced by [monitor])",
                    path.display(),
                    layout.entitlements_dir().display(),
                    rules.display()
                )?;
                Some(cell_bundle)
            }
            (None, None) => None,
        };
        config.storage = old.storage;
        config.metrics = old.metrics;
        config.sources = old.sources;
    } else {
        config.monitor = Some(cell_bundle);
        config.metrics = Some(MetricsAddr::new(
            DEFAULT_LOGD_METRICS
                .parse()
                .unwrap_or_else(|_| unreachable!("a socket address")),
        )?);
    }
    // The cell's journal sources: its hosts, token service, key service,
    // placement service and deployment service, besides any an operator
    // declared.
    for host in hosts {
        if !config.sources.hosts.contains(host) {
            config.sources.hosts.push(host.clone());
        }
    }
    if config.sources.token_service.is_none() {
        config.sources.token_service = Some(Name::new("tokend")?);
    }
    for service in [KMS, PLACEMENT, nitrile_deployd_api::DEPLOYER_SERVICE] {
        let service = Name::new(service)?;
        if !config.sources.services.contains(&service) {
            config.sources.services.push(service);
        }
    }
    if config.witnesses.is_empty() {
        config.witnesses = vec![witness.clone()];
        config.witness_quorum = config.witness_quorum.max(1);
    } else if let Some(w) = config.witnesses.iter_mut().find(|w| w.name == witness.name) {
        w.addr.clone_from(&witness.addr);
        w.vkey.clone_from(&witness.vkey);
    }
    if let Some(addr) = metrics {
        config.metrics =
            Some(MetricsAddr::new(addr).context("--logd-metrics must be a loopback address")?);
    }
    let text = format!(
        "# nitrile audit log service config (`nitrile logd --config`)\n{}",
        config.to_toml()
    );
    nitrile_fs::write_atomic(&path, text.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The witness's public cosigning key; the key is made (in its own state
/// directory, owner-only) the first time, named `<cell>.nitrile/witness`.
fn witness_key(layout: &CellLayout, cell: &Name) -> anyhow::Result<String> {
    let path = layout.witness_signing_key();
    let key = if path.exists() {
        nitrile_witness::load_signing_key(&path)?
    } else {
        let key = nitrile_witness::Witness::generate_key(&format!("{cell}.nitrile/{WITNESS}"))
            .context("cannot make the witness's key")?;
        nitrile_witness::write_signing_key(&path, &key)?;
        key
    };
    Ok(key.verifier().to_vkey())
}

/// Writes `witness/witness.toml` with paths relative to it: the witness
/// cosigns the cell's log, whose key is `log`; the logs of an existing
/// file other than the cell's are kept.
fn write_witness_config(
    layout: &CellLayout,
    cell: &Name,
    listen: SocketAddr,
    log: &NoteVerifier,
) -> anyhow::Result<PathBuf> {
    let path = layout.witness_config();
    let dir = layout.witness_dir();
    let name = Name::new(WITNESS)?;
    let principal = PrincipalId::new(cell.clone(), PrincipalKind::Service, name.clone());
    let (cert, key) = layout.cert_and_key(&principal);
    let rel = |p: &Path| relative_to(&dir, p);
    let mut logs = vec![LogConfig {
        origin: log.name().to_owned(),
        vkey: log.to_vkey(),
    }];
    if path.exists() {
        let old = WitnessConfig::load(&path).with_context(|| {
            format!(
                "cannot reuse {}; fix or remove it to have it written anew",
                path.display()
            )
        })?;
        logs.extend(old.logs.into_iter().filter(|l| l.origin != log.name()));
    }
    let config = WitnessConfig {
        cell: cell.clone(),
        name,
        listen,
        state: PathBuf::from("."),
        ca: rel(&layout.ca_cert()),
        cert: rel(&cert),
        key: rel(&key),
        signing_key: None,
        logs,
    };
    let text = format!(
        "# nitrile checkpoint witness config (`nitrile audit witness --config`)\n{}",
        config.to_toml()
    );
    nitrile_fs::write_atomic(&path, text.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// What the readiness lines say of the witnessing of logd's checkpoints.
fn witnessing(config: &LogdConfig, witness_vkey: &str) -> String {
    if config.witness_quorum == 0 {
        return "not witnessed (witness_quorum = 0 in logd.toml)".to_owned();
    }
    let names: Vec<&str> = config.witnesses.iter().map(|w| w.name.as_str()).collect();
    let ours = config.witnesses.iter().any(|w| w.vkey == witness_vkey);
    format!(
        "published only with {} cosignature(s) of: {}{}",
        config.witness_quorum,
        names.join(", "),
        if ours {
            ""
        } else {
            " (logd.toml names other witnesses than this cell's)"
        }
    )
}

/// Writes `hosts/<host>/hostd.toml` with paths relative to it, shipping
/// the journal to logd at `logd` when given, naming the key service at
/// `kms` (which makes, releases and destroys volume keys) when given, and
/// the cell's volume store (`<state>/volumes`, the same directory for every
/// host agent of the cell). The `[hypervisor]` and `[capacity]` sections and
/// the `volumes` directory of an existing file are kept, so edits to them
/// survive restarts.
#[allow(clippy::too_many_arguments)]
fn write_hostd_config(
    layout: &CellLayout,
    cell: &Name,
    host: &Name,
    listen: SocketAddr,
    logd: Option<(&str, &str)>,
    kms: Option<&str>,
    network: Option<NetworkConfig>,
    release: Option<ReleaseConfig>,
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
        // Loaded paths are resolved; written ones are relative to the file.
        config.volumes = old.volumes.map(|v| rel(&v));
    }
    config.logd = logd_target(logd);
    config.kms = kms.map(|addr| KmsTarget {
        addr: addr.to_owned(),
    });
    if config.volumes.is_none() {
        config.volumes = Some(rel(&volume_store(layout)));
    }
    config.network = network;
    config.release = release;
    config
        .write(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Where host `hK` (the `k`th, from 0) listens: `--hosts-listen-base` +
/// k when given; else h1 on `--hostd-listen` and the others on a free
/// port of its address (read back from their readiness lines).
fn host_listen(args: &Args, k: usize) -> anyhow::Result<SocketAddr> {
    let ip = args.hostd_listen.ip();
    match args.hosts_listen_base {
        Some(base) => {
            let port = u16::try_from(k)
                .ok()
                .and_then(|k| base.checked_add(k))
                .context("--hosts-listen-base leaves no port for every host")?;
            Ok(SocketAddr::new(ip, port))
        }
        None if k == 0 => Ok(args.hostd_listen),
        None => Ok(SocketAddr::new(ip, 0)),
    }
}

/// The network namespace of `host`'s data path: `nitrile-up-<8 hex digits
/// of a hash of the state directory>-<host>`, so that two cells on one
/// machine (or their tests) never share one, and a cell restarted on the
/// same state finds its own again.
fn netns_name(layout: &CellLayout, host: &Name) -> String {
    use sha2::Digest as _;
    let root = std::fs::canonicalize(layout.root()).unwrap_or_else(|_| layout.root().to_owned());
    let h = sha2::Sha256::digest(root.as_os_str().as_encoded_bytes());
    let hex: String = h.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("nitrile-up-{hex}-{host}")
}

/// Writes `placed/placed.toml` with paths relative to it: the placement
/// service on `listen`, getting its host-call tokens from the token
/// service at `tokend`, placing on `fleet` (host id -> admin address),
/// importing into the cell's image store, and shipping its journal to
/// logd at `logd` when given. The metrics address and the network refresh
/// period of an existing file are kept.
fn write_placed_config(
    layout: &CellLayout,
    cell: &Name,
    listen: SocketAddr,
    tokend: &str,
    fleet: &BTreeMap<String, String>,
    logd: Option<(&str, &str)>,
) -> anyhow::Result<PathBuf> {
    let path = layout.placed_config();
    let dir = layout.placed_dir();
    let principal = PrincipalId::new(cell.clone(), PrincipalKind::Service, Name::new(PLACEMENT)?);
    let (cert, key) = layout.cert_and_key(&principal);
    let rel = |p: &Path| relative_to(&dir, p);
    let (metrics, network_refresh_secs) = if path.exists() {
        let old = PlacedConfig::load(&path).with_context(|| {
            format!(
                "cannot reuse {}; fix or remove it to have it written anew",
                path.display()
            )
        })?;
        (old.metrics, old.network_refresh_secs)
    } else {
        (None, nitrile_placed::config::DEFAULT_NETWORK_REFRESH_SECS)
    };
    let config = PlacedConfig {
        cell: cell.clone(),
        listen,
        state: PathBuf::from("."),
        ca: rel(&layout.ca_cert()),
        cert: rel(&cert),
        key: rel(&key),
        issuer_keys: rel(&layout.placed_issuer_keys()),
        images: rel(&layout.images_dir()),
        tokend: tokend.to_owned(),
        metrics,
        network_refresh_secs,
        hosts: fleet_by_name(fleet)?,
        logd: logd_target(logd),
    };
    config
        .write(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Writes `deployd/deployd.toml` with paths relative to it: the fleet,
/// the token service, and shipping to logd at `logd` when given. Waves,
/// bake time, health timeout and the metrics address of an existing file
/// are kept.
fn write_deployd_config(
    layout: &CellLayout,
    cell: &Name,
    listen: SocketAddr,
    tokend: &str,
    fleet: &BTreeMap<String, String>,
    logd: Option<(&str, &str)>,
) -> anyhow::Result<PathBuf> {
    use nitrile_deployd::DeploydConfig;
    let path = layout.deployd_config();
    let dir = layout.deployd_dir();
    let principal = nitrile_deployd_api::deployer_principal(cell);
    let (cert, key) = layout.cert_and_key(&principal);
    let rel = |p: &Path| relative_to(&dir, p);
    let old = if path.exists() {
        Some(DeploydConfig::load(&path).with_context(|| {
            format!(
                "cannot reuse {}; fix or remove it to have it written anew",
                path.display()
            )
        })?)
    } else {
        None
    };
    let config = DeploydConfig {
        cell: cell.clone(),
        listen,
        state: PathBuf::from("."),
        ca: rel(&layout.ca_cert()),
        cert: rel(&cert),
        key: rel(&key),
        issuer_keys: rel(&layout.deployd_issuer_keys()),
        tokend: tokend.to_owned(),
        metrics: old.as_ref().and_then(|o| o.metrics),
        waves: old.as_ref().map_or_else(|| vec![1, 2], |o| o.waves.clone()),
        bake_secs: old.as_ref().map_or(10, |o| o.bake_secs),
        health_timeout_secs: old
            .as_ref()
            .map_or(HOST_HEALTH_DEADLINE_SECS * 2, |o| o.health_timeout_secs),
        hosts: fleet_by_name(fleet)?,
        logd: logd_target(logd),
    };
    config
        .write(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Where a service of the cell ships its journal: logd at `addr`, whose
/// log key `vkey` it pins.
fn logd_target(logd: Option<(&str, &str)>) -> Option<LogdTarget> {
    logd.map(|(addr, vkey)| LogdTarget {
        addr: addr.to_owned(),
        log_vkey: Some(vkey.to_owned()),
    })
}

/// The fleet (host id -> admin API address) with its ids as names.
fn fleet_by_name(fleet: &BTreeMap<String, String>) -> anyhow::Result<BTreeMap<Name, String>> {
    fleet
        .iter()
        .map(|(h, a)| Ok((Name::new(h)?, a.clone())))
        .collect()
}

/// The `dev` environment's release repository of a one-machine cell,
/// `<state>/release/`: its keys in `keys/` (owner-only: the root key, three
/// release signers of which two sign a release, the online key, the CI
/// key) and the TUF repository in `repo/`, both made once.
struct DevReleases {
    repo: PathBuf,
    root: PathBuf,
    ci_key: PathBuf,
}

/// The files a host pinned.
struct Pins {
    repo: PathBuf,
    root: PathBuf,
    ci_key: PathBuf,
}

/// The release key files of a one-machine cell, in `<state>/release/keys/`.
pub(crate) const DEV_RELEASE_KEYS: [&str; 6] = ["root", "s1", "s2", "s3", "online", "ci"];

fn dev_releases(layout: &CellLayout, now: time::OffsetDateTime) -> anyhow::Result<DevReleases> {
    use nitrile_release::keys::ReleaseKey;
    use std::os::unix::fs::DirBuilderExt as _;
    let dir = layout.root().join("release");
    let keys = dir.join("keys");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&keys)
        .with_context(|| format!("cannot create {}", keys.display()))?;
    let repo = dir.join("repo");
    let root = repo.join("metadata").join("root.json");
    let ci_key = nitrile_release::keys::public_path(&keys.join("ci.key"));
    if !root.exists() {
        let mut made = Vec::new();
        for name in DEV_RELEASE_KEYS {
            let path = keys.join(format!("{name}.key"));
            let key = if path.exists() {
                ReleaseKey::load(&path)?
            } else {
                let k = ReleaseKey::generate();
                k.write(&path)?;
                k
            };
            made.push(key);
        }
        let options = nitrile_release::repo::InitOptions {
            environment: nitrile_release::Environment::new("dev")?,
            root_keys: vec![made[0].public()],
            root_threshold: 1,
            signers: made[1..4].iter().map(ReleaseKey::public).collect(),
            threshold: 2,
            online: made[4].public(),
            root_expiry_days: 365,
        };
        nitrile_release::repo::init(&repo, &options, &made[..1], now)?;
    }
    Ok(DevReleases { repo, root, ci_key })
}

impl DevReleases {
    /// Pins the root and CI key in `host`'s directory, once: a host keeps
    /// what it pinned at provisioning.
    fn pin(&self, layout: &CellLayout, host: &Name) -> anyhow::Result<Pins> {
        let dir = layout.host_dir(host);
        let root = dir.join("release-root.json");
        let ci_key = dir.join("release-ci.pub.json");
        for (from, to) in [(&self.root, &root), (&self.ci_key, &ci_key)] {
            if !to.exists() {
                let bytes = std::fs::read(from)
                    .with_context(|| format!("cannot read {}", from.display()))?;
                nitrile_fs::write_atomic(to, &bytes, 0o644)?;
            }
        }
        Ok(Pins {
            repo: self.repo.clone(),
            root,
            ci_key,
        })
    }
}

/// The `[release]` section of a host agent whose config is in `dir`:
/// environment `dev`, the cell's repository, the host's pins.
fn release_section(dir: &Path, pins: Pins) -> ReleaseConfig {
    let rel = |p: &Path| relative_to(dir, p);
    ReleaseConfig {
        environment: "dev".into(),
        repository: rel(&pins.repo),
        root: rel(&pins.root),
        ci_key: rel(&pins.ci_key),
        health_deadline_secs: Some(HOST_HEALTH_DEADLINE_SECS),
    }
}

/// The cell's volume store, `<state>/volumes`: volume records and their
/// ciphertext, one directory shared by every host agent of the cell, so
/// that a volume detached from an instance of one host attaches to an
/// instance of another.
fn volume_store(layout: &CellLayout) -> PathBuf {
    layout.root().join("volumes")
}

/// Writes `kms/kms.toml` with paths relative to it: the key service makes
/// the cell's default key, and ships its journal to logd at `logd` when
/// given. The metrics address and sweep interval of an existing file are
/// kept, so edits to them survive restarts.
fn write_kms_config(
    layout: &CellLayout,
    cell: &Name,
    listen: SocketAddr,
    logd: Option<(&str, &str)>,
) -> anyhow::Result<PathBuf> {
    let path = layout.kms_config();
    let dir = layout.kms_dir();
    let principal = PrincipalId::new(cell.clone(), PrincipalKind::Service, Name::new(KMS)?);
    let (cert, key) = layout.cert_and_key(&principal);
    let rel = |p: &Path| relative_to(&dir, p);
    let mut config = KmsConfig::new(
        cell.clone(),
        listen,
        PathBuf::from("."),
        rel(&layout.ca_cert()),
        rel(&cert),
        rel(&key),
        rel(&layout.kms_issuer_keys()),
    );
    config.default_key = true;
    // The placement service makes and boots the root volumes of the
    // instances customers run, under each customer's own key.
    config.placement = Some(PrincipalId::new(
        cell.clone(),
        PrincipalKind::Service,
        Name::new(PLACEMENT)?,
    ));
    if path.exists() {
        let old = KmsConfig::load(&path).with_context(|| {
            format!(
                "cannot reuse {}; fix or remove it to have it written anew",
                path.display()
            )
        })?;
        config.metrics = old.metrics;
        config.sweep_interval_secs = old.sweep_interval_secs;
    }
    config.logd = logd_target(logd);
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

/// What a child's stderr reader reports before it serves.
enum Startup {
    /// The `serving on <addr>` line.
    Serving(SocketAddr),
    /// Its stderr closed: it exited.
    Exited,
}

/// A service of the cell running as a child process (the host agent, the
/// witness): a trust domain of its own, stopped with the cell.
struct ServiceChild {
    child: Child,
    /// The pid serving now: the child's, or its successor's after a live
    /// update (`... took over as pid N ...`).
    pid: Arc<AtomicU32>,
    /// What it is, for messages (`the host agent h1`).
    what: String,
    /// Where it serves.
    addr: SocketAddr,
    /// Fires when its stderr closes after it served, i.e. it exited.
    exited: Option<tokio::sync::oneshot::Receiver<()>>,
    stopped: bool,
}

/// Resolves when `exited` fires; never without it.
async fn exit_of(exited: Option<tokio::sync::oneshot::Receiver<()>>) {
    match exited {
        Some(rx) => {
            let _ = rx.await;
        }
        None => std::future::pending().await,
    }
}

impl ServiceChild {
    /// Starts `nitrile <args> <config> --exit-with-parent <us> --log-format
    /// F` and waits for its readiness line, `<ready>... serving on
    /// <addr>`; its other stderr lines are forwarded prefixed `prefix`.
    /// With `own_group`, it runs in a process group of its own, which a
    /// Ctrl-C on the terminal does not reach: the cell stops it.
    fn spawn(
        what: impl Into<String>,
        args: &[&str],
        config: &Path,
        (ready, prefix): (&'static str, impl Into<String>),
        own_group: bool,
        log_format: LogFormat,
    ) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let what: String = what.into();
        let prefix: String = prefix.into();
        let exe = std::env::current_exe().context("cannot find this executable")?;
        // The child's stdout goes to our stderr: our stdout is what scripts
        // read for the export line.
        let stdout = crate::output::stderr_fd().context("cannot duplicate stderr")?;
        let log_format = match log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let mut command = Command::new(&exe);
        command
            .args(args)
            .arg(config)
            .arg("--exit-with-parent")
            .arg(std::process::id().to_string())
            .args(["--log-format", log_format])
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::piped());
        if own_group {
            command.process_group(0);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {} ({})", what, exe.display()))?;
        let stderr = child
            .stderr
            .take()
            .with_context(|| format!("the stderr of {what} is not piped"))?;
        let (startup_tx, startup_rx) = mpsc::channel();
        let (exited_tx, exited_rx) = tokio::sync::oneshot::channel();
        let pid = Arc::new(AtomicU32::new(child.id()));
        let serving_pid = Arc::clone(&pid);
        std::thread::spawn(move || {
            forward_stderr(stderr, ready, &prefix, startup_tx, exited_tx, &serving_pid);
        });

        let mut me = Self {
            child,
            pid,
            what,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            exited: Some(exited_rx),
            stopped: false,
        };
        let early = match startup_rx.recv_timeout(CHILD_START_TIMEOUT) {
            Ok((Startup::Serving(addr), _)) => {
                me.addr = addr;
                return Ok(me);
            }
            Ok((Startup::Exited, lines)) => lines,
            Err(_) => {
                let _ = me.stop();
                anyhow::bail!(
                    "{} did not start serving within {}s; it was stopped",
                    me.what,
                    CHILD_START_TIMEOUT.as_secs()
                );
            }
        };
        let status = me.stop();
        anyhow::bail!(
            "{} exited before serving ({}):\n{}",
            me.what,
            status
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string()),
            early.join("\n")
        )
    }

    /// SIGTERM, then wait: it stops (the host agent stops its instances)
    /// and exits.
    fn stop(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let serving = self.pid.load(Ordering::SeqCst);
        if !self.stopped {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(serving).unwrap_or(i32::MAX));
            // Already exited (e.g. Ctrl-C on a terminal reached it): fine.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let status = self.child.wait();
        self.stopped = true;
        if serving == self.child.id() {
            return status;
        }
        // A successor after a live update (not our child: its parent, the
        // agent that handed over, exited): wait until it is gone.
        let pid = nix::unistd::Pid::from_raw(i32::try_from(serving).unwrap_or(i32::MAX));
        let deadline = std::time::Instant::now() + SUCCESSOR_STOP_TIMEOUT;
        while nix::sys::signal::kill(pid, None).is_ok() {
            if std::time::Instant::now() > deadline {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                return Err(std::io::Error::other(format!(
                    "{} (pid {serving}, after a live update) did not stop within {}s; killed",
                    self.what,
                    SUCCESSOR_STOP_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        status
    }
}

impl Drop for ServiceChild {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.stop();
        }
    }
}

/// Reads a child's stderr: before it serves, lines are forwarded and kept
/// (to explain an early exit); its readiness line (starting `ready`) is
/// reported; afterwards lines are forwarded until it closes.
fn forward_stderr(
    stderr: std::process::ChildStderr,
    ready: &str,
    prefix: &str,
    startup: mpsc::Sender<(Startup, Vec<String>)>,
    exited: tokio::sync::oneshot::Sender<()>,
    serving_pid: &AtomicU32,
) {
    let mut serving = false;
    let mut kept = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if serving && let Some(pid) = successor_pid(&line, ready) {
            serving_pid.store(pid, Ordering::SeqCst);
        }
        if !serving && let Some(addr) = serving_addr(&line, ready) {
            serving = true;
            let _ = startup.send((Startup::Serving(addr), Vec::new()));
            continue;
        }
        let _ = errln!("{prefix}{line}");
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

/// The pid of `<ready><name> took over as pid <pid> ...`, the line of a
/// host agent's successor after a live update.
fn successor_pid(line: &str, ready: &str) -> Option<u32> {
    let rest = line.strip_prefix(ready)?;
    let (_, after) = rest.split_once(" took over as pid ")?;
    after.split(' ').next()?.parse().ok()
}

/// The address of `<ready>[<name> ]serving on <addr>` (`nitrile hostd: h1
/// serving on 127.0.0.1:7444`, `nitrile audit witness: serving on ...`).
fn serving_addr(line: &str, ready: &str) -> Option<SocketAddr> {
    let rest = line.strip_prefix(ready)?;
    let addr = match rest.strip_prefix("serving on ") {
        Some(addr) => addr,
        None => rest.split_once(" serving on ")?.1,
    };
    addr.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_takeover_line_gives_the_successors_pid() {
        assert_eq!(
            successor_pid(
                "nitrile hostd: h1 took over as pid 4242 (release 0.2.0) on 127.0.0.1:7444",
                HOSTD_READY
            ),
            Some(4242)
        );
        assert_eq!(
            successor_pid("h1: took over as pid 4242", HOSTD_READY),
            None
        );
        assert_eq!(
            successor_pid("nitrile hostd: h1 took over as pid x", HOSTD_READY),
            None
        );
    }

    #[test]
    fn the_serving_line_gives_the_address() {
        assert_eq!(
            serving_addr("nitrile hostd: h1 serving on 127.0.0.1:7444", HOSTD_READY),
            Some(SocketAddr::from(([127, 0, 0, 1], 7444)))
        );
        assert_eq!(
            serving_addr("hostd: h1 serving on 127.0.0.1:7444", HOSTD_READY),
            None
        );
        assert_eq!(
            serving_addr("nitrile hostd: h1 serving on nowhere", HOSTD_READY),
            None
        );
        assert_eq!(serving_addr("INFO listening", HOSTD_READY), None);
        assert_eq!(
            serving_addr(
                "nitrile audit witness: serving on 127.0.0.1:7446",
                WITNESS_READY
            ),
            Some(SocketAddr::from(([127, 0, 0, 1], 7446)))
        );
        assert_eq!(
            serving_addr("nitrile hostd: h1 serving on 127.0.0.1:7444", WITNESS_READY),
            None
        );
        assert_eq!(
            serving_addr("nitrile kms: serving on 127.0.0.1:7447", KMS_READY),
            Some(SocketAddr::from(([127, 0, 0, 1], 7447)))
        );
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
        let w = witness("127.0.0.1:7446");
        let path = write_logd_config(
            &layout,
            &cell,
            &[Name::new("h1").unwrap()],
            listen,
            None,
            &w,
        )
        .unwrap();
        assert_eq!(metrics(&path), DEFAULT_LOGD_METRICS.parse().ok());
        let other: SocketAddr = "127.0.0.1:9555".parse().unwrap();
        write_logd_config(
            &layout,
            &cell,
            &[Name::new("h1").unwrap()],
            listen,
            Some(other),
            &w,
        )
        .unwrap();
        assert_eq!(metrics(&path), Some(other));
        // Kept when not given.
        write_logd_config(
            &layout,
            &cell,
            &[Name::new("h1").unwrap()],
            listen,
            None,
            &w,
        )
        .unwrap();
        assert_eq!(metrics(&path), Some(other));
        // Refused when not loopback; the file is left as it was.
        let wild: SocketAddr = "0.0.0.0:9445".parse().unwrap();
        assert!(
            write_logd_config(
                &layout,
                &cell,
                &[Name::new("h1").unwrap()],
                listen,
                Some(wild),
                &w
            )
            .is_err()
        );
        assert_eq!(metrics(&path), Some(other));
    }

    fn witness(addr: &str) -> LogdWitness {
        LogdWitness {
            name: Name::new(WITNESS).unwrap(),
            vkey: "local.nitrile/witness+01020304+BA".into(),
            addr: addr.into(),
        }
    }

    #[test]
    fn the_logd_config_gains_the_cells_witness_and_keeps_an_operators() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&tmp.path().join("state"));
        std::fs::create_dir_all(layout.logd_dir()).unwrap();
        let cell = Name::new("local").unwrap();
        let listen: SocketAddr = "127.0.0.1:7445".parse().unwrap();
        let load = |path: &Path| LogdConfig::load(path).unwrap();

        // A new cell: its witness, needed.
        let path = write_logd_config(
            &layout,
            &cell,
            &[Name::new("h1").unwrap()],
            listen,
            None,
            &witness("127.0.0.1:1"),
        )
        .unwrap();
        let c = load(&path);
        assert_eq!(c.witnesses, vec![witness("127.0.0.1:1")]);
        assert_eq!(c.witness_quorum, 1);
        // The witness moved (port 0): its address follows.
        write_logd_config(
            &layout,
            &cell,
            &[Name::new("h1").unwrap()],
            listen,
            None,
            &witness("127.0.0.1:2"),
        )
        .unwrap();
        assert_eq!(load(&path).witnesses, vec![witness("127.0.0.1:2")]);

        // A cell made before witnesses: no witness, quorum 0. It gains one.
        let mut old = load(&path);
        old.witnesses.clear();
        old.witness_quorum = 0;
        std::fs::write(&path, old.to_toml()).unwrap();
        write_logd_config(
            &layout,
            &cell,
            &[Name::new("h1").unwrap()],
            listen,
            None,
            &witness("127.0.0.1:3"),
        )
        .unwrap();
        let c = load(&path);
        assert_eq!(c.witnesses, vec![witness("127.0.0.1:3")]);
        assert_eq!(c.witness_quorum, 1);

        // An operator's witnesses and quorum are kept as they are, ours
        // brought up to date where named.
        let theirs = LogdWitness {
            name: Name::new("w2").unwrap(),
            vkey: "w2+05060708+BA".into(),
            addr: "192.0.2.1:7446".into(),
        };
        let mut edited = load(&path);
        edited.witnesses.push(theirs.clone());
        edited.witness_quorum = 2;
        std::fs::write(&path, edited.to_toml()).unwrap();
        write_logd_config(
            &layout,
            &cell,
            &[Name::new("h1").unwrap()],
            listen,
            None,
            &witness("127.0.0.1:4"),
        )
        .unwrap();
        let c = load(&path);
        assert_eq!(c.witnesses, vec![witness("127.0.0.1:4"), theirs.clone()]);
        assert_eq!(c.witness_quorum, 2);
        let mut only_theirs = c.clone();
        only_theirs.witnesses = vec![theirs.clone()];
        only_theirs.witness_quorum = 1;
        std::fs::write(&path, only_theirs.to_toml()).unwrap();
        write_logd_config(
            &layout,
            &cell,
            &[Name::new("h1").unwrap()],
            listen,
            None,
            &witness("127.0.0.1:5"),
        )
        .unwrap();
        let c = load(&path);
        assert_eq!(c.witnesses, vec![theirs]);
        assert_eq!(c.witness_quorum, 1);
    }

    #[test]
    fn the_logd_config_of_an_older_cell_moves_to_the_reviewed_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&tmp.path().join("state"));
        std::fs::create_dir_all(layout.logd_dir()).unwrap();
        let cell = Name::new("local").unwrap();
        let listen: SocketAddr = "127.0.0.1:7445".parse().unwrap();
        let path = write_logd_config(
            &layout,
            &cell,
            &[Name::new("h1").unwrap()],
            listen,
            None,
            &witness("127.0.0.1:6"),
        )
        .unwrap();
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
        write_logd_config(
            &layout,
            &cell,
            &[Name::new("h1").unwrap()],
            listen,
            None,
            &witness("127.0.0.1:6"),
        )
        .unwrap();
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
    fn the_kms_config_makes_the_default_key_and_keeps_edits() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&tmp.path().join("state"));
        let cell = Name::new("local").unwrap();
        let listen: SocketAddr = "127.0.0.1:7447".parse().unwrap();
        let path = write_kms_config(&layout, &cell, listen, None).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("cert = \"../pki/service-kms.pem\""), "{text}");
        let loaded = KmsConfig::load(&path).unwrap();
        assert!(loaded.default_key);
        assert_eq!(loaded.store_dir(), layout.kms_store());
        assert_eq!(loaded.logd, None);
        let mut edited = loaded;
        edited.sweep_interval_secs = Some(5);
        edited.write(&path).unwrap();
        write_kms_config(
            &layout,
            &cell,
            listen,
            Some(("127.0.0.1:7445", "local.nitrile/log+01234567+AQ")),
        )
        .unwrap();
        let again = KmsConfig::load(&path).unwrap();
        assert_eq!(again.sweep_interval_secs, Some(5));
        assert_eq!(again.logd.unwrap().addr, "127.0.0.1:7445");
    }

    #[test]
    fn the_hostd_config_keeps_hypervisor_edits() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&tmp.path().join("state"));
        let cell = Name::new("local").unwrap();
        let h1 = Name::new("h1").unwrap();
        let listen: SocketAddr = "127.0.0.1:7444".parse().unwrap();
        let path = write_hostd_config(&layout, &cell, &h1, listen, None, None, None, None).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("ca = \"../../pki/ca.pem\""), "{text}");
        assert!(text.contains("volumes = \"../../volumes\""), "{text}");
        let loaded = HostdConfig::load(&path).unwrap();
        assert_eq!(
            loaded.cert,
            layout.host_dir(&h1).join("../../pki/host-h1.pem")
        );
        assert_eq!(loaded.state, layout.host_dir(&h1).join("."));
        assert_eq!(loaded.kms, None);
        // The cell's volume store, not the host's own default.
        assert_eq!(
            loaded.volume_store(),
            layout.host_dir(&h1).join("../../volumes")
        );

        let mut edited = loaded.clone();
        edited.hypervisor.backend = nitrile_hostd::BackendName::Qemu;
        edited.capacity.vcpus = Some(1);
        edited.volumes = Some(layout.root().join("shared-volumes"));
        edited.write(&path).unwrap();
        let other: SocketAddr = "127.0.0.1:7555".parse().unwrap();
        write_hostd_config(
            &layout,
            &cell,
            &h1,
            other,
            Some(("127.0.0.1:7445", "local.nitrile/log+01234567+AQ")),
            Some("127.0.0.1:7447"),
            Some(NetworkConfig {
                wireguard_listen: "127.0.0.1:0".parse().unwrap(),
                ingress_address: "127.0.0.1".parse().unwrap(),
                netns: Some(netns_name(&layout, &h1)),
            }),
            None,
        )
        .unwrap();
        let again = HostdConfig::load(&path).unwrap();
        let network = again.network.clone().unwrap();
        assert_eq!(network.ingress_address.to_string(), "127.0.0.1");
        assert!(network.netns.unwrap().starts_with("nitrile-up-"));
        assert_eq!(again.kms.as_ref().unwrap().addr, "127.0.0.1:7447");
        // An edited volume store is kept, written relative to the file.
        assert_eq!(
            again.volume_store(),
            layout.host_dir(&h1).join("../../shared-volumes")
        );
        let logd = again.logd.unwrap();
        assert_eq!(logd.addr, "127.0.0.1:7445");
        assert_eq!(
            logd.log_vkey.as_deref(),
            Some("local.nitrile/log+01234567+AQ")
        );
        assert_eq!(again.listen, other);
        assert_eq!(again.hypervisor.backend, nitrile_hostd::BackendName::Qemu);
        assert_eq!(again.capacity.vcpus, Some(1));
        assert_eq!(again.ca, loaded.ca);
    }
}
