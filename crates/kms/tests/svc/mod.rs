//! What the key service's service tests share: a cell (CA, certificates of
//! the key service, hosts, operators, services and customers written to
//! files, the token service's real key ring), a running `nitrile kms` on
//! loopback, tokens minted for any principal, clients over real mTLS, and
//! the service's journal read back.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, header};
use nitrile_api::wire::Refusal;
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId};
use nitrile_audit::{AuditRecord, JournalReader};
use nitrile_kms::{Kms, KmsConfig, KmsOptions, KmsServer};
use nitrile_kms_api::{KmsClient, KmsClientError, kms_principal};
use nitrile_net::{Client, Response};
use nitrile_pki::CellCa;
use nitrile_pki::tls::{CaRoots, TlsIdentity, client_config};
use nitrile_token::{CertThumbprint, ClaimsInput, Clock, FixedClock};
use nitrile_tokend::KeyRing;
use time::OffsetDateTime;

pub const CELL: &str = "c1";

pub fn p(s: &str) -> PrincipalId {
    PrincipalId::parse(&format!("nitrile://{CELL}/{s}")).unwrap()
}

pub fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

pub fn r(s: &str) -> ResourceId {
    ResourceId::parse(s).unwrap()
}

/// Principals given a certificate, as `kind/name`.
pub const PRINCIPALS: &[&str] = &[
    "service/kms",
    "host/h1",
    "host/h2",
    "operator/alice",
    "service/placement",
    "customer/acme",
    "customer/evil",
];

/// A cell with a key service, not yet started.
pub struct Cell {
    pub dir: tempfile::TempDir,
    pub clock: Arc<FixedClock>,
    pub ring: KeyRing,
    pub config: KmsConfig,
    certs: Vec<(String, PathBuf, PathBuf, [u8; 32])>,
}

/// A running key service.
pub struct Running {
    pub addr: String,
    pub kms: Arc<Kms>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), nitrile_kms::KmsServerError>>>,
}

impl Running {
    /// Stops the service and waits until it has.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Cell {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let cell = n(CELL);
        let pki = dir.path().join("pki");
        let ca = CellCa::init_or_load(&pki, &cell, now).unwrap();
        let mut certs = Vec::new();
        for who in PRINCIPALS {
            let issued = ca.issue(&p(who), None, now).unwrap();
            let stem = who.replace('/', "-");
            let (cert, key) = (
                pki.join(format!("{stem}.pem")),
                pki.join(format!("{stem}.key")),
            );
            issued.write_files(&cert, &key).unwrap();
            certs.push((who.to_string(), cert, key, issued.cert_sha256()));
        }
        let ring = KeyRing::init_or_load(
            &dir.path().join("tokend"),
            p("service/tokend"),
            &mut rand_core::OsRng,
        )
        .unwrap();
        let (kms_cert, kms_key) = (pki.join("service-kms.pem"), pki.join("service-kms.key"));
        let mut config = KmsConfig::new(
            cell,
            "127.0.0.1:0".parse().unwrap(),
            dir.path().join("kms"),
            pki.join("ca.pem"),
            kms_cert,
            kms_key,
            KeyRing::issuer_file_path(&dir.path().join("tokend")),
        );
        config.default_key = true;
        Self {
            dir,
            clock: Arc::new(FixedClock::new(now)),
            ring,
            config,
            certs,
        }
    }

    pub async fn start(&self) -> Running {
        self.start_with(KmsOptions {
            clock: self.clock.clone(),
            sweep_interval: Some(Duration::from_millis(50)),
            danger_no_sync_journal: false,
        })
        .await
    }

    pub async fn start_with(&self, options: KmsOptions) -> Running {
        let server = KmsServer::open_with(&self.config, options).await.unwrap();
        let addr = server.local_addr().unwrap().to_string();
        let kms = Arc::clone(server.kms());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        Running {
            addr,
            kms,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn cert_of(&self, who: &str) -> &(String, PathBuf, PathBuf, [u8; 32]) {
        self.certs
            .iter()
            .find(|c| c.0 == who)
            .unwrap_or_else(|| panic!("no certificate for {who}"))
    }

    pub fn tls(&self, who: &str) -> Arc<rustls::ClientConfig> {
        let (_, cert, key, _) = self.cert_of(who);
        let roots = CaRoots::load(&self.config.ca).unwrap();
        client_config(&roots, &TlsIdentity::load(cert, key).unwrap()).unwrap()
    }

    /// A key service client with `who`'s certificate.
    pub async fn client(&self, running: &Running, who: &str) -> KmsClient {
        KmsClient::connect(&running.addr, &kms_principal(&n(CELL)), self.tls(who))
            .await
            .unwrap()
    }

    /// A raw mTLS client with `who`'s certificate, for requests the typed
    /// client would never send.
    pub async fn raw(&self, running: &Running, who: &str) -> Client {
        Client::connect(&running.addr, &kms_principal(&n(CELL)), self.tls(who))
            .await
            .unwrap()
    }

    /// A token for `who` (its certificate bound), at audience `aud`.
    pub fn token(&self, who: &str, aud: &str, ops: &[Operation], res: &[&str]) -> String {
        self.token_at(who, aud, ops, res, self.clock.now())
    }

    pub fn token_at(
        &self,
        who: &str,
        aud: &str,
        ops: &[Operation],
        res: &[&str],
        at: OffsetDateTime,
    ) -> String {
        let (_, _, _, sha) = self.cert_of(who);
        let input = ClaimsInput {
            subject: p(who),
            group: n("g"),
            audience: Audience::new(aud).unwrap(),
            operations: ops.to_vec(),
            resources: res.iter().map(|s| r(s)).collect(),
            cert: CertThumbprint::from_sha256(*sha),
            lifetime: None,
        };
        self.ring
            .issuer()
            .unwrap()
            .mint(input, at, &mut rand_core::OsRng)
            .unwrap()
            .0
    }

    pub fn journal_path(&self) -> PathBuf {
        self.config.journal_path()
    }

    pub fn journal(&self) -> Vec<AuditRecord> {
        JournalReader::open(self.journal_path())
            .unwrap()
            .map(|e| e.unwrap().record().unwrap())
            .collect()
    }

    /// Waits (up to 10 s) for a journal record that `pred` accepts.
    pub async fn wait_for_record(&self, pred: impl Fn(&AuditRecord) -> bool) -> AuditRecord {
        for _ in 0..200 {
            if let Some(r) = self.journal().into_iter().find(|r| pred(r)) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no such record in the key service's journal");
    }
}

/// The refusal of a client call that should have been refused.
pub fn refusal<T: std::fmt::Debug>(result: Result<T, KmsClientError>) -> (u16, Refusal) {
    match result {
        Err(KmsClientError::Refused { status, refusal }) => (status.as_u16(), refusal),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Sends `method path` with `body` and an optional bearer token.
pub async fn send(
    client: &mut Client,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> Response {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    client
        .send(req.body(Bytes::copy_from_slice(body)).unwrap())
        .await
        .unwrap()
}
