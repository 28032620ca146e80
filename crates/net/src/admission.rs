//! Admission of accepted TCP connections before authentication: per-source
//! and global counts of handshakes and connections, per-source token
//! buckets of handshake starts, and eviction of the oldest handshake of the
//! busiest source when every handshake slot is taken.
//!
//! The table does no I/O and reads no clock: the server passes `now` in. It
//! is decided right after `accept`, under one short lock, so the accept loop
//! never waits for a slot.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde::{Serialize, Serializer};
use tokio::sync::oneshot;

use crate::Gauge;
use crate::limits::{Limits, MAX_TRACKED_SOURCES};
use crate::report::PreauthReason;

/// The unit of per-source limits: an IPv4 address, or the /64 prefix of an
/// IPv6 address. An IPv4-mapped IPv6 address is its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// An IPv4 address.
    V4(Ipv4Addr),
    /// An IPv6 address with its last 64 bits cleared.
    V6(Ipv6Addr),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4),
                None => Self::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(v4) => write!(f, "{v4}"),
            Self::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

impl Serialize for Source {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One source's connections and token bucket.
#[derive(Debug)]
struct Entry {
    /// Handshakes in progress, oldest first: id and the sender that cuts
    /// the handshake when it is evicted.
    pending: VecDeque<(u64, oneshot::Sender<()>)>,
    /// Connections open: in handshake or authenticated.
    open: usize,
    /// Handshake starts left in the bucket, as of `refilled`.
    tokens: f64,
    refilled: Instant,
}

impl Entry {
    fn new(burst: u32, now: Instant) -> Self {
        Self {
            pending: VecDeque::new(),
            open: 0,
            tokens: f64::from(burst),
            refilled: now,
        }
    }

    fn refill(&mut self, limits: &Limits, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(limits.handshake_rate_per_source))
            .min(f64::from(limits.handshake_burst_per_source));
        // Never backwards: callers' clocks are read before they take the
        // lock, so they may come in out of order.
        self.refilled = self.refilled.max(now);
    }

    /// Nothing open and a full bucket: the entry says nothing a fresh one
    /// would not.
    fn forgettable(&self, limits: &Limits) -> bool {
        self.open == 0 && self.tokens >= f64::from(limits.handshake_burst_per_source)
    }

    /// The key of this source in the load order (only while it has
    /// handshakes in progress): most handshakes last, and among equals the
    /// oldest handshake last.
    fn load_key(&self, source: Source) -> Option<LoadKey> {
        let (oldest, _) = self.pending.front()?;
        Some((self.pending.len(), Reverse(*oldest), source))
    }
}

type LoadKey = (usize, Reverse<u64>, Source);

/// A connection admitted to its handshake.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// Holds the connection's place in the table until dropped.
    pub ticket: Ticket,
    /// Resolves if the handshake is evicted.
    pub evicted: oneshot::Receiver<()>,
    /// The source whose oldest handshake was cut to make room, if any.
    pub victim: Option<Source>,
}

/// The counts of every source, behind the server's lock.
#[derive(Debug)]
pub(crate) struct Table {
    limits: Limits,
    sources: HashMap<Source, Entry>,
    /// Sources with handshakes in progress, by load.
    load: BTreeSet<LoadKey>,
    handshakes: usize,
    authenticated: usize,
    next_id: u64,
    handshakes_gauge: Gauge,
    connections_gauge: Gauge,
}

impl Table {
    pub(crate) fn new(limits: Limits, handshakes_gauge: Gauge, connections_gauge: Gauge) -> Self {
        Self {
            limits,
            sources: HashMap::new(),
            load: BTreeSet::new(),
            handshakes: 0,
            authenticated: 0,
            next_id: 0,
            handshakes_gauge,
            connections_gauge,
        }
    }

    /// Most sources kept: [`MAX_TRACKED_SOURCES`], and always more than can
    /// have connections open.
    fn max_tracked(&self) -> usize {
        MAX_TRACKED_SOURCES.max(self.limits.max_handshakes + self.limits.max_connections + 1)
    }

    fn set_gauges(&self) {
        self.handshakes_gauge.set(self.handshakes as u64);
        self.connections_gauge.set(self.authenticated as u64);
    }

    /// Runs `f` on `source`'s entry, keeping the load order in step.
    fn update<T>(&mut self, source: Source, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        let entry = self.sources.get_mut(&source)?;
        let before = entry.load_key(source);
        let out = f(entry);
        let after = entry.load_key(source);
        if before != after {
            if let Some(k) = before {
                self.load.remove(&k);
            }
            if let Some(k) = after {
                self.load.insert(k);
            }
        }
        Some(out)
    }

    fn forget_if_idle(&mut self, source: Source, now: Instant) {
        let limits = self.limits;
        if let Some(entry) = self.sources.get_mut(&source) {
            entry.refill(&limits, now);
            if entry.forgettable(&limits) {
                self.sources.remove(&source);
            }
        }
    }

    /// Keeps the table within its bound: first forgets sources whose
    /// bucket has refilled, then every source with nothing open.
    fn sweep(&mut self, now: Instant) {
        if self.sources.len() < self.max_tracked() {
            return;
        }
        let limits = self.limits;
        self.sources.retain(|_, e| {
            e.refill(&limits, now);
            !e.forgettable(&limits)
        });
        if self.sources.len() >= self.max_tracked() {
            self.sources.retain(|_, e| e.open > 0);
        }
    }

    /// Decides on a connection from `source` accepted at `now`: admitted to
    /// its handshake (taking one token of the source's bucket), or refused
    /// with the limit it hit. `table` is the lock this table lives behind;
    /// the ticket returns the connection's place through it.
    pub(crate) fn admit(
        &mut self,
        table: &Arc<Mutex<Table>>,
        source: Source,
        now: Instant,
    ) -> Result<Admitted, PreauthReason> {
        if !self.sources.contains_key(&source) {
            self.sweep(now);
        }
        let limits = self.limits;
        let entry = self
            .sources
            .entry(source)
            .or_insert_with(|| Entry::new(limits.handshake_burst_per_source, now));
        entry.refill(&limits, now);
        let refusal = if entry.open >= limits.max_connections_per_source {
            Some(PreauthReason::SourceConnections)
        } else if entry.pending.len() >= limits.max_handshakes_per_source {
            Some(PreauthReason::SourceHandshakes)
        } else if entry.tokens < 1.0 {
            Some(PreauthReason::SourceRate)
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.forget_if_idle(source, now);
            return Err(reason);
        }
        let mine = entry.pending.len();
        let mut victim = None;
        if self.handshakes >= limits.max_handshakes {
            // Full: the busiest source gives up its oldest handshake if it
            // has more in progress than this one; else this one waits its
            // turn elsewhere.
            match self.load.last().copied() {
                Some((theirs, _, other)) if theirs > mine => {
                    self.evict_oldest(other);
                    victim = Some(other);
                }
                _ => {
                    self.forget_if_idle(source, now);
                    return Err(PreauthReason::Handshakes);
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.update(source, |e| {
            e.tokens -= 1.0;
            e.pending.push_back((id, tx));
            e.open += 1;
        });
        self.handshakes += 1;
        self.set_gauges();
        Ok(Admitted {
            ticket: Ticket {
                table: Arc::clone(table),
                source,
                id,
                state: TicketState::Handshake,
            },
            evicted: rx,
            victim,
        })
    }

    fn evict_oldest(&mut self, source: Source) {
        let cut = self.update(source, |e| {
            let cut = e.pending.pop_front();
            if cut.is_some() {
                e.open -= 1;
            }
            cut
        });
        if let Some(Some((_, tx))) = cut {
            self.handshakes -= 1;
            let _ = tx.send(());
        }
    }

    /// Ends the handshake of `id`; false if it was evicted meanwhile.
    fn end_handshake(&mut self, source: Source, id: u64) -> bool {
        let found = self.update(source, |e| {
            let at = e.pending.iter().position(|(i, _)| *i == id)?;
            e.pending.remove(at)
        });
        let ended = matches!(found, Some(Some(_)));
        if ended {
            self.handshakes -= 1;
        }
        ended
    }

    fn close(&mut self, source: Source, now: Instant) {
        self.update(source, |e| e.open -= 1);
        self.forget_if_idle(source, now);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TicketState {
    Handshake,
    Authenticated,
    Closed,
}

/// A connection's place in the [`Table`]: a handshake slot, then an
/// authenticated one. Dropping it gives the place back, so a task that is
/// aborted leaves the counts right.
#[derive(Debug)]
pub(crate) struct Ticket {
    table: Arc<Mutex<Table>>,
    source: Source,
    id: u64,
    state: TicketState,
}

fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Ticket {
    /// The connection's source.
    pub(crate) fn source(&self) -> Source {
        self.source
    }

    /// The handshake succeeded: takes an authenticated slot. Refused with
    /// [`PreauthReason::Evicted`] if the handshake was evicted meanwhile
    /// (already reported by the evictor) or [`PreauthReason::Connections`]
    /// if every authenticated slot is taken; the place is given back then.
    pub(crate) fn authenticate(&mut self) -> Result<(), PreauthReason> {
        debug_assert_eq!(self.state, TicketState::Handshake);
        let mut t = lock(&self.table);
        if !t.end_handshake(self.source, self.id) {
            self.state = TicketState::Closed;
            t.set_gauges();
            return Err(PreauthReason::Evicted);
        }
        if t.authenticated >= t.limits.max_connections {
            t.close(self.source, Instant::now());
            t.set_gauges();
            self.state = TicketState::Closed;
            return Err(PreauthReason::Connections);
        }
        t.authenticated += 1;
        t.set_gauges();
        self.state = TicketState::Authenticated;
        Ok(())
    }

    /// Gives the place back (also done on drop).
    pub(crate) fn release(&mut self) {
        let state = std::mem::replace(&mut self.state, TicketState::Closed);
        if state == TicketState::Closed {
            return;
        }
        let mut t = lock(&self.table);
        match state {
            TicketState::Handshake => {
                if t.end_handshake(self.source, self.id) {
                    t.close(self.source, Instant::now());
                }
            }
            TicketState::Authenticated => {
                t.authenticated -= 1;
                t.close(self.source, Instant::now());
            }
            TicketState::Closed => {}
        }
        t.set_gauges();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::Registry;

    fn limits() -> Limits {
        Limits {
            max_handshakes: 4,
            max_connections: 3,
            max_handshakes_per_source: 3,
            max_connections_per_source: 4,
            handshake_rate_per_source: 2,
            handshake_burst_per_source: 5,
            ..Limits::default()
        }
    }

    fn table(limits: Limits) -> Arc<Mutex<Table>> {
        let r = Registry::new();
        Arc::new(Mutex::new(Table::new(
            limits,
            r.gauge("h", "").unwrap(),
            r.gauge("c", "").unwrap(),
        )))
    }

    fn v4(last: u8) -> Source {
        Source::from(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)))
    }

    fn admit(t: &Arc<Mutex<Table>>, s: Source, now: Instant) -> Result<Admitted, PreauthReason> {
        lock(t).admit(t, s, now)
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::from(a), Source::from(b));
        assert_ne!(Source::from(a), Source::from(c));
        assert_eq!(Source::from(a).to_string(), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(Source::from(mapped), v4(7));
        assert_eq!(v4(7).to_string(), "192.0.2.7");
        assert_ne!(v4(7), v4(8));
    }

    #[test]
    fn per_source_handshakes_connections_and_rate() {
        let t = table(limits());
        let now = Instant::now();
        let a = v4(1);
        let mut held: Vec<_> = (0..3).map(|_| admit(&t, a, now).unwrap()).collect();
        assert_eq!(
            admit(&t, a, now).unwrap_err(),
            PreauthReason::SourceHandshakes
        );
        // Another source is not affected.
        let b = admit(&t, v4(2), now).unwrap();
        // Authenticated connections still count as open for the source.
        for h in &mut held {
            h.ticket.authenticate().unwrap();
        }
        let fourth = admit(&t, a, now).unwrap();
        assert_eq!(
            admit(&t, a, now).unwrap_err(),
            PreauthReason::SourceConnections
        );
        drop(fourth);
        // Five tokens in the burst, four spent; one more, then the rate.
        let fifth = admit(&t, a, now).unwrap();
        drop(fifth);
        drop(held.pop());
        assert_eq!(admit(&t, a, now).unwrap_err(), PreauthReason::SourceRate);
        // Two tokens a second: 0.6 s later, one (and a fifth of another).
        let later = now + Duration::from_millis(600);
        let one = admit(&t, a, later).unwrap();
        drop(one);
        assert_eq!(admit(&t, a, later).unwrap_err(), PreauthReason::SourceRate);
        drop(b);
    }

    #[test]
    fn authenticated_slots_are_separate_and_capped() {
        let mut l = limits();
        l.max_connections_per_source = 10;
        l.handshake_burst_per_source = 100;
        let t = table(l);
        let now = Instant::now();
        let mut authed = Vec::new();
        for i in 0..3 {
            let mut a = admit(&t, v4(i), now).unwrap();
            a.ticket.authenticate().unwrap();
            authed.push(a);
        }
        // Handshake slots are all still free: four handshakes at once.
        let mut pending: Vec<_> = (10..14).map(|i| admit(&t, v4(i), now).unwrap()).collect();
        assert_eq!(lock(&t).handshakes, 4);
        assert_eq!(lock(&t).authenticated, 3);
        // A handshake that completes while every authenticated slot is
        // taken is closed.
        assert_eq!(
            pending[0].ticket.authenticate().unwrap_err(),
            PreauthReason::Connections
        );
        assert_eq!(lock(&t).handshakes, 3);
        drop(authed.pop());
        pending[1].ticket.authenticate().unwrap();
        drop(pending);
        drop(authed);
        let t = lock(&t);
        assert_eq!((t.handshakes, t.authenticated), (0, 0));
        assert!(t.load.is_empty());
    }

    #[test]
    fn a_full_table_evicts_the_oldest_handshake_of_the_busiest_source() {
        let mut l = limits();
        l.max_handshakes_per_source = 4;
        let t = table(l);
        let now = Instant::now();
        let busy = v4(1);
        let mut a1 = admit(&t, busy, now).unwrap();
        let a2 = admit(&t, busy, now).unwrap();
        let a3 = admit(&t, busy, now).unwrap();
        let b1 = admit(&t, v4(2), now).unwrap();
        // Full (4). A new source has none in progress: the busiest source
        // (three) loses its oldest.
        let mut c1 = admit(&t, v4(3), now).unwrap();
        assert_eq!(c1.victim, Some(busy));
        assert!(a1.evicted.try_recv().is_ok());
        assert_eq!(
            a1.ticket.authenticate().unwrap_err(),
            PreauthReason::Evicted
        );
        drop(a1);
        // busy 2, v4(2) 1, v4(3) 1: the busy source still has more than a
        // fresh one.
        let d1 = admit(&t, v4(4), now).unwrap();
        assert_eq!(d1.victim, Some(busy));
        // Every source holds one: a source holding none still takes the
        // oldest handshake (busy's last one).
        let mut a3 = a3;
        let e1 = admit(&t, v4(5), now).unwrap();
        assert_eq!(e1.victim, Some(busy));
        assert!(a3.evicted.try_recv().is_ok());
        // A source already holding one cannot evict a source holding one:
        // the newcomer is refused.
        assert_eq!(
            admit(&t, v4(2), now).unwrap_err(),
            PreauthReason::Handshakes
        );
        assert!(c1.evicted.try_recv().is_err());
        c1.ticket.authenticate().unwrap();
        drop((a2, a3, b1, c1, d1, e1));
        let t = lock(&t);
        assert_eq!((t.handshakes, t.authenticated), (0, 0));
        assert!(t.load.is_empty());
    }

    #[test]
    fn among_equally_busy_sources_the_oldest_handshake_goes() {
        let mut l = limits();
        l.max_handshakes = 4;
        let t = table(l);
        let now = Instant::now();
        let mut first = admit(&t, v4(1), now).unwrap();
        let _x = admit(&t, v4(1), now).unwrap();
        let _y = admit(&t, v4(2), now).unwrap();
        let _z = admit(&t, v4(2), now).unwrap();
        let n = admit(&t, v4(9), now).unwrap();
        assert_eq!(n.victim, Some(v4(1)));
        assert!(first.evicted.try_recv().is_ok());
    }

    #[test]
    fn the_table_forgets_idle_sources_and_stays_bounded() {
        let mut l = limits();
        l.max_handshakes = 100_000;
        l.max_connections_per_source = 1;
        let t = table(l);
        let now = Instant::now();
        // A source with nothing open and a full bucket is forgotten at once.
        drop(admit(&t, v4(1), now).unwrap());
        lock(&t).forget_if_idle(v4(1), now + Duration::from_secs(10));
        assert!(lock(&t).sources.is_empty());
        // Many sources, each with one connection dropped and a bucket not
        // yet full: the table never grows past its bound.
        let bound = lock(&t).max_tracked();
        let mut kept = Vec::new();
        for i in 0..(bound as u32 + 500) {
            let s = Source::from(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
            let a = admit(&t, s, now).unwrap();
            if i % 1000 == 0 {
                kept.push(a);
            }
            assert!(lock(&t).sources.len() <= bound);
        }
        // Sources with open connections are never forgotten.
        for a in &kept {
            assert!(lock(&t).sources.contains_key(&a.ticket.source()));
        }
    }
}
