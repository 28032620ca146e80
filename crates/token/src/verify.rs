//! Verifying tokens offline (a host's side).

use nitrile_api::{Audience, Operation, ResourceId};
use subtle::ConstantTimeEq as _;
use time::OffsetDateTime;

use crate::claims::{Claims, Footer, IMPLICIT_ASSERTION, TokenId};
use crate::keys::{IssuerKeys, KeyId};
use crate::paseto::{self, MAX_TOKEN_LEN};
use crate::{CLOCK_SKEW, Clock, MAX_LIFETIME, TokenError};

/// What a caller asks to do with a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The operation requested.
    pub operation: Operation,
    /// The exact resource it acts on.
    pub resource: ResourceId,
}

/// Claims whose signature, issuer and times have been verified, but nothing
/// about what they allow. For inspecting tokens; a host acts only on a
/// [`VerifiedGrant`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedClaims {
    key_id: KeyId,
    claims: Claims,
}

impl SignedClaims {
    /// The key that signed the token.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }
    /// The verified claims.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }
}

/// Proof that a token allows one request: built only by [`Verifier::verify`]
/// (and for a relayed token by [`IssuerKeys::verify_relayed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedGrant {
    claims: Claims,
    operation: Operation,
    resource: ResourceId,
}

impl VerifiedGrant {
    /// The principal the token was issued to.
    pub fn subject(&self) -> &nitrile_api::PrincipalId {
        self.claims.subject()
    }
    /// The group it was granted under.
    pub fn group(&self) -> &nitrile_api::Name {
        self.claims.group()
    }
    /// The token's id, for replay checks and the journal.
    pub fn token_id(&self) -> &TokenId {
        self.claims.token_id()
    }
    /// The token's expiry.
    pub fn expires_at(&self) -> OffsetDateTime {
        self.claims.expires_at()
    }
    /// The operation this grant allows.
    pub fn operation(&self) -> Operation {
        self.operation
    }
    /// The resource this grant allows it on.
    pub fn resource(&self) -> &ResourceId {
        &self.resource
    }
    /// All claims of the token.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }
}

/// A token decoded WITHOUT any verification. Nothing in it is trustworthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnverifiedToken {
    key_id: KeyId,
    claims: Claims,
}

impl UnverifiedToken {
    /// The key id the footer names (not checked).
    pub fn unverified_key_id(&self) -> KeyId {
        self.key_id
    }
    /// The claims as written in the token (not checked).
    pub fn unverified_claims(&self) -> &Claims {
        &self.claims
    }
}

/// Decodes a token's footer and claims without verifying its signature or
/// anything else: for showing a token to a person who has no issuer key.
/// Never act on the result.
pub fn danger_decode_unverified(token: &str) -> Result<UnverifiedToken, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLarge(token.len()));
    }
    let footer = paseto::untrusted_footer(token)?;
    let key_id = Footer::from_json(&footer)
        .map_err(TokenError::MalformedFooter)?
        .kid;
    let body = token
        .strip_prefix(paseto::HEADER)
        .and_then(|r| r.split('.').next())
        .unwrap_or_default();
    use base64::Engine as _;
    let mut payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| TokenError::Malformed(paseto::PasetoError::BadBase64))?;
    if payload.len() < 64 {
        return Err(TokenError::Malformed(paseto::PasetoError::TooShort));
    }
    payload.truncate(payload.len() - 64);
    Ok(UnverifiedToken {
        key_id,
        claims: Claims::from_json(&payload)?,
    })
}

impl IssuerKeys {
    /// Verifies size, form, key, signature, claims, issuer and times of a
    /// token, in that order, and returns its claims. Does not check audience,
    /// operation, resource or certificate binding: use [`Verifier::verify`]
    /// before acting on a token.
    pub fn verify_signature_only(
        &self,
        token: &str,
        clock: &dyn Clock,
    ) -> Result<SignedClaims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge(token.len()));
        }
        let footer = paseto::untrusted_footer(token)?;
        let key_id = Footer::from_json(&footer)
            .map_err(TokenError::MalformedFooter)?
            .kid;
        let key = self.get(&key_id).ok_or(TokenError::UnknownKey(key_id))?;
        let payload =
            paseto::v4_public_verify(key.dalek(), token, Some(&footer), IMPLICIT_ASSERTION)?;
        let claims = Claims::from_json(&payload)?;
        if claims.issuer() != self.issuer() {
            return Err(TokenError::WrongIssuer {
                found: claims.issuer().to_string(),
            });
        }
        check_times(&claims, clock)?;
        Ok(SignedClaims { key_id, claims })
    }
}

/// Not-before and issued-at (with [`CLOCK_SKEW`]), expiry and lifetime.
fn check_times(claims: &Claims, clock: &dyn Clock) -> Result<(), TokenError> {
    let now = clock.now();
    let latest_start = now.checked_add(CLOCK_SKEW).unwrap_or(now);
    if claims.not_before() > latest_start || claims.issued_at() > latest_start {
        return Err(TokenError::NotYetValid {
            not_before: claims.not_before().max(claims.issued_at()),
        });
    }
    if now >= claims.expires_at() {
        return Err(TokenError::Expired {
            expired_at: claims.expires_at(),
        });
    }
    let lifetime = claims.expires_at() - claims.issued_at();
    if lifetime > MAX_LIFETIME {
        return Err(TokenError::LifetimeTooLong {
            lifetime,
            max: MAX_LIFETIME,
        });
    }
    Ok(())
}

/// Audience, operation and resource.
fn check_grant(claims: &Claims, audience: &Audience, request: &Request) -> Result<(), TokenError> {
    if claims.audience() != audience {
        return Err(TokenError::WrongAudience {
            found: claims.audience().to_string(),
            expected: audience.to_string(),
        });
    }
    if !claims.operations().contains(&request.operation) {
        return Err(TokenError::OperationNotGranted(request.operation));
    }
    if !claims.resources().contains(&request.resource) {
        return Err(TokenError::ResourceNotGranted(request.resource.clone()));
    }
    Ok(())
}

impl IssuerKeys {
    /// Verifies a token that its audience relays to another service on its
    /// caller's behalf (a host relaying its caller's `volume.attach` token
    /// to the key service, over the host's own mTLS identity): every check
    /// of [`Verifier::verify`], with `audience` the relaying party's name,
    /// except the certificate binding. The binding ties the token to the
    /// caller's connection to the audience, which the audience checked
    /// when it admitted the request; the service it relays to sees only
    /// the audience's connection, so it checks instead that `audience` is
    /// the party it is connected to. Single use is the caller's next step,
    /// as for [`Verifier::verify`].
    pub fn verify_relayed(
        &self,
        token: &str,
        request: &Request,
        audience: &Audience,
        clock: &dyn Clock,
    ) -> Result<VerifiedGrant, TokenError> {
        let signed = self.verify_signature_only(token, clock)?;
        check_grant(&signed.claims, audience, request)?;
        Ok(VerifiedGrant {
            claims: signed.claims,
            operation: request.operation,
            resource: request.resource.clone(),
        })
    }
}

/// Verifies tokens for one audience (this host) against one issuer's pinned
/// keys.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: IssuerKeys,
    audience: Audience,
}

impl Verifier {
    /// A verifier accepting tokens signed by `keys` for `audience`.
    pub fn new(keys: IssuerKeys, audience: Audience) -> Self {
        Self { keys, audience }
    }

    /// The pinned keys.
    pub fn keys(&self) -> &IssuerKeys {
        &self.keys
    }

    /// The pinned keys, to rotate them.
    pub fn keys_mut(&mut self) -> &mut IssuerKeys {
        &mut self.keys
    }

    /// The audience this verifier accepts.
    pub fn audience(&self) -> &Audience {
        &self.audience
    }

    /// Verifies that `token` allows `request` from the client whose
    /// certificate has SHA-256 `peer_cert_sha256`, checking in order: size,
    /// form, key id, signature, claims, issuer, not-before and issued-at (with
    /// [`CLOCK_SKEW`]), expiry, lifetime, audience, operation, resource and
    /// certificate binding (in constant time).
    ///
    /// Single use of tokens for mutating operations is the caller's next step:
    /// [`crate::ReplayCache::check_and_record`].
    pub fn verify(
        &self,
        token: &str,
        request: &Request,
        peer_cert_sha256: &[u8; 32],
        clock: &dyn Clock,
    ) -> Result<VerifiedGrant, TokenError> {
        let signed = self.keys.verify_signature_only(token, clock)?;
        self.verify_signed(&signed, request, peer_cert_sha256, clock)
    }

    /// The checks of [`Verifier::verify`] that follow the signature, on claims
    /// whose signature and issuer an earlier call verified (e.g. a host's
    /// cache of signature checks): not-before, issued-at, expiry, lifetime,
    /// audience, operation, resource and certificate binding, all against
    /// `clock` now.
    pub fn verify_signed(
        &self,
        signed: &SignedClaims,
        request: &Request,
        peer_cert_sha256: &[u8; 32],
        clock: &dyn Clock,
    ) -> Result<VerifiedGrant, TokenError> {
        let claims = &signed.claims;
        check_times(claims, clock)?;
        check_grant(claims, &self.audience, request)?;
        if !bool::from(claims.cert().as_bytes().ct_eq(peer_cert_sha256)) {
            return Err(TokenError::CertificateMismatch);
        }
        Ok(VerifiedGrant {
            claims: claims.clone(),
            operation: request.operation,
            resource: request.resource.clone(),
        })
    }

    /// Like [`IssuerKeys::verify_signature_only`], and also checks that the
    /// token is for this verifier's audience. Does not check operation,
    /// resource or certificate binding: never act on the result.
    pub fn verify_signature_only(
        &self,
        token: &str,
        clock: &dyn Clock,
    ) -> Result<SignedClaims, TokenError> {
        let signed = self.keys.verify_signature_only(token, clock)?;
        if signed.claims.audience() != &self.audience {
            return Err(TokenError::WrongAudience {
                found: signed.claims.audience().to_string(),
                expected: self.audience.to_string(),
            });
        }
        Ok(signed)
    }
}
