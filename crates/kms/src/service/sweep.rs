//! The sweep: every interval (and once at start), keys whose deletion
//! window ended are destroyed with every volume record under them
//! ([`crate::Kms::sweep`]), and each destruction is journaled: one outcome
//! record of the service per key, naming the key and the volumes
//! crypto-erased with it (in parts of at most [`MAX_VOLUMES_PER_RECORD`]).

use std::sync::Arc;
use std::time::Duration;

use nitrile_api::wire::RefusalStep;
use nitrile_api::{Name, Operation, ResourceId, ResourceKind};
use nitrile_audit::Outcome;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Service;
use crate::kms::SweptKey;

/// Most volumes one sweep record names.
pub const MAX_VOLUMES_PER_RECORD: usize = 256;

/// Starts the sweep, every `interval` until `stop` turns true.
pub(crate) fn spawn(
    service: Arc<Service>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let svc = Arc::clone(&service);
            if let Err(e) = tokio::task::spawn_blocking(move || svc.sweep_once()).await {
                tracing::error!(error = %e, "sweep task failed");
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
    })
}

impl Service {
    /// Destroys the keys due now and journals each.
    pub(crate) fn sweep_once(&self) {
        let now = self.clock.now();
        match self.kms.sweep(now) {
            Ok(report) => {
                for key in &report.keys {
                    self.journal_swept(key, Outcome::Executed, None);
                }
            }
            Err(e) => {
                for key in &e.done.keys {
                    self.journal_swept(key, Outcome::Executed, None);
                }
                tracing::error!(key = %e.key, error = %e, "sweep stopped; the next one goes on");
                let partial = SweptKey {
                    key: e.key.clone(),
                    owner: self
                        .kms
                        .describe_key(&e.key)
                        .map(|k| k.owner)
                        .unwrap_or_else(|_| self.source.clone()),
                    delete_at: now,
                    volumes: e.partial_volumes.clone(),
                };
                self.journal_swept(&partial, Outcome::Failed, Some(e.source.to_string()));
            }
        }
    }

    fn journal_swept(&self, key: &SweptKey, outcome: Outcome, failure: Option<String>) {
        if outcome == Outcome::Executed {
            self.metrics.keys_swept.inc();
        }
        let key_resource = ResourceId::new(ResourceKind::KmsKey, key.key.name().clone());
        let volume = |v: &Name| ResourceId::new(ResourceKind::Volume, v.clone());
        let parts: Vec<&[Name]> = if key.volumes.is_empty() {
            vec![&[]]
        } else {
            key.volumes.chunks(MAX_VOLUMES_PER_RECORD).collect()
        };
        let count = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let mut detail = serde_json::json!({
                "swept": {
                    "owner": key.owner.uri(),
                    "delete_at": nitrile_audit::format_time(key.delete_at),
                    "volumes": key.volumes.len(),
                    "part": i + 1,
                    "parts": count,
                }
            });
            let reason = match &failure {
                Some(f) => {
                    detail["step"] = RefusalStep::Internal.as_str().into();
                    detail["code"] = "sweep".into();
                    detail["reason"] = f.as_str().into();
                    format!(
                        "destroying {} at the end of its deletion window failed after {} volume keys",
                        key.key,
                        key.volumes.len()
                    )
                }
                None => format!(
                    "{} destroyed at the end of its deletion window, with {} volume keys",
                    key.key,
                    key.volumes.len()
                ),
            };
            let record = self
                .own_record(outcome)
                .with_operations([Operation::KmsKeyScheduleDeletion])
                .with_resources(
                    std::iter::once(key_resource.clone()).chain(part.iter().map(volume)),
                )
                .with_reason(&reason)
                .with_detail(detail);
            if let Err(e) = self.append_blocking(&record) {
                tracing::error!(error = %e, key = %key.key, "could not journal a sweep");
                eprintln!(
                    "nitrile kms: could not journal the destruction of {}: {e}",
                    key.key
                );
            }
        }
    }
}
