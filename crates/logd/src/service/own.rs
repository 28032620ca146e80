//! logd's own journal, ingested into the log.

use super::*;

/// Why a pass over logd's own journal stopped (the next pass starts over
/// from what the log holds).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(super) enum SelfIngestError {
    /// the journal could not be read or followed
    #[error("logd's journal")]
    Tail(#[from] crate::tail::TailError),
    /// the log could not take the records
    #[error("the log")]
    Store(#[from] StoreError),
    /// logd's own journal does not continue what the log holds of it
    #[error("own journal: {0}")]
    Integrity(IntegrityViolation),
}

impl Inner {
    /// Ingests logd's own journal into the log.
    pub(super) async fn self_ingest_loop(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tail: Option<JournalTail> = None;
        loop {
            let inner = Arc::clone(&self);
            let t = tail.take();
            let r = tokio::task::spawn_blocking(move || inner.self_ingest_once(t)).await;
            match r {
                Ok(Ok(t)) => tail = Some(t),
                Ok(Err(e)) => {
                    tracing::error!(error = %crate::shipper::error_chain(&e), "logd could not ingest its own journal");
                }
                Err(_) => {}
            }
            let stopping = *stop.borrow();
            if stopping {
                return;
            }
            let stopped = tokio::select! {
                _ = stop.wait_for(|s| *s) => true,
                () = tokio::time::sleep(SELF_INGEST_POLL) => false,
            };
            if stopped {
                // One last pass for the records of the shutdown.
                let inner = Arc::clone(&self);
                let t = tail.take();
                let _ = tokio::task::spawn_blocking(move || inner.self_ingest_once(t)).await;
                return;
            }
        }
    }

    /// Ingests what is new in logd's journal; on an error the tail is
    /// dropped and the next pass starts from the log's head.
    pub(super) fn self_ingest_once(
        &self,
        tail: Option<JournalTail>,
    ) -> Result<JournalTail, SelfIngestError> {
        let mut tail = match tail {
            Some(t) => t,
            None => {
                let mut t = JournalTail::open(&self.journal_path)?;
                let source = self.me.uri();
                if let Some(s) = self.store.head(&source) {
                    t.seek_to(s.acked_seq, s.hash)?;
                }
                t
            }
        };
        loop {
            let entries = tail.next_batch(MAX_INGEST_ENTRIES, MAX_INGEST_BODY / 2)?;
            if entries.is_empty() {
                return Ok(tail);
            }
            let h = tail.header();
            let batch = IngestBatch {
                journal: JournalRef {
                    source: h.source.clone(),
                    journal_id: h.journal_id,
                    genesis: h.genesis,
                },
                entries: entries.into_iter().map(IngestEntry::from).collect(),
                head: None,
            };
            match self.store.ingest_own(&batch) {
                Ok(i) => {
                    // logd raises no alert on its own records twice.
                    let _ = self.observe(i.first_index, &i.checked.leaves);
                    let appended = i.checked.leaves.len() as u64;
                    self.metrics.own_records_ingested.add(appended);
                    self.metrics
                        .log_grew_to(i.first_index.saturating_add(appended));
                    if let Some(v) = i.checked.violation {
                        // Start over from the log's head next time.
                        return Err(SelfIngestError::Integrity(v));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
