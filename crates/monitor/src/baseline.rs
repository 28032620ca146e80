//! The baseline detector: each (principal, operation) call rate per minute
//! compared with its own history.
//!
//! For every key it keeps an exponentially weighted mean and variance of
//! past per-minute counts (the first minute seeds the mean; idle minutes
//! count as zero). The current minute is anomalous when, after
//! `warmup_minutes` of history, its count reaches `floor` and exceeds
//! `mean + k * stddev`, the deviation taken as at least `sqrt(mean)` (the
//! noise of a steady random rate); it alerts once per key and minute. At
//! most `max_keys` keys are kept; when full, the least recently seen key is
//! forgotten.

use std::collections::HashMap;

/// How the baseline judges a rate.
#[derive(Debug, Clone, PartialEq)]
pub struct BaselineConfig {
    /// Weight of the newest minute in the running mean and variance (0..1).
    pub alpha: f64,
    /// How many standard deviations above the mean is anomalous.
    pub k: f64,
    /// The least count in a minute that can be anomalous.
    pub floor: u64,
    /// Minutes of history a key needs before it can be anomalous.
    pub warmup_minutes: u32,
    /// Most keys kept.
    pub max_keys: usize,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            alpha: 0.1,
            k: 4.0,
            floor: 30,
            warmup_minutes: 10,
            max_keys: 10_000,
        }
    }
}

/// Idle minutes folded in one step at most; beyond this the history has
/// decayed to nothing anyway.
const MAX_IDLE_FOLD: i64 = 24 * 60;

#[derive(Debug, Clone)]
struct KeyState {
    minute: i64,
    count: u64,
    mean: f64,
    var: f64,
    minutes: u32,
    alerted: bool,
}

impl KeyState {
    fn fold(&mut self, x: f64, alpha: f64) {
        if self.minutes == 0 {
            // The first minute seeds the mean, so a steady newcomer is not
            // measured against a history of zeros.
            self.mean = x;
            self.var = 0.0;
            self.minutes = 1;
            return;
        }
        let diff = x - self.mean;
        let incr = alpha * diff;
        self.mean += incr;
        self.var = (1.0 - alpha) * (self.var + diff * incr);
        self.minutes = self.minutes.saturating_add(1);
    }

    /// Closes the minutes before `minute`.
    fn advance(&mut self, minute: i64, alpha: f64) {
        if minute <= self.minute {
            return;
        }
        let closed = self.count as f64;
        self.fold(closed, alpha);
        let idle = (minute - self.minute - 1).min(MAX_IDLE_FOLD);
        for _ in 0..idle {
            self.fold(0.0, alpha);
        }
        self.minute = minute;
        self.count = 0;
        self.alerted = false;
    }
}

/// A minute whose rate is anomalous for its key.
#[derive(Debug, Clone, PartialEq)]
pub struct RateAnomaly {
    /// Calls in the current minute.
    pub count: u64,
    /// The key's running mean per minute.
    pub mean: f64,
    /// The key's running standard deviation.
    pub stddev: f64,
}

/// Per-key rate history.
#[derive(Debug)]
pub struct Baseline {
    config: BaselineConfig,
    keys: HashMap<(String, String), KeyState>,
}

impl Baseline {
    /// An empty baseline.
    pub fn new(config: BaselineConfig) -> Self {
        Self {
            config,
            keys: HashMap::new(),
        }
    }

    /// Keys tracked now (at most `max_keys`).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Counts one call of `operation` by `principal` at unix second `now`;
    /// the anomaly when this call makes the minute anomalous (once per key
    /// and minute).
    pub fn observe(&mut self, principal: &str, operation: &str, now: i64) -> Option<RateAnomaly> {
        let minute = now.div_euclid(60);
        let key = (principal.to_owned(), operation.to_owned());
        if !self.keys.contains_key(&key) && self.keys.len() >= self.config.max_keys.max(1) {
            self.evict();
        }
        let alpha = self.config.alpha.clamp(0.001, 1.0);
        let st = self.keys.entry(key).or_insert(KeyState {
            minute,
            count: 0,
            mean: 0.0,
            var: 0.0,
            minutes: 0,
            alerted: false,
        });
        st.advance(minute, alpha);
        // A call from a past minute (clock step back) counts in the current one.
        st.count = st.count.saturating_add(1);
        // Counts are noisy even at a steady rate: at least Poisson noise.
        let stddev = st.var.max(0.0).sqrt().max(st.mean.max(0.0).sqrt());
        let threshold = st.mean + self.config.k * stddev;
        let anomalous = !st.alerted
            && st.minutes >= self.config.warmup_minutes
            && st.count >= self.config.floor
            && st.count as f64 > threshold;
        if anomalous {
            st.alerted = true;
            return Some(RateAnomaly {
                count: st.count,
                mean: st.mean,
                stddev,
            });
        }
        None
    }

    /// Forgets the key seen least recently.
    fn evict(&mut self) {
        if let Some(k) = self
            .keys
            .iter()
            .min_by_key(|(_, s)| s.minute)
            .map(|(k, _)| k.clone())
        {
            self.keys.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BaselineConfig {
        BaselineConfig {
            floor: 10,
            warmup_minutes: 5,
            ..BaselineConfig::default()
        }
    }

    /// `per_minute` calls in each of `minutes` minutes from `start`.
    fn steady(b: &mut Baseline, start: i64, minutes: i64, per_minute: u64) -> usize {
        let mut alerts = 0;
        for m in 0..minutes {
            for i in 0..per_minute {
                let t = start + m * 60 + (i as i64 % 60);
                alerts += usize::from(b.observe("p", "host.describe", t).is_some());
            }
        }
        alerts
    }

    #[test]
    fn steady_rate_is_quiet_and_a_spike_alerts_once() {
        let mut b = Baseline::new(cfg());
        assert_eq!(steady(&mut b, 0, 30, 5), 0);
        let mut fired = Vec::new();
        for i in 0..100 {
            if let Some(a) = b.observe("p", "host.describe", 30 * 60 + i % 60) {
                fired.push(a);
            }
        }
        assert_eq!(fired.len(), 1);
        assert!(fired[0].count >= 10 && fired[0].mean > 3.0 && fired[0].mean < 6.0);
        // Other keys are unaffected.
        assert!(b.observe("p", "host.drain", 30 * 60).is_none());
    }

    #[test]
    fn no_alert_before_warmup_or_below_floor() {
        let mut b = Baseline::new(cfg());
        assert_eq!(steady(&mut b, 0, 1, 500), 0);
        let mut b = Baseline::new(cfg());
        assert_eq!(steady(&mut b, 0, 20, 1), 0);
        assert_eq!(steady(&mut b, 20 * 60, 1, 9), 0);
    }

    #[test]
    fn keys_are_bounded() {
        let mut b = Baseline::new(BaselineConfig {
            max_keys: 8,
            ..cfg()
        });
        for i in 0..100 {
            b.observe(&format!("p{i}"), "host.describe", i);
        }
        assert_eq!(b.len(), 8);
    }
}
