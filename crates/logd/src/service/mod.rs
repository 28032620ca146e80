//! `nitrile logd`: the audit log service on its one mTLS port.
//!
//! Ingest (`POST /v1/ingest`, `GET /v1/ingest/head/<kind>/<name>`) needs no
//! token: the caller's certificate principal must be the journal's source.
//! Reads (`/v1/log/...`, `/v1/alerts`) need a token for `audit.read` on
//! `log/<cell>` at audience `logd`, verified offline against the pinned
//! issuer keys ([`nitrile_gate::Admission`]); each read is journaled
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
use nitrile_api::wire::RefusalStep;
use nitrile_api::{
    Audience, Name, Operation, PrincipalId, PrincipalKind, ResourceId, ResourceKind,
};
use nitrile_audit::{AuditRecord, CertSha256, JournalOptions, JournalReader, Outcome, RequestId};
use nitrile_gate::{
    Admission, AdmissionError, DEFAULT_SIGNATURE_CACHE, Expected, IdentityError, Listeners,
    MetricsTask, ServiceIdentity, bearer, refusal_response, request_detail,
};
use nitrile_monitor::{Event, IntegrityKind, Monitor, MonitorConfig};
use nitrile_net::{
    Counter, Gauge, Handler, MetricsError, PeerIdentity, Registry, Server, json_response,
};
use nitrile_pki::PkiError;
use nitrile_tlog::{Log, NoteSigner, NoteVerifier, SignedNote, Storage as _};
use nitrile_token::{
    Clock, DEFAULT_REPLAY_CAPACITY, IssuerFile, IssuerFileError, ReplayCache, SystemClock, Verifier,
};
use nitrile_witness_api::{WitnessClient, WitnessError};
use rustls::ClientConfig;

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
use nitrile_fs::write_atomic;

mod alerts;
mod checkpoints;
mod ingest;
mod metrics;
mod own;
mod reads;
mod routes;

pub use alerts::MONITOR_BUNDLE_DETAIL_KEY;
pub use metrics::LogdMetrics;
// The concerns share logd's state (`Inner`) and one another's helpers.
use alerts::*;
use checkpoints::*;
use routes::*;

/// logd's journal file in its state directory.
pub const JOURNAL_FILE: &str = "journal";
/// The log's signing key file (owner-only).
pub const LOG_KEY_FILE: &str = "log.key";
/// The log's public verifier key file.
pub const LOG_VKEY_FILE: &str = "log.vkey";
pub use crate::store::LOG_DIR;
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

pub use nitrile_logclient::log_origin;

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
    /// the CA, the certificate or its key could not be loaded, or the
    /// certificate is not a service certificate of this cell
    #[error("logd identity")]
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
    listeners: Listeners,
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
        let identity = ServiceIdentity::load(
            &config.cell,
            &config.ca,
            &config.cert,
            &config.key,
            &Expected::Kind(PrincipalKind::Service),
        )?;
        let me = identity.principal().clone();
        let keys =
            IssuerFile::load(&config.issuer_keys).map_err(|source| LogdError::IssuerKeys {
                path: config.issuer_keys.clone(),
                source,
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
        let server = identity
            .server()?
            .with_metrics(Arc::clone(&registry), "nitrile_logd")
            .with_max_body(MAX_INGEST_BODY);
        let listeners = Listeners::bind(config.listen, config.metrics.map(|m| m.addr())).await?;
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
                witness_tls: identity.client_config()?,
                monitor,
                monitor_alerts,
                metrics,
            }),
            server,
            listeners,
            registry,
            monitor_rx,
        })
    }

    /// The bound mTLS address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listeners.local_addr()
    }

    /// The bound metrics address, when the config names one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.listeners.metrics_addr()
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
        let metrics = MetricsTask::spawn(self.listeners.metrics, self.registry, stop_rx.clone());
        let checkpoints = tokio::spawn(Arc::clone(&self.inner).checkpoint_loop(stop_rx.clone()));
        let own = tokio::spawn(Arc::clone(&self.inner).self_ingest_loop(stop_rx));
        let monitor = tokio::spawn(Arc::clone(&self.inner).monitor_loop(self.monitor_rx));
        let api = Api(Arc::clone(&self.inner));
        let result = self.server.serve(self.listeners.mtls, api, shutdown).await;
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
        metrics.join().await;
        result.map_err(LogdError::from)
    }
}
