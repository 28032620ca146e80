//! The placement service (`nitrile placed`): customers run, describe, list,
//! stop, start and terminate their instances and import, list, describe and
//! delete their images; placement picks a host and calls that host's admin
//! API with its own identity (`service/placement`) and a token for exactly
//! that call.
//!
//! Guarantees:
//! - Only customers: a caller whose certificate names no customer is
//!   refused at step `entitlement` and journaled before its token is looked
//!   at; operators, auditors and services have no operation here (and the
//!   sample bundle's guardrail gives them no customer token).
//! - Claims 5 and 6 as on every service: each request's token is verified
//!   offline by `nitrile_gate::Admission` against the pinned issuer keys for
//!   audience `placement`, the exact operation and the resource the request
//!   names (`instance/<caller>--<name>`, `image/<caller>--<24 hex>`,
//!   `placement/<cell>`), bound to the caller's certificate, single use for
//!   mutations; the request record is durable before anything runs, every
//!   refusal and outcome is journaled, and the journal is shipped to logd.
//! - A customer reaches only its own: instance resources are built from the
//!   caller's own name, and images are served only to the customers placed
//!   recorded as their importers (else refused at step `entitlement`).
//! - Placement is recorded durably (`placement.json`, replaced atomically):
//!   which host runs which instance, each customer's VNI and addresses
//!   (never two instances of a customer on one address).
//! - Image imports are all or nothing: bounds, the stated digest and a
//!   loadable kernel are checked before anything is written, and a failure
//!   while writing removes what the import added.
//!
//! - Networks: a launch carries the instance's `NetworkAttachment` (its
//!   customer's VNI, an address of `10.80.0.0/24` no other instance of the
//!   customer holds, its MAC, the run's SSH keys, user data and published
//!   ports); after every run, start and terminate, and when the service
//!   starts, every host of the fleet gets `network.update` (every host's
//!   signed announcement, every recorded instance's route) with a token
//!   for exactly that call. A host that does not take it is journaled and
//!   gets the whole table at the next push; the customer's call does not
//!   fail for it.
//! - Announcement refresh: every `network_refresh_secs` (10 by default)
//!   placement describes every host; when a host's signed announcement
//!   changed (its agent restarted with a new tunnel key) or a host became
//!   reachable or unreachable since the last push, every host gets the
//!   table again and the refresh is journaled with what changed. One push
//!   runs at a time; a refresh is one describe per host, plus one push per
//!   host when something changed.
//!
//! Answers are metadata only: placement never returns user data or keys
//! (it does not keep them: the host's metadata service does).

#![forbid(unsafe_code)]

pub mod config;
mod images;
mod service;
pub mod store;

pub use config::{ConfigError, PlacedConfig};
pub use images::ImportError;
pub use nitrile_tokend_api::HostCallError;
pub use service::{PlacedOptions, PlacedServer, PlacedServerError};
