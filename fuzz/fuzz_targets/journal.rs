//! Journal files as a host reopens its own journal after a crash, and as an
//! auditor or the log service verifies one it was handed.
//!
//! The journal API reads files, so each input is written to a file in a
//! fresh temporary directory. The first byte chooses the file: odd, the rest
//! of the input is the file as it is; even, the rest is turned into a
//! well-formed journal (a valid header, records framed and chained with the
//! real hashes) and then damaged as the input says, so the fuzzer spends
//! its time past the hash checks.
//!
//! Properties: nothing panics; `verify_journal` and `JournalReader` agree;
//! an undamaged journal verifies with every record intact; a journal that
//! verifies also opens for appending at the same head; and after
//! `open_repairing` succeeds, the file verifies.

#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::arbitrary::{Arbitrary, Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use nitrile_audit::{
    ChainHash, FORMAT_VERSION, JournalId, JournalOptions, JournalReader, MAGIC, genesis_hash,
    record_hash, verify_journal,
};

const SOURCE: &str = "nitrile://cell-1/host/h1";
/// Records in a generated journal; enough to exercise torn-tail
/// classification, few enough to stay fast.
const MAX_RECORDS: usize = 16;

/// A generated journal and how to damage it.
#[derive(Debug)]
struct Plan {
    journal_id: [u8; 16],
    payloads: Vec<Vec<u8>>,
    /// XOR `mask` into the byte at `offset` (modulo the length).
    flip: Option<(u32, u8)>,
    /// Keep only this many bytes (modulo the length + 1).
    truncate: Option<u32>,
    /// Bytes appended at the end.
    tail: Vec<u8>,
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
            payloads,
            flip: u.arbitrary()?,
            truncate: u.arbitrary()?,
            tail: u.arbitrary()?,
        })
    }
}

impl Plan {
    fn is_intact(&self) -> bool {
        self.flip.is_none() && self.truncate.is_none() && self.tail.is_empty()
    }

    /// The journal file: header and records as the format documents them.
    fn build(&self) -> Vec<u8> {
        let id = JournalId(self.journal_id);
        let genesis = genesis_hash(FORMAT_VERSION, &id, SOURCE.as_bytes());
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(SOURCE.len() as u16).to_le_bytes());
        out.extend_from_slice(&id.0);
        out.extend_from_slice(SOURCE.as_bytes());
        out.extend_from_slice(&genesis.0);
        let mut prev: ChainHash = genesis;
        for (i, payload) in self.payloads.iter().enumerate() {
            let seq = i as u64 + 1;
            let hash = record_hash(&prev, seq, payload);
            out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(payload);
            out.extend_from_slice(&hash.0);
            prev = hash;
        }
        if let Some((offset, mask)) = self.flip {
            let at = offset as usize % out.len();
            out[at] ^= mask.max(1);
        }
        if let Some(keep) = self.truncate {
            out.truncate(keep as usize % (out.len() + 1));
        }
        out.extend_from_slice(&self.tail);
        out
    }
}

fn check(path: &Path, plan: Option<&Plan>) {
    let verified = verify_journal(path);

    // The reader yields the same good records, then the error if any.
    if let Ok(reader) = JournalReader::open(path) {
        let entries: Vec<_> = reader.collect();
        let good = entries.iter().take_while(|e| e.is_ok()).count();
        assert!(
            entries.len() - good <= 1,
            "the reader went on after an error"
        );
        match &verified {
            Ok(report) => {
                assert_eq!(good, entries.len());
                assert_eq!(good as u64, report.records);
                assert_eq!(report.last_seq, report.records);
                if let Some(plan) = plan.filter(|p| p.is_intact()) {
                    let payloads: Vec<_> =
                        entries.into_iter().map(|e| e.unwrap().payload).collect();
                    assert_eq!(payloads, plan.payloads, "records changed on the way");
                }
            }
            Err(_) => assert_eq!(entries.len(), good + 1, "verify failed, the reader did not"),
        }
    } else {
        assert!(
            verified.is_err(),
            "verify passed a header the reader refused"
        );
    }
    if plan.is_some_and(Plan::is_intact) {
        let report = verified.as_ref().expect("an undamaged journal verifies");
        assert_eq!(
            report.records as usize,
            plan.map_or(0, |p| p.payloads.len())
        );
    }

    let options = JournalOptions::new().danger_no_sync(true);
    let source = JournalReader::open(path).map(|r| r.header().source.clone());
    let source = source.as_deref().unwrap_or(SOURCE);
    if let Ok(report) = &verified {
        let journal = options
            .open(path, source)
            .expect("a journal that verifies opens for appending");
        assert_eq!(journal.head().seq, report.last_seq);
        assert_eq!(journal.head().hash, report.head_hash);
        drop(journal);
    }
    if let Ok((journal, _repair)) = options.open_repairing(path, source) {
        let head = journal.head();
        drop(journal);
        let report = verify_journal(path).expect("a repaired journal verifies");
        assert_eq!(report.last_seq, head.seq);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (bytes, plan) = if mode & 1 == 1 {
        (rest.to_vec(), None)
    } else {
        let Ok(plan) = Plan::arbitrary_take_rest(Unstructured::new(rest)) else {
            return;
        };
        (plan.build(), Some(plan))
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("journal");
    fs::write(&path, &bytes).expect("writing the journal file");
    check(&path, plan.as_ref());
});
