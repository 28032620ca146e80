//! What a service reads from and answers on HTTP at the gate: the bearer
//! token of a request, and the body of every refusal.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, header};
use nitrile_api::admin::{MAX_LABEL_LEN, MAX_REASON_LEN, clip_text};
use nitrile_api::wire::{Refusal, RefusalStep};
use nitrile_net::json_response;

/// A request refused at the gate. Its journal record, when it could be
/// written, has sequence number `audit_seq`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused at {}: {reason}", step.as_str())]
pub struct Refused {
    /// HTTP status to answer with.
    pub status: u16,
    /// The step that refused.
    pub step: RefusalStep,
    /// Stable short code, e.g. `expired`, `replayed`, `journal`.
    pub code: &'static str,
    /// Why, for the caller.
    pub reason: String,
    /// The refusal's journal record.
    pub audit_seq: Option<u64>,
}

impl Refused {
    /// The answer: a [`Refusal`] body with this status.
    pub fn response(&self) -> Response<Bytes> {
        refusal_response(self.status, self.step, &self.reason, self.audit_seq)
    }
}

/// The body of a refusal: `reason` clipped to [`MAX_REASON_LEN`], and a
/// quota name clipped to [`MAX_LABEL_LEN`].
pub fn refusal_body(
    step: RefusalStep,
    reason: &str,
    quota: Option<&str>,
    retry_after_secs: Option<u64>,
    audit_seq: Option<u64>,
) -> Refusal {
    Refusal {
        step,
        reason: clip_text(reason, MAX_REASON_LEN),
        quota: quota.map(|q| clip_text(q, MAX_LABEL_LEN)),
        retry_after_secs,
        audit_seq,
    }
}

/// A refusal answered with `status` (500 if it is not a status code):
/// a JSON [`Refusal`] naming the step, the reason and the journal record.
pub fn refusal_response(
    status: u16,
    step: RefusalStep,
    reason: &str,
    audit_seq: Option<u64>,
) -> Response<Bytes> {
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &refusal_body(step, reason, None, None, audit_seq),
    )
}

/// The bearer token of a request, if it has a well-formed one
/// (`Authorization: Bearer <token>`, the scheme in any case). A token's
/// length is bounded by its verifier (`nitrile_token::MAX_TOKEN_LEN`).
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn only_a_well_formed_bearer_token_is_taken() {
        assert_eq!(
            bearer(&headers("Bearer v4.public.x")).as_deref(),
            Some("v4.public.x")
        );
        assert_eq!(
            bearer(&headers("bearer  v4.public.x ")).as_deref(),
            Some("v4.public.x")
        );
        for bad in [
            "Basic dXNlcjpwdw==",
            "Bearer",
            "Bearer  ",
            "v4.public.x",
            "Token v4",
        ] {
            assert_eq!(bearer(&headers(bad)), None, "{bad}");
        }
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn a_refusal_body_is_clipped_and_names_its_record() {
        let long = "x".repeat(MAX_REASON_LEN * 2);
        let resp = refusal_response(403, RefusalStep::Token, &long, Some(7));
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        let body: Refusal = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(body.step, RefusalStep::Token);
        assert!(body.reason.chars().count() <= MAX_REASON_LEN);
        assert_eq!(body.audit_seq, Some(7));
        assert_eq!(body.quota, None);
        let resp = refusal_response(1000, RefusalStep::Internal, "?", None);
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
