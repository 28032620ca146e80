//! Checkpoints with a witness quorum: published only with a valid
//! cosignature from the real witness service over mTLS; with the witness
//! gone, no checkpoint is published, and logd raises `witness_quorum` and
//! `checkpoint_stalled` alerts, delivered to a webhook on loopback.

mod support;

use std::sync::{Arc, Mutex};

use nitrile_api::{Name, PrincipalKind};
use nitrile_logd::WitnessConfig;
use nitrile_logd::alert::{Alert, AlertKind};
use nitrile_pki::CellCa;
use nitrile_pki::tls::{CaRoots, TlsIdentity, server_config};
use nitrile_tlog::{NoteVerifier, cosignatures, open_checkpoint};
use nitrile_witness::{Witness, WitnessService};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INTERVAL_MS: u64 = 200;

/// A loopback HTTP server that keeps the bodies POSTed to it.
async fn webhook() -> (String, Arc<Mutex<Vec<Alert>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&got);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let sink = Arc::clone(&sink);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then Content-Length bytes of body.
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            let alert: Alert =
                                serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap();
                            sink.lock().unwrap().push(alert);
                            let _ = s
                                .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                                .await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_need_the_witness_quorum_and_a_stall_is_alerted() {
    let cell = TestCell::new().await;
    let state = cell.scratch("logd");

    // logd once, to make its log key.
    let first = start_logd(&cell, logd_config(&cell, &state, INTERVAL_MS)).await;
    let (origin, log_vkey) = (first.origin.clone(), first.vkey.clone());
    first.stop().await;

    // The witness, over mTLS, for this log.
    let now = nitrile_token::Clock::now(&*cell.clock);
    let wname = Name::new("witness-1").unwrap();
    let wprincipal =
        nitrile_api::PrincipalId::new(cell.cell.clone(), PrincipalKind::Service, wname.clone());
    let (wcert, wkey) = cell.layout.cert_and_key(&wprincipal);
    CellCa::load(&cell.layout.pki_dir(), &cell.cell, now)
        .unwrap()
        .issue(&wprincipal, None, now)
        .unwrap()
        .write_files(&wcert, &wkey)
        .unwrap();
    let wkey_signer = Witness::generate_key("local.nitrile/witness/witness-1").unwrap();
    let witness_vkey = wkey_signer.verifier().to_vkey();
    let witness = Witness::open(
        &cell.scratch("witness"),
        wkey_signer,
        [(origin.clone(), NoteVerifier::from_vkey(&log_vkey).unwrap())],
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let waddr = listener.local_addr().unwrap();
    let tls = server_config(
        &CaRoots::load(&cell.layout.ca_cert()).unwrap(),
        &TlsIdentity::load(&wcert, &wkey).unwrap(),
    )
    .unwrap();
    let service = WitnessService::from_parts(Arc::new(witness), tls, cell.cell.clone(), listener);
    let (wstop, wstopped) = tokio::sync::oneshot::channel::<()>();
    let wtask = tokio::spawn(service.serve(async move {
        let _ = wstopped.await;
    }));

    // logd again, now requiring one cosignature, alerts to a webhook.
    let (url, posted) = webhook().await;
    let mut config = logd_config(&cell, &state, INTERVAL_MS);
    config.witnesses = vec![WitnessConfig {
        name: wname,
        vkey: witness_vkey.clone(),
        addr: waddr.to_string(),
    }];
    config.witness_quorum = 1;
    config.webhook = Some(url);
    let logd = start_logd(&cell, config).await;
    let witness_verifier = NoteVerifier::from_vkey(&witness_vkey).unwrap();
    let log_verifier = NoteVerifier::from_vkey(&log_vkey).unwrap();

    let path = cell.scratch("h1").join("journal");
    nitrile_cell::provision_host(&cell.layout, &cell.cell, &Name::new("h1").unwrap(), now).unwrap();
    let journal = nitrile_audit::Journal::open(&path, &host_principal("h1").uri()).unwrap();
    let append = |n: u8| {
        let r = nitrile_audit::AuditRecord::request(
            now,
            host_principal("h1"),
            nitrile_audit::RequestId::from_bytes([n; 16]),
        );
        journal.append(&r.encode().unwrap()).unwrap();
    };
    for n in 0..5 {
        append(n);
    }
    let (jref, entries) = journal_batch(&path);
    let (status, _) = ship(&cell, &logd, "host/h1", &jref, &entries).await;
    assert_eq!(status, 200);

    let token = audit_token(&cell, "auditor/carol").await;
    let mut note = String::new();
    wait_until(
        "a cosigned checkpoint covers the host records",
        async || {
            let (status, body) = read(
                &cell,
                &logd,
                "auditor/carol",
                "/v1/log/checkpoint",
                Some(&token),
            )
            .await;
            if status != 200 {
                return false;
            }
            note = String::from_utf8(body.to_vec()).unwrap();
            open_checkpoint(&note, &origin, &log_verifier).unwrap().size >= 5
        },
    )
    .await;
    assert_eq!(
        cosignatures(&note, std::slice::from_ref(&witness_verifier)),
        vec![witness_verifier.name().to_owned()]
    );
    let covered = open_checkpoint(&note, &origin, &log_verifier).unwrap().size;

    // The witness goes away: the log grows, no checkpoint covers it.
    let _ = wstop.send(());
    wtask.await.unwrap().unwrap();
    for n in 5..8 {
        append(n);
    }
    let (jref, entries) = journal_batch(&path);
    let (status, _) = ship(&cell, &logd, "host/h1", &jref, &entries[5..]).await;
    assert_eq!(status, 200);
    wait_until("the stall is alerted", async || {
        let kinds: Vec<AlertKind> = logd.alerts.all().iter().map(|a| a.kind).collect();
        kinds.contains(&AlertKind::WitnessQuorum) && kinds.contains(&AlertKind::CheckpointStalled)
    })
    .await;
    let (status, body) = read(
        &cell,
        &logd,
        "auditor/carol",
        "/v1/log/checkpoint",
        Some(&token),
    )
    .await;
    assert_eq!(status, 200);
    let still = open_checkpoint(std::str::from_utf8(&body).unwrap(), &origin, &log_verifier)
        .unwrap()
        .size;
    assert!(still >= covered);
    // None of the records shipped after the witness left is covered.
    let all = all_entries(&cell, &logd, &token).await;
    let h1 = host_principal("h1").uri();
    let sixth = all
        .iter()
        .find(|e| e.source == h1 && e.seq == 6)
        .expect("record 6 is in the log");
    assert!(
        sixth.index >= still,
        "no checkpoint without the quorum (record 6 at {}, checkpoint {still})",
        sixth.index
    );
    // The alerts were journaled and posted to the webhook.
    for a in logd.alerts.all() {
        assert!(a.audit_seq.is_some(), "{a:?}");
    }
    wait_until("the webhook got the alerts", async || {
        let got = posted.lock().unwrap();
        got.iter().any(|a| a.kind == AlertKind::CheckpointStalled)
            && got.iter().any(|a| a.kind == AlertKind::WitnessQuorum)
    })
    .await;
    logd.stop().await;
}
