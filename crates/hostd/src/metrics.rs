//! The host agent's metrics, in the Prometheus text exposition format,
//! written to a file (`<state>/metrics.prom`) for a node_exporter textfile
//! collector: hostd opens no port but its mTLS one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use nitrile_api::Operation;
use nitrile_api::wire::RefusalStep;
use nitrile_net::Registry;

/// The metrics file's name in the host state directory.
pub const METRICS_FILE: &str = "metrics.prom";

/// How a request ended, for [`HostdMetrics::request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RequestOutcome {
    /// Admitted and executed.
    Ok,
    /// Admitted, then failed (state, hypervisor).
    Failed,
    /// Refused before execution.
    Refused,
}

impl RequestOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Refused => "refused",
        }
    }
}

/// Counters of the host agent. The TLS counters of the server itself
/// (handshakes, sessions, connections) live in its [`Registry`] and are
/// rendered with these.
#[derive(Debug, Default)]
pub struct HostdMetrics {
    requests: Mutex<BTreeMap<(&'static str, RequestOutcome), u64>>,
    refusals: Mutex<BTreeMap<&'static str, u64>>,
    tls_refusals: AtomicU64,
}

impl HostdMetrics {
    /// No counts yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts a request for `operation` (`None`: not an API request).
    pub fn request(&self, operation: Option<Operation>, outcome: RequestOutcome) {
        let op = operation.map_or("none", Operation::as_str);
        let mut m = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        *m.entry((op, outcome)).or_default() += 1;
    }

    /// Counts a refusal at `step`.
    pub fn refusal(&self, step: RefusalStep) {
        let mut m = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        *m.entry(step.as_str()).or_default() += 1;
    }

    /// Counts a connection refused at TLS (failed handshake or a
    /// certificate of another cell).
    pub fn tls_refusal(&self) {
        self.tls_refusals(1);
    }

    /// Counts `n` connections refused at TLS or before it (failed
    /// handshakes, pre-authentication limits).
    pub fn tls_refusals(&self, n: u64) {
        self.tls_refusals.fetch_add(n, Ordering::Relaxed);
        let mut m = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        *m.entry(RefusalStep::Tls.as_str()).or_default() += n;
    }

    /// The exposition text: these counters, the gauges given, and the
    /// server's registry.
    pub fn render(
        &self,
        refusal_journal_failures: u64,
        instances_by_state: &BTreeMap<&'static str, u64>,
        journal_ok: bool,
        registry: &Registry,
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP nitrile_hostd_requests_total Admin requests by operation and outcome.\n\
             # TYPE nitrile_hostd_requests_total counter"
        );
        for ((op, outcome), n) in self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "nitrile_hostd_requests_total{{operation=\"{op}\",outcome=\"{}\"}} {n}",
                outcome.as_str()
            );
        }
        let _ = writeln!(
            out,
            "# HELP nitrile_hostd_refusals_total Refusals by the step that refused.\n\
             # TYPE nitrile_hostd_refusals_total counter"
        );
        for (step, n) in self
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(out, "nitrile_hostd_refusals_total{{step=\"{step}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP nitrile_hostd_refusal_journal_failures_total Refusals whose journal record could not be written.\n\
             # TYPE nitrile_hostd_refusal_journal_failures_total counter\n\
             nitrile_hostd_refusal_journal_failures_total {refusal_journal_failures}"
        );
        let _ = writeln!(
            out,
            "# HELP nitrile_hostd_tls_refusals_total Connections refused at TLS (handshake failed or certificate of no principal of this cell).\n\
             # TYPE nitrile_hostd_tls_refusals_total counter\n\
             nitrile_hostd_tls_refusals_total {}",
            self.tls_refusals.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP nitrile_hostd_journal_ok Whether the last journal append succeeded.\n\
             # TYPE nitrile_hostd_journal_ok gauge\n\
             nitrile_hostd_journal_ok {}",
            u8::from(journal_ok)
        );
        let _ = writeln!(
            out,
            "# HELP nitrile_hostd_instances Instances by state.\n\
             # TYPE nitrile_hostd_instances gauge"
        );
        for (state, n) in instances_by_state {
            let _ = writeln!(out, "nitrile_hostd_instances{{state=\"{state}\"}} {n}");
        }
        out.push_str(&registry.render());
        out
    }
}

/// Writes `text` to `path` atomically (owner-readable and group-readable,
/// for a collector running as another user in the host's group).
pub fn write_metrics_file(path: &Path, text: &str) -> Result<(), nitrile_fs::FsError> {
    nitrile_fs::write_atomic(path, text.as_bytes(), 0o640)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_labels_and_server_metrics() {
        let m = HostdMetrics::new();
        m.request(Some(Operation::HostDescribe), RequestOutcome::Ok);
        m.request(Some(Operation::HostDescribe), RequestOutcome::Ok);
        m.request(None, RequestOutcome::Refused);
        m.refusal(RefusalStep::Request);
        m.tls_refusal();
        let registry = Registry::new();
        registry
            .counter("nitrile_hostd_tls_handshake_failures_total", "x")
            .unwrap()
            .add(3);
        let mut states = BTreeMap::new();
        states.insert("running", 2u64);
        let text = m.render(4, &states, true, &registry);
        for line in [
            "nitrile_hostd_requests_total{operation=\"host.describe\",outcome=\"ok\"} 2",
            "nitrile_hostd_requests_total{operation=\"none\",outcome=\"refused\"} 1",
            "nitrile_hostd_refusals_total{step=\"request\"} 1",
            "nitrile_hostd_refusals_total{step=\"tls\"} 1",
            "nitrile_hostd_refusal_journal_failures_total 4",
            "nitrile_hostd_instances{state=\"running\"} 2",
            "nitrile_hostd_tls_handshake_failures_total 3",
            "nitrile_hostd_journal_ok 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        write_metrics_file(&path, &text).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}
