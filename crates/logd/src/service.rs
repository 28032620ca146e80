//! `nitrile logd`: the audit log service on its one mTLS port.
//!
//! Ingest (`POST /v1/ingest`, `GET /v1/ingest/head/<kind>/<name>`) needs no
//! token: the caller's certificate principal must be the journal's source.
//! Reads (`/v1/log/...`, `/v1/alerts`) need a token for `audit.read` on
//! `log/<cell>` at audience `logd`, verified offline against the pinned
//! issuer keys ([`nitrile_hostd::admission`]); each read is journaled
//! before it is answered, refusals too. There is no endpoint that deletes or
//! rewrites anything.
//!
//! With `metrics` in its config, logd also answers `GET /metrics` in the
//! Prometheus text format on that loopback address, over plain HTTP, for as
//! long as it serves: the mTLS server's counters and [`LogdMetrics`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use nitrile_api::wire::{Refusal, RefusalStep};
use nitrile_api::{
    Audience, Name, Operation, PrincipalId, PrincipalKind, ResourceId, ResourceKind,
};
use nitrile_audit::{AuditRecord, CertSha256, JournalOptions, JournalReader, Outcome, RequestId};
use nitrile_hostd::admission::{Admission, AdmissionError, DEFAULT_SIGNATURE_CACHE, Refused};
use nitrile_monitor::{Event, IntegrityKind, Monitor, MonitorConfig};
use nitrile_net::{
    Counter, Gauge, Handler, MetricsError, PeerIdentity, Registry, Server, json_response,
};
use nitrile_pki::PkiError;
use nitrile_pki::tls::{self, CaRoots, TlsIdentity};
use nitrile_tlog::{Log, NoteSigner, NoteVerifier, SignedNote, Storage as _};
use nitrile_token::{Clock, DEFAULT_REPLAY_CAPACITY, ReplayCache, SystemClock, Verifier};
use nitrile_witness::{WitnessClient, WitnessError};
use rustls::ClientConfig;
use tokio::net::TcpListener;

use crate::alert::{
    ALERT_DETAIL_KEY, Alert, AlertKind, AlertSink, AlertTable, MAX_ALERTS_PER_READ, Observer,
    Raised, StdoutAlerts, WebhookAlerts,
};
use crate::chain::IntegrityViolation;
use crate::config::LogdConfig;
use crate::leaf::LeafV1;
use crate::protocol::{
    AnchorBody, CoveredRecord, EntryBody, HistoryBody, IngestAck, IngestBatch, IngestEntry,
    JournalRef, MAX_INGEST_BODY, MAX_INGEST_ENTRIES, ProofBody, ProofsBody, SourceHead, base64,
};
use crate::source::{ContentViolation, DeclaredSources, SourceRole, check_record};
use crate::store::{LogBackend, LogStorage, Store, StoreError};
use crate::tail::JournalTail;

/// logd's journal file in its state directory.
pub const JOURNAL_FILE: &str = "journal";
/// The log's signing key file (owner-only).
pub const LOG_KEY_FILE: &str = "log.key";
/// The log's public verifier key file.
pub const LOG_VKEY_FILE: &str = "log.vkey";
/// The log's storage directory.
pub const LOG_DIR: &str = "log";
/// Most entries one `GET /v1/log/entries` answers.
pub const MAX_ENTRIES_PER_READ: u64 = 256;

/// Most inclusion proofs in one `GET /v1/log/proofs/inclusion/...`.
pub const MAX_PROOFS_PER_READ: u64 = 256;

/// Most checkpoints in one page of `GET /v1/log/history/<from>`.
pub const MAX_CHECKPOINTS_PER_READ: usize = 256;
/// How often logd looks for new records in its own journal.
pub const SELF_INGEST_POLL: Duration = Duration::from_millis(100);
/// Monitor alerts queued for raising; more are dropped (and counted).
pub const MONITOR_QUEUE: usize = 4096;
/// Checkpoint intervals a grown log may go without a published checkpoint
/// before `checkpoint_stalled` is raised.
pub const STALL_INTERVALS: u32 = 3;

/// The log's origin line (and key name) for `cell`.
pub fn log_origin(cell: &Name) -> String {
    format!("{cell}.nitrile/log")
}

/// How logd runs, beyond its config file.
#[derive(Clone)]
pub struct LogdOptions {
    /// The clock for tokens, records and checkpoints.
    pub clock: Arc<dyn Clock>,
    /// Print alerts as JSON lines on stdout.
    pub stdout_alerts: bool,
    /// More alert sinks (the monitor, a pager).
    pub alert_sinks: Vec<Arc<dyn AlertSink>>,
    /// Observers of everything ingested (the monitor).
    pub observers: Vec<Arc<dyn Observer>>,
    /// The monitor to feed with every record, integrity alert and
    /// checkpoint; its alerts are raised like logd's own. When `None`, one
    /// is loaded from the reviewed bundle of the config's `[monitor]` if it
    /// has one.
    pub monitor: Option<Arc<Mutex<Monitor>>>,
    /// DANGER, benchmarks only: logd's own journal without fdatasync.
    pub danger_journal_no_sync: bool,
}

impl std::fmt::Debug for LogdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogdOptions")
            .field("stdout_alerts", &self.stdout_alerts)
            .field("alert_sinks", &self.alert_sinks.len())
            .field("observers", &self.observers.len())
            .field("monitor", &self.monitor.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for LogdOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            stdout_alerts: true,
            alert_sinks: Vec::new(),
            observers: Vec::new(),
            monitor: None,
            danger_journal_no_sync: false,
        }
    }
}

/// Why logd could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogdError {
    /// TLS material could not be loaded
    #[error("TLS material")]
    Tls(#[from] tls::TlsError),
    /// the certificate is not a service certificate of this cell
    #[error("the certificate {} is not a service certificate of cell {cell}", path.display())]
    NotAService {
        /// The certificate file.
        path: PathBuf,
        /// The cell.
        cell: Name,
        /// Why, when it names no principal of the cell.
        #[source]
        source: Option<Box<PkiError>>,
    },
    /// the pinned issuer keys could not be loaded
    #[error("pinned token issuer keys {}", path.display())]
    IssuerKeys {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nitrile_tokend::KeyRingError,
    },
    /// the service name is not a token audience
    #[error("service name is not a token audience")]
    Audience(#[from] nitrile_api::IdError),
    /// logd's journal could not be opened
    #[error("logd journal")]
    Journal(#[from] nitrile_audit::JournalError),
    /// admission could not be set up from the journal
    #[error("admission")]
    Admission(#[from] AdmissionError),
    /// the log could not be opened
    #[error("log")]
    Store(#[from] StoreError),
    /// the log key could not be read, written or parsed
    #[error("log key {}", path.display())]
    LogKey {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the log key is not a signed-note key
    #[error("log key")]
    Note(#[from] nitrile_tlog::NoteError),
    /// the monitor rules could not be loaded
    #[error("monitor rules")]
    Rules(#[from] nitrile_monitor::RuleError),
    /// the monitor rules' bundle was refused (unreviewed, older than one
    /// loaded before, or its rules do not load)
    #[error("monitor rules")]
    MonitorBundle(#[from] crate::rules::BundleRulesError),
    /// the webhook URL is not usable
    #[error("webhook")]
    Webhook(#[from] crate::alert::WebhookError),
    /// the config's values do not fit together
    #[error("config")]
    Config(#[from] crate::config::ConfigProblem),
    /// the socket could not be bound or served
    #[error("network")]
    Net(#[from] nitrile_net::NetError),
    /// the metrics could not be registered
    #[error("metrics")]
    Metrics(#[from] MetricsError),
    /// the state directory could not be created
    #[error("state directory {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

pub(crate) use nitrile_fs::write_atomic;

/// logd's own metrics, besides the mTLS server's (`nitrile_logd_*`). Each
/// is one atomic: updating one costs no lock.
#[derive(Debug, Clone)]
pub struct LogdMetrics {
    /// Entries in the log (raised after each ingest, set every checkpoint
    /// interval).
    pub log_size: Gauge,
    /// The size of the published checkpoint.
    pub checkpoint_size: Gauge,
    /// Checkpoints published.
    pub checkpoints_published: Counter,
    /// Records shipped by sources and appended to the log.
    pub records_ingested: Counter,
    /// Records of logd's own journal appended to the log.
    pub own_records_ingested: Counter,
    /// Ingest batches refused (malformed, too large, another source's
    /// journal, an integrity violation, the log unable to store).
    pub ingest_batches_refused: Counter,
    /// Reads answered with what they asked for.
    pub reads_answered: Counter,
    /// Reads refused before they were answered (no, bad or wrong token).
    pub reads_refused: Counter,
    /// Reads admitted but not answered (nothing there, storage, journal).
    pub reads_failed: Counter,
    /// Integrity alerts raised by logd's own checks.
    pub integrity_alerts: Counter,
    /// Monitor alerts raised.
    pub monitor_alerts: Counter,
    /// Monitor alerts dropped because the queue was full.
    pub monitor_alerts_dropped: Counter,
}

impl LogdMetrics {
    /// Registers logd's metrics in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, MetricsError> {
        let c = |n: &str, h: &str| registry.counter(&format!("nitrile_logd_{n}"), h);
        let g = |n: &str, h: &str| registry.gauge(&format!("nitrile_logd_{n}"), h);
        Ok(Self {
            log_size: g("log_size", "Entries in the transparency log.")?,
            checkpoint_size: g(
                "checkpoint_size",
                "Entries covered by the published checkpoint.",
            )?,
            checkpoints_published: c("checkpoints_published_total", "Checkpoints published.")?,
            records_ingested: c(
                "records_ingested_total",
                "Records shipped by sources and appended to the log.",
            )?,
            own_records_ingested: c(
                "own_records_ingested_total",
                "Records of logd's own journal appended to the log.",
            )?,
            ingest_batches_refused: c(
                "ingest_batches_refused_total",
                "Ingest batches refused, any reason.",
            )?,
            reads_answered: c("reads_answered_total", "Auditor reads answered.")?,
            reads_refused: c(
                "reads_refused_total",
                "Reads refused before they were answered (token, entitlement).",
            )?,
            reads_failed: c(
                "reads_failed_total",
                "Reads admitted but not answered (not found, storage, journal).",
            )?,
            integrity_alerts: c(
                "integrity_alerts_total",
                "Integrity alerts raised by logd's own checks.",
            )?,
            monitor_alerts: c("monitor_alerts_total", "Monitor alerts raised.")?,
            monitor_alerts_dropped: c(
                "monitor_alerts_dropped_total",
                "Monitor alerts dropped because the queue was full.",
            )?,
        })
    }

    /// Raises the log size gauge to `size` (the log only grows; a
    /// concurrent ingest may briefly leave it lower, until the next
    /// checkpoint interval sets it).
    fn log_grew_to(&self, size: u64) {
        if size > self.log_size.get() {
            self.log_size.set(size);
        }
    }
}

/// Loads the log's signing key from `path`, or makes one and writes it
/// (owner-only) with its public key beside it.
fn load_or_create_signer(state: &Path, origin: &str) -> Result<NoteSigner, LogdError> {
    let path = state.join(LOG_KEY_FILE);
    let io = |source| LogdError::LogKey {
        path: path.clone(),
        source,
    };
    let signer = match std::fs::read_to_string(&path) {
        Ok(text) => NoteSigner::from_skey(text.trim())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let signer = NoteSigner::generate(origin)?;
            write_atomic(&path, format!("{}\n", &*signer.to_skey()).as_bytes(), 0o600)
                .map_err(|e| io(e.into()))?;
            signer
        }
        Err(e) => return Err(io(e)),
    };
    if signer.name() != origin {
        return Err(io(std::io::Error::other(format!(
            "the key is named {:?}, the log's origin is {origin:?}",
            signer.name()
        ))));
    }
    let vkey = format!("{}\n", signer.verifier().to_vkey());
    let vkey_path = state.join(LOG_VKEY_FILE);
    if std::fs::read_to_string(&vkey_path).ok().as_deref() != Some(vkey.as_str()) {
        write_atomic(&vkey_path, vkey.as_bytes(), 0o644).map_err(|e| LogdError::LogKey {
            path: vkey_path,
            source: e.into(),
        })?;
    }
    Ok(signer)
}

/// The log's verifier key for the cell `cell` whose logd keeps its state
/// in `state`, making the log's signing key there (as [`Logd::open`]
/// would) when there is none yet: a witness must know it before logd first
/// asks for a cosignature.
pub fn ensure_log_key(state: &Path, cell: &Name) -> Result<NoteVerifier, LogdError> {
    Ok(load_or_create_signer(state, &log_origin(cell))?.verifier())
}

struct WitnessSlot {
    name: Name,
    principal: PrincipalId,
    addr: String,
    verifier: NoteVerifier,
    client: Option<WitnessClient>,
    /// The size this witness last cosigned, as far as logd knows.
    size: u64,
}

struct Inner {
    cell: Name,
    me: PrincipalId,
    origin: String,
    verifier: NoteVerifier,
    log_resource: ResourceId,
    admission: Admission,
    store: Store,
    clock: Arc<dyn Clock>,
    sinks: Vec<Arc<dyn AlertSink>>,
    observers: Vec<Arc<dyn Observer>>,
    alerts: Mutex<AlertTable>,
    sources: DeclaredSources,
    journal_path: PathBuf,
    interval: Duration,
    max_age: Duration,
    quorum: usize,
    witnesses: tokio::sync::Mutex<Vec<WitnessSlot>>,
    witness_tls: Arc<ClientConfig>,
    monitor: Option<Arc<Mutex<Monitor>>>,
    monitor_alerts: tokio::sync::mpsc::Sender<nitrile_monitor::Alert>,
    metrics: LogdMetrics,
}

/// logd with its socket bound and its log open, ready to serve.
pub struct Logd {
    inner: Arc<Inner>,
    server: Server,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    registry: Arc<Registry>,
    monitor_rx: tokio::sync::mpsc::Receiver<nitrile_monitor::Alert>,
}

impl std::fmt::Debug for Logd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logd")
            .field("origin", &self.inner.origin)
            .field("listen", &self.local_addr())
            .field("metrics", &self.metrics_addr())
            .finish_non_exhaustive()
    }
}

fn now_ms(clock: &dyn Clock) -> u64 {
    u64::try_from(clock.now().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

impl Logd {
    /// Loads everything, opens the log (replaying what the sources file
    /// missed) and binds the socket; fails closed on any problem.
    pub async fn open(config: &LogdConfig, options: LogdOptions) -> Result<Self, LogdError> {
        config.check()?;
        let state = &config.state;
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(state)
            .map_err(|source| LogdError::StateDir {
                path: state.clone(),
                source,
            })?;
        let roots = CaRoots::load(&config.ca)?;
        let identity = TlsIdentity::load(&config.cert, &config.key)?;
        let not_a_service = |source| LogdError::NotAService {
            path: config.cert.clone(),
            cell: config.cell.clone(),
            source,
        };
        let me = PeerIdentity::from_der(identity.leaf(), &config.cell)
            .map_err(|e| not_a_service(Some(Box::new(e))))?
            .principal;
        if me.kind != PrincipalKind::Service {
            return Err(not_a_service(None));
        }
        let keys = nitrile_tokend::IssuerFile::load(&config.issuer_keys).map_err(|source| {
            LogdError::IssuerKeys {
                path: config.issuer_keys.clone(),
                source,
            }
        })?;
        let verifier = Verifier::new(keys, Audience::new(me.name.as_str())?);
        let journal_path = state.join(JOURNAL_FILE);
        let journal = Arc::new(
            JournalOptions::new()
                .danger_no_sync(options.danger_journal_no_sync)
                .open(&journal_path, &me.uri())?,
        );
        let admission = Admission::new(
            me.clone(),
            verifier,
            ReplayCache::new(DEFAULT_REPLAY_CAPACITY),
            journal,
            &journal_path,
            Arc::clone(&options.clock),
        )?
        .with_signature_cache(DEFAULT_SIGNATURE_CACHE);

        let origin = log_origin(&config.cell);
        let signer = load_or_create_signer(state, &origin)?;
        let log_verifier = signer.verifier();
        let store = {
            let (state, backend, origin) = (state.clone(), LogBackend::of(config), origin.clone());
            let now = now_ms(&*options.clock);
            tokio::task::spawn_blocking(move || Store::open(&state, backend, &origin, signer, now))
                .await
                .map_err(|e| LogdError::StateDir {
                    path: config.state.clone(),
                    source: std::io::Error::other(e.to_string()),
                })??
        };

        let mut sinks: Vec<Arc<dyn AlertSink>> = Vec::new();
        if options.stdout_alerts {
            sinks.push(Arc::new(StdoutAlerts));
        }
        if let Some(url) = &config.webhook {
            sinks.push(Arc::new(WebhookAlerts::new(url)?));
        }
        sinks.extend(options.alert_sinks.iter().cloned());

        let mut witnesses = Vec::new();
        for w in &config.witnesses {
            witnesses.push(WitnessSlot {
                name: w.name.clone(),
                principal: PrincipalId::new(
                    config.cell.clone(),
                    PrincipalKind::Service,
                    w.name.clone(),
                ),
                addr: w.addr.clone(),
                verifier: NoteVerifier::from_vkey(&w.vkey)?,
                client: None,
                size: 0,
            });
        }
        let alerts = past_alerts(&journal_path)?;
        let monitor = match (options.monitor, &config.monitor) {
            (Some(m), _) => Some(m),
            (None, Some(source)) => {
                let loaded = crate::rules::load_reviewed_monitor(source, state);
                journal_monitor_bundle(admission.journal(), &me, options.clock.now(), &loaded);
                let (m, advance) = loaded?;
                tracing::info!(
                    bundle = %advance.current(),
                    previous = ?advance.previous().map(|p| p.to_string()),
                    "monitor rules loaded from the reviewed entitlement bundle"
                );
                let m = m.with_config(MonitorConfig {
                    checkpoint_interval: time::Duration::milliseconds(
                        i64::try_from(config.checkpoint_interval_ms).unwrap_or(i64::MAX),
                    ),
                    max_checkpoint_age: time::Duration::milliseconds(
                        i64::try_from(config.max_checkpoint_age_ms).unwrap_or(i64::MAX),
                    ),
                    ..MonitorConfig::default()
                });
                Some(Arc::new(Mutex::new(m)))
            }
            (None, None) => None,
        };
        let (monitor_alerts, monitor_rx) = tokio::sync::mpsc::channel(MONITOR_QUEUE);

        let registry = Arc::new(Registry::new());
        let metrics = LogdMetrics::register(&registry)?;
        let (size, published) = store.sizes(&origin, &log_verifier);
        metrics.log_size.set(size);
        metrics.checkpoint_size.set(published);
        let server = Server::new(tls::server_config(&roots, &identity)?, config.cell.clone())
            .with_metrics(Arc::clone(&registry), "nitrile_logd")
            .with_max_body(MAX_INGEST_BODY);
        let listener = TcpListener::bind(config.listen).await.map_err(|source| {
            nitrile_net::NetError::Listener {
                addr: Some(config.listen),
                source,
            }
        })?;
        let metrics_listener = match config.metrics {
            Some(addr) => Some(nitrile_net::bind_metrics(addr.addr()).await?),
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                cell: config.cell.clone(),
                log_resource: ResourceId::new(ResourceKind::Log, config.cell.clone()),
                sources: DeclaredSources::new(&config.cell, &me, &config.sources),
                me,
                origin,
                verifier: log_verifier,
                admission,
                store,
                clock: options.clock,
                sinks,
                observers: options.observers,
                alerts: Mutex::new(alerts),
                journal_path,
                interval: Duration::from_millis(config.checkpoint_interval_ms),
                max_age: Duration::from_millis(config.max_checkpoint_age_ms),
                quorum: config.witness_quorum,
                witnesses: tokio::sync::Mutex::new(witnesses),
                witness_tls: tls::client_config(&roots, &identity)?,
                monitor,
                monitor_alerts,
                metrics,
            }),
            server,
            listener,
            metrics_listener,
            registry,
            monitor_rx,
        })
    }

    /// The bound mTLS address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The bound metrics address, when the config names one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// logd's own metrics (also served on [`Logd::metrics_addr`]).
    pub fn metrics(&self) -> &LogdMetrics {
        &self.inner.metrics
    }

    /// The log's origin line (`<cell>.nitrile/log`).
    pub fn origin(&self) -> &str {
        &self.inner.origin
    }

    /// The log's signed-note verifier key.
    pub fn log_vkey(&self) -> String {
        self.inner.verifier.to_vkey()
    }

    /// Serves until `shutdown` resolves; meanwhile checkpoints the log,
    /// ingests logd's own journal and answers `GET /metrics` on the metrics
    /// address if there is one. On the way out it ingests its journal a
    /// last time, publishes a last checkpoint, saves the source states and
    /// stops serving metrics.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), LogdError> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics = self.metrics_listener.map(|l| {
            let mut rx = stop_rx.clone();
            tokio::spawn(nitrile_net::serve_metrics(l, self.registry, async move {
                let _ = rx.wait_for(|s| *s).await;
            }))
        });
        let checkpoints = tokio::spawn(Arc::clone(&self.inner).checkpoint_loop(stop_rx.clone()));
        let own = tokio::spawn(Arc::clone(&self.inner).self_ingest_loop(stop_rx));
        let monitor = tokio::spawn(Arc::clone(&self.inner).monitor_loop(self.monitor_rx));
        let api = Api(Arc::clone(&self.inner));
        let result = self.server.serve(self.listener, api, shutdown).await;
        let _ = stop_tx.send(true);
        let _ = own.await;
        let _ = checkpoints.await;
        monitor.abort();
        let _ = monitor.await;
        let inner = Arc::clone(&self.inner);
        if let Ok(Err(e)) =
            tokio::task::spawn_blocking(move || inner.store.persist(now_ms(&*inner.clock))).await
        {
            tracing::error!(error = %crate::shipper::error_chain(&e), "could not save source states");
        }
        if let Some(m) = metrics
            && let Ok(Err(e)) = m.await
        {
            tracing::warn!(error = %e, "metrics server failed");
        }
        result.map_err(LogdError::from)
    }
}

/// The key of the journal record's `detail` naming the bundle the monitor's
/// rules come from.
pub const MONITOR_BUNDLE_DETAIL_KEY: &str = "monitor_bundle";

fn bundle_version_json(v: nitrile_policy::BundleVersion) -> serde_json::Value {
    serde_json::json!({ "serial": v.serial.get(), "digest": v.digest.to_hex() })
}

/// Journals which reviewed bundle the monitor's rules come from (at every
/// start: serial, digest and the one before when it changed), or the bundle
/// refused for an older or reused serial; a record that cannot be written
/// is reported (logd does not start without its journal anyway).
fn journal_monitor_bundle(
    journal: &nitrile_audit::Journal,
    me: &PrincipalId,
    now: time::OffsetDateTime,
    loaded: &Result<(Monitor, nitrile_policy::BundleAdvance), crate::rules::BundleRulesError>,
) {
    let request_id = RequestId::random(&mut rand_core::OsRng);
    let record = match loaded {
        Ok((_, advance)) => {
            let mut bundle = bundle_version_json(advance.current());
            if let Some(p) = advance.previous() {
                bundle["previous"] = bundle_version_json(p);
            }
            AuditRecord::outcome(now, me.clone(), request_id, Outcome::Executed)
                .with_reason(&format!(
                    "monitor rules of entitlement bundle serial {} in force",
                    advance.current().serial
                ))
                .with_detail(serde_json::json!({ MONITOR_BUNDLE_DETAIL_KEY: bundle }))
        }
        Err(crate::rules::BundleRulesError::Order { source, .. }) => {
            let (nitrile_policy::SerialError::Rollback { loaded, recorded }
            | nitrile_policy::SerialError::SerialReused { loaded, recorded }) = source.as_ref()
            else {
                return;
            };
            AuditRecord::refusal(
                now,
                me.clone(),
                request_id,
                RefusalStep::Entitlement,
                &source.to_string(),
            )
            .with_detail(serde_json::json!({ MONITOR_BUNDLE_DETAIL_KEY: {
                "refused": bundle_version_json(*loaded),
                "in_force": bundle_version_json(*recorded),
            }}))
        }
        Err(_) => return,
    };
    let written = record
        .encode()
        .map_err(|e| e.to_string())
        .and_then(|b| journal.append(&b).map(|_| ()).map_err(|e| e.to_string()));
    if let Err(reason) = written {
        tracing::error!(%reason, "could not journal the monitor's entitlement bundle");
    }
}

/// The alerts recorded in logd's journal, in the table as they were raised.
fn past_alerts(journal: &Path) -> Result<AlertTable, LogdError> {
    let mut table = AlertTable::new();
    for entry in JournalReader::open(journal)? {
        let entry = entry?;
        let Ok(record) = entry.record() else { continue };
        let Some(value) = record.detail.as_ref().and_then(|d| d.get(ALERT_DETAIL_KEY)) else {
            continue;
        };
        if let Ok(mut alert) = serde_json::from_value::<Alert>(value.clone()) {
            alert.audit_seq = Some(entry.seq);
            table.restore(alert);
        }
    }
    Ok(table)
}

fn kind_of(v: &IntegrityViolation) -> AlertKind {
    match v {
        IntegrityViolation::Gap { .. } => AlertKind::Gap,
        IntegrityViolation::HashMismatch { .. } | IntegrityViolation::BadGenesis => {
            AlertKind::ChainBreak
        }
        IntegrityViolation::JournalReplaced { .. } => AlertKind::JournalReplaced,
        IntegrityViolation::LeafTooLarge { .. } => AlertKind::LeafTooLarge,
        _ => AlertKind::WrongSource,
    }
}

fn refusal(
    status: u16,
    step: RefusalStep,
    reason: &str,
    audit_seq: Option<u64>,
) -> Response<Bytes> {
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &Refusal {
            step,
            reason: nitrile_api::admin::clip_text(reason, nitrile_api::admin::MAX_REASON_LEN),
            quota: None,
            retry_after_secs: None,
            audit_seq,
        },
    )
}

fn refused(r: &Refused) -> Response<Bytes> {
    refusal(r.status, r.step, &r.reason, r.audit_seq)
}

fn bytes_response(content_type: &'static str, body: Vec<u8>) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::from(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The bearer token of a request, if it has a well-formed one.
fn bearer(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_owned())
}

/// A read the auditor asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Read {
    Checkpoint,
    History { from: u64 },
    Tile(String),
    Inclusion { index: u64, size: u64 },
    InclusionRange { start: u64, count: u64, size: u64 },
    Consistency { old: u64, new: u64 },
    Entries { start: u64, count: u64 },
    Alerts { after: u64 },
}

impl Read {
    /// Whether it is answered from what the log keeps in memory (the tree,
    /// the published checkpoint, the alerts), never from storage.
    fn in_memory(&self) -> bool {
        matches!(
            self,
            Self::Checkpoint
                | Self::Inclusion { .. }
                | Self::InclusionRange { .. }
                | Self::Consistency { .. }
                | Self::Alerts { .. }
        )
    }
}

/// What a path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Ingest,
    Head(String, String),
    Anchor(String, String, u64),
    Read(Read),
}

/// Most bytes of a tile path.
const MAX_TILE_PATH: usize = 96;

fn parse_u64(s: &str) -> Option<u64> {
    (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn route(method: &Method, path: &str) -> Result<Route, (u16, &'static str, String)> {
    let not_found = || {
        (
            404,
            "unknown_path",
            format!(
                "no such endpoint: {}",
                nitrile_api::admin::clip_text(path, 120)
            ),
        )
    };
    let parts: Vec<&str> = path
        .strip_prefix("/v1/")
        .ok_or_else(not_found)?
        .split('/')
        .collect();
    let wrong_method = |allowed: &str| {
        (
            405,
            "method_not_allowed",
            format!("{path} only accepts {allowed}"),
        )
    };
    let get = |r: Route| {
        if method == Method::GET {
            Ok(r)
        } else {
            Err(wrong_method("GET"))
        }
    };
    match parts.as_slice() {
        ["ingest"] if method == Method::POST => Ok(Route::Ingest),
        ["ingest"] => Err(wrong_method("POST")),
        ["ingest", "head", kind, name] => get(Route::Head((*kind).to_owned(), (*name).to_owned())),
        ["ingest", "anchor", kind, name, old] => match parse_u64(old) {
            Some(old) => get(Route::Anchor((*kind).to_owned(), (*name).to_owned(), old)),
            None => Err(not_found()),
        },
        ["log", "checkpoint"] => get(Route::Read(Read::Checkpoint)),
        ["log", "history", from] => match parse_u64(from) {
            Some(from) => get(Route::Read(Read::History { from })),
            None => Err(not_found()),
        },
        ["log", "tile", ..] => {
            let tile = &path["/v1/log/".len()..];
            let rest = tile
                .strip_prefix("tile/entries/")
                .or_else(|| tile.strip_prefix("tile/"))
                .unwrap_or("");
            if tile.len() > MAX_TILE_PATH
                || rest.is_empty()
                || !rest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b"/.xp".contains(&b))
                || tile.contains("..")
                || tile.contains("//")
                || tile.ends_with('/')
            {
                return Err(not_found());
            }
            get(Route::Read(Read::Tile(tile.to_owned())))
        }
        ["log", "proof", "inclusion", index, size] => match (parse_u64(index), parse_u64(size)) {
            (Some(index), Some(size)) => get(Route::Read(Read::Inclusion { index, size })),
            _ => Err(not_found()),
        },
        ["log", "proofs", "inclusion", start, count, size] => {
            match (parse_u64(start), parse_u64(count), parse_u64(size)) {
                (Some(start), Some(count), Some(size)) => {
                    get(Route::Read(Read::InclusionRange { start, count, size }))
                }
                _ => Err(not_found()),
            }
        }
        ["log", "proof", "consistency", old, new] => match (parse_u64(old), parse_u64(new)) {
            (Some(old), Some(new)) => get(Route::Read(Read::Consistency { old, new })),
            _ => Err(not_found()),
        },
        ["log", "entries", start, count] => match (parse_u64(start), parse_u64(count)) {
            (Some(start), Some(count)) => get(Route::Read(Read::Entries { start, count })),
            _ => Err(not_found()),
        },
        ["alerts"] => get(Route::Read(Read::Alerts { after: 0 })),
        ["alerts", after] => match parse_u64(after) {
            Some(after) => get(Route::Read(Read::Alerts { after })),
            None => Err(not_found()),
        },
        _ => Err(not_found()),
    }
}

fn hex_proof(p: Vec<nitrile_tlog::Hash>) -> ProofBody {
    ProofBody {
        proof: p.into_iter().map(hex::encode).collect(),
    }
}

impl Inner {
    /// Feeds `event` to the monitor and queues the alerts it raises.
    fn feed_monitor(&self, event: &Event) {
        let Some(m) = &self.monitor else { return };
        let raised = m
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(event, self.clock.now());
        self.queue_monitor_alerts(raised);
    }

    fn queue_monitor_alerts(&self, raised: Vec<nitrile_monitor::Alert>) {
        for a in raised {
            if self.monitor_alerts.try_send(a).is_err() {
                self.metrics.monitor_alerts_dropped.inc();
                tracing::error!(
                    dropped = self.metrics.monitor_alerts_dropped.get(),
                    "monitor alert queue full; alert dropped"
                );
            }
        }
    }

    /// Raises the monitor's alerts like logd's own.
    async fn monitor_loop(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::Receiver<nitrile_monitor::Alert>,
    ) {
        while let Some(m) = rx.recv().await {
            let source = m.events.first().map(|e| e.source.clone());
            let principal = m.group.get("principal").cloned();
            let mut alert = self.new_alert(
                AlertKind::Monitor,
                source,
                None,
                format!("{} ({} x)", m.title, m.count),
                serde_json::to_value(&m).unwrap_or_default(),
            );
            alert.alert = "monitor".to_owned();
            alert.principal = principal;
            self.raise(alert).await;
        }
    }

    /// Counts `alert` and notes it in the table: the entry as it stands and
    /// whether to deliver it now (a new one, or a repeat whose time has
    /// come).
    fn note_alert(&self, alert: Alert) -> Raised {
        if alert.kind == AlertKind::Monitor {
            self.metrics.monitor_alerts.inc();
        } else {
            self.metrics.integrity_alerts.inc();
        }
        self.alerts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .raise(alert, self.clock.now())
    }

    /// Hands a delivered alert to the monitor, the sinks and the observers.
    fn deliver(&self, alert: &Alert) {
        if let Some(seq) = alert.audit_seq {
            self.alerts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set_audit_seq(alert, seq);
        }
        if alert.kind != AlertKind::Monitor
            && let Some(kind) = IntegrityKind::from_name(alert.kind.as_str())
        {
            let seq = alert.detail["violation"]["got"]
                .as_u64()
                .or_else(|| alert.detail["violation"]["seq"].as_u64())
                .or_else(|| alert.detail["acked_seq"].as_u64().map(|s| s + 1))
                .unwrap_or(0);
            self.feed_monitor(&Event::integrity(
                kind,
                alert.source.as_deref().unwrap_or(""),
                seq,
                &alert.message,
            ));
        }
        for s in &self.sinks {
            s.alert(alert);
        }
        for o in &self.observers {
            o.integrity(alert);
        }
    }

    fn new_alert(
        &self,
        kind: AlertKind,
        source: Option<String>,
        principal: Option<&PrincipalId>,
        message: String,
        detail: serde_json::Value,
    ) -> Alert {
        Alert {
            alert: "integrity".to_owned(),
            kind,
            time: nitrile_audit::format_time(self.clock.now()),
            source,
            principal: principal.map(PrincipalId::uri),
            message,
            detail,
            audit_seq: None,
            count: 1,
            first_time: None,
            cursor: 0,
        }
    }

    /// Raises an alert that no request refusal carries: noted in the table
    /// and, when it is to be delivered now, journaled as a failed outcome
    /// of logd's own work, then delivered.
    async fn raise(&self, alert: Alert) {
        let raised = self.note_alert(alert);
        if raised.deliver {
            self.journal_and_deliver(raised.alert).await;
        }
    }

    /// Journals an alert to deliver (a failed outcome of logd's own work),
    /// then delivers it.
    async fn journal_and_deliver(&self, mut alert: Alert) {
        let record = AuditRecord::outcome(
            self.clock.now(),
            self.me.clone(),
            RequestId::random(&mut rand_core::OsRng),
            Outcome::Failed,
        )
        .with_reason(&format!(
            "INTEGRITY ALERT {}: {}",
            alert.kind.as_str(),
            alert.message
        ))
        .with_detail(serde_json::json!({ ALERT_DETAIL_KEY: &alert }));
        alert.audit_seq = match record.encode() {
            Ok(bytes) => match self.admission.journal().submit(&bytes).await {
                Ok(r) => Some(r.seq),
                Err(e) => {
                    tracing::error!(error = %e, "could not journal an alert");
                    None
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "could not encode an alert");
                None
            }
        };
        self.deliver(&alert);
    }

    /// Journals the refusal of a request (step `request`), with `alert` in
    /// its detail when it raises one; delivers the alert.
    async fn refuse(
        self: &Arc<Self>,
        peer: &PeerIdentity,
        status: u16,
        code: &'static str,
        reason: String,
        mut detail: serde_json::Value,
        alert: Option<Alert>,
    ) -> Response<Bytes> {
        // The refusal carries the alert's entry as it stands (so the table
        // is rebuilt from the journal as it was); a repeat held back is
        // counted there and delivered later.
        let raised = alert.map(|a| self.note_alert(a));
        if let (Some(r), Some(obj)) = (&raised, detail.as_object_mut()) {
            let a = &r.alert;
            obj.insert(
                ALERT_DETAIL_KEY.to_owned(),
                serde_json::to_value(a).unwrap_or_default(),
            );
        }
        let inner = Arc::clone(self);
        let peer2 = peer.clone();
        let r = tokio::task::spawn_blocking(move || {
            inner
                .admission
                .refuse_request(&peer2, status, code, reason, detail)
        })
        .await;
        match r {
            Ok(r) => {
                if let Some(Raised { mut alert, deliver }) = raised {
                    alert.audit_seq = r.audit_seq;
                    if deliver {
                        self.deliver(&alert);
                    } else if let Some(seq) = r.audit_seq {
                        self.alerts
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .set_audit_seq(&alert, seq);
                    }
                }
                refused(&r)
            }
            Err(_) => refusal(500, RefusalStep::Internal, "internal failure", None),
        }
    }

    /// The alert a source raised in its own journal (a record of its own
    /// work whose detail carries one), as logd lists it: about that source,
    /// of a kind a source may raise.
    fn source_alert(&self, leaf: &LeafV1, record: &AuditRecord) -> Option<Alert> {
        if leaf.source == self.me.uri() || record.principal.is_some() {
            return None;
        }
        let value = record.detail.as_ref()?.get(ALERT_DETAIL_KEY)?;
        let mut alert: Alert = serde_json::from_value(value.clone()).ok()?;
        if alert.kind != AlertKind::LogInconsistent {
            return None;
        }
        alert.source = Some(leaf.source.clone());
        alert.principal = None;
        alert.audit_seq = None;
        alert.count = 1;
        alert.first_time = None;
        alert.cursor = 0;
        Some(alert)
    }

    /// Hands newly logged records to the observers; returns the alerts
    /// sources raised in them, to be raised by logd too.
    fn observe(&self, first_index: u64, leaves: &[LeafV1]) -> Vec<Alert> {
        let mut raised = Vec::new();
        for leaf in leaves {
            let key = ALERT_DETAIL_KEY.as_bytes();
            if !leaf.payload.windows(key.len()).any(|w| w == key) {
                continue;
            }
            if let Ok(record) = AuditRecord::decode(&leaf.payload)
                && let Some(alert) = self.source_alert(leaf, &record)
            {
                raised.push(alert);
            }
        }
        if self.observers.is_empty() && self.monitor.is_none() {
            return raised;
        }
        for (i, leaf) in leaves.iter().enumerate() {
            if let Ok(record) = AuditRecord::decode(&leaf.payload) {
                for o in &self.observers {
                    o.record(first_index + i as u64, leaf, &record);
                }
                self.feed_monitor(&Event::from_record(&leaf.source, leaf.seq, &record));
            }
        }
        raised
    }

    async fn ingest(self: &Arc<Self>, peer: PeerIdentity, body: Bytes) -> Response<Bytes> {
        let detail = serde_json::json!({ "method": "POST", "path": "/v1/ingest" });
        let caller = peer.principal.uri();
        // Only a declared source ships a journal, and logd's own is ingested
        // in-process only: anyone else is refused before the body is read.
        let Some(role) = self
            .sources
            .role(&peer.principal)
            .filter(|r| *r != SourceRole::Log)
        else {
            let alert = self.new_alert(
                AlertKind::UndeclaredSource,
                None,
                Some(&peer.principal),
                format!("{caller} shipped a journal but is not a journal source of this cell"),
                serde_json::json!({}),
            );
            return self
                .refuse(
                    &peer,
                    403,
                    "undeclared_source",
                    format!("{caller} is not a journal source of this cell"),
                    detail,
                    Some(alert),
                )
                .await;
        };
        let batch: IngestBatch = match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return self
                    .refuse(
                        &peer,
                        400,
                        "bad_body",
                        format!("not an ingest batch: {e}"),
                        detail,
                        None,
                    )
                    .await;
            }
        };
        if batch.entries.len() > MAX_INGEST_ENTRIES {
            return self
                .refuse(
                    &peer,
                    400,
                    "too_many_entries",
                    format!("at most {MAX_INGEST_ENTRIES} entries per batch"),
                    detail,
                    None,
                )
                .await;
        }
        if batch.journal.source != caller {
            let claimed = nitrile_api::admin::clip_text(&batch.journal.source, 255);
            let alert = self.new_alert(
                AlertKind::WrongSource,
                Some(caller.clone()),
                Some(&peer.principal),
                format!("{caller} shipped the journal of another source"),
                serde_json::json!({
                    "claimed_source": claimed,
                    "journal_id": batch.journal.journal_id.to_string(),
                }),
            );
            return self
                .refuse(
                    &peer,
                    403,
                    "wrong_source",
                    format!("a caller ships only its own journal; you are {caller}"),
                    detail,
                    Some(alert),
                )
                .await;
        }
        let inner = Arc::clone(self);
        let now = now_ms(&*self.clock);
        let source = peer.principal.clone();
        let ingested = tokio::task::spawn_blocking(move || {
            // Records that continue the chain must also fit their source;
            // the ones before the first that does not are still taken, as
            // with a chain break (which the store finds first).
            let mut batch = batch;
            let known = inner.store.head(&batch.journal.source);
            let misfit = crate::chain::check_batch(known.as_ref(), &batch)
                .leaves
                .iter()
                .find_map(|l| check_record(role, &source, l.seq, &l.payload).err());
            if let Some(v) = &misfit {
                let seq = v.seq();
                batch.entries.retain(|e| e.seq < seq);
            }
            let r = inner.store.ingest(&batch, now);
            (batch, r, misfit)
        })
        .await;
        let (batch, ingested, misfit) = match ingested {
            Ok(x) => x,
            Err(_) => return refusal(500, RefusalStep::Internal, "internal failure", None),
        };
        let ingested = match ingested {
            Ok(i) => i,
            Err(e) => {
                let msg = crate::shipper::error_chain(&e);
                tracing::error!(error = %msg, "ingest failed");
                return self
                    .refuse(
                        &peer,
                        503,
                        "log_storage",
                        format!("the log cannot store records now: {msg}"),
                        detail,
                        None,
                    )
                    .await;
            }
        };
        for alert in self.observe(ingested.first_index, &ingested.checked.leaves) {
            self.raise(alert).await;
        }
        let appended = ingested.checked.leaves.len() as u64;
        self.metrics.records_ingested.add(appended);
        self.metrics
            .log_grew_to(ingested.first_index.saturating_add(appended));
        let state = ingested.checked.state;
        if let Some(head) = batch.head {
            // What the source says its journal holds against what the log
            // holds of it: the monitor's journal-lag detector.
            self.feed_monitor(&Event::journal_head(
                &batch.journal.source,
                head.max(state.acked_seq),
                state.acked_seq,
            ));
        }
        match (ingested.checked.violation, misfit) {
            (None, None) => json_response(
                StatusCode::OK,
                &IngestAck {
                    acked_seq: state.acked_seq,
                },
            ),
            (Some(v), _) => {
                let alert = self.new_alert(
                    kind_of(&v),
                    Some(batch.journal.source.clone()),
                    Some(&peer.principal),
                    v.to_string(),
                    serde_json::json!({
                        "violation": &v,
                        "journal_id": batch.journal.journal_id.to_string(),
                        "acked_seq": state.acked_seq,
                        "acked_hash": state.hash.to_string(),
                        "batch_first_seq": batch.entries.first().map(|e| e.seq),
                        "batch_last_seq": batch.entries.last().map(|e| e.seq),
                    }),
                );
                self.refuse(
                    &peer,
                    409,
                    v.code(),
                    format!(
                        "INTEGRITY ALERT: {v}; the log holds records up to {}",
                        state.acked_seq
                    ),
                    detail,
                    Some(alert),
                )
                .await
            }
            (None, Some(v)) => {
                self.refuse_misfit(&peer, &batch, state.acked_seq, v, detail)
                    .await
            }
        }
    }

    /// Refuses the rest of a batch from the first record that does not fit
    /// its source, with a `bad_record` alert.
    async fn refuse_misfit(
        self: &Arc<Self>,
        peer: &PeerIdentity,
        batch: &IngestBatch,
        acked_seq: u64,
        v: ContentViolation,
        detail: serde_json::Value,
    ) -> Response<Bytes> {
        let caller = peer.principal.uri();
        let alert = self.new_alert(
            AlertKind::BadRecord,
            Some(caller),
            Some(&peer.principal),
            v.to_string(),
            serde_json::json!({
                "violation": &v,
                "journal_id": batch.journal.journal_id.to_string(),
                "acked_seq": acked_seq,
            }),
        );
        self.refuse(
            peer,
            409,
            "bad_record",
            format!("INTEGRITY ALERT: {v}; the log holds records up to {acked_seq}"),
            detail,
            Some(alert),
        )
        .await
    }

    async fn head(self: &Arc<Self>, peer: PeerIdentity, kind: &str, name: &str) -> Response<Bytes> {
        let path = format!("/v1/ingest/head/{kind}/{name}");
        let detail = serde_json::json!({ "method": "GET", "path": nitrile_api::admin::clip_text(&path, 120) });
        let source = match (kind.parse::<PrincipalKind>(), Name::new(name)) {
            (Ok(k), Ok(n)) => PrincipalId::new(self.cell.clone(), k, n),
            _ => {
                return self
                    .refuse(
                        &peer,
                        404,
                        "unknown_path",
                        "no such source".into(),
                        detail,
                        None,
                    )
                    .await;
            }
        };
        if source != peer.principal {
            return self
                .refuse(
                    &peer,
                    403,
                    "wrong_source",
                    "a caller reads only the head of its own journal".into(),
                    detail,
                    None,
                )
                .await;
        }
        let head = match self.store.head(&source.uri()) {
            Some(s) => SourceHead {
                acked_seq: s.acked_seq,
                hash: Some(s.hash),
                journal_id: Some(s.journal_id),
            },
            None => SourceHead {
                acked_seq: 0,
                hash: None,
                journal_id: None,
            },
        };
        json_response(StatusCode::OK, &head)
    }

    /// The latest checkpoint, its consistency with the tree of `old`
    /// entries and the caller's last record it covers: what a source needs
    /// to anchor its journal in the log ([`AnchorBody`]). Only a declared
    /// source asks, for itself; hashes only, nothing of any record.
    async fn anchor(
        self: &Arc<Self>,
        peer: PeerIdentity,
        kind: &str,
        name: &str,
        old: u64,
    ) -> Response<Bytes> {
        let path = format!("/v1/ingest/anchor/{kind}/{name}/{old}");
        let detail = serde_json::json!({ "method": "GET", "path": nitrile_api::admin::clip_text(&path, 120) });
        let own = kind == peer.principal.kind.as_str() && name == peer.principal.name.as_str();
        if !own
            || self
                .sources
                .role(&peer.principal)
                .is_none_or(|r| r == SourceRole::Log)
        {
            return self
                .refuse(
                    &peer,
                    403,
                    "wrong_source",
                    "a declared source reads only the anchor of its own journal".into(),
                    detail,
                    None,
                )
                .await;
        }
        let inner = Arc::clone(self);
        let source = peer.principal.uri();
        let answer = tokio::task::spawn_blocking(move || {
            let l = inner.store.read_log();
            let note = l
                .checkpoint()
                .ok_or((404, "no checkpoint has been published yet".to_owned()))?;
            let size = nitrile_tlog::open_checkpoint(&note.text, &inner.origin, &inner.verifier)
                .map_err(|e| (500, e.to_string()))?
                .size;
            let consistency = if old == 0 || old >= size {
                Vec::new()
            } else {
                l.consistency_proof(old, size)
                    .map_err(|e| (500, e.to_string()))?
                    .into_iter()
                    .map(hex::encode)
                    .collect()
            };
            let covered = match inner.store.covered(&source, size) {
                Some((seq, index)) => Some(CoveredRecord {
                    seq,
                    index,
                    inclusion: l
                        .inclusion_proof(index, size)
                        .map_err(|e| (500, e.to_string()))?
                        .into_iter()
                        .map(hex::encode)
                        .collect(),
                }),
                None => None,
            };
            Ok::<_, (u16, String)>(AnchorBody {
                checkpoint: note.text.clone(),
                consistency,
                covered,
            })
        })
        .await;
        match answer {
            Ok(Ok(body)) => json_response(StatusCode::OK, &body),
            Ok(Err((status, why))) => refusal(status, RefusalStep::State, &why, None),
            Err(_) => refusal(500, RefusalStep::Internal, "internal failure", None),
        }
    }

    /// Answers a read (blocking).
    fn answer(&self, read: &Read) -> Result<Response<Bytes>, (u16, String)> {
        let log_err = |e: StoreError| (500, crate::shipper::error_chain(&e));
        match read {
            Read::History { from } => {
                let (notes, next) = self
                    .store
                    .with_log(|l| l.history(*from, MAX_CHECKPOINTS_PER_READ))
                    .map_err(|e| log_err(e.into()))?;
                let body = HistoryBody {
                    checkpoints: notes.into_iter().map(|n| n.text).collect(),
                    next,
                };
                Ok(json_response(StatusCode::OK, &body))
            }
            Read::Tile(path) => match self.store.with_log(|l| l.storage().read(path)) {
                Ok(Some(b)) => Ok(bytes_response("application/octet-stream", b)),
                Ok(None) => Err((404, format!("no tile {path}"))),
                Err(e) => Err(log_err(e.into())),
            },
            Read::Entries { start, count } => {
                let leaves = self
                    .store
                    .leaves(*start, (*count).min(MAX_ENTRIES_PER_READ))
                    .map_err(log_err)?;
                let body: Vec<EntryBody> = leaves
                    .into_iter()
                    .enumerate()
                    .map(|(i, l)| {
                        let record = serde_json::from_slice::<serde_json::Value>(&l.payload).ok();
                        EntryBody {
                            index: start + i as u64,
                            payload: record.is_none().then(|| base64(&l.payload)),
                            record,
                            source: l.source,
                            journal_id: l.journal_id,
                            seq: l.seq,
                            hash: l.hash,
                        }
                    })
                    .collect();
                Ok(json_response(StatusCode::OK, &body))
            }
            _ => self.answer_in_memory(&self.store.read_log(), read),
        }
    }

    /// Answers a read from what the log keeps in memory ([`Read::in_memory`]).
    fn answer_in_memory(
        &self,
        l: &Log<LogStorage>,
        read: &Read,
    ) -> Result<Response<Bytes>, (u16, String)> {
        let log_err = |e: StoreError| (500, crate::shipper::error_chain(&e));
        match read {
            Read::Checkpoint => match l.checkpoint() {
                Some(note) => Ok(bytes_response(
                    "text/plain; charset=utf-8",
                    note.text.into_bytes(),
                )),
                None => Err((404, "no checkpoint has been published yet".into())),
            },
            Read::Inclusion { index, size } => {
                if *index >= *size || *size > l.size() {
                    return Err((404, format!("no entry {index} in a tree of size {size}")));
                }
                let proof = l
                    .inclusion_proof(*index, *size)
                    .map_err(|e| log_err(e.into()))?;
                Ok(json_response(StatusCode::OK, &hex_proof(proof)))
            }
            Read::InclusionRange { start, count, size } => {
                if *start >= *size || *size > l.size() || *count == 0 {
                    return Err((
                        404,
                        format!("no entries from {start} in a tree of size {size}"),
                    ));
                }
                let end = start
                    .saturating_add((*count).min(MAX_PROOFS_PER_READ))
                    .min(*size);
                let proofs = (*start..end)
                    .map(|i| {
                        l.inclusion_proof(i, *size)
                            .map(|p| p.into_iter().map(hex::encode).collect())
                            .map_err(|e| log_err(e.into()))
                    })
                    .collect::<Result<Vec<Vec<String>>, _>>()?;
                Ok(json_response(
                    StatusCode::OK,
                    &ProofsBody {
                        start: *start,
                        size: *size,
                        proofs,
                    },
                ))
            }
            Read::Consistency { old, new } => {
                if *old > *new || *new > l.size() {
                    return Err((404, format!("no consistency proof from {old} to {new}")));
                }
                let proof = l
                    .consistency_proof(*old, *new)
                    .map_err(|e| log_err(e.into()))?;
                Ok(json_response(StatusCode::OK, &hex_proof(proof)))
            }
            Read::Alerts { after } => {
                let page = self
                    .alerts
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .page(*after, MAX_ALERTS_PER_READ);
                Ok(json_response(StatusCode::OK, &page))
            }
            Read::History { .. } | Read::Tile(_) | Read::Entries { .. } => {
                Err((500, "not a read answered from memory".into()))
            }
        }
    }

    async fn read(
        self: &Arc<Self>,
        peer: PeerIdentity,
        token: Option<String>,
        read: Read,
        path: String,
    ) -> Response<Bytes> {
        let admitted = match self
            .admission
            .admit_async(
                &peer,
                token.as_deref(),
                Operation::AuditRead,
                &self.log_resource,
            )
            .await
        {
            Ok(a) => a,
            Err(r) => {
                self.metrics.reads_refused.inc();
                return refused(&r);
            }
        };
        // Answered from memory at once when the log is free (microseconds,
        // no handoff to a thread); else, and for reads of storage, on a
        // blocking thread, so that no async worker waits on the lock.
        let at_once = read
            .in_memory()
            .then(|| self.store.try_read_log())
            .flatten()
            .map(|l| self.answer_in_memory(&l, &read));
        let answered = match at_once {
            Some(a) => Ok(a),
            None => {
                let inner = Arc::clone(self);
                tokio::task::spawn_blocking(move || inner.answer(&read)).await
            }
        };
        let detail = |extra: Option<(u16, &str)>| {
            let mut d = serde_json::json!({ "read": nitrile_api::admin::clip_text(&path, 120) });
            if let (Some((status, why)), Some(o)) = (extra, d.as_object_mut()) {
                o.insert("status".into(), status.into());
                o.insert(
                    "reason".into(),
                    nitrile_api::admin::clip_text(why, 200).into(),
                );
            }
            d
        };
        let (outcome, detail, resp) = match answered {
            Ok(Ok(resp)) => (Outcome::Executed, detail(None), Ok(resp)),
            Ok(Err((status, why))) => (
                Outcome::Failed,
                detail(Some((status, &why))),
                Err((status, why)),
            ),
            Err(_) => (
                Outcome::Failed,
                detail(Some((500, "internal failure"))),
                Err((500, "internal failure".to_owned())),
            ),
        };
        if let Ok(r) = resp {
            self.metrics.reads_answered.inc();
            // The request record is durable already; the outcome of a
            // served read is queued in journal order before the answer
            // leaves and made durable by the next group commit, without
            // holding the answer for a second fsync.
            let record = AuditRecord::outcome(
                self.clock.now(),
                self.me.clone(),
                admitted.request_id(),
                outcome,
            )
            .with_principal(peer.principal.clone())
            .with_cert_sha256(CertSha256::from_bytes(peer.cert_sha256))
            .with_operations([Operation::AuditRead])
            .with_resources([self.log_resource.clone()])
            .with_token_id(admitted.grant().token_id().to_string())
            .with_detail(detail);
            match record.encode() {
                Ok(bytes) => {
                    let pending = self.admission.journal().submit(&bytes);
                    tokio::spawn(async move {
                        if let Err(e) = pending.await {
                            tracing::error!(error = %e, "could not journal the outcome of a read");
                        }
                    });
                }
                Err(e) => tracing::error!(error = %e, "could not encode the outcome of a read"),
            }
            return r;
        }
        self.metrics.reads_failed.inc();
        match self
            .admission
            .complete_async(admitted, outcome, Some(detail))
            .await
        {
            Ok(receipt) => match resp {
                Ok(r) => r,
                Err((status, why)) => {
                    let step = if status == 404 {
                        RefusalStep::State
                    } else {
                        RefusalStep::Internal
                    };
                    refusal(status, step, &why, Some(receipt.seq))
                }
            },
            // The answer leaves only once the read is journaled.
            Err(e) => {
                tracing::error!(error = %crate::shipper::error_chain(&e), "could not journal a read");
                refusal(
                    503,
                    RefusalStep::Journal,
                    "the read could not be journaled, so it is not answered",
                    None,
                )
            }
        }
    }

    /// Checkpoints the log every interval when it grew, and at least every
    /// `max_age` anyway; raises `checkpoint_stalled` when a grown log goes
    /// [`STALL_INTERVALS`] intervals without a published checkpoint.
    async fn checkpoint_loop(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut last_publish = tokio::time::Instant::now();
        let mut stalled = false;
        let mut last_persist_size = u64::MAX;
        // Ticks every interval from the start, however long a checkpoint
        // took (a late tick is taken at once, missed ones are not piled up).
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            let stopping = tokio::select! {
                _ = stop.wait_for(|s| *s) => true,
                _ = ticks.tick() => false,
            };
            if let Some(m) = &self.monitor {
                let raised = m
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .tick(self.clock.now());
                self.queue_monitor_alerts(raised);
            }
            let due = self
                .alerts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .due(self.clock.now());
            for alert in due {
                self.journal_and_deliver(alert).await;
            }
            let (size, published) = self.store.sizes(&self.origin, &self.verifier);
            let due = size > published
                || last_publish.elapsed() >= self.max_age
                || (size == 0
                    && published == 0
                    && self.store.with_log(|l| l.checkpoint().is_none()));
            if due {
                match self.checkpoint_once().await {
                    Ok(()) => {
                        last_publish = tokio::time::Instant::now();
                        stalled = false;
                    }
                    Err(e) => tracing::warn!(error = %e, "no checkpoint published"),
                }
            }
            let (size, published) = self.store.sizes(&self.origin, &self.verifier);
            self.metrics.log_size.set(size);
            self.metrics.checkpoint_size.set(published);
            if size > published
                && last_publish.elapsed() >= self.interval * STALL_INTERVALS
                && !stalled
            {
                stalled = true;
                let alert = self.new_alert(
                        AlertKind::CheckpointStalled,
                        None,
                        None,
                        format!(
                            "the log holds {size} entries but the last published checkpoint covers {published}, for {} ms",
                            last_publish.elapsed().as_millis()
                        ),
                        serde_json::json!({ "size": size, "published": published }),
                    );
                self.raise(alert).await;
            }
            if size != last_persist_size {
                let inner = Arc::clone(&self);
                match tokio::task::spawn_blocking(move || {
                    inner.store.persist(now_ms(&*inner.clock))
                })
                .await
                {
                    Ok(Ok(())) => last_persist_size = size,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %crate::shipper::error_chain(&e), "could not save source states")
                    }
                    Err(_) => {}
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Prepares a checkpoint, collects the witness quorum and publishes it.
    async fn checkpoint_once(self: &Arc<Self>) -> Result<(), String> {
        let now = now_ms(&*self.clock);
        let inner = Arc::clone(self);
        let note = tokio::task::spawn_blocking(move || inner.store.prepare_checkpoint(now))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| crate::shipper::error_chain(&e))?;
        let note = if self.quorum == 0 {
            note
        } else {
            self.cosign(note).await?
        };
        let size = nitrile_tlog::open_checkpoint(&note.text, &self.origin, &self.verifier)
            .map_err(|e| e.to_string())?
            .size;
        let inner = Arc::clone(self);
        tokio::task::spawn_blocking(move || inner.store.publish(&note))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| crate::shipper::error_chain(&e))?;
        self.metrics.checkpoint_size.set(size);
        self.metrics.checkpoints_published.inc();
        self.feed_monitor(&Event::checkpoint(&self.origin, size, self.clock.now()));
        for o in &self.observers {
            o.checkpoint(size);
        }
        Ok(())
    }

    /// Asks every witness to cosign `note`; the note with the cosignatures
    /// when at least the quorum verify, else an alert.
    async fn cosign(self: &Arc<Self>, note: SignedNote) -> Result<SignedNote, String> {
        let cp = nitrile_tlog::open_checkpoint(&note.text, &self.origin, &self.verifier)
            .map_err(|e| e.to_string())?;
        let mut witnesses = self.witnesses.lock().await;
        let mut lines = Vec::new();
        let mut failures = Vec::new();
        for w in witnesses.iter_mut() {
            match self.ask_witness(w, &note, cp.size).await {
                Ok(mut l) => lines.append(&mut l),
                Err(e) => {
                    let split = matches!(e, WitnessError::SplitView { .. });
                    failures.push(serde_json::json!({
                        "witness": w.name.as_str(),
                        "error": crate::shipper::error_chain(&e),
                        "split_view": split,
                    }));
                    w.client = None;
                }
            }
        }
        let verifiers: Vec<NoteVerifier> = witnesses.iter().map(|w| w.verifier.clone()).collect();
        drop(witnesses);
        let mut cosigned = note;
        for l in &lines {
            if let Ok(n) = cosigned.with_signature_line(l) {
                cosigned = n;
            }
        }
        let valid = nitrile_tlog::cosignatures(&cosigned.text, &verifiers);
        if valid.len() >= self.quorum {
            return Ok(cosigned);
        }
        let alert = self.new_alert(
            AlertKind::WitnessQuorum,
            None,
            None,
            format!(
                "checkpoint of size {} got {} of {} witness cosignatures needed",
                cp.size,
                valid.len(),
                self.quorum
            ),
            serde_json::json!({ "size": cp.size, "cosigned_by": valid, "failures": failures }),
        );
        self.raise(alert).await;
        Err("witness quorum not reached".into())
    }

    async fn ask_witness(
        &self,
        w: &mut WitnessSlot,
        note: &SignedNote,
        size: u64,
    ) -> Result<Vec<String>, WitnessError> {
        if w.client.is_none() {
            w.client = Some(
                WitnessClient::connect(&w.addr, &w.principal, Arc::clone(&self.witness_tls))
                    .await?,
            );
        }
        for _ in 0..2 {
            let old = w.size.min(size);
            let proof = if old == 0 || old == size {
                Vec::new()
            } else {
                self.store
                    .with_log(|l| l.consistency_proof(old, size))
                    .map_err(|e| WitnessError::Refused {
                        status: 500,
                        reason: e.to_string(),
                    })?
            };
            let client = w.client.as_mut().ok_or(WitnessError::Refused {
                status: 500,
                reason: "no connection".into(),
            })?;
            match client.add_checkpoint(old, &proof, &note.text).await {
                Ok(lines) => {
                    w.size = size;
                    return Ok(lines);
                }
                // The witness cosigned a larger tree than this one: the
                // log lost entries it had (retrying cannot help).
                Err(WitnessError::Conflict { recorded }) if recorded > size => {
                    w.size = recorded;
                    return Err(WitnessError::Conflict { recorded });
                }
                Err(WitnessError::Conflict { recorded }) if recorded != old => w.size = recorded,
                Err(e) => return Err(e),
            }
        }
        Err(WitnessError::Refused {
            status: 409,
            reason: "the witness's recorded size keeps changing".into(),
        })
    }

    /// Ingests logd's own journal into the log.
    async fn self_ingest_loop(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tail: Option<JournalTail> = None;
        loop {
            let inner = Arc::clone(&self);
            let t = tail.take();
            let r = tokio::task::spawn_blocking(move || inner.self_ingest_once(t)).await;
            match r {
                Ok(Ok(t)) => tail = Some(t),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "logd could not ingest its own journal");
                }
                Err(_) => {}
            }
            let stopping = *stop.borrow();
            if stopping {
                return;
            }
            let stopped = tokio::select! {
                _ = stop.wait_for(|s| *s) => true,
                () = tokio::time::sleep(SELF_INGEST_POLL) => false,
            };
            if stopped {
                // One last pass for the records of the shutdown.
                let inner = Arc::clone(&self);
                let t = tail.take();
                let _ = tokio::task::spawn_blocking(move || inner.self_ingest_once(t)).await;
                return;
            }
        }
    }

    /// Ingests what is new in logd's journal; on an error the tail is
    /// dropped and the next pass starts from the log's head.
    fn self_ingest_once(&self, tail: Option<JournalTail>) -> Result<JournalTail, String> {
        let mut tail = match tail {
            Some(t) => t,
            None => {
                let mut t = JournalTail::open(&self.journal_path)
                    .map_err(|e| crate::shipper::error_chain(&e))?;
                let source = self.me.uri();
                if let Some(s) = self.store.head(&source) {
                    t.seek_to(s.acked_seq, s.hash)
                        .map_err(|e| crate::shipper::error_chain(&e))?;
                }
                t
            }
        };
        loop {
            let entries = match tail.next_batch(MAX_INGEST_ENTRIES, MAX_INGEST_BODY / 2) {
                Ok(e) => e,
                Err(e) => return Err(crate::shipper::error_chain(&e)),
            };
            if entries.is_empty() {
                return Ok(tail);
            }
            let h = tail.header();
            let batch = IngestBatch {
                journal: JournalRef {
                    source: h.source.clone(),
                    journal_id: h.journal_id,
                    genesis: h.genesis,
                },
                entries: entries
                    .into_iter()
                    .map(|e| IngestEntry {
                        seq: e.seq,
                        hash: e.hash,
                        payload: e.payload,
                    })
                    .collect(),
                head: None,
            };
            match self.store.ingest_own(&batch) {
                Ok(i) => {
                    // logd raises no alert on its own records twice.
                    let _ = self.observe(i.first_index, &i.checked.leaves);
                    let appended = i.checked.leaves.len() as u64;
                    self.metrics.own_records_ingested.add(appended);
                    self.metrics
                        .log_grew_to(i.first_index.saturating_add(appended));
                    if let Some(v) = i.checked.violation {
                        // Start over from the log's head next time.
                        return Err(format!("own journal: {v}"));
                    }
                }
                Err(e) => return Err(crate::shipper::error_chain(&e)),
            }
        }
    }
}

struct Api(Arc<Inner>);

impl Handler for Api {
    async fn handle(&self, peer: PeerIdentity, req: Request<Bytes>) -> Response<Bytes> {
        let inner = Arc::clone(&self.0);
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let parsed = if parts.uri.query().is_some() {
            Err((400, "query", "query strings are not accepted".to_owned()))
        } else {
            route(&parts.method, &path)
        };
        let route = match parsed {
            Ok(r) => r,
            Err((status, code, reason)) => {
                let detail = serde_json::json!({
                    "method": nitrile_api::admin::clip_text(parts.method.as_str(), 16),
                    "path": nitrile_api::admin::clip_text(&path, 120),
                });
                return inner
                    .refuse(&peer, status, code, reason, detail, None)
                    .await;
            }
        };
        let token = bearer(&parts.headers);
        // A task of its own: once started, a request is journaled and
        // answered even if the caller goes away.
        tokio::spawn(async move {
            match route {
                Route::Ingest => {
                    let resp = inner.ingest(peer, body).await;
                    if resp.status() != StatusCode::OK {
                        inner.metrics.ingest_batches_refused.inc();
                    }
                    resp
                }
                Route::Head(kind, name) => inner.head(peer, &kind, &name).await,
                Route::Anchor(kind, name, old) => inner.anchor(peer, &kind, &name, old).await,
                Route::Read(read) => inner.read(peer, token, read, path).await,
            }
        })
        .await
        .unwrap_or_else(|_| refusal(500, RefusalStep::Internal, "internal failure", None))
    }

    async fn request_unreadable(
        &self,
        peer: PeerIdentity,
        method: String,
        path: String,
        status: u16,
        reason: String,
    ) {
        let detail = serde_json::json!({
            "method": nitrile_api::admin::clip_text(&method, 16),
            "path": nitrile_api::admin::clip_text(&path, 120),
        });
        let _ = self
            .0
            .refuse(&peer, status, "unreadable_body", reason, detail, None)
            .await;
    }

    async fn preauth_report(&self, report: nitrile_net::PreauthReport) {
        let inner = Arc::clone(&self.0);
        let (reason, detail) = (report.record_reason(), report.record_detail());
        let _ = tokio::task::spawn_blocking(move || {
            inner.admission.refuse_tls(None, reason, Some(detail))
        })
        .await;
    }

    async fn refused_at_tls(&self, reason: &PkiError, cert_sha256: Option<[u8; 32]>) {
        let inner = Arc::clone(&self.0);
        let reason = format!("certificate names no principal of this cell: {reason}");
        let _ = tokio::task::spawn_blocking(move || {
            inner.admission.refuse_tls(cert_sha256, reason, None)
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_closed() {
        let g = Method::GET;
        assert_eq!(route(&Method::POST, "/v1/ingest"), Ok(Route::Ingest));
        assert_eq!(
            route(&g, "/v1/ingest/head/host/h1"),
            Ok(Route::Head("host".into(), "h1".into()))
        );
        assert_eq!(
            route(&g, "/v1/log/checkpoint"),
            Ok(Route::Read(Read::Checkpoint))
        );
        assert_eq!(
            route(&g, "/v1/log/tile/0/x001/234.p/5"),
            Ok(Route::Read(Read::Tile("tile/0/x001/234.p/5".into())))
        );
        assert_eq!(
            route(&g, "/v1/log/tile/entries/000"),
            Ok(Route::Read(Read::Tile("tile/entries/000".into())))
        );
        assert_eq!(
            route(&g, "/v1/log/proof/inclusion/3/10"),
            Ok(Route::Read(Read::Inclusion { index: 3, size: 10 }))
        );
        assert_eq!(
            route(&g, "/v1/log/proofs/inclusion/3/4/10"),
            Ok(Route::Read(Read::InclusionRange {
                start: 3,
                count: 4,
                size: 10
            }))
        );
        assert_eq!(
            route(&g, "/v1/log/proof/consistency/3/10"),
            Ok(Route::Read(Read::Consistency { old: 3, new: 10 }))
        );
        assert_eq!(
            route(&g, "/v1/log/entries/0/5"),
            Ok(Route::Read(Read::Entries { start: 0, count: 5 }))
        );
        assert_eq!(
            route(&g, "/v1/log/history/0"),
            Ok(Route::Read(Read::History { from: 0 }))
        );
        assert_eq!(
            route(&g, "/v1/alerts"),
            Ok(Route::Read(Read::Alerts { after: 0 }))
        );
        assert_eq!(
            route(&g, "/v1/alerts/17"),
            Ok(Route::Read(Read::Alerts { after: 17 }))
        );
        assert_eq!(
            route(&g, "/v1/ingest/anchor/host/h1/12"),
            Ok(Route::Anchor("host".into(), "h1".into(), 12))
        );
        for bad in [
            "/v1/log/tile/../sources.json",
            "/v1/log/tile/../../log.key",
            "/v1/log/tile/0//1",
            "/v1/log/proof/inclusion/-1/3",
            "/v1/log/proof/inclusion/1",
            "/v1/log/entries/a/1",
            "/v1/log/checkpoints/3",
            "/v1/log/history",
            "/v1/log/history/x",
            "/v1/log/history/1/2",
            "/v1/log/proofs/inclusion/1/2",
            "/v1/log/proofs/inclusion/1/x/3",
            "/v1/log/delete",
            "/v1/alerts/x",
            "/v1/alerts/1/2",
            "/v1/ingest/anchor/host/h1",
            "/v1/ingest/anchor/host/h1/-1",
            "/v2/alerts",
            "/",
        ] {
            assert_eq!(route(&g, bad).map_err(|e| e.0), Err(404), "{bad}");
        }
        assert_eq!(route(&g, "/v1/ingest").map_err(|e| e.0), Err(405));
        assert_eq!(
            route(&Method::DELETE, "/v1/log/checkpoint").map_err(|e| e.0),
            Err(405)
        );
        assert_eq!(
            route(&Method::PUT, "/v1/log/tile/0/000").map_err(|e| e.0),
            Err(405)
        );
    }
}
