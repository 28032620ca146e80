//! `nitrile deployd` on its mTLS port, and its rollouts.
//!
//! Per request: TLS 1.3 with a client certificate of the cell (else no
//! HTTP; journaled by the gate's hooks) -> [`DeployRequest::parse`] (else
//! 4xx, journaled, step `request`) -> `Admission` (token for audience
//! `deployer`, the operation, `deployment/<cell>`; request record durable)
//! -> act -> outcome record durable -> answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use nitrile_api::admin::{AdminRequest, Health, HostDescription, HostUpdate, HostUpdateRequest};
use nitrile_api::wire::RefusalStep;
use nitrile_api::{Audience, Name, PrincipalId};
use nitrile_audit::{AuditRecord, Journal, JournalError, JournalOptions, Outcome, RequestId};
use nitrile_deployd_api::{
    DEPLOYER_SERVICE, DeployRequest, Deployment, DeploymentState, HostStep, StartRequest,
    StepState, Wave, deployer_principal, deployment_resource,
};
use nitrile_gate::{
    Admission, AdmissionError, Admitted, Expected, IdentityError, Listeners, MetricsTask,
    ServiceIdentity, ServiceJournal, refusal_response, request_detail,
};
use nitrile_logclient::{JournalShipping, LogKeyError};
use nitrile_net::{Handler, PeerIdentity, PreauthReport, Registry, Server, json_response};
use nitrile_pki::PkiError;
use nitrile_token::{
    Clock, DEFAULT_REPLAY_CAPACITY, IssuerFile, IssuerFileError, ReplayCache, SystemClock, Verifier,
};
use nitrile_tokend_api::{HostCallError, HostCaller, TokendClient, tokend_principal};
use serde::{Deserialize, Serialize};

use crate::config::{DeploydConfig, JOURNAL_FILE, STATE_FILE};

/// How often a host is described while it takes a release over.
const POLL: Duration = Duration::from_secs(1);
/// Longest reason kept.
const MAX_REASON: usize = 1024;

/// Why the deployment service could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeploydServerError {
    /// its identity could not be loaded, or is not the deployer's
    #[error("deployment service identity")]
    Identity(#[from] IdentityError),
    /// the pinned token issuer keys could not be loaded
    #[error("token issuer keys {}", path.display())]
    IssuerKeys {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: IssuerFileError,
    },
    /// the journal could not be opened or written
    #[error("journal")]
    Journal(#[from] JournalError),
    /// admission could not be set up
    #[error("admission")]
    Admission(#[from] AdmissionError),
    /// the state directory or record is unusable
    #[error("state {}", path.display())]
    State {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `[logd]` cannot be shipped to
    #[error("[logd] in the config")]
    Logd(#[from] LogKeyError),
    /// the socket could not be bound or served
    #[error("network")]
    Net(#[from] nitrile_net::NetError),
}

/// The durable record: the rollout in progress or the last one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    last_id: u64,
    current: Option<Deployment>,
}

struct Service {
    cell: Name,
    source: PrincipalId,
    admission: Admission,
    journal: Arc<Journal>,
    clock: Arc<dyn Clock>,
    record: Mutex<Record>,
    record_path: PathBuf,
    hosts: BTreeMap<Name, String>,
    caller: HostCaller,
    default_waves: Vec<u32>,
    default_bake: u64,
    health_timeout: Duration,
    abort: AtomicBool,
}

/// A deployment service with its sockets bound, ready to serve.
pub struct DeploydServer {
    service: Arc<Service>,
    server: Server,
    listeners: Listeners,
    registry: Arc<Registry>,
    shipping: JournalShipping,
}

impl std::fmt::Debug for DeploydServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeploydServer")
            .field("listen", &self.listeners.local_addr())
            .finish_non_exhaustive()
    }
}

fn clip(s: &str) -> String {
    nitrile_api::admin::clip_text(s, MAX_REASON)
}

impl DeploydServer {
    /// Loads everything and binds the sockets; fails closed on any problem.
    pub async fn open(config: &DeploydConfig) -> Result<Self, DeploydServerError> {
        Self::open_with(config, Arc::new(SystemClock)).await
    }

    /// [`DeploydServer::open`] with a clock.
    pub async fn open_with(
        config: &DeploydConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, DeploydServerError> {
        let state_err = |reason: String| DeploydServerError::State {
            path: config.state.clone(),
            reason,
        };
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&config.state)
                .map_err(|e| state_err(e.to_string()))?;
            std::fs::set_permissions(&config.state, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| state_err(e.to_string()))?;
        }
        let me = deployer_principal(&config.cell);
        let identity = ServiceIdentity::load(
            &config.cell,
            &config.ca,
            &config.cert,
            &config.key,
            &Expected::Principal(me.clone()),
        )?;
        let issuer_keys = IssuerFile::load(&config.issuer_keys).map_err(|source| {
            DeploydServerError::IssuerKeys {
                path: config.issuer_keys.clone(),
                source,
            }
        })?;
        let journal_path = config.state.join(JOURNAL_FILE);
        let journal = Arc::new(JournalOptions::new().open(&journal_path, &me.uri())?);
        let client_tls = identity.client_config()?;
        let mut shipping = JournalShipping::new(
            config.cell.clone(),
            Arc::clone(&journal),
            journal_path.clone(),
            &config.state,
            client_tls.clone(),
        );
        shipping.set_target(config.logd.as_ref())?;
        let audience = Audience::new(DEPLOYER_SERVICE)
            .unwrap_or_else(|_| unreachable!("`deployer` is an audience"));
        let admission = Admission::new(
            me.clone(),
            Verifier::new(issuer_keys, audience),
            ReplayCache::new(DEFAULT_REPLAY_CAPACITY),
            Arc::clone(&journal),
            &journal_path,
            Arc::clone(&clock),
        )?;
        let record_path = config.state.join(STATE_FILE);
        let mut record: Record = match std::fs::read(&record_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| state_err(format!("{STATE_FILE}: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Record::default(),
            Err(e) => return Err(state_err(format!("{STATE_FILE}: {e}"))),
        };
        let caller = HostCaller {
            cell: config.cell.clone(),
            tokend: TokendClient::new(
                config.tokend.clone(),
                tokend_principal(&config.cell),
                client_tls,
            ),
            tls: identity.client_config()?,
        };
        let mut interrupted = None;
        if let Some(d) = &mut record.current
            && d.state == DeploymentState::Running
        {
            d.state = DeploymentState::Interrupted;
            d.finished_at = Some(nitrile_audit::format_time(clock.now()));
            d.reason = Some("the deployment service stopped during the rollout".into());
            interrupted = Some(d.id);
        }
        let service = Arc::new(Service {
            cell: config.cell.clone(),
            source: me.clone(),
            admission,
            journal: Arc::clone(&journal),
            clock: Arc::clone(&clock),
            record: Mutex::new(record),
            record_path,
            hosts: config.hosts.clone(),
            caller,
            default_waves: config.waves.clone(),
            default_bake: config.bake_secs,
            health_timeout: Duration::from_secs(config.health_timeout_secs),
            abort: AtomicBool::new(false),
        });
        service.save().map_err(state_err)?;
        service.event(
            true,
            &format!(
                "deployment service started with {} hosts",
                config.hosts.len()
            ),
            serde_json::json!({ "event": "deployment", "step": "service_started" }),
        )?;
        if let Some(id) = interrupted {
            service.event(
                false,
                &format!("deployment {id} interrupted: the service stopped during it"),
                serde_json::json!({ "event": "deployment", "id": id, "step": "interrupted" }),
            )?;
        }
        let registry = Arc::new(Registry::new());
        let server = identity
            .server()?
            .with_metrics(Arc::clone(&registry), "nitrile_deployd");
        let listeners = Listeners::bind(config.listen, config.metrics).await?;
        Ok(Self {
            service,
            server,
            listeners,
            registry,
            shipping,
        })
    }

    /// The bound mTLS address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listeners.local_addr()
    }

    /// Serves until `shutdown` resolves; the journal is shipped meanwhile
    /// when there is a `logd`. A rollout in progress stops with the service
    /// (recorded `interrupted` at the next start).
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), DeploydServerError> {
        let shipper = self.shipping.start();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics = MetricsTask::spawn(self.listeners.metrics, self.registry, stop_rx);
        let api = Api {
            service: Arc::clone(&self.service),
            refusals: Arc::clone(self.service.admission.service_journal()),
            rollouts: Mutex::new(None),
        };
        let result = self.server.serve(self.listeners.mtls, api, shutdown).await;
        let _ = stop_tx.send(true);
        metrics.join().await;
        if let Some(shipper) = shipper {
            shipper.stop().await;
        }
        result.map_err(DeploydServerError::from)
    }
}

/// Why an admitted request failed.
struct Failure {
    status: u16,
    step: RefusalStep,
    code: &'static str,
    reason: String,
}

impl Failure {
    fn new(status: u16, step: RefusalStep, code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            step,
            code,
            reason: reason.into(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Splits `hosts` into waves of `sizes` (the last size repeats).
fn plan(hosts: &[Name], sizes: &[u32]) -> Vec<Wave> {
    let mut waves = Vec::new();
    let mut rest = hosts;
    let mut k = 0;
    while !rest.is_empty() {
        let size = sizes
            .get(k)
            .or(sizes.last())
            .map_or(1, |s| (*s).max(1) as usize)
            .min(rest.len());
        let (now, later) = rest.split_at(size);
        waves.push(Wave {
            hosts: now
                .iter()
                .map(|h| HostStep {
                    host: h.clone(),
                    state: StepState::Pending,
                    from: None,
                    now: None,
                    detail: None,
                })
                .collect(),
        });
        rest = later;
        k += 1;
    }
    waves
}

impl Service {
    fn save(&self) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(&*lock(&self.record)).map_err(|e| e.to_string())?;
        nitrile_fs::write_atomic(&self.record_path, &bytes, 0o600).map_err(|e| e.to_string())
    }

    /// Journals a step of the service itself.
    fn event(
        &self,
        ok: bool,
        reason: &str,
        detail: serde_json::Value,
    ) -> Result<(), DeploydServerError> {
        let record = AuditRecord::outcome(
            self.clock.now(),
            self.source.clone(),
            RequestId::random(&mut rand_core::OsRng),
            if ok {
                Outcome::Executed
            } else {
                Outcome::Failed
            },
        )
        .with_principal(self.source.clone())
        .with_reason(reason)
        .with_detail(detail);
        if let Ok(bytes) = record.encode() {
            self.journal.append(&bytes)?;
        }
        Ok(())
    }

    /// Journals a rollout step; a journal that cannot be written stops the
    /// rollout (nothing acts unjournaled).
    async fn step(self: &Arc<Self>, ok: bool, reason: String, detail: serde_json::Value) -> bool {
        let me = Arc::clone(self);
        let done = tokio::task::spawn_blocking(move || me.event(ok, &reason, detail)).await;
        match done {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not journal a rollout step");
                false
            }
            Err(_) => false,
        }
    }

    /// Changes the current rollout and records it durably.
    fn update(&self, f: impl FnOnce(&mut Deployment)) {
        {
            let mut r = lock(&self.record);
            if let Some(d) = &mut r.current {
                f(d);
            }
        }
        if let Err(e) = self.save() {
            tracing::error!(error = %e, "could not record the rollout");
        }
    }

    fn set_host(&self, wave: usize, idx: usize, f: impl FnOnce(&mut HostStep)) {
        self.update(|d| {
            if let Some(h) = d.waves.get_mut(wave).and_then(|w| w.hosts.get_mut(idx)) {
                f(h);
            }
        });
    }

    async fn describe(&self, host: &Name) -> Result<HostDescription, HostCallError> {
        let addr = self.hosts.get(host).cloned().unwrap_or_default();
        self.caller
            .call(host, &addr, &AdminRequest::HostDescribe)
            .await
    }

    /// One host: its version before, host.update, then described until it
    /// serves `version` with a healthy journal. `Ok(from)` or why not.
    async fn update_host(
        self: &Arc<Self>,
        id: u64,
        wave: usize,
        idx: usize,
        host: &Name,
        version: &str,
    ) -> Result<(), String> {
        let before = self
            .describe(host)
            .await
            .map_err(|e| format!("cannot describe it before: {e}"))?;
        let from = before.software.nitrile.clone();
        self.set_host(wave, idx, |h| {
            h.from = Some(from.clone());
            h.now = Some(from.clone());
        });
        if from == version {
            self.set_host(wave, idx, |h| {
                h.detail = Some(format!("already runs {version}"));
            });
            return Ok(());
        }
        if !self
            .step(
                true,
                format!("deployment {id}: host.update {version} to {host} (runs {from})"),
                serde_json::json!({
                    "event": "deployment", "id": id, "step": "update",
                    "host": host.as_str(), "from": from, "to": version,
                }),
            )
            .await
        {
            return Err("the deployment service's journal cannot record the step".into());
        }
        self.set_host(wave, idx, |h| {
            h.state = StepState::Updating;
            h.detail = Some(format!("host.update {version} sent"));
        });
        let addr = self.hosts.get(host).cloned().unwrap_or_default();
        let req = AdminRequest::HostUpdate(HostUpdateRequest {
            version: version.to_owned(),
        });
        let answer: HostUpdate = self
            .caller
            .call(host, &addr, &req)
            .await
            .map_err(|e| clip(&e.to_string()))?;
        if !answer.handing_over {
            return Err(format!(
                "it staged {version} but does not hand over to it (no live update)"
            ));
        }
        let deadline = tokio::time::Instant::now() + self.health_timeout;
        loop {
            tokio::time::sleep(POLL).await;
            let last = match self.describe(host).await {
                Ok(d) => {
                    let now = d.software.nitrile.clone();
                    self.set_host(wave, idx, |h| h.now = Some(now.clone()));
                    if now == version && d.health.journal == Health::Ok {
                        return Ok(());
                    }
                    // Serving its previous version since a start after
                    // ours: the new agent failed its health check and the
                    // previous one serves again.
                    if now == from && d.started_at != before.started_at {
                        return Err(format!(
                            "it rolled back: {from} serves again since {} (the new agent failed its health check)",
                            clip(&d.started_at)
                        ));
                    }
                    format!("it reports {now}")
                }
                Err(e) => clip(&e.to_string()),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "it did not serve {version} within {} s ({last}; a host whose new agent fails its health check serves its previous version again)",
                    self.health_timeout.as_secs()
                ));
            }
        }
    }

    /// Whether every host of a baked wave still serves `version`.
    async fn still_healthy(&self, wave: &Wave, version: &str) -> Result<(), String> {
        for h in &wave.hosts {
            match self.describe(&h.host).await {
                Ok(d) if d.software.nitrile == version && d.health.journal == Health::Ok => {}
                Ok(d) => {
                    return Err(format!(
                        "{} reports {} (journal {:?}) after the bake",
                        h.host, d.software.nitrile, d.health.journal
                    ));
                }
                Err(e) => {
                    return Err(format!(
                        "{} after the bake: {}",
                        h.host,
                        clip(&e.to_string())
                    ));
                }
            }
        }
        Ok(())
    }

    /// Marks every host not yet called untouched and ends the rollout.
    async fn end(self: &Arc<Self>, id: u64, state: DeploymentState, reason: Option<String>) {
        let now = nitrile_audit::format_time(self.clock.now());
        self.update(|d| {
            for w in &mut d.waves {
                for h in &mut w.hosts {
                    if h.state == StepState::Pending {
                        h.state = StepState::Untouched;
                    }
                }
            }
            d.state = state;
            d.finished_at = Some(now);
            d.reason = reason.clone();
        });
        self.step(
            state == DeploymentState::Succeeded,
            format!(
                "deployment {id} {}{}",
                state.as_str(),
                reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
            serde_json::json!({ "event": "deployment", "id": id, "step": state.as_str() }),
        )
        .await;
    }

    /// Runs rollout `id` to its end.
    async fn rollout(self: Arc<Self>, id: u64) {
        let (version, waves, bake) = {
            let r = lock(&self.record);
            match &r.current {
                Some(d) => (d.version.clone(), d.waves.clone(), d.bake_secs),
                None => return,
            }
        };
        let total = waves.len();
        for (w, wave) in waves.iter().enumerate() {
            if self.abort.load(Ordering::SeqCst) {
                self.end(
                    id,
                    DeploymentState::Aborted,
                    Some(format!("aborted before wave {} of {total}", w + 1)),
                )
                .await;
                return;
            }
            // A wave's hosts take the release at once.
            let mut tasks = tokio::task::JoinSet::new();
            for (i, h) in wave.hosts.iter().enumerate() {
                let me = Arc::clone(&self);
                let (host, version) = (h.host.clone(), version.clone());
                tasks.spawn(async move {
                    let r = me.update_host(id, w, i, &host, &version).await;
                    (i, host, r)
                });
            }
            let mut failed = Vec::new();
            while let Some(done) = tasks.join_next().await {
                let Ok((i, host, r)) = done else {
                    failed.push("a host task failed".to_owned());
                    continue;
                };
                match r {
                    Ok(()) => {
                        self.set_host(w, i, |h| {
                            h.state = StepState::Healthy;
                            h.now = Some(version.clone());
                        });
                        self.step(
                            true,
                            format!("deployment {id}: {host} serves {version}"),
                            serde_json::json!({
                                "event": "deployment", "id": id, "step": "healthy",
                                "host": host.as_str(), "to": version,
                            }),
                        )
                        .await;
                    }
                    Err(why) => {
                        self.set_host(w, i, |h| {
                            h.state = StepState::Failed;
                            h.detail = Some(why.clone());
                        });
                        self.step(
                            false,
                            format!("deployment {id}: {host} failed: {why}"),
                            serde_json::json!({
                                "event": "deployment", "id": id, "step": "host_failed",
                                "host": host.as_str(), "to": version, "reason": why,
                            }),
                        )
                        .await;
                        failed.push(format!("{host}: {why}"));
                    }
                }
            }
            if !failed.is_empty() {
                self.end(
                    id,
                    DeploymentState::Failed,
                    Some(clip(&format!(
                        "wave {} of {total} failed ({}); no later host was called",
                        w + 1,
                        failed.join("; ")
                    ))),
                )
                .await;
                return;
            }
            if bake > 0 && w + 1 < total {
                let until = tokio::time::Instant::now() + Duration::from_secs(bake);
                while tokio::time::Instant::now() < until {
                    if self.abort.load(Ordering::SeqCst) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if self.abort.load(Ordering::SeqCst) {
                    continue;
                }
                if let Err(why) = self.still_healthy(wave, &version).await {
                    self.end(
                        id,
                        DeploymentState::Failed,
                        Some(clip(&format!(
                            "wave {} of {total} baked badly: {why}",
                            w + 1
                        ))),
                    )
                    .await;
                    return;
                }
                self.step(
                    true,
                    format!("deployment {id}: wave {} of {total} baked {bake} s", w + 1),
                    serde_json::json!({ "event": "deployment", "id": id, "step": "baked", "wave": w + 1 }),
                )
                .await;
            }
        }
        self.end(id, DeploymentState::Succeeded, None).await;
    }

    fn current(&self) -> Option<Deployment> {
        lock(&self.record).current.clone()
    }

    fn start(
        self: &Arc<Self>,
        by: &PrincipalId,
        req: &StartRequest,
    ) -> Result<Deployment, Failure> {
        let mut r = lock(&self.record);
        if r.current
            .as_ref()
            .is_some_and(|d| d.state == DeploymentState::Running)
        {
            return Err(Failure::new(
                409,
                RefusalStep::Hypervisor,
                "busy",
                "a rollout is running; abort it or wait for it to end",
            ));
        }
        let hosts: Vec<Name> = self.hosts.keys().cloned().collect();
        let sizes = if req.waves.is_empty() {
            &self.default_waves
        } else {
            &req.waves
        };
        r.last_id += 1;
        let d = Deployment {
            id: r.last_id,
            version: req.version.clone(),
            state: DeploymentState::Running,
            started_by: by.uri(),
            started_at: nitrile_audit::format_time(self.clock.now()),
            finished_at: None,
            bake_secs: req.bake_secs.unwrap_or(self.default_bake),
            waves: plan(&hosts, sizes),
            reason: None,
        };
        r.current = Some(d.clone());
        drop(r);
        self.abort.store(false, Ordering::SeqCst);
        self.save()
            .map_err(|e| Failure::new(500, RefusalStep::Internal, "internal", e))?;
        Ok(d)
    }

    fn abort(&self) -> Result<Deployment, Failure> {
        match self.current() {
            Some(d) if d.state == DeploymentState::Running => {
                self.abort.store(true, Ordering::SeqCst);
                self.update(|d| d.reason = Some("abort requested".into()));
                Ok(self.current().unwrap_or(d))
            }
            _ => Err(Failure::new(
                409,
                RefusalStep::Hypervisor,
                "not_running",
                "no rollout is running",
            )),
        }
    }
}

struct Api {
    service: Arc<Service>,
    refusals: Arc<ServiceJournal>,
    rollouts: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Api {
    async fn finish(
        &self,
        admitted: Admitted,
        result: Result<Deployment, Failure>,
    ) -> Response<Bytes> {
        let svc = &self.service;
        match result {
            Err(f) => {
                let detail = serde_json::json!({ "step": f.step.as_str(), "code": f.code, "reason": f.reason });
                let seq = svc
                    .admission
                    .complete_async(admitted, Outcome::Failed, Some(detail))
                    .await
                    .ok()
                    .map(|r| r.seq);
                refusal_response(f.status, f.step, &f.reason, seq)
            }
            Ok(d) => {
                let detail = serde_json::json!({
                    "id": d.id, "version": d.version, "state": d.state.as_str(),
                });
                if let Err(e) = svc
                    .admission
                    .complete_async(admitted, Outcome::Executed, Some(detail))
                    .await
                {
                    tracing::error!(error = %e, "could not journal an outcome; answer withheld");
                    return refusal_response(
                        503,
                        RefusalStep::Journal,
                        "the deployment service's journal cannot record the outcome",
                        None,
                    );
                }
                json_response(StatusCode::OK, &d)
            }
        }
    }
}

impl Handler for Api {
    async fn handle(&self, peer: PeerIdentity, req: Request<Bytes>) -> Response<Bytes> {
        let (parts, body) = req.into_parts();
        let method = parts.method.as_str().to_owned();
        let path = parts.uri.path().to_owned();
        let token = nitrile_gate::bearer(&parts.headers);
        let req = match DeployRequest::parse(&method, &path, &body) {
            Ok(r) => r,
            Err(e) => {
                let refusals = Arc::clone(&self.refusals);
                let peer = peer.clone();
                return match tokio::task::spawn_blocking(move || {
                    refusals.refuse_request(
                        &peer,
                        e.status(),
                        e.code(),
                        e.to_string(),
                        request_detail(&method, &path),
                    )
                })
                .await
                {
                    Ok(r) => r.response(),
                    Err(_) => {
                        refusal_response(500, RefusalStep::Internal, "internal failure", None)
                    }
                };
            }
        };
        let svc = &self.service;
        let resource = deployment_resource(&svc.cell);
        let admitted = match svc
            .admission
            .admit_async_with(&peer, token.as_deref(), req.operation(), &resource, None)
            .await
        {
            Ok(a) => a,
            Err(r) => return r.response(),
        };
        let result = match &req {
            DeployRequest::Describe => svc.current().ok_or_else(|| {
                Failure::new(404, RefusalStep::Request, "no_deployment", "no rollout yet")
            }),
            DeployRequest::Abort => svc.abort(),
            DeployRequest::Start(s) => svc.start(&peer.principal, s),
        };
        let started = matches!(req, DeployRequest::Start(_)) && result.is_ok();
        let id = result.as_ref().map(|d| d.id).unwrap_or_default();
        let resp = self.finish(admitted, result).await;
        // After the request's outcome record: the rollout's steps follow it
        // in the journal.
        if started {
            let handle = tokio::spawn(Arc::clone(svc).rollout(id));
            *lock(&self.rollouts) = Some(handle);
        }
        resp
    }

    async fn request_unreadable(
        &self,
        peer: PeerIdentity,
        method: String,
        path: String,
        status: u16,
        reason: String,
    ) {
        let _ = self
            .refusals
            .request_unreadable(peer, method, path, status, reason)
            .await;
    }

    async fn preauth_report(&self, report: PreauthReport) {
        let _ = self.refusals.preauth_report(report).await;
    }

    async fn refused_at_tls(&self, reason: &PkiError, cert_sha256: Option<[u8; 32]>) {
        let _ = self.refusals.refused_at_tls(reason, cert_sha256).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<Name> {
        (1..=n)
            .map(|k| Name::new(&format!("h{k}")).unwrap())
            .collect()
    }

    #[test]
    fn waves_take_the_sizes_and_repeat_the_last() {
        let sizes = |w: &[Wave]| w.iter().map(|w| w.hosts.len()).collect::<Vec<_>>();
        assert_eq!(sizes(&plan(&names(3), &[1, 2])), [1, 2]);
        assert_eq!(sizes(&plan(&names(7), &[1, 2])), [1, 2, 2, 2]);
        assert_eq!(sizes(&plan(&names(2), &[5])), [2]);
        assert_eq!(sizes(&plan(&names(3), &[1])), [1, 1, 1]);
        let w = plan(&names(3), &[2, 1]);
        assert_eq!(w[0].hosts[1].host.as_str(), "h2");
        assert_eq!(w[1].hosts[0].host.as_str(), "h3");
        assert!(
            w.iter()
                .flat_map(|w| &w.hosts)
                .all(|h| h.state == StepState::Pending)
        );
    }
}
