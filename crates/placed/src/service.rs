//! `nitrile placed` on its mTLS port.
//!
//! Per request: TLS 1.3 with a client certificate of the cell (else no
//! HTTP; journaled, step `tls`, by the gate's refusal hooks) ->
//! [`PlacedRequest::parse`] (a bad path, method, name, body or upload: 4xx,
//! journaled, step `request`) -> the caller must be a customer (else 403,
//! journaled, step `entitlement`) -> `Admission` with the resource built
//! from the caller's own name (request record durable before it runs) ->
//! ownership of an image (else 403, step `entitlement`) -> act (host calls
//! with placement's own tokens) -> outcome record durable -> answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use nitrile_api::admin::{
    AdminRequest, HostDescription, InstanceDescription, LaunchRequest, VolumeCreateRequest,
    VolumeDescription,
};
use nitrile_api::wire::RefusalStep;
use nitrile_api::{Audience, Name, PrincipalId, PrincipalKind};
use nitrile_audit::{AuditRecord, Journal, JournalError, JournalOptions, Outcome, RequestId};
use nitrile_gate::{
    Admission, AdmissionError, Admitted, Expected, IdentityError, Listeners, MetricsTask,
    ServiceIdentity, ServiceJournal, refusal_response, request_detail,
};
use nitrile_image::Digest;
use nitrile_logclient::{JournalShipping, LogKeyError};
use nitrile_net::{Handler, PeerIdentity, PreauthReport, Registry, Server, json_response};
use nitrile_pki::PkiError;
use nitrile_placed_api::wire::{
    CustomerImage, CustomerInstance, ImageList, InstanceList, InstanceState, RootVolume, RunRequest,
};
use nitrile_placed_api::{MAX_UPLOAD_BODY, PLACEMENT_SERVICE, PlacedRequest, placement_principal};
use nitrile_token::{
    Clock, DEFAULT_REPLAY_CAPACITY, IssuerFile, IssuerFileError, ReplayCache, SystemClock, Verifier,
};
use nitrile_tokend_api::{TokendClient, tokend_principal};

use crate::config::PlacedConfig;
use crate::images::{Images, ImportError};
use crate::store::{self, ImageRecord, InstanceRecord, Placements, StoreError};
use nitrile_tokend_api::{HostCallError, HostCaller};

/// Why the placement service could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlacedServerError {
    /// the CA, the certificate or its key could not be loaded, or the
    /// certificate is not placement's
    #[error("placement service identity")]
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
    /// the state directory could not be made
    #[error("state directory {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the journal could not be opened
    #[error("audit journal")]
    Journal(#[from] JournalError),
    /// the replay cache could not be rebuilt from the journal
    #[error("replay cache")]
    Admission(#[from] AdmissionError),
    /// the placement record could not be read
    #[error("placement record")]
    Store(#[from] StoreError),
    /// the image store could not be opened
    #[error("image store")]
    Images(#[from] ImportError),
    /// the audit log service to ship to cannot be shipped to
    #[error("logd target")]
    Logd(#[from] LogKeyError),
    /// a socket could not be bound or served
    #[error("network")]
    Net(#[from] nitrile_net::NetError),
}

/// What a caller may change about how the service runs: for tests.
#[derive(Clone)]
pub struct PlacedOptions {
    /// Where time comes from (token expiry, record times).
    pub clock: Arc<dyn Clock>,
}

impl Default for PlacedOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
        }
    }
}

impl std::fmt::Debug for PlacedOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacedOptions").finish_non_exhaustive()
    }
}

/// Why an admitted request failed: its status, step, code and reason.
#[derive(Debug)]
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

    fn internal(e: &dyn std::error::Error) -> Self {
        // The whole chain: "image store: writing ...: No space left on
        // device" says what to do, "image store" alone does not.
        let mut reason = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            reason.push_str(": ");
            reason.push_str(&c.to_string());
            cause = c.source();
        }
        let reason = nitrile_api::admin::clip_text(&reason, nitrile_api::admin::MAX_REASON_LEN);
        tracing::error!(error = %reason, "placement failure");
        Self::new(500, RefusalStep::Internal, "internal", reason)
    }

    fn host(e: &crate::HostCallError) -> Self {
        Self::new(502, RefusalStep::Hypervisor, "host", e.to_string())
    }

    fn detail(&self) -> serde_json::Value {
        serde_json::json!({ "step": self.step.as_str(), "code": self.code, "reason": self.reason })
    }
}

struct Service {
    cell: Name,
    source: PrincipalId,
    admission: Admission,
    journal: Arc<Journal>,
    clock: Arc<dyn Clock>,
    state: Mutex<Placements>,
    state_path: PathBuf,
    images: Images,
    hosts: BTreeMap<Name, String>,
    caller: HostCaller,
    /// Held for a whole network push: pushes go out one after the other,
    /// each with the record as it is when it starts, so no host gets an
    /// older table after a newer one.
    push: tokio::sync::Mutex<()>,
    /// What the last push was made from, and the hosts that did not take
    /// it (none before the first push).
    last_push: Mutex<Option<LastPush>>,
    /// How often the fleet is described for a refresh.
    refresh: std::time::Duration,
}

/// The fleet as the last network push saw it.
struct LastPush {
    view: store::NetworkView,
    failed: Vec<Name>,
}

/// A placement service with its sockets bound, ready to serve.
pub struct PlacedServer {
    service: Arc<Service>,
    server: Server,
    listeners: Listeners,
    registry: Arc<Registry>,
    shipping: JournalShipping,
}

impl std::fmt::Debug for PlacedServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacedServer")
            .field("source", &self.service.source)
            .field("listen", &self.listeners.local_addr())
            .finish_non_exhaustive()
    }
}

impl PlacedServer {
    /// Loads everything and binds the sockets; fails closed on any problem.
    pub async fn open(config: &PlacedConfig) -> Result<Self, PlacedServerError> {
        Self::open_with(config, PlacedOptions::default()).await
    }

    /// [`PlacedServer::open`] with `options`.
    pub async fn open_with(
        config: &PlacedConfig,
        options: PlacedOptions,
    ) -> Result<Self, PlacedServerError> {
        let state_dir = |source| PlacedServerError::StateDir {
            path: config.state.clone(),
            source,
        };
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            let staging = config.state.join("staging");
            for dir in [&config.state, &staging] {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(state_dir)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(state_dir)?;
            }
        }
        let me = placement_principal(&config.cell);
        let identity = ServiceIdentity::load(
            &config.cell,
            &config.ca,
            &config.cert,
            &config.key,
            &Expected::Principal(me.clone()),
        )?;
        let issuer_keys = IssuerFile::load(&config.issuer_keys).map_err(|source| {
            PlacedServerError::IssuerKeys {
                path: config.issuer_keys.clone(),
                source,
            }
        })?;
        let clock = options.clock;
        let journal_path = config.journal_path();
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
        let audience = Audience::new(PLACEMENT_SERVICE)
            .unwrap_or_else(|_| unreachable!("`placement` is an audience"));
        let admission = Admission::new(
            me.clone(),
            Verifier::new(issuer_keys, audience),
            ReplayCache::new(DEFAULT_REPLAY_CAPACITY),
            Arc::clone(&journal),
            &journal_path,
            Arc::clone(&clock),
        )?;
        let state = store::load(&config.state_path())?;
        let images = Images::open(&config.images, config.state.join("staging"))?;
        let caller = HostCaller {
            cell: config.cell.clone(),
            tokend: TokendClient::new(
                config.tokend.clone(),
                tokend_principal(&config.cell),
                client_tls,
            ),
            tls: identity.client_config()?,
        };
        let service = Arc::new(Service {
            cell: config.cell.clone(),
            source: me.clone(),
            admission,
            journal: Arc::clone(&journal),
            clock: Arc::clone(&clock),
            state: Mutex::new(state),
            state_path: config.state_path(),
            images,
            hosts: config.hosts.clone(),
            caller,
            push: tokio::sync::Mutex::new(()),
            last_push: Mutex::new(None),
            refresh: std::time::Duration::from_secs(config.network_refresh_secs),
        });
        let start = AuditRecord::outcome(
            clock.now(),
            me.clone(),
            RequestId::random(&mut rand_core::OsRng),
            Outcome::Executed,
        )
        .with_principal(me.clone())
        .with_reason(&format!(
            "placement service started with {} hosts",
            config.hosts.len()
        ));
        if let Ok(bytes) = start.encode() {
            journal.append(&bytes)?;
        }
        let registry = Arc::new(Registry::new());
        let server = identity
            .server()?
            .with_metrics(Arc::clone(&registry), "nitrile_placed")
            .with_max_body(MAX_UPLOAD_BODY);
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

    /// The service's principal, `nitrile://<cell>/service/placement`.
    pub fn principal(&self) -> &PrincipalId {
        &self.service.source
    }

    /// Serves until `shutdown` resolves; the journal is shipped meanwhile
    /// when there is a `logd`, and the shipper stops after the last record.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), PlacedServerError> {
        let shipper = self.shipping.start();
        // The hosts learn the cell's network as placement recorded it,
        // without holding up the first customer.
        // Then, every refresh period, they learn of any host whose
        // announcement (a new tunnel key after its agent restarted) or
        // reachability changed.
        let service = Arc::clone(&self.service);
        let refresher = tokio::spawn(async move {
            service.push_network().await;
            let mut tick = tokio::time::interval(service.refresh);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                service.refresh_network().await;
            }
        });
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let metrics = MetricsTask::spawn(self.listeners.metrics, self.registry, stop_rx);
        let api = Api {
            service: Arc::clone(&self.service),
            refusals: Arc::clone(self.service.admission.service_journal()),
        };
        let result = self.server.serve(self.listeners.mtls, api, shutdown).await;
        refresher.abort();
        let _ = refresher.await;
        let _ = stop_tx.send(true);
        metrics.join().await;
        if let Some(shipper) = shipper {
            shipper.stop().await;
        }
        result.map_err(PlacedServerError::from)
    }
}

struct Api {
    service: Arc<Service>,
    refusals: Arc<ServiceJournal>,
}

/// What a request did, for its outcome record and its answer.
enum Done {
    Instance(CustomerInstance),
    Instances(InstanceList),
    Image(CustomerImage),
    Images(ImageList),
}

/// The root volume an instance `key` (`<customer>--<name>`) of `image`
/// gets: with a root disk, a volume `<key>-root` of its size under the
/// customer's `kms_key`, which must then be named; without one, none, and
/// a key named is refused as a mistake.
fn root_volume_of(
    image: &CustomerImage,
    key: &str,
    kms_key: Option<&Name>,
) -> Result<Option<RootVolume>, Failure> {
    match (image.root_disk_size, kms_key) {
        (None, None) => Ok(None),
        (None, Some(k)) => Err(Failure::new(
            400,
            RefusalStep::Request,
            "no_root_disk",
            format!(
                "image {} has no root disk, so there is no volume for key {k} to encrypt",
                image.digest
            ),
        )),
        (Some(_), None) => Err(Failure::new(
            400,
            RefusalStep::Request,
            "kms_key_needed",
            format!(
                "image {} has a root disk: name one of your keys (kms_key, `--kms-key`) to \
                 encrypt the instance's copy of it",
                image.digest
            ),
        )),
        (Some(size), Some(k)) => {
            let volume = Name::new(&format!("{key}-root")).map_err(|_| {
                Failure::new(
                    400,
                    RefusalStep::Request,
                    "name_too_long",
                    format!(
                        "the instance name is too long for its root volume {key}-root (at most \
                         {} characters in all)",
                        nitrile_api::MAX_NAME_LEN
                    ),
                )
            })?;
            Ok(Some(RootVolume {
                volume,
                kms_key: k.clone(),
                size_mib: size / nitrile_image::ROOT_DISK_ALIGN,
            }))
        }
    }
}

fn describe_instance(r: &InstanceRecord, cell: &Name) -> CustomerInstance {
    CustomerInstance {
        name: r.name.clone(),
        customer: PrincipalId::new(cell.clone(), PrincipalKind::Customer, r.customer.clone()),
        host: r.host.clone(),
        image: r.image,
        memory_mib: r.memory_mib,
        vcpus: r.vcpus,
        vni: r.vni,
        address: r.address.to_string(),
        mac: r.mac(),
        publish: r.publish.clone(),
        published: r.published.clone(),
        root_volume: r.root_volume.clone(),
        state: r.state,
        created: r.created.clone(),
    }
}

/// The published endpoints a host answered with (none without a network).
fn published_of(d: &InstanceDescription) -> Vec<nitrile_api::network::PublishedPort> {
    d.network
        .as_ref()
        .map(|n| n.published.clone())
        .unwrap_or_default()
}

fn state_of(d: &InstanceDescription) -> InstanceState {
    use nitrile_api::admin::InstanceState as H;
    match d.state {
        H::Pending => InstanceState::Pending,
        H::Running => InstanceState::Running,
        H::Stopped => InstanceState::Stopped,
        H::Terminated => InstanceState::Terminated,
        H::Failed => InstanceState::Unknown,
    }
}

impl Service {
    fn save(&self, state: &Placements) -> Result<(), Failure> {
        store::save(&self.state_path, state).map_err(|e| Failure::internal(&e))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Placements> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn addr(&self, host: &Name) -> Result<&String, Failure> {
        self.hosts.get(host).ok_or_else(|| {
            Failure::new(
                409,
                RefusalStep::State,
                "unknown_host",
                format!("host {host} is no longer in placement's fleet"),
            )
        })
    }

    fn record(&self, customer: &Name, name: &Name) -> Result<InstanceRecord, Failure> {
        self.lock()
            .instances
            .get(&format!("{customer}--{name}"))
            .cloned()
            .ok_or_else(|| {
                Failure::new(
                    404,
                    RefusalStep::State,
                    "no_instance",
                    format!("you have no instance {name}"),
                )
            })
    }

    fn owned_image(&self, customer: &Name, digest: &Digest) -> Result<CustomerImage, Failure> {
        let record = self.lock().images.get(&digest.to_hex()).cloned();
        let Some(record) = record.filter(|r| r.owners.contains(customer)) else {
            return Err(Failure::new(
                403,
                RefusalStep::Entitlement,
                "not_image_owner",
                format!("image {digest} is not one you imported"),
            ));
        };
        let m = self
            .images
            .store()
            .list()
            .map_err(|e| Failure::internal(&e))?
            .into_iter()
            .find(|m| m.digest == *digest)
            .ok_or_else(|| {
                Failure::new(
                    404,
                    RefusalStep::State,
                    "no_image",
                    "the image is gone from the store",
                )
            })?;
        Ok(CustomerImage {
            digest: m.digest,
            customer: PrincipalId::new(
                self.cell.clone(),
                PrincipalKind::Customer,
                customer.clone(),
            ),
            kernel_sha256: m.kernel.sha256,
            kernel_size: m.kernel.size,
            kernel_format: m.kernel_format.as_str().to_owned(),
            kernel_release: m.kernel_release,
            initramfs_sha256: m.initramfs.sha256,
            initramfs_size: m.initramfs.size,
            cmdline_sha256: m.cmdline_sha256,
            root_disk_sha256: m.root_disk.as_ref().map(|r| r.sha256),
            root_disk_size: m.root_disk.as_ref().map(|r| r.size),
            imported: record.imported,
        })
    }

    async fn describe_hosts(&self) -> BTreeMap<Name, Option<HostDescription>> {
        let mut out = BTreeMap::new();
        for (host, addr) in &self.hosts {
            let d = self
                .caller
                .call::<HostDescription>(host, addr, &AdminRequest::HostDescribe)
                .await;
            if let Err(e) = &d {
                tracing::warn!(error = %e, %host, "host.describe failed");
            }
            out.insert(host.clone(), d.ok());
        }
        out
    }

    /// Gives every host of the fleet the cell's network: every host's
    /// signed announcement and every recorded instance's route, with a
    /// token for exactly `network.update` on that host. A host that
    /// cannot be reached or refuses is logged and journaled, and gets the
    /// whole table again at the next push (after the next run, start or
    /// terminate, at the next refresh once it answers, or at the next start
    /// of the service); it never fails the customer's call. Returns the
    /// hosts that did not take it.
    async fn push_network(&self) -> Vec<Name> {
        let _one_at_a_time = self.push.lock().await;
        let described = self.describe_hosts().await;
        self.push_described(&described).await
    }

    /// One refresh: describes every host and, when any host's announcement
    /// or reachability changed since the last push (or a host that did not
    /// take it answers again), pushes to every host and journals why.
    /// Returns what changed (empty: nothing was pushed).
    async fn refresh_network(&self) -> Vec<String> {
        let _one_at_a_time = self.push.lock().await;
        let described = self.describe_hosts().await;
        let view = store::network_view(&described);
        let changes = {
            let last = self
                .last_push
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match &*last {
                None => store::view_changes(&store::NetworkView::new(), &view),
                Some(l) => {
                    let mut changes = store::view_changes(&l.view, &view);
                    for host in &l.failed {
                        let back = view
                            .get(host)
                            .is_some_and(|v| *v != store::HostView::Unreachable);
                        if back && !changes.iter().any(|c| c.starts_with(&format!("{host} "))) {
                            changes.push(format!("{host} answers again after a failed push"));
                        }
                    }
                    changes
                }
            }
        };
        if changes.is_empty() {
            return changes;
        }
        let failed = self.push_described(&described).await;
        // A host that announces anew (its agent restarted) or answers again
        // may have re-published its instances' ports elsewhere: its
        // instances are listed and their records brought up to date.
        for (host, v) in &view {
            if matches!(v, store::HostView::Announced(_))
                && changes.iter().any(|c| c.starts_with(&format!("{host} ")))
            {
                self.resync_instances(host).await;
            }
        }
        let record = AuditRecord::outcome(
            self.clock.now(),
            self.source.clone(),
            RequestId::random(&mut rand_core::OsRng),
            if failed.is_empty() {
                Outcome::Executed
            } else {
                Outcome::Failed
            },
        )
        .with_principal(self.source.clone())
        .with_operations([nitrile_api::Operation::NetworkUpdate])
        .with_reason(&format!(
            "network refresh: {}; pushed to {} of {} hosts",
            changes.join("; "),
            self.hosts.len() - failed.len(),
            self.hosts.len()
        ));
        if let Ok(bytes) = record.encode()
            && self.journal.submit(&bytes).await.is_err()
        {
            tracing::error!("could not journal a network refresh");
        }
        changes
    }

    /// Brings the records of `host`'s instances up to date with what the
    /// host says of them (`instance.list`): their state and where their
    /// ports are published. A host that does not answer is logged; its
    /// records stay as they were.
    async fn resync_instances(&self, host: &Name) {
        let Ok(addr) = self.addr(host).cloned() else {
            return;
        };
        let list = match self
            .caller
            .call::<nitrile_api::admin::InstanceList>(host, &addr, &AdminRequest::InstanceList)
            .await
        {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(host = %host, error = %e, "could not list a host's instances");
                return;
            }
        };
        let mut state = self.lock();
        let mut changed = false;
        for d in &list.instances {
            let Some(r) = state.instances.get_mut(d.instance.as_str()) else {
                continue;
            };
            if r.host != *host || r.state == InstanceState::Terminated {
                continue;
            }
            let published = published_of(d);
            if d.network.is_some() && r.published != published {
                r.published = published;
                changed = true;
            }
            let now = state_of(d);
            if r.state != now {
                r.state = now;
                changed = true;
            }
        }
        if changed && let Err(e) = self.save(&state) {
            tracing::error!(reason = %e.reason, "could not save placement's records");
        }
    }

    /// Pushes the table made of `described` and the record to every host;
    /// remembers what it was made from. The caller holds `push`.
    async fn push_described(
        &self,
        described: &BTreeMap<Name, Option<HostDescription>>,
    ) -> Vec<Name> {
        let update = {
            let state = self.lock();
            store::network_update(described, &state)
        };
        let mut failed = Vec::new();
        for (host, addr) in &self.hosts {
            let result = self
                .caller
                .call::<serde_json::Value>(host, addr, &AdminRequest::NetworkUpdate(update.clone()))
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, %host, "network.update failed; retried at the next push");
                let record = AuditRecord::outcome(
                    self.clock.now(),
                    self.source.clone(),
                    RequestId::random(&mut rand_core::OsRng),
                    Outcome::Failed,
                )
                .with_principal(self.source.clone())
                .with_operations([nitrile_api::Operation::NetworkUpdate])
                .with_reason(&format!(
                    "network.update to host {host} failed ({e}); it gets the whole table at the next push"
                ));
                if let Ok(bytes) = record.encode()
                    && self.journal.submit(&bytes).await.is_err()
                {
                    tracing::error!(%host, "could not journal a failed network push");
                }
                failed.push(host.clone());
            }
        }
        *self
            .last_push
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(LastPush {
            view: store::network_view(described),
            failed: failed.clone(),
        });
        failed
    }

    async fn run(&self, customer: &Name, req: RunRequest) -> Result<Done, Failure> {
        let image = self.owned_image(customer, &req.image)?;
        self.images
            .store()
            .get(&req.image)
            .map_err(|e| Failure::new(409, RefusalStep::State, "image", e.to_string()))?;
        let key = format!("{customer}--{}", req.name);
        let root_volume = root_volume_of(&image, &key, req.kms_key.as_ref())?;
        if self.lock().instances.contains_key(&key) {
            return Err(Failure::new(
                409,
                RefusalStep::State,
                "exists",
                format!("you already have an instance {}", req.name),
            ));
        }
        let described = self.describe_hosts().await;
        let mut skipped = Vec::new();
        let host = {
            let state = self.lock();
            store::choose_host(
                &described,
                &state,
                customer,
                req.vcpus,
                req.memory_mib,
                &mut skipped,
            )
        };
        let Some(host) = host else {
            let why: Vec<String> = skipped.iter().map(|(h, s)| format!("{h}: {s:?}")).collect();
            return Err(Failure::new(
                409,
                RefusalStep::State,
                "no_host",
                format!("no host can take the instance ({})", why.join(", ")),
            ));
        };
        let record = {
            let mut state = self.lock();
            if state.instances.contains_key(&key) {
                return Err(Failure::new(409, RefusalStep::State, "exists", "raced"));
            }
            let vni = state.vni(customer).map_err(|e| Failure::internal(&e))?;
            let address = state
                .free_address(customer)
                .map_err(|e| Failure::new(409, RefusalStep::State, "no_address", e.to_string()))?;
            let record = InstanceRecord {
                customer: customer.clone(),
                name: req.name.clone(),
                host: host.clone(),
                image: req.image,
                memory_mib: req.memory_mib,
                vcpus: req.vcpus,
                vni,
                address,
                publish: req.publish.clone(),
                published: Vec::new(),
                state: InstanceState::Pending,
                created: nitrile_audit::format_time(self.clock.now()),
                root_volume: root_volume.clone(),
            };
            state.instances.insert(key.clone(), record.clone());
            self.save(&state)?;
            record
        };
        let launch = LaunchRequest {
            instance: Name::new(&key).map_err(|e| Failure::internal(&e))?,
            image: req
                .image
                .to_hex()
                .parse()
                .map_err(|_| Failure::new(500, RefusalStep::Internal, "digest", "digest"))?,
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            volumes: record.volumes(),
            scratch_mib: None,
            network: Some(store::attachment(
                &record,
                req.ssh_public_keys.clone(),
                req.user_data.as_deref().unwrap_or_default().as_bytes(),
            )),
        };
        let addr = self.addr(&host)?.clone();
        // The root volume first: made on the host under the customer's key,
        // to be filled with the image's root disk by the VMM that first
        // opens it.
        if let Some(root) = &root_volume {
            let create = AdminRequest::VolumeCreate(VolumeCreateRequest {
                volume: root.volume.clone(),
                size_mib: root.size_mib,
                kms_key: Some(root.kms_key.clone()),
                seed_image: Some(launch.image),
            });
            if let Err(e) = self
                .caller
                .call::<VolumeDescription>(&host, &addr, &create)
                .await
            {
                let mut state = self.lock();
                state.instances.remove(&key);
                self.save(&state)?;
                return Err(Failure::host(&e));
            }
        }
        let launched = self
            .caller
            .call_with_volumes::<InstanceDescription>(
                &host,
                &addr,
                &AdminRequest::InstanceLaunch(launch),
                &record.volumes(),
            )
            .await;
        if launched.is_err() {
            // The launch undid its attachment and the volume holds nothing
            // yet; a volume that cannot be deleted now is logged and stays.
            let _ = self.delete_root_volume(&record).await;
        }
        let out = {
            let mut state = self.lock();
            match launched {
                Ok(d) => {
                    let r = state.instances.get_mut(&key).ok_or_else(|| {
                        Failure::new(409, RefusalStep::State, "gone", "the record went away")
                    })?;
                    r.state = state_of(&d);
                    r.published = published_of(&d);
                    let out = describe_instance(r, &self.cell);
                    self.save(&state)?;
                    out
                }
                Err(e) => {
                    state.instances.remove(&key);
                    self.save(&state)?;
                    return Err(Failure::host(&e));
                }
            }
        };
        self.push_network().await;
        Ok(Done::Instance(out))
    }

    /// Deletes `record`'s root volume, if it has one, on its host (the key
    /// service destroys its key first: crypto-erase); says whether it is
    /// gone. A failure is logged: the volume then stays, detached.
    async fn delete_root_volume(&self, record: &InstanceRecord) -> Result<(), Failure> {
        let Some(root) = &record.root_volume else {
            return Ok(());
        };
        let addr = self.addr(&record.host)?.clone();
        let delete = AdminRequest::VolumeDelete(root.volume.clone());
        match self
            .caller
            .call::<serde_json::Value>(&record.host, &addr, &delete)
            .await
        {
            Ok(_) => Ok(()),
            Err(HostCallError::Refused { status, .. }) if status == http::StatusCode::NOT_FOUND => {
                Ok(())
            }
            Err(e) => {
                tracing::error!(volume = %root.volume, error = %e, "could not delete a root volume");
                Err(Failure::host(&e))
            }
        }
    }

    async fn act(&self, customer: &Name, name: &Name, op: &str) -> Result<Done, Failure> {
        let record = self.record(customer, name)?;
        let host_name = Name::new(&record.key()).map_err(|e| Failure::internal(&e))?;
        if op == "terminate" && record.state == InstanceState::Terminated {
            // Terminated before, its root volume left: only that is to do.
            return self.finish_terminate(record).await;
        }
        let req = match op {
            "describe" => AdminRequest::InstanceDescribe(host_name),
            "stop" => AdminRequest::InstanceStop(host_name),
            "start" => AdminRequest::InstanceStart(host_name),
            _ => AdminRequest::InstanceTerminate(host_name),
        };
        let addr = self.addr(&record.host)?.clone();
        let volumes = if op == "start" {
            record.volumes()
        } else {
            Vec::new()
        };
        let d = self
            .caller
            .call_with_volumes::<InstanceDescription>(&record.host, &addr, &req, &volumes)
            .await
            .map_err(|e| Failure::host(&e))?;
        if op == "terminate" && record.root_volume.is_some() {
            let mut r = record;
            r.state = InstanceState::Terminated;
            {
                let mut state = self.lock();
                state.instances.insert(r.key(), r.clone());
                self.save(&state)?;
            }
            self.push_network().await;
            return self.finish_terminate(r).await;
        }
        let out = {
            let mut state = self.lock();
            let key = record.key();
            let out = if op == "terminate" {
                let mut r = state.instances.remove(&key).unwrap_or(record);
                r.state = InstanceState::Terminated;
                describe_instance(&r, &self.cell)
            } else {
                let Some(r) = state.instances.get_mut(&key) else {
                    return Err(Failure::new(
                        409,
                        RefusalStep::State,
                        "gone",
                        "terminated meanwhile",
                    ));
                };
                r.state = state_of(&d);
                if d.network.is_some() {
                    r.published = published_of(&d);
                }
                describe_instance(r, &self.cell)
            };
            self.save(&state)?;
            out
        };
        if matches!(op, "start" | "terminate") {
            self.push_network().await;
        }
        Ok(Done::Instance(out))
    }

    /// Deletes a terminated instance's root volume, then its record; while
    /// the volume cannot be deleted the record stays (terminated), and a
    /// later terminate tries again.
    async fn finish_terminate(&self, record: InstanceRecord) -> Result<Done, Failure> {
        self.delete_root_volume(&record).await.map_err(|f| {
            Failure::new(
                f.status,
                f.step,
                "root_volume_kept",
                format!(
                    "the instance is terminated, but its root volume could not be deleted \
                     (terminate it again to retry): {}",
                    f.reason
                ),
            )
        })?;
        let mut state = self.lock();
        state.instances.remove(&record.key());
        self.save(&state)?;
        Ok(Done::Instance(describe_instance(&record, &self.cell)))
    }

    async fn serve(&self, customer: &Name, req: PlacedRequest<'_>) -> Result<Done, Failure> {
        match req {
            PlacedRequest::Run(r) => self.run(customer, r).await,
            PlacedRequest::ListInstances => {
                let state = self.lock();
                Ok(Done::Instances(InstanceList {
                    instances: state
                        .instances_of(customer)
                        .map(|r| describe_instance(r, &self.cell))
                        .collect(),
                }))
            }
            PlacedRequest::DescribeInstance(n) => self.act(customer, &n, "describe").await,
            PlacedRequest::StopInstance(n) => self.act(customer, &n, "stop").await,
            PlacedRequest::StartInstance(n) => self.act(customer, &n, "start").await,
            PlacedRequest::TerminateInstance(n) => self.act(customer, &n, "terminate").await,
            PlacedRequest::ImportImage(upload) => {
                let manifest = self.images.import(&upload).map_err(|e| {
                    if e.is_bad_input() {
                        let code = match &e {
                            ImportError::Upload(_) => "wrong_digest",
                            _ => "not_a_kernel",
                        };
                        Failure::new(400, RefusalStep::Request, code, e.to_string())
                    } else {
                        Failure::internal(&e)
                    }
                })?;
                {
                    let mut state = self.lock();
                    let now = nitrile_audit::format_time(self.clock.now());
                    state
                        .images
                        .entry(manifest.digest.to_hex())
                        .or_insert_with(|| ImageRecord {
                            owners: Default::default(),
                            imported: now,
                        })
                        .owners
                        .insert(customer.clone());
                    self.save(&state)?;
                }
                self.owned_image(customer, &manifest.digest)
                    .map(Done::Image)
            }
            PlacedRequest::ListImages => {
                let digests: Vec<Digest> = {
                    let state = self.lock();
                    state
                        .images
                        .iter()
                        .filter(|(_, r)| r.owners.contains(customer))
                        .filter_map(|(d, _)| d.parse().ok())
                        .collect()
                };
                let images = digests
                    .iter()
                    .filter_map(|d| self.owned_image(customer, d).ok())
                    .collect();
                Ok(Done::Images(ImageList { images }))
            }
            PlacedRequest::DescribeImage(d) => self.owned_image(customer, &d).map(Done::Image),
            PlacedRequest::DeleteImage(d) => {
                let out = self.owned_image(customer, &d)?;
                let mut state = self.lock();
                if state.instances_of(customer).any(|i| i.image == d) {
                    return Err(Failure::new(
                        409,
                        RefusalStep::State,
                        "in_use",
                        "an instance of yours runs this image; terminate it first",
                    ));
                }
                let hex = d.to_hex();
                let last = state.images.get_mut(&hex).is_some_and(|r| {
                    r.owners.remove(customer);
                    r.owners.is_empty()
                });
                let in_use = state.instances.values().any(|i| i.image == d);
                if last {
                    state.images.remove(&hex);
                }
                self.save(&state)?;
                if last && !in_use {
                    self.images.remove(&d).map_err(|e| Failure::internal(&e))?;
                }
                Ok(Done::Image(out))
            }
            _ => Err(Failure::new(
                400,
                RefusalStep::Request,
                "unknown",
                "unknown request",
            )),
        }
    }

    /// Journals a refusal of a caller that is not a customer.
    async fn refuse_not_customer(
        &self,
        peer: &PeerIdentity,
        operation: nitrile_api::Operation,
        method: &str,
        path: &str,
    ) -> Response<Bytes> {
        let reason = format!(
            "{} is not a customer: the placement service serves customers only",
            peer.principal
        );
        let record = AuditRecord::refusal(
            self.clock.now(),
            self.source.clone(),
            RequestId::random(&mut rand_core::OsRng),
            RefusalStep::Entitlement,
            &reason,
        )
        .with_principal(peer.principal.clone())
        .with_operations([operation])
        .with_detail(request_detail(method, path));
        let seq = match record.encode() {
            Ok(bytes) => self.journal.submit(&bytes).await.ok().map(|r| r.seq),
            Err(_) => None,
        };
        if seq.is_none() {
            tracing::error!("could not journal a refusal of a non-customer");
        }
        refusal_response(403, RefusalStep::Entitlement, &reason, seq)
    }

    async fn finish(&self, admitted: Admitted, result: Result<Done, Failure>) -> Response<Bytes> {
        match result {
            Err(f) => {
                let seq = self
                    .admission
                    .complete_async(admitted, Outcome::Failed, Some(f.detail()))
                    .await
                    .ok()
                    .map(|r| r.seq);
                refusal_response(f.status, f.step, &f.reason, seq)
            }
            Ok(done) => {
                let detail = match &done {
                    Done::Instance(i) => serde_json::json!({
                        "host": i.host.as_str(),
                        "state": i.state.as_str(),
                        "vni": i.vni,
                        "address": i.address,
                    }),
                    Done::Instances(l) => serde_json::json!({ "instances": l.instances.len() }),
                    Done::Image(i) => serde_json::json!({ "digest": i.digest.to_hex() }),
                    Done::Images(l) => serde_json::json!({ "images": l.images.len() }),
                };
                if let Err(e) = self
                    .admission
                    .complete_async(admitted, Outcome::Executed, Some(detail))
                    .await
                {
                    tracing::error!(error = %e, "could not journal an outcome; answer withheld");
                    return refusal_response(
                        503,
                        RefusalStep::Journal,
                        "the placement service's journal cannot record the outcome; \
                         describe the instance or image to see its state",
                        None,
                    );
                }
                match done {
                    Done::Instance(i) => json_response(StatusCode::OK, &i),
                    Done::Instances(l) => json_response(StatusCode::OK, &l),
                    Done::Image(i) => json_response(StatusCode::OK, &i),
                    Done::Images(l) => json_response(StatusCode::OK, &l),
                }
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
        let parsed = PlacedRequest::parse(&method, &path, parts.uri.query(), &body);
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                let refusals = Arc::clone(&self.refusals);
                let peer = peer.clone();
                let (m, p) = (method.clone(), path.clone());
                return match tokio::task::spawn_blocking(move || {
                    refusals.refuse_request(
                        &peer,
                        e.status(),
                        e.code(),
                        e.to_string(),
                        request_detail(&m, &p),
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
        let operation = req.operation();
        let Some(customer) = nitrile_placed_api::customer_of(&peer.principal).cloned() else {
            return svc
                .refuse_not_customer(&peer, operation, &method, &path)
                .await;
        };
        let resource = match req.resource(&customer, &svc.cell) {
            Ok(r) => r,
            Err(e) => {
                let refusals = Arc::clone(&self.refusals);
                let peer = peer.clone();
                return match tokio::task::spawn_blocking(move || {
                    refusals.refuse_request(
                        &peer,
                        400,
                        "bad_name",
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
        let admitted = match svc
            .admission
            .admit_async_with(&peer, token.as_deref(), operation, &resource, None)
            .await
        {
            Ok(a) => a,
            Err(r) => return r.response(),
        };
        let result = svc.serve(&customer, req).await;
        svc.finish(admitted, result).await
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
