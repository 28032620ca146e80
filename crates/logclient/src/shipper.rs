//! The journal shipper: follows a service's or host's journal and ships it
//! to logd over mTLS.
//!
//! It asks logd where the log stands for this journal
//! (`GET /v1/ingest/head/<kind>/<name>`), checks that its own journal holds
//! that very record, and sends the records after it in batches
//! (`POST /v1/ingest`), moving on only when logd acknowledges them as
//! durable. After a disconnect or any refusal it backs off and starts over
//! from logd's head, so a record is never skipped, and a duplicate is
//! harmless. It only ever opens the journal for reading.
//!
//! With [`AnchorOptions`], it also anchors the journal in the log: every
//! interval it asks logd for the latest checkpoint, a consistency proof from
//! the checkpoint it remembers (in the source's state directory) and the
//! inclusion proof of its last record the checkpoint covers, checks them
//! ([`crate::anchor::check_anchor`]) and remembers the newer checkpoint. A
//! log that shrank, forked or lost the source's records raises a
//! `log_inconsistent` alert: a record in the source's own journal (so logd
//! lists it too, and a later honest log keeps it), an error line, and
//! [`ShipperStatus::alerts`].
//!
//! A service ships its own journal ([`JournalShipping`]): hostd from the
//! `[logd]` section of its config, tokend from its config's `logd`, both a
//! [`LogdTarget`]; the service starts the shipper when it serves and stops
//! it once its last records are journaled.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nitrile_api::{Name, PrincipalId};
use nitrile_audit::{AuditRecord, Journal, Outcome, RequestId};
use nitrile_net::Client;
use rustls::ClientConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::alert::{ALERT_DETAIL_KEY, Alert, AlertKind};
use crate::anchor::{AnchorProblem, RememberedCheckpoint, check_anchor};
use crate::leaf::LeafV1;
use crate::protocol::{
    AnchorBody, IngestAck, IngestBatch, IngestEntry, JournalRef, MAX_INGEST_BODY,
    MAX_INGEST_ENTRIES, SourceHead,
};
use crate::tail::{JournalTail, TailError};

/// How often the journal is looked at for new records when there were none.
pub const DEFAULT_POLL: Duration = Duration::from_millis(100);
/// The longest wait between attempts after errors.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Payload bytes per batch, leaving room for base64 and JSON in the body.
const BATCH_PAYLOAD_BYTES: usize = MAX_INGEST_BODY / 2;
/// How often a shipper anchors its journal in the log by default.
pub const DEFAULT_ANCHOR_INTERVAL: Duration = Duration::from_secs(5);
/// The same problem with the log is raised again at most this often.
pub const ANCHOR_ALERT_INTERVAL: Duration = Duration::from_secs(60);
/// Leaf hashes of shipped records kept to prove them in the log.
const SHIPPED_LEAVES_KEPT: usize = 256;
/// The file in a service's state directory where its shipper remembers the
/// checkpoint that last covered its journal.
pub const LOG_ANCHOR_FILE: &str = "log-anchor.json";

/// Why shipping stopped for a while (the shipper retries).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShipError {
    /// the journal could not be read or followed
    #[error("journal")]
    Tail(#[from] TailError),
    /// the journal's source is not a principal of a cell
    #[error("the journal's source {0:?} is not a principal")]
    Source(String),
    /// logd could not be reached or answered garbage
    #[error("logd")]
    Net(#[from] nitrile_net::NetError),
    /// logd refused a request
    #[error("logd refused ({status}): {reason}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// logd's reason.
        reason: String,
    },
    /// logd holds another journal of this source
    #[error("logd holds journal {held} of this source, not this one")]
    OtherJournal {
        /// The journal id logd holds.
        held: String,
    },
    /// a blocking task failed
    #[error("internal task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// What a shipper has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShipperStatus {
    /// The last record logd acknowledged.
    pub shipped_seq: u64,
    /// The last record seen in the journal.
    pub journal_head: u64,
    /// Batches acknowledged.
    pub batches: u64,
    /// The last error (with its causes), cleared by the next acknowledgement.
    pub last_error: Option<String>,
    /// The size of the last checkpoint found covering the journal.
    pub anchored_size: u64,
    /// `log_inconsistent` alerts raised.
    pub alerts: u64,
}

/// How a shipper anchors its journal in the log (see the module docs).
#[derive(Debug, Clone)]
pub struct AnchorOptions {
    /// The log's origin (`<cell>.nitrile/log`).
    pub origin: String,
    /// The log's key, pinned at provisioning.
    pub verifier: nitrile_tlog::NoteVerifier,
    /// Where the checkpoint last found covering the journal is kept.
    pub state_file: PathBuf,
    /// How often to check.
    pub interval: Duration,
}

/// Options of a shipper.
#[derive(Debug, Clone)]
pub struct ShipperOptions {
    /// How often to look for new records when there were none.
    pub poll: Duration,
    /// The longest wait between attempts after errors.
    pub max_backoff: Duration,
    /// The journal itself, when the shipper runs in its writer's process:
    /// each batch then carries the journal's durable head, so that the log's
    /// monitor sees how far shipping lags behind the journal; it is also
    /// where `log_inconsistent` alerts are journaled.
    pub journal: Option<Arc<Journal>>,
    /// Anchor the journal in the log.
    pub anchor: Option<AnchorOptions>,
}

impl Default for ShipperOptions {
    fn default() -> Self {
        Self {
            poll: DEFAULT_POLL,
            max_backoff: MAX_BACKOFF,
            journal: None,
            anchor: None,
        }
    }
}

/// Ships one journal to logd.
#[derive(Debug)]
pub struct Shipper;

/// A running shipper.
#[derive(Debug)]
pub struct ShipperHandle {
    status: Arc<Mutex<ShipperStatus>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ShipperHandle {
    /// What the shipper has done so far.
    pub fn status(&self) -> ShipperStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops the shipper (a batch in flight is abandoned; logd may still
    /// log it, which the next shipper sees in logd's head).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl Shipper {
    /// Starts shipping the journal at `journal_path` to logd at `logd_addr`
    /// (`host:port`), authenticated as `logd_principal`, with the client
    /// identity in `tls` (its principal must be the journal's source). Must
    /// be called within a tokio runtime.
    pub fn spawn(
        journal_path: PathBuf,
        logd_addr: String,
        logd_principal: PrincipalId,
        tls: Arc<ClientConfig>,
    ) -> ShipperHandle {
        Self::spawn_with(
            journal_path,
            logd_addr,
            logd_principal,
            tls,
            ShipperOptions::default(),
        )
    }

    /// [`Shipper::spawn`] with options.
    pub fn spawn_with(
        journal_path: PathBuf,
        logd_addr: String,
        logd_principal: PrincipalId,
        tls: Arc<ClientConfig>,
        options: ShipperOptions,
    ) -> ShipperHandle {
        let status = Arc::new(Mutex::new(ShipperStatus::default()));
        let (stop, stopped) = watch::channel(false);
        let run = Run {
            path: journal_path,
            addr: logd_addr,
            server: logd_principal,
            tls,
            options,
            status: Arc::clone(&status),
            stopped,
            tail: None,
            shipped: std::collections::VecDeque::new(),
            last_anchor: None,
            last_alert: None,
        };
        ShipperHandle {
            status,
            stop,
            task: tokio::spawn(run.run()),
        }
    }
}

struct Run {
    path: PathBuf,
    addr: String,
    server: PrincipalId,
    tls: Arc<ClientConfig>,
    options: ShipperOptions,
    status: Arc<Mutex<ShipperStatus>>,
    stopped: watch::Receiver<bool>,
    tail: Option<JournalTail>,
    /// (seq, leaf hash) of the last records shipped, newest last.
    shipped: std::collections::VecDeque<(u64, nitrile_tlog::Hash)>,
    /// When the journal was last anchored.
    last_anchor: Option<tokio::time::Instant>,
    /// The last problem raised and when.
    last_alert: Option<(AnchorProblem, tokio::time::Instant)>,
}

/// The chain of an error and its causes, on one line (`error: cause:
/// cause`), as a shipper reports it in [`ShipperStatus::last_error`].
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        s.push_str(": ");
        s.push_str(&c.to_string());
        next = c.source();
    }
    s
}

impl Run {
    fn set(&self, f: impl FnOnce(&mut ShipperStatus)) {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Sleeps `d`; true when asked to stop meanwhile.
    async fn sleep_or_stop(&mut self, d: Duration) -> bool {
        if *self.stopped.borrow() {
            return true;
        }
        let stopped = tokio::select! {
            _ = self.stopped.wait_for(|s| *s) => true,
            () = tokio::time::sleep(d) => false,
        };
        stopped || *self.stopped.borrow()
    }

    async fn run(mut self) {
        let mut backoff = self.options.poll;
        loop {
            if *self.stopped.borrow() {
                return;
            }
            match self.session().await {
                Ok(()) => return,
                Err(e) => {
                    let msg = error_chain(&e);
                    tracing::warn!(error = %msg, journal = %self.path.display(), "shipping paused");
                    self.set(|s| s.last_error = Some(msg));
                    if matches!(e, ShipError::Tail(_) | ShipError::OtherJournal { .. }) {
                        // Read the journal afresh next time.
                        self.tail = None;
                    }
                    if self.sleep_or_stop(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(self.options.max_backoff);
                }
            }
        }
    }

    /// One connection: resume from logd's head and ship until stopped (Ok)
    /// or an error.
    async fn session(&mut self) -> Result<(), ShipError> {
        let tail = match self.tail.take() {
            Some(t) => t,
            None => {
                let path = self.path.clone();
                tokio::task::spawn_blocking(move || JournalTail::open(&path)).await??
            }
        };
        let header = tail.header().clone();
        let source = PrincipalId::parse(&header.source)
            .map_err(|_| ShipError::Source(header.source.clone()))?;
        let mut client = Client::connect(&self.addr, &self.server, Arc::clone(&self.tls)).await?;
        let resp = client
            .get_json(&format!("/v1/ingest/head/{}/{}", source.kind, source.name))
            .await?;
        if !resp.status.is_success() {
            return Err(refused(&resp));
        }
        let head: SourceHead = resp.json()?;
        if let Some(held) = head.journal_id
            && held != header.journal_id
        {
            self.tail = Some(tail);
            return Err(ShipError::OtherJournal {
                held: held.to_string(),
            });
        }
        let start_hash = head.hash.unwrap_or(header.genesis);
        let mut tail = tail;
        let (t, r) = tokio::task::spawn_blocking(move || {
            let r = tail.seek_to(head.acked_seq, start_hash);
            (tail, r)
        })
        .await?;
        tail = t;
        if let Err(e) = r {
            // Keep nothing: the journal is read afresh next time.
            return Err(e.into());
        }
        self.set(|s| {
            s.shipped_seq = head.acked_seq;
            s.journal_head = s.journal_head.max(head.acked_seq);
        });
        let journal = JournalRef {
            source: header.source.clone(),
            journal_id: header.journal_id,
            genesis: header.genesis,
        };
        loop {
            if *self.stopped.borrow() {
                self.tail = Some(tail);
                return Ok(());
            }
            let (t, r) = tokio::task::spawn_blocking(move || {
                let r = tail.next_batch(MAX_INGEST_ENTRIES, BATCH_PAYLOAD_BYTES);
                (tail, r)
            })
            .await?;
            tail = t;
            let entries = r?;
            let Some(last) = entries.last() else {
                if let Err(e) = self.anchor_if_due(&mut client, &source).await {
                    self.tail = Some(tail);
                    return Err(e);
                }
                let poll = self.options.poll;
                if self.sleep_or_stop(poll).await {
                    self.tail = Some(tail);
                    return Ok(());
                }
                continue;
            };
            let last_seq = last.seq;
            let last_leaf = nitrile_tlog::leaf_hash(
                &crate::leaf::encode(&LeafV1 {
                    source: header.source.clone(),
                    journal_id: header.journal_id,
                    seq: last.seq,
                    hash: last.hash,
                    payload: last.payload.clone(),
                })
                .unwrap_or_default(),
            );
            let head = self
                .options
                .journal
                .as_ref()
                .filter(|j| j.header().journal_id == header.journal_id)
                .map(|j| j.head().seq.max(last_seq));
            self.set(|s| s.journal_head = s.journal_head.max(head.unwrap_or(last_seq)));
            let batch = IngestBatch {
                journal: journal.clone(),
                entries: entries.into_iter().map(IngestEntry::from).collect(),
                head,
            };
            let resp = match client.post_json("/v1/ingest", &batch).await {
                Ok(r) => r,
                Err(e) => {
                    // Start over from logd's head: the batch may or may not
                    // be in the log.
                    self.tail = Some(tail);
                    return Err(e.into());
                }
            };
            if !resp.status.is_success() {
                self.tail = Some(tail);
                return Err(refused(&resp));
            }
            let ack: IngestAck = resp.json()?;
            if ack.acked_seq != last_seq {
                self.tail = Some(tail);
                return Err(ShipError::Refused {
                    status: resp.status.as_u16(),
                    reason: format!("logd acknowledged {} of {last_seq}", ack.acked_seq),
                });
            }
            self.set(|s| {
                s.shipped_seq = last_seq;
                s.batches += 1;
                s.last_error = None;
            });
            if self.shipped.len() == SHIPPED_LEAVES_KEPT {
                self.shipped.pop_front();
            }
            self.shipped.push_back((last_seq, last_leaf));
            if let Err(e) = self.anchor_if_due(&mut client, &source).await {
                self.tail = Some(tail);
                return Err(e);
            }
        }
    }

    /// Anchors the journal in the log when an interval has passed since the
    /// last time (see [`AnchorOptions`]).
    async fn anchor_if_due(
        &mut self,
        client: &mut Client,
        source: &PrincipalId,
    ) -> Result<(), ShipError> {
        let Some(opts) = self.options.anchor.clone() else {
            return Ok(());
        };
        if self
            .last_anchor
            .is_some_and(|t| t.elapsed() < opts.interval)
        {
            return Ok(());
        }
        self.last_anchor = Some(tokio::time::Instant::now());
        let file = opts.state_file.clone();
        let remembered =
            tokio::task::spawn_blocking(move || RememberedCheckpoint::load(&file)).await?;
        let remembered = match remembered {
            Ok(r) => r,
            Err(e) => {
                // Unreadable memory is itself worth an alert: it was changed
                // by someone other than this shipper.
                tracing::error!(error = %error_chain(&e), "the remembered log checkpoint cannot be read");
                None
            }
        };
        let old = remembered.as_ref().map_or(0, |r| r.size);
        let resp = client
            .get_json(&format!(
                "/v1/ingest/anchor/{}/{}/{old}",
                source.kind, source.name
            ))
            .await?;
        if resp.status == http::StatusCode::NOT_FOUND {
            // No checkpoint yet.
            return Ok(());
        }
        if !resp.status.is_success() {
            return Err(refused(&resp));
        }
        let body: AnchorBody = resp.json()?;
        let known = self.shipped.clone();
        let checked = check_anchor(
            remembered.as_ref(),
            &body,
            &opts.origin,
            &opts.verifier,
            |seq| known.iter().find(|(s, _)| *s == seq).map(|(_, h)| *h),
        );
        match checked {
            Ok(Some(next)) => {
                let size = next.size;
                let file = opts.state_file.clone();
                match tokio::task::spawn_blocking(move || next.save(&file)).await? {
                    Ok(()) => self.set(|s| s.anchored_size = size),
                    Err(e) => {
                        tracing::warn!(error = %error_chain(&e), "could not remember the log's checkpoint")
                    }
                }
            }
            Ok(None) => {
                if let Some(r) = &remembered {
                    let size = r.size;
                    self.set(|s| s.anchored_size = size);
                }
            }
            Err(problem) => {
                self.alert(source, remembered.as_ref(), &body, problem)
                    .await
            }
        }
        Ok(())
    }

    /// Raises a `log_inconsistent` alert: an error line, the status, and a
    /// record in the source's own journal when the shipper has it.
    async fn alert(
        &mut self,
        source: &PrincipalId,
        remembered: Option<&RememberedCheckpoint>,
        body: &AnchorBody,
        problem: AnchorProblem,
    ) {
        if let Some((last, at)) = &self.last_alert
            && *last == problem
            && at.elapsed() < ANCHOR_ALERT_INTERVAL
        {
            return;
        }
        self.last_alert = Some((problem.clone(), tokio::time::Instant::now()));
        self.set(|s| s.alerts += 1);
        tracing::error!(problem = %problem, journal = %self.path.display(), "INTEGRITY ALERT: the audit log is not consistent with what this source saw");
        let Some(journal) = self.options.journal.clone() else {
            return;
        };
        let now = time::OffsetDateTime::now_utc();
        let alert = Alert {
            alert: "integrity".to_owned(),
            kind: AlertKind::LogInconsistent,
            time: nitrile_audit::format_time(now),
            source: Some(source.uri()),
            principal: None,
            message: problem.to_string(),
            detail: serde_json::json!({
                "violation": &problem,
                "remembered": remembered.map(|r| serde_json::json!({
                    "size": r.size, "root": r.root, "seq": r.seq,
                })),
                "offered": nitrile_api::admin::clip_text(&body.checkpoint, 1024),
            }),
            audit_seq: None,
            count: 1,
            first_time: None,
            cursor: 0,
        };
        let record = AuditRecord::outcome(
            now,
            source.clone(),
            RequestId::random(&mut rand_core::OsRng),
            Outcome::Failed,
        )
        .with_reason(&format!("INTEGRITY ALERT log_inconsistent: {problem}"))
        .with_detail(serde_json::json!({ ALERT_DETAIL_KEY: alert }));
        match record.encode() {
            Ok(bytes) => {
                if let Err(e) = journal.submit(&bytes).await {
                    tracing::error!(error = %e, "could not journal a log_inconsistent alert");
                }
            }
            Err(e) => tracing::error!(error = %e, "could not encode a log_inconsistent alert"),
        }
    }
}

fn refused(resp: &nitrile_net::Response) -> ShipError {
    ShipError::Refused {
        status: resp.status.as_u16(),
        reason: resp.refusal().map(|r| r.to_string()).unwrap_or_else(|| {
            String::from_utf8_lossy(&resp.body)
                .chars()
                .take(200)
                .collect()
        }),
    }
}

/// Where a service ships its journal: its `[logd]` config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogdTarget {
    /// The audit log service's mTLS address, `host:port`; its principal is
    /// `nitrile://<cell>/service/logd` ([`crate::logd_principal`]).
    pub addr: String,
    /// The log's public key (a signed-note vkey), pinned at provisioning:
    /// with it the shipper also anchors the journal in the log, remembering
    /// in `<state>/log-anchor.json` ([`LOG_ANCHOR_FILE`]) the last
    /// checkpoint that covered it and alerting when the log is not
    /// consistent with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_vkey: Option<String>,
}

/// The pinned log key of a [`LogdTarget`] is not a signed-note verifier key.
#[derive(Debug, thiserror::Error)]
#[error("the audit log's key (log_vkey) is not a signed-note vkey")]
pub struct LogKeyError(#[source] nitrile_tlog::NoteError);

/// A service's own journal, shipped by the service itself: what it knows
/// when it opens (its cell, its journal, its state directory and its client
/// identity) and where the journal goes ([`JournalShipping::set_target`],
/// from its config). [`JournalShipping::start`] starts the shipper when the
/// service serves; the service stops it after its last records.
///
/// A target's log key is checked when it is set, so that a service with a
/// key that is not one refuses to start rather than ship unanchored.
#[derive(Debug)]
pub struct JournalShipping {
    cell: Name,
    journal: Arc<Journal>,
    journal_path: PathBuf,
    state_dir: PathBuf,
    tls: Arc<ClientConfig>,
    target: Option<(String, Option<AnchorOptions>)>,
}

impl JournalShipping {
    /// Shipping nowhere yet of the journal `journal`, open in this process
    /// at `journal_path`, of a service of `cell` keeping its state in
    /// `state_dir`; `tls` is the service's client identity (its principal
    /// is the journal's source).
    pub fn new(
        cell: Name,
        journal: Arc<Journal>,
        journal_path: PathBuf,
        state_dir: &Path,
        tls: Arc<ClientConfig>,
    ) -> Self {
        Self {
            cell,
            journal,
            journal_path,
            state_dir: state_dir.to_owned(),
            tls,
            target: None,
        }
    }

    /// Ships to `target` (`None`: not at all). With the target's
    /// `log_vkey`, the journal is anchored in the log of the cell every
    /// [`DEFAULT_ANCHOR_INTERVAL`], the checkpoint remembered in
    /// [`LOG_ANCHOR_FILE`] of the state directory.
    pub fn set_target(&mut self, target: Option<&LogdTarget>) -> Result<(), LogKeyError> {
        self.target = match target {
            None => None,
            Some(t) => {
                let anchor = match &t.log_vkey {
                    Some(vkey) => Some(AnchorOptions {
                        origin: crate::log_origin(&self.cell),
                        verifier: nitrile_tlog::NoteVerifier::from_vkey(vkey.trim())
                            .map_err(LogKeyError)?,
                        state_file: self.state_dir.join(LOG_ANCHOR_FILE),
                        interval: DEFAULT_ANCHOR_INTERVAL,
                    }),
                    None => None,
                };
                Some((t.addr.clone(), anchor))
            }
        };
        Ok(())
    }

    /// The address shipped to, if any.
    pub fn target_addr(&self) -> Option<&str> {
        self.target.as_ref().map(|(addr, _)| addr.as_str())
    }

    /// Starts the shipper when there is a target (`None` otherwise); each
    /// batch carries the journal's durable head, and `log_inconsistent`
    /// alerts go into the journal. Must be called within a tokio runtime;
    /// stop it with [`ShipperHandle::stop`].
    pub fn start(&self) -> Option<ShipperHandle> {
        let (addr, anchor) = self.target.as_ref()?;
        Some(Shipper::spawn_with(
            self.journal_path.clone(),
            addr.clone(),
            crate::logd_principal(&self.cell),
            Arc::clone(&self.tls),
            ShipperOptions {
                journal: Some(Arc::clone(&self.journal)),
                anchor: anchor.clone(),
                ..ShipperOptions::default()
            },
        ))
    }
}
