//! The format is stable: a journal written by an independent implementation
//! of the documented format (testdata/make_v1_vector.py) verifies, and this
//! crate writes the same bytes for the same inputs.

use std::fs;
use std::path::Path;

use nitrile_audit::{AuditRecord, JournalId, JournalOptions, JournalReader, verify_journal};

const VECTOR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/testdata/v1-three-records.journal"
);
/// Printed by make_v1_vector.py.
const HEAD: &str = "1d58866aee497fa5c47023df7667de761f76463b99c0812a35cbb7d7dd108acb";

#[test]
fn independent_vector_verifies() {
    let report = verify_journal(VECTOR).unwrap();
    assert_eq!(report.records, 3);
    assert_eq!(report.last_seq, 3);
    assert_eq!(report.head_hash.to_string(), HEAD);
    assert_eq!(report.source, "nitrile://cell-1/host/h1");
    assert_eq!(
        report.journal_id.to_string(),
        "000102030405060708090a0b0c0d0e0f"
    );
    let records: Vec<AuditRecord> = JournalReader::open(VECTOR)
        .unwrap()
        .map(|e| e.unwrap().record().unwrap())
        .collect();
    assert_eq!(records[0].operations[0].as_str(), "host.drain");
    assert_eq!(records[2].reason.as_deref(), Some("token expired"));
}

#[test]
fn writer_produces_the_same_bytes() {
    let payloads: Vec<Vec<u8>> = JournalReader::open(VECTOR)
        .unwrap()
        .map(|e| e.unwrap().payload)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = i as u8;
    }
    let j = JournalOptions::new()
        .journal_id(JournalId(id))
        .open(&path, "nitrile://cell-1/host/h1")
        .unwrap();
    for p in &payloads {
        j.append(p).unwrap();
    }
    assert_eq!(j.head().hash.to_string(), HEAD);
    drop(j);
    assert_eq!(
        fs::read(&path).unwrap(),
        fs::read(Path::new(VECTOR)).unwrap()
    );
}
