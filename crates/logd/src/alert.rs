//! Integrity alerts and the hooks that see what logd ingests.
//!
//! logd raises an [`Alert`] itself for every integrity problem it can see: a
//! gap or a chain break in a shipped journal, a source shipping another
//! journal or a journal not its own, a record too large to log, a checkpoint
//! that does not advance or cannot get its witness quorum. Each alert is
//! written as a record into logd's own journal (so it enters the log), kept
//! for `GET /v1/alerts`, printed as one JSON line on stdout
//! ([`StdoutAlerts`]), posted to a webhook if one is configured
//! ([`WebhookAlerts`]), and handed to every [`AlertSink`] and [`Observer`].
//! Alerts carry names, numbers and hashes, nothing secret.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use nitrile_audit::AuditRecord;
use serde::{Deserialize, Serialize};

use crate::leaf::LeafV1;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AlertKind {
    /// A source skipped records (withheld or lost).
    Gap,
    /// A shipped record does not continue its journal's hash chain, or
    /// differs from the record the log holds.
    ChainBreak,
    /// A source shipped a journal other than the one the log holds.
    JournalReplaced,
    /// A caller shipped a journal that is not its own.
    WrongSource,
    /// A record is too large to be a log leaf.
    LeafTooLarge,
    /// The log grew but no checkpoint covering it was published in time.
    CheckpointStalled,
    /// A checkpoint did not get its quorum of witness cosignatures.
    WitnessQuorum,
    /// A monitor rule or detector fired (the monitor's alert is the
    /// detail).
    Monitor,
}

impl AlertKind {
    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gap => "gap",
            Self::ChainBreak => "chain_break",
            Self::JournalReplaced => "journal_replaced",
            Self::WrongSource => "wrong_source",
            Self::LeafTooLarge => "leaf_too_large",
            Self::CheckpointStalled => "checkpoint_stalled",
            Self::WitnessQuorum => "witness_quorum",
            Self::Monitor => "monitor",
        }
    }
}

/// One integrity alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    /// `"integrity"` for what logd finds itself, `"monitor"` for what the
    /// monitor's rules find: tells these lines apart on stdout.
    pub alert: String,
    /// What it is about.
    pub kind: AlertKind,
    /// When logd saw it, RFC 3339 UTC.
    pub time: String,
    /// The journal source concerned, if any.
    pub source: Option<String>,
    /// The caller whose request raised it, if any.
    pub principal: Option<String>,
    /// What happened, in words.
    pub message: String,
    /// Numbers and hashes of the problem.
    pub detail: serde_json::Value,
    /// The sequence number of the alert's record in logd's journal, when it
    /// could be written.
    pub audit_seq: Option<u64>,
}

/// The key of the object an alert record carries in its `detail`.
pub const ALERT_DETAIL_KEY: &str = "integrity_alert";

/// Something that gets every alert (a pager, the monitor).
pub trait AlertSink: Send + Sync + 'static {
    /// Called once per alert, after it is journaled. Must not block long.
    fn alert(&self, alert: &Alert);
}

/// Something that sees everything logd ingests (the monitor's hook).
pub trait Observer: Send + Sync + 'static {
    /// Called for every record appended to the log, in log order, once it is
    /// durable; `index` is its position in the log. Records whose payload is
    /// not an audit record are not passed here.
    fn record(&self, index: u64, leaf: &LeafV1, record: &AuditRecord);

    /// Called for every integrity alert.
    fn integrity(&self, alert: &Alert) {
        let _ = alert;
    }

    /// Called when a checkpoint of `size` entries has been published.
    fn checkpoint(&self, size: u64) {
        let _ = size;
    }
}

/// Prints each alert as one JSON line on stdout.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdoutAlerts;

impl AlertSink for StdoutAlerts {
    fn alert(&self, alert: &Alert) {
        if let Ok(line) = serde_json::to_string(alert) {
            println!("{line}");
        }
    }
}

/// Largest webhook URL accepted.
pub const MAX_WEBHOOK_URL: usize = 512;
/// How long one webhook delivery may take.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a webhook URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// only `http://host:port/path` URLs are supported
    #[error("webhook URL must be http://HOST:PORT/PATH (at most {MAX_WEBHOOK_URL} bytes)")]
    BadUrl,
}

/// Posts each alert as JSON to a URL (`http://host:port/path`; alerts hold
/// nothing secret, so plain HTTP to a local collector is acceptable).
/// Delivery is best effort, in the background, with a timeout; failures are
/// logged.
#[derive(Debug, Clone)]
pub struct WebhookAlerts {
    authority: Arc<str>,
    path: Arc<str>,
}

impl WebhookAlerts {
    /// Parses `url`.
    pub fn new(url: &str) -> Result<Self, WebhookError> {
        if url.len() > MAX_WEBHOOK_URL || !url.is_ascii() {
            return Err(WebhookError::BadUrl);
        }
        let rest = url.strip_prefix("http://").ok_or(WebhookError::BadUrl)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let (host, port) = authority.rsplit_once(':').ok_or(WebhookError::BadUrl)?;
        if host.is_empty()
            || port.parse::<u16>().is_err()
            || authority
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b == b'@')
            || path.bytes().any(|b| b.is_ascii_control() || b == b' ')
        {
            return Err(WebhookError::BadUrl);
        }
        Ok(Self {
            authority: authority.into(),
            path: path.into(),
        })
    }

    async fn post(authority: &str, path: &str, body: Bytes) -> Result<u16, String> {
        let tcp = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::post(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    }
}

impl AlertSink for WebhookAlerts {
    fn alert(&self, alert: &Alert) {
        let Ok(body) = serde_json::to_vec(alert) else {
            return;
        };
        let (authority, path) = (Arc::clone(&self.authority), Arc::clone(&self.path));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no runtime to deliver a webhook alert");
            return;
        };
        rt.spawn(async move {
            match tokio::time::timeout(
                WEBHOOK_TIMEOUT,
                Self::post(&authority, &path, Bytes::from(body)),
            )
            .await
            {
                Ok(Ok(status)) if (200..300).contains(&status) => {}
                Ok(Ok(status)) => tracing::warn!(status, "webhook refused an alert"),
                Ok(Err(e)) => tracing::warn!(error = %e, "webhook delivery failed"),
                Err(_) => tracing::warn!("webhook delivery timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_are_parsed_strictly() {
        let w = WebhookAlerts::new("http://127.0.0.1:9000/alerts").unwrap();
        assert_eq!(&*w.authority, "127.0.0.1:9000");
        assert_eq!(&*w.path, "/alerts");
        assert_eq!(
            &*WebhookAlerts::new("http://localhost:80").unwrap().path,
            "/"
        );
        for bad in [
            "https://127.0.0.1:9000/",
            "http://127.0.0.1/",
            "http://:9000/",
            "http://u@h:1/",
            "http://h:99999/",
            "http://h:1/a b",
            "ftp://h:1/",
        ] {
            assert_eq!(
                WebhookAlerts::new(bad).unwrap_err(),
                WebhookError::BadUrl,
                "{bad}"
            );
        }
    }
}
