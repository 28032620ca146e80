//! Checking a shipped batch against what the log already holds of its
//! source: the pure core of ingestion (no I/O).
//!
//! A batch is accepted in order: records the log already holds are
//! duplicates (answered idempotently once the chain shows they are the same
//! records), the next ones must continue the source's hash chain exactly,
//! each hash recomputed here from the previous one
//! ([`nitrile_audit::record_hash`]). The first record that does not is an
//! [`IntegrityViolation`]; the records before it are still accepted, so the
//! log keeps every record it can prove, and nothing after it is.

use nitrile_audit::{ChainHash, FORMAT_VERSION, JournalId, genesis_hash, record_hash};
use serde::{Deserialize, Serialize};

use crate::leaf::{self, LeafV1};
use crate::protocol::IngestBatch;

/// What the log holds of one source's journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceState {
    /// The id of the journal the source ships.
    #[serde(with = "crate::protocol::journal_id_hex")]
    pub journal_id: JournalId,
    /// That journal's genesis hash.
    pub genesis: ChainHash,
    /// The last record in the log (0: none yet).
    pub acked_seq: u64,
    /// Its chain hash (the genesis hash when `acked_seq` is 0).
    pub hash: ChainHash,
    /// The log index of that record, when the log holds one (absent in
    /// states saved before it was kept; learnt again from the next record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_index: Option<u64>,
}

impl SourceState {
    /// The state of a journal of which the log holds nothing yet.
    pub fn empty(journal_id: JournalId, genesis: ChainHash) -> Self {
        Self {
            journal_id,
            genesis,
            acked_seq: 0,
            hash: genesis,
            acked_index: None,
        }
    }

    /// The state once `leaf` (the next record) is in the log, at `index`
    /// when that is known.
    pub fn advanced(self, leaf: &LeafV1, index: Option<u64>) -> Self {
        Self {
            acked_seq: leaf.seq,
            hash: leaf.hash,
            acked_index: index,
            ..self
        }
    }
}

/// A batch that does not continue what the log holds of its source. Each
/// one is an integrity alert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
#[non_exhaustive]
pub enum IntegrityViolation {
    /// records are missing: the batch goes on after a record the log never got
    #[error("gap: the log holds records up to {acked_seq}, the batch continues at {got}")]
    Gap {
        /// The last record the log holds.
        acked_seq: u64,
        /// The sequence number that came instead of `acked_seq + 1`.
        got: u64,
    },
    /// a record's hash is not the chain hash of its predecessor, its number
    /// and its payload, or a resent record differs from the one the log holds
    #[error("chain break at record {seq}: the hash does not continue the chain")]
    HashMismatch {
        /// The record.
        seq: u64,
    },
    /// the source ships a journal other than the one the log holds records of
    #[error("the source shipped journal {got}, the log holds journal {known}")]
    JournalReplaced {
        /// The journal the log holds.
        #[serde(serialize_with = "display")]
        known: JournalId,
        /// The journal shipped now.
        #[serde(serialize_with = "display")]
        got: JournalId,
    },
    /// the batch's genesis hash is not the one of its journal header
    #[error("the genesis hash does not match the journal's id and source")]
    BadGenesis,
    /// a record is too large to be a log leaf
    #[error("record {seq} would be a leaf of {len} bytes, more than a leaf may hold")]
    LeafTooLarge {
        /// The record.
        seq: u64,
        /// The leaf's length.
        len: usize,
    },
    /// the batch's source is not a journal source name
    #[error("the batch's source is not a valid journal source name")]
    BadSource,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl IntegrityViolation {
    /// A short stable name of the problem (`gap`, `hash_mismatch`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Gap { .. } => "gap",
            Self::HashMismatch { .. } => "hash_mismatch",
            Self::JournalReplaced { .. } => "journal_replaced",
            Self::BadGenesis => "bad_genesis",
            Self::LeafTooLarge { .. } => "leaf_too_large",
            Self::BadSource => "bad_source",
        }
    }
}

/// The outcome of checking a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The records to append to the log, in order (possibly none).
    pub leaves: Vec<LeafV1>,
    /// What the log holds of the source once they are appended.
    pub state: SourceState,
    /// How many records of the batch the log already held.
    pub duplicates: u64,
    /// Why the rest of the batch was refused, if it was.
    pub violation: Option<IntegrityViolation>,
}

/// Checks `batch` against `known`, what the log holds of its source (`None`:
/// nothing yet). Pure: the caller appends [`Checked::leaves`], makes them
/// durable, then stores [`Checked::state`].
pub fn check_batch(known: Option<&SourceState>, batch: &IngestBatch) -> Checked {
    let j = &batch.journal;
    let expected_genesis = genesis_hash(FORMAT_VERSION, &j.journal_id, j.source.as_bytes());
    let refuse = |state: SourceState, v| Checked {
        leaves: Vec::new(),
        state,
        duplicates: 0,
        violation: Some(v),
    };
    let placeholder = SourceState::empty(j.journal_id, expected_genesis);
    if j.source.is_empty()
        || j.source.len() > nitrile_audit::MAX_SOURCE_LEN
        || !j.source.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        return refuse(
            known.copied().unwrap_or(placeholder),
            IntegrityViolation::BadSource,
        );
    }
    let state = match known {
        Some(k) if k.journal_id != j.journal_id => {
            return refuse(
                *k,
                IntegrityViolation::JournalReplaced {
                    known: k.journal_id,
                    got: j.journal_id,
                },
            );
        }
        Some(k) => *k,
        None => placeholder,
    };
    if j.genesis != expected_genesis || state.genesis != expected_genesis {
        return refuse(state, IntegrityViolation::BadGenesis);
    }

    let mut out = Checked {
        leaves: Vec::new(),
        state,
        duplicates: 0,
        violation: None,
    };
    // Duplicates: records at or below the acknowledged head. They are only
    // known to be the same records when the batch's own chain leads to the
    // acknowledged hash; a differing record there is a chain break.
    let mut prev: Option<(u64, ChainHash)> = None;
    for e in &batch.entries {
        if let Some((pseq, phash)) = prev {
            if e.seq != pseq + 1 {
                out.violation = Some(if e.seq > pseq + 1 {
                    IntegrityViolation::Gap {
                        acked_seq: out.state.acked_seq,
                        got: e.seq,
                    }
                } else {
                    IntegrityViolation::HashMismatch { seq: e.seq }
                });
                return out;
            }
            if record_hash(&phash, e.seq, &e.payload) != e.hash {
                out.violation = Some(IntegrityViolation::HashMismatch { seq: e.seq });
                return out;
            }
        }
        if e.seq <= out.state.acked_seq {
            if e.seq == 0 {
                out.violation = Some(IntegrityViolation::HashMismatch { seq: 0 });
                return out;
            }
            if e.seq == out.state.acked_seq && e.hash != out.state.hash {
                out.violation = Some(IntegrityViolation::HashMismatch { seq: e.seq });
                return out;
            }
            out.duplicates += 1;
            prev = Some((e.seq, e.hash));
            continue;
        }
        if e.seq != out.state.acked_seq + 1 {
            out.violation = Some(IntegrityViolation::Gap {
                acked_seq: out.state.acked_seq,
                got: e.seq,
            });
            return out;
        }
        if record_hash(&out.state.hash, e.seq, &e.payload) != e.hash {
            out.violation = Some(IntegrityViolation::HashMismatch { seq: e.seq });
            return out;
        }
        let leaf = LeafV1 {
            source: j.source.clone(),
            journal_id: j.journal_id,
            seq: e.seq,
            hash: e.hash,
            payload: e.payload.clone(),
        };
        if leaf.encoded_len() > leaf::MAX_LEAF_LEN {
            out.violation = Some(IntegrityViolation::LeafTooLarge {
                seq: e.seq,
                len: leaf.encoded_len(),
            });
            return out;
        }
        out.state = out.state.advanced(&leaf, None);
        out.leaves.push(leaf);
        prev = Some((e.seq, e.hash));
    }
    out
}

/// A log entry that breaks its source's journal as the log holds it: what
/// an auditor finds when a log was appended to out of order (say, by a
/// logd whose record of the sources was rolled back, taking a forged
/// continuation of a journal after the real one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SourceChainBreak {
    /// the entry is not a log leaf
    #[error("not a log leaf")]
    NotALeaf,
    /// a second journal of one source (logd refuses a replaced journal)
    #[error(
        "a second journal {got} of {source_name}, which already has journal {known} in the log"
    )]
    AnotherJournal {
        /// The source.
        source_name: String,
        /// Its journal earlier in the log.
        #[serde(serialize_with = "display")]
        known: JournalId,
        /// The journal of this entry.
        #[serde(serialize_with = "display")]
        got: JournalId,
    },
    /// the record is not the next one of its journal
    #[error("record {got} of {source_name} where record {expected} comes next")]
    OutOfOrder {
        /// The source.
        source_name: String,
        /// The record that should come next.
        expected: u64,
        /// The record found.
        got: u64,
    },
    /// the chain hash is not the hash of the previous one, the number and
    /// the payload
    #[error("record {seq} of {source_name} does not continue its journal's hash chain")]
    HashMismatch {
        /// The source.
        source_name: String,
        /// The record.
        seq: u64,
    },
}

/// Replays every source's journal through the log, entry by entry, as an
/// auditor checks it: each source has one journal, its records appear once
/// each, in order from 1, and every chain hash is recomputed from the
/// genesis hash. A log that logd appended honestly passes; records
/// duplicated, reordered, forged or of a second journal do not.
#[derive(Debug, Default)]
pub struct SourceChains {
    sources: std::collections::HashMap<String, SourceState>,
    records: u64,
}

impl SourceChains {
    /// Nothing replayed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replays the leaf `entry` (as stored).
    pub fn push(&mut self, entry: &[u8]) -> Result<(), SourceChainBreak> {
        let leaf = leaf::decode(entry).map_err(|_| SourceChainBreak::NotALeaf)?;
        let state = match self.sources.get(&leaf.source) {
            Some(s) if s.journal_id != leaf.journal_id => {
                return Err(SourceChainBreak::AnotherJournal {
                    source_name: leaf.source.clone(),
                    known: s.journal_id,
                    got: leaf.journal_id,
                });
            }
            Some(s) => *s,
            None => SourceState::empty(
                leaf.journal_id,
                genesis_hash(FORMAT_VERSION, &leaf.journal_id, leaf.source.as_bytes()),
            ),
        };
        if leaf.seq != state.acked_seq + 1 {
            return Err(SourceChainBreak::OutOfOrder {
                source_name: leaf.source.clone(),
                expected: state.acked_seq + 1,
                got: leaf.seq,
            });
        }
        if record_hash(&state.hash, leaf.seq, &leaf.payload) != leaf.hash {
            return Err(SourceChainBreak::HashMismatch {
                source_name: leaf.source.clone(),
                seq: leaf.seq,
            });
        }
        let next = state.advanced(&leaf, None);
        self.sources.insert(leaf.source, next);
        self.records += 1;
        Ok(())
    }

    /// How many sources' journals were replayed.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// How many records were replayed.
    pub fn records(&self) -> u64 {
        self.records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{IngestEntry, JournalRef};
    use proptest::prelude::*;

    const SOURCE: &str = "nitrile://local/host/h1";

    /// A journal's first `n` records, as a journal writes them.
    fn journal(id: JournalId, n: u64) -> (JournalRef, Vec<IngestEntry>) {
        let genesis = genesis_hash(FORMAT_VERSION, &id, SOURCE.as_bytes());
        let mut prev = genesis;
        let entries = (1..=n)
            .map(|seq| {
                let payload = format!(r#"{{"n":{seq}}}"#).into_bytes();
                let hash = record_hash(&prev, seq, &payload);
                prev = hash;
                IngestEntry { seq, hash, payload }
            })
            .collect();
        (
            JournalRef {
                source: SOURCE.into(),
                journal_id: id,
                genesis,
            },
            entries,
        )
    }

    fn batch(j: &JournalRef, e: &[IngestEntry]) -> IngestBatch {
        IngestBatch {
            journal: j.clone(),
            entries: e.to_vec(),
            head: None,
        }
    }

    fn leaf_bytes(j: &JournalRef, e: &IngestEntry) -> Vec<u8> {
        leaf::encode(&LeafV1 {
            source: j.source.clone(),
            journal_id: j.journal_id,
            seq: e.seq,
            hash: e.hash,
            payload: e.payload.clone(),
        })
        .unwrap()
    }

    #[test]
    fn an_auditor_replays_each_journal_through_the_log() {
        let (j, e) = journal(JournalId([1; 16]), 5);
        let mut ok = SourceChains::new();
        for x in &e {
            ok.push(&leaf_bytes(&j, x)).unwrap();
        }
        assert_eq!((ok.sources(), ok.records()), (1, 5));
        // A record logged twice (a rolled-back head took it again).
        assert!(matches!(
            ok.push(&leaf_bytes(&j, &e[3])),
            Err(SourceChainBreak::OutOfOrder {
                expected: 6,
                got: 4,
                ..
            })
        ));
        // A forged continuation with its own hashes.
        let mut forged = e[2].clone();
        forged.payload = b"{}".to_vec();
        let mut c = SourceChains::new();
        c.push(&leaf_bytes(&j, &e[0])).unwrap();
        c.push(&leaf_bytes(&j, &e[1])).unwrap();
        assert!(matches!(
            c.push(&leaf_bytes(&j, &forged)),
            Err(SourceChainBreak::HashMismatch { seq: 3, .. })
        ));
        // A second journal of the same source.
        let (j2, e2) = journal(JournalId([2; 16]), 1);
        assert!(matches!(
            ok.push(&leaf_bytes(&j2, &e2[0])),
            Err(SourceChainBreak::AnotherJournal { .. })
        ));
        assert_eq!(ok.push(b"junk"), Err(SourceChainBreak::NotALeaf));
    }

    #[test]
    fn a_journal_is_accepted_in_pieces_and_resends_are_duplicates() {
        let (j, e) = journal(JournalId([1; 16]), 10);
        let first = check_batch(None, &batch(&j, &e[..4]));
        assert_eq!(first.violation, None);
        assert_eq!(first.leaves.len(), 4);
        assert_eq!(first.state.acked_seq, 4);
        assert_eq!(first.state.hash, e[3].hash);
        let again = check_batch(Some(&first.state), &batch(&j, &e[..6]));
        assert_eq!(again.violation, None);
        assert_eq!(again.duplicates, 4);
        assert_eq!(
            again.leaves.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![5, 6]
        );
        let stale = check_batch(Some(&again.state), &batch(&j, &e[1..3]));
        assert_eq!(stale.violation, None);
        assert!(stale.leaves.is_empty());
        assert_eq!(stale.state, again.state);
    }

    #[test]
    fn a_withheld_record_is_a_gap_and_nothing_after_it_is_taken() {
        let (j, e) = journal(JournalId([1; 16]), 10);
        let first = check_batch(None, &batch(&j, &e[..4]));
        // Record 5 withheld: 6.. shipped.
        let gap = check_batch(Some(&first.state), &batch(&j, &e[5..]));
        assert_eq!(
            gap.violation,
            Some(IntegrityViolation::Gap {
                acked_seq: 4,
                got: 6
            })
        );
        assert!(gap.leaves.is_empty());
        assert_eq!(gap.state, first.state);
        // Inside a batch too.
        let mut holes = e[4..].to_vec();
        holes.remove(2);
        let inner = check_batch(Some(&first.state), &batch(&j, &holes));
        assert_eq!(inner.leaves.len(), 2);
        assert!(matches!(
            inner.violation,
            Some(IntegrityViolation::Gap { got: 8, .. })
        ));
        // A new source must start at 1.
        let late = check_batch(None, &batch(&j, &e[1..]));
        assert!(matches!(
            late.violation,
            Some(IntegrityViolation::Gap {
                acked_seq: 0,
                got: 2
            })
        ));
    }

    #[test]
    fn forged_hashes_payloads_and_journals_are_refused() {
        let (j, e) = journal(JournalId([1; 16]), 6);
        let first = check_batch(None, &batch(&j, &e[..3]));
        let mut forged = e[3..].to_vec();
        forged[1].payload = b"{\"n\":0}".to_vec();
        let c = check_batch(Some(&first.state), &batch(&j, &forged));
        assert_eq!(c.leaves.len(), 1);
        assert_eq!(
            c.violation,
            Some(IntegrityViolation::HashMismatch { seq: 5 })
        );

        let mut rehashed = e[3..].to_vec();
        rehashed[0].hash = ChainHash([0; 32]);
        let c = check_batch(Some(&first.state), &batch(&j, &rehashed));
        assert!(c.leaves.is_empty());
        assert_eq!(
            c.violation,
            Some(IntegrityViolation::HashMismatch { seq: 4 })
        );

        // A different record 3 (a fork) resent as a duplicate.
        let (_, other) = journal(JournalId([2; 16]), 3);
        let c = check_batch(Some(&first.state), &batch(&j, &other[2..3]));
        assert_eq!(
            c.violation,
            Some(IntegrityViolation::HashMismatch { seq: 3 })
        );

        let (j2, e2) = journal(JournalId([2; 16]), 3);
        let c = check_batch(Some(&first.state), &batch(&j2, &e2));
        assert!(matches!(
            c.violation,
            Some(IntegrityViolation::JournalReplaced { .. })
        ));
        assert_eq!(c.state, first.state);

        let mut bad_genesis = j.clone();
        bad_genesis.genesis = ChainHash([5; 32]);
        let c = check_batch(None, &batch(&bad_genesis, &e));
        assert_eq!(c.violation, Some(IntegrityViolation::BadGenesis));
        let mut other_source = j.clone();
        other_source.source = "nitrile://local/host/h2".into();
        let c = check_batch(None, &batch(&other_source, &e));
        assert_eq!(c.violation, Some(IntegrityViolation::BadGenesis));
    }

    #[test]
    fn a_record_too_large_for_a_leaf_is_refused() {
        let id = JournalId([1; 16]);
        let (j, _) = journal(id, 0);
        let payload = vec![b'x'; nitrile_audit::MAX_RECORD_LEN];
        let hash = record_hash(&j.genesis, 1, &payload);
        let c = check_batch(
            None,
            &batch(
                &j,
                &[IngestEntry {
                    seq: 1,
                    hash,
                    payload,
                }],
            ),
        );
        assert!(matches!(
            c.violation,
            Some(IntegrityViolation::LeafTooLarge { seq: 1, .. })
        ));
        assert!(c.leaves.is_empty());
    }

    proptest! {
        /// However a journal is cut into batches, resent or reordered, the
        /// log gets each record exactly once, in order, and every accepted
        /// leaf is the journal's own record.
        #[test]
        fn any_shipping_schedule_logs_each_record_once(
            cuts in proptest::collection::vec((0usize..30, 0usize..30), 1..40),
        ) {
            let (j, e) = journal(JournalId([3; 16]), 30);
            let mut state: Option<SourceState> = None;
            let mut logged = Vec::new();
            for (a, b) in cuts {
                let (a, b) = (a.min(b), a.max(b));
                let c = check_batch(state.as_ref(), &batch(&j, &e[a..b]));
                for l in &c.leaves {
                    let orig = &e[(l.seq - 1) as usize];
                    prop_assert_eq!(&l.payload, &orig.payload);
                    prop_assert_eq!(l.hash, orig.hash);
                }
                logged.extend(c.leaves.iter().map(|l| l.seq));
                let acked = state.map_or(0, |s| s.acked_seq);
                if c.violation.is_some() {
                    // Only a batch that starts past the head is refused.
                    prop_assert!(a as u64 > acked);
                }
                state = Some(c.state);
            }
            let expect: Vec<u64> = (1..=logged.len() as u64).collect();
            prop_assert_eq!(logged, expect);
        }

        /// A single flipped byte in a payload or hash of a shipped batch is
        /// never logged.
        #[test]
        fn tampering_is_never_logged(idx in 0usize..8, byte in 0usize..40, flip in 1u8..) {
            let (j, mut e) = journal(JournalId([4; 16]), 8);
            let orig = e.clone();
            let p = &mut e[idx];
            if byte < 32 {
                p.hash.0[byte] ^= flip;
            } else {
                let i = byte % p.payload.len();
                p.payload[i] ^= flip;
            }
            let c = check_batch(None, &batch(&j, &e));
            prop_assert!(c.violation.is_some());
            for l in &c.leaves {
                let o = &orig[(l.seq - 1) as usize];
                prop_assert_eq!(&l.payload, &o.payload);
                prop_assert_eq!(l.hash, o.hash);
            }
            prop_assert!(c.leaves.len() <= idx);
        }
    }
}
