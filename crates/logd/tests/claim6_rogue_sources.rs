//! Claim 6 under attack at logd: a principal that writes no journal ships
//! one, a host journals a call executed on another host, an operator floods
//! the alert list to hide what came before, and the log is deleted and
//! rebuilt under the sources' feet. Each is refused or detected, with its
//! record and alert.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use nitrile_api::{Audience, Operation, ResourceId};
use nitrile_audit::{AuditRecord, Journal, JournalReader, Outcome, RequestId};
use nitrile_logclient::{AnchorOptions, Shipper, ShipperOptions};
use nitrile_logd::AlertPage;
use nitrile_logd::alert::{AlertKind, MAX_ALERTS_PER_READ};
use nitrile_tlog::NoteVerifier;
use support::*;

const INTERVAL_MS: u64 = 100;

/// A journal of `source` (`kind/name`) in a scratch directory holding, after
/// `honest` describe records, one record saying operator/bob executed
/// host.drain on host/h1.
fn journal_with_bobs_drain(cell: &TestCell, source: &str, honest: usize) -> PathBuf {
    let now = nitrile_token::Clock::now(&*cell.clock);
    let path = cell
        .scratch(&format!("journal-{}", source.replace('/', "-")))
        .join("journal");
    let writer = principal(source);
    let j = Journal::open(&path, &writer.uri()).unwrap();
    for i in 0..honest {
        let r = AuditRecord::request(now, writer.clone(), RequestId::from_bytes([i as u8; 16]))
            .with_principal(principal("operator/alice"))
            .with_operations([Operation::HostDescribe]);
        j.append(&r.encode().unwrap()).unwrap();
    }
    let drain = AuditRecord::outcome(
        now,
        writer.clone(),
        RequestId::from_bytes([0xbb; 16]),
        Outcome::Executed,
    )
    .with_principal(principal("operator/bob"))
    .with_operations([Operation::HostDrain])
    .with_resources([ResourceId::parse("host/h1").unwrap()])
    .with_audience(Audience::new("h1").unwrap());
    j.append(&drain.encode().unwrap()).unwrap();
    path
}

/// Every log entry whose record names operator/bob.
async fn bobs_entries(cell: &TestCell, logd: &RunningLogd) -> usize {
    let token = audit_token(cell, "auditor/carol").await;
    all_entries(cell, logd, &token)
        .await
        .iter()
        .filter(|e| {
            e.record.as_ref().is_some_and(|r| {
                r["principal"] == principal("operator/bob").uri().as_str() && r["kind"] != "refusal"
            })
        })
        .count()
}

/// Every alert logd lists, read page by page as the auditor.
async fn listed_alerts(cell: &TestCell, logd: &RunningLogd) -> Vec<nitrile_logd::Alert> {
    let token = audit_token(cell, "auditor/carol").await;
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let (status, body) = read(
            cell,
            logd,
            "auditor/carol",
            &format!("/v1/alerts/{after}"),
            Some(&token),
        )
        .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let page: AlertPage = serde_json::from_slice(&body).unwrap();
        assert!(page.alerts.len() <= MAX_ALERTS_PER_READ);
        out.extend(page.alerts);
        match page.next {
            Some(n) => after = n,
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_a_principal_that_writes_no_journal_cannot_ship_one() {
    let cell = TestCell::new().await;
    let logd = start_logd(
        &cell,
        logd_config(&cell, &cell.scratch("logd"), INTERVAL_MS),
    )
    .await;
    // placement writes no journal; it ships one saying bob drained h1.
    let path = journal_with_bobs_drain(&cell, "service/placement", 0);
    let (jref, entries) = journal_batch(&path);
    let (status, body) = ship(&cell, &logd, "service/placement", &jref, &entries).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    let refusal: nitrile_api::wire::Refusal = serde_json::from_slice(&body).unwrap();
    assert!(
        refusal.reason.contains("not a journal source"),
        "{}",
        refusal.reason
    );
    // The refusal is on logd's record, with the alert.
    let seq = refusal.audit_seq.expect("the refusal is journaled");
    let rec = &logd_records(&logd)[(seq - 1) as usize];
    assert_eq!(rec.principal, Some(principal("service/placement")));
    assert_eq!(
        rec.detail.as_ref().unwrap()["integrity_alert"]["kind"],
        "undeclared_source"
    );
    let alert = logd
        .alerts
        .all()
        .into_iter()
        .find(|a| a.kind == AlertKind::UndeclaredSource)
        .expect("an undeclared_source alert");
    assert_eq!(
        alert.principal.as_deref(),
        Some(principal("service/placement").uri().as_str())
    );
    // So does an operator, and logd's own name from outside.
    for who in ["operator/bob", "auditor/carol"] {
        let (status, _) = ship(&cell, &logd, who, &jref, &entries).await;
        assert_eq!(status, 403, "{who}");
    }
    // Nothing of it is in the log as bob's.
    assert_eq!(bobs_entries(&cell, &logd).await, 0);
    logd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_a_host_cannot_journal_a_call_on_another_host() {
    let cell = TestCell::new().await;
    let logd = start_logd(
        &cell,
        logd_config(&cell, &cell.scratch("logd"), INTERVAL_MS),
    )
    .await;
    let _ = host_journal(&cell, "h2", 0);
    // h2's journal: three honest records, then bob's drain of h1.
    let path = journal_with_bobs_drain(&cell, "host/h2", 3);
    let (jref, entries) = journal_batch(&path);
    let (status, body) = ship(&cell, &logd, "host/h2", &jref, &entries).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    let refusal: nitrile_api::wire::Refusal = serde_json::from_slice(&body).unwrap();
    assert!(refusal.reason.contains("record 4"), "{}", refusal.reason);
    let alert = logd
        .alerts
        .all()
        .into_iter()
        .find(|a| a.kind == AlertKind::BadRecord)
        .expect("a bad_record alert");
    assert_eq!(alert.detail["violation"]["problem"], "other_audience");
    assert_eq!(alert.audit_seq, refusal.audit_seq);
    // The honest records before it are in the log; the drain is not.
    let mut c = logd_client(&cell, &logd, "host/h2").await;
    let (status, body) = send_raw(&mut c, "GET", "/v1/ingest/head/host/h2", b"", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<nitrile_logclient::protocol::SourceHead>(&body)
            .unwrap()
            .acked_seq,
        3
    );
    assert_eq!(bobs_entries(&cell, &logd).await, 0);
    // Resent, it is refused again (the journal cannot move past it).
    let (status, _) = ship(&cell, &logd, "host/h2", &jref, &entries[3..]).await;
    assert_eq!(status, 409);
    // A record in h4's journal that says h3 wrote it is refused too.
    let _ = host_journal(&cell, "h4", 0);
    let now = nitrile_token::Clock::now(&*cell.clock);
    let p4 = cell.scratch("journal-h4-claims-h3").join("journal");
    let j4 = Journal::open(&p4, &host_principal("h4").uri()).unwrap();
    let claimed = AuditRecord::request(now, host_principal("h3"), RequestId::from_bytes([3; 16]))
        .with_principal(principal("operator/alice"))
        .with_operations([Operation::HostDescribe]);
    j4.append(&claimed.encode().unwrap()).unwrap();
    let (ref4, entries4) = journal_batch(&p4);
    let (status, _) = ship(&cell, &logd, "host/h4", &ref4, &entries4).await;
    assert_eq!(status, 409);
    assert!(
        logd.alerts
            .all()
            .iter()
            .any(|a| a.kind == AlertKind::BadRecord
                && a.detail["violation"]["problem"] == "other_source")
    );
    logd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_an_alert_flood_neither_evicts_nor_hides_earlier_alerts() {
    let cell = TestCell::new().await;
    let logd = start_logd(
        &cell,
        logd_config(&cell, &cell.scratch("logd"), INTERVAL_MS),
    )
    .await;
    // A real alert first: h1 withholds a record.
    let path = host_journal(&cell, "h1", 4);
    let (jref, entries) = journal_batch(&path);
    let (status, _) = ship(&cell, &logd, "host/h1", &jref, &entries[1..2]).await;
    assert_eq!(status, 409);
    // Then bob floods logd with bogus ingests over one connection.
    const FLOOD: usize = 1_500;
    let bogus = journal_with_bobs_drain(&cell, "operator/bob", 0);
    let (bref, bentries) = journal_batch(&bogus);
    let body = serde_json::to_vec(&nitrile_logclient::protocol::IngestBatch {
        journal: bref,
        entries: bentries,
        head: None,
    })
    .unwrap();
    let mut c = logd_client(&cell, &logd, "operator/bob").await;
    for _ in 0..FLOOD {
        let (status, _) = send_raw(&mut c, "POST", "/v1/ingest", &body, None).await;
        assert_eq!(status, 403);
    }
    // Every request is on the record...
    let refused = logd_records(&logd)
        .iter()
        .filter(|r| r.principal == Some(principal("operator/bob")))
        .count();
    assert_eq!(refused, FLOOD);
    // ...but the flood is one alert that counts them, delivered once.
    let delivered = logd
        .alerts
        .all()
        .into_iter()
        .filter(|a| a.kind == AlertKind::UndeclaredSource)
        .count();
    assert_eq!(delivered, 1);
    let listed = listed_alerts(&cell, &logd).await;
    let flood: Vec<_> = listed
        .iter()
        .filter(|a| a.kind == AlertKind::UndeclaredSource)
        .collect();
    assert_eq!(flood.len(), 1);
    assert_eq!(flood[0].count, FLOOD as u64);
    // The earlier gap alert is still listed and served.
    assert!(
        listed.iter().any(|a| a.kind == AlertKind::Gap
            && a.source.as_deref() == Some(host_principal("h1").uri().as_str())),
        "{listed:?}"
    );
    logd.stop().await;
}

/// A shipper of `path` as `kind_name` that anchors the journal, with its
/// memory in `anchor_file` and alerts journaled into `writer`.
fn anchored_shipper(
    cell: &TestCell,
    logd: &RunningLogd,
    path: &Path,
    kind_name: &str,
    writer: std::sync::Arc<Journal>,
    anchor_file: &Path,
) -> nitrile_logclient::ShipperHandle {
    Shipper::spawn_with(
        path.to_owned(),
        logd.addr.to_string(),
        logd_principal(),
        cell.tls_for(kind_name),
        ShipperOptions {
            poll: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            journal: Some(writer),
            anchor: Some(AnchorOptions {
                origin: logd.origin.clone(),
                verifier: NoteVerifier::from_vkey(&logd.vkey).unwrap(),
                state_file: anchor_file.to_owned(),
                interval: Duration::from_millis(100),
            }),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_a_source_detects_a_log_rewritten_under_it() {
    let cell = TestCell::new().await;
    let state = cell.scratch("logd");
    let logd = start_logd(&cell, logd_config(&cell, &state, INTERVAL_MS)).await;
    let now = nitrile_token::Clock::now(&*cell.clock);
    nitrile_cell::provision_host(
        &cell.layout,
        &cell.cell,
        &nitrile_api::Name::new("h2").unwrap(),
        now,
    )
    .unwrap();
    let dir = cell.scratch("h2");
    let path = dir.join("journal");
    let anchor_file = dir.join("log-anchor.json");
    let writer = std::sync::Arc::new(Journal::open(&path, &host_principal("h2").uri()).unwrap());
    let append = |n: u8| {
        for i in 0..n {
            let r = AuditRecord::request(now, host_principal("h2"), RequestId::from_bytes([i; 16]))
                .with_principal(principal("operator/alice"))
                .with_operations([Operation::HostDescribe]);
            writer.append(&r.encode().unwrap()).unwrap();
        }
    };
    append(20);
    let shipper = anchored_shipper(&cell, &logd, &path, "host/h2", writer.clone(), &anchor_file);
    wait_until("the journal is anchored", async || {
        shipper.status().anchored_size > 0
    })
    .await;
    let remembered = nitrile_logclient::RememberedCheckpoint::load(&anchor_file)
        .unwrap()
        .unwrap();
    assert!(remembered.seq >= 1);
    // logd's own records (an auditor's read) interleave with the host's;
    // growth stays consistent: the remembered tree advances, no alert.
    let _ = listed_alerts(&cell, &logd).await;
    wait_until("logd's read is in the log", async || {
        logd.seen
            .all()
            .iter()
            .any(|(_, source, _)| *source == logd_principal().uri())
    })
    .await;
    append(5);
    let before = remembered.size;
    wait_until("the anchor advances", async || {
        shipper.status().anchored_size > before
    })
    .await;
    assert_eq!(shipper.status().alerts, 0);
    shipper.stop().await;

    // A thief of logd's state deletes the log (keeping its key) and starts it
    // again: a shorter, different log under the same key.
    logd.stop().await;
    for f in ["log", "sources.json", "journal"] {
        let p = state.join(f);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
    let logd = start_logd(&cell, logd_config(&cell, &state, INTERVAL_MS)).await;
    let shipper = anchored_shipper(&cell, &logd, &path, "host/h2", writer.clone(), &anchor_file);
    wait_until("the source raises log_inconsistent", async || {
        shipper.status().alerts > 0
    })
    .await;
    // The alert is a record of the source's own journal...
    let alerts_in_journal: Vec<_> = JournalReader::open(&path)
        .unwrap()
        .filter_map(|e| e.unwrap().record().ok())
        .filter(|r| {
            r.detail
                .as_ref()
                .is_some_and(|d| d["integrity_alert"]["kind"] == "log_inconsistent")
        })
        .collect();
    assert!(!alerts_in_journal.is_empty());
    // ...which reaches the new log and its alert list.
    wait_until("logd lists the source's alert", async || {
        listed_alerts(&cell, &logd).await.iter().any(|a| {
            a.kind == AlertKind::LogInconsistent
                && a.source.as_deref() == Some(host_principal("h2").uri().as_str())
        })
    })
    .await;
    // The remembered checkpoint was not replaced by the rewritten log's.
    let still = nitrile_logclient::RememberedCheckpoint::load(&anchor_file)
        .unwrap()
        .unwrap();
    assert!(still.size >= remembered.size);
    assert_ne!(still.checkpoint, "");
    shipper.stop().await;
    logd.stop().await;
}
