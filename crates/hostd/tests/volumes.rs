//! Volumes as resources of the host admin API: create, describe, list,
//! attach, detach, delete over real mTLS with real tokens, the key service's
//! core standing in for `nitrile kms` (the key source records what the host
//! relayed). Each refusal is asserted with its journal record, and shown to
//! leave nothing in the volume store or the key service.
//!
//! The tests of this file run without a hypervisor, except
//! `a_volume_written_on_one_host_is_read_on_another`, which boots the
//! Debian guest under QEMU on two hosts sharing a volume store and prints
//! `SKIPPED: <reason>` without QEMU, root, the nitrile binary or the guest
//! image.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nitrile_api::admin::{
    AdminRequest, InstanceDescription, InstanceState, LaunchRequest, Sha256Hex,
    VolumeAttachRequest, VolumeCreateRequest, VolumeDescription, VolumeList, VolumeState,
};
use nitrile_api::wire::RefusalStep;
use nitrile_api::{Name, Operation};
use nitrile_audit::{AuditRecord, RecordKind};
use nitrile_hostd::{BackendName, HypervisorConfig};
use support::kms::KmsKeySource;
use support::{TestCell, is_root, journal_records, nitrile_binary, refusal};

mod support;

const ALICE: &str = "operator/alice";
const PLACEMENT: &str = "service/placement";

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn create(id: &str, size_mib: u64) -> AdminRequest {
    AdminRequest::VolumeCreate(VolumeCreateRequest {
        volume: name(id),
        size_mib,
        kms_key: None,
        seed_image: None,
    })
}

/// The journal record a refusal names.
fn record_of(cell: &TestCell, host: &str, body: &[u8]) -> AuditRecord {
    let r = refusal(body);
    let seq = r.audit_seq.expect("the refusal names its record");
    journal_records(&cell.host_journal(host))[usize::try_from(seq - 1).unwrap()].clone()
}

/// The code a refusal's journal record gives (a refusal record's reason
/// starts with it; a failed outcome's detail has it).
fn code_of(record: &AuditRecord) -> String {
    match record.kind {
        RecordKind::Refusal => record
            .reason
            .as_deref()
            .unwrap_or_default()
            .split(':')
            .next()
            .unwrap()
            .to_owned(),
        _ => record.detail.as_ref().unwrap()["code"]
            .as_str()
            .unwrap()
            .to_owned(),
    }
}

/// Every entry under `dir`, recursively.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(read) = std::fs::read_dir(dir) {
        for e in read.flatten() {
            out.push(e.path());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(entries(&e.path()));
            }
        }
    }
    out
}

async fn start(cell: &mut TestCell) -> Arc<KmsKeySource> {
    let keys = Arc::new(KmsKeySource::open(&cell.scratch("kms")));
    let mut setup = cell.default_setup();
    setup.volume_keys = Some(keys.clone());
    cell.start_host_with("h1", setup).await;
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_is_created_described_listed_and_crypto_erased() {
    let mut cell = TestCell::new().await;
    let keys = start(&mut cell).await;
    let store = cell.host_config("h1").volume_store();

    let req = create("data", 64);
    let token = cell.token_for(PLACEMENT, "h1", &req).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &req, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: VolumeDescription = serde_json::from_slice(&body).unwrap();
    assert_eq!(v.volume.as_str(), "data");
    assert_eq!((v.size_mib, v.kms_key.as_str()), (64, "default"));
    assert_eq!(
        (v.state, v.attachment.as_ref()),
        (VolumeState::Available, None)
    );
    // The key service made the key under the caller's own token, relayed;
    // the host keeps it only wrapped, and never answers with it.
    let calls = keys.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].op, calls[0].token.as_str()),
        ("generate", token.as_str())
    );
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("data/volume.json")).unwrap()).unwrap();
    let wrapped = hex::decode(record["wrapped_key"].as_str().unwrap()).unwrap();
    let dek = keys.dek("data", &wrapped);
    for f in entries(&store).into_iter().filter(|p| p.is_file()) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(64).any(|w| w == dek)
                && !bytes.windows(128).any(|w| w == hex::encode(dek).as_bytes()),
            "the data key is in {}",
            f.display()
        );
    }
    assert!(
        !String::from_utf8_lossy(&body).contains(record["wrapped_key"].as_str().unwrap()),
        "the answer carries the wrapped key"
    );

    // Again: the id is taken, and the key service is not asked.
    let token = cell.token_for(PLACEMENT, "h1", &req).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &req, Some(&token)).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(code_of(&record_of(&cell, "h1", &body)), "volume_exists");
    assert_eq!(keys.calls().len(), 1);

    // On-call reads metadata; it may not create, attach or delete.
    for req in [
        AdminRequest::VolumeDescribe(name("data")),
        AdminRequest::VolumeList,
    ] {
        let token = cell.token_for(ALICE, "h1", &req).await;
        let (status, body) = cell.call(ALICE, "h1", &req, Some(&token)).await;
        assert_eq!(status, 200, "{req:?}: {}", String::from_utf8_lossy(&body));
        if let AdminRequest::VolumeList = req {
            let l: VolumeList = serde_json::from_slice(&body).unwrap();
            assert_eq!(l.volumes, vec![v.clone()]);
        }
    }
    for op in [
        Operation::VolumeCreate,
        Operation::VolumeAttach,
        Operation::VolumeDelete,
    ] {
        let resp = cell
            .token_request(ALICE, &support::token_request(op, "volume/data", "h1"))
            .await;
        assert_eq!(resp.status.as_u16(), 403, "on-call got a {op} token");
    }

    // Attaching needs an instance of this host; detaching an attachment.
    let attach = AdminRequest::VolumeAttach(
        name("data"),
        VolumeAttachRequest {
            instance: name("web1"),
        },
    );
    let token = cell.token_for(PLACEMENT, "h1", &attach).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &attach, Some(&token)).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert_eq!(code_of(&record_of(&cell, "h1", &body)), "no_such_instance");
    let detach = AdminRequest::VolumeDetach(name("data"));
    let token = cell.token_for(PLACEMENT, "h1", &detach).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &detach, Some(&token)).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        code_of(&record_of(&cell, "h1", &body)),
        "volume_not_attached"
    );

    // Delete: the key service destroys the key, under the delete token,
    // before the record and directory go.
    let delete = AdminRequest::VolumeDelete(name("data"));
    let token = cell.token_for(PLACEMENT, "h1", &delete).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &delete, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let d: VolumeDescription = serde_json::from_slice(&body).unwrap();
    assert_eq!(d.state, VolumeState::Deleted);
    let last = keys.calls().pop().unwrap();
    assert_eq!((last.op, last.token.as_str()), ("destroy", token.as_str()));
    assert!(!keys.has_volume("data"), "the key service kept the key");
    assert!(!store.join("data").exists(), "the volume's files are left");
    // The wrapped key kept from before opens nothing any more.
    assert!(
        keys.try_dek("data", &wrapped).is_none(),
        "a wrapped key of a deleted volume still opens"
    );
    let describe = AdminRequest::VolumeDescribe(name("data"));
    let token = cell.token_for(PLACEMENT, "h1", &describe).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &describe, Some(&token)).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert_eq!(code_of(&record_of(&cell, "h1", &body)), "no_such_volume");
    // Deleting it again: nothing to delete, and the key service not asked.
    let token = cell.token_for(PLACEMENT, "h1", &delete).await;
    let calls = keys.calls().len();
    let (status, _) = cell.call(PLACEMENT, "h1", &delete, Some(&token)).await;
    assert_eq!(status, 404);
    assert_eq!(keys.calls().len(), calls);

    // Each executed call was journaled as a request before its outcome.
    let records = journal_records(&cell.host_journal("h1"));
    for op in [
        "volume.create",
        "volume.describe",
        "volume.list",
        "volume.delete",
    ] {
        assert!(
            records.iter().any(|r| r.kind == RecordKind::Request
                && r.operations.first().map(|o| o.as_str()) == Some(op)),
            "no request record for {op}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_service_refusal_or_a_missing_key_service_creates_nothing() {
    let mut cell = TestCell::new().await;
    let keys = start(&mut cell).await;
    let store = cell.host_config("h1").volume_store();
    // A key the key service does not have.
    let req = AdminRequest::VolumeCreate(VolumeCreateRequest {
        volume: name("data"),
        size_mib: 8,
        kms_key: Some(name("nope")),
        seed_image: None,
    });
    let token = cell.token_for(PLACEMENT, "h1", &req).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &req, Some(&token)).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        code_of(&record_of(&cell, "h1", &body)),
        "volume_key_refused"
    );
    assert!(refusal(&body).reason.contains("data"), "{body:?}");
    assert!(entries(&store).is_empty(), "{:?}", entries(&store));
    assert!(!keys.has_volume("data"));

    // A host agent without a key service has no volumes.
    let mut setup = cell.default_setup();
    setup.volume_keys = None;
    cell.start_host_with("h2", setup).await;
    let token = cell.token_for(PLACEMENT, "h2", &create("data", 8)).await;
    let (status, body) = cell
        .call(PLACEMENT, "h2", &create("data", 8), Some(&token))
        .await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(code_of(&record_of(&cell, "h2", &body)), "no_key_service");
    assert!(entries(&cell.host_config("h2").volume_store()).is_empty());
}

/// Bad input to every volume endpoint: a 4xx naming why, a journal record,
/// and nothing made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_to_every_volume_endpoint_is_a_journaled_4xx_that_makes_nothing() {
    let mut cell = TestCell::new().await;
    let keys = start(&mut cell).await;
    let store = cell.host_config("h1").volume_store();
    let long = "v".repeat(10 * 1024);
    let long_path = format!("/v1/volumes/{long}");
    let long_body = format!(r#"{{"volume":"{long}","size_mib":8}}"#);
    let cases: Vec<(&str, &str, String, u16)> = vec![
        (
            "POST",
            "/v1/volumes",
            r#"{"volume":"data","size_mib":8,"x":1}"#.into(),
            400,
        ),
        ("POST", "/v1/volumes", r#"{"volume":"data"}"#.into(), 400),
        (
            "POST",
            "/v1/volumes",
            r#"{"volume":"data","size_mib":0}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/volumes",
            r#"{"volume":"data","size_mib":"64M"}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/volumes",
            r#"{"volume":"data","size_mib":-1}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/volumes",
            format!(
                r#"{{"volume":"data","size_mib":{}}}"#,
                16u64 * 1024 * 1024 + 1
            ),
            400,
        ),
        (
            "POST",
            "/v1/volumes",
            r#"{"volume":"../etc","size_mib":8}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/volumes",
            r#"{"volume":"a\u0000b","size_mib":8}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/volumes",
            r#"{"volume":"Data","size_mib":8}"#.into(),
            400,
        ),
        ("POST", "/v1/volumes", long_body.clone(), 400),
        (
            "POST",
            "/v1/volumes",
            r#"{"volume":"data","size_mib":8,"kms_key":"../x"}"#.into(),
            400,
        ),
        ("POST", "/v1/volumes", "not json".into(), 400),
        ("PUT", "/v1/volumes", String::new(), 405),
        ("GET", "/v1/volumes/..", String::new(), 404),
        ("GET", "/v1/volumes/a%00b", String::new(), 404),
        ("GET", &long_path, String::new(), 404),
        (
            "DELETE",
            "/v1/volumes/../instances/web1",
            String::new(),
            404,
        ),
        ("POST", "/v1/volumes/data", String::new(), 405),
        ("POST", "/v1/volumes/data/attach", "{}".into(), 400),
        (
            "POST",
            "/v1/volumes/data/attach",
            r#"{"instance":"../x"}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/volumes/data/attach",
            r#"{"instance":"web1","host":"h2"}"#.into(),
            400,
        ),
        ("GET", "/v1/volumes/data/attach", String::new(), 405),
        (
            "POST",
            "/v1/volumes/data/detach",
            r#"{"force":true}"#.into(),
            400,
        ),
        (
            "DELETE",
            "/v1/volumes/data",
            r#"{"force":true}"#.into(),
            400,
        ),
        ("POST", "/v1/volumes/data/snapshot", String::new(), 404),
        ("GET", "/v1/volumes/data/contents", String::new(), 404),
    ];
    let journal = cell.host_journal("h1");
    for (method, path, body, status) in &cases {
        let before = journal_records(&journal).len();
        let (got, answer) = cell
            .call_raw(PLACEMENT, "h1", method, path, body.as_bytes(), None)
            .await;
        assert_eq!(
            got,
            *status,
            "{method} {}: {}",
            &path[..path.len().min(60)],
            String::from_utf8_lossy(&answer)
        );
        let r = refusal(&answer);
        assert_eq!(r.step, RefusalStep::Request, "{method} {path}");
        assert!(!r.reason.is_empty());
        let records = journal_records(&journal);
        assert_eq!(records.len(), before + 1, "{method} {path}: not journaled");
        assert_eq!(records[before].kind, RecordKind::Refusal);
        assert_eq!(Some(u64::try_from(before + 1).unwrap()), r.audit_seq);
    }
    assert!(entries(&store).is_empty(), "{:?}", entries(&store));
    assert!(keys.calls().is_empty(), "the key service was asked");
}

/// A launch or start with volumes carries the caller's volume.attach token
/// for each; the host refuses, journaled, before it asks the key service
/// for anything, when it is missing, for another volume or host, of
/// another caller, or used before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_volume_token_is_checked_before_anything_runs() {
    let mut cell = TestCell::new().await;
    let keys = start(&mut cell).await;
    cell.create_volume(PLACEMENT, "h1", "data", 8).await;
    let launch = AdminRequest::InstanceLaunch(LaunchRequest {
        instance: name("web1"),
        image: Sha256Hex::from_bytes([7; 32]),
        vcpus: 1,
        memory_mib: 128,
        volumes: vec![name("data")],
        scratch_mib: None,
        network: None,
    });
    let other_volume = cell.volume_token(PLACEMENT, "h1", &["logs"]).await;
    let other_host = cell.volume_token(PLACEMENT, "h2", &["data"]).await;
    let used = cell.volume_token(PLACEMENT, "h1", &["data"]).await;
    let cases: [(&str, Option<&str>, u16); 4] = [
        ("none", None, 401),
        ("another volume", Some(&other_volume), 403),
        ("another host", Some(&other_host), 403),
        ("garbage", Some("v4.public.not-a-token"), 401),
    ];
    for (what, volume_token, status) in cases {
        let token = cell.token_for(PLACEMENT, "h1", &launch).await;
        let (got, body) = cell
            .call_with_volumes(PLACEMENT, "h1", &launch, Some(&token), volume_token)
            .await;
        assert_eq!(got, status, "{what}: {}", String::from_utf8_lossy(&body));
        let r = refusal(&body);
        assert_eq!(r.step, RefusalStep::Token, "{what}");
        let record = record_of(&cell, "h1", &body);
        assert_eq!(record.kind, RecordKind::Refusal, "{what}");
        // The refusal names the volume grant it was asked for.
        assert_eq!(
            record.operations,
            [Operation::InstanceLaunch, Operation::VolumeAttach],
            "{what}"
        );
    }
    // Used once (the host has no hypervisor here, so the launch fails after
    // admission), then replayed.
    let token = cell.token_for(PLACEMENT, "h1", &launch).await;
    let (got, body) = cell
        .call_with_volumes(PLACEMENT, "h1", &launch, Some(&token), Some(&used))
        .await;
    assert_eq!(got, 500, "{}", String::from_utf8_lossy(&body));
    assert_eq!(refusal(&body).step, RefusalStep::Hypervisor);
    let token = cell.token_for(PLACEMENT, "h1", &launch).await;
    let (got, body) = cell
        .call_with_volumes(PLACEMENT, "h1", &launch, Some(&token), Some(&used))
        .await;
    assert_eq!(got, 401, "{}", String::from_utf8_lossy(&body));
    assert_eq!(code_of(&record_of(&cell, "h1", &body)), "replayed");
    // On-call may not even get one.
    let resp = cell
        .token_request(
            ALICE,
            &support::token_request(Operation::VolumeAttach, "volume/data", "h1"),
        )
        .await;
    assert_eq!(resp.status.as_u16(), 403);
    // Nothing was released, and the volume is still available.
    assert!(keys.calls().iter().all(|c| c.op == "generate"));
    let describe = AdminRequest::VolumeDescribe(name("data"));
    let token = cell.token_for(PLACEMENT, "h1", &describe).await;
    let (_, body) = cell.call(PLACEMENT, "h1", &describe, Some(&token)).await;
    let v: VolumeDescription = serde_json::from_slice(&body).unwrap();
    assert_eq!(v.state, VolumeState::Available, "{v:?}");
}

fn find_qemu() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    })
}

/// Waits until `serial` has a line equal to one of `markers`.
fn wait_for(serial: &Path, markers: &[&str], timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default()).into_owned();
        if let Some(m) = text
            .lines()
            .find_map(|l| markers.iter().find(|m| l.trim() == **m))
        {
            return Some((*m).to_owned());
        }
        if Instant::now() > deadline {
            println!("serial output:\n{text}");
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Two hosts share a volume store and the key service: a guest on h1 writes
/// a pattern to a volume, the volume is detached and attached to an
/// instance of h2, whose guest reads the pattern back; while it is there,
/// h1 can neither attach nor detach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_written_on_one_host_is_read_on_another() {
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
    let images = nitrile_image::ImageStore::open(cell.layout.images_dir()).unwrap();
    let import = |action: &str| {
        let cmdline = nitrile_image::Cmdline::new(&format!(
            "{} nitrile.test={action}",
            built.cmdline.as_str()
        ))
        .unwrap();
        let image = images
            .import(&built.kernel, &built.initramfs, &cmdline)
            .unwrap();
        Sha256Hex::from_bytes(*image.digest().as_bytes())
    };
    let (writer, reader) = (import("volume-write"), import("volume-read"));
    let keys = Arc::new(KmsKeySource::open(&cell.scratch("kms")));
    let shared = cell.scratch("volume-store");
    for host in ["h1", "h2"] {
        let mut setup = cell.default_setup();
        setup.hypervisor = HypervisorConfig {
            backend: BackendName::Qemu,
            qemu: Some(qemu.clone()),
            vsock_daemon: None,
            vmm: Some(launcher.clone()),
        };
        setup.volume_keys = Some(keys.clone());
        setup.volumes = Some(shared.clone());
        cell.start_host_with(host, setup).await;
    }
    cell.create_volume(PLACEMENT, "h1", "data", 16).await;
    // h2 sees the volume h1 made.
    let list = AdminRequest::VolumeList;
    let token = cell.token_for(PLACEMENT, "h2", &list).await;
    let (_, body) = cell.call(PLACEMENT, "h2", &list, Some(&token)).await;
    let l: VolumeList = serde_json::from_slice(&body).unwrap();
    assert_eq!(l.volumes.len(), 1, "{l:?}");

    let launch = |host: &'static str, instance: &'static str, image: Sha256Hex| {
        let cell = &cell;
        async move {
            let req = AdminRequest::InstanceLaunch(LaunchRequest {
                instance: name(instance),
                image,
                vcpus: 1,
                memory_mib: 128,
                volumes: vec![name("data")],
                scratch_mib: None,
                network: None,
            });
            let token = cell.token_for(PLACEMENT, host, &req).await;
            let volume_token = cell.volume_token(PLACEMENT, host, &["data"]).await;
            cell.call_with_volumes(PLACEMENT, host, &req, Some(&token), Some(&volume_token))
                .await
        }
    };
    let (status, body) = launch("h1", "w1", writer).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let serial = cell.host_config("h1").state.join("vms/w1/serial.log");
    assert_eq!(
        wait_for(
            &serial,
            &["NITRILE-VOLUME-WRITTEN", "NITRILE-VOLUME-NODISK"],
            Duration::from_secs(240)
        )
        .as_deref(),
        Some("NITRILE-VOLUME-WRITTEN")
    );
    // Attached to w1 on h1: h2 cannot take it.
    let (status, body) = launch("h2", "r1", reader).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(code_of(&record_of(&cell, "h2", &body)), "volume_attached");
    assert!(refusal(&body).reason.contains("h1"), "{body:?}");

    for req in [
        AdminRequest::InstanceStop(name("w1")),
        AdminRequest::VolumeDetach(name("data")),
    ] {
        let token = cell.token_for(PLACEMENT, "h1", &req).await;
        let (status, body) = cell.call(PLACEMENT, "h1", &req, Some(&token)).await;
        assert_eq!(status, 200, "{req:?}: {}", String::from_utf8_lossy(&body));
    }
    let stopped = AdminRequest::InstanceDescribe(name("w1"));
    let token = cell.token_for(PLACEMENT, "h1", &stopped).await;
    let (_, body) = cell.call(PLACEMENT, "h1", &stopped, Some(&token)).await;
    let d: InstanceDescription = serde_json::from_slice(&body).unwrap();
    assert!(
        d.volumes.is_empty() && d.state == InstanceState::Stopped,
        "{d:?}"
    );
    // A r1 on h2 that failed to launch above holds nothing; launch anew.
    let terminate = AdminRequest::InstanceTerminate(name("r1"));
    let token = cell.token_for(PLACEMENT, "h2", &terminate).await;
    let _ = cell.call(PLACEMENT, "h2", &terminate, Some(&token)).await;
    let (status, body) = launch("h2", "r2", reader).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let serial = cell.host_config("h2").state.join("vms/r2/serial.log");
    assert_eq!(
        wait_for(
            &serial,
            &[
                "NITRILE-VOLUME-OK",
                "NITRILE-VOLUME-MISSING",
                "NITRILE-VOLUME-NODISK"
            ],
            Duration::from_secs(240)
        )
        .as_deref(),
        Some("NITRILE-VOLUME-OK")
    );
    // On h2 now: h1 can neither attach it to w1 nor detach it.
    let attach = AdminRequest::VolumeAttach(
        name("data"),
        VolumeAttachRequest {
            instance: name("w1"),
        },
    );
    let token = cell.token_for(PLACEMENT, "h1", &attach).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &attach, Some(&token)).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(code_of(&record_of(&cell, "h1", &body)), "volume_attached");
    let detach = AdminRequest::VolumeDetach(name("data"));
    let token = cell.token_for(PLACEMENT, "h1", &detach).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &detach, Some(&token)).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(code_of(&record_of(&cell, "h1", &body)), "volume_elsewhere");
    // The ciphertext holds no line of the pattern, nor the key.
    let disk = std::fs::read(shared.join("data/disk.img")).unwrap();
    assert!(disk.len() > 1 << 20);
    for needle in ["NITRILE-PLAINTEXT-0\n", "NITRILE-PLAINTEXT-1000\n"] {
        assert!(
            !disk.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "plaintext in the volume's backing file"
        );
    }
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shared.join("data/volume.json")).unwrap()).unwrap();
    let dek = keys.dek(
        "data",
        &hex::decode(record["wrapped_key"].as_str().unwrap()).unwrap(),
    );
    assert!(!disk.windows(64).any(|w| w == dek), "the key on disk");
    for host in ["h1", "h2"] {
        for instance in ["w1", "r2"] {
            let req = AdminRequest::InstanceTerminate(name(instance));
            let token = cell.token_for(PLACEMENT, host, &req).await;
            let _ = cell.call(PLACEMENT, host, &req, Some(&token)).await;
        }
    }
}

/// A volume seeded from an image: refused, journaled and nothing made when
/// the image is not in the store, has no root disk, or its root disk is
/// another size; made (with the seed recorded) when it fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_image_must_have_a_root_disk_of_the_volumes_size() {
    let mut cell = TestCell::new().await;
    let keys = start(&mut cell).await;
    let store = cell.host_config("h1").volume_store();
    let images = nitrile_image::ImageStore::open(cell.host_config("h1").images.clone()).unwrap();
    let dir = cell.scratch("seed-inputs");
    std::fs::create_dir_all(&dir).unwrap();
    let mut kernel = b"\x7fELF\x02\x01\x01".to_vec();
    kernel.resize(8192, 0);
    std::fs::write(dir.join("vmlinux"), &kernel).unwrap();
    std::fs::write(dir.join("initramfs"), b"initramfs").unwrap();
    std::fs::write(dir.join("root.img"), vec![9u8; 2 << 20]).unwrap();
    let cmdline = nitrile_image::Cmdline::new("console=ttyS0").unwrap();
    let plain = images
        .import(&dir.join("vmlinux"), &dir.join("initramfs"), &cmdline)
        .unwrap();
    let rooted = images
        .import_with_root_disk(
            &dir.join("vmlinux"),
            &dir.join("initramfs"),
            &cmdline,
            Some(&dir.join("root.img")),
        )
        .unwrap();
    let hex = |d: nitrile_image::Digest| -> Sha256Hex { d.to_hex().parse().unwrap() };
    let seeded = |id: &str, size_mib: u64, image: Sha256Hex| {
        AdminRequest::VolumeCreate(VolumeCreateRequest {
            volume: name(id),
            size_mib,
            kms_key: None,
            seed_image: Some(image),
        })
    };
    for (req, status, code) in [
        (
            seeded("v1", 2, hex(nitrile_image::Digest::of(b"none"))),
            409,
            "unknown_image",
        ),
        (seeded("v2", 2, hex(plain.digest())), 400, "bad_seed"),
        (seeded("v3", 3, hex(rooted.digest())), 400, "bad_seed"),
    ] {
        let token = cell.token_for(PLACEMENT, "h1", &req).await;
        let (got, body) = cell.call(PLACEMENT, "h1", &req, Some(&token)).await;
        assert_eq!(got, status, "{}", String::from_utf8_lossy(&body));
        assert_eq!(code_of(&record_of(&cell, "h1", &body)), code);
        assert!(entries(&store).is_empty(), "{:?}", entries(&store));
    }
    assert!(!keys.has_volume("v1") && !keys.has_volume("v2") && !keys.has_volume("v3"));

    let req = seeded("v4", 2, hex(rooted.digest()));
    let token = cell.token_for(PLACEMENT, "h1", &req).await;
    let (got, body) = cell.call(PLACEMENT, "h1", &req, Some(&token)).await;
    assert_eq!(got, 200, "{}", String::from_utf8_lossy(&body));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("v4/volume.json")).unwrap()).unwrap();
    assert_eq!(record["seed_image"], rooted.digest().to_hex());
    // The host wrote no disk: the VMM that first opens the volume does.
    assert!(!store.join("v4/disk.img").exists());
}
