//! Claim 6 end to end at logd: host and token service journals shipped over
//! mTLS into the transparency log, resumed after restarts without
//! duplicates; withheld, forged and foreign records refused with integrity
//! alerts; auditor reads verified against signed checkpoints and journaled;
//! operator reads refused and journaled.

mod support;

use std::collections::BTreeMap;

use nitrile_api::Operation;
use nitrile_audit::{ChainHash, RecordKind};
use nitrile_logclient::protocol::{IngestAck, SourceHead};
use nitrile_logclient::{Shipper, ShipperHandle};
use nitrile_logd::alert::AlertKind;
use nitrile_tlog::{
    NoteVerifier, leaf_hash, open_checkpoint, verify_consistency, verify_inclusion,
};
use support::*;

const INTERVAL_MS: u64 = 200;

fn ship_journal(
    cell: &TestCell,
    logd: &RunningLogd,
    path: &std::path::Path,
    kind_name: &str,
) -> ShipperHandle {
    Shipper::spawn(
        path.to_owned(),
        logd.addr.to_string(),
        logd_principal(),
        cell.tls_for(kind_name),
    )
}

fn journal_head(path: &std::path::Path) -> u64 {
    nitrile_audit::verify_journal(path).unwrap().last_seq
}

/// Per source, the sequence numbers the log holds, in log order.
fn seqs_by_source(
    entries: &[nitrile_logclient::protocol::EntryBody],
) -> BTreeMap<String, Vec<u64>> {
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.index, i as u64);
        m.entry(e.source.clone()).or_default().push(e.seq);
    }
    m
}

async fn checkpoint(cell: &TestCell, logd: &RunningLogd, token: &str) -> nitrile_tlog::Checkpoint {
    let (status, body) = read(
        cell,
        logd,
        "auditor/carol",
        "/v1/log/checkpoint",
        Some(token),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    open_note(logd, &body)
}

/// The published checkpoint's size, 0 before the first.
async fn checkpoint_size(cell: &TestCell, logd: &RunningLogd, token: &str) -> u64 {
    let (status, body) = read(
        cell,
        logd,
        "auditor/carol",
        "/v1/log/checkpoint",
        Some(token),
    )
    .await;
    if status == 404 {
        return 0;
    }
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    open_note(logd, &body).size
}

fn open_note(logd: &RunningLogd, body: &[u8]) -> nitrile_tlog::Checkpoint {
    let verifier = NoteVerifier::from_vkey(&logd.vkey).unwrap();
    open_checkpoint(std::str::from_utf8(body).unwrap(), &logd.origin, &verifier).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_journals_are_shipped_acked_and_resumed_without_duplicates() {
    let mut cell = TestCell::with_hosts(&["h1"]).await;
    describe(&cell, 3).await;
    let state = cell.scratch("logd");
    let logd = start_logd(&cell, logd_config(&cell, &state, INTERVAL_MS)).await;
    let host_journal = cell.host_journal("h1");
    let tokend_journal = cell.tokend_journal();
    let host = ship_journal(&cell, &logd, &host_journal, "host/h1");
    let tokend = ship_journal(&cell, &logd, &tokend_journal, "service/tokend");
    let h1 = host_principal("h1").uri();
    let td = tokend_principal().uri();

    let want = journal_head(&host_journal);
    assert!(want >= 6, "3 calls make request and outcome records");
    wait_until("the host journal is acknowledged", async || {
        host.status().shipped_seq == want
    })
    .await;
    let want_td = journal_head(&tokend_journal);
    wait_until("the token service journal is acknowledged", async || {
        tokend.status().shipped_seq >= want_td
    })
    .await;
    assert_eq!(host.status().last_error, None);

    let token = audit_token(&cell, "auditor/carol").await;
    let before = all_entries(&cell, &logd, &token).await;
    let by = seqs_by_source(&before);
    assert_eq!(by[&h1], (1..=want).collect::<Vec<_>>());
    assert!(by[&td].len() as u64 >= want_td);
    // The observer saw each logged host record once.
    let seen: Vec<u64> = logd
        .seen
        .all()
        .into_iter()
        .filter(|(_, s, _)| *s == h1)
        .map(|(_, _, seq)| seq)
        .collect();
    assert_eq!(seen, (1..=want).collect::<Vec<_>>());
    // The records are the host's own, byte for byte.
    let (jref, entries) = journal_batch(&host_journal);
    for e in before.iter().filter(|e| e.source == h1) {
        let orig = &entries[(e.seq - 1) as usize];
        assert_eq!(e.hash, orig.hash);
        assert_eq!(
            e.record.as_ref().unwrap(),
            &serde_json::from_slice::<serde_json::Value>(&orig.payload).unwrap()
        );
        assert_eq!(e.journal_id, jref.journal_id);
    }
    wait_until("a checkpoint covers what was shipped", async || {
        checkpoint_size(&cell, &logd, &token).await >= before.len() as u64
    })
    .await;
    let first_cp = checkpoint(&cell, &logd, &token).await;

    // Restart both, with more records written meanwhile.
    host.stop().await;
    tokend.stop().await;
    logd.stop().await;
    describe(&cell, 2).await;
    let logd = start_logd(&cell, logd_config(&cell, &state, INTERVAL_MS)).await;
    let host = ship_journal(&cell, &logd, &host_journal, "host/h1");
    let want = journal_head(&host_journal);
    wait_until(
        "the host journal is acknowledged after restarts",
        async || host.status().shipped_seq == want,
    )
    .await;
    // The head logd reports for the host is its journal's head.
    let mut c = logd_client(&cell, &logd, "host/h1").await;
    let (status, body) = send_raw(&mut c, "GET", "/v1/ingest/head/host/h1", b"", None).await;
    assert_eq!(status, 200);
    let head: SourceHead = serde_json::from_slice(&body).unwrap();
    assert_eq!(head.acked_seq, want);
    assert_eq!(head.journal_id, Some(jref.journal_id));
    // A resend of what the log holds is idempotent.
    let (jref, entries) = journal_batch(&host_journal);
    let (status, body) = ship(&cell, &logd, "host/h1", &jref, &entries[2..]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        serde_json::from_slice::<IngestAck>(&body)
            .unwrap()
            .acked_seq,
        want
    );

    let token = audit_token(&cell, "auditor/carol").await;
    let after = all_entries(&cell, &logd, &token).await;
    let by = seqs_by_source(&after);
    assert_eq!(
        by[&h1],
        (1..=want).collect::<Vec<_>>(),
        "each host record exactly once"
    );
    // logd's own journal (the reads above) is in the log too, in order.
    let own = &by[&logd_principal().uri()];
    assert_eq!(*own, (1..=own.len() as u64).collect::<Vec<_>>());
    assert!(!own.is_empty());
    // The log only grew: the old checkpoint is consistent with the new one.
    wait_until("a checkpoint covers the new records", async || {
        checkpoint_size(&cell, &logd, &token).await >= after.len() as u64
    })
    .await;
    let cp = checkpoint(&cell, &logd, &token).await;
    let (status, body) = read(
        &cell,
        &logd,
        "auditor/carol",
        &format!("/v1/log/proof/consistency/{}/{}", first_cp.size, cp.size),
        Some(&token),
    )
    .await;
    assert_eq!(status, 200);
    let proof = hashes(&body);
    verify_consistency(first_cp.size, cp.size, &first_cp.root, &cp.root, &proof).unwrap();
    host.stop().await;
    logd.stop().await;
    // The journals were only read.
    nitrile_audit::verify_journal(&host_journal).unwrap();
    cell.stop_host("h1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_withheld_forged_and_foreign_records_raise_integrity_alerts() {
    let cell = TestCell::new().await;
    let state = cell.scratch("logd");
    let logd = start_logd(&cell, logd_config(&cell, &state, INTERVAL_MS)).await;
    let path = host_journal(&cell, "h2", 10);
    let (jref, entries) = journal_batch(&path);
    let h2 = host_principal("h2").uri();

    // Records 1..=5 shipped and acknowledged.
    let (status, body) = ship(&cell, &logd, "host/h2", &jref, &entries[..5]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        serde_json::from_slice::<IngestAck>(&body)
            .unwrap()
            .acked_seq,
        5
    );

    // Record 6 withheld: 7 shipped. Refused, alert raised by the time the
    // answer comes back (well within one checkpoint interval).
    let (status, body) = ship(&cell, &logd, "host/h2", &jref, &entries[6..7]).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    let refusal = refusal(&body);
    assert!(
        refusal.reason.contains("INTEGRITY ALERT"),
        "{}",
        refusal.reason
    );
    let alerts = logd.alerts.all();
    let gap = alerts
        .iter()
        .find(|a| a.kind == AlertKind::Gap)
        .expect("a gap alert");
    assert_eq!(gap.source.as_deref(), Some(h2.as_str()));
    assert_eq!(gap.detail["violation"]["acked_seq"], 5);
    assert_eq!(gap.detail["violation"]["got"], 7);
    assert_eq!(gap.audit_seq, refusal.audit_seq);
    // The alert is a record of logd's journal.
    let records = logd_records(&logd);
    let rec = &records[(gap.audit_seq.unwrap() - 1) as usize];
    assert_eq!(rec.kind, RecordKind::Refusal);
    assert_eq!(rec.principal.as_ref().map(|p| p.uri()), Some(h2.clone()));
    assert!(rec.detail.as_ref().unwrap()["integrity_alert"]["kind"] == "gap");

    // A forged record 6 (payload changed, hash kept) is a chain break.
    let mut forged = entries[5].clone();
    forged.payload = entries[4].payload.clone();
    let (status, _) = ship(&cell, &logd, "host/h2", &jref, &[forged]).await;
    assert_eq!(status, 409);
    // So is a record 6 with a recomputed hash over a rewritten payload
    // that does not chain to what the log holds.
    let mut rehashed = entries[5].clone();
    rehashed.payload = b"{\"forged\":true}".to_vec();
    rehashed.hash = nitrile_audit::record_hash(&ChainHash([0; 32]), 6, &rehashed.payload);
    let (status, _) = ship(&cell, &logd, "host/h2", &jref, &[rehashed]).await;
    assert_eq!(status, 409);
    // The second is a repeat of the first (same kind, source and problem):
    // delivered once, counted twice.
    let breaks: Vec<_> = logd
        .alerts
        .all()
        .into_iter()
        .filter(|a| a.kind == AlertKind::ChainBreak)
        .collect();
    assert_eq!(breaks.len(), 1);

    // Host h1 ships h2's journal: refused, alert.
    let _ = host_journal(&cell, "h1", 0);
    let (status, body) = ship(&cell, &logd, "host/h1", &jref, &entries[5..]).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    let wrong = logd
        .alerts
        .all()
        .into_iter()
        .find(|a| a.kind == AlertKind::WrongSource)
        .expect("a wrong-source alert");
    assert_eq!(
        wrong.principal.as_deref(),
        Some(host_principal("h1").uri().as_str())
    );
    // The source an alert names is the authenticated caller; what it claimed
    // is detail.
    assert_eq!(
        wrong.source.as_deref(),
        Some(host_principal("h1").uri().as_str())
    );
    assert_eq!(wrong.detail["claimed_source"], h2.as_str());
    // Nor may h1 read h2's head.
    let mut c = logd_client(&cell, &logd, "host/h1").await;
    let (status, _) = send_raw(&mut c, "GET", "/v1/ingest/head/host/h2", b"", None).await;
    assert_eq!(status, 403);

    // The log holds h2's records 1..=5 and nothing else of h2.
    let token = audit_token(&cell, "auditor/carol").await;
    let all = all_entries(&cell, &logd, &token).await;
    let h2_seqs: Vec<u64> = all
        .iter()
        .filter(|e| e.source == h2)
        .map(|e| e.seq)
        .collect();
    assert_eq!(h2_seqs, vec![1, 2, 3, 4, 5]);
    // The auditor sees the alerts, and they survive a restart (rebuilt from
    // logd's journal).
    let (status, body) = read(&cell, &logd, "auditor/carol", "/v1/alerts", Some(&token)).await;
    assert_eq!(status, 200);
    let served = serde_json::from_slice::<nitrile_logd::AlertPage>(&body)
        .unwrap()
        .alerts;
    let kinds: Vec<(AlertKind, u64)> = served.iter().map(|a| (a.kind, a.count)).collect();
    assert_eq!(
        kinds,
        vec![
            (AlertKind::Gap, 1),
            (AlertKind::ChainBreak, 2),
            (AlertKind::WrongSource, 1)
        ]
    );
    logd.stop().await;
    let logd = start_logd(&cell, logd_config(&cell, &state, INTERVAL_MS)).await;
    let token = audit_token(&cell, "auditor/carol").await;
    let (status, body) = read(&cell, &logd, "auditor/carol", "/v1/alerts", Some(&token)).await;
    assert_eq!(status, 200);
    let after = serde_json::from_slice::<nitrile_logd::AlertPage>(&body)
        .unwrap()
        .alerts;
    assert_eq!(after, served);
    // The honest record 6 onwards is still accepted after the restart.
    let (status, body) = ship(&cell, &logd, "host/h2", &jref, &entries[5..]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        serde_json::from_slice::<IngestAck>(&body)
            .unwrap()
            .acked_seq,
        10
    );
    // The alert records entered the log through logd's own journal.
    wait_until("logd's alert records are in the log", async || {
        let all = all_entries(&cell, &logd, &token).await;
        all.iter()
            .filter(|e| {
                e.source == logd_principal().uri()
                    && e.record
                        .as_ref()
                        .is_some_and(|r| !r["detail"]["integrity_alert"].is_null())
            })
            .count()
            >= 4
    })
    .await;
    logd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_auditor_reads_verify_and_are_journaled_operator_reads_are_refused() {
    let cell = TestCell::new().await;
    let state = cell.scratch("logd");
    let logd = start_logd(&cell, logd_config(&cell, &state, INTERVAL_MS)).await;
    let path = host_journal(&cell, "h3", 20);
    let (jref, entries) = journal_batch(&path);
    let (status, _) = ship(&cell, &logd, "host/h3", &jref, &entries).await;
    assert_eq!(status, 200);

    let token = audit_token(&cell, "auditor/carol").await;
    let all = all_entries(&cell, &logd, &token).await;
    wait_until("a checkpoint covers the records", async || {
        checkpoint_size(&cell, &logd, &token).await >= all.len() as u64
    })
    .await;
    let cp = checkpoint(&cell, &logd, &token).await;
    let h3 = host_principal("h3").uri();
    for e in all.iter().filter(|e| e.source == h3) {
        // The leaf is computed from the host's journal, not from logd's answer.
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
        // A proof for another leaf does not verify.
        let mut other = leaf.clone();
        *other.last_mut().unwrap() ^= 1;
        assert!(
            verify_inclusion(
                &leaf_hash(&other),
                e.index,
                cp.size,
                &hashes(&body),
                &cp.root
            )
            .is_err()
        );
    }
    // The proofs of a range of entries in one read: the same proofs, each
    // verifying against the leaf computed from the host's journal.
    let h3_entries: Vec<_> = all.iter().filter(|e| e.source == h3).collect();
    let first = h3_entries[0].index;
    let (status, body) = read(
        &cell,
        &logd,
        "auditor/carol",
        &format!("/v1/log/proofs/inclusion/{first}/1000/{}", cp.size),
        Some(&token),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let range: nitrile_logclient::protocol::ProofsBody = serde_json::from_slice(&body).unwrap();
    assert_eq!((range.start, range.size), (first, cp.size));
    assert_eq!(range.proofs.len() as u64, (cp.size - first).min(256));
    for e in &h3_entries {
        let leaf = leaf_of(&jref, &entries[(e.seq - 1) as usize]);
        let proof = decode_hashes(&range.proofs[(e.index - first) as usize]);
        verify_inclusion(&leaf_hash(&leaf), e.index, cp.size, &proof, &cp.root).unwrap();
        // Not the proof of its neighbour.
        if e.index > first {
            let neighbour = decode_hashes(&range.proofs[(e.index - first - 1) as usize]);
            assert!(
                verify_inclusion(&leaf_hash(&leaf), e.index, cp.size, &neighbour, &cp.root)
                    .is_err()
            );
        }
    }
    // Ranges outside the tree, or empty: 404.
    for path in [
        format!("/v1/log/proofs/inclusion/{}/1/{}", cp.size, cp.size),
        format!("/v1/log/proofs/inclusion/0/0/{}", cp.size),
        format!("/v1/log/proofs/inclusion/0/1/{}", cp.size + 1_000_000),
    ] {
        let (status, _) = read(&cell, &logd, "auditor/carol", &path, Some(&token)).await;
        assert_eq!(status, 404, "{path}");
    }

    // The entry bundle tile holds the same leaves.
    let width = cp.size.min(256);
    let tile = if cp.size >= 256 {
        "/v1/log/tile/entries/000".to_owned()
    } else {
        format!("/v1/log/tile/entries/000.p/{width}")
    };
    let (status, body) = read(&cell, &logd, "auditor/carol", &tile, Some(&token)).await;
    assert_eq!(status, 200, "{tile}");
    let bundle = nitrile_tlog::decode_bundle(&body, width).unwrap();
    let first = all.iter().find(|e| e.source == h3).unwrap();
    assert_eq!(
        bundle[first.index as usize],
        leaf_of(&jref, &entries[(first.seq - 1) as usize])
    );

    // Every read by carol was journaled, request before outcome. A read's
    // outcome record is queued before the answer but not waited for, so the
    // last one may reach the journal a moment after the answer.
    let carol = principal("auditor/carol");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let records = loop {
        let records = logd_records(&logd);
        let n = records
            .iter()
            .filter(|r| r.principal.as_ref() == Some(&carol))
            .count();
        if n % 2 == 0 || std::time::Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let reads: Vec<_> = records
        .iter()
        .filter(|r| r.principal.as_ref() == Some(&carol))
        .collect();
    assert!(reads.len() >= 2 * (1 + 20));
    for pair in reads.chunks(2) {
        assert_eq!(pair[0].kind, RecordKind::Request);
        assert_eq!(pair[0].operations, vec![Operation::AuditRead]);
        assert_eq!(pair.get(1).map(|r| r.kind), Some(RecordKind::Outcome));
        assert_eq!(pair[0].request_id, pair[1].request_id);
    }

    // alice is an operator: the token service will not give her audit.read.
    let resp = cell
        .token_request(
            "operator/alice",
            &token_request(Operation::AuditRead, "log/local", "logd"),
        )
        .await;
    assert_eq!(
        resp.status.as_u16(),
        403,
        "{}",
        String::from_utf8_lossy(&resp.body)
    );
    // A token she can get (host.describe at h1) is refused by logd, and the
    // refusal is journaled.
    let alice_token = cell
        .token("operator/alice", Operation::HostDescribe, "host/h1", "h1")
        .await;
    for path in ["/v1/log/checkpoint", "/v1/log/entries/0/10", "/v1/alerts"] {
        let (status, body) = read(&cell, &logd, "operator/alice", path, Some(&alice_token)).await;
        assert_eq!(status, 403, "{path}: {}", String::from_utf8_lossy(&body));
        let r = refusal(&body);
        let seq = r.audit_seq.expect("the refusal is journaled");
        let rec = &logd_records(&logd)[(seq - 1) as usize];
        assert_eq!(rec.kind, RecordKind::Refusal);
        assert_eq!(rec.principal, Some(principal("operator/alice")));
        assert_eq!(rec.operations, vec![Operation::AuditRead]);
    }
    // No token at all: refused and journaled too.
    let (status, body) = read(&cell, &logd, "operator/alice", "/v1/log/checkpoint", None).await;
    assert_eq!(status, 401);
    assert!(refusal(&body).audit_seq.is_some());
    // carol's token is bound to carol's certificate.
    let (status, _) = read(
        &cell,
        &logd,
        "operator/bob",
        "/v1/log/checkpoint",
        Some(&token),
    )
    .await;
    assert_eq!(status, 401);
    // There is nothing that deletes or rewrites.
    for (method, path) in [
        ("DELETE", "/v1/log/entries/0/1"),
        ("PUT", "/v1/log/checkpoint"),
        ("POST", "/v1/log/tile/entries/000"),
        ("POST", "/v1/log/delete"),
    ] {
        let mut c = logd_client(&cell, &logd, "auditor/carol").await;
        let (status, _) = send_raw(&mut c, method, path, b"{}", Some(&token)).await;
        assert!(status == 404 || status == 405, "{method} {path}: {status}");
    }
    logd.stop().await;
}
