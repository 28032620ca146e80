//! The guest stack driven as an instance would: a second smoltcp interface
//! plays the instance (its MAC and IP, default route via the gateway), and
//! frames pass between the two in memory. Time is the `now` the test
//! passes; only the host side of ingress uses real loopback sockets.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nitrile_vnet::stack::{
    GuestStack, INGRESS_BUFFER, INGRESS_IDLE_TIMEOUT, InstanceMetadata, MAX_INGRESS_CONNECTIONS,
    MAX_METADATA_CONNECTIONS, MAX_REQUEST_HEAD, METADATA_ADDR, METADATA_CONNECTION_DEADLINE,
    StackConfig,
};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp::{Socket, SocketBuffer, State};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    HardwareAddress, IpCidr, IpProtocol, Ipv4Cidr, Ipv4Packet,
};

const GATEWAY_MAC: [u8; 6] = [0x02, 0x4e, 0, 0, 0, 1];
const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 1);
const INSTANCE_MAC: [u8; 6] = [0x02, 0x4e, 0, 0, 0, 2];
const INSTANCE_IP: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 2);
/// Steps a test waits for something before it fails.
const MAX_STEPS: usize = 20_000;
/// The guest's TCP buffers.
const GUEST_BUFFER: usize = 64 * 1024;

/// An identity document of every byte value, longer than one segment.
fn identity_document() -> Vec<u8> {
    (0..10_000u32).map(|i| (i * 7 % 256) as u8).collect()
}

fn metadata() -> InstanceMetadata {
    InstanceMetadata {
        instance_id: "i-0a1b2c3d".into(),
        local_ipv4: INSTANCE_IP,
        mac: INSTANCE_MAC,
        ssh_public_keys: vec![
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFirst alice@a".into(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISecond alice@b".into(),
        ],
        user_data: b"#cloud-config\nruncmd: [echo hello]\n".to_vec(),
        identity_document: identity_document(),
    }
}

fn config() -> StackConfig {
    StackConfig {
        gateway_mac: GATEWAY_MAC,
        gateway_ip: GATEWAY_IP,
        instance_mac: INSTANCE_MAC,
        instance_ip: INSTANCE_IP,
        prefix_len: 24,
        metadata: Arc::new(metadata()),
    }
}

/// The instance's NIC: frames to and from the stack.
#[derive(Default)]
struct Nic {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct NicRx(Vec<u8>);
struct NicTx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for NicRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for NicTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Nic {
    type RxToken<'a> = NicRx;
    type TxToken<'a> = NicTx<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(NicRx, NicTx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((NicRx(frame), NicTx(&mut self.tx)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<NicTx<'_>> {
        Some(NicTx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// The stack under test and the instance beside it.
struct Net {
    stack: GuestStack,
    nic: Nic,
    iface: Interface,
    sockets: SocketSet<'static>,
    start: Instant,
    now: Instant,
    /// Every frame the stack emitted, when capturing.
    captured: Option<Vec<Vec<u8>>>,
    next_port: u16,
}

impl Net {
    fn new() -> Self {
        Net::with(config())
    }

    fn with(stack_config: StackConfig) -> Self {
        let mut nic = Nic::default();
        let mut cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(INSTANCE_MAC)));
        cfg.random_seed = 7;
        let mut iface = Interface::new(cfg, &mut nic, SmolInstant::ZERO);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::Ipv4(Ipv4Cidr::new(INSTANCE_IP, 24)))
                .expect("room for an address");
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY_IP)
            .expect("room for a route");
        let start = Instant::now();
        Net {
            stack: GuestStack::new(stack_config),
            nic,
            iface,
            sockets: SocketSet::new(Vec::new()),
            start,
            now: start,
            captured: None,
            next_port: 40_000,
        }
    }

    fn timestamp(&self) -> SmolInstant {
        SmolInstant::from_micros((self.now - self.start).as_micros() as i64)
    }

    /// One millisecond: the instance sends, the stack answers, the
    /// instance takes the answers.
    fn step(&mut self) {
        self.advance(Duration::from_millis(1));
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        let ts = self.timestamp();
        self.iface.poll(ts, &mut self.nic, &mut self.sockets);
        while let Some(frame) = self.nic.tx.pop_front() {
            self.stack.receive(&frame, self.now);
        }
        let rx = &mut self.nic.rx;
        let captured = &mut self.captured;
        self.stack.poll(self.now, &mut |frame| {
            if let Some(c) = captured.as_mut() {
                c.push(frame.to_vec());
            }
            rx.push_back(frame.to_vec());
        });
        self.iface.poll(ts, &mut self.nic, &mut self.sockets);
    }

    /// Steps until `done` holds; fails the test after MAX_STEPS.
    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Net) -> bool) {
        for _ in 0..MAX_STEPS {
            if done(self) {
                return;
            }
            self.step();
        }
        panic!("never happened: {what}");
    }

    fn socket(&mut self, handle: SocketHandle) -> &mut Socket<'static> {
        self.sockets.get_mut::<Socket>(handle)
    }

    fn new_socket(&mut self) -> SocketHandle {
        self.sockets.add(Socket::new(
            SocketBuffer::new(vec![0; GUEST_BUFFER]),
            SocketBuffer::new(vec![0; GUEST_BUFFER]),
        ))
    }

    /// A connection from the instance to `addr:port`, not waited for.
    fn connect(&mut self, addr: Ipv4Addr, port: u16) -> SocketHandle {
        let handle = self.new_socket();
        self.next_port += 1;
        let local = self.next_port;
        let cx = self.iface.context();
        self.sockets
            .get_mut::<Socket>(handle)
            .connect(cx, (addr, port), local)
            .expect("connect");
        handle
    }

    /// One HTTP exchange with the metadata service: sends `request`, reads
    /// until the service closes.
    fn http(&mut self, request: &[u8]) -> Vec<u8> {
        let h = self.connect(METADATA_ADDR, 80);
        let mut sent = 0;
        let mut response = Vec::new();
        self.until("an answer and the service's close", |net| {
            let s = net.socket(h);
            if s.may_send() && sent < request.len() {
                sent += s.send_slice(&request[sent..]).expect("send");
            }
            while s.can_recv() {
                s.recv(|b| {
                    response.extend_from_slice(b);
                    (b.len(), ())
                })
                .expect("recv");
            }
            if s.state() == State::CloseWait || s.state() == State::Closed {
                s.close();
                return s.state() != State::SynSent;
            }
            false
        });
        self.sockets.remove(h);
        response
    }

    fn token(&mut self, ttl: u32) -> String {
        let r = self.http(
            format!(
                "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: {ttl}\r\n\r\n"
            )
            .as_bytes(),
        );
        let (status, body) = split(&r);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&r));
        String::from_utf8(body).expect("a token is text")
    }

    fn get(&mut self, path: &str, token: Option<&str>) -> (u16, Vec<u8>) {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n");
        if let Some(t) = token {
            req.push_str(&format!("X-aws-ec2-metadata-token: {t}\r\n"));
        }
        req.push_str("\r\n");
        let r = self.http(req.as_bytes());
        split(&r)
    }
}

/// Status and body of an HTTP answer, checking its Content-Length.
fn split(response: &[u8]) -> (u16, Vec<u8>) {
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(response)));
    let head = std::str::from_utf8(&response[..end]).expect("head is text");
    let status = head[9..12].parse().expect("a status");
    let body = response[end + 4..].to_vec();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .expect("a length");
    assert_eq!(length, body.len(), "Content-Length matches the body");
    (status, body)
}

#[test]
fn token_flow_serves_every_path_and_the_identity_document_byte_for_byte() {
    let mut net = Net::new();
    let token = net.token(300);
    let m = metadata();
    let text = |(status, body): (u16, Vec<u8>)| {
        assert_eq!(status, 200);
        String::from_utf8(body).expect("text")
    };
    assert_eq!(
        text(net.get("/latest/meta-data/instance-id", Some(&token))),
        m.instance_id
    );
    assert_eq!(
        text(net.get("/latest/meta-data/local-ipv4", Some(&token))),
        "10.7.0.2"
    );
    assert_eq!(
        text(net.get("/latest/meta-data/mac", Some(&token))),
        "02:4e:00:00:00:02"
    );
    assert_eq!(
        text(net.get("/latest/meta-data/public-keys/0/openssh-key", Some(&token))),
        format!("{}\n{}\n", m.ssh_public_keys[0], m.ssh_public_keys[1])
    );
    assert_eq!(
        text(net.get("/latest/meta-data/", Some(&token))),
        "instance-id\nlocal-ipv4\nmac\npublic-keys/"
    );
    let (status, user_data) = net.get("/latest/user-data", Some(&token));
    assert_eq!((status, user_data), (200, m.user_data.clone()));
    let (status, document) = net.get("/latest/dynamic/instance-identity/document", Some(&token));
    assert_eq!(status, 200);
    assert_eq!(document, identity_document(), "the document, byte for byte");
    assert_eq!(net.stack.sessions(net.now), 1);
    net.until("every connection closed and re-armed", |n| {
        n.stack.metadata_connections() == 0
    });
}

#[test]
fn gets_without_a_live_token_are_401() {
    let mut net = Net::new();
    let (status, _) = net.get("/latest/meta-data/instance-id", None);
    assert_eq!(status, 401, "no token");
    let (status, _) = net.get(
        "/latest/meta-data/instance-id",
        Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    );
    assert_eq!(status, 401, "a token never issued");

    let token = net.token(5);
    let (status, _) = net.get("/latest/user-data", Some(&token));
    assert_eq!(status, 200, "live");
    net.advance(Duration::from_secs(5));
    let (status, body) = net.get("/latest/user-data", Some(&token));
    assert_eq!(status, 401, "expired");
    assert!(!body.starts_with(b"#cloud-config"));
}

#[test]
fn a_token_request_through_a_proxy_is_403() {
    let mut net = Net::new();
    let r = net.http(
        b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n",
    );
    assert_eq!(split(&r).0, 403);
    assert_eq!(net.stack.sessions(net.now), 0, "no token was issued");
}

#[test]
fn an_oversized_request_head_is_431() {
    let mut net = Net::new();
    let mut req = String::from("GET /latest/meta-data/ HTTP/1.1\r\nX-Pad: ");
    req.push_str(&"p".repeat(MAX_REQUEST_HEAD + 2048));
    req.push_str("\r\n\r\n");
    let r = net.http(req.as_bytes());
    assert_eq!(split(&r).0, 431);
}

#[test]
fn unknown_paths_are_404_and_other_methods_405() {
    let mut net = Net::new();
    let token = net.token(60);
    assert_eq!(net.get("/latest/meta-data/iam/", Some(&token)).0, 404);
    assert_eq!(net.get("/", Some(&token)).0, 404);
    let r = net.http(
        format!("DELETE /latest/meta-data/ HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(split(&r).0, 405);
    let r = net.http(b"GET /latest/api/token HTTP/1.1\r\n\r\n");
    assert_eq!(split(&r).0, 405);
    let r = net.http(
        b"POST /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n",
    );
    assert_eq!(split(&r).0, 405);
}

#[test]
fn metadata_answers_leave_with_ttl_1() {
    let mut net = Net::new();
    net.captured = Some(Vec::new());
    let token = net.token(60);
    let (status, _) = net.get("/latest/dynamic/instance-identity/document", Some(&token));
    assert_eq!(status, 200);
    let mut from_metadata = 0;
    for frame in net.captured.take().expect("captured") {
        let eth = EthernetFrame::new_checked(&frame[..]).expect("ethernet");
        if eth.ethertype() != EthernetProtocol::Ipv4 {
            continue;
        }
        let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
        if ip.src_addr() == METADATA_ADDR {
            assert_eq!(ip.next_header(), IpProtocol::Tcp);
            assert_eq!(ip.hop_limit(), 1, "every metadata segment has TTL 1");
            from_metadata += 1;
        }
    }
    assert!(
        from_metadata > 8,
        "the answers were captured ({from_metadata})"
    );
}

#[test]
fn a_link_narrower_than_the_instance_still_serves_it() {
    let mut net = Net::with(StackConfig {
        prefix_len: 32,
        ..config()
    });
    let token = net.token(60);
    assert_eq!(
        net.get("/latest/meta-data/instance-id", Some(&token)).0,
        200
    );
}

#[test]
fn the_metadata_service_listens_only_on_its_address() {
    let mut net = Net::new();
    let h = net.connect(GATEWAY_IP, 80);
    net.until("the gateway refuses port 80", |n| {
        n.socket(h).state() == State::Closed
    });
}

#[test]
fn metadata_connections_are_capped_rearmed_and_reset_at_their_deadline() {
    let mut net = Net::new();
    let held: Vec<_> = (0..MAX_METADATA_CONNECTIONS)
        .map(|_| net.connect(METADATA_ADDR, 80))
        .collect();
    net.until("all accepted", |n| {
        held.iter()
            .all(|&h| n.socket(h).state() == State::Established)
    });
    assert_eq!(net.stack.metadata_connections(), MAX_METADATA_CONNECTIONS);
    let extra = net.connect(METADATA_ADDR, 80);
    net.until("one too many is refused", |n| {
        n.socket(extra).state() == State::Closed
    });

    // A silent client is reset at the deadline, and its slot serves again.
    net.advance(METADATA_CONNECTION_DEADLINE);
    net.until("silent connections reset", |n| {
        held.iter().all(|&h| n.socket(h).state() == State::Closed)
    });
    assert!(net.stack.counters().metadata_timeouts >= MAX_METADATA_CONNECTIONS as u64);
    for h in held {
        net.sockets.remove(h);
    }
    let token = net.token(60);
    assert_eq!(
        net.get("/latest/meta-data/instance-id", Some(&token)).0,
        200
    );
}

#[test]
fn arp_for_the_gateway_is_answered() {
    let mut stack = GuestStack::new(config());
    let mut frame = vec![0u8; 42];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.set_src_addr(EthernetAddress(INSTANCE_MAC));
    eth.set_dst_addr(EthernetAddress::BROADCAST);
    eth.set_ethertype(EthernetProtocol::Arp);
    ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(INSTANCE_MAC),
        source_protocol_addr: INSTANCE_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: GATEWAY_IP,
    }
    .emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
    let now = Instant::now();
    stack.receive(&frame, now);
    let mut replies = Vec::new();
    stack.poll(now, &mut |f| {
        let eth = EthernetFrame::new_checked(f).expect("ethernet");
        if let Ok(ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr,
            source_protocol_addr,
            ..
        }) = ArpPacket::new_checked(eth.payload()).and_then(|p| ArpRepr::parse(&p))
        {
            replies.push((source_hardware_addr, source_protocol_addr));
        }
    });
    assert_eq!(replies, vec![(EthernetAddress(GATEWAY_MAC), GATEWAY_IP)]);

    // The same request from another MAC is not answered.
    let mut spoofed = frame.clone();
    EthernetFrame::new_unchecked(&mut spoofed[..])
        .set_src_addr(EthernetAddress([2, 0, 0, 0, 0, 9]));
    stack.receive(&spoofed, now);
    let mut any = 0;
    stack.poll(now, &mut |_| any += 1);
    assert_eq!(any, 0);
}

// Ingress.

/// A host-side connection: the client end and the accepted end.
fn host_pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    (client, accepted)
}

fn listen_on_instance(net: &mut Net, port: u16) -> SocketHandle {
    let h = net.new_socket();
    net.socket(h).listen(port).expect("listen");
    h
}

/// Whether the client end sees the connection closed (EOF or reset).
fn closed(client: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    match client.read(&mut b) {
        Ok(0) => true,
        Ok(_) => panic!("unexpected bytes"),
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// Whether a socket's receive buffer is full, up to the granularity of its
/// scaled window.
fn window_closed(s: &Socket<'_>) -> bool {
    s.recv_queue() + 2 > s.recv_capacity()
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

#[test]
fn ingress_relays_a_mib_each_way_with_back_pressure() {
    const TOTAL: usize = 1 << 20;
    let mut net = Net::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (mut client, accepted) = host_pair(&listener);
    client.set_nonblocking(true).expect("nonblocking");
    let server = listen_on_instance(&mut net, 22);
    net.stack.ingress(accepted, 22);
    net.until("the instance accepts", |n| {
        n.socket(server).state() == State::Established
    });
    assert_eq!(net.stack.ingress_connections(), 1);

    // Host to instance, the instance not reading: the stack holds no more
    // than its buffers, the instance's window fills, the rest waits.
    let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
    let mut written = 0;
    let write_some = |client: &mut TcpStream, written: &mut usize| {
        while *written < TOTAL {
            match client.write(&data[*written..(*written + 16384).min(TOTAL)]) {
                Ok(n) => *written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("client write: {e}"),
            }
        }
    };
    net.until("the instance's window fills", |n| {
        write_some(&mut client, &mut written);
        assert!(n.stack.ingress_buffered() <= 2 * INGRESS_BUFFER);
        window_closed(n.socket(server))
    });
    for _ in 0..200 {
        write_some(&mut client, &mut written);
        net.step();
        assert!(
            net.stack.ingress_buffered() <= 2 * INGRESS_BUFFER,
            "bounded"
        );
    }
    assert!(window_closed(net.socket(server)), "still closed");

    let mut received = Vec::with_capacity(TOTAL);
    net.until("a MiB reaches the instance", |n| {
        write_some(&mut client, &mut written);
        let s = n.socket(server);
        while s.can_recv() {
            s.recv(|b| {
                received.extend_from_slice(b);
                (b.len(), ())
            })
            .expect("recv");
        }
        received.len() == TOTAL
    });
    assert!(received == data, "every byte, in order");

    // Instance to host, the host reading.
    let mut sent = 0;
    let mut back = Vec::with_capacity(TOTAL);
    net.until("a MiB reaches the host", |n| {
        let s = n.socket(server);
        if sent < TOTAL && s.can_send() {
            sent += s.send_slice(&data[sent..]).expect("send");
        }
        let mut buf = [0u8; 65536];
        loop {
            match client.read(&mut buf) {
                Ok(0) => panic!("early EOF"),
                Ok(k) => back.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("client read: {e}"),
            }
        }
        assert!(n.stack.ingress_buffered() <= 2 * INGRESS_BUFFER);
        back.len() == TOTAL
    });
    assert!(back == data, "every byte back, in order");
}

#[test]
fn ingress_close_propagates_both_ways_with_half_close() {
    let mut net = Net::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");

    // The host closes first; the instance still answers, then closes.
    let (mut client, accepted) = host_pair(&listener);
    client.set_nonblocking(true).expect("nonblocking");
    let server = listen_on_instance(&mut net, 22);
    net.stack.ingress(accepted, 22);
    net.until("accepted", |n| {
        n.socket(server).state() == State::Established
    });
    client.write_all(b"last words").expect("write");
    client.shutdown(Shutdown::Write).expect("shutdown");
    let mut got = Vec::new();
    net.until("the instance sees data then end of stream", |n| {
        let s = n.socket(server);
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .expect("recv");
        }
        !s.may_recv()
    });
    assert_eq!(got, b"last words");
    net.socket(server).send_slice(b"reply").expect("send");
    net.socket(server).close();
    let mut reply = Vec::new();
    net.until("the host reads the reply and end of stream", |_| {
        let mut b = [0u8; 64];
        match client.read(&mut b) {
            Ok(0) => true,
            Ok(k) => {
                reply.extend_from_slice(&b[..k]);
                false
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(e) => panic!("read: {e}"),
        }
    });
    assert_eq!(reply, b"reply");
    net.until("the relay is gone", |n| n.stack.ingress_connections() == 0);
    net.sockets.remove(server);

    // The instance closes first; the host can still send, then closes.
    let (mut client, accepted) = host_pair(&listener);
    client.set_nonblocking(true).expect("nonblocking");
    let server = listen_on_instance(&mut net, 22);
    net.stack.ingress(accepted, 22);
    net.until("accepted", |n| {
        n.socket(server).state() == State::Established
    });
    net.socket(server).close();
    net.until("the host sees end of stream", |_| closed(&mut client));
    client
        .write_all(b"after your FIN")
        .expect("half-closed write");
    let mut got = Vec::new();
    net.until("the instance still receives", |n| {
        let s = n.socket(server);
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .expect("recv");
        }
        got.len() == 14
    });
    assert_eq!(got, b"after your FIN");
    drop(client);
    net.until("both closed and the relay gone", |n| {
        n.stack.ingress_connections() == 0
    });
}

#[test]
fn a_reset_from_the_instance_drops_the_pair() {
    let mut net = Net::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (mut client, accepted) = host_pair(&listener);
    client.set_nonblocking(true).expect("nonblocking");
    let server = listen_on_instance(&mut net, 22);
    net.stack.ingress(accepted, 22);
    net.until("accepted", |n| {
        n.socket(server).state() == State::Established
    });
    net.socket(server).abort();
    net.until("the relay is gone and the host sees the close", |n| {
        n.stack.ingress_connections() == 0 && closed(&mut client)
    });
}

#[test]
fn a_stack_can_move_to_another_thread() {
    fn send<T: Send>() {}
    send::<GuestStack>();
}

#[test]
fn ingress_to_a_closed_port_closes_the_host_side() {
    let mut net = Net::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (mut client, accepted) = host_pair(&listener);
    client.set_nonblocking(true).expect("nonblocking");
    net.stack.ingress(accepted, 2222);
    net.until("refused and closed", |n| {
        n.stack.ingress_connections() == 0 && closed(&mut client)
    });
}

#[test]
fn ingress_connections_beyond_the_cap_are_closed_at_once() {
    let mut net = Net::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut clients = Vec::new();
    for _ in 0..MAX_INGRESS_CONNECTIONS {
        let (client, accepted) = host_pair(&listener);
        net.stack.ingress(accepted, 22);
        clients.push(client);
    }
    assert_eq!(net.stack.ingress_connections(), MAX_INGRESS_CONNECTIONS);
    let (mut extra, accepted) = host_pair(&listener);
    net.stack.ingress(accepted, 22);
    assert_eq!(net.stack.ingress_connections(), MAX_INGRESS_CONNECTIONS);
    assert_eq!(net.stack.counters().ingress_refused, 1);
    extra
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut b = [0u8; 8];
    assert!(
        matches!(extra.read(&mut b), Ok(0) | Err(_)),
        "the extra connection is closed"
    );
}

#[test]
fn an_idle_ingress_connection_is_dropped() {
    let mut net = Net::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (mut client, accepted) = host_pair(&listener);
    client.set_nonblocking(true).expect("nonblocking");
    let server = listen_on_instance(&mut net, 22);
    net.stack.ingress(accepted, 22);
    net.until("accepted", |n| {
        n.socket(server).state() == State::Established
    });
    client.write_all(b"x").expect("write");
    net.until("one byte relayed", |n| n.socket(server).recv_queue() == 1);

    // Quiet time in steps of ten seconds: keep-alives flow, no bytes.
    let steps = INGRESS_IDLE_TIMEOUT.as_secs() / 10 - 1;
    for _ in 0..steps {
        net.advance(Duration::from_secs(10));
    }
    assert_eq!(net.stack.ingress_connections(), 1, "not idle long enough");
    assert!(!closed(&mut client));
    net.advance(Duration::from_secs(10));
    net.until("dropped", |n| n.stack.ingress_connections() == 0);
    assert_eq!(net.stack.counters().ingress_timeouts, 1);
    net.until("the host sees the close", |_| closed(&mut client));
}

mod frames {
    use super::*;
    use proptest::prelude::*;

    /// An IPv4 frame from the instance with arbitrary protocol and payload.
    fn from_instance(proto: u8, dst_metadata: bool, payload: &[u8], raw_header: bool) -> Vec<u8> {
        let mut frame = vec![0u8; 14 + 20 + payload.len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.set_src_addr(EthernetAddress(INSTANCE_MAC));
        eth.set_dst_addr(EthernetAddress(GATEWAY_MAC));
        eth.set_ethertype(EthernetProtocol::Ipv4);
        let total = 20 + payload.len();
        let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len(total as u16);
        ip.set_hop_limit(64);
        ip.set_next_header(IpProtocol::from(proto));
        ip.set_src_addr(INSTANCE_IP);
        ip.set_dst_addr(if dst_metadata {
            METADATA_ADDR
        } else {
            GATEWAY_IP
        });
        ip.payload_mut().copy_from_slice(payload);
        if !raw_header {
            ip.fill_checksum();
        }
        frame
    }

    proptest! {
        #[test]
        fn arbitrary_frames_never_panic(
            raw in proptest::collection::vec(any::<u8>(), 0..1600),
            proto in prop_oneof![Just(6u8), Just(1u8), Just(17u8), any::<u8>()],
            dst_metadata in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..1480),
            raw_header in any::<bool>(),
            advance_ms in 0u64..100_000,
        ) {
            let mut stack = GuestStack::new(config());
            let now = Instant::now();
            let mut emitted = 0usize;
            stack.receive(&raw, now);
            stack.receive(&from_instance(proto, dst_metadata, &payload, raw_header), now);
            stack.poll(now, &mut |_| emitted += 1);
            let later = now + Duration::from_millis(advance_ms);
            let _ = stack.poll_delay(later);
            stack.poll(later, &mut |_| emitted += 1);
            // Whatever came in, nothing unbounded comes out.
            prop_assert!(emitted <= 2 * nitrile_vnet::stack::MAX_PENDING_FRAMES);
        }
    }
}
