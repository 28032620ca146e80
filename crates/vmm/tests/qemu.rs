//! The `qemu` backend with the Debian guest image: boot, encrypted volumes,
//! sealed keys opened by the launcher, the instance store, and the jail.
//!
//! Needs `qemu-system-x86_64`, the `nitrile` binary (the launcher: built
//! next to the tests by `cargo build -p nitrile-cli`, or `NITRILE_BIN`) and
//! the guest image from `scripts/guest-image.sh` (found through
//! `NITRILE_TEST_KERNEL` and `NITRILE_TEST_INITRAMFS`, else in
//! `$NITRILE_CACHE_DIR`, else `${XDG_CACHE_HOME:-$HOME/.cache}/nitrile`,
//! under `guest-image/out`). Each test prints `SKIPPED: <reason>` and
//! returns when one is missing.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nitrile_api::Name;
use nitrile_vmm::{
    Hypervisor, JailConfig, QemuBackend, SealedVolumeKeys, VmId, VmSpec, VmStatus, VmmError,
};

mod common;
use common::{BOOT_TIMEOUT, Env, KeyService, READY, env, spec};

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

/// Creates the VM of `spec`, has `keys` seal its volumes' keys to the
/// launcher's recipients and supplies them.
fn bring_up(hv: &QemuBackend, spec: &VmSpec, keys: &KeyService) -> Result<VmId, VmmError> {
    let created = hv.create(spec)?;
    if !created.recipients.is_empty() {
        hv.supply_keys(&created.id, keys.seal(&created))?;
    }
    Ok(created.id)
}

/// `spec` with an instance-store disk at `path`.
fn with_scratch(spec: &VmSpec, path: &Path, size_mib: u64) -> VmSpec {
    let mut v: serde_json::Value = serde_json::from_slice(&spec.to_json()).unwrap();
    v["scratch"] = serde_json::json!({ "path": path, "size_mib": size_mib });
    VmSpec::parse_json(&serde_json::to_vec(&v).unwrap()).unwrap()
}

/// Polls the serial file (the test reads it directly; the trait cannot)
/// until a line equal to one of `markers` appears or the VM ends.
fn wait_for(hv: &QemuBackend, id: &VmId, markers: &[&str]) -> Option<String> {
    let serial = hv.vm_dir(id).join("serial.log");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let find = || {
        let text = std::fs::read(&serial).unwrap_or_default();
        let text = String::from_utf8_lossy(&text).into_owned();
        let found = text
            .lines()
            .find_map(|line| markers.iter().find(|m| line.trim() == **m))
            .map(|m| (*m).to_owned());
        (found, text)
    };
    loop {
        let status = hv.status(id).unwrap();
        // Read after the status, so a marker printed just before the guest
        // powered off is still seen.
        let (found, text) = find();
        if found.is_some() {
            return found;
        }
        if Instant::now() > deadline
            || matches!(status, VmStatus::Stopped | VmStatus::Failed { .. })
        {
            println!("serial output:\n{text}\nstatus: {status:?}");
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn qemu_boots_debian_kernel_to_guest_marker_inside_the_jail() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let hv = backend(&env, dir.path());
    let t0 = Instant::now();
    let created = hv.create(&spec(&env, "boot-1", None, None)).unwrap();
    assert!(created.recipients.is_empty());
    let id = created.id;
    assert_eq!(hv.status(&id).unwrap(), VmStatus::Created);
    // The jail is in place before the guest runs (the guest powers off on
    // its own soon after its marker, so check it now).
    let pid = hv.qemu_pid(&id).expect("QEMU pid");
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
    // Unprivileged uid and gid.
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );
    let gid_line = status.lines().find(|l| l.starts_with("Gid:")).unwrap();
    assert!(
        gid_line.split_whitespace().skip(1).all(|g| g == "65534"),
        "{gid_line}"
    );
    // Non-dumpable: /proc/<pid>/mem stays owned by root although QEMU runs as 65534.
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(std::fs::metadata(proc_dir.join("mem")).unwrap().uid(), 0);
    // Not even QEMU's own uid can open its memory; the same open works on
    // an ordinary process of that uid (so this check can fail).
    let open_mem_as_65534 = |pid: u32| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3< /proc/{pid}/mem"))
            .uid(65534)
            .gid(65534)
            .status()
            .unwrap()
            .success()
    };
    let mut control = std::process::Command::new("sleep")
        .arg("30")
        .uid(65534)
        .gid(65534)
        .spawn()
        .unwrap();
    assert!(
        open_mem_as_65534(control.id()),
        "control: open of an ordinary process's mem failed"
    );
    control.kill().unwrap();
    control.wait().unwrap();
    assert!(!open_mem_as_65534(pid), "uid 65534 opened /proc/<qemu>/mem");
    // No core files.
    let limits = std::fs::read_to_string(proc_dir.join("limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    // Chrooted into an empty directory of the VM's state directory.
    let root = std::fs::read_link(proc_dir.join("root")).unwrap();
    assert_eq!(root, hv.vm_dir(&id).join("root"));
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    // Own namespaces.
    for ns in ["mnt", "ipc", "net", "pid", "uts"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let theirs = std::fs::read_link(proc_dir.join("ns").join(ns)).unwrap();
        assert_ne!(ours, theirs, "{ns} namespace is shared with the host");
    }
    // Own cgroup (when the host lets us create one).
    let cgroups = std::fs::read_to_string(proc_dir.join("cgroup")).unwrap();
    if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        || Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    {
        assert!(cgroups.contains("nitrile/boot-1"), "{cgroups}");
        let limit = [
            "memory/nitrile/boot-1/memory.limit_in_bytes",
            "nitrile/boot-1/memory.max",
        ]
        .iter()
        .find_map(|f| std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(f)).ok())
        .expect("memory limit file");
        let expected = (256 + nitrile_vmm::qemu::QEMU_OVERHEAD_MIB) << 20;
        assert_eq!(limit.trim(), expected.to_string());
    }
    // The serial file is private to root.
    use std::os::unix::fs::PermissionsExt as _;
    let serial = std::fs::metadata(hv.vm_dir(&id).join("serial.log")).unwrap();
    assert_eq!(serial.permissions().mode() & 0o777, 0o600);
    assert_eq!(serial.uid(), 0);

    let t1 = Instant::now();
    hv.start(&id).unwrap();
    assert_eq!(wait_for(&hv, &id, &[READY]).as_deref(), Some(READY));
    println!("create {:?}, start to {READY} {:?}", t1 - t0, t1.elapsed());

    let t2 = Instant::now();
    hv.stop(&id).unwrap();
    println!("stop {:?}", t2.elapsed());
    assert_eq!(hv.status(&id).unwrap(), VmStatus::Stopped);
    assert!(matches!(hv.start(&id), Err(VmmError::WrongState { .. })));
    hv.destroy(&id).unwrap();
    assert!(!hv.vm_dir(&id).exists());
    assert!(!proc_dir.exists(), "QEMU still running after destroy");
}

#[test]
fn qemu_volume_written_by_guest_reads_back_after_restart_and_holds_no_plaintext() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let hv = backend(&env, dir.path());
    let volume = dir.path().join("data.qcow2");
    let mut keys = KeyService::new();
    keys.make("data");
    let dek = keys.dek("data");
    let b64 = base64::engine::general_purpose::STANDARD.encode(dek);

    let s = spec(&env, "vol-1", Some("volume-write"), Some(&volume));
    let created = hv.create(&s).unwrap();
    let id = created.id.clone();
    // The launcher waits for its keys: no QEMU, no volume yet.
    assert_eq!(created.recipients.len(), 1);
    assert_eq!(created.recipients[0].volume.as_str(), "data");
    assert_eq!(hv.status(&id).unwrap(), VmStatus::AwaitingKeys);
    assert!(hv.qemu_pid(&id).is_none());
    assert!(
        !volume.exists(),
        "the volume was made before its key was open"
    );
    assert!(matches!(
        hv.start(&id),
        Err(VmmError::WrongState {
            state: VmStatus::AwaitingKeys,
            ..
        })
    ));
    hv.supply_keys(&id, keys.seal(&created)).unwrap();
    assert_eq!(hv.status(&id).unwrap(), VmStatus::Created);
    // The key is nowhere in QEMU's command line or environment.
    let pid = hv.qemu_pid(&id).expect("QEMU pid");
    for file in ["cmdline", "environ"] {
        let bytes = std::fs::read(format!("/proc/{pid}/{file}")).unwrap();
        assert!(!contains(&bytes, b64.as_bytes()), "key in /proc/pid/{file}");
        assert!(!contains(&bytes, &dek), "raw key in /proc/pid/{file}");
    }
    // Control: the command line was read (it names the secret objects).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(contains(&cmdline, b"secret,id=sec0"));
    hv.start(&id).unwrap();
    let written = wait_for(
        &hv,
        &id,
        &["NITRILE-VOLUME-WRITTEN", "NITRILE-VOLUME-NODISK"],
    );
    assert_eq!(written.as_deref(), Some("NITRILE-VOLUME-WRITTEN"));
    hv.destroy(&id).unwrap();

    // A new VM, a new launcher with new recipients: the same key opens.
    let s = spec(&env, "vol-1", Some("volume-read"), Some(&volume));
    let created = hv.create(&s).unwrap();
    hv.supply_keys(&created.id, keys.seal(&created)).unwrap();
    let id = created.id;
    hv.start(&id).unwrap();
    let read = wait_for(
        &hv,
        &id,
        &[
            "NITRILE-VOLUME-OK",
            "NITRILE-VOLUME-MISSING",
            "NITRILE-VOLUME-NODISK",
        ],
    );
    assert_eq!(read.as_deref(), Some("NITRILE-VOLUME-OK"));
    hv.destroy(&id).unwrap();

    let file = std::fs::read(&volume).unwrap();
    assert!(file.len() > 1 << 20, "volume file suspiciously small");
    assert!(!contains(&file, b"NITRILE-PLAINTEXT"), "plaintext on disk");
    assert!(!contains(&file, b64.as_bytes()) && !contains(&file, &dek));
    // Nothing the backend keeps holds the key either.
    for entry in walk(&dir.path().join("vms")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !contains(&bytes, &dek) && !contains(&bytes, b64.as_bytes()),
            "key in {}",
            entry.display()
        );
    }
}

/// Every regular file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(walk(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn qemu_volume_with_another_key_does_not_open() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let hv = backend(&env, dir.path());
    let volume = dir.path().join("data.qcow2");
    let mut keys = KeyService::new();
    keys.make("data");

    // Supplying the keys creates the volume (LUKS header under the first
    // key); the guest need not run for the header to be there.
    let id = bring_up(&hv, &spec(&env, "wrong-1", None, Some(&volume)), &keys).unwrap();
    hv.destroy(&id).unwrap();
    assert!(volume.exists());

    // The key service now holds another key for the volume.
    keys.make("data");
    match bring_up(
        &hv,
        &spec(&env, "wrong-1", Some("volume-read"), Some(&volume)),
        &keys,
    ) {
        Err(VmmError::VmmExited { stderr, .. }) => {
            println!("QEMU refused the other key: {stderr}");
            assert!(
                !hv.vm_dir(&VmId::new(Name::new("wrong-1").unwrap()))
                    .exists()
            );
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(id) => {
            hv.start(&id).unwrap();
            let read = wait_for(&hv, &id, &["NITRILE-VOLUME-OK", "NITRILE-VOLUME-MISSING"]);
            assert_ne!(read.as_deref(), Some("NITRILE-VOLUME-OK"));
            hv.destroy(&id).unwrap();
        }
    }
}

#[test]
fn qemu_launcher_refuses_keys_sealed_to_anyone_else_and_mismatched_key_sets() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let hv = backend(&env, dir.path());
    let volume = dir.path().join("data.qcow2");
    let mut keys = KeyService::new();
    keys.make("data");
    keys.make("other");
    let s = spec(&env, "refuse-1", None, Some(&volume));
    let created = hv.create(&s).unwrap();
    let id = created.id.clone();
    assert!(matches!(
        hv.supply_keys(&id, SealedVolumeKeys::new()),
        Err(VmmError::MissingKey(_))
    ));
    let mut extra = keys.seal(&created);
    let stranger = nitrile_vmm::unlock::Recipient::generate().unwrap();
    let mut other = created.clone();
    other.recipients[0].volume = Name::new("other").unwrap();
    other.recipients[0].key = stranger.public_key().clone();
    extra.insert(
        Name::new("other").unwrap(),
        keys.seal(&other)
            .get(&Name::new("other").unwrap())
            .unwrap()
            .clone(),
    );
    assert!(matches!(
        hv.supply_keys(&id, extra),
        Err(VmmError::UnexpectedKey(_))
    ));
    // Refused before anything was relayed: the launcher still waits.
    assert_eq!(hv.status(&id).unwrap(), VmStatus::AwaitingKeys);
    assert!(!volume.exists(), "a refused key set created the volume");

    // The data key sealed to a recipient the launcher did not make: it
    // does not open, the launcher says so and ends, nothing is created.
    let mut elsewhere = created.clone();
    elsewhere.recipients[0].key = stranger.public_key().clone();
    match hv.supply_keys(&id, keys.seal(&elsewhere)) {
        Err(VmmError::VmmExited { stderr, .. }) => {
            assert!(stderr.contains("does not open"), "{stderr}");
        }
        other => panic!("expected the launcher to refuse the key, got {other:?}"),
    }
    assert!(matches!(hv.status(&id), Err(VmmError::UnknownVm(_))));
    assert!(!hv.vm_dir(&id).exists());
    assert!(
        !volume.exists(),
        "a key that does not open created the volume"
    );

    // Stopping a VM that waits for its keys ends its launcher.
    let created = hv.create(&s).unwrap();
    hv.stop(&created.id).unwrap();
    assert_eq!(hv.status(&created.id).unwrap(), VmStatus::Stopped);
    hv.destroy(&created.id).unwrap();
    let unknown = VmId::new(Name::new("nope").unwrap());
    assert!(matches!(hv.status(&unknown), Err(VmmError::UnknownVm(_))));
}

/// Claim 3, the instance store: what a guest wrote to its instance-store
/// disk is noise once the instance has stopped. The test copies the backing
/// file while the guest runs, after the guest wrote a secret to it; after
/// the stop the file is gone and nothing on the machine (the copy, the
/// backend's state) holds the secret or anything that opens the copy.
#[test]
fn qemu_instance_store_is_noise_after_stop() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let hv = backend(&env, dir.path());
    let scratch = dir.path().join("scratch.img");
    let secret = format!(
        "NITRILE-SCRATCH-{:016x}",
        rand_core::RngCore::next_u64(&mut rand_core::OsRng)
    );
    let base = spec(
        &env,
        "store-1",
        Some(&format!("plant-secret nitrile.secret={secret}")),
        None,
    );
    let s = with_scratch(&base, &scratch, 16);
    // A leftover file at the path is replaced, not reused.
    std::fs::write(&scratch, secret.as_bytes()).unwrap();
    let created = hv.create(&s).unwrap();
    assert!(
        created.recipients.is_empty(),
        "the instance store needs no key from outside"
    );
    let id = created.id;
    let pid = hv.qemu_pid(&id).unwrap();
    hv.start(&id).unwrap();
    assert_eq!(
        wait_for(
            &hv,
            &id,
            &["NITRILE-SECRET-PLANTED", "NITRILE-VOLUME-NODISK"]
        )
        .as_deref(),
        Some("NITRILE-SECRET-PLANTED")
    );
    // The guest wrote through to the file (clusters allocated) ...
    let copy = std::fs::read(&scratch).unwrap();
    assert_eq!(&copy[..4], b"QFI\xfb", "not a qcow2 file");
    // ... encrypted: qcow2 crypt method 2 is LUKS.
    assert_eq!(u32::from_be_bytes(copy[32..36].try_into().unwrap()), 2);
    assert!(
        !contains(&copy, secret.as_bytes()),
        "the secret in plaintext on disk"
    );
    // The launcher is gone (it became QEMU): no process holds the key but
    // QEMU, and QEMU's command line does not.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        contains(&cmdline, b"qemu"),
        "the launcher did not exec QEMU"
    );

    hv.stop(&id).unwrap();
    assert!(
        !scratch.exists(),
        "the instance-store disk outlived the stop"
    );
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    // (The console log echoes the kernel command line, which carries the
    // secret for the guest: it goes with the VM's directory.)
    hv.destroy(&id).unwrap();
    // Everything left on the machine for this VM: no secret, no key file.
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !contains(&bytes, secret.as_bytes()),
            "the secret in {}",
            entry.display()
        );
    }
    // The copy does not open without a key: qemu-img refuses it.
    let kept = dir.path().join("kept.qcow2");
    std::fs::write(&kept, &copy).unwrap();
    let out = std::process::Command::new(env.qemu.with_file_name("qemu-img"))
        .args(["convert", "-O", "raw"])
        .arg(&kept)
        .arg(dir.path().join("plain.raw"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the copy opened without a key");

    // A second start gets a new, empty disk, not the old one.
    let id = hv.create(&s).unwrap().id;
    let fresh = std::fs::metadata(&scratch).unwrap().len();
    assert!(
        fresh < copy.len() as u64,
        "the new disk is not empty ({fresh} >= {})",
        copy.len()
    );
    hv.destroy(&id).unwrap();
    assert!(!scratch.exists());
}

#[test]
fn qemu_sigabrt_leaves_no_core_file() {
    let env = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    // Without a PID namespace: QEMU as PID 1 of its own namespace ignores
    // SIGABRT sent from outside, and the point here is what happens when
    // the process does die of it. RLIMIT_CORE and non-dumpability do not
    // depend on the namespaces.
    let jail = JailConfig {
        namespaces: false,
        ..JailConfig::default()
    };
    let hv = backend(&env, dir.path()).with_jail(jail);
    let id = hv.create(&spec(&env, "abrt-1", None, None)).unwrap().id;
    let pid = hv.qemu_pid(&id).expect("QEMU pid");
    // QEMU's working directory is its chroot in the VM directory, where a
    // `core` pattern without a path would put the dump.
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert_eq!(cwd, hv.vm_dir(&id).join("root"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGABRT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = hv.status(&id).unwrap();
        if matches!(s, VmStatus::Failed { .. }) || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let VmStatus::Failed { reason } = status else {
        panic!("QEMU survived SIGABRT: {status:?}");
    };
    assert!(reason.contains("SIGABRT"), "{reason}");
    assert!(!reason.contains("core dumped"), "{reason}");
    let cores: Vec<_> = std::fs::read_dir(hv.vm_dir(&id))
        .unwrap()
        .chain(std::fs::read_dir(&cwd).unwrap())
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("core"))
        .collect();
    assert!(cores.is_empty(), "core files: {cores:?}");
    hv.destroy(&id).unwrap();
}
