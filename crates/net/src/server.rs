//! The mTLS HTTP/1.1 server.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use nitrile_api::Name;
use nitrile_api::wire::{Refusal, RefusalStep};
use nitrile_pki::{PeerIdentity, PkiError, cert_sha256};
use rustls::ServerConfig;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::admission::{Source, Table, Ticket};
use crate::limits::Limits;
use crate::report::{Aggregator, PreauthReason, PreauthReport};
use crate::{Counter, Gauge, NetError, Registry};

/// Largest request body read; larger ones are answered `413`.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest a client may take to send a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of an oversized body is read and discarded before answering.
const MAX_DRAIN: usize = 1024 * 1024;
/// How long in-flight requests get to finish once shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// File descriptors wanted beyond the connection limits (the service's own
/// files, journals, outgoing connections) when the server raises the
/// process's soft limit.
const FD_HEADROOM: u64 = 256;

/// What a service does with authenticated requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request from an authenticated peer. The body has been read
    /// whole (at most the server's body limit).
    fn handle(
        &self,
        peer: PeerIdentity,
        req: Request<Bytes>,
    ) -> impl Future<Output = Response<Bytes>> + Send;

    /// Told about connections that failed or were refused before
    /// authentication (no client certificate, one from another CA or
    /// expired, TLS 1.2, not TLS at all, the handshake deadline, a
    /// pre-authentication limit), aggregated so that a flood cannot
    /// multiply the reports: per report interval, the first few failed
    /// handshakes one by one at once ([`PreauthReport::Failure`]) and
    /// everything else in one [`PreauthReport::Summary`] at the end of the
    /// interval and at shutdown. Every such connection is in exactly one
    /// report (a handshake still in progress when shutdown begins is closed
    /// without one: it neither failed nor was refused). No HTTP is
    /// answered; services journal each report.
    fn preauth_report(&self, report: PreauthReport) -> impl Future<Output = ()> + Send {
        let _ = report;
        std::future::ready(())
    }

    /// Told when a request from an authenticated peer is answered by the
    /// server itself because its body could not be read whole (larger than
    /// the body limit, unreadable, or too slow): `status` is the answer sent
    /// and [`Handler::handle`] is not called. Services journal the refusal
    /// here.
    fn request_unreadable(
        &self,
        peer: PeerIdentity,
        method: String,
        path: String,
        status: u16,
        reason: String,
    ) -> impl Future<Output = ()> + Send {
        let _ = (peer, method, path, status, reason);
        std::future::ready(())
    }

    /// Told once per connection whose verified certificate could not be
    /// turned into an identity of this cell (no nitrile principal, several,
    /// another cell). The connection's requests are answered `401` without
    /// reaching [`Handler::handle`]. Services journal the refusal here.
    fn refused_at_tls(
        &self,
        reason: &PkiError,
        cert_sha256: Option<[u8; 32]>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (reason, cert_sha256);
        std::future::ready(())
    }
}

/// Builds a JSON response.
pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response<Bytes> {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut resp = Response::new(Bytes::from(bytes));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => {
            tracing::error!(error = %e, "response could not be encoded");
            let mut resp = Response::new(Bytes::from_static(
                br#"{"step":"internal","reason":"response could not be encoded"}"#,
            ));
            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
    }
}

/// Builds a refusal response: a [`Refusal`] body with only `step` and
/// `reason` set.
pub fn refusal_response(status: StatusCode, step: RefusalStep, reason: &str) -> Response<Bytes> {
    json_response(
        status,
        &Refusal {
            step,
            reason: nitrile_api::admin::clip_text(reason, nitrile_api::admin::MAX_REASON_LEN),
            quota: None,
            retry_after_secs: None,
            audit_seq: None,
        },
    )
}

#[derive(Debug, Clone)]
struct ServerMetrics {
    connections_accepted: Counter,
    tls_sessions: Counter,
    tls_handshake_failures: Counter,
    tls_identity_refusals: Counter,
    requests: Counter,
    bodies_too_large: Counter,
    idle_timeouts: Counter,
    connections_open: Gauge,
    handshakes_in_progress: Gauge,
    refused_source_handshakes: Counter,
    refused_source_connections: Counter,
    refused_source_rate: Counter,
    refused_handshakes: Counter,
    refused_evicted: Counter,
    refused_connections: Counter,
    preauth_reports: Counter,
    preauth_summaries: Counter,
}

impl ServerMetrics {
    fn register(registry: &Registry, prefix: &str) -> Result<Self, NetError> {
        let c = |n: &str, h: &str| registry.counter(&format!("{prefix}_{n}"), h);
        let g = |n: &str, h: &str| registry.gauge(&format!("{prefix}_{n}"), h);
        Ok(Self {
            connections_accepted: c(
                "connections_accepted_total",
                "TCP connections accepted (admitted or refused).",
            )?,
            tls_sessions: c(
                "tls_sessions_total",
                "TLS handshakes completed with a verified client certificate.",
            )?,
            tls_handshake_failures: c(
                "tls_handshake_failures_total",
                "TLS handshakes that failed (no or untrusted certificate, old protocol, not TLS, closed, timeout).",
            )?,
            tls_identity_refusals: c(
                "tls_identity_refusals_total",
                "Verified certificates refused for naming no principal of this cell.",
            )?,
            requests: c("requests_total", "HTTP requests received.")?,
            bodies_too_large: c(
                "request_body_too_large_total",
                "Requests refused because their body exceeded the limit.",
            )?,
            idle_timeouts: c(
                "idle_timeouts_total",
                "Authenticated connections closed for carrying no complete request within the idle timeout.",
            )?,
            connections_open: g("connections_open", "Authenticated connections open now.")?,
            handshakes_in_progress: g(
                "handshakes_in_progress",
                "Connections in their TLS handshake now.",
            )?,
            refused_source_handshakes: c(
                "preauth_refused_source_handshakes_total",
                "Connections closed at accept: their source had as many handshakes in progress as it may.",
            )?,
            refused_source_connections: c(
                "preauth_refused_source_connections_total",
                "Connections closed at accept: their source had as many connections open as it may.",
            )?,
            refused_source_rate: c(
                "preauth_refused_source_rate_total",
                "Connections closed at accept: their source started handshakes faster than its rate.",
            )?,
            refused_handshakes: c(
                "preauth_refused_handshakes_total",
                "Connections closed at accept: every handshake slot was taken by sources no busier.",
            )?,
            refused_evicted: c(
                "preauth_refused_evicted_total",
                "Handshakes cut to give their slot to a connection from a less busy source.",
            )?,
            refused_connections: c(
                "preauth_refused_connections_total",
                "Connections closed after their handshake: every authenticated slot was taken.",
            )?,
            preauth_reports: c(
                "preauth_reports_total",
                "Failed handshakes reported one by one.",
            )?,
            preauth_summaries: c(
                "preauth_summaries_total",
                "Summaries of failed and refused connections reported.",
            )?,
        })
    }

    fn refused(&self, reason: PreauthReason) {
        let counter = match reason {
            PreauthReason::SourceHandshakes => &self.refused_source_handshakes,
            PreauthReason::SourceConnections => &self.refused_source_connections,
            PreauthReason::SourceRate => &self.refused_source_rate,
            PreauthReason::Handshakes => &self.refused_handshakes,
            PreauthReason::Evicted => &self.refused_evicted,
            PreauthReason::Connections => &self.refused_connections,
            // Failed handshakes are counted where they fail.
            _ => return,
        };
        counter.inc();
    }
}

/// An mTLS HTTP/1.1 server with its options.
#[derive(Debug)]
pub struct Server {
    tls: Arc<ServerConfig>,
    cell: Name,
    registry: Arc<Registry>,
    prefix: String,
    max_body: usize,
    grace: Duration,
    limits: Limits,
}

impl Server {
    /// A server with the given TLS configuration (build it with
    /// [`nitrile_pki::tls::server_config`]) for peers of `cell`, with a
    /// private metrics registry, [`MAX_BODY`], [`SHUTDOWN_GRACE`] and the
    /// default [`Limits`].
    pub fn new(tls: Arc<ServerConfig>, cell: Name) -> Self {
        Self {
            tls,
            cell,
            registry: Arc::new(Registry::new()),
            prefix: "nitrile_net".to_owned(),
            max_body: MAX_BODY,
            grace: SHUTDOWN_GRACE,
            limits: Limits::default(),
        }
    }

    /// Applies `limits` before authentication instead of the defaults
    /// (checked by [`Server::serve`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The limits this server applies.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Counts into `registry`, with metric names starting `<prefix>_`
    /// (e.g. `nitrile_tokend`).
    pub fn with_metrics(mut self, registry: Arc<Registry>, prefix: &str) -> Self {
        self.registry = registry;
        self.prefix = prefix.to_owned();
        self
    }

    /// Reads request bodies up to `max_body` bytes instead of [`MAX_BODY`].
    pub fn with_max_body(mut self, max_body: usize) -> Self {
        self.max_body = max_body;
        self
    }

    /// Waits up to `grace` for in-flight requests at shutdown.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Serves connections from `listener` until `shutdown` resolves, then
    /// stops accepting, lets in-flight requests finish (up to the grace
    /// period), reports what the current report interval counted and
    /// returns.
    ///
    /// The accept loop never waits for a slot: each connection is admitted
    /// or closed right after `accept` by the [`Limits`], so peers that hold
    /// connections open without completing a handshake cannot keep others
    /// in the listen queue. The process's soft limit of open files is
    /// raised, up to its hard limit, to hold every connection the limits
    /// allow.
    pub async fn serve<H: Handler>(
        self,
        listener: TcpListener,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NetError> {
        self.limits.check()?;
        let metrics = ServerMetrics::register(&self.registry, &self.prefix)?;
        raise_open_files_limit(&self.limits);
        let local = listener.local_addr().ok();
        let table = Arc::new(Mutex::new(Table::new(
            self.limits,
            metrics.handshakes_in_progress.clone(),
            metrics.connections_open.clone(),
        )));
        let shared = Arc::new(Shared {
            acceptor: TlsAcceptor::from(self.tls),
            cell: self.cell,
            handler,
            metrics,
            max_body: self.max_body,
            limits: self.limits,
            table,
            reports: Mutex::new(Aggregator::new(self.limits, SystemTime::now())),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let reporter = tokio::spawn(Arc::clone(&shared).report_every_interval(stop_rx.clone()));
        let mut tasks = JoinSet::new();
        tracing::info!(addr = ?local, "serving mTLS HTTP/1.1");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, remote)) => shared.admit(tcp, remote, &mut tasks, &stop_rx),
                    Err(e) => {
                        // Out of file descriptors and the like: back off, go on.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(listener);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(self.grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                remaining = tasks.len(),
                "shutdown grace period over; closing remaining connections"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let _ = reporter.await;
        shared.flush_reports().await;
        tracing::info!(addr = ?local, "server stopped");
        Ok(())
    }
}

/// Raises the soft limit of open files so that every connection the limits
/// allow can be held (both caps, plus [`FD_HEADROOM`]), up to the hard
/// limit; says so when the hard limit is lower.
fn raise_open_files_limit(limits: &Limits) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = (limits.max_handshakes + limits.max_connections) as u64 + FD_HEADROOM;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= want {
        return;
    }
    let new = want.min(hard);
    match setrlimit(Resource::RLIMIT_NOFILE, new, hard) {
        Ok(()) if new >= want => {
            tracing::debug!(from = soft, to = new, "raised the open files limit");
        }
        Ok(()) => tracing::warn!(
            limit = new,
            want,
            "the open files hard limit is below what the connection limits need; \
             accept may fail with too many open files"
        ),
        Err(e) => tracing::warn!(error = %e, soft, want, "could not raise the open files limit"),
    }
}

/// Serves `handler` on `listener` over mTLS until `shutdown` resolves; see
/// [`Server`] for options such as shared metrics.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    cell: Name,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NetError> {
    Server::new(tls, cell)
        .serve(listener, handler, shutdown)
        .await
}

struct Shared<H> {
    acceptor: TlsAcceptor,
    cell: Name,
    handler: H,
    metrics: ServerMetrics,
    max_body: usize,
    limits: Limits,
    table: Arc<Mutex<Table>>,
    reports: Mutex<Aggregator>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The outcome of reading identity out of the verified client certificate.
type Identity = Result<PeerIdentity, Arc<str>>;

impl<H: Handler> Shared<H> {
    /// Admits a connection just accepted to its handshake, or closes it at
    /// once if a limit refuses it. Never waits.
    fn admit(
        self: &Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        tasks: &mut JoinSet<()>,
        stop: &watch::Receiver<bool>,
    ) {
        self.metrics.connections_accepted.inc();
        let source = Source::from(remote.ip());
        let admitted = lock(&self.table).admit(&self.table, source, Instant::now());
        match admitted {
            Ok(admitted) => {
                if let Some(victim) = admitted.victim {
                    self.refused(victim, PreauthReason::Evicted);
                }
                // Without it, the first answer on a new connection can wait
                // for the delayed ACK of the handshake's last flight (40 ms).
                let _ = tcp.set_nodelay(true);
                let this = Arc::clone(self);
                let stop = stop.clone();
                tasks.spawn(async move {
                    this.connection(tcp, remote, admitted.ticket, admitted.evicted, stop)
                        .await;
                });
            }
            Err(reason) => {
                // Counted before the peer can learn of it, so the metrics
                // and the interval's summary never lag behind a refusal.
                self.refused(source, reason);
                // A reset, not a FIN: nothing of the refused connection
                // lingers in TIME_WAIT on this side.
                let _ = tcp.set_zero_linger();
                drop(tcp);
            }
        }
    }

    /// Counts a connection refused by a limit (or evicted) into the
    /// interval's summary.
    fn refused(&self, source: Source, reason: PreauthReason) {
        self.metrics.refused(reason);
        tracing::debug!(%source, reason = reason.as_str(), "connection refused before authentication");
        lock(&self.reports).refused(source, reason);
    }

    /// Reports a failed handshake at once if the interval has room for it,
    /// else counts it into the summary.
    async fn handshake_failed(&self, remote: SocketAddr, reason: PreauthReason, message: &str) {
        self.metrics.tls_handshake_failures.inc();
        let report = lock(&self.reports).failure(remote, reason, message);
        match report {
            Some(failure) => {
                tracing::info!(%remote, reason = reason.as_str(), error = %message, "TLS handshake failed");
                self.metrics.preauth_reports.inc();
                self.handler
                    .preauth_report(PreauthReport::Failure(failure))
                    .await;
            }
            None => {
                tracing::debug!(%remote, reason = reason.as_str(), error = %message, "TLS handshake failed; counted");
            }
        }
    }

    /// Ends the report interval: reports its summary, if any.
    async fn flush_reports(&self) {
        let summary = lock(&self.reports).take(SystemTime::now());
        if let Some(summary) = summary {
            tracing::warn!(
                total = summary.total,
                sources = summary.sources.len(),
                other_sources = summary.other_sources.total,
                "connections failed or refused before authentication"
            );
            self.metrics.preauth_summaries.inc();
            self.handler
                .preauth_report(PreauthReport::Summary(summary))
                .await;
        }
    }

    /// Ends a report interval every [`Limits::report_interval`] until
    /// shutdown begins.
    async fn report_every_interval(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = self.limits.report_interval;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stopped(&mut stop) => break,
                _ = ticks.tick() => self.flush_reports().await,
            }
        }
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        mut ticket: Ticket,
        mut evicted: oneshot::Receiver<()>,
        mut stop: watch::Receiver<bool>,
    ) {
        let handshake =
            tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(tcp));
        let tls = tokio::select! {
            () = stopped(&mut stop) => return,
            // Counted when the slot was taken.
            _ = &mut evicted => return,
            r = handshake => match r {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    ticket.release();
                    let reason = PreauthReason::of_handshake_error(&e);
                    self.handshake_failed(remote, reason, &e.to_string()).await;
                    return;
                }
                Err(_) => {
                    ticket.release();
                    self.handshake_failed(remote, PreauthReason::TlsTimeout, "TLS handshake timed out")
                        .await;
                    return;
                }
            },
        };
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        let Some(leaf) = leaf else {
            // The verifier requires a certificate; this cannot happen, but
            // if it did the connection must not be served.
            drop(tls);
            ticket.release();
            tracing::warn!(%remote, "TLS session without client certificate; closing");
            let message = "TLS session without client certificate";
            self.handshake_failed(remote, PreauthReason::TlsCertificate, message)
                .await;
            return;
        };
        if let Err(reason) = ticket.authenticate() {
            if reason != PreauthReason::Evicted {
                self.refused(ticket.source(), reason);
            }
            return;
        }
        self.metrics.tls_sessions.inc();
        let identity: Identity = match PeerIdentity::from_der(&leaf, &self.cell) {
            Ok(id) => {
                tracing::debug!(%remote, principal = %id.principal, "TLS session established");
                Ok(id)
            }
            Err(e) => {
                self.metrics.tls_identity_refusals.inc();
                tracing::info!(%remote, error = %e, "client certificate names no principal of this cell");
                self.handler
                    .refused_at_tls(&e, Some(cert_sha256(&leaf)))
                    .await;
                Err(Arc::from(e.to_string()))
            }
        };

        let this = Arc::clone(&self);
        let svc = service_fn(move |req: Request<Incoming>| {
            let this = Arc::clone(&this);
            let identity = identity.clone();
            async move { Ok::<_, Infallible>(this.request(identity, req).await) }
        });
        // hyper's header read timeout runs from the moment the connection
        // waits for a request head: after the handshake and after every
        // response, so it is the idle timeout of keep-alive connections too.
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.idle_timeout)
            .keep_alive(true)
            .serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = stopped(&mut stop) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            if e.is_timeout() {
                self.metrics.idle_timeouts.inc();
                tracing::debug!(%remote, "idle connection closed");
            } else {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        }
        drop(ticket);
    }

    async fn request(&self, identity: Identity, req: Request<Incoming>) -> Response<Full<Bytes>> {
        self.metrics.requests.inc();
        let peer = match identity {
            Ok(peer) => peer,
            Err(reason) => {
                let mut resp =
                    refusal_response(StatusCode::UNAUTHORIZED, RefusalStep::Tls, &reason);
                close(&mut resp);
                return full(resp);
            }
        };
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let unreadable = |status: StatusCode, reason: String| {
            self.handler.request_unreadable(
                peer.clone(),
                parts.method.to_string(),
                parts.uri.path().to_owned(),
                status.as_u16(),
                reason,
            )
        };
        if declared.is_some_and(|n| n > (self.max_body + MAX_DRAIN) as u64) {
            // Not worth reading; the connection is closed after the answer.
            let resp = self.too_large();
            unreadable(resp.status(), self.too_large_reason()).await;
            return full(resp);
        }
        let body = match tokio::time::timeout(BODY_READ_TIMEOUT, read_body(body, self.max_body))
            .await
        {
            Ok(Ok(body)) => body,
            Ok(Err(BodyError::TooLarge)) => {
                let resp = self.too_large();
                unreadable(resp.status(), self.too_large_reason()).await;
                return full(resp);
            }
            Ok(Err(BodyError::Read(e))) => {
                tracing::debug!(principal = %peer.principal, error = %e, "request body could not be read");
                let reason = "request body could not be read";
                let mut resp =
                    refusal_response(StatusCode::BAD_REQUEST, RefusalStep::Request, reason);
                close(&mut resp);
                unreadable(resp.status(), reason.to_owned()).await;
                return full(resp);
            }
            Err(_) => {
                let reason = "request body was not sent in time";
                let mut resp =
                    refusal_response(StatusCode::REQUEST_TIMEOUT, RefusalStep::Request, reason);
                close(&mut resp);
                unreadable(resp.status(), reason.to_owned()).await;
                return full(resp);
            }
        };
        full(
            self.handler
                .handle(peer, Request::from_parts(parts, body))
                .await,
        )
    }

    fn too_large_reason(&self) -> String {
        format!("request body is larger than {} bytes", self.max_body)
    }

    fn too_large(&self) -> Response<Bytes> {
        self.metrics.bodies_too_large.inc();
        let mut resp = refusal_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            RefusalStep::Request,
            &self.too_large_reason(),
        );
        close(&mut resp);
        resp
    }
}

enum BodyError {
    TooLarge,
    Read(hyper::Error),
}

/// Reads a body of at most `max` bytes. A larger one is read on and thrown
/// away up to [`MAX_DRAIN`] more bytes, so that the `413` answer reaches a
/// client that is still sending instead of being lost to a TCP reset.
async fn read_body(mut body: Incoming, max: usize) -> Result<Bytes, BodyError> {
    let mut buf = BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else {
            continue; // trailers
        };
        total = total.saturating_add(data.len());
        if total <= max {
            buf.extend_from_slice(&data);
        } else if total > max.saturating_add(MAX_DRAIN) {
            return Err(BodyError::TooLarge);
        }
    }
    if total > max {
        return Err(BodyError::TooLarge);
    }
    Ok(buf.freeze())
}

/// Resolves once shutdown has begun (or the server is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard returned by `wait_for` is not `Send`; drop it at once.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// Asks hyper to close the connection after this response.
fn close(resp: &mut Response<Bytes>) {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

fn full(resp: Response<Bytes>) -> Response<Full<Bytes>> {
    resp.map(Full::new)
}
