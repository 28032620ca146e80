//! The checkpoint witness of a nitrile cell (`nitrile audit witness`): a
//! cosigner per [C2SP tlog-witness] that signs [C2SP tlog-cosignature]
//! `cosignature/v1` (Ed25519, timestamped) cosignatures on [C2SP
//! tlog-checkpoint] checkpoints of the logs it is configured for.
//!
//! What it guarantees:
//! - It cosigns a checkpoint only if the note carries a valid signature of
//!   the log key configured for its origin, and only if it extends the
//!   checkpoint it last cosigned for that origin: the old size must be the
//!   recorded size and the RFC 9162 consistency proof from the recorded
//!   (size, root) to the new one must verify. It never cosigns a smaller
//!   tree, nor another tree of the recorded size.
//! - The new (size, root) is durable (fsync of the file and its directory)
//!   before the cosignature is returned, and the check and the save happen
//!   under one lock, so concurrent requests cannot roll the state back.
//! - A checkpoint of the recorded size with a different root is a split
//!   view: it is refused with [`AddError::SplitView`] (an alert for the
//!   caller), logged, and both signed notes are kept as evidence.
//! - Status codes and bodies follow tlog-witness (`409` carries the recorded
//!   size as `text/x.tlog.size`).
//!
//! Cosignature keys and their verification are `nitrile_tlog`'s
//! ([`nitrile_tlog::NoteSigner`] of kind `CosignatureV1`). The protocol's
//! bodies and the client a log uses are `nitrile_witness_api`'s (re-exported
//! here), so that a log does not depend on the witness service.
//!
//! What it does not do: it does not fetch anything from the log (the
//! submitter provides the proof), authenticate submitters beyond the cell's
//! mTLS (the log's signature is what counts), cosign subtrees or use
//! ML-DSA-44, or keep more history than the latest cosigned checkpoint per
//! log. Its key is a file protected by permissions only.
//!
//! [C2SP tlog-witness]: https://c2sp.org/tlog-witness
//! [C2SP tlog-cosignature]: https://c2sp.org/tlog-cosignature
//! [C2SP tlog-checkpoint]: https://c2sp.org/tlog-checkpoint

#![forbid(unsafe_code)]

mod config;
mod server;
mod state;
mod witness;

pub use config::{ConfigError, DEFAULT_SIGNING_KEY, LogConfig, MAX_CONFIG_FILE, WitnessConfig};
pub use nitrile_witness_api::{
    AddCheckpoint, MAX_COSIGNATURE_LINES, MAX_NOTE_SIZE, MAX_PROOF_LINES, MAX_REASON,
    MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, RequestError, SIZE_CONTENT_TYPE, SPLIT_VIEW_HEADER,
    WitnessClient, WitnessError, parse_cosignature_lines,
};
pub use server::{MAX_KEY_FILE, ServiceError, WitnessService, load_signing_key, write_signing_key};
pub use state::{LogState, MAX_STATE_FILE, MAX_STATE_FILES, StateError, StateStore, origin_hash};
pub use witness::{AddError, Cosigned, MAX_TIMESTAMP, OpenError, Witness};
