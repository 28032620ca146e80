//! The refusal hooks every service shares (claim 6: failed authentication
//! is on the record): a real mTLS server built from a [`ServiceIdentity`]
//! whose handler hands `nitrile_net`'s refusal hooks to a
//! [`ServiceJournal`], attacked with a client without a certificate, a
//! certificate of the cell CA naming no principal, and a body larger than
//! the server reads. Each is one refusal record in the journal, at the
//! right step, and nothing else is.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use nitrile_api::wire::RefusalStep;
use nitrile_api::{Name, PrincipalId, PrincipalKind};
use nitrile_audit::{AuditRecord, CertSha256, Journal, JournalReader, RecordKind};
use nitrile_gate::{Expected, Listeners, ServiceIdentity, ServiceJournal};
use nitrile_net::{Client, Handler, PeerIdentity, PreauthReport, json_response};
use nitrile_pki::tls::danger::danger_client_config_without_certificate;
use nitrile_pki::tls::{CaRoots, TlsIdentity, client_config};
use nitrile_pki::{CA_CERT_FILE, CA_KEY_FILE, CellCa, PkiError, cert_and_key_paths, cert_sha256};
use nitrile_token::SystemClock;
use time::OffsetDateTime;
use tokio::sync::oneshot;

/// Largest body the test server reads.
const MAX_BODY: usize = 1024;

/// A service whose only logic is to answer 200, refusing through the gate.
struct Gated(Arc<ServiceJournal>);

impl Handler for Gated {
    async fn handle(&self, _peer: PeerIdentity, _req: Request<Bytes>) -> Response<Bytes> {
        json_response(StatusCode::OK, &serde_json::json!({}))
    }

    async fn request_unreadable(
        &self,
        peer: PeerIdentity,
        method: String,
        path: String,
        status: u16,
        reason: String,
    ) {
        let _ = self
            .0
            .request_unreadable(peer, method, path, status, reason)
            .await;
    }

    async fn preauth_report(&self, report: PreauthReport) {
        let _ = self.0.preauth_report(report).await;
    }

    async fn refused_at_tls(&self, reason: &PkiError, cert_sha256: Option<[u8; 32]>) {
        let _ = self.0.refused_at_tls(reason, cert_sha256).await;
    }
}

fn p(s: &str) -> PrincipalId {
    PrincipalId::parse(s).unwrap()
}

struct Cell {
    dir: tempfile::TempDir,
    cell: Name,
    ca: CellCa,
}

impl Cell {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cell = Name::new("c1").unwrap();
        let ca = CellCa::init_or_load(&dir.path().join("pki"), &cell, OffsetDateTime::now_utc())
            .unwrap();
        Self { dir, cell, ca }
    }

    fn files(&self, kind_name: &str) -> (PathBuf, PathBuf) {
        let principal = p(&format!("nitrile://c1/{kind_name}"));
        let (cert, key) = cert_and_key_paths(&self.dir.path().join(kind_name.replace('/', "-")));
        self.ca
            .issue(&principal, None, OffsetDateTime::now_utc())
            .unwrap()
            .write_files(&cert, &key)
            .unwrap();
        (cert, key)
    }

    fn roots(&self) -> CaRoots {
        CaRoots::load(&self.dir.path().join("pki").join(CA_CERT_FILE)).unwrap()
    }

    fn client_tls(&self, kind_name: &str) -> Arc<rustls::ClientConfig> {
        let (cert, key) = self.files(kind_name);
        client_config(&self.roots(), &TlsIdentity::load(&cert, &key).unwrap()).unwrap()
    }

    /// A certificate the cell CA signed that names no principal (a DNS
    /// name only).
    fn no_principal(&self) -> TlsIdentity {
        let pki = self.dir.path().join("pki");
        let ca_pem = std::fs::read_to_string(pki.join(CA_CERT_FILE)).unwrap();
        let ca_key =
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join(CA_KEY_FILE)).unwrap())
                .unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "mallory");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![rcgen::SanType::DnsName(
            "mallory.example".try_into().unwrap(),
        )];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::hours(1);
        let cert = params.signed_by(&key, &issuer).unwrap();
        TlsIdentity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap()
    }
}

struct Running {
    addr: SocketAddr,
    journal: Arc<ServiceJournal>,
    path: PathBuf,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(cell: &Cell) -> Self {
        let (cert, key) = cell.files("service/logd");
        let identity = ServiceIdentity::load(
            &cell.cell,
            &cell.dir.path().join("pki").join(CA_CERT_FILE),
            &cert,
            &key,
            &Expected::Kind(PrincipalKind::Service),
        )
        .unwrap();
        let path = cell.dir.path().join("journal");
        let journal = Arc::new(Journal::open(&path, &identity.principal().uri()).unwrap());
        let journal = Arc::new(ServiceJournal::new(
            identity.principal().clone(),
            None,
            journal,
            Arc::new(SystemClock),
        ));
        let listeners = Listeners::bind("127.0.0.1:0".parse().unwrap(), None)
            .await
            .unwrap();
        let addr = listeners.local_addr().unwrap();
        let server = identity.server().unwrap().with_max_body(MAX_BODY);
        let (stop, stopped) = oneshot::channel();
        let handler = Gated(Arc::clone(&journal));
        let task = tokio::spawn(async move {
            server
                .serve(listeners.mtls, handler, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            journal,
            path,
            stop,
            task,
        }
    }

    fn records(&self) -> Vec<AuditRecord> {
        JournalReader::open(&self.path)
            .unwrap()
            .map(|e| e.unwrap().record().unwrap())
            .collect()
    }

    /// The records once there are at least `n`.
    async fn wait_for(&self, n: usize) -> Vec<AuditRecord> {
        for _ in 0..500 {
            let records = self.records();
            if records.len() >= n {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} records: {:?}", self.records());
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

fn logd() -> PrincipalId {
    p("nitrile://c1/service/logd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_a_handshake_without_a_certificate_is_journaled_at_tls() {
    let cell = Cell::new();
    let running = Running::start(&cell).await;
    let tls = danger_client_config_without_certificate(&cell.roots()).unwrap();
    let connected = Client::connect(&running.addr.to_string(), &logd(), tls).await;
    if let Ok(mut client) = connected {
        // TLS 1.3: the server's refusal may only show on the first request.
        assert!(
            client.get_json("/").await.is_err(),
            "answered without a certificate"
        );
    }
    let records = running.wait_for(1).await;
    let r = &records[0];
    assert_eq!(r.kind, RecordKind::Refusal);
    assert_eq!(r.step, Some(RefusalStep::Tls));
    assert_eq!(r.principal, None);
    assert_eq!(r.source, logd());
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|s| s.starts_with("tls: TLS handshake failed")),
        "{r:?}"
    );
    let detail = r.detail.as_ref().expect("the failure's detail");
    assert!(
        detail["remote"]
            .as_str()
            .is_some_and(|s| s.starts_with("127.0.0.1:"))
    );
    assert_eq!(running.journal.refusal_journal_failures(), 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_a_certificate_naming_no_principal_is_journaled_by_its_digest() {
    let cell = Cell::new();
    let running = Running::start(&cell).await;
    let mallory = cell.no_principal();
    let digest = cert_sha256(mallory.leaf());
    let tls = client_config(&cell.roots(), &mallory).unwrap();
    let mut client = Client::connect(&running.addr.to_string(), &logd(), tls)
        .await
        .unwrap();
    let resp = client.get_json("/anything").await.unwrap();
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    let records = running.wait_for(1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r.kind, RecordKind::Refusal);
    assert_eq!(r.step, Some(RefusalStep::Tls));
    assert_eq!(r.principal, None);
    assert_eq!(r.cert_sha256, Some(CertSha256::from_bytes(digest)));
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|s| s.contains("certificate names no principal of this cell")),
        "{r:?}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_a_body_too_large_to_read_is_journaled_with_its_caller() {
    let cell = Cell::new();
    let running = Running::start(&cell).await;
    let tls = cell.client_tls("operator/alice");
    let mut client = Client::connect(&running.addr.to_string(), &logd(), tls)
        .await
        .unwrap();
    let resp = client.get_json("/fine").await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    let big = "x".repeat(MAX_BODY + 1);
    let resp = client.post_json("/v1/big", &big).await.unwrap();
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE);
    let records = running.wait_for(1).await;
    assert_eq!(
        records.len(),
        1,
        "only the refusal is journaled: {records:?}"
    );
    let r = &records[0];
    assert_eq!(r.kind, RecordKind::Refusal);
    assert_eq!(r.step, Some(RefusalStep::Request));
    assert_eq!(r.principal, Some(p("nitrile://c1/operator/alice")));
    assert!(r.cert_sha256.is_some());
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|s| s.starts_with("unreadable_body: ")),
        "{r:?}"
    );
    let detail = r.detail.as_ref().unwrap();
    assert_eq!(detail["method"], "POST");
    assert_eq!(detail["path"], "/v1/big");
    // The service takes no tokens here: its records name no audience.
    assert_eq!(r.audience, None);
    running.stop().await;
    let report = nitrile_audit::verify_journal(cell.dir.path().join("journal")).unwrap();
    assert_eq!(report.records, 1);
}
