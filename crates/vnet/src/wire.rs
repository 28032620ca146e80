//! Reading and writing the few headers the switch looks at (Ethernet,
//! ARP, IPv4, UDP), on byte slices, without allocating. Every reader
//! checks lengths first and returns `None` on anything malformed.

use std::net::Ipv4Addr;

/// Ethernet header length (no VLAN tags: tagged frames are not IPv4).
pub(crate) const ETH_HEADER_LEN: usize = 14;
pub(crate) const ETHERTYPE_IPV4: u16 = 0x0800;
pub(crate) const ETHERTYPE_ARP: u16 = 0x0806;
pub(crate) const IPV4_HEADER_LEN: usize = 20;
pub(crate) const IP_PROTO_UDP: u8 = 17;
pub(crate) const UDP_HEADER_LEN: usize = 8;
pub(crate) const ARP_LEN: usize = 28;
pub(crate) const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// The Ethernet header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Eth {
    pub(crate) dst: [u8; 6],
    pub(crate) src: [u8; 6],
    pub(crate) ethertype: u16,
}

pub(crate) fn eth(frame: &[u8]) -> Option<Eth> {
    if frame.len() < ETH_HEADER_LEN {
        return None;
    }
    Some(Eth {
        dst: frame[0..6].try_into().ok()?,
        src: frame[6..12].try_into().ok()?,
        ethertype: u16::from_be_bytes([frame[12], frame[13]]),
    })
}

/// Writes an Ethernet header at the start of `out`.
pub(crate) fn put_eth(out: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// Whether a MAC address is a group (broadcast or multicast) address.
pub(crate) fn is_group_mac(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 1
}

/// An IPv4 ARP packet over Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arp {
    pub(crate) oper: u16,
    pub(crate) sha: [u8; 6],
    pub(crate) spa: Ipv4Addr,
    pub(crate) tha: [u8; 6],
    pub(crate) tpa: Ipv4Addr,
}

pub(crate) fn arp(payload: &[u8]) -> Option<Arp> {
    if payload.len() < ARP_LEN {
        return None;
    }
    // Ethernet hardware, IPv4 protocol, 6- and 4-byte addresses only.
    if payload[0..6] != [0, 1, 0x08, 0x00, 6, 4] {
        return None;
    }
    Some(Arp {
        oper: u16::from_be_bytes([payload[6], payload[7]]),
        sha: payload[8..14].try_into().ok()?,
        spa: ip4(&payload[14..18]),
        tha: payload[18..24].try_into().ok()?,
        tpa: ip4(&payload[24..28]),
    })
}

/// Writes an ARP packet at the start of `out`.
pub(crate) fn put_arp(out: &mut [u8], a: &Arp) {
    out[0..6].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    out[6..8].copy_from_slice(&a.oper.to_be_bytes());
    out[8..14].copy_from_slice(&a.sha);
    out[14..18].copy_from_slice(&a.spa.octets());
    out[18..24].copy_from_slice(&a.tha);
    out[24..28].copy_from_slice(&a.tpa.octets());
}

fn ip4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

/// An IPv4 packet: its header fields and the packet cut to its total
/// length (Ethernet padding left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ipv4<'a> {
    pub(crate) header_len: usize,
    pub(crate) protocol: u8,
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
    /// The whole packet, header included, `total length` bytes.
    pub(crate) packet: &'a [u8],
}

impl<'a> Ipv4<'a> {
    /// The payload after the header.
    pub(crate) fn payload(&self) -> &'a [u8] {
        &self.packet[self.header_len..]
    }

    /// Whether this is the first (or only) fragment.
    pub(crate) fn first_fragment(&self) -> bool {
        u16::from_be_bytes([self.packet[6], self.packet[7]]) & 0x1fff == 0
    }
}

pub(crate) fn ipv4(data: &[u8]) -> Option<Ipv4<'_>> {
    if data.len() < IPV4_HEADER_LEN || data[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(data[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([data[2], data[3]]));
    if header_len < IPV4_HEADER_LEN || total < header_len || total > data.len() {
        return None;
    }
    Some(Ipv4 {
        header_len,
        protocol: data[9],
        src: ip4(&data[12..16]),
        dst: ip4(&data[16..20]),
        packet: &data[..total],
    })
}

/// The Internet checksum (RFC 1071) of `data`, continuing from `sum`.
pub(crate) fn checksum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds a running sum into the one's complement checksum.
pub(crate) fn checksum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes a 20-byte IPv4 header (no options, DF clear) with its checksum.
pub(crate) fn put_ipv4_header(
    out: &mut [u8],
    total_len: u16,
    ttl: u8,
    protocol: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) {
    out[0] = 0x45;
    out[1] = 0;
    out[2..4].copy_from_slice(&total_len.to_be_bytes());
    out[4..8].fill(0);
    out[8] = ttl;
    out[9] = protocol;
    out[10..12].fill(0);
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&dst.octets());
    let sum = checksum_fold(checksum_add(0, &out[..IPV4_HEADER_LEN]));
    out[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// A UDP datagram's ports and payload (cut to the UDP length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Udp<'a> {
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
    pub(crate) payload: &'a [u8],
}

pub(crate) fn udp(data: &[u8]) -> Option<Udp<'_>> {
    if data.len() < UDP_HEADER_LEN {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([data[4], data[5]]));
    if len < UDP_HEADER_LEN || len > data.len() {
        return None;
    }
    Some(Udp {
        src_port: u16::from_be_bytes([data[0], data[1]]),
        dst_port: u16::from_be_bytes([data[2], data[3]]),
        payload: &data[UDP_HEADER_LEN..len],
    })
}

/// Writes a UDP header before a payload already at `out[8..8 + payload_len]`,
/// with the checksum over the IPv4 pseudo-header.
pub(crate) fn put_udp_header(
    out: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload_len: usize,
) {
    let len = (UDP_HEADER_LEN + payload_len) as u16;
    out[0..2].copy_from_slice(&src_port.to_be_bytes());
    out[2..4].copy_from_slice(&dst_port.to_be_bytes());
    out[4..6].copy_from_slice(&len.to_be_bytes());
    out[6..8].fill(0);
    let mut sum = checksum_add(0, &src.octets());
    sum = checksum_add(sum, &dst.octets());
    sum += u32::from(IP_PROTO_UDP) + u32::from(len);
    sum = checksum_add(sum, &out[..usize::from(len)]);
    let mut c = checksum_fold(sum);
    if c == 0 {
        c = 0xffff;
    }
    out[6..8].copy_from_slice(&c.to_be_bytes());
}

/// The network mask of a prefix length (at most 32).
pub(crate) fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len.min(32)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_matches_a_known_header() {
        // RFC 1071's example style: a header whose checksum is known.
        let mut h = [0u8; 20];
        put_ipv4_header(
            &mut h,
            60,
            64,
            6,
            Ipv4Addr::new(192, 168, 0, 1),
            Ipv4Addr::new(192, 168, 0, 199),
        );
        // A correct header sums to zero.
        assert_eq!(checksum_fold(checksum_add(0, &h)), 0);
        assert_eq!(
            ipv4(&[h.as_slice(), &[0; 40]].concat())
                .unwrap()
                .packet
                .len(),
            60
        );
    }

    #[test]
    fn short_or_inconsistent_ipv4_is_refused() {
        let mut h = [0u8; 20];
        put_ipv4_header(
            &mut h,
            20,
            1,
            1,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
        );
        assert!(ipv4(&h).is_some());
        assert!(ipv4(&h[..19]).is_none());
        let mut long = h;
        long[2..4].copy_from_slice(&21u16.to_be_bytes());
        assert!(ipv4(&long).is_none());
        let mut ihl = h;
        ihl[0] = 0x44;
        assert!(ipv4(&ihl).is_none());
        let mut v6 = h;
        v6[0] = 0x65;
        assert!(ipv4(&v6).is_none());
    }

    #[test]
    fn masks() {
        assert_eq!(mask(24), 0xffff_ff00);
        assert_eq!(mask(32), u32::MAX);
        assert_eq!(mask(0), 0);
    }
}
