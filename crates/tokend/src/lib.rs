//! The token service of a nitrile cell (`nitrile tokend`).
//!
//! It guarantees that a token is only ever handed out to a caller who
//! authenticated with a client certificate of the cell CA, whose group is
//! entitled by a reviewer-signed entitlement bundle to every operation on
//! every resource the token names at its one audience, within that group's
//! quotas (all of a request's quota charges are made or none); that a token
//! lives at most `nitrile_token::MAX_LIFETIME` (5 minutes) or the lower
//! maximum configured; and that every request, granted or refused, is
//! recorded durably in the service's write-ahead journal before the answer
//! leaves. If the journal cannot be written, no token is issued.
//!
//! It starts only on a bundle whose serial is not below the highest it has
//! loaded (kept in its state directory; the same serial with other content
//! is refused too), and journals the serial and digest in force at every
//! start, with the previous ones when they changed ([`bundle`]). A refused
//! older bundle is journaled too. Whoever can write its state directory can
//! remove that record of the highest serial; the journal, shipped to the
//! audit log, still shows every start's serial.
//!
//! With a `logd` to ship to ([`TokendConfig::logd`]) it ships its journal
//! to the audit log itself, anchoring it in the log when the log's key is
//! pinned ([`nitrile_logclient::JournalShipping`]).
//!
//! It does not let anyone act on a host: hosts verify tokens themselves,
//! offline, against the issuer keys pinned at provisioning (the file its key
//! ring writes, in the token crate's format [`nitrile_token::IssuerFile`]).

#![forbid(unsafe_code)]

pub mod bundle;
pub mod keys;
pub mod service;

pub use keys::{IssuerFile, KeyRing, KeyRingError};
pub use service::{Reply, ServiceMetrics, TokenService};
pub mod server;

pub use server::{Tokend, TokendConfig, TokendError};
