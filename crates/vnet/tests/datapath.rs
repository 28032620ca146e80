//! The data path for real: two data paths ("hosts" a and b) in one process,
//! each with its own network namespace, WireGuard between them on
//! loopback through a relay socket that records every byte on the wire,
//! and taps held by the test as a VMM would hold them, reading and writing
//! raw Ethernet frames as the guests would.
//!
//! Needs root (namespaces, taps); prints `SKIPPED: <reason>` otherwise.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nitrile_api::Name;
use nitrile_vnet::stack::InstanceMetadata;
use nitrile_vnet::{
    DataPath, DataPathConfig, DropReason, GATEWAY_MAC, INSTANCE_MTU, Namespace, Peer, PortConfig,
    Route,
};

const WAIT: Duration = Duration::from_secs(10);
const VNI_A: u32 = 7;
const VNI_B: u32 = 8;

fn skip() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("network namespaces and taps need root");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun");
    }
    None
}

macro_rules! skip_unless_root {
    () => {
        if let Some(why) = skip() {
            println!("SKIPPED: {why}");
            return;
        }
    };
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 80, 0, last)
}

fn mac(last: u8) -> [u8; 6] {
    [0x02, 0x10, 0, 0, 0, last]
}

// ---- frames, built as a guest would ----

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

fn icmp_echo(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0, 0x12, 0x34, 0, 1];
    m.extend_from_slice(payload);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

fn arp(oper: u16, sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&oper.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tpa.octets());
    a
}

/// An IPv4 frame from a guest to the gateway MAC.
fn ip_frame(
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload: &[u8],
) -> Vec<u8> {
    eth(
        GATEWAY_MAC,
        src_mac,
        0x0800,
        &ipv4(src, dst, protocol, payload),
    )
}

fn dhcp_message(chaddr: [u8; 6], kind: u8, requested: Option<Ipv4Addr>) -> Vec<u8> {
    let mut m = vec![0u8; 236];
    m[0] = 1;
    m[1] = 1;
    m[2] = 6;
    m[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    m[28..34].copy_from_slice(&chaddr);
    m.extend_from_slice(&[99, 130, 83, 99, 53, 1, kind]);
    if let Some(r) = requested {
        m.extend_from_slice(&[50, 4]);
        m.extend_from_slice(&r.octets());
    }
    m.push(255);
    let ip = ipv4(
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        17,
        &udp(68, 67, &m),
    );
    eth([0xff; 6], chaddr, 0x0800, &ip)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---- the test's side of a tap: the guest ----

struct Guest {
    tap: OwnedFd,
    mac: [u8; 6],
    ip: Ipv4Addr,
}

impl Guest {
    fn send(&self, frame: &[u8]) {
        nix::unistd::write(&self.tap, frame).unwrap();
    }

    /// The next frame on the tap within `wait`, if any.
    fn recv_within(&self, wait: Duration) -> Option<Vec<u8>> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.tap.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(wait.as_millis() as i32).unwrap();
        if poll(&mut fds, ms).unwrap() == 0 {
            return None;
        }
        let mut buf = vec![0u8; 65536];
        let n = nix::unistd::read(&self.tap, &mut buf).unwrap();
        buf.truncate(n);
        Some(buf)
    }

    fn recv(&self) -> Vec<u8> {
        self.recv_within(WAIT)
            .unwrap_or_else(|| panic!("no frame reached {} in time", self.ip))
    }

    /// Nothing is waiting on the tap now.
    fn assert_nothing(&self) {
        if let Some(f) = self.recv_within(Duration::ZERO) {
            panic!("{} received a frame it must not: {f:02x?}", self.ip);
        }
    }
}

// ---- a host: a data path and its namespace ----

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Removes a namespace file when dropped.
struct NsGuard(String);

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = Namespace::remove(&self.0);
    }
}

struct Host {
    dp: DataPath,
    netns: String,
    name: Name,
    _guard: NsGuard,
}

impl Host {
    fn start(host: &str) -> Host {
        Self::start_with(host, DataPath::start)
    }

    fn start_with(
        host: &str,
        start: fn(DataPathConfig) -> Result<DataPath, nitrile_vnet::VnetError>,
    ) -> Host {
        let netns = format!(
            "nitrile-t{}-{}-{host}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let dp = start(DataPathConfig {
            host: name(host),
            netns: netns.clone(),
            wireguard_listen: "127.0.0.1:0".parse().unwrap(),
            ingress_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        })
        .unwrap();
        Host {
            dp,
            _guard: NsGuard(netns.clone()),
            netns,
            name: name(host),
        }
    }

    /// Makes a tap for `instance` and attaches it.
    fn guest(&self, instance: &str, vni: u32, last: u8) -> Guest {
        let tap = self.dp.namespace().create_tap(instance).unwrap();
        self.dp
            .attach(PortConfig {
                instance: name(instance),
                tap: instance.to_owned(),
                vni,
                mac: mac(last),
                address: ip(last),
                prefix_len: 24,
                metadata: Arc::new(InstanceMetadata {
                    instance_id: instance.to_owned(),
                    local_ipv4: ip(last),
                    mac: mac(last),
                    ssh_public_keys: Vec::new(),
                    user_data: Vec::new(),
                    identity_document: Vec::new(),
                }),
            })
            .unwrap();
        Guest {
            tap,
            mac: mac(last),
            ip: ip(last),
        }
    }

    fn dropped(&self, reason: DropReason) -> u64 {
        self.dp.counters().dropped(reason)
    }

    /// Waits until `reason` was counted more than `before` times.
    fn wait_dropped(&self, reason: DropReason, before: u64) {
        let deadline = Instant::now() + WAIT;
        while self.dropped(reason) <= before {
            assert!(Instant::now() < deadline, "{reason:?} was never counted");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A UDP relay between two endpoints that keeps every byte it carries.
struct Relay {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(a: SocketAddr, b: SocketAddr) -> Relay {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !st.load(Ordering::SeqCst) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                s.lock().unwrap().extend_from_slice(&buf[..n]);
                let to = if from == a { b } else { a };
                let _ = sock.send_to(&buf[..n], to);
            }
        });
        Relay { addr, seen, stop }
    }

    fn seen(&self) -> Vec<u8> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Hosts a and b, peers through a relay, with
/// a1 (a, VNI 7, .10), a3 (a, VNI 8, .30), a5 (a, VNI 7, .50),
/// b2 (b, VNI 7, .20), b4 (b, VNI 8, .40).
struct Cell {
    a: Host,
    b: Host,
    relay: Relay,
    a1: Guest,
    a3: Guest,
    a5: Guest,
    b2: Guest,
    b4: Guest,
}

fn routes() -> Vec<Route> {
    [
        (VNI_A, 10, "a"),
        (VNI_B, 30, "a"),
        (VNI_A, 50, "a"),
        (VNI_A, 20, "b"),
        (VNI_B, 40, "b"),
    ]
    .into_iter()
    .map(|(vni, last, host)| Route {
        vni,
        address: ip(last),
        host: name(host),
    })
    .collect()
}

fn cell() -> Cell {
    cell_with(DataPath::start)
}

fn cell_with(start: fn(DataPathConfig) -> Result<DataPath, nitrile_vnet::VnetError>) -> Cell {
    let a = Host::start_with("a", start);
    let b = Host::start_with("b", start);
    let relay = Relay::start(a.dp.local_endpoint(), b.dp.local_endpoint());
    a.dp.set_peers(vec![Peer {
        host: b.name.clone(),
        public_key: b.dp.public_key(),
        endpoint: relay.addr,
    }])
    .unwrap();
    b.dp.set_peers(vec![Peer {
        host: a.name.clone(),
        public_key: a.dp.public_key(),
        endpoint: relay.addr,
    }])
    .unwrap();
    a.dp.set_routes(routes()).unwrap();
    b.dp.set_routes(routes()).unwrap();
    let a1 = a.guest("a1", VNI_A, 10);
    let a3 = a.guest("a3", VNI_B, 30);
    let a5 = a.guest("a5", VNI_A, 50);
    let b2 = b.guest("b2", VNI_A, 20);
    let b4 = b.guest("b4", VNI_B, 40);
    Cell {
        a,
        b,
        relay,
        a1,
        a3,
        a5,
        b2,
        b4,
    }
}

/// Sends a UDP datagram carrying `marker` from `from` to `to` (across
/// whatever path) and returns the frame `to` receives.
fn udp_between(from: &Guest, to: &Guest, marker: &[u8]) -> Vec<u8> {
    from.send(&ip_frame(
        from.mac,
        from.ip,
        to.ip,
        17,
        &udp(4000, 5000, marker),
    ));
    let f = to.recv();
    assert!(
        contains(&f, marker),
        "the frame at {} lacks the marker",
        to.ip
    );
    f
}

#[test]
fn taps_live_only_in_the_data_path_namespace() {
    skip_unless_root!();
    let a = Host::start("a");
    let _g = a.guest("nitrile-iso0", VNI_A, 10);
    assert!(std::path::Path::new(&format!("/run/netns/{}", a.netns)).exists());
    assert!(!std::path::Path::new("/sys/class/net/nitrile-iso0").exists());
    let inside = a
        .dp
        .namespace()
        .run(|| {
            (
                std::fs::read_to_string("/proc/sys/net/ipv4/conf/nitrile-iso0/arp_ignore").unwrap(),
                std::fs::read_to_string("/proc/sys/net/ipv6/conf/nitrile-iso0/disable_ipv6").ok(),
                std::path::Path::new("/sys/class/net/nitrile-iso0").exists(),
            )
        })
        .unwrap();
    assert_eq!(inside.0.trim(), "8");
    if let Some(v6) = inside.1 {
        assert_eq!(v6.trim(), "1");
    }
    // An existing tap is not made twice.
    assert!(a.dp.namespace().create_tap("nitrile-iso0").is_err());
}

#[test]
fn dhcp_gives_the_port_lease_and_arp_is_answered_by_the_gateway() {
    skip_unless_root!();
    let a = Host::start("a");
    let g = a.guest("a1", VNI_A, 10);
    let offer_frame = {
        g.send(&dhcp_message(g.mac, 1, None));
        g.recv()
    };
    assert_eq!(offer_frame[..6], g.mac);
    assert_eq!(offer_frame[6..12], GATEWAY_MAC);
    // Ethernet, IPv4 (20), UDP (8), then the message.
    let offer = nitrile_vnet::dhcp::parse_reply(&offer_frame[42..]).unwrap();
    assert_eq!(offer.kind, 2);
    assert_eq!(offer.yiaddr, g.ip);
    assert_eq!(offer.mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
    assert_eq!(offer.router, Some(ip(1)));
    assert_eq!(offer.server, Some(ip(1)));
    assert_eq!(offer.lease_secs, Some(86_400));
    assert_eq!(offer.mtu, Some(INSTANCE_MTU));
    g.send(&dhcp_message(g.mac, 3, Some(g.ip)));
    let ack = nitrile_vnet::dhcp::parse_reply(&g.recv()[42..]).unwrap();
    assert_eq!((ack.kind, ack.yiaddr), (5, g.ip));
    g.send(&dhcp_message(g.mac, 3, Some(ip(11))));
    let nak = nitrile_vnet::dhcp::parse_reply(&g.recv()[42..]).unwrap();
    assert_eq!(nak.kind, 6);

    // ARP for any address of the prefix: the gateway MAC answers.
    g.send(&eth([0xff; 6], g.mac, 0x0806, &arp(1, g.mac, g.ip, ip(20))));
    let reply = g.recv();
    assert_eq!(reply[..6], g.mac);
    assert_eq!(u16::from_be_bytes([reply[12], reply[13]]), 0x0806);
    assert_eq!(u16::from_be_bytes([reply[20], reply[21]]), 2);
    assert_eq!(reply[22..28], GATEWAY_MAC);
    assert_eq!(reply[28..32], ip(20).octets());
    assert_eq!(reply[38..42], g.ip.octets());
}

#[test]
fn instances_of_one_network_reach_each_other_and_the_wire_carries_no_plaintext() {
    skip_unless_root!();
    let c = cell();
    // a1 -> b2 across hosts (UDP), and back (ICMP echo reply).
    let marker = b"nitrile-marker-7d1f0c";
    let f = udp_between(&c.a1, &c.b2, marker);
    assert_eq!(f[..6], c.b2.mac);
    assert_eq!(f[6..12], GATEWAY_MAC);
    assert_eq!(f[26..30], c.a1.ip.octets());
    let reply_marker = b"nitrile-reply-4be2a9";
    c.b2.send(&ip_frame(
        c.b2.mac,
        c.b2.ip,
        c.a1.ip,
        1,
        &icmp_echo(0, reply_marker),
    ));
    let back = c.a1.recv();
    assert!(contains(&back, reply_marker));
    assert_eq!(back[..6], c.a1.mac);
    // ICMP echo request the other way too.
    c.a1.send(&ip_frame(
        c.a1.mac,
        c.a1.ip,
        c.b2.ip,
        1,
        &icmp_echo(8, marker),
    ));
    assert!(contains(&c.b2.recv(), marker));
    // Same host, same network: a1 -> a5.
    udp_between(&c.a1, &c.a5, b"nitrile-local-0e5c11");

    // The underlay carried the traffic, encrypted: no marker in it, while
    // the taps saw them (the positive control above).
    let wire = c.relay.seen();
    assert!(wire.len() > 3 * marker.len(), "nothing crossed the relay");
    assert!(!contains(&wire, marker));
    assert!(!contains(&wire, reply_marker));
    let counters = c.a.dp.counters();
    assert!(counters.datagrams_out > 0 && counters.datagrams_in > 0);
    assert_eq!(counters.tunnels.len(), 1);
    // Nothing reached the other network's instances.
    c.a3.assert_nothing();
    c.b4.assert_nothing();
}

#[test]
fn no_packet_crosses_from_one_network_to_another() {
    skip_unless_root!();
    let c = cell();
    let no_route_a = c.a.dropped(DropReason::NoRoute);
    // VNI 7 -> an instance of VNI 8 on the same host, then on the other.
    c.a1.send(&ip_frame(c.a1.mac, c.a1.ip, c.a3.ip, 17, &udp(1, 2, b"x")));
    c.a1.send(&ip_frame(
        c.a1.mac,
        c.a1.ip,
        c.b4.ip,
        1,
        &icmp_echo(8, b"x"),
    ));
    c.a.wait_dropped(DropReason::NoRoute, no_route_a + 1);
    // And from VNI 8 towards VNI 7 on the other host.
    let no_route_b = c.b.dropped(DropReason::NoRoute);
    c.b4.send(&ip_frame(c.b4.mac, c.b4.ip, c.a1.ip, 17, &udp(1, 2, b"x")));
    c.b.wait_dropped(DropReason::NoRoute, no_route_b);
    // The same paths within a network work (control), and the dropped
    // frames arrived nowhere before them.
    udp_between(&c.a1, &c.b2, b"after-drops-1");
    udp_between(&c.b4, &c.a3, b"after-drops-2");
    c.a3.assert_nothing();
    c.b4.assert_nothing();
    c.a1.assert_nothing();
    assert!(c.a.dropped(DropReason::NoRoute) >= no_route_a + 2);
}

#[test]
fn spoofed_and_foreign_frames_are_dropped_and_counted() {
    skip_unless_root!();
    let c = cell();
    let (a1, b2) = (&c.a1, &c.b2);
    let cases: Vec<(DropReason, Vec<u8>)> = vec![
        // A forged source address (a5's).
        (
            DropReason::SourceAddress,
            ip_frame(a1.mac, c.a5.ip, b2.ip, 17, &udp(1, 2, b"forged-ip")),
        ),
        // A forged source MAC (a5's).
        (
            DropReason::SourceMac,
            ip_frame(c.a5.mac, a1.ip, b2.ip, 17, &udp(1, 2, b"forged-mac")),
        ),
        // Gratuitous ARP claiming b2's address.
        (
            DropReason::ArpSpoofed,
            eth([0xff; 6], a1.mac, 0x0806, &arp(1, a1.mac, b2.ip, b2.ip)),
        ),
        // An ARP reply claiming b2's address.
        (
            DropReason::ArpNotRequest,
            eth([0xff; 6], a1.mac, 0x0806, &arp(2, a1.mac, a1.ip, b2.ip)),
        ),
        // IPv6.
        (
            DropReason::Ethertype,
            eth(GATEWAY_MAC, a1.mac, 0x86dd, &[0x60; 60]),
        ),
        // Broadcast.
        (
            DropReason::Broadcast,
            eth(
                [0xff; 6],
                a1.mac,
                0x0800,
                &ipv4(a1.ip, Ipv4Addr::BROADCAST, 17, &udp(1, 2, b"bcast")),
            ),
        ),
        (
            DropReason::Broadcast,
            ip_frame(a1.mac, a1.ip, ip(255), 17, &udp(1, 2, b"bcast")),
        ),
        // Outside the prefix.
        (
            DropReason::OutsidePrefix,
            ip_frame(
                a1.mac,
                a1.ip,
                Ipv4Addr::new(8, 8, 8, 8),
                17,
                &udp(1, 2, b"out"),
            ),
        ),
    ];
    for (reason, frame) in cases {
        let before = c.a.dropped(reason);
        a1.send(&frame);
        c.a.wait_dropped(reason, before);
    }
    // The first frame b2 and a5 see is the legitimate one after them.
    let f = udp_between(a1, b2, b"legit-after-spoofs");
    assert!(!contains(&f, b"forged"));
    b2.assert_nothing();
    c.a5.assert_nothing();
    c.a3.assert_nothing();
}

#[test]
fn datagrams_from_unknown_endpoints_are_dropped() {
    skip_unless_root!();
    let c = cell();
    let before = c.b.dropped(DropReason::TunnelUnknownSource);
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    // A WireGuard-looking handshake initiation, and junk.
    let mut init = vec![1u8, 0, 0, 0];
    init.resize(148, 0x42);
    stranger.send_to(&init, c.b.dp.local_endpoint()).unwrap();
    stranger.send_to(b"junk", c.b.dp.local_endpoint()).unwrap();
    c.b.wait_dropped(DropReason::TunnelUnknownSource, before + 1);
    c.b2.assert_nothing();
}

/// The inner form a data path puts in WireGuard: a synthetic IPv4 header
/// (protocol 253, TTL 1, addresses 0), the VNI, the instance packet.
fn inner(vni: u32, packet: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((24 + packet.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0, 1, 253, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(&vni.to_be_bytes());
    h.extend_from_slice(packet);
    h
}

#[test]
fn a_peer_cannot_send_from_an_address_not_routed_to_it() {
    use boringtun::noise::{Tunn, TunnResult};
    skip_unless_root!();
    let c = cell();
    // Host t: a genuine peer of b, routed only 10.80.0.99 of VNI 7.
    let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
    let t_pub = x25519_dalek::PublicKey::from(&secret).to_bytes();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    c.b.dp
        .set_peers(vec![
            Peer {
                host: c.a.name.clone(),
                public_key: c.a.dp.public_key(),
                endpoint: c.relay.addr,
            },
            Peer {
                host: name("t"),
                public_key: t_pub,
                endpoint: sock.local_addr().unwrap(),
            },
        ])
        .unwrap();
    let mut table = routes();
    table.push(Route {
        vni: VNI_A,
        address: ip(99),
        host: name("t"),
    });
    c.b.dp.set_routes(table).unwrap();

    let b_ep = c.b.dp.local_endpoint();
    let mut tunn = Tunn::new(
        secret,
        x25519_dalek::PublicKey::from(c.b.dp.public_key()),
        None,
        None,
        9,
        None,
    );
    let mut buf = vec![0u8; 4096];
    // Claims to be a1 (routed to host a): must be dropped.
    let forged = inner(
        VNI_A,
        &ipv4(c.a1.ip, c.b2.ip, 17, &udp(1, 2, b"from-t-as-a1")),
    );
    // Its own address on another network: dropped too.
    let wrong_vni = inner(
        VNI_B,
        &ipv4(ip(99), c.b4.ip, 17, &udp(1, 2, b"from-t-vni8")),
    );
    // Its own address: delivered (the control).
    let own = inner(VNI_A, &ipv4(ip(99), c.b2.ip, 17, &udp(1, 2, b"from-t-own")));

    let send = |r: TunnResult<'_>| {
        if let TunnResult::WriteToNetwork(d) = r {
            sock.send_to(d, b_ep).unwrap();
        }
    };
    // The first packet starts the handshake (and waits for it).
    send(tunn.encapsulate(&forged, &mut buf));
    let deadline = Instant::now() + WAIT;
    let mut rx = vec![0u8; 4096];
    loop {
        assert!(Instant::now() < deadline, "no handshake with b");
        let Ok((n, _)) = sock.recv_from(&mut rx) else {
            continue;
        };
        if let TunnResult::WriteToNetwork(d) = tunn.decapsulate(Some(b_ep.ip()), &rx[..n], &mut buf)
        {
            sock.send_to(d, b_ep).unwrap();
            while let TunnResult::WriteToNetwork(d) = tunn.decapsulate(None, &[], &mut buf) {
                sock.send_to(d, b_ep).unwrap();
            }
            break;
        }
    }
    // The forged packet, queued during the handshake, went with it.
    c.b.wait_dropped(DropReason::TunnelSourceNotRouted, 0);
    send(tunn.encapsulate(&wrong_vni, &mut buf));
    c.b.wait_dropped(DropReason::TunnelSourceNotRouted, 1);
    send(tunn.encapsulate(&own, &mut buf));
    let f = c.b2.recv();
    assert!(
        contains(&f, b"from-t-own"),
        "the first frame at b2 is the routed one"
    );
    assert_eq!(c.b.dropped(DropReason::TunnelSourceNotRouted), 2);
    c.b2.assert_nothing();
    c.b4.assert_nothing();
}

#[test]
fn a_plaintext_datagram_from_a_peer_endpoint_is_dropped() {
    skip_unless_root!();
    let c = cell();
    // The session between a and b works (the control).
    udp_between(&c.b2, &c.a1, b"before-plaintext");
    // An inner packet in the clear, as the bench-only plaintext baseline
    // sends it, from b2's address (routed to b) to a1. Anything the relay
    // receives from elsewhere than a goes to a from the relay's address:
    // a's peer endpoint for b.
    let before = c.a.dropped(DropReason::TunnelRejected);
    let plain = inner(
        VNI_A,
        &ipv4(c.b2.ip, c.a1.ip, 17, &udp(4000, 5000, b"plaintext-inner")),
    );
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger.send_to(&plain, c.relay.addr).unwrap();
    c.a.wait_dropped(DropReason::TunnelRejected, before);
    c.a1.assert_nothing();
    // The first frame a1 receives is the next one through WireGuard.
    let f = udp_between(&c.b2, &c.a1, b"after-plaintext");
    assert!(!contains(&f, b"plaintext-inner"));
    c.a1.assert_nothing();
    assert_eq!(c.a.dropped(DropReason::TunnelUnknownSource), 0);
}

/// The bench-only baseline: the same data path without WireGuard. The
/// wire holds the instance packets in the clear, and a datagram from a
/// peer still passes the same checks as a decrypted one.
#[cfg(feature = "danger-plaintext-tunnel")]
#[test]
fn the_plaintext_baseline_carries_packets_in_the_clear_with_the_same_checks() {
    skip_unless_root!();
    let c = cell_with(DataPath::start_danger_plaintext_tunnel);
    let marker = b"nitrile-plain-5a0c3e";
    udp_between(&c.a1, &c.b2, marker);
    udp_between(&c.b4, &c.a3, b"nitrile-plain-vni8");
    assert!(contains(&c.relay.seen(), marker));
    assert!(c.a.dp.counters().tunnels[0].since_handshake.is_none());
    // Through the relay, a datagram from a stranger reaches a as from b.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    let send = |d: &[u8]| stranger.send_to(d, c.relay.addr).unwrap();
    // Its source (a5's address) is not routed to b.
    let not_routed = c.a.dropped(DropReason::TunnelSourceNotRouted);
    send(&inner(
        VNI_A,
        &ipv4(c.a5.ip, c.a1.ip, 17, &udp(1, 2, b"from-b-as-a5")),
    ));
    c.a.wait_dropped(DropReason::TunnelSourceNotRouted, not_routed);
    // b2's address on the other network.
    send(&inner(
        VNI_B,
        &ipv4(c.b2.ip, c.a3.ip, 17, &udp(1, 2, b"from-b2-vni8")),
    ));
    c.a.wait_dropped(DropReason::TunnelSourceNotRouted, not_routed + 1);
    // Not the inner form (a WireGuard handshake initiation).
    let malformed = c.a.dropped(DropReason::TunnelMalformed);
    let mut init = vec![1u8, 0, 0, 0];
    init.resize(148, 0x42);
    send(&init);
    c.a.wait_dropped(DropReason::TunnelMalformed, malformed);
    // A routed source is delivered (the control).
    send(&inner(
        VNI_A,
        &ipv4(c.b2.ip, c.a1.ip, 17, &udp(1, 2, b"from-b2-routed")),
    ));
    assert!(contains(&c.a1.recv(), b"from-b2-routed"));
    c.a1.assert_nothing();
    c.a3.assert_nothing();
    c.a5.assert_nothing();
}

#[test]
fn a_restarted_data_path_reattaches_a_tap_its_vmm_still_holds() {
    skip_unless_root!();
    let a = Host::start("a");
    let g = a.guest("a1", VNI_A, 10);
    let netns = a.netns.clone();
    // Stop the data path (not the namespace: the VMM holds the tap).
    let Host { dp, _guard, .. } = a;
    drop(dp);
    let dp = DataPath::start(DataPathConfig {
        host: name("a"),
        netns: netns.clone(),
        wireguard_listen: "127.0.0.1:0".parse().unwrap(),
        ingress_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
    })
    .unwrap();
    let again = Host {
        dp,
        netns,
        name: name("a"),
        _guard,
    };
    again
        .dp
        .attach(PortConfig {
            instance: name("a1"),
            tap: "a1".to_owned(),
            vni: VNI_A,
            mac: g.mac,
            address: g.ip,
            prefix_len: 24,
            metadata: Arc::new(InstanceMetadata {
                instance_id: "a1".to_owned(),
                local_ipv4: g.ip,
                mac: g.mac,
                ssh_public_keys: Vec::new(),
                user_data: Vec::new(),
                identity_document: Vec::new(),
            }),
        })
        .unwrap();
    g.send(&dhcp_message(g.mac, 1, None));
    let offer = nitrile_vnet::dhcp::parse_reply(&g.recv()[42..]).unwrap();
    assert_eq!(offer.yiaddr, g.ip);
}

#[test]
fn published_ports_accept_and_close_and_need_a_port() {
    skip_unless_root!();
    let a = Host::start("a");
    let _g = a.guest("a1", VNI_A, 10);
    assert!(matches!(
        a.dp.publish(&name("nope"), 0, 22),
        Err(nitrile_vnet::VnetError::NoPort(_))
    ));
    let addr = a.dp.publish(&name("a1"), 0, 22).unwrap();
    assert_eq!(addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_ne!(addr.port(), 0);
    std::net::TcpStream::connect(addr).unwrap();
    a.dp.unpublish(&name("a1"), addr.port());
    assert!(std::net::TcpStream::connect(addr).is_err());
}
