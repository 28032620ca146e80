//! The transparency log core: an append-only RFC 9162 (RFC 6962) Merkle tree of
//! opaque entries, stored as [C2SP tlog-tiles] (hash tiles and entry bundles),
//! with [C2SP tlog-checkpoint] checkpoints signed as [C2SP signed-note]s
//! (Ed25519) and witnessed with [C2SP tlog-cosignature] `cosignature/v1`
//! cosignatures; inclusion and consistency proofs and their verification; a
//! [`Storage`] trait with a file implementation; and [`audit`], which
//! recomputes a whole stored log and checks every tile, entry bundle and
//! checkpoint in its history.
//!
//! What it guarantees:
//! - Hashing, proofs and their verification follow RFC 9162 section 2 exactly
//!   (checked against the transparency-dev/merkle vectors and an independent
//!   verifier in the tests). Verification returns a value, never a `bool`.
//! - [`Log::prepare_checkpoint`] makes every entry bundle and tile it covers
//!   durable ([`Storage::sync`]) before it signs, so a published checkpoint
//!   never names data that a crash could lose.
//! - [`Log`] signs only checkpoints of its own tree, in order: a checkpoint is
//!   always consistent with every earlier one, and [`Log::publish`] refuses a
//!   note that is not a checkpoint of this tree signed by this log.
//! - [`audit`] detects any change to stored entries or tiles (altered, removed,
//!   reordered, truncated) and any checkpoint in the history that does not
//!   match the recomputed tree or is not signed, and names the path and index.
//!
//! What it does not do: it does not interpret entries (the leaf format belongs
//! to `nitrile-logd`), serve anything over a network, decide when to
//! checkpoint, or talk to witnesses. It is synchronous and single-writer: one
//! [`Log`] per storage. It keeps every stored hash of the tree in memory (64
//! bytes per entry), rebuilt from the level-0 tiles at [`Log::open`]. A
//! reader of a log trusts nothing it has not verified against a checkpoint
//! signed by a key it was configured with.
//!
//! [C2SP tlog-tiles]: https://c2sp.org/tlog-tiles
//! [C2SP tlog-checkpoint]: https://c2sp.org/tlog-checkpoint
//! [C2SP signed-note]: https://c2sp.org/signed-note
//! [C2SP tlog-cosignature]: https://c2sp.org/tlog-cosignature
#![forbid(unsafe_code)]

mod audit;
mod log;
mod merkle;
mod note;
#[cfg(feature = "postgres")]
mod pg;
mod storage;
mod tile;

pub use audit::{
    AuditFailure, AuditProblem, AuditReport, EntryCheck, EntryCheckError, audit, audit_entries,
};
pub use log::{Log, LogError, StagedCheckpoint};
pub use merkle::{
    ConsistencyValid, InclusionValid, ProofError, Tree, empty_root, leaf_hash, node_hash,
    verify_consistency, verify_inclusion,
};
pub use note::{
    Checkpoint, CosignatureValid, KeyKind, MAX_KEY_SIZE, MAX_NOTE_SIGNATURES, MAX_NOTE_SIZE,
    NoteError, NoteSigner, NoteVerifier, SignedNote, cosignatures, open_checkpoint,
    verify_cosignature,
};
#[cfg(feature = "postgres")]
pub use pg::{MAX_LOG_NAME, PgRefusal, PgStorage};
pub use storage::{FileStorage, MAX_OBJECT_SIZE, Storage, StorageError};
pub use tile::{
    ENTRIES_PER_BUNDLE, HASHES_PER_TILE, MAX_BUNDLE_SIZE, MAX_ENTRY_SIZE, TileError, TileKind,
    TilePath, decode_bundle, encode_bundle,
};

/// A SHA-256 hash: a leaf hash, an interior node hash or a tree root.
pub type Hash = [u8; 32];
