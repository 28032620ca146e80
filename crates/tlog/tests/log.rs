//! The log over real files: append, checkpoints, proofs, crash recovery,
//! durability ordering.

use std::sync::{Arc, Mutex};

use nitrile_tlog::{
    FileStorage, Log, LogError, NoteSigner, SignedNote, Storage, StorageError, audit, leaf_hash,
    open_checkpoint, verify_consistency, verify_inclusion,
};

const ORIGIN: &str = "local.nitrile/log";

fn entry(i: u64) -> Vec<u8> {
    format!("entry {i} {}", "x".repeat((i % 50) as usize)).into_bytes()
}

fn entries(range: std::ops::Range<u64>) -> Vec<Vec<u8>> {
    range.map(entry).collect()
}

fn key() -> NoteSigner {
    NoteSigner::generate(ORIGIN).unwrap()
}

fn clone_key(k: &NoteSigner) -> NoteSigner {
    NoteSigner::from_skey(&k.to_skey()).unwrap()
}

fn checkpoint_now<S: Storage>(log: &mut Log<S>) -> SignedNote {
    let note = log.prepare_checkpoint(1_700_000_000_000).unwrap();
    log.publish(&note).unwrap();
    note
}

#[test]
fn append_checkpoint_prove_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let mut log = Log::open(
        FileStorage::open(dir.path()).unwrap(),
        ORIGIN,
        clone_key(&k),
    )
    .unwrap();
    assert_eq!(log.size(), 0);
    assert_eq!(log.checkpoint(), None);
    assert_eq!(log.append(&entries(0..1000)).unwrap(), 0);
    let first = checkpoint_now(&mut log);
    assert_eq!(log.append(&entries(1000..70_000)).unwrap(), 1000);
    let second = checkpoint_now(&mut log);
    assert_eq!(log.checkpoint(), Some(second.clone()));
    let cp1 = open_checkpoint(&first.text, ORIGIN, &k.verifier()).unwrap();
    let cp2 = open_checkpoint(&second.text, ORIGIN, &k.verifier()).unwrap();
    assert_eq!((cp1.size, cp2.size), (1000, 70_000));
    assert_eq!(cp2.root, log.root());
    for i in [0u64, 1, 255, 256, 999, 1000, 65_535, 65_536, 69_999] {
        assert_eq!(log.entry(i).unwrap(), entry(i));
        let p = log.inclusion_proof(i, 70_000).unwrap();
        verify_inclusion(&leaf_hash(&entry(i)), i, 70_000, &p, &cp2.root).unwrap();
    }
    let p = log.consistency_proof(1000, 70_000).unwrap();
    verify_consistency(1000, 70_000, &cp1.root, &cp2.root, &p).unwrap();
    assert!(matches!(
        log.entry(70_000),
        Err(LogError::NoSuchEntry { .. })
    ));
    assert!(log.inclusion_proof(5, 70_001).is_err());
    // The tlog-tiles example: size 70,000 has 273 full level-0 tiles, a partial
    // one of width 112, one full level-1 tile, a partial level-1 tile of 17 and
    // a partial level-2 tile of width 1.
    let s = log.storage();
    assert_eq!(
        s.list("tile/0/")
            .unwrap()
            .iter()
            .filter(|p| !p.contains(".p/"))
            .count(),
        273
    );
    assert!(s.read("tile/0/273.p/112").unwrap().is_some());
    assert!(s.read("tile/1/000").unwrap().is_some());
    assert!(s.read("tile/1/001.p/17").unwrap().is_some());
    assert!(s.read("tile/2/000.p/1").unwrap().is_some());
    assert!(s.read("tile/entries/273.p/112").unwrap().is_some());
    assert!(s.read("checkpoints/1000").unwrap().is_some());
    let report = audit(s, ORIGIN, &k.verifier()).unwrap();
    assert_eq!(
        (report.size, report.root, report.checkpoints),
        (70_000, cp2.root, 2)
    );
    // The history, by size, in pages.
    assert_eq!(
        log.history(0, 10).unwrap(),
        (vec![first.clone(), second.clone()], None)
    );
    assert_eq!(
        log.history(0, 1).unwrap(),
        (vec![first.clone()], Some(70_000))
    );
    assert_eq!(log.history(1001, 1).unwrap(), (vec![second.clone()], None));
    assert_eq!(log.history(70_001, 5).unwrap(), (vec![], None));

    // Reopen: same tree, same checkpoint.
    drop(log);
    let log = Log::open(
        FileStorage::open(dir.path()).unwrap(),
        ORIGIN,
        clone_key(&k),
    )
    .unwrap();
    assert_eq!((log.size(), log.root()), (70_000, cp2.root));
    assert_eq!(log.checkpoint(), Some(second.clone()));
    assert_eq!(log.entry(69_999).unwrap(), entry(69_999));
    assert_eq!(log.history(1000, 10).unwrap(), (vec![first, second], None));
}

#[test]
fn publish_refuses_foreign_unprepared_stale_and_tampered_notes() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let mut log = Log::open(
        FileStorage::open(dir.path()).unwrap(),
        ORIGIN,
        clone_key(&k),
    )
    .unwrap();
    log.append(&entries(0..10)).unwrap();
    assert_eq!(log.prepared_at(), None);
    let n10 = log.prepare_checkpoint(0).unwrap();
    assert_eq!(log.prepared_at(), Some(0));
    // Signed by another key of the same name.
    let other = SignedNote::sign(n10.body().unwrap(), &key(), 0).unwrap();
    assert!(matches!(log.publish(&other), Err(LogError::Note(_))));
    // Root of another tree, signed by our key: not this tree.
    let forged = nitrile_tlog::Checkpoint {
        origin: ORIGIN.into(),
        size: 10,
        root: [1; 32],
    };
    let forged = SignedNote::sign(&forged.body(), &k, 0).unwrap();
    assert!(matches!(
        log.publish(&forged),
        Err(LogError::NotThisTree { size: 10 })
    ));
    // Larger than prepared.
    log.append(&entries(10..20)).unwrap();
    let ahead = nitrile_tlog::Checkpoint {
        origin: ORIGIN.into(),
        size: 20,
        root: log.root(),
    };
    let ahead = SignedNote::sign(&ahead.body(), &k, 0).unwrap();
    assert!(matches!(
        log.publish(&ahead),
        Err(LogError::NotPrepared {
            size: 20,
            prepared: 10
        })
    ));
    let n20 = log.prepare_checkpoint(0).unwrap();
    log.publish(&n20).unwrap();
    // Older than published.
    assert!(matches!(
        log.publish(&n10),
        Err(LogError::Rollback {
            size: 10,
            published: 20
        })
    ));
    // With a witness cosignature added: accepted, stored as is.
    let w = NoteSigner::generate_cosigner("witness.example/w1").unwrap();
    let cosigned = n20
        .with_signature_line(&w.sign_line(n20.body().unwrap(), 1_700_000_000).unwrap())
        .unwrap();
    log.publish(&cosigned).unwrap();
    assert_eq!(
        log.storage().read("checkpoint").unwrap().unwrap(),
        cosigned.text.as_bytes()
    );
    assert_eq!(
        nitrile_tlog::cosignatures(&cosigned.text, &[w.verifier()]),
        vec!["witness.example/w1"]
    );
    // Keys must be Ed25519 note keys named after the origin.
    let s = FileStorage::open(dir.path()).unwrap();
    assert!(matches!(
        Log::open(s, ORIGIN, NoteSigner::generate("other").unwrap()),
        Err(LogError::WrongKey { .. })
    ));
    assert!(matches!(
        log.append(&[vec![0u8; 65_536]]),
        Err(LogError::EntryTooLarge {
            index: 0,
            len: 65_536
        })
    ));
}

#[test]
fn crash_after_append_keeps_full_bundles_and_loses_only_the_unprepared_tail() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let mut log = Log::open(
        FileStorage::open(dir.path()).unwrap(),
        ORIGIN,
        clone_key(&k),
    )
    .unwrap();
    log.append(&entries(0..1000)).unwrap();
    let published = checkpoint_now(&mut log);
    log.append(&entries(1000..1300)).unwrap();
    drop(log); // crash: no prepare, no publish
    let mut log = Log::open(
        FileStorage::open(dir.path()).unwrap(),
        ORIGIN,
        clone_key(&k),
    )
    .unwrap();
    // Bundles 3 (768..1024) and 4 (1024..1280) were full and are kept,
    // re-verified against the checkpointed leaves 768..1000; 1280..1300 were
    // only in memory.
    assert_eq!(log.size(), 1280);
    assert_eq!(log.checkpoint(), Some(published));
    assert_eq!(log.entry(1279).unwrap(), entry(1279));
    log.append(&entries(1280..1300)).unwrap();
    let note = checkpoint_now(&mut log);
    let cp = open_checkpoint(&note.text, ORIGIN, &k.verifier()).unwrap();
    assert_eq!(cp.size, 1300);
    audit(log.storage(), ORIGIN, &k.verifier()).unwrap();
}

#[test]
fn crash_between_prepare_and_publish_keeps_the_prepared_entries() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let mut log = Log::open(
        FileStorage::open(dir.path()).unwrap(),
        ORIGIN,
        clone_key(&k),
    )
    .unwrap();
    log.append(&entries(0..100)).unwrap();
    let published = checkpoint_now(&mut log);
    log.append(&entries(100..150)).unwrap();
    let _prepared = log.prepare_checkpoint(1).unwrap();
    let root150 = log.root();
    drop(log); // crash before publish
    let mut log = Log::open(
        FileStorage::open(dir.path()).unwrap(),
        ORIGIN,
        clone_key(&k),
    )
    .unwrap();
    assert_eq!((log.size(), log.root()), (150, root150));
    assert_eq!(log.checkpoint(), Some(published));
    assert_eq!(log.entry(149).unwrap(), entry(149));
    // The audit sees only the published checkpoint; the rest is beyond it.
    let r = audit(log.storage(), ORIGIN, &k.verifier()).unwrap();
    assert_eq!(r.size, 100);
    assert!(r.beyond_checkpoint > 0);
    log.append(&entries(150..400)).unwrap();
    checkpoint_now(&mut log);
    assert_eq!(
        audit(log.storage(), ORIGIN, &k.verifier()).unwrap().size,
        400
    );
}

#[test]
fn recovery_cuts_at_a_torn_bundle_and_refuses_a_corrupt_checkpointed_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let mut log = Log::open(
        FileStorage::open(dir.path()).unwrap(),
        ORIGIN,
        clone_key(&k),
    )
    .unwrap();
    log.append(&entries(0..300)).unwrap();
    checkpoint_now(&mut log);
    log.append(&entries(300..1024)).unwrap(); // bundles 1, 2, 3 full, unsynced
    drop(log);
    let s = FileStorage::open(dir.path()).unwrap();
    // Bundle 2 torn (as if a crash left garbage): entries from 512 on are cut.
    let b2 = s.read("tile/entries/002").unwrap().unwrap();
    s.write("tile/entries/002", &b2[..b2.len() / 2]).unwrap();
    let log = Log::open(s, ORIGIN, clone_key(&k)).unwrap();
    assert_eq!(log.size(), 512);
    drop(log);
    // A level-0 tile under the checkpoint altered: the log refuses to open.
    let s = FileStorage::open(dir.path()).unwrap();
    let mut t = s.read("tile/0/000").unwrap().unwrap();
    t[5] ^= 1;
    s.write("tile/0/000", &t).unwrap();
    assert!(matches!(
        Log::open(s, ORIGIN, clone_key(&k)),
        Err(LogError::Corrupt { .. })
    ));
    // A checkpoint signed by another key: refused too.
    let dir2 = tempfile::tempdir().unwrap();
    let mut log = Log::open(FileStorage::open(dir2.path()).unwrap(), ORIGIN, key()).unwrap();
    log.append(&entries(0..3)).unwrap();
    checkpoint_now(&mut log);
    drop(log);
    assert!(matches!(
        Log::open(FileStorage::open(dir2.path()).unwrap(), ORIGIN, key()),
        Err(LogError::Note(_))
    ));
}

/// Records the order of storage calls and fails `sync` on demand.
#[derive(Debug)]
struct Recording {
    inner: FileStorage,
    events: Arc<Mutex<Vec<String>>>,
    fail_sync: Arc<Mutex<bool>>,
}

impl Storage for Recording {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.read(path)
    }
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.events.lock().unwrap().push(format!("write {path}"));
        self.inner.write(path, bytes)
    }
    fn sync(&self) -> Result<(), StorageError> {
        self.events.lock().unwrap().push("sync".into());
        if *self.fail_sync.lock().unwrap() {
            return Err(StorageError::Io {
                op: "fsync directory",
                path: "test".into(),
                source: std::io::Error::other("injected"),
            });
        }
        self.inner.sync()
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.inner.list(prefix)
    }
}

#[test]
fn prepare_syncs_every_bundle_and_tile_before_it_signs() {
    let dir = tempfile::tempdir().unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let fail_sync = Arc::new(Mutex::new(false));
    let storage = Recording {
        inner: FileStorage::open(dir.path()).unwrap(),
        events: events.clone(),
        fail_sync: fail_sync.clone(),
    };
    let mut log = Log::open(storage, ORIGIN, key()).unwrap();
    log.append(&entries(0..600)).unwrap();
    let note = log.prepare_checkpoint(5).unwrap();
    {
        let ev = events.lock().unwrap();
        let sync_at = ev.iter().position(|e| e == "sync").unwrap();
        assert_eq!(
            sync_at,
            ev.len() - 1,
            "nothing written after the sync: {ev:?}"
        );
        for needed in [
            "write tile/entries/000",
            "write tile/entries/001",
            "write tile/entries/002.p/88",
            "write tile/0/001",
            "write tile/0/002.p/88",
            "write tile/1/000.p/2",
        ] {
            assert!(
                ev[..sync_at].iter().any(|e| e == needed),
                "{needed} missing before the sync: {ev:?}"
            );
        }
    }
    log.publish(&note).unwrap();
    {
        let ev = events.lock().unwrap();
        assert_eq!(
            &ev[ev.len() - 3..],
            ["write checkpoints/600", "write checkpoint", "sync"]
        );
    }
    // If the sync fails, nothing is signed and the log refuses to go on.
    log.append(&entries(600..700)).unwrap();
    *fail_sync.lock().unwrap() = true;
    assert!(matches!(
        log.prepare_checkpoint(6),
        Err(LogError::Storage(_))
    ));
    *fail_sync.lock().unwrap() = false;
    assert!(matches!(log.prepare_checkpoint(7), Err(LogError::Failed)));
    assert!(matches!(
        log.append(&entries(700..701)),
        Err(LogError::Failed)
    ));
}

#[test]
fn file_storage_ignores_leftover_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let s = FileStorage::open(dir.path()).unwrap();
    s.write("checkpoint", b"one").unwrap();
    // A crash between creating a temporary file and renaming it leaves this.
    std::fs::write(dir.path().join(".tmp-checkpoint-1-0"), b"half").unwrap();
    assert_eq!(s.list("").unwrap(), vec!["checkpoint"]);
    assert_eq!(s.read("checkpoint").unwrap().unwrap(), b"one");
    s.write("checkpoint", b"two").unwrap();
    assert_eq!(s.read("checkpoint").unwrap().unwrap(), b"two");
}

#[test]
fn a_staged_checkpoint_is_stored_apart_from_the_log_while_appends_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let storage = Arc::new(FileStorage::open(dir.path()).unwrap());
    let mut log = Log::open(Arc::clone(&storage), ORIGIN, clone_key(&k)).unwrap();
    log.append(&entries(0..300)).unwrap();
    let staged = log.stage_checkpoint().unwrap();
    assert_eq!(staged.size(), 300);
    // Appends while the staged objects are stored: bundle 1 fills and is
    // written in full, its staged partial form is written after it.
    log.append(&entries(300..600)).unwrap();
    staged.store(&*storage).unwrap();
    let note = log
        .seal_checkpoint(&staged, Ok(()), 1_700_000_000_000)
        .unwrap();
    let cp = open_checkpoint(&note.text, ORIGIN, &k.verifier()).unwrap();
    assert_eq!(cp.size, 300);
    log.publish(&note).unwrap();
    let second = checkpoint_now(&mut log);
    assert_eq!(
        open_checkpoint(&second.text, ORIGIN, &k.verifier())
            .unwrap()
            .size,
        600
    );
    assert!(
        log.seal_checkpoint(&staged, Ok(()), 0).is_err(),
        "a checkpoint older than the durable size is refused"
    );
    let report = audit(&*storage, ORIGIN, &k.verifier()).unwrap();
    assert_eq!((report.size, report.checkpoints), (600, 2));
    drop(log);
    let mut log = Log::open(Arc::clone(&storage), ORIGIN, clone_key(&k)).unwrap();
    assert_eq!(log.size(), 600);
    for i in [0, 299, 300, 511, 512, 599] {
        assert_eq!(log.entry(i).unwrap(), entry(i));
    }
    // A failed store fails the log: nothing more until it is reopened.
    log.append(&entries(600..610)).unwrap();
    let staged = log.stage_checkpoint().unwrap();
    assert!(
        log.seal_checkpoint(&staged, Err(StorageError::Poisoned), 0)
            .is_err()
    );
    assert!(matches!(
        log.append(&entries(610..611)),
        Err(LogError::Failed)
    ));
}
