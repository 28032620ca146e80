//! Why a token was refused, minted or not, or a replay check failed.

use nitrile_api::{Operation, ResourceId};
use time::OffsetDateTime;

use crate::claims::ClaimsError;
use crate::keys::KeyId;
use crate::paseto::{MAX_TOKEN_LEN, PasetoError};

/// Why a token was refused (at a host), or could not be minted (at the token
/// service). Each message says what to do; [`TokenError::code`] is a stable
/// short name for journals and metrics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token is not a well-formed PASETO v4.public token.
    #[error("token is malformed ({0}); pass the token exactly as the token service returned it")]
    Malformed(#[source] PasetoError),
    /// The footer is not `{"kid":"<key id>"}`.
    #[error("token footer is malformed; pass the token exactly as the token service returned it")]
    MalformedFooter(#[source] ClaimsError),
    /// The token is larger than any token nitrile issues.
    #[error("token is {0} bytes long, more than the {MAX_TOKEN_LEN} allowed; request a new token")]
    TooLarge(usize),
    /// The footer names a key this verifier does not pin: signed by another
    /// token service, or by a key that was rotated out.
    #[error(
        "token was signed by key {0}, which this host does not trust; request a new token, and if that fails check the host's pinned token-service keys"
    )]
    UnknownKey(KeyId),
    /// The signature does not verify: the token was altered or forged.
    #[error("token signature does not verify; the token was altered or forged: request a new one")]
    BadSignature,
    /// The signed claims are not valid nitrile admin token claims.
    #[error("token claims are invalid; request a new token")]
    InvalidClaims(#[source] ClaimsError),
    /// The token has expired.
    #[error("token expired at {expired_at}; request a new token")]
    Expired {
        /// Its expiry.
        expired_at: OffsetDateTime,
    },
    /// The token is not valid yet (its `nbf` or `iat` is in the future beyond
    /// the allowed clock skew).
    #[error(
        "token is not valid before {not_before}; check the clocks of this machine and the token service"
    )]
    NotYetValid {
        /// When it becomes valid.
        not_before: OffsetDateTime,
    },
    /// The token lives longer than the hard maximum (or a mint asked for that).
    #[error(
        "token lifetime of {lifetime} exceeds the maximum of {max}; request a shorter lifetime"
    )]
    LifetimeTooLong {
        /// The lifetime asked for or found.
        lifetime: time::Duration,
        /// The maximum.
        max: time::Duration,
    },
    /// The token was issued by another principal than the pinned token service.
    #[error(
        "token was issued by {found}, not by this host's token service; request a token from the cell's token service"
    )]
    WrongIssuer {
        /// The issuer in the token.
        found: String,
    },
    /// The token is for another host.
    #[error("token is for {found}, not for this host ({expected}); request a token for this host")]
    WrongAudience {
        /// The audience in the token.
        found: String,
        /// This verifier's audience.
        expected: String,
    },
    /// The token does not allow the requested operation.
    #[error("token does not allow {0}; request a token that names this operation")]
    OperationNotGranted(Operation),
    /// The token does not allow the requested resource.
    #[error("token does not allow acting on {0}; request a token that names this resource")]
    ResourceNotGranted(ResourceId),
    /// The token is bound to another client certificate than the caller's.
    #[error(
        "token is bound to another client certificate; present it over TLS with the certificate it was issued to"
    )]
    CertificateMismatch,
    /// The single-use token was already used.
    #[error("token was already used and is single-use for this operation; request a new token")]
    Replayed,
    /// The replay cache is full of live tokens; the host refuses rather than
    /// forgetting one.
    #[error(
        "host is tracking too many live single-use tokens to accept another; retry in a few minutes"
    )]
    ReplayCacheFull,
}

impl TokenError {
    /// A stable short name of the refusal, for journals and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::MalformedFooter(_) => "malformed",
            Self::TooLarge(_) => "too_large",
            Self::UnknownKey(_) => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::InvalidClaims(_) => "invalid_claims",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::LifetimeTooLong { .. } => "lifetime_too_long",
            Self::WrongIssuer { .. } => "wrong_issuer",
            Self::WrongAudience { .. } => "wrong_audience",
            Self::OperationNotGranted(_) => "operation_not_granted",
            Self::ResourceNotGranted(_) => "resource_not_granted",
            Self::CertificateMismatch => "certificate_mismatch",
            Self::Replayed => "replayed",
            Self::ReplayCacheFull => "replay_cache_full",
        }
    }
}

impl From<PasetoError> for TokenError {
    fn from(e: PasetoError) -> Self {
        match e {
            PasetoError::TooLarge(n) => Self::TooLarge(n),
            PasetoError::BadSignature => Self::BadSignature,
            other => Self::Malformed(other),
        }
    }
}

impl From<ClaimsError> for TokenError {
    fn from(e: ClaimsError) -> Self {
        Self::InvalidClaims(e)
    }
}
