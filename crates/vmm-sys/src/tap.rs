//! Tap devices: a virtual Ethernet interface whose frames are read and
//! written on a file descriptor.
//!
//! [`open`] attaches to the tap device of a name in the calling thread's
//! network namespace (`TUNSETIFF` on `/dev/net/tun`, `IFF_TAP | IFF_NO_PI`:
//! frames without a packet-information header), creating a non-persistent
//! one, which disappears with its last descriptor, when none exists. The
//! name is checked here before any system call. Configuring the host side
//! (addresses, bridge, filtering) is not done here.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// Longest interface name, in bytes (`IFNAMSIZ` less the NUL).
pub const MAX_TAP_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// The device through which taps are made.
pub const TUN_PATH: &str = "/dev/net/tun";

/// `TUNSETIFF`, `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Size of `struct ifreq` on x86_64: the name, then a union whose first
/// member for `TUNSETIFF` is the flags, a native-endian short.
const IFREQ_LEN: usize = 40;

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TapError {
    /// misuse: the name is empty, longer than [`MAX_TAP_NAME_LEN`] bytes, or
    /// holds a NUL, `/`, whitespace, or is `.` or `..`
    #[error("invalid tap name")]
    Name,
    /// `/dev/net/tun` could not be opened
    #[error("opening {TUN_PATH}")]
    OpenTun(#[source] io::Error),
    /// the kernel refused to attach to or create the tap
    #[error("attaching to the tap device")]
    Attach(#[source] io::Error),
    /// the network namespace the tap belongs in could not be entered
    #[error("entering the network namespace {path}")]
    Namespace {
        /// The namespace file.
        path: std::path::PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// Whether `name` is a valid interface name (the kernel's `dev_valid_name`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TAP_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace())
}

/// Opens (creating it if needed) the tap device `name` in the calling
/// thread's network namespace; the descriptor is close-on-exec.
pub fn open(name: &str) -> Result<File, TapError> {
    if !valid_name(name) {
        return Err(TapError::Name);
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(TapError::OpenTun)?;
    let mut req = [0u8; IFREQ_LEN];
    // NUL-terminated: at most IFNAMSIZ - 1 bytes (checked above).
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    req[libc::IFNAMSIZ..libc::IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is a
    // live, writable buffer of exactly that size for the whole call, and
    // `tun` an open descriptor of /dev/net/tun.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) };
    if rc != 0 {
        return Err(TapError::Attach(io::Error::last_os_error()));
    }
    Ok(tun)
}

/// Opens (creating it if needed) the tap device `name` inside the network
/// namespace bound at `netns` (`/run/netns/<name>`): a thread of its own
/// enters the namespace, opens the tap and ends, so this process's other
/// threads stay where they are; the descriptor keeps the device in that
/// namespace, where the frames of the VM behind it reach nothing but what
/// listens there.
pub fn open_in(netns: &std::path::Path, name: &str) -> Result<File, TapError> {
    if !valid_name(name) {
        return Err(TapError::Name);
    }
    let ns_err = |source: io::Error| TapError::Namespace {
        path: netns.to_owned(),
        source,
    };
    let ns = File::open(netns).map_err(ns_err)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| ns_err(e.into()))?;
                open(name)
            })
            .join()
            .unwrap_or_else(|_| Err(ns_err(io::Error::other("the tap thread panicked"))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        for name in [
            "",
            "sixteen-bytes-xx",
            "a/b",
            "a b",
            "a\0b",
            ".",
            "..",
            "a:1",
        ] {
            assert!(matches!(open(name), Err(TapError::Name)), "{name:?}");
        }
        assert!(valid_name("nitrile-tap0"));
        assert!(valid_name("fifteen-bytes-x"));
    }

    /// The interfaces of the calling thread's network namespace.
    fn interfaces() -> Vec<String> {
        std::fs::read_to_string("/proc/thread-self/net/dev")
            .unwrap()
            .lines()
            .skip(2)
            .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_owned()))
            .collect()
    }

    /// In a network namespace of its own (so the host never sees it), a
    /// tap appears when opened and is gone with its descriptor.
    #[test]
    fn a_tap_is_created_and_goes_with_its_descriptor() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: creating a tap and a network namespace needs root");
            return;
        }
        if !std::path::Path::new(TUN_PATH).exists() {
            println!("SKIPPED: no {TUN_PATH}");
            return;
        }
        std::thread::spawn(|| {
            // Affects this thread only, which ends with the test.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            assert!(!interfaces().iter().any(|i| i == "nitrile-t0"));
            let tap = open("nitrile-t0").unwrap();
            assert!(
                interfaces().iter().any(|i| i == "nitrile-t0"),
                "{:?}",
                interfaces()
            );
            // Attaching twice to a non-persistent tap in use is refused.
            assert!(matches!(open("nitrile-t0"), Err(TapError::Attach(_))));
            drop(tap);
            assert!(!interfaces().iter().any(|i| i == "nitrile-t0"));
        })
        .join()
        .unwrap();
    }
}
