//! The audit log monitor: watches journal records and the log's own events
//! for unusual requests and patterns.
//!
//! It guarantees that rules are parsed strictly (a subset of the Sigma rule
//! format: single-event detection rules and `event_count` / `value_count`
//! correlation rules over a timespan, grouped by fields; anything outside
//! the subset, an unknown key, modifier or field included, is an error
//! naming the file and the key), that every rule is evaluated on every
//! event, and that its state is bounded whatever the input: correlation
//! windows are pruned to their timespan and capped per rule and group, the
//! call-rate baseline and the journal-lag tracker keep a bounded number of
//! keys. Time is passed in (`now`); nothing here reads a clock or does I/O
//! besides [`Monitor::load`] reading rule files.
//!
//! It does not decide where alerts go (the log service writes them to the
//! log, stdout or a webhook), does not verify journals or checkpoints (the
//! log service and witnesses do, and report what they find as
//! [`Event::integrity`] and [`Event::checkpoint`] events), and forgets its
//! windows when restarted.
//!
//! Besides the rules, three built-in detectors have ids of their own: the
//! per-(principal, operation) call-rate baseline ([`BASELINE_RULE_ID`]), a
//! checkpoint that is not published or does not grow while records arrive
//! ([`CHECKPOINT_STALL_RULE_ID`]) and a journal whose shipped position stays
//! behind its head ([`JOURNAL_LAG_RULE_ID`]).
//!
//! Sigma: <https://github.com/SigmaHQ/sigma-specification>.

#![forbid(unsafe_code)]

mod baseline;
mod event;
mod monitor;
mod rule;

pub use baseline::{Baseline, BaselineConfig, RateAnomaly};
pub use event::{Category, Event, EventRef, FIELDS, IntegrityKind};
pub use monitor::{
    Alert, BASELINE_RULE_ID, CHECKPOINT_STALL_RULE_ID, JOURNAL_LAG_RULE_ID, MAX_ALERT_EVENTS,
    MAX_RULE_FILES, Monitor, MonitorConfig, StateSize,
};
pub use rule::{
    Correlation, CorrelationType, Detection, Level, MAX_CONDITION_DEPTH, MAX_CONDITION_LEN,
    MAX_REGEX_SIZE, MAX_RULE_FILE_LEN, MAX_RULES_PER_FILE, MAX_THRESHOLD, MAX_TIMESPAN_SECS,
    MAX_YAML_DEPTH, Problem, Rule, RuleBody, RuleError, RuleId, Status, parse_rules,
    parse_timespan,
};
