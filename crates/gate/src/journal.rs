//! A service's write-ahead journal as the gate writes to it: every refusal
//! before admission (at TLS, of a request that is not one of the
//! service's, of a body that could not be read) and the records of
//! [`crate::Admission`], with the journal's health and the refusals that
//! could not be written counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nitrile_api::admin::clip_text;
use nitrile_api::wire::RefusalStep;
use nitrile_api::{Audience, PrincipalId, PrincipalKind};
use nitrile_audit::{AuditRecord, CertSha256, Journal, Receipt, RequestId};
use nitrile_net::PreauthReport;
use nitrile_pki::{PeerIdentity, PkiError};
use nitrile_token::Clock;

use crate::admission::AdmissionError;
use crate::http::Refused;

/// Most characters of a refused request's method kept in its record.
pub const MAX_RECORDED_METHOD: usize = 16;
/// Most characters of a refused request's path kept in its record.
pub const MAX_RECORDED_PATH: usize = 120;

/// One service's journal, as admission and the refusal hooks write to it.
/// Records name the service's principal as their source and, when it has
/// one, its token audience.
pub struct ServiceJournal {
    source: PrincipalId,
    audience: Option<Audience>,
    journal: Arc<Journal>,
    clock: Arc<dyn Clock>,
    journal_ok: AtomicBool,
    refusal_journal_failures: AtomicU64,
}

impl std::fmt::Debug for ServiceJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceJournal")
            .field("source", &self.source)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// The name a service goes by on stderr: `hostd` for a host, else the
/// service's own name.
fn label(source: &PrincipalId) -> &str {
    match source.kind {
        PrincipalKind::Host => "hostd",
        _ => source.name.as_str(),
    }
}

/// The method and path of a refused request, clipped, for its record.
pub fn request_detail(method: &str, path: &str) -> serde_json::Value {
    serde_json::json!({
        "method": clip_text(method, MAX_RECORDED_METHOD),
        "path": clip_text(path, MAX_RECORDED_PATH),
    })
}

impl ServiceJournal {
    /// The journal of service `source`, whose records carry `audience` when
    /// the service takes tokens (its own audience), stamped by `clock`.
    pub fn new(
        source: PrincipalId,
        audience: Option<Audience>,
        journal: Arc<Journal>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            source,
            audience,
            journal,
            clock,
            journal_ok: AtomicBool::new(true),
            refusal_journal_failures: AtomicU64::new(0),
        }
    }

    /// The service's principal (the journal's source).
    pub fn source(&self) -> &PrincipalId {
        &self.source
    }

    /// The audience its records carry, if any.
    pub fn audience(&self) -> Option<&Audience> {
        self.audience.as_ref()
    }

    /// The write-ahead journal itself.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// The clock records are stamped with.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Whether the last journal append succeeded.
    pub fn journal_healthy(&self) -> bool {
        self.journal_ok.load(Ordering::Relaxed)
    }

    /// How many refusals could not be journaled (each was also reported on
    /// stderr).
    pub fn refusal_journal_failures(&self) -> u64 {
        self.refusal_journal_failures.load(Ordering::Relaxed)
    }

    /// Journals the refusal of a request that is not one of the service's
    /// (step `request`: unknown path or method, bad body, query string, a
    /// body that could not be read), before any token is looked at.
    /// `detail` says what was asked. Blocks on the journal.
    pub fn refuse_request(
        &self,
        peer: &PeerIdentity,
        status: u16,
        code: &'static str,
        reason: String,
        detail: serde_json::Value,
    ) -> Refused {
        self.refuse_unadmitted(
            Some(peer),
            None,
            status,
            RefusalStep::Request,
            code,
            reason,
            Some(detail),
        )
    }

    /// Journals a connection refused at TLS (step `tls`): a failed handshake
    /// (`cert_sha256` unknown, `detail` names the remote address) or a
    /// verified certificate naming no principal of this cell. Blocks on the
    /// journal.
    pub fn refuse_tls(
        &self,
        cert_sha256: Option<[u8; 32]>,
        reason: String,
        detail: Option<serde_json::Value>,
    ) -> Refused {
        self.refuse_unadmitted(
            None,
            cert_sha256,
            401,
            RefusalStep::Tls,
            "tls",
            reason,
            detail,
        )
    }

    /// [`nitrile_net::Handler::preauth_report`]: journals the report (one
    /// failed handshake, or the summary of an interval) as a refusal at
    /// step `tls` with no principal. `None` only if the journaling task
    /// failed.
    pub async fn preauth_report(self: &Arc<Self>, report: PreauthReport) -> Option<Refused> {
        let (reason, detail) = (report.record_reason(), report.record_detail());
        let this = Arc::clone(self);
        blocking(move || this.refuse_tls(None, reason, Some(detail))).await
    }

    /// [`nitrile_net::Handler::refused_at_tls`]: journals a verified
    /// certificate that names no principal of this cell, by its SHA-256.
    pub async fn refused_at_tls(
        self: &Arc<Self>,
        reason: &PkiError,
        cert_sha256: Option<[u8; 32]>,
    ) -> Option<Refused> {
        let reason = format!("certificate names no principal of this cell: {reason}");
        let this = Arc::clone(self);
        blocking(move || this.refuse_tls(cert_sha256, reason, None)).await
    }

    /// [`nitrile_net::Handler::request_unreadable`]: journals a request the
    /// server answered itself with `status` because its body could not be
    /// read whole (code `unreadable_body`, method and path in the detail).
    pub async fn request_unreadable(
        self: &Arc<Self>,
        peer: PeerIdentity,
        method: String,
        path: String,
        status: u16,
        reason: String,
    ) -> Option<Refused> {
        let this = Arc::clone(self);
        blocking(move || {
            let detail = request_detail(&method, &path);
            this.refuse_request(&peer, status, "unreadable_body", reason, detail)
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    fn refuse_unadmitted(
        &self,
        peer: Option<&PeerIdentity>,
        cert_sha256: Option<[u8; 32]>,
        status: u16,
        step: RefusalStep,
        code: &'static str,
        reason: String,
        detail: Option<serde_json::Value>,
    ) -> Refused {
        let now = self.clock.now();
        let request_id = RequestId::random(&mut rand_core::OsRng);
        let mut record = AuditRecord::refusal(
            now,
            self.source.clone(),
            request_id,
            step,
            &format!("{code}: {reason}"),
        );
        if let Some(audience) = &self.audience {
            record = record.with_audience(audience.clone());
        }
        if let Some(peer) = peer {
            record = record.with_principal(peer.principal.clone());
        }
        if let Some(d) = peer.map(|p| p.cert_sha256).or(cert_sha256) {
            record = record.with_cert_sha256(CertSha256::from_bytes(d));
        }
        if let Some(d) = detail {
            record = record.with_detail(d);
        }
        let audit_seq = self.refusal_seq(self.append(&record), code);
        Refused {
            status,
            step,
            code,
            reason,
            audit_seq,
        }
    }

    /// The sequence number of a journaled refusal; a failure is counted and
    /// reported on stderr.
    pub(crate) fn refusal_seq(
        &self,
        journaled: Result<Receipt, AdmissionError>,
        code: &'static str,
    ) -> Option<u64> {
        match journaled {
            Ok(r) => Some(r.seq),
            Err(e) => {
                self.refusal_journal_failures
                    .fetch_add(1, Ordering::Relaxed);
                let mut cause = String::new();
                let mut next = std::error::Error::source(&e);
                while let Some(c) = next {
                    cause.push_str(&format!(": {c}"));
                    next = c.source();
                }
                tracing::error!(error = %e, %cause, code, "could not journal a refusal");
                eprintln!(
                    "nitrile {}: could not journal a refusal ({code}): {e}{cause}",
                    label(&self.source)
                );
                None
            }
        }
    }

    /// Appends `record` and waits until it is durable, blocking the thread.
    pub(crate) fn append(&self, record: &AuditRecord) -> Result<Receipt, AdmissionError> {
        let bytes = record.encode()?;
        let result = self.journal.append(&bytes);
        self.journal_ok.store(result.is_ok(), Ordering::Relaxed);
        result.map_err(AdmissionError::Append)
    }

    /// [`ServiceJournal::append`] without blocking a thread.
    pub(crate) async fn append_async(
        &self,
        record: &AuditRecord,
    ) -> Result<Receipt, AdmissionError> {
        let bytes = record.encode()?;
        let result = self.journal.submit(&bytes).await;
        self.journal_ok.store(result.is_ok(), Ordering::Relaxed);
        result.map_err(AdmissionError::Append)
    }
}

/// Runs a journaling closure on a blocking thread (it waits for fdatasync).
async fn blocking<F: FnOnce() -> Refused + Send + 'static>(f: F) -> Option<Refused> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(error = %e, "refusal journaling task failed");
            None
        }
    }
}
