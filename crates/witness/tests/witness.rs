//! The witness core against real logs (`nitrile_tlog::Log` on files) and a
//! real state directory.

use nitrile_tlog::{
    FileStorage, Hash, Log, NoteSigner, NoteVerifier, SignedNote, cosignatures, verify_cosignature,
};
use nitrile_witness::{AddError, OpenError, Witness};

const ORIGIN: &str = "local.nitrile/log";
const WITNESS: &str = "local.nitrile/witness/w1";
const NOW: u64 = 1_750_000_000;

struct TestLog {
    log: Log<FileStorage>,
    verifier: NoteVerifier,
    _dir: tempfile::TempDir,
}

impl TestLog {
    fn new(signer: NoteSigner) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let storage = FileStorage::open(dir.path()).unwrap();
        let verifier = signer.verifier();
        Self {
            log: Log::open(storage, ORIGIN, signer).unwrap(),
            verifier,
            _dir: dir,
        }
    }

    /// Appends `n` entries tagged `tag` and signs a checkpoint.
    fn grow(&mut self, n: u64, tag: &str) -> SignedNote {
        let start = self.log.size();
        let entries: Vec<Vec<u8>> = (start..start + n)
            .map(|i| format!("{tag} entry {i}").into_bytes())
            .collect();
        if !entries.is_empty() {
            self.log.append(&entries).unwrap();
        }
        self.log.prepare_checkpoint(NOW * 1000).unwrap()
    }

    fn proof(&self, old: u64) -> Vec<Hash> {
        if old == 0 {
            Vec::new()
        } else {
            self.log.consistency_proof(old, self.log.size()).unwrap()
        }
    }
}

fn copy(key: &NoteSigner) -> NoteSigner {
    NoteSigner::from_skey(&key.to_skey()).unwrap()
}

fn open_witness(dir: &std::path::Path, key: &NoteSigner, log: &NoteVerifier) -> Witness {
    Witness::open(dir, copy(key), [(ORIGIN.to_owned(), log.clone())]).unwrap()
}

fn with_lines(note: &str, lines: &[String]) -> String {
    let mut out = note.to_owned();
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    out
}

struct Setup {
    dir: tempfile::TempDir,
    wkey: NoteSigner,
    log: TestLog,
    witness: Witness,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let wkey = Witness::generate_key(WITNESS).unwrap();
    let log = TestLog::new(NoteSigner::generate(ORIGIN).unwrap());
    let witness = open_witness(dir.path(), &wkey, &log.verifier);
    Setup {
        dir,
        wkey,
        log,
        witness,
    }
}

#[test]
fn consistent_checkpoints_are_cosigned_in_sequence_and_the_log_publishes_them() {
    let Setup {
        dir: _dir,
        mut log,
        witness,
        ..
    } = setup();
    let vkey = NoteVerifier::from_vkey(&witness.vkey()).unwrap();
    let mut old = 0;
    for (round, n) in [0u64, 1, 2, 5, 17, 256, 3, 0].into_iter().enumerate() {
        let now = NOW + round as u64;
        let note = log.grow(n, "a");
        let new = log.log.size();
        let cosigned = witness
            .add_checkpoint(old, &log.proof(old), &note.text, now)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!((cosigned.size, cosigned.root), (new, log.log.root()));
        assert_eq!(cosigned.lines.len(), 1);
        let full = with_lines(&note.text, &cosigned.lines);
        // Verified with the witness's vkey, as the log or a client does.
        assert_eq!(
            cosignatures(&full, std::slice::from_ref(&vkey)),
            vec![WITNESS.to_owned()]
        );
        assert_eq!(verify_cosignature(&full, &vkey).unwrap().timestamp, now);
        // The cosignature does not verify on another checkpoint.
        if n > 0 {
            let earlier = log.log.checkpoint().unwrap().text;
            let body_end = earlier.rfind("\n\n").unwrap() + 2;
            let moved = with_lines(&earlier[..body_end], &cosigned.lines);
            assert!(verify_cosignature(&moved, &vkey).is_err());
        }
        log.log
            .publish(&SignedNote { text: full })
            .expect("the log accepts its cosigned checkpoint");
        let recorded = witness.recorded(ORIGIN).unwrap();
        assert_eq!((recorded.size, recorded.root), (new, log.log.root()));
        old = new;
    }
    assert_eq!(old, 284);
}

#[test]
fn a_wrong_old_size_is_a_conflict_naming_the_recorded_size() {
    let Setup {
        dir: _dir,
        mut log,
        witness,
        ..
    } = setup();
    let note = log.grow(10, "a");
    witness.add_checkpoint(0, &[], &note.text, NOW).unwrap();
    let note = log.grow(5, "a");
    for old in [0, 3, 9, 11] {
        let proof = log.proof(old);
        let e = witness
            .add_checkpoint(old, &proof, &note.text, NOW)
            .unwrap_err();
        assert!(
            matches!(e, AddError::Conflict { old_size, recorded: 10 } if old_size == old),
            "{e}"
        );
        assert_eq!(e.status(), 409);
    }
    // An old size above the checkpoint's is a bad request.
    let e = witness
        .add_checkpoint(16, &[], &note.text, NOW)
        .unwrap_err();
    assert!(matches!(
        e,
        AddError::OldSizeAboveSize {
            old_size: 16,
            size: 15
        }
    ));
    assert_eq!(e.status(), 400);
    // With the recorded size it goes through.
    witness
        .add_checkpoint(10, &log.proof(10), &note.text, NOW)
        .unwrap();
}

#[test]
fn a_bad_consistency_proof_is_refused_and_changes_nothing() {
    let Setup {
        dir: _dir,
        mut log,
        witness,
        ..
    } = setup();
    let first = log.grow(7, "a");
    witness.add_checkpoint(0, &[], &first.text, NOW).unwrap();
    let note = log.grow(9, "a");
    let good = log.proof(7);
    assert!(!good.is_empty());
    let mut cases: Vec<Vec<Hash>> = Vec::new();
    for i in 0..good.len() {
        let mut p = good.clone();
        p[i][i % 32] ^= 1;
        cases.push(p);
    }
    cases.push(good[..good.len() - 1].to_vec());
    cases.push(Vec::new());
    let mut longer = good.clone();
    longer.push([0; 32]);
    cases.push(longer);
    // A proof for another old size.
    cases.push(log.log.consistency_proof(6, 16).unwrap());
    for p in cases {
        let e = witness.add_checkpoint(7, &p, &note.text, NOW).unwrap_err();
        assert!(
            matches!(
                e,
                AddError::Inconsistent {
                    old_size: 7,
                    size: 16,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.status(), 422);
        assert_eq!(witness.recorded(ORIGIN).unwrap().size, 7);
    }
    // A proof with old size 0 is refused too.
    let e = witness
        .add_checkpoint(0, &[[1; 32]], &first.text, NOW)
        .unwrap_err();
    assert!(
        matches!(e, AddError::Conflict { .. } | AddError::ProofFromEmpty),
        "{e}"
    );
    witness.add_checkpoint(7, &good, &note.text, NOW).unwrap();
}

#[test]
fn a_proof_from_the_empty_tree_is_refused() {
    let Setup {
        dir: _dir,
        mut log,
        witness,
        ..
    } = setup();
    let note = log.grow(3, "a");
    let e = witness
        .add_checkpoint(0, &[[1; 32]], &note.text, NOW)
        .unwrap_err();
    assert!(matches!(e, AddError::ProofFromEmpty), "{e}");
    assert_eq!(e.status(), 422);
    assert!(witness.recorded(ORIGIN).is_none());
}

#[test]
fn an_unknown_log_is_refused() {
    let Setup {
        dir: _dir, witness, ..
    } = setup();
    let mut other = {
        let dir = tempfile::tempdir().unwrap();
        let signer = NoteSigner::generate("other.nitrile/log").unwrap();
        let verifier = signer.verifier();
        TestLog {
            log: Log::open(
                FileStorage::open(dir.path()).unwrap(),
                "other.nitrile/log",
                signer,
            )
            .unwrap(),
            verifier,
            _dir: dir,
        }
    };
    let note = other.grow(2, "x");
    let e = witness.add_checkpoint(0, &[], &note.text, NOW).unwrap_err();
    assert!(matches!(&e, AddError::UnknownOrigin { origin } if origin == "other.nitrile/log"));
    assert_eq!(e.status(), 404);
    assert!(witness.recorded("other.nitrile/log").is_none());
}

#[test]
fn a_forged_or_altered_log_signature_is_refused() {
    let Setup {
        dir: _dir,
        mut log,
        witness,
        ..
    } = setup();
    // A log with the same origin and key name but another key.
    let mut forger = TestLog::new(NoteSigner::generate(ORIGIN).unwrap());
    let forged = forger.grow(4, "a");
    let e = witness
        .add_checkpoint(0, &[], &forged.text, NOW)
        .unwrap_err();
    assert!(matches!(e, AddError::BadSignature { .. }), "{e}");
    assert_eq!(e.status(), 403);

    // The real log's note, altered after signing: size, root, origin
    // extension.
    let note = log.grow(4, "a").text;
    let altered = [
        note.replacen("\n4\n", "\n5\n", 1),
        {
            let root_line = note.lines().nth(2).unwrap();
            let mut b = root_line.as_bytes().to_vec();
            b[0] = if b[0] == b'A' { b'B' } else { b'A' };
            note.replacen(root_line, std::str::from_utf8(&b).unwrap(), 1)
        },
        note.replacen("\n\n", "\nextension\n\n", 1),
    ];
    for a in altered {
        assert_ne!(a, note);
        let e = witness.add_checkpoint(0, &[], &a, NOW).unwrap_err();
        assert!(matches!(e, AddError::BadSignature { .. }), "{e}");
        assert_eq!(e.status(), 403);
    }
    // The witness's own key cannot stand in for the log's.
    let Setup {
        dir: _dir2, wkey, ..
    } = setup();
    let body = &note[..note.rfind("\n\n").unwrap() + 1];
    let self_signed = format!("{body}\n{}", wkey.sign_line(body, NOW).unwrap());
    assert!(matches!(
        witness.add_checkpoint(0, &[], &self_signed, NOW),
        Err(AddError::BadSignature { .. })
    ));
    assert!(witness.recorded(ORIGIN).is_none());
    witness.add_checkpoint(0, &[], &note, NOW).unwrap();
}

#[test]
fn split_view_two_trees_of_the_same_size_are_caught() {
    // Two logs with the same origin and the same key, different leaves.
    let skey = NoteSigner::generate(ORIGIN).unwrap().to_skey();
    let mut a = TestLog::new(NoteSigner::from_skey(&skey).unwrap());
    let mut b = TestLog::new(NoteSigner::from_skey(&skey).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let witness = open_witness(
        dir.path(),
        &Witness::generate_key(WITNESS).unwrap(),
        &a.verifier,
    );

    let note_a = a.grow(12, "honest");
    witness.add_checkpoint(0, &[], &note_a.text, NOW).unwrap();
    let note_b = b.grow(12, "forked");
    assert_eq!(a.log.size(), b.log.size());
    assert_ne!(a.log.root(), b.log.root());
    // Whatever old size the forked view comes with, it is a split view.
    for old in [0, 12] {
        let e = witness
            .add_checkpoint(old, &[], &note_b.text, NOW + 1)
            .unwrap_err();
        match &e {
            AddError::SplitView {
                origin,
                size,
                recorded_root,
                submitted_root,
                evidence,
            } => {
                assert_eq!((origin.as_str(), *size), (ORIGIN, 12));
                assert_eq!(*recorded_root, a.log.root());
                assert_eq!(*submitted_root, b.log.root());
                let text = std::fs::read_to_string(evidence.as_ref().unwrap()).unwrap();
                assert!(text.contains(&note_a.text) && text.contains(&note_b.text));
            }
            other => panic!("expected a split view, got {other}"),
        }
        assert!(e.is_split_view());
        assert_eq!(e.status(), 422);
    }
    // The forked log growing on does not get cosigned either: its proof
    // from the recorded (honest) root does not verify.
    let note_b2 = b.grow(4, "forked");
    let proof = b.proof(12);
    assert!(matches!(
        witness.add_checkpoint(12, &proof, &note_b2.text, NOW),
        Err(AddError::Inconsistent { .. })
    ));
    // The honest log goes on.
    let note_a2 = a.grow(4, "honest");
    witness
        .add_checkpoint(12, &a.proof(12), &note_a2.text, NOW + 2)
        .unwrap();
    assert_eq!(witness.recorded(ORIGIN).unwrap().root, a.log.root());
}

#[test]
fn the_state_survives_a_restart() {
    let Setup {
        dir,
        wkey,
        mut log,
        witness,
    } = setup();
    let note = log.grow(20, "a");
    witness.add_checkpoint(0, &[], &note.text, NOW).unwrap();
    let before = witness.recorded(ORIGIN).unwrap();
    drop(witness);

    let witness = open_witness(dir.path(), &wkey, &log.verifier);
    assert_eq!(witness.recorded(ORIGIN).unwrap(), before);
    // It remembers: a restart is not a way to roll it back.
    let note = log.grow(5, "a");
    assert!(matches!(
        witness.add_checkpoint(0, &[], &note.text, NOW),
        Err(AddError::Conflict { recorded: 20, .. })
    ));
    witness
        .add_checkpoint(20, &log.proof(20), &note.text, NOW)
        .unwrap();
    drop(witness);
    let witness = open_witness(dir.path(), &wkey, &log.verifier);
    assert_eq!(witness.recorded(ORIGIN).unwrap().size, 25);
    // The recorded checkpoint carries the log's signature and the cosignature.
    let cp = witness.recorded(ORIGIN).unwrap().checkpoint;
    assert!(nitrile_tlog::open_checkpoint(&cp, ORIGIN, &log.verifier).is_ok());
    assert_eq!(
        cosignatures(&cp, &[wkey.verifier()]),
        vec![WITNESS.to_owned()]
    );
}

#[test]
fn a_checkpoint_of_the_same_size_and_root_is_cosigned_again() {
    let Setup {
        dir: _dir,
        mut log,
        witness,
        ..
    } = setup();
    let note = log.grow(3, "a");
    witness.add_checkpoint(0, &[], &note.text, NOW).unwrap();
    let again = witness
        .add_checkpoint(3, &[], &note.text, NOW + 60)
        .unwrap();
    assert_eq!(again.size, 3);
    // With a proof where none is needed: refused.
    assert!(
        witness
            .add_checkpoint(3, &[[0; 32]], &note.text, NOW)
            .is_err()
    );
}

#[test]
fn open_refuses_a_log_key_as_cosigner_and_duplicate_origins() {
    let dir = tempfile::tempdir().unwrap();
    let log = NoteSigner::generate(ORIGIN).unwrap();
    assert!(matches!(
        Witness::open(
            dir.path(),
            copy(&log),
            [(ORIGIN.to_owned(), log.verifier())]
        ),
        Err(OpenError::NotACosigner(_))
    ));
    let w = Witness::generate_key(WITNESS).unwrap();
    assert!(matches!(
        Witness::open(
            dir.path(),
            w,
            [
                (ORIGIN.to_owned(), log.verifier()),
                (ORIGIN.to_owned(), log.verifier())
            ]
        ),
        Err(OpenError::DuplicateOrigin(_))
    ));
}

#[test]
fn concurrent_submissions_never_roll_the_state_back() {
    let Setup {
        dir: _dir,
        mut log,
        witness,
        ..
    } = setup();
    // Checkpoints at sizes 1..=40, each with a proof from its predecessor,
    // submitted from several threads in scrambled order, retried on 409.
    let mut steps = Vec::new();
    let mut old = 0;
    for _ in 0..40 {
        let note = log.grow(1, "a");
        steps.push((old, log.proof(old), note.text));
        old = log.log.size();
    }
    let witness = std::sync::Arc::new(witness);
    let steps = std::sync::Arc::new(steps);
    let mut handles = Vec::new();
    for t in 0..4 {
        let (witness, steps) = (witness.clone(), steps.clone());
        handles.push(std::thread::spawn(move || {
            let mut cosigned = Vec::new();
            for i in (0..steps.len()).rev().skip(t).step_by(4) {
                let (old, proof, note) = &steps[i];
                if witness.add_checkpoint(*old, proof, note, NOW).is_ok() {
                    cosigned.push(*old + 1);
                }
            }
            cosigned
        }));
    }
    let mut sizes: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    sizes.sort_unstable();
    let recorded = witness.recorded(ORIGIN).map_or(0, |r| r.size);
    // Every cosigned size is at most what is recorded, and the recorded size
    // is one that was cosigned.
    assert!(sizes.iter().all(|s| *s <= recorded));
    assert!(recorded == 0 || sizes.contains(&recorded));
    // Then the rest in order, from what is recorded.
    for (old, proof, note) in steps.iter().skip(recorded as usize) {
        witness.add_checkpoint(*old, proof, note, NOW).unwrap();
    }
    assert_eq!(witness.recorded(ORIGIN).unwrap().size, 40);
}
