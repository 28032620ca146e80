//! JSON bodies exchanged with the token service.
//!
//! Unknown fields are refused (`deny_unknown_fields`) so that a client cannot
//! believe a field had an effect that it did not.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Audience, Operation, ResourceId};

/// Most operations one token request may name.
pub const MAX_REQUEST_OPERATIONS: usize = 16;
/// Most resources one token request may name.
pub const MAX_REQUEST_RESOURCES: usize = 64;
/// Largest request body the token service reads.
pub const MAX_REQUEST_BODY: usize = 16 * 1024;

/// `POST /v1/tokens`: ask for a token for exactly these operations on exactly
/// these resources at one audience.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Operations the token should allow.
    pub operations: Vec<Operation>,
    /// Exact resources the token should allow them on.
    pub resources: Vec<ResourceId>,
    /// The host (or service) that will accept the token.
    pub audience: Audience,
    /// The group to act as; by default the first of the principal's groups,
    /// in name order, that is entitled to everything asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Requested lifetime in seconds; default 300, at most 300 (the token
    /// service may be configured with a lower maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_secs: Option<u64>,
}

/// A granted token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenResponse {
    /// The PASETO v4.public token.
    pub token: String,
    /// Its unique id (`jti`).
    pub token_id: String,
    /// The group it was granted under.
    pub group: String,
    /// Expiry, RFC 3339.
    pub expires_at: String,
}

/// The step of the request path that refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RefusalStep {
    /// The request itself is malformed.
    Request,
    /// The TLS client certificate is missing or not acceptable.
    Tls,
    /// The token is missing, invalid, expired, replayed or for something else.
    Token,
    /// No entitlement allows the request.
    Entitlement,
    /// A quota is exhausted.
    Quota,
    /// The audit journal could not record the request, so nothing ran.
    Journal,
    /// The host or instance is not in a state that allows the request
    /// (drained host, no such instance, not enough capacity).
    State,
    /// The hypervisor could not carry the request out.
    Hypervisor,
    /// An internal failure; nothing ran.
    Internal,
}

impl RefusalStep {
    /// The step's name as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Tls => "tls",
            Self::Token => "token",
            Self::Entitlement => "entitlement",
            Self::Quota => "quota",
            Self::Journal => "journal",
            Self::State => "state",
            Self::Hypervisor => "hypervisor",
            Self::Internal => "internal",
        }
    }
}

/// The body of every refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// Which step refused.
    pub step: RefusalStep,
    /// Why, in words meant for the caller, at most
    /// [`MAX_REASON_LEN`](crate::admin::MAX_REASON_LEN) characters.
    #[schemars(length(max = crate::admin::MAX_REASON_LEN))]
    pub reason: String,
    /// The quota that refused, when `step` is `quota`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::admin::MAX_LABEL_LEN))]
    pub quota: Option<String>,
    /// Seconds until the request can succeed again, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    /// The id of the audit record of this refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_seq: Option<u64>,
}

impl Refusal {
    /// The refusal as its `Display` shows it, with the HTTP status that
    /// carried it after the step: `quota (429 Too Many Requests): ...`.
    pub fn with_status<S: fmt::Display>(&self, status: S) -> WithStatus<'_, S> {
        WithStatus {
            refusal: self,
            status,
        }
    }

    fn show(&self, f: &mut fmt::Formatter<'_>, status: Option<&dyn fmt::Display>) -> fmt::Result {
        f.write_str(self.step.as_str())?;
        if let Some(status) = status {
            write!(f, " ({status})")?;
        }
        write!(f, ": {}", self.reason)?;
        if let Some(q) = &self.quota {
            write!(f, " (quota {q})")?;
        }
        if let Some(s) = self.retry_after_secs {
            write!(f, "; retry in {s}s")?;
        }
        if let Some(seq) = self.audit_seq {
            write!(f, " [audit record {seq}]")?;
        }
        Ok(())
    }
}

/// A refusal for people: `step: reason (quota Q); retry in Ns [audit record
/// N]`, each part after the reason only when the refusal has it. The reason
/// is the refusing service's text, shown as it is: a terminal gets it
/// through the CLI's output layer, which escapes control characters.
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.show(f, None)
    }
}

/// A [`Refusal`] shown with the HTTP status that carried it
/// ([`Refusal::with_status`]).
#[derive(Debug, Clone, Copy)]
pub struct WithStatus<'a, S> {
    refusal: &'a Refusal,
    status: S,
}

impl<S: fmt::Display> fmt::Display for WithStatus<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.refusal.show(f, Some(&self.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_refuses_unknown_fields_and_operations() {
        let ok = r#"{"operations":["host.describe"],"resources":["host/h1"],"audience":"h1"}"#;
        let req: TokenRequest = serde_json::from_str(ok).unwrap();
        assert_eq!(req.operations, vec![Operation::HostDescribe]);
        let extra = r#"{"operations":[],"resources":[],"audience":"h1","admin":true}"#;
        assert!(serde_json::from_str::<TokenRequest>(extra).is_err());
        let bad_op = r#"{"operations":["host.shell"],"resources":[],"audience":"h1"}"#;
        assert!(serde_json::from_str::<TokenRequest>(bad_op).is_err());
    }

    #[test]
    fn a_refusal_names_its_step_reason_and_record() {
        let r = Refusal {
            step: RefusalStep::Quota,
            reason: "20 hosts an hour".into(),
            quota: Some("oncall/host.drain".into()),
            retry_after_secs: Some(60),
            audit_seq: Some(7),
        };
        assert_eq!(
            r.with_status("429 Too Many Requests").to_string(),
            "quota (429 Too Many Requests): 20 hosts an hour (quota oncall/host.drain); \
             retry in 60s [audit record 7]"
        );
        assert_eq!(
            r.to_string(),
            "quota: 20 hosts an hour (quota oncall/host.drain); retry in 60s [audit record 7]"
        );
        let bare = Refusal {
            step: RefusalStep::Token,
            reason: "expired".into(),
            quota: None,
            retry_after_secs: None,
            audit_seq: None,
        };
        assert_eq!(bare.to_string(), "token: expired");
        assert_eq!(bare.with_status(401).to_string(), "token (401): expired");
    }
}
