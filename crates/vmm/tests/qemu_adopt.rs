//! The `qemu` backend's adoption: VMs outlive the backend (process) that
//! created them and a successor on the same state directory takes them over.
//!
//! Needs `qemu-system-x86_64` and the guest image, found as in `qemu.rs`.
//! Each test prints `SKIPPED: <reason>` and returns when one is missing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nitrile_vmm::{Hypervisor, QemuBackend, VmId, VmStatus, VmmError};

mod common;
use common::{BOOT_TIMEOUT, Env, KeyService, env, spec};

macro_rules! env_or_skip {
    () => {
        match env() {
            Ok(e) => e,
            Err(reason) => {
                println!("SKIPPED: {reason}");
                return;
            }
        }
    };
}

fn backend(env: &Env, state: &Path) -> QemuBackend {
    QemuBackend::new(state.join("vms"), &env.qemu, &env.launcher)
        .unwrap()
        .with_accel(env.accel)
}

/// Fields 6 (session) and 22 (start time) of `/proc/<pid>/stat`, and the
/// state letter, or `None` when there is no such process.
fn stat(pid: u32) -> Option<(char, i64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        f[0].chars().next()?,
        f[3].parse().ok()?,
        f[19].parse().ok()?,
    ))
}

/// Whether the process that had `pid` when `start` was read still runs.
fn alive(pid: u32, start: u64) -> bool {
    matches!(stat(pid), Some((state, _, s)) if s == start && state != 'Z' && state != 'X')
}

/// Waits (bounded) until that process is gone.
fn wait_gone(pid: u32, start: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if !alive(pid, start) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The adoption record of a VM, as JSON.
fn record(hv: &QemuBackend, id: &VmId) -> serde_json::Value {
    let path = hv.vm_dir(id).join(nitrile_vmm::qemu::RECORD_FILE);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Polls the serial file (tests only; the trait cannot read it) for a line.
fn wait_for_line(dir: &Path, marker: &str) -> bool {
    let serial = dir.join("serial.log");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while Instant::now() < deadline {
        let text = std::fs::read(&serial).unwrap_or_default();
        if String::from_utf8_lossy(&text)
            .lines()
            .any(|l| l.trim() == marker)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "serial output:\n{}",
        String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default())
    );
    false
}

fn cgroup_dir(instance: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup/nitrile").join(instance)
}

#[test]
fn qemu_vm_survives_its_backend_and_successors_adopt_start_and_stop_it() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&env, "adopt-1", None, None);
    let a = backend(&env, dir.path());
    let id = a.create(&spec).unwrap().id;
    let qemu_pid = a.qemu_pid(&id).expect("QEMU pid");
    let rec = record(&a, &id);
    let qemu_start = rec["qemu"]["start_time"].as_u64().unwrap();
    assert_eq!(rec["qemu"]["pid"].as_u64(), Some(u64::from(qemu_pid)));
    // The VMM is in a session of its own, not the spawner's.
    let (_, session, _) = stat(qemu_pid).unwrap();
    let (_, own_session, _) = stat(std::process::id()).unwrap();
    assert_ne!(session, own_session);
    let vm_dir = a.vm_dir(&id);
    a.detach_all();
    drop(a);
    assert!(alive(qemu_pid, qemu_start), "QEMU died with its backend");

    // A successor knows nothing until it adopts; the VM was never started.
    let b = backend(&env, dir.path());
    assert!(matches!(b.status(&id), Err(VmmError::UnknownVm(_))));
    assert_eq!(b.adopt(&spec).unwrap(), VmStatus::Created);
    assert!(matches!(b.adopt(&spec), Err(VmmError::AlreadyExists(_))));
    assert_eq!(b.qemu_pid(&id), Some(qemu_pid));
    // It drives the VM: the guest boots under the successor.
    b.start(&id).unwrap();
    assert!(
        wait_for_line(&vm_dir, "NITRILE-GUEST-IDLE"),
        "the adopted VM did not boot"
    );
    assert_eq!(b.status(&id).unwrap(), VmStatus::Running);
    b.detach_all();
    drop(b);
    assert!(alive(qemu_pid, qemu_start), "QEMU died with its successor");

    // A third backend adopts the running VM and stops it for good.
    let c = backend(&env, dir.path());
    assert_eq!(c.adopt(&spec).unwrap(), VmStatus::Running);
    let serial_len = std::fs::metadata(vm_dir.join("serial.log")).unwrap().len();
    assert!(serial_len > 0);
    c.stop(&id).unwrap();
    assert!(!alive(qemu_pid, qemu_start), "QEMU still runs after stop");
    assert_eq!(c.status(&id).unwrap(), VmStatus::Stopped);
    c.destroy(&id).unwrap();
    assert!(!vm_dir.exists());
    assert!(!cgroup_dir("adopt-1").exists());
    assert!(matches!(c.status(&id), Err(VmmError::UnknownVm(_))));
}

/// A VM with a volume (its key sealed to the launcher and supplied) and an
/// instance-store disk is adopted like any other: the successor controls
/// it, the disk stays while QEMU runs, and goes when the successor stops it.
#[test]
fn qemu_vm_with_keys_and_an_instance_store_is_adopted_and_its_disk_goes_at_stop() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("data.qcow2");
    let scratch = dir.path().join("scratch.img");
    let base = spec(&env, "adopt-keys", None, Some(&volume));
    let mut v: serde_json::Value = serde_json::from_slice(&base.to_json()).unwrap();
    v["scratch"] = serde_json::json!({ "path": scratch, "size_mib": 8 });
    let spec = nitrile_vmm::VmSpec::parse_json(&serde_json::to_vec(&v).unwrap()).unwrap();
    let mut keys = KeyService::new();
    keys.make("data");
    let a = backend(&env, dir.path());
    let created = a.create(&spec).unwrap();
    let id = created.id.clone();
    a.supply_keys(&id, keys.seal(&created)).unwrap();
    let qemu_pid = a.qemu_pid(&id).unwrap();
    let start = record(&a, &id)["qemu"]["start_time"].as_u64().unwrap();
    a.start(&id).unwrap();
    a.detach_all();
    drop(a);
    assert!(alive(qemu_pid, start), "QEMU died with its backend");
    assert!(scratch.exists() && volume.exists());

    let b = backend(&env, dir.path());
    assert_eq!(b.adopt(&spec).unwrap(), VmStatus::Running);
    assert!(scratch.exists(), "adoption removed a running VM's disk");
    b.stop(&id).unwrap();
    assert!(!alive(qemu_pid, start));
    assert!(
        !scratch.exists(),
        "the instance-store disk outlived the stop"
    );
    assert!(volume.exists(), "the volume went with the VM");
    b.destroy(&id).unwrap();
}

/// A backend that goes away while a launcher waits for its keys leaves no
/// QEMU behind: the launcher ends when its channel closes, and a successor
/// finds the VM dead (there is no record; the launcher's own last words are
/// the reason, if it had time to say them) and cleans up after it.
#[test]
fn qemu_launcher_waiting_for_keys_ends_with_its_backend() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("data.qcow2");
    let spec = spec(&env, "adopt-wait", None, Some(&volume));
    let a = backend(&env, dir.path());
    let created = a.create(&spec).unwrap();
    assert_eq!(a.status(&created.id).unwrap(), VmStatus::AwaitingKeys);
    let vm_dir = a.vm_dir(&created.id);
    a.detach_all();
    drop(a);
    let b = backend(&env, dir.path());
    // Dead either way: killed before it could say why, or gone saying that
    // its channel closed.
    let status = b.adopt(&spec).unwrap();
    assert!(
        match &status {
            VmStatus::Stopped => true,
            VmStatus::Failed { reason } => reason.contains("control channel was closed"),
            _ => false,
        },
        "{status:?}"
    );
    assert!(!vm_dir.exists());
    assert!(!cgroup_dir("adopt-wait").exists());
    assert!(!volume.exists(), "a volume was made without its key");
    b.destroy(&created.id).unwrap();
}

#[test]
fn qemu_backend_dropped_without_detach_still_stops_its_vms() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&env, "adopt-2", None, None);
    let a = backend(&env, dir.path());
    let id = a.create(&spec).unwrap().id;
    let pid = a.qemu_pid(&id).unwrap();
    let start = record(&a, &id)["qemu"]["start_time"].as_u64().unwrap();
    drop(a);
    assert!(
        !alive(pid, start),
        "QEMU outlived a backend that did not detach"
    );
}

#[test]
fn qemu_adopt_of_a_killed_vm_cleans_up_and_reports_stopped() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&env, "adopt-3", None, None);
    let a = backend(&env, dir.path());
    let id = a.create(&spec).unwrap().id;
    let pid = a.qemu_pid(&id).unwrap();
    let start = record(&a, &id)["qemu"]["start_time"].as_u64().unwrap();
    let vm_dir = a.vm_dir(&id);
    a.detach_all();
    drop(a);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_gone(pid, start));

    let b = backend(&env, dir.path());
    assert_eq!(b.adopt(&spec).unwrap(), VmStatus::Stopped);
    assert!(!vm_dir.exists(), "the dead VM's state directory is left");
    assert!(
        !cgroup_dir("adopt-3").exists(),
        "the dead VM's cgroup is left"
    );
    // It stays known as stopped until destroyed, like any stopped VM.
    assert_eq!(b.status(&id).unwrap(), VmStatus::Stopped);
    assert!(matches!(b.start(&id), Err(VmmError::WrongState { .. })));
    b.destroy(&id).unwrap();
    assert!(matches!(b.status(&id), Err(VmmError::UnknownVm(_))));
    // And its instance name can be used again.
    let id2 = b.create(&spec).unwrap().id;
    assert_eq!(b.status(&id2).unwrap(), VmStatus::Created);
    b.destroy(&id2).unwrap();
}

#[test]
fn qemu_adopt_of_an_unknown_instance_is_unknown_vm() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&env, dir.path());
    let spec = spec(&env, "adopt-never-created", None, None);
    assert!(matches!(b.adopt(&spec), Err(VmmError::UnknownVm(_))));
    // Still unknown: a failed adoption leaves nothing behind.
    assert!(matches!(
        b.status(&VmId::new(spec.instance().clone())),
        Err(VmmError::UnknownVm(_))
    ));
}

#[test]
fn qemu_adopt_never_takes_a_recycled_pid_for_the_vmm() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&env, "adopt-4", None, None);
    let a = backend(&env, dir.path());
    let id = a.create(&spec).unwrap().id;
    let pid = a.qemu_pid(&id).unwrap();
    let start = record(&a, &id)["qemu"]["start_time"].as_u64().unwrap();
    let record_path = a.vm_dir(&id).join(nitrile_vmm::qemu::RECORD_FILE);
    a.detach_all();
    drop(a);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_gone(pid, start));

    // An unrelated live process now has every recorded pid (as if the
    // kernel had recycled them); the recorded start times are QEMU's.
    let mut unrelated = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    fn repoint(v: &mut serde_json::Value, pid: u32) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m.iter_mut() {
                    if k == "pid" {
                        *v = pid.into();
                    } else {
                        repoint(v, pid);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|v| repoint(v, pid)),
            _ => {}
        }
    }
    repoint(&mut rec, unrelated.id());
    assert!(
        rec.to_string()
            .contains(&format!("\"pid\":{}", unrelated.id()))
    );
    std::fs::write(&record_path, rec.to_string()).unwrap();

    let b = backend(&env, dir.path());
    assert_eq!(b.adopt(&spec).unwrap(), VmStatus::Stopped);
    // The unrelated process got no signal and still runs.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        unrelated.try_wait().unwrap().is_none(),
        "sleep was signalled"
    );
    unrelated.kill().unwrap();
    unrelated.wait().unwrap();
    b.destroy(&VmId::new(spec.instance().clone())).unwrap();
}

#[test]
fn qemu_adopt_refuses_a_malformed_record() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&env, dir.path());
    let spec = spec(&env, "adopt-5", None, None);
    let vm_dir = b.vm_dir(&VmId::new(spec.instance().clone()));
    std::fs::create_dir_all(&vm_dir).unwrap();
    std::fs::write(
        vm_dir.join(nitrile_vmm::qemu::RECORD_FILE),
        br#"{"spawned":{"pid":1,"start_time":1},"qemu":null,"vsock":null,"debug":true}"#,
    )
    .unwrap();
    assert!(matches!(b.adopt(&spec), Err(VmmError::Record { .. })));
    // pid 1 was not touched, and the directory stays for inspection.
    assert!(vm_dir.exists());
}

#[test]
fn qemu_adopt_of_a_vm_whose_qemu_was_terminated_reports_qemus_own_reason() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&env, "adopt-6", None, None);
    let a = backend(&env, dir.path());
    let id = a.create(&spec).unwrap().id;
    let pid = a.qemu_pid(&id).unwrap();
    let start = record(&a, &id)["qemu"]["start_time"].as_u64().unwrap();
    a.detach_all();
    drop(a);
    // QEMU says on its standard error why it ends on SIGTERM.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(wait_gone(pid, start));

    let b = backend(&env, dir.path());
    let status = b.adopt(&spec).unwrap();
    assert!(
        matches!(&status, VmStatus::Failed { reason } if reason.contains("signal 15")),
        "{status:?}"
    );
    assert!(!b.vm_dir(&id).exists());
    b.destroy(&id).unwrap();
}

#[test]
fn qemu_adopt_without_a_record_kills_what_is_left_in_the_vms_cgroup() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(&env, "adopt-7", None, None);
    let a = backend(&env, dir.path());
    let id = a.create(&spec).unwrap().id;
    let pid = a.qemu_pid(&id).unwrap();
    let start = record(&a, &id)["qemu"]["start_time"].as_u64().unwrap();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    if !cgroup.contains("nitrile/adopt-7") {
        a.destroy(&id).unwrap();
        println!("SKIPPED: no per-VM cgroup on this host");
        return;
    }
    // As if the backend had died between starting QEMU and recording it.
    std::fs::remove_file(a.vm_dir(&id).join(nitrile_vmm::qemu::RECORD_FILE)).unwrap();
    a.detach_all();
    drop(a);
    assert!(alive(pid, start));

    let b = backend(&env, dir.path());
    assert_eq!(b.adopt(&spec).unwrap(), VmStatus::Stopped);
    assert!(wait_gone(pid, start), "the unrecorded QEMU still runs");
    assert!(!b.vm_dir(&id).exists());
    b.destroy(&id).unwrap();
}

/// The environment variable that turns the next test into the helper
/// process of `qemu_vm_survives_sigkill_of_the_process_that_created_it`.
const HELPER_ENV: &str = "NITRILE_TEST_ADOPT_HELPER_STATE";

/// Not a test on its own: when [`HELPER_ENV`] names a state directory, it
/// creates and starts a VM there, says so in `ready`, and waits to be killed.
#[test]
fn adopt_helper_creates_a_vm_and_waits_to_be_killed() {
    let Some(state) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let state = PathBuf::from(state);
    let env = env().unwrap();
    let hv = backend(&env, &state);
    let id = hv.create(&spec(&env, "adopt-8", None, None)).unwrap().id;
    hv.start(&id).unwrap();
    std::fs::write(state.join("ready"), hv.qemu_pid(&id).unwrap().to_string()).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn qemu_vm_survives_sigkill_of_the_process_that_created_it() {
    use std::os::unix::process::CommandExt as _;
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    // The creator runs in a process group of its own, as a service would.
    let mut creator = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "adopt_helper_creates_a_vm_and_waits_to_be_killed",
            "--nocapture",
        ])
        .env(HELPER_ENV, dir.path())
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = dir.path().join("ready");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while !ready.exists() {
        if Instant::now() > deadline || creator.try_wait().unwrap().is_some() {
            let _ = creator.kill();
            panic!("the creator process did not start its VM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid: u32 = std::fs::read_to_string(&ready).unwrap().parse().unwrap();
    let (_, _, start) = stat(pid).unwrap();
    // A terminal's Ctrl-C reaches the creator's whole process group, then
    // the creator is killed outright: no destructor runs.
    let group = nix::unistd::Pid::from_raw(-(creator.id() as i32));
    nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGINT).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(creator.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    creator.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        alive(pid, start),
        "QEMU died with the process that created it"
    );

    let spec = spec(&env, "adopt-8", None, None);
    let hv = backend(&env, dir.path());
    assert_eq!(hv.adopt(&spec).unwrap(), VmStatus::Running);
    let id = VmId::new(spec.instance().clone());
    assert!(wait_for_line(&hv.vm_dir(&id), "NITRILE-GUEST-IDLE"));
    hv.stop(&id).unwrap();
    assert!(!alive(pid, start), "QEMU still runs after stop");
    hv.destroy(&id).unwrap();
}
