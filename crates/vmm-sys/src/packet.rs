//! `AF_PACKET` sockets bound to one interface: raw Ethernet frames read
//! from and written to that interface only.
//!
//! [`PacketSocket::bind`] makes the socket with no protocol, so that it
//! receives nothing until [`bind`](PacketSocket::bind) has attached it to
//! exactly one interface (a socket made with `ETH_P_ALL` would queue the
//! frames of every interface until then). Frames the kernel sends out of
//! the interface are ignored (`PACKET_IGNORE_OUTGOING`), so only frames
//! arriving on it are read. The socket is non-blocking and close-on-exec,
//! and keeps the network namespace of the thread that made it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType};

/// `PACKET_IGNORE_OUTGOING` (Linux 4.20).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// Why a packet socket could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PacketError {
    /// misuse: the interface name is empty, too long or holds a NUL
    #[error("invalid interface name")]
    Name,
    /// no interface of that name in the calling thread's namespace
    #[error("no interface {0:?} in this network namespace")]
    NoInterface(String, #[source] io::Error),
    /// the kernel refused the socket, an option or the bind
    #[error("making the packet socket ({0})")]
    Socket(&'static str, #[source] io::Error),
}

/// A raw socket on one interface.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

impl PacketSocket {
    /// Binds a new socket to the interface `ifname` of the calling
    /// thread's network namespace.
    pub fn bind(ifname: &str) -> Result<Self, PacketError> {
        if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains('\0') {
            return Err(PacketError::Name);
        }
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|e| PacketError::NoInterface(ifname.to_owned(), errno(e)))?;
        // Protocol 0: nothing is received before the bind below.
        let fd = nix::sys::socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| PacketError::Socket("socket", errno(e)))?;
        let one: libc::c_int = 1;
        // SAFETY: `fd` is an open socket; the option value is a live c_int
        // whose size is passed with it, and the kernel only reads it.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_IGNORE_OUTGOING,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(PacketError::Socket(
                "PACKET_IGNORE_OUTGOING",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as libc::c_ushort;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex as libc::c_int;
        // SAFETY: `fd` is an open AF_PACKET socket; `addr` is a live,
        // initialized sockaddr_ll and its exact size is passed with it; the
        // kernel only reads it.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(PacketError::Socket("bind", io::Error::last_os_error()));
        }
        Ok(Self { fd, ifindex })
    }

    /// The interface index the socket is bound to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Reads one frame into `buf`. Returns the frame's whole length, which
    /// is larger than `buf` when the frame did not fit (it is then cut);
    /// `WouldBlock` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        nix::sys::socket::recv(self.fd.as_raw_fd(), buf, MsgFlags::MSG_TRUNC).map_err(errno)
    }

    /// Writes one frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        nix::sys::socket::send(self.fd.as_raw_fd(), frame, MsgFlags::MSG_DONTWAIT).map_err(errno)
    }
}

impl AsFd for PacketSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        for name in ["", "a\0b", "sixteen-bytes-xx"] {
            assert!(matches!(PacketSocket::bind(name), Err(PacketError::Name)));
        }
    }

    /// On a tap in a namespace of its own: a frame written by the tap's
    /// holder is read on the socket, and a frame sent on the socket is
    /// read by the tap's holder; a frame longer than the buffer reports
    /// its whole length.
    #[test]
    fn frames_cross_between_a_tap_and_its_socket() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: a tap and a network namespace need root");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let tap = crate::tap::open("nitrile-p0").unwrap();
            crate::netns::set_link_up("nitrile-p0").unwrap();
            let sock = PacketSocket::bind("nitrile-p0").unwrap();
            let mut frame = vec![0u8; 200];
            frame[..6].copy_from_slice(&[0xff; 6]);
            frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
            frame[12..14].copy_from_slice(&[0x88, 0xb5]);
            frame[14..].fill(0x5a);
            nix::unistd::write(&tap, &frame).unwrap();
            let mut buf = [0u8; 64];
            let n = loop {
                match sock.recv(&mut buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
            };
            assert_eq!(n, 200);
            assert_eq!(&buf[..], &frame[..64]);
            frame[14..].fill(0xa5);
            assert_eq!(sock.send(&frame).unwrap(), 200);
            let mut back = [0u8; 300];
            let n = nix::unistd::read(&tap, &mut back).unwrap();
            assert_eq!(&back[..n], &frame[..]);
        })
        .join()
        .unwrap();
    }
}
