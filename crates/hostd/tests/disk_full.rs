//! Fail closed when the journal cannot be written: the host agent's state
//! directory on a 2 MiB tmpfs that is then filled. Every admitted request is
//! refused with 503 at step `journal` and nothing runs (the drain flag and an
//! instance's record, wrapped keys, key service record and volumes stay as
//! they were); once space returns, calls succeed and are journaled, and the
//! journal verifies.
//!
//! Needs root (to mount); prints `SKIPPED: <reason>` otherwise.

mod support;

use std::io::Write as _;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nitrile_api::admin::{
    AdminRequest, AttachedVolume, Health, HostDescription, InstanceDescription, InstanceState,
    PlacementState, Sha256Hex,
};
use nitrile_api::wire::{RefusalStep, TokenResponse};
use nitrile_api::{Name, Operation};
use nitrile_audit::{RecordKind, format_time, verify_journal};
use nitrile_hostd::volume_keys::VolumeKeySource as _;
use nitrile_hostd::{BackendName, HypervisorConfig};
use nitrile_token::Clock;
use support::kms::KmsKeySource;
use support::{TestCell, TmpfsMount, journal_records, nitrile_binary, refusal, token_request};

const ALICE: &str = "operator/alice";
const PLACEMENT: &str = "service/placement";

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

/// A token for `req` at h1 and its id.
async fn token_with_id(cell: &TestCell, who: &str, req: &AdminRequest) -> (String, String) {
    let resource = req.resource(&name("h1")).to_string();
    let resp = cell
        .token_request(who, &token_request(req.operation(), &resource, "h1"))
        .await;
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
    let t: TokenResponse = resp.json().unwrap();
    (t.token, t.token_id)
}

async fn describe(cell: &TestCell) -> (u16, bytes::Bytes) {
    let req = AdminRequest::HostDescribe;
    let token = cell.token_for(ALICE, "h1", &req).await;
    cell.call(ALICE, "h1", &req, Some(&token)).await
}

fn host_description(body: &[u8]) -> HostDescription {
    serde_json::from_slice(body).unwrap()
}

/// Plants a stopped instance `web1` with a volume (its key made by `keys`
/// and kept wrapped), as a launch and a stop would have left them.
fn plant_stopped_instance(
    state: &Path,
    now: time::OffsetDateTime,
    keys: &KmsKeySource,
) -> (PathBuf, PathBuf, PathBuf) {
    let private = |p: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(p)
            .unwrap();
    };
    let dir = state.join("instances").join("web1");
    private(&dir);
    let record = InstanceDescription {
        instance: name("web1"),
        host: name("h1"),
        image: Sha256Hex::from_bytes([7; 32]),
        vcpus: 1,
        memory_mib: 64,
        volumes: vec![AttachedVolume {
            id: name("data"),
            size_mib: 1,
        }],
        scratch_mib: None,
        network: None,
        state: InstanceState::Stopped,
        reason: None,
        launched_at: format_time(now),
        updated_at: format_time(now),
    };
    let record_path = dir.join("instance.json");
    std::fs::write(&record_path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
    // Its volume, in the volume store (the default, under the state
    // directory), attached to it.
    let wrapped = keys
        .generate(&name("data"), &name("default"), "create-token")
        .unwrap();
    let volume = state.join("volume-store").join("data");
    private(&volume);
    let keys_path = volume.join("volume.json");
    let file = serde_json::json!({
        "volume": "data",
        "size_mib": 1,
        "kms_key": "default",
        "format": "luks",
        "wrapped_key": hex::encode(wrapped.as_bytes()),
        "attachment": { "host": "h1", "instance": "web1" },
        "created_at": format_time(now),
    });
    nitrile_fs::write_atomic(&keys_path, &serde_json::to_vec(&file).unwrap(), 0o600).unwrap();
    std::fs::write(volume.join("disk.img"), vec![0xc3u8; 64 * 1024]).unwrap();
    (record_path, keys_path, volume)
}

/// Fills the filesystem of `dir` with one file; returns it.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    // Whatever a smaller write can still take, too.
    while f.write_all(&[0u8; 64]).is_ok() {}
    let _ = f.sync_all();
    filler
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_requests_refused_with_503_nothing_runs_and_service_recovers() {
    let mut cell = TestCell::new().await;
    let mount_point = cell.scratch("h1-state");
    let mount = match TmpfsMount::mount(&mount_point, "2m") {
        Ok(m) => m,
        Err(reason) => {
            println!("SKIPPED: {reason}");
            return;
        }
    };
    let state = mount.path().to_owned();
    let now = cell.clock.now();
    let keys = Arc::new(KmsKeySource::open(&cell.scratch("kms")));
    let (record_path, keys_path, volumes_dir) = plant_stopped_instance(&state, now, &keys);
    let record_before = std::fs::read(&record_path).unwrap();
    let keys_before = std::fs::read(&keys_path).unwrap();

    let mut setup = cell.default_setup();
    setup.state = Some(state.clone());
    setup.volume_keys = Some(keys.clone());
    let qemu = find_qemu().zip(nitrile_binary());
    if let Some((q, launcher)) = &qemu {
        // Terminating a stopped instance needs a hypervisor (to make sure
        // its VM is gone); no VM is ever started here.
        setup.hypervisor = HypervisorConfig {
            backend: BackendName::Qemu,
            qemu: Some(q.clone()),
            vsock_daemon: None,
            vmm: Some(launcher.clone()),
        };
    }
    cell.start_host_with("h1", setup).await;
    let journal = cell.host_journal("h1");
    assert!(journal.starts_with(&state));

    let (status, body) = describe(&cell).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(host_description(&body).placement, PlacementState::Accepting);

    // Fill the filesystem. The journal's last page may still take a few
    // records: keep describing until the journal is out of room. Every call
    // answered before that is journaled.
    let filler = fill(&state);
    let mut answer = describe(&cell).await;
    let mut served = 0;
    while answer.0 == 200 && served < 64 {
        served += 1;
        answer = describe(&cell).await;
    }
    assert_eq!(answer.0, 503, "{}", String::from_utf8_lossy(&answer.1));
    let r = refusal(&answer.1);
    assert_eq!(r.step, RefusalStep::Journal);
    assert_eq!(r.audit_seq, None);
    let records_when_full = journal_records(&journal).len();

    // A mutation of the host: refused, not executed.
    let drain = AdminRequest::HostDrain;
    let (token, drain_token_id) = token_with_id(&cell, ALICE, &drain).await;
    let (status, body) = cell.call(ALICE, "h1", &drain, Some(&token)).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(refusal(&body).step, RefusalStep::Journal);

    // A mutation of an instance: refused, not executed.
    let terminate = AdminRequest::InstanceTerminate(name("web1"));
    let (token, terminate_token_id) = token_with_id(&cell, PLACEMENT, &terminate).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &terminate, Some(&token)).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(refusal(&body).step, RefusalStep::Journal);

    // Reads too.
    let (status, body) = describe(&cell).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    // A refusal that cannot be journaled is still a refusal; it names no
    // record.
    let (status, body) = cell.call(ALICE, "h1", &drain, None).await;
    assert_eq!(status, 401);
    let r = refusal(&body);
    assert_eq!((r.step, r.audit_seq), (RefusalStep::Token, None));

    // Nothing of that is in the journal, and nothing ran.
    let records = journal_records(&journal);
    assert_eq!(records.len(), records_when_full);
    for id in [&drain_token_id, &terminate_token_id] {
        assert!(
            records
                .iter()
                .all(|r| r.token_id.as_deref() != Some(id.as_str())),
            "a refused request was journaled"
        );
    }
    let host_file = state.join("host.json");
    if let Ok(text) = std::fs::read_to_string(&host_file) {
        assert!(!text.contains("drained"), "drain ran: {text}");
    }
    assert_eq!(std::fs::read(&record_path).unwrap(), record_before);
    assert_eq!(std::fs::read(&keys_path).unwrap(), keys_before);
    assert!(keys.has_volume("data"), "the key service destroyed the key");
    assert!(volumes_dir.join("disk.img").exists());

    // Space returns: the service recovers.
    std::fs::remove_file(&filler).unwrap();
    let (status, body) = describe(&cell).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let described = host_description(&body);
    assert_eq!(described.placement, PlacementState::Accepting, "drain ran");
    assert_eq!(described.health.journal, Health::Ok);

    let desc = AdminRequest::InstanceDescribe(name("web1"));
    let token = cell.token_for(ALICE, "h1", &desc).await;
    let (status, body) = cell.call(ALICE, "h1", &desc, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let instance: InstanceDescription = serde_json::from_slice(&body).unwrap();
    assert_eq!(instance.state, InstanceState::Stopped);

    let (token, _) = token_with_id(&cell, ALICE, &drain).await;
    let (status, body) = cell.call(ALICE, "h1", &drain, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(host_description(&body).placement, PlacementState::Drained);
    assert!(
        std::fs::read_to_string(&host_file)
            .unwrap()
            .contains("drained")
    );

    let (token, _) = token_with_id(&cell, PLACEMENT, &terminate).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &terminate, Some(&token)).await;
    if qemu.is_some() {
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let instance: InstanceDescription = serde_json::from_slice(&body).unwrap();
        assert_eq!(instance.state, InstanceState::Terminated);
        assert!(instance.volumes.is_empty(), "{instance:?}");
        // Terminating detaches the volume; it stays, encrypted, until a
        // volume.delete erases it.
        assert!(keys.has_volume("data"), "terminate destroyed the key");
        assert!(keys.calls().iter().all(|c| c.op != "destroy"));
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&keys_path).unwrap()).unwrap();
        assert_eq!(record["attachment"], serde_json::Value::Null, "{record}");
        assert!(volumes_dir.join("disk.img").exists());
    } else {
        // Admitted and journaled; without a hypervisor it cannot run.
        assert_eq!(status, 500, "{}", String::from_utf8_lossy(&body));
        assert_eq!(refusal(&body).step, RefusalStep::Hypervisor);
    }

    // The calls after recovery are journaled, request then outcome.
    let records = journal_records(&journal);
    let after: Vec<_> = records[records_when_full..]
        .iter()
        .map(|r| (r.kind, r.operations.clone()))
        .collect();
    let expect = |op| {
        [
            (RecordKind::Request, vec![op]),
            (RecordKind::Outcome, vec![op]),
        ]
    };
    let mut expected = Vec::new();
    for op in [
        Operation::HostDescribe,
        Operation::InstanceDescribe,
        Operation::HostDrain,
        Operation::InstanceTerminate,
    ] {
        expected.extend(expect(op));
    }
    assert_eq!(after, expected);

    cell.stop_host("h1").await;
    // The one refusal that could not be journaled is counted in the metrics
    // (written at exit), and the journal is healthy again.
    let metrics = std::fs::read_to_string(state.join("metrics.prom")).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "nitrile_hostd_refusal_journal_failures_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "nitrile_hostd_journal_ok 1"),
        "{metrics}"
    );
    let report = verify_journal(&journal).unwrap();
    assert_eq!(report.records, records.len() as u64);
    drop(mount);
}
