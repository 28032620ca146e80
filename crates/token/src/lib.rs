//! Admin tokens of nitrile: PASETO v4.public (Ed25519) tokens that carry one
//! principal's authorization for exact operations on exact resources at one
//! host, for a few minutes, bound to the client certificate they were issued
//! to.
//!
//! The crate guarantees that [`Verifier::verify`] returns a [`VerifiedGrant`]
//! only for a token of at most [`MAX_TOKEN_LEN`] bytes, signed by a pinned key
//! of the pinned issuer, within its validity (allowing [`CLOCK_SKEW`]) and
//! with a lifetime of at most [`MAX_LIFETIME`], whose audience is the
//! verifier's, which names the requested operation and resource, and which is
//! bound to the caller's certificate; and that [`ReplayCache`] accepts each
//! token id once while it is live, refusing rather than forgetting when full.
//! The [`paseto`] module implements PASETO v4.public itself and is checked
//! against the official test vectors.
//!
//! The issuer key file that verifiers pin ([`IssuerFile`], `issuer-keys.toml`)
//! is read here, bounded ([`MAX_ISSUER_FILE_LEN`]) and checked key by key;
//! the token service writes it and keeps the private keys.
//!
//! It does not decide who may have which token (that is the token service's
//! entitlement policy), does not do TLS (callers pass the peer certificate's
//! SHA-256), does not journal, and reads no clock of its own: time comes in
//! through [`Clock`] or a `now` argument.

#![forbid(unsafe_code)]

mod claims;
mod clock;
mod error;
mod issue;
mod issuer_file;
mod keys;
pub mod paseto;
mod replay;
mod verify;

pub use claims::{CertThumbprint, Claims, ClaimsError, ClaimsInput, IMPLICIT_ASSERTION, TokenId};
pub use clock::{Clock, FixedClock, SystemClock};
pub use error::TokenError;
pub use issue::TokenIssuer;
pub use issuer_file::{IssuerFile, IssuerFileError, IssuerFileKey, MAX_ISSUER_FILE_LEN};
pub use keys::{
    IssuerKeys, KeyError, KeyId, MAX_ISSUER_KEYS, MAX_KEY_FILE_LEN, SigningKey, VerifyingKey,
};
pub use paseto::MAX_TOKEN_LEN;
pub use replay::{DEFAULT_REPLAY_CAPACITY, FirstUse, ReplayCache};
pub use verify::{
    Request, SignedClaims, UnverifiedToken, VerifiedGrant, Verifier, danger_decode_unverified,
};

/// Lifetime of a token when the request names none.
pub const DEFAULT_LIFETIME: time::Duration = time::Duration::minutes(5);

/// Longest lifetime a token may have (`exp - iat`): five minutes. Longer ones
/// are refused when minted and when verified, whoever signed them; the token
/// service may be configured with a lower maximum, never a higher one.
pub const MAX_LIFETIME: time::Duration = time::Duration::minutes(5);

/// How far in the future a token's issued-at and not-before may be, to allow
/// for clocks that differ a little. Expiry is checked without allowance.
pub const CLOCK_SKEW: time::Duration = time::Duration::seconds(30);
