//! Where verification gets the current time from.

use std::sync::Mutex;

use time::{Duration, OffsetDateTime};

/// A source of the current time. Verification and replay logic take one (or a
/// `now` value) instead of reading the system clock, so that expiry can be
/// tested.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> OffsetDateTime;
}

/// The system's real-time clock, in UTC.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that shows a set time until it is moved: for tests, here and in
/// other crates.
#[derive(Debug)]
pub struct FixedClock(Mutex<OffsetDateTime>);

impl FixedClock {
    /// A clock stopped at `now`.
    pub fn new(now: OffsetDateTime) -> Self {
        Self(Mutex::new(now))
    }

    /// Sets the time.
    pub fn set(&self, now: OffsetDateTime) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    /// Moves the time by `by` (which may be negative).
    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *t += by;
    }
}

impl Clock for FixedClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn fixed_clock_moves_only_when_told() {
        let c = FixedClock::new(datetime!(2030-01-01 12:00 UTC));
        assert_eq!(c.now(), datetime!(2030-01-01 12:00 UTC));
        c.advance(Duration::minutes(5));
        assert_eq!(c.now(), datetime!(2030-01-01 12:05 UTC));
        c.set(datetime!(2031-01-01 0:00 UTC));
        assert_eq!(c.now(), datetime!(2031-01-01 0:00 UTC));
    }
}
