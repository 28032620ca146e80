//! logd in a real one-machine test cell: the host agent test harness (CA,
//! token service, host agents on loopback mTLS), plus logd in-process with
//! its own certificate, the pinned issuer keys, real files and real TLS.

#![allow(dead_code, unreachable_pub)]

#[path = "../../../hostd/tests/support/mod.rs"]
pub mod cell;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use nitrile_api::admin::AdminRequest;
use nitrile_api::{Operation, PrincipalId};
use nitrile_audit::{AuditRecord, JournalReader};
use nitrile_logclient::leaf::{self, LeafV1};
use nitrile_logclient::protocol::{EntryBody, IngestBatch, IngestEntry, JournalRef, ProofBody};
use nitrile_logd::alert::{Alert, AlertSink, Observer};
use nitrile_logd::{Logd, LogdConfig, LogdError, LogdOptions};
use nitrile_net::Client;
use nitrile_pki::CellCa;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use cell::*;

/// logd's principal in the test cell.
pub fn logd_principal() -> PrincipalId {
    principal("service/logd")
}

/// Alerts as an [`AlertSink`] gets them.
#[derive(Default)]
pub struct Alerts(Mutex<Vec<Alert>>);

impl AlertSink for Alerts {
    fn alert(&self, alert: &Alert) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(alert.clone());
    }
}

impl Alerts {
    pub fn all(&self) -> Vec<Alert> {
        self.0.lock().unwrap().clone()
    }
}

/// What an [`Observer`] sees: (log index, source, seq) of each record,
/// and when each checkpoint was published.
#[derive(Default)]
pub struct Seen {
    records: Mutex<Vec<(u64, String, u64)>>,
    checkpoints: Mutex<Vec<(std::time::Instant, u64)>>,
}

impl Observer for Seen {
    fn record(&self, index: u64, leaf: &LeafV1, _record: &AuditRecord) {
        self.records
            .lock()
            .unwrap()
            .push((index, leaf.source.clone(), leaf.seq));
    }

    fn checkpoint(&self, size: u64) {
        self.checkpoints
            .lock()
            .unwrap()
            .push((std::time::Instant::now(), size));
    }
}

impl Seen {
    pub fn all(&self) -> Vec<(u64, String, u64)> {
        self.records.lock().unwrap().clone()
    }

    pub fn checkpoints(&self) -> Vec<(std::time::Instant, u64)> {
        self.checkpoints.lock().unwrap().clone()
    }
}

/// A running logd.
pub struct RunningLogd {
    pub addr: SocketAddr,
    /// The metrics address, when the config names one.
    pub metrics: Option<SocketAddr>,
    pub config: LogdConfig,
    pub vkey: String,
    pub origin: String,
    pub alerts: Arc<Alerts>,
    pub seen: Arc<Seen>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), LogdError>>>,
}

impl RunningLogd {
    /// Stops logd (its last checkpoint and source states are written).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    /// logd's journal.
    pub fn journal(&self) -> PathBuf {
        self.config.state.join("journal")
    }
}

/// Gives logd a fresh certificate and returns its config for state `state`
/// (checkpoints every `interval_ms`).
pub fn logd_config(cell: &TestCell, state: &Path, interval_ms: u64) -> LogdConfig {
    let now = nitrile_token::Clock::now(&*cell.clock);
    let ca = CellCa::load(&cell.layout.pki_dir(), &cell.cell, now).unwrap();
    let me = logd_principal();
    let (cert, key) = cell.layout.cert_and_key(&me);
    ca.issue(&me, None, now)
        .unwrap()
        .write_files(&cert, &key)
        .unwrap();
    let mut config = LogdConfig::new(
        cell.cell.clone(),
        "127.0.0.1:0".parse().unwrap(),
        state.to_owned(),
        cell.layout.ca_cert(),
        cert,
        key,
        cell.layout.issuer_keys_file(),
    );
    config.checkpoint_interval_ms = interval_ms;
    // The test cell's journal sources: hosts h1..h8 (and b0..b63 of the
    // benchmark) and the token service.
    config.sources.hosts = (1..=8)
        .map(|i| format!("h{i}"))
        .chain((0..64).map(|i| format!("b{i}")))
        .map(|n| nitrile_api::Name::new(&n).unwrap())
        .collect();
    config.sources.token_service = Some(nitrile_api::Name::new("tokend").unwrap());
    config
}

/// Starts logd with `config` at the token service's time.
pub async fn start_logd(cell: &TestCell, config: LogdConfig) -> RunningLogd {
    let alerts = Arc::new(Alerts::default());
    let seen = Arc::new(Seen::default());
    let options = LogdOptions {
        clock: cell.clock.clone(),
        alert_sinks: vec![alerts.clone()],
        observers: vec![seen.clone()],
        ..LogdOptions::default()
    };
    let logd = Logd::open(&config, options).await.unwrap();
    let addr = logd.local_addr().unwrap();
    let metrics = logd.metrics_addr();
    let vkey = logd.log_vkey();
    let origin = logd.origin().to_owned();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(logd.serve(async move {
        let _ = stopped.await;
    }));
    RunningLogd {
        addr,
        metrics,
        config,
        vkey,
        origin,
        alerts,
        seen,
        stop: Some(stop),
        task: Some(task),
    }
}

/// A connection to logd as `kind_name`.
pub async fn logd_client(cell: &TestCell, logd: &RunningLogd, kind_name: &str) -> Client {
    Client::connect(
        &logd.addr.to_string(),
        &logd_principal(),
        cell.tls_for(kind_name),
    )
    .await
    .unwrap()
}

/// An `audit.read` token for `log/local` at logd, granted to
/// `kind_name` by the token service.
pub async fn audit_token(cell: &TestCell, kind_name: &str) -> String {
    cell.token(kind_name, Operation::AuditRead, "log/local", "logd")
        .await
}

/// `GET path` at logd as `kind_name` with `token`.
pub async fn read(
    cell: &TestCell,
    logd: &RunningLogd,
    kind_name: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, Bytes) {
    let mut c = logd_client(cell, logd, kind_name).await;
    send_raw(&mut c, "GET", path, b"", token).await
}

/// Every entry of the log, through the auditor's reads.
pub async fn all_entries(cell: &TestCell, logd: &RunningLogd, token: &str) -> Vec<EntryBody> {
    let mut c = logd_client(cell, logd, "auditor/carol").await;
    let mut out: Vec<EntryBody> = Vec::new();
    loop {
        let (status, body) = send_raw(
            &mut c,
            "GET",
            &format!("/v1/log/entries/{}/256", out.len()),
            b"",
            Some(token),
        )
        .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let page: Vec<EntryBody> = serde_json::from_slice(&body).unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// Waits (up to a minute) until `f` holds.
pub async fn wait_until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..600 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gave up waiting until {what}");
}

/// The journal at `path` as an ingest header and its entries.
pub fn journal_batch(path: &Path) -> (JournalRef, Vec<IngestEntry>) {
    let reader = JournalReader::open(path).unwrap();
    let h = reader.header().clone();
    let entries = reader
        .map(|e| {
            let e = e.unwrap();
            IngestEntry {
                seq: e.seq,
                hash: e.hash,
                payload: e.payload,
            }
        })
        .collect();
    (
        JournalRef {
            source: h.source,
            journal_id: h.journal_id,
            genesis: h.genesis,
        },
        entries,
    )
}

/// POSTs a batch to logd as `kind_name`.
pub async fn ship(
    cell: &TestCell,
    logd: &RunningLogd,
    kind_name: &str,
    journal: &JournalRef,
    entries: &[IngestEntry],
) -> (u16, Bytes) {
    ship_with_head(cell, logd, kind_name, journal, entries, None).await
}

/// POSTs a batch to logd as `kind_name`, saying the journal's head is `head`.
pub async fn ship_with_head(
    cell: &TestCell,
    logd: &RunningLogd,
    kind_name: &str,
    journal: &JournalRef,
    entries: &[IngestEntry],
    head: Option<u64>,
) -> (u16, Bytes) {
    let mut c = logd_client(cell, logd, kind_name).await;
    let body = serde_json::to_vec(&IngestBatch {
        journal: journal.clone(),
        entries: entries.to_vec(),
        head,
    })
    .unwrap();
    send_raw(&mut c, "POST", "/v1/ingest", &body, None).await
}

/// The leaf a journal record becomes.
pub fn leaf_of(journal: &JournalRef, e: &IngestEntry) -> Vec<u8> {
    leaf::encode(&LeafV1 {
        source: journal.source.clone(),
        journal_id: journal.journal_id,
        seq: e.seq,
        hash: e.hash,
        payload: e.payload.clone(),
    })
    .unwrap()
}

/// Every record of logd's journal.
pub fn logd_records(logd: &RunningLogd) -> Vec<AuditRecord> {
    journal_records(&logd.journal())
}

/// `times` audited `host.describe` calls by alice to host agent h1.
pub async fn describe(cell: &TestCell, times: usize) {
    for _ in 0..times {
        let token = cell
            .token_for("operator/alice", "h1", &AdminRequest::HostDescribe)
            .await;
        let (status, body) = cell
            .call(
                "operator/alice",
                "h1",
                &AdminRequest::HostDescribe,
                Some(&token),
            )
            .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
}

/// A journal of host `host` written in a scratch directory, with `n`
/// describe requests, and the host provisioned (certificate) without
/// running it.
pub fn host_journal(cell: &TestCell, host: &str, n: usize) -> PathBuf {
    let now = nitrile_token::Clock::now(&*cell.clock);
    nitrile_cell::provision_host(
        &cell.layout,
        &cell.cell,
        &nitrile_api::Name::new(host).unwrap(),
        now,
    )
    .unwrap();
    let path = cell.scratch(&format!("journal-{host}")).join("journal");
    let j = nitrile_audit::Journal::open(&path, &host_principal(host).uri()).unwrap();
    for i in 0..n {
        let record = AuditRecord::request(
            now,
            host_principal(host),
            nitrile_audit::RequestId::from_bytes([i as u8; 16]),
        )
        .with_principal(principal("operator/alice"))
        .with_operations([Operation::HostDescribe]);
        j.append(&record.encode().unwrap()).unwrap();
    }
    path
}

/// The hashes of a proof answer (`ProofBody`).
pub fn hashes(body: &[u8]) -> Vec<nitrile_tlog::Hash> {
    decode_hashes(&serde_json::from_slice::<ProofBody>(body).unwrap().proof)
}

/// Hashes given as 64 hex digits each.
pub fn decode_hashes(hex_hashes: &[String]) -> Vec<nitrile_tlog::Hash> {
    hex_hashes
        .iter()
        .map(|h| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h, &mut out).unwrap();
            out
        })
        .collect()
}
