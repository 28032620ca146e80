//! The host agent end to end: a cell provisioned in a temporary directory,
//! the token service and the host agent in-process on loopback mTLS, tokens
//! obtained from the token service as the sample principals, real journal,
//! real QEMU guests started through the `nitrile qemu-launch` launcher, and
//! volume keys from the key service's core library (the lifecycle test
//! prints `SKIPPED: <reason>` and returns when QEMU, the `nitrile` binary or
//! the guest image is missing).

#[path = "support/kms.rs"]
mod kms;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use nitrile_api::admin::{
    AdminRequest, HostDescription, InstanceDescription, InstanceList, InstanceState, LaunchRequest,
    PlacementState, Sha256Hex, VolumeCreateRequest, VolumeDescription, VolumeState,
};
use nitrile_api::wire::{RefusalStep, TokenRequest, TokenResponse};
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId, ResourceKind};
use nitrile_audit::{AuditRecord, JournalReader, Outcome, RecordKind};
use nitrile_cell::{CellLayout, bootstrap};
use nitrile_hostd::{Hostd, HostdConfig, HostdOptions};
use nitrile_image::ImageStore;
use nitrile_net::{Client, Response};
use nitrile_pki::CellCa;
use nitrile_pki::tls::{CaRoots, TlsIdentity, client_config};
use nitrile_tokend::{KeyRing, Tokend, TokendConfig};
use time::OffsetDateTime;

fn p(s: &str) -> PrincipalId {
    PrincipalId::parse(s).unwrap()
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

type Task<E> = tokio::task::JoinHandle<Result<(), E>>;

struct Running<E> {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<Task<E>>,
}

impl<E: std::fmt::Debug> Running<E> {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

struct Cell {
    dir: tempfile::TempDir,
    layout: CellLayout,
    tokend: Running<nitrile_tokend::TokendError>,
    host_config: PathBuf,
    keys: Arc<kms::KmsKeySource>,
}

/// The `nitrile` binary the backends start (`NITRILE_BIN`, else next to
/// the tests: `cargo build -p nitrile-cli` in the same command).
fn nitrile_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NITRILE_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .nth(2)
        .map(|profile| profile.join("nitrile"))
        .filter(|p| p.is_file())
}

impl Cell {
    /// Bootstraps a cell, starts its token service and provisions host h1
    /// (certificate, pinned issuer keys, config) with `images` in its store.
    async fn new(with_guest_image: bool) -> Result<(Self, Option<Sha256Hex>), String> {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = name("local");
        let now = OffsetDateTime::now_utc();
        bootstrap(&layout, &cell, "127.0.0.1:0", now).unwrap();
        let me = p("nitrile://local/service/tokend");
        let (cert, key) = layout.cert_and_key(&me);
        let config = TokendConfig {
            cell: cell.clone(),
            state_dir: layout.tokend_dir(),
            ca: layout.ca_cert(),
            cert,
            key,
            entitlements: layout.entitlements_dir(),
            reviewers: layout.reviewers_file(),
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics: None,
            max_token_lifetime_secs: None,
            logd: None,
        };
        let tokend = Tokend::open(&config).await.unwrap();
        let addr = tokend.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tokend.serve(async move {
            let _ = stopped.await;
        }));
        let tokend = Running {
            addr,
            stop: Some(stop),
            task: Some(task),
        };

        // Host h1: certificate from the cell CA, pinned issuer keys, config.
        let host_dir = layout.root().join("hosts").join("h1");
        std::fs::create_dir_all(&host_dir).unwrap();
        let ca = CellCa::init_or_load(&layout.pki_dir(), &cell, now).unwrap();
        let host = p("nitrile://local/host/h1");
        let issued = ca.issue(&host, None, now).unwrap();
        let (host_cert, host_key) = layout.cert_and_key(&host);
        issued.write_files(&host_cert, &host_key).unwrap();
        std::fs::copy(
            KeyRing::issuer_file_path(&layout.tokend_dir()),
            host_dir.join("issuer-keys.toml"),
        )
        .unwrap();
        let images_dir = layout.root().join("images");
        let store = ImageStore::open(&images_dir).unwrap();
        let mut image = None;
        if with_guest_image {
            let cache = nitrile_image::default_cache_dir().map_err(|e| e.to_string())?;
            let built = nitrile_image::read_output(&nitrile_image::output_dir(&cache))
                .map_err(|e| format!("no guest image (run scripts/guest-image.sh): {e}"))?;
            let imported = store
                .import(&built.kernel, &built.initramfs, &built.cmdline)
                .unwrap();
            image = Some(Sha256Hex::from_bytes(*imported.digest().as_bytes()));
        }
        let rel =
            |path: &Path| PathBuf::from("../..").join(path.strip_prefix(layout.root()).unwrap());
        let mut config = HostdConfig::new(
            cell,
            name("h1"),
            "127.0.0.1:0".parse().unwrap(),
            ".".into(),
            rel(&layout.ca_cert()),
            rel(&host_cert),
            rel(&host_key),
            "issuer-keys.toml".into(),
            rel(&images_dir),
        );
        config.capacity.vcpus = Some(4);
        config.capacity.memory_mib = Some(2048);
        config.hypervisor.vmm = nitrile_binary();
        let host_config = host_dir.join("hostd.toml");
        config.write(&host_config).unwrap();
        Ok((
            Self {
                keys: Arc::new(kms::KmsKeySource::open(&dir.path().join("kms"))),
                dir,
                layout,
                tokend,
                host_config,
            },
            image,
        ))
    }

    fn host_dir(&self) -> PathBuf {
        self.host_config.parent().unwrap().to_owned()
    }

    async fn start_host(&self) -> (Running<nitrile_hostd::HostdError>, PathBuf) {
        let config = HostdConfig::load(&self.host_config).unwrap();
        let options = HostdOptions {
            volume_keys: Some(self.keys.clone()),
            ..HostdOptions::default()
        };
        let hostd = Hostd::open(&config, options).await.unwrap();
        let addr = hostd.local_addr().unwrap().to_string();
        let metrics = hostd.metrics_path();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(hostd.serve(async move {
            let _ = stopped.await;
        }));
        (
            Running {
                addr,
                stop: Some(stop),
                task: Some(task),
            },
            metrics,
        )
    }

    async fn client(&self, addr: &str, server: &str, who: &str) -> Client {
        let (cert, key) = self
            .layout
            .cert_and_key(&p(&format!("nitrile://local/{who}")));
        let tls = client_config(
            &CaRoots::load(&self.layout.ca_cert()).unwrap(),
            &TlsIdentity::load(&cert, &key).unwrap(),
        )
        .unwrap();
        Client::connect(addr, &p(server), tls).await.unwrap()
    }

    /// A token from the token service for exactly `req` on h1, as `who`.
    async fn token(&self, who: &str, req: &AdminRequest) -> String {
        let mut c = self
            .client(&self.tokend.addr, "nitrile://local/service/tokend", who)
            .await;
        let resp = c
            .post_json(
                "/v1/tokens",
                &TokenRequest {
                    operations: vec![req.operation()],
                    resources: vec![req.resource(&name("h1"))],
                    audience: Audience::new("h1").unwrap(),
                    group: None,
                    lifetime_secs: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(resp.status.as_u16(), 200, "token refused: {:?}", resp.body);
        resp.json::<TokenResponse>().unwrap().token
    }

    /// A `volume.attach` token of `who` for `volumes` at h1.
    async fn volume_token(&self, who: &str, volumes: &[&str]) -> String {
        let mut c = self
            .client(&self.tokend.addr, "nitrile://local/service/tokend", who)
            .await;
        let resources = volumes
            .iter()
            .map(|v| ResourceId::new(ResourceKind::Volume, name(v)))
            .collect();
        let resp = c
            .post_json(
                "/v1/tokens",
                &TokenRequest {
                    operations: vec![Operation::VolumeAttach],
                    resources,
                    audience: Audience::new("h1").unwrap(),
                    group: None,
                    lifetime_secs: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(resp.status.as_u16(), 200, "token refused: {:?}", resp.body);
        resp.json::<TokenResponse>().unwrap().token
    }

    fn journal(&self) -> Vec<AuditRecord> {
        JournalReader::open(self.host_dir().join("journal"))
            .unwrap()
            .map(|e| e.unwrap().record().unwrap())
            .collect()
    }
}

/// Sends `req` to the host with `token` (or none).
async fn call(host: &mut Client, req: &AdminRequest, token: Option<&str>) -> Response {
    raw(host, req.method(), &req.path(), req.body(), token).await
}

async fn raw(
    host: &mut Client,
    method: &str,
    path: &str,
    body: Vec<u8>,
    token: Option<&str>,
) -> Response {
    raw_with(host, method, path, body, token, None).await
}

/// Calls with a volume token beside the bearer token.
async fn call_with_volumes(
    host: &mut Client,
    req: &AdminRequest,
    token: Option<&str>,
    volume_token: Option<&str>,
) -> Response {
    raw_with(
        host,
        req.method(),
        &req.path(),
        req.body(),
        token,
        volume_token,
    )
    .await
}

async fn raw_with(
    host: &mut Client,
    method: &str,
    path: &str,
    body: Vec<u8>,
    token: Option<&str>,
    volume_token: Option<&str>,
) -> Response {
    let mut b = http::Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if let Some(t) = volume_token {
        b = b.header(nitrile_api::admin::VOLUME_TOKEN_HEADER, t);
    }
    host.send(b.body(Bytes::from(body)).unwrap()).await.unwrap()
}

/// Gets a token as `who` and calls the host.
async fn admin(cell: &Cell, host: &mut Client, who: &str, req: &AdminRequest) -> Response {
    let token = cell.token(who, req).await;
    call(host, req, Some(&token)).await
}

/// Asserts that the answer is a refusal at `step` with `status` and that the
/// journal's record `audit_seq` is that refusal (or failed outcome).
fn assert_refused(cell: &Cell, resp: &Response, status: u16, step: RefusalStep) -> AuditRecord {
    assert_eq!(resp.status.as_u16(), status, "{:?}", resp.body);
    let refusal = resp.refusal().expect("refusal body");
    assert_eq!(refusal.step, step, "{refusal:?}");
    let seq = refusal.audit_seq.expect("refusal names its record");
    let records = cell.journal();
    let record = records[(seq - 1) as usize].clone();
    match record.kind {
        RecordKind::Refusal => assert_eq!(record.step, Some(step)),
        RecordKind::Outcome => {
            assert_eq!(record.outcome, Some(Outcome::Failed));
            assert_eq!(
                record.detail.as_ref().unwrap()["step"].as_str(),
                Some(step.as_str())
            );
        }
        other => panic!("record {seq} is a {other:?}"),
    }
    record
}

/// Asserts the last two records are the request and its executed outcome.
fn assert_executed(cell: &Cell, req: &AdminRequest) {
    let records = cell.journal();
    let [.., request, outcome] = records.as_slice() else {
        panic!("fewer than two records")
    };
    assert_eq!(request.kind, RecordKind::Request);
    // A launch or start with volumes also names the volume token's grant.
    assert_eq!(request.operations[0], req.operation());
    assert_eq!(request.resources[0], req.resource(&name("h1")));
    assert_eq!(outcome.kind, RecordKind::Outcome);
    assert_eq!(outcome.outcome, Some(Outcome::Executed));
    assert_eq!(outcome.request_id, request.request_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostd_serves_the_api_and_journals_every_refusal() {
    let (cell, _) = Cell::new(false).await.unwrap();
    let (running, metrics) = cell.start_host().await;
    let mut alice = cell
        .client(&running.addr, "nitrile://local/host/h1", "operator/alice")
        .await;
    let mut placement = cell
        .client(
            &running.addr,
            "nitrile://local/host/h1",
            "service/placement",
        )
        .await;

    // host.describe: admitted, executed, both records in the journal.
    let resp = admin(
        &cell,
        &mut alice,
        "operator/alice",
        &AdminRequest::HostDescribe,
    )
    .await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    let d: HostDescription = resp.json().unwrap();
    assert_eq!(d.host, name("h1"));
    assert_eq!(d.placement, PlacementState::Accepting);
    assert_eq!(d.capacity.vcpus_total, 4);
    assert!(d.measurements.iter().any(|m| m.name == "issuer-keys"));
    assert!(d.measurements.iter().any(|m| m.name == "hostd-binary"));
    assert_executed(&cell, &AdminRequest::HostDescribe);
    let request = &cell.journal()[cell.journal().len() - 2];
    assert_eq!(
        request.principal.as_ref().map(|p| p.uri()),
        Some("nitrile://local/operator/alice".to_owned())
    );

    // The same read token again: still admitted (reads are not single use),
    // with the signature check cached and every other check run.
    let token = cell
        .token("operator/alice", &AdminRequest::HostDescribe)
        .await;
    for _ in 0..2 {
        let resp = call(&mut alice, &AdminRequest::HostDescribe, Some(&token)).await;
        assert_eq!(resp.status.as_u16(), 200);
    }
    // ... but not for another operation, nor from another certificate.
    let resp = call(&mut alice, &AdminRequest::InstanceList, Some(&token)).await;
    assert_refused(&cell, &resp, 403, RefusalStep::Token);
    let resp = call(&mut placement, &AdminRequest::HostDescribe, Some(&token)).await;
    assert_refused(&cell, &resp, 401, RefusalStep::Token);

    // Drain -> launch refused with 409 state -> undrain.
    let resp = admin(
        &cell,
        &mut alice,
        "operator/alice",
        &AdminRequest::HostDrain,
    )
    .await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    assert_eq!(
        resp.json::<HostDescription>().unwrap().placement,
        PlacementState::Drained
    );
    assert_executed(&cell, &AdminRequest::HostDrain);
    let launch = AdminRequest::InstanceLaunch(LaunchRequest {
        instance: name("web1"),
        image: "ab".repeat(32).parse().unwrap(),
        vcpus: 1,
        memory_mib: 256,
        volumes: vec![],
        scratch_mib: None,
        network: None,
    });
    let resp = admin(&cell, &mut placement, "service/placement", &launch).await;
    let record = assert_refused(&cell, &resp, 409, RefusalStep::State);
    assert!(
        record.detail.unwrap()["reason"]
            .as_str()
            .unwrap()
            .contains("drained")
    );
    let resp = admin(
        &cell,
        &mut alice,
        "operator/alice",
        &AdminRequest::HostUndrain,
    )
    .await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    assert_eq!(
        resp.json::<HostDescription>().unwrap().placement,
        PlacementState::Accepting
    );
    // An image the store does not have: 409 state.
    let resp = admin(&cell, &mut placement, "service/placement", &launch).await;
    let record = assert_refused(&cell, &resp, 409, RefusalStep::State);
    assert_eq!(
        record.detail.unwrap()["code"].as_str(),
        Some("unknown_image")
    );
    // The launch's request record, durable before the launch was tried,
    // names the instance and what was asked for.
    let records = cell.journal();
    let request = records
        .iter()
        .rev()
        .find(|r| r.kind == RecordKind::Request)
        .unwrap();
    assert_eq!(request.operations, vec![Operation::InstanceLaunch]);
    let params = &request.detail.as_ref().unwrap()["params"];
    assert_eq!(params["instance"].as_str(), Some("web1"));
    assert_eq!(params["image"].as_str(), Some("ab".repeat(32).as_str()));
    assert_eq!(params["memory_mib"].as_u64(), Some(256));
    // No such instance: 404 state, decided after admission.
    let describe = AdminRequest::InstanceDescribe(name("nope"));
    let resp = admin(&cell, &mut placement, "service/placement", &describe).await;
    assert_refused(&cell, &resp, 404, RefusalStep::State);

    // Unknown path, method, field; a query string: 4xx, journaled at the
    // request step with the caller.
    let token = cell
        .token("operator/alice", &AdminRequest::HostDescribe)
        .await;
    let before = cell.journal().len();
    for (method, path, body, status) in [
        ("GET", "/v1/shell", Vec::new(), 404),
        ("PUT", "/v1/host", Vec::new(), 405),
        ("POST", "/v1/host/drain", br#"{"force":true}"#.to_vec(), 400),
        ("GET", "/v1/host?verbose=1", Vec::new(), 400),
    ] {
        let resp = raw(&mut alice, method, path, body, Some(&token)).await;
        let record = assert_refused(&cell, &resp, status, RefusalStep::Request);
        assert_eq!(
            record.principal.as_ref().map(|p| p.uri()),
            Some("nitrile://local/operator/alice".to_owned())
        );
    }
    assert_eq!(cell.journal().len(), before + 4);
    assert!(
        cell.journal()[before..]
            .iter()
            .all(|r| r.kind == RecordKind::Refusal),
        "a malformed request was admitted"
    );

    // Missing token: 401 at the token step, journaled.
    let resp = call(&mut alice, &AdminRequest::HostDescribe, None).await;
    let record = assert_refused(&cell, &resp, 401, RefusalStep::Token);
    assert!(record.reason.unwrap().starts_with("missing"));

    // A mutation token is single use.
    let token = cell.token("operator/alice", &AdminRequest::HostDrain).await;
    let resp = call(&mut alice, &AdminRequest::HostDrain, Some(&token)).await;
    assert_eq!(resp.status.as_u16(), 200);
    let resp = call(&mut alice, &AdminRequest::HostDrain, Some(&token)).await;
    assert_refused(&cell, &resp, 401, RefusalStep::Token);

    drop(alice);
    drop(placement);
    running.stop().await;
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with(
            "nitrile_hostd_requests_total{operation=\"host.describe\",outcome=\"ok\"}"
        )),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "nitrile_hostd_refusals_total{step=\"request\"} 4"),
        "{text}"
    );
    // Drained is persisted across restarts.
    let (running, _) = cell.start_host().await;
    let mut alice = cell
        .client(&running.addr, "nitrile://local/host/h1", "operator/alice")
        .await;
    let resp = admin(
        &cell,
        &mut alice,
        "operator/alice",
        &AdminRequest::HostDescribe,
    )
    .await;
    assert_eq!(
        resp.json::<HostDescription>().unwrap().placement,
        PlacementState::Drained
    );
    drop(alice);
    running.stop().await;
    cell.tokend.stop().await;
    drop(cell.dir);
}

/// Processes whose command line mentions `needle` (the VM's state
/// directory): the instance's QEMU.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains("qemu") && text.contains(needle) {
            out.push(pid);
        }
    }
    out
}

fn qemu_usable() -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
        return Err("needs root (QEMU drops to uid 65534 and joins a per-VM cgroup)".to_owned());
    }
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("qemu-system-x86_64").is_file())
    });
    if !found {
        return Err("qemu-system-x86_64 is not installed".to_owned());
    }
    if nitrile_binary().is_none() {
        return Err(
            "no nitrile binary next to the tests (cargo build -p nitrile-cli, or NITRILE_BIN)"
                .to_owned(),
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_instance_lifecycle_crypto_erase_and_readoption() {
    if let Err(reason) = qemu_usable() {
        println!("SKIPPED: {reason}");
        return;
    }
    let (cell, image) = match Cell::new(true).await {
        Ok(c) => c,
        Err(reason) => {
            println!("SKIPPED: {reason}");
            return;
        }
    };
    let image = image.unwrap();
    let (running, _) = cell.start_host().await;
    let mut placement = cell
        .client(
            &running.addr,
            "nitrile://local/host/h1",
            "service/placement",
        )
        .await;
    let web1 = name("web1");
    // A volume of its own: its key made by the key service under the
    // caller's volume.create token; the host keeps it wrapped.
    let create = AdminRequest::VolumeCreate(VolumeCreateRequest {
        volume: name("data"),
        size_mib: 16,
        kms_key: None,
        seed_image: None,
    });
    let create_token = cell.token("service/placement", &create).await;
    let resp = call(&mut placement, &create, Some(&create_token)).await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    let v: VolumeDescription = resp.json().unwrap();
    assert_eq!(
        (v.state, v.format.as_str()),
        (VolumeState::Available, "luks")
    );
    assert_executed(&cell, &create);
    let resp = admin(&cell, &mut placement, "service/placement", &create).await;
    let record = assert_refused(&cell, &resp, 409, RefusalStep::State);
    assert_eq!(
        record.detail.unwrap()["code"].as_str(),
        Some("volume_exists")
    );

    let launch = AdminRequest::InstanceLaunch(LaunchRequest {
        instance: web1.clone(),
        image,
        vcpus: 1,
        memory_mib: 256,
        volumes: vec![name("data")],
        scratch_mib: Some(16),
        network: None,
    });
    // Without the volume token, or with one for another volume: refused
    // before anything runs.
    let resp = admin(&cell, &mut placement, "service/placement", &launch).await;
    assert_refused(&cell, &resp, 401, RefusalStep::Token);
    let launch_token = cell.token("service/placement", &launch).await;
    let other = cell.volume_token("service/placement", &["logs"]).await;
    let resp = call_with_volumes(&mut placement, &launch, Some(&launch_token), Some(&other)).await;
    assert_refused(&cell, &resp, 403, RefusalStep::Token);
    assert!(cell.keys.calls().iter().all(|c| c.op != "unwrap"));

    let launch_token = cell.token("service/placement", &launch).await;
    let volume_token = cell.volume_token("service/placement", &["data"]).await;
    let resp = call_with_volumes(
        &mut placement,
        &launch,
        Some(&launch_token),
        Some(&volume_token),
    )
    .await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    let d: InstanceDescription = resp.json().unwrap();
    assert_eq!(d.state, InstanceState::Running);
    assert_eq!(d.scratch_mib, Some(16));
    assert_eq!(d.volumes.len(), 1);
    assert_executed(&cell, &launch);
    let records = cell.journal();
    let request = &records[records.len() - 2];
    assert_eq!(
        request.operations,
        [Operation::InstanceLaunch, Operation::VolumeAttach]
    );
    assert_eq!(request.resources[1].to_string(), "volume/data");
    assert!(request.detail.as_ref().unwrap()["second_token_id"].is_string());
    let host_dir = cell.host_dir();
    let key_file = host_dir.join("volume-store/data/volume.json");
    let volume = host_dir.join("volume-store/data/disk.img");
    let scratch = host_dir.join("instances/web1/scratch.img");
    assert!(key_file.is_file() && volume.is_file() && scratch.is_file());
    // The key service made the key under the create token and sealed it to
    // the VMM under the volume token; the host keeps only the wrapped key.
    let calls = cell.keys.calls();
    let ops: Vec<_> = calls.iter().map(|c| (c.op, c.volume.as_str())).collect();
    assert_eq!(ops, [("generate", "data"), ("unwrap", "data")]);
    assert_eq!(calls[0].token, create_token);
    assert_eq!(calls[1].token, volume_token);
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&key_file).unwrap()).unwrap();
    assert_eq!(file["attachment"]["instance"], "web1");
    let wrapped = hex::decode(file["wrapped_key"].as_str().unwrap()).unwrap();
    let dek = cell.keys.dek("data", &wrapped);
    for f in [&key_file, &host_dir.join("instances/web1/spec.json")] {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.windows(64).any(|w| w == dek)
                && !bytes.windows(128).any(|w| w == hex::encode(dek).as_bytes()),
            "the data key in {}",
            f.display()
        );
    }
    let vm_dir = host_dir.join("vms/web1");
    let vm_dir = vm_dir.to_str().unwrap();
    assert!(!processes_mentioning(vm_dir).is_empty(), "no QEMU for web1");

    // The same name again: 409 state.
    let again = AdminRequest::InstanceLaunch(LaunchRequest {
        instance: web1.clone(),
        image,
        vcpus: 1,
        memory_mib: 256,
        volumes: vec![],
        scratch_mib: None,
        network: None,
    });
    let resp = admin(&cell, &mut placement, "service/placement", &again).await;
    let record = assert_refused(&cell, &resp, 409, RefusalStep::State);
    assert_eq!(record.detail.unwrap()["code"].as_str(), Some("exists"));
    // More vCPUs than are free: 409 state.
    let big = AdminRequest::InstanceLaunch(LaunchRequest {
        instance: name("big"),
        image,
        vcpus: 4,
        memory_mib: 256,
        volumes: vec![],
        scratch_mib: None,
        network: None,
    });
    let resp = admin(&cell, &mut placement, "service/placement", &big).await;
    let record = assert_refused(&cell, &resp, 409, RefusalStep::State);
    assert_eq!(record.detail.unwrap()["code"].as_str(), Some("capacity"));

    let describe = AdminRequest::InstanceDescribe(web1.clone());
    let resp = admin(&cell, &mut placement, "service/placement", &describe).await;
    assert_eq!(
        resp.json::<InstanceDescription>().unwrap().state,
        InstanceState::Running
    );

    // Stop: the QEMU process is gone.
    let stop = AdminRequest::InstanceStop(web1.clone());
    let resp = admin(&cell, &mut placement, "service/placement", &stop).await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    assert_eq!(
        resp.json::<InstanceDescription>().unwrap().state,
        InstanceState::Stopped
    );
    assert_executed(&cell, &stop);
    assert!(processes_mentioning(vm_dir).is_empty(), "QEMU still runs");
    assert!(
        !scratch.exists(),
        "the instance-store disk outlived the stop"
    );
    let resp = admin(&cell, &mut placement, "service/placement", &stop).await;
    assert_refused(&cell, &resp, 409, RefusalStep::State);

    // A running instance's volume cannot be detached or deleted.
    let detach = AdminRequest::VolumeDetach(name("data"));
    let delete = AdminRequest::VolumeDelete(name("data"));
    let describe_volume = AdminRequest::VolumeDescribe(name("data"));

    // Start again from the persisted spec, with the volume: it needs the
    // volume token too.
    let start = AdminRequest::InstanceStart(web1.clone());
    let resp = admin(&cell, &mut placement, "service/placement", &start).await;
    assert_refused(&cell, &resp, 401, RefusalStep::Token);
    let start_token = cell.token("service/placement", &start).await;
    let volume_token = cell.volume_token("service/placement", &["data"]).await;
    let resp = call_with_volumes(
        &mut placement,
        &start,
        Some(&start_token),
        Some(&volume_token),
    )
    .await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    assert_eq!(
        resp.json::<InstanceDescription>().unwrap().state,
        InstanceState::Running
    );
    let pids = processes_mentioning(vm_dir);
    assert!(!pids.is_empty(), "no QEMU after start");
    // A new VMM: the key sealed again, to its new recipient; a new disk.
    let unwraps = cell
        .keys
        .calls()
        .iter()
        .filter(|c| c.op == "unwrap")
        .count();
    assert_eq!(unwraps, 2);
    assert!(scratch.is_file());

    // Restart the host agent without stopping VMs: the new one re-adopts.
    drop(placement);
    running.stop().await;
    assert_eq!(processes_mentioning(vm_dir), pids, "the VM did not survive");
    let (running, _) = cell.start_host().await;
    let mut placement = cell
        .client(
            &running.addr,
            "nitrile://local/host/h1",
            "service/placement",
        )
        .await;
    let resp = admin(&cell, &mut placement, "service/placement", &describe).await;
    let d: InstanceDescription = resp.json().unwrap();
    assert_eq!(d.state, InstanceState::Running, "{d:?}");
    let list = AdminRequest::InstanceList;
    let resp = admin(&cell, &mut placement, "service/placement", &list).await;
    let l: InstanceList = resp.json().unwrap();
    assert_eq!(l.instances.len(), 1);

    let resp = admin(&cell, &mut placement, "service/placement", &detach).await;
    let record = assert_refused(&cell, &resp, 409, RefusalStep::State);
    assert_eq!(record.detail.unwrap()["code"].as_str(), Some("wrong_state"));
    let resp = admin(&cell, &mut placement, "service/placement", &delete).await;
    let record = assert_refused(&cell, &resp, 409, RefusalStep::State);
    assert_eq!(
        record.detail.unwrap()["code"].as_str(),
        Some("volume_attached")
    );

    // Terminate: VM gone, instance store gone, the volume detached and
    // kept, tombstone kept.
    let terminate = AdminRequest::InstanceTerminate(web1.clone());
    let resp = admin(&cell, &mut placement, "service/placement", &terminate).await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    assert_eq!(
        resp.json::<InstanceDescription>().unwrap().state,
        InstanceState::Terminated
    );
    assert_executed(&cell, &terminate);
    assert!(processes_mentioning(vm_dir).is_empty(), "QEMU still runs");
    assert!(!scratch.exists(), "instance-store disk not deleted");
    assert!(volume.exists() && cell.keys.has_volume("data"));
    let resp = admin(&cell, &mut placement, "service/placement", &describe_volume).await;
    let v: VolumeDescription = resp.json().unwrap();
    assert_eq!((v.state, v.attachment), (VolumeState::Available, None));
    // Deleted: the key service destroys the key before the files go.
    let resp = admin(&cell, &mut placement, "service/placement", &delete).await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    assert_eq!(
        resp.json::<VolumeDescription>().unwrap().state,
        VolumeState::Deleted
    );
    assert_executed(&cell, &delete);
    assert!(!key_file.exists(), "volume record not removed");
    assert!(!volume.exists(), "volume file not deleted");
    assert!(
        !cell.keys.has_volume("data"),
        "the key service kept the key"
    );
    assert_eq!(cell.keys.calls().last().unwrap().op, "destroy");
    let resp = admin(&cell, &mut placement, "service/placement", &describe_volume).await;
    let record = assert_refused(&cell, &resp, 404, RefusalStep::State);
    assert_eq!(
        record.detail.unwrap()["code"].as_str(),
        Some("no_such_volume")
    );
    let resp = admin(&cell, &mut placement, "service/placement", &describe).await;
    assert_eq!(
        resp.json::<InstanceDescription>().unwrap().state,
        InstanceState::Terminated
    );
    let resp = admin(&cell, &mut placement, "service/placement", &list).await;
    assert!(resp.json::<InstanceList>().unwrap().instances.is_empty());

    drop(placement);
    running.stop().await;
    cell.tokend.stop().await;
}
