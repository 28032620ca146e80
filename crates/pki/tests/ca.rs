//! The cell CA on disk: creation, loading, issuing, renewal.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nitrile_api::{Name, PrincipalId};
use nitrile_pki::{
    CA_CERT_FILE, CA_KEY_FILE, CellCa, CertInfo, MAX_HUMAN_LIFETIME, MAX_MACHINE_LIFETIME,
    PeerIdentity, PkiError, cert_and_key_paths, cert_der_from_pem, cert_sha256,
};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn principal(s: &str) -> PrincipalId {
    PrincipalId::parse(s).unwrap()
}

fn mode(p: &std::path::Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

#[test]
fn ca_is_created_once_with_private_key_then_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = CellCa::init_or_load(&ca_dir, &name("c1"), now()).unwrap();
    assert_eq!(mode(&ca_dir.join(CA_KEY_FILE)), 0o600);
    assert_eq!(mode(&ca_dir.join(CA_CERT_FILE)), 0o644);
    assert_eq!(mode(&ca_dir), 0o700);
    let again = CellCa::init_or_load(&ca_dir, &name("c1"), now()).unwrap();
    assert_eq!(ca.cert_sha256(), again.cert_sha256());
    assert_eq!(
        fs::read_to_string(ca_dir.join(CA_CERT_FILE)).unwrap(),
        ca.cert_pem()
    );
    let info = CertInfo::from_der(ca.cert_der()).unwrap();
    assert!(info.is_ca);
    assert_eq!(info.principal, None);
    let lifetime = info.not_after - info.not_before;
    assert!(lifetime >= time::Duration::days(3650), "{lifetime}");
    // The key never appears in Debug output.
    assert!(!format!("{ca:?}").contains("PRIVATE"));
}

#[test]
fn ca_of_another_cell_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    CellCa::init_or_load(dir.path(), &name("c1"), now()).unwrap();
    let err = CellCa::init_or_load(dir.path(), &name("c2"), now()).unwrap_err();
    assert!(matches!(err, PkiError::CaOfOtherCell { .. }), "{err:?}");
}

#[test]
fn mismatched_ca_key_is_refused() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    CellCa::init_or_load(a.path(), &name("c1"), now()).unwrap();
    CellCa::init_or_load(b.path(), &name("c1"), now()).unwrap();
    fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
    let err = CellCa::load(a.path(), &name("c1"), now()).unwrap_err();
    assert!(matches!(err, PkiError::CaKeyMismatch), "{err:?}");
}

#[test]
fn half_a_ca_is_refused_not_repaired() {
    let dir = tempfile::tempdir().unwrap();
    CellCa::init_or_load(dir.path(), &name("c1"), now()).unwrap();
    fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
    let err = CellCa::init_or_load(dir.path(), &name("c1"), now()).unwrap_err();
    assert!(matches!(err, PkiError::CaIncomplete { .. }), "{err:?}");
    assert!(!dir.path().join(CA_CERT_FILE).exists());
}

#[test]
fn readable_ca_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    CellCa::init_or_load(dir.path(), &name("c1"), now()).unwrap();
    let key = dir.path().join(CA_KEY_FILE);
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = CellCa::load(dir.path(), &name("c1"), now()).unwrap_err();
    assert!(matches!(err, PkiError::KeyFileTooOpen { .. }), "{err:?}");
}

#[test]
fn expired_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let long_ago = now() - time::Duration::days(3700);
    CellCa::init_or_load(dir.path(), &name("c1"), long_ago).unwrap();
    let err = CellCa::load(dir.path(), &name("c1"), now()).unwrap_err();
    assert!(matches!(err, PkiError::CaNotValidNow { .. }), "{err:?}");
}

#[test]
fn issue_then_parse_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CellCa::init_or_load(dir.path(), &name("c1"), now()).unwrap();
    let t = now();
    let p = principal("nitrile://c1/operator/alice");
    let issued = ca.issue(&p, None, t).unwrap();
    let id = PeerIdentity::from_der(&issued.cert_der, &name("c1")).unwrap();
    assert_eq!(id.principal, p);
    assert_eq!(id.cert_sha256, cert_sha256(&issued.cert_der));
    assert_eq!(id.cert_sha256, issued.cert_sha256());
    // X.509 keeps whole seconds.
    assert_eq!(
        id.not_after.unix_timestamp(),
        issued.not_after.unix_timestamp()
    );
    assert_eq!(issued.not_after - t, time::Duration::hours(8));
    // PEM and DER agree.
    assert_eq!(
        cert_der_from_pem(issued.cert_pem.as_bytes()).unwrap(),
        issued.cert_der
    );
    assert!(issued.key_pem.contains("PRIVATE KEY"));
    assert!(!format!("{issued:?}").contains("PRIVATE"));
    // Two certificates for the same principal have different keys.
    let second = ca.issue(&p, None, t).unwrap();
    assert_ne!(second.cert_sha256(), issued.cert_sha256());
    assert_ne!(*second.key_pem, *issued.key_pem);
}

fn sans_and_ekus(der: &[u8]) -> (Vec<String>, Vec<String>, bool, bool) {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    for g in &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
    {
        match g {
            GeneralName::URI(u) => uris.push((*u).to_owned()),
            GeneralName::DNSName(d) => dns.push((*d).to_owned()),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    (uris, dns, eku.server_auth, eku.client_auth)
}

#[test]
fn services_and_hosts_get_dns_san_and_server_auth() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CellCa::init_or_load(dir.path(), &name("c1"), now()).unwrap();
    for (uri, dns) in [
        ("nitrile://c1/service/tokend", "tokend.service.c1.nitrile"),
        ("nitrile://c1/host/h1", "h1.host.c1.nitrile"),
    ] {
        let issued = ca.issue(&principal(uri), None, now()).unwrap();
        let (uris, dnss, server, client) = sans_and_ekus(&issued.cert_der);
        assert_eq!(uris, vec![uri.to_owned()]);
        assert_eq!(dnss, vec![dns.to_owned()]);
        assert!(server && client);
        let info = CertInfo::from_der(&issued.cert_der).unwrap();
        assert!(!info.is_ca);
        assert_eq!(info.subject_cn.as_deref(), Some(uri));
        assert_eq!(
            info.not_after - info.not_before,
            time::Duration::days(7) + time::Duration::minutes(5)
        );
    }
    for uri in ["nitrile://c1/operator/alice", "nitrile://c1/auditor/bob"] {
        let issued = ca.issue(&principal(uri), None, now()).unwrap();
        let (uris, dnss, server, client) = sans_and_ekus(&issued.cert_der);
        assert_eq!(uris, vec![uri.to_owned()]);
        assert!(dnss.is_empty());
        assert!(!server && client);
    }
}

#[test]
fn identity_of_wrong_cell_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = CellCa::init_or_load(dir.path(), &name("c2"), now()).unwrap();
    let issued = other
        .issue(&principal("nitrile://c2/operator/alice"), None, now())
        .unwrap();
    let err = PeerIdentity::from_der(&issued.cert_der, &name("c1")).unwrap_err();
    assert!(matches!(err, PkiError::WrongCell { .. }), "{err:?}");
    // The CA certificate itself names no principal.
    let err = PeerIdentity::from_der(other.cert_der(), &name("c2")).unwrap_err();
    assert!(matches!(err, PkiError::NoPrincipal), "{err:?}");
}

#[test]
fn ca_refuses_principal_of_another_cell() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CellCa::init_or_load(dir.path(), &name("c1"), now()).unwrap();
    let err = ca
        .issue(&principal("nitrile://c2/operator/alice"), None, now())
        .unwrap_err();
    assert!(
        matches!(err, PkiError::PrincipalOfOtherCell { .. }),
        "{err:?}"
    );
}

#[test]
fn lifetimes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CellCa::init_or_load(dir.path(), &name("c1"), now()).unwrap();
    let op = principal("nitrile://c1/operator/alice");
    let host = principal("nitrile://c1/host/h1");
    ca.issue(&op, Some(MAX_HUMAN_LIFETIME), now()).unwrap();
    let err = ca
        .issue(
            &op,
            Some(MAX_HUMAN_LIFETIME + Duration::from_secs(1)),
            now(),
        )
        .unwrap_err();
    assert!(matches!(err, PkiError::LifetimeTooLong { .. }), "{err:?}");
    ca.issue(&host, Some(MAX_MACHINE_LIFETIME), now()).unwrap();
    let err = ca
        .issue(
            &host,
            Some(MAX_MACHINE_LIFETIME + Duration::from_secs(1)),
            now(),
        )
        .unwrap_err();
    assert!(matches!(err, PkiError::LifetimeTooLong { .. }), "{err:?}");
    let err = ca.issue(&op, Some(Duration::ZERO), now()).unwrap_err();
    assert!(matches!(err, PkiError::LifetimeZero), "{err:?}");
    // Nothing outlives the CA.
    let near_end = ca.not_after() - time::Duration::hours(1);
    let err = ca.issue(&op, None, near_end).unwrap_err();
    assert!(matches!(err, PkiError::OutlivesCa { .. }), "{err:?}");
}

#[test]
fn renew_gives_same_principal_fresh_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CellCa::init_or_load(dir.path(), &name("c1"), now()).unwrap();
    let p = principal("nitrile://c1/host/h1");
    let old = ca
        .issue(&p, Some(Duration::from_secs(3600)), now())
        .unwrap();
    let new = ca.renew(&old.cert_der, None, now()).unwrap();
    assert_eq!(new.principal, p);
    assert_ne!(new.cert_sha256(), old.cert_sha256());
    assert_ne!(*new.key_pem, *old.key_pem);
    assert_eq!(
        PeerIdentity::from_der(&new.cert_der, &name("c1"))
            .unwrap()
            .principal,
        p
    );
}

#[test]
fn renew_refuses_certificate_of_another_ca() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ca = CellCa::init_or_load(a.path(), &name("c1"), now()).unwrap();
    let impostor = CellCa::init_or_load(b.path(), &name("c1"), now()).unwrap();
    let foreign = impostor
        .issue(&principal("nitrile://c1/operator/mallory"), None, now())
        .unwrap();
    let err = ca.renew(&foreign.cert_der, None, now()).unwrap_err();
    assert!(matches!(err, PkiError::NotIssuedByThisCa), "{err:?}");
}

#[test]
fn issued_files_are_written_with_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CellCa::init_or_load(&dir.path().join("ca"), &name("c1"), now()).unwrap();
    let issued = ca
        .issue(&principal("nitrile://c1/operator/alice"), None, now())
        .unwrap();
    let (cert, key) = cert_and_key_paths(&dir.path().join("alice"));
    assert_eq!(cert, dir.path().join("alice.pem"));
    assert_eq!(key, dir.path().join("alice.key"));
    issued.write_files(&cert, &key).unwrap();
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&cert), 0o644);
    assert_eq!(fs::read_to_string(&key).unwrap(), *issued.key_pem);
    assert_eq!(fs::read_to_string(&cert).unwrap(), issued.cert_pem);
}
