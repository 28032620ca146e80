//! Key management: any principal's own token for audience `kms`, admitted
//! by the gate, then who may see or change the key.
//!
//! A customer's key (its owner a `customer` principal) is seen and managed
//! by its owner; provider principals (operators, services) may see its
//! metadata (on-call describes keys) but never change it. A key of the
//! provider (the cell's default key, owned by the key service) is seen and
//! managed by provider principals only. Which of these a principal may ask
//! for at all is the token service's entitlement decision; this is the key
//! service's own check of ownership, which no entitlement overrides.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use nitrile_api::wire::RefusalStep;
use nitrile_api::{PrincipalId, PrincipalKind};
use nitrile_audit::Outcome;
use nitrile_gate::{Admitted, refusal_response};
use nitrile_kms_api::KmsRequest;
use nitrile_kms_api::wire::KeyList;
use nitrile_net::{PeerIdentity, json_response};

use super::{Failure, Service, describe};
use crate::key::{KeyMetadata, KeyName};
use crate::kms::KeyTransition;

/// Whether `subject` may see the metadata of a key owned by `owner`.
fn may_see(subject: &PrincipalId, owner: &PrincipalId) -> bool {
    subject == owner || subject.kind != PrincipalKind::Customer
}

/// Whether `subject` may change a key owned by `owner`.
fn may_manage(subject: &PrincipalId, owner: &PrincipalId) -> bool {
    subject == owner
        || (owner.kind != PrincipalKind::Customer && subject.kind != PrincipalKind::Customer)
}

fn not_owner(key: &KeyName, subject: &PrincipalId, owner: &PrincipalId, what: &str) -> Failure {
    let reason = if owner.kind == PrincipalKind::Customer {
        format!("{key} is a customer's key: only its owner may {what} it, not {subject}")
    } else {
        format!("{key} is not {subject}'s: a customer may {what} only its own keys")
    };
    Failure {
        status: 403,
        step: RefusalStep::Entitlement,
        code: "not_key_owner",
        reason,
    }
}

/// Serves one key management request.
pub(crate) async fn handle(
    svc: &Arc<Service>,
    peer: PeerIdentity,
    token: Option<String>,
    req: KmsRequest,
) -> Response<Bytes> {
    let operation = req.operation();
    let resource = req.resource(&svc.cell);
    let params = match &req {
        KmsRequest::ScheduleKeyDeletion(_, b) => Some(serde_json::json!({ "days": b.days })),
        _ => None,
    };
    let admitted = match svc
        .admission
        .admit_async_with(&peer, token.as_deref(), operation, &resource, params)
        .await
    {
        Ok(a) => a,
        Err(r) => {
            svc.metrics.refused.inc();
            if r.audit_seq.is_none() {
                svc.metrics.refusal_journal_failures.inc();
            }
            return r.response();
        }
    };
    let subject = admitted.grant().subject().clone();
    let svc2 = Arc::clone(svc);
    let result = tokio::task::spawn_blocking(move || run(&svc2, &subject, req))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "key service task failed");
            Err(Failure {
                status: 500,
                step: RefusalStep::Internal,
                code: "internal",
                reason: "internal failure".into(),
            })
        });
    finish(svc, admitted, result).await
}

/// What a request did, for its outcome record and its answer.
enum Done {
    Key(KeyMetadata),
    Changed(KeyTransition),
    List(Vec<KeyMetadata>),
}

/// The core's side of a request (it may write and sync the store).
fn run(svc: &Service, subject: &PrincipalId, req: KmsRequest) -> Result<Done, Failure> {
    let now = svc.clock.now();
    let kms = &svc.kms;
    let owned = |key: &KeyName, what: &str| -> Result<(), Failure> {
        let meta = kms.describe_key(key)?;
        if may_manage(subject, &meta.owner) {
            Ok(())
        } else {
            Err(not_owner(key, subject, &meta.owner, what))
        }
    };
    Ok(match req {
        KmsRequest::CreateKey(c) => {
            Done::Key(kms.create_key(&KeyName::from(c.name), subject, now)?)
        }
        KmsRequest::ListKeys => Done::List(
            kms.list_keys()
                .into_iter()
                .filter(|k| may_see(subject, &k.owner))
                .collect(),
        ),
        KmsRequest::DescribeKey(k) => {
            let key = KeyName::from(k);
            let meta = kms.describe_key(&key)?;
            if !may_see(subject, &meta.owner) {
                return Err(not_owner(&key, subject, &meta.owner, "see"));
            }
            Done::Key(meta)
        }
        KmsRequest::DisableKey(k) => {
            let key = KeyName::from(k);
            owned(&key, "disable")?;
            Done::Changed(kms.disable_key(&key, now)?)
        }
        KmsRequest::EnableKey(k) => {
            let key = KeyName::from(k);
            owned(&key, "enable")?;
            Done::Changed(kms.enable_key(&key, now)?)
        }
        KmsRequest::ScheduleKeyDeletion(k, body) => {
            let key = KeyName::from(k);
            owned(&key, "schedule the deletion of")?;
            Done::Changed(kms.schedule_key_deletion(&key, body.days, now)?)
        }
        KmsRequest::CancelKeyDeletion(k) => {
            let key = KeyName::from(k);
            owned(&key, "cancel the deletion of")?;
            Done::Changed(kms.cancel_key_deletion(&key, now)?)
        }
        _ => unreachable!("only key management requests are managed"),
    })
}

/// Journals the outcome (durable before the answer) and answers.
async fn finish(
    svc: &Service,
    admitted: Admitted,
    result: Result<Done, Failure>,
) -> Response<Bytes> {
    match result {
        Err(f) => {
            let seq = match svc
                .admission
                .complete_async(admitted, Outcome::Failed, Some(f.detail()))
                .await
            {
                Ok(r) => Some(r.seq),
                Err(e) => {
                    tracing::error!(error = %e, "could not journal an outcome");
                    svc.metrics.refusal_journal_failures.inc();
                    None
                }
            };
            svc.metrics.refused.inc();
            refusal_response(f.status, f.step, &f.reason, seq)
        }
        Ok(done) => {
            let detail = match &done {
                Done::Key(k) => serde_json::json!({
                    "owner": k.owner.uri(),
                    "state": k.state.as_str(),
                }),
                Done::Changed(t) => serde_json::json!({
                    "owner": t.key.owner.uri(),
                    "state": t.key.state.as_str(),
                    "previous": t.previous.as_str(),
                }),
                Done::List(keys) => serde_json::json!({ "keys": keys.len() }),
            };
            if let Err(e) = svc
                .admission
                .complete_async(admitted, Outcome::Executed, Some(detail))
                .await
            {
                // The request record is durable (it was written before the
                // change); what is withheld is the answer.
                tracing::error!(error = %e, "could not journal an outcome; answer withheld");
                svc.metrics.journal_failures.inc();
                svc.metrics.refused.inc();
                return refusal_response(
                    503,
                    RefusalStep::Journal,
                    "the key service's journal cannot record the outcome of this request; \
                     describe the key to see its state",
                    None,
                );
            }
            svc.metrics.managed.inc();
            match done {
                Done::Key(k) => json_response(StatusCode::OK, &describe(&k)),
                Done::Changed(t) => json_response(StatusCode::OK, &describe(&t.key)),
                Done::List(keys) => json_response(
                    StatusCode::OK,
                    &KeyList {
                        keys: keys.iter().map(describe).collect(),
                    },
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PrincipalId {
        PrincipalId::parse(s).unwrap()
    }

    #[test]
    fn customers_keep_their_keys_and_providers_keep_theirs() {
        let acme = p("nitrile://c/customer/acme");
        let evil = p("nitrile://c/customer/evil");
        let alice = p("nitrile://c/operator/alice");
        let placement = p("nitrile://c/service/placement");
        let kms = p("nitrile://c/service/kms");
        // A customer's key.
        assert!(may_manage(&acme, &acme) && may_see(&acme, &acme));
        assert!(!may_manage(&evil, &acme) && !may_see(&evil, &acme));
        assert!(!may_manage(&alice, &acme) && may_see(&alice, &acme));
        assert!(!may_manage(&placement, &acme));
        // The provider's key.
        assert!(may_manage(&alice, &kms) && may_see(&alice, &kms));
        assert!(!may_manage(&acme, &kms) && !may_see(&acme, &kms));
    }
}
