//! Documents signed with a principal's cell certificate key, and their
//! verification by anyone holding the cell's CA certificate.
//!
//! A host signs what it states about itself or its instances (its tunnel
//! announcement, an instance identity document) with the key of its mTLS
//! certificate; a verifier checks the certificate chains to the cell CA
//! (and was valid at the given time), names a principal of that cell, and
//! signed exactly these bytes. The scheme is the key's: ECDSA P-256 with
//! SHA-256 for the keys this crate issues.

use std::sync::Arc;

use nitrile_api::{Name, PrincipalId};
use rustls::SignatureScheme;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::SigningKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::identity::PeerIdentity;
use crate::tls::{CaRoots, TlsIdentity, provider};

/// The schemes a signer may use, in order of preference.
const SCHEMES: [SignatureScheme; 2] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ED25519,
];

/// Why a document could not be signed or did not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The key cannot sign with any scheme this module uses.
    #[error("the key cannot sign with ECDSA P-256/SHA-256 or Ed25519")]
    UnsupportedKey,
    /// The key could not be loaded.
    #[error("the private key is not usable")]
    Key(#[source] rustls::Error),
    /// The signing operation failed.
    #[error("signing failed")]
    Sign(#[source] rustls::Error),
    /// The certificate PEM holds no certificate, or more than one.
    #[error("the signer's certificate is not one PEM certificate")]
    Certificate,
    /// The certificate does not chain to the cell's CA, has expired or is
    /// not for client authentication.
    #[error("the signer's certificate is not valid under the cell's CA: {0}")]
    Untrusted(#[source] rustls::Error),
    /// The certificate names no principal of the cell.
    #[error("the signer's certificate names no principal of cell {0}")]
    NoPrincipal(Name),
    /// The signature does not verify with the certificate's key.
    #[error("the signature does not verify with the signer's certificate")]
    BadSignature,
}

/// Signs with a principal's certificate key.
pub struct CellSigner {
    key: Arc<dyn SigningKey>,
    scheme: SignatureScheme,
    cert_pem: String,
}

impl std::fmt::Debug for CellSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CellSigner")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

impl CellSigner {
    /// A signer over `identity`'s key; its certificate (the leaf) goes
    /// with every signature.
    pub fn new(identity: &TlsIdentity) -> Result<Self, SignError> {
        let key = identity.signing_key().map_err(SignError::Key)?;
        let scheme = key
            .choose_scheme(&SCHEMES)
            .map(|s| s.scheme())
            .ok_or(SignError::UnsupportedKey)?;
        let cert_pem = pem_of(identity.leaf());
        Ok(Self {
            key,
            scheme,
            cert_pem,
        })
    }

    /// The signer's certificate, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let signer = self
            .key
            .choose_scheme(&[self.scheme])
            .ok_or(SignError::UnsupportedKey)?;
        signer.sign(message).map_err(SignError::Sign)
    }
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Checks that `cert_pem` is one certificate issued by the cell CA of
/// `roots`, valid at `now`, naming a principal of `cell`, and that it
/// signed `message` with `signature`. Returns the principal.
pub fn verify_signed(
    roots: &CaRoots,
    cell: &Name,
    cert_pem: &[u8],
    message: &[u8],
    signature: &[u8],
    now: UnixTime,
) -> Result<PrincipalId, SignError> {
    let mut certs = CertificateDer::pem_slice_iter(cert_pem);
    let cert = match (certs.next(), certs.next()) {
        (Some(Ok(c)), None) => c,
        _ => return Err(SignError::Certificate),
    };
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.store(), provider.clone())
        .build()
        .map_err(|_| SignError::Certificate)?;
    verifier
        .verify_client_cert(&cert, &[], now)
        .map_err(SignError::Untrusted)?;
    let identity = PeerIdentity::from_der(cert.as_ref(), cell)
        .map_err(|_| SignError::NoPrincipal(cell.clone()))?;
    let ee = webpki::EndEntityCert::try_from(&cert).map_err(|_| SignError::Certificate)?;
    let algs = provider.signature_verification_algorithms;
    for scheme in SCHEMES {
        let Some((_, candidates)) = algs.mapping.iter().find(|(s, _)| *s == scheme) else {
            continue;
        };
        for alg in candidates.iter() {
            if ee.verify_signature(*alg, message, signature).is_ok() {
                return Ok(identity.principal);
            }
        }
    }
    Err(SignError::BadSignature)
}
