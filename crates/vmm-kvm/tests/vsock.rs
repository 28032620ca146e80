//! The test guest connects over virtio-vsock to a host Unix socket and
//! checks that what it sends comes back.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use nitrile_vmm_kvm::{ExitReason, VsockConfig};

#[test]
fn vsock_echo_through_host_unix_socket() {
    if !common::kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("vm.vsock");
    let listener = UnixListener::bind(dir.path().join("vm.vsock_5000")).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        seen
    });
    let vsock = VsockConfig {
        guest_cid: 3,
        uds_path: base,
    };
    let (exit, out) = common::boot_with("vsock=5000", Vec::new(), Some(vsock));
    assert!(out.contains("VSOCK-OK"), "{out}");
    assert_eq!(exit, ExitReason::Shutdown { code: 0 });
    let seen = echo.join().unwrap();
    assert_eq!(seen, b"NITRILE-VSOCK-ECHO-0123456789abcdef");
}

#[test]
fn vsock_without_host_listener_fails_in_guest() {
    if !common::kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vsock = VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("vm.vsock"),
    };
    let (exit, out) = common::boot_with("vsock=5001", Vec::new(), Some(vsock));
    assert!(out.contains("VSOCK-FAIL"), "{out}");
    assert_eq!(exit, ExitReason::Shutdown { code: 1 });
}
