//! The audit log service of a nitrile cell (`nitrile logd`).
//!
//! logd guarantees that a journal record enters the cell's transparency log
//! only if it continues, hash for hash, the chain of the journal it was
//! shipped from, shipped by that journal's own source (its mTLS principal),
//! and that a shipper's batch is acknowledged only once its records are
//! durable in the log. Anything else a source ships — a gap (a withheld
//! record), a chain break (an altered record), another journal, another
//! source's journal — is refused and raises an integrity alert, which is
//! journaled, printed and posted; nothing is papered over. The log is an
//! RFC 9162 Merkle tree laid out as C2SP tlog-tiles ([`nitrile_tlog`]),
//! with a checkpoint signed per C2SP tlog-checkpoint every interval in
//! which it grew (and at least every `max_checkpoint_age_ms`), published
//! only with a quorum of C2SP tlog-witness cosignatures when one is
//! configured. Reads of the log (checkpoint, tiles, proofs, entries, alerts)
//! need an `audit.read` token for `log/<cell>` at audience `logd`, verified
//! offline against pinned issuer keys, and are journaled before they are
//! answered, refusals too; logd's own journal is ingested into the log.
//! There is no endpoint that deletes or rewrites anything.
//!
//! It does not keep a source from withholding its newest records forever
//! (the log only shows how far each source got; the monitor watches lag),
//! does not detect a rewritten journal whose rewrite starts after what the
//! log holds (a fork at a later record is a chain break only once shipped),
//! and its log's integrity against the operator of logd's own machine rests
//! on witnesses and auditors comparing checkpoints.
//!
//! The monitor runs only reviewed rules: those of the cell's entitlement
//! bundle, signed by two distinct reviewers, whose serial is not below the
//! highest logd has loaded ([`rules`]).
//!
//! What logd shares with the sources that ship to it and the auditors that
//! read it is the log client ([`nitrile_logclient`]): the leaf format, the
//! ingest protocol, the chain checks (run here on every batch, and by an
//! auditor over the whole log), the journal tail reader, the shipper and
//! the alerts as served. Here are alerts and the monitor's hooks
//! ([`alert`]), where the monitor's rules come from ([`rules`]), which
//! journals it takes and which records fit their source ([`source`]), and
//! the service ([`service`], a module per concern: routes, ingest, reads,
//! checkpoints and witnesses, its own journal, alerts, metrics).

#![forbid(unsafe_code)]

pub mod alert;
pub mod config;
pub mod rules;
pub mod service;
pub mod source;
mod store;

// The service's modules name the log client's modules by these paths
// (`crate::leaf`, `crate::chain`, ...): they lived in this crate before.
use nitrile_logclient::{chain, leaf, protocol, shipper, tail};

pub use alert::{
    Alert, AlertKind, AlertPage, AlertSink, AlertTable, Observer, StdoutAlerts, WebhookAlerts,
};
pub use config::{ConfigError, LogdConfig, WitnessConfig};
pub use service::{Logd, LogdError, LogdOptions, log_origin};
pub use source::{ContentViolation, DeclaredSources, SourceRole, SourcesConfig, check_record};
pub use store::{MAX_SOURCES_FILE, SOURCES_FILE, StoreError};
