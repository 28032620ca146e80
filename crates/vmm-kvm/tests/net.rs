//! virtio-net on a real tap device: the test guest broadcasts one frame, the
//! host side of the tap (a packet socket bound to the interface) reads it and
//! answers, and the guest prints `NET-OK` once the answer arrived through
//! the device. Runs in a network namespace of its own (root and
//! `/dev/net/tun` needed).

// Bringing the tap up and a packet socket need raw libc calls (the tap itself
// comes from `nitrile_vmm_sys::tap`, as in the kvm backend).
#![allow(unsafe_code)]

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nitrile_vmm_kvm::{ExitReason, KernelFormat, NetConfig, VmConfig, Vmm};

const ETHERTYPE: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x02, 0x4e, 0x49, 0x54, 0x00, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0x4e, 0x49, 0x54, 0x00, 0x02];
const TAP_NAME: &str = "nitrile-tap0";

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(flags: libc::c_int) -> IfReq {
    let mut name = [0u8; libc::IFNAMSIZ];
    name[..TAP_NAME.len()].copy_from_slice(TAP_NAME.as_bytes());
    IfReq {
        name,
        flags: flags as libc::c_short,
        _pad: [0; 22],
    }
}

fn check(ret: libc::c_int, what: &str) {
    assert!(ret >= 0, "{what}: {}", std::io::Error::last_os_error());
}

/// Creates the tap in the calling thread's network namespace and brings it
/// up; returns the tap and its interface index.
fn tap() -> (File, libc::c_int) {
    let tun = nitrile_vmm_sys::tap::open(TAP_NAME).unwrap();
    // SAFETY: plain socket creation.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    check(sock, "socket");
    // SAFETY: `sock` was just created and is owned from here on.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut up = ifreq(libc::IFF_UP);
    // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`.
    check(
        unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut up) },
        "SIOCSIFFLAGS",
    );
    let name = std::ffi::CString::new(TAP_NAME).unwrap();
    // SAFETY: `name` is a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "if_nametoindex");
    (tun, index as libc::c_int)
}

/// A packet socket for our ethertype bound to interface `index`.
fn packet_socket(index: libc::c_int) -> OwnedFd {
    let proto = ETHERTYPE.to_be();
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
    check(fd, "socket(AF_PACKET)");
    // SAFETY: `fd` was just created and is owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index;
    // SAFETY: `addr` is a sockaddr_ll of the size given.
    check(
        unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        },
        "bind",
    );
    let tv = libc::timeval {
        tv_sec: 20,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads one timeval.
    check(
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        },
        "SO_RCVTIMEO",
    );
    fd
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(n >= 0, "recv: {}", std::io::Error::last_os_error());
    n as usize
}

fn send(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: `frame` is readable for its whole length.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(
        n,
        frame.len() as isize,
        "send: {}",
        std::io::Error::last_os_error()
    );
}

fn skip_reason() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (a tap and a network namespace need root)");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun");
    }
    None
}

#[test]
fn frame_out_and_reply_in() {
    if !common::kvm_usable() {
        return;
    }
    if let Some(reason) = skip_reason() {
        println!("SKIPPED: {reason}");
        return;
    }
    // Everything runs in one thread with a network namespace of its own, so
    // the tap never appears on the host.
    let out = std::thread::spawn(|| {
        // SAFETY: unsharing the network namespace affects this thread only.
        check(unsafe { libc::unshare(libc::CLONE_NEWNET) }, "unshare");
        let (tap, index) = tap();
        let sock = packet_socket(index);
        let console = common::Console::default();
        let config = VmConfig {
            memory_bytes: 32 << 20,
            kernel: common::guest_file(),
            kernel_format: KernelFormat::Elf,
            cmdline: "net=ping".into(),
            serial_out: Box::new(console.clone()),
            disks: Vec::new(),
            vsock: None,
        };
        let mut vmm = Vmm::new(config).unwrap();
        vmm.attach_net(NetConfig {
            tap,
            mac: GUEST_MAC,
        })
        .unwrap();
        let guest = std::thread::spawn(move || vmm.run().unwrap());

        let mut buf = [0u8; 2048];
        let n = recv(&sock, &mut buf);
        let frame = &buf[..n];
        assert!(n >= 14 + 16, "short frame: {frame:?}");
        assert_eq!(&frame[..6], &[0xff; 6], "not a broadcast");
        assert_eq!(&frame[6..12], &GUEST_MAC, "source is not the guest's MAC");
        assert_eq!(&frame[12..14], &ETHERTYPE.to_be_bytes());
        assert_eq!(&frame[14..30], b"NITRILE-NET-PING");

        let mut reply = Vec::new();
        reply.extend_from_slice(&GUEST_MAC);
        reply.extend_from_slice(&HOST_MAC);
        reply.extend_from_slice(&ETHERTYPE.to_be_bytes());
        reply.extend_from_slice(b"NITRILE-NET-PONG");
        reply.resize(60, 0);
        send(&sock, &reply);

        let exit = guest.join().unwrap();
        (exit, console.text())
    })
    .join()
    .unwrap();
    let (exit, text) = out;
    assert!(text.contains("NET-OK"), "serial output: {text:?}");
    assert_eq!(exit, ExitReason::Shutdown { code: 0 });
}

/// Without a reply the guest gives up and says so (the test above can fail).
#[test]
fn no_reply_is_a_failure() {
    if !common::kvm_usable() {
        return;
    }
    if let Some(reason) = skip_reason() {
        println!("SKIPPED: {reason}");
        return;
    }
    let out = std::thread::spawn(|| {
        // SAFETY: unsharing the network namespace affects this thread only.
        check(unsafe { libc::unshare(libc::CLONE_NEWNET) }, "unshare");
        let (tap, _) = tap();
        let console = common::Console::default();
        let config = VmConfig {
            memory_bytes: 32 << 20,
            kernel: common::guest_file(),
            kernel_format: KernelFormat::Elf,
            cmdline: "net=ping".into(),
            serial_out: Box::new(console.clone()),
            disks: Vec::new(),
            vsock: None,
        };
        let mut vmm = Vmm::new(config).unwrap();
        vmm.attach_net(NetConfig {
            tap,
            mac: GUEST_MAC,
        })
        .unwrap();
        let exit = vmm.run().unwrap();
        (exit, console.text())
    })
    .join()
    .unwrap();
    let (exit, text) = out;
    assert!(text.contains("NET-FAIL"), "serial output: {text:?}");
    assert_eq!(exit, ExitReason::Shutdown { code: 1 });
}
