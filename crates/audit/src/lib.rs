//! The write-ahead audit journal: append-only, hash-chained, group-committed.
//!
//! Every admin call a cell service or host receives, refused ones included, is
//! written here before it is answered or acted on. This crate guarantees that
//! an appended record is acknowledged (with a [`Receipt`]) only once it is
//! durable — written and `fdatasync`'d — and that any change to a journal
//! file (an altered, removed, reordered or inserted record, a different
//! header) is detected when the file is opened or verified, naming the
//! offset and sequence number where the chain breaks. A crash in the middle of
//! a write leaves a torn tail, which is reported, never silently dropped;
//! [`Journal::open_repairing`] moves it to a side file and cuts it off.
//! Corruption before the tail is never repaired.
//!
//! It does not protect a journal against someone who can rewrite the whole
//! file (recompute every hash): that is what shipping journals to the cell's
//! transparency log and cross-checking heads is for. It does not encrypt and
//! holds nothing secret. The journal layer treats payloads as bytes; payloads
//! are by convention JSON [`AuditRecord`]s.
//!
//! # File format, version 1
//!
//! All integers are little-endian. A file is one header followed by zero or
//! more records, with nothing in between or after.
//!
//! Header:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic, ASCII `NITRILEJ` |
//! | 8 | 2 | format version, `u16`, = 1 |
//! | 10 | 2 | `source_len`, `u16`, 1 to 255 |
//! | 12 | 16 | journal id, random bytes chosen at creation |
//! | 28 | `source_len` | source name, visible ASCII (`0x21..=0x7e`), e.g. `nitrile://cell-1/host/h1` |
//! | 28 + `source_len` | 32 | genesis hash |
//!
//! `genesis = SHA-256("nitrile/journal/genesis/v1" 0x00 || version (2) ||
//! journal_id (16) || source_len (2) || source)`. A reader recomputes it and
//! refuses a header whose stored value differs.
//!
//! Record `n` (n = 1, 2, ... with no gaps), at the offset where the previous
//! one ends:
//!
//! | size | field |
//! |---|---|
//! | 4 | `len`, `u32`, 1 to [`MAX_RECORD_LEN`] (65536) |
//! | 8 | `seq`, `u64`, = n |
//! | `len` | payload |
//! | 32 | `hash` |
//!
//! `hash_n = SHA-256("nitrile/journal/record/v1" 0x00 || hash_{n-1} (32) ||
//! seq (8) || len (4) || payload)`, with `hash_0 = genesis`. The head of a
//! journal is `(last seq, last hash)`, or `(0, genesis)` when it is empty.
//!
//! A writer appends whole batches of records with one write and one
//! `fdatasync`, at most [`MAX_BATCH_BYTES`] at a time, so a crash can damage
//! at most that many bytes at the end. On open, the first record that fails
//! to parse or verify is a *torn tail* when it and everything after it are no
//! more than [`MAX_BATCH_BYTES`] and no complete later-numbered record frame
//! follows it; otherwise the journal is *corrupt* at that record.
//!
//! A journal file has one writer at a time, enforced with an exclusive file
//! lock; readers need no lock.

#![forbid(unsafe_code)]

mod error;
mod format;
mod journal;
mod reader;
mod record;

pub use error::{HeaderProblem, JournalError, RecordProblem};
pub use format::{
    ChainHash, FORMAT_VERSION, GENESIS_DOMAIN, JournalHeader, JournalId, MAGIC, MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS, MAX_RECORD_LEN, MAX_SOURCE_LEN, RECORD_DOMAIN, RECORD_OVERHEAD,
    genesis_hash, record_hash,
};
pub use journal::{Journal, JournalMetrics, JournalOptions, Pending, Receipt, TornTailRepair};
pub use reader::{JournalEntry, JournalReader, VerifyReport, verify_journal};
pub use record::{
    AuditRecord, CertSha256, HexError, MAX_REASON_LEN, MAX_SHORT_FIELD_LEN, Outcome, RecordError,
    RecordKind, RecordRule, RequestId, format_time,
};
