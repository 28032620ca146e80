//! Errors of the journal and its reader.

use std::io;
use std::sync::Arc;

/// What is wrong with a journal file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderProblem {
    /// the file is shorter than a header
    #[error("the file is shorter than a header")]
    Truncated,
    /// the file does not start with `NITRILEJ`
    #[error("the file does not start with NITRILEJ")]
    BadMagic,
    /// the format version is not one this build reads
    #[error("format version {0} is not supported")]
    UnsupportedVersion(u16),
    /// the source name length is 0 or too long
    #[error("source name length {0} is out of range")]
    BadSourceLength(u16),
    /// the source name has a byte outside visible ASCII
    #[error("source name has a byte outside visible ASCII")]
    BadSourceName,
    /// the stored genesis hash does not match the header fields
    #[error("the genesis hash does not match the header fields")]
    GenesisMismatch,
}

/// What is wrong with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordProblem {
    /// the file ends inside the record
    #[error("the file ends inside the record")]
    Truncated,
    /// the length field is 0 or above the maximum record length
    #[error("length field {0} is out of range")]
    BadLength(u32),
    /// the sequence number is not the one after the previous record
    #[error("sequence number {found} is out of order")]
    SeqMismatch {
        /// The sequence number found.
        found: u64,
    },
    /// the stored hash does not match the record and the previous hash
    #[error("the hash does not match the chain")]
    BadHash,
}

/// Why a journal could not be opened, read or appended to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// reading, writing or syncing the journal file failed
    #[error("{op} the journal failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// another process or handle holds the journal open for writing
    #[error("the journal is locked by another writer")]
    Locked,
    /// the journal source name is not 1 to 255 bytes of visible ASCII
    #[error("journal source name ({len} bytes) must be 1 to 255 bytes of visible ASCII")]
    BadSourceName {
        /// Its length in bytes.
        len: usize,
    },
    /// the file is not a journal this build can read
    #[error("bad journal header: {problem}")]
    BadHeader {
        /// What is wrong.
        problem: HeaderProblem,
    },
    /// the journal belongs to another source than the one opening it
    #[error("the journal belongs to {found:?}, not {expected:?}")]
    SourceMismatch {
        /// The source that tried to open it.
        expected: String,
        /// The source named in the file.
        found: String,
    },
    /// the end of the journal holds an incomplete or damaged last record, as
    /// a crash during a write leaves it; `open_repairing` moves it aside
    #[error(
        "torn tail at offset {offset}: {problem}; {torn_bytes} bytes after record {last_seq} \
         (open_repairing moves them to a side file)"
    )]
    TornTail {
        /// Offset of the damaged record.
        offset: u64,
        /// Bytes from there to the end of the file.
        torn_bytes: u64,
        /// The last good record's sequence number (0: none).
        last_seq: u64,
        /// What is wrong with the damaged record.
        problem: RecordProblem,
    },
    /// a record before the end of the journal is damaged: the chain is broken
    /// and this is never repaired automatically
    #[error("journal corrupt at record {seq} (offset {offset}): {problem}")]
    Corrupt {
        /// Offset of the damaged record.
        offset: u64,
        /// The sequence number expected there.
        seq: u64,
        /// What is wrong.
        problem: RecordProblem,
    },
    /// an empty payload was appended
    #[error("an empty payload cannot be journaled")]
    PayloadEmpty,
    /// a payload larger than `MAX_RECORD_LEN` was appended
    #[error("payload of {len} bytes is larger than the {max} allowed", max = crate::MAX_RECORD_LEN)]
    PayloadTooLarge {
        /// Its length.
        len: usize,
    },
    /// writing or syncing the batch holding this record failed; nothing of
    /// the batch was acknowledged and the file was cut back to its last
    /// durable length, so a later append may succeed
    #[error("the journal write failed; the record was not recorded")]
    WriteFailed {
        /// The cause, shared by every record of the batch.
        #[source]
        source: Arc<io::Error>,
    },
    /// an earlier write failed and the file could not be cut back; the
    /// journal refuses everything until it is reopened
    #[error("the journal is poisoned by an earlier failure; reopen it")]
    Poisoned,
    /// the journal's writer has stopped
    #[error("the journal is closed")]
    Closed,
}

impl JournalError {
    /// The file offset the error names, if any.
    pub fn offset(&self) -> Option<u64> {
        match self {
            Self::TornTail { offset, .. } | Self::Corrupt { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    /// The sequence number of the record the error names, if any.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Self::TornTail { last_seq, .. } => Some(last_seq + 1),
            Self::Corrupt { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}
