//! The mTLS HTTP/1.1 client.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use nitrile_api::PrincipalId;
use nitrile_api::wire::Refusal;
use nitrile_pki::tls::server_name;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::NetError;
use crate::error::classify;

/// Longest a TCP connect plus TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a request may wait for its whole response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest response body read.
pub const MAX_RESPONSE_BODY: usize = 4 * 1024 * 1024;

/// An answer from a server.
#[derive(Debug, Clone)]
pub struct Response {
    /// The HTTP status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Response {
    /// Decodes the body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, NetError> {
        serde_json::from_slice(&self.body).map_err(NetError::Json)
    }

    /// The refusal carried by a non-success answer, if its body is one.
    pub fn refusal(&self) -> Option<Refusal> {
        if self.status.is_success() {
            return None;
        }
        serde_json::from_slice(&self.body).ok()
    }
}

/// A client connection to one nitrile server, kept alive across requests and
/// re-established when the server has closed it.
pub struct Client {
    addr: String,
    server: PrincipalId,
    server_name: ServerName<'static>,
    host: HeaderValue,
    connector: TlsConnector,
    sender: Option<SendRequest<Full<Bytes>>>,
    connections: u64,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("server", &self.server)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `addr` (`host:port`) and authenticates the server as
    /// `server` (its certificate must carry [`server_name`] of it). `tls`
    /// comes from [`nitrile_pki::tls::client_config`].
    pub async fn connect(
        addr: &str,
        server: &PrincipalId,
        tls: Arc<ClientConfig>,
    ) -> Result<Self, NetError> {
        let name = server_name(server);
        let host = HeaderValue::from_str(&nitrile_pki::server_dns_name(server))
            .map_err(|e| NetError::InvalidRequest(e.into()))?;
        let mut client = Self {
            addr: addr.to_owned(),
            server: server.clone(),
            server_name: name,
            host,
            connector: TlsConnector::from(tls),
            sender: None,
            connections: 0,
        };
        client.sender = Some(client.dial().await?);
        Ok(client)
    }

    /// The server principal this client talks to.
    pub fn server(&self) -> &PrincipalId {
        &self.server
    }

    /// How many connections this client has opened so far (1 while the
    /// first one stays alive).
    pub fn connections_made(&self) -> u64 {
        self.connections
    }

    async fn dial(&mut self) -> Result<SendRequest<Full<Bytes>>, NetError> {
        let addr = self.addr.clone();
        let connect = async {
            let tcp = TcpStream::connect(&addr)
                .await
                .map_err(|source| NetError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(NetError::Tls)?;
            let (sender, conn) = http1::handshake(TokioIo::new(tls))
                .await
                .map_err(classify)?;
            Ok::<_, NetError>((sender, conn))
        };
        let (sender, conn) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| NetError::ConnectTimeout { addr: addr.clone() })??;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
        self.connections += 1;
        Ok(sender)
    }

    /// Sends one request and reads the whole response (at most
    /// [`MAX_RESPONSE_BODY`] bytes). `Host` is set to the server's name.
    pub async fn send(&mut self, mut req: Request<Bytes>) -> Result<Response, NetError> {
        req.headers_mut().insert(header::HOST, self.host.clone());
        let req = req.map(Full::new);
        let reusable = match self.sender.take() {
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut sender = match reusable {
            Some(s) => s,
            // Closed by the server (idle timeout, refusal): dial again. The
            // request has not been sent, so this is safe for any method.
            None => self.dial().await?,
        };
        let exchange = async {
            let resp = sender.send_request(req).await.map_err(classify)?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BODY)
                .collect()
                .await
                .map_err(|e| match e.downcast::<hyper::Error>() {
                    Ok(e) => classify(*e),
                    Err(_) => NetError::ResponseTooLarge {
                        max: MAX_RESPONSE_BODY,
                    },
                })?
                .to_bytes();
            Ok::<_, NetError>(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| NetError::RequestTimeout)??;
        self.sender = Some(sender);
        Ok(resp)
    }

    fn build(
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<Bytes>,
    ) -> Result<Request<Bytes>, NetError> {
        Self::build_typed(method, path, bearer, body.map(|b| ("application/json", b)))
    }

    fn build_typed(
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Request<Bytes>, NetError> {
        let mut builder = Request::builder().method(method).uri(path);
        let body = match body {
            Some((content_type, b)) => {
                builder = builder.header(header::CONTENT_TYPE, content_type);
                Some(b)
            }
            None => None,
        };
        builder = builder.header(header::ACCEPT, "application/json");
        if let Some(token) = bearer {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| NetError::InvalidToken)?;
            value.set_sensitive(true);
            builder = builder.header(header::AUTHORIZATION, value);
        }
        builder
            .body(body.unwrap_or_default())
            .map_err(NetError::InvalidRequest)
    }

    /// `GET path`, expecting JSON.
    pub async fn get_json(&mut self, path: &str) -> Result<Response, NetError> {
        self.send(Self::build(Method::GET, path, None, None)?).await
    }

    /// `POST path` with `body` as JSON.
    pub async fn post_json<T: Serialize + ?Sized>(
        &mut self,
        path: &str,
        body: &T,
    ) -> Result<Response, NetError> {
        let body = Bytes::from(serde_json::to_vec(body).map_err(NetError::Json)?);
        self.send(Self::build(Method::POST, path, None, Some(body))?)
            .await
    }

    /// `GET path` with `authorization: Bearer <token>`.
    pub async fn get_json_with_bearer(
        &mut self,
        path: &str,
        token: &str,
    ) -> Result<Response, NetError> {
        self.send(Self::build(Method::GET, path, Some(token), None)?)
            .await
    }

    /// `POST path` with `body` as JSON and `authorization: Bearer <token>`.
    pub async fn post_json_with_bearer<T: Serialize + ?Sized>(
        &mut self,
        path: &str,
        token: &str,
        body: &T,
    ) -> Result<Response, NetError> {
        let body = Bytes::from(serde_json::to_vec(body).map_err(NetError::Json)?);
        self.send(Self::build(Method::POST, path, Some(token), Some(body))?)
            .await
    }

    /// One call of a service's API: `method path` with `authorization:
    /// Bearer <token>` and `body` (its content type and bytes), the answer
    /// when it succeeded, its refusal when the service refused, else why.
    pub async fn call_with_bearer(
        &mut self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Response, CallError> {
        let req = Self::build_typed(method, path, Some(token), body)?;
        let resp = self.send(req).await?;
        if resp.status.is_success() {
            return Ok(resp);
        }
        match resp.refusal() {
            Some(refusal) => Err(CallError::Refused {
                status: resp.status,
                refusal,
            }),
            None => Err(CallError::BadAnswer {
                status: resp.status,
                source: serde_json::from_slice::<Refusal>(&resp.body)
                    .err()
                    .unwrap_or_else(|| serde::de::Error::custom("not a refusal")),
            }),
        }
    }
}

/// Why [`Client::call_with_bearer`] has no answer to give.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The service could not be reached, the exchange failed, or the token
    /// is not a header value ([`NetError::InvalidToken`]).
    #[error(transparent)]
    Net(#[from] NetError),
    /// The service refused (its refusal names the step, the reason and its
    /// journal record).
    #[error("refused: {}", refusal.with_status(status))]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The refusal.
        refusal: Refusal,
    },
    /// A failure that is not a refusal.
    #[error("a malformed answer (status {status})")]
    BadAnswer {
        /// The HTTP status.
        status: StatusCode,
        /// Why it does not parse as a refusal.
        #[source]
        source: serde_json::Error,
    },
}
