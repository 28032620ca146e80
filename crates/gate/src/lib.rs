//! The gate of a nitrile service: what stands between a connection and the
//! service's own logic, the same in every service (hostd, logd, tokend, the
//! witness, and the services to come), so that none copies it.
//!
//! What it guarantees:
//! - [`ServiceIdentity::load`] returns an identity only for a certificate
//!   that names exactly one principal of the cell, the one (or of the kind)
//!   the service expects to run as, with a key readable by its owner only;
//!   anything else is an [`IdentityError`] naming the file. TLS
//!   configurations and the [`nitrile_net::Server`] of a service come from
//!   that identity.
//! - [`Admission::admit`] returns an [`Admitted`] only for a token verified
//!   offline against the pinned issuer keys (signature, expiry, lifetime at
//!   most `nitrile_token::MAX_LIFETIME`, audience = this service, operation,
//!   exact resource, binding to the caller's client certificate), used once
//!   if it grants a mutation (the replay cache is rebuilt from the journal
//!   at start, so single use survives a restart), and only once its request
//!   record is durable in the service's journal; if the journal cannot
//!   record it, the request is refused (503) and nothing may run. Every
//!   refusal is journaled with its step and reason.
//! - Every connection refused before authentication and every request the
//!   server answers itself is journaled through one implementation of
//!   [`nitrile_net::Handler`]'s refusal hooks ([`ServiceJournal`]: a
//!   failed handshake or the summary of an interval's refusals, a
//!   certificate naming no principal of the cell, a body that could not be
//!   read), at step `tls` or `request`. A refusal that cannot be journaled
//!   is counted and reported on stderr.
//! - A refusal answer is a [`nitrile_api::wire::Refusal`] whose reason is
//!   clipped to `nitrile_api::admin::MAX_REASON_LEN` characters and which
//!   names its journal record ([`refusal_response`]).
//!
//! What it does not do: decide who is entitled to what (the token service
//! does), route or parse a service's requests, serve connections
//! (`nitrile_net` does, with the pre-authentication limits), or keep
//! metrics beyond the journal's health and the refusals it could not
//! write.

#![forbid(unsafe_code)]

mod admission;
mod http;
mod identity;
mod journal;
mod startup;

pub use admission::{
    Admission, AdmissionError, Admitted, DEFAULT_SIGNATURE_CACHE, SECOND_TOKEN_EXPIRES_AT,
    SECOND_TOKEN_ID, SecondToken,
};
pub use http::{Refused, bearer, refusal_body, refusal_response};
pub use identity::{Expected, IdentityError, ServiceIdentity};
pub use journal::{MAX_RECORDED_METHOD, MAX_RECORDED_PATH, ServiceJournal, request_detail};
pub use startup::{Listeners, MetricsTask};
