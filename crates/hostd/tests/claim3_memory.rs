//! Claim 3: no volume's data key is ever in the host agent's memory.
//!
//! The host agent runs in a process of its own (this test binary started
//! again in the child role below), with a key source that forwards to the
//! key service's core library in the test process over a Unix socket: the
//! agent sees only wrapped and sealed keys, as it would with `nitrile kms`.
//! After a launch that attaches a volume (the QEMU launcher has opened the
//! key sealed to it, and the guest runs), the test reads the agent's whole
//! readable memory through `/proc/<pid>/mem` and searches it for the data
//! key, which it takes from the key service with its test-only export. The
//! same search finds a value the test planted in the agent (the control:
//! the search can find 64 bytes where they are). Also: without a key
//! service, a launch with volumes is refused before anything is made; a
//! key the key service will not release fails the launch closed.
//!
//! Needs root, QEMU, the `nitrile` binary next to the tests (`cargo build
//! -p nitrile-cli` in the same command) and the guest image; prints
//! `SKIPPED: <reason>` otherwise.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use nitrile_api::Name;
use nitrile_api::admin::{
    AdminRequest, InstanceDescription, InstanceState, LaunchRequest, Sha256Hex, VolumeCreateRequest,
};
use nitrile_api::wire::RefusalStep;
use nitrile_hostd::volume_keys::{VolumeKeyError, VolumeKeySource, WrappedVolumeKey};
use nitrile_hostd::{BackendName, Hostd, HostdConfig, HostdOptions, HypervisorConfig};
use nitrile_net::Client;
use nitrile_vmm::{RecipientPublicKey, SealedKey};
use support::kms::KmsKeySource;
use support::{
    TestCell, call_with, host_principal, is_root, journal_records, nitrile_binary, refusal,
    send_with,
};

const PLACEMENT: &str = "service/placement";
/// Set in the child: the host agent's config file.
const CHILD_CONFIG: &str = "NITRILE_CLAIM3_HOSTD_CONFIG";
/// Set in the child: the key relay's socket.
const CHILD_RELAY: &str = "NITRILE_CLAIM3_KEY_RELAY";
/// What the child prints once it serves.
const LISTENING: &str = "CLAIM3-HOSTD-LISTENING ";

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn find_qemu() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    })
}

/// One request to the key relay, as a JSON line.
#[derive(serde::Serialize, serde::Deserialize)]
struct RelayRequest {
    op: String,
    volume: Name,
    kms_key: Option<Name>,
    token: String,
    wrapped: Option<String>,
    recipient: Option<String>,
}

/// The child's key source: every call goes to the test process, which
/// holds the key service.
struct RelayKeySource(PathBuf);

impl RelayKeySource {
    fn ask(&self, req: &RelayRequest) -> Result<Vec<u8>, VolumeKeyError> {
        let fail = |e: std::io::Error| VolumeKeyError::Failed(Box::new(e));
        let mut conn = UnixStream::connect(&self.0).map_err(fail)?;
        let mut line = serde_json::to_vec(req).unwrap();
        line.push(b'\n');
        conn.write_all(&line).map_err(fail)?;
        let mut answer = String::new();
        BufReader::new(conn).read_line(&mut answer).map_err(fail)?;
        match answer.trim().strip_prefix("ok:") {
            Some(hex) => Ok(hex::decode(hex).unwrap()),
            None => Err(VolumeKeyError::Refused(answer.trim().to_owned().into())),
        }
    }
}

impl VolumeKeySource for RelayKeySource {
    fn generate(
        &self,
        volume: &Name,
        kms_key: &Name,
        token: &str,
    ) -> Result<WrappedVolumeKey, VolumeKeyError> {
        let bytes = self.ask(&RelayRequest {
            op: "generate".into(),
            volume: volume.clone(),
            kms_key: Some(kms_key.clone()),
            token: token.into(),
            wrapped: None,
            recipient: None,
        })?;
        Ok(WrappedVolumeKey::new(bytes).unwrap())
    }

    fn unwrap_sealed(
        &self,
        volume: &Name,
        wrapped: &WrappedVolumeKey,
        recipient: &RecipientPublicKey,
        token: &str,
    ) -> Result<SealedKey, VolumeKeyError> {
        let bytes = self.ask(&RelayRequest {
            op: "unwrap".into(),
            volume: volume.clone(),
            kms_key: None,
            token: token.into(),
            wrapped: Some(hex::encode(wrapped.as_bytes())),
            recipient: Some(hex::encode(recipient.as_bytes())),
        })?;
        Ok(SealedKey::decode(&bytes).unwrap())
    }

    fn destroy(&self, volume: &Name, token: &str) -> Result<(), VolumeKeyError> {
        self.ask(&RelayRequest {
            op: "destroy".into(),
            volume: volume.clone(),
            kms_key: None,
            token: token.into(),
            wrapped: None,
            recipient: None,
        })
        .map(|_| ())
    }
}

/// Serves the relay in the test process: each connection one request.
fn serve_relay(listener: UnixListener, keys: Arc<KmsKeySource>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { return };
        let mut line = String::new();
        if BufReader::new(&conn).read_line(&mut line).is_err() {
            continue;
        }
        let req: RelayRequest = serde_json::from_str(&line).unwrap();
        let answer = match req.op.as_str() {
            "generate" => keys
                .generate(&req.volume, req.kms_key.as_ref().unwrap(), &req.token)
                .map(|w| w.as_bytes().to_vec()),
            "unwrap" => {
                let wrapped =
                    WrappedVolumeKey::new(hex::decode(req.wrapped.unwrap()).unwrap()).unwrap();
                let recipient =
                    RecipientPublicKey::from_bytes(&hex::decode(req.recipient.unwrap()).unwrap())
                        .unwrap();
                keys.unwrap_sealed(&req.volume, &wrapped, &recipient, &req.token)
                    .map(|s| s.encode())
            }
            "destroy" => keys.destroy(&req.volume, &req.token).map(|()| Vec::new()),
            other => panic!("unknown relay op {other}"),
        };
        let text = match answer {
            Ok(bytes) => format!("ok:{}\n", hex::encode(bytes)),
            Err(e) => format!("refused {e}\n"),
        };
        let _ = (&conn).write_all(text.as_bytes());
    }
}

/// Not a test on its own: with [`CHILD_CONFIG`] set, runs the host agent
/// with the relay key source until its standard input closes. The first
/// line on standard input is the value to plant (hex), kept in this
/// process's heap for its whole life.
#[test]
fn claim3_hostd_child() {
    let Some(config) = std::env::var_os(CHILD_CONFIG) else {
        return;
    };
    let relay = PathBuf::from(std::env::var_os(CHILD_RELAY).unwrap());
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line).unwrap();
    let planted: Vec<u8> = hex::decode(line.trim()).unwrap();
    let config = HostdConfig::load(Path::new(&config)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let options = HostdOptions {
            stop_instances_on_exit: true,
            volume_keys: Some(Arc::new(RelayKeySource(relay))),
            ..HostdOptions::default()
        };
        let hostd = Hostd::open(&config, options).await.unwrap();
        let addr = hostd.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            let _ = stop.send(());
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{LISTENING}{addr}").unwrap();
        out.flush().unwrap();
        drop(out);
        hostd
            .serve(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    std::hint::black_box(&planted);
}

/// Every readable region of `pid`'s memory, read through `/proc/<pid>/mem`
/// (regions the kernel will not hand out, like `[vvar]`, are skipped).
fn readable_memory(pid: u32) -> Vec<(String, Vec<u8>)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') {
            continue;
        }
        let (lo, hi) = range.split_once('-').unwrap();
        let lo = u64::from_str_radix(lo, 16).unwrap();
        let hi = u64::from_str_radix(hi, 16).unwrap();
        let mut buf = vec![0u8; usize::try_from(hi - lo).unwrap()];
        if mem.read_exact_at(&mut buf, lo).is_ok() {
            out.push((line.to_owned(), buf));
        }
    }
    out
}

fn find(regions: &[(String, Vec<u8>)], needle: &[u8]) -> Option<String> {
    regions
        .iter()
        .find(|(_, bytes)| bytes.windows(needle.len()).any(|w| w == needle))
        .map(|(line, _)| line.clone())
}

/// Kills the child (and so its VMs) if the test ends early.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim3_hostd_memory_holds_no_volume_key_after_attach() {
    if !is_root() {
        println!("SKIPPED: needs root (QEMU's jail, reading another process's memory)");
        return;
    }
    let (Some(qemu), Some(launcher)) = (find_qemu(), nitrile_binary()) else {
        println!(
            "SKIPPED: needs qemu-system-x86_64 and the nitrile binary next to the tests (cargo build -p nitrile-cli)"
        );
        return;
    };
    let built = match nitrile_image::default_cache_dir()
        .map_err(|e| e.to_string())
        .and_then(|c| {
            nitrile_image::read_output(&nitrile_image::output_dir(&c)).map_err(|e| e.to_string())
        }) {
        Ok(b) => b,
        Err(e) => {
            println!("SKIPPED: no guest image (run scripts/guest-image.sh): {e}");
            return;
        }
    };
    let cell = TestCell::new().await;
    let store = nitrile_image::ImageStore::open(cell.layout.images_dir()).unwrap();
    let image = store
        .import(&built.kernel, &built.initramfs, &built.cmdline)
        .unwrap();
    let image = Sha256Hex::from_bytes(*image.digest().as_bytes());

    let mut setup = cell.default_setup();
    setup.hypervisor = HypervisorConfig {
        backend: BackendName::Qemu,
        qemu: Some(qemu),
        vsock_daemon: None,
        vmm: Some(launcher),
    };
    let mut config = cell.provision_host_config("h1", &setup);
    config.capacity.vcpus = Some(2);
    config.capacity.memory_mib = Some(1024);
    let config_path = cell.scratch("h1-config").join("hostd.toml");
    config.write(&config_path).unwrap();

    let keys = Arc::new(KmsKeySource::open(&cell.scratch("kms")));
    let relay_path = cell.scratch("relay").join("keys.sock");
    let listener = UnixListener::bind(&relay_path).unwrap();
    let relay_keys = Arc::clone(&keys);
    std::thread::spawn(move || serve_relay(listener, relay_keys));

    let mut planted = [0u8; 64];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut planted);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "claim3_hostd_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_CONFIG, &config_path)
        .env(CHILD_RELAY, &relay_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    writeln!(child.stdin.as_mut().unwrap(), "{}", hex::encode(planted)).unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = ChildGuard(child);
    let addr = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        loop {
            let line = lines.next().expect("the host agent ended").unwrap();
            // The test harness's own words may precede it on the line.
            if let Some(at) = line.find(LISTENING) {
                let addr = line[at + LISTENING.len()..].trim().to_owned();
                // Keep draining its output so it never blocks on a pipe.
                std::thread::spawn(move || for _ in lines {});
                return addr;
            }
        }
    })
    .await
    .unwrap();
    let mut host = Client::connect(&addr, &host_principal("h1"), cell.tls_for(PLACEMENT))
        .await
        .unwrap();

    // A volume, then a launch attaching it: its key sealed to the launcher
    // under the caller's volume.attach token.
    let create = AdminRequest::VolumeCreate(VolumeCreateRequest {
        volume: name("data"),
        size_mib: 16,
        kms_key: None,
        seed_image: None,
    });
    let token = cell.token_for(PLACEMENT, "h1", &create).await;
    let (status, body) = call_with(&mut host, &create, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let launch = AdminRequest::InstanceLaunch(LaunchRequest {
        instance: name("web1"),
        image,
        vcpus: 1,
        memory_mib: 256,
        volumes: vec![name("data")],
        scratch_mib: None,
        network: None,
    });
    let token = cell.token_for(PLACEMENT, "h1", &launch).await;
    let volume_token = cell.volume_token(PLACEMENT, "h1", &["data"]).await;
    let (status, body) = send_with(
        &mut host,
        launch.method(),
        &launch.path(),
        &launch.body(),
        Some(&token),
        Some(&volume_token),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let d: InstanceDescription = serde_json::from_slice(&body).unwrap();
    assert_eq!(d.state, InstanceState::Running);
    let calls = keys.calls();
    let ops: Vec<_> = calls.iter().map(|c| c.op).collect();
    assert_eq!(ops, ["generate", "unwrap"], "the key was not released");
    assert_eq!(calls[1].token, volume_token, "not the volume token");

    // The data key, from the key service's test-only export.
    let record_file = config.volume_store().join("data/volume.json");
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_file).unwrap()).unwrap();
    let wrapped = hex::decode(file["wrapped_key"].as_str().unwrap()).unwrap();
    let dek = keys.dek("data", &wrapped);

    let regions = readable_memory(pid);
    let total: usize = regions.iter().map(|(_, b)| b.len()).sum();
    println!(
        "read {total} bytes of the host agent's memory in {} regions",
        regions.len()
    );
    assert!(
        find(&regions, &planted).is_some(),
        "control: the planted value was not found; the scan cannot be trusted"
    );
    for (what, needle) in [
        ("the data key", dek.to_vec()),
        ("its first XTS half", dek[..32].to_vec()),
        ("its second XTS half", dek[32..].to_vec()),
        ("its hex text", hex::encode(dek).into_bytes()),
    ] {
        if let Some(region) = find(&regions, &needle) {
            panic!("{what} is in the host agent's memory, in {region}");
        }
    }

    // Terminate (the volume is detached), delete the volume (the key
    // service destroys the key); the agent then exits.
    let terminate = AdminRequest::InstanceTerminate(name("web1"));
    let token = cell.token_for(PLACEMENT, "h1", &terminate).await;
    let (status, body) = call_with(&mut host, &terminate, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(keys.has_volume("data"));
    let delete = AdminRequest::VolumeDelete(name("data"));
    let token = cell.token_for(PLACEMENT, "h1", &delete).await;
    let (status, body) = call_with(&mut host, &delete, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(!keys.has_volume("data"));
    assert!(!record_file.exists());
    drop(host);
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_without_a_key_service_is_refused_and_nothing_is_made() {
    let (Some(qemu), Some(launcher)) = (find_qemu(), nitrile_binary()) else {
        println!(
            "SKIPPED: needs qemu-system-x86_64 and the nitrile binary next to the tests (cargo build -p nitrile-cli)"
        );
        return;
    };
    let mut cell = TestCell::new().await;
    let mut setup = cell.default_setup();
    setup.hypervisor = HypervisorConfig {
        backend: BackendName::Qemu,
        qemu: Some(qemu),
        vsock_daemon: None,
        vmm: Some(launcher),
    };
    cell.start_host_with("h1", setup).await;
    let create = AdminRequest::VolumeCreate(VolumeCreateRequest {
        volume: name("data"),
        size_mib: 16,
        kms_key: None,
        seed_image: None,
    });
    let token = cell.token_for(PLACEMENT, "h1", &create).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &create, Some(&token)).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    let r = refusal(&body);
    assert_eq!(r.step, RefusalStep::State);
    assert!(r.reason.contains("key service"), "{}", r.reason);
    // The refusal is the request's journaled outcome.
    let records = journal_records(&cell.host_journal("h1"));
    let outcome = &records[usize::try_from(r.audit_seq.unwrap() - 1).unwrap()];
    assert_eq!(
        outcome.detail.as_ref().unwrap()["code"].as_str(),
        Some("no_key_service")
    );
    let state = &cell.host_config("h1").state;
    assert!(
        !cell.host_config("h1").volume_store().join("data").exists(),
        "a volume was made"
    );
    let _ = state;
}

/// A key service that makes keys but refuses to release any (a disabled
/// key, a token it does not accept).
struct RefusesRelease(KmsKeySource);

impl VolumeKeySource for RefusesRelease {
    fn generate(
        &self,
        volume: &Name,
        kms_key: &Name,
        token: &str,
    ) -> Result<WrappedVolumeKey, VolumeKeyError> {
        self.0.generate(volume, kms_key, token)
    }

    fn unwrap_sealed(
        &self,
        volume: &Name,
        _wrapped: &WrappedVolumeKey,
        _recipient: &RecipientPublicKey,
        _token: &str,
    ) -> Result<SealedKey, VolumeKeyError> {
        Err(VolumeKeyError::Refused(
            format!("kms-key/default is disabled; volume {volume} cannot be attached").into(),
        ))
    }

    fn destroy(&self, volume: &Name, token: &str) -> Result<(), VolumeKeyError> {
        self.0.destroy(volume, token)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_key_service_will_not_release_fails_the_launch_closed() {
    let (Some(qemu), Some(launcher)) = (find_qemu(), nitrile_binary()) else {
        println!(
            "SKIPPED: needs qemu-system-x86_64 and the nitrile binary next to the tests (cargo build -p nitrile-cli)"
        );
        return;
    };
    if !is_root() {
        println!("SKIPPED: needs root (QEMU's jail)");
        return;
    }
    let built = match nitrile_image::default_cache_dir()
        .map_err(|e| e.to_string())
        .and_then(|c| {
            nitrile_image::read_output(&nitrile_image::output_dir(&c)).map_err(|e| e.to_string())
        }) {
        Ok(b) => b,
        Err(e) => {
            println!("SKIPPED: no guest image (run scripts/guest-image.sh): {e}");
            return;
        }
    };
    let mut cell = TestCell::new().await;
    let store = nitrile_image::ImageStore::open(cell.layout.images_dir()).unwrap();
    let image = store
        .import(&built.kernel, &built.initramfs, &built.cmdline)
        .unwrap();
    let image = Sha256Hex::from_bytes(*image.digest().as_bytes());
    let mut setup = cell.default_setup();
    setup.hypervisor = HypervisorConfig {
        backend: BackendName::Qemu,
        qemu: Some(qemu),
        vsock_daemon: None,
        vmm: Some(launcher),
    };
    let keys = Arc::new(RefusesRelease(KmsKeySource::open(&cell.scratch("kms"))));
    setup.volume_keys = Some(keys.clone());
    cell.start_host_with("h1", setup).await;
    cell.create_volume(PLACEMENT, "h1", "data", 16).await;
    let launch = AdminRequest::InstanceLaunch(LaunchRequest {
        instance: name("web1"),
        image,
        vcpus: 1,
        memory_mib: 256,
        volumes: vec![name("data")],
        scratch_mib: Some(8),
        network: None,
    });
    let token = cell.token_for(PLACEMENT, "h1", &launch).await;
    let volume_token = cell.volume_token(PLACEMENT, "h1", &["data"]).await;
    let (status, body) = cell
        .call_with_volumes(PLACEMENT, "h1", &launch, Some(&token), Some(&volume_token))
        .await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    let r = refusal(&body);
    assert_eq!(r.step, RefusalStep::State);
    assert!(
        r.reason.contains("kms-key/default is disabled"),
        "{}",
        r.reason
    );
    let records = journal_records(&cell.host_journal("h1"));
    let outcome = &records[usize::try_from(r.audit_seq.unwrap() - 1).unwrap()];
    assert_eq!(
        outcome.detail.as_ref().unwrap()["code"].as_str(),
        Some("volume_key_refused")
    );
    // Nothing runs: the VM that waited for the key is gone with its
    // launcher, its instance-store disk and its volume were never made, and
    // the instance is recorded failed with the reason.
    let state = cell.host_config("h1").state.clone();
    assert!(!state.join("vms/web1").exists(), "the VM is left behind");
    assert!(!state.join("instances/web1/scratch.img").exists());
    assert!(
        !cell
            .host_config("h1")
            .volume_store()
            .join("data/disk.img")
            .exists()
    );
    let describe = AdminRequest::InstanceDescribe(name("web1"));
    let token = cell.token_for(PLACEMENT, "h1", &describe).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &describe, Some(&token)).await;
    assert_eq!(status, 200);
    let d: InstanceDescription = serde_json::from_slice(&body).unwrap();
    assert_eq!(d.state, InstanceState::Failed);
    assert!(
        d.reason.as_deref().unwrap_or_default().contains("disabled"),
        "{d:?}"
    );
    // Terminate detaches the volume; deleting it has the key service
    // destroy its key.
    let terminate = AdminRequest::InstanceTerminate(name("web1"));
    let token = cell.token_for(PLACEMENT, "h1", &terminate).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &terminate, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(keys.0.has_volume("data"));
    let delete = AdminRequest::VolumeDelete(name("data"));
    let token = cell.token_for(PLACEMENT, "h1", &delete).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &delete, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(!keys.0.has_volume("data"));
}
