//! The audit record: what a journal payload says about one admin call.
//!
//! Records are JSON objects with the stable field names below; every field is
//! always written (`null` or `[]` when empty) and unknown fields are refused.
//! A request is journaled as a `request` record before it acts, then as an
//! `outcome` record; a refused call is journaled as a `refusal` record naming
//! the step that refused. Records carry identities, operations, resource ids
//! and short reasons, never customer content.

use std::fmt;
use std::str::FromStr;

use nitrile_api::wire::RefusalStep;
use nitrile_api::{Audience, Operation, PrincipalId, ResourceId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::MAX_RECORD_LEN;
use crate::format::parse_hex_array;

/// Longest `reason`, in bytes; builders cut longer reasons at a character
/// boundary.
pub const MAX_REASON_LEN: usize = 256;

/// Longest `token_id` or `group`, in bytes.
pub const MAX_SHORT_FIELD_LEN: usize = 128;

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// the JSON is malformed, has an unknown field, or breaks a rule below
    #[error("the audit record is not valid")]
    Json(#[from] serde_json::Error),
    /// the encoded record is larger than `MAX_RECORD_LEN`
    #[error("the audit record is {len} bytes; at most {MAX_RECORD_LEN} are allowed")]
    TooLarge {
        /// Its encoded length.
        len: usize,
    },
    /// the record breaks a rule of its kind or a field bound
    #[error("the audit record is inconsistent: {0}")]
    Invalid(#[source] RecordRule),
}

/// A rule a record must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordRule {
    /// a refusal must name the step that refused and its reason
    #[error("a refusal must name its step and reason")]
    RefusalWithoutStep,
    /// only a refusal names a refusing step
    #[error("only a refusal names a refusing step")]
    StepOutsideRefusal,
    /// an outcome record must say what the outcome was
    #[error("an outcome record must name its outcome")]
    OutcomeMissing,
    /// only an outcome record names an outcome
    #[error("only an outcome record names an outcome")]
    OutcomeOutsideOutcomeRecord,
    /// a field is longer than its bound
    #[error("field {0} is too long")]
    FieldTooLong(&'static str),
    /// the time is not in UTC
    #[error("time must be UTC")]
    NotUtc,
}

/// What a record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A call was received and passed every check; written before it acts.
    Request,
    /// How a journaled request ended.
    Outcome,
    /// A call was refused; nothing ran.
    Refusal,
}

impl RecordKind {
    /// The kind's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Outcome => "outcome",
            Self::Refusal => "refusal",
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A token was granted (token service).
    Granted,
    /// The operation ran to completion (host).
    Executed,
    /// The operation was attempted and failed.
    Failed,
}

impl Outcome {
    /// The outcome's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::Executed => "executed",
            Self::Failed => "failed",
        }
    }
}

/// A random 128-bit id linking a request's records; 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId([u8; 16]);

impl RequestId {
    /// A fresh id from `rng`.
    pub fn random(rng: &mut (impl rand_core::RngCore + rand_core::CryptoRng)) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        Self(b)
    }

    /// An id from its bytes.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        Self(b)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

/// SHA-256 of a TLS client certificate (DER); 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CertSha256([u8; 32]);

impl CertSha256 {
    /// The fingerprint of a DER certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// A fingerprint from its bytes.
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// The fingerprint's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// A hex string that is not the expected number of lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected {0} lowercase hex digits")]
pub struct HexError(pub usize);

macro_rules! hex_newtype {
    ($($t:ident = $n:literal),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({})"), self)
            }
        }
        impl FromStr for $t {
            type Err = HexError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex_array::<$n>(s).map(Self).ok_or(HexError(2 * $n))
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
hex_newtype!(RequestId = 16, CertSha256 = 32);

/// One audit record. Build one with [`AuditRecord::request`],
/// [`AuditRecord::refusal`] or [`AuditRecord::outcome`] and the `with_*`
/// methods; turn it into journal bytes with [`AuditRecord::encode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "Fields")]
pub struct AuditRecord {
    /// When it happened, RFC 3339 in UTC.
    #[serde(with = "utc_rfc3339")]
    pub time: OffsetDateTime,
    /// Who wrote the record: a cell service or a host.
    pub source: PrincipalId,
    /// Links the records of one call.
    pub request_id: RequestId,
    /// What the record reports.
    pub kind: RecordKind,
    /// The caller, when its TLS identity is known.
    pub principal: Option<PrincipalId>,
    /// SHA-256 of the caller's certificate, when one was presented.
    pub cert_sha256: Option<CertSha256>,
    /// Operations asked for.
    pub operations: Vec<Operation>,
    /// Resources named.
    pub resources: Vec<ResourceId>,
    /// The audience of the token asked for or presented.
    pub audience: Option<Audience>,
    /// The token's id.
    pub token_id: Option<String>,
    /// The entitlement group acted under.
    pub group: Option<String>,
    /// For a refusal: the step that refused.
    pub step: Option<RefusalStep>,
    /// A short reason (refusals, failures).
    pub reason: Option<String>,
    /// For an outcome record: how it ended.
    pub outcome: Option<Outcome>,
    /// Small metadata (sizes, versions, durations); never customer content.
    pub detail: Option<serde_json::Value>,
}

/// The wire form, checked into an [`AuditRecord`] by `TryFrom`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    #[serde(with = "utc_rfc3339")]
    time: OffsetDateTime,
    source: PrincipalId,
    request_id: RequestId,
    kind: RecordKind,
    #[serde(default)]
    principal: Option<PrincipalId>,
    #[serde(default)]
    cert_sha256: Option<CertSha256>,
    #[serde(default)]
    operations: Vec<Operation>,
    #[serde(default)]
    resources: Vec<ResourceId>,
    #[serde(default)]
    audience: Option<Audience>,
    #[serde(default)]
    token_id: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    step: Option<RefusalStep>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    outcome: Option<Outcome>,
    #[serde(default)]
    detail: Option<serde_json::Value>,
}

impl TryFrom<Fields> for AuditRecord {
    type Error = RecordRule;
    fn try_from(f: Fields) -> Result<Self, Self::Error> {
        let r = AuditRecord {
            time: f.time,
            source: f.source,
            request_id: f.request_id,
            kind: f.kind,
            principal: f.principal,
            cert_sha256: f.cert_sha256,
            operations: f.operations,
            resources: f.resources,
            audience: f.audience,
            token_id: f.token_id,
            group: f.group,
            step: f.step,
            reason: f.reason,
            outcome: f.outcome,
            detail: f.detail,
        };
        r.check()?;
        Ok(r)
    }
}

fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl AuditRecord {
    fn blank(
        now: OffsetDateTime,
        source: PrincipalId,
        request_id: RequestId,
        kind: RecordKind,
    ) -> Self {
        Self {
            time: now.to_offset(UtcOffset::UTC),
            source,
            request_id,
            kind,
            principal: None,
            cert_sha256: None,
            operations: Vec::new(),
            resources: Vec::new(),
            audience: None,
            token_id: None,
            group: None,
            step: None,
            reason: None,
            outcome: None,
            detail: None,
        }
    }

    /// A request that passed every check, journaled before it acts.
    pub fn request(now: OffsetDateTime, source: PrincipalId, request_id: RequestId) -> Self {
        Self::blank(now, source, request_id, RecordKind::Request)
    }

    /// A refused call: `step` refused it for `reason` (cut to
    /// [`MAX_REASON_LEN`] bytes).
    pub fn refusal(
        now: OffsetDateTime,
        source: PrincipalId,
        request_id: RequestId,
        step: RefusalStep,
        reason: &str,
    ) -> Self {
        let mut r = Self::blank(now, source, request_id, RecordKind::Refusal);
        r.step = Some(step);
        r.reason = Some(cut(reason, MAX_REASON_LEN));
        r
    }

    /// How the request `request_id` ended.
    pub fn outcome(
        now: OffsetDateTime,
        source: PrincipalId,
        request_id: RequestId,
        outcome: Outcome,
    ) -> Self {
        let mut r = Self::blank(now, source, request_id, RecordKind::Outcome);
        r.outcome = Some(outcome);
        r
    }

    /// Sets the caller.
    pub fn with_principal(mut self, principal: PrincipalId) -> Self {
        self.principal = Some(principal);
        self
    }

    /// Sets the caller's certificate fingerprint.
    pub fn with_cert_sha256(mut self, digest: CertSha256) -> Self {
        self.cert_sha256 = Some(digest);
        self
    }

    /// Sets the operations.
    pub fn with_operations(mut self, ops: impl IntoIterator<Item = Operation>) -> Self {
        self.operations = ops.into_iter().collect();
        self
    }

    /// Sets the resources.
    pub fn with_resources(mut self, resources: impl IntoIterator<Item = ResourceId>) -> Self {
        self.resources = resources.into_iter().collect();
        self
    }

    /// Sets the audience.
    pub fn with_audience(mut self, audience: Audience) -> Self {
        self.audience = Some(audience);
        self
    }

    /// Sets the token id (at most [`MAX_SHORT_FIELD_LEN`] bytes, checked by
    /// [`AuditRecord::encode`]).
    pub fn with_token_id(mut self, token_id: impl Into<String>) -> Self {
        self.token_id = Some(token_id.into());
        self
    }

    /// Sets the entitlement group (at most [`MAX_SHORT_FIELD_LEN`] bytes).
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Sets the reason, cut to [`MAX_REASON_LEN`] bytes.
    pub fn with_reason(mut self, reason: &str) -> Self {
        self.reason = Some(cut(reason, MAX_REASON_LEN));
        self
    }

    /// Sets small metadata; never customer content.
    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// Checks the rules every record keeps.
    fn check(&self) -> Result<(), RecordRule> {
        match self.kind {
            RecordKind::Refusal if self.step.is_none() || self.reason.is_none() => {
                return Err(RecordRule::RefusalWithoutStep);
            }
            RecordKind::Request | RecordKind::Outcome if self.step.is_some() => {
                return Err(RecordRule::StepOutsideRefusal);
            }
            _ => {}
        }
        match self.kind {
            RecordKind::Outcome if self.outcome.is_none() => {
                return Err(RecordRule::OutcomeMissing);
            }
            RecordKind::Request | RecordKind::Refusal if self.outcome.is_some() => {
                return Err(RecordRule::OutcomeOutsideOutcomeRecord);
            }
            _ => {}
        }
        let too_long = |s: &Option<String>, max| s.as_ref().is_some_and(|s| s.len() > max);
        if too_long(&self.reason, MAX_REASON_LEN) {
            return Err(RecordRule::FieldTooLong("reason"));
        }
        if too_long(&self.token_id, MAX_SHORT_FIELD_LEN) {
            return Err(RecordRule::FieldTooLong("token_id"));
        }
        if too_long(&self.group, MAX_SHORT_FIELD_LEN) {
            return Err(RecordRule::FieldTooLong("group"));
        }
        if self.time.offset() != UtcOffset::UTC {
            return Err(RecordRule::NotUtc);
        }
        Ok(())
    }

    /// The record as journal payload bytes (compact JSON), after checking its
    /// rules and size.
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        self.check().map_err(RecordError::Invalid)?;
        let bytes = serde_json::to_vec(self)?;
        if bytes.len() > MAX_RECORD_LEN {
            return Err(RecordError::TooLarge { len: bytes.len() });
        }
        Ok(bytes)
    }

    /// Parses journal payload bytes, refusing unknown fields, broken rules and
    /// anything longer than [`MAX_RECORD_LEN`].
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.len() > MAX_RECORD_LEN {
            return Err(RecordError::TooLarge { len: bytes.len() });
        }
        Ok(serde_json::from_slice(bytes)?)
    }
}

mod utc_rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::format_description::well_known::Rfc3339;
    use time::{OffsetDateTime, UtcOffset};

    pub(super) fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        let text = t
            .to_offset(UtcOffset::UTC)
            .format(&Rfc3339)
            .map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let t = OffsetDateTime::parse(&s, &Rfc3339).map_err(serde::de::Error::custom)?;
        if t.offset() != UtcOffset::UTC {
            return Err(serde::de::Error::custom("time must be UTC (Z)"));
        }
        Ok(t)
    }
}

/// Formats a time as RFC 3339 UTC, as records store it.
pub fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn src() -> PrincipalId {
        PrincipalId::parse("nitrile://c1/host/h1").unwrap()
    }

    fn id() -> RequestId {
        RequestId::from_bytes([0xab; 16])
    }

    #[test]
    fn refusal_round_trips_with_stable_names() {
        let r = AuditRecord::refusal(
            datetime!(2030-01-02 03:04:05 +02:00),
            src(),
            id(),
            RefusalStep::Token,
            "token expired",
        )
        .with_principal(PrincipalId::parse("nitrile://c1/operator/alice").unwrap())
        .with_operations([Operation::HostDrain])
        .with_resources([ResourceId::parse("host/h1").unwrap()])
        .with_cert_sha256(CertSha256::of_der(b"cert"));
        let bytes = r.encode().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["time"], "2030-01-02T01:04:05Z");
        assert_eq!(v["kind"], "refusal");
        assert_eq!(v["step"], "token");
        assert_eq!(v["operations"][0], "host.drain");
        assert_eq!(v["request_id"], "ab".repeat(16));
        assert!(v["outcome"].is_null());
        assert_eq!(AuditRecord::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn unknown_fields_and_broken_rules_are_refused() {
        let r = AuditRecord::outcome(
            datetime!(2030-01-01 0:00 UTC),
            src(),
            id(),
            Outcome::Executed,
        );
        let mut v: serde_json::Value = serde_json::from_slice(&r.encode().unwrap()).unwrap();
        v["extra"] = true.into();
        assert!(AuditRecord::decode(&serde_json::to_vec(&v).unwrap()).is_err());

        let mut v: serde_json::Value = serde_json::from_slice(&r.encode().unwrap()).unwrap();
        v["outcome"] = serde_json::Value::Null;
        assert!(AuditRecord::decode(&serde_json::to_vec(&v).unwrap()).is_err());

        let mut v: serde_json::Value = serde_json::from_slice(&r.encode().unwrap()).unwrap();
        v["time"] = "2030-01-01T01:00:00+01:00".into();
        assert!(AuditRecord::decode(&serde_json::to_vec(&v).unwrap()).is_err());

        let mut bad = r.clone();
        bad.step = Some(RefusalStep::Quota);
        assert!(matches!(
            bad.encode(),
            Err(RecordError::Invalid(RecordRule::StepOutsideRefusal))
        ));
        let bad = r.with_group("g".repeat(MAX_SHORT_FIELD_LEN + 1));
        assert!(matches!(
            bad.encode(),
            Err(RecordError::Invalid(RecordRule::FieldTooLong("group")))
        ));
    }

    #[test]
    fn reasons_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_REASON_LEN);
        let r = AuditRecord::refusal(
            datetime!(2030-01-01 0:00 UTC),
            src(),
            id(),
            RefusalStep::Quota,
            &long,
        );
        let reason = r.reason.as_deref().unwrap();
        assert!(reason.len() <= MAX_REASON_LEN && reason.len() >= MAX_REASON_LEN - 1);
        r.encode().unwrap();
    }

    #[test]
    fn oversized_records_are_refused() {
        let r = AuditRecord::request(datetime!(2030-01-01 0:00 UTC), src(), id())
            .with_detail(serde_json::Value::String("x".repeat(MAX_RECORD_LEN)));
        assert!(matches!(r.encode(), Err(RecordError::TooLarge { .. })));
    }

    #[test]
    fn hex_ids_fail_closed() {
        assert!("AB".repeat(16).parse::<RequestId>().is_err());
        assert!("ab".repeat(15).parse::<RequestId>().is_err());
        assert_eq!("ab".repeat(16).parse::<RequestId>().unwrap(), id());
    }
}
