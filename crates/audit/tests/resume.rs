//! Following a growing journal with `JournalReader::resume`.

use nitrile_audit::{ChainHash, Journal, JournalError, JournalReader};

#[test]
fn resume_reads_only_what_follows_and_checks_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let j = Journal::open(&path, "nitrile://local/host/h1").unwrap();
    for i in 0..3 {
        j.append(format!("r{i}").as_bytes()).unwrap();
    }
    let first: Vec<_> = JournalReader::open(&path)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(first.len(), 3);
    let last = first.last().unwrap();
    let mut none = JournalReader::resume(&path, last.seq, last.hash, last.end()).unwrap();
    assert!(none.next().is_none());

    for i in 3..5 {
        j.append(format!("r{i}").as_bytes()).unwrap();
    }
    let more: Vec<_> = JournalReader::resume(&path, last.seq, last.hash, last.end())
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(more.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(more[0].payload, b"r3");

    // From the start (seq 0) it reads everything.
    let all = JournalReader::resume(&path, 0, ChainHash([0; 32]), 0)
        .unwrap()
        .count();
    assert_eq!(all, 5);

    // A wrong hash to continue from is a chain break at the next record.
    let mut wrong = JournalReader::resume(&path, last.seq, ChainHash([0; 32]), last.end()).unwrap();
    assert!(matches!(
        wrong.next(),
        Some(Err(JournalError::Corrupt { seq: 4, .. }))
    ));
}
