//! `nitrile kms`: the key service on its mTLS port, around [`crate::Kms`].
//!
//! Per request: TLS 1.3 with a client certificate of the cell (else no
//! HTTP; journaled, step `tls`, by the gate's refusal hooks) ->
//! [`KmsRequest::parse`] (a bad path, method, name or body: 4xx, journaled,
//! step `request`) -> then one of two paths:
//!
//! - a host's volume-key call (module `relay`): the peer must be a host; the
//!   relayed token is verified against the pinned issuer keys with the
//!   host's name as audience ([`nitrile_token::IssuerKeys::verify_relayed`]),
//!   for the route's operation on `volume/<id>`; a customer's key is used
//!   only under its owner's token; the grant (token, operation, volume) is
//!   used once (the service's own replay cache, rebuilt from its journal)
//!   -> request record durable -> the core acts -> outcome record durable ->
//!   answer;
//! - key management (module `manage`): the caller's own token for audience
//!   `kms`, admitted by [`nitrile_gate::Admission`] (request record durable
//!   before it runs) -> who may see or manage the key -> the core acts ->
//!   outcome record durable -> answer.
//!
//! Every refusal and failure is journaled before the answer, and nothing
//! that needs a record leaves without it: an unwrap whose record cannot be
//! written releases no key, a generate whose record cannot be written is
//! undone. A sweep (module `sweep`) destroys keys whose deletion window ended,
//! with their volume records, and journals what it destroyed.

mod config;
mod manage;
mod metrics;
mod references;
mod relay;
mod sweep;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use nitrile_api::wire::RefusalStep;
use nitrile_api::{Audience, Name, PrincipalId};
use nitrile_audit::{
    AuditRecord, Journal, JournalError, JournalOptions, Outcome, Receipt, RecordError, RequestId,
};
use nitrile_gate::{
    Admission, AdmissionError, Expected, IdentityError, Listeners, MetricsTask, Refused,
    ServiceIdentity, ServiceJournal, refusal_response, request_detail,
};
use nitrile_kms_api::{Caller, KmsRequest, kms_principal};
use nitrile_logclient::{JournalShipping, LogKeyError, LogdTarget};
use nitrile_net::{Handler, PeerIdentity, PreauthReport, Registry, Server};
use nitrile_pki::PkiError;
use nitrile_token::{
    Clock, DEFAULT_REPLAY_CAPACITY, IssuerFile, IssuerFileError, IssuerKeys, ReplayCache,
    SystemClock, Verifier,
};

pub use config::{
    AttestationPolicy, ConfigError, DEFAULT_REFRESH_SECS, DEFAULT_RELEASES,
    DEFAULT_SWEEP_INTERVAL_SECS, JOURNAL_FILE, KmsConfig, MAX_CONFIG_LEN, MAX_RELEASES,
    MAX_SWEEP_INTERVAL_SECS, RELEASES_DATASTORE, ReferenceSource, ReleaseReferences, STORE_DIR,
};
pub use metrics::KmsMetrics;
pub use sweep::MAX_VOLUMES_PER_RECORD;

use crate::error::{ErrorClass, KmsError, StoreError};
use crate::key::{KeyName, KeyState};
use crate::kms::Kms;

/// Why the key service could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsServerError {
    /// `[attestation]`: the reference values or the CA could not be read
    #[error("attestation policy {}: {reason}", path.display())]
    Attestation {
        /// The file: the reference values or the CA certificate.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// the CA, the certificate or its key could not be loaded, or the
    /// certificate is not the key service's
    #[error("key service identity")]
    Identity(#[from] IdentityError),
    /// the pinned token issuer keys could not be loaded
    #[error("token issuer keys {}", path.display())]
    IssuerKeys {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: IssuerFileError,
    },
    /// the state directory could not be made or has the wrong mode
    #[error("state directory {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the journal could not be opened or written at start
    #[error("audit journal")]
    Journal(#[from] JournalError),
    /// an audit record could not be encoded
    #[error("audit record")]
    Record(#[from] RecordError),
    /// the replay caches could not be rebuilt from the journal
    #[error("replay cache")]
    Admission(#[from] AdmissionError),
    /// the keys could not be loaded
    #[error("key store")]
    Store(#[from] StoreError),
    /// the cell's default key could not be made
    #[error("the cell's default key")]
    DefaultKey(#[source] KmsError),
    /// the audit log service to ship to cannot be shipped to
    #[error("logd target")]
    Logd(#[from] LogKeyError),
    /// a socket could not be bound or served
    #[error("network")]
    Net(#[from] nitrile_net::NetError),
    /// metrics could not be registered
    #[error("metrics")]
    Metrics(#[from] nitrile_net::MetricsError),
}

/// What a caller may change about how the service runs, beyond its
/// config: for tests and benchmarks.
#[derive(Clone)]
pub struct KmsOptions {
    /// Where time comes from (token expiry, key states, the sweep).
    pub clock: Arc<dyn Clock>,
    /// Overrides the config's sweep interval.
    pub sweep_interval: Option<Duration>,
    /// Skip the journal's fdatasync: records are acknowledged before they
    /// are durable. Only for benchmarks that measure the ceiling the
    /// journal's syncs leave; never for a service anyone relies on.
    pub danger_no_sync_journal: bool,
}

impl Default for KmsOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            sweep_interval: None,
            danger_no_sync_journal: false,
        }
    }
}

impl std::fmt::Debug for KmsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsOptions")
            .field("sweep_interval", &self.sweep_interval)
            .field("danger_no_sync_journal", &self.danger_no_sync_journal)
            .finish_non_exhaustive()
    }
}

/// Why a request failed after it was admitted: its status, step, code
/// and reason, for the outcome record and the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) status: u16,
    pub(crate) step: RefusalStep,
    pub(crate) code: &'static str,
    pub(crate) reason: String,
}

impl From<KmsError> for Failure {
    fn from(e: KmsError) -> Self {
        Self::from_ref(&e)
    }
}

impl Failure {
    /// The failure of the core's error `e`; a failure of the store or
    /// the system is logged.
    fn from_ref(e: &KmsError) -> Self {
        let (status, step) = match e.class() {
            ErrorClass::BadInput => (400, RefusalStep::Request),
            ErrorClass::NotFound => (404, RefusalStep::State),
            ErrorClass::Conflict => (409, RefusalStep::State),
            _ => (500, RefusalStep::Internal),
        };
        if status == 500 {
            tracing::error!(error = %e, "key service failure");
        }
        Self {
            status,
            step,
            code: e.code(),
            reason: e.to_string(),
        }
    }

    fn detail(&self) -> serde_json::Value {
        serde_json::json!({
            "step": self.step.as_str(),
            "code": self.code,
            "reason": self.reason,
        })
    }
}

/// A record could not be appended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppendError {
    /// the record could not be encoded
    #[error("cannot encode an audit record")]
    Record(#[from] RecordError),
    /// the journal refused it (disk full, I/O error)
    #[error("cannot append to the journal")]
    Journal(#[from] JournalError),
}

/// Everything a request needs, shared by the handler's tasks.
pub(crate) struct Service {
    cell: Name,
    source: PrincipalId,
    kms: Arc<Kms>,
    admission: Admission,
    issuer_keys: IssuerKeys,
    /// The placement service, which may use a customer's key for that
    /// customer's own volumes (`[placement]` of the config).
    placement: Option<PrincipalId>,
    relayed: ReplayCache,
    journal: Arc<Journal>,
    clock: Arc<dyn Clock>,
    metrics: KmsMetrics,
    /// `[attestation]`: what a host must prove to get a volume key.
    attestation: Option<Arc<relay::AttestationCheck>>,
}

impl Service {
    /// Appends `record` and waits until it is durable.
    async fn append(&self, record: &AuditRecord) -> Result<Receipt, AppendError> {
        let bytes = record.encode()?;
        Ok(self.journal.submit(&bytes).await?)
    }

    /// [`Service::append`] blocking the calling thread.
    fn append_blocking(&self, record: &AuditRecord) -> Result<Receipt, AppendError> {
        let bytes = record.encode()?;
        Ok(self.journal.append(&bytes)?)
    }

    /// The sequence number of a journaled refusal; a failure is counted
    /// and reported on stderr.
    fn refusal_seq(&self, journaled: Result<Receipt, AppendError>, code: &str) -> Option<u64> {
        match journaled {
            Ok(r) => Some(r.seq),
            Err(e) => {
                self.metrics.refusal_journal_failures.inc();
                let cause = std::error::Error::source(&e)
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default();
                tracing::error!(error = %e, %cause, code, "could not journal a refusal");
                eprintln!("nitrile kms: could not journal a refusal ({code}): {e}{cause}");
                None
            }
        }
    }

    /// A record of the service acting on its own (start, default key,
    /// sweep): an outcome with the service as principal.
    fn own_record(&self, outcome: Outcome) -> AuditRecord {
        AuditRecord::outcome(
            self.clock.now(),
            self.source.clone(),
            RequestId::random(&mut rand_core::OsRng),
            outcome,
        )
        .with_principal(self.source.clone())
    }
}

/// A key service with its sockets bound and its keys loaded, ready to
/// serve.
pub struct KmsServer {
    service: Arc<Service>,
    server: Server,
    listeners: Listeners,
    registry: Arc<Registry>,
    shipping: JournalShipping,
    sweep_interval: Duration,
}

impl std::fmt::Debug for KmsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsServer")
            .field("source", &self.service.source)
            .field("listen", &self.listeners.local_addr())
            .finish_non_exhaustive()
    }
}

impl KmsServer {
    /// Loads everything and binds the sockets; fails closed on any problem
    /// (a certificate that is not the key service's, a malformed key file,
    /// a torn journal, a key readable by others).
    pub async fn open(config: &KmsConfig) -> Result<Self, KmsServerError> {
        Self::open_with(config, KmsOptions::default()).await
    }

    /// [`KmsServer::open`] with `options`.
    pub async fn open_with(
        config: &KmsConfig,
        options: KmsOptions,
    ) -> Result<Self, KmsServerError> {
        let state_dir = |source| KmsServerError::StateDir {
            path: config.state.clone(),
            source,
        };
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&config.state)
                .map_err(state_dir)?;
            std::fs::set_permissions(&config.state, std::fs::Permissions::from_mode(0o700))
                .map_err(state_dir)?;
        }
        let me = kms_principal(&config.cell);
        let identity = ServiceIdentity::load(
            &config.cell,
            &config.ca,
            &config.cert,
            &config.key,
            &Expected::Principal(me.clone()),
        )?;
        let issuer_keys =
            IssuerFile::load(&config.issuer_keys).map_err(|source| KmsServerError::IssuerKeys {
                path: config.issuer_keys.clone(),
                source,
            })?;
        let clock = options.clock;
        let journal_path = config.journal_path();
        let journal = Arc::new(
            JournalOptions::new()
                .danger_no_sync(options.danger_no_sync_journal)
                .open(&journal_path, &me.uri())?,
        );
        let mut shipping = JournalShipping::new(
            config.cell.clone(),
            Arc::clone(&journal),
            journal_path.clone(),
            &config.state,
            identity.client_config()?,
        );
        shipping.set_target(config.logd.as_ref())?;
        let audience = Audience::new(me.name.as_str())
            .unwrap_or_else(|_| unreachable!("a principal's name is an audience"));
        let admission = Admission::new(
            me.clone(),
            Verifier::new(issuer_keys.clone(), audience),
            ReplayCache::new(DEFAULT_REPLAY_CAPACITY),
            Arc::clone(&journal),
            &journal_path,
            Arc::clone(&clock),
        )?;
        let relayed = ReplayCache::new(DEFAULT_REPLAY_CAPACITY);
        relay::rebuild_replay_cache(&relayed, &journal_path, clock.now())?;
        let registry = Arc::new(Registry::new());
        let metrics = KmsMetrics::register(&registry)?;
        let attestation = match &config.attestation {
            None => None,
            Some(policy) => Some(Arc::new(
                relay::AttestationCheck::load(policy, &config.ca, config.releases_datastore())
                    .map_err(|(path, reason)| KmsServerError::Attestation { path, reason })?,
            )),
        };
        let opened = Kms::open(&config.store_dir());
        let service = |kms| Service {
            cell: config.cell.clone(),
            source: me.clone(),
            kms,
            admission,
            issuer_keys,
            placement: config.placement.clone(),
            relayed,
            journal: Arc::clone(&journal),
            clock: Arc::clone(&clock),
            metrics,
            attestation: attestation.clone(),
        };
        let kms = match opened {
            Ok(kms) => Arc::new(kms),
            Err(e) => {
                journal_refused_start(&journal, &me, clock.now(), &e);
                return Err(e.into());
            }
        };
        let service = Arc::new(service(kms));
        service.journal_start()?;
        if let Some(attestation) = &service.attestation {
            attestation.start(&service, clock.now()).await;
        }
        if config.default_key {
            service.ensure_default_key()?;
        }
        let server = identity
            .server()?
            .with_metrics(Arc::clone(&registry), "nitrile_kms");
        let listeners = Listeners::bind(config.listen, config.metrics).await?;
        Ok(Self {
            service,
            server,
            listeners,
            registry,
            shipping,
            sweep_interval: options
                .sweep_interval
                .unwrap_or_else(|| config.sweep_interval()),
        })
    }

    /// The bound mTLS address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listeners.local_addr()
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.listeners.metrics_addr()
    }

    /// The service's principal, `nitrile://<cell>/service/kms`.
    pub fn principal(&self) -> &PrincipalId {
        &self.service.source
    }

    /// The keys and volume records (for tests and embedding).
    pub fn kms(&self) -> &Arc<Kms> {
        &self.service.kms
    }

    /// The service's counters.
    pub fn metrics(&self) -> &KmsMetrics {
        &self.service.metrics
    }

    /// The service's write-ahead journal (for its metrics: records per
    /// fdatasync).
    pub fn journal(&self) -> &Arc<Journal> {
        &self.service.journal
    }

    /// Ships the journal to `target` (instead of the config's `logd`) once
    /// serving: for an audit log service bound only after the key service
    /// opened.
    pub fn ship_journal_to(&mut self, target: &LogdTarget) -> Result<(), LogKeyError> {
        self.shipping.set_target(Some(target))
    }

    /// Serves until `shutdown` resolves, sweeping keys whose deletion
    /// window ended every sweep interval (and once at start). The journal
    /// is shipped meanwhile when there is a `logd` to ship to; the shipper
    /// stops after the last request is journaled.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), KmsServerError> {
        let shipper = self.shipping.start();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics = MetricsTask::spawn(self.listeners.metrics, self.registry, stop_rx.clone());
        let sweeper = sweep::spawn(
            Arc::clone(&self.service),
            self.sweep_interval,
            stop_rx.clone(),
        );
        let api = Api {
            service: Arc::clone(&self.service),
            refusals: Arc::clone(self.service.admission.service_journal()),
        };
        let result = self.server.serve(self.listeners.mtls, api, shutdown).await;
        let _ = stop_tx.send(true);
        let _ = sweeper.await;
        metrics.join().await;
        if let Some(shipper) = shipper {
            shipper.stop().await;
        }
        result.map_err(KmsServerError::from)
    }
}

impl Service {
    /// Journals what opening the store found: how many keys and volume
    /// records, and the leftovers of interrupted writes it erased.
    fn journal_start(&self) -> Result<(), KmsServerError> {
        let report = self.kms.open_report();
        let erased: Vec<String> = report
            .erased
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let record = self
            .own_record(Outcome::Executed)
            .with_reason(&format!(
                "key service started with {} keys and {} volume keys",
                report.keys, report.volumes
            ))
            .with_detail(serde_json::json!({
                "start": {
                    "keys": report.keys,
                    "volumes": report.volumes,
                    "erased": erased,
                }
            }));
        self.append_blocking(&record).map_err(|e| match e {
            AppendError::Record(e) => KmsServerError::Record(e),
            AppendError::Journal(e) => KmsServerError::Journal(e),
        })?;
        Ok(())
    }

    /// Makes `kms-key/default`, owned by the service, if it is missing:
    /// a request record, the key, an outcome record.
    fn ensure_default_key(&self) -> Result<(), KmsServerError> {
        let name = KeyName::default_key();
        if self.kms.describe_key(&name).is_ok() {
            return Ok(());
        }
        let request_id = RequestId::random(&mut rand_core::OsRng);
        let op = nitrile_api::Operation::KmsKeyCreate;
        let resource =
            nitrile_api::ResourceId::new(nitrile_api::ResourceKind::KmsKey, name.name().clone());
        let base = |r: AuditRecord| {
            r.with_principal(self.source.clone())
                .with_operations([op])
                .with_resources([resource.clone()])
        };
        let journal_err = |e| match e {
            AppendError::Record(e) => KmsServerError::Record(e),
            AppendError::Journal(e) => KmsServerError::Journal(e),
        };
        let now = self.clock.now();
        self.append_blocking(&base(AuditRecord::request(
            now,
            self.source.clone(),
            request_id,
        )))
        .map_err(journal_err)?;
        let made = self.kms.create_key(&name, &self.source, now);
        let outcome = match &made {
            Ok(_) => base(AuditRecord::outcome(
                self.clock.now(),
                self.source.clone(),
                request_id,
                Outcome::Executed,
            ))
            .with_reason("the cell's default key was made, owned by the key service"),
            Err(e) => base(AuditRecord::outcome(
                self.clock.now(),
                self.source.clone(),
                request_id,
                Outcome::Failed,
            ))
            .with_detail(Failure::from_ref(e).detail()),
        };
        self.append_blocking(&outcome).map_err(journal_err)?;
        made.map(|_| ()).map_err(KmsServerError::DefaultKey)
    }
}

/// Journals a store that refused to open (the service does not start); a
/// journal that cannot take it is reported on stderr.
fn journal_refused_start(
    journal: &Journal,
    source: &PrincipalId,
    now: time::OffsetDateTime,
    e: &StoreError,
) {
    let record = AuditRecord::refusal(
        now,
        source.clone(),
        RequestId::random(&mut rand_core::OsRng),
        RefusalStep::Internal,
        &format!("the key service did not start: {e}"),
    )
    .with_principal(source.clone());
    let written = record
        .encode()
        .map_err(|e| e.to_string())
        .and_then(|b| journal.append(&b).map_err(|e| e.to_string()));
    if let Err(reason) = written {
        eprintln!("nitrile kms: could not journal the refused start: {reason}");
    }
}

/// The wire form of a key's metadata.
pub(crate) fn describe(meta: &crate::KeyMetadata) -> nitrile_kms_api::wire::KeyDescription {
    use nitrile_kms_api::wire::{KeyDescription, KeyStateName};
    let (state, delete_at) = match meta.state {
        KeyState::Enabled => (KeyStateName::Enabled, None),
        KeyState::Disabled => (KeyStateName::Disabled, None),
        KeyState::PendingDeletion { delete_at } => (
            KeyStateName::PendingDeletion,
            Some(nitrile_audit::format_time(delete_at)),
        ),
    };
    KeyDescription {
        name: meta.name.name().clone(),
        owner: meta.owner.clone(),
        state,
        delete_at,
        created: nitrile_audit::format_time(meta.created),
        updated: nitrile_audit::format_time(meta.updated),
        volumes: u64::try_from(meta.volumes).unwrap_or(u64::MAX),
    }
}

struct Api {
    service: Arc<Service>,
    refusals: Arc<ServiceJournal>,
}

impl Api {
    /// Counts a refusal the gate journaled (or could not).
    fn count(&self, refused: Option<Refused>) {
        let m = &self.service.metrics;
        m.refused.inc();
        if refused.and_then(|r| r.audit_seq).is_none() {
            m.refusal_journal_failures.inc();
        }
    }
}

impl Handler for Api {
    async fn handle(&self, peer: PeerIdentity, req: Request<Bytes>) -> Response<Bytes> {
        let (parts, body) = req.into_parts();
        let method = parts.method.as_str().to_owned();
        let path = parts.uri.path().to_owned();
        let parsed = KmsRequest::parse(&method, &path, parts.uri.query(), &body);
        let token = nitrile_gate::bearer(&parts.headers);
        match parsed {
            Err(e) => {
                let refusals = Arc::clone(&self.refusals);
                let refused = tokio::task::spawn_blocking(move || {
                    refusals.refuse_request(
                        &peer,
                        e.status(),
                        e.code(),
                        e.to_string(),
                        request_detail(&method, &path),
                    )
                })
                .await;
                match refused {
                    Ok(r) => {
                        self.count(Some(r.clone()));
                        r.response()
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "refusal journaling task failed");
                        self.count(None);
                        refusal_response(500, RefusalStep::Internal, "internal failure", None)
                    }
                }
            }
            Ok(req) => match req.caller() {
                Caller::Host => relay::handle(&self.service, peer, token, req).await,
                Caller::Principal => manage::handle(&self.service, peer, token, req).await,
            },
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
        let refused = self
            .refusals
            .request_unreadable(peer, method, path, status, reason)
            .await;
        self.count(refused);
    }

    async fn preauth_report(&self, report: PreauthReport) {
        let refused = self.refusals.preauth_report(report).await;
        self.count(refused);
    }

    async fn refused_at_tls(&self, reason: &PkiError, cert_sha256: Option<[u8; 32]>) {
        let refused = self.refusals.refused_at_tls(reason, cert_sha256).await;
        self.count(refused);
    }
}
