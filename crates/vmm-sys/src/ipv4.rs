//! An interface's IPv4 address and the default route, set with the
//! classic socket ioctls (`SIOCSIFADDR`, `SIOCSIFNETMASK`, `SIOCADDRT`),
//! as a host's init configures its one network interface without an `ip`
//! program. Interface names are checked before any system call; which
//! interface and which addresses are the caller's.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

/// Size of `struct ifreq` on x86_64.
const IFREQ_LEN: usize = 40;
/// Size of `struct sockaddr_in` (and of `struct sockaddr`).
const SOCKADDR_LEN: usize = 16;

fn socket() -> io::Result<OwnedFd> {
    nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| io::Error::from_raw_os_error(e as i32))
}

/// A `struct sockaddr_in` of `addr` (port 0), as bytes.
fn sockaddr_in(addr: Ipv4Addr) -> [u8; SOCKADDR_LEN] {
    let mut sa = [0u8; SOCKADDR_LEN];
    let family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2);
    sa[..2].copy_from_slice(&family.to_ne_bytes());
    sa[4..8].copy_from_slice(&addr.octets());
    sa
}

fn ifreq_with(name: &str, addr: Ipv4Addr) -> io::Result<[u8; IFREQ_LEN]> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > libc::IFNAMSIZ - 1 || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut req = [0u8; IFREQ_LEN];
    req[..bytes.len()].copy_from_slice(bytes);
    req[libc::IFNAMSIZ..libc::IFNAMSIZ + SOCKADDR_LEN].copy_from_slice(&sockaddr_in(addr));
    Ok(req)
}

/// The netmask of a prefix length (0 to 32).
pub fn netmask(prefix: u8) -> Option<Ipv4Addr> {
    match prefix {
        0 => Some(Ipv4Addr::UNSPECIFIED),
        1..=32 => Some(Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix)))),
        _ => None,
    }
}

/// Gives interface `name` of the calling thread's network namespace the
/// address `addr/prefix` (replacing its primary IPv4 address).
pub fn set_address(name: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let mask = netmask(prefix).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let sock = socket()?;
    for (request, value) in [(libc::SIOCSIFADDR, addr), (libc::SIOCSIFNETMASK, mask)] {
        let mut req = ifreq_with(name, value)?;
        // SAFETY: SIOCSIFADDR and SIOCSIFNETMASK read one `struct ifreq`
        // (a NUL-terminated name, checked above, then a `sockaddr_in`);
        // `req` is a live buffer of exactly that size for the whole call,
        // and `sock` an open socket.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, req.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Adds the default route through `gateway` in the calling thread's
/// network namespace (an existing one is an error, `EEXIST`).
pub fn add_default_route(gateway: Ipv4Addr) -> io::Result<()> {
    let sock = socket()?;
    // SAFETY: `rtentry` is integers, `sockaddr`s (byte arrays) and one
    // pointer, for all of which zero is a valid value (the pointer null:
    // no device named).
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    let to_sockaddr = |a: Ipv4Addr| {
        let bytes = sockaddr_in(a);
        let mut sa = libc::sockaddr {
            sa_family: 0,
            sa_data: [0; 14],
        };
        sa.sa_family = libc::sa_family_t::from_ne_bytes([bytes[0], bytes[1]]);
        for (d, s) in sa.sa_data.iter_mut().zip(&bytes[2..]) {
            *d = *s as libc::c_char;
        }
        sa
    };
    rt.rt_dst = to_sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = to_sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = to_sockaddr(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT reads one `struct rtentry`; `rt` is a live value of
    // that type for the whole call, its device pointer null, and `sock` an
    // open socket.
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCADDRT,
            &raw mut rt as *mut libc::c_void,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks_of_prefixes() {
        assert_eq!(netmask(24), Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(netmask(32), Some(Ipv4Addr::new(255, 255, 255, 255)));
        assert_eq!(netmask(0), Some(Ipv4Addr::UNSPECIFIED));
        assert_eq!(netmask(33), None);
    }

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        for name in ["", "a-name-much-too-long", "nul\0"] {
            assert_eq!(
                set_address(name, Ipv4Addr::LOCALHOST, 8)
                    .unwrap_err()
                    .kind(),
                io::ErrorKind::InvalidInput,
                "{name:?}"
            );
        }
    }
}
