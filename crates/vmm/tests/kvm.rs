//! The `kvm` backend's side of the process protocol, against programs that
//! misbehave in the ways a broken or hostile VMM could. (The real `nitrile
//! vmm` is exercised end to end in the CLI crate's `tests/vmm.rs`, which can
//! name the binary.)

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use nitrile_api::Name;
use nitrile_vmm::{
    Hypervisor, JailConfig, KvmBackend, SealedVolumeKeys, VmSpec, VmStatus, VmmError,
};

fn is_root() -> bool {
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0) {
        return true;
    }
    println!("SKIPPED: the kvm backend's jail needs root");
    false
}

/// A bash script standing in for the `nitrile vmm` binary (bash, unlike
/// dash, redirects to descriptors above 9).
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

const FIND_CONTROL_FD: &str = r#"while [ $# -gt 0 ]; do
  case "$1" in --control-fd) C="$2";; esac
  shift
done"#;

fn spec(dir: &Path, instance: &str, extra: &str) -> VmSpec {
    let kernel = dir.join("kernel");
    std::fs::write(&kernel, b"not used").unwrap();
    let json = format!(
        r#"{{"instance":"{instance}","image":{{"digest":"{}","kernel":"{}","initramfs":"{}","cmdline":""}},"vcpus":1,"memory_mib":32{extra}}}"#,
        "cd".repeat(32),
        kernel.display(),
        kernel.display(),
    );
    VmSpec::parse_json(json.as_bytes()).unwrap()
}

fn backend(dir: &Path, binary: &Path) -> KvmBackend {
    KvmBackend::new(dir.join("state"), binary)
        .unwrap()
        .with_jail(JailConfig {
            namespaces: false,
            cgroup_root: None,
            ..JailConfig::default()
        })
}

#[test]
fn a_vmm_dying_during_setup_is_reported_with_its_stderr() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = script(dir.path(), "dies", "echo 'no usable thing' >&2\nexit 3");
    let hv = backend(dir.path(), &bin);
    let s = spec(dir.path(), "dies-1", "");
    match hv.create(&s) {
        Err(VmmError::VmmExited { status, stderr }) => {
            assert_eq!(status.code(), Some(3));
            assert!(stderr.contains("no usable thing"), "{stderr}");
        }
        other => panic!("expected VmmExited, got {other:?}"),
    }
    // Nothing of the VM is left behind, and its id is free again.
    assert!(!dir.path().join("state").join("dies-1").exists());
    assert!(matches!(hv.create(&s), Err(VmmError::VmmExited { .. })));
}

#[test]
fn a_vmm_speaking_outside_the_protocol_is_refused() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{FIND_CONTROL_FD}\necho '{{\"event\":\"guest_memory\",\"bytes\":\"00\"}}' >&\"$C\"\nexec sleep 30"
    );
    let bin = script(dir.path(), "chatty", &body);
    let hv = backend(dir.path(), &bin);
    match hv.create(&spec(dir.path(), "chatty-1", "")) {
        Err(VmmError::KvmControl(_)) => {}
        other => panic!("expected a control channel error, got {other:?}"),
    }
    let long = format!("{FIND_CONTROL_FD}\nprintf '%0300d\\n' 0 >&\"$C\"\nexec sleep 30");
    let bin = script(dir.path(), "long", &long);
    let hv = backend(dir.path(), &bin);
    match hv.create(&spec(dir.path(), "long-1", "")) {
        Err(VmmError::KvmControl(_)) => {}
        other => panic!("expected a control channel error, got {other:?}"),
    }
}

#[test]
fn the_vmm_gets_only_descriptors_on_its_command_line_and_no_environment() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seen");
    // Record argv and the environment (less what bash itself sets), and die.
    let body = format!(
        "echo \"$@\" > {out}\nenv | grep -vE '^(PWD|SHLVL|_|OLDPWD)=' | wc -l >> {out}\nexit 1",
        out = out.display()
    );
    let bin = script(dir.path(), "record", &body);
    let hv = backend(dir.path(), &bin);
    let vol = dir.path().join("vol.img");
    let s = spec(
        dir.path(),
        "record-1",
        &format!(
            r#","volumes":[{{"id":"data","path":"{}","size_mib":1}}]"#,
            vol.display()
        ),
    );
    assert!(hv.create(&s).is_err());
    let seen = std::fs::read_to_string(&out).unwrap();
    let mut lines = seen.lines();
    let argv = lines.next().unwrap();
    let words: Vec<&str> = argv.split_whitespace().collect();
    assert_eq!(words[0], "vmm", "{argv}");
    for pair in words[1..].chunks(2) {
        assert!(
            matches!(
                pair[0],
                "--spec-fd" | "--control-fd" | "--serial-fd" | "--tap-fd" | "--uid" | "--gid"
            ),
            "{argv}"
        );
        assert!(pair[1].parse::<u32>().is_ok(), "{argv}");
    }
    assert_eq!(
        lines.next().map(str::trim),
        Some("0"),
        "environment not empty"
    );
    // The volume was created for the VMM (size from the spec, owner-only).
    let meta = std::fs::metadata(&vol).unwrap();
    assert_eq!(meta.len(), 1 << 20);
    assert_eq!(meta.mode() & 0o777, 0o600);
}

/// A stand-in VMM that offers one recipient key, writes whatever the
/// backend sends it on the control channel to `seen`, and waits.
fn offering_vmm(dir: &Path, seen: &Path) -> PathBuf {
    let body = format!(
        "{FIND_CONTROL_FD}\necho '{{\"event\":\"recipient\",\"volume\":0,\"key\":\"{key}\"}}' >&\"$C\"\nexec timeout 30 head -n 1 <&\"$C\" > {seen}",
        key = "09".repeat(32),
        seen = seen.display()
    );
    script(dir, "offers", &body)
}

fn volume_spec(dir: &Path, instance: &str) -> (VmSpec, PathBuf) {
    let vol = dir.join(format!("{instance}.img"));
    let s = spec(
        dir,
        instance,
        &format!(
            r#","volumes":[{{"id":"data","path":"{}","size_mib":1}}]"#,
            vol.display()
        ),
    );
    (s, vol)
}

/// A sealed key as the key service would make one (the stand-in VMM
/// cannot open it; the backend only relays it).
fn sealed_key(seed: u8) -> nitrile_vmm::SealedKey {
    let mut bytes = vec![seed; nitrile_vmm::unlock::SEALED_KEY_LEN];
    bytes[..11].copy_from_slice(b"NKSK\x01\x00\x20\x00\x01\x00\x02");
    nitrile_vmm::SealedKey::decode(&bytes).unwrap()
}

#[test]
fn a_vm_with_volumes_waits_for_exactly_its_sealed_keys_and_the_backend_relays_only_those() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let hv = backend(dir.path(), &offering_vmm(dir.path(), &seen));
    let (s, vol) = volume_spec(dir.path(), "offer-1");
    let created = hv.create(&s).unwrap();
    assert_eq!(created.recipients.len(), 1);
    assert_eq!(created.recipients[0].volume.as_str(), "data");
    assert_eq!(created.recipients[0].key.as_bytes(), &[9u8; 32]);
    let id = created.id;
    assert_eq!(hv.status(&id).unwrap(), VmStatus::AwaitingKeys);
    assert!(matches!(
        hv.start(&id),
        Err(VmmError::WrongState {
            state: VmStatus::AwaitingKeys,
            ..
        })
    ));
    // The volume's file exists for the VMM to open (size from the spec).
    assert_eq!(std::fs::metadata(&vol).unwrap().len(), 1 << 20);
    assert!(matches!(
        hv.supply_keys(&id, SealedVolumeKeys::new()),
        Err(VmmError::MissingKey(_))
    ));
    let mut extra = SealedVolumeKeys::new();
    extra.insert(Name::new("data").unwrap(), sealed_key(1));
    extra.insert(Name::new("other").unwrap(), sealed_key(2));
    assert!(matches!(
        hv.supply_keys(&id, extra),
        Err(VmmError::UnexpectedKey(_))
    ));
    assert_eq!(hv.status(&id).unwrap(), VmStatus::AwaitingKeys);
    // The right set is relayed, byte for byte, and nothing else; the
    // stand-in never says ready, so the VM is forgotten after the wait.
    let mut keys = SealedVolumeKeys::new();
    keys.insert(Name::new("data").unwrap(), sealed_key(3));
    assert!(hv.supply_keys(&id, keys).is_err());
    assert!(matches!(hv.status(&id), Err(VmmError::UnknownVm(_))));
    let relayed = std::fs::read_to_string(&seen).unwrap();
    let expected = format!(
        "{{\"op\":\"sealed_key\",\"volume\":0,\"key\":\"{}\"}}\n",
        base64::engine::general_purpose::STANDARD.encode(sealed_key(3).encode())
    );
    assert_eq!(relayed, expected);
}

#[test]
fn a_vmm_offering_malformed_or_misordered_recipients_is_refused() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, line) in [
        (
            "order",
            format!(
                "{{\"event\":\"recipient\",\"volume\":1,\"key\":\"{}\"}}",
                "09".repeat(32)
            ),
        ),
        (
            "short",
            format!(
                "{{\"event\":\"recipient\",\"volume\":0,\"key\":\"{}\"}}",
                "09".repeat(31)
            ),
        ),
        ("ready", "{\"event\":\"ready\"}".to_owned()),
    ] {
        let body = format!("{FIND_CONTROL_FD}\necho '{line}' >&\"$C\"\nexec sleep 30");
        let bin = script(dir.path(), name, &body);
        let hv = backend(dir.path(), &bin);
        let (s, _) = volume_spec(dir.path(), &format!("bad-{name}"));
        match hv.create(&s) {
            Err(VmmError::Unlock(_) | VmmError::KvmControl(_)) => {}
            other => panic!("{name}: expected a key exchange error, got {other:?}"),
        }
        assert!(
            !dir.path()
                .join("state")
                .join(format!("bad-{name}"))
                .exists()
        );
    }
}

#[test]
fn an_instance_store_disk_is_made_anew_and_removed_when_the_vm_ends() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = script(
        dir.path(),
        "ready",
        &format!(
            "{FIND_CONTROL_FD}\necho '{{\"event\":\"ready\"}}' >&\"$C\"\nexec timeout 30 cat <&\"$C\" >/dev/null"
        ),
    );
    let hv = backend(dir.path(), &bin);
    let scratch = dir.path().join("scratch.img");
    std::fs::write(&scratch, b"left over from an earlier VM").unwrap();
    let s = spec(
        dir.path(),
        "store-1",
        &format!(
            r#","scratch":{{"path":"{}","size_mib":2}}"#,
            scratch.display()
        ),
    );
    let created = hv.create(&s).unwrap();
    assert!(created.recipients.is_empty());
    // Made anew: empty, sized from the spec, owner-only.
    let meta = std::fs::metadata(&scratch).unwrap();
    assert_eq!(meta.len(), 2 << 20);
    assert_eq!(meta.mode() & 0o777, 0o600);
    let left = std::fs::read(&scratch).unwrap();
    assert!(left.iter().all(|&b| b == 0), "the old contents were reused");
    hv.stop(&created.id).unwrap();
    assert!(!scratch.exists(), "the disk outlived the stop");
    hv.destroy(&created.id).unwrap();
}
