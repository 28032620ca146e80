//! The token service of a nitrile cell (`nitrile tokend`).
//!
//! It guarantees that a token is only ever handed out to a caller who
//! authenticated with a client certificate of the cell CA, whose group is
//! entitled by a reviewer-signed entitlement bundle to every operation on
//! every resource the token names at its one audience, within that group's
//! quotas; and that every request, granted or refused, is recorded durably in
//! the service's write-ahead journal before the answer leaves. If the journal
//! cannot be written, no token is issued.
//!
//! It does not let anyone act on a host: hosts verify tokens themselves,
//! offline, against the issuer keys pinned at provisioning
//! ([`keys::IssuerFile`]).

#![forbid(unsafe_code)]

pub mod keys;
pub mod service;

pub use keys::{IssuerFile, KeyRing, KeyRingError};
pub use service::{Reply, ServiceMetrics, TokenService};
pub mod server;

pub use server::{Tokend, TokendConfig, TokendError};
