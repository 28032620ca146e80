//! The monitor: rules, correlation windows, built-in detectors and alerts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::baseline::{Baseline, BaselineConfig};
use crate::event::{Category, Event, EventRef};
use crate::rule::{
    CorrelationType, Level, MAX_RULE_FILE_LEN, Rule, RuleBody, RuleError, RuleId, parse_rules,
};

/// Most rule files [`Monitor::load`] reads from a directory.
pub const MAX_RULE_FILES: usize = 256;

/// Most event references an alert carries (the latest ones).
pub const MAX_ALERT_EVENTS: usize = 32;

/// The id of the built-in call-rate baseline detector.
pub const BASELINE_RULE_ID: &str = "62b02c87-9cc0-451b-924a-2c7580b3db35";
/// The id of the built-in detector of a checkpoint that does not advance.
pub const CHECKPOINT_STALL_RULE_ID: &str = "ab113843-bcf0-43f8-b00f-1d2ba2c6bcc1";
/// The id of the built-in detector of a journal whose shipping lags.
pub const JOURNAL_LAG_RULE_ID: &str = "b32c2e4a-d551-4224-a42c-c86d702adb1c";

/// One alert. Its JSON field names are stable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    /// The rule or built-in detector that raised it.
    pub rule_id: RuleId,
    /// That rule's name, when it has one.
    pub rule_name: Option<String>,
    /// That rule's title.
    pub title: String,
    /// How severe it is.
    pub level: Level,
    /// The values of the rule's group-by fields (empty for single events).
    pub group: BTreeMap<String, String>,
    /// How many events (or distinct values, or calls per minute) it counts.
    pub count: u64,
    /// When the first counted event was observed.
    #[serde(with = "rfc3339")]
    pub first_seen: OffsetDateTime,
    /// When the last counted event was observed.
    #[serde(with = "rfc3339")]
    pub last_seen: OffsetDateTime,
    /// The latest counted events, at most [`MAX_ALERT_EVENTS`].
    pub events: Vec<EventRef>,
}

impl Alert {
    /// The alert as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| unreachable!("an alert serializes"))
    }
}

mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::format_description::well_known::Rfc3339;
    use time::{OffsetDateTime, UtcOffset};

    pub(super) fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&nitrile_audit::format_time(*t))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let t = OffsetDateTime::parse(&s, &Rfc3339).map_err(serde::de::Error::custom)?;
        Ok(t.to_offset(UtcOffset::UTC))
    }
}

/// Settings of the built-in detectors and the bounds on state.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    /// How often the log publishes a checkpoint when it has grown.
    pub checkpoint_interval: Duration,
    /// The longest the log goes without publishing a checkpoint, grown or
    /// not (an idle log publishes only this often).
    pub max_checkpoint_age: Duration,
    /// Intervals after which a checkpoint whose size does not grow while
    /// records arrive raises an alert; and by which a checkpoint may be
    /// later than `max_checkpoint_age` before its absence does.
    pub checkpoint_stall_intervals: u32,
    /// How long a journal's shipped position may stay behind the head it
    /// had when it fell behind.
    pub journal_lag_max: Duration,
    /// The call-rate baseline; `None` turns it off.
    pub baseline: Option<BaselineConfig>,
    /// Most groups a correlation rule keeps; when full, the group seen least
    /// recently is dropped.
    pub max_groups_per_rule: usize,
    /// Most journal sources whose lag is tracked.
    pub max_sources: usize,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval: Duration::seconds(1),
            max_checkpoint_age: Duration::seconds(60),
            checkpoint_stall_intervals: 5,
            journal_lag_max: Duration::seconds(30),
            baseline: Some(BaselineConfig::default()),
            max_groups_per_rule: 4096,
            max_sources: 4096,
        }
    }
}

/// How much state the monitor holds; every number is bounded by the
/// configuration and the rules' thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateSize {
    /// Correlation groups over all rules.
    pub groups: usize,
    /// Window entries over all groups.
    pub entries: usize,
    /// Baseline keys.
    pub baseline_keys: usize,
    /// Journal sources tracked for lag.
    pub sources: usize,
}

struct Compiled {
    rule: Rule,
    /// For a detection rule: whether its matches raise alerts of their own.
    generates: bool,
    /// For a correlation: indices of the detection rules it counts.
    inputs: Vec<usize>,
    window: Window,
}

#[derive(Default)]
struct Window {
    groups: HashMap<Vec<String>, Group>,
}

struct Group {
    last: OffsetDateTime,
    /// (when, value for value_count, event) in observation order.
    entries: VecDeque<(OffsetDateTime, Option<String>, EventRef)>,
}

#[derive(Default)]
struct CheckpointWatch {
    started: Option<OffsetDateTime>,
    origin: Option<String>,
    last: Option<(OffsetDateTime, u64)>,
    pending_since: Option<OffsetDateTime>,
    alerted: bool,
}

struct Lag {
    head: u64,
    shipped: u64,
    /// Since when and up to which head the source has been behind.
    behind: Option<(OffsetDateTime, u64)>,
    alerted: bool,
    seen: OffsetDateTime,
}

/// Matches events against rules and built-in detectors and raises alerts.
/// All state is bounded: windows are pruned to their timespan and each
/// correlation keeps at most `max_groups_per_rule` groups of at most its
/// threshold entries.
pub struct Monitor {
    rules: Vec<Compiled>,
    config: MonitorConfig,
    baseline: Option<Baseline>,
    checkpoint: CheckpointWatch,
    lags: HashMap<String, Lag>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("rules", &self.rules.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Monitor {
    /// Loads every `*.yml` and `*.yaml` file of `dir` (not recursing), in
    /// name order.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, RuleError> {
        let dir = dir.as_ref();
        let read_err = |path: &Path, source| RuleError::Read {
            path: path.display().to_string(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
            let path = entry.map_err(|e| read_err(dir, e))?.path();
            let yaml = path.extension().is_some_and(|e| e == "yml" || e == "yaml");
            if yaml && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        if files.len() > MAX_RULE_FILES {
            return Err(RuleError::TooLarge {
                file: dir.display().to_string(),
                what: "number of rule files",
            });
        }
        let mut rules = Vec::new();
        for path in files {
            let name = path.display().to_string();
            let text = nitrile_fs::read_bounded_to_string(&path, MAX_RULE_FILE_LEN as u64)
                .map_err(|e| match e {
                    nitrile_fs::FsError::TooLarge { .. } => RuleError::TooLarge {
                        file: name.clone(),
                        what: "file size",
                    },
                    e => read_err(&path, e.into()),
                })?;
            rules.extend(parse_rules(&name, &text)?);
        }
        Self::new(rules)
    }

    /// A monitor of the rule files `files` (each its name and its bytes, as
    /// an entitlement bundle's `rules/` holds them), in the order given, with
    /// the default configuration: what logd runs from a reviewed bundle, and
    /// what tools check before a bundle is signed. At most
    /// [`MAX_RULE_FILES`] files, each UTF-8.
    pub fn from_rule_files<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, RuleError> {
        let files: Vec<(&str, &[u8])> = files.into_iter().take(MAX_RULE_FILES + 1).collect();
        if let Some((name, _)) = files.get(MAX_RULE_FILES) {
            return Err(RuleError::TooLarge {
                file: (*name).to_owned(),
                what: "number of rule files",
            });
        }
        let mut rules = Vec::new();
        for (name, bytes) in files {
            let text = std::str::from_utf8(bytes).map_err(|e| RuleError::Read {
                path: name.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?;
            rules.extend(parse_rules(name, text)?);
        }
        Self::new(rules)
    }

    /// A monitor of `rules` with the default configuration: checks that ids
    /// and names are unique and that correlations refer to detection rules.
    pub fn new(rules: Vec<Rule>) -> Result<Self, RuleError> {
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, r) in rules.iter().enumerate() {
            for key in std::iter::once(r.id.as_str()).chain(r.name.as_deref()) {
                if names.insert(key.to_owned(), i).is_some() {
                    return Err(RuleError::Duplicate {
                        file: r.file.clone(),
                        id: key.to_owned(),
                    });
                }
            }
        }
        let mut compiled: Vec<Compiled> = rules
            .into_iter()
            .map(|rule| Compiled {
                rule,
                generates: true,
                inputs: Vec::new(),
                window: Window::default(),
            })
            .collect();
        let mut referenced = vec![false; compiled.len()];
        let mut generated = vec![false; compiled.len()];
        for c in &mut compiled {
            let RuleBody::Correlation(corr) = &c.rule.body else {
                continue;
            };
            for reference in &corr.rules {
                let Some(t) = names.get(reference).copied() else {
                    return Err(RuleError::UnknownReference {
                        file: c.rule.file.clone(),
                        rule: c.rule.id.to_string(),
                        reference: reference.clone(),
                    });
                };
                c.inputs.push(t);
                referenced[t] = true;
                generated[t] |= corr.generate;
            }
        }
        // A correlation must count detection rules only.
        for c in &compiled {
            for &t in &c.inputs {
                if matches!(compiled[t].rule.body, RuleBody::Correlation(_)) {
                    return Err(RuleError::UnknownReference {
                        file: c.rule.file.clone(),
                        rule: c.rule.id.to_string(),
                        reference: compiled[t].rule.id.to_string(),
                    });
                }
            }
        }
        for (i, c) in compiled.iter_mut().enumerate() {
            c.generates = !referenced[i] || generated[i];
        }
        let config = MonitorConfig::default();
        Ok(Self {
            rules: compiled,
            baseline: config.baseline.clone().map(Baseline::new),
            config,
            checkpoint: CheckpointWatch::default(),
            lags: HashMap::new(),
        })
    }

    /// The monitor with `config` (the baseline starts afresh).
    pub fn with_config(mut self, config: MonitorConfig) -> Self {
        self.baseline = config.baseline.clone().map(Baseline::new);
        self.config = config;
        self
    }

    /// The rules, in load order.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().map(|c| &c.rule)
    }

    /// How much state is held now.
    pub fn state_size(&self) -> StateSize {
        let mut s = StateSize::default();
        for c in &self.rules {
            s.groups += c.window.groups.len();
            s.entries += c
                .window
                .groups
                .values()
                .map(|g| g.entries.len())
                .sum::<usize>();
        }
        s.baseline_keys = self.baseline.as_ref().map_or(0, Baseline::len);
        s.sources = self.lags.len();
        s
    }

    /// Matches one event observed at `now`; the alerts it raises.
    ///
    /// Windows run on observation time (`now`), not on the time a record
    /// claims, so a source cannot hide events from a window by back-dating
    /// them.
    pub fn observe(&mut self, event: &Event, now: OffsetDateTime) -> Vec<Alert> {
        self.checkpoint.started.get_or_insert(now);
        let mut alerts = Vec::new();
        let matched: Vec<bool> = self
            .rules
            .iter()
            .map(|c| match &c.rule.body {
                RuleBody::Detection(d) => d.matches(event),
                _ => false,
            })
            .collect();
        for (i, c) in self.rules.iter().enumerate() {
            if matched[i] && c.generates {
                alerts.push(alert(
                    &c.rule,
                    BTreeMap::new(),
                    1,
                    now,
                    now,
                    vec![event.origin().clone()],
                ));
            }
        }
        let max_groups = self.config.max_groups_per_rule.max(1);
        for c in &mut self.rules {
            if c.inputs.iter().any(|&t| matched[t])
                && let Some(a) = correlate(c, event, now, max_groups)
            {
                alerts.push(a);
            }
        }
        match event.category() {
            Category::Record => {
                self.checkpoint.pending_since.get_or_insert(now);
                self.baseline_observe(event, now, &mut alerts);
            }
            Category::Checkpoint => self.checkpoint_observe(event, now, &mut alerts),
            Category::JournalHead => self.lag_observe(event, now),
            Category::Integrity => {}
        }
        alerts
    }

    /// Time-based detectors at `now`: a checkpoint that does not advance, a
    /// journal whose shipping lags too long; also prunes expired windows.
    pub fn tick(&mut self, now: OffsetDateTime) -> Vec<Alert> {
        self.checkpoint.started.get_or_insert(now);
        let mut alerts = Vec::new();
        for c in &mut self.rules {
            if let RuleBody::Correlation(corr) = &c.rule.body {
                let cutoff = now - Duration::seconds(corr.timespan_secs as i64);
                prune_groups(&mut c.window, cutoff);
            }
        }
        self.checkpoint_tick(now, &mut alerts);
        self.lag_tick(now, &mut alerts);
        alerts
    }

    fn baseline_observe(&mut self, event: &Event, now: OffsetDateTime, alerts: &mut Vec<Alert>) {
        let Some(baseline) = &mut self.baseline else {
            return;
        };
        if !matches!(event.value("kind"), Some("request" | "refusal")) {
            return;
        }
        let Some(principal) = event.value("principal") else {
            return;
        };
        for op in event.values("operation") {
            if let Some(anomaly) = baseline.observe(principal, op, now.unix_timestamp()) {
                let minute_start = now.replace_second(0).unwrap_or(now);
                let minute_start = minute_start.replace_nanosecond(0).unwrap_or(minute_start);
                let group = BTreeMap::from([
                    ("principal".to_owned(), principal.to_owned()),
                    ("operation".to_owned(), op.clone()),
                ]);
                alerts.push(builtin(
                    BASELINE_RULE_ID,
                    "nitrile_call_rate_baseline",
                    "Call rate above the principal's own baseline",
                    Level::Medium,
                    group,
                    anomaly.count,
                    minute_start,
                    now,
                    vec![event.origin().clone()],
                ));
            }
        }
    }

    fn checkpoint_observe(&mut self, event: &Event, now: OffsetDateTime, alerts: &mut Vec<Alert>) {
        let Some(size) = event.number("size") else {
            return;
        };
        let w = &mut self.checkpoint;
        w.origin = event.value("origin").map(str::to_owned);
        match w.last {
            Some((_, last)) if size < last => {
                let group = BTreeMap::from([
                    ("origin".to_owned(), w.origin.clone().unwrap_or_default()),
                    ("problem".to_owned(), "size_decreased".to_owned()),
                ]);
                alerts.push(builtin(
                    CHECKPOINT_STALL_RULE_ID,
                    "nitrile_checkpoint_not_advancing",
                    "Log checkpoint not advancing",
                    Level::Critical,
                    group,
                    size,
                    now,
                    now,
                    vec![event.origin().clone()],
                ));
                // Keep the larger size: the log must come back to it.
                w.last = Some((now, last));
                return;
            }
            Some((_, last)) if size == last => {}
            _ => w.pending_since = None,
        }
        w.last = Some((now, size));
    }

    fn checkpoint_tick(&mut self, now: OffsetDateTime, alerts: &mut Vec<Alert>) {
        let intervals =
            i32::try_from(self.config.checkpoint_stall_intervals.max(1)).unwrap_or(i32::MAX);
        let limit = self.config.checkpoint_interval.saturating_mul(intervals);
        let silence = self.config.max_checkpoint_age.saturating_add(limit);
        let w = &mut self.checkpoint;
        let since_publish = w.last.map(|(t, _)| t).or(w.started);
        let problem = if since_publish.is_some_and(|t| now - t > silence) {
            Some(("no_checkpoint", since_publish))
        } else if w.pending_since.is_some_and(|t| now - t > limit) {
            Some(("size_not_growing", w.pending_since))
        } else {
            None
        };
        let Some((problem, since)) = problem else {
            w.alerted = false;
            return;
        };
        if w.alerted {
            return;
        }
        w.alerted = true;
        let (size, events) = match (&w.origin, w.last) {
            (Some(o), Some((_, s))) => (
                s,
                vec![EventRef {
                    source: o.clone(),
                    seq: s,
                }],
            ),
            _ => (0, Vec::new()),
        };
        let group = BTreeMap::from([
            ("origin".to_owned(), w.origin.clone().unwrap_or_default()),
            ("problem".to_owned(), problem.to_owned()),
        ]);
        alerts.push(builtin(
            CHECKPOINT_STALL_RULE_ID,
            "nitrile_checkpoint_not_advancing",
            "Log checkpoint not advancing",
            Level::Critical,
            group,
            size,
            since.unwrap_or(now),
            now,
            events,
        ));
    }

    fn lag_observe(&mut self, event: &Event, now: OffsetDateTime) {
        let (Some(head), Some(shipped)) = (event.number("head"), event.number("shipped")) else {
            return;
        };
        let source = event.origin().source.clone();
        if !self.lags.contains_key(&source)
            && self.lags.len() >= self.config.max_sources.max(1)
            && let Some(oldest) = self
                .lags
                .iter()
                .min_by_key(|(_, l)| l.seen)
                .map(|(k, _)| k.clone())
        {
            self.lags.remove(&oldest);
        }
        let lag = self.lags.entry(source).or_insert(Lag {
            head,
            shipped,
            behind: None,
            alerted: false,
            seen: now,
        });
        lag.head = head;
        lag.shipped = shipped;
        lag.seen = now;
        match lag.behind {
            Some((_, target)) if shipped >= target => {
                lag.behind = (shipped < head).then_some((now, head));
                lag.alerted = false;
            }
            None if shipped < head => lag.behind = Some((now, head)),
            _ => {}
        }
    }

    fn lag_tick(&mut self, now: OffsetDateTime, alerts: &mut Vec<Alert>) {
        let max = self.config.journal_lag_max;
        let mut sources: Vec<&String> = self.lags.keys().collect();
        sources.sort();
        let mut fired = Vec::new();
        for s in sources {
            let lag = &self.lags[s];
            if let Some((since, target)) = lag.behind
                && !lag.alerted
                && now - since > max
            {
                let group = BTreeMap::from([("source".to_owned(), s.clone())]);
                alerts.push(builtin(
                    JOURNAL_LAG_RULE_ID,
                    "nitrile_journal_lag",
                    "Host journal not shipped to the log",
                    Level::High,
                    group,
                    lag.head.saturating_sub(lag.shipped),
                    since,
                    now,
                    vec![EventRef {
                        source: s.clone(),
                        seq: target,
                    }],
                ));
                fired.push(s.clone());
            }
        }
        for s in fired {
            if let Some(l) = self.lags.get_mut(&s) {
                l.alerted = true;
            }
        }
    }
}

fn alert(
    rule: &Rule,
    group: BTreeMap<String, String>,
    count: u64,
    first_seen: OffsetDateTime,
    last_seen: OffsetDateTime,
    events: Vec<EventRef>,
) -> Alert {
    Alert {
        rule_id: rule.id.clone(),
        rule_name: rule.name.clone(),
        title: rule.title.clone(),
        level: rule.level,
        group,
        count,
        first_seen,
        last_seen,
        events,
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    id: &str,
    name: &str,
    title: &str,
    level: Level,
    group: BTreeMap<String, String>,
    count: u64,
    first_seen: OffsetDateTime,
    last_seen: OffsetDateTime,
    events: Vec<EventRef>,
) -> Alert {
    Alert {
        rule_id: RuleId::parse(id).unwrap_or_else(|_| unreachable!("built-in ids are UUIDs")),
        rule_name: Some(name.to_owned()),
        title: title.to_owned(),
        level,
        group,
        count,
        first_seen,
        last_seen,
        events,
    }
}

/// Drops window entries at or before `cutoff` and groups left empty.
fn prune_groups(window: &mut Window, cutoff: OffsetDateTime) {
    window.groups.retain(|_, g| {
        while g.entries.front().is_some_and(|(t, _, _)| *t <= cutoff) {
            g.entries.pop_front();
        }
        !g.entries.is_empty()
    });
}

/// Counts `event` in correlation `c`; the alert when its group reaches the
/// threshold (the group then starts afresh).
fn correlate(
    c: &mut Compiled,
    event: &Event,
    now: OffsetDateTime,
    max_groups: usize,
) -> Option<Alert> {
    let RuleBody::Correlation(corr) = &c.rule.body else {
        return None;
    };
    let cutoff = now - Duration::seconds(corr.timespan_secs as i64);
    let key: Vec<String> = corr
        .group_by
        .iter()
        .map(|f| event.values(f).join(","))
        .collect();
    let values: Vec<Option<String>> = match corr.field {
        Some(f) => {
            let v = event.values(f);
            if v.is_empty() {
                return None;
            }
            v.iter().map(|s| Some(s.clone())).collect()
        }
        None => vec![None],
    };
    let window = &mut c.window;
    if !window.groups.contains_key(&key) && window.groups.len() >= max_groups {
        prune_groups(window, cutoff);
        if window.groups.len() >= max_groups
            && let Some(oldest) = window
                .groups
                .iter()
                .min_by_key(|(_, g)| g.last)
                .map(|(k, _)| k.clone())
        {
            window.groups.remove(&oldest);
        }
    }
    let group = window.groups.entry(key.clone()).or_insert_with(|| Group {
        last: now,
        entries: VecDeque::new(),
    });
    group.last = now;
    while group.entries.front().is_some_and(|(t, _, _)| *t <= cutoff) {
        group.entries.pop_front();
    }
    for value in values {
        if corr.kind == CorrelationType::ValueCount
            && let Some(pos) = group.entries.iter().position(|(_, v, _)| *v == value)
        {
            group.entries.remove(pos);
        }
        group
            .entries
            .push_back((now, value, event.origin().clone()));
    }
    if (group.entries.len() as u64) < corr.min_count {
        return None;
    }
    let count = group.entries.len() as u64;
    let first_seen = group.entries.front().map_or(now, |(t, _, _)| *t);
    let skip = group.entries.len().saturating_sub(MAX_ALERT_EVENTS);
    let events = group
        .entries
        .iter()
        .skip(skip)
        .map(|(_, _, e)| e.clone())
        .collect();
    window.groups.remove(&key);
    let group = corr
        .group_by
        .iter()
        .zip(key)
        .map(|(f, v)| ((*f).to_owned(), v))
        .collect();
    Some(alert(&c.rule, group, count, first_seen, now, events))
}
