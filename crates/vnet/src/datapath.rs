//! The data path's thread: one `epoll` loop over the instance ports'
//! packet sockets, the WireGuard socket, the published ports' listeners
//! and a wake-up socket for the API's commands. It owns every port, every
//! WireGuard session and the static key; the API talks to it only by
//! commands, so no lock is held on the hot path.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use nitrile_api::Name;
use nitrile_vmm_sys::packet::PacketSocket;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::counters::{DropReason, LiveCounters, TunnelStats, bump};
use crate::stack::{GuestStack, InstanceMetadata, StackConfig};
use crate::switch::{self, PortAddr, Verdict};
use crate::wire::{self, ETH_HEADER_LEN};
use crate::{GATEWAY_MAC, MAX_FRAME_LEN, Namespace, VnetError};

/// How often WireGuard's timers run (handshake retries, rekeying,
/// keepalives) and the tunnel statistics are refreshed.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How often a stack with ingress connections is polled at least.
const INGRESS_POLL: Duration = Duration::from_millis(10);
/// Frames or datagrams read from one socket before the loop moves on.
const BATCH: usize = 64;
/// The largest UDP datagram.
const MAX_DATAGRAM_LEN: usize = 65_535;
/// WireGuard's overhead on a data packet, and its smallest output buffer.
const WG_OVERHEAD: usize = 32;
const WG_MIN_BUFFER: usize = 148;

const TOKEN_WAKE: u64 = 0;
const TOKEN_UDP: u64 = 1;
const KIND_PORT: u64 = 1 << 32;
const KIND_LISTENER: u64 = 2 << 32;

/// Where and as whom a data path runs.
#[derive(Debug, Clone)]
pub struct DataPathConfig {
    /// This host, as routes name it.
    pub host: Name,
    /// The name of the data path's network namespace (`/run/netns/<name>`).
    pub netns: String,
    /// The WireGuard UDP socket's address (host namespace; port 0 allowed).
    pub wireguard_listen: SocketAddr,
    /// The host address published ports are bound on.
    pub ingress_addr: IpAddr,
}

/// A peer host: its WireGuard public key and endpoint, as the host agent
/// verified them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub host: Name,
    pub public_key: [u8; 32],
    pub endpoint: SocketAddr,
}

/// An instance address of a network, on the host that runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub vni: u32,
    pub address: Ipv4Addr,
    pub host: Name,
}

/// An instance port: the tap its VMM holds and its addresses.
#[derive(Debug, Clone)]
pub struct PortConfig {
    pub instance: Name,
    pub tap: String,
    pub vni: u32,
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub metadata: Arc<InstanceMetadata>,
}

/// How instance packets cross the underlay between hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tunnel {
    /// One WireGuard session per peer host: the only mode a real build has.
    WireGuard,
    /// The inner packet in a UDP datagram as it is, for the benchmark's
    /// baseline only (feature `danger-plaintext-tunnel`).
    #[cfg(feature = "danger-plaintext-tunnel")]
    DangerPlaintext,
}

type Reply = mpsc::SyncSender<Result<(), VnetError>>;

enum Command {
    SetPeers(Vec<Peer>, Reply),
    SetRoutes(Vec<Route>, Reply),
    Attach(Box<PortConfig>, PortAddr, PacketSocket, Reply),
    Detach(Name, Reply),
    Publish {
        instance: Name,
        host_port: u16,
        instance_port: u16,
        listener: TcpListener,
        reply: Reply,
    },
    Unpublish(Name, u16, Reply),
}

#[derive(Debug, Default)]
struct Shared {
    counters: LiveCounters,
    tunnels: Mutex<Vec<TunnelStats>>,
}

/// The per-host data path; dropping it stops its thread (taps stay with
/// their VMMs, the namespace stays for the next start).
#[derive(Debug)]
pub struct DataPath {
    namespace: Namespace,
    public_key: [u8; 32],
    endpoint: SocketAddr,
    ingress_addr: IpAddr,
    commands: Mutex<mpsc::Sender<Command>>,
    wake: UnixStream,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn wake(w: &UnixStream) {
    // A full socket already holds a wake-up: nothing lost.
    let _ = (&*w).write(&[1]);
}

impl DataPath {
    /// Opens (or makes) the namespace, binds the WireGuard socket, makes the
    /// static key and starts the thread.
    pub fn start(cfg: DataPathConfig) -> Result<DataPath, VnetError> {
        Self::start_with(cfg, Tunnel::WireGuard)
    }

    /// **Benchmark baseline only, never in a real build.** Starts a data
    /// path exactly as [`Self::start`] does, except that instance packets
    /// cross the underlay in the clear: the inner packet (synthetic header,
    /// VNI, instance packet) is sent to the peer's endpoint in a UDP
    /// datagram without WireGuard, and a datagram from a peer's endpoint is
    /// taken as such an inner packet, with the same checks (its inner form,
    /// its source routed to that peer, a local port at its destination).
    /// Exists only with the crate feature `danger-plaintext-tunnel`, which
    /// no crate of the workspace enables; the `tunnel` benchmark measures
    /// WireGuard's cost against it.
    #[cfg(feature = "danger-plaintext-tunnel")]
    pub fn start_danger_plaintext_tunnel(cfg: DataPathConfig) -> Result<DataPath, VnetError> {
        Self::start_with(cfg, Tunnel::DangerPlaintext)
    }

    fn start_with(cfg: DataPathConfig, tunnel: Tunnel) -> Result<DataPath, VnetError> {
        let namespace = Namespace::open_or_create(&cfg.netns)?;
        let udp =
            UdpSocket::bind(cfg.wireguard_listen).map_err(|e| VnetError::Socket("wireguard", e))?;
        udp.set_nonblocking(true)
            .map_err(|e| VnetError::Socket("wireguard", e))?;
        let endpoint = udp
            .local_addr()
            .map_err(|e| VnetError::Socket("wireguard", e))?;
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let public_key = PublicKey::from(&secret).to_bytes();
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(|e| VnetError::Socket("wake-up", e))?;
        for s in [&wake_tx, &wake_rx] {
            s.set_nonblocking(true)
                .map_err(|e| VnetError::Socket("wake-up", e))?;
        }
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| VnetError::Socket("epoll", e.into()))?;
        epoll
            .add(&wake_rx, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_WAKE))
            .map_err(|e| VnetError::Socket("epoll", e.into()))?;
        epoll
            .add(&udp, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_UDP))
            .map_err(|e| VnetError::Socket("epoll", e.into()))?;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let engine = Engine {
            host: cfg.host,
            epoll,
            wake: wake_rx,
            commands: rx,
            stop: stop.clone(),
            shared: shared.clone(),
            udp,
            tunnel,
            secret,
            ports: Vec::new(),
            port_by_name: HashMap::new(),
            local: HashMap::new(),
            routes: HashMap::new(),
            peers: Vec::new(),
            peer_by_host: HashMap::new(),
            peer_by_endpoint: HashMap::new(),
            listeners: Vec::new(),
            next_index: 1,
            bufs: Buffers {
                frame: vec![0; MAX_DATAGRAM_LEN],
                out: vec![0; MAX_FRAME_LEN.max(crate::dhcp::MAX_REPLY_LEN)],
                inner: vec![0; MAX_DATAGRAM_LEN],
                wg: vec![0; MAX_DATAGRAM_LEN + WG_OVERHEAD + WG_MIN_BUFFER],
                dgram: vec![0; MAX_DATAGRAM_LEN],
            },
        };
        let thread = std::thread::Builder::new()
            .name("nitrile-vnet".into())
            .spawn(move || engine.run())
            .map_err(|e| VnetError::Socket("the data path thread", e))?;
        Ok(DataPath {
            namespace,
            public_key,
            endpoint,
            ingress_addr: cfg.ingress_addr,
            commands: Mutex::new(tx),
            wake: wake_tx,
            stop,
            shared,
            thread: Some(thread),
        })
    }

    /// The public half of the data path's WireGuard key, to announce.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// The bound address of the WireGuard socket, to announce.
    pub fn local_endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// The namespace the taps of instance ports live in.
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    fn call(&self, make: impl FnOnce(Reply) -> Command) -> Result<(), VnetError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.commands
            .lock()
            .map_err(|_| VnetError::Stopped)?
            .send(make(reply))
            .map_err(|_| VnetError::Stopped)?;
        wake(&self.wake);
        answer.recv().map_err(|_| VnetError::Stopped)?
    }

    /// Replaces the peer hosts. A peer whose key and endpoint are
    /// unchanged keeps its session; this host, if listed, is left out.
    pub fn set_peers(&self, peers: Vec<Peer>) -> Result<(), VnetError> {
        self.call(|r| Command::SetPeers(peers, r))
    }

    /// Replaces the route table (instance addresses on other hosts; routes
    /// to this host are left out, local ports come from [`Self::attach`]).
    pub fn set_routes(&self, routes: Vec<Route>) -> Result<(), VnetError> {
        self.call(|r| Command::SetRoutes(routes, r))
    }

    /// Connects an instance's tap (which must exist in [`Self::namespace`])
    /// to its network; replaces an earlier port of the same instance.
    pub fn attach(&self, port: PortConfig) -> Result<(), VnetError> {
        let addr = PortAddr::new(port.mac, port.address, port.prefix_len, port.vni)
            .ok_or_else(|| VnetError::PortAddress(port.instance.clone()))?;
        let sock = self.namespace.bind_port(&port.tap)?;
        self.call(|r| Command::Attach(Box::new(port), addr, sock, r))
    }

    /// Disconnects an instance's port and closes its published ports.
    pub fn detach(&self, instance: &Name) {
        let _ = self.call(|r| Command::Detach(instance.clone(), r));
    }

    /// Publishes TCP `instance_port` of the instance on `host_port` of the
    /// ingress address (0: any free port); returns the bound address.
    pub fn publish(
        &self,
        instance: &Name,
        host_port: u16,
        instance_port: u16,
    ) -> Result<SocketAddr, VnetError> {
        let want = SocketAddr::new(self.ingress_addr, host_port);
        let listener = TcpListener::bind(want).map_err(|e| VnetError::Publish(want, e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| VnetError::Publish(want, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VnetError::Publish(want, e))?;
        self.call(|reply| Command::Publish {
            instance: instance.clone(),
            host_port: bound.port(),
            instance_port,
            listener,
            reply,
        })?;
        Ok(bound)
    }

    /// Closes a published port.
    pub fn unpublish(&self, instance: &Name, host_port: u16) {
        let _ = self.call(|r| Command::Unpublish(instance.clone(), host_port, r));
    }

    /// The counters now.
    pub fn counters(&self) -> crate::Counters {
        let tunnels = self
            .shared
            .tunnels
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        self.shared.counters.snapshot(tunnels)
    }
}

impl Drop for DataPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        wake(&self.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Buffers {
    frame: Vec<u8>,
    out: Vec<u8>,
    inner: Vec<u8>,
    wg: Vec<u8>,
    dgram: Vec<u8>,
}

struct Port {
    instance: Name,
    addr: PortAddr,
    sock: PacketSocket,
    stack: GuestStack,
    pending_input: bool,
    next_poll: Option<Instant>,
    ingress: bool,
}

struct PeerState {
    peer: Peer,
    tunn: Box<Tunn>,
}

struct Listener {
    instance: Name,
    host_port: u16,
    instance_port: u16,
    listener: TcpListener,
}

struct Engine {
    host: Name,
    epoll: Epoll,
    wake: UnixStream,
    commands: mpsc::Receiver<Command>,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    udp: UdpSocket,
    tunnel: Tunnel,
    /// The static key; x25519-dalek zeroizes it on drop.
    secret: StaticSecret,
    ports: Vec<Option<Port>>,
    port_by_name: HashMap<Name, usize>,
    /// Local ports by (VNI, address).
    local: HashMap<(u32, Ipv4Addr), usize>,
    /// Remote instances by (VNI, address).
    routes: HashMap<(u32, Ipv4Addr), Name>,
    peers: Vec<PeerState>,
    peer_by_host: HashMap<Name, usize>,
    peer_by_endpoint: HashMap<SocketAddr, usize>,
    listeners: Vec<Option<Listener>>,
    next_index: u32,
    bufs: Buffers,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Engine {
    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); BATCH];
        let mut next_timers = Instant::now() + TIMER_TICK;
        loop {
            let now = Instant::now();
            let timeout = self.timeout(now, next_timers);
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(_) => return,
            };
            let mut woke = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_WAKE => woke = true,
                    TOKEN_UDP => self.udp_ready(),
                    t if t & KIND_PORT != 0 => self.port_ready((t & 0xffff_ffff) as usize),
                    t if t & KIND_LISTENER != 0 => self.listener_ready((t & 0xffff_ffff) as usize),
                    _ => {}
                }
            }
            if woke {
                let mut sink = [0u8; 64];
                while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                while let Ok(cmd) = self.commands.try_recv() {
                    self.command(cmd);
                }
            }
            let now = Instant::now();
            if now >= next_timers {
                self.tick_timers();
                next_timers = now + TIMER_TICK;
            }
            self.poll_stacks(now);
        }
    }

    fn timeout(&self, now: Instant, next_timers: Instant) -> EpollTimeout {
        let mut deadline = next_timers;
        for p in self.ports.iter().flatten() {
            if p.ingress {
                deadline = deadline.min(now + INGRESS_POLL);
            }
            if let Some(t) = p.next_poll {
                deadline = deadline.min(t);
            }
        }
        // Rounded up: waking early would only spin.
        let ms = deadline
            .saturating_duration_since(now)
            .as_micros()
            .div_ceil(1000)
            .min(u128::from(u16::MAX)) as u16;
        EpollTimeout::from(ms)
    }

    fn port_ready(&mut self, i: usize) {
        let now = Instant::now();
        for _ in 0..BATCH {
            let Some(port) = self.ports.get_mut(i).and_then(Option::as_mut) else {
                return;
            };
            let n = match port.sock.recv(&mut self.bufs.frame) {
                Ok(n) => n,
                Err(e) if would_block(&e) => return,
                // The tap went (its VMM ended): nothing to read until detach.
                Err(_) => return,
            };
            bump(&self.shared.counters.frames_from_instances, 1);
            bump(&self.shared.counters.bytes_from_instances, n);
            if n > self.bufs.frame.len() {
                self.shared.counters.drop(DropReason::Oversize);
                continue;
            }
            let frame = &self.bufs.frame[..n];
            match switch::classify(&port.addr, frame, &mut self.bufs.out) {
                Verdict::Drop(reason) => self.shared.counters.drop(reason),
                Verdict::Reply(m) => {
                    bump(&self.shared.counters.answered, 1);
                    send_frame(&self.shared.counters, &port.sock, &self.bufs.out[..m]);
                }
                Verdict::Stack => {
                    port.stack.receive(frame, now);
                    port.pending_input = true;
                }
                Verdict::Forward { dst, start, len } => {
                    let vni = port.addr.vni;
                    self.forward(vni, dst, start, len);
                }
            }
        }
    }

    /// Forwards the instance packet at `bufs.frame[start..start + len]` of
    /// network `vni` to `dst`.
    fn forward(&mut self, vni: u32, dst: Ipv4Addr, start: usize, len: usize) {
        let packet = &self.bufs.frame[start..start + len];
        if let Some(&j) = self.local.get(&(vni, dst)) {
            let Some(to) = self.ports.get(j).and_then(Option::as_ref) else {
                self.shared.counters.drop(DropReason::NoRoute);
                return;
            };
            let out = &mut self.bufs.out;
            wire::put_eth(out, to.addr.mac, GATEWAY_MAC, wire::ETHERTYPE_IPV4);
            out[ETH_HEADER_LEN..ETH_HEADER_LEN + len].copy_from_slice(packet);
            send_frame(
                &self.shared.counters,
                &to.sock,
                &out[..ETH_HEADER_LEN + len],
            );
            return;
        }
        let Some(host) = self.routes.get(&(vni, dst)) else {
            self.shared.counters.drop(DropReason::NoRoute);
            return;
        };
        let Some(&p) = self.peer_by_host.get(host) else {
            self.shared.counters.drop(DropReason::NoPeer);
            return;
        };
        let n = switch::encapsulate(vni, packet, &mut self.bufs.inner);
        let peer = &mut self.peers[p];
        #[cfg(feature = "danger-plaintext-tunnel")]
        if self.tunnel == Tunnel::DangerPlaintext {
            let d = &self.bufs.inner[..n];
            send_datagram(&self.shared.counters, &self.udp, d, peer.peer.endpoint);
            return;
        }
        match peer
            .tunn
            .encapsulate(&self.bufs.inner[..n], &mut self.bufs.wg)
        {
            TunnResult::WriteToNetwork(d) => {
                send_datagram(&self.shared.counters, &self.udp, d, peer.peer.endpoint)
            }
            // Queued until the handshake completes.
            TunnResult::Done => {}
            _ => self.shared.counters.drop(DropReason::TunnelRejected),
        }
    }

    fn udp_ready(&mut self) {
        for _ in 0..BATCH {
            let (n, src) = match self.udp.recv_from(&mut self.bufs.dgram) {
                Ok(x) => x,
                Err(e) if would_block(&e) => return,
                Err(_) => return,
            };
            bump(&self.shared.counters.datagrams_in, 1);
            bump(&self.shared.counters.udp_bytes_in, n);
            let Some(&p) = self.peer_by_endpoint.get(&src) else {
                self.shared.counters.drop(DropReason::TunnelUnknownSource);
                continue;
            };
            let delivery = Delivery {
                counters: &self.shared.counters,
                routes: &self.routes,
                local: &self.local,
                ports: &self.ports,
            };
            #[cfg(feature = "danger-plaintext-tunnel")]
            if self.tunnel == Tunnel::DangerPlaintext {
                let from = &self.peers[p].peer.host;
                delivery.deliver(from, &self.bufs.dgram[..n], &mut self.bufs.out);
                continue;
            }
            let peer = &mut self.peers[p];
            match peer
                .tunn
                .decapsulate(Some(src.ip()), &self.bufs.dgram[..n], &mut self.bufs.wg)
            {
                TunnResult::WriteToNetwork(d) => {
                    send_datagram(&self.shared.counters, &self.udp, d, peer.peer.endpoint);
                    // Packets queued during the handshake go now.
                    while let TunnResult::WriteToNetwork(d) =
                        peer.tunn.decapsulate(None, &[], &mut self.bufs.wg)
                    {
                        send_datagram(&self.shared.counters, &self.udp, d, peer.peer.endpoint);
                    }
                    continue;
                }
                // Delivered from where WireGuard decrypted it.
                TunnResult::WriteToTunnelV4(inner, _) => {
                    delivery.deliver(&peer.peer.host, inner, &mut self.bufs.out);
                }
                TunnResult::WriteToTunnelV6(..) => {
                    self.shared.counters.drop(DropReason::TunnelMalformed);
                }
                TunnResult::Done => {}
                TunnResult::Err(_) => {
                    self.shared.counters.drop(DropReason::TunnelRejected);
                }
            }
        }
    }

    fn listener_ready(&mut self, i: usize) {
        let Some(l) = self.listeners.get(i).and_then(Option::as_ref) else {
            return;
        };
        for _ in 0..BATCH {
            let stream = match l.listener.accept() {
                Ok((s, _)) => s,
                Err(_) => return,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let Some(port) = self
                .port_by_name
                .get(&l.instance)
                .and_then(|&j| self.ports.get_mut(j))
                .and_then(Option::as_mut)
            else {
                return;
            };
            port.stack.ingress(stream, l.instance_port);
            port.ingress = true;
            port.pending_input = true;
        }
    }

    fn poll_stacks(&mut self, now: Instant) {
        for port in self.ports.iter_mut().flatten() {
            let due =
                port.pending_input || port.ingress || port.next_poll.is_some_and(|t| t <= now);
            if !due {
                continue;
            }
            let Port { stack, sock, .. } = port;
            let counters = &self.shared.counters;
            stack.poll(now, &mut |frame| send_frame(counters, sock, frame));
            port.pending_input = false;
            port.next_poll = port.stack.poll_delay(now).map(|d| now + d);
        }
    }

    fn tick_timers(&mut self) {
        let sessions = self.tunnel == Tunnel::WireGuard;
        for peer in self.peers.iter_mut().filter(|_| sessions) {
            if let TunnResult::WriteToNetwork(d) = peer.tunn.update_timers(&mut self.bufs.wg) {
                send_datagram(&self.shared.counters, &self.udp, d, peer.peer.endpoint);
            }
        }
        self.refresh_stats();
    }

    /// Publishes the sessions' statistics for [`DataPath::counters`].
    fn refresh_stats(&self) {
        let mut stats = Vec::with_capacity(self.peers.len());
        for peer in &self.peers {
            let (since, tx, rx, _, _) = peer.tunn.stats();
            stats.push(TunnelStats {
                host: peer.peer.host.clone(),
                endpoint: peer.peer.endpoint,
                since_handshake: since,
                tx_bytes: tx as u64,
                rx_bytes: rx as u64,
            });
        }
        if let Ok(mut t) = self.shared.tunnels.lock() {
            *t = stats;
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::SetPeers(peers, r) => {
                let _ = r.send(self.set_peers(peers));
            }
            Command::SetRoutes(routes, r) => {
                let _ = r.send(self.set_routes(routes));
            }
            Command::Attach(cfg, addr, sock, r) => {
                let _ = r.send(self.attach(*cfg, addr, sock));
            }
            Command::Detach(name, r) => {
                self.detach(&name);
                let _ = r.send(Ok(()));
            }
            Command::Publish {
                instance,
                host_port,
                instance_port,
                listener,
                reply,
            } => {
                let _ = reply.send(self.publish(instance, host_port, instance_port, listener));
            }
            Command::Unpublish(name, host_port, r) => {
                self.unpublish(|l| l.instance == name && l.host_port == host_port);
                let _ = r.send(Ok(()));
            }
        }
    }

    fn set_peers(&mut self, peers: Vec<Peer>) -> Result<(), VnetError> {
        let mut by_host = HashMap::new();
        let mut by_endpoint = HashMap::new();
        let peers: Vec<Peer> = peers.into_iter().filter(|p| p.host != self.host).collect();
        for (i, p) in peers.iter().enumerate() {
            if by_host.insert(p.host.clone(), i).is_some()
                || by_endpoint.insert(p.endpoint, i).is_some()
            {
                return Err(VnetError::DuplicatePeer(p.host.clone()));
            }
        }
        let mut old: HashMap<Name, PeerState> = self
            .peers
            .drain(..)
            .map(|s| (s.peer.host.clone(), s))
            .collect();
        for p in peers {
            let state = match old.remove(&p.host) {
                Some(s) if s.peer == p => s,
                _ => {
                    // Session indices are 24 bits; wrapping only risks
                    // reusing an index long retired.
                    let index = self.next_index & 0x00ff_ffff;
                    self.next_index = self.next_index.wrapping_add(1);
                    PeerState {
                        tunn: Box::new(Tunn::new(
                            self.secret.clone(),
                            PublicKey::from(p.public_key),
                            None,
                            None,
                            index,
                            None,
                        )),
                        peer: p,
                    }
                }
            };
            self.peers.push(state);
        }
        self.peer_by_host = by_host;
        self.peer_by_endpoint = by_endpoint;
        self.refresh_stats();
        Ok(())
    }

    fn set_routes(&mut self, routes: Vec<Route>) -> Result<(), VnetError> {
        let mut table = HashMap::new();
        for r in routes {
            if r.host == self.host {
                continue;
            }
            if table.insert((r.vni, r.address), r.host).is_some() {
                return Err(VnetError::DuplicateRoute(r.vni, r.address));
            }
        }
        self.routes = table;
        Ok(())
    }

    fn attach(
        &mut self,
        cfg: PortConfig,
        addr: PortAddr,
        sock: PacketSocket,
    ) -> Result<(), VnetError> {
        self.detach(&cfg.instance);
        if self.local.contains_key(&(addr.vni, addr.ip))
            || self
                .ports
                .iter()
                .flatten()
                .any(|p| p.addr.vni == addr.vni && p.addr.mac == addr.mac)
        {
            return Err(VnetError::AddressInUse(cfg.instance));
        }
        let slot = self
            .ports
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.ports.len());
        self.epoll
            .add(
                &sock,
                EpollEvent::new(EpollFlags::EPOLLIN, KIND_PORT | slot as u64),
            )
            .map_err(|e| VnetError::Socket("epoll", e.into()))?;
        let stack = GuestStack::new(StackConfig {
            gateway_mac: GATEWAY_MAC,
            gateway_ip: addr.gateway,
            instance_mac: addr.mac,
            instance_ip: addr.ip,
            prefix_len: addr.prefix_len,
            metadata: cfg.metadata,
        });
        let port = Port {
            instance: cfg.instance.clone(),
            addr,
            sock,
            stack,
            pending_input: false,
            next_poll: None,
            ingress: false,
        };
        if slot == self.ports.len() {
            self.ports.push(Some(port));
        } else {
            self.ports[slot] = Some(port);
        }
        self.local.insert((addr.vni, addr.ip), slot);
        self.port_by_name.insert(cfg.instance, slot);
        Ok(())
    }

    fn detach(&mut self, instance: &Name) {
        self.unpublish(|l| &l.instance == instance);
        let Some(slot) = self.port_by_name.remove(instance) else {
            return;
        };
        if let Some(port) = self.ports[slot].take() {
            let _ = self.epoll.delete(&port.sock);
            self.local.remove(&(port.addr.vni, port.addr.ip));
            debug_assert_eq!(&port.instance, instance);
        }
    }

    fn publish(
        &mut self,
        instance: Name,
        host_port: u16,
        instance_port: u16,
        listener: TcpListener,
    ) -> Result<(), VnetError> {
        if !self.port_by_name.contains_key(&instance) {
            return Err(VnetError::NoPort(instance));
        }
        let slot = self
            .listeners
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.listeners.len());
        self.epoll
            .add(
                &listener,
                EpollEvent::new(EpollFlags::EPOLLIN, KIND_LISTENER | slot as u64),
            )
            .map_err(|e| VnetError::Socket("epoll", e.into()))?;
        let l = Listener {
            instance,
            host_port,
            instance_port,
            listener,
        };
        if slot == self.listeners.len() {
            self.listeners.push(Some(l));
        } else {
            self.listeners[slot] = Some(l);
        }
        Ok(())
    }

    fn unpublish(&mut self, which: impl Fn(&Listener) -> bool) {
        for slot in &mut self.listeners {
            if slot.as_ref().is_some_and(&which)
                && let Some(l) = slot.take()
            {
                let _ = self.epoll.delete(&l.listener);
            }
        }
    }
}

/// What delivering an inner packet from a peer host reads, borrowed
/// apart from the buffer the packet is in.
struct Delivery<'a> {
    counters: &'a LiveCounters,
    routes: &'a HashMap<(u32, Ipv4Addr), Name>,
    local: &'a HashMap<(u32, Ipv4Addr), usize>,
    ports: &'a [Option<Port>],
}

impl Delivery<'_> {
    /// Delivers `inner`, an inner packet that peer host `from` sent, to
    /// its local port, framed in `out`.
    fn deliver(&self, from: &Name, inner: &[u8], out: &mut [u8]) {
        let inner = match switch::decapsulate(inner) {
            Ok(inner) => inner,
            Err(reason) => {
                self.counters.drop(reason);
                return;
            }
        };
        if self.routes.get(&(inner.vni, inner.packet.src)) != Some(from) {
            self.counters.drop(DropReason::TunnelSourceNotRouted);
            return;
        }
        let Some(to) = self
            .local
            .get(&(inner.vni, inner.packet.dst))
            .and_then(|&j| self.ports.get(j))
            .and_then(Option::as_ref)
        else {
            self.counters.drop(DropReason::TunnelNoLocalPort);
            return;
        };
        let packet = inner.packet.packet;
        if ETH_HEADER_LEN + packet.len() > out.len() {
            self.counters.drop(DropReason::Oversize);
            return;
        }
        wire::put_eth(out, to.addr.mac, GATEWAY_MAC, wire::ETHERTYPE_IPV4);
        out[ETH_HEADER_LEN..ETH_HEADER_LEN + packet.len()].copy_from_slice(packet);
        send_frame(
            self.counters,
            &to.sock,
            &out[..ETH_HEADER_LEN + packet.len()],
        );
    }
}

fn send_frame(counters: &LiveCounters, sock: &PacketSocket, frame: &[u8]) {
    match sock.send(frame) {
        Ok(_) => {
            bump(&counters.frames_to_instances, 1);
            bump(&counters.bytes_to_instances, frame.len());
        }
        Err(_) => counters.drop(DropReason::SendFailed),
    }
}

fn send_datagram(counters: &LiveCounters, udp: &UdpSocket, d: &[u8], to: SocketAddr) {
    match udp.send_to(d, to) {
        Ok(_) => {
            bump(&counters.datagrams_out, 1);
            bump(&counters.udp_bytes_out, d.len());
        }
        Err(_) => counters.drop(DropReason::SendFailed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host agent shares one data path between its request handlers.
    #[test]
    fn a_data_path_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<DataPath>();
    }

    #[test]
    fn drops_are_counted_by_reason_and_unseen_reasons_left_out() {
        let live = LiveCounters::default();
        live.drop(DropReason::SourceMac);
        live.drop(DropReason::SourceMac);
        live.drop(DropReason::SendFailed);
        let c = live.snapshot(Vec::new());
        assert_eq!(c.dropped(DropReason::SourceMac), 2);
        assert_eq!(c.dropped(DropReason::SendFailed), 1);
        assert_eq!(c.dropped(DropReason::Malformed), 0);
        assert_eq!(c.drops.len(), 2);
        // Every reason has its own slot and name.
        let names: std::collections::BTreeSet<_> =
            DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
    }
}
