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

#[test]
fn host_initiated_connect_is_echoed_by_the_guest() {
    if !common::kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("vm.vsock");
    let host_path = base.clone();
    let host = std::thread::spawn(move || {
        // The VMM binds the socket when the VM is built; wait for it.
        let mut conn = None;
        for _ in 0..500 {
            if let Ok(c) = std::os::unix::net::UnixStream::connect(&host_path) {
                conn = Some(c);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut conn = conn.expect("the VMM's vsock socket never appeared");
        conn.write_all(b"CONNECT 6000\n").unwrap();
        let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
        let mut ok = String::new();
        std::io::BufRead::read_line(&mut reader, &mut ok).unwrap();
        let msg = b"host-to-guest-echo";
        conn.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        reader.read_exact(&mut back).unwrap();
        drop(reader);
        drop(conn);
        (ok, back)
    });
    let vsock = VsockConfig {
        guest_cid: 3,
        uds_path: base.clone(),
    };
    let (exit, out) = common::boot_with("vsock-listen=6000", Vec::new(), Some(vsock));
    let (ok, back) = host.join().unwrap();
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
    assert_eq!(back, b"host-to-guest-echo");
    assert!(out.contains("VSOCK-SERVE-OK"), "{out}");
    assert_eq!(exit, ExitReason::Shutdown { code: 0 });
    assert!(!base.exists(), "the host socket is removed with the VM");
}
