//! `nitrile tokend`: the token service on its mTLS port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use nitrile_api::{Name, PrincipalId, PrincipalKind};
use nitrile_audit::Journal;
use nitrile_gate::{
    Expected, IdentityError, Listeners, MetricsTask, Refused, ServiceIdentity, ServiceJournal,
};
use nitrile_logclient::{JournalShipping, LogKeyError, LogdTarget};
use nitrile_net::{Handler, PeerIdentity, PreauthReport, Registry, Server};
use nitrile_pki::PkiError;
use nitrile_policy::{QuotaStore, ReviewerSet};
use nitrile_token::{Clock, SystemClock};

use crate::keys::KeyRing;
use crate::service::{Reply, ServiceMetrics, TokenService};

/// Where the token service finds its inputs and keeps its state.
#[derive(Debug, Clone)]
pub struct TokendConfig {
    /// The cell.
    pub cell: Name,
    /// The token service's own state: `keys/`, `issuer-keys.toml`,
    /// `journal`, `quotas.sqlite`, `bundle-serial.json`.
    pub state_dir: PathBuf,
    /// The cell CA certificate.
    pub ca: PathBuf,
    /// The service's certificate (principal `nitrile://<cell>/service/tokend`).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The entitlement bundle to enforce.
    pub entitlements: PathBuf,
    /// The cell's reviewer set; the bundle needs signatures of two of them.
    pub reviewers: PathBuf,
    /// The mTLS listen address.
    pub listen: SocketAddr,
    /// The loopback metrics address, if any.
    pub metrics: Option<SocketAddr>,
    /// The longest lifetime a token may be granted, in seconds: 1 to 300
    /// (`nitrile_token::MAX_LIFETIME`, the default when `None`); anything
    /// else is refused when the service opens. Requests for more are refused.
    pub max_token_lifetime_secs: Option<u64>,
    /// The audit log service the journal is shipped to from
    /// [`Tokend::serve`] (none: not shipped); with its `log_vkey` the
    /// journal is anchored in the log (`<state_dir>/log-anchor.json`).
    pub logd: Option<LogdTarget>,
}

/// Why the token service could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokendError {
    /// the CA, the certificate or its key could not be loaded, or the
    /// certificate is not a service certificate of the cell
    #[error("token service identity")]
    Identity(#[from] IdentityError),
    /// the entitlement bundle was refused
    #[error("entitlement bundle {} refused", path.display())]
    Entitlements {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: nitrile_policy::PolicyError,
    },
    /// the entitlement bundle is older than one the service has loaded, or
    /// reuses the serial of one with other content (journaled)
    #[error("entitlement bundle {} refused", path.display())]
    BundleOrder {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: nitrile_policy::SerialError,
    },
    /// the record of the highest bundle loaded could not be read or written
    #[error("entitlement bundle serial record {}", path.display())]
    BundleSerial {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nitrile_policy::SerialError,
    },
    /// the configured maximum token lifetime is 0 or above the 5-minute
    /// bound of every token
    #[error(
        "max_token_lifetime_secs = {secs} is not allowed: a token lives 1 to {} seconds",
        nitrile_token::MAX_LIFETIME.whole_seconds()
    )]
    MaxTokenLifetime {
        /// The value configured.
        secs: u64,
    },
    /// an audit record could not be encoded
    #[error("audit record")]
    Record(#[from] nitrile_audit::RecordError),
    /// the reviewer set could not be loaded
    #[error("reviewer set {} refused", path.display())]
    Reviewers {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nitrile_policy::ReviewError,
    },
    /// the quota store could not be opened
    #[error("quota store")]
    Quotas(#[from] nitrile_policy::QuotaError),
    /// the journal could not be opened
    #[error("audit journal")]
    Journal(#[from] nitrile_audit::JournalError),
    /// the signing keys could not be loaded
    #[error("signing keys")]
    Keys(#[from] crate::keys::KeyRingError),
    /// a socket could not be bound or served
    #[error("network")]
    Net(#[from] nitrile_net::NetError),
    /// metrics could not be registered
    #[error("metrics")]
    Metrics(#[from] nitrile_net::MetricsError),
    /// a state directory could not be created
    #[error("state directory {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the audit log service to ship to cannot be shipped to
    #[error("logd target")]
    Logd(#[from] LogKeyError),
}

/// A token service with its sockets bound, ready to serve.
#[derive(Debug)]
pub struct Tokend {
    service: Arc<TokenService>,
    refusals: Arc<ServiceJournal>,
    server: Server,
    listeners: Listeners,
    registry: Arc<Registry>,
    entitlements_digest: String,
    entitlements_serial: u64,
    key_id: String,
    shipping: JournalShipping,
}

impl Tokend {
    /// Loads everything and binds the sockets; fails closed on any problem
    /// (an unreviewed bundle, a key readable by others, a torn journal).
    pub async fn open(config: &TokendConfig) -> Result<Self, TokendError> {
        Self::open_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`Tokend::open`] with a given clock (tests move time).
    pub async fn open_with_clock(
        config: &TokendConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, TokendError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| TokendError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        let identity = ServiceIdentity::load(
            &config.cell,
            &config.ca,
            &config.cert,
            &config.key,
            &Expected::Kind(PrincipalKind::Service),
        )?;
        let source: PrincipalId = identity.principal().clone();
        let max_lifetime = max_token_lifetime(config.max_token_lifetime_secs)?;
        let reviewers =
            ReviewerSet::load(&config.reviewers).map_err(|source| TokendError::Reviewers {
                path: config.reviewers.clone(),
                source,
            })?;
        // The journal first: the bundle's start (or its refusal) is on record.
        let journal_path = config.state_dir.join("journal");
        let journal = Arc::new(Journal::open(&journal_path, &source.uri())?);
        let mut shipping = JournalShipping::new(
            config.cell.clone(),
            Arc::clone(&journal),
            journal_path,
            &config.state_dir,
            identity.client_config()?,
        );
        shipping.set_target(config.logd.as_ref())?;
        let in_force = crate::bundle::load(
            &config.entitlements,
            &reviewers,
            &config.state_dir,
            &journal,
            &source,
            clock.now(),
        )?;
        let entitlements = in_force.entitlements;
        let entitlements_digest = in_force.version.digest.to_hex();
        let entitlements_serial = in_force.version.serial.get();
        let ring = KeyRing::init_or_load(&config.state_dir, source.clone(), &mut rand_core::OsRng)?;
        let key_id = ring.current().to_owned();
        let quotas = QuotaStore::open(&config.state_dir.join("quotas.sqlite"))?;
        let registry = Arc::new(Registry::new());
        let metrics = ServiceMetrics::register(&registry)?;
        // Refusals before a request is read (TLS, unreadable bodies) are
        // journaled by the gate; tokend takes no tokens, so they name no
        // audience.
        let refusals = Arc::new(ServiceJournal::new(
            source.clone(),
            None,
            Arc::clone(&journal),
            Arc::clone(&clock),
        ));
        let service = Arc::new(
            TokenService::new(
                ring.issuer()?,
                Arc::new(entitlements),
                quotas,
                journal,
                clock,
                metrics,
            )
            .with_max_lifetime(max_lifetime),
        );
        let server = identity
            .server()?
            .with_metrics(Arc::clone(&registry), "nitrile_tokend");
        let listeners = Listeners::bind(config.listen, config.metrics).await?;
        Ok(Self {
            service,
            refusals,
            server,
            listeners,
            registry,
            entitlements_digest,
            entitlements_serial,
            key_id,
            shipping,
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

    /// Digest of the entitlement bundle in force.
    pub fn entitlements_digest(&self) -> &str {
        &self.entitlements_digest
    }

    /// Serial of the entitlement bundle in force.
    pub fn entitlements_serial(&self) -> u64 {
        self.entitlements_serial
    }

    /// Key id of the current signing key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The service (for tests and embedding).
    pub fn service(&self) -> &Arc<TokenService> {
        &self.service
    }

    /// Ships the journal to `target` (instead of the config's `logd`) once
    /// serving: for an audit log service bound only after the token service
    /// opened, as `nitrile up` starts them.
    pub fn ship_journal_to(&mut self, target: &LogdTarget) -> Result<(), LogKeyError> {
        self.shipping.set_target(Some(target))
    }

    /// Serves until `shutdown` resolves. The journal is shipped meanwhile
    /// when there is a `logd` to ship to (resuming where the log stands
    /// after any restart or disconnect); the shipper stops after the last
    /// request is journaled.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), TokendError> {
        let shipper = self.shipping.start();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics = MetricsTask::spawn(self.listeners.metrics, self.registry, stop_rx);
        let api = Api {
            service: Arc::clone(&self.service),
            refusals: self.refusals,
        };
        let result = self.server.serve(self.listeners.mtls, api, shutdown).await;
        let _ = stop_tx.send(true);
        metrics.join().await;
        if let Some(shipper) = shipper {
            shipper.stop().await;
        }
        result.map_err(TokendError::from)
    }
}

/// The longest token lifetime allowed by the config: 1 to
/// [`nitrile_token::MAX_LIFETIME`] seconds, that bound when not set.
// The error is the one `Tokend::open` returns; this runs once, at start.
#[allow(clippy::result_large_err)]
fn max_token_lifetime(secs: Option<u64>) -> Result<time::Duration, TokendError> {
    let max = nitrile_token::MAX_LIFETIME;
    match secs {
        None => Ok(max),
        Some(s) if s == 0 || s > max.whole_seconds().unsigned_abs() => {
            Err(TokendError::MaxTokenLifetime { secs: s })
        }
        Some(s) => Ok(time::Duration::seconds(
            i64::try_from(s).unwrap_or(i64::MAX),
        )),
    }
}

struct Api {
    service: Arc<TokenService>,
    refusals: Arc<ServiceJournal>,
}

impl Api {
    /// Counts a refusal the gate journaled (or could not).
    fn count(&self, refused: Option<Refused>) {
        let metrics = self.service.metrics();
        metrics.refused.inc();
        if refused.and_then(|r| r.audit_seq).is_none() {
            metrics.refusal_journal_failures.inc();
        }
    }
}

fn to_response(reply: Reply) -> Response<Bytes> {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(s) = reply.retry_after {
        builder = builder.header(http::header::RETRY_AFTER, s);
    }
    builder
        .body(Bytes::from(reply.body))
        .unwrap_or_else(|_| unreachable!("status and headers are valid"))
}

async fn blocking<F: FnOnce() -> Reply + Send + 'static>(f: F) -> Reply {
    match tokio::task::spawn_blocking(f).await {
        Ok(reply) => reply,
        Err(e) => {
            tracing::error!(error = %e, "token decision task failed");
            Reply {
                status: 500,
                body: br#"{"step":"internal","reason":"internal failure; nothing was issued"}"#
                    .to_vec(),
                retry_after: None,
            }
        }
    }
}

impl Handler for Api {
    async fn handle(&self, peer: PeerIdentity, req: Request<Bytes>) -> Response<Bytes> {
        let svc = Arc::clone(&self.service);
        let (parts, body) = req.into_parts();
        let reply = if parts.method == Method::POST && parts.uri.path() == "/v1/tokens" {
            blocking(move || svc.issue(&peer, &body)).await
        } else {
            let method = parts.method.to_string();
            let path = parts.uri.path().to_owned();
            blocking(move || svc.refuse_route(&peer, &method, &path)).await
        };
        to_response(reply)
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
