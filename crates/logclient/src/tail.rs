//! Following a growing journal file from a verified position, read-only:
//! what a shipper sends, and what logd reads of its own journal.
//!
//! A tail never writes to the journal. It moves only to a record whose
//! chain hash is the one asked for ([`JournalTail::seek_to`]), and reads on
//! from there with every record's chain checked by
//! [`nitrile_audit::JournalReader`]; a record being written (a torn tail)
//! ends a batch instead of failing it.

use std::path::{Path, PathBuf};

use nitrile_audit::{ChainHash, JournalEntry, JournalError, JournalHeader, JournalReader};

/// Where a tail stands: after record `seq` with chain hash `hash`, the next
/// record starting at byte `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    seq: u64,
    hash: ChainHash,
    end: u64,
}

/// Why a journal could not be followed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TailError {
    /// the journal could not be read, or its chain is broken
    #[error("journal")]
    Journal(#[from] JournalError),
    /// the journal holds fewer records than the position asked for
    #[error("the journal has {have} records; the log already holds {want}")]
    Shorter {
        /// Records in the journal.
        have: u64,
        /// The position asked for.
        want: u64,
    },
    /// the journal's record at the position differs from the log's
    #[error("the journal's record {seq} is not the one the log holds")]
    Diverged {
        /// The record.
        seq: u64,
    },
}

/// A reader of one journal file that never writes to it.
#[derive(Debug)]
pub struct JournalTail {
    path: PathBuf,
    header: JournalHeader,
    cursor: Cursor,
}

impl JournalTail {
    /// Opens the journal at `path` at its start.
    pub fn open(path: &Path) -> Result<Self, TailError> {
        let reader = JournalReader::open(path)?;
        let header = reader.header().clone();
        Ok(Self {
            path: path.to_owned(),
            cursor: Cursor {
                seq: 0,
                hash: header.genesis,
                end: header.encoded_len(),
            },
            header,
        })
    }

    /// The journal's header (its source, id and genesis hash).
    pub fn header(&self) -> &JournalHeader {
        &self.header
    }

    /// Moves to just after record `seq`, which must have chain hash `hash`
    /// (`seq` 0: the start). Reads from the start unless already there.
    pub fn seek_to(&mut self, seq: u64, hash: ChainHash) -> Result<(), TailError> {
        if self.cursor.seq == seq {
            return if self.cursor.hash == hash {
                Ok(())
            } else {
                Err(TailError::Diverged { seq })
            };
        }
        if seq == 0 {
            if hash != self.header.genesis {
                return Err(TailError::Diverged { seq });
            }
            self.cursor = Cursor {
                seq: 0,
                hash,
                end: self.header.encoded_len(),
            };
            return Ok(());
        }
        let (start, from) = if self.cursor.seq < seq {
            (self.cursor, true)
        } else {
            (self.cursor, false)
        };
        let reader = if from {
            JournalReader::resume(&self.path, start.seq, start.hash, start.end)?
        } else {
            JournalReader::open(&self.path)?
        };
        let mut have = if from { start.seq } else { 0 };
        for entry in reader {
            let entry = match entry {
                Ok(e) => e,
                // A record being written right now: not there yet.
                Err(JournalError::TornTail { .. }) => break,
                Err(e) => return Err(e.into()),
            };
            have = entry.seq;
            if entry.seq == seq {
                if entry.hash != hash {
                    return Err(TailError::Diverged { seq });
                }
                self.cursor = Cursor {
                    seq,
                    hash,
                    end: entry.end(),
                };
                return Ok(());
            }
        }
        Err(TailError::Shorter { have, want: seq })
    }

    /// The records after the cursor, at most `max_entries` of them and as
    /// many as fit in `max_payload_bytes` (at least one), and moves past
    /// them. A record being written (a torn tail) ends the batch.
    pub fn next_batch(
        &mut self,
        max_entries: usize,
        max_payload_bytes: usize,
    ) -> Result<Vec<JournalEntry>, TailError> {
        let c = self.cursor;
        let reader = JournalReader::resume(&self.path, c.seq, c.hash, c.end)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in reader {
            let entry = match entry {
                Ok(e) => e,
                Err(JournalError::TornTail { .. }) => break,
                Err(e) => return Err(e.into()),
            };
            let cost = entry.payload.len();
            if !out.is_empty() && (out.len() >= max_entries || bytes + cost > max_payload_bytes) {
                break;
            }
            bytes += cost;
            self.cursor = Cursor {
                seq: entry.seq,
                hash: entry.hash,
                end: entry.end(),
            };
            out.push(entry);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nitrile_audit::Journal;

    #[test]
    fn follows_a_growing_journal_and_resumes_at_a_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let j = Journal::open(&path, "nitrile://local/host/h1").unwrap();
        let mut receipts = Vec::new();
        for i in 0..10 {
            receipts.push(j.append(format!("record {i}").as_bytes()).unwrap());
        }
        let mut t = JournalTail::open(&path).unwrap();
        let a = t.next_batch(4, usize::MAX).unwrap();
        assert_eq!(
            a.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        let b = t.next_batch(100, 20).unwrap();
        assert_eq!(b.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 6]);
        let rest = t.next_batch(100, usize::MAX).unwrap();
        assert_eq!(rest.len(), 4);
        assert!(t.next_batch(100, usize::MAX).unwrap().is_empty());
        j.append(b"later").unwrap();
        let later = t.next_batch(100, usize::MAX).unwrap();
        assert_eq!(later[0].seq, 11);

        let mut u = JournalTail::open(&path).unwrap();
        u.seek_to(receipts[6].seq, receipts[6].hash).unwrap();
        assert_eq!(u.next_batch(1, usize::MAX).unwrap()[0].seq, 8);
        // Backwards too.
        u.seek_to(receipts[1].seq, receipts[1].hash).unwrap();
        assert_eq!(u.next_batch(1, usize::MAX).unwrap()[0].seq, 3);
        assert!(matches!(
            u.seek_to(3, receipts[6].hash),
            Err(TailError::Diverged { seq: 3 })
        ));
        assert!(matches!(
            u.seek_to(50, receipts[6].hash),
            Err(TailError::Shorter { have: 11, want: 50 })
        ));
    }
}
