//! Rules: the Sigma subset the monitor understands, parsed strictly from
//! YAML.
//!
//! A file holds one or more YAML documents, each one rule. A detection rule
//! has `logsource` (`product: nitrile`, optional `category`) and `detection`
//! (named selections and a `condition`); a correlation rule has
//! `correlation` (`type: event_count | value_count`, `rules`, `group-by`,
//! `timespan`, `condition: {gte|gt: N, field: F}`, `generate`). Every key,
//! modifier, field name and selection name is checked: anything unknown is
//! an error naming the file, the rule and the key, never ignored.

use std::fmt;
use std::time::Duration;

use nitrile_fs::duration::{DurationSyntax, parse_duration};
use regex::Regex;
use serde::{Deserialize, Serialize};
use yaml_rust2::parser::{Event as YamlEvent, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;
use yaml_rust2::{Yaml, YamlLoader, yaml::Hash};

use crate::event::{Category, Event, known_field};

/// Largest rule file read, in bytes.
pub const MAX_RULE_FILE_LEN: usize = 256 * 1024;

/// Most rules (YAML documents) in one file.
pub const MAX_RULES_PER_FILE: usize = 64;

/// Longest condition, in bytes.
pub const MAX_CONDITION_LEN: usize = 1024;

/// Deepest nesting of parentheses and `not` in a condition.
pub const MAX_CONDITION_DEPTH: usize = 16;

/// Largest compiled `|re` pattern, in bytes of the regex engine's memory.
pub const MAX_REGEX_SIZE: usize = 256 * 1024;

/// Largest correlation threshold: a window never holds more entries per
/// group than this.
pub const MAX_THRESHOLD: u64 = 1000;

/// Deepest nesting of YAML sequences and mappings in a rule file.
pub const MAX_YAML_DEPTH: usize = 16;

/// Longest correlation timespan, in seconds (7 days).
pub const MAX_TIMESPAN_SECS: u64 = 7 * 24 * 3600;

/// Why rules could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// a rules directory or file could not be read
    #[error("cannot read {path}")]
    Read {
        /// The directory or file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// a rule file is larger than [`MAX_RULE_FILE_LEN`] or holds more than
    /// [`MAX_RULES_PER_FILE`] rules
    #[error("{file}: too large ({what})")]
    TooLarge {
        /// The file.
        file: String,
        /// What is too large.
        what: &'static str,
    },
    /// a rule file is not YAML
    #[error("{file}: not valid YAML")]
    Yaml {
        /// The file.
        file: String,
        /// The parser's complaint.
        #[source]
        source: yaml_rust2::ScanError,
    },
    /// a rule breaks the subset: `at` names the key
    #[error("{file}: rule {doc}: {at}: {problem}")]
    Invalid {
        /// The file.
        file: String,
        /// The rule's position in the file, from 1.
        doc: usize,
        /// The key path, e.g. `detection.selection.operation|contains`.
        at: String,
        /// What is wrong there.
        problem: Problem,
    },
    /// two rules share an id or a name
    #[error("{file}: rule id or name {id} is already used by another rule")]
    Duplicate {
        /// The file of the second rule.
        file: String,
        /// The id or name.
        id: String,
    },
    /// a correlation names no detection rule of the set
    #[error("{file}: correlation {rule} refers to {reference}, which is not a detection rule")]
    UnknownReference {
        /// The file of the correlation.
        file: String,
        /// The correlation's id.
        rule: String,
        /// The id or name it refers to.
        reference: String,
    },
}

/// What is wrong at a key of a rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// the key is not part of the subset
    #[error("unknown key `{0}`")]
    UnknownKey(String),
    /// the value modifier is not part of the subset
    #[error("unknown modifier `{0}`")]
    UnknownModifier(String),
    /// the modifiers cannot be combined
    #[error("modifiers `{0}` and `{1}` cannot be combined")]
    ConflictingModifiers(String, String),
    /// the field is not one an event has
    #[error("unknown field `{0}`")]
    UnknownField(String),
    /// a required key is missing
    #[error("missing key `{0}`")]
    Missing(&'static str),
    /// the value has the wrong YAML type
    #[error("expected {0}")]
    WrongType(&'static str),
    /// the value is not one of the allowed ones
    #[error("`{value}` is not one of: {allowed}")]
    NotOneOf {
        /// The value found.
        value: String,
        /// The values allowed.
        allowed: &'static str,
    },
    /// the id is not a lowercase UUID
    #[error("`{0}` is not a UUID (8-4-4-4-12 lowercase hex digits)")]
    BadId(String),
    /// the name is not lowercase letters, digits and `_`
    #[error("`{0}` is not a name (a-z, 0-9, _)")]
    BadName(String),
    /// the timespan is not `<n>s|m|h|d`, zero, or above the maximum
    #[error("bad timespan `{0}`: expected <n>s, <n>m, <n>h or <n>d, at most 7d")]
    BadTimespan(String),
    /// a number is out of its range
    #[error("`{0}` is not a number in range")]
    BadNumber(String),
    /// the regular expression does not compile or is too large
    #[error("bad regular expression")]
    BadRegex(#[source] regex::Error),
    /// the condition cannot be parsed
    #[error("bad condition at word {at}: expected {expected}")]
    Condition {
        /// Position of the word (from 1).
        at: usize,
        /// What was expected there.
        expected: &'static str,
    },
    /// the condition names no selection, or a pattern matches none
    #[error("no selection named `{0}`")]
    UnknownSelection(String),
    /// a selection is defined but the condition never uses it
    #[error("selection `{0}` is not used by the condition")]
    UnusedSelection(String),
    /// the condition is longer or deeper than its bounds
    #[error("condition too long or too deeply nested")]
    ConditionTooComplex,
    /// YAML anchors and aliases are not accepted
    #[error("YAML anchors and aliases are not accepted")]
    Alias,
    /// YAML nested deeper than [`MAX_YAML_DEPTH`]
    #[error("YAML nested too deeply")]
    TooDeep,
    /// a feature of Sigma this monitor does not implement
    #[error("not supported: {0}")]
    Unsupported(&'static str),
}

/// A rule id: a lowercase UUID, as Sigma requires.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RuleId(String);

impl RuleId {
    /// Parses a lowercase UUID.
    pub fn parse(s: &str) -> Result<Self, Problem> {
        let groups: Vec<&str> = s.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        let ok = groups.len() == lens.len()
            && groups.iter().zip(lens).all(|(g, n)| {
                g.len() == n && g.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(Problem::BadId(s.chars().take(80).collect()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RuleId {
    type Error = Problem;
    fn try_from(s: String) -> Result<Self, Problem> {
        Self::parse(&s)
    }
}

impl From<RuleId> for String {
    fn from(id: RuleId) -> String {
        id.0
    }
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How severe a rule's alerts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Worth recording.
    Informational,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
    /// Critical: act now.
    Critical,
}

impl Level {
    const NAMES: &'static str = "informational, low, medium, high, critical";

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "informational" => Self::Informational,
            "low" => Self::Low,
            "medium" => Self::Medium,
            "high" => Self::High,
            "critical" => Self::Critical,
            _ => return None,
        })
    }
}

/// A rule's maturity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Stable.
    Stable,
    /// Test.
    Test,
    /// Experimental.
    Experimental,
    /// Deprecated.
    Deprecated,
    /// Unsupported.
    Unsupported,
}

impl Status {
    const NAMES: &'static str = "stable, test, experimental, deprecated, unsupported";

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "stable" => Self::Stable,
            "test" => Self::Test,
            "experimental" => Self::Experimental,
            "deprecated" => Self::Deprecated,
            "unsupported" => Self::Unsupported,
            _ => return None,
        })
    }
}

/// One parsed rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its id.
    pub id: RuleId,
    /// Its name, which correlations may refer to instead of the id.
    pub name: Option<String>,
    /// Its title.
    pub title: String,
    /// Its status.
    pub status: Option<Status>,
    /// Its description.
    pub description: Option<String>,
    /// Its level.
    pub level: Level,
    /// Its tags.
    pub tags: Vec<String>,
    /// The file it came from.
    pub file: String,
    /// What it matches.
    pub body: RuleBody,
}

/// What a rule matches.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RuleBody {
    /// One event at a time.
    Detection(Detection),
    /// Counts over matches of detection rules.
    Correlation(Correlation),
}

/// A detection rule's logsource and selections.
#[derive(Debug, Clone)]
pub struct Detection {
    category: Option<Category>,
    selections: Vec<(String, Selection)>,
    condition: Condition,
}

/// Selections are OR-ed lists of AND-ed items.
#[derive(Debug, Clone)]
struct Selection(Vec<Vec<Item>>);

#[derive(Debug, Clone)]
struct Item {
    field: &'static str,
    all: bool,
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
enum Pattern {
    /// The field is absent.
    Null,
    /// A case-insensitive glob (`*`, `?`).
    Glob(Vec<Tok>),
    /// A regular expression (case-sensitive unless it says otherwise).
    Regex(Regex),
    /// A numeric comparison of the field's value with the number.
    Num(Cmp, i128),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Lit(char),
    Any,
    One,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Gt,
    Gte,
    Lt,
    Lte,
}

#[derive(Debug, Clone)]
enum Condition {
    Or(Vec<Condition>),
    And(Vec<Condition>),
    Not(Box<Condition>),
    Sel(usize),
    OneOf(Vec<usize>),
    AllOf(Vec<usize>),
}

/// What a correlation counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrelationType {
    /// Matching events per group in the timespan.
    EventCount,
    /// Distinct values of a field per group in the timespan.
    ValueCount,
}

/// A correlation rule: fires when a group reaches `min_count` within
/// `timespan_secs`.
#[derive(Debug, Clone)]
pub struct Correlation {
    /// What it counts.
    pub kind: CorrelationType,
    /// The ids or names of the detection rules whose matches it counts.
    pub rules: Vec<String>,
    /// The fields whose values make a group.
    pub group_by: Vec<&'static str>,
    /// The window, in seconds.
    pub timespan_secs: u64,
    /// The count (events or distinct values) at which it fires.
    pub min_count: u64,
    /// For `value_count`: the field whose distinct values are counted.
    pub field: Option<&'static str>,
    /// Whether the rules it refers to also raise alerts of their own.
    pub generate: bool,
}

impl Detection {
    /// The category of events it applies to (`None`: all).
    pub fn category(&self) -> Option<Category> {
        self.category
    }

    /// Whether `event` matches.
    pub fn matches(&self, event: &Event) -> bool {
        if self.category.is_some_and(|c| c != event.category()) {
            return false;
        }
        let sel: Vec<bool> = self
            .selections
            .iter()
            .map(|(_, s)| s.matches(event))
            .collect();
        self.condition.eval(&sel)
    }
}

impl Selection {
    fn matches(&self, event: &Event) -> bool {
        self.0
            .iter()
            .any(|items| items.iter().all(|i| i.matches(event)))
    }
}

impl Item {
    fn matches(&self, event: &Event) -> bool {
        let values = event.values(self.field);
        let one = |p: &Pattern| match p {
            Pattern::Null => values.iter().all(|v| v.is_empty()),
            _ => values.iter().any(|v| p.matches(v)),
        };
        if self.all {
            self.patterns.iter().all(one)
        } else {
            self.patterns.iter().any(one)
        }
    }
}

impl Pattern {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Null => value.is_empty(),
            Self::Glob(toks) => {
                let chars: Vec<char> = value.chars().flat_map(char::to_lowercase).collect();
                glob_match(toks, &chars)
            }
            Self::Regex(re) => re.is_match(value),
            Self::Num(cmp, n) => value.parse::<i128>().is_ok_and(|v| match cmp {
                Cmp::Gt => v > *n,
                Cmp::Gte => v >= *n,
                Cmp::Lt => v < *n,
                Cmp::Lte => v <= *n,
            }),
        }
    }
}

/// Glob matching with one backtrack point per `*` (linear in practice,
/// O(n*m) at worst).
fn glob_match(pat: &[Tok], s: &[char]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match pat.get(p) {
            Some(Tok::Any) => {
                star = Some((p, i));
                p += 1;
            }
            Some(Tok::One) => {
                p += 1;
                i += 1;
            }
            Some(Tok::Lit(c)) if *c == s[i] => {
                p += 1;
                i += 1;
            }
            _ => match star {
                Some((sp, si)) => {
                    p = sp + 1;
                    i = si + 1;
                    star = Some((sp, si + 1));
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|t| *t == Tok::Any)
}

/// Compiles a Sigma string value (`*`, `?` wildcards, `\` escapes) to glob
/// tokens, lowercased.
fn glob_of(value: &str, any_before: bool, any_after: bool) -> Vec<Tok> {
    let mut toks = Vec::with_capacity(value.len() + 2);
    if any_before {
        toks.push(Tok::Any);
    }
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '*' => toks.push(Tok::Any),
            '?' => toks.push(Tok::One),
            '\\' => match chars.next() {
                Some(n @ ('*' | '?' | '\\')) => toks.push(Tok::Lit(n)),
                Some(n) => {
                    toks.push(Tok::Lit('\\'));
                    toks.extend(n.to_lowercase().map(Tok::Lit));
                }
                None => toks.push(Tok::Lit('\\')),
            },
            c => toks.extend(c.to_lowercase().map(Tok::Lit)),
        }
    }
    if any_after {
        toks.push(Tok::Any);
    }
    toks
}

impl Condition {
    fn eval(&self, sel: &[bool]) -> bool {
        match self {
            Self::Or(v) => v.iter().any(|c| c.eval(sel)),
            Self::And(v) => v.iter().all(|c| c.eval(sel)),
            Self::Not(c) => !c.eval(sel),
            Self::Sel(i) => sel[*i],
            Self::OneOf(v) => v.iter().any(|i| sel[*i]),
            Self::AllOf(v) => v.iter().all(|i| sel[*i]),
        }
    }

    fn uses(&self, out: &mut Vec<bool>) {
        match self {
            Self::Or(v) | Self::And(v) => v.iter().for_each(|c| c.uses(out)),
            Self::Not(c) => c.uses(out),
            Self::Sel(i) => out[*i] = true,
            Self::OneOf(v) | Self::AllOf(v) => v.iter().for_each(|i| out[*i] = true),
        }
    }
}

/// Where in a file the parser is, for errors.
struct Ctx<'a> {
    file: &'a str,
    doc: usize,
}

impl Ctx<'_> {
    fn err(&self, at: impl Into<String>, problem: Problem) -> RuleError {
        RuleError::Invalid {
            file: self.file.to_owned(),
            doc: self.doc,
            at: at.into(),
            problem,
        }
    }

    /// The entries of a mapping whose keys are all strings.
    fn entries<'y>(&self, at: &str, y: &'y Yaml) -> Result<Vec<(&'y str, &'y Yaml)>, RuleError> {
        let h: &Hash = match y {
            Yaml::Hash(h) => h,
            Yaml::Alias(_) => return Err(self.err(at, Problem::Alias)),
            _ => return Err(self.err(at, Problem::WrongType("a mapping"))),
        };
        h.iter()
            .map(|(k, v)| match (k, v) {
                (_, Yaml::Alias(_)) => Err(self.err(at, Problem::Alias)),
                (Yaml::String(k), v) => Ok((k.as_str(), v)),
                _ => Err(self.err(at, Problem::WrongType("string keys"))),
            })
            .collect()
    }

    fn string<'y>(&self, at: &str, y: &'y Yaml) -> Result<&'y str, RuleError> {
        match y {
            Yaml::String(s) => Ok(s),
            Yaml::Alias(_) => Err(self.err(at, Problem::Alias)),
            _ => Err(self.err(at, Problem::WrongType("a string"))),
        }
    }

    fn strings(&self, at: &str, y: &Yaml) -> Result<Vec<String>, RuleError> {
        match y {
            Yaml::Array(a) => a
                .iter()
                .map(|v| self.string(at, v).map(str::to_owned))
                .collect(),
            Yaml::Alias(_) => Err(self.err(at, Problem::Alias)),
            _ => Err(self.err(at, Problem::WrongType("a list of strings"))),
        }
    }
}

/// Parses the rules of one file; `file` names it in errors.
pub fn parse_rules(file: &str, text: &str) -> Result<Vec<Rule>, RuleError> {
    if text.len() > MAX_RULE_FILE_LEN {
        return Err(RuleError::TooLarge {
            file: file.to_owned(),
            what: "file size",
        });
    }
    let yaml_err = |source| RuleError::Yaml {
        file: file.to_owned(),
        source,
    };
    // A first pass over the events refuses anchors, aliases (which the
    // loader would expand, exponentially at worst) and deep nesting before
    // anything is built.
    let mut shape = Shape::default();
    Parser::new_from_str(text)
        .load(&mut shape, true)
        .map_err(yaml_err)?;
    if let Some((doc, problem)) = shape.problem {
        return Err(RuleError::Invalid {
            file: file.to_owned(),
            doc,
            at: "(document)".into(),
            problem,
        });
    }
    let docs = YamlLoader::load_from_str(text).map_err(yaml_err)?;
    if docs.len() > MAX_RULES_PER_FILE {
        return Err(RuleError::TooLarge {
            file: file.to_owned(),
            what: "number of rules",
        });
    }
    docs.iter()
        .enumerate()
        .map(|(i, doc)| parse_rule(&Ctx { file, doc: i + 1 }, doc))
        .collect()
}

/// What the first pass over a file's YAML events found.
#[derive(Default)]
struct Shape {
    doc: usize,
    depth: usize,
    problem: Option<(usize, Problem)>,
}

impl MarkedEventReceiver for Shape {
    fn on_event(&mut self, ev: YamlEvent, _mark: Marker) {
        if self.problem.is_some() {
            return;
        }
        let problem = match ev {
            YamlEvent::DocumentStart => {
                self.doc += 1;
                None
            }
            YamlEvent::Alias(_) => Some(Problem::Alias),
            YamlEvent::Scalar(_, _, anchor, _) if anchor != 0 => Some(Problem::Alias),
            YamlEvent::SequenceStart(anchor, _) | YamlEvent::MappingStart(anchor, _) => {
                self.depth += 1;
                if anchor != 0 {
                    Some(Problem::Alias)
                } else if self.depth > MAX_YAML_DEPTH {
                    Some(Problem::TooDeep)
                } else {
                    None
                }
            }
            YamlEvent::SequenceEnd | YamlEvent::MappingEnd => {
                self.depth = self.depth.saturating_sub(1);
                None
            }
            _ => None,
        };
        if let Some(p) = problem {
            self.problem = Some((self.doc.max(1), p));
        }
    }
}

fn parse_rule(cx: &Ctx<'_>, doc: &Yaml) -> Result<Rule, RuleError> {
    let mut id = None;
    let mut name = None;
    let mut title = None;
    let mut status = None;
    let mut description = None;
    let mut level = None;
    let mut tags = Vec::new();
    let mut logsource = None;
    let mut detection = None;
    let mut correlation = None;
    for (key, v) in cx.entries("(rule)", doc)? {
        match key {
            "title" => title = Some(cx.string(key, v)?.to_owned()),
            "id" => id = Some(RuleId::parse(cx.string(key, v)?).map_err(|p| cx.err(key, p))?),
            "name" => {
                let n = cx.string(key, v)?;
                let ok = !n.is_empty()
                    && n.len() <= 64
                    && n.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !ok {
                    return Err(cx.err(key, Problem::BadName(n.chars().take(80).collect())));
                }
                name = Some(n.to_owned());
            }
            "status" => {
                let s = cx.string(key, v)?;
                status = Some(Status::parse(s).ok_or_else(|| {
                    cx.err(
                        key,
                        Problem::NotOneOf {
                            value: s.chars().take(40).collect(),
                            allowed: Status::NAMES,
                        },
                    )
                })?);
            }
            "description" => description = Some(cx.string(key, v)?.to_owned()),
            "level" => {
                let s = cx.string(key, v)?;
                level = Some(Level::parse(s).ok_or_else(|| {
                    cx.err(
                        key,
                        Problem::NotOneOf {
                            value: s.chars().take(40).collect(),
                            allowed: Level::NAMES,
                        },
                    )
                })?);
            }
            "tags" => tags = cx.strings(key, v)?,
            "author" | "date" | "modified" | "license" => {
                cx.string(key, v)?;
            }
            "references" | "falsepositives" => {
                cx.strings(key, v)?;
            }
            "logsource" => logsource = Some(v),
            "detection" => detection = Some(v),
            "correlation" => correlation = Some(v),
            other => return Err(cx.err(other, Problem::UnknownKey(other.to_owned()))),
        }
    }
    let id = id.ok_or_else(|| cx.err("(rule)", Problem::Missing("id")))?;
    let title = title.ok_or_else(|| cx.err("(rule)", Problem::Missing("title")))?;
    let level = level.ok_or_else(|| cx.err("(rule)", Problem::Missing("level")))?;
    let body = match (logsource, detection, correlation) {
        (Some(ls), Some(det), None) => {
            RuleBody::Detection(parse_detection(cx, parse_logsource(cx, ls)?, det)?)
        }
        (None, None, Some(c)) => RuleBody::Correlation(parse_correlation(cx, c)?),
        (_, _, Some(_)) => {
            return Err(cx.err(
                "correlation",
                Problem::Unsupported("a rule with both correlation and logsource/detection"),
            ));
        }
        (None, _, None) => return Err(cx.err("(rule)", Problem::Missing("logsource"))),
        (Some(_), None, None) => return Err(cx.err("(rule)", Problem::Missing("detection"))),
    };
    Ok(Rule {
        id,
        name,
        title,
        status,
        description,
        level,
        tags,
        file: cx.file.to_owned(),
        body,
    })
}

fn parse_logsource(cx: &Ctx<'_>, y: &Yaml) -> Result<Option<Category>, RuleError> {
    let mut product = None;
    let mut category = None;
    for (key, v) in cx.entries("logsource", y)? {
        let at = format!("logsource.{key}");
        match key {
            "product" => {
                let p = cx.string(&at, v)?;
                if p != "nitrile" {
                    return Err(cx.err(
                        at,
                        Problem::NotOneOf {
                            value: p.chars().take(40).collect(),
                            allowed: "nitrile",
                        },
                    ));
                }
                product = Some(p);
            }
            "category" => {
                let c = cx.string(&at, v)?;
                category = Some(
                    Category::ALL
                        .into_iter()
                        .find(|k| k.as_str() == c)
                        .ok_or_else(|| {
                            cx.err(
                                &at,
                                Problem::NotOneOf {
                                    value: c.chars().take(40).collect(),
                                    allowed: "record, integrity, checkpoint, journal_head",
                                },
                            )
                        })?,
                );
            }
            "definition" => {
                cx.string(&at, v)?;
            }
            other => return Err(cx.err(at, Problem::UnknownKey(other.to_owned()))),
        }
    }
    if product.is_none() {
        return Err(cx.err("logsource", Problem::Missing("product")));
    }
    Ok(category)
}

fn parse_detection(
    cx: &Ctx<'_>,
    category: Option<Category>,
    y: &Yaml,
) -> Result<Detection, RuleError> {
    let mut selections = Vec::new();
    let mut condition = None;
    for (key, v) in cx.entries("detection", y)? {
        let at = format!("detection.{key}");
        if key == "condition" {
            condition = Some(cx.string(&at, v)?);
            continue;
        }
        let ok_name = !key.is_empty()
            && key.len() <= 64
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok_name {
            return Err(cx.err(at, Problem::BadName(key.chars().take(80).collect())));
        }
        selections.push((key.to_owned(), parse_selection(cx, &at, v)?));
    }
    let text = condition.ok_or_else(|| cx.err("detection", Problem::Missing("condition")))?;
    let names: Vec<&str> = selections.iter().map(|(n, _)| n.as_str()).collect();
    let condition = parse_condition(text, &names).map_err(|p| cx.err("detection.condition", p))?;
    let mut used = vec![false; names.len()];
    condition.uses(&mut used);
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(cx.err(
            "detection.condition",
            Problem::UnusedSelection(names[i].to_owned()),
        ));
    }
    Ok(Detection {
        category,
        selections,
        condition,
    })
}

fn parse_selection(cx: &Ctx<'_>, at: &str, y: &Yaml) -> Result<Selection, RuleError> {
    match y {
        Yaml::Hash(_) => Ok(Selection(vec![parse_items(cx, at, y)?])),
        Yaml::Array(maps)
            if !maps.is_empty() && maps.iter().all(|m| matches!(m, Yaml::Hash(_))) =>
        {
            let alts = maps
                .iter()
                .map(|m| parse_items(cx, at, m))
                .collect::<Result<_, _>>()?;
            Ok(Selection(alts))
        }
        Yaml::Array(_) => Err(cx.err(
            at,
            Problem::Unsupported("keyword lists; a selection is a mapping or a list of mappings"),
        )),
        Yaml::Alias(_) => Err(cx.err(at, Problem::Alias)),
        _ => Err(cx.err(at, Problem::WrongType("a mapping of field to values"))),
    }
}

fn parse_items(cx: &Ctx<'_>, at: &str, y: &Yaml) -> Result<Vec<Item>, RuleError> {
    let entries = cx.entries(at, y)?;
    if entries.is_empty() {
        return Err(cx.err(at, Problem::WrongType("a non-empty mapping")));
    }
    entries
        .into_iter()
        .map(|(key, v)| parse_item(cx, &format!("{at}.{key}"), key, v))
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Exact,
    Contains,
    StartsWith,
    EndsWith,
    Re,
    Num(Cmp),
}

fn parse_item(cx: &Ctx<'_>, at: &str, key: &str, v: &Yaml) -> Result<Item, RuleError> {
    let mut parts = key.split('|');
    let field_name = parts.next().unwrap_or_default();
    let field = known_field(field_name)
        .ok_or_else(|| cx.err(at, Problem::UnknownField(field_name.to_owned())))?;
    let mut mode = Mode::Exact;
    let mut mode_name = "";
    let mut all = false;
    for m in parts {
        let next = match m {
            "contains" => Mode::Contains,
            "startswith" => Mode::StartsWith,
            "endswith" => Mode::EndsWith,
            "re" => Mode::Re,
            "gt" => Mode::Num(Cmp::Gt),
            "gte" => Mode::Num(Cmp::Gte),
            "lt" => Mode::Num(Cmp::Lt),
            "lte" => Mode::Num(Cmp::Lte),
            "all" => {
                all = true;
                continue;
            }
            other => return Err(cx.err(at, Problem::UnknownModifier(other.to_owned()))),
        };
        if mode != Mode::Exact {
            return Err(cx.err(
                at,
                Problem::ConflictingModifiers(mode_name.to_owned(), m.to_owned()),
            ));
        }
        mode = next;
        mode_name = m;
    }
    let scalars: Vec<&Yaml> = match v {
        Yaml::Array(a) if a.is_empty() => {
            return Err(cx.err(at, Problem::WrongType("at least one value")));
        }
        Yaml::Array(a) => a.iter().collect(),
        v => vec![v],
    };
    let patterns = scalars
        .into_iter()
        .map(|s| parse_pattern(cx, at, mode, s))
        .collect::<Result<_, _>>()?;
    Ok(Item {
        field,
        all,
        patterns,
    })
}

fn parse_pattern(cx: &Ctx<'_>, at: &str, mode: Mode, y: &Yaml) -> Result<Pattern, RuleError> {
    let text = match y {
        Yaml::Null if mode == Mode::Exact => return Ok(Pattern::Null),
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        Yaml::Real(r) => r.clone(),
        Yaml::Alias(_) => return Err(cx.err(at, Problem::Alias)),
        _ => return Err(cx.err(at, Problem::WrongType("a string, number or null"))),
    };
    Ok(match mode {
        Mode::Exact => Pattern::Glob(glob_of(&text, false, false)),
        Mode::Contains => Pattern::Glob(glob_of(&text, true, true)),
        Mode::StartsWith => Pattern::Glob(glob_of(&text, false, true)),
        Mode::EndsWith => Pattern::Glob(glob_of(&text, true, false)),
        Mode::Re => Pattern::Regex(
            regex::RegexBuilder::new(&text)
                .size_limit(MAX_REGEX_SIZE)
                .build()
                .map_err(|e| cx.err(at, Problem::BadRegex(e)))?,
        ),
        Mode::Num(cmp) => Pattern::Num(
            cmp,
            text.parse()
                .map_err(|_| cx.err(at, Problem::BadNumber(text.chars().take(40).collect())))?,
        ),
    })
}

/// Parses a Sigma condition over the selection `names`: selection names,
/// `and`, `or`, `not`, parentheses, `1 of <name>*|them`, `all of
/// <name>*|them`.
fn parse_condition(text: &str, names: &[&str]) -> Result<Condition, Problem> {
    if text.len() > MAX_CONDITION_LEN {
        return Err(Problem::ConditionTooComplex);
    }
    let spaced = text.replace('(', " ( ").replace(')', " ) ");
    let words: Vec<&str> = spaced.split_whitespace().collect();
    let mut p = CondParser {
        words: &words,
        pos: 0,
        names,
        depth: 0,
    };
    let c = p.or()?;
    if p.pos != words.len() {
        return Err(p.expected("`and`, `or` or the end"));
    }
    Ok(c)
}

struct CondParser<'a> {
    words: &'a [&'a str],
    pos: usize,
    names: &'a [&'a str],
    depth: usize,
}

impl<'a> CondParser<'a> {
    fn expected(&self, what: &'static str) -> Problem {
        Problem::Condition {
            at: self.pos + 1,
            expected: what,
        }
    }

    fn peek(&self) -> Option<&'a str> {
        self.words.get(self.pos).copied()
    }

    fn or(&mut self) -> Result<Condition, Problem> {
        let mut v = vec![self.and()?];
        while self.peek() == Some("or") {
            self.pos += 1;
            v.push(self.and()?);
        }
        Ok(if v.len() == 1 {
            v.remove(0)
        } else {
            Condition::Or(v)
        })
    }

    fn and(&mut self) -> Result<Condition, Problem> {
        let mut v = vec![self.not()?];
        while self.peek() == Some("and") {
            self.pos += 1;
            v.push(self.not()?);
        }
        Ok(if v.len() == 1 {
            v.remove(0)
        } else {
            Condition::And(v)
        })
    }

    fn not(&mut self) -> Result<Condition, Problem> {
        self.depth += 1;
        if self.depth > MAX_CONDITION_DEPTH {
            return Err(Problem::ConditionTooComplex);
        }
        let c = if self.peek() == Some("not") {
            self.pos += 1;
            Condition::Not(Box::new(self.not()?))
        } else {
            self.atom()?
        };
        self.depth -= 1;
        Ok(c)
    }

    fn atom(&mut self) -> Result<Condition, Problem> {
        let Some(w) = self.peek() else {
            return Err(self.expected("a selection, `not`, `(`, `1 of` or `all of`"));
        };
        self.pos += 1;
        match w {
            "(" => {
                let c = self.or()?;
                if self.peek() != Some(")") {
                    return Err(self.expected("`)`"));
                }
                self.pos += 1;
                Ok(c)
            }
            "1" | "all" => {
                if self.peek() != Some("of") {
                    return Err(self.expected("`of`"));
                }
                self.pos += 1;
                let Some(target) = self.peek() else {
                    return Err(self.expected("a selection pattern or `them`"));
                };
                self.pos += 1;
                let picked = self.pick(target)?;
                Ok(if w == "1" {
                    Condition::OneOf(picked)
                } else {
                    Condition::AllOf(picked)
                })
            }
            "and" | "or" | "of" | "them" | ")" => {
                self.pos -= 1;
                Err(self.expected("a selection, `not`, `(`, `1 of` or `all of`"))
            }
            name => self
                .names
                .iter()
                .position(|n| *n == name)
                .map(Condition::Sel)
                .ok_or_else(|| Problem::UnknownSelection(name.chars().take(80).collect())),
        }
    }

    /// The selections `them` (all but those starting with `_`) or a name
    /// with an optional trailing `*` picks.
    fn pick(&self, target: &str) -> Result<Vec<usize>, Problem> {
        let picked: Vec<usize> = if target == "them" {
            (0..self.names.len())
                .filter(|i| !self.names[*i].starts_with('_'))
                .collect()
        } else {
            let (prefix, wild) = match target.strip_suffix('*') {
                Some(p) => (p, true),
                None => (target, false),
            };
            if prefix.contains('*') {
                return Err(Problem::Unsupported(
                    "`*` other than at the end of a pattern",
                ));
            }
            (0..self.names.len())
                .filter(|i| {
                    if wild {
                        self.names[*i].starts_with(prefix)
                    } else {
                        self.names[*i] == prefix
                    }
                })
                .collect()
        };
        if picked.is_empty() {
            return Err(Problem::UnknownSelection(target.chars().take(80).collect()));
        }
        Ok(picked)
    }
}

/// Parses a Sigma timespan, `<n>s|m|h|d` (one number, one unit:
/// [`DurationSyntax::SINGLE`]), into seconds, positive and at most
/// [`MAX_TIMESPAN_SECS`].
pub fn parse_timespan(s: &str) -> Result<u64, Problem> {
    let syntax = DurationSyntax::SINGLE
        .positive()
        .at_most(Duration::from_secs(MAX_TIMESPAN_SECS));
    parse_duration(s, syntax)
        .map(|d| d.as_secs())
        .map_err(|_| Problem::BadTimespan(s.chars().take(40).collect()))
}

fn parse_correlation(cx: &Ctx<'_>, y: &Yaml) -> Result<Correlation, RuleError> {
    let mut kind = None;
    let mut rules = None;
    let mut group_by = Vec::new();
    let mut timespan = None;
    let mut condition = None;
    let mut generate = false;
    let field_of = |at: &str, name: &str| {
        known_field(name).ok_or_else(|| cx.err(at, Problem::UnknownField(name.to_owned())))
    };
    for (key, v) in cx.entries("correlation", y)? {
        let at = format!("correlation.{key}");
        match key {
            "type" => {
                kind = Some(match cx.string(&at, v)? {
                    "event_count" => CorrelationType::EventCount,
                    "value_count" => CorrelationType::ValueCount,
                    "temporal" | "temporal_ordered" | "value_sum" | "value_avg"
                    | "value_percentile" | "value_median" => {
                        return Err(cx.err(at, Problem::Unsupported("this correlation type")));
                    }
                    other => {
                        return Err(cx.err(
                            at,
                            Problem::NotOneOf {
                                value: other.chars().take(40).collect(),
                                allowed: "event_count, value_count",
                            },
                        ));
                    }
                });
            }
            "rules" => {
                let r = match v {
                    Yaml::String(s) => vec![s.clone()],
                    v => cx.strings(&at, v)?,
                };
                if r.is_empty() {
                    return Err(cx.err(at, Problem::WrongType("at least one rule")));
                }
                rules = Some(r);
            }
            "group-by" => {
                group_by = cx
                    .strings(&at, v)?
                    .iter()
                    .map(|f| field_of(&at, f))
                    .collect::<Result<_, _>>()?;
            }
            "timespan" => {
                if let Yaml::Integer(n) = v {
                    return Err(cx.err(at, Problem::BadTimespan(n.to_string())));
                }
                let s = cx.string(&at, v)?;
                timespan = Some(parse_timespan(s).map_err(|p| cx.err(&at, p))?);
            }
            "generate" => match v {
                Yaml::Boolean(b) => generate = *b,
                _ => return Err(cx.err(at, Problem::WrongType("true or false"))),
            },
            "condition" => condition = Some(parse_threshold(cx, &at, v, &field_of)?),
            other => return Err(cx.err(at, Problem::UnknownKey(other.to_owned()))),
        }
    }
    let kind = kind.ok_or_else(|| cx.err("correlation", Problem::Missing("type")))?;
    let rules = rules.ok_or_else(|| cx.err("correlation", Problem::Missing("rules")))?;
    let timespan_secs =
        timespan.ok_or_else(|| cx.err("correlation", Problem::Missing("timespan")))?;
    let (min_count, field) =
        condition.ok_or_else(|| cx.err("correlation", Problem::Missing("condition")))?;
    match (kind, field) {
        (CorrelationType::ValueCount, None) => {
            return Err(cx.err("correlation.condition", Problem::Missing("field")));
        }
        (CorrelationType::EventCount, Some(_)) => {
            return Err(cx.err(
                "correlation.condition.field",
                Problem::Unsupported("`field` outside value_count"),
            ));
        }
        _ => {}
    }
    Ok(Correlation {
        kind,
        rules,
        group_by,
        timespan_secs,
        min_count,
        field,
        generate,
    })
}

type FieldOf<'a> = dyn Fn(&str, &str) -> Result<&'static str, RuleError> + 'a;

fn parse_threshold(
    cx: &Ctx<'_>,
    at: &str,
    y: &Yaml,
    field_of: &FieldOf<'_>,
) -> Result<(u64, Option<&'static str>), RuleError> {
    let mut min = None;
    let mut field = None;
    for (key, v) in cx.entries(at, y)? {
        let at = format!("{at}.{key}");
        match key {
            "gte" | "gt" => {
                let n = match v {
                    Yaml::Integer(n) => *n,
                    _ => return Err(cx.err(at, Problem::WrongType("an integer"))),
                };
                let n = if key == "gt" { n.saturating_add(1) } else { n };
                if !(1..=MAX_THRESHOLD as i64).contains(&n) || min.is_some() {
                    return Err(cx.err(at, Problem::BadNumber(n.to_string())));
                }
                min = Some(n as u64);
            }
            "lt" | "lte" | "eq" | "neq" => {
                return Err(cx.err(at, Problem::Unsupported("conditions other than gte and gt")));
            }
            "field" => field = Some(field_of(&at, cx.string(&at, v)?)?),
            other => return Err(cx.err(at, Problem::UnknownKey(other.to_owned()))),
        }
    }
    let min = min.ok_or_else(|| cx.err(at, Problem::Missing("gte")))?;
    Ok((min, field))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(p: &str) -> Vec<Tok> {
        glob_of(p, false, false)
    }

    fn gm(p: &str, s: &str) -> bool {
        let chars: Vec<char> = s.chars().flat_map(char::to_lowercase).collect();
        glob_match(&toks(p), &chars)
    }

    #[test]
    fn globs() {
        assert!(gm("host.*", "host.drain"));
        assert!(gm("HOST.Drain", "host.drain"));
        assert!(!gm("host.*", "instance.stop"));
        assert!(gm("*a*b?", "xxaxxbz"));
        assert!(!gm("*a*b?", "xxaxxb"));
        assert!(gm(r"a\*", "a*"));
        assert!(!gm(r"a\*", "ab"));
        assert!(gm("", ""));
        assert!(gm("*", ""));
    }

    #[test]
    fn conditions() {
        let names = ["sel_a", "sel_b", "filter", "_hidden"];
        let c = parse_condition("sel_a and not filter", &names).unwrap();
        assert!(c.eval(&[true, false, false, false]));
        assert!(!c.eval(&[true, false, true, false]));
        let c = parse_condition("1 of sel_* and not (filter or _hidden)", &names).unwrap();
        assert!(c.eval(&[false, true, false, false]));
        assert!(!c.eval(&[false, true, false, true]));
        let c = parse_condition("all of them", &names).unwrap();
        assert!(c.eval(&[true, true, true, false]));
        assert!(!c.eval(&[true, false, true, true]));
        assert!(matches!(
            parse_condition("sel_a and", &names),
            Err(Problem::Condition { at: 3, .. })
        ));
        assert!(matches!(
            parse_condition("nope", &names),
            Err(Problem::UnknownSelection(_))
        ));
        assert!(matches!(
            parse_condition("1 of x*", &names),
            Err(Problem::UnknownSelection(_))
        ));
        assert!(matches!(
            parse_condition("(sel_a", &names),
            Err(Problem::Condition { .. })
        ));
        let deep = format!("{}sel_a{}", "(".repeat(40), ")".repeat(40));
        assert_eq!(
            parse_condition(&deep, &names).unwrap_err(),
            Problem::ConditionTooComplex
        );
    }

    #[test]
    fn timespans() {
        assert_eq!(parse_timespan("10m"), Ok(600));
        assert_eq!(parse_timespan("1m"), Ok(60));
        assert_eq!(parse_timespan("30s"), Ok(30));
        assert_eq!(parse_timespan("7d"), Ok(7 * 86400));
        for bad in [
            "",
            "m",
            "0m",
            "8d",
            "10",
            "1.5m",
            "-1m",
            "10M",
            "1w",
            "9999999999s",
        ] {
            assert!(parse_timespan(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids() {
        assert!(RuleId::parse("62b02c87-9cc0-451b-924a-2c7580b3db35").is_ok());
        assert!(RuleId::parse("62B02C87-9cc0-451b-924a-2c7580b3db35").is_err());
        assert!(RuleId::parse("refusal-burst").is_err());
    }
}
