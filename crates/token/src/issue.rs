//! Minting tokens (the token service's side).

use nitrile_api::PrincipalId;
use rand_core::CryptoRngCore;
use time::{Duration, OffsetDateTime, UtcOffset};

use crate::claims::{Claims, ClaimsError, ClaimsInput, Footer, IMPLICIT_ASSERTION, TokenId};
use crate::keys::{KeyId, SigningKey};
use crate::paseto::{self, MAX_TOKEN_LEN};
use crate::{DEFAULT_LIFETIME, MAX_LIFETIME, TokenError};

/// Signs tokens as one token-service principal with one key.
#[derive(Debug)]
pub struct TokenIssuer {
    issuer: PrincipalId,
    key: SigningKey,
    key_id: KeyId,
}

impl TokenIssuer {
    /// An issuer that signs as `issuer` with `key`.
    pub fn new(issuer: PrincipalId, key: SigningKey) -> Self {
        let key_id = key.key_id();
        Self {
            issuer,
            key,
            key_id,
        }
    }

    /// The principal tokens are issued as (`iss`).
    pub fn issuer(&self) -> &PrincipalId {
        &self.issuer
    }

    /// The id of the signing key, named in every token's footer.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The public key hosts pin to verify this issuer's tokens.
    pub fn verifying_key(&self) -> crate::VerifyingKey {
        self.key.verifying_key()
    }

    /// Mints a token for `input`, issued at `now` (to the second), valid from
    /// then for `input.lifetime` (default [`DEFAULT_LIFETIME`], whole seconds,
    /// refused above [`MAX_LIFETIME`]), with a fresh id from `rng`.
    ///
    /// Refuses input that a verifier would refuse: no or duplicate operations
    /// or resources, more than the request bounds, or a token that would be
    /// longer than [`MAX_TOKEN_LEN`].
    pub fn mint(
        &self,
        input: ClaimsInput,
        now: OffsetDateTime,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(String, Claims), TokenError> {
        let lifetime = input.lifetime.unwrap_or(DEFAULT_LIFETIME);
        if lifetime > MAX_LIFETIME {
            return Err(TokenError::LifetimeTooLong {
                lifetime,
                max: MAX_LIFETIME,
            });
        }
        let lifetime = Duration::seconds(lifetime.whole_seconds());
        if lifetime <= Duration::ZERO {
            return Err(ClaimsError::TimesOutOfOrder.into());
        }
        let issued_at = now
            .to_offset(UtcOffset::UTC)
            .replace_nanosecond(0)
            .unwrap_or_else(|_| unreachable!("0 is a valid nanosecond"));
        let expires_at = issued_at
            .checked_add(lifetime)
            .ok_or(ClaimsError::TimesOutOfOrder)?;
        let claims = Claims {
            issuer: self.issuer.clone(),
            subject: input.subject,
            group: input.group,
            audience: input.audience,
            operations: input.operations,
            resources: input.resources,
            issued_at,
            not_before: issued_at,
            expires_at,
            token_id: TokenId::random(rng),
            cert: input.cert,
        };
        claims.check()?;
        let footer = Footer { kid: self.key_id }.to_json();
        let token = paseto::v4_public_sign(
            self.key.dalek(),
            &claims.to_json(),
            &footer,
            IMPLICIT_ASSERTION,
        );
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge(token.len()));
        }
        Ok((token, claims))
    }
}
