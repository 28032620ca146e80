//! mTLS HTTP/1.1 serving and calling, shared by every nitrile service and the CLI.
//!
//! This crate guarantees that a request reaches a [`Handler`] only over TLS
//! 1.3 with a client certificate verified against the cell CA (the
//! configuration comes from [`nitrile_pki::tls`]) and naming exactly one
//! principal of the server's cell; the handler gets that principal and the
//! certificate's SHA-256 as a [`PeerIdentity`]. A handshake that fails (no
//! certificate, another CA, TLS 1.2) is counted, never answered with HTTP,
//! and reported to [`Handler::preauth_report`]; a verified certificate that
//! names no principal of the cell is answered with a `401`
//! [`nitrile_api::wire::Refusal`] at step `tls` and reported to
//! [`Handler::refused_at_tls`]. Request bodies are read whole up to
//! [`MAX_BODY`] bytes (`413` beyond), response bodies up to
//! [`MAX_RESPONSE_BODY`].
//!
//! Before authentication a [`Server`] guarantees, by its [`Limits`]: the
//! accept loop never waits for a slot (each connection is admitted or
//! closed right after `accept`); per [`Source`] (an IPv4 address or an IPv6
//! /64) at most so many handshakes in progress, connections open and
//! handshake starts per second; a global cap on handshakes in progress that
//! is separate from the cap on authenticated connections, where a full
//! table gives the oldest handshake of the busiest source to a less busy
//! one; a handshake deadline; and an idle timeout on authenticated
//! keep-alive connections. Failed and refused connections are reported
//! aggregated ([`PreauthReport`]): at most a few one by one and one summary
//! per report interval, whatever the flood, and each connection in exactly
//! one report. A flood from more sources than the limits divide among, or
//! larger than the machine's bandwidth or CPU, is not stopped here.
//!
//! It does not authenticate requests beyond TLS (tokens are the services'
//! business), does not route (a handler sees every path), and speaks neither
//! HTTP/2 nor plaintext HTTP, except for the loopback-only metrics endpoint
//! ([`serve_metrics`]).

#![forbid(unsafe_code)]

mod admission;
mod client;
mod error;
mod limits;
mod metrics;
mod report;
mod server;
mod signal;

pub use admission::Source;
pub use client::{
    CONNECT_TIMEOUT, CallError, Client, MAX_RESPONSE_BODY, REQUEST_TIMEOUT, Response,
};
pub use error::NetError;
pub use limits::{
    HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, Limits, LimitsError, MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_SOURCE, MAX_HANDSHAKE_BURST_PER_SOURCE, MAX_HANDSHAKE_RATE_PER_SOURCE,
    MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE, MAX_INDIVIDUAL_REPORTS,
    MAX_INDIVIDUAL_REPORTS_PER_SOURCE, MAX_SUMMARY_SOURCES, MAX_TRACKED_SOURCES, REPORT_INTERVAL,
};
pub use metrics::{Counter, Gauge, MetricsError, Registry, bind_metrics, serve_metrics};
pub use nitrile_pki::PeerIdentity;
pub use report::{
    MAX_FAILURE_MESSAGE, OtherSources, PreauthFailure, PreauthReason, PreauthReport,
    PreauthSummary, ReasonCounts, SourceCounts,
};
pub use server::{
    Handler, MAX_BODY, SHUTDOWN_GRACE, Server, json_response, refusal_response, serve,
};
pub use signal::shutdown_signal;
