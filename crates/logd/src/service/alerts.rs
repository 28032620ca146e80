//! Raising alerts: the table that deduplicates them, delivery to the
//! journal, the sinks, the observers and the monitor, and the alerts
//! sources raise in their own journals.

use super::*;

/// The key of the journal record's `detail` naming the bundle the monitor's
/// rules come from.
pub const MONITOR_BUNDLE_DETAIL_KEY: &str = "monitor_bundle";

pub(super) fn bundle_version_json(v: nitrile_policy::BundleVersion) -> serde_json::Value {
    serde_json::json!({ "serial": v.serial.get(), "digest": v.digest.to_hex() })
}

/// Journals which reviewed bundle the monitor's rules come from (at every
/// start: serial, digest and the one before when it changed), or the bundle
/// refused for an older or reused serial; a record that cannot be written
/// is reported (logd does not start without its journal anyway).
pub(super) fn journal_monitor_bundle(
    journal: &nitrile_audit::Journal,
    me: &PrincipalId,
    now: time::OffsetDateTime,
    loaded: &Result<(Monitor, nitrile_policy::BundleAdvance), crate::rules::BundleRulesError>,
) {
    let request_id = RequestId::random(&mut rand_core::OsRng);
    let record = match loaded {
        Ok((_, advance)) => {
            let mut bundle = bundle_version_json(advance.current());
            if let Some(p) = advance.previous() {
                bundle["previous"] = bundle_version_json(p);
            }
            AuditRecord::outcome(now, me.clone(), request_id, Outcome::Executed)
                .with_reason(&format!(
                    "monitor rules of entitlement bundle serial {} in force",
                    advance.current().serial
                ))
                .with_detail(serde_json::json!({ MONITOR_BUNDLE_DETAIL_KEY: bundle }))
        }
        Err(crate::rules::BundleRulesError::Order { source, .. }) => {
            let (nitrile_policy::SerialError::Rollback { loaded, recorded }
            | nitrile_policy::SerialError::SerialReused { loaded, recorded }) = source.as_ref()
            else {
                return;
            };
            AuditRecord::refusal(
                now,
                me.clone(),
                request_id,
                RefusalStep::Entitlement,
                &source.to_string(),
            )
            .with_detail(serde_json::json!({ MONITOR_BUNDLE_DETAIL_KEY: {
                "refused": bundle_version_json(*loaded),
                "in_force": bundle_version_json(*recorded),
            }}))
        }
        Err(_) => return,
    };
    let written = record
        .encode()
        .map_err(|e| e.to_string())
        .and_then(|b| journal.append(&b).map(|_| ()).map_err(|e| e.to_string()));
    if let Err(reason) = written {
        tracing::error!(%reason, "could not journal the monitor's entitlement bundle");
    }
}

/// The alerts recorded in logd's journal, in the table as they were raised.
pub(super) fn past_alerts(journal: &Path) -> Result<AlertTable, LogdError> {
    let mut table = AlertTable::new();
    for entry in JournalReader::open(journal)? {
        let entry = entry?;
        let Ok(record) = entry.record() else { continue };
        let Some(value) = record.detail.as_ref().and_then(|d| d.get(ALERT_DETAIL_KEY)) else {
            continue;
        };
        if let Ok(mut alert) = serde_json::from_value::<Alert>(value.clone()) {
            alert.audit_seq = Some(entry.seq);
            table.restore(alert);
        }
    }
    Ok(table)
}

pub(super) fn kind_of(v: &IntegrityViolation) -> AlertKind {
    match v {
        IntegrityViolation::Gap { .. } => AlertKind::Gap,
        IntegrityViolation::HashMismatch { .. } | IntegrityViolation::BadGenesis => {
            AlertKind::ChainBreak
        }
        IntegrityViolation::JournalReplaced { .. } => AlertKind::JournalReplaced,
        IntegrityViolation::LeafTooLarge { .. } => AlertKind::LeafTooLarge,
        _ => AlertKind::WrongSource,
    }
}

impl Inner {
    /// Feeds `event` to the monitor and queues the alerts it raises.
    pub(super) fn feed_monitor(&self, event: &Event) {
        let Some(m) = &self.monitor else { return };
        let raised = m
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(event, self.clock.now());
        self.queue_monitor_alerts(raised);
    }

    pub(super) fn queue_monitor_alerts(&self, raised: Vec<nitrile_monitor::Alert>) {
        for a in raised {
            if self.monitor_alerts.try_send(a).is_err() {
                self.metrics.monitor_alerts_dropped.inc();
                tracing::error!(
                    dropped = self.metrics.monitor_alerts_dropped.get(),
                    "monitor alert queue full; alert dropped"
                );
            }
        }
    }

    /// Raises the monitor's alerts like logd's own.
    pub(super) async fn monitor_loop(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::Receiver<nitrile_monitor::Alert>,
    ) {
        while let Some(m) = rx.recv().await {
            let source = m.events.first().map(|e| e.source.clone());
            let principal = m.group.get("principal").cloned();
            let mut alert = self.new_alert(
                AlertKind::Monitor,
                source,
                None,
                format!("{} ({} x)", m.title, m.count),
                serde_json::to_value(&m).unwrap_or_default(),
            );
            alert.alert = "monitor".to_owned();
            alert.principal = principal;
            self.raise(alert).await;
        }
    }

    /// Counts `alert` and notes it in the table: the entry as it stands and
    /// whether to deliver it now (a new one, or a repeat whose time has
    /// come).
    pub(super) fn note_alert(&self, alert: Alert) -> Raised {
        if alert.kind == AlertKind::Monitor {
            self.metrics.monitor_alerts.inc();
        } else {
            self.metrics.integrity_alerts.inc();
        }
        self.alerts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .raise(alert, self.clock.now())
    }

    /// Hands a delivered alert to the monitor, the sinks and the observers.
    pub(super) fn deliver(&self, alert: &Alert) {
        if let Some(seq) = alert.audit_seq {
            self.alerts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set_audit_seq(alert, seq);
        }
        if alert.kind != AlertKind::Monitor
            && let Some(kind) = IntegrityKind::from_name(alert.kind.as_str())
        {
            let seq = alert.detail["violation"]["got"]
                .as_u64()
                .or_else(|| alert.detail["violation"]["seq"].as_u64())
                .or_else(|| alert.detail["acked_seq"].as_u64().map(|s| s + 1))
                .unwrap_or(0);
            self.feed_monitor(&Event::integrity(
                kind,
                alert.source.as_deref().unwrap_or(""),
                seq,
                &alert.message,
            ));
        }
        for s in &self.sinks {
            s.alert(alert);
        }
        for o in &self.observers {
            o.integrity(alert);
        }
    }

    pub(super) fn new_alert(
        &self,
        kind: AlertKind,
        source: Option<String>,
        principal: Option<&PrincipalId>,
        message: String,
        detail: serde_json::Value,
    ) -> Alert {
        Alert {
            alert: "integrity".to_owned(),
            kind,
            time: nitrile_audit::format_time(self.clock.now()),
            source,
            principal: principal.map(PrincipalId::uri),
            message,
            detail,
            audit_seq: None,
            count: 1,
            first_time: None,
            cursor: 0,
        }
    }

    /// Raises an alert that no request refusal carries: noted in the table
    /// and, when it is to be delivered now, journaled as a failed outcome
    /// of logd's own work, then delivered.
    pub(super) async fn raise(&self, alert: Alert) {
        let raised = self.note_alert(alert);
        if raised.deliver {
            self.journal_and_deliver(raised.alert).await;
        }
    }

    /// Journals an alert to deliver (a failed outcome of logd's own work),
    /// then delivers it.
    pub(super) async fn journal_and_deliver(&self, mut alert: Alert) {
        let record = AuditRecord::outcome(
            self.clock.now(),
            self.me.clone(),
            RequestId::random(&mut rand_core::OsRng),
            Outcome::Failed,
        )
        .with_reason(&format!(
            "INTEGRITY ALERT {}: {}",
            alert.kind.as_str(),
            alert.message
        ))
        .with_detail(serde_json::json!({ ALERT_DETAIL_KEY: &alert }));
        alert.audit_seq = match record.encode() {
            Ok(bytes) => match self.admission.journal().submit(&bytes).await {
                Ok(r) => Some(r.seq),
                Err(e) => {
                    tracing::error!(error = %e, "could not journal an alert");
                    None
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "could not encode an alert");
                None
            }
        };
        self.deliver(&alert);
    }

    /// The alert a source raised in its own journal (a record of its own
    /// work whose detail carries one), as logd lists it: about that source,
    /// of a kind a source may raise.
    pub(super) fn source_alert(&self, leaf: &LeafV1, record: &AuditRecord) -> Option<Alert> {
        if leaf.source == self.me.uri() || record.principal.is_some() {
            return None;
        }
        let value = record.detail.as_ref()?.get(ALERT_DETAIL_KEY)?;
        let mut alert: Alert = serde_json::from_value(value.clone()).ok()?;
        if alert.kind != AlertKind::LogInconsistent {
            return None;
        }
        alert.source = Some(leaf.source.clone());
        alert.principal = None;
        alert.audit_seq = None;
        alert.count = 1;
        alert.first_time = None;
        alert.cursor = 0;
        Some(alert)
    }
}
