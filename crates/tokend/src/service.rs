//! The decision of one token request, independent of HTTP.
//!
//! Order of checks: parse (closed types, lifetime within the service's
//! maximum) -> entitlement (Cedar, the group's slice only) -> quota (every
//! operation's or none; durable, distinct resources per window) -> mint ->
//! journal the grant durably -> answer. Every refusal is journaled too; a
//! token is only ever returned after its grant record is durable.

use std::sync::Arc;

use nitrile_api::wire::{
    MAX_REQUEST_OPERATIONS, MAX_REQUEST_RESOURCES, RefusalStep, TokenRequest, TokenResponse,
};
use nitrile_api::{Name, PrincipalId};
use nitrile_audit::{AuditRecord, CertSha256, Journal, Outcome, RequestId};
use nitrile_gate::refusal_body;
use nitrile_net::{Counter, MetricsError, Registry};
use nitrile_pki::PeerIdentity;
use nitrile_policy::{Entitlements, QuotaError, QuotaStore};
use nitrile_token::{
    CertThumbprint, ClaimsInput, Clock, DEFAULT_LIFETIME, MAX_LIFETIME, TokenIssuer,
};
use time::OffsetDateTime;

/// The answer to one request: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// JSON body: a [`TokenResponse`] or a [`nitrile_api::wire::Refusal`].
    pub body: Vec<u8>,
    /// Seconds to put in a `retry-after` header, for 429.
    pub retry_after: Option<u64>,
}

/// Counters exposed as metrics.
#[derive(Debug)]
pub struct ServiceMetrics {
    /// Tokens granted.
    pub granted: Counter,
    /// Requests refused, any step.
    pub refused: Counter,
    /// Refusals whose own journal record could not be written.
    pub refusal_journal_failures: Counter,
    /// Grants withheld because the journal could not record them.
    pub journal_failures: Counter,
}

impl ServiceMetrics {
    /// Registers the service's counters.
    pub fn register(registry: &Registry) -> Result<Self, MetricsError> {
        Ok(Self {
            granted: registry.counter("nitrile_tokend_granted_total", "Tokens granted.")?,
            refused: registry.counter(
                "nitrile_tokend_refused_total",
                "Token requests refused, any step.",
            )?,
            refusal_journal_failures: registry.counter(
                "nitrile_tokend_refusal_journal_failures_total",
                "Refusals whose journal record could not be written.",
            )?,
            journal_failures: registry.counter(
                "nitrile_tokend_journal_failures_total",
                "Grants withheld because the journal could not record them.",
            )?,
        })
    }
}

/// Everything a token decision needs.
pub struct TokenService {
    source: PrincipalId,
    issuer: TokenIssuer,
    entitlements: Arc<Entitlements>,
    quotas: QuotaStore,
    journal: Arc<Journal>,
    clock: Arc<dyn Clock>,
    metrics: ServiceMetrics,
    max_lifetime: time::Duration,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("source", &self.source)
            .field("key_id", &self.issuer.key_id())
            .finish_non_exhaustive()
    }
}

struct Refused {
    status: u16,
    step: RefusalStep,
    reason: String,
    quota: Option<String>,
    retry_after: Option<u64>,
}

impl Refused {
    fn new(status: u16, step: RefusalStep, reason: impl Into<String>) -> Self {
        Self {
            status,
            step,
            reason: reason.into(),
            quota: None,
            retry_after: None,
        }
    }
}

impl TokenService {
    /// Assembles the service. `entitlements` must come from a reviewed bundle
    /// (`Entitlements::load_reviewed`).
    pub fn new(
        issuer: TokenIssuer,
        entitlements: Arc<Entitlements>,
        quotas: QuotaStore,
        journal: Arc<Journal>,
        clock: Arc<dyn Clock>,
        metrics: ServiceMetrics,
    ) -> Self {
        Self {
            source: issuer.issuer().clone(),
            issuer,
            entitlements,
            quotas,
            journal,
            clock,
            metrics,
            max_lifetime: MAX_LIFETIME,
        }
    }

    /// Grants tokens of at most `max` (never more than [`MAX_LIFETIME`]):
    /// longer requests are refused, and a request naming no lifetime gets
    /// the shorter of [`DEFAULT_LIFETIME`] and `max`.
    pub fn with_max_lifetime(mut self, max: time::Duration) -> Self {
        self.max_lifetime = max.clamp(time::Duration::seconds(1), MAX_LIFETIME);
        self
    }

    /// The longest lifetime granted.
    pub fn max_lifetime(&self) -> time::Duration {
        self.max_lifetime
    }

    /// The service's counters.
    pub fn metrics(&self) -> &ServiceMetrics {
        &self.metrics
    }

    /// The journal every decision is written to.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// Decides `POST /v1/tokens` for an authenticated peer. Blocking: it
    /// waits for SQLite and the journal's fdatasync.
    pub fn issue(&self, peer: &PeerIdentity, body: &[u8]) -> Reply {
        let now = self.clock.now();
        let request_id = RequestId::random(&mut rand_core::OsRng);
        let base = |r: AuditRecord| {
            r.with_principal(peer.principal.clone())
                .with_cert_sha256(CertSha256::from_bytes(peer.cert_sha256))
        };
        let request: TokenRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                let refused = Refused::new(
                    400,
                    RefusalStep::Request,
                    format!("malformed token request: {e}"),
                );
                return self.refuse(base, now, request_id, None, refused);
            }
        };
        match self.decide(peer, &request, now) {
            Ok((group, response)) => {
                let record = base(AuditRecord::outcome(
                    now,
                    self.source.clone(),
                    request_id,
                    Outcome::Granted,
                ))
                .with_operations(request.operations.iter().copied())
                .with_resources(request.resources.iter().cloned())
                .with_audience(request.audience.clone())
                .with_group(group.as_str())
                .with_token_id(response.token_id.clone())
                .with_detail(serde_json::json!({ "expires_at": response.expires_at }));
                match self.append(&record) {
                    Ok(_) => {
                        self.metrics.granted.inc();
                        let body = serde_json::to_vec(&response)
                            .unwrap_or_else(|_| unreachable!("a token response serializes"));
                        Reply {
                            status: 200,
                            body,
                            retry_after: None,
                        }
                    }
                    Err(reason) => {
                        // The token is dropped unsent: nothing unjournaled leaves.
                        self.metrics.journal_failures.inc();
                        tracing::error!(%reason, "journal write failed; token withheld");
                        refusal_reply(
                            &Refused::new(
                                503,
                                RefusalStep::Journal,
                                "the audit journal cannot record this request, so no token \
                                 was issued; retry later",
                            ),
                            None,
                        )
                    }
                }
            }
            Err(refused) => self.refuse(base, now, request_id, Some(&request), refused),
        }
    }

    /// Journals a request for a path or method the service does not have.
    pub fn refuse_route(&self, peer: &PeerIdentity, method: &str, path: &str) -> Reply {
        let now = self.clock.now();
        let request_id = RequestId::random(&mut rand_core::OsRng);
        let shown: String = path.chars().take(64).collect();
        let refused = Refused::new(
            404,
            RefusalStep::Request,
            format!("no such endpoint {method} {shown}; the token service serves POST /v1/tokens"),
        );
        let base = |r: AuditRecord| {
            r.with_principal(peer.principal.clone())
                .with_cert_sha256(CertSha256::from_bytes(peer.cert_sha256))
        };
        self.refuse(base, now, request_id, None, refused)
    }

    fn decide(
        &self,
        peer: &PeerIdentity,
        request: &TokenRequest,
        now: OffsetDateTime,
    ) -> Result<(Name, TokenResponse), Refused> {
        let bad = |reason: String| Refused::new(400, RefusalStep::Request, reason);
        if request.operations.len() > MAX_REQUEST_OPERATIONS {
            return Err(bad(format!(
                "at most {MAX_REQUEST_OPERATIONS} operations per token"
            )));
        }
        if request.resources.len() > MAX_REQUEST_RESOURCES {
            return Err(bad(format!(
                "at most {MAX_REQUEST_RESOURCES} resources per token"
            )));
        }
        let max = self.max_lifetime.whole_seconds().unsigned_abs();
        let lifetime = match request.lifetime_secs {
            None => self.max_lifetime.min(DEFAULT_LIFETIME),
            Some(s) if s == 0 || s > max => {
                return Err(bad(format!(
                    "lifetime {s}s is outside 1..={max}s (the longest token this service grants)"
                )));
            }
            Some(s) => time::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX)),
        };
        let group = match &request.group {
            None => None,
            Some(g) => Some(Name::new(g).map_err(|e| bad(format!("group: {e}")))?),
        };
        let authorized = self
            .entitlements
            .authorize(
                &peer.principal,
                group.as_ref(),
                &request.operations,
                &request.resources,
                &request.audience,
            )
            .map_err(|denied| Refused::new(403, RefusalStep::Entitlement, denied.to_string()))?;
        let group = authorized.group;
        // Every operation's quota is charged, or none (one lock, one
        // transaction): a refusal leaves no charge behind.
        match self.quotas.try_charge_request_as(
            self.entitlements.quotas(),
            &group,
            &peer.principal,
            &request.operations,
            &request.resources,
            now,
        ) {
            Ok(_) => {}
            Err(QuotaError::Exceeded(exceeded)) => {
                let mut r = Refused::new(429, RefusalStep::Quota, exceeded.to_string());
                r.quota = Some(exceeded.quota.to_string());
                r.retry_after = exceeded.retry_after(now).map(|d| d.as_secs().max(1));
                return Err(r);
            }
            Err(e) => {
                tracing::error!(error = %e, "quota store failed");
                return Err(Refused::new(
                    503,
                    RefusalStep::Internal,
                    "the quota store failed; nothing was issued; retry later",
                ));
            }
        }
        let input = ClaimsInput {
            subject: peer.principal.clone(),
            group: group.clone(),
            audience: request.audience.clone(),
            operations: request.operations.clone(),
            resources: request.resources.clone(),
            cert: CertThumbprint::from_sha256(peer.cert_sha256),
            lifetime: Some(lifetime),
        };
        let (token, claims) = self
            .issuer
            .mint(input, now, &mut rand_core::OsRng)
            .map_err(|e| bad(format!("cannot mint this token: {e}")))?;
        let response = TokenResponse {
            token,
            token_id: claims.token_id().to_string(),
            group: group.to_string(),
            expires_at: nitrile_audit::format_time(claims.expires_at()),
        };
        Ok((group, response))
    }

    fn refuse(
        &self,
        base: impl Fn(AuditRecord) -> AuditRecord,
        now: OffsetDateTime,
        request_id: RequestId,
        request: Option<&TokenRequest>,
        refused: Refused,
    ) -> Reply {
        self.metrics.refused.inc();
        let mut record = base(AuditRecord::refusal(
            now,
            self.source.clone(),
            request_id,
            refused.step,
            &refused.reason,
        ));
        if let Some(req) = request {
            record = record
                .with_operations(req.operations.iter().copied())
                .with_resources(req.resources.iter().cloned())
                .with_audience(req.audience.clone());
            if let Some(g) = &req.group {
                record = record.with_group(g.chars().take(63).collect::<String>());
            }
        }
        let seq = match self.append(&record) {
            Ok(seq) => Some(seq),
            Err(reason) => {
                self.metrics.refusal_journal_failures.inc();
                tracing::error!(%reason, step = refused.step.as_str(), "could not journal a refusal");
                eprintln!("nitrile tokend: could not journal a refusal: {reason}");
                None
            }
        };
        refusal_reply(&refused, seq)
    }

    fn append(&self, record: &AuditRecord) -> Result<u64, String> {
        let bytes = record.encode().map_err(|e| e.to_string())?;
        self.journal
            .append(&bytes)
            .map(|r| r.seq)
            .map_err(|e| e.to_string())
    }
}

fn refusal_reply(refused: &Refused, audit_seq: Option<u64>) -> Reply {
    let body = refusal_body(
        refused.step,
        &refused.reason,
        refused.quota.as_deref(),
        refused.retry_after,
        audit_seq,
    );
    Reply {
        status: refused.status,
        body: serde_json::to_vec(&body).unwrap_or_else(|_| unreachable!("a refusal serializes")),
        retry_after: refused.retry_after,
    }
}
