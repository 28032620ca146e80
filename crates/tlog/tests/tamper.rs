//! Tampering with a stored log: every change is caught by `audit`, which
//! names the path and the entry index.

use nitrile_tlog::{
    AuditFailure, AuditProblem, Checkpoint, FileStorage, Log, NoteSigner, NoteVerifier, SignedNote,
    Storage, audit, decode_bundle, encode_bundle,
};

const ORIGIN: &str = "local.nitrile/log";

struct Fixture {
    _dir: tempfile::TempDir,
    storage: FileStorage,
    verifier: NoteVerifier,
    signer: NoteSigner,
}

/// A log of 1300 entries with checkpoints at 100, 700 and 1300.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let signer = NoteSigner::generate(ORIGIN).unwrap();
    let verifier = signer.verifier();
    let mut log = Log::open(
        FileStorage::open(dir.path()).unwrap(),
        ORIGIN,
        NoteSigner::from_skey(&signer.to_skey()).unwrap(),
    )
    .unwrap();
    let mut next = 0u64;
    for size in [100u64, 700, 1300] {
        let batch: Vec<Vec<u8>> = (next..size)
            .map(|i| format!("record {i}").into_bytes())
            .collect();
        log.append(&batch).unwrap();
        next = size;
        let note = log.prepare_checkpoint(size).unwrap();
        log.publish(&note).unwrap();
    }
    drop(log);
    let storage = FileStorage::open(dir.path()).unwrap();
    audit(&storage, ORIGIN, &verifier).unwrap();
    Fixture {
        _dir: dir,
        storage,
        verifier,
        signer,
    }
}

fn audit_fails(f: &Fixture) -> AuditFailure {
    let err = audit(&f.storage, ORIGIN, &f.verifier).expect_err("the audit must fail");
    // The message names the place.
    assert!(err.to_string().contains(&err.path), "{err}");
    err
}

fn rewrite_bundle(f: &Fixture, path: &str, width: u64, change: impl FnOnce(&mut Vec<Vec<u8>>)) {
    let mut entries = decode_bundle(&f.storage.read(path).unwrap().unwrap(), width).unwrap();
    change(&mut entries);
    f.storage
        .write(path, &encode_bundle(&entries).unwrap())
        .unwrap();
}

#[test]
fn audit_of_an_untouched_log_reports_what_it_checked() {
    let f = fixture();
    let r = audit(&f.storage, ORIGIN, &f.verifier).unwrap();
    assert_eq!(r.size, 1300);
    assert_eq!(r.checkpoints, 3);
    // 5 full + 1 partial (1280..1300) bundle in the tree, plus the partials of
    // earlier checkpoints (0.p/100, 2.p/188).
    assert_eq!(r.bundles, 8);
    assert!(r.tiles >= 7, "{r:?}");
    assert_eq!(r.beyond_checkpoint, 0);
}

#[test]
fn flipped_byte_in_a_stored_leaf_is_named_by_bundle_and_index() {
    let f = fixture();
    let path = "tile/entries/001";
    let mut b = f.storage.read(path).unwrap().unwrap();
    // Entry 256 starts at offset 0: length (2 bytes) then "record 256".
    b[2 + 7] ^= 0x01;
    f.storage.write(path, &b).unwrap();
    let err = audit_fails(&f);
    assert_eq!((err.path.as_str(), err.index), (path, Some(256)));
    assert!(
        matches!(err.problem, AuditProblem::EntryMismatch { .. }),
        "{err}"
    );
}

#[test]
fn flipped_byte_in_a_partial_bundle_of_an_old_checkpoint_is_caught() {
    let f = fixture();
    let path = "tile/entries/000.p/100";
    rewrite_bundle(&f, path, 100, |e| e[42][0] ^= 0x20);
    let err = audit_fails(&f);
    assert_eq!((err.path.as_str(), err.index), (path, Some(42)));
    assert!(matches!(err.problem, AuditProblem::EntryDiffers), "{err}");
}

#[test]
fn flipped_byte_in_a_tile_is_named_by_tile_and_index() {
    let f = fixture();
    for (path, index) in [
        ("tile/0/002", 2 * 256 + 3),
        ("tile/1/000.p/5", 256),
        ("tile/0/005.p/20", 1283),
    ] {
        let f2 = &f;
        let original = f2.storage.read(path).unwrap().unwrap();
        let mut t = original.clone();
        let offset = ((index as usize) % 256) * 32 + 7;
        let offset = if path.starts_with("tile/1/") {
            ((index as usize) >> 8) * 32 + 7
        } else {
            offset
        };
        t[offset] ^= 0x80;
        f2.storage.write(path, &t).unwrap();
        let err = audit_fails(f2);
        assert_eq!((err.path.as_str(), err.index), (path, Some(index)), "{err}");
        assert!(matches!(err.problem, AuditProblem::TileMismatch), "{err}");
        f2.storage.write(path, &original).unwrap();
    }
    audit(&f.storage, ORIGIN, &f.verifier).unwrap();
}

#[test]
fn deleted_entry_is_named() {
    let f = fixture();
    let path = "tile/entries/003";
    rewrite_bundle(&f, path, 256, |e| {
        e.remove(17);
    });
    let err = audit_fails(&f);
    assert_eq!(
        (err.path.as_str(), err.index),
        (path, Some(3 * 256 + 17)),
        "{err}"
    );
    assert!(matches!(err.problem, AuditProblem::Malformed(_)), "{err}");
}

#[test]
fn reordered_entries_are_named() {
    let f = fixture();
    let path = "tile/entries/002";
    rewrite_bundle(&f, path, 256, |e| e.swap(10, 11));
    let err = audit_fails(&f);
    assert_eq!(
        (err.path.as_str(), err.index),
        (path, Some(512 + 10)),
        "{err}"
    );
    assert!(
        matches!(err.problem, AuditProblem::EntryMismatch { .. }),
        "{err}"
    );
}

#[test]
fn truncated_tail_is_named() {
    // The last partial bundle cut short by a few bytes.
    let f = fixture();
    let path = "tile/entries/005.p/20";
    let b = f.storage.read(path).unwrap().unwrap();
    f.storage.write(path, &b[..b.len() - 3]).unwrap();
    let err = audit_fails(&f);
    assert_eq!(
        (err.path.as_str(), err.index),
        (path, Some(1280 + 19)),
        "{err}"
    );

    // The last bundle gone altogether.
    let f = fixture();
    std::fs::remove_file(f.storage.dir().join(path)).unwrap();
    let err = audit_fails(&f);
    assert_eq!((err.path.as_str(), err.index), (path, Some(1280)), "{err}");
    assert!(matches!(err.problem, AuditProblem::Missing), "{err}");

    // A whole full bundle and its tile gone.
    let f = fixture();
    std::fs::remove_file(f.storage.dir().join("tile/entries/004")).unwrap();
    let err = audit_fails(&f);
    assert_eq!(
        (err.path.as_str(), err.index),
        ("tile/entries/004", Some(1024)),
        "{err}"
    );
}

#[test]
fn entries_and_tiles_rewritten_together_are_caught_by_the_checkpoint() {
    let f = fixture();
    rewrite_bundle(&f, "tile/entries/000", 256, |e| e[200] = b"forged".to_vec());
    // Recompute the level-0 tile so entries and tile agree again.
    let entries =
        decode_bundle(&f.storage.read("tile/entries/000").unwrap().unwrap(), 256).unwrap();
    let tile: Vec<u8> = entries
        .iter()
        .flat_map(|e| nitrile_tlog::leaf_hash(e))
        .collect();
    f.storage.write("tile/0/000", &tile).unwrap();
    let err = audit_fails(&f);
    assert!(matches!(err.problem, AuditProblem::RootMismatch), "{err}");
    assert_eq!(err.path, "checkpoints/700");
}

#[test]
fn checkpoint_history_tampering_is_caught() {
    // A checkpoint signed by another key.
    let f = fixture();
    let other = NoteSigner::generate(ORIGIN).unwrap();
    let cp = Checkpoint {
        origin: ORIGIN.into(),
        size: 700,
        root: [9; 32],
    };
    f.storage
        .write(
            "checkpoints/700",
            SignedNote::sign(&cp.body(), &other, 0)
                .unwrap()
                .text
                .as_bytes(),
        )
        .unwrap();
    let err = audit_fails(&f);
    assert_eq!(err.path, "checkpoints/700");
    assert!(matches!(err.problem, AuditProblem::Checkpoint(_)), "{err}");

    // A checkpoint signed by the log key but of another tree (a fork).
    let f = fixture();
    let cp = Checkpoint {
        origin: ORIGIN.into(),
        size: 700,
        root: [9; 32],
    };
    f.storage
        .write(
            "checkpoints/700",
            SignedNote::sign(&cp.body(), &f.signer, 0)
                .unwrap()
                .text
                .as_bytes(),
        )
        .unwrap();
    let err = audit_fails(&f);
    assert_eq!(err.path, "checkpoints/700");
    assert!(matches!(err.problem, AuditProblem::RootMismatch), "{err}");

    // The latest checkpoint rolled back to an older one.
    let f = fixture();
    let old = f.storage.read("checkpoints/700").unwrap().unwrap();
    f.storage.write("checkpoint", &old).unwrap();
    let err = audit_fails(&f);
    assert_eq!(err.path, "checkpoint");
    assert!(
        matches!(
            err.problem,
            AuditProblem::LatestNotNewest {
                latest: 700,
                newest: 1300
            }
        ),
        "{err}"
    );

    // A history note stored under the wrong size.
    let f = fixture();
    f.storage
        .write(
            "checkpoints/701",
            &f.storage.read("checkpoints/700").unwrap().unwrap(),
        )
        .unwrap();
    let err = audit_fails(&f);
    assert_eq!(err.path, "checkpoints/701");

    // The latest checkpoint deleted while history remains.
    let f = fixture();
    std::fs::remove_file(f.storage.dir().join("checkpoint")).unwrap();
    let err = audit_fails(&f);
    assert_eq!(err.path, "checkpoint");
    assert!(matches!(err.problem, AuditProblem::Missing), "{err}");
}

#[test]
fn a_missing_tile_and_a_stray_object_are_caught() {
    let f = fixture();
    std::fs::remove_file(f.storage.dir().join("tile/1/000.p/5")).unwrap();
    let err = audit_fails(&f);
    assert_eq!(err.path, "tile/1/000.p/5");
    assert!(matches!(err.problem, AuditProblem::Missing), "{err}");

    let f = fixture();
    f.storage.write("tile/0/notatile", b"x").unwrap();
    let err = audit_fails(&f);
    assert!(matches!(err.problem, AuditProblem::UnexpectedPath), "{err}");
}
