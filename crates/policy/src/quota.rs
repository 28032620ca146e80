//! Quotas: at most N distinct resources per (group, operation) in a sliding
//! time window, charged durably in SQLite; counted for the group as a whole,
//! or for each principal of the group apart (`per = "principal"`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nitrile_api::{Name, Operation, PrincipalId, ResourceId};
use nitrile_fs::duration::{DurationSyntax, format_duration, parse_duration};
use rusqlite::{Connection, TransactionBehavior, params};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::{Location, PolicyError};

/// Largest `max_resources` a quota may have.
pub const MAX_QUOTA_LIMIT: u32 = 1_000_000;
/// Longest quota window: 31 days.
pub const MAX_QUOTA_WINDOW_SECS: u64 = 31 * 24 * 3600;

/// Why a quota in `quotas.toml` is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaProblem {
    /// the group is not listed in any entities file
    #[error("quota names group {0:?}, which no entities file lists")]
    UnknownGroup(String),
    /// the operation is not one of the closed set
    #[error("quota names unknown operation {0:?}")]
    UnknownOperation(String),
    /// `max_resources` is zero or negative
    #[error("max_resources must be at least 1 (to forbid an operation, remove its permit)")]
    NonPositiveLimit,
    /// `max_resources` is over [`MAX_QUOTA_LIMIT`]
    #[error("max_resources must be at most {MAX_QUOTA_LIMIT}")]
    LimitTooLarge,
    /// the window is not `<number><s|m|h|d>` with a positive number
    #[error("window {0:?} must be a positive number followed by s, m, h or d, e.g. \"1h\"")]
    BadWindow(String),
    /// the window is longer than [`MAX_QUOTA_WINDOW_SECS`]
    #[error("window must be at most 31d")]
    WindowTooLong,
    /// a second quota for the same group and operation
    #[error("a quota for this group and operation is already defined at line {0}")]
    Duplicate(usize),
    /// `per` is neither `group` nor `principal`
    #[error("per {0:?} must be \"group\" (the default) or \"principal\"")]
    BadPer(String),
}

/// Whom a quota counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum QuotaPer {
    /// The group as a whole: every member's charges count together.
    #[default]
    Group,
    /// Each principal of the group apart (a customer's own quota).
    Principal,
}

impl QuotaPer {
    /// The word of `quotas.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Group => "group",
            Self::Principal => "principal",
        }
    }
}

/// A quota window, a positive number of whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QuotaWindow(u64);

impl QuotaWindow {
    /// Parses `30s`, `15m`, `1h`, `7d`: one number and one unit
    /// ([`DurationSyntax::SINGLE`]), positive, at most 31 days.
    pub fn parse(s: &str) -> Result<Self, QuotaProblem> {
        let d = parse_duration(s, DurationSyntax::SINGLE)
            .map_err(|_| QuotaProblem::BadWindow(s.chars().take(40).collect()))?;
        Self::from_secs(d.as_secs())
    }

    /// A window of `secs` seconds.
    pub fn from_secs(secs: u64) -> Result<Self, QuotaProblem> {
        if secs == 0 {
            return Err(QuotaProblem::BadWindow("0".to_owned()));
        }
        if secs > MAX_QUOTA_WINDOW_SECS {
            return Err(QuotaProblem::WindowTooLong);
        }
        Ok(Self(secs))
    }

    /// The window in seconds.
    pub fn as_secs(self) -> u64 {
        self.0
    }

    /// The window as a duration.
    pub fn as_duration(self) -> Duration {
        Duration::from_secs(self.0)
    }
}

impl fmt::Display for QuotaWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.as_duration(), DurationSyntax::SINGLE))
    }
}

/// At most `max_resources` distinct resources per `window` for `operation`
/// under `group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    /// The group acted as.
    pub group: Name,
    /// The operation.
    pub operation: Operation,
    /// Most distinct resources in any window.
    pub max_resources: u32,
    /// The sliding window.
    pub window: QuotaWindow,
    /// Whom it counts for: the group, or each of its principals apart.
    pub per: QuotaPer,
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} at most {} resource(s) per {}",
            self.group, self.operation, self.max_resources, self.window
        )?;
        if self.per == QuotaPer::Principal {
            f.write_str(" for each principal")?;
        }
        Ok(())
    }
}

/// The quotas of a bundle, at most one per (group, operation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas {
    by_key: BTreeMap<(Name, Operation), Quota>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotasFile {
    #[serde(default)]
    quota: Vec<toml::Spanned<QuotaEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaEntry {
    group: toml::Spanned<String>,
    operation: toml::Spanned<String>,
    max_resources: toml::Spanned<i64>,
    window: toml::Spanned<String>,
    #[serde(default)]
    per: Option<toml::Spanned<String>>,
}

impl Quotas {
    /// Quotas from a list; a later quota for the same (group, operation)
    /// replaces an earlier one. For tools and tests; bundles are parsed strictly.
    pub fn from_quotas(quotas: impl IntoIterator<Item = Quota>) -> Self {
        Self {
            by_key: quotas
                .into_iter()
                .map(|q| ((q.group.clone(), q.operation), q))
                .collect(),
        }
    }

    /// The quota on `operation` under `group`, if any.
    pub fn get(&self, group: &Name, operation: Operation) -> Option<&Quota> {
        self.by_key.get(&(group.clone(), operation))
    }

    /// Every quota, by group then operation.
    pub fn iter(&self) -> impl Iterator<Item = &Quota> {
        self.by_key.values()
    }

    pub(crate) fn parse(
        file: &str,
        text: &str,
        groups: &BTreeSet<Name>,
    ) -> Result<Self, PolicyError> {
        let parsed: QuotasFile =
            toml::from_str(text).map_err(|source| PolicyError::QuotaSyntax {
                at: match source.span() {
                    Some(span) => Location::at_offset(file, text, span.start),
                    None => Location::line(file, 1),
                },
                source: Box::new(source),
            })?;
        let at = |span: std::ops::Range<usize>| Location::at_offset(file, text, span.start);
        let mut by_key = BTreeMap::new();
        let mut lines: HashMap<(Name, Operation), usize> = HashMap::new();
        for entry in parsed.quota {
            let entry_at = at(entry.span());
            let e = entry.into_inner();
            let problem = |span, problem| PolicyError::Quota {
                at: at(span),
                problem,
            };
            let group = Name::new(e.group.get_ref())
                .ok()
                .filter(|g| groups.contains(g))
                .ok_or_else(|| {
                    problem(
                        e.group.span(),
                        QuotaProblem::UnknownGroup(e.group.get_ref().chars().take(80).collect()),
                    )
                })?;
            let operation: Operation = e.operation.get_ref().parse().map_err(|_| {
                problem(
                    e.operation.span(),
                    QuotaProblem::UnknownOperation(
                        e.operation.get_ref().chars().take(80).collect(),
                    ),
                )
            })?;
            let limit = *e.max_resources.get_ref();
            if limit <= 0 {
                return Err(problem(
                    e.max_resources.span(),
                    QuotaProblem::NonPositiveLimit,
                ));
            }
            let max_resources = u32::try_from(limit)
                .ok()
                .filter(|l| *l <= MAX_QUOTA_LIMIT)
                .ok_or_else(|| problem(e.max_resources.span(), QuotaProblem::LimitTooLarge))?;
            let window =
                QuotaWindow::parse(e.window.get_ref()).map_err(|p| problem(e.window.span(), p))?;
            let per = match &e.per {
                None => QuotaPer::Group,
                Some(p) => match p.get_ref().as_str() {
                    "group" => QuotaPer::Group,
                    "principal" => QuotaPer::Principal,
                    other => {
                        return Err(problem(
                            p.span(),
                            QuotaProblem::BadPer(other.chars().take(40).collect()),
                        ));
                    }
                },
            };
            let key = (group.clone(), operation);
            if let Some(first) = lines.get(&key) {
                return Err(PolicyError::Quota {
                    at: entry_at,
                    problem: QuotaProblem::Duplicate(*first),
                });
            }
            lines.insert(key.clone(), entry_at.line);
            by_key.insert(
                key,
                Quota {
                    group,
                    operation,
                    max_resources,
                    window,
                    per,
                },
            );
        }
        Ok(Self { by_key })
    }
}

/// A successful charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaCharge {
    /// The quota charged, or `None` when no quota applies.
    pub quota: Option<Quota>,
    /// Resources that were not already charged inside the window.
    pub newly_charged: usize,
    /// Distinct resources inside the window after this charge.
    pub in_use: usize,
}

/// A request refused because a quota is exhausted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "quota exhausted: {quota}; {in_use} in use, {requested_new} more requested{}",
    frees_note(self.frees_at)
)]
pub struct QuotaExceeded {
    /// The quota that refused.
    pub quota: Quota,
    /// Distinct resources charged inside the window now.
    pub in_use: usize,
    /// Resources of the request that are not already charged.
    pub requested_new: usize,
    /// When enough charges leave the window for this request to fit, or
    /// `None` if the request asks for more resources than the quota allows.
    pub frees_at: Option<OffsetDateTime>,
}

fn frees_note(at: Option<OffsetDateTime>) -> String {
    match at {
        Some(t) => format!("; enough frees at unix time {}", t.unix_timestamp()),
        None => "; the request names more resources than the quota allows at all".to_owned(),
    }
}

impl QuotaExceeded {
    /// How long to wait from `now` before retrying, if waiting can help.
    pub fn retry_after(&self, now: OffsetDateTime) -> Option<Duration> {
        let at = self.frees_at?;
        let secs = (at - now).whole_seconds().max(0);
        Some(Duration::from_secs(secs.unsigned_abs()))
    }
}

/// Why a charge did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaError {
    /// the quota is exhausted (the caller's request is refused)
    #[error(transparent)]
    Exceeded(#[from] QuotaExceeded),
    /// the quota store failed; nothing was charged and the request must be refused
    #[error("quota store failed")]
    Store(#[from] rusqlite::Error),
    /// the charge could not be made durable; it still counts against the
    /// quota in memory, so the request must be refused
    #[error("quota store could not commit the charge")]
    Persist(#[source] Arc<rusqlite::Error>),
    /// the quota store lock was poisoned by a panic in another thread
    #[error("quota store lock poisoned")]
    Poisoned,
}

/// Most charges the writer commits in one SQLite transaction.
const MAX_COMMIT_BATCH: usize = 512;

/// Durable quota counters in one SQLite file, with group commit.
///
/// Decisions are made against an in-memory copy of the charges inside the
/// window (loaded from the file at open), under one lock, so concurrent
/// requests see each other's charges at once. A charge is then handed to one
/// writer thread that commits everything queued in one transaction (WAL,
/// `synchronous=FULL`: one fsync for many charges), and `try_charge` returns
/// `Ok` only once its transaction is durable. If a commit fails, the callers
/// of that batch get [`QuotaError::Persist`] and the charges stay counted in
/// memory: a failure can only make the quota stricter, never looser.
#[derive(Debug)]
pub struct QuotaStore {
    memory: Mutex<Memory>,
    writer: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Charges inside their windows, per (group, operation): resource -> time.
type Memory = HashMap<(String, String), BTreeMap<String, i64>>;

/// The charges of one request for one (counter, operation).
struct JobCharge {
    /// The group, or `<group> <principal uri>` for a quota per principal.
    counter: String,
    operation: String,
    resources: Vec<String>,
    cutoff: i64,
}

/// The charges of one request: committed in one transaction.
struct Job {
    charges: Vec<JobCharge>,
    at: i64,
    done: std::sync::mpsc::SyncSender<Result<(), Arc<rusqlite::Error>>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("charges", &self.charges.len())
            .finish_non_exhaustive()
    }
}

impl QuotaStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, QuotaError> {
        let conn = Connection::open(path)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(QuotaError::Store(rusqlite::Error::InvalidQuery));
        }
        conn.execute_batch(
            "PRAGMA synchronous=FULL;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS quota_charges (
                 grp TEXT NOT NULL,
                 op TEXT NOT NULL,
                 resource TEXT NOT NULL,
                 charged_at INTEGER NOT NULL,
                 PRIMARY KEY (grp, op, resource)
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS quota_charges_time
                 ON quota_charges (grp, op, charged_at);",
        )?;
        let mut memory: Memory = HashMap::new();
        {
            let mut stmt =
                conn.prepare("SELECT grp, op, resource, charged_at FROM quota_charges")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            for row in rows {
                let (g, o, res, at) = row?;
                memory.entry((g, o)).or_default().insert(res, at);
            }
        }
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("quota-writer".into())
            .spawn(move || writer(conn, rx))
            .map_err(|_| QuotaError::Poisoned)?;
        Ok(Self {
            memory: Mutex::new(memory),
            writer: Some(tx),
            thread: Some(thread),
        })
    }

    /// Charges `resources` for `operation` under `group` at time `now`:
    /// [`QuotaStore::try_charge_request`] for one operation.
    pub fn try_charge(
        &self,
        quotas: &Quotas,
        group: &Name,
        operation: Operation,
        resources: &[ResourceId],
        now: OffsetDateTime,
    ) -> Result<QuotaCharge, QuotaError> {
        let mut charges = self.try_charge_request(quotas, group, &[operation], resources, now)?;
        Ok(charges.pop().unwrap_or(QuotaCharge {
            quota: None,
            newly_charged: 0,
            in_use: 0,
        }))
    }

    /// Charges `resources` for every one of `operations` under `group` at
    /// time `now`, all or nothing: one charge per operation, in order.
    ///
    /// Resources already charged inside a window do not count again (their
    /// charge time moves to `now`). Every (operation, resource) charge is
    /// checked against its quota under one lock before any is made: if one
    /// would exceed its quota, nothing of the request is charged and
    /// [`QuotaError::Exceeded`] says which quota (the first that refuses, in
    /// the order of `operations`) and when it frees. The charges are then
    /// committed together, in one SQLite transaction; this returns once they
    /// are durable. Operations without a quota for `group` record nothing.
    ///
    /// Without the principal, a quota per principal counts the whole group
    /// together (stricter, never looser): a service that knows who asks
    /// calls [`QuotaStore::try_charge_request_as`].
    pub fn try_charge_request(
        &self,
        quotas: &Quotas,
        group: &Name,
        operations: &[Operation],
        resources: &[ResourceId],
        now: OffsetDateTime,
    ) -> Result<Vec<QuotaCharge>, QuotaError> {
        self.charge(quotas, group, None, operations, resources, now)
    }

    /// [`QuotaStore::try_charge_request`] for `principal`, a member of
    /// `group`: a quota with `per = "principal"` counts `principal`'s
    /// charges alone, apart from every other member's.
    pub fn try_charge_request_as(
        &self,
        quotas: &Quotas,
        group: &Name,
        principal: &PrincipalId,
        operations: &[Operation],
        resources: &[ResourceId],
        now: OffsetDateTime,
    ) -> Result<Vec<QuotaCharge>, QuotaError> {
        self.charge(quotas, group, Some(principal), operations, resources, now)
    }

    fn charge(
        &self,
        quotas: &Quotas,
        group: &Name,
        principal: Option<&PrincipalId>,
        operations: &[Operation],
        resources: &[ResourceId],
        now: OffsetDateTime,
    ) -> Result<Vec<QuotaCharge>, QuotaError> {
        let now_s = now.unix_timestamp();
        let requested: BTreeSet<String> = resources.iter().map(ToString::to_string).collect();
        let mut seen = BTreeSet::new();
        // The quotas that apply, each once even if an operation is repeated.
        let applying: Vec<(Operation, Option<&Quota>)> = operations
            .iter()
            .map(|&op| (op, seen.insert(op).then(|| quotas.get(group, op)).flatten()))
            .collect();

        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let results = {
            let mut memory = self.memory.lock().map_err(|_| QuotaError::Poisoned)?;
            // First pass: decide every charge; nothing changes on a refusal.
            let mut decided = Vec::with_capacity(applying.len());
            for &(operation, quota) in &applying {
                let Some(quota) = quota else {
                    decided.push(None);
                    continue;
                };
                let window = i64::try_from(quota.window.as_secs()).unwrap_or(i64::MAX);
                let cutoff = now_s.saturating_sub(window);
                let key = (
                    counter(quota, group, principal),
                    operation.as_str().to_owned(),
                );
                let empty = BTreeMap::new();
                let charges = memory.get(&key).unwrap_or(&empty);
                let live = |at: &i64| *at > cutoff;
                let in_window = charges.values().filter(|t| live(t)).count();
                let new = requested
                    .iter()
                    .filter(|r| !charges.get(*r).is_some_and(live))
                    .count();
                let total = in_window + new;
                let limit = quota.max_resources as usize;
                if total > limit {
                    // Which charges must leave the window: the oldest of those
                    // this request does not renew.
                    let mut others: Vec<i64> = charges
                        .iter()
                        .filter(|(r, t)| live(t) && !requested.contains(*r))
                        .map(|(_, t)| *t)
                        .collect();
                    others.sort_unstable();
                    let need = total - limit;
                    let frees_at = if requested.len() > limit {
                        None
                    } else {
                        others
                            .get(need - 1)
                            .and_then(|t| t.checked_add(window))
                            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
                    };
                    return Err(QuotaExceeded {
                        quota: quota.clone(),
                        in_use: in_window,
                        requested_new: new,
                        frees_at,
                    }
                    .into());
                }
                decided.push(Some((quota, key, cutoff, new, total)));
            }
            // Second pass: none refused, so charge them all.
            let mut job_charges = Vec::new();
            let mut results = Vec::with_capacity(decided.len());
            for d in decided {
                let Some((quota, key, cutoff, new, total)) = d else {
                    results.push(QuotaCharge {
                        quota: None,
                        newly_charged: 0,
                        in_use: 0,
                    });
                    continue;
                };
                let charges = memory.entry(key.clone()).or_default();
                charges.retain(|_, at| *at > cutoff);
                for r in &requested {
                    let at = charges.entry(r.clone()).or_insert(now_s);
                    *at = (*at).max(now_s);
                }
                job_charges.push(JobCharge {
                    counter: key.0,
                    operation: key.1,
                    resources: requested.iter().cloned().collect(),
                    cutoff,
                });
                results.push(QuotaCharge {
                    quota: Some(quota.clone()),
                    newly_charged: new,
                    in_use: total,
                });
            }
            if job_charges.is_empty() {
                return Ok(results);
            }
            // Queued under the lock, so the file sees charges in the order
            // they were decided; one job, so one transaction.
            let job = Job {
                charges: job_charges,
                at: now_s,
                done: done_tx,
            };
            self.writer
                .as_ref()
                .and_then(|w| w.send(job).ok())
                .ok_or(QuotaError::Poisoned)?;
            results
        };
        match done_rx.recv() {
            Ok(Ok(())) => Ok(results),
            Ok(Err(e)) => Err(QuotaError::Persist(e)),
            Err(_) => Err(QuotaError::Poisoned),
        }
    }

    /// Distinct resources charged for `operation` under `group` inside the
    /// window that ends at `now` (for tests and tools).
    pub fn in_use(
        &self,
        quotas: &Quotas,
        group: &Name,
        operation: Operation,
        now: OffsetDateTime,
    ) -> Result<usize, QuotaError> {
        self.counted(quotas, group, None, operation, now)
    }

    /// Distinct resources charged for `operation` under `group` to
    /// `principal` (all of the group's when the quota is not per principal).
    pub fn in_use_as(
        &self,
        quotas: &Quotas,
        group: &Name,
        principal: &PrincipalId,
        operation: Operation,
        now: OffsetDateTime,
    ) -> Result<usize, QuotaError> {
        self.counted(quotas, group, Some(principal), operation, now)
    }

    fn counted(
        &self,
        quotas: &Quotas,
        group: &Name,
        principal: Option<&PrincipalId>,
        operation: Operation,
        now: OffsetDateTime,
    ) -> Result<usize, QuotaError> {
        let Some(quota) = quotas.get(group, operation) else {
            return Ok(0);
        };
        let window = i64::try_from(quota.window.as_secs()).unwrap_or(i64::MAX);
        let cutoff = now.unix_timestamp().saturating_sub(window);
        let memory = self.memory.lock().map_err(|_| QuotaError::Poisoned)?;
        Ok(memory
            .get(&(
                counter(quota, group, principal),
                operation.as_str().to_owned(),
            ))
            .map_or(0, |c| c.values().filter(|at| **at > cutoff).count()))
    }
}

impl Drop for QuotaStore {
    fn drop(&mut self) {
        drop(self.writer.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The counter a quota charges: the group, or for a quota per principal
/// `<group> <principal uri>` (a space is in no name, so no group's counter
/// is a principal's). Without the principal, the group's.
fn counter(quota: &Quota, group: &Name, principal: Option<&PrincipalId>) -> String {
    match (quota.per, principal) {
        (QuotaPer::Principal, Some(p)) => format!("{group} {p}"),
        _ => group.as_str().to_owned(),
    }
}

/// The writer thread: commits every queued charge in one transaction.
fn writer(mut conn: Connection, rx: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_COMMIT_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = commit(&mut conn, &batch).map_err(Arc::new);
        for job in batch {
            let _ = job.done.send(result.clone());
        }
    }
}

fn commit(conn: &mut Connection, batch: &[Job]) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO quota_charges (grp, op, resource, charged_at)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (grp, op, resource)
             DO UPDATE SET charged_at = max(charged_at, excluded.charged_at)",
        )?;
        let mut expire = tx.prepare_cached(
            "DELETE FROM quota_charges WHERE grp = ?1 AND op = ?2 AND charged_at <= ?3",
        )?;
        for job in batch {
            for c in &job.charges {
                for r in &c.resources {
                    upsert.execute(params![c.counter, c.operation, r, job.at])?;
                }
                expire.execute(params![c.counter, c.operation, c.cutoff])?;
            }
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_print() {
        assert_eq!(QuotaWindow::parse("1h").unwrap().as_secs(), 3600);
        assert_eq!(QuotaWindow::parse("90m").unwrap().to_string(), "90m");
        assert_eq!(QuotaWindow::parse("120m").unwrap().to_string(), "2h");
        assert_eq!(QuotaWindow::parse("45s").unwrap().to_string(), "45s");
        assert_eq!(QuotaWindow::parse("31d").unwrap().to_string(), "31d");
        for bad in ["", "h", "0h", "1", "1w", "-1h", "1.5h", " 1h", "1H", "32d"] {
            assert!(QuotaWindow::parse(bad).is_err(), "{bad:?}");
        }
    }
}
