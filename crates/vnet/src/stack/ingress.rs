//! The ingress relay: a host-side TCP connection accepted for a published
//! port, joined to a TCP connection the stack opens from the gateway IP to
//! the instance.
//!
//! Bytes are moved directly between the host socket and the smoltcp
//! socket's buffers ([`INGRESS_BUFFER`] each way), so a side whose peer
//! buffer is full is simply not read: the host kernel's window and smoltcp's
//! window close and the sender waits. An end-of-stream on one side becomes
//! a FIN on the other (half-close both ways); a reset, an I/O error or a
//! timeout drops the pair, resetting the instance side.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream};
use std::ops::RangeInclusive;
use std::time::Instant;

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{Socket, SocketBuffer, State};
use smoltcp::time::Duration as SmolDuration;

use super::{INGRESS_BUFFER, INGRESS_CONNECT_TIMEOUT, INGRESS_IDLE_TIMEOUT, StackCounters};

/// Local ports of relays towards the instance.
pub(super) const EPHEMERAL_PORTS: RangeInclusive<u16> = 49152..=65535;
pub(super) const EPHEMERAL_PORT_COUNT: u16 = 65535 - 49152 + 1;
/// Keep-alive probes towards the instance on a quiet relay, and how long
/// smoltcp waits for any answer before giving the connection up.
const KEEP_ALIVE: SmolDuration = SmolDuration::from_secs(75);
const INSTANCE_TIMEOUT: SmolDuration = SmolDuration::from_secs(300);

/// Whether a relay stays after a round.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Keep {
    Yes,
    No,
}

/// One relayed connection.
#[derive(Debug)]
pub(super) struct IngressConn {
    handle: SocketHandle,
    /// The host side; None once dropped.
    stream: Option<TcpStream>,
    local_port: u16,
    /// First round seen (time comes from `run`'s `now`).
    opened: Option<Instant>,
    last_activity: Option<Instant>,
    established: bool,
    /// The host side sent its end of stream (and the instance side a FIN).
    host_eof: bool,
    /// The instance side finished and the host side was shut for writing.
    host_shut: bool,
    /// Finished: the socket is removed next round, after a reset or final
    /// ACK it owes has gone out.
    finished: bool,
}

impl IngressConn {
    /// Opens the instance side; None (the stream dropped, so closed) when
    /// the host stream cannot be made non-blocking or the connect fails.
    pub(super) fn open(
        iface: &mut Interface,
        sockets: &mut SocketSet<'static>,
        stream: TcpStream,
        local: (Ipv4Addr, u16),
        remote: (Ipv4Addr, u16),
    ) -> Option<Self> {
        stream.set_nonblocking(true).ok()?;
        // A relay forwards what it gets at once; batching is the ends' job.
        let _ = stream.set_nodelay(true);
        let mut socket = Socket::new(
            SocketBuffer::new(vec![0; INGRESS_BUFFER]),
            SocketBuffer::new(vec![0; INGRESS_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        socket.set_keep_alive(Some(KEEP_ALIVE));
        socket.set_timeout(Some(INSTANCE_TIMEOUT));
        socket
            .connect(iface.context(), (remote.0, remote.1), (local.0, local.1))
            .ok()?;
        Some(IngressConn {
            handle: sockets.add(socket),
            stream: Some(stream),
            local_port: local.1,
            opened: None,
            last_activity: None,
            established: false,
            host_eof: false,
            host_shut: false,
            finished: false,
        })
    }

    pub(super) fn local_port(&self) -> u16 {
        self.local_port
    }

    /// Bytes held in the stack for this relay.
    pub(super) fn buffered(&self, sockets: &SocketSet<'static>) -> usize {
        let socket = sockets.get::<Socket>(self.handle);
        socket.send_queue() + socket.recv_queue()
    }

    /// When the relay times out if nothing happens (or is due for removal).
    pub(super) fn deadline(&self) -> Option<Instant> {
        if self.finished {
            return self.last_activity.or(self.opened);
        }
        let idle = self.last_activity?.checked_add(INGRESS_IDLE_TIMEOUT);
        let connect = if self.established {
            None
        } else {
            self.opened?.checked_add(INGRESS_CONNECT_TIMEOUT)
        };
        match (idle, connect) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// One round of relaying; `Keep::No` once the socket is to be removed
    /// (it is, here).
    pub(super) fn run(
        &mut self,
        now: Instant,
        sockets: &mut SocketSet<'static>,
        counters: &mut StackCounters,
    ) -> Keep {
        if self.finished {
            sockets.remove(self.handle);
            return Keep::No;
        }
        let opened = *self.opened.get_or_insert(now);
        let last = *self.last_activity.get_or_insert(now);
        let socket = sockets.get_mut::<Socket>(self.handle);

        if !self.established && !matches!(socket.state(), State::SynSent | State::Closed) {
            self.established = true;
        }
        let timed_out = if self.established {
            now.saturating_duration_since(last) >= INGRESS_IDLE_TIMEOUT
        } else {
            now.saturating_duration_since(opened) >= INGRESS_CONNECT_TIMEOUT
        };
        if timed_out {
            counters.ingress_timeouts += 1;
            return self.drop_pair(socket);
        }
        let Some(stream) = self.stream.as_mut() else {
            return self.drop_pair(socket);
        };

        let mut moved = false;
        match to_host(socket, stream) {
            Ok(n) => moved |= n > 0,
            Err(_) => return self.drop_pair(socket),
        }
        // The instance finished sending and everything it sent is out.
        if self.established && !self.host_shut && !socket.may_recv() {
            let _ = stream.shutdown(Shutdown::Write);
            self.host_shut = true;
        }
        if self.established && !self.host_eof {
            match from_host(socket, stream) {
                Ok((n, eof)) => {
                    moved |= n > 0;
                    if eof {
                        self.host_eof = true;
                        socket.close();
                    }
                }
                Err(_) => return self.drop_pair(socket),
            }
        }
        if moved {
            self.last_activity = Some(now);
        }

        match socket.state() {
            // Refused or reset by the instance, or closed both ways: done
            // once nothing received is left for the host.
            State::Closed | State::TimeWait if !socket.can_recv() => {
                self.stream = None;
                self.finished = true;
            }
            _ => {}
        }
        Keep::Yes
    }

    /// Drops the host side and resets the instance side; the socket goes
    /// next round, after the reset is out.
    fn drop_pair(&mut self, socket: &mut Socket<'_>) -> Keep {
        socket.abort();
        self.stream = None;
        self.finished = true;
        Keep::Yes
    }
}

/// Writes what the instance sent to the host side, as far as it takes it.
fn to_host(socket: &mut Socket<'_>, stream: &mut TcpStream) -> io::Result<usize> {
    let mut total = 0;
    while socket.can_recv() {
        let written = socket.recv(|buf| match stream.write(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match written {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
    }
    Ok(total)
}

/// Reads from the host side into the instance side's send buffer while it
/// has room; the bool is true at the host's end of stream.
fn from_host(socket: &mut Socket<'_>, stream: &mut TcpStream) -> io::Result<(usize, bool)> {
    let mut total = 0;
    while socket.can_send() {
        let read = socket.send(|buf| {
            if buf.is_empty() {
                return (0, Ok(None));
            }
            match stream.read(buf) {
                Ok(n) => (n, Ok(Some(n))),
                Err(e) => (0, Err(e)),
            }
        });
        match read {
            Ok(Ok(Some(0))) => return Ok((total, true)),
            Ok(Ok(Some(n))) => total += n,
            Ok(Ok(None)) => break,
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
    }
    Ok((total, false))
}
