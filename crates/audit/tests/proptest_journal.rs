//! Property tests: any payload sequence round-trips through a real journal
//! file, and any single flipped byte anywhere in the file is detected.

use std::fs;

use nitrile_audit::{Journal, JournalId, JournalOptions, JournalReader, verify_journal};
use proptest::prelude::*;

const SOURCE: &str = "nitrile://cell-1/service/tokend";

fn payloads() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..12)
}

fn write(dir: &std::path::Path, payloads: &[Vec<u8>]) -> std::path::PathBuf {
    let path = dir.join("journal");
    let j = JournalOptions::new()
        .journal_id(JournalId([9; 16]))
        .open(&path, SOURCE)
        .unwrap();
    for p in payloads {
        j.append(p).unwrap();
    }
    path
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn payloads_round_trip(payloads in payloads()) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &payloads);
        let read: Vec<Vec<u8>> = JournalReader::open(&path)
            .unwrap()
            .map(|e| e.unwrap().payload)
            .collect();
        prop_assert_eq!(&read, &payloads);
        let report = verify_journal(&path).unwrap();
        prop_assert_eq!(report.records, payloads.len() as u64);
        // Reopening continues the chain where it ended.
        let j = Journal::open(&path, SOURCE).unwrap();
        prop_assert_eq!(j.head().hash, report.head_hash);
        prop_assert_eq!(j.append(b"next").unwrap().seq, payloads.len() as u64 + 1);
    }

    #[test]
    fn any_single_byte_flip_is_detected(
        payloads in payloads(),
        position in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &payloads);
        let mut bytes = fs::read(&path).unwrap();
        let i = position.index(bytes.len());
        bytes[i] ^= mask;
        fs::write(&path, &bytes).unwrap();
        prop_assert!(verify_journal(&path).is_err(), "flip at {} of {} undetected", i, bytes.len());
        prop_assert!(Journal::open(&path, SOURCE).is_err());
    }
}
