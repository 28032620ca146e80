//! The key service's counters (Prometheus, on the loopback metrics port).

use nitrile_net::{Counter, MetricsError, Registry};

/// Counters exposed as metrics.
#[derive(Debug)]
pub struct KmsMetrics {
    /// Volume data keys made.
    pub generated: Counter,
    /// Data keys released, sealed to a recipient.
    pub released: Counter,
    /// Volume key records destroyed on a host's request.
    pub destroyed: Counter,
    /// Key management requests that ran to completion.
    pub managed: Counter,
    /// Keys destroyed by the sweep at the end of their deletion window.
    pub keys_swept: Counter,
    /// Requests refused or failed, any step.
    pub refused: Counter,
    /// Refusals whose own journal record could not be written.
    pub refusal_journal_failures: Counter,
    /// Answers withheld because the journal could not record them.
    pub journal_failures: Counter,
}

impl KmsMetrics {
    /// Registers the service's counters.
    pub fn register(registry: &Registry) -> Result<Self, MetricsError> {
        Ok(Self {
            generated: registry.counter("nitrile_kms_generated_total", "Volume data keys made.")?,
            released: registry.counter(
                "nitrile_kms_released_total",
                "Data keys released, sealed to a recipient.",
            )?,
            destroyed: registry.counter(
                "nitrile_kms_destroyed_total",
                "Volume key records destroyed on a host's request.",
            )?,
            managed: registry.counter(
                "nitrile_kms_managed_total",
                "Key management requests that ran to completion.",
            )?,
            keys_swept: registry.counter(
                "nitrile_kms_keys_swept_total",
                "Keys destroyed at the end of their deletion window.",
            )?,
            refused: registry.counter(
                "nitrile_kms_refused_total",
                "Requests refused or failed, any step.",
            )?,
            refusal_journal_failures: registry.counter(
                "nitrile_kms_refusal_journal_failures_total",
                "Refusals whose journal record could not be written.",
            )?,
            journal_failures: registry.counter(
                "nitrile_kms_journal_failures_total",
                "Answers withheld because the journal could not record them.",
            )?,
        })
    }
}
