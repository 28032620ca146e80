//! A real one-machine cell for end-to-end tests of the host agent: the cell
//! bootstrapped in a temporary directory (CA, reviewed sample entitlement
//! bundle, principal certificates), the token service and host agents
//! running in-process on loopback mTLS, and helpers that call them the way
//! the CLI does (a token for exactly the call from the token service, then
//! the call to the host), read journals, and make TLS clients a host must
//! refuse.
//!
//! Nothing here is a stand-in: real certificates, real TLS, real journal
//! files with fsync, real SQLite quotas. Hosts run without a hypervisor
//! unless a test asks for one (instance operations then fail at step
//! `hypervisor` once admitted; every test here uses instance names that do
//! not exist or host operations).

// Each test binary uses part of the harness; its items are `pub` for the
// binaries (of this and other crates) that include it.
#![allow(dead_code, unreachable_pub)]

pub mod guest;
pub mod kms;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, header};
use nitrile_api::admin::AdminRequest;
use nitrile_api::wire::{Refusal, TokenRequest, TokenResponse};
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId};
use nitrile_audit::{AuditRecord, JournalReader};
use nitrile_cell::{CellLayout, bootstrap, provision_host};
use nitrile_hostd::volume_keys::VolumeKeySource;
use nitrile_hostd::{BackendName, Hostd, HostdConfig, HostdError, HostdOptions, HypervisorConfig};
use nitrile_net::{Client, NetError};
use nitrile_pki::tls::{CaRoots, TlsIdentity, client_config, danger};
use nitrile_pki::{CA_CERT_FILE, CA_KEY_FILE, CellCa};
use nitrile_policy::ReviewerKey;
use nitrile_token::FixedClock;
use nitrile_tokend::{Tokend, TokendConfig, TokendError};
use rustls::ClientConfig;
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The cell every test cell is (the sample bundle is written for it).
pub const CELL: &str = "local";

/// Parses a principal URI.
pub fn p(uri: &str) -> PrincipalId {
    PrincipalId::parse(uri).unwrap()
}

/// Parses a resource id (`host/h1`, `instance/web1`).
pub fn r(s: &str) -> ResourceId {
    ResourceId::parse(s).unwrap()
}

/// A principal of the test cell from `kind/name` (`operator/alice`).
pub fn principal(kind_name: &str) -> PrincipalId {
    p(&format!("nitrile://{CELL}/{kind_name}"))
}

/// The token service's principal.
pub fn tokend_principal() -> PrincipalId {
    principal("service/tokend")
}

/// A host's principal.
pub fn host_principal(host: &str) -> PrincipalId {
    principal(&format!("host/{host}"))
}

/// Every record of the journal at `path`, verifying the chain as it reads
/// (panics on a broken one).
pub fn journal_records(path: &Path) -> Vec<AuditRecord> {
    JournalReader::open(path)
        .unwrap()
        .map(|e| e.unwrap().record().unwrap())
        .collect()
}

/// The refusal body of an answer (panics when it is not one).
pub fn refusal(body: &[u8]) -> Refusal {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not a refusal ({e}): {}", String::from_utf8_lossy(body)))
}

/// The `nitrile` binary (`nitrile vmm`, `nitrile qemu-launch`) the
/// backends start: `NITRILE_BIN`, else `nitrile` in the target directory
/// these tests were built in (`cargo build -p nitrile-cli` puts it there;
/// build it in the same command as the tests, so that it is this tree's).
pub fn nitrile_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NITRILE_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    // <target>/<profile>/deps/<test>
    exe.ancestors()
        .nth(2)
        .map(|profile| profile.join("nitrile"))
        .filter(|p| p.is_file())
}

/// Whether the tests run as root (mounting needs it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A service task and the means to stop it.
struct Running<E> {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), E>>>,
}

impl<E: std::fmt::Debug> Running<E> {
    fn spawn<F>(addr: SocketAddr, serve: impl FnOnce(oneshot::Receiver<()>) -> F) -> Self
    where
        F: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(stopped));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

/// How a host agent of the test cell runs.
#[derive(Clone)]
pub struct HostSetup {
    /// The host agent's clock (by default at the token service's time).
    pub clock: Arc<FixedClock>,
    /// The host state directory; by default the cell layout's
    /// `hosts/<host>/`.
    pub state: Option<PathBuf>,
    /// The hypervisor section; by default a QEMU binary that does not exist,
    /// so the host runs with no hypervisor.
    pub hypervisor: HypervisorConfig,
    /// The key service the host asks for volume keys; by default none.
    pub volume_keys: Option<Arc<dyn VolumeKeySource>>,
    /// The volume store; by default the host's own (`<state>/volume-store`).
    pub volumes: Option<PathBuf>,
    /// The instance network's data path; by default none.
    pub network: Option<nitrile_hostd::network::NetworkConfig>,
    /// The pinned release repository; by default none.
    pub release: Option<nitrile_hostd::ReleaseConfig>,
    /// The host's TPM; by default none.
    pub tpm: Option<nitrile_hostd::config::TpmConfig>,
}

struct RunningHost {
    setup: HostSetup,
    config: HostdConfig,
    running: Running<HostdError>,
}

/// A cell with its token service running and any number of host agents.
pub struct TestCell {
    dir: tempfile::TempDir,
    /// Where the cell keeps its state.
    pub layout: CellLayout,
    /// The cell's name.
    pub cell: Name,
    /// The token service's clock.
    pub clock: Arc<FixedClock>,
    tokend: Option<Running<TokendError>>,
    hosts: BTreeMap<String, RunningHost>,
}

impl TestCell {
    /// Bootstraps a cell and starts its token service.
    pub async fn new() -> Self {
        let mut cell = Self::bootstrapped();
        cell.start_tokend().await;
        cell
    }

    /// A cell with its token service and the host agents `hosts` running.
    pub async fn with_hosts(hosts: &[&str]) -> Self {
        let mut cell = Self::new().await;
        for h in hosts {
            cell.start_host(h).await;
        }
        cell
    }

    /// Bootstraps a cell without starting anything (edit the bundle, then
    /// [`Self::start_tokend`]).
    pub fn bootstrapped() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = Name::new(CELL).unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        bootstrap(&layout, &cell, "127.0.0.1:0", now).unwrap();
        Self {
            dir,
            layout,
            cell,
            clock: Arc::new(FixedClock::new(now)),
            tokend: None,
            hosts: BTreeMap::new(),
        }
    }

    /// A scratch directory inside the cell's temporary directory.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    /// Rewrites a file of the entitlement bundle and has both local
    /// reviewers sign it (takes effect at the next token service start).
    pub fn edit_bundle(&self, file: &str, edit: impl FnOnce(String) -> String) {
        let path = self.layout.entitlements_dir().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let edited = edit(text.clone());
        assert_ne!(edited, text, "the edit of {file} changed nothing");
        std::fs::write(&path, edited).unwrap();
        for name in ["reviewer-1", "reviewer-2"] {
            let key = ReviewerKey::load(
                &self.layout.reviewer_keys_dir().join(format!("{name}.key")),
                Name::new(name).unwrap(),
            )
            .unwrap();
            key.sign_dir(&self.layout.entitlements_dir()).unwrap();
        }
    }

    /// The token service's config.
    pub fn tokend_config(&self) -> TokendConfig {
        let (cert, key) = self.layout.cert_and_key(&tokend_principal());
        TokendConfig {
            cell: self.cell.clone(),
            state_dir: self.layout.tokend_dir(),
            ca: self.layout.ca_cert(),
            cert,
            key,
            entitlements: self.layout.entitlements_dir(),
            reviewers: self.layout.reviewers_file(),
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics: None,
            max_token_lifetime_secs: None,
            logd: None,
        }
    }

    /// Starts the token service (on a new port).
    pub async fn start_tokend(&mut self) {
        assert!(self.tokend.is_none(), "token service already running");
        let tokend = Tokend::open_with_clock(&self.tokend_config(), self.clock.clone())
            .await
            .unwrap();
        let addr = tokend.local_addr().unwrap();
        self.tokend = Some(Running::spawn(addr, |stopped| {
            tokend.serve(async move {
                let _ = stopped.await;
            })
        }));
    }

    /// Stops the token service.
    pub async fn stop_tokend(&mut self) {
        if let Some(t) = self.tokend.take() {
            t.stop().await;
        }
    }

    /// The token service's journal.
    pub fn tokend_journal(&self) -> PathBuf {
        self.layout.tokend_journal()
    }

    /// The default setup of a host: the token service's time, the cell
    /// layout's state directory, no hypervisor.
    pub fn default_setup(&self) -> HostSetup {
        HostSetup {
            clock: Arc::new(FixedClock::new(nitrile_token::Clock::now(&*self.clock))),
            state: None,
            hypervisor: HypervisorConfig {
                backend: BackendName::Qemu,
                qemu: Some(self.dir.path().join("no-qemu-here")),
                vsock_daemon: None,
                vmm: None,
            },
            volume_keys: None,
            volumes: None,
            network: None,
            release: None,
            tpm: None,
        }
    }

    /// Provisions host `host` (fresh certificate, issuer keys pinned anew)
    /// and starts its agent with the default setup.
    pub async fn start_host(&mut self, host: &str) {
        let setup = self.default_setup();
        self.start_host_with(host, setup).await;
    }

    /// Provisions host `host` and starts its agent with `setup`.
    pub async fn start_host_with(&mut self, host: &str, setup: HostSetup) {
        self.try_start_host_with(host, setup).await.unwrap();
    }

    /// Provisions host `host` and tries to start its agent.
    pub async fn try_start_host_with(
        &mut self,
        host: &str,
        setup: HostSetup,
    ) -> Result<(), HostdError> {
        assert!(!self.hosts.contains_key(host), "{host} already running");
        let config = self.provision_host_config(host, &setup);
        let options = HostdOptions {
            stop_instances_on_exit: false,
            clock: setup.clock.clone(),
            volume_keys: setup.volume_keys.clone(),
            ..HostdOptions::default()
        };
        let hostd = Hostd::open(&config, options).await?;
        let addr = hostd.local_addr().unwrap();
        let running = Running::spawn(addr, |stopped| {
            hostd.serve(async move {
                let _ = stopped.await;
            })
        });
        self.hosts.insert(
            host.to_owned(),
            RunningHost {
                setup,
                config,
                running,
            },
        );
        Ok(())
    }

    /// Provisions host `host` (fresh certificate, issuer keys pinned anew)
    /// and returns the config its agent would run with under `setup`.
    pub fn provision_host_config(&self, host: &str, setup: &HostSetup) -> HostdConfig {
        let name = Name::new(host).unwrap();
        let now = nitrile_token::Clock::now(&*self.clock);
        let provisioned = provision_host(&self.layout, &self.cell, &name, now).unwrap();
        let mut config = HostdConfig::new(
            self.cell.clone(),
            name,
            "127.0.0.1:0".parse().unwrap(),
            setup.state.clone().unwrap_or(provisioned.dir),
            self.layout.ca_cert(),
            provisioned.cert,
            provisioned.key,
            provisioned.issuer_keys,
            self.layout.images_dir(),
        );
        config.hypervisor = setup.hypervisor.clone();
        config.volumes = setup.volumes.clone();
        config.network = setup.network.clone();
        config.release = setup.release.clone();
        config.tpm = setup.tpm.clone();
        config
    }

    /// Stops host `host`'s agent (in-flight requests finish, its journal is
    /// closed) and returns the setup it ran with.
    pub async fn stop_host(&mut self, host: &str) -> HostSetup {
        let h = self
            .hosts
            .remove(host)
            .unwrap_or_else(|| panic!("{host} not running"));
        h.running.stop().await;
        h.setup
    }

    /// Stops and starts host `host` again with the same setup (provisioned
    /// anew: the issuer keys the token service publishes now are pinned).
    pub async fn restart_host(&mut self, host: &str) {
        let setup = self.stop_host(host).await;
        self.start_host_with(host, setup).await;
    }

    /// The clock of host `host`'s agent.
    pub fn host_clock(&self, host: &str) -> Arc<FixedClock> {
        self.running(host).setup.clock.clone()
    }

    /// The config host `host`'s agent runs with.
    pub fn host_config(&self, host: &str) -> &HostdConfig {
        &self.running(host).config
    }

    /// The mTLS address of host `host`.
    pub fn host_addr(&self, host: &str) -> SocketAddr {
        self.running(host).running.addr
    }

    /// The journal of host `host` (running or not: the default state
    /// directory unless it runs with another).
    pub fn host_journal(&self, host: &str) -> PathBuf {
        match self.hosts.get(host) {
            Some(h) => h.config.state.join("journal"),
            None => self.layout.host_journal(&Name::new(host).unwrap()),
        }
    }

    fn running(&self, host: &str) -> &RunningHost {
        self.hosts
            .get(host)
            .unwrap_or_else(|| panic!("{host} not running"))
    }

    /// The token service's address.
    pub fn tokend_addr(&self) -> SocketAddr {
        self.tokend
            .as_ref()
            .expect("token service not running")
            .addr
    }

    /// The CA roots of the cell.
    pub fn roots(&self) -> CaRoots {
        CaRoots::load(&self.layout.ca_cert()).unwrap()
    }

    /// The TLS identity of a sample principal (`operator/alice`).
    pub fn identity(&self, kind_name: &str) -> TlsIdentity {
        let (cert, key) = self.layout.cert_and_key(&principal(kind_name));
        TlsIdentity::load(&cert, &key).unwrap()
    }

    /// SHA-256 of a sample principal's certificate (what tokens bind to).
    pub fn cert_sha256(&self, kind_name: &str) -> [u8; 32] {
        self.identity(kind_name).leaf_sha256()
    }

    /// The client TLS config of a sample principal.
    pub fn tls_for(&self, kind_name: &str) -> Arc<ClientConfig> {
        client_config(&self.roots(), &self.identity(kind_name)).unwrap()
    }

    /// A TLS 1.3 client that presents no certificate.
    pub fn tls_without_certificate(&self) -> Arc<ClientConfig> {
        danger::danger_client_config_without_certificate(&self.roots()).unwrap()
    }

    /// A client presenting a certificate for `kind_name` of this cell, but
    /// issued by another CA (refused in the handshake).
    pub fn tls_from_other_ca(&self, kind_name: &str) -> Arc<ClientConfig> {
        let other = self.scratch("other-ca");
        let now = nitrile_token::Clock::now(&*self.clock);
        let rogue = CellCa::init_or_load(&other, &self.cell, now).unwrap();
        let issued = rogue.issue(&principal(kind_name), None, now).unwrap();
        client_config(&self.roots(), &TlsIdentity::from_issued(&issued).unwrap()).unwrap()
    }

    /// A client presenting a certificate that the cell CA signed but whose
    /// identity the host refuses after the handshake.
    pub fn tls_refused_identity(&self, kind: RefusedIdentity) -> Arc<ClientConfig> {
        let identity = self.refused_identity(kind);
        client_config(&self.roots(), &identity).unwrap()
    }

    /// The identity behind [`Self::tls_refused_identity`].
    pub fn refused_identity(&self, kind: RefusedIdentity) -> TlsIdentity {
        let pki = self.layout.pki_dir();
        let ca_pem = std::fs::read_to_string(pki.join(CA_CERT_FILE)).unwrap();
        let ca_key =
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join(CA_KEY_FILE)).unwrap())
                .unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        let san = match kind {
            RefusedIdentity::OtherCell => {
                let uri = "nitrile://elsewhere/operator/alice";
                dn.push(rcgen::DnType::CommonName, uri);
                rcgen::SanType::URI(uri.try_into().unwrap())
            }
            RefusedIdentity::NoPrincipal => {
                dn.push(rcgen::DnType::CommonName, "alice");
                rcgen::SanType::DnsName("alice.example".try_into().unwrap())
            }
        };
        params.distinguished_name = dn;
        params.subject_alt_names = vec![san];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::hours(1);
        let cert = params.signed_by(&key, &issuer).unwrap();
        TlsIdentity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap()
    }

    /// A new connection to the token service as `kind_name`.
    pub async fn tokend_client(&self, kind_name: &str) -> Client {
        Client::connect(
            &self.tokend_addr().to_string(),
            &tokend_principal(),
            self.tls_for(kind_name),
        )
        .await
        .unwrap()
    }

    /// Asks the token service, as `kind_name`, for a token.
    pub async fn token_request(
        &self,
        kind_name: &str,
        request: &TokenRequest,
    ) -> nitrile_net::Response {
        let mut c = self.tokend_client(kind_name).await;
        c.post_json("/v1/tokens", request).await.unwrap()
    }

    /// A token for exactly `op` on `resource` at `audience`, granted to
    /// `kind_name` by the token service over mTLS (panics when refused).
    pub async fn token(
        &self,
        kind_name: &str,
        op: Operation,
        resource: &str,
        audience: &str,
    ) -> String {
        let resp = self
            .token_request(kind_name, &token_request(op, resource, audience))
            .await;
        assert_eq!(
            resp.status.as_u16(),
            200,
            "token refused: {}",
            String::from_utf8_lossy(&resp.body)
        );
        resp.json::<TokenResponse>().unwrap().token
    }

    /// The token the CLI would get for `req` at `host`.
    pub async fn token_for(&self, kind_name: &str, host: &str, req: &AdminRequest) -> String {
        let host_name = Name::new(host).unwrap();
        self.token(
            kind_name,
            req.operation(),
            &req.resource(&host_name).to_string(),
            host,
        )
        .await
    }

    /// A new connection to host `host` as `kind_name`.
    pub async fn client(&self, kind_name: &str, host: &str) -> Client {
        self.connect(host, self.tls_for(kind_name)).await.unwrap()
    }

    /// A new connection to host `host` with any TLS client config.
    pub async fn connect(&self, host: &str, tls: Arc<ClientConfig>) -> Result<Client, NetError> {
        Client::connect(
            &self.host_addr(host).to_string(),
            &host_principal(host),
            tls,
        )
        .await
    }

    /// Calls host `host` with `req` as `kind_name` over a new mTLS
    /// connection, presenting `token`: the status and body.
    pub async fn call(
        &self,
        kind_name: &str,
        host: &str,
        req: &AdminRequest,
        token: Option<&str>,
    ) -> (u16, Bytes) {
        let mut c = self.client(kind_name, host).await;
        call_with(&mut c, req, token).await
    }

    /// A `volume.attach` token of `kind_name` for `volumes` at `host`: the
    /// volume token a launch or start with volumes carries.
    pub async fn volume_token(&self, kind_name: &str, host: &str, volumes: &[&str]) -> String {
        let ask = TokenRequest {
            operations: vec![Operation::VolumeAttach],
            resources: volumes.iter().map(|v| r(&format!("volume/{v}"))).collect(),
            audience: Audience::new(host).unwrap(),
            group: None,
            lifetime_secs: None,
        };
        let resp = self.token_request(kind_name, &ask).await;
        assert_eq!(
            resp.status.as_u16(),
            200,
            "token refused: {}",
            String::from_utf8_lossy(&resp.body)
        );
        resp.json::<TokenResponse>().unwrap().token
    }

    /// [`TestCell::call`] with a volume token beside the bearer token.
    pub async fn call_with_volumes(
        &self,
        kind_name: &str,
        host: &str,
        req: &AdminRequest,
        token: Option<&str>,
        volume_token: Option<&str>,
    ) -> (u16, Bytes) {
        let mut c = self.client(kind_name, host).await;
        send_with(
            &mut c,
            req.method(),
            &req.path(),
            &req.body(),
            token,
            volume_token,
        )
        .await
    }

    /// Creates volume `id` of `size_mib` at `host` as `kind_name` (its key
    /// made by the host's key source under `kms-key/default`).
    pub async fn create_volume(&self, kind_name: &str, host: &str, id: &str, size_mib: u64) {
        let req = AdminRequest::VolumeCreate(nitrile_api::admin::VolumeCreateRequest {
            volume: Name::new(id).unwrap(),
            size_mib,
            kms_key: None,
            seed_image: None,
        });
        let token = self.token_for(kind_name, host, &req).await;
        let (status, body) = self.call(kind_name, host, &req, Some(&token)).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    /// Sends any method, path and body to host `host` as `kind_name`.
    pub async fn call_raw(
        &self,
        kind_name: &str,
        host: &str,
        method: &str,
        path: &str,
        body: &[u8],
        token: Option<&str>,
    ) -> (u16, Bytes) {
        let mut c = self.client(kind_name, host).await;
        send_raw(&mut c, method, path, body, token).await
    }
}

/// Which identity a certificate of the cell CA carries that a host refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedIdentity {
    /// A `nitrile://` URI of another cell.
    OtherCell,
    /// No `nitrile://` URI at all.
    NoPrincipal,
}

/// The token request the CLI sends for one call.
pub fn token_request(op: Operation, resource: &str, audience: &str) -> TokenRequest {
    TokenRequest {
        operations: vec![op],
        resources: vec![r(resource)],
        audience: Audience::new(audience).unwrap(),
        group: None,
        lifetime_secs: None,
    }
}

/// Sends `req` over `client`, presenting `token`.
pub async fn call_with(
    client: &mut Client,
    req: &AdminRequest,
    token: Option<&str>,
) -> (u16, Bytes) {
    send_raw(client, req.method(), &req.path(), &req.body(), token).await
}

/// Sends any method, path and body over `client`.
pub async fn send_raw(
    client: &mut Client,
    method: &str,
    path: &str,
    body: &[u8],
    token: Option<&str>,
) -> (u16, Bytes) {
    send_with(client, method, path, body, token, None).await
}

/// [`send_raw`] with a volume token in `nitrile-volume-token`.
pub async fn send_with(
    client: &mut Client,
    method: &str,
    path: &str,
    body: &[u8],
    token: Option<&str>,
    volume_token: Option<&str>,
) -> (u16, Bytes) {
    let mut builder = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path)
        .header(header::ACCEPT, "application/json");
    if !body.is_empty() {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(t) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if let Some(t) = volume_token {
        builder = builder.header(nitrile_api::admin::VOLUME_TOKEN_HEADER, t);
    }
    let resp = client
        .send(builder.body(Bytes::copy_from_slice(body)).unwrap())
        .await
        .unwrap();
    (resp.status.as_u16(), resp.body)
}

/// A small filesystem mounted for a test and always unmounted: on drop,
/// even when the test panics (lazily if something still holds a file).
#[derive(Debug)]
pub struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `size` (`2m`) at `path`; `Err` with the reason when
    /// that is not possible here.
    pub fn mount(path: &Path, size: &str) -> Result<Self, String> {
        if !is_root() {
            return Err("needs root to mount a tmpfs".into());
        }
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let plain = std::process::Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !plain {
            // Still busy (a host agent left running by a failed test):
            // detach now, freed when the last file closes.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.path)
                .status();
        }
    }
}
