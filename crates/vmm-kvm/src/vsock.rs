//! virtio-vsock in user space (no vhost): stream connections between the
//! guest and host Unix sockets. A guest connection to host port `P` (CID 2)
//! is relayed to the Unix socket `<uds_path>_<P>`, as Firecracker does.
//!
//! A host process may also connect to `<uds_path>` itself and send
//! `CONNECT <port>\n`; once the guest accepts, it reads `OK <host port>\n` and
//! the stream is relayed.
//!
//! The device is driven by the guest's notifications: every kick of a queue
//! moves what it can in both directions without blocking (interrupts are not
//! injected yet, so a polling guest kicks the receive queue while it waits).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtio::{Descriptor, F_VERSION_1, Queue, QueueError, VirtioDevice};

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Bytes in a packet header.
pub const HDR_LEN: usize = 44;
/// Largest payload accepted in one packet from the guest.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Receive buffer space the device advertises per connection.
const BUF_ALLOC: u32 = 256 * 1024;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;

const RX: usize = 0;
const TX: usize = 1;

/// A vsock device's host side.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u64,
    /// Base path of the host Unix sockets.
    pub uds_path: PathBuf,
}

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VsockError {
    /// CIDs 0..=2 are reserved (hypervisor, local, host).
    #[error("guest CID {0} is reserved")]
    ReservedCid(u64),
    /// The host socket at `uds_path` could not be bound.
    #[error("binding the host vsock socket failed")]
    Bind(#[source] std::io::Error),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    fn parse(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug)]
struct Connection {
    guest_port: u32,
    host_port: u32,
    stream: UnixStream,
    /// Bytes from the guest written to the host socket.
    fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// False while a host-initiated connection waits for the guest's answer.
    established: bool,
}

/// A host connection to `<uds_path>` that has not sent its CONNECT line yet.
#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Longest CONNECT line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Host-side ports for host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

impl Connection {
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// The virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    config: [u8; 8],
    connections: Vec<Connection>,
    control: VecDeque<Header>,
    listener: UnixListener,
    pending: Vec<PendingHost>,
    next_local_port: u32,
}

impl Vsock {
    /// A device for `config`.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid <= HOST_CID || config.guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(config.guest_cid));
        }
        let listener = UnixListener::bind(&config.uds_path).map_err(VsockError::Bind)?;
        listener.set_nonblocking(true).map_err(VsockError::Bind)?;
        Ok(Self {
            guest_cid: config.guest_cid,
            uds_path: config.uds_path,
            config: config.guest_cid.to_le_bytes(),
            connections: Vec::new(),
            control: VecDeque::new(),
            listener,
            pending: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// Accepts host connections and turns complete CONNECT lines into
    /// connection requests to the guest.
    fn pump_host(&mut self) {
        while self.pending.len() + self.connections.len() < MAX_CONNECTIONS {
            match self.listener.accept() {
                Ok((stream, _)) if stream.set_nonblocking(true).is_ok() => {
                    self.pending.push(PendingHost {
                        stream,
                        line: Vec::new(),
                    });
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            let mut byte = [0u8; 1];
            let mut keep = true;
            // Byte by byte, so nothing after the line is consumed here.
            loop {
                match p.stream.read(&mut byte) {
                    Ok(1) if byte[0] == b'\n' => break,
                    Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    _ => {
                        keep = false;
                        break;
                    }
                }
            }
            let complete = keep && byte[0] == b'\n';
            if !keep || complete {
                let p = self.pending.swap_remove(i);
                if complete && let Some(port) = parse_connect(&p.line) {
                    let local = self.next_local_port;
                    self.next_local_port =
                        self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
                    self.connections.push(Connection {
                        guest_port: port,
                        host_port: local,
                        stream: p.stream,
                        fwd_cnt: 0,
                        tx_cnt: 0,
                        peer_buf_alloc: 0,
                        peer_fwd_cnt: 0,
                        established: false,
                    });
                    self.control.push_back(Header {
                        src_cid: HOST_CID,
                        dst_cid: self.guest_cid,
                        src_port: local,
                        dst_port: port,
                        kind: TYPE_STREAM,
                        op: OP_REQUEST,
                        buf_alloc: BUF_ALLOC,
                        ..Header::default()
                    });
                }
            } else {
                i += 1;
            }
        }
    }

    fn reply(&self, to: &Header, op: u16, flags: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    fn find(&mut self, h: &Header) -> Option<usize> {
        self.connections
            .iter()
            .position(|c| c.guest_port == h.src_port && c.host_port == h.dst_port)
    }

    /// Handles one packet the guest sent.
    fn handle(&mut self, h: Header, payload: &[u8]) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            return; // not ours to answer; drop
        }
        let existing = self.find(&h);
        if let Some(i) = existing {
            let c = &mut self.connections[i];
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match (h.op, existing) {
            (OP_REQUEST, None) => {
                let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
                let stream = (self.connections.len() < MAX_CONNECTIONS)
                    .then(|| UnixStream::connect(path).ok())
                    .flatten()
                    .filter(|s| s.set_nonblocking(true).is_ok());
                match stream {
                    Some(stream) => {
                        self.connections.push(Connection {
                            guest_port: h.src_port,
                            host_port: h.dst_port,
                            stream,
                            fwd_cnt: 0,
                            tx_cnt: 0,
                            peer_buf_alloc: h.buf_alloc,
                            peer_fwd_cnt: h.fwd_cnt,
                            established: true,
                        });
                        self.control.push_back(self.reply(&h, OP_RESPONSE, 0, 0));
                    }
                    None => self.control.push_back(self.reply(&h, OP_RST, 0, 0)),
                }
            }
            (OP_RW, Some(i)) => {
                if write_fully(&mut self.connections[i].stream, payload).is_ok() {
                    let c = &mut self.connections[i];
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(payload.len() as u32);
                } else {
                    self.connections.remove(i);
                    self.control.push_back(self.reply(&h, OP_RST, 0, 0));
                }
            }
            (OP_CREDIT_REQUEST, Some(i)) => {
                let fwd = self.connections[i].fwd_cnt;
                self.control
                    .push_back(self.reply(&h, OP_CREDIT_UPDATE, 0, fwd));
            }
            (OP_RESPONSE, Some(i)) if !self.connections[i].established => {
                let c = &mut self.connections[i];
                c.established = true;
                let ok = format!("OK {}\n", c.host_port);
                if write_fully(&mut c.stream, ok.as_bytes()).is_err() {
                    self.connections.remove(i);
                    self.control.push_back(self.reply(&h, OP_RST, 0, 0));
                }
            }
            (OP_CREDIT_UPDATE, Some(_)) => {}
            (OP_SHUTDOWN | OP_RST, Some(i)) => {
                self.connections.remove(i);
                if h.op == OP_SHUTDOWN {
                    self.control.push_back(self.reply(&h, OP_RST, 0, 0));
                }
            }
            (OP_RST, None) => {}
            _ => self.control.push_back(self.reply(&h, OP_RST, 0, 0)),
        }
    }

    fn drain_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        while let Some((head, chain)) = queue.pop(mem)? {
            let total: usize = chain
                .iter()
                .filter(|d| !d.is_write_only())
                .map(|d| d.len as usize)
                .sum();
            if (HDR_LEN..=HDR_LEN + MAX_PAYLOAD).contains(&total) {
                let mut buf = vec![0u8; total];
                gather(&mut buf, &chain, mem)?;
                let mut hb = [0u8; HDR_LEN];
                hb.copy_from_slice(&buf[..HDR_LEN]);
                let h = Header::parse(&hb);
                let len = (h.len as usize).min(total - HDR_LEN);
                self.handle(h, &buf[HDR_LEN..HDR_LEN + len]);
            }
            queue.add_used(mem, head, 0)?;
        }
        Ok(())
    }

    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        self.pump_host();
        while !queue.is_empty(mem)? {
            if let Some(h) = self.control.pop_front() {
                deliver(queue, mem, &h, &[])?;
                continue;
            }
            let mut sent = false;
            let mut closed = None;
            for (i, c) in self.connections.iter_mut().enumerate() {
                if !c.established {
                    continue;
                }
                let room = (c.peer_credit() as usize).min(4096 - HDR_LEN);
                if room == 0 {
                    continue;
                }
                let mut buf = vec![0u8; room];
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        closed = Some(i);
                        break;
                    }
                    Ok(n) => {
                        let h = Header {
                            src_cid: HOST_CID,
                            dst_cid: self.guest_cid,
                            src_port: c.host_port,
                            dst_port: c.guest_port,
                            len: n as u32,
                            kind: TYPE_STREAM,
                            op: OP_RW,
                            flags: 0,
                            buf_alloc: BUF_ALLOC,
                            fwd_cnt: c.fwd_cnt,
                        };
                        if deliver(queue, mem, &h, &buf[..n])? {
                            c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                        }
                        sent = true;
                        break;
                    }
                    Err(e)
                        if e.kind() == ErrorKind::WouldBlock
                            || e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        closed = Some(i);
                        break;
                    }
                }
            }
            if let Some(i) = closed {
                let c = self.connections.remove(i);
                // The host side closed: tell the guest no more data comes.
                self.control.push_back(Header {
                    src_cid: HOST_CID,
                    dst_cid: self.guest_cid,
                    src_port: c.host_port,
                    dst_port: c.guest_port,
                    kind: TYPE_STREAM,
                    op: OP_SHUTDOWN,
                    flags: 3,
                    buf_alloc: BUF_ALLOC,
                    fwd_cnt: c.fwd_cnt,
                    ..Header::default()
                });
                continue;
            }
            if !sent {
                break;
            }
        }
        Ok(())
    }
}

/// `CONNECT <port>` with a decimal port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let rest = line.strip_prefix(b"CONNECT ")?;
    let text = std::str::from_utf8(rest).ok()?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

fn write_fully(stream: &mut UnixStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match stream.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::thread::yield_now();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn gather(buf: &mut [u8], chain: &[Descriptor], mem: &GuestMemoryMmap) -> Result<(), QueueError> {
    let mut at = 0;
    for d in chain.iter().filter(|d| !d.is_write_only()) {
        let len = d.len as usize;
        mem.read_slice(&mut buf[at..at + len], GuestAddress(d.addr))?;
        at += len;
    }
    Ok(())
}

/// Writes one packet into the next receive chain. Returns false (and hands
/// the chain back empty) when the chain is too small for it.
fn deliver(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    h: &Header,
    payload: &[u8],
) -> Result<bool, QueueError> {
    let Some((head, chain)) = queue.pop(mem)? else {
        return Ok(false);
    };
    let mut packet = h.bytes().to_vec();
    packet.extend_from_slice(payload);
    let room: usize = chain
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| d.len as usize)
        .sum();
    if room < packet.len() {
        queue.add_used(mem, head, 0)?;
        return Ok(false);
    }
    let mut at = 0;
    for d in chain.iter().filter(|d| d.is_write_only()) {
        if at == packet.len() {
            break;
        }
        let n = (d.len as usize).min(packet.len() - at);
        mem.write_slice(&packet[at..at + n], GuestAddress(d.addr))?;
        at += n;
    }
    queue.add_used(mem, head, packet.len() as u32)?;
    Ok(true)
}

impl VirtioDevice for Vsock {
    fn device_id(&self) -> u32 {
        19
    }

    fn features(&self) -> u64 {
        F_VERSION_1
    }

    fn queue_count(&self) -> usize {
        3
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), QueueError> {
        if index == TX
            && let Some(tx) = queues.get_mut(TX)
        {
            self.drain_tx(tx, mem)?;
        }
        if let Some(rx) = queues.get_mut(RX) {
            self.fill_rx(rx, mem)?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.connections.clear();
        self.control.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT 99999999999",
            b"connect 5",
            b"CONNECT 5 6",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn header_roundtrip() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 9,
            dst_port: 5000,
            len: 7,
            kind: 1,
            op: 5,
            flags: 0,
            buf_alloc: 10,
            fwd_cnt: 11,
        };
        assert_eq!(Header::parse(&h.bytes()), h);
    }

    #[test]
    fn reserved_cids_refused() {
        for cid in [0, 1, 2, 1 << 40] {
            assert!(
                Vsock::new(VsockConfig {
                    guest_cid: cid,
                    uds_path: "v".into()
                })
                .is_err()
            );
        }
    }

    #[test]
    fn request_to_missing_socket_is_reset_and_spoofed_source_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Vsock::new(VsockConfig {
            guest_cid: 3,
            uds_path: dir.path().join("v.sock"),
        })
        .unwrap();
        let req = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1,
            dst_port: 77,
            kind: 1,
            op: OP_REQUEST,
            ..Header::default()
        };
        v.handle(req, &[]);
        assert_eq!(v.control.pop_front().map(|h| h.op), Some(OP_RST));
        v.handle(Header { src_cid: 4, ..req }, &[]);
        assert!(v.control.is_empty());
    }

    #[test]
    fn credit_limits_what_is_sent() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = Connection {
            guest_port: 1,
            host_port: 2,
            stream: a,
            fwd_cnt: 0,
            tx_cnt: 100,
            peer_buf_alloc: 150,
            peer_fwd_cnt: 0,
            established: true,
        };
        assert_eq!(c.peer_credit(), 50);
        let c = Connection { tx_cnt: 200, ..c };
        assert_eq!(c.peer_credit(), 0);
    }
}
