//! Events the monitor matches: journal records, flattened into named fields,
//! and the synthetic events the log service emits about journals and
//! checkpoints.

use std::collections::BTreeMap;
use std::fmt;

use nitrile_api::{PrincipalId, PrincipalKind};
use nitrile_audit::{AuditRecord, format_time};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What an event is about; a rule's `logsource.category`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// A journaled audit record (request, outcome or refusal).
    Record,
    /// The log service found a journal stream broken (gap, chain break,
    /// wrong source, oversized record).
    Integrity,
    /// The log published a checkpoint.
    Checkpoint,
    /// A source reported its journal head and the log its shipped position.
    JournalHead,
}

impl Category {
    /// Every category, in a stable order.
    pub const ALL: [Category; 4] = [
        Self::Record,
        Self::Integrity,
        Self::Checkpoint,
        Self::JournalHead,
    ];

    /// The category's name as written in rules.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Record => "record",
            Self::Integrity => "integrity",
            Self::Checkpoint => "checkpoint",
            Self::JournalHead => "journal_head",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a journal stream was found broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IntegrityKind {
    /// A sequence number was skipped.
    Gap,
    /// A record's hash does not chain from the one before.
    ChainBreak,
    /// A record or journal names another source than the connection's.
    WrongSource,
    /// A source shipped a journal other than the one the log holds.
    JournalReplaced,
    /// A record is too large to become a log leaf.
    Oversized,
}

impl IntegrityKind {
    /// The kind's name, the `kind` field of an integrity event.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gap => "gap",
            Self::ChainBreak => "chain_break",
            Self::WrongSource => "wrong_source",
            Self::JournalReplaced => "journal_replaced",
            Self::Oversized => "oversized",
        }
    }

    /// The kind named `name`: its own name, or the log service's name of
    /// the same problem (`hash_mismatch`, `bad_genesis`, `leaf_too_large`,
    /// `bad_source`).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "gap" => Self::Gap,
            "chain_break" | "hash_mismatch" | "bad_genesis" => Self::ChainBreak,
            "wrong_source" | "bad_source" => Self::WrongSource,
            "journal_replaced" => Self::JournalReplaced,
            "oversized" | "leaf_too_large" => Self::Oversized,
            _ => return None,
        })
    }
}

/// Every field name a rule may match, group by or count. Records fill the
/// first group, integrity, checkpoint and journal-head events the rest;
/// a field an event does not have matches only `null`.
pub const FIELDS: &[&str] = &[
    // every event
    "source",
    "seq",
    // records
    "kind",
    "source_kind",
    "principal",
    "principal_kind",
    "operation",
    "resource",
    "host",
    "group",
    "token_id",
    "refusal_step",
    "reason",
    "code",
    "outcome",
    "time",
    "request_id",
    // integrity (`kind` too)
    "detail",
    // checkpoints
    "origin",
    "size",
    // journal heads
    "head",
    "shipped",
    "lag",
];

/// Looks a field name up in [`FIELDS`], giving the static name.
pub(crate) fn known_field(name: &str) -> Option<&'static str> {
    FIELDS.iter().copied().find(|f| *f == name)
}

/// Where an event came from: the journal source and the record's sequence
/// number (for synthetic events, the sequence number they are about).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRef {
    /// The journal source (its principal URI) or the log origin.
    pub source: String,
    /// The record's sequence number in that journal, or the checkpoint size.
    pub seq: u64,
}

/// One event, its fields flattened to strings for matching. Build one with
/// [`Event::from_record`], [`Event::integrity`], [`Event::checkpoint`] or
/// [`Event::journal_head`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    category: Category,
    origin: EventRef,
    fields: BTreeMap<&'static str, Vec<String>>,
}

/// The short code at the start of a reason (`replayed: ...` gives
/// `replayed`), as hosts write refusal reasons.
fn reason_code(reason: &str) -> Option<&str> {
    let (code, _) = reason.split_once(':')?;
    (!code.is_empty()
        && code.len() <= 40
        && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    .then_some(code)
}

impl Event {
    fn new(category: Category, source: &str, seq: u64) -> Self {
        let mut fields = BTreeMap::new();
        fields.insert("source", vec![source.to_owned()]);
        fields.insert("seq", vec![seq.to_string()]);
        Self {
            category,
            origin: EventRef {
                source: source.to_owned(),
                seq,
            },
            fields,
        }
    }

    fn set(&mut self, field: &'static str, value: impl Into<String>) {
        self.fields.insert(field, vec![value.into()]);
    }

    fn set_opt(&mut self, field: &'static str, value: Option<impl Into<String>>) {
        if let Some(v) = value {
            self.set(field, v);
        }
    }

    /// The event of record `seq` of the journal of `source` (the journal
    /// header's source, which the log service authenticated).
    ///
    /// `host` is the token audience when there is one, else the source's
    /// host name when the source is a host; `code` is the short code a
    /// reason starts with (`replayed`, `expired`, ...).
    pub fn from_record(source: &str, seq: u64, record: &AuditRecord) -> Self {
        let mut e = Self::new(Category::Record, source, seq);
        e.set("kind", record.kind.as_str());
        let source_kind = PrincipalId::parse(source).ok();
        e.set_opt("source_kind", source_kind.as_ref().map(|p| p.kind.as_str()));
        e.set_opt("principal", record.principal.as_ref().map(|p| p.uri()));
        e.set_opt(
            "principal_kind",
            record.principal.as_ref().map(|p| p.kind.as_str()),
        );
        if !record.operations.is_empty() {
            e.fields.insert(
                "operation",
                record
                    .operations
                    .iter()
                    .map(|o| o.as_str().to_owned())
                    .collect(),
            );
        }
        if !record.resources.is_empty() {
            e.fields.insert(
                "resource",
                record.resources.iter().map(|r| r.to_string()).collect(),
            );
        }
        let host = match (&record.audience, &source_kind) {
            (Some(a), _) => Some(a.as_str().to_owned()),
            (None, Some(p)) if p.kind == PrincipalKind::Host => Some(p.name.as_str().to_owned()),
            _ => None,
        };
        e.set_opt("host", host);
        e.set_opt("group", record.group.clone());
        e.set_opt("token_id", record.token_id.clone());
        e.set_opt("refusal_step", record.step.map(|s| s.as_str()));
        e.set_opt("reason", record.reason.clone());
        e.set_opt("code", record.reason.as_deref().and_then(reason_code));
        e.set_opt("outcome", record.outcome.map(|o| o.as_str()));
        e.set("time", format_time(record.time));
        e.set("request_id", record.request_id.to_string());
        e
    }

    /// The log service found the journal of `source` broken at `seq`.
    pub fn integrity(kind: IntegrityKind, source: &str, seq: u64, detail: &str) -> Self {
        let mut e = Self::new(Category::Integrity, source, seq);
        e.set("kind", kind.as_str());
        e.set("detail", detail);
        e
    }

    /// The log `origin` published a checkpoint of `size` leaves at `time`.
    pub fn checkpoint(origin: &str, size: u64, time: OffsetDateTime) -> Self {
        let mut e = Self::new(Category::Checkpoint, origin, size);
        e.set("origin", origin);
        e.set("size", size.to_string());
        e.set("time", format_time(time));
        e
    }

    /// `source`'s journal has `head` records and the log holds the first
    /// `shipped` of them.
    pub fn journal_head(source: &str, head: u64, shipped: u64) -> Self {
        let mut e = Self::new(Category::JournalHead, source, head);
        e.set("head", head.to_string());
        e.set("shipped", shipped.to_string());
        e.set("lag", head.saturating_sub(shipped).to_string());
        e
    }

    /// What the event is about.
    pub fn category(&self) -> Category {
        self.category
    }

    /// Where it came from.
    pub fn origin(&self) -> &EventRef {
        &self.origin
    }

    /// The values of `field` (empty when the event does not have it).
    pub fn values(&self, field: &str) -> &[String] {
        self.fields.get(field).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The first value of `field`.
    pub fn value(&self, field: &str) -> Option<&str> {
        self.values(field).first().map(String::as_str)
    }

    pub(crate) fn number(&self, field: &str) -> Option<u64> {
        self.value(field)?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nitrile_api::wire::RefusalStep;
    use nitrile_api::{Audience, Operation, ResourceId};
    use nitrile_audit::RequestId;
    use time::macros::datetime;

    #[test]
    fn records_flatten_to_fields() {
        let src = "nitrile://c1/host/h1";
        let r = AuditRecord::refusal(
            datetime!(2030-01-01 0:00 UTC),
            PrincipalId::parse(src).unwrap(),
            RequestId::from_bytes([1; 16]),
            RefusalStep::Token,
            "replayed: token already used",
        )
        .with_principal(PrincipalId::parse("nitrile://c1/operator/alice").unwrap())
        .with_operations([Operation::HostDrain, Operation::HostUndrain])
        .with_resources([ResourceId::parse("host/h1").unwrap()]);
        let e = Event::from_record(src, 7, &r);
        assert_eq!(e.category(), Category::Record);
        assert_eq!(e.value("kind"), Some("refusal"));
        assert_eq!(e.value("source_kind"), Some("host"));
        assert_eq!(e.value("principal_kind"), Some("operator"));
        assert_eq!(e.values("operation"), ["host.drain", "host.undrain"]);
        assert_eq!(e.value("host"), Some("h1"));
        assert_eq!(e.value("code"), Some("replayed"));
        assert_eq!(e.value("refusal_step"), Some("token"));
        assert_eq!(e.value("seq"), Some("7"));
        assert_eq!(e.value("outcome"), None);
        assert_eq!(e.origin().seq, 7);

        let tokend = "nitrile://c1/service/tokend";
        let r = AuditRecord::request(
            datetime!(2030-01-01 0:00 UTC),
            PrincipalId::parse(tokend).unwrap(),
            RequestId::from_bytes([2; 16]),
        )
        .with_audience(Audience::new("h9").unwrap())
        .with_reason("Not a code: x");
        let e = Event::from_record(tokend, 1, &r);
        assert_eq!(e.value("host"), Some("h9"));
        assert_eq!(e.value("source_kind"), Some("service"));
        assert_eq!(e.value("code"), None);
        assert!(FIELDS.iter().all(|f| known_field(f).is_some()));
    }

    #[test]
    fn synthetic_events() {
        let e = Event::journal_head("nitrile://c1/host/h1", 10, 4);
        assert_eq!(e.value("lag"), Some("6"));
        assert_eq!(e.number("head"), Some(10));
        assert_eq!(
            IntegrityKind::from_name("leaf_too_large"),
            Some(IntegrityKind::Oversized)
        );
        assert_eq!(IntegrityKind::from_name("checkpoint_stalled"), None);
        let e = Event::integrity(IntegrityKind::ChainBreak, "s", 3, "hash mismatch");
        assert_eq!(e.value("kind"), Some("chain_break"));
        let e = Event::checkpoint("c1.nitrile/log", 5, datetime!(2030-01-01 0:00 UTC));
        assert_eq!(e.value("size"), Some("5"));
        assert_eq!(e.category(), Category::Checkpoint);
    }
}
