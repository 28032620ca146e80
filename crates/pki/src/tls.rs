//! The one place where nitrile builds TLS configurations.
//!
//! Every configuration here is TLS 1.3 only, uses the `ring` provider chosen
//! explicitly (never a process-wide default), trusts the cell CA and nothing
//! else, and authenticates both ends: servers require and verify a client
//! certificate, clients present one and verify the server. There is no
//! parameter that turns TLS 1.2 or optional client authentication on; the
//! weakened configurations that tests use to attack servers are in
//! [`danger`], named so that a reviewer sees them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nitrile_api::PrincipalId;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::fsutil::check_key_mode;
use crate::identity::{cert_sha256, server_dns_name};
use crate::{IssuedCert, PkiError};

/// The only application protocol nitrile speaks over TLS.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Largest PEM file read as a certificate, key or CA bundle.
pub const MAX_PEM_FILE: u64 = 1024 * 1024;

/// Why a TLS identity, trust root or configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("could not read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is larger than [`MAX_PEM_FILE`].
    #[error("{path} is larger than {MAX_PEM_FILE} bytes; it is not a PEM certificate or key")]
    FileTooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The key file is not private to its owner.
    #[error("key file is not acceptable")]
    KeyFile(#[source] PkiError),
    /// PEM data could not be decoded.
    #[error("bad PEM data")]
    Pem(#[source] rustls_pki_types::pem::Error),
    /// The PEM data holds no certificate.
    #[error("no certificate found in PEM data")]
    NoCertificate,
    /// The PEM data holds no private key.
    #[error("no private key found in PEM data")]
    NoPrivateKey,
    /// A CA certificate was not accepted as trust anchor.
    #[error("CA certificate is not usable as trust anchor")]
    BadCaCertificate(#[source] rustls::Error),
    /// rustls refused the configuration (e.g. key and certificate do not match).
    #[error("TLS configuration refused")]
    Config(#[source] rustls::Error),
    /// A certificate verifier could not be built.
    #[error("certificate verifier could not be built")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// The bounded read's error as this module's: too large, or unreadable.
fn read_error(e: nitrile_fs::FsError) -> TlsError {
    match e {
        nitrile_fs::FsError::TooLarge { path, .. } => TlsError::FileTooLarge { path },
        e => TlsError::Io {
            path: e.path().to_owned(),
            source: e.into(),
        },
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    nitrile_fs::read_bounded(path, MAX_PEM_FILE).map_err(read_error)
}

/// The explicitly chosen crypto provider of every nitrile TLS configuration.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, as presented in a handshake.
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: KeyMaterial,
}

/// Where the private key is: in this process, or behind a signer (a TPM).
enum KeyMaterial {
    Der(PrivateKeyDer<'static>),
    Signer(Arc<dyn rustls::sign::SigningKey>),
}

impl KeyMaterial {
    fn clone_key(&self) -> Self {
        match self {
            Self::Der(k) => Self::Der(k.clone_key()),
            Self::Signer(s) => Self::Signer(Arc::clone(s)),
        }
    }
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsIdentity {
    /// Loads a PEM certificate chain (leaf first) and a PEM private key. The
    /// key file must not be accessible by group or others.
    pub fn load(cert_pem_path: &Path, key_pem_path: &Path) -> Result<Self, TlsError> {
        check_key_mode(key_pem_path).map_err(TlsError::KeyFile)?;
        let cert_pem = read_bounded(cert_pem_path)?;
        let key_pem = nitrile_fs::read_secret(key_pem_path, MAX_PEM_FILE).map_err(read_error)?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// Parses a PEM certificate chain (leaf first) and a PEM private key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(TlsError::Pem)?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey,
            e => TlsError::Pem(e),
        })?;
        Ok(Self {
            chain,
            key: KeyMaterial::Der(key),
        })
    }

    /// A PEM certificate chain (leaf first) whose key only `signer` uses:
    /// a key that never leaves a TPM. The signer must match the leaf's key.
    pub fn with_signer(
        cert_pem: &[u8],
        signer: Arc<dyn rustls::sign::SigningKey>,
    ) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(TlsError::Pem)?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        Ok(Self {
            chain,
            key: KeyMaterial::Signer(signer),
        })
    }

    /// The key as rustls signs with it.
    pub(crate) fn signing_key(&self) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        match &self.key {
            KeyMaterial::Der(k) => provider().key_provider.load_private_key(k.clone_key()),
            KeyMaterial::Signer(s) => Ok(Arc::clone(s)),
        }
    }

    fn certified(&self) -> Result<Arc<rustls::sign::SingleCertAndKey>, TlsError> {
        let key = self.signing_key().map_err(TlsError::Config)?;
        Ok(Arc::new(rustls::sign::SingleCertAndKey::from(
            rustls::sign::CertifiedKey::new(self.chain.clone(), key),
        )))
    }

    /// The identity of a certificate just issued.
    pub fn from_issued(issued: &IssuedCert) -> Result<Self, TlsError> {
        Self::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())
    }

    /// The leaf certificate, DER.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// SHA-256 of the leaf certificate: what a token for this identity is
    /// bound to.
    pub fn leaf_sha256(&self) -> [u8; 32] {
        cert_sha256(&self.chain[0])
    }
}

/// The trust anchors of a cell: its CA certificate(s).
#[derive(Debug, Clone)]
pub struct CaRoots {
    store: Arc<RootCertStore>,
}

impl CaRoots {
    /// Loads the cell CA certificate(s) from a PEM file.
    pub fn load(ca_pem_path: &Path) -> Result<Self, TlsError> {
        Self::from_pem(&read_bounded(ca_pem_path)?)
    }

    /// Parses the cell CA certificate(s) from PEM.
    pub fn from_pem(pem: &[u8]) -> Result<Self, TlsError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(TlsError::Pem)?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let mut store = RootCertStore::empty();
        for cert in certs {
            store.add(cert).map_err(TlsError::BadCaCertificate)?;
        }
        Ok(Self {
            store: Arc::new(store),
        })
    }

    /// The roots as a rustls store.
    pub fn store(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.store)
    }
}

/// A server configuration: TLS 1.3 only, client certificate required and
/// verified against the cell CA, ALPN `http/1.1`.
pub fn server_config(
    roots: &CaRoots,
    identity: &TlsIdentity,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.store(), provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier);
    let mut config = match &identity.key {
        KeyMaterial::Der(k) => config
            .with_single_cert(identity.chain.clone(), k.clone_key())
            .map_err(TlsError::Config)?,
        KeyMaterial::Signer(_) => config.with_cert_resolver(identity.certified()?),
    };
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration: TLS 1.3 only, presents `identity`, verifies the
/// server against the cell CA. Connect with [`server_name`] of the server's
/// principal.
pub fn client_config(
    roots: &CaRoots,
    identity: &TlsIdentity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.store(), provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_webpki_verifier(verifier);
    let mut config = match &identity.key {
        KeyMaterial::Der(k) => config
            .with_client_auth_cert(identity.chain.clone(), k.clone_key())
            .map_err(TlsError::Config)?,
        KeyMaterial::Signer(_) => config.with_client_cert_resolver(identity.certified()?),
    };
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// The TLS server name of a service or host principal:
/// `<name>.<kind>.<cell>.nitrile`, the DNS SAN of its certificate.
pub fn server_name(principal: &PrincipalId) -> ServerName<'static> {
    // Every part is a `Name`: 1-63 bytes of [a-z0-9-], neither starting nor
    // ending with '-', and the last label is "nitrile"; always a DNS name.
    ServerName::try_from(server_dns_name(principal))
        .expect("principal names are valid DNS labels by construction")
}

/// Weakened configurations, for tests that attack a server or client.
///
/// Test-only: nothing in nitrile's services or CLI may use these. They exist
/// so that tests can show that a real server refuses a TLS 1.2 client, a
/// client without certificate, and so on.
pub mod danger {
    use super::*;

    /// A client that offers TLS 1.2 only (and presents `identity`).
    pub fn danger_client_config_tls12_only(
        roots: &CaRoots,
        identity: &TlsIdentity,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = provider();
        let verifier = WebPkiServerVerifier::builder_with_provider(roots.store(), provider.clone())
            .build()
            .map_err(TlsError::Verifier)?;
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .map_err(TlsError::Config)?
            .with_webpki_verifier(verifier)
            .with_client_cert_resolver(identity.certified()?);
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(Arc::new(config))
    }

    /// A TLS 1.3 client that presents no certificate.
    pub fn danger_client_config_without_certificate(
        roots: &CaRoots,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = provider();
        let verifier = WebPkiServerVerifier::builder_with_provider(roots.store(), provider.clone())
            .build()
            .map_err(TlsError::Verifier)?;
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_webpki_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(Arc::new(config))
    }

    /// A server that offers TLS 1.2 only (still requiring a client
    /// certificate), to show that nitrile clients refuse it.
    pub fn danger_server_config_tls12_only(
        roots: &CaRoots,
        identity: &TlsIdentity,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.store(), provider.clone())
            .build()
            .map_err(TlsError::Verifier)?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(identity.certified()?);
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(Arc::new(config))
    }
}
