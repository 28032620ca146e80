//! The cell certificate authority: creating, loading, issuing and renewing.

use std::fmt;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nitrile_api::{Name, PrincipalId, PrincipalKind};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;
use zeroize::Zeroizing;

use crate::PkiError;
use crate::fsutil::{CERT_MODE, KEY_MODE, atomic_write, check_key_mode};
use crate::identity::{cert_sha256, parse, principal_of, server_dns_name};

/// File name of the CA certificate in the CA directory (mode 0644).
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in the CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";

/// Lifetime of a cell CA: 10 years.
pub const CA_LIFETIME: Duration = Duration::from_secs(3650 * 86_400);
/// Default lifetime of operator and auditor certificates: 8 hours, one shift.
pub const DEFAULT_HUMAN_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Most an operator or auditor certificate may live: 24 hours.
pub const MAX_HUMAN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of service and host certificates: 7 days.
pub const DEFAULT_MACHINE_LIFETIME: Duration = Duration::from_secs(7 * 86_400);
/// Most a service or host certificate may live: 30 days.
pub const MAX_MACHINE_LIFETIME: Duration = Duration::from_secs(30 * 86_400);

/// How far `not_before` is set before `now`, so that a peer whose clock is a
/// little behind still accepts a fresh certificate.
const NOT_BEFORE_BACKDATE: Duration = Duration::from_secs(5 * 60);

/// The default certificate lifetime of a principal kind.
pub fn default_lifetime(kind: PrincipalKind) -> Duration {
    match kind {
        PrincipalKind::Operator | PrincipalKind::Auditor | PrincipalKind::Customer => {
            DEFAULT_HUMAN_LIFETIME
        }
        PrincipalKind::Service | PrincipalKind::Host => DEFAULT_MACHINE_LIFETIME,
    }
}

/// The longest certificate lifetime of a principal kind.
pub fn max_lifetime(kind: PrincipalKind) -> Duration {
    match kind {
        PrincipalKind::Operator | PrincipalKind::Auditor | PrincipalKind::Customer => {
            MAX_HUMAN_LIFETIME
        }
        PrincipalKind::Service | PrincipalKind::Host => MAX_MACHINE_LIFETIME,
    }
}

fn ca_common_name(cell: &Name) -> String {
    format!("nitrile cell {cell} CA")
}

fn add(t: OffsetDateTime, d: Duration) -> Result<OffsetDateTime, PkiError> {
    let d = time::Duration::try_from(d).map_err(|_| PkiError::TimeOutOfRange)?;
    t.checked_add(d).ok_or(PkiError::TimeOutOfRange)
}

fn sub(t: OffsetDateTime, d: Duration) -> Result<OffsetDateTime, PkiError> {
    let d = time::Duration::try_from(d).map_err(|_| PkiError::TimeOutOfRange)?;
    t.checked_sub(d).ok_or(PkiError::TimeOutOfRange)
}

/// A cell's certificate authority, loaded with its private key.
///
/// Created on first use in a directory holding [`CA_CERT_FILE`] and
/// [`CA_KEY_FILE`]; ECDSA P-256, valid for [`CA_LIFETIME`].
pub struct CellCa {
    cell: Name,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    spki_der: Vec<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CellCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CellCa")
            .field("cell", &self.cell)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CellCa {
    /// Loads the CA of `cell` from `dir`, creating it (and `dir`, mode 0700)
    /// if neither file exists.
    ///
    /// Loading checks that the key file is private, that the key matches the
    /// certificate, that the certificate is a self-signed CA certificate of
    /// `cell`, and that it is valid at `now`. A directory with only one of
    /// the two files is refused rather than repaired.
    pub fn init_or_load(dir: &Path, cell: &Name, now: OffsetDateTime) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let exists = |p: &Path| p.try_exists().map_err(|e| PkiError::io(p, e));
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => Self::load(dir, cell, now),
            (false, false) => Self::create(dir, cell, now),
            _ => Err(PkiError::CaIncomplete {
                dir: dir.to_owned(),
            }),
        }
    }

    /// Loads an existing CA of `cell` from `dir`; see [`Self::init_or_load`]
    /// for the checks.
    pub fn load(dir: &Path, cell: &Name, now: OffsetDateTime) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        check_key_mode(&key_path)?;
        let cert_pem = read_to_string(&cert_path)?;
        let key_pem = Zeroizing::new(read_to_string(&key_path)?);
        let key = KeyPair::from_pem(&key_pem).map_err(PkiError::Crypto)?;
        Self::from_parts(cell, cert_pem, key, now)
    }

    fn create(dir: &Path, cell: &Name, now: OffsetDateTime) -> Result<Self, PkiError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| PkiError::io(dir, e))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::Crypto)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "nitrile");
        dn.push(DnType::CommonName, ca_common_name(cell));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = sub(now, NOT_BEFORE_BACKDATE)?;
        params.not_after = add(now, CA_LIFETIME)?;
        let cert = params.self_signed(&key).map_err(PkiError::Crypto)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        // Key first: a CA certificate without its key is useless, and the
        // half-written state is refused on the next load either way.
        atomic_write(&dir.join(CA_KEY_FILE), key_pem.as_bytes(), KEY_MODE)?;
        atomic_write(&dir.join(CA_CERT_FILE), cert.pem().as_bytes(), CERT_MODE)?;
        Self::from_parts(cell, cert.pem(), key, now)
    }

    fn from_parts(
        cell: &Name,
        cert_pem: String,
        key: KeyPair,
        now: OffsetDateTime,
    ) -> Result<Self, PkiError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| PkiError::NoCertificateInPem)?;
        let cert = parse(&cert_der)?;
        if !cert.is_ca() {
            return Err(PkiError::NotACa);
        }
        let found = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        if found != ca_common_name(cell) {
            return Err(PkiError::CaOfOtherCell {
                expected: cell.clone(),
                found,
            });
        }
        let spki_der = cert.public_key().raw.to_vec();
        if key.subject_public_key_info() != spki_der {
            return Err(PkiError::CaKeyMismatch);
        }
        cert.verify_signature(None).map_err(|_| PkiError::NotACa)?;
        let not_before = cert.validity().not_before.to_datetime();
        let not_after = cert.validity().not_after.to_datetime();
        if now < not_before || now > not_after {
            return Err(PkiError::CaNotValidNow {
                not_before,
                not_after,
            });
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(PkiError::Crypto)?;
        Ok(Self {
            cell: cell.clone(),
            cert_pem,
            cert_der,
            spki_der,
            not_before,
            not_after,
            issuer,
        })
    }

    /// The cell this CA issues for.
    pub fn cell(&self) -> &Name {
        &self.cell
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate's DER.
    pub fn cert_sha256(&self) -> [u8; 32] {
        cert_sha256(&self.cert_der)
    }

    /// Start of the CA's validity.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// End of the CA's validity.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Issues a certificate with a fresh ECDSA P-256 key for `principal`.
    ///
    /// The certificate carries the principal's URI as URI SAN and as subject
    /// common name. Service and host certificates also carry the DNS SAN
    /// [`server_dns_name`] and may serve and call (serverAuth + clientAuth);
    /// operator and auditor certificates may only call (clientAuth).
    ///
    /// `lifetime` defaults to [`default_lifetime`] of the principal's kind and
    /// may not exceed [`max_lifetime`], nor reach past the CA's own expiry.
    pub fn issue(
        &self,
        principal: &PrincipalId,
        lifetime: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<IssuedCert, PkiError> {
        let (params, not_after) = self.params(principal, lifetime, now, KeyPurpose::Tls)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::Crypto)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(PkiError::Crypto)?;
        Ok(IssuedCert {
            principal: principal.clone(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: Zeroizing::new(key.serialize_pem()),
            not_after,
        })
    }

    /// Issues a certificate for `principal` whose private key is held
    /// elsewhere and never seen here (a TPM): `point` is its uncompressed
    /// ECDSA public point, P-256 or P-384. For [`KeyPurpose::Tls`] the
    /// certificate is like [`Self::issue`]'s; for
    /// [`KeyPurpose::Attestation`] it only signs (no TLS use): the key of a
    /// host's attestation documents. Returns the certificate as PEM.
    pub fn issue_for_key(
        &self,
        principal: &PrincipalId,
        point: &[u8],
        purpose: KeyPurpose,
        lifetime: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<String, PkiError> {
        let alg = match point.len() {
            65 => &PKCS_ECDSA_P256_SHA256,
            97 => &rcgen::PKCS_ECDSA_P384_SHA384,
            _ => return Err(PkiError::Crypto(rcgen::Error::CouldNotParseKeyPair)),
        };
        let (params, _) = self.params(principal, lifetime, now, purpose)?;
        let cert = params
            .signed_by(
                &ExternalKey {
                    point: point.to_vec(),
                    alg,
                },
                &self.issuer,
            )
            .map_err(PkiError::Crypto)?;
        Ok(cert.pem())
    }

    fn params(
        &self,
        principal: &PrincipalId,
        lifetime: Option<Duration>,
        now: OffsetDateTime,
        purpose: KeyPurpose,
    ) -> Result<(CertificateParams, OffsetDateTime), PkiError> {
        if principal.cell != self.cell {
            return Err(PkiError::PrincipalOfOtherCell {
                principal: principal.clone(),
                cell: self.cell.clone(),
            });
        }
        let lifetime = lifetime.unwrap_or_else(|| default_lifetime(principal.kind));
        let max = max_lifetime(principal.kind);
        if lifetime.is_zero() {
            return Err(PkiError::LifetimeZero);
        }
        if lifetime > max {
            return Err(PkiError::LifetimeTooLong {
                kind: principal.kind,
                requested: lifetime,
                max,
            });
        }
        if now < self.not_before || now > self.not_after {
            return Err(PkiError::CaNotValidNow {
                not_before: self.not_before,
                not_after: self.not_after,
            });
        }
        let not_after = add(now, lifetime)?;
        if not_after > self.not_after {
            return Err(PkiError::OutlivesCa {
                ca_not_after: self.not_after,
            });
        }

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, principal.uri());
        params.distinguished_name = dn;
        let ia5 = |s: String| s.try_into().map_err(PkiError::Crypto);
        params.subject_alt_names = vec![SanType::URI(ia5(principal.uri())?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        match principal.kind {
            _ if purpose == KeyPurpose::Attestation => {}
            PrincipalKind::Service | PrincipalKind::Host => {
                params
                    .subject_alt_names
                    .push(SanType::DnsName(ia5(server_dns_name(principal))?));
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            }
            PrincipalKind::Operator | PrincipalKind::Auditor | PrincipalKind::Customer => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.not_before = sub(now, NOT_BEFORE_BACKDATE)?;
        params.not_after = not_after;
        Ok((params, not_after))
    }

    /// Re-issues, with a fresh key, a certificate for the principal named by
    /// `old_cert_der`, which must have been signed by this CA (it may have
    /// expired). `lifetime` works as in [`Self::issue`].
    pub fn renew(
        &self,
        old_cert_der: &[u8],
        lifetime: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<IssuedCert, PkiError> {
        let old = parse(old_cert_der)?;
        let (_, spki) = <x509_parser::x509::SubjectPublicKeyInfo<'_> as FromDer<'_, _>>::from_der(
            &self.spki_der,
        )
        .map_err(|_| PkiError::CaKeyMismatch)?;
        old.verify_signature(Some(&spki))
            .map_err(|_| PkiError::NotIssuedByThisCa)?;
        let principal = principal_of(&old)?.ok_or(PkiError::NoPrincipal)?;
        self.issue(&principal, lifetime, now)
    }
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|e| PkiError::io(path, e))
}

/// A freshly issued certificate and its private key.
pub struct IssuedCert {
    /// The principal it names.
    pub principal: PrincipalId,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The private key, PKCS#8 PEM; wiped from memory when dropped.
    pub key_pem: Zeroizing<String>,
    /// When the certificate expires.
    pub not_after: OffsetDateTime,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("principal", &self.principal)
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// SHA-256 of the certificate's DER.
    pub fn cert_sha256(&self) -> [u8; 32] {
        cert_sha256(&self.cert_der)
    }

    /// Writes the certificate (mode 0644) and key (mode 0600) atomically; see
    /// [`write_cert_and_key`].
    pub fn write_files(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_cert_and_key(cert_path, key_path, self)
    }
}

/// Writes a certificate (mode 0644) and its key (mode 0600), each atomically
/// (temporary file, fsync, rename, directory fsync); the key is written first.
pub fn write_cert_and_key(
    cert_path: &Path,
    key_path: &Path,
    issued: &IssuedCert,
) -> Result<(), PkiError> {
    atomic_write(key_path, issued.key_pem.as_bytes(), KEY_MODE)?;
    atomic_write(cert_path, issued.cert_pem.as_bytes(), CERT_MODE)
}

/// The paths `PREFIX.pem` (certificate) and `PREFIX.key` (key) used by the
/// CLI and by services' state directories.
pub fn cert_and_key_paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let mut cert = prefix.as_os_str().to_owned();
    cert.push(".pem");
    let mut key = prefix.as_os_str().to_owned();
    key.push(".key");
    (cert.into(), key.into())
}

/// What a certificate for a key held elsewhere is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPurpose {
    /// A TLS identity (serverAuth and clientAuth for services and hosts).
    Tls,
    /// Signing attestation documents only: no TLS use.
    Attestation,
}

/// A public key held elsewhere, for rcgen to certify.
struct ExternalKey {
    point: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for ExternalKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}
