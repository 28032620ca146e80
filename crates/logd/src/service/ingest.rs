//! Ingest from the declared sources: batches, heads and anchors.

use super::*;

impl Inner {
    /// Hands newly logged records to the observers; returns the alerts
    /// sources raised in them, to be raised by logd too.
    pub(super) fn observe(&self, first_index: u64, leaves: &[LeafV1]) -> Vec<Alert> {
        let mut raised = Vec::new();
        for leaf in leaves {
            let key = ALERT_DETAIL_KEY.as_bytes();
            if !leaf.payload.windows(key.len()).any(|w| w == key) {
                continue;
            }
            if let Ok(record) = AuditRecord::decode(&leaf.payload)
                && let Some(alert) = self.source_alert(leaf, &record)
            {
                raised.push(alert);
            }
        }
        if self.observers.is_empty() && self.monitor.is_none() {
            return raised;
        }
        for (i, leaf) in leaves.iter().enumerate() {
            if let Ok(record) = AuditRecord::decode(&leaf.payload) {
                for o in &self.observers {
                    o.record(first_index + i as u64, leaf, &record);
                }
                self.feed_monitor(&Event::from_record(&leaf.source, leaf.seq, &record));
            }
        }
        raised
    }

    pub(super) async fn ingest(
        self: &Arc<Self>,
        peer: PeerIdentity,
        body: Bytes,
    ) -> Response<Bytes> {
        let detail = serde_json::json!({ "method": "POST", "path": "/v1/ingest" });
        let caller = peer.principal.uri();
        // Only a declared source ships a journal, and logd's own is ingested
        // in-process only: anyone else is refused before the body is read.
        let Some(role) = self
            .sources
            .role(&peer.principal)
            .filter(|r| *r != SourceRole::Log)
        else {
            let alert = self.new_alert(
                AlertKind::UndeclaredSource,
                None,
                Some(&peer.principal),
                format!("{caller} shipped a journal but is not a journal source of this cell"),
                serde_json::json!({}),
            );
            return self
                .refuse(
                    &peer,
                    403,
                    "undeclared_source",
                    format!("{caller} is not a journal source of this cell"),
                    detail,
                    Some(alert),
                )
                .await;
        };
        let batch: IngestBatch = match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return self
                    .refuse(
                        &peer,
                        400,
                        "bad_body",
                        format!("not an ingest batch: {e}"),
                        detail,
                        None,
                    )
                    .await;
            }
        };
        if batch.entries.len() > MAX_INGEST_ENTRIES {
            return self
                .refuse(
                    &peer,
                    400,
                    "too_many_entries",
                    format!("at most {MAX_INGEST_ENTRIES} entries per batch"),
                    detail,
                    None,
                )
                .await;
        }
        if batch.journal.source != caller {
            let claimed = nitrile_api::admin::clip_text(&batch.journal.source, 255);
            let alert = self.new_alert(
                AlertKind::WrongSource,
                Some(caller.clone()),
                Some(&peer.principal),
                format!("{caller} shipped the journal of another source"),
                serde_json::json!({
                    "claimed_source": claimed,
                    "journal_id": batch.journal.journal_id.to_string(),
                }),
            );
            return self
                .refuse(
                    &peer,
                    403,
                    "wrong_source",
                    format!("a caller ships only its own journal; you are {caller}"),
                    detail,
                    Some(alert),
                )
                .await;
        }
        let inner = Arc::clone(self);
        let now = now_ms(&*self.clock);
        let source = peer.principal.clone();
        let ingested = tokio::task::spawn_blocking(move || {
            // Records that continue the chain must also fit their source;
            // the ones before the first that does not are still taken, as
            // with a chain break (which the store finds first).
            let mut batch = batch;
            let known = inner.store.head(&batch.journal.source);
            let misfit = crate::chain::check_batch(known.as_ref(), &batch)
                .leaves
                .iter()
                .find_map(|l| check_record(role, &source, l.seq, &l.payload).err());
            if let Some(v) = &misfit {
                let seq = v.seq();
                batch.entries.retain(|e| e.seq < seq);
            }
            let r = inner.store.ingest(&batch, now);
            (batch, r, misfit)
        })
        .await;
        let (batch, ingested, misfit) = match ingested {
            Ok(x) => x,
            Err(_) => {
                return refusal_response(500, RefusalStep::Internal, "internal failure", None);
            }
        };
        let ingested = match ingested {
            Ok(i) => i,
            Err(e) => {
                let msg = crate::shipper::error_chain(&e);
                tracing::error!(error = %msg, "ingest failed");
                return self
                    .refuse(
                        &peer,
                        503,
                        "log_storage",
                        format!("the log cannot store records now: {msg}"),
                        detail,
                        None,
                    )
                    .await;
            }
        };
        for alert in self.observe(ingested.first_index, &ingested.checked.leaves) {
            self.raise(alert).await;
        }
        let appended = ingested.checked.leaves.len() as u64;
        self.metrics.records_ingested.add(appended);
        self.metrics
            .log_grew_to(ingested.first_index.saturating_add(appended));
        let state = ingested.checked.state;
        if let Some(head) = batch.head {
            // What the source says its journal holds against what the log
            // holds of it: the monitor's journal-lag detector.
            self.feed_monitor(&Event::journal_head(
                &batch.journal.source,
                head.max(state.acked_seq),
                state.acked_seq,
            ));
        }
        match (ingested.checked.violation, misfit) {
            (None, None) => json_response(
                StatusCode::OK,
                &IngestAck {
                    acked_seq: state.acked_seq,
                },
            ),
            (Some(v), _) => {
                let alert = self.new_alert(
                    kind_of(&v),
                    Some(batch.journal.source.clone()),
                    Some(&peer.principal),
                    v.to_string(),
                    serde_json::json!({
                        "violation": &v,
                        "journal_id": batch.journal.journal_id.to_string(),
                        "acked_seq": state.acked_seq,
                        "acked_hash": state.hash.to_string(),
                        "batch_first_seq": batch.entries.first().map(|e| e.seq),
                        "batch_last_seq": batch.entries.last().map(|e| e.seq),
                    }),
                );
                self.refuse(
                    &peer,
                    409,
                    v.code(),
                    format!(
                        "INTEGRITY ALERT: {v}; the log holds records up to {}",
                        state.acked_seq
                    ),
                    detail,
                    Some(alert),
                )
                .await
            }
            (None, Some(v)) => {
                self.refuse_misfit(&peer, &batch, state.acked_seq, v, detail)
                    .await
            }
        }
    }

    /// Refuses the rest of a batch from the first record that does not fit
    /// its source, with a `bad_record` alert.
    pub(super) async fn refuse_misfit(
        self: &Arc<Self>,
        peer: &PeerIdentity,
        batch: &IngestBatch,
        acked_seq: u64,
        v: ContentViolation,
        detail: serde_json::Value,
    ) -> Response<Bytes> {
        let caller = peer.principal.uri();
        let alert = self.new_alert(
            AlertKind::BadRecord,
            Some(caller),
            Some(&peer.principal),
            v.to_string(),
            serde_json::json!({
                "violation": &v,
                "journal_id": batch.journal.journal_id.to_string(),
                "acked_seq": acked_seq,
            }),
        );
        self.refuse(
            peer,
            409,
            "bad_record",
            format!("INTEGRITY ALERT: {v}; the log holds records up to {acked_seq}"),
            detail,
            Some(alert),
        )
        .await
    }

    pub(super) async fn head(
        self: &Arc<Self>,
        peer: PeerIdentity,
        kind: &str,
        name: &str,
    ) -> Response<Bytes> {
        let path = format!("/v1/ingest/head/{kind}/{name}");
        let detail = serde_json::json!({ "method": "GET", "path": nitrile_api::admin::clip_text(&path, 120) });
        let source = match (kind.parse::<PrincipalKind>(), Name::new(name)) {
            (Ok(k), Ok(n)) => PrincipalId::new(self.cell.clone(), k, n),
            _ => {
                return self
                    .refuse(
                        &peer,
                        404,
                        "unknown_path",
                        "no such source".into(),
                        detail,
                        None,
                    )
                    .await;
            }
        };
        if source != peer.principal {
            return self
                .refuse(
                    &peer,
                    403,
                    "wrong_source",
                    "a caller reads only the head of its own journal".into(),
                    detail,
                    None,
                )
                .await;
        }
        let head = match self.store.head(&source.uri()) {
            Some(s) => SourceHead {
                acked_seq: s.acked_seq,
                hash: Some(s.hash),
                journal_id: Some(s.journal_id),
            },
            None => SourceHead {
                acked_seq: 0,
                hash: None,
                journal_id: None,
            },
        };
        json_response(StatusCode::OK, &head)
    }

    /// The latest checkpoint, its consistency with the tree of `old`
    /// entries and the caller's last record it covers: what a source needs
    /// to anchor its journal in the log ([`AnchorBody`]). Only a declared
    /// source asks, for itself; hashes only, nothing of any record.
    pub(super) async fn anchor(
        self: &Arc<Self>,
        peer: PeerIdentity,
        kind: &str,
        name: &str,
        old: u64,
    ) -> Response<Bytes> {
        let path = format!("/v1/ingest/anchor/{kind}/{name}/{old}");
        let detail = serde_json::json!({ "method": "GET", "path": nitrile_api::admin::clip_text(&path, 120) });
        let own = kind == peer.principal.kind.as_str() && name == peer.principal.name.as_str();
        if !own
            || self
                .sources
                .role(&peer.principal)
                .is_none_or(|r| r == SourceRole::Log)
        {
            return self
                .refuse(
                    &peer,
                    403,
                    "wrong_source",
                    "a declared source reads only the anchor of its own journal".into(),
                    detail,
                    None,
                )
                .await;
        }
        let inner = Arc::clone(self);
        let source = peer.principal.uri();
        let answer = tokio::task::spawn_blocking(move || {
            let l = inner.store.read_log();
            let note = l
                .checkpoint()
                .ok_or((404, "no checkpoint has been published yet".to_owned()))?;
            let size = nitrile_tlog::open_checkpoint(&note.text, &inner.origin, &inner.verifier)
                .map_err(|e| (500, e.to_string()))?
                .size;
            let consistency = if old == 0 || old >= size {
                Vec::new()
            } else {
                l.consistency_proof(old, size)
                    .map_err(|e| (500, e.to_string()))?
                    .into_iter()
                    .map(hex::encode)
                    .collect()
            };
            // The guard's own lock: a second read lock here, behind an
            // ingest waiting to write, would never be granted (it hung a
            // loaded `nitrile up` once).
            let covered = match l.covered(&source, size) {
                Some((seq, index)) => Some(CoveredRecord {
                    seq,
                    index,
                    inclusion: l
                        .inclusion_proof(index, size)
                        .map_err(|e| (500, e.to_string()))?
                        .into_iter()
                        .map(hex::encode)
                        .collect(),
                }),
                None => None,
            };
            Ok::<_, (u16, String)>(AnchorBody {
                checkpoint: note.text.clone(),
                consistency,
                covered,
            })
        })
        .await;
        match answer {
            Ok(Ok(body)) => json_response(StatusCode::OK, &body),
            Ok(Err((status, why))) => refusal_response(status, RefusalStep::State, &why, None),
            Err(_) => refusal_response(500, RefusalStep::Internal, "internal failure", None),
        }
    }
}
