//! The client side of a nitrile cell's audit log (logd): everything a
//! source that ships its journal, and an auditor that reads the log, share
//! with logd, so that neither needs the service itself.
//!
//! - The wire formats: the leaf every shipped record becomes ([`leaf`], at
//!   most [`leaf::MAX_LEAF_LEN`] bytes, decoded without reading past it),
//!   the ingest protocol's bodies ([`protocol`], at most
//!   [`protocol::MAX_INGEST_BODY`] bytes and [`protocol::MAX_INGEST_ENTRIES`]
//!   entries, unknown fields refused) and alerts as served ([`alert`]).
//! - The journal chain checks both sides run ([`chain`]): logd accepts a
//!   batch only if it continues, hash for hash, what the log holds of its
//!   source ([`chain::check_batch`]); an auditor replays every source's
//!   journal through the whole log ([`chain::SourceChains`]).
//! - The source's side ([`tail`], [`shipper`], [`anchor`]): a shipper reads
//!   its journal without writing to it, resumes from logd's head after any
//!   error (so no record is skipped and a duplicate is harmless), moves on
//!   only when logd acknowledges a batch as durable, and, with the log's
//!   key pinned, remembers the last checkpoint covering its journal and
//!   raises a `log_inconsistent` alert when the log is not consistent with
//!   it.
//! - The auditor's side ([`reader`], [`audit`]): reads of logd's API with
//!   an `audit.read` token, and the checks made locally of what it serves:
//!   the whole log (every checkpoint's signature and consistency, every
//!   tile and bundle, every journal replayed) and a record's inclusion
//!   proof against a signed checkpoint. Nothing logd answers is trusted
//!   before it is verified against the log's key.
//!
//! It does not decide what an auditor remembers of a log between runs
//! (the CLI's memory does), does not get tokens (the caller passes one),
//! and does not hold the log: logd does.

#![forbid(unsafe_code)]

use nitrile_api::{Name, PrincipalId, PrincipalKind};

pub mod alert;
pub mod anchor;
pub mod audit;
pub mod chain;
pub mod leaf;
pub mod protocol;
pub mod reader;
pub mod shipper;
pub mod storage;
pub mod tail;

pub use alert::{ALERT_DETAIL_KEY, Alert, AlertKind, AlertPage};
pub use anchor::{AnchorFileError, AnchorProblem, RememberedCheckpoint, check_anchor};
pub use audit::{AuditedLog, FetchProgress, MemStorage, audit_log};
pub use chain::{IntegrityViolation, SourceChainBreak, SourceChains, SourceState, check_batch};
pub use leaf::{LeafError, LeafV1};
pub use reader::{LogReader, ReadError};
pub use shipper::{
    AnchorOptions, JournalShipping, LOG_ANCHOR_FILE, LogKeyError, LogdTarget, ShipError, Shipper,
    ShipperHandle, ShipperOptions, ShipperStatus, error_chain,
};
pub use storage::{Conninfo, ConninfoError, LOG_DIR};
pub use tail::{JournalTail, TailError};

/// The audit log service's name, and the audience of its read tokens.
pub const LOGD: &str = "logd";

/// The audit log service's principal in `cell`:
/// `nitrile://<cell>/service/logd`.
pub fn logd_principal(cell: &Name) -> PrincipalId {
    PrincipalId::new(
        cell.clone(),
        PrincipalKind::Service,
        Name::new(LOGD).unwrap_or_else(|_| unreachable!("`logd` is a valid name")),
    )
}

/// The log's origin line (and key name) for `cell`: `<cell>.nitrile/log`.
pub fn log_origin(cell: &Name) -> String {
    format!("{cell}.nitrile/log")
}
