//! The claims a nitrile admin token carries, and the footer naming its key.
//!
//! The payload is JSON with exactly these members (unknown ones are refused):
//!
//! | member | meaning |
//! |---|---|
//! | `iss` | principal of the token service that issued it |
//! | `sub` | principal the token was issued to |
//! | `grp` | the group (entitlement) it was granted under |
//! | `aud` | the one host (or service) that accepts it |
//! | `ops` | operations it allows, at least one, no duplicates |
//! | `res` | exact resources it allows them on, at least one, no duplicates |
//! | `iat`, `nbf`, `exp` | issued at, not before, expires: RFC 3339 UTC |
//! | `jti` | token id: 128 random bits, unpadded base64url |
//! | `cnf` | `{"x5t#S256": ...}`: SHA-256 of the client certificate it is bound to |

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nitrile_api::wire::{MAX_REQUEST_OPERATIONS, MAX_REQUEST_RESOURCES};
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId};
use rand_core::CryptoRngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::keys::KeyId;

/// The implicit assertion every nitrile admin token is signed with: it binds
/// the claims format, so a token of another format or application never
/// verifies as one of these.
pub const IMPLICIT_ASSERTION: &[u8] = b"nitrile-admin-token-v1";

/// Why a claims payload (or the input to build one) was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimsError {
    /// The payload is not JSON of the expected shape (unknown, missing or
    /// duplicate members included).
    #[error("claims are not valid JSON of the nitrile admin token format")]
    Json(#[source] serde_json::Error),
    /// The footer is not `{"kid":"<key id>"}`.
    #[error("footer is not {{\"kid\":\"<key id>\"}}")]
    Footer(#[source] serde_json::Error),
    /// No operation is listed.
    #[error("the token lists no operation")]
    NoOperations,
    /// No resource is listed.
    #[error("the token lists no resource")]
    NoResources,
    /// More operations than a request may name.
    #[error("the token lists {0} operations; at most {MAX_REQUEST_OPERATIONS} are allowed")]
    TooManyOperations(usize),
    /// More resources than a request may name.
    #[error("the token lists {0} resources; at most {MAX_REQUEST_RESOURCES} are allowed")]
    TooManyResources(usize),
    /// An operation is listed twice.
    #[error("operation {0} is listed twice")]
    DuplicateOperation(Operation),
    /// A resource is listed twice.
    #[error("resource {0} is listed twice")]
    DuplicateResource(ResourceId),
    /// A time is not RFC 3339 in UTC.
    #[error("time {0:?} is not an RFC 3339 time in UTC (e.g. 2030-01-01T12:00:00Z)")]
    BadTime(String),
    /// The token id is not 16 bytes of unpadded base64url.
    #[error("token id {0:?} is not 16 bytes of unpadded base64url")]
    BadTokenId(String),
    /// The certificate binding is not 32 bytes of unpadded base64url.
    #[error("certificate binding is not a SHA-256 digest in unpadded base64url")]
    BadThumbprint,
    /// The times are out of order: `iat <= nbf < exp` must hold.
    #[error("token times are out of order: issued-at <= not-before < expiry must hold")]
    TimesOutOfOrder,
}

/// A token's unique id (`jti`): 128 random bits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenId([u8; 16]);

impl TokenId {
    /// A fresh random id.
    pub fn random(rng: &mut impl CryptoRngCore) -> Self {
        let mut b = [0; 16];
        rng.fill_bytes(&mut b);
        Self(b)
    }

    /// An id from its 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({self})")
    }
}

impl FromStr for TokenId {
    type Err = ClaimsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ClaimsError::BadTokenId(s.chars().take(40).collect());
        if s.len() != 22 {
            return Err(bad());
        }
        let b = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
        Ok(Self(b.try_into().map_err(|_| bad())?))
    }
}

/// SHA-256 of the DER of a client certificate: what a token is bound to
/// (`cnf.x5t#S256`, as in RFC 8705).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertThumbprint([u8; 32]);

impl CertThumbprint {
    /// The thumbprint of a certificate given as DER.
    pub fn of_der(cert_der: &[u8]) -> Self {
        Self(Sha256::digest(cert_der).into())
    }

    /// A thumbprint from an already computed SHA-256 digest.
    pub fn from_sha256(digest: [u8; 32]) -> Self {
        Self(digest)
    }

    /// The digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for CertThumbprint {
    /// `sha256:<hex>`, the form people compare with `openssl x509 -fingerprint`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for CertThumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertThumbprint({self})")
    }
}

/// What the token service decides to grant; [`crate::TokenIssuer::mint`] adds
/// the issuer, times and token id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimsInput {
    /// The principal the token is for.
    pub subject: PrincipalId,
    /// The group it is granted under.
    pub group: Name,
    /// The one host (or service) that will accept it.
    pub audience: Audience,
    /// Operations it allows.
    pub operations: Vec<Operation>,
    /// Exact resources it allows them on.
    pub resources: Vec<ResourceId>,
    /// The client certificate it is bound to.
    pub cert: CertThumbprint,
    /// How long it lives; [`crate::DEFAULT_LIFETIME`] when `None`.
    pub lifetime: Option<time::Duration>,
}

/// The verified-or-minted claims of one token. Built only by parsing (which
/// checks every rule in the module documentation) or by minting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub(crate) issuer: PrincipalId,
    pub(crate) subject: PrincipalId,
    pub(crate) group: Name,
    pub(crate) audience: Audience,
    pub(crate) operations: Vec<Operation>,
    pub(crate) resources: Vec<ResourceId>,
    pub(crate) issued_at: OffsetDateTime,
    pub(crate) not_before: OffsetDateTime,
    pub(crate) expires_at: OffsetDateTime,
    pub(crate) token_id: TokenId,
    pub(crate) cert: CertThumbprint,
}

impl Claims {
    /// The token service that issued the token (`iss`).
    pub fn issuer(&self) -> &PrincipalId {
        &self.issuer
    }
    /// The principal the token was issued to (`sub`).
    pub fn subject(&self) -> &PrincipalId {
        &self.subject
    }
    /// The group it was granted under (`grp`).
    pub fn group(&self) -> &Name {
        &self.group
    }
    /// The host (or service) that accepts it (`aud`).
    pub fn audience(&self) -> &Audience {
        &self.audience
    }
    /// The operations it allows (`ops`).
    pub fn operations(&self) -> &[Operation] {
        &self.operations
    }
    /// The exact resources it allows them on (`res`).
    pub fn resources(&self) -> &[ResourceId] {
        &self.resources
    }
    /// When it was issued (`iat`).
    pub fn issued_at(&self) -> OffsetDateTime {
        self.issued_at
    }
    /// When it becomes valid (`nbf`).
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }
    /// When it expires (`exp`).
    pub fn expires_at(&self) -> OffsetDateTime {
        self.expires_at
    }
    /// Its unique id (`jti`).
    pub fn token_id(&self) -> &TokenId {
        &self.token_id
    }
    /// The client certificate it is bound to (`cnf`).
    pub fn cert(&self) -> &CertThumbprint {
        &self.cert
    }

    /// Parses and checks a claims payload.
    pub fn from_json(payload: &[u8]) -> Result<Self, ClaimsError> {
        let wire: ClaimsWire = serde_json::from_slice(payload).map_err(ClaimsError::Json)?;
        let claims = Self {
            issuer: wire.iss,
            subject: wire.sub,
            group: wire.grp,
            audience: wire.aud,
            operations: wire.ops,
            resources: wire.res,
            issued_at: parse_time(&wire.iat)?,
            not_before: parse_time(&wire.nbf)?,
            expires_at: parse_time(&wire.exp)?,
            token_id: wire.jti.parse()?,
            cert: {
                let b = URL_SAFE_NO_PAD
                    .decode(&wire.cnf.x5t_s256)
                    .map_err(|_| ClaimsError::BadThumbprint)?;
                CertThumbprint(b.try_into().map_err(|_| ClaimsError::BadThumbprint)?)
            },
        };
        claims.check()?;
        Ok(claims)
    }

    /// The JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_wire())
            .unwrap_or_else(|_| unreachable!("claims of strings always serialize"))
    }

    /// Checks the rules every token's claims follow.
    pub(crate) fn check(&self) -> Result<(), ClaimsError> {
        check_list(
            &self.operations,
            MAX_REQUEST_OPERATIONS,
            ClaimsError::NoOperations,
            ClaimsError::TooManyOperations,
            |o| ClaimsError::DuplicateOperation(*o),
        )?;
        check_list(
            &self.resources,
            MAX_REQUEST_RESOURCES,
            ClaimsError::NoResources,
            ClaimsError::TooManyResources,
            |r| ClaimsError::DuplicateResource(r.clone()),
        )?;
        if !(self.issued_at <= self.not_before && self.not_before < self.expires_at) {
            return Err(ClaimsError::TimesOutOfOrder);
        }
        Ok(())
    }

    fn to_wire(&self) -> ClaimsWire {
        ClaimsWire {
            iss: self.issuer.clone(),
            sub: self.subject.clone(),
            grp: self.group.clone(),
            aud: self.audience.clone(),
            ops: self.operations.clone(),
            res: self.resources.clone(),
            iat: format_time(self.issued_at),
            nbf: format_time(self.not_before),
            exp: format_time(self.expires_at),
            jti: self.token_id.to_string(),
            cnf: Confirmation {
                x5t_s256: URL_SAFE_NO_PAD.encode(self.cert.0),
            },
        }
    }
}

impl Serialize for Claims {
    /// The same JSON members as the token payload.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_wire().serialize(s)
    }
}

fn check_list<T: Ord>(
    items: &[T],
    max: usize,
    empty: ClaimsError,
    too_many: fn(usize) -> ClaimsError,
    dup: impl Fn(&T) -> ClaimsError,
) -> Result<(), ClaimsError> {
    if items.is_empty() {
        return Err(empty);
    }
    if items.len() > max {
        return Err(too_many(items.len()));
    }
    let mut seen = BTreeSet::new();
    for item in items {
        if !seen.insert(item) {
            return Err(dup(item));
        }
    }
    Ok(())
}

/// Formats a time as RFC 3339 in UTC (`...Z`).
pub(crate) fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| unreachable!("times within year 0..=9999 format as RFC 3339"))
}

fn parse_time(s: &str) -> Result<OffsetDateTime, ClaimsError> {
    let bad = || ClaimsError::BadTime(s.chars().take(40).collect());
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| bad())?;
    if t.offset() != UtcOffset::UTC {
        return Err(bad());
    }
    Ok(t)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimsWire {
    iss: PrincipalId,
    sub: PrincipalId,
    grp: Name,
    aud: Audience,
    ops: Vec<Operation>,
    res: Vec<ResourceId>,
    iat: String,
    nbf: String,
    exp: String,
    jti: String,
    cnf: Confirmation,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Confirmation {
    #[serde(rename = "x5t#S256")]
    x5t_s256: String,
}

/// The token footer: `{"kid":"<key id>"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Footer {
    pub(crate) kid: KeyId,
}

impl Footer {
    pub(crate) fn to_json(self) -> Vec<u8> {
        serde_json::to_vec(&FooterWire { kid: self.kid })
            .unwrap_or_else(|_| unreachable!("a key id always serializes"))
    }

    pub(crate) fn from_json(b: &[u8]) -> Result<Self, ClaimsError> {
        let w: FooterWire = serde_json::from_slice(b).map_err(ClaimsError::Footer)?;
        Ok(Self { kid: w.kid })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FooterWire {
    #[serde(serialize_with = "display", deserialize_with = "from_str")]
    kid: KeyId,
}

fn display<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn from_str<'de, T, D>(d: D) -> Result<T, D::Error>
where
    T: FromStr,
    T::Err: fmt::Display,
    D: Deserializer<'de>,
{
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"iss":"nitrile://c1/service/tokend","sub":"nitrile://c1/operator/alice","grp":"oncall","aud":"h1","ops":["host.describe","host.drain"],"res":["host/h1"],"iat":"2030-01-01T12:00:00Z","nbf":"2030-01-01T12:00:00Z","exp":"2030-01-01T12:05:00Z","jti":"AAECAwQFBgcICQoLDA0ODw","cnf":{"x5t#S256":"47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"}}"#;

    fn with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        GOOD.replacen(from, to, 1)
    }

    #[test]
    fn good_claims_parse_and_round_trip() {
        let c = Claims::from_json(GOOD.as_bytes()).unwrap();
        assert_eq!(c.audience().as_str(), "h1");
        assert_eq!(c.cert(), &CertThumbprint::of_der(b""));
        assert_eq!(c.token_id().as_bytes(), &core::array::from_fn(|i| i as u8));
        assert_eq!(String::from_utf8(c.to_json()).unwrap(), GOOD);
    }

    #[test]
    fn every_rule_is_enforced() {
        let cases = [
            with(r#""aud":"h1""#, r#""aud":"h1","admin":true"#),
            with(r#""aud":"h1""#, r#""aud":"h1","aud":"h2""#),
            with(r#""aud":"h1","#, ""),
            with(r#""x5t#S256":"#, r#""x5t#S256":"AA","x":"#),
            with(r#"["host.describe","host.drain"]"#, "[]"),
            with(
                r#"["host.describe","host.drain"]"#,
                r#"["host.describe","host.describe"]"#,
            ),
            with(r#"["host.describe","host.drain"]"#, r#"["host.shell"]"#),
            with(r#"["host/h1"]"#, "[]"),
            with(r#"["host/h1"]"#, r#"["host/h1","host/h1"]"#),
            with(r#"["host/h1"]"#, r#"["host/*"]"#),
            with("2030-01-01T12:05:00Z", "2030-01-01T12:05:00+01:00"),
            with("2030-01-01T12:05:00Z", "2030-01-01 12:05:00"),
            with("2030-01-01T12:05:00Z", "2030-01-01T12:00:00Z"),
            with(
                r#""nbf":"2030-01-01T12:00:00Z""#,
                r#""nbf":"2030-01-01T11:00:00Z""#,
            ),
            with("AAECAwQFBgcICQoLDA0ODw", "AAECAwQFBgcICQoLDA0ODx"),
            with("AAECAwQFBgcICQoLDA0ODw", "AAECAwQFBgcICQoLDA0O"),
            with(
                "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU",
                "47DEQpj8HBSa",
            ),
            with("nitrile://c1/operator/alice", "alice"),
        ];
        for case in cases {
            assert!(Claims::from_json(case.as_bytes()).is_err(), "{case}");
        }
        let many_ops: Vec<String> = (0..=MAX_REQUEST_RESOURCES)
            .map(|i| format!("\"host/h{i}\""))
            .collect();
        let case = with(r#"["host/h1"]"#, &format!("[{}]", many_ops.join(",")));
        assert!(matches!(
            Claims::from_json(case.as_bytes()),
            Err(ClaimsError::TooManyResources(_))
        ));
    }

    #[test]
    fn footer_round_trips_and_is_strict() {
        let kid: KeyId = "AAECAwQFBgcICQoLDA0ODw".parse().unwrap();
        let f = Footer { kid };
        assert_eq!(f.to_json(), br#"{"kid":"AAECAwQFBgcICQoLDA0ODw"}"#);
        assert_eq!(Footer::from_json(&f.to_json()).unwrap(), f);
        assert!(Footer::from_json(br#"{"kid":"AAECAwQFBgcICQoLDA0ODw","x":1}"#).is_err());
        assert!(Footer::from_json(br#"{"kid":"zz"}"#).is_err());
    }
}
