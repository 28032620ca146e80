//! The log over PostgreSQL: a private server is started for the test (its
//! own data directory, listening only on a unix socket in that directory).

#[path = "support/pg_server.rs"]
mod pg_server;

use nitrile_tlog::{
    Log, MAX_OBJECT_SIZE, NoteSigner, NoteVerifier, PgStorage, Storage, StorageError, audit,
    leaf_hash, open_checkpoint, verify_consistency, verify_inclusion,
};

use pg_server::Server;

const ORIGIN: &str = "local.nitrile/log";

fn signer() -> (NoteSigner, NoteVerifier) {
    let s = NoteSigner::generate(ORIGIN).unwrap();
    let v = s.verifier();
    (s, v)
}

fn append_and_publish(log: &mut Log<PgStorage>, from: u64, to: u64, now: u64) -> String {
    let batch: Vec<Vec<u8>> = (from..to)
        .map(|i| format!("record {i}").into_bytes())
        .collect();
    assert_eq!(log.append(&batch).unwrap(), from);
    let note = log.prepare_checkpoint(now).unwrap();
    log.publish(&note).unwrap();
    note.text
}

fn flip_byte(server: &Server, log: &str, path: &str, at: i32) {
    let n = server
        .client()
        .execute(
            "UPDATE tlog_objects SET bytes = set_byte(bytes, $3, get_byte(bytes, $3) # 1) \
             WHERE log = $1 AND path = $2",
            &[&log, &path, &at],
        )
        .unwrap();
    assert_eq!(n, 1, "{path}");
}

#[test]
fn log_over_postgres_appends_recovers_audits_and_catches_tampering() {
    let Some(server) = Server::start() else {
        return;
    };
    let (s, verifier) = signer();
    let skey = s.to_skey();

    let mut log = Log::open(server.storage("main"), ORIGIN, s).unwrap();
    append_and_publish(&mut log, 0, 100, 1_000);
    let first = append_and_publish(&mut log, 100, 300, 2_000);
    let cp300 = open_checkpoint(&first, ORIGIN, &verifier).unwrap();
    assert_eq!((cp300.size, cp300.root), (300, log.root()));
    for i in [0u64, 1, 255, 256, 299] {
        let proof = log.inclusion_proof(i, 300).unwrap();
        let leaf = leaf_hash(format!("record {i}").as_bytes());
        verify_inclusion(&leaf, i, 300, &proof, &cp300.root).unwrap();
        assert_eq!(log.entry(i).unwrap(), format!("record {i}").into_bytes());
    }
    // Entries appended but never checkpointed, then the process goes away.
    log.append(&[b"unsynced".to_vec()]).unwrap();
    drop(log);

    // Reopen from the same database: the log continues where it was synced.
    let mut log = Log::open(
        server.storage("main"),
        ORIGIN,
        NoteSigner::from_skey(&skey).unwrap(),
    )
    .unwrap();
    assert_eq!(log.size(), 300);
    assert_eq!(log.root(), cp300.root);
    assert_eq!(log.checkpoint().unwrap().text, first);
    let second = append_and_publish(&mut log, 300, 700, 3_000);
    let cp700 = open_checkpoint(&second, ORIGIN, &verifier).unwrap();
    let proof = log.consistency_proof(300, 700).unwrap();
    verify_consistency(300, 700, &cp300.root, &cp700.root, &proof).unwrap();
    let proof = log.inclusion_proof(650, 700).unwrap();
    verify_inclusion(&leaf_hash(b"record 650"), 650, 700, &proof, &cp700.root).unwrap();
    drop(log);

    // The whole-log audit over the database.
    let storage = server.storage("main");
    let report = audit(&storage, ORIGIN, &verifier).unwrap();
    assert_eq!((report.size, report.root), (700, cp700.root));
    let bundles = storage.list("tile/entries/").unwrap();
    assert_eq!(report.checkpoints, 3);
    assert_eq!(report.bundles, bundles.len() as u64, "{bundles:?}");

    // Tampering with one row is caught, and the audit names the row.
    for path in ["tile/entries/001", "tile/0/002.p/188"] {
        assert!(storage.read(path).unwrap().is_some(), "{path}");
        flip_byte(&server, "main", path, 7);
        let err = audit(&storage, ORIGIN, &verifier).expect_err("tampering must be caught");
        assert_eq!(err.path, path, "{err}");
        assert!(err.to_string().contains(path), "{err}");
        flip_byte(&server, "main", path, 7);
        audit(&storage, ORIGIN, &verifier).unwrap();
    }
}

#[test]
fn storage_semantics() {
    let Some(server) = Server::start() else {
        return;
    };
    let a = server.storage("a");
    let b = server.storage("b");

    // Two logs in one table do not see each other's objects.
    a.write("checkpoint", b"a's").unwrap();
    a.write("tile/0/000", b"a0").unwrap();
    a.sync().unwrap();
    assert_eq!(b.read("checkpoint").unwrap(), None);
    assert!(b.list("").unwrap().is_empty());
    b.write("checkpoint", b"b's").unwrap();
    b.sync().unwrap();
    assert_eq!(a.read("checkpoint").unwrap().unwrap(), b"a's");
    assert_eq!(b.read("checkpoint").unwrap().unwrap(), b"b's");
    assert_eq!(a.list("").unwrap(), vec!["checkpoint", "tile/0/000"]);

    // Replace, list in byte order, and a prefix's `_` is not a wildcard.
    a.write("tile/0/000", b"a0'").unwrap();
    a.write("a_b/x", b"1").unwrap();
    a.write("axb/y", b"2").unwrap();
    a.write("B", b"3").unwrap();
    assert_eq!(a.read("tile/0/000").unwrap().unwrap(), b"a0'");
    assert_eq!(a.list("a_b").unwrap(), vec!["a_b/x"]);
    assert_eq!(
        a.list("").unwrap(),
        vec!["B", "a_b/x", "axb/y", "checkpoint", "tile/0/000"]
    );

    // Writes are visible to another session only once synced.
    let other = server.storage("a");
    assert_eq!(other.read("a_b/x").unwrap(), None);
    assert_eq!(other.read("tile/0/000").unwrap().unwrap(), b"a0");
    a.sync().unwrap();
    assert_eq!(other.read("a_b/x").unwrap().unwrap(), b"1");

    // Unsynced writes of a storage that goes away are rolled back whole.
    a.write("tile/0/001", b"lost").unwrap();
    a.write("tile/0/000", b"lost").unwrap();
    drop(a);
    let a = server.storage("a");
    assert_eq!(a.read("tile/0/001").unwrap(), None);
    assert_eq!(a.read("tile/0/000").unwrap().unwrap(), b"a0'");

    // A checkpoint write is committed at once.
    a.write("tile/0/002", b"with the checkpoint").unwrap();
    a.write("checkpoint", b"a's second").unwrap();
    assert_eq!(other.read("checkpoint").unwrap().unwrap(), b"a's second");
    assert_eq!(
        other.read("tile/0/002").unwrap().unwrap(),
        b"with the checkpoint"
    );

    // Size bound on both sides, bad paths refused.
    let big = vec![0u8; MAX_OBJECT_SIZE + 1];
    assert!(matches!(
        a.write("tile/0/003", &big),
        Err(StorageError::TooLarge(_))
    ));
    server
        .client()
        .execute(
            "INSERT INTO tlog_objects (log, path, bytes) VALUES ('a', 'tile/0/004', $1)",
            &[&big],
        )
        .unwrap();
    assert!(matches!(
        a.read("tile/0/004"),
        Err(StorageError::TooLarge(_))
    ));
    for bad in ["", "/abs", "a/../b", "a b"] {
        assert!(
            matches!(a.write(bad, b"x"), Err(StorageError::InvalidPath(_))),
            "{bad}"
        );
    }

    // When the session dies with writes buffered, they are lost, and sync
    // never reports success for them.
    let victim = PgStorage::connect(
        &format!("{} application_name=victim", server.conninfo()),
        "a",
    )
    .unwrap();
    victim.write("tile/0/005", b"buffered").unwrap();
    let killed: bool = server
        .client()
        .query_one(
            "SELECT bool_and(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'victim'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(killed);
    assert!(matches!(
        victim.write("tile/0/006", b"after"),
        Err(StorageError::Database { .. })
    ));
    for _ in 0..2 {
        assert!(matches!(victim.sync(), Err(StorageError::Database { .. })));
    }
    assert_eq!(other.read("tile/0/005").unwrap(), None);
}
