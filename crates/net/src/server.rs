//! The mTLS HTTP/1.1 server.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::{Counter, Gauge, NetError, Registry};

/// Largest request body read; larger ones are answered `413`.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a client may take to send a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of an oversized body is read and discarded before answering.
const MAX_DRAIN: usize = 1024 * 1024;
/// Most connections served at once; further ones wait in the listen queue.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long in-flight requests get to finish once shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What a service does with authenticated requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request from an authenticated peer. The body has been read
    /// whole (at most the server's body limit).
    fn handle(
        &self,
        peer: PeerIdentity,
        req: Request<Bytes>,
    ) -> impl Future<Output = Response<Bytes>> + Send;

    /// Told once per connection whose TLS handshake failed (no client
    /// certificate, one from another CA, an expired one, TLS 1.2, a
    /// timeout). No HTTP is answered; services journal the failed
    /// authentication here.
    fn handshake_failed(
        &self,
        remote: SocketAddr,
        reason: &str,
    ) -> impl Future<Output = ()> + Send {
        let _ = (remote, reason);
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
    connections_open: Gauge,
}

impl ServerMetrics {
    fn register(registry: &Registry, prefix: &str) -> Result<Self, NetError> {
        let c = |n: &str, h: &str| registry.counter(&format!("{prefix}_{n}"), h);
        Ok(Self {
            connections_accepted: c("connections_accepted_total", "TCP connections accepted.")?,
            tls_sessions: c(
                "tls_sessions_total",
                "TLS handshakes completed with a verified client certificate.",
            )?,
            tls_handshake_failures: c(
                "tls_handshake_failures_total",
                "TLS handshakes that failed (no or untrusted certificate, old protocol, timeout).",
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
            connections_open: registry.gauge(
                &format!("{prefix}_connections_open"),
                "Connections open now.",
            )?,
        })
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
}

impl Server {
    /// A server with the given TLS configuration (build it with
    /// [`nitrile_pki::tls::server_config`]) for peers of `cell`, with a
    /// private metrics registry, [`MAX_BODY`] and [`SHUTDOWN_GRACE`].
    pub fn new(tls: Arc<ServerConfig>, cell: Name) -> Self {
        Self {
            tls,
            cell,
            registry: Arc::new(Registry::new()),
            prefix: "nitrile_net".to_owned(),
            max_body: MAX_BODY,
            grace: SHUTDOWN_GRACE,
        }
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
    /// period) and returns.
    pub async fn serve<H: Handler>(
        self,
        listener: TcpListener,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NetError> {
        let metrics = ServerMetrics::register(&self.registry, &self.prefix)?;
        let local = listener.local_addr().ok();
        let shared = Arc::new(Shared {
            acceptor: TlsAcceptor::from(self.tls),
            cell: self.cell,
            handler,
            metrics,
            max_body: self.max_body,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut tasks = JoinSet::new();
        tracing::info!(addr = ?local, "serving mTLS HTTP/1.1");
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                permit = Arc::clone(&limit).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, remote)) => {
                        let shared = Arc::clone(&shared);
                        let stop = stop_rx.clone();
                        tasks.spawn(async move {
                            shared.connection(tcp, remote, stop).await;
                            drop(permit);
                        });
                    }
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
        tracing::info!(addr = ?local, "server stopped");
        Ok(())
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
}

/// The outcome of reading identity out of the verified client certificate.
type Identity = Result<PeerIdentity, Arc<str>>;

impl<H: Handler> Shared<H> {
    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        mut stop: watch::Receiver<bool>,
    ) {
        self.metrics.connections_accepted.inc();
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp));
        let tls = tokio::select! {
            () = stopped(&mut stop) => return,
            r = handshake => match r {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    self.metrics.tls_handshake_failures.inc();
                    tracing::info!(%remote, error = %e, "TLS handshake refused");
                    self.handler.handshake_failed(remote, &e.to_string()).await;
                    return;
                }
                Err(_) => {
                    self.metrics.tls_handshake_failures.inc();
                    tracing::info!(%remote, "TLS handshake timed out");
                    self.handler.handshake_failed(remote, "TLS handshake timed out").await;
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
            self.metrics.tls_handshake_failures.inc();
            tracing::warn!(%remote, "TLS session without client certificate; closing");
            return;
        };
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

        self.metrics.connections_open.inc();
        let this = Arc::clone(&self);
        let svc = service_fn(move |req: Request<Incoming>| {
            let this = Arc::clone(&this);
            let identity = identity.clone();
            async move { Ok::<_, Infallible>(this.request(identity, req).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
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
            tracing::debug!(%remote, error = %e, "connection ended with an error");
        }
        self.metrics.connections_open.dec();
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
