//! A host's volume-key calls: generate, unwrap, destroy, each authorized by
//! the token its caller presented to the host, which the host relays.
//!
//! Checks, in order, each refusal journaled before the answer: the peer is
//! a host of the cell (its mTLS certificate); a token is present; it
//! verifies against the pinned issuer keys, with the connected host as its
//! audience, for the route's operation on `volume/<id>`
//! ([`IssuerKeys::verify_relayed`]); under a customer's key, its subject is
//! the key's owner, or the placement service of the config for a volume of
//! that owner (`volume/<owner>--...`, the root volumes of the instances the
//! customer runs through it); and this grant (token, operation, volume) was not used
//! before. Then, for generate and destroy (which change the store), the
//! request record is made durable, the core acts, and the outcome record is
//! made durable before the answer; an unwrap (which changes nothing, and
//! whose only effect is its answer) has one record, its outcome with what
//! was relayed, made durable before the answer.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use nitrile_api::wire::RefusalStep;
use nitrile_api::{Audience, Operation, PrincipalId, PrincipalKind, ResourceId};
use nitrile_audit::{AuditRecord, CertSha256, JournalReader, Outcome, RecordKind, RequestId};
use nitrile_gate::{AdmissionError, refusal_response};
use nitrile_kms_api::KmsRequest;
use nitrile_kms_api::wire::{
    DestroyResponse, GenerateResponse, SealedKeyBytes, UnwrapResponse, WrappedKeyBytes,
};
use nitrile_net::{PeerIdentity, json_response};
use nitrile_token::{ReplayCache, Request, TokenError, TokenId, VerifiedGrant};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

use super::config::ReferenceSource;
use super::references::SignedReferences;
use super::{Failure, Service};
use crate::key::KeyName;
use crate::seal::RecipientPublicKey;

/// The key of a request record's detail that says what was relayed: the
/// token's subject and expiry and the grant's use id, from which the
/// replay cache is rebuilt at start.
const RELAYED: &str = "relayed";

/// The id under which a grant of a relayed token is used once: one token
/// may carry several grants (a launch that creates and attaches a volume
/// relays it for `volume.create`, then `volume.attach`), each used once.
pub(crate) fn use_id(token_id: &TokenId, operation: Operation, resource: &ResourceId) -> TokenId {
    let mut h = Sha256::new();
    h.update(b"nitrile-kms relayed grant v1\0");
    h.update(token_id.as_bytes());
    h.update(operation.as_str().as_bytes());
    h.update(b"\0");
    h.update(resource.to_string().as_bytes());
    let digest = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    TokenId::from_bytes(id)
}

/// Refills `replay` with the use ids of the relayed grants in the journal
/// at `path` whose tokens are still live at `now`, so that single use
/// survives a restart.
pub(crate) fn rebuild_replay_cache(
    replay: &ReplayCache,
    path: &Path,
    now: OffsetDateTime,
) -> Result<(), AdmissionError> {
    for entry in JournalReader::open(path)? {
        let entry = entry?;
        let Ok(record) = entry.record() else { continue };
        // A request record of a generate or destroy, or the one record of
        // an unwrap (an outcome); refusals used nothing.
        if record.kind == RecordKind::Refusal {
            continue;
        }
        let Some(relayed) = record.detail.as_ref().and_then(|d| d.get(RELAYED)) else {
            continue;
        };
        let id = relayed
            .get("use")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<TokenId>().ok());
        let exp = relayed
            .get("token_expires_at")
            .and_then(|v| v.as_str())
            .and_then(|s| {
                OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
            });
        if let (Some(id), Some(exp)) = (id, exp)
            && exp > now
        {
            replay
                .remember(id, exp)
                .map_err(AdmissionError::ReplayCache)?;
        }
    }
    Ok(())
}

/// A relayed call refused before it ran, with what is known of its token.
struct Refusal {
    failure: Failure,
    token_id: Option<String>,
    subject: Option<PrincipalId>,
}

impl From<Failure> for Box<Refusal> {
    fn from(failure: Failure) -> Self {
        Box::new(Refusal {
            failure,
            token_id: None,
            subject: None,
        })
    }
}

/// A relayed call that passed every check.
struct Granted {
    grant: VerifiedGrant,
    use_id: TokenId,
}

fn token_status(e: &TokenError) -> u16 {
    match e {
        TokenError::OperationNotGranted(_)
        | TokenError::ResourceNotGranted(_)
        | TokenError::WrongAudience { .. } => 403,
        TokenError::ReplayCacheFull => 503,
        _ => 401,
    }
}

/// What a route does, for messages.
fn verb(req: &KmsRequest) -> &'static str {
    match req {
        KmsRequest::Generate { .. } => "make volume keys",
        KmsRequest::Unwrap { .. } => "release volume keys",
        _ => "destroy volume keys",
    }
}

/// The key a request would use and its owner, if the key (and volume)
/// exist; the core refuses the others itself.
fn key_of(svc: &Service, req: &KmsRequest) -> Option<(KeyName, PrincipalId)> {
    let name = match req {
        KmsRequest::Generate { body, .. } => KeyName::from(body.kms_key.clone()),
        KmsRequest::Unwrap { volume, .. } | KmsRequest::Destroy { volume } => {
            svc.kms.describe_volume(volume).ok()?.key
        }
        _ => return None,
    };
    let owner = svc.kms.describe_key(&name).ok()?.owner;
    Some((name, owner))
}

fn decide(
    svc: &Service,
    peer: &PeerIdentity,
    token: Option<&str>,
    req: &KmsRequest,
    resource: &ResourceId,
    now: OffsetDateTime,
) -> Result<Granted, Box<Refusal>> {
    let operation = req.operation();
    if peer.principal.kind != PrincipalKind::Host {
        return Err(Failure {
            status: 403,
            step: RefusalStep::Tls,
            code: "not_a_host",
            reason: format!(
                "only a host's own certificate may relay a volume-key call; {} is not a host",
                peer.principal
            ),
        }
        .into());
    }
    let Some(token) = token else {
        return Err(Failure {
            status: 401,
            step: RefusalStep::Token,
            code: "missing",
            reason: format!(
                "no token: relay the caller's {operation} token for {resource} in \
                 `Authorization: Bearer`"
            ),
        }
        .into());
    };
    let audience = Audience::new(peer.principal.name.as_str())
        .unwrap_or_else(|_| unreachable!("a principal's name is an audience"));
    let request = Request {
        operation,
        resource: resource.clone(),
    };
    let grant = svc
        .issuer_keys
        .verify_relayed(token, &request, &audience, &*svc.clock)
        .map_err(|e| Failure {
            status: token_status(&e),
            step: RefusalStep::Token,
            code: e.code(),
            reason: e.to_string(),
        })?;
    let known = |failure: Failure, grant: &VerifiedGrant| {
        Box::new(Refusal {
            failure,
            token_id: Some(grant.token_id().to_string()),
            subject: Some(grant.subject().clone()),
        })
    };
    if let Some((key, owner)) = key_of(svc, req)
        && owner.kind == PrincipalKind::Customer
        && grant.subject() != &owner
        && !(svc.placement.as_ref() == Some(grant.subject())
            && resource.owner().as_ref() == Some(&owner.name))
    {
        let failure = Failure {
            status: 403,
            step: RefusalStep::Entitlement,
            code: "not_key_owner",
            reason: format!(
                "{key} is a customer's key: only its owner may {} under it, not {}",
                verb(req),
                grant.subject()
            ),
        };
        return Err(known(failure, &grant));
    }
    let use_id = use_id(grant.token_id(), operation, resource);
    if let Err(e) = svc
        .relayed
        .check_and_record(&use_id, grant.expires_at(), now)
    {
        let failure = Failure {
            status: token_status(&e),
            step: RefusalStep::Token,
            code: e.code(),
            reason: match e {
                TokenError::Replayed => format!(
                    "replayed: this token's {operation} on {resource} was already relayed once"
                ),
                e => e.to_string(),
            },
        };
        return Err(known(failure, &grant));
    }
    Ok(Granted { grant, use_id })
}

/// `[attestation]` of the key service: a volume key is released only to a
/// host whose attestation document verifies under the cell CA, names the
/// calling host, binds the recipient key, is recent, and shows the
/// reference PCR values: one file's for every host, or the host's own in a
/// signed release ([`SignedReferences`]).
#[derive(Debug)]
pub(crate) struct AttestationCheck {
    references: References,
    ca: Vec<u8>,
    max_age: std::time::Duration,
}

/// Where the reference values come from.
#[derive(Debug)]
enum References {
    /// One file's, read at start.
    File(std::collections::BTreeMap<u8, [u8; 32]>),
    /// Each host's own, from signed releases.
    Release(SignedReferences),
}

/// The check that a host's document passed: which reference values it
/// showed, for the record of the unwrap.
#[derive(Debug)]
pub(crate) struct Attested {
    /// `the reference file` or `release <version>`.
    pub(crate) reference: String,
}

impl AttestationCheck {
    /// Reads the cell CA certificate and, with `reference = FILE`, the
    /// reference values; signed releases are read later
    /// ([`AttestationCheck::start`]). An error names the file it is about.
    pub(crate) fn load(
        policy: &super::config::AttestationPolicy,
        ca: &std::path::Path,
        releases_datastore: std::path::PathBuf,
    ) -> Result<Self, (std::path::PathBuf, String)> {
        use rustls_pki_types::pem::PemObject as _;
        let references = match &policy.references {
            ReferenceSource::File(path) => {
                let at = |e: String| (path.clone(), e);
                let json =
                    nitrile_fs::read_bounded(path, 1 << 20).map_err(|e| at(e.to_string()))?;
                References::File(nitrile_attest::reference_values(&json).map_err(at)?)
            }
            ReferenceSource::Release(release) => {
                References::Release(SignedReferences::new(release.clone(), releases_datastore))
            }
        };
        let at = |e: String| (ca.to_owned(), e);
        let pem = nitrile_fs::read_bounded(ca, 1 << 20).map_err(|e| at(e.to_string()))?;
        let ca = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .next()
            .ok_or_else(|| at("no CA certificate".to_owned()))?
            .map_err(|e| at(e.to_string()))?
            .as_ref()
            .to_vec();
        Ok(Self {
            references,
            ca,
            max_age: std::time::Duration::from_secs(
                policy.max_age_secs.unwrap_or(300).clamp(1, 3600),
            ),
        })
    }

    /// At start: reads the signed releases, if that is where the values
    /// come from (what is believed is journaled; the service starts even
    /// when nothing is, and releases no key until something is).
    pub(crate) async fn start(&self, svc: &Service, now: OffsetDateTime) {
        if let References::Release(signed) = &self.references {
            signed.read_now(svc, now).await;
        }
    }

    /// Checks the document of an unwrap by `host` for `recipient`.
    async fn check(
        &self,
        svc: &Service,
        host: &PrincipalId,
        recipient: &[u8; 32],
        document: Option<&nitrile_kms_api::wire::AttestationHex>,
        now: OffsetDateTime,
    ) -> Result<Attested, String> {
        if host.kind != PrincipalKind::Host {
            return Err("only a host's attestation releases a key".into());
        }
        let doc = document.ok_or(
            "no attestation document: this key service releases volume keys only to hosts that prove what they run",
        )?;
        let opened = nitrile_attest::cose::open(
            &doc.bytes(),
            nitrile_attest::cose::verify_with_root(&self.ca),
        )
        .map_err(|e| format!("the attestation document: {e}"))?;
        if opened.module_id != host.name.as_str() {
            return Err(format!(
                "the document is for {}, not the caller",
                opened.module_id
            ));
        }
        if opened.public_key.as_deref() != Some(hex::encode(recipient).as_str()) {
            return Err("the document does not bind this recipient key".into());
        }
        let now_ms = (now.unix_timestamp_nanos() / 1_000_000).max(0) as u128;
        let at = u128::from(opened.timestamp);
        if at > now_ms + 60_000 || now_ms.saturating_sub(at) > self.max_age.as_millis() {
            return Err("the document is not recent".into());
        }
        match &self.references {
            References::File(reference) => {
                for (i, want) in reference {
                    if opened.pcrs.0.get(i) != Some(want) {
                        return Err(format!(
                            "PCR {i} is not the reference value: the host does not run the released software"
                        ));
                    }
                }
                Ok(Attested {
                    reference: "the reference file".to_owned(),
                })
            }
            References::Release(signed) => {
                let version = signed.check(svc, &host.name, &opened.pcrs.0, now).await?;
                Ok(Attested {
                    reference: format!("release {version}"),
                })
            }
        }
    }
}

/// What the core did.
enum Done {
    Generated(crate::GeneratedVolumeKey),
    Released(crate::SealedKey),
    Destroyed(crate::VolumeMetadata),
}

/// Serves one relayed call: checks, request record, the core, outcome
/// record, answer.
pub(crate) async fn handle(
    svc: &Arc<Service>,
    peer: PeerIdentity,
    token: Option<String>,
    req: KmsRequest,
) -> Response<Bytes> {
    let operation = req.operation();
    let resource = req.resource(&svc.cell);
    let now = svc.clock.now();
    let request_id = RequestId::random(&mut rand_core::OsRng);
    let base = |r: AuditRecord| {
        let r = r
            .with_principal(peer.principal.clone())
            .with_cert_sha256(CertSha256::from_bytes(peer.cert_sha256))
            .with_operations([operation])
            .with_resources([resource.clone()]);
        match (
            peer.principal.kind,
            Audience::new(peer.principal.name.as_str()),
        ) {
            (PrincipalKind::Host, Ok(a)) => r.with_audience(a),
            _ => r,
        }
    };
    let granted = match decide(svc, &peer, token.as_deref(), &req, &resource, now) {
        Ok(g) => g,
        Err(refusal) => {
            let f = &refusal.failure;
            let mut record = base(AuditRecord::refusal(
                now,
                svc.source.clone(),
                request_id,
                f.step,
                &format!("{}: {}", f.code, f.reason),
            ));
            if let Some(t) = refusal.token_id {
                record = record.with_token_id(t);
            }
            if let Some(s) = refusal.subject {
                record = record.with_detail(serde_json::json!({ "subject": s.uri() }));
            }
            let seq = svc.refusal_seq(svc.append(&record).await, f.code);
            svc.metrics.refused.inc();
            return refusal_response(f.status, f.step, &f.reason, seq);
        }
    };
    // A volume key goes only to a host that proves what it runs.
    let attested = match (&req, &svc.attestation) {
        (KmsRequest::Unwrap { body, .. }, Some(policy)) => Some(
            policy
                .check(
                    svc,
                    &peer.principal,
                    &body.recipient.0,
                    body.attestation.as_ref(),
                    now,
                )
                .await,
        ),
        _ => None,
    };
    if let Some(Err(reason)) = &attested {
        let record = base(AuditRecord::refusal(
            now,
            svc.source.clone(),
            request_id,
            RefusalStep::State,
            &format!("attestation: {reason}"),
        ))
        .with_token_id(granted.grant.token_id().to_string());
        let seq = svc.refusal_seq(svc.append(&record).await, "attestation");
        svc.metrics.refused.inc();
        return refusal_response(403, RefusalStep::State, reason, seq);
    }
    let grant = &granted.grant;
    let params = match &req {
        KmsRequest::Generate { body, .. } => {
            serde_json::json!({ "kms_key": KeyName::from(body.kms_key.clone()).to_string() })
        }
        KmsRequest::Unwrap { body, .. } => match &attested {
            Some(Ok(a)) => serde_json::json!({
                "recipient": hex::encode(body.recipient.0),
                "attested": a.reference,
            }),
            _ => serde_json::json!({ "recipient": hex::encode(body.recipient.0) }),
        },
        _ => serde_json::json!({}),
    };
    let relayed = serde_json::json!({
        RELAYED: {
            "subject": grant.subject().uri(),
            "token_expires_at": nitrile_audit::format_time(grant.expires_at()),
            "use": granted.use_id.to_string(),
        },
        "params": params,
    });
    // Generate and destroy change the store: their request record is
    // durable before they run. An unwrap changes nothing and its only
    // effect is the answer: its one record, made durable before the
    // answer, is what it did.
    let write_ahead = !matches!(req, KmsRequest::Unwrap { .. });
    if write_ahead {
        let request = base(AuditRecord::request(now, svc.source.clone(), request_id))
            .with_token_id(grant.token_id().to_string())
            .with_group(grant.group().as_str())
            .with_detail(relayed.clone());
        if let Err(e) = svc.append(&request).await {
            tracing::error!(error = %e, "journal write failed; request not executed");
            svc.metrics.journal_failures.inc();
            svc.metrics.refused.inc();
            return refusal_response(
                503,
                RefusalStep::Journal,
                "the key service's journal cannot record this request, so nothing ran; \
                 retry later",
                None,
            );
        }
    }
    let done = execute(svc, req.clone(), now).await;
    let outcome = |o: Outcome, mut detail: serde_json::Value| {
        let record = base(AuditRecord::outcome(
            svc.clock.now(),
            svc.source.clone(),
            request_id,
            o,
        ))
        .with_token_id(grant.token_id().to_string());
        if write_ahead {
            return record.with_detail(detail);
        }
        if let (Some(d), serde_json::Value::Object(r)) = (detail.as_object_mut(), relayed.clone()) {
            d.extend(r);
        }
        record
            .with_group(grant.group().as_str())
            .with_detail(detail)
    };
    match done {
        Err(f) => {
            let record = outcome(Outcome::Failed, f.detail());
            let seq = svc.refusal_seq(svc.append(&record).await, f.code);
            svc.metrics.refused.inc();
            refusal_response(f.status, f.step, &f.reason, seq)
        }
        Ok(done) => {
            let detail = match &done {
                Done::Generated(g) => {
                    serde_json::json!({ "kms_key": g.volume.key.to_string() })
                }
                Done::Released(_) => serde_json::json!({ "released": "sealed to the recipient" }),
                Done::Destroyed(m) => {
                    serde_json::json!({ "kms_key": m.key.to_string(), "erased": true })
                }
            };
            let journaled = svc.append(&outcome(Outcome::Executed, detail)).await;
            if let Err(e) = journaled {
                return withheld(svc, &req, done, &e).await;
            }
            answer(svc, &req, done)
        }
    }
}

/// Runs the core's operation: generate and destroy write and sync files
/// (on a blocking thread); unwrap reads memory only.
async fn execute(
    svc: &Arc<Service>,
    req: KmsRequest,
    now: OffsetDateTime,
) -> Result<Done, Failure> {
    let kms = Arc::clone(&svc.kms);
    let blocking = |f: Box<dyn FnOnce() -> Result<Done, Failure> + Send>| async move {
        tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "key service task failed");
            Err(Failure {
                status: 500,
                step: RefusalStep::Internal,
                code: "internal",
                reason: "internal failure".into(),
            })
        })
    };
    match req {
        KmsRequest::Generate { volume, body } => {
            let key = KeyName::from(body.kms_key);
            blocking(Box::new(move || {
                kms.generate_volume_key(&volume, &key, now)
                    .map(Done::Generated)
                    .map_err(Failure::from)
            }))
            .await
        }
        KmsRequest::Unwrap { volume, body } => {
            let recipient = RecipientPublicKey::from_bytes(&body.recipient.0)
                .unwrap_or_else(|_| unreachable!("a recipient key of the wire is 32 bytes"));
            kms.unwrap_sealed(&volume, body.wrapped_key.as_bytes(), &recipient, now)
                .map(Done::Released)
                .map_err(Failure::from)
        }
        KmsRequest::Destroy { volume } => {
            blocking(Box::new(move || {
                kms.destroy_volume(&volume)
                    .map(Done::Destroyed)
                    .map_err(Failure::from)
            }))
            .await
        }
        _ => unreachable!("only the host's routes are relayed"),
    }
}

/// The answer to a call whose outcome is journaled.
fn answer(svc: &Service, req: &KmsRequest, done: Done) -> Response<Bytes> {
    match done {
        Done::Generated(g) => {
            svc.metrics.generated.inc();
            let kms_key = match req {
                KmsRequest::Generate { body, .. } => body.kms_key.clone(),
                _ => g.volume.key.name().clone(),
            };
            let wrapped_key = WrappedKeyBytes::new(g.wrapped.encode())
                .unwrap_or_else(|| unreachable!("a wrapped key fits its bound"));
            json_response(
                StatusCode::OK,
                &GenerateResponse {
                    wrapped_key,
                    kms_key,
                },
            )
        }
        Done::Released(sealed) => {
            svc.metrics.released.inc();
            let sealed_key = SealedKeyBytes::new(&sealed.encode())
                .unwrap_or_else(|| unreachable!("a sealed key has its one length"));
            json_response(StatusCode::OK, &UnwrapResponse { sealed_key })
        }
        Done::Destroyed(_) => {
            svc.metrics.destroyed.inc();
            json_response(StatusCode::OK, &DestroyResponse { destroyed: true })
        }
    }
}

/// The answer when the outcome could not be journaled: nothing that needs
/// the record leaves. A released key is dropped; a generated record is
/// destroyed again (nobody has its wrapped key); a destroy cannot be
/// undone, and says so.
async fn withheld(
    svc: &Arc<Service>,
    req: &KmsRequest,
    done: Done,
    e: &super::AppendError,
) -> Response<Bytes> {
    tracing::error!(error = %e, "journal write failed; answer withheld");
    svc.metrics.journal_failures.inc();
    svc.metrics.refused.inc();
    let reason = match (done, req) {
        (Done::Generated(_), KmsRequest::Generate { volume, .. }) => {
            let kms = Arc::clone(&svc.kms);
            let volume = volume.clone();
            let undone = tokio::task::spawn_blocking(move || kms.destroy_volume(&volume)).await;
            if !matches!(undone, Ok(Ok(_))) {
                tracing::error!("could not undo a volume key whose record was not journaled");
            }
            "the key service's journal cannot record this volume key, so it was not kept; \
             retry later"
        }
        (Done::Released(_), _) => {
            "the key service's journal cannot record this release, so no key was released; \
             retry later"
        }
        _ => {
            "the volume's key record was destroyed, but the key service's journal cannot \
             record the outcome"
        }
    };
    refusal_response(503, RefusalStep::Journal, reason, None)
}
