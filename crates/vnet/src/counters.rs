//! What the data path counts: frames and bytes each way, datagrams on the
//! tunnel socket, and every dropped frame or datagram by its reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nitrile_api::Name;

/// Why a frame from an instance, or a datagram from the underlay, was
/// dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// shorter than its headers say, or not parseable
    Malformed,
    /// longer than [`crate::MAX_FRAME_LEN`] (the instance MTU)
    Oversize,
    /// Ethernet source is not the port's instance MAC
    SourceMac,
    /// Ethernet destination is neither the gateway MAC nor, for ARP and
    /// DHCP, broadcast
    DestinationMac,
    /// an ethertype other than IPv4 and ARP (IPv6 among them)
    Ethertype,
    /// ARP whose sender is not the instance (spoofing)
    ArpSpoofed,
    /// ARP other than a request (replies, and the like)
    ArpNotRequest,
    /// an ARP request that needs no answer: gratuitous, for the instance's
    /// own address, or outside the prefix
    ArpUnanswered,
    /// IPv4 whose source address is not the instance's
    SourceAddress,
    /// DHCP that the server does not answer (another client, another
    /// server, an unsupported message)
    Dhcp,
    /// broadcast or multicast IPv4
    Broadcast,
    /// a destination outside the instance's prefix
    OutsidePrefix,
    /// no instance of the port's network at the destination address
    NoRoute,
    /// routed to a host that is not a peer
    NoPeer,
    /// a datagram from an endpoint that is no peer
    TunnelUnknownSource,
    /// a datagram the peer's WireGuard session refused
    TunnelRejected,
    /// a tunnel packet not of the data path's inner form
    TunnelMalformed,
    /// a tunnel packet whose inner source is not routed to the peer that
    /// sent it
    TunnelSourceNotRouted,
    /// a tunnel packet for no local instance of its network
    TunnelNoLocalPort,
    /// the kernel refused to write a frame or datagram
    SendFailed,
}

impl DropReason {
    /// Every reason, in order.
    pub const ALL: [DropReason; 20] = [
        Self::Malformed,
        Self::Oversize,
        Self::SourceMac,
        Self::DestinationMac,
        Self::Ethertype,
        Self::ArpSpoofed,
        Self::ArpNotRequest,
        Self::ArpUnanswered,
        Self::SourceAddress,
        Self::Dhcp,
        Self::Broadcast,
        Self::OutsidePrefix,
        Self::NoRoute,
        Self::NoPeer,
        Self::TunnelUnknownSource,
        Self::TunnelRejected,
        Self::TunnelMalformed,
        Self::TunnelSourceNotRouted,
        Self::TunnelNoLocalPort,
        Self::SendFailed,
    ];

    /// A short stable name, for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Oversize => "oversize",
            Self::SourceMac => "source_mac",
            Self::DestinationMac => "destination_mac",
            Self::Ethertype => "ethertype",
            Self::ArpSpoofed => "arp_spoofed",
            Self::ArpNotRequest => "arp_not_request",
            Self::ArpUnanswered => "arp_unanswered",
            Self::SourceAddress => "source_address",
            Self::Dhcp => "dhcp",
            Self::Broadcast => "broadcast",
            Self::OutsidePrefix => "outside_prefix",
            Self::NoRoute => "no_route",
            Self::NoPeer => "no_peer",
            Self::TunnelUnknownSource => "tunnel_unknown_source",
            Self::TunnelRejected => "tunnel_rejected",
            Self::TunnelMalformed => "tunnel_malformed",
            Self::TunnelSourceNotRouted => "tunnel_source_not_routed",
            Self::TunnelNoLocalPort => "tunnel_no_local_port",
            Self::SendFailed => "send_failed",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// The WireGuard session with one peer host.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelStats {
    pub host: Name,
    pub endpoint: SocketAddr,
    /// Since the last completed handshake (`None`: none yet).
    pub since_handshake: Option<Duration>,
    /// Inner bytes sent and received through the session.
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// A snapshot of the data path's counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Frames and bytes read from instances.
    pub frames_from_instances: u64,
    pub bytes_from_instances: u64,
    /// Frames and bytes written to instances.
    pub frames_to_instances: u64,
    pub bytes_to_instances: u64,
    /// Datagrams and bytes on the WireGuard socket, each way.
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub udp_bytes_in: u64,
    pub udp_bytes_out: u64,
    /// Frames answered by the data path itself (ARP, DHCP).
    pub answered: u64,
    /// Dropped frames and datagrams by reason (reasons never seen left out).
    pub drops: BTreeMap<DropReason, u64>,
    /// One entry per peer host.
    pub tunnels: Vec<TunnelStats>,
}

impl Counters {
    /// How many were dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.get(&reason).copied().unwrap_or(0)
    }
}

/// The live counters, shared between the data path's thread and readers.
#[derive(Debug, Default)]
pub(crate) struct LiveCounters {
    pub(crate) frames_from_instances: AtomicU64,
    pub(crate) bytes_from_instances: AtomicU64,
    pub(crate) frames_to_instances: AtomicU64,
    pub(crate) bytes_to_instances: AtomicU64,
    pub(crate) datagrams_in: AtomicU64,
    pub(crate) datagrams_out: AtomicU64,
    pub(crate) udp_bytes_in: AtomicU64,
    pub(crate) udp_bytes_out: AtomicU64,
    pub(crate) answered: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

pub(crate) fn bump(c: &AtomicU64, by: usize) {
    c.fetch_add(by as u64, Ordering::Relaxed);
}

impl LiveCounters {
    pub(crate) fn drop(&self, reason: DropReason) {
        bump(&self.drops[reason.index()], 1);
    }

    pub(crate) fn snapshot(&self, tunnels: Vec<TunnelStats>) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            frames_from_instances: get(&self.frames_from_instances),
            bytes_from_instances: get(&self.bytes_from_instances),
            frames_to_instances: get(&self.frames_to_instances),
            bytes_to_instances: get(&self.bytes_to_instances),
            datagrams_in: get(&self.datagrams_in),
            datagrams_out: get(&self.datagrams_out),
            udp_bytes_in: get(&self.udp_bytes_in),
            udp_bytes_out: get(&self.udp_bytes_out),
            answered: get(&self.answered),
            drops: DropReason::ALL
                .iter()
                .map(|r| (*r, get(&self.drops[r.index()])))
                .filter(|(_, n)| *n > 0)
                .collect(),
            tunnels,
        }
    }
}
