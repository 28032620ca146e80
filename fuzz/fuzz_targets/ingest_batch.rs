//! Ingest batches as logd reads them from a source (`POST /v1/ingest`), the
//! log leaf decoder an auditor runs on every stored entry, and
//! `chain::check_batch`, which decides what of a batch enters the log.
//!
//! The first byte chooses the input. Odd: the rest is taken as it came,
//! both as an ingest body (JSON) and as a stored leaf. Even: the rest is
//! turned into a genuine journal (records chained with the real hashes),
//! of which the log already holds a prefix, and a batch of it that is
//! damaged as the input says, so the fuzzer spends its time past the
//! hash checks.
//!
//! Properties: nothing panics; a batch that parses serializes to JSON that
//! parses back to an equal batch; a leaf that decodes encodes to exactly
//! its bytes; of any batch, the log takes only records of the genuine
//! journal, each once, in order, continuing what it holds; an undamaged
//! batch that reaches the head is taken whole; every leaf taken encodes and
//! decodes back (save an empty payload, see below), and an auditor's replay
//! of the log's leaves agrees; sending the same batch again takes nothing
//! new and is answered the same.

#![no_main]

use libfuzzer_sys::arbitrary::{Arbitrary, Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use nitrile_audit::{FORMAT_VERSION, JournalId, genesis_hash, record_hash};
use nitrile_logclient::chain::{Checked, SourceChains, SourceState, check_batch};
use nitrile_logclient::leaf::{self, LeafError, LeafV1};
use nitrile_logclient::protocol::{IngestBatch, IngestEntry, JournalRef, MAX_INGEST_BODY};

const SOURCE: &str = "nitrile://cell-1/host/h1";
/// Records in a generated journal; enough for gaps, resends and forks,
/// few enough to stay fast.
const MAX_RECORDS: usize = 16;

/// How a generated batch is damaged.
#[derive(Debug)]
enum Damage {
    None,
    /// XOR `mask` into a payload byte of entry `at`.
    Payload {
        at: u8,
        byte: u8,
        mask: u8,
    },
    /// XOR `mask` into a hash byte of entry `at`.
    Hash {
        at: u8,
        byte: u8,
        mask: u8,
    },
    /// Leave out entry `at`.
    Drop {
        at: u8,
    },
    /// Swap entries `a` and `b`.
    Swap {
        a: u8,
        b: u8,
    },
    /// Send entry `at` twice.
    Repeat {
        at: u8,
    },
    /// Renumber entry `at`.
    Seq {
        at: u8,
        seq: u64,
    },
    /// Another genesis hash.
    Genesis {
        byte: u8,
        mask: u8,
    },
    /// Another journal id (with its own, correct genesis hash).
    Journal {
        id: [u8; 16],
    },
    /// Another source name (with its own, correct genesis hash).
    Source {
        name: String,
    },
}

impl<'a> Arbitrary<'a> for Damage {
    fn arbitrary(u: &mut Unstructured<'a>) -> ArbResult<Self> {
        Ok(match u.int_in_range(0..=9u8)? {
            0 => Self::None,
            1 => Self::Payload {
                at: u.arbitrary()?,
                byte: u.arbitrary()?,
                mask: u.arbitrary()?,
            },
            2 => Self::Hash {
                at: u.arbitrary()?,
                byte: u.arbitrary()?,
                mask: u.arbitrary()?,
            },
            3 => Self::Drop { at: u.arbitrary()? },
            4 => Self::Swap {
                a: u.arbitrary()?,
                b: u.arbitrary()?,
            },
            5 => Self::Repeat { at: u.arbitrary()? },
            6 => Self::Seq {
                at: u.arbitrary()?,
                seq: u.arbitrary()?,
            },
            7 => Self::Genesis {
                byte: u.arbitrary()?,
                mask: u.arbitrary()?,
            },
            8 => Self::Journal { id: u.arbitrary()? },
            _ => Self::Source {
                name: u.arbitrary()?,
            },
        })
    }
}

/// A genuine journal, how much of it the log holds, and the batch sent.
#[derive(Debug)]
struct Plan {
    journal_id: [u8; 16],
    payloads: Vec<Vec<u8>>,
    /// Records the log already holds (at most the journal's length).
    held: usize,
    /// The batch starts at this record (0-based, at most the length).
    from: usize,
    damage: Damage,
    head: Option<u64>,
}

impl<'a> Arbitrary<'a> for Plan {
    fn arbitrary(u: &mut Unstructured<'a>) -> ArbResult<Self> {
        let journal_id = u.arbitrary()?;
        let count = u.int_in_range(0..=MAX_RECORDS)?;
        let mut payloads = Vec::with_capacity(count);
        for _ in 0..count {
            let len = u.int_in_range(1..=64)?;
            payloads.push(u.bytes(len)?.to_vec());
        }
        Ok(Self {
            journal_id,
            held: u.int_in_range(0..=count)?,
            from: u.int_in_range(0..=count)?,
            damage: u.arbitrary()?,
            head: u.arbitrary()?,
            payloads,
        })
    }
}

fn entries(journal: &JournalRef, payloads: &[Vec<u8>]) -> Vec<IngestEntry> {
    let mut prev = journal.genesis;
    (1u64..)
        .zip(payloads)
        .map(|(seq, payload)| {
            let hash = record_hash(&prev, seq, payload);
            prev = hash;
            IngestEntry {
                seq,
                hash,
                payload: payload.clone(),
            }
        })
        .collect()
}

fn journal_ref(source: &str, id: JournalId) -> JournalRef {
    JournalRef {
        source: source.to_owned(),
        journal_id: id,
        genesis: genesis_hash(FORMAT_VERSION, &id, source.as_bytes()),
    }
}

/// The encoded leaves of `checked`, each decoding back to itself.
fn encoded(checked: &Checked) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for l in &checked.leaves {
        match leaf::encode(l) {
            Ok(bytes) => {
                assert_eq!(leaf::decode(&bytes).as_ref(), Ok(l), "a leaf changed");
                out.push(bytes);
            }
            // check_batch leaves a record's content to logd's content
            // check (`source::check_record`), which refuses an empty
            // payload (not an audit record) before the store encodes a
            // leaf; only that may fail to encode here.
            Err(e) => assert_eq!(e, LeafError::EmptyPayload, "a taken record is no leaf"),
        }
    }
    out
}

/// What holds of any check of any batch: the leaves continue `known`
/// consecutively and are the batch's own records, the state follows them,
/// and the same batch sent again takes nothing new.
fn check_any(known: Option<&SourceState>, batch: &IngestBatch) -> Checked {
    let checked = check_batch(known, batch);
    let start = known.map_or(0, |k| k.acked_seq);
    for (n, l) in (1u64..).zip(&checked.leaves) {
        assert_eq!(l.seq, start + n, "leaves are not consecutive");
        assert_eq!(l.source, batch.journal.source);
        assert_eq!(l.journal_id, batch.journal.journal_id);
        assert!(
            batch
                .entries
                .iter()
                .any(|e| e.seq == l.seq && e.hash == l.hash && e.payload == l.payload),
            "a leaf that is no record of the batch"
        );
    }
    match checked.leaves.last() {
        Some(last) => {
            assert_eq!(checked.state.acked_seq, last.seq);
            assert_eq!(checked.state.hash, last.hash);
        }
        None => assert_eq!(Some(&checked.state).filter(|_| known.is_some()), known),
    }
    assert!(
        checked.duplicates as usize + checked.leaves.len() <= batch.entries.len(),
        "more records counted than sent"
    );
    if checked.violation.is_none() {
        assert_eq!(
            checked.duplicates as usize + checked.leaves.len(),
            batch.entries.len(),
            "records neither taken nor refused"
        );
    }
    let again = check_batch(Some(&checked.state), batch);
    assert!(again.leaves.is_empty(), "a resent batch was taken twice");
    assert_eq!(again.violation, checked.violation);
    assert_eq!(again.state, checked.state);
    let _ = encoded(&checked);
    checked
}

fn raw(data: &[u8]) {
    if data.len() <= MAX_INGEST_BODY
        && let Ok(batch) = serde_json::from_slice::<IngestBatch>(data)
    {
        let json = serde_json::to_vec(&batch).expect("a parsed batch serializes");
        let again: IngestBatch = serde_json::from_slice(&json).expect("a serialized batch parses");
        assert_eq!(again, batch, "batch changed in a JSON round trip");
        check_any(None, &batch);
    }
    if let Ok(l) = leaf::decode(data) {
        assert_eq!(
            leaf::encode(&l).as_deref(),
            Ok(data),
            "a leaf re-encodes differently"
        );
    }
    let mut chains = SourceChains::new();
    if chains.push(data).is_ok() {
        let l = leaf::decode(data).expect("a replayed entry is a leaf");
        assert_eq!(l.seq, 1, "a journal's replay starts at record 1");
        let genesis = genesis_hash(FORMAT_VERSION, &l.journal_id, l.source.as_bytes());
        assert_eq!(l.hash, record_hash(&genesis, 1, &l.payload));
        assert_eq!((chains.sources(), chains.records()), (1, 1));
    }
}

fn generated(plan: &Plan) {
    let journal = journal_ref(SOURCE, JournalId(plan.journal_id));
    let genuine = entries(&journal, &plan.payloads);

    // What the log holds: the first `held` records, taken whole.
    let mut log: Vec<LeafV1> = Vec::new();
    let known = if plan.held == 0 {
        None
    } else {
        let first = IngestBatch {
            journal: journal.clone(),
            entries: genuine[..plan.held].to_vec(),
            head: None,
        };
        let c = check_batch(None, &first);
        assert_eq!(c.violation, None, "a genuine journal was refused");
        assert_eq!(c.leaves.len(), plan.held);
        log.extend(c.leaves);
        Some(c.state)
    };

    let mut batch = IngestBatch {
        journal: journal.clone(),
        entries: genuine[plan.from..].to_vec(),
        head: plan.head,
    };
    let n = batch.entries.len();
    let pick = |at: u8| usize::from(at) % n;
    match &plan.damage {
        Damage::None => {}
        Damage::Payload { at, byte, mask } if n > 0 => {
            let p = &mut batch.entries[pick(*at)].payload;
            let i = usize::from(*byte) % p.len();
            p[i] ^= (*mask).max(1);
        }
        Damage::Hash { at, byte, mask } if n > 0 => {
            batch.entries[pick(*at)].hash.0[usize::from(*byte) % 32] ^= (*mask).max(1);
        }
        Damage::Drop { at } if n > 0 => {
            batch.entries.remove(pick(*at));
        }
        Damage::Swap { a, b } if n > 0 => batch.entries.swap(pick(*a), pick(*b)),
        Damage::Repeat { at } if n > 0 => {
            let e = batch.entries[pick(*at)].clone();
            batch.entries.insert(pick(*at), e);
        }
        Damage::Seq { at, seq } if n > 0 => batch.entries[pick(*at)].seq = *seq,
        Damage::Genesis { byte, mask } => {
            batch.journal.genesis.0[usize::from(*byte) % 32] ^= (*mask).max(1);
        }
        Damage::Journal { id } => batch.journal = journal_ref(SOURCE, JournalId(*id)),
        Damage::Source { name } => batch.journal = journal_ref(name, journal.journal_id),
        _ => {}
    }

    // The batch travels as JSON.
    let json = serde_json::to_vec(&batch).expect("a batch serializes");
    let parsed: IngestBatch = serde_json::from_slice(&json).expect("a serialized batch parses");
    assert_eq!(parsed, batch, "batch changed in a JSON round trip");

    let checked = check_any(known.as_ref(), &batch);
    // Only records of the genuine journal enter the log, whatever was sent.
    for l in &checked.leaves {
        let g = &genuine[(l.seq - 1) as usize];
        assert_eq!(
            (l.source.as_str(), l.journal_id, l.hash, &l.payload),
            (SOURCE, journal.journal_id, g.hash, &g.payload),
            "a record that is not the journal's own was taken"
        );
    }
    if matches!(plan.damage, Damage::None) {
        if batch.entries.is_empty() {
            assert_eq!(checked.violation, None, "an empty batch was refused");
            assert!(checked.leaves.is_empty());
        } else if plan.from <= plan.held {
            assert_eq!(checked.violation, None, "a genuine batch was refused");
            assert_eq!(checked.leaves.len(), genuine.len() - plan.held);
            assert_eq!(checked.duplicates as usize, plan.held - plan.from);
        } else {
            assert!(checked.violation.is_some(), "a gap went unnoticed");
            assert!(checked.leaves.is_empty());
        }
    }

    // An auditor replaying the log's leaves finds one unbroken journal.
    log.extend(checked.leaves.iter().cloned());
    let mut chains = SourceChains::new();
    for l in &log {
        let bytes = leaf::encode(l).expect("a genuine record is a leaf");
        chains.push(&bytes).expect("the log replays");
    }
    assert_eq!(chains.records(), log.len() as u64);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        raw(rest);
    } else if let Ok(plan) = Plan::arbitrary_take_rest(Unstructured::new(rest)) {
        generated(&plan);
    }
});
