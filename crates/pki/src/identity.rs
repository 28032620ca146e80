//! Reading a principal's identity out of a certificate.

use nitrile_api::{Name, PrincipalId};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::PkiError;

/// Largest certificate, in DER bytes, that is parsed at all. nitrile's own
/// certificates are well under 1 KiB.
pub const MAX_CERT_DER: usize = 16 * 1024;

const URI_PREFIX: &str = "nitrile://";

/// SHA-256 of a certificate's DER encoding: the fingerprint that tokens are
/// bound to.
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// The DNS name that a service or host principal's certificate carries and
/// that clients use as TLS server name: `<name>.<kind>.<cell>.nitrile`.
///
/// Only service and host certificates carry it; for operators and auditors the
/// name is well-formed but no certificate will match it.
pub fn server_dns_name(principal: &PrincipalId) -> String {
    format!(
        "{}.{}.{}.nitrile",
        principal.name, principal.kind, principal.cell
    )
}

/// The identity of the peer at the other end of a verified TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The principal named by the certificate's `nitrile://` URI SAN.
    pub principal: PrincipalId,
    /// SHA-256 of the leaf certificate's DER; tokens are bound to it.
    pub cert_sha256: [u8; 32],
    /// When the certificate expires.
    pub not_after: OffsetDateTime,
}

impl PeerIdentity {
    /// Reads the identity out of a leaf certificate that the TLS handshake has
    /// already verified against the cell CA.
    ///
    /// Requires exactly one `nitrile://` URI SAN, a valid principal, of `cell`.
    /// This does not verify signatures or validity dates: that is the TLS
    /// verifier's job (see [`crate::tls`]).
    pub fn from_der(cert_der: &[u8], cell: &Name) -> Result<Self, PkiError> {
        let info = CertInfo::from_der(cert_der)?;
        let principal = info.principal.ok_or(PkiError::NoPrincipal)?;
        if &principal.cell != cell {
            return Err(PkiError::WrongCell {
                principal,
                expected: cell.clone(),
            });
        }
        Ok(Self {
            principal,
            cert_sha256: info.sha256,
            not_after: info.not_after,
        })
    }

    /// The certificate fingerprint as lowercase hex.
    pub fn cert_sha256_hex(&self) -> String {
        hex_lower(&self.cert_sha256)
    }
}

/// What a certificate says, for display and for checks that do not know the
/// cell yet (e.g. `nitrile pki show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The principal named by the single `nitrile://` URI SAN, if any (a CA
    /// certificate names none).
    pub principal: Option<PrincipalId>,
    /// Subject common name, if present.
    pub subject_cn: Option<String>,
    /// Issuer common name, if present.
    pub issuer_cn: Option<String>,
    /// Whether the certificate is a CA certificate.
    pub is_ca: bool,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// SHA-256 of the DER encoding.
    pub sha256: [u8; 32],
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl CertInfo {
    /// Parses a DER certificate of at most [`MAX_CERT_DER`] bytes.
    ///
    /// Fails if it has more than one `nitrile://` URI SAN or one that is not
    /// a valid principal.
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        let cert = parse(der)?;
        let principal = principal_of(&cert)?;
        let cn = |name: &x509_parser::x509::X509Name<'_>| {
            name.iter_common_name()
                .next()
                .and_then(|a| a.as_str().ok())
                .map(str::to_owned)
        };
        let dns_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(PkiError::BadCertificate(e)),
        };
        Ok(Self {
            principal,
            subject_cn: cn(cert.subject()),
            issuer_cn: cn(cert.issuer()),
            is_ca: cert.is_ca(),
            dns_names,
            sha256: cert_sha256(der),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
        })
    }

    /// The fingerprint as lowercase hex.
    pub fn sha256_hex(&self) -> String {
        hex_lower(&self.sha256)
    }
}

/// The first certificate of PEM data, DER.
pub fn cert_der_from_pem(pem: &[u8]) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem).map_err(|_| PkiError::NoCertificateInPem)
}

/// Parses one DER certificate, bounded and with nothing after it.
pub(crate) fn parse(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    if der.len() > MAX_CERT_DER {
        return Err(PkiError::CertificateTooLarge { len: der.len() });
    }
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| match e {
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => {
            PkiError::BadCertificate(e)
        }
        x509_parser::nom::Err::Incomplete(_) => {
            PkiError::BadCertificate(x509_parser::error::X509Error::InvalidCertificate)
        }
    })?;
    if !rest.is_empty() {
        return Err(PkiError::TrailingData);
    }
    Ok(cert)
}

/// The principal of the single `nitrile://` URI SAN, `None` if there is none.
pub(crate) fn principal_of(cert: &X509Certificate<'_>) -> Result<Option<PrincipalId>, PkiError> {
    let san = cert
        .subject_alternative_name()
        .map_err(PkiError::BadCertificate)?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|g| match g {
            GeneralName::URI(u) if u.starts_with(URI_PREFIX) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Ok(None),
        [uri] => PrincipalId::parse(uri)
            .map(Some)
            .map_err(PkiError::BadPrincipal),
        more => Err(PkiError::SeveralPrincipals(more.len())),
    }
}

pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oversize_input_is_refused_before_parsing() {
        let big = vec![0x30; MAX_CERT_DER + 1];
        let cell = Name::new("c").unwrap();
        assert!(matches!(
            PeerIdentity::from_der(&big, &cell),
            Err(PkiError::CertificateTooLarge { .. })
        ));
    }

    #[test]
    fn dns_name_layout() {
        let p = PrincipalId::parse("nitrile://cell-1/host/h1").unwrap();
        assert_eq!(server_dns_name(&p), "h1.host.cell-1.nitrile");
    }

    proptest! {
        #[test]
        fn from_der_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let cell = Name::new("c").unwrap();
            let _ = PeerIdentity::from_der(&bytes, &cell);
            let _ = CertInfo::from_der(&bytes);
        }

        #[test]
        fn from_der_never_panics_on_der_like_prefixes(
            tail in proptest::collection::vec(any::<u8>(), 0..1024),
            len in any::<u16>(),
        ) {
            let mut bytes = vec![0x30, 0x82, (len >> 8) as u8, len as u8];
            bytes.extend(tail);
            let cell = Name::new("c").unwrap();
            let _ = PeerIdentity::from_der(&bytes, &cell);
        }
    }
}
