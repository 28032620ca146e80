//! The data path's own network namespace, where the instances' taps live.

use std::os::fd::{AsFd, OwnedFd};

use nitrile_vmm_sys::netns;
use nitrile_vmm_sys::packet::PacketSocket;

use crate::VnetError;

/// A named network namespace holding only `lo` (up, no addresses beyond
/// its own) and the taps of instance ports: IPv6 is off and ARP is never
/// answered (`arp_ignore = 8`) for every interface in it, so the kernel
/// neither routes, answers nor originates anything on a tap.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    fd: OwnedFd,
}

/// The sysctls set in the namespace, defaults (for interfaces made later)
/// and `all` alike.
const NAMESPACE_SYSCTLS: [(&str, &str); 6] = [
    ("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1"),
    ("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"),
    ("/proc/sys/net/ipv4/conf/default/arp_ignore", "8"),
    ("/proc/sys/net/ipv4/conf/all/arp_ignore", "8"),
    ("/proc/sys/net/ipv4/ip_forward", "0"),
    ("/proc/sys/net/ipv4/conf/all/forwarding", "0"),
];

fn sysctl(path: &str, value: &str) -> Result<(), VnetError> {
    // No IPv6 in this kernel at all: nothing to turn off.
    if path.contains("/ipv6/") && !std::path::Path::new("/proc/sys/net/ipv6").exists() {
        return Ok(());
    }
    std::fs::write(path, value).map_err(|e| VnetError::Sysctl(path.to_owned(), e))
}

impl Namespace {
    /// Opens the namespace `name` (under `/run/netns`), making it if it is
    /// missing, and (again) turns IPv6 off, ARP answers off and `lo` up.
    pub fn open_or_create(name: &str) -> Result<Self, VnetError> {
        let (fd, _made) = netns::open_or_create(name)?;
        let ns = Self {
            name: name.to_owned(),
            fd,
        };
        ns.run(|| {
            for (path, value) in NAMESPACE_SYSCTLS {
                sysctl(path, value)?;
            }
            netns::set_link_up("lo").map_err(|e| VnetError::Link("lo".to_owned(), e))
        })??;
        Ok(ns)
    }

    /// Removes the namespace file `name`; the namespace lives on while
    /// anything holds it.
    pub fn remove(name: &str) -> Result<(), VnetError> {
        Ok(netns::remove(name)?)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread of its own inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, VnetError> {
        Ok(netns::run_in(self.fd.as_fd(), f)?)
    }

    /// Makes the tap `name` in the namespace and returns the descriptor the
    /// VMM holds (the tap goes with its last descriptor); refused if an
    /// interface of that name exists.
    pub fn create_tap(&self, name: &str) -> Result<OwnedFd, VnetError> {
        self.run(|| {
            if nix::net::if_::if_nametoindex(name).is_ok() {
                return Err(VnetError::TapExists(name.to_owned()));
            }
            open_and_prepare(name)
        })?
    }

    /// Opens the tap `name` in the namespace, making it if missing.
    pub fn open_tap(&self, name: &str) -> Result<OwnedFd, VnetError> {
        self.run(|| open_and_prepare(name))?
    }

    /// Prepares the tap `name` (IPv6 off, ARP answers off, up) and binds a
    /// packet socket to it, inside the namespace.
    pub(crate) fn bind_port(&self, tap: &str) -> Result<PacketSocket, VnetError> {
        self.run(|| {
            prepare(tap)?;
            PacketSocket::bind(tap).map_err(|e| VnetError::PacketSocket(tap.to_owned(), e))
        })?
    }
}

fn open_and_prepare(name: &str) -> Result<OwnedFd, VnetError> {
    let tap = nitrile_vmm_sys::tap::open(name).map_err(|e| VnetError::Tap(name.to_owned(), e))?;
    prepare(name)?;
    Ok(tap.into())
}

/// Called in the namespace: IPv6 off and ARP answers off on the tap
/// (defence in depth beside the namespace defaults), then up.
fn prepare(tap: &str) -> Result<(), VnetError> {
    if !nitrile_vmm_sys::tap::valid_name(tap) {
        return Err(VnetError::TapName(tap.to_owned()));
    }
    sysctl(&format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1")?;
    sysctl(&format!("/proc/sys/net/ipv4/conf/{tap}/arp_ignore"), "8")?;
    netns::set_link_up(tap).map_err(|e| VnetError::Link(tap.to_owned(), e))
}
