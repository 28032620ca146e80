//! logd's own metrics (`nitrile_logd_*`), besides the mTLS server's.

use super::*;

/// logd's own metrics, besides the mTLS server's (`nitrile_logd_*`). Each
/// is one atomic: updating one costs no lock.
#[derive(Debug, Clone)]
pub struct LogdMetrics {
    /// Entries in the log (raised after each ingest, set every checkpoint
    /// interval).
    pub log_size: Gauge,
    /// The size of the published checkpoint.
    pub checkpoint_size: Gauge,
    /// Checkpoints published.
    pub checkpoints_published: Counter,
    /// Records shipped by sources and appended to the log.
    pub records_ingested: Counter,
    /// Records of logd's own journal appended to the log.
    pub own_records_ingested: Counter,
    /// Ingest batches refused (malformed, too large, another source's
    /// journal, an integrity violation, the log unable to store).
    pub ingest_batches_refused: Counter,
    /// Reads answered with what they asked for.
    pub reads_answered: Counter,
    /// Reads refused before they were answered (no, bad or wrong token).
    pub reads_refused: Counter,
    /// Reads admitted but not answered (nothing there, storage, journal).
    pub reads_failed: Counter,
    /// Integrity alerts raised by logd's own checks.
    pub integrity_alerts: Counter,
    /// Monitor alerts raised.
    pub monitor_alerts: Counter,
    /// Monitor alerts dropped because the queue was full.
    pub monitor_alerts_dropped: Counter,
}

impl LogdMetrics {
    /// Registers logd's metrics in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, MetricsError> {
        let c = |n: &str, h: &str| registry.counter(&format!("nitrile_logd_{n}"), h);
        let g = |n: &str, h: &str| registry.gauge(&format!("nitrile_logd_{n}"), h);
        Ok(Self {
            log_size: g("log_size", "Entries in the transparency log.")?,
            checkpoint_size: g(
                "checkpoint_size",
                "Entries covered by the published checkpoint.",
            )?,
            checkpoints_published: c("checkpoints_published_total", "Checkpoints published.")?,
            records_ingested: c(
                "records_ingested_total",
                "Records shipped by sources and appended to the log.",
            )?,
            own_records_ingested: c(
                "own_records_ingested_total",
                "Records of logd's own journal appended to the log.",
            )?,
            ingest_batches_refused: c(
                "ingest_batches_refused_total",
                "Ingest batches refused, any reason.",
            )?,
            reads_answered: c("reads_answered_total", "Auditor reads answered.")?,
            reads_refused: c(
                "reads_refused_total",
                "Reads refused before they were answered (token, entitlement).",
            )?,
            reads_failed: c(
                "reads_failed_total",
                "Reads admitted but not answered (not found, storage, journal).",
            )?,
            integrity_alerts: c(
                "integrity_alerts_total",
                "Integrity alerts raised by logd's own checks.",
            )?,
            monitor_alerts: c("monitor_alerts_total", "Monitor alerts raised.")?,
            monitor_alerts_dropped: c(
                "monitor_alerts_dropped_total",
                "Monitor alerts dropped because the queue was full.",
            )?,
        })
    }

    /// Raises the log size gauge to `size` (the log only grows; a
    /// concurrent ingest may briefly leave it lower, until the next
    /// checkpoint interval sets it).
    pub(super) fn log_grew_to(&self, size: u64) {
        if size > self.log_size.get() {
            self.log_size.set(size);
        }
    }
}
