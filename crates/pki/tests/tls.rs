//! The TLS configurations, exercised by real rustls handshakes in memory.

use std::sync::Arc;
use std::time::Duration;

use nitrile_api::{Name, PrincipalId};
use nitrile_pki::tls::danger::{
    danger_client_config_tls12_only, danger_client_config_without_certificate,
    danger_server_config_tls12_only,
};
use nitrile_pki::tls::{CaRoots, TlsIdentity, client_config, server_config, server_name};
use nitrile_pki::{CellCa, PeerIdentity};
use proptest::prelude::*;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

struct Cell {
    _dir: tempfile::TempDir,
    ca: CellCa,
    roots: CaRoots,
}

fn cell(name: &str, now: OffsetDateTime) -> Cell {
    let dir = tempfile::tempdir().unwrap();
    let ca = CellCa::init_or_load(dir.path(), &Name::new(name).unwrap(), now).unwrap();
    let roots = CaRoots::from_pem(ca.cert_pem().as_bytes()).unwrap();
    Cell {
        _dir: dir,
        ca,
        roots,
    }
}

fn identity(
    cell: &Cell,
    principal: &str,
    now: OffsetDateTime,
    lifetime: Option<Duration>,
) -> TlsIdentity {
    let issued = cell
        .ca
        .issue(&PrincipalId::parse(principal).unwrap(), lifetime, now)
        .unwrap();
    TlsIdentity::from_issued(&issued).unwrap()
}

/// Runs a handshake, then one application-data exchange, between a client
/// and a server over an in-memory pipe. Returns the server's view of the
/// client certificate, or the first error either side reports.
fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    to: &PrincipalId,
) -> Result<CertificateDer<'static>, rustls::Error> {
    let mut c = ClientConnection::new(client, server_name(to))?;
    let mut s = ServerConnection::new(server)?;
    use std::io::{Read, Write};
    c.writer().write_all(b"ping").unwrap();
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
        }
        let mut got = [0u8; 4];
        if !s.is_handshaking() && s.reader().read_exact(&mut got).is_ok() {
            assert_eq!(&got, b"ping");
            assert_eq!(s.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
            assert_eq!(s.alpn_protocol(), Some(&b"http/1.1"[..]));
            return Ok(s.peer_certificates().unwrap()[0].clone().into_owned());
        }
    }
    panic!("handshake made no progress");
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn tokend() -> PrincipalId {
    PrincipalId::parse("nitrile://c1/service/tokend").unwrap()
}

#[test]
fn mutual_tls_round_trip_names_the_client() {
    let c1 = cell("c1", now());
    let server = identity(&c1, "nitrile://c1/service/tokend", now(), None);
    let client = identity(&c1, "nitrile://c1/operator/alice", now(), None);
    let seen = handshake(
        client_config(&c1.roots, &client).unwrap(),
        server_config(&c1.roots, &server).unwrap(),
        &tokend(),
    )
    .unwrap();
    let id = PeerIdentity::from_der(&seen, &Name::new("c1").unwrap()).unwrap();
    assert_eq!(id.principal.uri(), "nitrile://c1/operator/alice");
    assert_eq!(id.cert_sha256, client.leaf_sha256());
}

#[test]
fn client_cert_from_another_ca_is_refused() {
    let c1 = cell("c1", now());
    let impostor = cell("c1", now());
    let server = identity(&c1, "nitrile://c1/service/tokend", now(), None);
    // Same cell name, same principal, but signed by another CA; the client
    // trusts the real CA so that only the server's check is tested.
    let forged = identity(&impostor, "nitrile://c1/operator/alice", now(), None);
    let err = handshake(
        client_config(&c1.roots, &forged).unwrap(),
        server_config(&c1.roots, &server).unwrap(),
        &tokend(),
    )
    .unwrap_err();
    assert!(
        // Same issuer name, so webpki tries the real CA key and the
        // signature fails; an issuer of another name is UnknownIssuer.
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadSignature | rustls::CertificateError::UnknownIssuer
            )
        ),
        "{err:?}"
    );
}

#[test]
fn client_cert_from_another_cell_ca_is_refused() {
    let c1 = cell("c1", now());
    let c2 = cell("c2", now());
    let server = identity(&c1, "nitrile://c1/service/tokend", now(), None);
    let foreign = identity(&c2, "nitrile://c2/operator/alice", now(), None);
    let err = handshake(
        client_config(&c1.roots, &foreign).unwrap(),
        server_config(&c1.roots, &server).unwrap(),
        &tokend(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
}

#[test]
fn server_cert_from_another_ca_is_refused() {
    let c1 = cell("c1", now());
    let impostor = cell("c1", now());
    let server = identity(&impostor, "nitrile://c1/service/tokend", now(), None);
    let client = identity(&c1, "nitrile://c1/operator/alice", now(), None);
    let err = handshake(
        client_config(&c1.roots, &client).unwrap(),
        server_config(&impostor.roots, &server).unwrap(),
        &tokend(),
    )
    .unwrap_err();
    assert!(
        // Same issuer name, so webpki tries the real CA key and the
        // signature fails; an issuer of another name is UnknownIssuer.
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadSignature | rustls::CertificateError::UnknownIssuer
            )
        ),
        "{err:?}"
    );
}

#[test]
fn expired_client_cert_is_refused() {
    let long_ago = now() - time::Duration::days(20);
    let c1 = cell("c1", long_ago);
    let server = identity(&c1, "nitrile://c1/service/tokend", now(), None);
    let expired = identity(
        &c1,
        "nitrile://c1/operator/alice",
        long_ago,
        Some(Duration::from_secs(3600)),
    );
    let err = handshake(
        client_config(&c1.roots, &expired).unwrap(),
        server_config(&c1.roots, &server).unwrap(),
        &tokend(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn expired_server_cert_is_refused() {
    let long_ago = now() - time::Duration::days(20);
    let c1 = cell("c1", long_ago);
    let server = identity(
        &c1,
        "nitrile://c1/service/tokend",
        long_ago,
        Some(Duration::from_secs(3600)),
    );
    let client = identity(&c1, "nitrile://c1/operator/alice", now(), None);
    let err = handshake(
        client_config(&c1.roots, &client).unwrap(),
        server_config(&c1.roots, &server).unwrap(),
        &tokend(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn client_without_certificate_is_refused() {
    let c1 = cell("c1", now());
    let server = identity(&c1, "nitrile://c1/service/tokend", now(), None);
    let err = handshake(
        danger_client_config_without_certificate(&c1.roots).unwrap(),
        server_config(&c1.roots, &server).unwrap(),
        &tokend(),
    )
    .unwrap_err();
    assert!(
        matches!(err, rustls::Error::NoCertificatesPresented),
        "{err:?}"
    );
}

#[test]
fn tls12_client_is_refused() {
    let c1 = cell("c1", now());
    let server = identity(&c1, "nitrile://c1/service/tokend", now(), None);
    let client = identity(&c1, "nitrile://c1/operator/alice", now(), None);
    let err = handshake(
        danger_client_config_tls12_only(&c1.roots, &client).unwrap(),
        server_config(&c1.roots, &server).unwrap(),
        &tokend(),
    )
    .unwrap_err();
    assert!(matches!(err, rustls::Error::PeerIncompatible(_)), "{err:?}");
}

#[test]
fn tls12_server_is_refused() {
    let c1 = cell("c1", now());
    let server = identity(&c1, "nitrile://c1/service/tokend", now(), None);
    let client = identity(&c1, "nitrile://c1/operator/alice", now(), None);
    let err = handshake(
        client_config(&c1.roots, &client).unwrap(),
        danger_server_config_tls12_only(&c1.roots, &server).unwrap(),
        &tokend(),
    )
    .unwrap_err();
    assert!(matches!(err, rustls::Error::PeerIncompatible(_)), "{err:?}");
}

#[test]
fn server_must_be_the_principal_dialled() {
    let c1 = cell("c1", now());
    let server = identity(&c1, "nitrile://c1/host/h2", now(), None);
    let client = identity(&c1, "nitrile://c1/operator/alice", now(), None);
    let h1 = PrincipalId::parse("nitrile://c1/host/h1").unwrap();
    let err = handshake(
        client_config(&c1.roots, &client).unwrap(),
        server_config(&c1.roots, &server).unwrap(),
        &h1,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[test]
fn operator_cert_cannot_serve() {
    let c1 = cell("c1", now());
    // An operator certificate has no serverAuth and no DNS name.
    let server = identity(&c1, "nitrile://c1/operator/alice", now(), None);
    let client = identity(&c1, "nitrile://c1/operator/bob", now(), None);
    let alice = PrincipalId::parse("nitrile://c1/operator/alice").unwrap();
    let err = handshake(
        client_config(&c1.roots, &client).unwrap(),
        server_config(&c1.roots, &server).unwrap(),
        &alice,
    )
    .unwrap_err();
    assert!(
        matches!(err, rustls::Error::InvalidCertificate(_)),
        "{err:?}"
    );
}

#[test]
fn identity_files_with_readable_key_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let c1 = cell("c1", now());
    let issued = c1
        .ca
        .issue(
            &PrincipalId::parse("nitrile://c1/operator/alice").unwrap(),
            None,
            now(),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = nitrile_pki::cert_and_key_paths(&dir.path().join("alice"));
    issued.write_files(&cert, &key).unwrap();
    let id = TlsIdentity::load(&cert, &key).unwrap();
    assert_eq!(id.leaf_sha256(), issued.cert_sha256());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = TlsIdentity::load(&cert, &key).unwrap_err();
    assert!(
        matches!(err, nitrile_pki::tls::TlsError::KeyFile(_)),
        "{err:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Damaging a real certificate never makes parsing panic, and never
    /// yields another principal of the cell.
    #[test]
    fn corrupted_certificates_never_panic(idx in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        static CERT: std::sync::OnceLock<(Vec<u8>, tempfile::TempDir)> = std::sync::OnceLock::new();
        let (der, _) = CERT.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let ca = CellCa::init_or_load(dir.path(), &Name::new("c1").unwrap(), now()).unwrap();
            let issued = ca.issue(&PrincipalId::parse("nitrile://c1/host/h1").unwrap(), None, now()).unwrap();
            (issued.cert_der.to_vec(), dir)
        });
        let cell = Name::new("c1").unwrap();
        let mut bytes = der.clone();
        let i = idx.index(bytes.len());
        bytes[i] = byte;
        if let Ok(id) = PeerIdentity::from_der(&bytes, &cell) {
            prop_assert_eq!(id.principal.cell.as_str(), "c1");
        }
        bytes.truncate(cut.index(bytes.len()));
        let _ = PeerIdentity::from_der(&bytes, &cell);
    }
}
