//! Integrity alerts and the hooks that see what logd ingests.
//!
//! logd raises an [`Alert`] itself for every integrity problem it can see: a
//! gap or a chain break in a shipped journal, a source shipping another
//! journal or a journal not its own, a record too large to log, a checkpoint
//! that does not advance or cannot get its witness quorum. Each alert is
//! written as a record into logd's own journal (so it enters the log), kept
//! for `GET /v1/alerts`, printed as one JSON line on stdout
//! ([`StdoutAlerts`]), posted to a webhook if one is configured
//! ([`WebhookAlerts`]), and handed to every [`AlertSink`] and [`Observer`].
//! Alerts carry names, numbers and hashes, nothing secret. The alert itself
//! ([`Alert`], [`AlertKind`], [`AlertPage`]) is a wire type of the log
//! client ([`nitrile_logclient::alert`]): sources raise it too, auditors
//! list it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use nitrile_audit::AuditRecord;
pub use nitrile_logclient::alert::{ALERT_DETAIL_KEY, Alert, AlertKind, AlertPage};
use nitrile_logclient::leaf::LeafV1;

/// Most alerts of one kind kept for `GET /v1/alerts`; past it, the entry of
/// that kind raised longest ago is dropped. Kinds are counted apart, so a
/// flood of one kind never evicts an alert of another.
pub const MAX_ALERTS_PER_KIND: usize = 1024;
/// Most alerts one page of `GET /v1/alerts/<after>` holds.
pub const MAX_ALERTS_PER_READ: usize = 256;
/// A repeated alert is delivered again (journaled, printed, posted) at most
/// this often; the repeats in between are counted on its entry.
pub const ALERT_REPEAT_INTERVAL: time::Duration = time::Duration::seconds(60);
/// Most alert deliveries per subject per [`ALERT_RATE_WINDOW`]; more are
/// kept and counted in the list, and delivered once the window allows.
pub const MAX_DELIVERIES_PER_SUBJECT: u32 = 20;
/// The window of [`MAX_DELIVERIES_PER_SUBJECT`].
pub const ALERT_RATE_WINDOW: time::Duration = time::Duration::seconds(60);
/// Most subjects whose delivery rate is tracked at once.
const MAX_RATED_SUBJECTS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AlertKey {
    kind: AlertKind,
    subject: String,
    topic: String,
}

impl AlertKey {
    fn of(a: &Alert) -> Self {
        Self {
            kind: a.kind,
            subject: a.subject().to_owned(),
            topic: a.topic(),
        }
    }
}

#[derive(Debug)]
struct Entry {
    alert: Alert,
    /// Raised since it was last delivered.
    pending: u64,
    last_delivered: Option<time::OffsetDateTime>,
}

/// The alerts logd serves, deduplicated and rate-limited (no I/O).
///
/// An alert raised again (same kind, subject and topic: see
/// [`Alert::subject`], [`Alert::topic`]) is not listed twice: its entry
/// counts it, takes its time and detail, and moves to the end of the list.
/// Each kind keeps at most [`MAX_ALERTS_PER_KIND`] entries. Delivery
/// (journal, stdout, webhook, monitor) happens for a new alert, and for a
/// repeated one at most every [`ALERT_REPEAT_INTERVAL`] with the count of
/// its repeats, and at most [`MAX_DELIVERIES_PER_SUBJECT`] times per
/// subject per window; what is held back stays in the list and is delivered
/// by [`AlertTable::due`] later. The list is read in pages by cursor
/// ([`AlertTable::page`]), so no alert is hidden by the size of the answer.
#[derive(Debug, Default)]
pub struct AlertTable {
    entries: std::collections::HashMap<AlertKey, Entry>,
    /// Cursor -> key, in list order.
    order: std::collections::BTreeMap<u64, AlertKey>,
    per_kind: std::collections::HashMap<AlertKind, usize>,
    next_cursor: u64,
    /// Deliveries per subject in the current window: (window start, count).
    rates: std::collections::HashMap<String, (time::OffsetDateTime, u32)>,
}

/// An alert as the table holds it after one more raise.
#[derive(Debug, Clone, PartialEq)]
pub struct Raised {
    /// The entry as it stands (count, times, cursor).
    pub alert: Alert,
    /// Whether to deliver it now (journal, sinks).
    pub deliver: bool,
}

impl AlertTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many alerts it lists.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it lists none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn allow_delivery(&mut self, subject: &str, now: time::OffsetDateTime) -> bool {
        if !self.rates.contains_key(subject) && self.rates.len() >= MAX_RATED_SUBJECTS {
            self.rates
                .retain(|_, (start, _)| now - *start < ALERT_RATE_WINDOW);
        }
        let slot = self.rates.entry(subject.to_owned()).or_insert((now, 0));
        if now - slot.0 >= ALERT_RATE_WINDOW {
            *slot = (now, 0);
        }
        if slot.1 >= MAX_DELIVERIES_PER_SUBJECT {
            return false;
        }
        slot.1 += 1;
        true
    }

    fn move_to_end(&mut self, key: &AlertKey, old_cursor: u64) -> u64 {
        self.order.remove(&old_cursor);
        self.next_cursor += 1;
        self.order.insert(self.next_cursor, key.clone());
        self.next_cursor
    }

    /// Notes that `alert` was raised (once) at `now`: the entry as it
    /// stands now (its count and times), and whether to deliver it now (a
    /// new alert, or a repeat whose time has come).
    pub fn raise(&mut self, alert: Alert, now: time::OffsetDateTime) -> Raised {
        let key = AlertKey::of(&alert);
        let deliver = self.note(alert, Some(now));
        let alert = self
            .entries
            .get(&key)
            .map(|e| e.alert.clone())
            .unwrap_or_else(|| unreachable!("the entry was just written"));
        Raised { alert, deliver }
    }

    /// Puts back an alert as a journal record kept it (its count and times
    /// as they stood then), when the table is rebuilt from the journal.
    pub fn restore(&mut self, alert: Alert) {
        let _ = self.note(alert, None);
    }

    /// Raises (`now` given: counts one more) or restores (`now` absent:
    /// takes the alert's own count and times) an alert; whether to deliver.
    fn note(&mut self, mut alert: Alert, now: Option<time::OffsetDateTime>) -> bool {
        let key = AlertKey::of(&alert);
        if let Some(mut e) = self.entries.remove(&key) {
            match now {
                Some(_) => {
                    e.alert.count = e.alert.count.saturating_add(1);
                    e.pending = e.pending.saturating_add(1);
                }
                None => e.alert.count = alert.count.max(e.alert.count),
            }
            e.alert.time = alert.time;
            e.alert.message = alert.message;
            e.alert.detail = alert.detail;
            if alert.audit_seq.is_some() {
                e.alert.audit_seq = alert.audit_seq;
            }
            e.alert.cursor = self.move_to_end(&key, e.alert.cursor);
            let deliver = match now {
                Some(now) => {
                    let repeat_due = e
                        .last_delivered
                        .is_none_or(|t| now - t >= ALERT_REPEAT_INTERVAL);
                    let deliver = repeat_due && self.allow_delivery(&key.subject, now);
                    if deliver {
                        e.pending = 0;
                        e.last_delivered = Some(now);
                    }
                    deliver
                }
                None => false,
            };
            self.entries.insert(key, e);
            return deliver;
        }
        let kept = self.per_kind.get(&key.kind).copied().unwrap_or(0);
        if kept >= MAX_ALERTS_PER_KIND {
            let oldest = self
                .order
                .iter()
                .find(|(_, k)| k.kind == key.kind)
                .map(|(c, k)| (*c, k.clone()));
            if let Some((c, k)) = oldest {
                self.order.remove(&c);
                self.entries.remove(&k);
                *self.per_kind.entry(key.kind).or_insert(1) -= 1;
            }
        }
        if now.is_some() {
            alert.count = 1;
            alert.first_time = None;
        }
        alert.count = alert.count.max(1);
        alert.first_time = Some(
            alert
                .first_time
                .take()
                .unwrap_or_else(|| alert.time.clone()),
        );
        self.next_cursor += 1;
        alert.cursor = self.next_cursor;
        self.order.insert(self.next_cursor, key.clone());
        *self.per_kind.entry(key.kind).or_insert(0) += 1;
        let deliver = now.is_some_and(|now| self.allow_delivery(&key.subject, now));
        let e = Entry {
            pending: if deliver || now.is_none() { 0 } else { 1 },
            last_delivered: if deliver { now } else { None },
            alert,
        };
        self.entries.insert(key, e);
        deliver
    }

    /// The repeats held back that may be delivered now, each as one alert
    /// with its count.
    pub fn due(&mut self, now: time::OffsetDateTime) -> Vec<Alert> {
        let waiting: Vec<AlertKey> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.pending > 0
                    && e.last_delivered
                        .is_none_or(|t| now - t >= ALERT_REPEAT_INTERVAL)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in waiting {
            if !self.allow_delivery(&key.subject, now) {
                continue;
            }
            if let Some(e) = self.entries.get_mut(&key) {
                e.pending = 0;
                e.last_delivered = Some(now);
                out.push(e.alert.clone());
            }
        }
        out
    }

    /// Records the journal sequence number of a delivered alert's record.
    pub fn set_audit_seq(&mut self, alert: &Alert, seq: u64) {
        if let Some(e) = self.entries.get_mut(&AlertKey::of(alert)) {
            e.alert.audit_seq = Some(seq);
        }
    }

    /// The alerts after cursor `after`, oldest first, at most `limit`
    /// (capped at [`MAX_ALERTS_PER_READ`]).
    pub fn page(&self, after: u64, limit: usize) -> AlertPage {
        let limit = limit.clamp(1, MAX_ALERTS_PER_READ);
        let mut alerts = Vec::new();
        let mut more = false;
        for (_, key) in self.order.range(after.saturating_add(1)..) {
            if alerts.len() == limit {
                more = true;
                break;
            }
            if let Some(e) = self.entries.get(key) {
                alerts.push(e.alert.clone());
            }
        }
        let next = more.then(|| alerts.last().map_or(after, |a| a.cursor));
        AlertPage { alerts, next }
    }
}

/// Something that gets every alert (a pager, the monitor).
pub trait AlertSink: Send + Sync + 'static {
    /// Called once per alert, after it is journaled. Must not block long.
    fn alert(&self, alert: &Alert);
}

/// Something that sees everything logd ingests (the monitor's hook).
pub trait Observer: Send + Sync + 'static {
    /// Called for every record appended to the log, in log order, once it is
    /// durable; `index` is its position in the log. Records whose payload is
    /// not an audit record are not passed here.
    fn record(&self, index: u64, leaf: &LeafV1, record: &AuditRecord);

    /// Called for every integrity alert.
    fn integrity(&self, alert: &Alert) {
        let _ = alert;
    }

    /// Called when a checkpoint of `size` entries has been published.
    fn checkpoint(&self, size: u64) {
        let _ = size;
    }
}

/// Prints each alert as one JSON line on stdout.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdoutAlerts;

impl AlertSink for StdoutAlerts {
    fn alert(&self, alert: &Alert) {
        if let Ok(line) = serde_json::to_string(alert) {
            println!("{line}");
        }
    }
}

/// Largest webhook URL accepted.
pub const MAX_WEBHOOK_URL: usize = 512;
/// How long one webhook delivery may take.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a webhook URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// only `http://host:port/path` URLs are supported
    #[error("webhook URL must be http://HOST:PORT/PATH (at most {MAX_WEBHOOK_URL} bytes)")]
    BadUrl,
}

/// Posts each alert as JSON to a URL (`http://host:port/path`; alerts hold
/// nothing secret, so plain HTTP to a local collector is acceptable).
/// Delivery is best effort, in the background, with a timeout; failures are
/// logged.
#[derive(Debug, Clone)]
pub struct WebhookAlerts {
    authority: Arc<str>,
    path: Arc<str>,
}

impl WebhookAlerts {
    /// Parses `url`.
    pub fn new(url: &str) -> Result<Self, WebhookError> {
        if url.len() > MAX_WEBHOOK_URL || !url.is_ascii() {
            return Err(WebhookError::BadUrl);
        }
        let rest = url.strip_prefix("http://").ok_or(WebhookError::BadUrl)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let (host, port) = authority.rsplit_once(':').ok_or(WebhookError::BadUrl)?;
        if host.is_empty()
            || port.parse::<u16>().is_err()
            || authority
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b == b'@')
            || path.bytes().any(|b| b.is_ascii_control() || b == b' ')
        {
            return Err(WebhookError::BadUrl);
        }
        Ok(Self {
            authority: authority.into(),
            path: path.into(),
        })
    }

    async fn post(authority: &str, path: &str, body: Bytes) -> Result<u16, String> {
        let tcp = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::post(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    }
}

impl AlertSink for WebhookAlerts {
    fn alert(&self, alert: &Alert) {
        let Ok(body) = serde_json::to_vec(alert) else {
            return;
        };
        let (authority, path) = (Arc::clone(&self.authority), Arc::clone(&self.path));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no runtime to deliver a webhook alert");
            return;
        };
        rt.spawn(async move {
            match tokio::time::timeout(
                WEBHOOK_TIMEOUT,
                Self::post(&authority, &path, Bytes::from(body)),
            )
            .await
            {
                Ok(Ok(status)) if (200..300).contains(&status) => {}
                Ok(Ok(status)) => tracing::warn!(status, "webhook refused an alert"),
                Ok(Err(e)) => tracing::warn!(error = %e, "webhook delivery failed"),
                Err(_) => tracing::warn!("webhook delivery timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(kind: AlertKind, principal: &str, problem: &str) -> Alert {
        Alert {
            alert: "integrity".into(),
            kind,
            time: "2026-12-01T00:00:00Z".into(),
            source: None,
            principal: Some(principal.into()),
            message: "m".into(),
            detail: serde_json::json!({ "violation": { "problem": problem } }),
            audit_seq: None,
            count: 1,
            first_time: None,
            cursor: 0,
        }
    }

    fn at(secs: i64) -> time::OffsetDateTime {
        time::macros::datetime!(2026-12-01 00:00 UTC) + time::Duration::seconds(secs)
    }

    fn all(t: &AlertTable) -> Vec<Alert> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let p = t.page(after, MAX_ALERTS_PER_READ);
            assert!(p.alerts.len() <= MAX_ALERTS_PER_READ);
            out.extend(p.alerts);
            match p.next {
                Some(n) => after = n,
                None => return out,
            }
        }
    }

    #[test]
    fn repeats_are_counted_on_one_entry_and_delivered_at_most_once_a_minute() {
        let mut t = AlertTable::new();
        let bob = "nitrile://local/operator/bob";
        let first = t.raise(alert(AlertKind::UndeclaredSource, bob, ""), at(0));
        assert!(first.deliver);
        for i in 1..1000 {
            let r = t.raise(alert(AlertKind::UndeclaredSource, bob, ""), at(i % 50));
            assert!(!r.deliver, "repeat {i} delivered within the minute");
            assert_eq!(r.alert.count, i as u64 + 1);
        }
        assert_eq!(t.len(), 1);
        // The held-back repeats come out once, after the interval.
        assert!(t.due(at(59)).is_empty());
        let due = t.due(at(61));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 1000);
        assert!(t.due(at(62)).is_empty());
        // Another subject or another problem is another entry.
        assert!(
            t.raise(
                alert(
                    AlertKind::UndeclaredSource,
                    "nitrile://local/operator/eve",
                    ""
                ),
                at(1)
            )
            .deliver
        );
        assert!(
            t.raise(alert(AlertKind::BadRecord, bob, "other_source"), at(1))
                .deliver
        );
        assert!(
            t.raise(alert(AlertKind::BadRecord, bob, "not_a_record"), at(1))
                .deliver
        );
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn deliveries_are_rate_limited_per_subject_and_nothing_is_lost() {
        let mut t = AlertTable::new();
        let bob = "nitrile://local/operator/bob";
        let delivered = (0..100)
            .filter(|i| {
                t.raise(alert(AlertKind::BadRecord, bob, &format!("p{i}")), at(0))
                    .deliver
            })
            .count();
        assert_eq!(delivered, MAX_DELIVERIES_PER_SUBJECT as usize);
        // Another subject is not held back by bob's flood.
        assert!(
            t.raise(
                alert(AlertKind::Gap, "nitrile://local/host/h1", "gap"),
                at(1)
            )
            .deliver
        );
        // Every alert is listed; the held-back ones come out as the windows
        // allow.
        assert_eq!(all(&t).len(), 101);
        let mut later = 0;
        for minute in 1..=10 {
            later += t.due(at(60 * minute + 1)).len();
        }
        assert_eq!(delivered + later, 100);
    }

    #[test]
    fn a_flood_of_one_kind_evicts_no_alert_of_another() {
        let mut t = AlertTable::new();
        let _ = t.raise(
            alert(AlertKind::Gap, "nitrile://local/host/h1", "gap"),
            at(0),
        );
        let _ = t.raise(
            alert(
                AlertKind::ChainBreak,
                "nitrile://local/host/h1",
                "hash_mismatch",
            ),
            at(0),
        );
        for i in 0..(MAX_ALERTS_PER_KIND + 500) {
            let _ = t.raise(
                alert(
                    AlertKind::BadRecord,
                    "nitrile://local/host/h2",
                    &format!("p{i}"),
                ),
                at(1),
            );
        }
        let listed = all(&t);
        assert_eq!(listed.len(), MAX_ALERTS_PER_KIND + 2);
        assert!(listed.iter().any(|a| a.kind == AlertKind::Gap));
        assert!(listed.iter().any(|a| a.kind == AlertKind::ChainBreak));
        // The oldest of the flooding kind went first.
        assert!(!listed.iter().any(|a| a.topic() == "p0"));
        assert!(
            listed
                .iter()
                .any(|a| a.topic() == format!("p{}", MAX_ALERTS_PER_KIND + 499))
        );
    }

    #[test]
    fn pages_follow_the_cursor_and_a_repeat_moves_to_the_end() {
        let mut t = AlertTable::new();
        for i in 0..600 {
            let _ = t.raise(
                alert(
                    AlertKind::BadRecord,
                    "nitrile://local/host/h2",
                    &format!("p{i}"),
                ),
                at(0),
            );
        }
        let p1 = t.page(0, MAX_ALERTS_PER_READ);
        assert_eq!(p1.alerts.len(), MAX_ALERTS_PER_READ);
        let next = p1.next.unwrap();
        let cursors: Vec<u64> = all(&t).iter().map(|a| a.cursor).collect();
        assert!(cursors.windows(2).all(|w| w[0] < w[1]));
        // p0 raised again: it is the newest now.
        let _ = t.raise(
            alert(AlertKind::BadRecord, "nitrile://local/host/h2", "p0"),
            at(1),
        );
        let rest = {
            let mut v = Vec::new();
            let mut after = next;
            loop {
                let p = t.page(after, MAX_ALERTS_PER_READ);
                v.extend(p.alerts);
                match p.next {
                    Some(n) => after = n,
                    None => break v,
                }
            }
        };
        assert_eq!(rest.last().unwrap().topic(), "p0");
        assert_eq!(rest.last().unwrap().count, 2);
        assert_eq!(t.page(u64::MAX - 1, 10).alerts.len(), 0);
    }

    #[test]
    fn a_table_rebuilt_from_delivered_snapshots_matches() {
        let mut live = AlertTable::new();
        let mut journal = Vec::new();
        for i in 0..5 {
            let r = live.raise(
                alert(AlertKind::Gap, "nitrile://local/host/h1", "gap"),
                at(i),
            );
            journal.push(r.alert);
        }
        let r = live.raise(
            alert(AlertKind::BadRecord, "nitrile://local/host/h2", "x"),
            at(9),
        );
        journal.push(r.alert);
        let mut rebuilt = AlertTable::new();
        for a in journal {
            rebuilt.restore(a);
        }
        assert_eq!(all(&rebuilt), all(&live));
    }

    #[test]
    fn webhook_urls_are_parsed_strictly() {
        let w = WebhookAlerts::new("http://127.0.0.1:9000/alerts").unwrap();
        assert_eq!(&*w.authority, "127.0.0.1:9000");
        assert_eq!(&*w.path, "/alerts");
        assert_eq!(
            &*WebhookAlerts::new("http://localhost:80").unwrap().path,
            "/"
        );
        for bad in [
            "https://127.0.0.1:9000/",
            "http://127.0.0.1/",
            "http://:9000/",
            "http://u@h:1/",
            "http://h:99999/",
            "http://h:1/a b",
            "ftp://h:1/",
        ] {
            assert_eq!(
                WebhookAlerts::new(bad).unwrap_err(),
                WebhookError::BadUrl,
                "{bad}"
            );
        }
    }
}
