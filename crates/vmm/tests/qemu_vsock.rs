//! vsock in the `qemu` backend (vhost-user, served by `vhost-device-vsock`)
//! with the Debian guest image: guest-to-host and host-to-guest echo, and
//! the daemon's jail.
//!
//! Needs what `tests/qemu.rs` needs, plus the `vhost-device-vsock` program
//! (`NITRILE_VHOST_VSOCK`, else on `PATH`, else in `$CARGO_HOME/bin` or
//! `~/.cargo/bin`; scripts/setup.sh installs it). Each test prints
//! `SKIPPED: <reason>` and returns when one is missing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nitrile_vmm::{Hypervisor, QemuBackend, VmId, VmSpec, VmStatus, VmmError};

mod common;
use common::{BOOT_TIMEOUT, Env, env};

/// The jail uid (the backend's default).
const JAIL_UID: u32 = 65534;
const PING: &[u8] = b"NITRILE-VSOCK-PING";

fn find_daemon() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NITRILE_VHOST_VSOCK") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(c) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(c).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo").join("bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("vhost-device-vsock"))
        .find(|p| p.is_file())
}

macro_rules! env_or_skip {
    () => {{
        let env = match env() {
            Ok(e) => e,
            Err(reason) => {
                println!("SKIPPED: {reason}");
                return;
            }
        };
        let Some(daemon) = find_daemon() else {
            println!(
                "SKIPPED: vhost-device-vsock is not installed (scripts/setup.sh --tests installs it)"
            );
            return;
        };
        (env, daemon)
    }};
}

/// A directory for the VM's host sockets, writable by the jail uid (the
/// daemon creates `uds_path` there).
fn socket_dir(base: &Path) -> PathBuf {
    let dir = base.join("sockets");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(JAIL_UID), Some(JAIL_UID)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn vsock_spec(env: &Env, instance: &str, action: &str, cid: u32, uds: &Path) -> VmSpec {
    let json = serde_json::json!({
        "instance": instance,
        "image": {
            "digest": "00".repeat(32),
            "kernel": env.kernel,
            "initramfs": env.initramfs,
            "cmdline": format!("{} nitrile.test={action}", env.cmdline),
        },
        "vcpus": 1,
        "memory_mib": 256,
        "vsock": { "guest_cid": cid, "uds_path": uds },
    });
    VmSpec::parse_json(&serde_json::to_vec(&json).unwrap()).unwrap()
}

/// The init's reply to an action it does not know: an image built before
/// the vsock tool was added.
fn unknown(action: &str) -> String {
    format!("NITRILE-TEST-UNKNOWN {action}")
}

/// Polls the serial file until a line equal to one of `markers` appears or
/// the VM ends.
fn wait_for(hv: &QemuBackend, id: &VmId, markers: &[&str]) -> Option<String> {
    let serial = hv.vm_dir(id).join("serial.log");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let status = hv.status(id).unwrap();
        let text =
            String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
        if let Some(m) = text
            .lines()
            .find_map(|line| markers.iter().find(|m| line.trim() == **m))
        {
            return Some((*m).to_owned());
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

/// Checks the daemon's jail: uid, non-dumpable, no core files, namespaces.
fn assert_daemon_jailed(pid: u32) {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
    for key in ["Uid:", "Gid:"] {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        assert!(
            line.split_whitespace()
                .skip(1)
                .all(|u| u == JAIL_UID.to_string()),
            "{line}"
        );
    }
    let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
    assert_eq!(groups.trim(), "Groups:", "supplementary groups kept");
    let nnp = status
        .lines()
        .find(|l| l.starts_with("NoNewPrivs:"))
        .unwrap();
    assert!(nnp.ends_with('1'), "{nnp}");
    // Non-dumpable: its /proc files stay root's although it runs as 65534,
    // so its own uid cannot open its memory (which maps all guest memory);
    // the same open works on an ordinary process of that uid.
    assert_eq!(std::fs::metadata(proc_dir.join("mem")).unwrap().uid(), 0);
    let open_mem_as_jail_uid = |pid: u32| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3< /proc/{pid}/mem"))
            .uid(JAIL_UID)
            .gid(JAIL_UID)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let mut control = std::process::Command::new("sleep")
        .arg("30")
        .uid(JAIL_UID)
        .gid(JAIL_UID)
        .spawn()
        .unwrap();
    let control_ok = open_mem_as_jail_uid(control.id());
    control.kill().unwrap();
    control.wait().unwrap();
    assert!(
        control_ok,
        "control: open of an ordinary process's mem failed"
    );
    assert!(
        !open_mem_as_jail_uid(pid),
        "the jail uid opened /proc/<daemon>/mem"
    );
    let limits = std::fs::read_to_string(proc_dir.join("limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    for ns in ["mnt", "ipc", "net", "pid", "uts"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let theirs = std::fs::read_link(proc_dir.join("ns").join(ns)).unwrap();
        assert_ne!(ours, theirs, "{ns} namespace is shared with the host");
    }
}

#[test]
fn qemu_guest_connects_to_host_listener_over_vsock() {
    let (env, daemon) = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let sockets = socket_dir(dir.path());
    let uds = sockets.join("vm.vsock");
    // The host service on port 5000, granted to the jail uid.
    let listener_path = PathBuf::from(format!("{}_5000", uds.display()));
    let listener = UnixListener::bind(&listener_path).unwrap();
    std::os::unix::fs::chown(&listener_path, Some(JAIL_UID), Some(JAIL_UID)).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
        let mut buf = vec![0u8; PING.len()];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(&buf).unwrap();
        tx.send(buf).unwrap();
    });

    let hv = QemuBackend::new(dir.path().join("vms"), &env.qemu, &env.launcher)
        .unwrap()
        .with_accel(env.accel)
        .with_vsock_daemon(&daemon);
    let id = hv
        .create(&vsock_spec(&env, "vsock-1", "vsock-echo", 3, &uds))
        .unwrap()
        .id;
    let pid = hv.vsock_daemon_pid(&id).expect("daemon pid");
    assert_daemon_jailed(pid);
    hv.start(&id).unwrap();
    let old_image = unknown("vsock-echo");
    let found = wait_for(
        &hv,
        &id,
        &["NITRILE-VSOCK-OK", "NITRILE-VSOCK-FAILED", &old_image],
    );
    if found.as_deref() == Some(old_image.as_str()) {
        println!("SKIPPED: the guest image predates its vsock tool (rerun scripts/guest-image.sh)");
        return;
    }
    assert_eq!(found.as_deref(), Some("NITRILE-VSOCK-OK"));
    assert_eq!(rx.recv_timeout(BOOT_TIMEOUT).unwrap(), PING);
    hv.destroy(&id).unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "daemon outlived its VM"
    );
    assert!(!uds.exists(), "the VM's host socket outlived it");
}

#[test]
fn qemu_host_connects_to_guest_listener_over_vsock() {
    let (env, daemon) = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let uds = socket_dir(dir.path()).join("vm.vsock");
    let hv = QemuBackend::new(dir.path().join("vms"), &env.qemu, &env.launcher)
        .unwrap()
        .with_accel(env.accel)
        .with_vsock_daemon(&daemon);
    let id = hv
        .create(&vsock_spec(&env, "vsock-2", "vsock-listen", 4, &uds))
        .unwrap()
        .id;
    hv.start(&id).unwrap();
    let old_image = unknown("vsock-listen");
    let found = wait_for(
        &hv,
        &id,
        &[
            "NITRILE-VSOCK-LISTENING",
            "NITRILE-VSOCK-FAILED",
            &old_image,
        ],
    );
    if found.as_deref() == Some(old_image.as_str()) {
        println!("SKIPPED: the guest image predates its vsock tool (rerun scripts/guest-image.sh)");
        return;
    }
    assert_eq!(found.as_deref(), Some("NITRILE-VSOCK-LISTENING"));

    let mut conn = UnixStream::connect(&uds).unwrap();
    conn.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
    conn.write_all(b"CONNECT 5001\n").unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    assert!(reply.starts_with("OK "), "CONNECT reply: {reply:?}");
    let message = b"host to guest and back";
    conn.write_all(message).unwrap();
    let mut echoed = vec![0u8; message.len()];
    reader.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, message);
    drop(reader);
    drop(conn);
    hv.destroy(&id).unwrap();
}

#[test]
fn qemu_vsock_without_a_configured_daemon_is_refused() {
    let (env, _daemon) = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let uds = socket_dir(dir.path()).join("vm.vsock");
    let hv = QemuBackend::new(dir.path().join("vms"), &env.qemu, &env.launcher)
        .unwrap()
        .with_accel(env.accel);
    let err = hv
        .create(&vsock_spec(&env, "vsock-3", "vsock-echo", 5, &uds))
        .unwrap_err();
    assert!(matches!(err, VmmError::Spawn { .. }), "{err:?}");
    assert!(
        !hv.vm_dir(&VmId::new(nitrile_api::Name::new("vsock-3").unwrap()))
            .exists()
    );
}

#[test]
fn qemu_vm_whose_vsock_daemon_dies_is_failed() {
    let (env, daemon) = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let uds = socket_dir(dir.path()).join("vm.vsock");
    let hv = QemuBackend::new(dir.path().join("vms"), &env.qemu, &env.launcher)
        .unwrap()
        .with_accel(env.accel)
        .with_vsock_daemon(&daemon);
    let id = hv
        .create(&vsock_spec(&env, "vsock-4", "vsock-echo", 6, &uds))
        .unwrap()
        .id;
    assert_eq!(hv.status(&id).unwrap(), VmStatus::Created);
    let pid = hv.vsock_daemon_pid(&id).expect("daemon pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = hv.status(&id).unwrap();
        if matches!(s, VmStatus::Failed { .. }) || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        matches!(&status, VmStatus::Failed { reason } if reason.contains("vsock")),
        "{status:?}"
    );
    hv.destroy(&id).unwrap();
    assert!(!hv.vm_dir(&id).exists());
}

/// The host PID and start time (field 22 of `/proc/<pid>/stat`) of a live
/// process; `None` once it is gone or a zombie.
fn identity(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    (f[0] != "Z" && f[0] != "X").then_some((pid, f[19].parse().ok()?))
}

fn gone_soon(id: (u32, u64)) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if identity(id.0) != Some(id) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn qemu_adopted_vm_keeps_serving_host_connections_over_vsock() {
    let (env, daemon) = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let uds = socket_dir(dir.path()).join("vm.vsock");
    let backend = || {
        QemuBackend::new(dir.path().join("vms"), &env.qemu, &env.launcher)
            .unwrap()
            .with_accel(env.accel)
            .with_vsock_daemon(&daemon)
    };
    let spec = vsock_spec(&env, "vsock-adopt-1", "vsock-listen", 7, &uds);
    let a = backend();
    let id = a.create(&spec).unwrap().id;
    a.start(&id).unwrap();
    let old_image = unknown("vsock-listen");
    let found = wait_for(
        &a,
        &id,
        &[
            "NITRILE-VSOCK-LISTENING",
            "NITRILE-VSOCK-FAILED",
            &old_image,
        ],
    );
    if found.as_deref() == Some(old_image.as_str()) {
        println!("SKIPPED: the guest image predates its vsock tool (rerun scripts/guest-image.sh)");
        return;
    }
    assert_eq!(found.as_deref(), Some("NITRILE-VSOCK-LISTENING"));
    let qemu = identity(a.qemu_pid(&id).unwrap()).unwrap();
    let vsock = identity(a.vsock_daemon_pid(&id).unwrap()).unwrap();
    a.detach_all();
    drop(a);

    // The successor adopts QEMU and the daemon; the guest, which has not
    // been touched since, answers a host connection through them.
    let b = backend();
    assert_eq!(b.adopt(&spec).unwrap(), VmStatus::Running);
    assert_eq!(b.vsock_daemon_pid(&id), Some(vsock.0));
    let mut conn = UnixStream::connect(&uds).unwrap();
    conn.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
    conn.write_all(b"CONNECT 5001\n").unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    assert!(reply.starts_with("OK "), "CONNECT reply: {reply:?}");
    let message = b"through an adopted VMM";
    conn.write_all(message).unwrap();
    let mut echoed = vec![0u8; message.len()];
    reader.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, message);
    drop(reader);
    drop(conn);
    b.stop(&id).unwrap();
    assert!(gone_soon(qemu), "QEMU runs after stop");
    assert!(gone_soon(vsock), "the vsock daemon runs after stop");
    assert!(!uds.exists(), "the VM's host socket outlived it");
    b.destroy(&id).unwrap();
}

#[test]
fn qemu_adopt_of_a_vm_whose_qemu_died_stops_its_vsock_daemon() {
    let (env, daemon) = env_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let uds = socket_dir(dir.path()).join("vm.vsock");
    let backend = || {
        QemuBackend::new(dir.path().join("vms"), &env.qemu, &env.launcher)
            .unwrap()
            .with_accel(env.accel)
            .with_vsock_daemon(&daemon)
    };
    let spec = vsock_spec(&env, "vsock-adopt-2", "vsock-listen", 8, &uds);
    let a = backend();
    let id = a.create(&spec).unwrap().id;
    let qemu = identity(a.qemu_pid(&id).unwrap()).unwrap();
    let vsock = identity(a.vsock_daemon_pid(&id).unwrap()).unwrap();
    a.detach_all();
    drop(a);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(qemu.0).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(gone_soon(qemu));

    let b = backend();
    assert_eq!(b.adopt(&spec).unwrap(), VmStatus::Stopped);
    assert!(gone_soon(vsock), "the dead VM's vsock daemon still runs");
    assert!(!uds.exists(), "the dead VM's host socket is left");
    assert!(!b.vm_dir(&id).exists());
    b.destroy(&id).unwrap();
}
