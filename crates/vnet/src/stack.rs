//! The guest stack of one instance: the host end of the instance's link
//! that answers as the gateway and as the instance metadata service.
//!
//! The switch hands a [`GuestStack`] every Ethernet frame the instance sends
//! to the gateway IP or to [`METADATA_ADDR`]; the stack runs a user-space
//! TCP/IP stack (smoltcp, Ethernet medium) holding two addresses, the gateway
//! IP with the instance network's prefix and `169.254.169.254/32`, with the
//! instance as its only neighbour. On it run:
//!
//! - the **instance metadata service**, HTTP/1.1 on `169.254.169.254:80`
//!   with IMDSv2-like session tokens:
//!   a `PUT /latest/api/token` issues a random 256-bit token valid for the
//!   TTL asked (1..=21600 s), refused with 403 when it carries
//!   `X-Forwarded-For`; every `GET` must present a live token (else 401).
//!   Every segment the service sends leaves with IP TTL 1, so a process
//!   routing for the guest cannot forward an answer on;
//! - the **ingress relay**: [`GuestStack::ingress`] takes a host-side TCP
//!   connection accepted for a published port and relays it, byte for byte
//!   in both directions with back pressure, to a TCP connection it opens
//!   from the gateway IP to the instance.
//!
//! Guarantees: the stack never panics on any frame; it accepts only frames
//! whose Ethernet source is the instance's MAC and whose ARP or IPv4 sender
//! is the instance's IP (the switch checks this too); every queue and buffer
//! is bounded by a named `MAX_*` constant (frames, request heads, sessions,
//! connections), and time is what the caller passes as `now`, never read
//! from a clock. Not guaranteed here: which frames reach the stack (the
//! switch decides), and anything about the contents of the metadata (the
//! host signed the identity document; the stack serves it verbatim).
#![forbid(unsafe_code)]

mod device;
mod ingress;
mod metadata;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    HardwareAddress, IpCidr, Ipv4Cidr, Ipv4Packet,
};

use device::Frames;
use ingress::IngressConn;
use metadata::{MetadataService, Sessions};

pub use metadata::{MAX_REQUEST_HEAD, MAX_REQUEST_HEADERS, MAX_SESSIONS, MAX_TOKEN_TTL_SECONDS};

/// The link-local address of the instance metadata service.
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The TCP port of the instance metadata service.
pub const METADATA_PORT: u16 = 80;
/// The IP MTU of the instance's link as the stack sees it.
pub const MTU: usize = 1500;
/// The longest frame the stack accepts (an MTU-sized IPv4 packet, its
/// Ethernet header and one VLAN tag); longer frames are dropped.
pub const MAX_FRAME_LEN: usize = MTU + 18;
/// Frames queued in each direction between the stack and the switch; more
/// incoming frames are dropped, and the stack stops sending until `poll`.
pub const MAX_PENDING_FRAMES: usize = 128;
/// Concurrent TCP connections to the metadata service: a fixed set of
/// listening sockets, each re-armed after its connection closes.
pub const MAX_METADATA_CONNECTIONS: usize = 8;
/// How long a metadata connection may take from its accept to its close
/// (reading the request and sending the answer); then it is reset.
pub const METADATA_CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Concurrent ingress connections per instance; more are closed at once.
pub const MAX_INGRESS_CONNECTIONS: usize = 64;
/// Bytes buffered per direction of an ingress connection in the stack (the
/// send and receive buffers of its TCP socket towards the instance).
pub const INGRESS_BUFFER: usize = 64 * 1024;
/// How long the instance has to accept an ingress connection.
pub const INGRESS_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// An ingress connection that moves no byte for this long is dropped.
pub const INGRESS_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// While ingress connections are open, `poll_delay` asks for a poll at least
/// this often (the host side of a relay is read only when the stack polls).
pub const INGRESS_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How often the instance's entry in the stack's neighbour cache is
/// renewed from the configuration (smoltcp forgets entries after 60 s).
const NEIGHBOUR_RENEWAL: Duration = Duration::from_secs(20);
/// Rounds of processing and emitting one `poll` runs at most.
const MAX_POLL_ROUNDS: usize = 16;

/// What the metadata service tells one instance about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceMetadata {
    pub instance_id: String,
    pub local_ipv4: Ipv4Addr,
    pub mac: [u8; 6],
    pub ssh_public_keys: Vec<String>,
    pub user_data: Vec<u8>,
    /// The instance identity document, signed by the host; served verbatim.
    pub identity_document: Vec<u8>,
}

/// The addresses of one instance's link and what its metadata service serves.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// The gateway's MAC (the stack's own); a multicast bit set here is
    /// cleared, as an interface's address must be unicast.
    pub gateway_mac: [u8; 6],
    pub gateway_ip: Ipv4Addr,
    pub instance_mac: [u8; 6],
    pub instance_ip: Ipv4Addr,
    /// The instance network's prefix length (more than 32 is taken as 32;
    /// shortened as far as needed for the instance's IP to be on the link).
    pub prefix_len: u8,
    pub metadata: Arc<InstanceMetadata>,
}

/// What a stack has seen and done since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StackCounters {
    /// Frames handed to [`GuestStack::receive`].
    pub frames_received: u64,
    /// Of those, dropped: too long, not from the instance, or the queue full.
    pub frames_dropped: u64,
    /// Frames emitted by [`GuestStack::poll`].
    pub frames_sent: u64,
    /// Metadata requests answered (any status).
    pub metadata_requests: u64,
    /// Of those, answered with a 4xx or 5xx status.
    pub metadata_refused: u64,
    /// Metadata connections reset at their deadline.
    pub metadata_timeouts: u64,
    /// Ingress connections taken for relaying.
    pub ingress_accepted: u64,
    /// Ingress connections closed at once (cap reached, bad port, socket error).
    pub ingress_refused: u64,
    /// Ingress connections dropped on a timeout (connect or idle).
    pub ingress_timeouts: u64,
}

/// The gateway and metadata service of one instance (see the module docs).
pub struct GuestStack {
    gateway_ip: Ipv4Addr,
    instance_ip: Ipv4Addr,
    gateway_mac: EthernetAddress,
    instance_mac: EthernetAddress,
    metadata: Arc<InstanceMetadata>,
    iface: Interface,
    sockets: SocketSet<'static>,
    frames: Frames,
    service: MetadataService,
    sessions: Sessions,
    ingress: Vec<IngressConn>,
    next_local_port: u16,
    /// The caller's `now` that smoltcp's time zero stands for (the first seen).
    epoch: Option<Instant>,
    last_timestamp: SmolInstant,
    neighbour_renewed: Option<Instant>,
    /// When smoltcp wants to be polled next, as of the last processing.
    iface_poll_at: Option<SmolInstant>,
    /// Work is waiting that only a processing round does (a new relay).
    pending_work: bool,
    counters: StackCounters,
}

impl std::fmt::Debug for GuestStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestStack")
            .field("gateway_ip", &self.gateway_ip)
            .field("instance_ip", &self.instance_ip)
            .field("instance_id", &self.metadata.instance_id)
            .field("ingress_connections", &self.ingress.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl GuestStack {
    /// A stack for one instance's link; no frame moves until `receive`/`poll`.
    pub fn new(cfg: StackConfig) -> Self {
        let mut gateway_mac = EthernetAddress(cfg.gateway_mac);
        if !gateway_mac.is_unicast() {
            gateway_mac.0[0] &= !1;
        }
        let instance_mac = EthernetAddress(cfg.instance_mac);
        // The instance must be on the gateway's link for smoltcp to reach
        // it (a /32 link, say): widen the prefix until it is.
        let common = (u32::from(cfg.gateway_ip) ^ u32::from(cfg.instance_ip)).leading_zeros();
        let prefix_len = cfg
            .prefix_len
            .min(u8::try_from(common).unwrap_or(32))
            .min(32);
        let seed = RandomState::new().build_hasher().finish();

        let mut frames = Frames::default();
        let mut config = Config::new(HardwareAddress::Ethernet(gateway_mac));
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut frames, SmolInstant::ZERO);
        iface.update_ip_addrs(|addrs| {
            // Two addresses fit the interface's fixed capacity of two.
            let _ = addrs.push(IpCidr::Ipv4(Ipv4Cidr::new(cfg.gateway_ip, prefix_len)));
            let _ = addrs.push(IpCidr::Ipv4(Ipv4Cidr::new(METADATA_ADDR, 32)));
        });

        let mut sockets = SocketSet::new(Vec::new());
        let service = MetadataService::new(&mut sockets);
        GuestStack {
            gateway_ip: cfg.gateway_ip,
            instance_ip: cfg.instance_ip,
            gateway_mac,
            instance_mac,
            metadata: cfg.metadata,
            iface,
            sockets,
            frames,
            service,
            sessions: Sessions::default(),
            ingress: Vec::new(),
            next_local_port: ingress::EPHEMERAL_PORTS.start()
                + (seed % u64::from(ingress::EPHEMERAL_PORT_COUNT)) as u16,
            epoch: None,
            last_timestamp: SmolInstant::ZERO,
            neighbour_renewed: None,
            iface_poll_at: None,
            pending_work: false,
            counters: StackCounters::default(),
        }
    }

    /// An Ethernet frame from the instance for the gateway or the metadata
    /// address (the switch has already checked its source MAC and IP).
    pub fn receive(&mut self, frame: &[u8], now: Instant) {
        self.counters.frames_received += 1;
        if frame.len() > MAX_FRAME_LEN
            || !self.is_from_instance(frame)
            || !self.frames.push_rx(frame)
        {
            self.counters.frames_dropped += 1;
            return;
        }
        self.process(now);
    }

    /// Emits the frames to send to the instance.
    pub fn poll(&mut self, now: Instant, emit: &mut dyn FnMut(&[u8])) {
        for _ in 0..MAX_POLL_ROUNDS {
            self.process(now);
            if !self.frames.has_tx() {
                break;
            }
            while let Some(frame) = self.frames.pop_tx() {
                emit(&frame);
                self.counters.frames_sent += 1;
                self.frames.recycle(frame);
            }
        }
    }

    /// How soon `poll` wants to run again (None: only on input).
    pub fn poll_delay(&self, now: Instant) -> Option<Duration> {
        if self.frames.has_tx() || self.frames.has_rx() || self.pending_work {
            return Some(Duration::ZERO);
        }
        let mut at: Option<Instant> = self.iface_poll_at.and_then(|t| self.to_std(t));
        let mut earliest = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        for deadline in self.service.deadlines() {
            earliest(deadline);
        }
        for conn in &self.ingress {
            if let Some(deadline) = conn.deadline() {
                earliest(deadline);
            }
        }
        let delay = at.map(|t| t.saturating_duration_since(now));
        if self.ingress.is_empty() {
            delay
        } else {
            Some(delay.map_or(INGRESS_POLL_INTERVAL, |d| d.min(INGRESS_POLL_INTERVAL)))
        }
    }

    /// An accepted ingress connection for `instance_port` (a non-blocking
    /// std TcpStream; the stack owns it and relays it).
    pub fn ingress(&mut self, stream: TcpStream, instance_port: u16) {
        if self.ingress.len() >= MAX_INGRESS_CONNECTIONS || instance_port == 0 {
            self.counters.ingress_refused += 1;
            return;
        }
        let Some(local_port) = self.allocate_local_port() else {
            self.counters.ingress_refused += 1;
            return;
        };
        match IngressConn::open(
            &mut self.iface,
            &mut self.sockets,
            stream,
            (self.gateway_ip, local_port),
            (self.instance_ip, instance_port),
        ) {
            Some(conn) => {
                self.ingress.push(conn);
                self.counters.ingress_accepted += 1;
                self.pending_work = true;
            }
            None => self.counters.ingress_refused += 1,
        }
    }

    /// Metadata connections open now (accepted, not yet re-armed).
    pub fn metadata_connections(&self) -> usize {
        self.service.active(&self.sockets)
    }

    /// Ingress connections being relayed now.
    pub fn ingress_connections(&self) -> usize {
        self.ingress.len()
    }

    /// Bytes the stack holds for ingress connections (both directions): at
    /// most `2 * INGRESS_BUFFER` per connection.
    pub fn ingress_buffered(&self) -> usize {
        self.ingress.iter().map(|c| c.buffered(&self.sockets)).sum()
    }

    /// Metadata session tokens live now (at most [`MAX_SESSIONS`]).
    pub fn sessions(&self, now: Instant) -> usize {
        self.sessions.live(now)
    }

    /// What the stack has seen and done.
    pub fn counters(&self) -> StackCounters {
        self.counters
    }

    /// One round: smoltcp takes the queued frames, the services and relays
    /// run, smoltcp sends what they produced.
    fn process(&mut self, now: Instant) {
        let timestamp = self.timestamp(now);
        self.renew_neighbour(now);
        self.pending_work = false;
        self.service.rearm(&mut self.sockets);
        self.iface
            .poll(timestamp, &mut self.frames, &mut self.sockets);
        self.service.run(
            now,
            &mut self.sockets,
            &mut self.sessions,
            &self.metadata,
            &mut self.counters,
        );
        let counters = &mut self.counters;
        let sockets = &mut self.sockets;
        self.ingress
            .retain_mut(|conn| conn.run(now, sockets, counters) == ingress::Keep::Yes);
        self.iface
            .poll(timestamp, &mut self.frames, &mut self.sockets);
        self.iface_poll_at = self.iface.poll_at(timestamp, &self.sockets);
    }

    /// The smoltcp timestamp of `now`: time since the first `now` seen,
    /// never going backwards.
    fn timestamp(&mut self, now: Instant) -> SmolInstant {
        let epoch = *self.epoch.get_or_insert(now);
        let micros = now.saturating_duration_since(epoch).as_micros();
        let timestamp = SmolInstant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX));
        self.last_timestamp = self.last_timestamp.max(timestamp);
        self.last_timestamp
    }

    fn to_std(&self, timestamp: SmolInstant) -> Option<Instant> {
        let micros = u64::try_from(timestamp.total_micros()).unwrap_or(0);
        self.epoch?.checked_add(Duration::from_micros(micros))
    }

    /// Seeds (and renews) the instance's MAC in smoltcp's neighbour cache by
    /// a synthetic ARP reply from the instance: smoltcp has no other way in,
    /// and the reply needs no answer.
    fn renew_neighbour(&mut self, now: Instant) {
        if self
            .neighbour_renewed
            .is_some_and(|at| now.saturating_duration_since(at) < NEIGHBOUR_RENEWAL)
        {
            return;
        }
        self.neighbour_renewed = Some(now);
        let mut frame = [0u8; 14 + 28];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.set_src_addr(self.instance_mac);
        eth.set_dst_addr(self.gateway_mac);
        eth.set_ethertype(EthernetProtocol::Arp);
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: self.instance_mac,
            source_protocol_addr: self.instance_ip,
            target_hardware_addr: self.gateway_mac,
            target_protocol_addr: self.gateway_ip,
        };
        arp.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
        self.frames.push_rx_front(&frame);
    }

    /// Whether a frame claims to come from the instance: its Ethernet
    /// source is the instance's MAC and its ARP or IPv4 sender the
    /// instance's IP. Anything else (other ethertypes included) is dropped.
    fn is_from_instance(&self, frame: &[u8]) -> bool {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return false;
        };
        if eth.src_addr() != self.instance_mac {
            return false;
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => ArpPacket::new_checked(eth.payload())
                .and_then(|p| ArpRepr::parse(&p))
                .is_ok_and(|repr| match repr {
                    ArpRepr::EthernetIpv4 {
                        source_hardware_addr,
                        source_protocol_addr,
                        ..
                    } => {
                        source_hardware_addr == self.instance_mac
                            && source_protocol_addr == self.instance_ip
                    }
                    _ => false,
                }),
            EthernetProtocol::Ipv4 => Ipv4Packet::new_checked(eth.payload())
                .is_ok_and(|p| p.src_addr() == self.instance_ip),
            _ => false,
        }
    }

    /// A local port for a new relay, from the ephemeral range, not in use.
    fn allocate_local_port(&mut self) -> Option<u16> {
        for _ in 0..ingress::EPHEMERAL_PORT_COUNT {
            let port = self.next_local_port;
            self.next_local_port = if port >= *ingress::EPHEMERAL_PORTS.end() {
                *ingress::EPHEMERAL_PORTS.start()
            } else {
                port + 1
            };
            if !self.ingress.iter().any(|c| c.local_port() == port) {
                return Some(port);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack() -> GuestStack {
        GuestStack::new(StackConfig {
            gateway_mac: [0x02, 0, 0, 0, 0, 1],
            gateway_ip: Ipv4Addr::new(10, 0, 0, 1),
            instance_mac: [0x02, 0, 0, 0, 0, 2],
            instance_ip: Ipv4Addr::new(10, 0, 0, 2),
            prefix_len: 24,
            metadata: Arc::new(InstanceMetadata {
                instance_id: "i-1".into(),
                local_ipv4: Ipv4Addr::new(10, 0, 0, 2),
                mac: [0x02, 0, 0, 0, 0, 2],
                ssh_public_keys: vec![],
                user_data: vec![],
                identity_document: vec![],
            }),
        })
    }

    fn ipv4_frame(src_mac: [u8; 6], src_ip: Ipv4Addr) -> Vec<u8> {
        let mut frame = vec![0u8; 14 + 20];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.set_src_addr(EthernetAddress(src_mac));
        eth.set_dst_addr(EthernetAddress([0x02, 0, 0, 0, 0, 1]));
        eth.set_ethertype(EthernetProtocol::Ipv4);
        let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len(20);
        ip.set_src_addr(src_ip);
        ip.set_dst_addr(METADATA_ADDR);
        frame
    }

    #[test]
    fn frames_not_from_the_instance_are_dropped() {
        let s = stack();
        assert!(s.is_from_instance(&ipv4_frame([2, 0, 0, 0, 0, 2], Ipv4Addr::new(10, 0, 0, 2))));
        // Another MAC, another source IP, another ethertype, a runt.
        assert!(!s.is_from_instance(&ipv4_frame([2, 0, 0, 0, 0, 3], Ipv4Addr::new(10, 0, 0, 2))));
        assert!(!s.is_from_instance(&ipv4_frame([2, 0, 0, 0, 0, 2], Ipv4Addr::new(10, 0, 0, 3))));
        let mut ipv6 = ipv4_frame([2, 0, 0, 0, 0, 2], Ipv4Addr::new(10, 0, 0, 2));
        EthernetFrame::new_unchecked(&mut ipv6[..]).set_ethertype(EthernetProtocol::Ipv6);
        assert!(!s.is_from_instance(&ipv6));
        assert!(!s.is_from_instance(&[0u8; 10]));
    }

    #[test]
    fn a_dropped_frame_is_counted_and_not_queued() {
        let mut s = stack();
        let now = Instant::now();
        s.receive(
            &ipv4_frame([2, 0, 0, 0, 0, 9], Ipv4Addr::new(10, 0, 0, 2)),
            now,
        );
        s.receive(&vec![0u8; MAX_FRAME_LEN + 1], now);
        let c = s.counters();
        assert_eq!((c.frames_received, c.frames_dropped), (2, 2));
        assert!(!s.frames.has_rx());
    }

    #[test]
    fn a_multicast_gateway_mac_is_made_unicast() {
        let s = GuestStack::new(StackConfig {
            gateway_mac: [0xff; 6],
            gateway_ip: Ipv4Addr::new(10, 0, 0, 1),
            instance_mac: [0x02, 0, 0, 0, 0, 2],
            instance_ip: Ipv4Addr::new(10, 0, 0, 2),
            prefix_len: 200,
            metadata: stack().metadata,
        });
        assert!(s.gateway_mac.is_unicast());
    }

    #[test]
    fn time_never_goes_backwards() {
        let mut s = stack();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(5);
        assert_eq!(s.timestamp(t0), SmolInstant::ZERO);
        assert_eq!(s.timestamp(later), SmolInstant::from_secs(5));
        assert_eq!(s.timestamp(t0), SmolInstant::from_secs(5));
        assert_eq!(s.to_std(SmolInstant::from_secs(5)), Some(later));
    }

    #[test]
    fn local_ports_in_use_are_skipped() {
        let mut s = stack();
        let first = s.allocate_local_port().expect("a port");
        assert!(ingress::EPHEMERAL_PORTS.contains(&first));
        let second = s.allocate_local_port().expect("a port");
        assert_ne!(first, second);
    }
}
