//! The built-in DHCP server (RFC 2131), one lease per port: it offers and
//! acknowledges exactly the port's address to exactly the port's MAC, and
//! nothing else.

use std::net::Ipv4Addr;

use crate::counters::DropReason;
use crate::switch::PortAddr;
use crate::wire::{self, ETH_HEADER_LEN, IPV4_HEADER_LEN, UDP_HEADER_LEN};
use crate::{GATEWAY_MAC, INSTANCE_MTU};

pub(crate) const SERVER_PORT: u16 = 67;
pub(crate) const CLIENT_PORT: u16 = 68;
/// The fixed BOOTP part before the options' magic cookie.
const BOOTP_LEN: usize = 236;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// The lease the server gives: one day.
pub const LEASE_SECS: u32 = 86_400;

const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;

const OPT_PAD: u8 = 0;
const OPT_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_MTU: u8 = 26;
const OPT_REQUESTED: u8 = 50;
const OPT_LEASE: u8 = 51;
const OPT_TYPE: u8 = 53;
const OPT_SERVER: u8 = 54;
const OPT_END: u8 = 255;

/// The longest reply this server writes (frame included).
pub(crate) const MAX_REPLY_LEN: usize =
    ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + BOOTP_LEN + 4 + 64;

/// The options of a client message the server reads.
#[derive(Debug, Default, PartialEq, Eq)]
struct ClientOptions {
    kind: Option<u8>,
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
}

fn read_options(mut opts: &[u8]) -> Option<ClientOptions> {
    let mut out = ClientOptions::default();
    while let Some((&code, rest)) = opts.split_first() {
        match code {
            OPT_PAD => opts = rest,
            OPT_END => return Some(out),
            _ => {
                let (&len, rest) = rest.split_first()?;
                let value = rest.get(..usize::from(len))?;
                let addr = |v: &[u8]| (v.len() == 4).then(|| Ipv4Addr::new(v[0], v[1], v[2], v[3]));
                match code {
                    OPT_TYPE if len == 1 => out.kind = Some(value[0]),
                    OPT_REQUESTED => out.requested = addr(value),
                    OPT_SERVER => out.server = addr(value),
                    _ => {}
                }
                opts = &rest[usize::from(len)..];
            }
        }
    }
    // Options must end with OPT_END.
    None
}

/// Answers a DHCP message (the UDP payload `msg`) from the instance of
/// `port`, writing the whole reply frame into `out` and returning its
/// length.
pub(crate) fn answer(port: &PortAddr, msg: &[u8], out: &mut [u8]) -> Result<usize, DropReason> {
    if msg.len() < BOOTP_LEN + MAGIC.len() || out.len() < MAX_REPLY_LEN {
        return Err(DropReason::Malformed);
    }
    // BOOTREQUEST over Ethernet, for this port's MAC only.
    if msg[0] != 1 || msg[1] != 1 || msg[2] != 6 || msg[28..34] != port.mac {
        return Err(DropReason::Dhcp);
    }
    if msg[BOOTP_LEN..BOOTP_LEN + 4] != MAGIC {
        return Err(DropReason::Malformed);
    }
    let opts = read_options(&msg[BOOTP_LEN + 4..]).ok_or(DropReason::Malformed)?;
    let ciaddr = Ipv4Addr::new(msg[12], msg[13], msg[14], msg[15]);
    let reply = match opts.kind {
        Some(DISCOVER) => OFFER,
        Some(REQUEST) => {
            if opts.server.is_some_and(|s| s != port.gateway) {
                // The client chose another server.
                return Err(DropReason::Dhcp);
            }
            let wanted = opts.requested.unwrap_or(ciaddr);
            if wanted == port.ip { ACK } else { NAK }
        }
        _ => return Err(DropReason::Dhcp),
    };
    let broadcast_flag = msg[10] & 0x80 != 0;

    // The BOOTP reply, after the headers.
    let start = ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN;
    let b = &mut out[start..start + BOOTP_LEN + 4];
    b.fill(0);
    b[0] = 2; // BOOTREPLY
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&msg[4..8]); // xid
    b[10..12].copy_from_slice(&msg[10..12]); // flags
    if reply == ACK {
        b[12..16].copy_from_slice(&msg[12..16]); // ciaddr
    }
    if reply != NAK {
        b[16..20].copy_from_slice(&port.ip.octets()); // yiaddr
    }
    b[24..28].copy_from_slice(&msg[24..28]); // giaddr
    b[28..44].copy_from_slice(&msg[28..44]); // chaddr
    b[BOOTP_LEN..].copy_from_slice(&MAGIC);
    let mut o = start + BOOTP_LEN + 4;
    let mut opt = |code: u8, value: &[u8]| {
        out[o] = code;
        out[o + 1] = value.len() as u8;
        out[o + 2..o + 2 + value.len()].copy_from_slice(value);
        o += 2 + value.len();
    };
    opt(OPT_TYPE, &[reply]);
    opt(OPT_SERVER, &port.gateway.octets());
    if reply != NAK {
        opt(OPT_LEASE, &LEASE_SECS.to_be_bytes());
        opt(OPT_MASK, &wire::mask(port.prefix_len).to_be_bytes());
        opt(OPT_ROUTER, &port.gateway.octets());
        opt(OPT_MTU, &INSTANCE_MTU.to_be_bytes());
    }
    out[o] = OPT_END;
    o += 1;
    let payload_len = o - start;

    let (eth_dst, ip_dst) = if broadcast_flag || reply == NAK {
        (wire::BROADCAST_MAC, Ipv4Addr::BROADCAST)
    } else if reply == ACK && !ciaddr.is_unspecified() {
        (port.mac, ciaddr)
    } else {
        (port.mac, port.ip)
    };
    wire::put_eth(out, eth_dst, GATEWAY_MAC, wire::ETHERTYPE_IPV4);
    wire::put_udp_header(
        &mut out[ETH_HEADER_LEN + IPV4_HEADER_LEN..],
        port.gateway,
        ip_dst,
        SERVER_PORT,
        CLIENT_PORT,
        payload_len,
    );
    wire::put_ipv4_header(
        &mut out[ETH_HEADER_LEN..],
        (IPV4_HEADER_LEN + UDP_HEADER_LEN + payload_len) as u16,
        64,
        wire::IP_PROTO_UDP,
        port.gateway,
        ip_dst,
    );
    Ok(o)
}

/// Test helpers shared with the switch's tests: a client message.
#[cfg(test)]
pub(crate) fn client_message(mac: [u8; 6], kind: u8, requested: Option<Ipv4Addr>) -> Vec<u8> {
    let mut m = vec![0u8; BOOTP_LEN];
    m[0] = 1;
    m[1] = 1;
    m[2] = 6;
    m[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    m[28..34].copy_from_slice(&mac);
    m.extend_from_slice(&MAGIC);
    m.extend_from_slice(&[OPT_TYPE, 1, kind]);
    if let Some(r) = requested {
        m.extend_from_slice(&[OPT_REQUESTED, 4]);
        m.extend_from_slice(&r.octets());
    }
    m.push(OPT_END);
    m
}

/// Reads a reply's message type, yiaddr and options (type, mask, router,
/// server, lease, MTU), for tests.
#[derive(Debug, PartialEq, Eq)]
pub struct Lease {
    pub kind: u8,
    pub yiaddr: Ipv4Addr,
    pub mask: Option<Ipv4Addr>,
    pub router: Option<Ipv4Addr>,
    pub server: Option<Ipv4Addr>,
    pub lease_secs: Option<u32>,
    pub mtu: Option<u16>,
}

/// Parses the DHCP reply in a UDP payload (for tests and diagnostics):
/// `None` if it is not a well-formed BOOTREPLY.
pub fn parse_reply(msg: &[u8]) -> Option<Lease> {
    if msg.len() < BOOTP_LEN + 4 || msg[0] != 2 || msg[BOOTP_LEN..BOOTP_LEN + 4] != MAGIC {
        return None;
    }
    let mut lease = Lease {
        kind: 0,
        yiaddr: Ipv4Addr::new(msg[16], msg[17], msg[18], msg[19]),
        mask: None,
        router: None,
        server: None,
        lease_secs: None,
        mtu: None,
    };
    let mut opts = &msg[BOOTP_LEN + 4..];
    while let Some((&code, rest)) = opts.split_first() {
        if code == OPT_END {
            return Some(lease);
        }
        if code == OPT_PAD {
            opts = rest;
            continue;
        }
        let (&len, rest) = rest.split_first()?;
        let v = rest.get(..usize::from(len))?;
        let addr = || (v.len() == 4).then(|| Ipv4Addr::new(v[0], v[1], v[2], v[3]));
        match code {
            OPT_TYPE if len == 1 => lease.kind = v[0],
            OPT_MASK => lease.mask = addr(),
            OPT_ROUTER => lease.router = addr(),
            OPT_SERVER => lease.server = addr(),
            OPT_LEASE if len == 4 => {
                lease.lease_secs = Some(u32::from_be_bytes(v.try_into().ok()?))
            }
            OPT_MTU if len == 2 => lease.mtu = Some(u16::from_be_bytes([v[0], v[1]])),
            _ => {}
        }
        opts = &rest[usize::from(len)..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> PortAddr {
        PortAddr::new([2, 0, 0, 0, 0, 0x10], Ipv4Addr::new(10, 80, 0, 10), 24, 7).unwrap()
    }

    fn reply(msg: &[u8]) -> Result<(Vec<u8>, Lease), DropReason> {
        let mut out = [0u8; MAX_REPLY_LEN];
        let n = answer(&port(), msg, &mut out)?;
        let frame = out[..n].to_vec();
        let ip = wire::ipv4(&frame[ETH_HEADER_LEN..]).unwrap();
        assert_eq!(checksum_of_header(ip.packet), 0);
        let udp = wire::udp(ip.payload()).unwrap();
        assert_eq!((udp.src_port, udp.dst_port), (SERVER_PORT, CLIENT_PORT));
        Ok((frame.clone(), parse_reply(udp.payload).unwrap()))
    }

    fn checksum_of_header(p: &[u8]) -> u16 {
        wire::checksum_fold(wire::checksum_add(0, &p[..IPV4_HEADER_LEN]))
    }

    #[test]
    fn discover_gets_an_offer_of_the_port_address() {
        let (frame, lease) = reply(&client_message(port().mac, DISCOVER, None)).unwrap();
        assert_eq!(frame[..6], port().mac);
        assert_eq!(frame[6..12], GATEWAY_MAC);
        assert_eq!(
            lease,
            Lease {
                kind: OFFER,
                yiaddr: Ipv4Addr::new(10, 80, 0, 10),
                mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
                router: Some(Ipv4Addr::new(10, 80, 0, 1)),
                server: Some(Ipv4Addr::new(10, 80, 0, 1)),
                lease_secs: Some(LEASE_SECS),
                mtu: Some(INSTANCE_MTU),
            }
        );
    }

    #[test]
    fn request_for_the_address_is_acked_and_another_is_naked() {
        let ip = Ipv4Addr::new(10, 80, 0, 10);
        let (_, lease) = reply(&client_message(port().mac, REQUEST, Some(ip))).unwrap();
        assert_eq!((lease.kind, lease.yiaddr), (ACK, ip));
        let other = Ipv4Addr::new(10, 80, 0, 11);
        let (frame, lease) = reply(&client_message(port().mac, REQUEST, Some(other))).unwrap();
        assert_eq!(lease.kind, NAK);
        assert_eq!(lease.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(frame[..6], wire::BROADCAST_MAC);
    }

    #[test]
    fn another_client_or_server_or_a_broken_message_gets_nothing() {
        let other_mac = [2, 0, 0, 0, 0, 0x11];
        assert_eq!(
            reply(&client_message(other_mac, DISCOVER, None)).unwrap_err(),
            DropReason::Dhcp
        );
        let mut m = client_message(port().mac, REQUEST, None);
        m.pop();
        m.extend_from_slice(&[OPT_SERVER, 4, 10, 80, 0, 2, OPT_END]);
        assert_eq!(reply(&m).unwrap_err(), DropReason::Dhcp);
        let mut m = client_message(port().mac, DISCOVER, None);
        m.pop(); // no end option
        assert_eq!(reply(&m).unwrap_err(), DropReason::Malformed);
        let mut m = client_message(port().mac, DISCOVER, None);
        m.truncate(100);
        assert_eq!(reply(&m).unwrap_err(), DropReason::Malformed);
        // An option that runs past the end.
        let mut m = client_message(port().mac, DISCOVER, None);
        m.pop();
        m.extend_from_slice(&[12, 200, 1]);
        assert_eq!(reply(&m).unwrap_err(), DropReason::Malformed);
    }
}
