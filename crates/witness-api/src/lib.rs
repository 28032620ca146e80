//! The [C2SP tlog-witness] protocol between a log and its witnesses, as both
//! sides speak it: the `add-checkpoint` request body (old size, consistency
//! proof, checkpoint) and the response body (cosignature lines), the
//! meaning of the answers' statuses, and [`WitnessClient`], the mTLS client
//! a log (logd) asks a witness for a cosignature with. The witness service
//! itself is `nitrile-witness`; a log needs only this crate.
//!
//! What it guarantees: every body is parsed within a named bound
//! ([`MAX_REQUEST_SIZE`], [`MAX_NOTE_SIZE`], [`MAX_PROOF_LINES`],
//! [`MAX_RESPONSE_SIZE`], [`MAX_COSIGNATURE_LINES`]) and refused with a
//! [`RequestError`] otherwise; a refusal reason kept from an answer is at
//! most [`MAX_REASON`] characters; an answer that is not what the protocol
//! prescribes is a [`WitnessError::BadAnswer`].
//!
//! What it does not do: verify signatures or proofs (cosignature lines are
//! checked for form only: verify them with the witness's key,
//! `nitrile_tlog::cosignatures`), keep any state, or decide when a log asks.
//!
//! [C2SP tlog-witness]: https://c2sp.org/tlog-witness

#![forbid(unsafe_code)]

mod client;
mod request;

pub use client::{MAX_REASON, WitnessClient, WitnessError};
pub use request::{
    AddCheckpoint, MAX_COSIGNATURE_LINES, MAX_NOTE_SIZE, MAX_PROOF_LINES, MAX_REQUEST_SIZE,
    MAX_RESPONSE_SIZE, RequestError, parse_cosignature_lines,
};

/// Content type of a `409 Conflict` answer: the recorded size and a newline.
pub const SIZE_CONTENT_TYPE: &str = "text/x.tlog.size";
/// Header set on a `422` answer that reports a split view.
pub const SPLIT_VIEW_HEADER: &str = "x-nitrile-split-view";
