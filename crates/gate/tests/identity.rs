//! A service starts only as the principal its certificate names: another
//! kind, another principal, another cell's certificate or a key others may
//! read is refused at load, with an error naming the file. Real CAs and
//! certificate files.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use nitrile_api::{Name, PrincipalId, PrincipalKind};
use nitrile_gate::{Expected, IdentityError, ServiceIdentity};
use nitrile_pki::{CA_CERT_FILE, CellCa, cert_and_key_paths};
use time::OffsetDateTime;

struct Pki {
    dir: tempfile::TempDir,
    cell: Name,
}

fn p(s: &str) -> PrincipalId {
    PrincipalId::parse(s).unwrap()
}

impl Pki {
    fn new(cell: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cell = Name::new(cell).unwrap();
        CellCa::init_or_load(&dir.path().join("pki"), &cell, OffsetDateTime::now_utc()).unwrap();
        Self { dir, cell }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("pki").join(CA_CERT_FILE)
    }

    /// Issues a certificate for `kind/name` of this cell; its files.
    fn issue(&self, kind_name: &str) -> (PathBuf, PathBuf) {
        let now = OffsetDateTime::now_utc();
        let ca = CellCa::load(&self.dir.path().join("pki"), &self.cell, now).unwrap();
        let principal = p(&format!("nitrile://{}/{kind_name}", self.cell));
        let (cert, key) = cert_and_key_paths(&self.dir.path().join(kind_name.replace('/', "-")));
        ca.issue(&principal, None, now)
            .unwrap()
            .write_files(&cert, &key)
            .unwrap();
        (cert, key)
    }

    fn load(
        &self,
        cert: &Path,
        key: &Path,
        expected: &Expected,
    ) -> Result<ServiceIdentity, IdentityError> {
        ServiceIdentity::load(&self.cell, &self.ca(), cert, key, expected)
    }
}

#[test]
fn a_service_runs_as_the_principal_its_certificate_names() {
    let pki = Pki::new("c1");
    let (cert, key) = pki.issue("service/logd");
    let id = pki
        .load(&cert, &key, &Expected::Kind(PrincipalKind::Service))
        .unwrap();
    assert_eq!(id.principal(), &p("nitrile://c1/service/logd"));
    assert_eq!(id.cert_path(), cert);
    id.server_config().unwrap();
    id.client_config().unwrap();
    id.server().unwrap();
    let (cert, key) = pki.issue("host/h1");
    let id = pki
        .load(&cert, &key, &Expected::Principal(p("nitrile://c1/host/h1")))
        .unwrap();
    assert_eq!(id.principal().kind, PrincipalKind::Host);
}

#[test]
fn a_certificate_of_another_kind_or_principal_is_refused_naming_the_file() {
    let pki = Pki::new("c1");
    let (cert, key) = pki.issue("host/h1");
    let err = pki
        .load(&cert, &key, &Expected::Kind(PrincipalKind::Service))
        .unwrap_err();
    assert!(
        matches!(&err, IdentityError::WrongPrincipal { path, found, .. }
            if path == &cert && **found == p("nitrile://c1/host/h1")),
        "{err}"
    );
    assert!(err.to_string().contains(&*cert.to_string_lossy()), "{err}");
    // Another host's certificate does not make this host.
    let err = pki
        .load(&cert, &key, &Expected::Principal(p("nitrile://c1/host/h2")))
        .unwrap_err();
    assert!(matches!(err, IdentityError::WrongPrincipal { .. }), "{err}");
    // An operator's certificate does not make a service.
    let (cert, key) = pki.issue("operator/alice");
    let err = pki
        .load(&cert, &key, &Expected::Kind(PrincipalKind::Service))
        .unwrap_err();
    assert!(matches!(err, IdentityError::WrongPrincipal { .. }), "{err}");
}

#[test]
fn a_certificate_of_another_cell_is_refused() {
    let ours = Pki::new("c1");
    let theirs = Pki::new("c2");
    let (cert, key) = theirs.issue("service/logd");
    let err = ours
        .load(&cert, &key, &Expected::Kind(PrincipalKind::Service))
        .unwrap_err();
    assert!(
        matches!(&err, IdentityError::NoPrincipal { path, .. } if path == &cert),
        "{err}"
    );
}

#[test]
fn a_readable_key_a_missing_ca_and_a_key_of_another_certificate_are_refused() {
    let pki = Pki::new("c1");
    let (cert, key) = pki.issue("service/logd");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = pki
        .load(&cert, &key, &Expected::Kind(PrincipalKind::Service))
        .unwrap_err();
    assert!(
        matches!(&err, IdentityError::Certificate { key: k, .. } if k == &key),
        "{err}"
    );
    assert!(err.to_string().contains(&*key.to_string_lossy()), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let missing = pki.dir.path().join("no-ca.pem");
    let err = ServiceIdentity::load(
        &pki.cell,
        &missing,
        &cert,
        &key,
        &Expected::Kind(PrincipalKind::Service),
    )
    .unwrap_err();
    assert!(
        matches!(&err, IdentityError::Ca { path, .. } if path == &missing),
        "{err}"
    );

    // logd's certificate with tokend's key: no TLS configuration is made.
    let (_, other_key) = pki.issue("service/tokend");
    let id = pki.load(&cert, &other_key, &Expected::Kind(PrincipalKind::Service));
    let refused = match id {
        Err(e) => e,
        Ok(id) => id
            .server_config()
            .expect_err("a key of another certificate was used"),
    };
    assert!(
        matches!(
            refused,
            IdentityError::Config { .. } | IdentityError::Certificate { .. }
        ),
        "{refused}"
    );
}
