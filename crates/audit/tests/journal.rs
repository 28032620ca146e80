//! Claim 6: every admin call is journaled durably before it acts, and the
//! journal is tamper-evident. These tests use real files and real fdatasync.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use nitrile_api::wire::RefusalStep;
use nitrile_api::{Operation, PrincipalId, ResourceId};
use nitrile_audit::{
    AuditRecord, Journal, JournalError, JournalReader, Outcome, RecordKind, RecordProblem,
    RequestId, verify_journal,
};
use time::macros::datetime;

const SOURCE: &str = "nitrile://cell-1/host/h1";

fn payload(i: usize) -> Vec<u8> {
    format!("record number {i}").into_bytes()
}

fn write_journal(path: &Path, n: usize) {
    let j = Journal::open(path, SOURCE).unwrap();
    for i in 1..=n {
        assert_eq!(j.append(&payload(i)).unwrap().seq, i as u64);
    }
}

#[test]
fn append_reopen_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let first_head = {
        let j = Journal::open(&path, SOURCE).unwrap();
        assert_eq!(j.head().seq, 0);
        assert_eq!(j.head().hash, j.header().genesis);
        for i in 1..=10 {
            j.append(&payload(i)).unwrap();
        }
        j.head()
    };
    assert_eq!(first_head.seq, 10);
    let j = Journal::open(&path, SOURCE).unwrap();
    assert_eq!(j.head(), first_head);
    let r = j.append(&payload(11)).unwrap();
    assert_eq!(r.seq, 11);
    drop(j);

    let report = verify_journal(&path).unwrap();
    assert_eq!(report.records, 11);
    assert_eq!(report.last_seq, 11);
    assert_eq!(report.head_hash, r.hash);
    assert_eq!(report.source, SOURCE);
    assert_eq!(report.bytes, fs::metadata(&path).unwrap().len());

    let entries: Vec<_> = JournalReader::open(&path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(e.payload, payload(i + 1));
    }
}

#[test]
fn second_writer_and_other_source_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let j = Journal::open(&path, SOURCE).unwrap();
    assert!(matches!(
        Journal::open(&path, SOURCE),
        Err(JournalError::Locked)
    ));
    drop(j);
    assert!(matches!(
        Journal::open(&path, "nitrile://cell-1/host/h2"),
        Err(JournalError::SourceMismatch { .. })
    ));
    assert!(matches!(
        Journal::open(dir.path().join("other"), "has space"),
        Err(JournalError::BadSourceName { .. })
    ));
}

#[test]
fn audit_records_round_trip_through_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let source = PrincipalId::parse(SOURCE).unwrap();
    let alice = PrincipalId::parse("nitrile://cell-1/operator/alice").unwrap();
    let rid = RequestId::from_bytes([1; 16]);
    let now = datetime!(2030-05-06 07:08:09 UTC);
    let records = [
        AuditRecord::request(now, source.clone(), rid)
            .with_principal(alice.clone())
            .with_operations([Operation::InstanceStop])
            .with_resources([ResourceId::parse("instance/i-1").unwrap()])
            .with_token_id("t-1"),
        AuditRecord::outcome(now, source.clone(), rid, Outcome::Executed),
        AuditRecord::refusal(
            now,
            source,
            RequestId::from_bytes([2; 16]),
            RefusalStep::Tls,
            "no client certificate",
        ),
    ];
    {
        let j = Journal::open(&path, SOURCE).unwrap();
        for r in &records {
            j.append(&r.encode().unwrap()).unwrap();
        }
    }
    let back: Vec<AuditRecord> = JournalReader::open(&path)
        .unwrap()
        .map(|e| e.unwrap().record().unwrap())
        .collect();
    assert_eq!(back, records);
    assert_eq!(back[2].kind, RecordKind::Refusal);
    assert_eq!(back[2].principal, None);
}

#[test]
fn concurrent_appenders_are_group_committed() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let j = Arc::new(Journal::open(&path, SOURCE).unwrap());
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let j = Arc::clone(&j);
            std::thread::spawn(move || {
                (0..PER_THREAD)
                    .map(|i| {
                        let p = format!("thread {t} append {i}");
                        (j.append(p.as_bytes()).unwrap().seq, p)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked: Vec<(u64, String)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    acked.sort();
    let total = (THREADS * PER_THREAD) as u64;
    assert_eq!(
        acked.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "sequence numbers are contiguous and each is given once"
    );
    let m = j.metrics();
    assert_eq!(m.appends, total);
    assert_eq!(m.last_seq, total);
    assert_eq!(m.failures, 0);
    assert!(
        m.fsyncs < m.appends,
        "group commit: {} fsyncs for {} appends",
        m.fsyncs,
        m.appends
    );
    assert_eq!(m.fsyncs, m.batches);
    drop(j);

    // Every acknowledged payload is in the file under the seq it was given.
    let report = verify_journal(&path).unwrap();
    assert_eq!(report.last_seq, total);
    for (entry, (seq, p)) in JournalReader::open(&path).unwrap().zip(&acked) {
        let entry = entry.unwrap();
        assert_eq!(entry.seq, *seq);
        assert_eq!(entry.payload, p.as_bytes());
    }
}

#[test]
fn async_submit_resolves_without_blocking_workers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let j = Arc::new(Journal::open(&path, SOURCE).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let seqs = rt.block_on(async {
        let pending: Vec<_> = (1..=50).map(|i| j.submit(&payload(i))).collect();
        let mut seqs = Vec::new();
        for p in pending {
            seqs.push(p.await.unwrap().seq);
        }
        seqs
    });
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    drop(j);
    assert_eq!(verify_journal(&path).unwrap().records, 50);
}

fn torn_tail_is_reported_then_repaired(damage: impl FnOnce(&Path), expect_last_seq: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    write_journal(&path, 5);
    let good = verify_journal(&path).unwrap();
    damage(&path);
    let damaged = fs::read(&path).unwrap();

    let err = Journal::open(&path, SOURCE).unwrap_err();
    let JournalError::TornTail {
        offset,
        torn_bytes,
        last_seq,
        ..
    } = err
    else {
        panic!("expected a torn tail, got {err:?}");
    };
    assert_eq!(last_seq, expect_last_seq);
    assert_eq!(offset + torn_bytes, damaged.len() as u64);
    assert!(matches!(
        verify_journal(&path),
        Err(JournalError::TornTail { .. })
    ));
    // Opening without repair changed nothing.
    assert_eq!(fs::read(&path).unwrap(), damaged);

    let (j, repair) = Journal::open_repairing(&path, SOURCE).unwrap();
    let repair = repair.expect("a repair report");
    assert_eq!(repair.offset, offset);
    assert_eq!(repair.bytes, torn_bytes);
    assert_eq!(repair.last_seq, expect_last_seq);
    assert_eq!(
        fs::read(&repair.side_file).unwrap(),
        damaged[offset as usize..],
        "the torn bytes are kept, not dropped"
    );
    assert!(
        repair
            .side_file
            .to_string_lossy()
            .ends_with(&format!(".torn-{offset}"))
    );
    assert_eq!(j.head().seq, expect_last_seq);
    let next = j.append(b"after repair").unwrap();
    assert_eq!(next.seq, expect_last_seq + 1);
    drop(j);
    let report = verify_journal(&path).unwrap();
    assert_eq!(report.last_seq, expect_last_seq + 1);
    if expect_last_seq == good.last_seq {
        // The records before the damage are unchanged.
        let entries: Vec<_> = JournalReader::open(&path)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(entries[4].hash, good.head_hash);
    }
}

#[test]
fn truncated_tail_is_detected_and_repairable() {
    torn_tail_is_reported_then_repaired(
        |path| {
            let len = fs::metadata(path).unwrap().len();
            OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(len - 3)
                .unwrap();
        },
        4,
    );
}

#[test]
fn appended_garbage_is_detected_and_repairable() {
    torn_tail_is_reported_then_repaired(
        |path| {
            let mut f = OpenOptions::new().append(true).open(path).unwrap();
            f.write_all(b"\x05\x00\x00\x00garbage after a crash")
                .unwrap();
        },
        5,
    );
}

#[test]
fn zeroed_tail_is_detected_and_repairable() {
    torn_tail_is_reported_then_repaired(
        |path| {
            let mut f = OpenOptions::new().append(true).open(path).unwrap();
            f.write_all(&[0u8; 4096]).unwrap();
        },
        5,
    );
}

#[test]
fn flipped_byte_in_the_middle_names_the_record_and_is_never_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    write_journal(&path, 9);
    let entries: Vec<_> = JournalReader::open(&path)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let victim = &entries[4];
    let mut bytes = fs::read(&path).unwrap();
    bytes[victim.offset as usize + 12 + 2] ^= 0x01;
    fs::write(&path, &bytes).unwrap();

    let err = verify_journal(&path).unwrap_err();
    match &err {
        JournalError::Corrupt {
            seq,
            offset,
            problem,
        } => {
            assert_eq!(*seq, 5);
            assert_eq!(*offset, victim.offset);
            assert_eq!(*problem, RecordProblem::BadHash);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert!(err.to_string().contains("record 5"));
    assert!(matches!(
        Journal::open_repairing(&path, SOURCE),
        Err(JournalError::Corrupt { seq: 5, .. })
    ));
    assert_eq!(fs::read(&path).unwrap(), bytes, "nothing was cut");

    // The reader yields the good prefix, then the error, then stops.
    let items: Vec<_> = JournalReader::open(&path).unwrap().collect();
    assert_eq!(items.len(), 5);
    assert!(items[..4].iter().all(Result::is_ok));
    assert!(items[4].is_err());
}

#[test]
fn removed_or_reordered_records_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    write_journal(&path, 6);
    let bytes = fs::read(&path).unwrap();
    let entries: Vec<_> = JournalReader::open(&path)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let span = |i: usize| {
        let start = entries[i].offset as usize;
        let end = entries
            .get(i + 1)
            .map_or(bytes.len(), |e| e.offset as usize);
        start..end
    };
    // Drop record 3.
    let mut removed = bytes[..span(2).start].to_vec();
    removed.extend_from_slice(&bytes[span(3).start..]);
    fs::write(&path, &removed).unwrap();
    assert!(matches!(
        verify_journal(&path),
        Err(JournalError::Corrupt {
            seq: 3,
            problem: RecordProblem::SeqMismatch { found: 4 },
            ..
        })
    ));
    // Swap records 2 and 3.
    let mut swapped = bytes[..span(1).start].to_vec();
    swapped.extend_from_slice(&bytes[span(2)]);
    swapped.extend_from_slice(&bytes[span(1)]);
    swapped.extend_from_slice(&bytes[span(3).start..]);
    fs::write(&path, &swapped).unwrap();
    assert!(matches!(
        verify_journal(&path),
        Err(JournalError::Corrupt { seq: 2, .. })
    ));
}

#[test]
fn a_header_from_another_journal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    write_journal(&a, 2);
    write_journal(&b, 2);
    let (ha, hb) = (
        JournalReader::open(&a).unwrap().header().encoded_len() as usize,
        JournalReader::open(&b).unwrap().header().encoded_len() as usize,
    );
    // b's header in front of a's records: the chain starts from the wrong
    // genesis, so the first record fails.
    let mut spliced = fs::read(&b).unwrap()[..hb].to_vec();
    spliced.extend_from_slice(&fs::read(&a).unwrap()[ha..]);
    fs::write(&a, spliced).unwrap();
    assert!(matches!(
        verify_journal(&a),
        Err(JournalError::Corrupt {
            seq: 1,
            problem: RecordProblem::BadHash,
            ..
        })
    ));
}
