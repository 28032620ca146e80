//! mTLS HTTP/1.1 serving and calling, shared by every nitrile service and the CLI.
//!
//! This crate guarantees that a request reaches a [`Handler`] only over TLS
//! 1.3 with a client certificate verified against the cell CA (the
//! configuration comes from [`nitrile_pki::tls`]) and naming exactly one
//! principal of the server's cell; the handler gets that principal and the
//! certificate's SHA-256 as a [`PeerIdentity`]. A handshake that fails (no
//! certificate, another CA, TLS 1.2) is counted and logged, never answered
//! with HTTP; a verified certificate that names no principal of the cell is
//! answered with a `401` [`nitrile_api::wire::Refusal`] at step `tls` and
//! reported to [`Handler::refused_at_tls`]. Request bodies are read whole up
//! to [`MAX_BODY`] bytes (`413` beyond), response bodies up to
//! [`MAX_RESPONSE_BODY`].
//!
//! It does not authenticate requests beyond TLS (tokens are the services'
//! business), does not route (a handler sees every path), and speaks neither
//! HTTP/2 nor plaintext HTTP, except for the loopback-only metrics endpoint
//! ([`serve_metrics`]).

#![forbid(unsafe_code)]

mod client;
mod error;
mod metrics;
mod server;
mod signal;

pub use client::{CONNECT_TIMEOUT, Client, MAX_RESPONSE_BODY, REQUEST_TIMEOUT, Response};
pub use error::NetError;
pub use metrics::{Counter, Gauge, MetricsError, Registry, bind_metrics, serve_metrics};
pub use nitrile_pki::PeerIdentity;
pub use server::{
    HANDSHAKE_TIMEOUT, Handler, MAX_BODY, MAX_CONNECTIONS, SHUTDOWN_GRACE, Server, json_response,
    refusal_response, serve,
};
pub use signal::shutdown_signal;
