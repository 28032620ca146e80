//! The error of the CA and identity side of this crate.

use std::path::PathBuf;

use nitrile_api::{IdError, Name, PrincipalKind};

/// Why a CA could not be loaded or created, a certificate could not be
/// issued, or a certificate was not accepted as a principal's identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    // --- Local files (misuse or broken state on this machine).
    /// A file could not be read, written or created.
    #[error("could not access {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Only one of `ca.pem` and `ca.key` exists in the CA directory.
    #[error(
        "CA directory {dir} holds only one of ca.pem and ca.key; restore the missing file or start over in an empty directory"
    )]
    CaIncomplete {
        /// The CA directory.
        dir: PathBuf,
    },
    /// A key file can be read by users other than its owner.
    #[error(
        "key file {path} has mode {mode:o}; it must not be readable by group or others (chmod 600)"
    )]
    KeyFileTooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A PEM file holds no certificate.
    #[error("no certificate found in PEM data")]
    NoCertificateInPem,
    /// A key could not be generated, parsed or used to sign.
    #[error("key or certificate generation failed")]
    Crypto(#[source] rcgen::Error),
    /// The CA key does not belong to the CA certificate.
    #[error("ca.key does not match ca.pem")]
    CaKeyMismatch,
    /// The CA certificate is not a CA certificate of nitrile.
    #[error("ca.pem is not a nitrile cell CA certificate")]
    NotACa,
    /// The CA certificate belongs to another cell.
    #[error("ca.pem is the CA of cell {found:?}, not of cell {expected}")]
    CaOfOtherCell {
        /// The cell asked for.
        expected: Name,
        /// The common name found in the CA certificate.
        found: String,
    },
    /// The CA certificate has expired or is not yet valid.
    #[error(
        "the cell CA certificate is not valid at this time (valid {not_before} to {not_after})"
    )]
    CaNotValidNow {
        /// Start of validity.
        not_before: time::OffsetDateTime,
        /// End of validity.
        not_after: time::OffsetDateTime,
    },

    // --- Issuing (misuse by the caller).
    /// The principal belongs to another cell than the CA.
    #[error("principal {principal} is not of cell {cell}; this CA only issues for its own cell")]
    PrincipalOfOtherCell {
        /// The principal asked for.
        principal: nitrile_api::PrincipalId,
        /// The CA's cell.
        cell: Name,
    },
    /// The requested lifetime is zero.
    #[error("certificate lifetime must be longer than zero")]
    LifetimeZero,
    /// The requested lifetime is above the maximum for the principal kind.
    #[error("a {kind} certificate may live at most {max:?}; {requested:?} was asked for")]
    LifetimeTooLong {
        /// The principal kind.
        kind: PrincipalKind,
        /// Lifetime asked for.
        requested: std::time::Duration,
        /// The maximum for that kind.
        max: std::time::Duration,
    },
    /// The certificate would outlive the CA that signs it.
    #[error("the certificate would expire after the cell CA ({ca_not_after}); renew the CA first")]
    OutlivesCa {
        /// When the CA expires.
        ca_not_after: time::OffsetDateTime,
    },
    /// A time computation left the range that certificates can express.
    #[error("time out of range")]
    TimeOutOfRange,

    // --- Certificates from a peer (bad input).
    /// The certificate is larger than [`crate::MAX_CERT_DER`].
    #[error("certificate is {len} bytes long; at most {max} are accepted", max = crate::MAX_CERT_DER)]
    CertificateTooLarge {
        /// Its length.
        len: usize,
    },
    /// The certificate is not valid DER X.509.
    #[error("certificate is not valid X.509")]
    BadCertificate(#[source] x509_parser::error::X509Error),
    /// Bytes follow the certificate.
    #[error("data follows the certificate")]
    TrailingData,
    /// The certificate has no `nitrile://` URI SAN.
    #[error("certificate names no nitrile principal (no nitrile:// URI SAN)")]
    NoPrincipal,
    /// The certificate has more than one `nitrile://` URI SAN.
    #[error("certificate names {0} nitrile principals; exactly one is required")]
    SeveralPrincipals(usize),
    /// The `nitrile://` URI SAN is not a valid principal.
    #[error("certificate's nitrile URI SAN is not a valid principal")]
    BadPrincipal(#[source] IdError),
    /// The principal belongs to another cell than expected.
    #[error("certificate names principal {principal}, which is not of cell {expected}")]
    WrongCell {
        /// The principal named in the certificate.
        principal: nitrile_api::PrincipalId,
        /// The cell expected.
        expected: Name,
    },
    /// The certificate was not signed by this CA.
    #[error("certificate was not issued by this cell CA")]
    NotIssuedByThisCa,
}

impl PkiError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
