//! `host.attest` and `host.shutdown` on a host agent with a TPM (swtpm):
//! the quote covers the measured PCRs with the caller's nonce and verifies
//! under the TPM's attestation key; another nonce, or values other than the
//! quoted ones, do not; the event log replays to PCR 15; `host.describe`
//! shows the measured values; a host without a TPM refuses; `host.shutdown`
//! answers and then the agent stops.
//!
//! Needs swtpm and root (swtpm's local CA); prints `SKIPPED: <reason>`
//! without them.

use nitrile_api::admin::{AdminRequest, HostAttestRequest, HostAttestation, HostDescription};
use nitrile_attest::swtpm::{self, Swtpm};
use nitrile_attest::{AttestError, Pcrs, Quote, Tpm, replay, verify_quote};
use nitrile_hostd::config::TpmConfig;
use sha2::{Digest as _, Sha256};
use support::{TestCell, is_root, journal_records, refusal};

mod support;

fn swtpm_or_skip(dir: &std::path::Path) -> Option<Swtpm> {
    if let Err(e) = swtpm::available() {
        println!("SKIPPED: {e}");
        return None;
    }
    if !is_root() {
        println!("SKIPPED: manufacturing a TPM with swtpm's local CA needs root");
        return None;
    }
    Some(Swtpm::start(dir).expect("swtpm starts"))
}

/// The token service's answer to `kind_name` asking for a token for `req`
/// at h1.
async fn token_status(cell: &TestCell, kind_name: &str, req: &AdminRequest) -> u16 {
    let host = nitrile_api::Name::new("h1").unwrap();
    let resp = cell
        .token_request(
            kind_name,
            &support::token_request(req.operation(), &req.resource(&host).to_string(), "h1"),
        )
        .await;
    resp.status.as_u16()
}

fn attest_req(nonce: &[u8]) -> AdminRequest {
    AdminRequest::HostAttest(HostAttestRequest {
        nonce: hex::encode(nonce),
    })
}

fn quote_of(a: &HostAttestation) -> Quote {
    Quote {
        message: hex::decode(&a.quote.message).unwrap(),
        signature: hex::decode(&a.quote.signature).unwrap(),
        pcrs: Pcrs(
            a.quote
                .pcrs
                .iter()
                .map(|p| (p.index, *p.sha256.as_bytes()))
                .collect(),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_attest_quotes_the_measured_pcrs_with_the_callers_nonce() {
    let mut cell = TestCell::new().await;
    let dir = cell.scratch("tpm");
    let Some(swtpm) = swtpm_or_skip(&dir.join("state")) else {
        return;
    };
    // What the host image's init does before it starts the agent: extend
    // PCR 15 with what it loads, and keep the event log.
    let events: Vec<(&str, [u8; 32])> = vec![
        ("hostd-config", Sha256::digest(b"the config").into()),
        ("issuer-keys", Sha256::digest(b"the issuer keys").into()),
    ];
    let mut log = String::new();
    {
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        for (name, d) in &events {
            tpm.extend(15, *d).unwrap();
            log.push_str(&format!(
                "{{\"pcr\":15,\"name\":\"{name}\",\"sha256\":\"{}\"}}\n",
                hex::encode(d)
            ));
        }
    }
    std::fs::write(dir.join("init-events.jsonl"), log).unwrap();
    let mut setup = cell.default_setup();
    setup.tpm = Some(TpmConfig {
        tcti: swtpm.tcti(),
        event_log: Some(dir.join("init-events.jsonl")),
        document_certificate: None,
        tls_key: None,
    });
    cell.start_host_with("h1", setup).await;

    let nonce = [0x5au8; 32];
    let req = attest_req(&nonce);
    let token = cell.token_for("auditor/carol", "h1", &req).await;
    let (status, body) = cell.call("auditor/carol", "h1", &req, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let a: HostAttestation = serde_json::from_slice(&body).unwrap();
    assert_eq!(a.host.as_str(), "h1");
    assert!(a.document.is_none(), "no document certificate configured");

    // The key is the TPM's (derived again here), and the quote verifies
    // under it with this nonce.
    let ak = Tpm::open(&swtpm.tcti()).unwrap().attestation_key().unwrap();
    assert_eq!(a.attestation_key, hex::encode(&ak.tpmt_public));
    let quote = quote_of(&a);
    let info = verify_quote(&ak, &quote, &nonce).unwrap();
    assert_eq!(info.pcrs, vec![4, 11, 15]);
    // The event log replays to the quoted PCR 15.
    assert_eq!(
        a.event_log
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["hostd-config", "issuer-keys"]
    );
    assert_eq!(
        quote.pcrs.0[&15],
        replay(a.event_log.iter().map(|e| *e.sha256.as_bytes()))
    );
    // Replayed against another nonce, or with other values: refused.
    assert!(matches!(
        verify_quote(&ak, &quote, &[0x5bu8; 32]),
        Err(AttestError::NonceMismatch)
    ));
    let mut lying = quote.clone();
    lying.pcrs.0.insert(15, [0u8; 32]);
    assert!(verify_quote(&ak, &lying, &nonce).is_err());

    // On-call operators may ask too; the placement service may not (its
    // group holds no such entitlement).
    let token = cell.token_for("operator/alice", "h1", &req).await;
    let (status, _) = cell.call("operator/alice", "h1", &req, Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(token_status(&cell, "service/placement", &req).await, 403);

    // host.describe shows the measured values.
    let describe = AdminRequest::HostDescribe;
    let token = cell.token_for("operator/alice", "h1", &describe).await;
    let (status, body) = cell
        .call("operator/alice", "h1", &describe, Some(&token))
        .await;
    assert_eq!(status, 200);
    let d: HostDescription = serde_json::from_slice(&body).unwrap();
    let pcr15 = d
        .measurements
        .iter()
        .find(|m| m.name == "tpm-pcr15")
        .expect("host.describe shows PCR 15");
    assert_eq!(*pcr15.sha256.as_bytes(), quote.pcrs.0[&15]);

    // Every call was journaled, with its nonce-bearing operation.
    let records = journal_records(&cell.host_journal("h1"));
    assert!(
        records
            .iter()
            .filter(|r| r.operations == [nitrile_api::Operation::HostAttest])
            .count()
            >= 4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_a_tpm_refuses_and_host_shutdown_stops_the_agent() {
    let mut cell = TestCell::new().await;
    cell.start_host("h1").await;
    let req = attest_req(&[1u8; 16]);
    let token = cell.token_for("auditor/carol", "h1", &req).await;
    let (status, body) = cell.call("auditor/carol", "h1", &req, Some(&token)).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert!(refusal(&body).reason.contains("no TPM"), "{body:?}");
    let last = journal_records(&cell.host_journal("h1")).pop().unwrap();
    assert_eq!(last.operations, [nitrile_api::Operation::HostAttest]);

    // host.shutdown: answered, then the agent stops serving.
    let shutdown = AdminRequest::HostShutdown;
    assert_eq!(token_status(&cell, "auditor/carol", &shutdown).await, 403);
    let token = cell.token_for("operator/alice", "h1", &shutdown).await;
    let (status, body) = cell
        .call("operator/alice", "h1", &shutdown, Some(&token))
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let tls = cell.tls_for("operator/alice");
        if cell.connect("h1", tls).await.is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent still serves 10 s after host.shutdown"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
