//! `nitrile hostd`: the host agent on its one mTLS port.
//!
//! Per request, in this order: parse into [`AdminRequest`] (anything else is
//! a journaled `request` refusal) -> [`Admission::admit_async`] (token
//! verified offline, request record durable) -> execute ->
//! [`Admission::complete_async`] with the outcome -> reply. The waits for the
//! journal are futures ([`nitrile_audit::Journal::submit`]), not blocked
//! threads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use nitrile_api::admin::{
    AdminRequest, ApiError, Capacity, Health, HostDescription, HostHealth, ImageSummary,
    InstanceList, MAX_LABEL_LEN, Measurement, Sha256Hex, Software, VOLUME_TOKEN_HEADER, VolumeList,
    clip_text,
};
use nitrile_api::wire::RefusalStep;
use nitrile_api::{Audience, Name, PrincipalId, PrincipalKind, ResourceId, ResourceKind};
use nitrile_audit::{JournalOptions, Outcome};
use nitrile_gate::{
    Admission, AdmissionError, Admitted, DEFAULT_SIGNATURE_CACHE, Expected, IdentityError,
    Listeners, Refused, SecondToken, ServiceIdentity, bearer, refusal_response, request_detail,
};
use nitrile_image::ImageStore;
use nitrile_logclient::{JournalShipping, LogKeyError};
use nitrile_net::{Handler, PeerIdentity, PreauthReport, Registry, Server, json_response};
use nitrile_pki::PkiError;
use nitrile_token::{
    Clock, DEFAULT_REPLAY_CAPACITY, IssuerFile, IssuerFileError, ReplayCache, SystemClock, Verifier,
};
use nitrile_vmm::{Backend, HostProbe, Hypervisor, KvmBackend, QemuBackend};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;

use crate::config::HostdConfig;
use crate::instances::{CapacityLimits, InstanceError, Instances};
use crate::live::{Handover, Ready, Served};
use crate::metrics::{HostdMetrics, METRICS_FILE, RequestOutcome, write_metrics_file};
use crate::volume_keys::{KmsVolumeKeys, VolumeKeySource};
use crate::volumes::{VolumeStore, VolumeStoreError};

/// How often the metrics file is rewritten (and the image list refreshed).
pub const METRICS_INTERVAL: Duration = Duration::from_secs(5);
/// The reason recorded for instances stopped because the agent exits.
pub const SHUTDOWN_REASON: &str = "host agent shut down";

/// How the host agent runs, beyond its config file.
#[derive(Clone)]
pub struct HostdOptions {
    /// Stop running instances when [`Hostd::serve`] returns (recorded
    /// `stopped`, reason [`SHUTDOWN_REASON`]); otherwise they keep running
    /// for the next host agent to adopt.
    pub stop_instances_on_exit: bool,
    /// The clock for token checks and records.
    pub clock: Arc<dyn Clock>,
    /// DANGER, benchmarks only: open the journal without fdatasync
    /// ([`nitrile_audit::JournalOptions::danger_no_sync`]), so a record is
    /// not durable when the request runs. Not reachable from `nitrile hostd`
    /// or the config file; it exists to measure the ceiling of the
    /// durable path.
    pub danger_journal_no_sync: bool,
    /// The key service that makes, seals and destroys volume keys
    /// ([`VolumeKeySource`]); without one, launches with volumes are
    /// refused (`no_key_service`).
    pub volume_keys: Option<Arc<dyn VolumeKeySource>>,
    /// After `host.update` staged a release, hand over to it
    /// ([`crate::live`]): [`Hostd::serve_updatable`] returns
    /// [`Served::Handover`]. Without it a release is only staged.
    pub live_update: bool,
    /// This agent takes over from another ([`crate::live::Takeover`]): it
    /// records its version as the highest run and accepts `host.update`
    /// hand-overs only once committed ([`HostdHandle::committed`]).
    pub takeover: bool,
}

impl std::fmt::Debug for HostdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostdOptions")
            .field("stop_instances_on_exit", &self.stop_instances_on_exit)
            .field("danger_journal_no_sync", &self.danger_journal_no_sync)
            .field("volume_keys", &self.volume_keys.is_some())
            .field("live_update", &self.live_update)
            .field("takeover", &self.takeover)
            .finish_non_exhaustive()
    }
}

impl Default for HostdOptions {
    fn default() -> Self {
        Self {
            stop_instances_on_exit: false,
            clock: Arc::new(SystemClock),
            danger_journal_no_sync: false,
            volume_keys: None,
            live_update: false,
            takeover: false,
        }
    }
}

/// Why the host agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostdError {
    /// the TPM-held TLS key ([tpm] tls_key) could not be read
    #[error("the TPM-held TLS key: {0}")]
    Tpm(String),
    /// the instance network's data path could not start
    #[error("instance network")]
    Network(#[from] crate::network::NetError),
    /// the host certificate's key could not be loaded for signing
    #[error("host key for signing")]
    SigningKey(#[from] nitrile_pki::tls::TlsError),
    /// the CA, the certificate or its key could not be loaded, or the
    /// certificate is not this host's in this cell
    #[error("host identity")]
    Identity(#[from] IdentityError),
    /// the pinned issuer keys could not be loaded
    #[error("pinned token issuer keys {}", path.display())]
    IssuerKeys {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: IssuerFileError,
    },
    /// the host name is not a token audience
    #[error("host name is not a token audience")]
    Audience(#[from] nitrile_api::IdError),
    /// the journal could not be opened
    #[error("host journal")]
    Journal(#[from] nitrile_audit::JournalError),
    /// the replay cache could not be rebuilt from the journal
    #[error("admission")]
    Admission(#[from] AdmissionError),
    /// the volume store could not be opened
    #[error("volume store {}", path.display())]
    Volumes {
        /// The store directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: VolumeStoreError,
    },
    /// the image store could not be opened
    #[error("image store {}", path.display())]
    Images {
        /// The store directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: nitrile_image::ImageError,
    },
    /// the instance records could not be loaded or re-adopted
    #[error("instances")]
    Instances(#[from] InstanceError),
    /// the socket could not be bound or served
    #[error("network")]
    Net(#[from] nitrile_net::NetError),
    /// the listening socket inherited from the agent handing over is not
    /// usable
    #[error("the inherited listening socket")]
    Inherited {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the state directory could not be created
    #[error("state directory {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the `[logd]` section cannot be shipped to
    #[error("[logd] in the config")]
    Logd(#[from] LogKeyError),
    /// a host that installs only signed releases (`[release]`) names a
    /// binary of its own to run
    #[error(
        "[hypervisor] {key} names a binary to run, and this host installs only signed releases \
         ([release]): it runs the QEMU of its host image and the VMM of its release; remove {key}"
    )]
    UnreleasedBinary {
        /// The config key.
        key: &'static str,
    },
}

/// What host.describe reports that does not change while the agent runs.
#[derive(Debug)]
struct Fixed {
    software: Software,
    measurements: Vec<Measurement>,
    started_at: String,
}

struct Inner {
    config: HostdConfig,
    admission: Admission,
    instances: Instances,
    images: ImageStore,
    image_list: Mutex<Vec<ImageSummary>>,
    metrics: HostdMetrics,
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
    hypervisor: Option<Arc<dyn Hypervisor>>,
    fixed: Fixed,
    releases: Option<crate::update::Releases>,
    /// Fires the hand-over to a staged release (when live updates are on).
    handover: Mutex<Option<tokio::sync::oneshot::Sender<Handover>>>,
    /// Whether a staged release is handed over to now.
    armed: AtomicBool,
    /// Fired once `host.shutdown` was answered.
    power_off: tokio::sync::Notify,
}

/// A host agent with its socket bound, ready to serve.
pub struct Hostd {
    inner: Arc<Inner>,
    server: Server,
    listener: TcpListener,
    stop_instances_on_exit: bool,
    shipping: JournalShipping,
    handover: Option<tokio::sync::oneshot::Receiver<Handover>>,
}

/// A handle on a serving host agent, for its supervisor (the live update's
/// two sides).
#[derive(Clone)]
pub struct HostdHandle(Arc<Inner>);

impl std::fmt::Debug for HostdHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HostdHandle")
            .field(&self.0.config.host)
            .finish()
    }
}

impl std::fmt::Debug for Hostd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hostd")
            .field("host", &self.inner.config.host)
            .field("listen", &self.local_addr())
            .finish_non_exhaustive()
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn sha256_file(path: &Path) -> Option<Sha256Hex> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).ok()?;
    Some(Sha256Hex::from_bytes(h.finalize().into()))
}

fn label(s: &str) -> String {
    clip_text(s.trim(), MAX_LABEL_LEN)
}

/// The usable backend: its name, its version, and the hypervisor.
type OpenedBackend = (Arc<dyn Hypervisor>, &'static str, Option<String>);

fn open_backend(config: &HostdConfig) -> Result<OpenedBackend, String> {
    let hv = &config.hypervisor;
    let qemu = hv
        .qemu
        .clone()
        .or_else(|| find_in_path("qemu-system-x86_64"));
    // The nitrile binary: `nitrile vmm` (kvm) or `nitrile qemu-launch` (qemu).
    let vmm = hv.vmm.clone().or_else(HostProbe::default_vmm_binary);
    let probe = HostProbe::detect(vmm.as_deref(), qemu.as_deref());
    let (backend, why) =
        nitrile_vmm::select(hv.backend.choice(), &probe).map_err(|e| e.to_string())?;
    tracing::info!(%why, "hypervisor backend selected");
    let vms = config.state.join("vms");
    match backend {
        Backend::Qemu {
            qemu_binary,
            accel,
            launcher,
        } => {
            let version = std::process::Command::new(&qemu_binary)
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .output()
                .ok()
                .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(label));
            let mut b = QemuBackend::new(vms, &qemu_binary, &launcher)
                .map_err(|e| e.to_string())?
                .with_accel(accel);
            if let Some(d) = &hv.vsock_daemon {
                b = b.with_vsock_daemon(d);
            }
            Ok((Arc::new(b), "qemu", version))
        }
        Backend::Kvm { vmm_binary } => {
            let b = KvmBackend::new(vms, &vmm_binary).map_err(|e| e.to_string())?;
            Ok((
                Arc::new(b),
                "kvm",
                Some(format!("nitrile vmm {}", env!("CARGO_PKG_VERSION"))),
            ))
        }
    }
}

fn list_images(store: &ImageStore) -> Vec<ImageSummary> {
    match store.list() {
        Ok(list) => list
            .into_iter()
            .map(|m| ImageSummary {
                digest: Sha256Hex::from_bytes(*m.digest.as_bytes()),
                kernel_release: m.kernel_release.as_deref().map(label),
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "could not list the image store");
            Vec::new()
        }
    }
}

impl Hostd {
    /// Loads everything, re-adopts the persisted instances and binds the
    /// socket; fails closed on any problem (a certificate of another host,
    /// unreadable issuer keys, a torn journal, a damaged instance record).
    /// A hypervisor backend that cannot run here does not stop the agent:
    /// host.describe reports it failed and instance operations are refused.
    pub async fn open(config: &HostdConfig, options: HostdOptions) -> Result<Self, HostdError> {
        Self::open_on(config, options, None).await
    }

    /// [`Hostd::open`] serving on `listener` (inherited from the agent
    /// handing over, or kept through a failed hand-over) instead of binding
    /// the config's address.
    pub async fn open_on(
        config: &HostdConfig,
        options: HostdOptions,
        listener: Option<std::net::TcpListener>,
    ) -> Result<Self, HostdError> {
        // Code runs only from the pinned repository: a release-pinned host
        // takes no binary path from its config.
        if config.release.is_some() {
            for (key, set) in [
                ("qemu", config.hypervisor.qemu.is_some()),
                ("vsock_daemon", config.hypervisor.vsock_daemon.is_some()),
                ("vmm", config.hypervisor.vmm.is_some()),
            ] {
                if set {
                    return Err(HostdError::UnreleasedBinary { key });
                }
            }
        }
        let state = &config.state;
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(state)
            .map_err(|source| HostdError::StateDir {
                path: state.clone(),
                source,
            })?;
        let expected = Expected::Principal(PrincipalId::new(
            config.cell.clone(),
            PrincipalKind::Host,
            config.host.clone(),
        ));
        // An enrolled host's key is in its TPM, usable only while the PCRs
        // hold the measurements it was enrolled with.
        let tpm_signer: Option<Arc<dyn rustls::sign::SigningKey>> = match config
            .tpm
            .as_ref()
            .and_then(|t| t.tls_key.as_ref().map(|k| (t, k)))
        {
            Some((tpm, key)) => {
                let bytes = nitrile_fs::read_bounded(key, 64 << 10)
                    .map_err(|e| HostdError::Tpm(format!("{}: {e}", key.display())))?;
                let bound: nitrile_attest::BoundKey = serde_json::from_slice(&bytes)
                    .map_err(|e| HostdError::Tpm(format!("{}: {e}", key.display())))?;
                Some(Arc::new(nitrile_attest::signer::TpmSigningKey::new(
                    &tpm.tcti,
                    bound,
                    Arc::new(Mutex::new(())),
                )))
            }
            None => None,
        };
        let identity = match &tpm_signer {
            Some(signer) => ServiceIdentity::load_with_signer(
                &config.cell,
                &config.ca,
                &config.cert,
                Arc::clone(signer),
                &expected,
            )?,
            None => ServiceIdentity::load(
                &config.cell,
                &config.ca,
                &config.cert,
                &config.key,
                &expected,
            )?,
        };
        let source: PrincipalId = identity.principal().clone();
        let keys =
            IssuerFile::load(&config.issuer_keys).map_err(|source| HostdError::IssuerKeys {
                path: config.issuer_keys.clone(),
                source,
            })?;
        let verifier = Verifier::new(keys, Audience::new(config.host.as_str())?);
        let journal_path = state.join("journal");
        let journal = Arc::new(
            JournalOptions::new()
                .danger_no_sync(options.danger_journal_no_sync)
                .open(&journal_path, &source.uri())?,
        );
        let mut shipping = JournalShipping::new(
            config.cell.clone(),
            Arc::clone(&journal),
            journal_path.clone(),
            state,
            identity.client_config()?,
        );
        shipping.set_target(config.logd.as_ref())?;
        let admission = Admission::new(
            source,
            verifier,
            ReplayCache::new(DEFAULT_REPLAY_CAPACITY),
            journal,
            &journal_path,
            Arc::clone(&options.clock),
        )?
        .with_signature_cache(DEFAULT_SIGNATURE_CACHE);
        let images = ImageStore::open(&config.images).map_err(|source| HostdError::Images {
            path: config.images.clone(),
            source,
        })?;

        let backend = open_backend(config);
        let (hypervisor, backend_name, backend_version) = match &backend {
            Ok((hv, name, version)) => (Some(Arc::clone(hv)), *name, version.clone()),
            Err(reason) => {
                tracing::error!(%reason, "no usable hypervisor backend");
                (None, "none", None)
            }
        };
        if let Some(hv) = &hypervisor
            && !options.stop_instances_on_exit
        {
            // VMs outlive this process; the next host agent adopts them.
            hv.detach_all();
        }
        let volume_keys: Option<Arc<dyn VolumeKeySource>> = match (
            &options.volume_keys,
            &config.kms,
        ) {
            (Some(keys), _) => Some(Arc::clone(keys)),
            (None, Some(kms)) => {
                let keys = KmsVolumeKeys::new(
                    kms.addr.clone(),
                    nitrile_kms_api::kms_principal(&config.cell),
                    identity.client_config()?,
                    tokio::runtime::Handle::current(),
                );
                // An enrolled host proves what it runs with every unwrap.
                let keys = match config
                    .tpm
                    .clone()
                    .filter(|t| t.document_certificate.is_some())
                {
                    None => keys,
                    Some(tpm) => {
                        let host = config.host.clone();
                        keys.with_attester(Arc::new(move |recipient: &[u8; 32]| {
                            crate::attest::document_for(&tpm, &host, recipient)
                                .map_err(|e| e.to_string())
                                .and_then(|d| {
                                    nitrile_kms_api::wire::AttestationHex::new(&d)
                                        .ok_or_else(|| "the document is too large".to_owned())
                                })
                        }))
                    }
                };
                Some(Arc::new(keys))
            }
            (None, None) => {
                tracing::warn!(
                    "no key service ([kms] in the config): volumes and launches with volumes are refused"
                );
                None
            }
        };
        let volume_dir = config.volume_store();
        let volumes = VolumeStore::open(&volume_dir).map_err(|source| HostdError::Volumes {
            path: volume_dir.clone(),
            source,
        })?;
        let now = options.clock.now();
        let network = match &config.network {
            None => None,
            Some(net) => {
                // The announcement is signed by the host's key: the TPM's
                // when it is enrolled.
                let tls = match &tpm_signer {
                    Some(signer) => nitrile_pki::tls::TlsIdentity::with_signer(
                        &nitrile_fs::read_bounded(&config.cert, 1 << 20).map_err(|e| {
                            HostdError::Tpm(format!("{}: {e}", config.cert.display()))
                        })?,
                        Arc::clone(signer),
                    )?,
                    None => nitrile_pki::tls::TlsIdentity::load(&config.cert, &config.key)?,
                };
                let roots = nitrile_pki::tls::CaRoots::load(&config.ca)?;
                let hn = crate::network::HostNet::start(
                    net,
                    &config.cell,
                    &config.host,
                    &tls,
                    roots,
                    now,
                )?;
                tracing::info!(endpoint = %hn.describe().announcement.endpoint, "instance network data path started");
                Some(Arc::new(hn))
            }
        };
        let instances = Instances::open(
            config.host.clone(),
            state,
            images.clone(),
            backend.map(|(hv, _, _)| hv),
            backend_name,
            volumes,
            volume_keys,
            network,
            CapacityLimits::from_config(&config.capacity),
            now,
        )?;

        let mut measurements = Vec::new();
        let exe = std::env::current_exe().ok();
        for (name, digest) in [
            (
                "hostd-binary",
                sha256_file(Path::new("/proc/self/exe"))
                    .or_else(|| exe.as_deref().and_then(sha256_file)),
            ),
            ("issuer-keys", sha256_file(&config.issuer_keys)),
            (
                "hostd-config",
                Some(Sha256Hex::from_bytes(
                    Sha256::digest(config.to_toml().as_bytes()).into(),
                )),
            ),
        ] {
            if let Some(sha256) = digest {
                measurements.push(Measurement {
                    name: name.to_owned(),
                    sha256,
                });
            }
        }
        // What the TPM measured (the firmware, the UKI stub, init), read
        // once: nothing extends these PCRs after init.
        if let Some(tpm) = &config.tpm {
            match crate::attest::measurements(tpm) {
                Ok(m) => measurements.extend(m),
                Err(e) => tracing::error!(error = %e, "could not read the TPM's PCRs"),
            }
        }
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| label(&s))
            .unwrap_or_default();
        let running_version = config.release.as_ref().map_or_else(
            || env!("CARGO_PKG_VERSION").to_owned(),
            |_| crate::update::running_version(&config.state).to_string(),
        );
        let fixed = Fixed {
            software: Software {
                nitrile: running_version,
                backend: backend_name.to_owned(),
                backend_version,
                kernel,
            },
            measurements,
            started_at: nitrile_audit::format_time(now),
        };

        // The highest version this host has run never goes down.
        // (An agent taking over records it once committed.)
        let releases = config.release.clone().map(|r| {
            let releases = crate::update::Releases::new(r, &config.state)
                .with_tpm(config.tpm.as_ref().map(|t| t.tcti.clone()));
            if !options.takeover
                && let Err(e) = releases.record_running()
            {
                tracing::error!(error = %e, "could not record the version running");
            }
            releases
        });

        let registry = Arc::new(Registry::new());
        let server = identity
            .server()?
            .with_metrics(Arc::clone(&registry), "nitrile_hostd");
        // One port, the mTLS one: metrics go to a file.
        let listener = match listener {
            None => Listeners::bind(config.listen, None).await?.mtls,
            Some(l) => l
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(l))
                .map_err(|source| HostdError::Inherited { source })?,
        };
        let image_list = Mutex::new(list_images(&images));
        let (handover_tx, handover_rx) = tokio::sync::oneshot::channel();
        let live = options.live_update && releases.is_some();
        Ok(Self {
            inner: Arc::new(Inner {
                config: config.clone(),
                admission,
                instances,
                images,
                image_list,
                metrics: HostdMetrics::new(),
                registry,
                clock: options.clock,
                hypervisor,
                fixed,
                releases,
                handover: Mutex::new(live.then_some(handover_tx)),
                armed: AtomicBool::new(live && !options.takeover),
                power_off: tokio::sync::Notify::new(),
            }),
            server,
            listener,
            stop_instances_on_exit: options.stop_instances_on_exit,
            shipping,
            handover: live.then_some(handover_rx),
        })
    }

    /// The bound mTLS address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The host's instances (for tests and embedding).
    pub fn instances(&self) -> &Instances {
        &self.inner.instances
    }

    /// The write-ahead journal (to ship it with its durable head).
    pub fn journal(&self) -> &Arc<nitrile_audit::Journal> {
        self.inner.admission.journal()
    }

    /// The metrics file.
    pub fn metrics_path(&self) -> PathBuf {
        self.inner.config.state.join(METRICS_FILE)
    }

    /// A handle for the supervisor of this agent.
    pub fn handle(&self) -> HostdHandle {
        HostdHandle(Arc::clone(&self.inner))
    }

    /// Serves until `shutdown` resolves: then stops accepting, lets in-flight
    /// requests finish, stops the instances if asked to (else leaves them
    /// running for the next agent) and writes the metrics file a last time.
    ///
    /// With `[logd]` in the config, the journal is shipped to that audit log
    /// service meanwhile (resuming where the log stands after any restart or
    /// disconnect), and anchored in the log when its key is pinned; the
    /// shipper stops once the last records (the instances stopped at exit)
    /// are journaled.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), HostdError> {
        self.serve_updatable(shutdown).await.map(|_| ())
    }

    /// [`Hostd::serve`], which also ends when a staged release is to take
    /// over ([`HostdOptions::live_update`]): then it stops accepting (the
    /// socket stays open), finishes in-flight requests, journals the
    /// hand-over, leaves every instance running and returns
    /// [`Served::Handover`] with the socket ([`crate::live`]).
    pub async fn serve_updatable(
        mut self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<Served, HostdError> {
        let shipper = self.shipping.start();
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let ticker = {
            let inner = Arc::clone(&self.inner);
            tokio::spawn(async move {
                loop {
                    let inner2 = Arc::clone(&inner);
                    let _ = tokio::task::spawn_blocking(move || {
                        let list = list_images(&inner2.images);
                        *inner2
                            .image_list
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = list;
                        inner2.write_metrics();
                    })
                    .await;
                    tokio::select! {
                        _ = stop_rx.wait_for(|s| *s) => break,
                        () = tokio::time::sleep(METRICS_INTERVAL) => {}
                    }
                }
            })
        };
        // A duplicate of the listening socket outlives the server's, so a
        // hand-over keeps its backlog.
        let (listener, kept) = if self.handover.is_some() {
            let (l, k) = self
                .listener
                .into_std()
                .and_then(|l| {
                    let kept = l.try_clone()?;
                    Ok((TcpListener::from_std(l)?, kept))
                })
                .map_err(|source| HostdError::Inherited { source })?;
            (l, Some(k))
        } else {
            (self.listener, None)
        };
        let (chosen_tx, chosen_rx) = tokio::sync::oneshot::channel();
        let handover_rx = self.handover.take();
        let powered = Arc::new(AtomicBool::new(false));
        let stop = {
            let inner = Arc::clone(&self.inner);
            let powered = Arc::clone(&powered);
            async move {
                let power_off = async {
                    inner.power_off.notified().await;
                    powered.store(true, Ordering::SeqCst);
                };
                match handover_rx {
                    Some(rx) => tokio::select! {
                        () = shutdown => {}
                        () = power_off => {}
                        Ok(h) = rx => { let _ = chosen_tx.send(h); }
                    },
                    None => tokio::select! {
                        () = shutdown => {}
                        () = power_off => {}
                    },
                }
            }
        };
        let api = Api(Arc::clone(&self.inner));
        let handle = HostdHandle(Arc::clone(&self.inner));
        let result = self.server.serve(listener, api, stop).await;
        let _ = stop_tx.send(true);
        let _ = ticker.await;
        let handover = chosen_rx.await.ok();
        if self.stop_instances_on_exit && handover.is_none() {
            let now = self.inner.clock.now();
            self.inner.instances.stop_all(now, SHUTDOWN_REASON).await;
            // No VM is left on a tap: the data path's namespace goes too.
            if let Some(net) = self.inner.instances.network() {
                net.remove_namespace();
            }
        }
        let mut running = Vec::new();
        if let Some(h) = &handover {
            // Every VM runs on for the next agent.
            if let Some(hv) = &self.inner.hypervisor {
                hv.detach_all();
            }
            running = self.inner.running_instances();
            let from = handle.version();
            handle
                .journal_event(
                    true,
                    &format!("live update: handing over from {from} to {}", h.version),
                    serde_json::json!({
                        "event": "live_update",
                        "phase": "handing_over",
                        "from": from.to_string(),
                        "to": h.version.to_string(),
                        "pid": std::process::id(),
                        "instances": running.len(),
                    }),
                )
                .await;
        }
        let inner = Arc::clone(&self.inner);
        let _ = tokio::task::spawn_blocking(move || inner.write_metrics()).await;
        if let Some(shipper) = shipper {
            shipper.stop().await;
        }
        result.map_err(HostdError::from)?;
        match (handover, kept) {
            (Some(handover), Some(listener)) => {
                let from = handle.version();
                Ok(Served::Handover {
                    handover,
                    listener,
                    running,
                    from,
                })
            }
            _ if powered.load(Ordering::SeqCst) => Ok(Served::PowerOff),
            _ => Ok(Served::Stopped),
        }
    }
}

impl HostdHandle {
    /// The version this agent runs: its release's, else the build's.
    pub fn version(&self) -> nitrile_release::Version {
        self.0
            .fixed
            .software
            .nitrile
            .parse()
            .unwrap_or(nitrile_release::Version::new(0, 0, 0))
    }

    /// What this agent reports to the one handing over to it.
    pub fn ready(&self) -> Ready {
        Ready {
            pid: std::process::id(),
            host: self.0.describe_host(),
            running: self.0.running_instances(),
        }
    }

    /// The hand-over was committed: this agent records its version as the
    /// highest run, journals it and hands over to a later release when
    /// asked.
    pub async fn committed(&self, from_pid: u32) {
        if let Some(r) = &self.0.releases
            && let Err(e) = r.record_running()
        {
            tracing::error!(error = %e, "could not record the version running");
        }
        let version = self.version();
        self.journal_event(
            true,
            &format!("live update: {version} serving, taken over from pid {from_pid}"),
            serde_json::json!({
                "event": "live_update",
                "phase": "serving",
                "to": version.to_string(),
                "pid": std::process::id(),
                "from_pid": from_pid,
                "instances": self.0.running_instances().len(),
            }),
        )
        .await;
        self.0.armed.store(true, Ordering::SeqCst);
    }

    /// Journals a hand-over that did not happen (this agent serves again).
    pub async fn rolled_back(&self, to: &nitrile_release::Version, reason: &str) {
        let version = self.version();
        self.journal_event(
            false,
            &format!("live update: to {to} rolled back, {version} serving again: {reason}"),
            serde_json::json!({
                "event": "live_update",
                "phase": "rolled_back",
                "from": version.to_string(),
                "to": to.to_string(),
                "pid": std::process::id(),
                "reason": clip_text(reason, 1024),
            }),
        )
        .await;
    }

    /// Journals an event of the agent itself (an outcome record of its
    /// own, not of a request); a journal that cannot be written is logged.
    pub async fn journal_event(&self, ok: bool, reason: &str, detail: serde_json::Value) {
        let record = nitrile_audit::AuditRecord::outcome(
            self.0.clock.now(),
            self.0.admission.source().clone(),
            nitrile_audit::RequestId::random(&mut rand_core::OsRng),
            if ok {
                Outcome::Executed
            } else {
                Outcome::Failed
            },
        )
        .with_reason(reason)
        .with_detail(detail);
        let journal = Arc::clone(self.0.admission.journal());
        let done = tokio::task::spawn_blocking(move || {
            record
                .encode()
                .map_err(|e| e.to_string())
                .and_then(|b| journal.append(&b).map(|_| ()).map_err(|e| e.to_string()))
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not journal: {reason}"),
            Err(e) => tracing::error!(error = %e, "could not journal: {reason}"),
        }
    }
}

impl Inner {
    fn running_instances(&self) -> Vec<Name> {
        self.instances
            .list(self.clock.now())
            .into_iter()
            .filter(|d| d.state == nitrile_api::admin::InstanceState::Running)
            .map(|d| d.instance)
            .collect()
    }

    fn write_metrics(&self) {
        let text = self.metrics.render(
            self.admission.refusal_journal_failures(),
            &self.instances.count_by_state(),
            self.admission.journal_healthy(),
            &self.registry,
        );
        let path = self.config.state.join(METRICS_FILE);
        if let Err(e) = write_metrics_file(&path, &text) {
            tracing::warn!(error = %e, path = %path.display(), "could not write metrics");
        }
    }

    fn describe_host(&self) -> HostDescription {
        let limits = self.instances.limits();
        let used = self.instances.allocated();
        let health = |ok: bool| if ok { Health::Ok } else { Health::Failed };
        HostDescription {
            host: self.config.host.clone(),
            cell: self.config.cell.clone(),
            placement: self.instances.placement(),
            health: HostHealth {
                journal: health(self.admission.journal_healthy()),
                hypervisor: health(self.hypervisor.is_some()),
            },
            software: self.fixed.software.clone(),
            measurements: self.fixed.measurements.clone(),
            capacity: Capacity {
                vcpus_total: limits.vcpus,
                vcpus_allocated: used.vcpus,
                memory_mib_total: limits.memory_mib,
                memory_mib_allocated: used.memory_mib,
                instances: used.instances,
            },
            images: self
                .image_list
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            started_at: self.fixed.started_at.clone(),
            network: self.instances.network().map(|n| n.describe()),
        }
    }

    /// The answer to a refusal, counted.
    fn refused(&self, operation: Option<nitrile_api::Operation>, r: &Refused) -> Response<Bytes> {
        self.count_refused(operation, r);
        r.response()
    }

    fn count_refused(&self, operation: Option<nitrile_api::Operation>, r: &Refused) {
        self.metrics.request(operation, RequestOutcome::Refused);
        self.metrics.refusal(r.step);
    }

    /// Journals the outcome (durable before the answer) and builds the
    /// answer.
    async fn finish(
        &self,
        admitted: Admitted,
        result: Result<Response<Bytes>, InstanceError>,
    ) -> Response<Bytes> {
        let op = admitted.grant().operation();
        match result {
            Ok(resp) => {
                if let Err(e) = self
                    .admission
                    .complete_async(admitted, Outcome::Executed, None)
                    .await
                {
                    tracing::error!(error = %e, "could not journal an outcome");
                }
                self.metrics.request(Some(op), RequestOutcome::Ok);
                resp
            }
            Err(err) => {
                let (status, step, code) = err.classify();
                let reason = err.reason();
                let detail = serde_json::json!({
                    "step": step.as_str(),
                    "code": code,
                    "reason": reason,
                });
                let seq = match self
                    .admission
                    .complete_async(admitted, Outcome::Failed, Some(detail))
                    .await
                {
                    Ok(r) => Some(r.seq),
                    Err(e) => {
                        tracing::error!(error = %e, "could not journal an outcome");
                        None
                    }
                };
                if status >= 500 {
                    tracing::error!(error = %reason, "operation failed");
                }
                self.metrics.request(Some(op), RequestOutcome::Failed);
                self.metrics.refusal(step);
                refusal_response(status, step, &reason, seq)
            }
        }
    }

    /// Operations that only read in-memory state: nothing here blocks but
    /// the waits for the journal, which are futures.
    async fn run_read(
        &self,
        peer: &PeerIdentity,
        token: Option<&str>,
        req: &AdminRequest,
    ) -> Response<Bytes> {
        let op = req.operation();
        let admitted = match self
            .admission
            .admit_async(peer, token, op, &req.resource(&self.config.host))
            .await
        {
            Ok(a) => a,
            Err(r) => return self.refused(Some(op), &r),
        };
        let now = self.clock.now();
        let result = match req {
            AdminRequest::HostDescribe => Ok(ok_json(&self.describe_host())),
            AdminRequest::InstanceList => Ok(ok_json(&InstanceList {
                instances: self.instances.list(now),
            })),
            AdminRequest::InstanceDescribe(name) => {
                self.instances.describe(name, now).map(|d| ok_json(&d))
            }
            AdminRequest::HostAttest(a) => match &self.config.tpm {
                None => Err(InstanceError::NoTpm),
                Some(tpm) => {
                    let (tpm, host) = (tpm.clone(), self.config.host.clone());
                    let nonce = a.nonce_bytes().unwrap_or_default();
                    let now_ms = u64::try_from(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_millis(),
                    )
                    .unwrap_or(u64::MAX);
                    match blocking(move || crate::attest::attest(&tpm, &host, &nonce, now_ms)).await
                    {
                        Err(resp) => return resp,
                        Ok(r) => r
                            .map(|d| ok_json(&d))
                            .map_err(|e| InstanceError::Tpm(e.to_string())),
                    }
                }
            },
            _ => unreachable!("run_read is only called with read operations"),
        };
        self.finish(admitted, result).await
    }

    async fn run(
        self: Arc<Self>,
        peer: PeerIdentity,
        token: Option<String>,
        volume_token: Option<String>,
        req: AdminRequest,
    ) -> Response<Bytes> {
        if matches!(
            req,
            AdminRequest::HostDescribe
                | AdminRequest::HostAttest(_)
                | AdminRequest::InstanceList
                | AdminRequest::InstanceDescribe(_)
        ) {
            return self.run_read(&peer, token.as_deref(), &req).await;
        }
        let op = req.operation();
        let resource = req.resource(&self.config.host);
        // A launch names its instance and asks for sizes the journal should
        // show before anything runs (the launch resource is the host).
        let params = match &req {
            // Its network's user data and SSH keys are the customer's: the
            // journal keeps their digests, not them.
            AdminRequest::InstanceLaunch(l) => serde_json::to_value(l).ok().map(|mut v| {
                if let Some(net) = &l.network {
                    v["network"] = net.journal_view();
                }
                v
            }),
            AdminRequest::VolumeCreate(c) => serde_json::to_value(c).ok(),
            AdminRequest::VolumeAttach(_, a) => serde_json::to_value(a).ok(),
            // Which release was asked for.
            AdminRequest::HostUpdate(u) => serde_json::to_value(u).ok(),
            _ => None,
        };
        // A launch with volumes, or a start of an instance with volumes,
        // needs the caller's `volume.attach` grant on each: a second token,
        // checked here and again by the key service.
        let booted_volumes: Vec<Name> = match &req {
            AdminRequest::InstanceLaunch(l) => l.volumes.clone(),
            AdminRequest::InstanceStart(n) => self
                .instances
                .describe(n, self.clock.now())
                .map(|d| d.volumes.into_iter().map(|v| v.id).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let second = (!booted_volumes.is_empty()).then(|| SecondToken {
            token: volume_token.as_deref(),
            operation: nitrile_api::Operation::VolumeAttach,
            resources: booted_volumes
                .iter()
                .map(|v| ResourceId::new(ResourceKind::Volume, v.clone()))
                .collect(),
        });
        let admitted = match self
            .admission
            .admit_async_with_second(
                &peer,
                token.as_deref(),
                op,
                &resource,
                params,
                second.as_ref(),
            )
            .await
        {
            Ok(a) => a,
            Err(r) => return self.refused(Some(op), &r),
        };
        // The time of the change, after its request record.
        let now = self.clock.now();
        let instances = &self.instances;
        // Admitted, so there are tokens: the key service checks them again.
        let token = token.as_deref().unwrap_or_default();
        let volume_token = second.as_ref().and(volume_token.as_deref());
        let mut handover = None;
        let mut power_off = false;
        let result = match &req {
            AdminRequest::HostShutdown => match self.running_instances().len() {
                0 => {
                    power_off = true;
                    Ok(ok_json(&self.describe_host()))
                }
                n => Err(InstanceError::InstancesRunning(n)),
            },
            AdminRequest::HostDrain | AdminRequest::HostUndrain => instances
                .set_drained(matches!(req, AdminRequest::HostDrain))
                .await
                .map(|()| ok_json(&self.describe_host())),
            AdminRequest::InstanceLaunch(l) => instances
                .launch(l, now, volume_token)
                .await
                .map(|d| ok_json(&d)),
            AdminRequest::InstanceStop(n) => {
                instances.stop(n, now, None).await.map(|d| ok_json(&d))
            }
            AdminRequest::InstanceStart(n) => instances
                .start(n, now, volume_token)
                .await
                .map(|d| ok_json(&d)),
            AdminRequest::InstanceTerminate(n) => {
                instances.terminate(n, now).await.map(|d| ok_json(&d))
            }
            AdminRequest::VolumeCreate(c) => instances
                .create_volume(c, now, token)
                .await
                .map(|d| ok_json(&d)),
            AdminRequest::VolumeList => instances
                .list_volumes()
                .await
                .map(|volumes| ok_json(&VolumeList { volumes })),
            AdminRequest::VolumeDescribe(v) => {
                instances.describe_volume(v).await.map(|d| ok_json(&d))
            }
            AdminRequest::VolumeAttach(v, a) => instances
                .attach_volume(v, &a.instance, now)
                .await
                .map(|d| ok_json(&d)),
            AdminRequest::VolumeDetach(v) => {
                instances.detach_volume(v, now).await.map(|d| ok_json(&d))
            }
            AdminRequest::VolumeDelete(v) => {
                instances.delete_volume(v, token).await.map(|d| ok_json(&d))
            }
            AdminRequest::NetworkUpdate(u) => instances.update_network(u).map(|d| ok_json(&d)),
            AdminRequest::HostUpdate(u) => match &self.releases {
                None => Err(crate::update::UpdateError::NoRepository.into()),
                Some(r) => {
                    // The hand-over is taken before staging: of two updates
                    // at once, only the one holding it says it hands over.
                    let tx = if self.armed.load(Ordering::SeqCst) {
                        self.handover
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .take()
                    } else {
                        None
                    };
                    let result = match self.live_update_blocker(tx.is_some()) {
                        Some(e) => Err(e.into()),
                        None => r
                            .update(&self.config.host, u, tx.is_some())
                            .await
                            .map_err(InstanceError::from),
                    };
                    match (result, tx) {
                        (Ok(d), Some(tx)) if d.handing_over => {
                            if let Ok(version) = d.staged.parse() {
                                handover = Some((
                                    tx,
                                    Handover {
                                        binary: r.staged_binary(&version),
                                        version,
                                    },
                                ));
                            }
                            Ok(ok_json(&d))
                        }
                        (result, tx) => {
                            if let Some(tx) = tx {
                                *self.handover.lock().unwrap_or_else(PoisonError::into_inner) =
                                    Some(tx);
                            }
                            result.map(|d| ok_json(&d))
                        }
                    }
                }
            },
            AdminRequest::HostDescribe
            | AdminRequest::HostAttest(_)
            | AdminRequest::InstanceList
            | AdminRequest::InstanceDescribe(_) => {
                unreachable!("read operations returned above")
            }
        };
        let accepted = result.is_ok();
        let resp = self.finish(admitted, result).await;
        // After the outcome record: the agent stops once this answer is
        // sent, and the host image's init powers the machine off.
        if power_off && accepted {
            self.power_off.notify_one();
        }
        // After the outcome record: the hand-over begins once this answer
        // is sent (the server finishes requests in flight).
        if let Some((tx, h)) = handover {
            self.armed.store(false, Ordering::SeqCst);
            let _ = tx.send(h);
        }
        resp
    }

    /// Why a staged release could not take over now: VMs of a backend that
    /// ends them with the agent.
    fn live_update_blocker(&self, live: bool) -> Option<crate::update::UpdateError> {
        if !live {
            return None;
        }
        let outlive = self
            .hypervisor
            .as_ref()
            .is_none_or(|h| h.vms_outlive_agent());
        let running = self.running_instances().len();
        (!outlive && running > 0).then_some(crate::update::UpdateError::NoLiveUpdate { running })
    }
}

fn ok_json<T: serde::Serialize>(body: &T) -> Response<Bytes> {
    json_response(StatusCode::OK, body)
}

/// Runs `f` on a blocking thread; a panic becomes a 500 answer.
async fn blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
    f: F,
) -> Result<T, Response<Bytes>> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "request task failed");
        internal_failure()
    })
}

/// The answer when a request's task panicked.
fn internal_failure() -> Response<Bytes> {
    refusal_response(
        500,
        RefusalStep::Internal,
        "internal failure; see the host agent's log",
        None,
    )
}

fn api_error_code(e: &ApiError) -> &'static str {
    match e {
        ApiError::UnknownPath(_) => "unknown_path",
        ApiError::MethodNotAllowed { .. } => "method_not_allowed",
        ApiError::TooLarge(_) => "too_large",
        ApiError::BadBody { .. } => "bad_body",
        _ => "bad_request",
    }
}

struct Api(Arc<Inner>);

impl Handler for Api {
    async fn handle(&self, peer: PeerIdentity, req: Request<Bytes>) -> Response<Bytes> {
        let inner = Arc::clone(&self.0);
        let (parts, body) = req.into_parts();
        let method = parts.method.as_str().to_owned();
        let path = parts.uri.path().to_owned();
        let parsed = if parts.uri.query().is_some() {
            Err((400, "query", "query strings are not accepted".to_owned()))
        } else {
            AdminRequest::parse(&method, &path, &body)
                .map_err(|e| (e.status(), api_error_code(&e), e.to_string()))
        };
        match parsed {
            Ok(req) => {
                let token = bearer(&parts.headers);
                let volume_token = parts
                    .headers
                    .get(VOLUME_TOKEN_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                // A task of its own: once admitted, a request runs and its
                // outcome is journaled even if the caller goes away.
                tokio::spawn(inner.run(peer, token, volume_token, req))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "request task failed");
                        internal_failure()
                    })
            }
            Err((status, code, reason)) => blocking(move || {
                let detail = request_detail(&method, &path);
                let r = inner
                    .admission
                    .service_journal()
                    .refuse_request(&peer, status, code, reason, detail);
                inner.refused(None, &r)
            })
            .await
            .unwrap_or_else(|r| r),
        }
    }

    async fn request_unreadable(
        &self,
        peer: PeerIdentity,
        method: String,
        path: String,
        status: u16,
        reason: String,
    ) {
        let journal = self.0.admission.service_journal();
        if let Some(r) = journal
            .request_unreadable(peer, method, path, status, reason)
            .await
        {
            self.0.count_refused(None, &r);
        }
    }

    async fn preauth_report(&self, report: PreauthReport) {
        self.0.metrics.tls_refusals(report.count());
        let _ = self
            .0
            .admission
            .service_journal()
            .preauth_report(report)
            .await;
    }

    async fn refused_at_tls(&self, reason: &PkiError, cert_sha256: Option<[u8; 32]>) {
        self.0.metrics.tls_refusal();
        let journal = self.0.admission.service_journal();
        let _ = journal.refused_at_tls(reason, cert_sha256).await;
    }
}
