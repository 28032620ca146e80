//! Checkpoints every interval, with the witnesses' cosignatures.

use super::*;

/// Why no checkpoint was published this interval (logd tries again at the
/// next one).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(super) enum CheckpointError {
    /// the log could not be made durable, signed or published
    #[error("the log")]
    Store(#[from] StoreError),
    /// the checkpoint just signed does not open with the log's own key
    #[error("the checkpoint just signed does not verify")]
    Note(#[from] nitrile_tlog::NoteError),
    /// fewer witnesses cosigned than the quorum needs
    #[error("{valid} of {quorum} witness cosignatures needed")]
    Quorum {
        /// Cosignatures that verify.
        valid: usize,
        /// Cosignatures needed.
        quorum: usize,
    },
    /// a blocking task failed
    #[error("internal task failed")]
    Task(#[from] tokio::task::JoinError),
}

pub(super) struct WitnessSlot {
    pub(super) name: Name,
    pub(super) principal: PrincipalId,
    pub(super) addr: String,
    pub(super) verifier: NoteVerifier,
    pub(super) client: Option<WitnessClient>,
    /// The size this witness last cosigned, as far as logd knows.
    pub(super) size: u64,
}

impl Inner {
    /// Checkpoints the log every interval when it grew, and at least every
    /// `max_age` anyway; raises `checkpoint_stalled` when a grown log goes
    /// [`STALL_INTERVALS`] intervals without a published checkpoint.
    pub(super) async fn checkpoint_loop(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut last_publish = tokio::time::Instant::now();
        let mut stalled = false;
        let mut last_persist_size = u64::MAX;
        // Ticks every interval from the start, however long a checkpoint
        // took (a late tick is taken at once, missed ones are not piled up).
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            let stopping = tokio::select! {
                _ = stop.wait_for(|s| *s) => true,
                _ = ticks.tick() => false,
            };
            if let Some(m) = &self.monitor {
                let raised = m
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .tick(self.clock.now());
                self.queue_monitor_alerts(raised);
            }
            let due = self
                .alerts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .due(self.clock.now());
            for alert in due {
                self.journal_and_deliver(alert).await;
            }
            let (size, published) = self.store.sizes(&self.origin, &self.verifier);
            let due = size > published
                || last_publish.elapsed() >= self.max_age
                || (size == 0
                    && published == 0
                    && self.store.with_log(|l| l.checkpoint().is_none()));
            if due {
                match self.checkpoint_once().await {
                    Ok(()) => {
                        last_publish = tokio::time::Instant::now();
                        stalled = false;
                    }
                    Err(e) => {
                        tracing::warn!(error = %crate::shipper::error_chain(&e), "no checkpoint published")
                    }
                }
            }
            let (size, published) = self.store.sizes(&self.origin, &self.verifier);
            self.metrics.log_size.set(size);
            self.metrics.checkpoint_size.set(published);
            if size > published
                && last_publish.elapsed() >= self.interval * STALL_INTERVALS
                && !stalled
            {
                stalled = true;
                let alert = self.new_alert(
                        AlertKind::CheckpointStalled,
                        None,
                        None,
                        format!(
                            "the log holds {size} entries but the last published checkpoint covers {published}, for {} ms",
                            last_publish.elapsed().as_millis()
                        ),
                        serde_json::json!({ "size": size, "published": published }),
                    );
                self.raise(alert).await;
            }
            if size != last_persist_size {
                let inner = Arc::clone(&self);
                match tokio::task::spawn_blocking(move || {
                    inner.store.persist(now_ms(&*inner.clock))
                })
                .await
                {
                    Ok(Ok(())) => last_persist_size = size,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %crate::shipper::error_chain(&e), "could not save source states")
                    }
                    Err(_) => {}
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Prepares a checkpoint, collects the witness quorum and publishes it.
    pub(super) async fn checkpoint_once(self: &Arc<Self>) -> Result<(), CheckpointError> {
        let now = now_ms(&*self.clock);
        let inner = Arc::clone(self);
        let note =
            tokio::task::spawn_blocking(move || inner.store.prepare_checkpoint(now)).await??;
        let note = if self.quorum == 0 {
            note
        } else {
            self.cosign(note).await?
        };
        let size = nitrile_tlog::open_checkpoint(&note.text, &self.origin, &self.verifier)?.size;
        let inner = Arc::clone(self);
        tokio::task::spawn_blocking(move || inner.store.publish(&note)).await??;
        self.metrics.checkpoint_size.set(size);
        self.metrics.checkpoints_published.inc();
        self.feed_monitor(&Event::checkpoint(&self.origin, size, self.clock.now()));
        for o in &self.observers {
            o.checkpoint(size);
        }
        Ok(())
    }

    /// Asks every witness to cosign `note`; the note with the cosignatures
    /// when at least the quorum verify, else an alert.
    pub(super) async fn cosign(
        self: &Arc<Self>,
        note: SignedNote,
    ) -> Result<SignedNote, CheckpointError> {
        let cp = nitrile_tlog::open_checkpoint(&note.text, &self.origin, &self.verifier)?;
        let mut witnesses = self.witnesses.lock().await;
        let mut lines = Vec::new();
        let mut failures = Vec::new();
        for w in witnesses.iter_mut() {
            match self.ask_witness(w, &note, cp.size).await {
                Ok(mut l) => lines.append(&mut l),
                Err(e) => {
                    let split = matches!(e, WitnessError::SplitView { .. });
                    failures.push(serde_json::json!({
                        "witness": w.name.as_str(),
                        "error": crate::shipper::error_chain(&e),
                        "split_view": split,
                    }));
                    w.client = None;
                }
            }
        }
        let verifiers: Vec<NoteVerifier> = witnesses.iter().map(|w| w.verifier.clone()).collect();
        drop(witnesses);
        let mut cosigned = note;
        for l in &lines {
            if let Ok(n) = cosigned.with_signature_line(l) {
                cosigned = n;
            }
        }
        let valid = nitrile_tlog::cosignatures(&cosigned.text, &verifiers);
        if valid.len() >= self.quorum {
            return Ok(cosigned);
        }
        let alert = self.new_alert(
            AlertKind::WitnessQuorum,
            None,
            None,
            format!(
                "checkpoint of size {} got {} of {} witness cosignatures needed",
                cp.size,
                valid.len(),
                self.quorum
            ),
            serde_json::json!({ "size": cp.size, "cosigned_by": valid, "failures": failures }),
        );
        self.raise(alert).await;
        Err(CheckpointError::Quorum {
            valid: valid.len(),
            quorum: self.quorum,
        })
    }

    pub(super) async fn ask_witness(
        &self,
        w: &mut WitnessSlot,
        note: &SignedNote,
        size: u64,
    ) -> Result<Vec<String>, WitnessError> {
        if w.client.is_none() {
            w.client = Some(
                WitnessClient::connect(&w.addr, &w.principal, Arc::clone(&self.witness_tls))
                    .await?,
            );
        }
        for _ in 0..2 {
            let old = w.size.min(size);
            let proof = if old == 0 || old == size {
                Vec::new()
            } else {
                self.store
                    .with_log(|l| l.consistency_proof(old, size))
                    .map_err(|e| WitnessError::Refused {
                        status: 500,
                        reason: e.to_string(),
                    })?
            };
            let client = w.client.as_mut().ok_or(WitnessError::Refused {
                status: 500,
                reason: "no connection".into(),
            })?;
            match client.add_checkpoint(old, &proof, &note.text).await {
                Ok(lines) => {
                    w.size = size;
                    return Ok(lines);
                }
                // The witness cosigned a larger tree than this one: the
                // log lost entries it had (retrying cannot help).
                Err(WitnessError::Conflict { recorded }) if recorded > size => {
                    w.size = recorded;
                    return Err(WitnessError::Conflict { recorded });
                }
                Err(WitnessError::Conflict { recorded }) if recorded != old => w.size = recorded,
                Err(e) => return Err(e),
            }
        }
        Err(WitnessError::Refused {
            status: 409,
            reason: "the witness's recorded size keeps changing".into(),
        })
    }
}
