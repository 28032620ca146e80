//! The closed set of endpoints, their parsing, the refusal path and the
//! server's handler.

use super::*;

pub(super) fn bytes_response(content_type: &'static str, body: Vec<u8>) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::from(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A read the auditor asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Read {
    Checkpoint,
    History { from: u64 },
    Tile(String),
    Inclusion { index: u64, size: u64 },
    InclusionRange { start: u64, count: u64, size: u64 },
    Consistency { old: u64, new: u64 },
    Entries { start: u64, count: u64 },
    Alerts { after: u64 },
}

impl Read {
    /// Whether it is answered from what the log keeps in memory (the tree,
    /// the published checkpoint, the alerts), never from storage.
    pub(super) fn in_memory(&self) -> bool {
        matches!(
            self,
            Self::Checkpoint
                | Self::Inclusion { .. }
                | Self::InclusionRange { .. }
                | Self::Consistency { .. }
                | Self::Alerts { .. }
        )
    }
}

/// What a path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Route {
    Ingest,
    Head(String, String),
    Anchor(String, String, u64),
    Read(Read),
}

/// Most bytes of a tile path.
pub(super) const MAX_TILE_PATH: usize = 96;

pub(super) fn parse_u64(s: &str) -> Option<u64> {
    (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

pub(super) fn route(method: &Method, path: &str) -> Result<Route, (u16, &'static str, String)> {
    let not_found = || {
        (
            404,
            "unknown_path",
            format!(
                "no such endpoint: {}",
                nitrile_api::admin::clip_text(path, 120)
            ),
        )
    };
    let parts: Vec<&str> = path
        .strip_prefix("/v1/")
        .ok_or_else(not_found)?
        .split('/')
        .collect();
    let wrong_method = |allowed: &str| {
        (
            405,
            "method_not_allowed",
            format!("{path} only accepts {allowed}"),
        )
    };
    let get = |r: Route| {
        if method == Method::GET {
            Ok(r)
        } else {
            Err(wrong_method("GET"))
        }
    };
    match parts.as_slice() {
        ["ingest"] if method == Method::POST => Ok(Route::Ingest),
        ["ingest"] => Err(wrong_method("POST")),
        ["ingest", "head", kind, name] => get(Route::Head((*kind).to_owned(), (*name).to_owned())),
        ["ingest", "anchor", kind, name, old] => match parse_u64(old) {
            Some(old) => get(Route::Anchor((*kind).to_owned(), (*name).to_owned(), old)),
            None => Err(not_found()),
        },
        ["log", "checkpoint"] => get(Route::Read(Read::Checkpoint)),
        ["log", "history", from] => match parse_u64(from) {
            Some(from) => get(Route::Read(Read::History { from })),
            None => Err(not_found()),
        },
        ["log", "tile", ..] => {
            let tile = &path["/v1/log/".len()..];
            let rest = tile
                .strip_prefix("tile/entries/")
                .or_else(|| tile.strip_prefix("tile/"))
                .unwrap_or("");
            if tile.len() > MAX_TILE_PATH
                || rest.is_empty()
                || !rest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b"/.xp".contains(&b))
                || tile.contains("..")
                || tile.contains("//")
                || tile.ends_with('/')
            {
                return Err(not_found());
            }
            get(Route::Read(Read::Tile(tile.to_owned())))
        }
        ["log", "proof", "inclusion", index, size] => match (parse_u64(index), parse_u64(size)) {
            (Some(index), Some(size)) => get(Route::Read(Read::Inclusion { index, size })),
            _ => Err(not_found()),
        },
        ["log", "proofs", "inclusion", start, count, size] => {
            match (parse_u64(start), parse_u64(count), parse_u64(size)) {
                (Some(start), Some(count), Some(size)) => {
                    get(Route::Read(Read::InclusionRange { start, count, size }))
                }
                _ => Err(not_found()),
            }
        }
        ["log", "proof", "consistency", old, new] => match (parse_u64(old), parse_u64(new)) {
            (Some(old), Some(new)) => get(Route::Read(Read::Consistency { old, new })),
            _ => Err(not_found()),
        },
        ["log", "entries", start, count] => match (parse_u64(start), parse_u64(count)) {
            (Some(start), Some(count)) => get(Route::Read(Read::Entries { start, count })),
            _ => Err(not_found()),
        },
        ["alerts"] => get(Route::Read(Read::Alerts { after: 0 })),
        ["alerts", after] => match parse_u64(after) {
            Some(after) => get(Route::Read(Read::Alerts { after })),
            None => Err(not_found()),
        },
        _ => Err(not_found()),
    }
}

pub(super) struct Api(pub(super) Arc<Inner>);

impl Handler for Api {
    async fn handle(&self, peer: PeerIdentity, req: Request<Bytes>) -> Response<Bytes> {
        let inner = Arc::clone(&self.0);
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let parsed = if parts.uri.query().is_some() {
            Err((400, "query", "query strings are not accepted".to_owned()))
        } else {
            route(&parts.method, &path)
        };
        let route = match parsed {
            Ok(r) => r,
            Err((status, code, reason)) => {
                let detail = request_detail(parts.method.as_str(), &path);
                return inner
                    .refuse(&peer, status, code, reason, detail, None)
                    .await;
            }
        };
        let token = bearer(&parts.headers);
        // A task of its own: once started, a request is journaled and
        // answered even if the caller goes away.
        tokio::spawn(async move {
            match route {
                Route::Ingest => {
                    let resp = inner.ingest(peer, body).await;
                    if resp.status() != StatusCode::OK {
                        inner.metrics.ingest_batches_refused.inc();
                    }
                    resp
                }
                Route::Head(kind, name) => inner.head(peer, &kind, &name).await,
                Route::Anchor(kind, name, old) => inner.anchor(peer, &kind, &name, old).await,
                Route::Read(read) => inner.read(peer, token, read, path).await,
            }
        })
        .await
        .unwrap_or_else(|_| refusal_response(500, RefusalStep::Internal, "internal failure", None))
    }

    async fn request_unreadable(
        &self,
        peer: PeerIdentity,
        method: String,
        path: String,
        status: u16,
        reason: String,
    ) {
        let journal = self.0.admission.service_journal();
        let _ = journal
            .request_unreadable(peer, method, path, status, reason)
            .await;
    }

    async fn preauth_report(&self, report: nitrile_net::PreauthReport) {
        let _ = self
            .0
            .admission
            .service_journal()
            .preauth_report(report)
            .await;
    }

    async fn refused_at_tls(&self, reason: &PkiError, cert_sha256: Option<[u8; 32]>) {
        let journal = self.0.admission.service_journal();
        let _ = journal.refused_at_tls(reason, cert_sha256).await;
    }
}

impl Inner {
    /// Journals the refusal of a request (step `request`), with `alert` in
    /// its detail when it raises one; delivers the alert.
    pub(super) async fn refuse(
        self: &Arc<Self>,
        peer: &PeerIdentity,
        status: u16,
        code: &'static str,
        reason: String,
        mut detail: serde_json::Value,
        alert: Option<Alert>,
    ) -> Response<Bytes> {
        // The refusal carries the alert's entry as it stands (so the table
        // is rebuilt from the journal as it was); a repeat held back is
        // counted there and delivered later.
        let raised = alert.map(|a| self.note_alert(a));
        if let (Some(r), Some(obj)) = (&raised, detail.as_object_mut()) {
            let a = &r.alert;
            obj.insert(
                ALERT_DETAIL_KEY.to_owned(),
                serde_json::to_value(a).unwrap_or_default(),
            );
        }
        let inner = Arc::clone(self);
        let peer2 = peer.clone();
        let r = tokio::task::spawn_blocking(move || {
            inner
                .admission
                .service_journal()
                .refuse_request(&peer2, status, code, reason, detail)
        })
        .await;
        match r {
            Ok(r) => {
                if let Some(Raised { mut alert, deliver }) = raised {
                    alert.audit_seq = r.audit_seq;
                    if deliver {
                        self.deliver(&alert);
                    } else if let Some(seq) = r.audit_seq {
                        self.alerts
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .set_audit_seq(&alert, seq);
                    }
                }
                r.response()
            }
            Err(_) => refusal_response(500, RefusalStep::Internal, "internal failure", None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_closed() {
        let g = Method::GET;
        assert_eq!(route(&Method::POST, "/v1/ingest"), Ok(Route::Ingest));
        assert_eq!(
            route(&g, "/v1/ingest/head/host/h1"),
            Ok(Route::Head("host".into(), "h1".into()))
        );
        assert_eq!(
            route(&g, "/v1/log/checkpoint"),
            Ok(Route::Read(Read::Checkpoint))
        );
        assert_eq!(
            route(&g, "/v1/log/tile/0/x001/234.p/5"),
            Ok(Route::Read(Read::Tile("tile/0/x001/234.p/5".into())))
        );
        assert_eq!(
            route(&g, "/v1/log/tile/entries/000"),
            Ok(Route::Read(Read::Tile("tile/entries/000".into())))
        );
        assert_eq!(
            route(&g, "/v1/log/proof/inclusion/3/10"),
            Ok(Route::Read(Read::Inclusion { index: 3, size: 10 }))
        );
        assert_eq!(
            route(&g, "/v1/log/proofs/inclusion/3/4/10"),
            Ok(Route::Read(Read::InclusionRange {
                start: 3,
                count: 4,
                size: 10
            }))
        );
        assert_eq!(
            route(&g, "/v1/log/proof/consistency/3/10"),
            Ok(Route::Read(Read::Consistency { old: 3, new: 10 }))
        );
        assert_eq!(
            route(&g, "/v1/log/entries/0/5"),
            Ok(Route::Read(Read::Entries { start: 0, count: 5 }))
        );
        assert_eq!(
            route(&g, "/v1/log/history/0"),
            Ok(Route::Read(Read::History { from: 0 }))
        );
        assert_eq!(
            route(&g, "/v1/alerts"),
            Ok(Route::Read(Read::Alerts { after: 0 }))
        );
        assert_eq!(
            route(&g, "/v1/alerts/17"),
            Ok(Route::Read(Read::Alerts { after: 17 }))
        );
        assert_eq!(
            route(&g, "/v1/ingest/anchor/host/h1/12"),
            Ok(Route::Anchor("host".into(), "h1".into(), 12))
        );
        for bad in [
            "/v1/log/tile/../sources.json",
            "/v1/log/tile/../../log.key",
            "/v1/log/tile/0//1",
            "/v1/log/proof/inclusion/-1/3",
            "/v1/log/proof/inclusion/1",
            "/v1/log/entries/a/1",
            "/v1/log/checkpoints/3",
            "/v1/log/history",
            "/v1/log/history/x",
            "/v1/log/history/1/2",
            "/v1/log/proofs/inclusion/1/2",
            "/v1/log/proofs/inclusion/1/x/3",
            "/v1/log/delete",
            "/v1/alerts/x",
            "/v1/alerts/1/2",
            "/v1/ingest/anchor/host/h1",
            "/v1/ingest/anchor/host/h1/-1",
            "/v2/alerts",
            "/",
        ] {
            assert_eq!(route(&g, bad).map_err(|e| e.0), Err(404), "{bad}");
        }
        assert_eq!(route(&g, "/v1/ingest").map_err(|e| e.0), Err(405));
        assert_eq!(
            route(&Method::DELETE, "/v1/log/checkpoint").map_err(|e| e.0),
            Err(405)
        );
        assert_eq!(
            route(&Method::PUT, "/v1/log/tile/0/000").map_err(|e| e.0),
            Err(405)
        );
    }
}
