//! Claim 5 end to end: every way a token can be wrong, presented to a running
//! host agent over mTLS after the CLI's path through the token service, is
//! refused at step `token` with its code, and the refusal is in that host's
//! journal with the reason and the caller. Real cell, real certificates,
//! real token service, real journal files.

mod support;

use nitrile_api::admin::AdminRequest;
use nitrile_api::wire::RefusalStep;
use nitrile_api::{Audience, Name, Operation};
use nitrile_audit::{AuditRecord, Outcome, RecordKind};
use nitrile_token::{CertThumbprint, ClaimsInput, Clock, SigningKey, TokenIssuer};
use nitrile_tokend::KeyRing;
use support::{TestCell, journal_records, principal, r, refusal, tokend_principal};
use time::Duration;

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

/// Asserts that `answer` is a refusal at step `token` with `status`, and
/// that exactly one record was added to `host`'s journal since it held
/// `before`: that refusal, with `code` leading its reason, the caller
/// `who`, and the sequence number the answer names.
fn assert_token_refusal(
    cell: &TestCell,
    host: &str,
    before: usize,
    answer: &(u16, bytes::Bytes),
    status: u16,
    code: &str,
    who: &str,
) -> AuditRecord {
    let (got, body) = answer;
    assert_eq!(*got, status, "{}", String::from_utf8_lossy(body));
    let refused = refusal(body);
    assert_eq!(refused.step, RefusalStep::Token, "{refused:?}");
    let records = journal_records(&cell.host_journal(host));
    assert_eq!(
        records.len(),
        before + 1,
        "expected exactly the refusal record: {:?}",
        &records[before..]
    );
    let last = records.last().unwrap().clone();
    assert_eq!(last.kind, RecordKind::Refusal);
    assert_eq!(last.step, Some(RefusalStep::Token));
    let reason = last.reason.as_deref().unwrap();
    assert!(
        reason.starts_with(&format!("{code}: ")),
        "journaled reason {reason:?} is not {code}"
    );
    assert_eq!(last.principal, Some(principal(who)));
    assert_eq!(refused.audit_seq, Some(records.len() as u64));
    assert!(last.token_id.is_none(), "a refused token's id was recorded");
    last
}

fn journal_len(cell: &TestCell, host: &str) -> usize {
    journal_records(&cell.host_journal(host)).len()
}

const ALICE: &str = "operator/alice";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_hostd_valid_token_is_served_and_journaled_before_and_after() {
    let cell = TestCell::with_hosts(&["h1"]).await;
    let req = AdminRequest::HostDescribe;
    let token = cell.token_for(ALICE, "h1", &req).await;
    let (status, body) = cell.call(ALICE, "h1", &req, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let described: nitrile_api::admin::HostDescription = serde_json::from_slice(&body).unwrap();
    assert_eq!(described.host.as_str(), "h1");

    let records = journal_records(&cell.host_journal("h1"));
    let [request, outcome] = &records[..] else {
        panic!("expected a request and an outcome: {records:?}");
    };
    assert_eq!(request.kind, RecordKind::Request);
    assert_eq!(request.principal, Some(principal(ALICE)));
    assert_eq!(request.operations, vec![Operation::HostDescribe]);
    assert_eq!(request.resources, vec![r("host/h1")]);
    assert!(request.token_id.is_some());
    assert_eq!(outcome.kind, RecordKind::Outcome);
    assert_eq!(outcome.outcome, Some(Outcome::Executed));
    assert_eq!(outcome.request_id, request.request_id);
    assert_eq!(outcome.token_id, request.token_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_hostd_expired_and_not_yet_valid_tokens_refused_and_journaled() {
    let mut cell = TestCell::new().await;
    let setup = cell.default_setup();
    let host_clock = setup.clock.clone();
    cell.start_host_with("h1", setup).await;
    let req = AdminRequest::HostDescribe;
    let token = cell.token_for(ALICE, "h1", &req).await;
    let minted_at = cell.clock.now();

    // The host's clock is ten minutes behind the token service's.
    host_clock.set(minted_at - Duration::minutes(10));
    let before = journal_len(&cell, "h1");
    let answer = cell.call(ALICE, "h1", &req, Some(&token)).await;
    assert_token_refusal(&cell, "h1", before, &answer, 401, "not_yet_valid", ALICE);

    // Ten minutes ahead: the five-minute token has expired.
    host_clock.set(minted_at + Duration::minutes(10));
    let before = journal_len(&cell, "h1");
    let answer = cell.call(ALICE, "h1", &req, Some(&token)).await;
    assert_token_refusal(&cell, "h1", before, &answer, 401, "expired", ALICE);

    // In agreement again, the same token is served: the refusals were
    // about time, nothing else.
    host_clock.set(minted_at);
    let (status, _) = cell.call(ALICE, "h1", &req, Some(&token)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_hostd_token_for_host_a_refused_by_host_b_and_journaled_there() {
    let cell = TestCell::with_hosts(&["h1", "h2"]).await;
    let req = AdminRequest::HostDescribe;
    let token = cell.token_for(ALICE, "h1", &req).await;
    let h1_before = journal_len(&cell, "h1");
    let before = journal_len(&cell, "h2");
    let answer = cell.call(ALICE, "h2", &req, Some(&token)).await;
    let record = assert_token_refusal(&cell, "h2", before, &answer, 403, "wrong_audience", ALICE);
    assert_eq!(record.source, support::host_principal("h2"));
    assert_eq!(
        journal_len(&cell, "h1"),
        h1_before,
        "h1 journaled h2's call"
    );
    // The same token at the host it was minted for works.
    let (status, _) = cell.call(ALICE, "h1", &req, Some(&token)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_hostd_operation_outside_the_token_refused_and_journaled() {
    let cell = TestCell::with_hosts(&["h1"]).await;
    let token = cell
        .token_for(ALICE, "h1", &AdminRequest::HostDescribe)
        .await;
    let before = journal_len(&cell, "h1");
    let answer = cell
        .call(ALICE, "h1", &AdminRequest::HostDrain, Some(&token))
        .await;
    let record = assert_token_refusal(
        &cell,
        "h1",
        before,
        &answer,
        403,
        "operation_not_granted",
        ALICE,
    );
    assert_eq!(record.operations, vec![Operation::HostDrain]);
    // Nothing ran: the host still accepts launches.
    let (status, body) = cell
        .call(ALICE, "h1", &AdminRequest::HostDescribe, Some(&token))
        .await;
    assert_eq!(status, 200);
    let described: nitrile_api::admin::HostDescription = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        described.placement,
        nitrile_api::admin::PlacementState::Accepting
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_hostd_resource_outside_the_token_refused_and_journaled() {
    let cell = TestCell::with_hosts(&["h1"]).await;
    let token = cell
        .token_for(ALICE, "h1", &AdminRequest::InstanceDescribe(name("web1")))
        .await;
    let before = journal_len(&cell, "h1");
    let answer = cell
        .call(
            ALICE,
            "h1",
            &AdminRequest::InstanceDescribe(name("web2")),
            Some(&token),
        )
        .await;
    let record = assert_token_refusal(
        &cell,
        "h1",
        before,
        &answer,
        403,
        "resource_not_granted",
        ALICE,
    );
    assert_eq!(record.resources, vec![r("instance/web2")]);
    // The instance the token names gets past the token (and is then not
    // found, after admission).
    let (status, body) = cell
        .call(
            ALICE,
            "h1",
            &AdminRequest::InstanceDescribe(name("web1")),
            Some(&token),
        )
        .await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert_eq!(refusal(&body).step, RefusalStep::State);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_hostd_token_signed_by_an_unknown_key_refused_and_journaled() {
    let cell = TestCell::with_hosts(&["h1"]).await;
    // A key that claims to be the token service's but was never published.
    let forger = TokenIssuer::new(
        tokend_principal(),
        SigningKey::generate(&mut rand_core::OsRng),
    );
    let (token, _) = forger
        .mint(
            ClaimsInput {
                subject: principal(ALICE),
                group: name("oncall"),
                audience: Audience::new("h1").unwrap(),
                operations: vec![Operation::HostDescribe],
                resources: vec![r("host/h1")],
                cert: CertThumbprint::from_sha256(cell.cert_sha256(ALICE)),
                lifetime: None,
            },
            cell.clock.now(),
            &mut rand_core::OsRng,
        )
        .unwrap();
    let before = journal_len(&cell, "h1");
    let answer = cell
        .call(ALICE, "h1", &AdminRequest::HostDescribe, Some(&token))
        .await;
    assert_token_refusal(&cell, "h1", before, &answer, 401, "unknown_key", ALICE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_hostd_token_of_a_rotated_out_key_refused_after_the_host_pins_the_new_keys() {
    let mut cell = TestCell::with_hosts(&["h1"]).await;
    let req = AdminRequest::HostDescribe;
    let old = cell.token_for(ALICE, "h1", &req).await;
    let (status, _) = cell.call(ALICE, "h1", &req, Some(&old)).await;
    assert_eq!(status, 200, "the token works before the rotation");

    // Rotate, then retire the old key; the host is provisioned again and
    // pins the new published set.
    cell.stop_tokend().await;
    let mut ring = KeyRing::init_or_load(
        &cell.layout.tokend_dir(),
        tokend_principal(),
        &mut rand_core::OsRng,
    )
    .unwrap();
    let retired = ring.current().to_owned();
    ring.rotate(&mut rand_core::OsRng).unwrap();
    ring.retire(&retired).unwrap();
    drop(ring);
    cell.start_tokend().await;
    cell.restart_host("h1").await;
    let pinned = std::fs::read_to_string(&cell.host_config("h1").issuer_keys).unwrap();
    assert!(
        !pinned.contains(&retired),
        "the retired key is still pinned"
    );

    let before = journal_len(&cell, "h1");
    let answer = cell.call(ALICE, "h1", &req, Some(&old)).await;
    assert_token_refusal(&cell, "h1", before, &answer, 401, "unknown_key", ALICE);
    // A token from the new key is served.
    let new = cell.token_for(ALICE, "h1", &req).await;
    let (status, _) = cell.call(ALICE, "h1", &req, Some(&new)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_hostd_tampered_token_refused_and_journaled() {
    let cell = TestCell::with_hosts(&["h1"]).await;
    let req = AdminRequest::HostDescribe;
    let token = cell.token_for(ALICE, "h1", &req).await;
    // `v4.public.<payload and signature>[.<footer>]`: change one character
    // in the middle of the signed part.
    let body_start = "v4.public.".len();
    let body_end = token[body_start..]
        .find('.')
        .map_or(token.len(), |i| body_start + i);
    let at = (body_start + body_end) / 2;
    let mut bytes = token.clone().into_bytes();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).unwrap();
    assert_ne!(tampered, token);

    let before = journal_len(&cell, "h1");
    let answer = cell.call(ALICE, "h1", &req, Some(&tampered)).await;
    assert_token_refusal(&cell, "h1", before, &answer, 401, "bad_signature", ALICE);
    // The untouched token still works.
    let (status, _) = cell.call(ALICE, "h1", &req, Some(&token)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_hostd_token_presented_over_another_clients_certificate_refused_and_journaled() {
    let cell = TestCell::with_hosts(&["h1"]).await;
    let req = AdminRequest::HostDrain;
    // alice's token, stolen by bob, who has his own valid certificate.
    let token = cell.token_for(ALICE, "h1", &req).await;
    let before = journal_len(&cell, "h1");
    let answer = cell.call("operator/bob", "h1", &req, Some(&token)).await;
    let record = assert_token_refusal(
        &cell,
        "h1",
        before,
        &answer,
        401,
        "certificate_mismatch",
        "operator/bob",
    );
    assert_eq!(
        record.cert_sha256.map(|c| *c.as_bytes()),
        Some(cell.cert_sha256("operator/bob"))
    );
    // The stolen use did not spend it: alice can still use it once.
    let (status, body) = cell.call(ALICE, "h1", &req, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_hostd_mutation_token_used_twice_refused_also_after_a_restart() {
    let mut cell = TestCell::with_hosts(&["h1"]).await;
    let req = AdminRequest::HostDrain;
    let token = cell.token_for(ALICE, "h1", &req).await;
    let (status, body) = cell.call(ALICE, "h1", &req, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let before = journal_len(&cell, "h1");
    let answer = cell.call(ALICE, "h1", &req, Some(&token)).await;
    assert_token_refusal(&cell, "h1", before, &answer, 401, "replayed", ALICE);

    // Another token, used once, then the host agent restarts: the replay
    // cache is rebuilt from the journal.
    let undrain = AdminRequest::HostUndrain;
    let token = cell.token_for(ALICE, "h1", &undrain).await;
    let (status, _) = cell.call(ALICE, "h1", &undrain, Some(&token)).await;
    assert_eq!(status, 200);
    cell.restart_host("h1").await;
    let before = journal_len(&cell, "h1");
    let answer = cell.call(ALICE, "h1", &undrain, Some(&token)).await;
    assert_token_refusal(&cell, "h1", before, &answer, 401, "replayed", ALICE);
    // Read-only tokens are not single use.
    let describe = AdminRequest::HostDescribe;
    let token = cell.token_for(ALICE, "h1", &describe).await;
    for _ in 0..2 {
        let (status, _) = cell.call(ALICE, "h1", &describe, Some(&token)).await;
        assert_eq!(status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim5_hostd_missing_token_refused_and_journaled() {
    let cell = TestCell::with_hosts(&["h1"]).await;
    for req in [
        AdminRequest::HostDescribe,
        AdminRequest::HostDrain,
        AdminRequest::InstanceStop(name("web1")),
    ] {
        let before = journal_len(&cell, "h1");
        let answer = cell.call(ALICE, "h1", &req, None).await;
        let record = assert_token_refusal(&cell, "h1", before, &answer, 401, "missing", ALICE);
        assert_eq!(record.operations, vec![req.operation()]);
    }
    // A header that is not a bearer token is no token either.
    let before = journal_len(&cell, "h1");
    let mut c = cell.client(ALICE, "h1").await;
    let resp = c
        .send(
            http::Request::builder()
                .method("GET")
                .uri("/v1/host")
                .header(http::header::AUTHORIZATION, "Basic YWxpY2U6c2VjcmV0")
                .body(bytes::Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let answer = (resp.status.as_u16(), resp.body);
    assert_token_refusal(&cell, "h1", before, &answer, 401, "missing", ALICE);
}
