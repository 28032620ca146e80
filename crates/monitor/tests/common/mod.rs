//! Events built from real audit records, as hosts and the token service
//! journal them, and the shipped rules.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

use nitrile_api::wire::RefusalStep;
use nitrile_api::{Audience, Operation, PrincipalId, ResourceId};
use nitrile_audit::{AuditRecord, CertSha256, Outcome, RequestId};
use nitrile_monitor::{Alert, Event, Monitor, MonitorConfig};
use time::{Duration, OffsetDateTime};

pub const T0: OffsetDateTime = time::macros::datetime!(2030-01-01 0:00 UTC);

pub fn rules_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../entitlements/rules")
}

/// The shipped rules, baseline off (tested on its own).
pub fn shipped() -> Monitor {
    Monitor::load(rules_dir())
        .expect("the shipped rules load")
        .with_config(MonitorConfig {
            baseline: None,
            ..MonitorConfig::default()
        })
}

pub fn secs(s: i64) -> OffsetDateTime {
    T0 + Duration::seconds(s)
}

pub fn principal(uri: &str) -> PrincipalId {
    PrincipalId::parse(uri).unwrap()
}

pub fn operator(name: &str) -> PrincipalId {
    principal(&format!("nitrile://c1/operator/{name}"))
}

pub fn host_source(host: &str) -> String {
    format!("nitrile://c1/host/{host}")
}

pub const TOKEND: &str = "nitrile://c1/service/tokend";

/// A journal: the source and its next sequence number.
pub struct Journal {
    pub source: String,
    pub seq: u64,
    ids: u8,
}

impl Journal {
    pub fn host(host: &str) -> Self {
        Self::of(&host_source(host))
    }

    pub fn of(source: &str) -> Self {
        Self {
            source: source.to_owned(),
            seq: 0,
            ids: 0,
        }
    }

    fn next_id(&mut self) -> RequestId {
        self.ids = self.ids.wrapping_add(1);
        RequestId::from_bytes([self.ids; 16])
    }

    /// The event of `record` as the next record of this journal.
    pub fn event(&mut self, record: &AuditRecord) -> Event {
        // Records go through their journal encoding, as logd receives them.
        let decoded = AuditRecord::decode(&record.encode().unwrap()).unwrap();
        let e = Event::from_record(&self.source, self.seq, &decoded);
        self.seq += 1;
        e
    }

    /// A host's request record for an admitted call, as hostd writes it.
    pub fn request(
        &mut self,
        at: OffsetDateTime,
        who: &PrincipalId,
        op: Operation,
        resource: &str,
    ) -> Event {
        let src = principal(&self.source);
        let audience = Audience::new(src.name.as_str()).unwrap();
        let id = self.next_id();
        let r = AuditRecord::request(at, src, id)
            .with_principal(who.clone())
            .with_cert_sha256(CertSha256::of_der(b"client"))
            .with_operations([op])
            .with_resources([ResourceId::parse(resource).unwrap()])
            .with_audience(audience)
            .with_token_id("ab".repeat(16))
            .with_group("ops");
        self.event(&r)
    }

    /// A refusal record, with `reason` written as hostd does (`code: text`).
    pub fn refusal(
        &mut self,
        at: OffsetDateTime,
        who: Option<&PrincipalId>,
        step: RefusalStep,
        reason: &str,
    ) -> Event {
        let src = principal(&self.source);
        let id = self.next_id();
        let mut r = AuditRecord::refusal(at, src, id, step, reason)
            .with_operations([Operation::HostDrain])
            .with_resources([ResourceId::parse("host/h1").unwrap()]);
        if let Some(p) = who {
            r = r.with_principal(p.clone());
        }
        self.event(&r)
    }

    /// The token service's record of a granted token, as tokend writes it.
    pub fn grant(
        &mut self,
        at: OffsetDateTime,
        who: &PrincipalId,
        op: Operation,
        host: &str,
    ) -> Event {
        let src = principal(&self.source);
        let id = self.next_id();
        let r = AuditRecord::outcome(at, src, id, Outcome::Granted)
            .with_principal(who.clone())
            .with_operations([op])
            .with_resources([ResourceId::parse(&format!("host/{host}")).unwrap()])
            .with_audience(Audience::new(host).unwrap())
            .with_group("ops")
            .with_token_id("cd".repeat(16));
        self.event(&r)
    }

    /// A host's outcome record.
    pub fn outcome(
        &mut self,
        at: OffsetDateTime,
        who: &PrincipalId,
        op: Operation,
        resource: &str,
    ) -> Event {
        let src = principal(&self.source);
        let id = self.next_id();
        let r = AuditRecord::outcome(at, src, id, Outcome::Executed)
            .with_principal(who.clone())
            .with_operations([op])
            .with_resources([ResourceId::parse(resource).unwrap()]);
        self.event(&r)
    }
}

/// The alerts of rule `name` among `alerts`.
pub fn named<'a>(alerts: &'a [Alert], name: &str) -> Vec<&'a Alert> {
    alerts
        .iter()
        .filter(|a| a.rule_name.as_deref() == Some(name))
        .collect()
}
