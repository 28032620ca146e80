//! The reading side: iterate a journal's records with chain verification.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;

use serde::Serialize;

use crate::error::JournalError;
use crate::format::{ChainHash, JournalHeader, JournalId, RawRecord, Scanner};
use crate::record::{AuditRecord, RecordError};

/// One verified record of a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// Its sequence number.
    pub seq: u64,
    /// Its byte offset in the file.
    pub offset: u64,
    /// Its chain hash.
    pub hash: ChainHash,
    /// The payload bytes as written.
    pub payload: Vec<u8>,
}

impl JournalEntry {
    /// The byte offset just past this record (where the next one starts).
    pub fn end(&self) -> u64 {
        self.offset + crate::format::RECORD_OVERHEAD as u64 + self.payload.len() as u64
    }

    /// Decodes the payload as an [`AuditRecord`].
    pub fn record(&self) -> Result<AuditRecord, RecordError> {
        AuditRecord::decode(&self.payload)
    }
}

impl From<RawRecord> for JournalEntry {
    fn from(r: RawRecord) -> Self {
        Self {
            seq: r.seq,
            offset: r.offset,
            hash: r.hash,
            payload: r.payload,
        }
    }
}

/// Reads a journal from the start, verifying the header, the framing, the
/// sequence and the hash chain as it goes. It reads the file as long as it
/// was when opened; a journal being appended to can be read meanwhile.
///
/// The iterator yields every good record, then at most one error (the first
/// problem found), then ends.
#[derive(Debug)]
pub struct JournalReader {
    header: JournalHeader,
    scanner: Scanner<BufReader<File>>,
}

impl JournalReader {
    /// Opens the journal at `path` and verifies its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, JournalError> {
        let file = File::open(path.as_ref()).map_err(|source| JournalError::Io {
            op: "opening",
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| JournalError::Io {
                op: "reading",
                source,
            })?
            .len();
        let mut r = BufReader::new(file);
        let header = JournalHeader::read(&mut r, len)?;
        let scanner = Scanner::new(r, header.encoded_len(), len, header.genesis);
        Ok(Self { header, scanner })
    }

    /// Opens the journal at `path`, verifies its header and reads on after
    /// record `seq`, whose chain hash is `hash` and which ends at byte
    /// `end` (the end of the header when `seq` is 0): the next record must
    /// be `seq + 1` and chain to `hash`. For readers that follow a growing
    /// journal ([`JournalEntry::end`] of the last record read); the records
    /// up to `seq` are not read again, so they must have been verified
    /// before.
    pub fn resume(
        path: impl AsRef<Path>,
        seq: u64,
        hash: ChainHash,
        end: u64,
    ) -> Result<Self, JournalError> {
        let file = File::open(path.as_ref()).map_err(|source| JournalError::Io {
            op: "opening",
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| JournalError::Io {
                op: "reading",
                source,
            })?
            .len();
        let mut r = BufReader::new(file);
        let header = JournalHeader::read(&mut r, len)?;
        let start = if seq == 0 {
            header.encoded_len()
        } else {
            end.max(header.encoded_len())
        };
        r.seek(SeekFrom::Start(start))
            .map_err(|source| JournalError::Io {
                op: "reading",
                source,
            })?;
        let (seq, hash) = if seq == 0 {
            (0, header.genesis)
        } else {
            (seq, hash)
        };
        let scanner = Scanner::resume(r, start, len.max(start), seq, hash);
        Ok(Self { header, scanner })
    }

    /// The journal's header.
    pub fn header(&self) -> &JournalHeader {
        &self.header
    }
}

impl Iterator for JournalReader {
    type Item = Result<JournalEntry, JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.scanner.next().map(|r| r.map(JournalEntry::from))
    }
}

/// A journal whose whole chain verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Who writes the journal.
    pub source: String,
    /// The journal's id.
    pub journal_id: JournalId,
    /// Number of records.
    pub records: u64,
    /// Sequence number of the last record (0: none).
    pub last_seq: u64,
    /// Hash of the last record, or the genesis hash of an empty journal.
    pub head_hash: ChainHash,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// Verifies the whole journal at `path`: header, framing, contiguous
/// sequence numbers from 1 and the hash chain. An error names the offset and
/// sequence number where the journal breaks. Payloads are not decoded.
pub fn verify_journal(path: impl AsRef<Path>) -> Result<VerifyReport, JournalError> {
    let mut reader = JournalReader::open(path)?;
    let mut records = 0;
    for entry in reader.by_ref() {
        entry?;
        records += 1;
    }
    let head = reader.scanner.head();
    Ok(VerifyReport {
        source: reader.header.source.clone(),
        journal_id: reader.header.journal_id,
        records,
        last_seq: head.seq,
        head_hash: head.hash,
        bytes: head.end,
    })
}
