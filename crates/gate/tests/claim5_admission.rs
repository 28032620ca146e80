//! Claim 5 at the host: every way a token can be wrong is refused, and each
//! refusal is in the host's journal with its step and reason. Real
//! certificates from a cell CA, real signing keys from the token service's key
//! ring, a real journal file.

use std::path::PathBuf;
use std::sync::Arc;

use nitrile_api::wire::RefusalStep;
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId};
use nitrile_audit::{AuditRecord, Journal, JournalReader, Outcome, RecordKind};
use nitrile_gate::{Admission, Admitted, Refused};
use nitrile_pki::{CellCa, PeerIdentity};
use nitrile_token::{
    CertThumbprint, ClaimsInput, Clock, FixedClock, IssuerKeys, ReplayCache, TokenIssuer, Verifier,
};
use nitrile_tokend::{IssuerFile, KeyRing};
use time::{Duration, OffsetDateTime};

struct Cell {
    dir: tempfile::TempDir,
    clock: Arc<FixedClock>,
    alice: PeerIdentity,
    mallory: PeerIdentity,
    ring: KeyRing,
}

fn p(s: &str) -> PrincipalId {
    PrincipalId::parse(s).unwrap()
}

fn r(s: &str) -> ResourceId {
    ResourceId::parse(s).unwrap()
}

impl Cell {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let cell = Name::new("c1").unwrap();
        let ca = CellCa::init_or_load(&dir.path().join("pki"), &cell, now).unwrap();
        let peer = |uri: &str| {
            let issued = ca.issue(&p(uri), None, now).unwrap();
            PeerIdentity::from_der(&issued.cert_der, &cell).unwrap()
        };
        let alice = peer("nitrile://c1/operator/alice");
        let mallory = peer("nitrile://c1/operator/mallory");
        let ring = KeyRing::init_or_load(
            &dir.path().join("tokend"),
            p("nitrile://c1/service/tokend"),
            &mut rand_core::OsRng,
        )
        .unwrap();
        Self {
            dir,
            clock: Arc::new(FixedClock::new(now)),
            alice,
            mallory,
            ring,
        }
    }

    fn pinned_keys(&self) -> IssuerKeys {
        IssuerFile::load(&KeyRing::issuer_file_path(&self.dir.path().join("tokend"))).unwrap()
    }

    fn journal_path(&self, host: &str) -> PathBuf {
        self.dir.path().join(format!("{host}.journal"))
    }

    fn host(&self, host: &str) -> Admission {
        let path = self.journal_path(host);
        let source = p(&format!("nitrile://c1/host/{host}"));
        let journal = Arc::new(Journal::open(&path, &source.uri()).unwrap());
        let verifier = Verifier::new(self.pinned_keys(), Audience::new(host).unwrap());
        Admission::new(
            source,
            verifier,
            ReplayCache::new(1000),
            journal,
            &path,
            self.clock.clone(),
        )
        .unwrap()
    }

    fn mint_with(&self, issuer: &TokenIssuer, input: ClaimsInput, at: OffsetDateTime) -> String {
        issuer.mint(input, at, &mut rand_core::OsRng).unwrap().0
    }

    fn input(&self, aud: &str, ops: &[Operation], res: &[&str]) -> ClaimsInput {
        ClaimsInput {
            subject: self.alice.principal.clone(),
            group: Name::new("oncall").unwrap(),
            audience: Audience::new(aud).unwrap(),
            operations: ops.to_vec(),
            resources: res.iter().map(|s| r(s)).collect(),
            cert: CertThumbprint::from_sha256(self.alice.cert_sha256),
            lifetime: None,
        }
    }

    fn mint(&self, aud: &str, ops: &[Operation], res: &[&str]) -> String {
        let issuer = self.ring.issuer().unwrap();
        self.mint_with(&issuer, self.input(aud, ops, res), self.clock.now())
    }

    fn records(&self, host: &str) -> Vec<AuditRecord> {
        JournalReader::open(self.journal_path(host))
            .unwrap()
            .map(|e| e.unwrap().record().unwrap())
            .collect()
    }
}

/// Asserts the refusal has the given code and that the journal's last record
/// is that refusal, with its step, reason, caller and request.
fn assert_refused_and_journaled(
    cell: &Cell,
    host: &str,
    result: Result<Admitted, Refused>,
    code: &str,
    who: &PeerIdentity,
) {
    let refused = result.expect_err("request was admitted");
    assert_eq!(refused.code, code, "{refused}");
    assert_eq!(refused.step, RefusalStep::Token);
    let records = cell.records(host);
    let last = records.last().expect("refusal not journaled");
    assert_eq!(last.kind, RecordKind::Refusal);
    assert_eq!(last.step, Some(RefusalStep::Token));
    assert!(
        last.reason.as_deref().unwrap().starts_with(code),
        "{:?}",
        last.reason
    );
    assert_eq!(last.principal.as_ref(), Some(&who.principal));
    assert_eq!(refused.audit_seq, Some(records.len() as u64));
    assert!(
        records.iter().all(|r| r.kind != RecordKind::Request),
        "something was admitted"
    );
}

const DESCRIBE: Operation = Operation::HostDescribe;
const DRAIN: Operation = Operation::HostDrain;

#[test]
fn claim5_valid_token_is_admitted_and_journaled_before_it_acts() {
    let cell = Cell::new();
    let host = cell.host("h1");
    let token = cell.mint("h1", &[DESCRIBE], &["host/h1"]);
    let admitted = host
        .admit(&cell.alice, Some(&token), DESCRIBE, &r("host/h1"))
        .unwrap();
    let records = cell.records("h1");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].kind, RecordKind::Request);
    assert_eq!(
        records[0].token_id.as_deref(),
        Some(&*admitted.grant().token_id().to_string())
    );
    let rid = admitted.request_id();
    host.complete(admitted, Outcome::Executed, None).unwrap();
    let records = cell.records("h1");
    assert_eq!(records[1].kind, RecordKind::Outcome);
    assert_eq!(records[1].request_id, rid);
}

#[test]
fn claim5_expired_token_refused() {
    let cell = Cell::new();
    let host = cell.host("h1");
    let token = cell.mint("h1", &[DESCRIBE], &["host/h1"]);
    cell.clock
        .advance(Duration::minutes(5) + Duration::seconds(1));
    let res = host.admit(&cell.alice, Some(&token), DESCRIBE, &r("host/h1"));
    assert_refused_and_journaled(&cell, "h1", res, "expired", &cell.alice);
}

#[test]
fn claim5_not_yet_valid_token_refused() {
    let cell = Cell::new();
    let host = cell.host("h1");
    let issuer = cell.ring.issuer().unwrap();
    let later = cell.clock.now() + Duration::minutes(2);
    let token = cell.mint_with(&issuer, cell.input("h1", &[DESCRIBE], &["host/h1"]), later);
    let res = host.admit(&cell.alice, Some(&token), DESCRIBE, &r("host/h1"));
    assert_refused_and_journaled(&cell, "h1", res, "not_yet_valid", &cell.alice);
}

#[test]
fn claim5_token_for_host_a_refused_by_host_b() {
    let cell = Cell::new();
    let host_b = cell.host("h2");
    let token = cell.mint("h1", &[DESCRIBE], &["host/h1", "host/h2"]);
    let res = host_b.admit(&cell.alice, Some(&token), DESCRIBE, &r("host/h2"));
    let refused = res.expect_err("admitted");
    assert_eq!(refused.code, "wrong_audience");
    let last = cell.records("h2").pop().unwrap();
    assert_eq!(last.kind, RecordKind::Refusal);
    assert!(last.reason.unwrap().starts_with("wrong_audience"));
}

/// A token the token service would never mint: signed by hand with its
/// real, pinned key, every claim right, but living six minutes. The host
/// refuses it at once, not only after five minutes, and journals why.
#[test]
fn claim5_token_living_longer_than_five_minutes_refused() {
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;
    let cell = Cell::new();
    let host = cell.host("h1");
    let issuer = cell.ring.issuer().unwrap();
    let (_, claims) = issuer
        .mint(
            cell.input("h1", &[DESCRIBE], &["host/h1"]),
            cell.clock.now(),
            &mut rand_core::OsRng,
        )
        .unwrap();
    let mut payload: serde_json::Value = serde_json::from_slice(&claims.to_json()).unwrap();
    let exp = claims.issued_at() + Duration::minutes(6);
    payload["exp"] = exp
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
        .into();
    let key_file = cell
        .dir
        .path()
        .join("tokend/keys")
        .join(format!("{}.key", issuer.key_id()));
    let raw =
        ed25519_dalek::SigningKey::from_pkcs8_pem(&std::fs::read_to_string(key_file).unwrap())
            .unwrap();
    let token = nitrile_token::paseto::v4_public_sign(
        &raw,
        &serde_json::to_vec(&payload).unwrap(),
        format!(r#"{{"kid":"{}"}}"#, issuer.key_id()).as_bytes(),
        nitrile_token::IMPLICIT_ASSERTION,
    );
    let res = host.admit(&cell.alice, Some(&token), DESCRIBE, &r("host/h1"));
    assert_refused_and_journaled(&cell, "h1", res, "lifetime_too_long", &cell.alice);
    // The same token signed with five minutes is admitted: the forge is
    // faithful, only the lifetime is refused.
    payload["exp"] = (claims.issued_at() + Duration::minutes(5))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
        .into();
    let token = nitrile_token::paseto::v4_public_sign(
        &raw,
        &serde_json::to_vec(&payload).unwrap(),
        format!(r#"{{"kid":"{}"}}"#, issuer.key_id()).as_bytes(),
        nitrile_token::IMPLICIT_ASSERTION,
    );
    let admitted = host
        .admit(&cell.alice, Some(&token), DESCRIBE, &r("host/h1"))
        .unwrap();
    host.complete(admitted, Outcome::Executed, None).unwrap();
}

#[test]
fn claim5_operation_outside_the_token_refused() {
    let cell = Cell::new();
    let host = cell.host("h1");
    let token = cell.mint("h1", &[DESCRIBE], &["host/h1"]);
    let res = host.admit(&cell.alice, Some(&token), DRAIN, &r("host/h1"));
    assert_refused_and_journaled(&cell, "h1", res, "operation_not_granted", &cell.alice);
}

#[test]
fn claim5_resource_outside_the_token_refused() {
    let cell = Cell::new();
    let host = cell.host("h1");
    let token = cell.mint("h1", &[Operation::InstanceDescribe], &["instance/i-1"]);
    let res = host.admit(
        &cell.alice,
        Some(&token),
        Operation::InstanceDescribe,
        &r("instance/i-2"),
    );
    assert_refused_and_journaled(&cell, "h1", res, "resource_not_granted", &cell.alice);
}

#[test]
fn claim5_token_signed_by_an_unknown_key_refused() {
    let cell = Cell::new();
    let host = cell.host("h1");
    // Another token service (same principal name, its own key) is not pinned.
    let other = tempfile::tempdir().unwrap();
    let rogue = KeyRing::init_or_load(
        other.path(),
        p("nitrile://c1/service/tokend"),
        &mut rand_core::OsRng,
    )
    .unwrap();
    let token = cell.mint_with(
        &rogue.issuer().unwrap(),
        cell.input("h1", &[DESCRIBE], &["host/h1"]),
        cell.clock.now(),
    );
    let res = host.admit(&cell.alice, Some(&token), DESCRIBE, &r("host/h1"));
    assert_refused_and_journaled(&cell, "h1", res, "unknown_key", &cell.alice);
}

#[test]
fn claim5_token_of_a_rotated_out_key_refused() {
    let mut cell = Cell::new();
    let old_token = cell.mint("h1", &[DESCRIBE], &["host/h1"]);
    let old_kid = cell.ring.current().to_owned();
    cell.ring.rotate(&mut rand_core::OsRng).unwrap();
    // While both keys are published, the old token still verifies.
    let host = cell.host("h1");
    let a = host
        .admit(&cell.alice, Some(&old_token), DESCRIBE, &r("host/h1"))
        .unwrap();
    host.complete(a, Outcome::Executed, None).unwrap();
    let new_token = cell.mint("h1", &[DESCRIBE], &["host/h1"]);
    cell.ring.retire(&old_kid).unwrap();
    drop(host);
    let host = cell.host("h1"); // the host picks up the new pinned set
    let a = host
        .admit(&cell.alice, Some(&new_token), DESCRIBE, &r("host/h1"))
        .unwrap();
    host.complete(a, Outcome::Executed, None).unwrap();
    let res = host.admit(&cell.alice, Some(&old_token), DESCRIBE, &r("host/h1"));
    let refused = res.expect_err("admitted");
    assert_eq!(refused.code, "unknown_key");
    let last = cell.records("h1").pop().unwrap();
    assert_eq!(last.kind, RecordKind::Refusal);
    assert!(last.reason.unwrap().starts_with("unknown_key"));
}

#[test]
fn claim5_any_tampered_byte_refused() {
    let cell = Cell::new();
    let host = cell.host("h1");
    let token = cell.mint("h1", &[DESCRIBE], &["host/h1"]);
    let body_start = "v4.public.".len();
    let mut refusals = 0;
    // Every position of the signed part and footer, a different character.
    for i in (body_start..token.len()).step_by(7) {
        let mut bytes = token.clone().into_bytes();
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        let res = host.admit(&cell.alice, Some(&tampered), DESCRIBE, &r("host/h1"));
        let refused = res.expect_err("tampered token admitted");
        assert_eq!(refused.step, RefusalStep::Token);
        refusals += 1;
        let last = cell.records("h1").pop().unwrap();
        assert_eq!(last.kind, RecordKind::Refusal);
    }
    assert_eq!(cell.records("h1").len(), refusals);
}

#[test]
fn claim5_token_presented_with_another_client_certificate_refused() {
    let cell = Cell::new();
    let host = cell.host("h1");
    let token = cell.mint("h1", &[DESCRIBE], &["host/h1"]);
    let res = host.admit(&cell.mallory, Some(&token), DESCRIBE, &r("host/h1"));
    assert_refused_and_journaled(&cell, "h1", res, "certificate_mismatch", &cell.mallory);
}

#[test]
fn claim5_second_use_of_a_mutation_token_refused_even_after_restart() {
    let cell = Cell::new();
    let host = cell.host("h1");
    let token = cell.mint("h1", &[DRAIN], &["host/h1"]);
    let admitted = host
        .admit(&cell.alice, Some(&token), DRAIN, &r("host/h1"))
        .unwrap();
    host.complete(admitted, Outcome::Executed, None).unwrap();
    let res = host.admit(&cell.alice, Some(&token), DRAIN, &r("host/h1"));
    assert_eq!(res.expect_err("replay admitted").code, "replayed");
    assert_eq!(cell.records("h1").pop().unwrap().kind, RecordKind::Refusal);
    // A restarted host rebuilds its replay cache from the journal.
    drop(host);
    let host = cell.host("h1");
    let res = host.admit(&cell.alice, Some(&token), DRAIN, &r("host/h1"));
    assert_eq!(
        res.expect_err("replay admitted after restart").code,
        "replayed"
    );
    // Read-only tokens may be used again while they live.
    let read = cell.mint("h1", &[DESCRIBE], &["host/h1"]);
    for _ in 0..2 {
        let a = host
            .admit(&cell.alice, Some(&read), DESCRIBE, &r("host/h1"))
            .unwrap();
        host.complete(a, Outcome::Executed, None).unwrap();
    }
}

#[test]
fn claim5_missing_token_refused() {
    let cell = Cell::new();
    let host = cell.host("h1");
    let res = host.admit(&cell.alice, None, DESCRIBE, &r("host/h1"));
    assert_refused_and_journaled(&cell, "h1", res, "missing", &cell.alice);
}

#[test]
fn claim6_every_decision_is_one_journal_record_and_the_chain_verifies() {
    let cell = Cell::new();
    let host = cell.host("h1");
    let good = cell.mint("h1", &[DESCRIBE], &["host/h1"]);
    let mut expected = Vec::new();
    for i in 0..20 {
        let res = match i % 4 {
            0 => host.admit(&cell.alice, Some(&good), DESCRIBE, &r("host/h1")),
            1 => host.admit(&cell.mallory, Some(&good), DESCRIBE, &r("host/h1")),
            2 => host.admit(&cell.alice, None, DESCRIBE, &r("host/h1")),
            _ => host.admit(&cell.alice, Some(&good), DRAIN, &r("host/h1")),
        };
        match res {
            Ok(a) => {
                expected.push(RecordKind::Request);
                host.complete(a, Outcome::Executed, None).unwrap();
                expected.push(RecordKind::Outcome);
            }
            Err(_) => expected.push(RecordKind::Refusal),
        }
    }
    let report = nitrile_audit::verify_journal(cell.journal_path("h1")).unwrap();
    assert_eq!(report.records, expected.len() as u64);
    let kinds: Vec<_> = cell.records("h1").iter().map(|r| r.kind).collect();
    assert_eq!(kinds, expected);
}
