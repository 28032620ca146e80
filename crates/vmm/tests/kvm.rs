//! The `kvm` backend's side of the process protocol, against programs that
//! misbehave in the ways a broken or hostile VMM could. (The real `nitrile
//! vmm` is exercised end to end in the CLI crate's `tests/vmm.rs`, which can
//! name the binary.)

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nitrile_api::Name;
use nitrile_vmm::{Hypervisor, JailConfig, KvmBackend, VmSpec, VmmError, VolumeKey, VolumeKeys};

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
    match hv.create(&s, VolumeKeys::new()) {
        Err(VmmError::VmmExited { status, stderr }) => {
            assert_eq!(status.code(), Some(3));
            assert!(stderr.contains("no usable thing"), "{stderr}");
        }
        other => panic!("expected VmmExited, got {other:?}"),
    }
    // Nothing of the VM is left behind, and its id is free again.
    assert!(!dir.path().join("state").join("dies-1").exists());
    assert!(matches!(
        hv.create(&s, VolumeKeys::new()),
        Err(VmmError::VmmExited { .. })
    ));
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
    match hv.create(&spec(dir.path(), "chatty-1", ""), VolumeKeys::new()) {
        Err(VmmError::KvmControl(_)) => {}
        other => panic!("expected a control channel error, got {other:?}"),
    }
    let long = format!("{FIND_CONTROL_FD}\nprintf '%0300d\\n' 0 >&\"$C\"\nexec sleep 30");
    let bin = script(dir.path(), "long", &long);
    let hv = backend(dir.path(), &bin);
    match hv.create(&spec(dir.path(), "long-1", ""), VolumeKeys::new()) {
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
    let mut keys = VolumeKeys::new();
    keys.insert(
        Name::new("data").unwrap(),
        VolumeKey::from_bytes(&[0x5a; 64]).unwrap(),
    );
    assert!(hv.create(&s, keys).is_err());
    let seen = std::fs::read_to_string(&out).unwrap();
    let mut lines = seen.lines();
    let argv = lines.next().unwrap();
    let words: Vec<&str> = argv.split_whitespace().collect();
    assert_eq!(words[0], "vmm", "{argv}");
    for pair in words[1..].chunks(2) {
        assert!(
            matches!(
                pair[0],
                "--spec-fd"
                    | "--key-fd"
                    | "--control-fd"
                    | "--serial-fd"
                    | "--tap-fd"
                    | "--uid"
                    | "--gid"
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

#[test]
fn specs_the_backend_cannot_serve_are_refused_before_spawning() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("spawned");
    let bin = script(
        dir.path(),
        "marker",
        &format!("touch {}\nexit 1", marker.display()),
    );
    let hv = backend(dir.path(), &bin);
    let vol = dir.path().join("v.img");
    let s = spec(
        dir.path(),
        "key-1",
        &format!(
            r#","volumes":[{{"id":"data","path":"{}","size_mib":1}}]"#,
            vol.display()
        ),
    );
    assert!(matches!(
        hv.create(&s, VolumeKeys::new()),
        Err(VmmError::MissingKey(_))
    ));
    let mut extra = VolumeKeys::new();
    extra.insert(
        Name::new("data").unwrap(),
        VolumeKey::from_bytes(&[1; 64]).unwrap(),
    );
    extra.insert(
        Name::new("other").unwrap(),
        VolumeKey::from_bytes(&[2; 64]).unwrap(),
    );
    assert!(matches!(
        hv.create(&s, extra),
        Err(VmmError::UnexpectedKey(_))
    ));
    assert!(!marker.exists(), "the VMM was spawned for a refused spec");
    assert!(!vol.exists(), "a refused spec created its volume");
}
