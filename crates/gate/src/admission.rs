//! Admission of one request that carries a token: verify, make
//! single-use, journal.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use nitrile_api::wire::RefusalStep;
use nitrile_api::{Operation, PrincipalId, ResourceId};
use nitrile_audit::{
    AuditRecord, CertSha256, Journal, JournalReader, Outcome, Receipt, RecordKind, RequestId,
};
use nitrile_pki::PeerIdentity;
use nitrile_token::{
    Clock, ReplayCache, Request, SignedClaims, TokenError, TokenId, VerifiedGrant, Verifier,
};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

use crate::http::Refused;
use crate::journal::ServiceJournal;

/// Why the replay cache could not be rebuilt from the journal at start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdmissionError {
    /// the journal could not be read back
    #[error("cannot read the journal to rebuild the replay cache")]
    Journal(#[from] nitrile_audit::JournalError),
    /// an audit record could not be encoded
    #[error("cannot encode an audit record")]
    Record(#[from] nitrile_audit::RecordError),
    /// a record could not be appended to the journal (disk full, read-only,
    /// I/O error): nothing that needed it ran
    #[error("cannot append to the journal")]
    Append(#[source] nitrile_audit::JournalError),
    /// the replay cache is full of live token ids
    #[error("replay cache full while rebuilding it from the journal")]
    ReplayCache(#[source] TokenError),
}

/// A request that passed every check and whose request record is durable.
/// Only [`Admission::admit`] makes one; the operation may now execute.
#[derive(Debug)]
#[must_use = "an admitted request must be completed with Admission::complete"]
pub struct Admitted {
    grant: VerifiedGrant,
    principal: PrincipalId,
    cert_sha256: [u8; 32],
    request_id: RequestId,
    receipt: Receipt,
}

impl Admitted {
    /// The verified grant the request was admitted with.
    pub fn grant(&self) -> &VerifiedGrant {
        &self.grant
    }

    /// The journal receipt of the request record.
    pub fn receipt(&self) -> &Receipt {
        &self.receipt
    }

    /// Links the request's journal records.
    pub fn request_id(&self) -> RequestId {
        self.request_id
    }
}

/// A second token a request carries beside its bearer token, for
/// resources of another kind than the request's (tokens are homogeneous in
/// resource kind): a launch's `volume.attach` grant on each of its volumes.
/// It is checked as the bearer token is (signature, expiry, audience,
/// certificate binding, the operation on every resource, single use for a
/// mutation), and its id is journaled with the request.
#[derive(Debug, Clone)]
pub struct SecondToken<'a> {
    /// The token, if the request carried one.
    pub token: Option<&'a str>,
    /// The operation it must grant.
    pub operation: Operation,
    /// Every resource it must grant the operation on.
    pub resources: Vec<ResourceId>,
}

/// The detail key of a request record holding the second token's id.
pub const SECOND_TOKEN_ID: &str = "second_token_id";
/// The detail key of a request record holding the second token's expiry.
pub const SECOND_TOKEN_EXPIRES_AT: &str = "second_token_expires_at";

fn list(resources: &[ResourceId]) -> String {
    resources
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Default number of signature checks [`Admission::with_signature_cache`]
/// keeps.
pub const DEFAULT_SIGNATURE_CACHE: usize = 4096;

/// Admits or refuses the requests of one service (a host, logd) that
/// carry tokens for its audience.
pub struct Admission {
    journal: Arc<ServiceJournal>,
    verifier: Verifier,
    replay: ReplayCache,
    clock: Arc<dyn Clock>,
    signatures: Option<SignatureCache>,
}

/// Signature checks of tokens that grant no mutation, by SHA-256 of the
/// exact token text, until the token expires. Only the Ed25519 check and the
/// decoding are skipped on a hit: every other check runs per request
/// ([`Verifier::verify_signed`]).
struct SignatureCache {
    capacity: usize,
    entries: Mutex<HashMap<[u8; 32], SignedClaims>>,
}

impl SignatureCache {
    fn get(&self, key: &[u8; 32]) -> Option<SignedClaims> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(key).cloned()
    }

    fn insert(&self, key: [u8; 32], signed: SignedClaims, now: OffsetDateTime) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.capacity {
            entries.retain(|_, s| s.claims().expires_at() > now);
        }
        if entries.len() >= self.capacity {
            // Still full of live tokens: forget one; it is re-checked if used.
            if let Some(k) = entries.keys().next().copied() {
                entries.remove(&k);
            }
        }
        entries.insert(key, signed);
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("source", self.journal.source())
            .field("audience", self.verifier.audience())
            .finish_non_exhaustive()
    }
}

/// The key in a request record's detail that carries the token's expiry, so
/// that single use survives a restart.
const TOKEN_EXPIRES_AT: &str = "token_expires_at";

impl Admission {
    /// Builds the admission of service `source` (a host, logd: its name is
    /// the verifier's audience), rebuilding the replay cache from the request
    /// records of mutating operations in `journal_path` whose tokens are still
    /// live. Its records go to `journal` (see [`Admission::service_journal`]).
    pub fn new(
        source: PrincipalId,
        verifier: Verifier,
        replay: ReplayCache,
        journal: Arc<Journal>,
        journal_path: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AdmissionError> {
        let now = clock.now();
        for entry in JournalReader::open(journal_path)? {
            let entry = entry?;
            let Ok(record) = entry.record() else { continue };
            if record.kind != RecordKind::Request
                || !record.operations.iter().any(|op| op.is_mutation())
            {
                continue;
            }
            let (Some(id), Some(exp)) = (
                record
                    .token_id
                    .as_deref()
                    .and_then(|t| t.parse::<TokenId>().ok()),
                record
                    .detail
                    .as_ref()
                    .and_then(|d| d.get(TOKEN_EXPIRES_AT))
                    .and_then(|v| v.as_str())
                    .and_then(|s| {
                        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                            .ok()
                    }),
            ) else {
                continue;
            };
            if exp > now {
                replay
                    .remember(id, exp)
                    .map_err(AdmissionError::ReplayCache)?;
            }
            let detail = record.detail.as_ref();
            if let (Some(id), Some(exp)) = (
                detail
                    .and_then(|d| d.get(SECOND_TOKEN_ID))
                    .and_then(|v| v.as_str())
                    .and_then(|t| t.parse::<TokenId>().ok()),
                detail
                    .and_then(|d| d.get(SECOND_TOKEN_EXPIRES_AT))
                    .and_then(|v| v.as_str())
                    .and_then(|s| {
                        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                            .ok()
                    }),
            ) && exp > now
            {
                replay
                    .remember(id, exp)
                    .map_err(AdmissionError::ReplayCache)?;
            }
        }
        let audience = verifier.audience().clone();
        Ok(Self {
            journal: Arc::new(ServiceJournal::new(
                source,
                Some(audience),
                journal,
                Arc::clone(&clock),
            )),
            verifier,
            replay,
            clock,
            signatures: None,
        })
    }

    /// Caches up to `capacity` signature checks of tokens that grant no
    /// mutating operation, keyed by SHA-256 of the exact token, until their
    /// expiry. Expiry, audience, operation, resource and certificate binding
    /// are still checked on every request.
    pub fn with_signature_cache(mut self, capacity: usize) -> Self {
        self.signatures = (capacity > 0).then(|| SignatureCache {
            capacity,
            entries: Mutex::new(HashMap::new()),
        });
        self
    }

    /// Whether the last journal append succeeded.
    pub fn journal_healthy(&self) -> bool {
        self.journal.journal_healthy()
    }

    /// How many refusals could not be journaled (each was also reported on
    /// stderr).
    pub fn refusal_journal_failures(&self) -> u64 {
        self.journal.refusal_journal_failures()
    }

    /// The service's principal (the journal's source).
    pub fn source(&self) -> &PrincipalId {
        self.journal.source()
    }

    /// The journal refusals before admission go to
    /// ([`ServiceJournal::refuse_request`], [`ServiceJournal::refuse_tls`]),
    /// with the refusal hooks of [`nitrile_net::Handler`]
    /// ([`ServiceJournal::preauth_report`] and the others).
    pub fn service_journal(&self) -> &Arc<ServiceJournal> {
        &self.journal
    }

    /// Verifies `token` for `request`, using and filling the signature cache
    /// for operations that mutate nothing.
    fn verify(
        &self,
        token: &str,
        request: &Request,
        peer: &PeerIdentity,
        now: OffsetDateTime,
    ) -> Result<VerifiedGrant, TokenError> {
        let Some(cache) = self
            .signatures
            .as_ref()
            .filter(|_| !request.operation.is_mutation())
        else {
            return self
                .verifier
                .verify(token, request, &peer.cert_sha256, &*self.clock);
        };
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let signed = match cache.get(&key) {
            Some(s) => s,
            None => {
                let s = self
                    .verifier
                    .keys()
                    .verify_signature_only(token, &*self.clock)?;
                if s.claims().operations().iter().all(|op| !op.is_mutation()) {
                    cache.insert(key, s.clone(), now);
                }
                s
            }
        };
        self.verifier
            .verify_signed(&signed, request, &peer.cert_sha256, &*self.clock)
    }

    /// The service's write-ahead journal.
    pub fn journal(&self) -> &Arc<Journal> {
        self.journal.journal()
    }

    /// Admits `operation` on `resource` for `peer` presenting `token`, or
    /// refuses it. Either way the decision is journaled; an admitted request's
    /// record is durable before this returns. Blocks the calling thread on
    /// the journal: from async code use [`Admission::admit_async`].
    pub fn admit(
        &self,
        peer: &PeerIdentity,
        token: Option<&str>,
        operation: Operation,
        resource: &ResourceId,
    ) -> Result<Admitted, Refused> {
        match self.decide(peer, token, operation, resource, None, None) {
            Ok(admit) => {
                let journaled = self.append(&admit.record);
                self.admitted(admit, journaled)
            }
            Err(refusal) => {
                let (record, refused) = *refusal;
                let journaled = self.append(&record);
                Err(self.refusal_journaled(refused, journaled))
            }
        }
    }

    /// [`Admission::admit`] for async callers: the same checks and records,
    /// waiting for the journal without blocking a thread.
    pub async fn admit_async(
        &self,
        peer: &PeerIdentity,
        token: Option<&str>,
        operation: Operation,
        resource: &ResourceId,
    ) -> Result<Admitted, Refused> {
        self.admit_async_with(peer, token, operation, resource, None)
            .await
    }

    /// [`Admission::admit_async`], with the request's parameters (metadata
    /// such as an instance's name, image digest and sizes; never customer
    /// content) recorded under `params` in the request record, so that the
    /// journal says what was asked before it runs.
    pub async fn admit_async_with(
        &self,
        peer: &PeerIdentity,
        token: Option<&str>,
        operation: Operation,
        resource: &ResourceId,
        params: Option<serde_json::Value>,
    ) -> Result<Admitted, Refused> {
        self.admit_async_with_second(peer, token, operation, resource, params, None)
            .await
    }

    /// [`Admission::admit_async_with`], with a [`SecondToken`] the request
    /// must also carry (when `second` is given): a missing, invalid or
    /// replayed second token refuses the request at step `token`, journaled,
    /// as the bearer token would.
    pub async fn admit_async_with_second(
        &self,
        peer: &PeerIdentity,
        token: Option<&str>,
        operation: Operation,
        resource: &ResourceId,
        params: Option<serde_json::Value>,
        second: Option<&SecondToken<'_>>,
    ) -> Result<Admitted, Refused> {
        match self.decide(peer, token, operation, resource, params, second) {
            Ok(admit) => {
                let journaled = self.append_async(&admit.record).await;
                self.admitted(admit, journaled)
            }
            Err(refusal) => {
                let (record, refused) = *refusal;
                let journaled = self.append_async(&record).await;
                Err(self.refusal_journaled(refused, journaled))
            }
        }
    }

    /// Every check of [`Admission::admit`], without journaling: the request
    /// record to make durable before the request may run, or the refusal
    /// record to journal and the refusal (its `audit_seq` not yet known).
    fn decide(
        &self,
        peer: &PeerIdentity,
        token: Option<&str>,
        operation: Operation,
        resource: &ResourceId,
        params: Option<serde_json::Value>,
        second: Option<&SecondToken<'_>>,
    ) -> Result<Admit, Box<(AuditRecord, Refused)>> {
        let now = self.clock.now();
        let request_id = RequestId::random(&mut rand_core::OsRng);
        let mut operations = vec![operation];
        let mut resources = vec![resource.clone()];
        if let Some(second) = second {
            operations.push(second.operation);
            resources.extend(second.resources.iter().cloned());
        }
        let base = |r: AuditRecord| {
            r.with_principal(peer.principal.clone())
                .with_cert_sha256(CertSha256::from_bytes(peer.cert_sha256))
                .with_operations(operations.iter().copied())
                .with_resources(resources.iter().cloned())
                .with_audience(self.verifier.audience().clone())
        };
        let refuse = |status: u16, step: RefusalStep, code: &'static str, reason: String| {
            let record = base(AuditRecord::refusal(
                now,
                self.source().clone(),
                request_id,
                step,
                &format!("{code}: {reason}"),
            ));
            let refused = Refused {
                status,
                step,
                code,
                reason,
                audit_seq: None,
            };
            Box::new((record, refused))
        };
        let Some(token) = token else {
            return Err(refuse(
                401,
                RefusalStep::Token,
                "missing",
                "no token; get one with `nitrile token request`".into(),
            ));
        };
        let request = Request {
            operation,
            resource: resource.clone(),
        };
        let grant = match self.verify(token, &request, peer, now) {
            Ok(g) => g,
            Err(e) => {
                return Err(refuse(
                    status_of(&e),
                    RefusalStep::Token,
                    e.code(),
                    e.to_string(),
                ));
            }
        };
        if operation.is_mutation()
            && let Err(e) = self
                .replay
                .check_and_record(grant.token_id(), grant.expires_at(), now)
        {
            return Err(refuse(
                status_of(&e),
                RefusalStep::Token,
                e.code(),
                e.to_string(),
            ));
        }
        let mut detail = serde_json::json!({
            TOKEN_EXPIRES_AT: nitrile_audit::format_time(grant.expires_at()),
        });
        if let Some(params) = params {
            detail["params"] = params;
        }
        if let Some(second) = second {
            let Some(token) = second.token else {
                return Err(refuse(
                    401,
                    RefusalStep::Token,
                    "second_token_missing",
                    format!(
                        "this request also needs a token granting {} on {}",
                        second.operation,
                        list(&second.resources)
                    ),
                ));
            };
            let mut verified = None;
            for r in &second.resources {
                let request = Request {
                    operation: second.operation,
                    resource: r.clone(),
                };
                match self.verify(token, &request, peer, now) {
                    Ok(g) => verified = Some(g),
                    Err(e) => {
                        return Err(refuse(
                            status_of(&e),
                            RefusalStep::Token,
                            e.code(),
                            format!("the second token ({} on {r}): {e}", second.operation),
                        ));
                    }
                }
            }
            if let Some(g) = verified {
                if second.operation.is_mutation()
                    && let Err(e) = self
                        .replay
                        .check_and_record(g.token_id(), g.expires_at(), now)
                {
                    return Err(refuse(
                        status_of(&e),
                        RefusalStep::Token,
                        e.code(),
                        format!("the second token: {e}"),
                    ));
                }
                detail[SECOND_TOKEN_ID] = g.token_id().to_string().into();
                detail[SECOND_TOKEN_EXPIRES_AT] = nitrile_audit::format_time(g.expires_at()).into();
            }
        }
        let record = base(AuditRecord::request(now, self.source().clone(), request_id))
            .with_token_id(grant.token_id().to_string())
            .with_group(grant.group().as_str())
            .with_detail(detail);
        Ok(Admit {
            record,
            grant,
            principal: peer.principal.clone(),
            cert_sha256: peer.cert_sha256,
            request_id,
        })
    }

    /// The admission once its request record was (or failed to be) journaled.
    fn admitted(
        &self,
        admit: Admit,
        journaled: Result<Receipt, AdmissionError>,
    ) -> Result<Admitted, Refused> {
        match journaled {
            Ok(receipt) => Ok(Admitted {
                principal: admit.principal,
                cert_sha256: admit.cert_sha256,
                grant: admit.grant,
                request_id: admit.request_id,
                receipt,
            }),
            Err(e) => {
                tracing::error!(error = %e, "journal write failed; request not executed");
                Err(Refused {
                    status: 503,
                    step: RefusalStep::Journal,
                    code: "journal",
                    reason: "the host journal cannot record this request, so nothing ran; \
                             retry later"
                        .into(),
                    audit_seq: None,
                })
            }
        }
    }

    /// The refusal with the sequence number of its journal record, if it
    /// could be written.
    fn refusal_journaled(
        &self,
        mut refused: Refused,
        journaled: Result<Receipt, AdmissionError>,
    ) -> Refused {
        refused.audit_seq = self.journal.refusal_seq(journaled, refused.code);
        refused
    }

    /// Journals how an admitted request ended. Blocks the calling thread on
    /// the journal: from async code use [`Admission::complete_async`].
    pub fn complete(
        &self,
        admitted: Admitted,
        outcome: Outcome,
        detail: Option<serde_json::Value>,
    ) -> Result<Receipt, AdmissionError> {
        self.append(&self.outcome_record(admitted, outcome, detail))
    }

    /// [`Admission::complete`] for async callers.
    pub async fn complete_async(
        &self,
        admitted: Admitted,
        outcome: Outcome,
        detail: Option<serde_json::Value>,
    ) -> Result<Receipt, AdmissionError> {
        self.append_async(&self.outcome_record(admitted, outcome, detail))
            .await
    }

    fn outcome_record(
        &self,
        admitted: Admitted,
        outcome: Outcome,
        detail: Option<serde_json::Value>,
    ) -> AuditRecord {
        let mut record = AuditRecord::outcome(
            self.clock.now(),
            self.source().clone(),
            admitted.request_id,
            outcome,
        )
        .with_principal(admitted.principal)
        .with_cert_sha256(CertSha256::from_bytes(admitted.cert_sha256))
        .with_operations([admitted.grant.operation()])
        .with_resources([admitted.grant.resource().clone()])
        .with_token_id(admitted.grant.token_id().to_string());
        if let Some(d) = detail {
            record = record.with_detail(d);
        }
        record
    }

    fn append(&self, record: &AuditRecord) -> Result<Receipt, AdmissionError> {
        self.journal.append(record)
    }

    async fn append_async(&self, record: &AuditRecord) -> Result<Receipt, AdmissionError> {
        self.journal.append_async(record).await
    }
}

/// An admission decided but not yet journaled.
struct Admit {
    record: AuditRecord,
    grant: VerifiedGrant,
    principal: PrincipalId,
    cert_sha256: [u8; 32],
    request_id: RequestId,
}

fn status_of(e: &TokenError) -> u16 {
    match e {
        TokenError::OperationNotGranted(_)
        | TokenError::ResourceNotGranted(_)
        | TokenError::WrongAudience { .. } => 403,
        TokenError::ReplayCacheFull => 503,
        _ => 401,
    }
}
