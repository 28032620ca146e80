//! What one server admits before authentication, and how it reports what it
//! refused: the defaults and the [`Limits`] that carries them.
//!
//! A *source* is the unit of the per-source limits: an IPv4 address, or the
//! /64 prefix of an IPv6 address (one customer network; a single host
//! usually holds a whole /64). An IPv4-mapped IPv6 address counts as its
//! IPv4 address.

use std::time::Duration;

/// Most TLS handshakes in progress at once, over all sources. Separate from
/// [`MAX_CONNECTIONS`]: peers that have not authenticated never hold the
/// slots of authenticated connections. When it is reached, a connection
/// from a source with fewer handshakes in progress than the busiest source
/// takes the slot of that source's oldest handshake; otherwise it is closed.
pub const MAX_HANDSHAKES: usize = 512;
/// Most authenticated connections open at once (TLS done, client
/// certificate verified). A connection that completes its handshake while
/// this many are open is closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most TLS handshakes in progress at once from one source.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 32;
/// Most connections open at once from one source, in handshake or
/// authenticated. A quarter of [`MAX_CONNECTIONS`], so that one address
/// (one NAT, one host running many clients) cannot hold them all.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 256;
/// Handshakes a source may start per second, sustained (the refill rate of
/// its token bucket).
pub const MAX_HANDSHAKE_RATE_PER_SOURCE: u32 = 64;
/// Handshakes a source may start in a burst (the size of its token bucket).
/// A client that opens a pool of 128 keep-alive connections at once fits.
pub const MAX_HANDSHAKE_BURST_PER_SOURCE: u32 = 256;
/// Longest a TLS handshake may take, from accept to a verified client
/// certificate. A TLS 1.3 handshake with a client certificate is two round
/// trips after the TCP connection is up: 5 s allows for a 1 s round trip
/// (a satellite link), one lost segment resent after Linux's 1 s initial
/// retransmission timeout and a busy machine, while a source that opens
/// connections and sends nothing holds each slot for at most 5 s.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest an authenticated connection may carry no request: from the end
/// of the handshake or of the last response to the end of the next
/// request's headers. A keep-alive connection idle this long is closed
/// (hyper's `header_read_timeout`, which runs on idle keep-alive
/// connections as well as on a request that is being sent).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often failed and refused connections are reported in one summary.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Most failed handshakes reported one by one, at once, per report
/// interval; the others are counted into the interval's summary.
pub const MAX_INDIVIDUAL_REPORTS: usize = 8;
/// Most failed handshakes of one source reported one by one per report
/// interval, so that one source cannot use every individual report.
pub const MAX_INDIVIDUAL_REPORTS_PER_SOURCE: usize = 4;
/// Most sources a summary names with their own counts; connections from
/// further sources are counted together as "other sources".
pub const MAX_SUMMARY_SOURCES: usize = 64;
/// Most sources whose counts and token buckets the admission table keeps.
/// Beyond it, sources with no open connection are forgotten (their token
/// buckets start full again); sources with open connections are always
/// kept.
pub const MAX_TRACKED_SOURCES: usize = 16_384;

/// The limits a [`crate::Server`] applies before authentication and how it
/// reports failed and refused connections. [`Limits::default`] holds the
/// `MAX_*` constants of this module, suited to a cell in production; tests
/// set smaller values field by field.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Limits {
    /// Most handshakes in progress at once ([`MAX_HANDSHAKES`]).
    pub max_handshakes: usize,
    /// Most authenticated connections open at once ([`MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// Most handshakes in progress from one source
    /// ([`MAX_HANDSHAKES_PER_SOURCE`]).
    pub max_handshakes_per_source: usize,
    /// Most connections open from one source
    /// ([`MAX_CONNECTIONS_PER_SOURCE`]).
    pub max_connections_per_source: usize,
    /// Handshakes a source may start per second
    /// ([`MAX_HANDSHAKE_RATE_PER_SOURCE`]).
    pub handshake_rate_per_source: u32,
    /// Handshakes a source may start in a burst
    /// ([`MAX_HANDSHAKE_BURST_PER_SOURCE`]).
    pub handshake_burst_per_source: u32,
    /// Deadline of a handshake ([`HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// Idle timeout of an authenticated connection ([`IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// Report interval ([`REPORT_INTERVAL`]).
    pub report_interval: Duration,
    /// Failed handshakes reported one by one per interval
    /// ([`MAX_INDIVIDUAL_REPORTS`]).
    pub max_individual_reports: usize,
    /// Failed handshakes of one source reported one by one per interval
    /// ([`MAX_INDIVIDUAL_REPORTS_PER_SOURCE`]).
    pub max_individual_reports_per_source: usize,
    /// Sources named in a summary ([`MAX_SUMMARY_SOURCES`]).
    pub max_summary_sources: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_handshakes: MAX_HANDSHAKES,
            max_connections: MAX_CONNECTIONS,
            max_handshakes_per_source: MAX_HANDSHAKES_PER_SOURCE,
            max_connections_per_source: MAX_CONNECTIONS_PER_SOURCE,
            handshake_rate_per_source: MAX_HANDSHAKE_RATE_PER_SOURCE,
            handshake_burst_per_source: MAX_HANDSHAKE_BURST_PER_SOURCE,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            report_interval: REPORT_INTERVAL,
            max_individual_reports: MAX_INDIVIDUAL_REPORTS,
            max_individual_reports_per_source: MAX_INDIVIDUAL_REPORTS_PER_SOURCE,
            max_summary_sources: MAX_SUMMARY_SOURCES,
        }
    }
}

/// A [`Limits`] that would refuse every connection or never report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("limit {field} must be greater than zero")]
pub struct LimitsError {
    /// The field that is zero.
    pub field: &'static str,
}

impl Limits {
    /// Checks that every limit admits something: each count, rate and
    /// duration is greater than zero (`max_individual_reports` may be zero:
    /// then every failure goes into the summaries).
    pub fn check(&self) -> Result<(), LimitsError> {
        let counts = [
            ("max_handshakes", self.max_handshakes),
            ("max_connections", self.max_connections),
            ("max_handshakes_per_source", self.max_handshakes_per_source),
            (
                "max_connections_per_source",
                self.max_connections_per_source,
            ),
            (
                "handshake_rate_per_source",
                self.handshake_rate_per_source as usize,
            ),
            (
                "handshake_burst_per_source",
                self.handshake_burst_per_source as usize,
            ),
            ("max_summary_sources", self.max_summary_sources),
        ];
        let durations = [
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("report_interval", self.report_interval),
        ];
        let zero = counts
            .iter()
            .find(|(_, v)| *v == 0)
            .map(|(f, _)| *f)
            .or_else(|| durations.iter().find(|(_, d)| d.is_zero()).map(|(f, _)| *f));
        match zero {
            Some(field) => Err(LimitsError { field }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_zeros_are_refused() {
        assert_eq!(Limits::default().check(), Ok(()));
        let l = Limits {
            max_handshakes_per_source: 0,
            ..Limits::default()
        };
        assert_eq!(
            l.check(),
            Err(LimitsError {
                field: "max_handshakes_per_source"
            })
        );
        let l = Limits {
            idle_timeout: Duration::ZERO,
            ..Limits::default()
        };
        assert_eq!(
            l.check(),
            Err(LimitsError {
                field: "idle_timeout"
            })
        );
        let l = Limits {
            max_individual_reports: 0,
            ..Limits::default()
        };
        assert_eq!(l.check(), Ok(()));
    }
}
