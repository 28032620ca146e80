//! The host data path of instance networks: what connects each instance
//! (a microVM) to its customer's virtual network, and hosts to each other.
//!
//! What it guarantees:
//! - **What reaches an instance.** An instance's NIC is a tap in a network
//!   namespace of the data path's own ([`Namespace`]: only `lo` up, no
//!   addresses, IPv6 off, ARP never answered by the kernel), read and
//!   written only through an `AF_PACKET` socket bound to that tap. Frames
//!   reach no host address and no other tap but through this code. An
//!   instance receives only: the data path's answers (proxy ARP for its
//!   prefix and the metadata address with [`GATEWAY_MAC`], its own DHCP
//!   lease), frames of its port's stack ([`stack`]: the gateway and
//!   metadata addresses, published ports), and IPv4 packets from instances
//!   of its own network (VNI) whose source address is routed where they
//!   came from. Nothing else from outside: ingress is only the TCP ports
//!   published with [`DataPath::publish`].
//! - **What an instance may send.** Only frames from its own MAC; ARP
//!   requests from its own MAC and address; IPv4 from its own address
//!   (DHCP from 0.0.0.0 excepted, answered here); to an address of its
//!   prefix that is an instance of its own network, the gateway or the
//!   metadata address. Everything else (IPv6, other ethertypes, spoofed
//!   MAC or address, gratuitous ARP, broadcast, multicast, addresses
//!   outside the prefix) is dropped and counted by [`DropReason`].
//! - **What never leaves a VNI.** A packet is forwarded only to a port of
//!   the sender's VNI, locally or through the route table to a peer host,
//!   where the receiving data path checks again that the inner source is
//!   routed, for that VNI, to the host that sent it.
//! - **Host to host: WireGuard** (`boringtun`'s protocol core): each
//!   instance packet crosses the underlay only encrypted, in one session
//!   per peer host; a datagram from an endpoint that is no peer is
//!   dropped. The data path's static X25519 key is made from the OS RNG at
//!   [`DataPath::start`], lives only in the data path's memory (never
//!   written, printed or returned; zeroized when dropped) and only its
//!   public half leaves ([`DataPath::public_key`]).
//! - **No plaintext tunnel in a real build.** The cargo feature
//!   `danger-plaintext-tunnel` (off by default, enabled by no crate of the
//!   workspace, with no config key or environment variable behind it) adds
//!   `DataPath::start_danger_plaintext_tunnel`: the same data path with the
//!   inner packets sent between hosts in the clear, the baseline of the
//!   `tunnel` benchmark (`cargo bench -p nitrile-vnet --bench tunnel
//!   --features danger-plaintext-tunnel`). Without it, a datagram in that
//!   form from a peer's endpoint is refused by the peer's WireGuard session
//!   and dropped.
//!
//! What it does not do: authenticate peers' announcements (its caller,
//! the host agent, verifies them against the cell CA before
//! [`DataPath::set_peers`]), egress to the internet, IPv6, or anything
//! above IPv4 for forwarded traffic (the stack serves the gateway).

#![forbid(unsafe_code)]

mod counters;
mod datapath;
pub mod dhcp;
mod namespace;
pub mod stack;
mod switch;
mod wire;

use std::io;

pub use counters::{Counters, DropReason, TunnelStats};
pub use datapath::{DataPath, DataPathConfig, Peer, PortConfig, Route};
pub use namespace::Namespace;

/// The MAC address of the gateway, the same on every port: each port is a
/// point-to-point segment whose only other station is the data path.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// The MTU instances are given (DHCP option 26), so that an instance
/// packet, the inner header and WireGuard's framing fit a 1500-byte
/// underlay.
pub const INSTANCE_MTU: u16 = 1380;

/// The longest frame accepted from an instance: the MTU and the Ethernet
/// header.
pub const MAX_FRAME_LEN: usize = INSTANCE_MTU as usize + 14;

/// What went wrong in the data path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VnetError {
    /// the data path's network namespace could not be made or entered
    #[error("the data path's network namespace")]
    Netns(#[from] nitrile_vmm_sys::netns::NetnsError),
    /// a sysctl of the namespace could not be set
    #[error("setting {0}")]
    Sysctl(String, #[source] io::Error),
    /// an interface could not be set up
    #[error("setting interface {0} up")]
    Link(String, #[source] io::Error),
    /// misuse: not a valid interface name
    #[error("invalid tap name {0:?}")]
    TapName(String),
    /// the tap already exists
    #[error("tap {0} already exists")]
    TapExists(String),
    /// the tap could not be opened or made
    #[error("opening tap {0}")]
    Tap(String, #[source] nitrile_vmm_sys::tap::TapError),
    /// no packet socket on the tap
    #[error("binding a packet socket to tap {0}")]
    PacketSocket(String, #[source] nitrile_vmm_sys::packet::PacketError),
    /// a socket of the data path (WireGuard, ingress, wake-up) failed
    #[error("socket for {0}")]
    Socket(&'static str, #[source] io::Error),
    /// the published port could not be bound
    #[error("binding published port {0}")]
    Publish(std::net::SocketAddr, #[source] io::Error),
    /// misuse: the port's addresses make no sense (prefix not 1..=30, a
    /// group, zero or gateway MAC, the network, broadcast or gateway
    /// address)
    #[error("invalid addresses for instance {0}")]
    PortAddress(nitrile_api::Name),
    /// misuse: another port of the same network has that address or MAC
    #[error("instance {0} would take an address or MAC another port of its network has")]
    AddressInUse(nitrile_api::Name),
    /// misuse: no port for that instance
    #[error("no port for instance {0}")]
    NoPort(nitrile_api::Name),
    /// misuse: the same peer host or endpoint given twice
    #[error("peer {0} given twice (host or endpoint)")]
    DuplicatePeer(nitrile_api::Name),
    /// misuse: the same (VNI, address) routed twice
    #[error("address {1} of network {0} routed twice")]
    DuplicateRoute(u32, std::net::Ipv4Addr),
    /// the data path's thread is gone
    #[error("the data path has stopped")]
    Stopped,
}
