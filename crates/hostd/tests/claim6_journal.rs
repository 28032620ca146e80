//! Claim 6 end to end: admin API access is always logged, failed
//! authentication and authorization included, before the answer. Many mixed
//! calls in a seeded random order (granted; refused at TLS after the
//! handshake, at the token, at authorization and quota in the token
//! service; unknown paths and fields) leave exactly one decision record per
//! call in each service the call reached, in call order, with outcomes
//! right after their requests, and both hash chains verify; a single flipped
//! byte in a copy of a journal fails verification.

mod support;

use bytes::Bytes;
use nitrile_api::Operation;
use nitrile_api::admin::AdminRequest;
use nitrile_api::wire::RefusalStep;
use nitrile_audit::{AuditRecord, Outcome, RecordKind, verify_journal};
use support::{RefusedIdentity, TestCell, journal_records, principal, refusal, token_request};

/// Calls in one run.
const CALLS: usize = 60;
/// The default seed; `NITRILE_TEST_SEED` replays another order.
const SEED: u64 = 0x6e69_7472_696c_6506;

/// SplitMix64: a small, seeded, reproducible order of calls.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// One kind of call an operator (or an attacker) makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// host.describe with its token: served.
    Describe,
    /// host.drain with its token: served (the host's drain is counted once
    /// in the quota window however often it is repeated).
    Drain,
    /// host.undrain with its token: served.
    Undrain,
    /// instance.describe of an instance that does not exist: admitted, then
    /// fails at step `state`.
    DescribeMissingInstance,
    /// A certificate of the cell CA naming a principal of another cell:
    /// refused after the handshake.
    TlsOtherCell,
    /// A certificate of the cell CA naming no principal.
    TlsNoPrincipal,
    /// No token.
    NoToken,
    /// Not a token.
    GarbageToken,
    /// A host.describe token presented for host.drain.
    WrongOperationToken,
    /// alice asks for instance.launch: no entitlement (token service).
    NotEntitled,
    /// alice asks to drain a second host: over the drain quota.
    OverQuota,
    /// A path the API does not have.
    UnknownPath,
    /// A field the operation does not take.
    UnknownField,
}

const ALL: [Call; 13] = [
    Call::Describe,
    Call::Drain,
    Call::Undrain,
    Call::DescribeMissingInstance,
    Call::TlsOtherCell,
    Call::TlsNoPrincipal,
    Call::NoToken,
    Call::GarbageToken,
    Call::WrongOperationToken,
    Call::NotEntitled,
    Call::OverQuota,
    Call::UnknownPath,
    Call::UnknownField,
];

/// The decision record one service must hold for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    call: usize,
    what: Call,
    /// `Request` (then an outcome follows), `Refusal`, or `Outcome` for a
    /// token service grant.
    kind: RecordKind,
    step: Option<RefusalStep>,
    /// The caller, when the service knows one.
    principal: Option<&'static str>,
    /// The outcome record expected right after a request.
    outcome: Option<Outcome>,
    /// The sequence number the answer named, if it named one.
    audit_seq: Option<u64>,
}

impl Expected {
    fn new(call: usize, what: Call, kind: RecordKind) -> Self {
        Self {
            call,
            what,
            kind,
            step: None,
            principal: Some(ALICE),
            outcome: None,
            audit_seq: None,
        }
    }

    fn refused(mut self, step: RefusalStep, seq: Option<u64>) -> Self {
        self.step = Some(step);
        self.audit_seq = seq;
        self
    }

    fn then(mut self, outcome: Outcome) -> Self {
        self.outcome = Some(outcome);
        self
    }

    fn anonymous(mut self) -> Self {
        self.principal = None;
        self
    }
}

const ALICE: &str = "operator/alice";

/// Asserts a refusal answer and returns the sequence number it names.
fn refused(answer: &(u16, Bytes), status: u16, step: RefusalStep) -> Option<u64> {
    let (got, body) = answer;
    assert_eq!(*got, status, "{}", String::from_utf8_lossy(body));
    let r = refusal(body);
    assert_eq!(r.step, step, "{r:?}");
    r.audit_seq
}

/// Makes call number `i` and returns what each journal must now hold for it.
async fn make_call(cell: &TestCell, i: usize, what: Call) -> (Vec<Expected>, Vec<Expected>) {
    let mut tokend = Vec::new();
    let mut host = Vec::new();
    let granted = || Expected::new(i, what, RecordKind::Outcome);
    match what {
        Call::Describe | Call::Drain | Call::Undrain | Call::DescribeMissingInstance => {
            let req = match what {
                Call::Describe => AdminRequest::HostDescribe,
                Call::Drain => AdminRequest::HostDrain,
                Call::Undrain => AdminRequest::HostUndrain,
                _ => AdminRequest::InstanceDescribe(nitrile_api::Name::new("ghost").unwrap()),
            };
            let token = cell.token_for(ALICE, "h1", &req).await;
            tokend.push(granted());
            let answer = cell.call(ALICE, "h1", &req, Some(&token)).await;
            if what == Call::DescribeMissingInstance {
                let seq = refused(&answer, 404, RefusalStep::State);
                // The failure is the outcome record that follows the request.
                assert!(seq.is_some());
                host.push(Expected::new(i, what, RecordKind::Request).then(Outcome::Failed));
            } else {
                assert_eq!(answer.0, 200, "{}", String::from_utf8_lossy(&answer.1));
                host.push(Expected::new(i, what, RecordKind::Request).then(Outcome::Executed));
            }
        }
        Call::TlsOtherCell | Call::TlsNoPrincipal => {
            let kind = if what == Call::TlsOtherCell {
                RefusedIdentity::OtherCell
            } else {
                RefusedIdentity::NoPrincipal
            };
            let mut c = cell
                .connect("h1", cell.tls_refused_identity(kind))
                .await
                .expect("the handshake itself succeeds: the CA signed it");
            let answer = support::call_with(&mut c, &AdminRequest::HostDescribe, None).await;
            let seq = refused(&answer, 401, RefusalStep::Tls);
            host.push(
                Expected::new(i, what, RecordKind::Refusal)
                    .refused(RefusalStep::Tls, seq)
                    .anonymous(),
            );
        }
        Call::NoToken | Call::GarbageToken => {
            let token = (what == Call::GarbageToken).then_some("v4.public.bm90LWEtdG9rZW4");
            let answer = cell
                .call(ALICE, "h1", &AdminRequest::HostDrain, token)
                .await;
            let seq = refused(&answer, 401, RefusalStep::Token);
            host.push(Expected::new(i, what, RecordKind::Refusal).refused(RefusalStep::Token, seq));
        }
        Call::WrongOperationToken => {
            let token = cell
                .token_for(ALICE, "h1", &AdminRequest::HostDescribe)
                .await;
            tokend.push(granted());
            let answer = cell
                .call(ALICE, "h1", &AdminRequest::HostDrain, Some(&token))
                .await;
            let seq = refused(&answer, 403, RefusalStep::Token);
            host.push(Expected::new(i, what, RecordKind::Refusal).refused(RefusalStep::Token, seq));
        }
        Call::NotEntitled | Call::OverQuota => {
            let (req, status, step) = if what == Call::NotEntitled {
                (
                    token_request(Operation::InstanceLaunch, "host/h1", "h1"),
                    403,
                    RefusalStep::Entitlement,
                )
            } else {
                (
                    token_request(Operation::HostDrain, "host/h2", "h2"),
                    429,
                    RefusalStep::Quota,
                )
            };
            let resp = cell.token_request(ALICE, &req).await;
            let seq = refused(&(resp.status.as_u16(), resp.body), status, step);
            // The CLI stops here: the host is never called.
            tokend.push(Expected::new(i, what, RecordKind::Refusal).refused(step, seq));
        }
        Call::UnknownPath | Call::UnknownField => {
            let answer = if what == Call::UnknownPath {
                cell.call_raw(ALICE, "h1", "GET", "/v1/host/shell", b"", None)
                    .await
            } else {
                cell.call_raw(
                    ALICE,
                    "h1",
                    "POST",
                    "/v1/host/drain",
                    br#"{"force":true}"#,
                    None,
                )
                .await
            };
            let status = if what == Call::UnknownPath { 404 } else { 400 };
            let seq = refused(&answer, status, RefusalStep::Request);
            host.push(
                Expected::new(i, what, RecordKind::Refusal).refused(RefusalStep::Request, seq),
            );
        }
    }
    (tokend, host)
}

/// Checks that `records` hold exactly the `expected` decision records, in
/// order, each outcome right after its request.
fn assert_journal_matches(service: &str, records: &[AuditRecord], expected: &[Expected]) {
    // The token service journals the entitlement bundle in force when it
    // starts, before any decision.
    let mut at = records
        .iter()
        .take_while(|r| {
            r.detail
                .as_ref()
                .is_some_and(|d| d.get(nitrile_tokend::bundle::BUNDLE_DETAIL_KEY).is_some())
        })
        .count();
    let mut ids = std::collections::BTreeSet::new();
    for e in expected {
        let rec = records.get(at).unwrap_or_else(|| {
            panic!(
                "{service}: {} records for {} expected decisions; call {} ({:?}) has none",
                records.len(),
                expected.len(),
                e.call,
                e.what
            )
        });
        let seq = at as u64 + 1;
        let ctx = format!("{service} record {seq}, call {} ({:?})", e.call, e.what);
        assert_eq!(rec.kind, e.kind, "{ctx}: {rec:?}");
        assert_eq!(rec.step, e.step, "{ctx}: {rec:?}");
        assert_eq!(
            rec.principal.as_ref().map(|p| p.uri()),
            e.principal.map(|p| principal(p).uri()),
            "{ctx}"
        );
        if e.kind == RecordKind::Outcome {
            assert_eq!(rec.outcome, Some(Outcome::Granted), "{ctx}");
        }
        if let Some(s) = e.audit_seq {
            assert_eq!(s, seq, "{ctx}: the answer names another record");
        }
        assert!(
            ids.insert(*rec.request_id.as_bytes()),
            "{ctx}: request id used twice"
        );
        at += 1;
        if let Some(outcome) = e.outcome {
            let out = records
                .get(at)
                .unwrap_or_else(|| panic!("{ctx}: no outcome after the request"));
            assert_eq!(out.kind, RecordKind::Outcome, "{ctx}: {out:?}");
            assert_eq!(out.outcome, Some(outcome), "{ctx}");
            assert_eq!(
                out.request_id, rec.request_id,
                "{ctx}: outcome of another request"
            );
            assert_eq!(out.token_id, rec.token_id, "{ctx}");
            assert!(rec.token_id.is_some(), "{ctx}: admitted without a token id");
            at += 1;
        }
    }
    assert_eq!(
        at,
        records.len(),
        "{service}: records beyond the expected decisions: {:?}",
        &records[at..]
    );
}

/// Asserts that flipping any one of a few bytes of a copy of the journal
/// makes verification fail, and that the unchanged copy verifies.
fn assert_a_flipped_byte_is_detected(cell: &TestCell, path: &std::path::Path, name: &str) {
    let bytes = std::fs::read(path).unwrap();
    let copy = cell.scratch("copies").join(name);
    std::fs::write(&copy, &bytes).unwrap();
    verify_journal(&copy).expect("an exact copy verifies");
    let len = bytes.len();
    for at in [20, len / 3, len / 2, len - 40, len - 1] {
        let mut tampered = bytes.clone();
        tampered[at] ^= 0x01;
        std::fs::write(&copy, &tampered).unwrap();
        assert!(
            verify_journal(&copy).is_err(),
            "{name}: a flipped bit at byte {at} of {len} was not detected"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_every_call_leaves_exactly_one_decision_record_in_order_and_the_chains_verify() {
    let seed = std::env::var("NITRILE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED);
    println!("seed {seed} (set NITRILE_TEST_SEED to replay another order)");
    let mut cell = TestCell::bootstrapped();
    // One host's drain per hour for oncall, so draining a second host is
    // over quota.
    cell.edit_bundle("quotas.toml", |t| {
        t.replacen(
            "operation = \"host.drain\"\nmax_resources = 20",
            "operation = \"host.drain\"\nmax_resources = 1",
            1,
        )
    });
    cell.start_tokend().await;
    cell.start_host("h1").await;

    let mut rng = SplitMix(seed);
    // The first call drains h1, which uses up the quota; every kind occurs
    // at least once; the rest is random.
    let mut calls = vec![Call::Drain];
    calls.extend(ALL.iter().copied().filter(|c| *c != Call::Drain));
    while calls.len() < CALLS {
        calls.push(rng.pick(&ALL));
    }
    for i in (2..calls.len()).rev() {
        let j = 1 + (rng.next() % i as u64) as usize;
        calls.swap(i, j);
    }

    let mut tokend_expected = Vec::new();
    let mut host_expected = Vec::new();
    for (i, what) in calls.iter().enumerate() {
        let (t, h) = make_call(&cell, i, *what).await;
        tokend_expected.extend(t);
        host_expected.extend(h);
    }
    cell.stop_host("h1").await;
    cell.stop_tokend().await;

    let host_journal = cell.host_journal("h1");
    let tokend_journal = cell.tokend_journal();
    let host_records = journal_records(&host_journal);
    let tokend_records = journal_records(&tokend_journal);
    assert_journal_matches("host h1", &host_records, &host_expected);
    assert_journal_matches("token service", &tokend_records, &tokend_expected);
    // Every call left a decision somewhere; calls that reached both left
    // one in each.
    let decisions = |records: &[AuditRecord]| {
        records
            .iter()
            .filter(|r| r.kind != RecordKind::Outcome || r.outcome == Some(Outcome::Granted))
            .count()
    };
    let reached_both = calls
        .iter()
        .filter(|c| {
            matches!(
                c,
                Call::Describe
                    | Call::Drain
                    | Call::Undrain
                    | Call::DescribeMissingInstance
                    | Call::WrongOperationToken
            )
        })
        .count();
    assert_eq!(
        decisions(&host_records) + decisions(&tokend_records),
        CALLS + reached_both
    );

    let report = verify_journal(&host_journal).unwrap();
    assert_eq!(report.records, host_records.len() as u64);
    assert_eq!(report.source, "nitrile://local/host/h1");
    let report = verify_journal(&tokend_journal).unwrap();
    assert_eq!(report.records, tokend_records.len() as u64);
    assert_a_flipped_byte_is_detected(&cell, &host_journal, "host-journal");
    assert_a_flipped_byte_is_detected(&cell, &tokend_journal, "tokend-journal");
}

/// Waits until the journal at `path` holds more than `n` records (a failed
/// handshake is journaled after the client has already seen it fail).
async fn wait_for_more_than(path: &std::path::Path, n: usize) -> Vec<AuditRecord> {
    for _ in 0..500 {
        let records = journal_records(path);
        if records.len() > n {
            return records;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no record added to {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim6_failed_handshakes_get_no_answer_and_are_journaled() {
    let cell = TestCell::with_hosts(&["h1"]).await;
    let journal = cell.host_journal("h1");
    for (what, tls) in [
        ("no certificate", cell.tls_without_certificate()),
        ("another CA", cell.tls_from_other_ca(ALICE)),
    ] {
        let before = journal_records(&journal).len();
        let result = async {
            let mut c = cell.connect("h1", tls).await?;
            c.get_json("/v1/host").await
        }
        .await;
        // TLS 1.3: the client may finish its half of the handshake before
        // the server refuses; either way no HTTP answer comes back.
        let err = result.expect_err(what);
        assert!(
            err.is_tls() || matches!(err, nitrile_net::NetError::Http(_)),
            "{what}: {err}"
        );
        let records = wait_for_more_than(&journal, before).await;
        // A client may dial again after the server dropped it, so one
        // attempt can be more than one refused handshake.
        for rec in &records[before..] {
            assert_eq!(rec.kind, RecordKind::Refusal, "{what}");
            assert_eq!(rec.step, Some(RefusalStep::Tls), "{what}");
            assert!(rec.principal.is_none(), "{what}");
        }
    }
    verify_journal(&journal).unwrap();
}
