//! Claim 3 at the key service, over real mTLS on loopback: a host relays
//! its caller's token to have a volume's data key made, released sealed to
//! a VMM's key, or destroyed; every way that can be wrong is refused, and
//! each call, refused or not, is in the key service's journal before the
//! answer.

mod svc;

use nitrile_api::wire::RefusalStep;
use nitrile_api::{Operation, PrincipalKind};
use nitrile_audit::{AuditRecord, Outcome, RecordKind};
use nitrile_kms::{Recipient, SealedKey};
use nitrile_kms_api::wire::{RecipientKey, WrappedKeyBytes};
use svc::{Cell, Running, n, p, refusal};
use time::Duration;

const CREATE: Operation = Operation::VolumeCreate;
const ATTACH: Operation = Operation::VolumeAttach;
const DELETE: Operation = Operation::VolumeDelete;

/// Has host h1 make volume `v`'s key under `key` for `who`.
async fn create(cell: &Cell, running: &Running, who: &str, v: &str, key: &str) -> WrappedKeyBytes {
    let token = cell.token(who, "h1", &[CREATE], &[&format!("volume/{v}")]);
    let mut h1 = cell.client(running, "host/h1").await;
    let made = h1.generate(&n(v), &n(key), &token).await.unwrap();
    assert_eq!(made.kms_key, n(key));
    made.wrapped_key
}

fn recipient() -> (Recipient, RecipientKey) {
    let r = Recipient::generate().unwrap();
    let pk = RecipientKey(*r.public_key().as_bytes());
    (r, pk)
}

/// The journal's last record answers the refusal: its sequence number is
/// the refusal's, it names the step and code, and no key was released by
/// the request it belongs to.
fn assert_journaled(cell: &Cell, seq: Option<u64>, step: RefusalStep, code: &str) -> AuditRecord {
    let records = cell.journal();
    let seq = seq.expect("the refusal names its journal record") as usize;
    assert_eq!(seq, records.len(), "the refusal's record is the last one");
    let last = records[seq - 1].clone();
    match last.kind {
        RecordKind::Refusal => {
            assert_eq!(last.step, Some(step));
            assert!(
                last.reason.as_deref().unwrap().starts_with(code),
                "{:?}",
                last.reason
            );
        }
        RecordKind::Outcome => {
            assert_eq!(last.outcome, Some(Outcome::Failed));
            let d = last.detail.as_ref().unwrap();
            assert_eq!(d["step"], step.as_str());
            assert_eq!(d["code"], code);
            // Its request was journaled before it ran, or (an unwrap,
            // which changes nothing) its one record says what was relayed.
            assert!(
                records
                    .iter()
                    .any(|r| r.kind == RecordKind::Request && r.request_id == last.request_id)
                    || d.get("relayed").is_some()
            );
        }
        RecordKind::Request => panic!("a request record cannot answer a refusal"),
    }
    let released = records
        .iter()
        .any(|r| r.request_id == last.request_id && r.outcome == Some(Outcome::Executed));
    assert!(!released, "the refused request ran");
    last
}

#[tokio::test]
async fn claim3_a_volume_key_is_made_wrapped_and_released_only_sealed_to_the_vmm() {
    let cell = Cell::new();
    let running = cell.start().await;
    let wrapped = create(&cell, &running, "service/placement", "v1", "default").await;
    let (vmm, pk) = recipient();
    let token = cell.token("service/placement", "h1", &[ATTACH], &["volume/v1"]);
    let mut h1 = cell.client(&running, "host/h1").await;
    let sealed = h1.unwrap(&n("v1"), &wrapped, &pk, &token).await.unwrap();

    // Only the VMM's key opens it, as volume v1's key; it is the data key.
    let sealed = SealedKey::decode(sealed.as_bytes()).unwrap();
    let dek = vmm.open(&sealed, &n("v1")).unwrap();
    let exported = running
        .kms
        .export_volume_key_for_tests(&n("v1"), wrapped.as_bytes())
        .unwrap();
    assert_eq!(*dek, *exported);
    let (other, _) = recipient();
    assert!(other.open(&sealed, &n("v1")).is_err());
    assert!(vmm.open(&sealed, &n("v2")).is_err());

    // Journaled, by host h1 on behalf of placement, with the token's id:
    // the generate's request before it ran and its outcome; the unwrap's
    // one record, before the answer; never the key.
    let records = cell.journal();
    let request = records
        .iter()
        .find(|r| r.kind == RecordKind::Request && r.operations == [CREATE])
        .expect("no request record of the generate");
    let outcome = records
        .iter()
        .position(|r| r.kind == RecordKind::Outcome && r.request_id == request.request_id)
        .unwrap();
    let at = records.iter().position(|r| r == request).unwrap();
    assert!(at < outcome, "the request is journaled before its outcome");
    let released = records
        .iter()
        .find(|r| r.operations == [ATTACH])
        .expect("no record of the unwrap");
    assert_eq!(released.kind, RecordKind::Outcome);
    assert_eq!(released.outcome, Some(Outcome::Executed));
    for r in [request, &records[outcome], released] {
        assert_eq!(r.principal, Some(p("host/h1")));
        assert_eq!(r.audience.as_ref().unwrap().as_str(), "h1");
        assert_eq!(r.resources[0].to_string(), "volume/v1");
        assert!(r.token_id.is_some());
    }
    for r in [request, released] {
        let relayed = &r.detail.as_ref().unwrap()["relayed"];
        assert_eq!(relayed["subject"], p("service/placement").uri());
        assert!(relayed["use"].is_string());
    }
    assert_eq!(
        released.detail.as_ref().unwrap()["params"]["recipient"],
        hex::encode(pk.0)
    );
    let journal = std::fs::read(cell.journal_path()).unwrap();
    for needle in [
        dek.to_vec(),
        hex::encode(*dek).into_bytes(),
        base64_of(&dek[..]).into_bytes(),
    ] {
        assert!(
            !journal
                .windows(needle.len())
                .any(|w| w == needle.as_slice()),
            "the data key is in the journal"
        );
    }
    running.stop().await;
}

fn base64_of(b: &[u8]) -> String {
    use std::fmt::Write as _;
    // Standard base64 without a dependency: the alphabet and padding.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                let _ = write!(out, "{}", A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn claim3_unwrap_refused_and_journaled_for_every_wrong_token_and_caller() {
    let cell = Cell::new();
    let running = cell.start().await;
    let wrapped = create(&cell, &running, "service/placement", "v1", "default").await;
    let _ = create(&cell, &running, "service/placement", "v2", "default").await;
    let (_vmm, pk) = recipient();
    let mut h1 = cell.client(&running, "host/h1").await;
    let attach = |res: &str| cell.token("service/placement", "h1", &[ATTACH], &[res]);

    // Without a token.
    let (status, r) = refusal(h1.unwrap(&n("v1"), &wrapped, &pk, "").await);
    assert_eq!((status, r.step), (401, RefusalStep::Token));
    assert_journaled(&cell, r.audit_seq, RefusalStep::Token, "missing");

    // With a token for another volume.
    let (status, r) = refusal(
        h1.unwrap(&n("v1"), &wrapped, &pk, &attach("volume/v2"))
            .await,
    );
    assert_eq!((status, r.step), (403, RefusalStep::Token));
    assert_journaled(
        &cell,
        r.audit_seq,
        RefusalStep::Token,
        "resource_not_granted",
    );

    // With a token for another host (h2's token, relayed by h1).
    let for_h2 = cell.token("service/placement", "h2", &[ATTACH], &["volume/v1"]);
    let (status, r) = refusal(h1.unwrap(&n("v1"), &wrapped, &pk, &for_h2).await);
    assert_eq!((status, r.step), (403, RefusalStep::Token));
    let rec = assert_journaled(&cell, r.audit_seq, RefusalStep::Token, "wrong_audience");
    assert_eq!(rec.principal, Some(p("host/h1")));
    // h2 itself may relay it.
    let mut h2 = cell.client(&running, "host/h2").await;
    h2.unwrap(&n("v1"), &wrapped, &pk, &for_h2).await.unwrap();

    // Replayed.
    let once = attach("volume/v1");
    h1.unwrap(&n("v1"), &wrapped, &pk, &once).await.unwrap();
    let (status, r) = refusal(h1.unwrap(&n("v1"), &wrapped, &pk, &once).await);
    assert_eq!((status, r.step), (401, RefusalStep::Token));
    assert!(r.reason.contains("already relayed once"), "{}", r.reason);
    assert_journaled(&cell, r.audit_seq, RefusalStep::Token, "replayed");
    // Replayed through another host too.
    let (_, r) = refusal(h2.unwrap(&n("v1"), &wrapped, &pk, &once).await);
    assert_journaled(&cell, r.audit_seq, RefusalStep::Token, "wrong_audience");

    // Expired.
    let old = attach("volume/v1");
    cell.clock
        .advance(Duration::minutes(5) + Duration::seconds(1));
    let (status, r) = refusal(h1.unwrap(&n("v1"), &wrapped, &pk, &old).await);
    assert_eq!((status, r.step), (401, RefusalStep::Token));
    assert_journaled(&cell, r.audit_seq, RefusalStep::Token, "expired");

    // By an operator certificate instead of the host's: alice relays a
    // perfectly good token for h1.
    let good = attach("volume/v1");
    let mut alice = cell.client(&running, "operator/alice").await;
    let (status, r) = refusal(alice.unwrap(&n("v1"), &wrapped, &pk, &good).await);
    assert_eq!((status, r.step), (403, RefusalStep::Tls));
    let rec = assert_journaled(&cell, r.audit_seq, RefusalStep::Tls, "not_a_host");
    assert_eq!(rec.principal, Some(p("operator/alice")));
    // A service's certificate likewise.
    let mut placement = cell.client(&running, "service/placement").await;
    let (_, r) = refusal(placement.unwrap(&n("v1"), &wrapped, &pk, &good).await);
    assert_journaled(&cell, r.audit_seq, RefusalStep::Tls, "not_a_host");
    // The token was not used up by those: h1 may still relay it.
    h1.unwrap(&n("v1"), &wrapped, &pk, &good).await.unwrap();

    // Another operation's token (volume.create for v1, relayed to unwrap).
    let create_token = cell.token("service/placement", "h1", &[CREATE], &["volume/v1"]);
    let (_, r) = refusal(h1.unwrap(&n("v1"), &wrapped, &pk, &create_token).await);
    assert_journaled(
        &cell,
        r.audit_seq,
        RefusalStep::Token,
        "operation_not_granted",
    );

    // The wrapped key of v1 presented for v2 (with a good token for v2).
    let (status, r) = refusal(
        h1.unwrap(&n("v2"), &wrapped, &pk, &attach("volume/v2"))
            .await,
    );
    assert_eq!((status, r.step), (400, RefusalStep::Request));
    assert_journaled(&cell, r.audit_seq, RefusalStep::Request, "wrong_volume");
    running.stop().await;
}

#[tokio::test]
async fn claim3_a_disabled_customer_key_refuses_every_new_attach_naming_the_key() {
    let cell = Cell::new();
    let running = cell.start().await;
    let mut acme = cell.client(&running, "customer/acme").await;
    let t = cell.token(
        "customer/acme",
        "kms",
        &[Operation::KmsKeyCreate],
        &["kms-key/acme-data"],
    );
    let key = acme.create_key(&n("acme-data"), &t).await.unwrap();
    assert_eq!(key.owner, p("customer/acme"));
    let wrapped = create(&cell, &running, "customer/acme", "av1", "acme-data").await;
    let (vmm, pk) = recipient();
    let mut h1 = cell.client(&running, "host/h1").await;
    let attach = || cell.token("customer/acme", "h1", &[ATTACH], &["volume/av1"]);
    h1.unwrap(&n("av1"), &wrapped, &pk, &attach())
        .await
        .unwrap();

    let t = cell.token(
        "customer/acme",
        "kms",
        &[Operation::KmsKeyDisable],
        &["kms-key/acme-data"],
    );
    let disabled = acme.disable_key(&n("acme-data"), &t).await.unwrap();
    assert_eq!(disabled.state.as_str(), "disabled");
    let (status, r) = refusal(h1.unwrap(&n("av1"), &wrapped, &pk, &attach()).await);
    assert_eq!((status, r.step), (409, RefusalStep::State));
    assert!(r.reason.contains("kms-key/acme-data"), "{}", r.reason);
    assert!(r.reason.contains("disabled"), "{}", r.reason);
    assert_journaled(&cell, r.audit_seq, RefusalStep::State, "key_disabled");
    // New volumes under it are refused too.
    let t = cell.token("customer/acme", "h1", &[CREATE], &["volume/av2"]);
    let (_, r) = refusal(h1.generate(&n("av2"), &n("acme-data"), &t).await);
    assert_journaled(&cell, r.audit_seq, RefusalStep::State, "key_disabled");

    // Enabled again by its owner, the volume attaches again.
    let t = cell.token(
        "customer/acme",
        "kms",
        &[Operation::KmsKeyEnable],
        &["kms-key/acme-data"],
    );
    acme.enable_key(&n("acme-data"), &t).await.unwrap();
    let sealed = h1
        .unwrap(&n("av1"), &wrapped, &pk, &attach())
        .await
        .unwrap();
    vmm.open(&SealedKey::decode(sealed.as_bytes()).unwrap(), &n("av1"))
        .unwrap();
    running.stop().await;
}

#[tokio::test]
async fn claim3_no_provider_principal_makes_releases_or_destroys_keys_under_a_customers_key() {
    let cell = Cell::new();
    let running = cell.start().await;
    let mut acme = cell.client(&running, "customer/acme").await;
    let t = cell.token(
        "customer/acme",
        "kms",
        &[Operation::KmsKeyCreate],
        &["kms-key/acme-data"],
    );
    acme.create_key(&n("acme-data"), &t).await.unwrap();
    let wrapped = create(&cell, &running, "customer/acme", "av1", "acme-data").await;
    let (_vmm, pk) = recipient();
    let mut h1 = cell.client(&running, "host/h1").await;
    for who in ["service/placement", "operator/alice", "customer/evil"] {
        let t = cell.token(who, "h1", &[ATTACH], &["volume/av1"]);
        let (status, r) = refusal(h1.unwrap(&n("av1"), &wrapped, &pk, &t).await);
        assert_eq!((status, r.step), (403, RefusalStep::Entitlement), "{who}");
        assert!(r.reason.contains("customer's key"), "{}", r.reason);
        let rec = assert_journaled(
            &cell,
            r.audit_seq,
            RefusalStep::Entitlement,
            "not_key_owner",
        );
        assert_eq!(rec.detail.unwrap()["subject"], p(who).uri());
        let t = cell.token(who, "h1", &[CREATE], &["volume/x1"]);
        let (_, r) = refusal(h1.generate(&n("x1"), &n("acme-data"), &t).await);
        assert_journaled(
            &cell,
            r.audit_seq,
            RefusalStep::Entitlement,
            "not_key_owner",
        );
        let t = cell.token(who, "h1", &[DELETE], &["volume/av1"]);
        let (_, r) = refusal(h1.destroy(&n("av1"), &t).await);
        assert_journaled(
            &cell,
            r.audit_seq,
            RefusalStep::Entitlement,
            "not_key_owner",
        );
    }
    assert!(running.kms.describe_volume(&n("av1")).is_ok());
    assert!(running.kms.describe_volume(&n("x1")).is_err());
    // A customer may still use the provider's default key for a volume of
    // its own, and the provider's principals theirs.
    create(&cell, &running, "customer/acme", "av2", "default").await;
    running.stop().await;
}

#[tokio::test]
async fn claim3_delete_destroys_the_key_record_before_it_answers() {
    let cell = Cell::new();
    let running = cell.start().await;
    let wrapped = create(&cell, &running, "service/placement", "v1", "default").await;
    let record = cell.config.store_dir().join("volumes/v1.json");
    assert!(record.exists());
    let mut h1 = cell.client(&running, "host/h1").await;
    let t = cell.token("service/placement", "h1", &[DELETE], &["volume/v1"]);
    h1.destroy(&n("v1"), &t).await.unwrap();
    // Gone before the answer: the file, the record, and every unwrap.
    assert!(!record.exists());
    let destroyed = cell
        .journal()
        .into_iter()
        .rfind(|r| r.operations == [DELETE] && r.kind == RecordKind::Outcome)
        .unwrap();
    assert_eq!(destroyed.outcome, Some(Outcome::Executed));
    assert_eq!(destroyed.detail.unwrap()["erased"], true);
    let (_vmm, pk) = recipient();
    let t = cell.token("service/placement", "h1", &[ATTACH], &["volume/v1"]);
    let (status, r) = refusal(h1.unwrap(&n("v1"), &wrapped, &pk, &t).await);
    assert_eq!((status, r.step), (404, RefusalStep::State));
    assert_journaled(&cell, r.audit_seq, RefusalStep::State, "unknown_volume");
    // And not twice.
    let t = cell.token("service/placement", "h1", &[DELETE], &["volume/v1"]);
    let (status, _) = refusal(h1.destroy(&n("v1"), &t).await);
    assert_eq!(status, 404);
    assert!(
        running
            .kms
            .export_volume_key_for_tests(&n("v1"), wrapped.as_bytes())
            .is_err()
    );
    running.stop().await;
}

#[tokio::test]
async fn claim3_each_grant_of_a_token_is_used_once_even_across_a_restart() {
    let cell = Cell::new();
    let running = cell.start().await;
    // One token that creates and attaches (a launch with a new volume):
    // each of its grants once.
    let both = cell.token("service/placement", "h1", &[CREATE, ATTACH], &["volume/v1"]);
    let mut h1 = cell.client(&running, "host/h1").await;
    let wrapped = h1
        .generate(&n("v1"), &n("default"), &both)
        .await
        .unwrap()
        .wrapped_key;
    let (_vmm, pk) = recipient();
    h1.unwrap(&n("v1"), &wrapped, &pk, &both).await.unwrap();
    let (_, r) = refusal(h1.unwrap(&n("v1"), &wrapped, &pk, &both).await);
    assert_journaled(&cell, r.audit_seq, RefusalStep::Token, "replayed");
    let t = cell.token("service/placement", "h1", &[ATTACH], &["volume/v1"]);
    h1.unwrap(&n("v1"), &wrapped, &pk, &t).await.unwrap();
    running.stop().await;

    // The key service restarts on its state: the used grants stay used.
    let running = cell.start().await;
    let mut h1 = cell.client(&running, "host/h1").await;
    for token in [&both, &t] {
        let (_, r) = refusal(h1.unwrap(&n("v1"), &wrapped, &pk, token).await);
        assert_journaled(&cell, r.audit_seq, RefusalStep::Token, "replayed");
    }
    // A fresh one works.
    let t = cell.token("service/placement", "h1", &[ATTACH], &["volume/v1"]);
    h1.unwrap(&n("v1"), &wrapped, &pk, &t).await.unwrap();
    running.stop().await;
}

#[tokio::test]
async fn the_relayed_records_name_the_host_and_the_caller() {
    let cell = Cell::new();
    let running = cell.start().await;
    create(&cell, &running, "service/placement", "v1", "default").await;
    let records = cell.journal();
    let request = records
        .iter()
        .find(|r| r.kind == RecordKind::Request && r.operations == [CREATE])
        .unwrap();
    assert_eq!(
        request.principal.as_ref().unwrap().kind,
        PrincipalKind::Host
    );
    let detail = request.detail.as_ref().unwrap();
    assert_eq!(detail["params"]["kms_key"], "kms-key/default");
    assert!(detail["relayed"]["use"].is_string());
    assert!(detail["relayed"]["token_expires_at"].is_string());
    assert!(request.token_id.is_some());
    running.stop().await;
}

#[tokio::test]
async fn the_placement_service_uses_a_customers_key_only_for_that_customers_volumes() {
    let mut cell = Cell::new();
    cell.config.placement = Some(p("service/placement"));
    let running = cell.start().await;
    let mut acme = cell.client(&running, "customer/acme").await;
    let t = cell.token(
        "customer/acme",
        "kms",
        &[Operation::KmsKeyCreate],
        &["kms-key/acme-data"],
    );
    acme.create_key(&n("acme-data"), &t).await.unwrap();

    // acme's instance's root volume: made, released to a VMM and destroyed
    // under acme's key by the placement service.
    let wrapped = create(
        &cell,
        &running,
        "service/placement",
        "acme--web1-root",
        "acme-data",
    )
    .await;
    let (vmm, pk) = recipient();
    let mut h1 = cell.client(&running, "host/h1").await;
    let t = cell.token(
        "service/placement",
        "h1",
        &[ATTACH],
        &["volume/acme--web1-root"],
    );
    let sealed = h1
        .unwrap(&n("acme--web1-root"), &wrapped, &pk, &t)
        .await
        .unwrap();
    vmm.open(
        &SealedKey::decode(sealed.as_bytes()).unwrap(),
        &n("acme--web1-root"),
    )
    .unwrap();

    // Another customer's volume, a volume of no customer, or another
    // provider principal: refused at the entitlement step, journaled, and
    // nothing made.
    for (who, volume) in [
        ("service/placement", "evil--db1-root"),
        ("service/placement", "v9"),
        ("operator/alice", "acme--web2-root"),
        ("host/h1", "acme--web3-root"),
    ] {
        let t = cell.token(who, "h1", &[CREATE], &[&format!("volume/{volume}")]);
        let (status, r) = refusal(h1.generate(&n(volume), &n("acme-data"), &t).await);
        assert_eq!(
            (status, r.step),
            (403, RefusalStep::Entitlement),
            "{who} {volume}"
        );
        assert_journaled(
            &cell,
            r.audit_seq,
            RefusalStep::Entitlement,
            "not_key_owner",
        );
        assert!(running.kms.describe_volume(&n(volume)).is_err());
    }
    // Nor may placement manage the key itself.
    let mut placement = cell.client(&running, "service/placement").await;
    let t = cell.token(
        "service/placement",
        "kms",
        &[Operation::KmsKeyDisable],
        &["kms-key/acme-data"],
    );
    assert!(placement.disable_key(&n("acme-data"), &t).await.is_err());

    let t = cell.token(
        "service/placement",
        "h1",
        &[DELETE],
        &["volume/acme--web1-root"],
    );
    h1.destroy(&n("acme--web1-root"), &t).await.unwrap();
    assert!(running.kms.describe_volume(&n("acme--web1-root")).is_err());
    running.stop().await;
}
