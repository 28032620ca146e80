//! Key management at the key service, over real mTLS: a customer creates,
//! disables, enables and schedules the deletion of its own keys; no other
//! principal changes them; the cell's default key is the service's own; a
//! key past its deletion window is destroyed with its volumes by the sweep.
//! Every call and every refusal is journaled before the answer.

mod svc;

use nitrile_api::Operation;
use nitrile_api::wire::RefusalStep;
use nitrile_audit::{Outcome, RecordKind};
use nitrile_kms::KeyName;
use nitrile_kms_api::wire::KeyStateName;
use svc::{Cell, n, p, refusal};
use time::Duration;

const CREATE: Operation = Operation::KmsKeyCreate;
const DISABLE: Operation = Operation::KmsKeyDisable;
const ENABLE: Operation = Operation::KmsKeyEnable;
const SCHEDULE: Operation = Operation::KmsKeyScheduleDeletion;
const CANCEL: Operation = Operation::KmsKeyCancelDeletion;
const DESCRIBE: Operation = Operation::KmsKeyDescribe;
const LIST: Operation = Operation::KmsKeyList;

/// The failed outcome that answers a refusal after admission.
fn assert_failed(cell: &Cell, seq: Option<u64>, step: RefusalStep, code: &str) {
    let records = cell.journal();
    let seq = seq.expect("the refusal names its record") as usize;
    assert_eq!(seq, records.len());
    let last = &records[seq - 1];
    assert_eq!(last.kind, RecordKind::Outcome);
    assert_eq!(last.outcome, Some(Outcome::Failed));
    let detail = last.detail.as_ref().unwrap();
    assert_eq!(detail["step"], step.as_str());
    assert_eq!(detail["code"], code);
}

#[tokio::test]
async fn claim3_a_customers_key_refuses_every_other_principal_and_says_so() {
    let cell = Cell::new();
    let running = cell.start().await;
    let key = "kms-key/acme-data";
    let mut acme = cell.client(&running, "customer/acme").await;
    let made = acme
        .create_key(
            &n("acme-data"),
            &cell.token("customer/acme", "kms", &[CREATE], &[key]),
        )
        .await
        .unwrap();
    assert_eq!(made.owner, p("customer/acme"));
    assert_eq!(made.state, KeyStateName::Enabled);

    // Every provider principal, and another customer, is refused every
    // change, even holding a token the entitlements would never grant.
    for who in ["operator/alice", "service/placement", "customer/evil"] {
        let mut c = cell.client(&running, who).await;
        for op in [DISABLE, ENABLE, SCHEDULE, CANCEL] {
            let t = cell.token(who, "kms", &[op], &[key]);
            let result = match op {
                DISABLE => c.disable_key(&n("acme-data"), &t).await,
                ENABLE => c.enable_key(&n("acme-data"), &t).await,
                SCHEDULE => c.schedule_key_deletion(&n("acme-data"), Some(7), &t).await,
                _ => c.cancel_key_deletion(&n("acme-data"), &t).await,
            };
            let (status, r) = refusal(result);
            assert_eq!(
                (status, r.step),
                (403, RefusalStep::Entitlement),
                "{who} {op}"
            );
            assert!(r.reason.contains("kms-key/acme-data"), "{}", r.reason);
            assert_failed(
                &cell,
                r.audit_seq,
                RefusalStep::Entitlement,
                "not_key_owner",
            );
        }
    }
    let meta = running
        .kms
        .describe_key(&KeyName::new("acme-data").unwrap())
        .unwrap();
    assert_eq!(meta.state.as_str(), "enabled");

    // On-call may see its metadata; another customer may not.
    let mut alice = cell.client(&running, "operator/alice").await;
    let seen = alice
        .describe_key(
            &n("acme-data"),
            &cell.token("operator/alice", "kms", &[DESCRIBE], &[key]),
        )
        .await
        .unwrap();
    assert_eq!(seen.owner, p("customer/acme"));
    let mut evil = cell.client(&running, "customer/evil").await;
    let (_, r) = refusal(
        evil.describe_key(
            &n("acme-data"),
            &cell.token("customer/evil", "kms", &[DESCRIBE], &[key]),
        )
        .await,
    );
    assert!(
        !r.reason.contains("customer/acme"),
        "another customer's identity leaked: {}",
        r.reason
    );
    assert_failed(
        &cell,
        r.audit_seq,
        RefusalStep::Entitlement,
        "not_key_owner",
    );

    // A customer lists its own keys only; the provider lists all.
    let list = |who: &str| cell.token(who, "kms", &[LIST], &["kms/c1"]);
    let mine = acme.list_keys(&list("customer/acme")).await.unwrap();
    assert_eq!(mine.keys.len(), 1);
    assert_eq!(mine.keys[0].name, n("acme-data"));
    let theirs = evil.list_keys(&list("customer/evil")).await.unwrap();
    assert!(theirs.keys.is_empty());
    let all = alice.list_keys(&list("operator/alice")).await.unwrap();
    let names: Vec<&str> = all.keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["acme-data", "default"]);

    // A customer cannot touch the provider's default key either.
    let t = cell.token("customer/acme", "kms", &[DISABLE], &["kms-key/default"]);
    let (_, r) = refusal(acme.disable_key(&n("default"), &t).await);
    assert_failed(
        &cell,
        r.audit_seq,
        RefusalStep::Entitlement,
        "not_key_owner",
    );

    // Its owner can do all of it.
    let t = |op| cell.token("customer/acme", "kms", &[op], &[key]);
    assert_eq!(
        acme.disable_key(&n("acme-data"), &t(DISABLE))
            .await
            .unwrap()
            .state,
        KeyStateName::Disabled
    );
    assert_eq!(
        acme.enable_key(&n("acme-data"), &t(ENABLE))
            .await
            .unwrap()
            .state,
        KeyStateName::Enabled
    );
    let scheduled = acme
        .schedule_key_deletion(&n("acme-data"), Some(7), &t(SCHEDULE))
        .await
        .unwrap();
    assert_eq!(scheduled.state, KeyStateName::PendingDeletion);
    assert!(scheduled.delete_at.is_some());
    assert_eq!(
        acme.cancel_key_deletion(&n("acme-data"), &t(CANCEL))
            .await
            .unwrap()
            .state,
        KeyStateName::Disabled
    );
    running.stop().await;
}

#[tokio::test]
async fn claim5_key_management_tokens_are_checked_used_once_and_journaled() {
    let cell = Cell::new();
    let running = cell.start().await;
    let mut acme = cell.client(&running, "customer/acme").await;
    let key = "kms-key/k1";
    // No token, another audience (a host's), another principal's token.
    let (status, r) = refusal(acme.create_key(&n("k1"), "").await);
    assert_eq!((status, r.step), (401, RefusalStep::Token));
    let (_, r) = refusal(
        acme.create_key(
            &n("k1"),
            &cell.token("customer/acme", "h1", &[CREATE], &[key]),
        )
        .await,
    );
    assert!(r.reason.contains("not for this host (kms)"), "{}", r.reason);
    let last = cell.journal().pop().unwrap();
    assert!(last.reason.unwrap().starts_with("wrong_audience"));
    let (_, r) = refusal(
        acme.create_key(
            &n("k1"),
            &cell.token("customer/evil", "kms", &[CREATE], &[key]),
        )
        .await,
    );
    assert_eq!(r.step, RefusalStep::Token);
    let refusals = cell
        .journal()
        .into_iter()
        .filter(|r| r.kind == RecordKind::Refusal && r.step == Some(RefusalStep::Token))
        .count();
    assert_eq!(refusals, 3);
    assert!(
        running
            .kms
            .describe_key(&KeyName::new("k1").unwrap())
            .is_err()
    );

    // A good one, once.
    let t = cell.token("customer/acme", "kms", &[CREATE], &[key]);
    acme.create_key(&n("k1"), &t).await.unwrap();
    let (_, r) = refusal(acme.create_key(&n("k1"), &t).await);
    assert!(r.reason.contains("already used"), "{}", r.reason);
    // The request was journaled before it ran, its outcome before the
    // answer.
    let records = cell.journal();
    let request = records
        .iter()
        .find(|r| {
            r.kind == RecordKind::Request
                && r.operations == [CREATE]
                && r.principal == Some(p("customer/acme"))
        })
        .unwrap();
    let outcome = records
        .iter()
        .find(|r| r.kind == RecordKind::Outcome && r.request_id == request.request_id)
        .unwrap();
    assert_eq!(outcome.outcome, Some(Outcome::Executed));
    assert_eq!(
        outcome.detail.as_ref().unwrap()["owner"],
        p("customer/acme").uri()
    );
    // A name taken is a conflict, journaled.
    let (status, r) = refusal(
        acme.create_key(
            &n("k1"),
            &cell.token("customer/acme", "kms", &[CREATE], &[key]),
        )
        .await,
    );
    assert_eq!(status, 409);
    assert_failed(&cell, r.audit_seq, RefusalStep::State, "key_exists");
    running.stop().await;
}

#[tokio::test]
async fn the_default_key_is_the_services_own_and_made_once() {
    let cell = Cell::new();
    let running = cell.start().await;
    let meta = running.kms.describe_key(&KeyName::default_key()).unwrap();
    assert_eq!(meta.owner, p("service/kms"));
    running.stop().await;
    let running = cell.start().await;
    running.stop().await;
    let made: Vec<_> = cell
        .journal()
        .into_iter()
        .filter(|r| r.operations == [CREATE] && r.kind == RecordKind::Outcome)
        .collect();
    assert_eq!(made.len(), 1, "the default key is made once");
    assert_eq!(made[0].principal, Some(p("service/kms")));
    assert_eq!(made[0].outcome, Some(Outcome::Executed));
    let starts = cell
        .journal()
        .into_iter()
        .filter(|r| r.detail.as_ref().is_some_and(|d| d.get("start").is_some()))
        .count();
    assert_eq!(starts, 2, "every start is journaled");
}

#[tokio::test]
async fn claim3_a_key_past_its_deletion_window_is_destroyed_with_its_volumes_and_journaled() {
    let cell = Cell::new();
    let running = cell.start().await;
    let key = "kms-key/acme-data";
    let mut acme = cell.client(&running, "customer/acme").await;
    acme.create_key(
        &n("acme-data"),
        &cell.token("customer/acme", "kms", &[CREATE], &[key]),
    )
    .await
    .unwrap();
    let mut h1 = cell.client(&running, "host/h1").await;
    for v in ["av1", "av2"] {
        let t = cell.token(
            "customer/acme",
            "h1",
            &[Operation::VolumeCreate],
            &[&format!("volume/{v}")],
        );
        h1.generate(&n(v), &n("acme-data"), &t).await.unwrap();
    }
    acme.schedule_key_deletion(
        &n("acme-data"),
        Some(7),
        &cell.token("customer/acme", "kms", &[SCHEDULE], &[key]),
    )
    .await
    .unwrap();
    // Not before the window ends.
    cell.clock.advance(Duration::days(7) - Duration::minutes(1));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(running.kms.describe_volume(&n("av1")).is_ok());
    // After it: the sweep destroys key and volumes and journals it.
    cell.clock.advance(Duration::minutes(2));
    let swept = cell
        .wait_for_record(|r| r.detail.as_ref().is_some_and(|d| d.get("swept").is_some()))
        .await;
    assert_eq!(swept.outcome, Some(Outcome::Executed));
    assert_eq!(swept.principal, Some(p("service/kms")));
    let resources: Vec<String> = swept.resources.iter().map(|r| r.to_string()).collect();
    assert_eq!(resources, [key, "volume/av1", "volume/av2"]);
    assert_eq!(
        swept.detail.as_ref().unwrap()["swept"]["owner"],
        p("customer/acme").uri()
    );
    assert!(
        running
            .kms
            .describe_key(&KeyName::new("acme-data").unwrap())
            .is_err()
    );
    for v in ["av1", "av2"] {
        assert!(running.kms.describe_volume(&n(v)).is_err());
        assert!(
            !cell
                .config
                .store_dir()
                .join(format!("volumes/{v}.json"))
                .exists()
        );
    }
    assert!(!cell.config.store_dir().join("keys/acme-data.key").exists());
    running.stop().await;
}
