//! A service's identity in its cell: the cell CA, its certificate and key,
//! and the principal the certificate names, checked at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nitrile_api::{Name, PrincipalId, PrincipalKind};
use nitrile_net::Server;
use nitrile_pki::tls::{self, CaRoots, TlsError, TlsIdentity};
use nitrile_pki::{PeerIdentity, PkiError};

/// What a service's certificate must name.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Expected {
    /// Any principal of this kind in the cell (logd and tokend: a
    /// service).
    Kind(PrincipalKind),
    /// Exactly this principal (a host agent, a witness).
    Principal(PrincipalId),
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kind(kind) => write!(f, "any {kind} of the cell"),
            Self::Principal(p) => write!(f, "{p}"),
        }
    }
}

/// Why a service's identity could not be loaded. Each names its file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The cell CA certificate could not be loaded.
    #[error("cell CA certificate {}", path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<TlsError>,
    },
    /// The certificate or its key could not be loaded (unreadable, not
    /// PEM, a key others may read).
    #[error("certificate {} with key {}", cert.display(), key.display())]
    Certificate {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        #[source]
        source: Box<TlsError>,
    },
    /// The certificate names no principal of the cell (none, several,
    /// another cell's).
    #[error("the certificate {} names no principal of cell {cell}", path.display())]
    NoPrincipal {
        /// The certificate file.
        path: PathBuf,
        /// The cell.
        cell: Name,
        /// Why.
        #[source]
        source: Box<PkiError>,
    },
    /// The certificate names a principal of the cell, but not the one
    /// this service runs as.
    #[error("the certificate {} is for {found}, not {expected}", path.display())]
    WrongPrincipal {
        /// The certificate file.
        path: PathBuf,
        /// What it names.
        found: Box<PrincipalId>,
        /// What the service expected.
        expected: Box<Expected>,
    },
    /// No TLS configuration could be made of the certificate and key (for
    /// example, the key is not the certificate's).
    #[error("TLS configuration from certificate {}", cert.display())]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// Why.
        #[source]
        source: Box<TlsError>,
    },
}

/// A service's identity in its cell, loaded from the cell CA certificate,
/// its own certificate and its key: the certificate names exactly one
/// principal of the cell, the one the service expects to run as. TLS
/// configurations come only from here (through [`nitrile_pki::tls`]).
#[derive(Debug, Clone)]
pub struct ServiceIdentity {
    cell: Name,
    principal: PrincipalId,
    roots: CaRoots,
    tls: TlsIdentity,
    cert: PathBuf,
}

impl ServiceIdentity {
    /// Loads `ca`, `cert` and `key` and checks that `cert` names a
    /// principal of `cell` that is `expected`; fails closed, naming the
    /// file, on anything else. `key` must be the owner's alone.
    pub fn load(
        cell: &Name,
        ca: &Path,
        cert: &Path,
        key: &Path,
        expected: &Expected,
    ) -> Result<Self, IdentityError> {
        let roots = CaRoots::load(ca).map_err(|source| IdentityError::Ca {
            path: ca.to_owned(),
            source: Box::new(source),
        })?;
        let tls = TlsIdentity::load(cert, key).map_err(|source| IdentityError::Certificate {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source: Box::new(source),
        })?;
        Self::from_tls(cell, roots, tls, cert, expected)
    }

    /// [`Self::load`] for a key held elsewhere: `signer` signs for the key
    /// of `cert` (a TPM-resident key).
    pub fn load_with_signer(
        cell: &Name,
        ca: &Path,
        cert: &Path,
        signer: Arc<dyn rustls::sign::SigningKey>,
        expected: &Expected,
    ) -> Result<Self, IdentityError> {
        let roots = CaRoots::load(ca).map_err(|source| IdentityError::Ca {
            path: ca.to_owned(),
            source: Box::new(source),
        })?;
        let pem = std::fs::read(cert).map_err(|source| IdentityError::Certificate {
            cert: cert.to_owned(),
            key: cert.to_owned(),
            source: Box::new(TlsError::Io {
                path: cert.to_owned(),
                source,
            }),
        })?;
        let tls = TlsIdentity::with_signer(&pem, signer).map_err(|source| {
            IdentityError::Certificate {
                cert: cert.to_owned(),
                key: cert.to_owned(),
                source: Box::new(source),
            }
        })?;
        Self::from_tls(cell, roots, tls, cert, expected)
    }

    fn from_tls(
        cell: &Name,
        roots: CaRoots,
        tls: TlsIdentity,
        cert: &Path,
        expected: &Expected,
    ) -> Result<Self, IdentityError> {
        let principal = PeerIdentity::from_der(tls.leaf(), cell)
            .map_err(|source| IdentityError::NoPrincipal {
                path: cert.to_owned(),
                cell: cell.clone(),
                source: Box::new(source),
            })?
            .principal;
        let fits = match expected {
            Expected::Kind(kind) => principal.kind == *kind,
            Expected::Principal(p) => principal == *p,
        };
        if !fits {
            return Err(IdentityError::WrongPrincipal {
                path: cert.to_owned(),
                found: Box::new(principal),
                expected: Box::new(expected.clone()),
            });
        }
        Ok(Self {
            cell: cell.clone(),
            principal,
            roots,
            tls,
            cert: cert.to_owned(),
        })
    }

    /// The cell.
    pub fn cell(&self) -> &Name {
        &self.cell
    }

    /// The principal the certificate names.
    pub fn principal(&self) -> &PrincipalId {
        &self.principal
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// The server side: TLS 1.3, client certificates of the cell CA
    /// required ([`tls::server_config`]).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        tls::server_config(&self.roots, &self.tls).map_err(|source| self.config_error(source))
    }

    /// The client side, to call other services of the cell
    /// ([`tls::client_config`]).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        tls::client_config(&self.roots, &self.tls).map_err(|source| self.config_error(source))
    }

    /// An mTLS server of the cell presenting this identity, with the
    /// default pre-authentication limits.
    pub fn server(&self) -> Result<Server, IdentityError> {
        Ok(Server::new(self.server_config()?, self.cell.clone()))
    }

    fn config_error(&self, source: TlsError) -> IdentityError {
        IdentityError::Config {
            cert: self.cert.clone(),
            source: Box::new(source),
        }
    }
}
