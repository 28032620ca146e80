//! logd with its transparency log in PostgreSQL (`[storage] postgres`), on a
//! private server started for the test: records shipped, acknowledged and
//! checkpointed; the log recovered from the database after a restart; proofs
//! served and verified; the whole-log audit run over the database, and a row
//! altered with SQL caught by it; a database lost while running refuses
//! ingest like a failed disk; a database that cannot be reached stops the
//! start with an error that names it and not its password.

mod support;

#[path = "../../tlog/tests/support/pg_server.rs"]
mod pg_server;

use nitrile_api::Name;
use nitrile_audit::RecordKind;
use nitrile_logclient::Conninfo;
use nitrile_logd::{Logd, LogdOptions};
use nitrile_tlog::{
    Checkpoint, NoteVerifier, PgStorage, Storage as _, audit, leaf_hash, open_checkpoint,
    verify_consistency, verify_inclusion,
};
use pg_server::Server;
use support::*;

const INTERVAL_MS: u64 = 200;
const LOG_NAME: &str = "cell-a";

/// Runs `f` (the synchronous database client) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn start_server() -> Option<std::sync::Arc<Server>> {
    blocking(Server::start).await.map(std::sync::Arc::new)
}

async fn checkpoint(cell: &TestCell, logd: &RunningLogd, token: &str) -> Option<Checkpoint> {
    let (status, body) = read(
        cell,
        logd,
        "auditor/carol",
        "/v1/log/checkpoint",
        Some(token),
    )
    .await;
    if status == 404 {
        return None;
    }
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let verifier = NoteVerifier::from_vkey(&logd.vkey).unwrap();
    Some(open_checkpoint(std::str::from_utf8(&body).unwrap(), &logd.origin, &verifier).unwrap())
}

/// Waits for a published checkpoint of at least `size` entries.
async fn checkpoint_of(cell: &TestCell, logd: &RunningLogd, token: &str, size: u64) -> Checkpoint {
    wait_until("a checkpoint covers the records", async || {
        checkpoint(cell, logd, token)
            .await
            .is_some_and(|c| c.size >= size)
    })
    .await;
    checkpoint(cell, logd, token).await.unwrap()
}

fn pg_config(cell: &TestCell, server: &Server, extra: &str) -> nitrile_logd::LogdConfig {
    let state = cell.scratch("logd");
    let mut config = logd_config(cell, &state, INTERVAL_MS);
    config.storage.postgres =
        Some(Conninfo::new(&format!("{} {extra}", server.conninfo())).unwrap());
    config.storage.log_name = Some(Name::new(LOG_NAME).unwrap());
    config
}

/// The rows the database holds for the log.
async fn rows(server: &std::sync::Arc<Server>) -> i64 {
    let server = std::sync::Arc::clone(server);
    blocking(move || {
        server
            .client()
            .query_one(
                "SELECT count(*) FROM tlog_objects WHERE log = $1",
                &[&LOG_NAME],
            )
            .unwrap()
            .get(0)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_in_postgres_ingests_recovers_proves_and_audits_and_catches_tampering() {
    let Some(server) = start_server().await else {
        return;
    };
    let cell = TestCell::new().await;
    let config = pg_config(&cell, &server, "");
    let logd = start_logd(&cell, config.clone()).await;
    let path = host_journal(&cell, "h3", 40);
    let (jref, entries) = journal_batch(&path);
    let (status, body) = ship(&cell, &logd, "host/h3", &jref, &entries[..25]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let token = audit_token(&cell, "auditor/carol").await;
    let first = all_entries(&cell, &logd, &token).await;
    let first_cp = checkpoint_of(&cell, &logd, &token, first.len() as u64).await;
    // The log is in the database, not in files under the state directory;
    // logd's own journal and source states are files.
    assert!(!config.state.join("log").exists());
    assert!(config.state.join("journal").is_file());
    assert!(rows(&server).await > 0);
    let (vkey, origin) = (logd.vkey.clone(), logd.origin.clone());
    logd.stop().await;
    assert!(config.state.join("sources.json").is_file());

    // The checkpoint logd left in the database when it stopped.
    let verifier = NoteVerifier::from_vkey(&vkey).unwrap();
    let conninfo = server.conninfo();
    let stopped = {
        let (conninfo, origin, verifier) = (conninfo.clone(), origin.clone(), verifier.clone());
        blocking(move || {
            let storage = PgStorage::connect(&conninfo, LOG_NAME).unwrap();
            let text = String::from_utf8(storage.read("checkpoint").unwrap().unwrap()).unwrap();
            open_checkpoint(&text, &origin, &verifier).unwrap()
        })
        .await
    };
    assert!(stopped.size >= first_cp.size);

    // Restarted on the same database: the same log, grown further.
    let logd = start_logd(&cell, config.clone()).await;
    assert_eq!(logd.vkey, verifier.to_vkey());
    let (status, body) = ship(&cell, &logd, "host/h3", &jref, &entries[25..]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let all = all_entries(&cell, &logd, &token).await;
    assert_eq!(all[..first.len()], first[..], "the log kept what it held");
    let cp = checkpoint_of(&cell, &logd, &token, all.len() as u64).await;
    assert!(cp.size > stopped.size);
    let (status, body) = read(
        &cell,
        &logd,
        "auditor/carol",
        &format!("/v1/log/proof/consistency/{}/{}", stopped.size, cp.size),
        Some(&token),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    verify_consistency(
        stopped.size,
        cp.size,
        &stopped.root,
        &cp.root,
        &hashes(&body),
    )
    .unwrap();

    // Every host record is in the log, proven against the checkpoint with a
    // leaf computed from the host's journal.
    let h3 = host_principal("h3").uri();
    let logged: Vec<_> = all.iter().filter(|e| e.source == h3).collect();
    assert_eq!(logged.len(), entries.len());
    for e in logged {
        let leaf = leaf_of(&jref, &entries[(e.seq - 1) as usize]);
        let (status, body) = read(
            &cell,
            &logd,
            "auditor/carol",
            &format!("/v1/log/proof/inclusion/{}/{}", e.index, cp.size),
            Some(&token),
        )
        .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        verify_inclusion(
            &leaf_hash(&leaf),
            e.index,
            cp.size,
            &hashes(&body),
            &cp.root,
        )
        .unwrap();
    }
    logd.stop().await;

    // The whole-log audit over the database, then a row altered with SQL.
    let server2 = std::sync::Arc::clone(&server);
    blocking(move || {
        let storage = PgStorage::connect(&conninfo, LOG_NAME).unwrap();
        let report = audit(&storage, &origin, &verifier).unwrap();
        assert!(report.size >= cp.size);
        assert!(report.checkpoints >= 2);
        let bundles = storage.list("tile/entries/").unwrap();
        assert!(!bundles.is_empty(), "no entry bundle");
        let flip = |server: &Server, path: &str| {
            let n = server
                .client()
                .execute(
                    "UPDATE tlog_objects SET bytes = set_byte(bytes, 7, get_byte(bytes, 7) # 1) \
                     WHERE log = $1 AND path = $2",
                    &[&LOG_NAME, &path],
                )
                .unwrap();
            assert_eq!(n, 1);
        };
        // Partial bundles superseded by a later checkpoint's are not part
        // of the checkpointed log; every bundle the audit reads must be
        // caught when altered, and at least one is.
        let mut caught = 0;
        for path in &bundles {
            flip(&server2, path);
            if let Err(err) = audit(&storage, &origin, &verifier) {
                assert_eq!(&err.path, path, "{err}");
                assert!(err.to_string().contains(path.as_str()), "{err}");
                caught += 1;
            }
            flip(&server2, path);
            audit(&storage, &origin, &verifier).unwrap();
        }
        assert!(
            caught >= 1,
            "no altered entry bundle was caught: {bundles:?}"
        );
    })
    .await;
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_lost_while_running_refuses_ingest_like_a_failed_disk() {
    let Some(server) = start_server().await else {
        return;
    };
    let cell = TestCell::new().await;
    let config = pg_config(&cell, &server, "application_name=logd-under-test");
    let logd = start_logd(&cell, config.clone()).await;
    let path = host_journal(&cell, "h4", 12);
    let (jref, entries) = journal_batch(&path);
    let (status, _) = ship(&cell, &logd, "host/h4", &jref, &entries[..6]).await;
    assert_eq!(status, 200);
    let token = audit_token(&cell, "auditor/carol").await;
    let published = checkpoint_of(&cell, &logd, &token, 6).await;
    let (vkey, origin) = (logd.vkey.clone(), logd.origin.clone());

    // The database ends logd's session.
    let s = std::sync::Arc::clone(&server);
    let ended: bool = blocking(move || {
        s.client()
            .query_one(
                "SELECT coalesce(bool_and(pg_terminate_backend(pid)), false) \
                 FROM pg_stat_activity WHERE application_name = 'logd-under-test'",
                &[],
            )
            .unwrap()
            .get(0)
    })
    .await;
    assert!(ended);

    // Nothing more is acknowledged, now or later; each refusal is journaled.
    for _ in 0..2 {
        let (status, body) = ship(&cell, &logd, "host/h4", &jref, &entries[6..]).await;
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
        let r = refusal(&body);
        assert!(r.reason.contains("cannot store"), "{}", r.reason);
        let rec = &logd_records(&logd)[(r.audit_seq.unwrap() - 1) as usize];
        assert_eq!(rec.kind, RecordKind::Refusal);
    }
    let (status, _) = ship(&cell, &logd, "host/h4", &jref, &entries[..6]).await;
    assert_eq!(status, 503, "a duplicate is not acknowledged either");
    logd.stop().await;

    // What was acknowledged is in the database, whole.
    let verifier = NoteVerifier::from_vkey(&vkey).unwrap();
    let conninfo = server.conninfo();
    let report = blocking(move || {
        let storage = PgStorage::connect(&conninfo, LOG_NAME).unwrap();
        audit(&storage, &origin, &verifier).unwrap()
    })
    .await;
    assert!(report.size >= published.size);

    // Restarted, logd continues from the database.
    let logd = start_logd(&cell, config).await;
    let (status, body) = ship(&cell, &logd, "host/h4", &jref, &entries[6..]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    logd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_stops_the_start_naming_it_but_not_its_password() {
    let cell = TestCell::new().await;
    let state = cell.scratch("logd");
    let nowhere = cell.scratch("no-server");
    let mut config = logd_config(&cell, &state, INTERVAL_MS);
    config.storage.postgres = Some(
        Conninfo::new(&format!(
            "host={} user=nitrile password=hunter2 dbname=audit",
            nowhere.display()
        ))
        .unwrap(),
    );
    let options = LogdOptions {
        clock: cell.clock.clone(),
        stdout_alerts: false,
        ..LogdOptions::default()
    };
    let err = Logd::open(&config, options)
        .await
        .expect_err("no database, no logd");
    let text = chain(&err);
    assert!(
        text.contains(&format!("host={} dbname=audit", nowhere.display())),
        "{text}"
    );
    assert!(
        text.contains("`local`"),
        "the log name defaults to the cell: {text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
}
