//! The error of serving and calling.

use std::net::SocketAddr;

/// Why a connection, a call or a server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The TCP connection could not be made.
    #[error("could not connect to {addr}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting took longer than [`crate::CONNECT_TIMEOUT`].
    #[error("connecting to {addr} timed out")]
    ConnectTimeout {
        /// The address dialled.
        addr: String,
    },
    /// The TLS handshake failed (e.g. the peer's certificate is not from
    /// the cell CA, or it does not speak TLS 1.3).
    #[error("TLS handshake with the peer failed")]
    Tls(#[source] std::io::Error),
    /// The peer ended the TLS session with an error after the handshake;
    /// with TLS 1.3 this is how a server refuses a client certificate.
    #[error("the peer ended the TLS session; it may have refused our certificate")]
    TlsAlert(#[source] hyper::Error),
    /// The HTTP exchange failed (connection closed, malformed response).
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    /// No answer within [`crate::REQUEST_TIMEOUT`].
    #[error("no answer within the request timeout")]
    RequestTimeout,
    /// The response body is larger than [`crate::MAX_RESPONSE_BODY`].
    #[error("response body is larger than {max} bytes")]
    ResponseTooLarge {
        /// The limit.
        max: usize,
    },
    /// The request could not be built (e.g. a bad path).
    #[error("invalid request")]
    InvalidRequest(#[source] http::Error),
    /// A bearer token contains bytes that cannot go in a header.
    #[error("bearer token contains characters not allowed in an HTTP header")]
    InvalidToken,
    /// JSON could not be encoded or decoded.
    #[error("JSON body could not be encoded or decoded")]
    Json(#[source] serde_json::Error),
    /// A listener could not be bound or inspected.
    #[error("could not bind or inspect listener {addr:?}")]
    Listener {
        /// The address, when known.
        addr: Option<SocketAddr>,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The metrics endpoint was asked to listen on a non-loopback address.
    #[error("metrics may only be served on a loopback address, not {addr}")]
    MetricsNotLoopback {
        /// The address refused.
        addr: SocketAddr,
    },
    /// A metric could not be registered.
    #[error("metric registration failed")]
    Metrics(#[from] crate::MetricsError),
    /// The server's limits would refuse every connection.
    #[error("invalid server limits")]
    Limits(#[from] crate::LimitsError),
}

impl NetError {
    /// Whether TLS refused: a failed handshake or a TLS alert.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_) | Self::TlsAlert(_))
    }
}

/// Sorts a hyper error into TLS (a rustls error or alert below it) or HTTP.
pub(crate) fn classify(e: hyper::Error) -> NetError {
    if has_rustls_cause(&e) {
        NetError::TlsAlert(e)
    } else {
        NetError::Http(e)
    }
}

pub(crate) fn has_rustls_cause(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        let inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        if inner.is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) {
            return true;
        }
        source = s.source();
    }
    false
}
