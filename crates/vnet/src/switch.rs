//! The switch's decisions, on bytes only: what becomes of a frame an
//! instance sent (answered here, handed to the port's stack, forwarded to
//! an address of its network, or dropped for a reason), and the inner
//! packet form carried through WireGuard between hosts. No I/O: the data
//! path's loop acts on the [`Verdict`].

use std::net::Ipv4Addr;

use crate::counters::DropReason;
use crate::stack::METADATA_ADDR;
use crate::wire::{self, ETH_HEADER_LEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, IPV4_HEADER_LEN};
use crate::{GATEWAY_MAC, INSTANCE_MTU, MAX_FRAME_LEN};

/// The addresses of one port: what the instance behind it is allowed to
/// claim, and its network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PortAddr {
    pub(crate) mac: [u8; 6],
    pub(crate) ip: Ipv4Addr,
    pub(crate) prefix_len: u8,
    pub(crate) gateway: Ipv4Addr,
    pub(crate) vni: u32,
}

impl PortAddr {
    /// The port's addresses, or `None` when they make no sense: a prefix
    /// outside 1..=30, a group or zero MAC or the gateway's, an address
    /// that is the network's, its broadcast or its gateway.
    pub(crate) fn new(mac: [u8; 6], ip: Ipv4Addr, prefix_len: u8, vni: u32) -> Option<Self> {
        if !(1..=30).contains(&prefix_len)
            || wire::is_group_mac(&mac)
            || mac == [0; 6]
            || mac == GATEWAY_MAC
        {
            return None;
        }
        let m = wire::mask(prefix_len);
        let net = u32::from(ip) & m;
        let gateway = Ipv4Addr::from(net + 1);
        let a = u32::from(ip);
        if a == net || a == net | !m || ip == gateway {
            return None;
        }
        Some(Self {
            mac,
            ip,
            prefix_len,
            gateway,
            vni,
        })
    }

    /// Whether `a` is a host address of the prefix (not its network or
    /// broadcast address).
    pub(crate) fn host_in_prefix(&self, a: Ipv4Addr) -> bool {
        let m = wire::mask(self.prefix_len);
        let a = u32::from(a);
        let net = u32::from(self.ip) & m;
        a & m == net && a != net && a != net | !m
    }
}

/// What becomes of a frame from an instance.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Drop(DropReason),
    /// Write the first `n` bytes of the output buffer back to the instance.
    Reply(usize),
    /// Hand the frame to the port's stack.
    Stack,
    /// The IPv4 packet at `frame[start..start + len]` for `dst`, an address
    /// of the port's network.
    Forward {
        dst: Ipv4Addr,
        start: usize,
        len: usize,
    },
}

/// Decides what becomes of `frame`, sent by the instance behind `port`;
/// answers (ARP, DHCP) are written into `out`, which must hold
/// [`crate::dhcp::MAX_REPLY_LEN`] bytes.
pub(crate) fn classify(port: &PortAddr, frame: &[u8], out: &mut [u8]) -> Verdict {
    if frame.len() > MAX_FRAME_LEN {
        return Verdict::Drop(DropReason::Oversize);
    }
    let Some(eth) = wire::eth(frame) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    if eth.src != port.mac {
        return Verdict::Drop(DropReason::SourceMac);
    }
    let payload = &frame[ETH_HEADER_LEN..];
    match eth.ethertype {
        ETHERTYPE_ARP => arp(port, &eth, payload, out),
        ETHERTYPE_IPV4 => ipv4(port, &eth, payload, frame, out),
        _ => Verdict::Drop(DropReason::Ethertype),
    }
}

fn arp(port: &PortAddr, eth: &wire::Eth, payload: &[u8], out: &mut [u8]) -> Verdict {
    if eth.dst != wire::BROADCAST_MAC && eth.dst != GATEWAY_MAC {
        return Verdict::Drop(DropReason::DestinationMac);
    }
    let Some(a) = wire::arp(payload) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    if a.sha != port.mac || !(a.spa == port.ip || a.spa.is_unspecified()) {
        return Verdict::Drop(DropReason::ArpSpoofed);
    }
    if a.oper != 1 {
        return Verdict::Drop(DropReason::ArpNotRequest);
    }
    let answerable = a.tpa == METADATA_ADDR || (port.host_in_prefix(a.tpa) && a.tpa != port.ip);
    if !answerable {
        return Verdict::Drop(DropReason::ArpUnanswered);
    }
    wire::put_eth(out, port.mac, GATEWAY_MAC, ETHERTYPE_ARP);
    wire::put_arp(
        &mut out[ETH_HEADER_LEN..],
        &wire::Arp {
            oper: 2,
            sha: GATEWAY_MAC,
            spa: a.tpa,
            tha: port.mac,
            tpa: a.spa,
        },
    );
    Verdict::Reply(ETH_HEADER_LEN + wire::ARP_LEN)
}

fn ipv4(port: &PortAddr, eth: &wire::Eth, payload: &[u8], frame: &[u8], out: &mut [u8]) -> Verdict {
    let Some(ip) = wire::ipv4(payload) else {
        return Verdict::Drop(DropReason::Malformed);
    };
    // DHCP to the built-in server: from 0.0.0.0 (or the instance's own
    // address, renewing) port 68 to the broadcast or gateway address, 67.
    if ip.protocol == wire::IP_PROTO_UDP
        && ip.first_fragment()
        && (ip.src.is_unspecified() || ip.src == port.ip)
        && (ip.dst == Ipv4Addr::BROADCAST || ip.dst == port.gateway)
        && (eth.dst == wire::BROADCAST_MAC || eth.dst == GATEWAY_MAC)
        && let Some(udp) = wire::udp(ip.payload())
        && udp.src_port == crate::dhcp::CLIENT_PORT
        && udp.dst_port == crate::dhcp::SERVER_PORT
    {
        return match crate::dhcp::answer(port, udp.payload, out) {
            Ok(n) => Verdict::Reply(n),
            Err(reason) => Verdict::Drop(reason),
        };
    }
    if eth.dst != GATEWAY_MAC {
        return Verdict::Drop(if wire::is_group_mac(&eth.dst) {
            DropReason::Broadcast
        } else {
            DropReason::DestinationMac
        });
    }
    if ip.src != port.ip {
        return Verdict::Drop(DropReason::SourceAddress);
    }
    if ip.dst == port.gateway || ip.dst == METADATA_ADDR {
        return Verdict::Stack;
    }
    if ip.dst.is_broadcast() || ip.dst.is_multicast() {
        return Verdict::Drop(DropReason::Broadcast);
    }
    if !port.host_in_prefix(ip.dst) {
        let m = wire::mask(port.prefix_len);
        let in_prefix = u32::from(ip.dst) & m == u32::from(port.ip) & m;
        return Verdict::Drop(if in_prefix {
            // The network's own or broadcast address.
            DropReason::Broadcast
        } else {
            DropReason::OutsidePrefix
        });
    }
    if ip.dst == port.ip {
        return Verdict::Drop(DropReason::NoRoute);
    }
    let start = frame.len() - payload.len();
    Verdict::Forward {
        dst: ip.dst,
        start,
        len: ip.packet.len(),
    }
}

/// Length of the inner header: a synthetic IPv4 header and the VNI.
pub(crate) const INNER_HEADER_LEN: usize = IPV4_HEADER_LEN + 4;
/// The protocol number of the synthetic header ("experimental", RFC 3692).
pub(crate) const INNER_PROTOCOL: u8 = 253;
/// The longest inner packet: the header and an instance packet of at most
/// [`INSTANCE_MTU`] bytes.
pub(crate) const MAX_INNER_LEN: usize = INNER_HEADER_LEN + INSTANCE_MTU as usize;

/// Writes the inner packet carrying `packet` of network `vni` into `out`
/// (at least `INNER_HEADER_LEN + packet.len()` bytes); returns its length.
pub(crate) fn encapsulate(vni: u32, packet: &[u8], out: &mut [u8]) -> usize {
    let len = INNER_HEADER_LEN + packet.len();
    wire::put_ipv4_header(
        out,
        len as u16,
        1,
        INNER_PROTOCOL,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
    );
    out[IPV4_HEADER_LEN..INNER_HEADER_LEN].copy_from_slice(&vni.to_be_bytes());
    out[INNER_HEADER_LEN..len].copy_from_slice(packet);
    len
}

/// An inner packet's network and the instance packet it carries, checked:
/// the synthetic header exactly as [`encapsulate`] writes it, and the
/// instance packet a well-formed IPv4 packet filling the rest exactly.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Inner<'a> {
    pub(crate) vni: u32,
    pub(crate) packet: wire::Ipv4<'a>,
}

pub(crate) fn decapsulate(inner: &[u8]) -> Result<Inner<'_>, DropReason> {
    if inner.len() < INNER_HEADER_LEN + IPV4_HEADER_LEN || inner.len() > MAX_INNER_LEN {
        return Err(DropReason::TunnelMalformed);
    }
    let mut expected = [0u8; IPV4_HEADER_LEN];
    wire::put_ipv4_header(
        &mut expected,
        inner.len() as u16,
        1,
        INNER_PROTOCOL,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
    );
    if inner[..IPV4_HEADER_LEN] != expected {
        return Err(DropReason::TunnelMalformed);
    }
    let vni = u32::from_be_bytes([inner[20], inner[21], inner[22], inner[23]]);
    let rest = &inner[INNER_HEADER_LEN..];
    match wire::ipv4(rest) {
        Some(packet) if packet.packet.len() == rest.len() => Ok(Inner { vni, packet }),
        _ => Err(DropReason::TunnelMalformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::MAX_REPLY_LEN;
    use proptest::prelude::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
    const IP: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 10);

    fn port() -> PortAddr {
        PortAddr::new(MAC, IP, 24, 7).unwrap()
    }

    fn classify_bytes(frame: &[u8]) -> (Verdict, Vec<u8>) {
        let mut out = [0u8; MAX_REPLY_LEN];
        let v = classify(&port(), frame, &mut out);
        (v, out.to_vec())
    }

    fn arp_frame(
        dst: [u8; 6],
        src: [u8; 6],
        oper: u16,
        sha: [u8; 6],
        spa: Ipv4Addr,
        tpa: Ipv4Addr,
    ) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HEADER_LEN + wire::ARP_LEN];
        wire::put_eth(&mut f, dst, src, ETHERTYPE_ARP);
        wire::put_arp(
            &mut f[ETH_HEADER_LEN..],
            &wire::Arp {
                oper,
                sha,
                spa,
                tha: [0; 6],
                tpa,
            },
        );
        f
    }

    fn ip_frame(
        dst_mac: [u8; 6],
        src_mac: [u8; 6],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HEADER_LEN + IPV4_HEADER_LEN + payload.len()];
        wire::put_eth(&mut f, dst_mac, src_mac, ETHERTYPE_IPV4);
        wire::put_ipv4_header(
            &mut f[ETH_HEADER_LEN..],
            (IPV4_HEADER_LEN + payload.len()) as u16,
            64,
            1,
            src,
            dst,
        );
        f[ETH_HEADER_LEN + IPV4_HEADER_LEN..].copy_from_slice(payload);
        f
    }

    #[test]
    fn port_addresses_that_make_no_sense_are_refused() {
        assert_eq!(port().gateway, Ipv4Addr::new(10, 80, 0, 1));
        assert!(PortAddr::new(MAC, Ipv4Addr::new(10, 80, 0, 1), 24, 7).is_none());
        assert!(PortAddr::new(MAC, Ipv4Addr::new(10, 80, 0, 0), 24, 7).is_none());
        assert!(PortAddr::new(MAC, Ipv4Addr::new(10, 80, 0, 255), 24, 7).is_none());
        assert!(PortAddr::new(MAC, IP, 31, 7).is_none());
        assert!(PortAddr::new(MAC, IP, 0, 7).is_none());
        assert!(PortAddr::new([1, 0, 0, 0, 0, 1], IP, 24, 7).is_none());
        assert!(PortAddr::new(GATEWAY_MAC, IP, 24, 7).is_none());
    }

    #[test]
    fn arp_for_an_address_of_the_prefix_is_answered_with_the_gateway_mac() {
        let other = Ipv4Addr::new(10, 80, 0, 20);
        let (v, out) = classify_bytes(&arp_frame(wire::BROADCAST_MAC, MAC, 1, MAC, IP, other));
        assert_eq!(v, Verdict::Reply(42));
        assert_eq!(wire::eth(&out).unwrap().dst, MAC);
        let a = wire::arp(&out[ETH_HEADER_LEN..]).unwrap();
        assert_eq!(
            (a.oper, a.sha, a.spa, a.tha, a.tpa),
            (2, GATEWAY_MAC, other, MAC, IP)
        );
        // A probe (sender 0.0.0.0) is answered too; the metadata address as well.
        let (v, _) = classify_bytes(&arp_frame(
            wire::BROADCAST_MAC,
            MAC,
            1,
            MAC,
            Ipv4Addr::UNSPECIFIED,
            other,
        ));
        assert_eq!(v, Verdict::Reply(42));
        let (v, _) = classify_bytes(&arp_frame(GATEWAY_MAC, MAC, 1, MAC, IP, METADATA_ADDR));
        assert_eq!(v, Verdict::Reply(42));
    }

    #[test]
    fn spoofed_gratuitous_and_other_arp_is_dropped() {
        let other = Ipv4Addr::new(10, 80, 0, 20);
        let b = wire::BROADCAST_MAC;
        let cases = [
            // claims another address (gratuitous for it)
            (
                arp_frame(b, MAC, 1, MAC, other, other),
                DropReason::ArpSpoofed,
            ),
            // another sender MAC inside a frame of the right source
            (
                arp_frame(b, MAC, 1, [2, 0, 0, 0, 0, 0x99], IP, other),
                DropReason::ArpSpoofed,
            ),
            // a frame from another MAC
            (
                arp_frame(
                    b,
                    [2, 0, 0, 0, 0, 0x99],
                    1,
                    [2, 0, 0, 0, 0, 0x99],
                    IP,
                    other,
                ),
                DropReason::SourceMac,
            ),
            // a reply
            (
                arp_frame(b, MAC, 2, MAC, IP, other),
                DropReason::ArpNotRequest,
            ),
            // gratuitous for its own address
            (arp_frame(b, MAC, 1, MAC, IP, IP), DropReason::ArpUnanswered),
            // outside the prefix, the network and broadcast addresses
            (
                arp_frame(b, MAC, 1, MAC, IP, Ipv4Addr::new(10, 81, 0, 1)),
                DropReason::ArpUnanswered,
            ),
            (
                arp_frame(b, MAC, 1, MAC, IP, Ipv4Addr::new(10, 80, 0, 255)),
                DropReason::ArpUnanswered,
            ),
            // to another instance's MAC
            (
                arp_frame([2, 0, 0, 0, 0, 0x20], MAC, 1, MAC, IP, other),
                DropReason::DestinationMac,
            ),
        ];
        for (frame, reason) in cases {
            assert_eq!(
                classify_bytes(&frame).0,
                Verdict::Drop(reason),
                "{reason:?}"
            );
        }
    }

    #[test]
    fn ipv4_is_forwarded_within_the_prefix_only_from_the_instance_address() {
        let other = Ipv4Addr::new(10, 80, 0, 20);
        let mut f = ip_frame(GATEWAY_MAC, MAC, IP, other, b"marker");
        f.extend_from_slice(&[0; 10]); // Ethernet padding is left out
        assert_eq!(
            classify_bytes(&f).0,
            Verdict::Forward {
                dst: other,
                start: 14,
                len: 26
            }
        );
        let g = Ipv4Addr::new(10, 80, 0, 1);
        let cases = [
            (
                ip_frame(GATEWAY_MAC, MAC, Ipv4Addr::new(10, 80, 0, 11), other, b"x"),
                Verdict::Drop(DropReason::SourceAddress),
            ),
            (
                ip_frame(GATEWAY_MAC, [2, 0, 0, 0, 0, 0x11], IP, other, b"x"),
                Verdict::Drop(DropReason::SourceMac),
            ),
            (
                ip_frame([2, 0, 0, 0, 0, 0x20], MAC, IP, other, b"x"),
                Verdict::Drop(DropReason::DestinationMac),
            ),
            (
                ip_frame(wire::BROADCAST_MAC, MAC, IP, Ipv4Addr::BROADCAST, b"x"),
                Verdict::Drop(DropReason::Broadcast),
            ),
            (
                ip_frame(GATEWAY_MAC, MAC, IP, Ipv4Addr::new(10, 80, 0, 255), b"x"),
                Verdict::Drop(DropReason::Broadcast),
            ),
            (
                ip_frame(GATEWAY_MAC, MAC, IP, Ipv4Addr::new(224, 0, 0, 1), b"x"),
                Verdict::Drop(DropReason::Broadcast),
            ),
            (
                ip_frame(GATEWAY_MAC, MAC, IP, Ipv4Addr::new(8, 8, 8, 8), b"x"),
                Verdict::Drop(DropReason::OutsidePrefix),
            ),
            (
                ip_frame(GATEWAY_MAC, MAC, IP, IP, b"x"),
                Verdict::Drop(DropReason::NoRoute),
            ),
            (ip_frame(GATEWAY_MAC, MAC, IP, g, b"x"), Verdict::Stack),
            (
                ip_frame(GATEWAY_MAC, MAC, IP, METADATA_ADDR, b"x"),
                Verdict::Stack,
            ),
        ];
        for (frame, verdict) in cases {
            assert_eq!(classify_bytes(&frame).0, verdict);
        }
        // IPv6 and other ethertypes.
        let mut v6 = ip_frame(GATEWAY_MAC, MAC, IP, other, b"x");
        v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(classify_bytes(&v6).0, Verdict::Drop(DropReason::Ethertype));
        // Longer than the instance MTU.
        let big = ip_frame(GATEWAY_MAC, MAC, IP, other, &vec![0; INSTANCE_MTU as usize]);
        assert_eq!(classify_bytes(&big).0, Verdict::Drop(DropReason::Oversize));
    }

    #[test]
    fn dhcp_discover_from_nowhere_is_answered() {
        let msg = crate::dhcp::client_message(MAC, 1, None);
        let mut udp = vec![0u8; 8 + msg.len()];
        udp[8..].copy_from_slice(&msg);
        wire::put_udp_header(
            &mut udp,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            68,
            67,
            msg.len(),
        );
        let mut f = vec![0u8; ETH_HEADER_LEN + IPV4_HEADER_LEN + udp.len()];
        wire::put_eth(&mut f, wire::BROADCAST_MAC, MAC, ETHERTYPE_IPV4);
        wire::put_ipv4_header(
            &mut f[ETH_HEADER_LEN..],
            (IPV4_HEADER_LEN + udp.len()) as u16,
            64,
            17,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
        );
        f[ETH_HEADER_LEN + IPV4_HEADER_LEN..].copy_from_slice(&udp);
        assert!(matches!(classify_bytes(&f).0, Verdict::Reply(_)));
        // The same from another MAC is not.
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0x11]);
        assert_eq!(classify_bytes(&f).0, Verdict::Drop(DropReason::SourceMac));
    }

    #[test]
    fn the_inner_form_round_trips_and_anything_else_is_refused() {
        let packet = &ip_frame(GATEWAY_MAC, MAC, IP, Ipv4Addr::new(10, 80, 0, 20), b"hello")
            [ETH_HEADER_LEN..];
        let mut buf = [0u8; MAX_INNER_LEN];
        let n = encapsulate(7, packet, &mut buf);
        let inner = decapsulate(&buf[..n]).unwrap();
        assert_eq!(inner.vni, 7);
        assert_eq!(inner.packet.packet, packet);
        // Any change to the synthetic header is refused.
        for i in 0..IPV4_HEADER_LEN {
            let mut bad = buf;
            bad[i] ^= 0x01;
            assert_eq!(
                decapsulate(&bad[..n]),
                Err(DropReason::TunnelMalformed),
                "byte {i}"
            );
        }
        // A packet that does not fill the rest exactly.
        assert!(decapsulate(&buf[..n - 1]).is_err());
    }

    proptest! {
        #[test]
        fn classify_never_panics(frame in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = classify_bytes(&frame);
        }

        #[test]
        fn classify_never_panics_on_frames_from_the_instance(
            body in proptest::collection::vec(any::<u8>(), 0..600),
            ethertype in prop_oneof![Just(0x0800u16), Just(0x0806u16)],
            dst in prop_oneof![Just(GATEWAY_MAC), Just(wire::BROADCAST_MAC)],
        ) {
            let mut f = vec![0u8; ETH_HEADER_LEN];
            wire::put_eth(&mut f, dst, MAC, ethertype);
            f.extend_from_slice(&body);
            let _ = classify_bytes(&f);
        }

        #[test]
        fn decapsulate_never_panics(inner in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let _ = decapsulate(&inner);
        }

        #[test]
        fn dhcp_never_panics(vni in any::<u32>(), msg in proptest::collection::vec(any::<u8>(), 0..700)) {
            let mut out = [0u8; MAX_REPLY_LEN];
            let mut msg = msg;
            if msg.len() > 244 {
                // Make the fixed part valid so that the options are read.
                msg[0] = 1; msg[1] = 1; msg[2] = 6;
                msg[28..34].copy_from_slice(&MAC);
                msg[236..240].copy_from_slice(&[99, 130, 83, 99]);
            }
            let p = PortAddr { vni, ..port() };
            let _ = crate::dhcp::answer(&p, &msg, &mut out);
        }
    }
}
