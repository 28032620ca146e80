//! Alerts as logd serves them (`GET /v1/alerts/<after>`) and as a source
//! raises one in its own journal: the wire types only. logd raises,
//! deduplicates and delivers them; auditors list them page by page.
//! Alerts carry names, numbers and hashes, nothing secret.

use serde::{Deserialize, Serialize};

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AlertKind {
    /// A source skipped records (withheld or lost).
    Gap,
    /// A shipped record does not continue its journal's hash chain, or
    /// differs from the record the log holds.
    ChainBreak,
    /// A source shipped a journal other than the one the log holds.
    JournalReplaced,
    /// A caller shipped a journal that is not its own.
    WrongSource,
    /// A record is too large to be a log leaf.
    LeafTooLarge,
    /// The log grew but no checkpoint covering it was published in time.
    CheckpointStalled,
    /// A checkpoint did not get its quorum of witness cosignatures.
    WitnessQuorum,
    /// A monitor rule or detector fired (the monitor's alert is the
    /// detail).
    Monitor,
    /// A principal that is not a declared source of the cell shipped a
    /// journal.
    UndeclaredSource,
    /// A declared source shipped a record that does not fit it (another
    /// writer, another host, another cell, not an audit record).
    BadRecord,
    /// A source found the log not consistent with the checkpoint it last
    /// saw covering its journal (the source raised it in its own journal).
    LogInconsistent,
}

impl AlertKind {
    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gap => "gap",
            Self::ChainBreak => "chain_break",
            Self::JournalReplaced => "journal_replaced",
            Self::WrongSource => "wrong_source",
            Self::LeafTooLarge => "leaf_too_large",
            Self::CheckpointStalled => "checkpoint_stalled",
            Self::WitnessQuorum => "witness_quorum",
            Self::Monitor => "monitor",
            Self::UndeclaredSource => "undeclared_source",
            Self::BadRecord => "bad_record",
            Self::LogInconsistent => "log_inconsistent",
        }
    }
}

/// One integrity alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    /// `"integrity"` for what logd finds itself, `"monitor"` for what the
    /// monitor's rules find: tells these lines apart on stdout.
    pub alert: String,
    /// What it is about.
    pub kind: AlertKind,
    /// When logd saw it, RFC 3339 UTC.
    pub time: String,
    /// The journal source concerned, if any.
    pub source: Option<String>,
    /// The caller whose request raised it, if any.
    pub principal: Option<String>,
    /// What happened, in words.
    pub message: String,
    /// Numbers and hashes of the problem.
    pub detail: serde_json::Value,
    /// The sequence number of the alert's record in logd's journal, when it
    /// could be written.
    pub audit_seq: Option<u64>,
    /// How many times it was raised: repeats of an alert (same kind, same
    /// subject, same topic) are counted on one entry, not listed again.
    #[serde(default = "one")]
    pub count: u64,
    /// When it was first raised, RFC 3339 UTC (`time` is the last time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_time: Option<String>,
    /// Its position in the alert list (the cursor of `GET /v1/alerts/<after>`):
    /// it moves to the end each time the alert is raised again.
    #[serde(default)]
    pub cursor: u64,
}

fn one() -> u64 {
    1
}

impl Alert {
    /// Who or what the alert is about, for deduplication and rate limits:
    /// the authenticated caller whose request raised it, else the source.
    pub fn subject(&self) -> &str {
        self.principal
            .as_deref()
            .or(self.source.as_deref())
            .unwrap_or("")
    }

    /// What distinguishes alerts of one kind about one subject: the monitor
    /// rule and its group, or the integrity problem.
    pub fn topic(&self) -> String {
        let d = &self.detail;
        let pick = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        match self.kind {
            AlertKind::Monitor => format!(
                "{}|{}",
                pick(&d["rule_id"]),
                serde_json::to_string(&d["group"]).unwrap_or_default()
            ),
            _ => pick(&d["violation"]["problem"]),
        }
    }
}

/// A page of alerts, oldest first, as served by `GET /v1/alerts/<after>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertPage {
    /// The alerts whose cursor is after the one asked for.
    pub alerts: Vec<Alert>,
    /// The cursor to ask for next, when there may be more.
    pub next: Option<u64>,
}

/// The key of the object an alert record carries in its `detail`.
pub const ALERT_DETAIL_KEY: &str = "integrity_alert";
