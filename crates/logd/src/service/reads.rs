//! The auditor's reads: admitted, answered, journaled.

use super::*;

pub(super) fn hex_proof(p: Vec<nitrile_tlog::Hash>) -> ProofBody {
    ProofBody {
        proof: p.into_iter().map(hex::encode).collect(),
    }
}

impl Inner {
    /// Answers a read (blocking).
    pub(super) fn answer(&self, read: &Read) -> Result<Response<Bytes>, (u16, String)> {
        let log_err = |e: StoreError| (500, crate::shipper::error_chain(&e));
        match read {
            Read::History { from } => {
                let (notes, next) = self
                    .store
                    .with_log(|l| l.history(*from, MAX_CHECKPOINTS_PER_READ))
                    .map_err(|e| log_err(e.into()))?;
                let body = HistoryBody {
                    checkpoints: notes.into_iter().map(|n| n.text).collect(),
                    next,
                };
                Ok(json_response(StatusCode::OK, &body))
            }
            Read::Tile(path) => match self.store.with_log(|l| l.storage().read(path)) {
                Ok(Some(b)) => Ok(bytes_response("application/octet-stream", b)),
                Ok(None) => Err((404, format!("no tile {path}"))),
                Err(e) => Err(log_err(e.into())),
            },
            Read::Entries { start, count } => {
                let leaves = self
                    .store
                    .leaves(*start, (*count).min(MAX_ENTRIES_PER_READ))
                    .map_err(log_err)?;
                let body: Vec<EntryBody> = leaves
                    .into_iter()
                    .enumerate()
                    .map(|(i, l)| {
                        let record = serde_json::from_slice::<serde_json::Value>(&l.payload).ok();
                        EntryBody {
                            index: start + i as u64,
                            payload: record.is_none().then(|| base64(&l.payload)),
                            record,
                            source: l.source,
                            journal_id: l.journal_id,
                            seq: l.seq,
                            hash: l.hash,
                        }
                    })
                    .collect();
                Ok(json_response(StatusCode::OK, &body))
            }
            _ => self.answer_in_memory(&self.store.read_log(), read),
        }
    }

    /// Answers a read from what the log keeps in memory ([`Read::in_memory`]).
    pub(super) fn answer_in_memory(
        &self,
        l: &Log<LogStorage>,
        read: &Read,
    ) -> Result<Response<Bytes>, (u16, String)> {
        let log_err = |e: StoreError| (500, crate::shipper::error_chain(&e));
        match read {
            Read::Checkpoint => match l.checkpoint() {
                Some(note) => Ok(bytes_response(
                    "text/plain; charset=utf-8",
                    note.text.into_bytes(),
                )),
                None => Err((404, "no checkpoint has been published yet".into())),
            },
            Read::Inclusion { index, size } => {
                if *index >= *size || *size > l.size() {
                    return Err((404, format!("no entry {index} in a tree of size {size}")));
                }
                let proof = l
                    .inclusion_proof(*index, *size)
                    .map_err(|e| log_err(e.into()))?;
                Ok(json_response(StatusCode::OK, &hex_proof(proof)))
            }
            Read::InclusionRange { start, count, size } => {
                if *start >= *size || *size > l.size() || *count == 0 {
                    return Err((
                        404,
                        format!("no entries from {start} in a tree of size {size}"),
                    ));
                }
                let end = start
                    .saturating_add((*count).min(MAX_PROOFS_PER_READ))
                    .min(*size);
                let proofs = (*start..end)
                    .map(|i| {
                        l.inclusion_proof(i, *size)
                            .map(|p| p.into_iter().map(hex::encode).collect())
                            .map_err(|e| log_err(e.into()))
                    })
                    .collect::<Result<Vec<Vec<String>>, _>>()?;
                Ok(json_response(
                    StatusCode::OK,
                    &ProofsBody {
                        start: *start,
                        size: *size,
                        proofs,
                    },
                ))
            }
            Read::Consistency { old, new } => {
                if *old > *new || *new > l.size() {
                    return Err((404, format!("no consistency proof from {old} to {new}")));
                }
                let proof = l
                    .consistency_proof(*old, *new)
                    .map_err(|e| log_err(e.into()))?;
                Ok(json_response(StatusCode::OK, &hex_proof(proof)))
            }
            Read::Alerts { after } => {
                let page = self
                    .alerts
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .page(*after, MAX_ALERTS_PER_READ);
                Ok(json_response(StatusCode::OK, &page))
            }
            Read::History { .. } | Read::Tile(_) | Read::Entries { .. } => {
                Err((500, "not a read answered from memory".into()))
            }
        }
    }

    pub(super) async fn read(
        self: &Arc<Self>,
        peer: PeerIdentity,
        token: Option<String>,
        read: Read,
        path: String,
    ) -> Response<Bytes> {
        let admitted = match self
            .admission
            .admit_async(
                &peer,
                token.as_deref(),
                Operation::AuditRead,
                &self.log_resource,
            )
            .await
        {
            Ok(a) => a,
            Err(r) => {
                self.metrics.reads_refused.inc();
                return r.response();
            }
        };
        // Answered from memory at once when the log is free (microseconds,
        // no handoff to a thread); else, and for reads of storage, on a
        // blocking thread, so that no async worker waits on the lock.
        let at_once = read
            .in_memory()
            .then(|| self.store.try_read_log())
            .flatten()
            .map(|l| self.answer_in_memory(&l, &read));
        let answered = match at_once {
            Some(a) => Ok(a),
            None => {
                let inner = Arc::clone(self);
                tokio::task::spawn_blocking(move || inner.answer(&read)).await
            }
        };
        let detail = |extra: Option<(u16, &str)>| {
            let mut d = serde_json::json!({ "read": nitrile_api::admin::clip_text(&path, 120) });
            if let (Some((status, why)), Some(o)) = (extra, d.as_object_mut()) {
                o.insert("status".into(), status.into());
                o.insert(
                    "reason".into(),
                    nitrile_api::admin::clip_text(why, 200).into(),
                );
            }
            d
        };
        let (outcome, detail, resp) = match answered {
            Ok(Ok(resp)) => (Outcome::Executed, detail(None), Ok(resp)),
            Ok(Err((status, why))) => (
                Outcome::Failed,
                detail(Some((status, &why))),
                Err((status, why)),
            ),
            Err(_) => (
                Outcome::Failed,
                detail(Some((500, "internal failure"))),
                Err((500, "internal failure".to_owned())),
            ),
        };
        if let Ok(r) = resp {
            self.metrics.reads_answered.inc();
            // The request record is durable already; the outcome of a
            // served read is queued in journal order before the answer
            // leaves and made durable by the next group commit, without
            // holding the answer for a second fsync.
            let record = AuditRecord::outcome(
                self.clock.now(),
                self.me.clone(),
                admitted.request_id(),
                outcome,
            )
            .with_principal(peer.principal.clone())
            .with_cert_sha256(CertSha256::from_bytes(peer.cert_sha256))
            .with_operations([Operation::AuditRead])
            .with_resources([self.log_resource.clone()])
            .with_token_id(admitted.grant().token_id().to_string())
            .with_detail(detail);
            match record.encode() {
                Ok(bytes) => {
                    let pending = self.admission.journal().submit(&bytes);
                    tokio::spawn(async move {
                        if let Err(e) = pending.await {
                            tracing::error!(error = %e, "could not journal the outcome of a read");
                        }
                    });
                }
                Err(e) => tracing::error!(error = %e, "could not encode the outcome of a read"),
            }
            return r;
        }
        self.metrics.reads_failed.inc();
        match self
            .admission
            .complete_async(admitted, outcome, Some(detail))
            .await
        {
            Ok(receipt) => match resp {
                Ok(r) => r,
                Err((status, why)) => {
                    let step = if status == 404 {
                        RefusalStep::State
                    } else {
                        RefusalStep::Internal
                    };
                    refusal_response(status, step, &why, Some(receipt.seq))
                }
            },
            // The answer leaves only once the read is journaled.
            Err(e) => {
                tracing::error!(error = %crate::shipper::error_chain(&e), "could not journal a read");
                refusal_response(
                    503,
                    RefusalStep::Journal,
                    "the read could not be journaled, so it is not answered",
                    None,
                )
            }
        }
    }
}
