//! Reports of connections that failed or were refused before
//! authentication, aggregated so that their number is bounded whatever the
//! flood and their counts are complete.
//!
//! Within each report interval, the first failed handshakes (at most
//! [`Limits::max_individual_reports`], at most
//! [`Limits::max_individual_reports_per_source`] of one source) are
//! reported one by one at once; every other failure and every refusal at
//! admission is counted per source and reason, and reported in one summary
//! at the end of the interval if there is any. So an interval gives at most
//! `max_individual_reports + 1` reports, and every failed or refused
//! connection is in exactly one of them. The aggregator does no I/O and
//! reads no clock: the server passes the time in.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::admission::Source;
use crate::limits::Limits;

/// Longest error message kept in an individual report.
pub const MAX_FAILURE_MESSAGE: usize = 160;

/// Why a connection ended before it was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PreauthReason {
    /// The peer closed or reset the connection during the handshake (or
    /// sent nothing at all).
    TlsClosed,
    /// The peer sent something that is not a TLS 1.3 handshake.
    TlsMalformed,
    /// No client certificate, or one that does not verify against the
    /// cell CA (another CA, expired).
    TlsCertificate,
    /// The peer offers nothing this server accepts (TLS 1.2 only, no common
    /// cipher suite or group).
    TlsIncompatible,
    /// Any other handshake failure (e.g. the peer's own alert).
    TlsOther,
    /// The handshake did not finish within the handshake deadline.
    TlsTimeout,
    /// Refused at accept: the source had as many handshakes in progress as
    /// it may.
    SourceHandshakes,
    /// Refused at accept: the source had as many connections open as it
    /// may.
    SourceConnections,
    /// Refused at accept: the source started handshakes faster than its
    /// rate (its token bucket was empty).
    SourceRate,
    /// Refused at accept: every handshake slot was taken, none by a source
    /// busier than this one.
    Handshakes,
    /// The handshake was cut to give its slot to a connection from a source
    /// with fewer handshakes in progress.
    Evicted,
    /// Closed after its handshake: every authenticated slot was taken.
    Connections,
}

impl PreauthReason {
    /// The name used in reports and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TlsClosed => "tls_closed",
            Self::TlsMalformed => "tls_malformed",
            Self::TlsCertificate => "tls_certificate",
            Self::TlsIncompatible => "tls_incompatible",
            Self::TlsOther => "tls_other",
            Self::TlsTimeout => "tls_timeout",
            Self::SourceHandshakes => "source_handshakes",
            Self::SourceConnections => "source_connections",
            Self::SourceRate => "source_rate",
            Self::Handshakes => "handshakes",
            Self::Evicted => "evicted",
            Self::Connections => "connections",
        }
    }

    /// Whether the connection went through a failed handshake (as opposed
    /// to being refused by a limit).
    pub fn is_handshake_failure(self) -> bool {
        matches!(
            self,
            Self::TlsClosed
                | Self::TlsMalformed
                | Self::TlsCertificate
                | Self::TlsIncompatible
                | Self::TlsOther
                | Self::TlsTimeout
        )
    }

    /// Sorts the error of a failed TLS accept.
    pub fn of_handshake_error(e: &io::Error) -> Self {
        if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return match tls {
                rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_) => {
                    Self::TlsCertificate
                }
                rustls::Error::PeerIncompatible(_) => Self::TlsIncompatible,
                rustls::Error::InvalidMessage(_)
                | rustls::Error::InappropriateMessage { .. }
                | rustls::Error::InappropriateHandshakeMessage { .. }
                | rustls::Error::PeerMisbehaved(_)
                | rustls::Error::PeerSentOversizedRecord
                | rustls::Error::DecryptError => Self::TlsMalformed,
                _ => Self::TlsOther,
            };
        }
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Self::TlsClosed,
            _ => Self::TlsOther,
        }
    }
}

/// One failed handshake, reported at once.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PreauthFailure {
    /// The peer's address and port.
    pub remote: SocketAddr,
    /// Its source (address or /64).
    pub source: Source,
    /// What failed.
    pub reason: PreauthReason,
    /// The error, at most [`MAX_FAILURE_MESSAGE`] characters.
    pub message: String,
    /// Start of the report interval it belongs to.
    pub interval_start: SystemTime,
}

impl PreauthFailure {
    /// The reason line of its audit record: `TLS handshake failed: <error>`.
    pub fn record_reason(&self) -> String {
        format!("TLS handshake failed: {}", self.message)
    }

    /// The detail of its audit record: `{"remote": "<ip:port>", "reason":
    /// "<reason>"}`.
    pub fn record_detail(&self) -> serde_json::Value {
        serde_json::json!({
            "remote": self.remote.to_string(),
            "reason": self.reason.as_str(),
        })
    }
}

/// Counts by reason.
pub type ReasonCounts = BTreeMap<PreauthReason, u64>;

/// The failed and refused connections of one source in an interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SourceCounts {
    /// The source.
    pub source: Source,
    /// Connections counted.
    pub total: u64,
    /// The same, by reason.
    pub reasons: ReasonCounts,
}

/// The failed and refused connections of the sources a summary has no room
/// to name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct OtherSources {
    /// Connections counted.
    pub total: u64,
    /// The same, by reason.
    pub reasons: ReasonCounts,
}

/// The failed and refused connections of one report interval not reported
/// one by one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PreauthSummary {
    /// Start of the interval (RFC 3339).
    #[serde(serialize_with = "rfc3339")]
    pub interval_start: SystemTime,
    /// End of the interval (RFC 3339).
    #[serde(serialize_with = "rfc3339")]
    pub interval_end: SystemTime,
    /// Connections counted here.
    pub total: u64,
    /// The same, by reason.
    pub reasons: ReasonCounts,
    /// The first [`Limits::max_summary_sources`] sources of the interval,
    /// the busiest first.
    pub sources: Vec<SourceCounts>,
    /// The connections of every further source.
    pub other_sources: OtherSources,
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let t = time::OffsetDateTime::from(*t);
    match t.format(&time::format_description::well_known::Rfc3339) {
        Ok(text) => s.serialize_str(&text),
        Err(e) => Err(serde::ser::Error::custom(e)),
    }
}

impl PreauthSummary {
    /// The reason line of its audit record, e.g. `1200 connections failed
    /// or refused before authentication from 3 sources`.
    pub fn record_reason(&self) -> String {
        let named = self.sources.len();
        let sources = if self.other_sources.total > 0 {
            format!("{named} sources and others")
        } else if named == 1 {
            "1 source".to_owned()
        } else {
            format!("{named} sources")
        };
        format!(
            "{} connections failed or refused before authentication from {sources}",
            self.total
        )
    }

    /// The detail of its audit record: the summary as JSON.
    pub fn record_detail(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| {
            // Only a time outside RFC 3339's years can fail; keep the counts.
            serde_json::json!({ "total": self.total, "error": e.to_string() })
        })
    }
}

/// What a [`crate::Handler`] is told about connections that failed or were
/// refused before authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PreauthReport {
    /// One failed handshake, at once.
    Failure(PreauthFailure),
    /// Everything else of an interval, at its end.
    Summary(PreauthSummary),
}

impl PreauthReport {
    /// How many connections the report stands for.
    pub fn count(&self) -> u64 {
        match self {
            Self::Failure(_) => 1,
            Self::Summary(s) => s.total,
        }
    }

    /// The reason line of its audit record.
    pub fn record_reason(&self) -> String {
        match self {
            Self::Failure(f) => f.record_reason(),
            Self::Summary(s) => s.record_reason(),
        }
    }

    /// The detail of its audit record.
    pub fn record_detail(&self) -> serde_json::Value {
        match self {
            Self::Failure(f) => f.record_detail(),
            Self::Summary(s) => s.record_detail(),
        }
    }
}

/// Counts of one interval.
#[derive(Debug)]
pub(crate) struct Aggregator {
    limits: Limits,
    start: SystemTime,
    individual: usize,
    /// Individual reports per source this interval (at most
    /// `max_individual_reports` entries).
    individual_by_source: HashMap<Source, usize>,
    /// At most `max_summary_sources` entries.
    sources: HashMap<Source, SourceCounts>,
    other: OtherSources,
    reasons: ReasonCounts,
    total: u64,
}

fn clip(message: &str) -> String {
    let mut out: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_FAILURE_MESSAGE)
        .collect();
    if message.chars().count() > MAX_FAILURE_MESSAGE {
        out.pop();
        out.push('…');
    }
    out
}

impl Aggregator {
    pub(crate) fn new(limits: Limits, now: SystemTime) -> Self {
        Self {
            limits,
            start: now,
            individual: 0,
            individual_by_source: HashMap::new(),
            sources: HashMap::new(),
            other: OtherSources::default(),
            reasons: ReasonCounts::new(),
            total: 0,
        }
    }

    /// A failed handshake: the report to make at once, or `None` if it was
    /// counted into the interval's summary.
    pub(crate) fn failure(
        &mut self,
        remote: SocketAddr,
        reason: PreauthReason,
        message: &str,
    ) -> Option<PreauthFailure> {
        let source = Source::from(remote.ip());
        let of_source = self.individual_by_source.get(&source).copied().unwrap_or(0);
        if self.individual < self.limits.max_individual_reports
            && of_source < self.limits.max_individual_reports_per_source
        {
            self.individual += 1;
            self.individual_by_source.insert(source, of_source + 1);
            return Some(PreauthFailure {
                remote,
                source,
                reason,
                message: clip(message),
                interval_start: self.start,
            });
        }
        self.count(source, reason);
        None
    }

    /// A connection refused at admission (or evicted): counted.
    pub(crate) fn refused(&mut self, source: Source, reason: PreauthReason) {
        self.count(source, reason);
    }

    fn count(&mut self, source: Source, reason: PreauthReason) {
        self.total += 1;
        *self.reasons.entry(reason).or_default() += 1;
        if !self.sources.contains_key(&source)
            && self.sources.len() < self.limits.max_summary_sources
        {
            self.sources.insert(
                source,
                SourceCounts {
                    source,
                    total: 0,
                    reasons: ReasonCounts::new(),
                },
            );
        }
        let (total, reasons) = match self.sources.get_mut(&source) {
            Some(c) => (&mut c.total, &mut c.reasons),
            None => (&mut self.other.total, &mut self.other.reasons),
        };
        *total += 1;
        *reasons.entry(reason).or_default() += 1;
    }

    /// Ends the interval at `now` and starts the next: its summary, if
    /// anything was counted.
    pub(crate) fn take(&mut self, now: SystemTime) -> Option<PreauthSummary> {
        let ended = std::mem::replace(self, Self::new(self.limits, now));
        if ended.total == 0 {
            return None;
        }
        let mut sources: Vec<SourceCounts> = ended.sources.into_values().collect();
        sources.sort_by(|a, b| b.total.cmp(&a.total).then(a.source.cmp(&b.source)));
        Some(PreauthSummary {
            interval_start: ended.start,
            interval_end: now,
            total: ended.total,
            reasons: ended.reasons,
            sources,
            other_sources: ended.other,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use super::*;

    fn addr(last: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, last)), port)
    }

    fn limits() -> Limits {
        Limits {
            max_individual_reports: 3,
            max_individual_reports_per_source: 2,
            max_summary_sources: 2,
            ..Limits::default()
        }
    }

    #[test]
    fn first_failures_are_individual_then_counted() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut a = Aggregator::new(limits(), t0);
        // Two of source 1 individually, its third counted.
        assert!(
            a.failure(addr(1, 1), PreauthReason::TlsCertificate, "no cert")
                .is_some()
        );
        let f = a
            .failure(addr(1, 2), PreauthReason::TlsClosed, "eof")
            .unwrap();
        assert_eq!(f.remote, addr(1, 2));
        assert_eq!(f.interval_start, t0);
        assert_eq!(f.record_reason(), "TLS handshake failed: eof");
        assert_eq!(
            f.record_detail(),
            serde_json::json!({"remote": "198.51.100.1:2", "reason": "tls_closed"})
        );
        assert!(
            a.failure(addr(1, 3), PreauthReason::TlsClosed, "eof")
                .is_none()
        );
        // One more source individually, then the interval's three are used.
        assert!(
            a.failure(addr(2, 1), PreauthReason::TlsTimeout, "t")
                .is_some()
        );
        assert!(
            a.failure(addr(3, 1), PreauthReason::TlsTimeout, "t")
                .is_none()
        );
        // Refusals are always counted; a fourth source goes to "other".
        a.refused(Source::from(addr(3, 0).ip()), PreauthReason::SourceRate);
        a.refused(Source::from(addr(4, 0).ip()), PreauthReason::SourceRate);
        let t1 = t0 + Duration::from_secs(10);
        let s = a.take(t1).unwrap();
        assert_eq!(s.total, 4);
        assert_eq!((s.interval_start, s.interval_end), (t0, t1));
        assert_eq!(s.sources.len(), 2);
        assert_eq!(s.sources[0].source.to_string(), "198.51.100.3");
        assert_eq!(s.sources[0].total, 2);
        assert_eq!(s.sources[1].source.to_string(), "198.51.100.1");
        assert_eq!(s.other_sources.total, 1);
        assert_eq!(s.reasons[&PreauthReason::SourceRate], 2);
        assert_eq!(
            s.record_reason(),
            "4 connections failed or refused before authentication from 2 sources and others"
        );
        let detail = s.record_detail();
        assert_eq!(detail["interval_start"], "2023-11-14T22:13:20Z");
        assert_eq!(detail["sources"][0]["reasons"]["tls_timeout"], 1);
        assert_eq!(detail["other_sources"]["reasons"]["source_rate"], 1);
        // The next interval starts afresh: individual reports again, and an
        // empty interval gives no summary.
        assert!(a.take(t1 + Duration::from_secs(10)).is_none());
        assert!(
            a.failure(addr(1, 9), PreauthReason::TlsClosed, "eof")
                .is_some()
        );
    }

    #[test]
    fn reports_per_interval_are_bounded_and_counts_complete() {
        let l = limits();
        let t0 = SystemTime::UNIX_EPOCH;
        let mut a = Aggregator::new(l, t0);
        let mut individual = 0u64;
        let mut summarized = 0u64;
        let mut made = 0u64;
        for interval in 0..5u64 {
            let mut reports = 0;
            for i in 0..1000u32 {
                let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(i % 300)), 1);
                made += 1;
                if i % 3 == 0 {
                    a.refused(Source::from(remote.ip()), PreauthReason::SourceHandshakes);
                } else if a
                    .failure(remote, PreauthReason::TlsMalformed, "x")
                    .is_some()
                {
                    individual += 1;
                    reports += 1;
                }
            }
            let now = t0 + Duration::from_secs(10 * (interval + 1));
            let s = a.take(now).unwrap();
            reports += 1;
            summarized += s.total;
            let named: u64 = s.sources.iter().map(|c| c.total).sum();
            assert_eq!(named + s.other_sources.total, s.total);
            assert!(s.sources.len() <= l.max_summary_sources);
            assert!(reports <= l.max_individual_reports + 1);
        }
        assert_eq!(individual + summarized, made);
    }

    #[test]
    fn messages_are_clipped_and_control_free() {
        let long = format!("\x1b[2J{}", "x".repeat(500));
        let mut a = Aggregator::new(limits(), SystemTime::UNIX_EPOCH);
        let f = a
            .failure(addr(1, 1), PreauthReason::TlsOther, &long)
            .unwrap();
        assert_eq!(f.message.chars().count(), MAX_FAILURE_MESSAGE);
        assert!(!f.message.contains('\x1b'));
    }

    #[test]
    fn handshake_errors_are_sorted() {
        let tls = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(
            PreauthReason::of_handshake_error(&tls(rustls::Error::NoCertificatesPresented)),
            PreauthReason::TlsCertificate
        );
        assert_eq!(
            PreauthReason::of_handshake_error(&tls(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls13RequiredForQuic
            ))),
            PreauthReason::TlsIncompatible
        );
        assert_eq!(
            PreauthReason::of_handshake_error(&tls(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))),
            PreauthReason::TlsMalformed
        );
        assert_eq!(
            PreauthReason::of_handshake_error(&io::ErrorKind::UnexpectedEof.into()),
            PreauthReason::TlsClosed
        );
        assert_eq!(
            PreauthReason::of_handshake_error(&io::ErrorKind::Other.into()),
            PreauthReason::TlsOther
        );
    }
}
