//! virtio-net over a tap device: one receive and one transmit queue, frames
//! relayed between the guest's rings and a tap file descriptor the caller
//! opened (`IFF_TAP | IFF_NO_PI`) and handed over.
//!
//! The device offers `VIRTIO_F_VERSION_1` and `VIRTIO_NET_F_MAC` only: no
//! offloads, no mergeable buffers, so every frame carries the 12-byte
//! `virtio_net_hdr_v1` with all fields zero and fits one receive chain. As
//! no interrupt is injected, the guest kicks the receive queue while it
//! waits; each kick moves whatever frames the tap has into posted buffers.
//! Frames longer than [`MAX_FRAME`] are dropped, whichever way they go.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtio::{F_VERSION_1, Queue, QueueError, VirtioDevice};

/// The virtio device id of a network card.
pub const DEVICE_ID: u32 = 1;
/// `VIRTIO_NET_F_MAC`: the device reports a MAC address.
pub const F_MAC: u64 = 1 << 5;
/// Size of `virtio_net_hdr_v1`, which precedes every frame in the rings.
pub const NET_HDR_LEN: usize = 12;
/// Longest Ethernet frame relayed (without the virtio header).
pub const MAX_FRAME: usize = 65_536;
/// Most frames moved per kick in each direction.
pub const MAX_FRAMES_PER_KICK: usize = 256;

const RX: usize = 0;
const TX: usize = 1;

/// A network device to attach.
#[derive(Debug)]
pub struct NetConfig {
    /// The tap device, opened with `IFF_TAP | IFF_NO_PI`; it is set
    /// non-blocking here.
    pub tap: File,
    /// The guest's MAC address, reported in the device configuration.
    pub mac: [u8; 6],
}

/// Why the network device could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// Making the tap descriptor non-blocking failed.
    #[error("setting the tap descriptor non-blocking failed")]
    NonBlocking(#[source] std::io::Error),
}

/// The virtio-net device.
#[derive(Debug)]
pub struct Net {
    tap: File,
    mac: [u8; 6],
    /// A frame read from the tap that found no receive buffer yet.
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
}

impl Net {
    /// Takes over the tap of `config`.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        nitrile_vmm_sys::fd::set_nonblocking(&config.tap).map_err(NetError::NonBlocking)?;
        Ok(Self {
            tap: config.tap,
            mac: config.mac,
            pending: None,
            buf: vec![0; MAX_FRAME],
        })
    }

    /// Sends the guest's frames to the tap.
    fn drain_tx(&mut self, tx: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        for _ in 0..MAX_FRAMES_PER_KICK {
            let Some((head, chain)) = tx.pop(mem)? else {
                break;
            };
            let mut frame = Vec::new();
            let mut too_long = false;
            for d in chain.iter().filter(|d| !d.is_write_only()) {
                let len = d.len as usize;
                if frame.len() + len > NET_HDR_LEN + MAX_FRAME {
                    too_long = true;
                    break;
                }
                let start = frame.len();
                frame.resize(start + len, 0);
                mem.read_slice(&mut frame[start..], GuestAddress(d.addr))?;
            }
            if !too_long && frame.len() > NET_HDR_LEN {
                // A full tap queue or a downed link drops the frame, as a
                // wire would.
                let _ = self.tap.write(&frame[NET_HDR_LEN..]);
            }
            tx.add_used(mem, head, 0)?;
        }
        Ok(())
    }

    /// Moves frames from the tap into the guest's receive buffers.
    fn fill_rx(&mut self, rx: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        for _ in 0..MAX_FRAMES_PER_KICK {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.tap.read(&mut self.buf) {
                    Ok(0) => break,
                    Ok(n) => self.buf[..n].to_vec(),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    // WouldBlock: nothing queued; other errors: the link is gone.
                    Err(_) => break,
                },
            };
            let Some((head, chain)) = rx.pop(mem)? else {
                self.pending = Some(frame);
                break;
            };
            let total = NET_HDR_LEN + frame.len();
            let room: u64 = chain
                .iter()
                .filter(|d| d.is_write_only())
                .map(|d| u64::from(d.len))
                .sum();
            if room < total as u64 {
                // Too small for the frame: the guest gets the chain back
                // empty and the frame is dropped (no partial frames).
                rx.add_used(mem, head, 0)?;
                continue;
            }
            let hdr = [0u8; NET_HDR_LEN];
            let mut src = hdr.iter().chain(frame.iter()).copied();
            let mut written = 0usize;
            for d in chain.iter().filter(|d| d.is_write_only()) {
                let n = (d.len as usize).min(total - written);
                let chunk: Vec<u8> = src.by_ref().take(n).collect();
                mem.write_slice(&chunk, GuestAddress(d.addr))?;
                written += n;
                if written == total {
                    break;
                }
            }
            let used = total as u32;
            rx.add_used(mem, head, used)?;
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC
    }

    fn queue_count(&self) -> usize {
        2
    }

    fn config(&self) -> &[u8] {
        &self.mac
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
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;
    use crate::virtio::MmioTransport;

    const RXQ: (u64, u64, u64) = (0x1000, 0x2000, 0x3000);
    const TXQ: (u64, u64, u64) = (0x4000, 0x5000, 0x6000);
    const BUF: u64 = 0x1_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn w(t: &mut MmioTransport<Net>, mem: &GuestMemoryMmap, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes(), mem);
    }

    /// A device on one end of a datagram socket pair (frame boundaries kept,
    /// as on a tap), driven to DRIVER_OK with both queues of size 4.
    fn device(mem: &GuestMemoryMmap) -> (MmioTransport<Net>, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        let tap = File::from(std::os::fd::OwnedFd::from(a));
        let net = Net::new(NetConfig {
            tap,
            mac: [2, 0, 0, 0, 0, 1],
        })
        .unwrap();
        let mut t = MmioTransport::new(net);
        w(&mut t, mem, 0x070, 1 | 2);
        w(&mut t, mem, 0x024, 1);
        w(&mut t, mem, 0x020, 1);
        w(&mut t, mem, 0x070, 1 | 2 | 8);
        for (i, q) in [RXQ, TXQ].into_iter().enumerate() {
            w(&mut t, mem, 0x030, i as u32);
            w(&mut t, mem, 0x038, 4);
            w(&mut t, mem, 0x080, q.0 as u32);
            w(&mut t, mem, 0x090, q.1 as u32);
            w(&mut t, mem, 0x0a0, q.2 as u32);
            w(&mut t, mem, 0x044, 1);
        }
        w(&mut t, mem, 0x070, 1 | 2 | 8 | 4);
        b.set_nonblocking(true).unwrap();
        (t, b)
    }

    fn post(mem: &GuestMemoryMmap, q: (u64, u64, u64), addr: u64, len: u32, flags: u16, n: u16) {
        let d = q.0 + 16 * u64::from(n);
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
        mem.write_obj(n, GuestAddress(q.1 + 4 + 2 * u64::from(n % 4)))
            .unwrap();
        mem.write_obj(n + 1, GuestAddress(q.1 + 2)).unwrap();
    }

    fn used(mem: &GuestMemoryMmap, q: (u64, u64, u64), n: u16) -> Option<u32> {
        let idx: u16 = mem.read_obj(GuestAddress(q.2 + 2)).unwrap();
        (idx > n).then(|| {
            mem.read_obj(GuestAddress(q.2 + 8 + 8 * u64::from(n % 4)))
                .unwrap()
        })
    }

    #[test]
    fn tx_strips_the_header_and_rx_adds_it() {
        let mem = mem();
        let (mut t, host) = device(&mem);
        let mut frame = vec![0u8; NET_HDR_LEN];
        frame.extend_from_slice(b"0123456789abcdef-frame");
        mem.write_slice(&frame, GuestAddress(BUF)).unwrap();
        post(&mem, TXQ, BUF, frame.len() as u32, 0, 0);
        w(&mut t, &mem, 0x050, 1);
        let mut got = [0u8; 256];
        let n = host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &frame[NET_HDR_LEN..]);
        assert_eq!(used(&mem, TXQ, 0), Some(0));

        host.send(b"reply-frame").unwrap();
        // Nothing posted yet: the frame waits for a buffer.
        w(&mut t, &mem, 0x050, 0);
        assert_eq!(used(&mem, RXQ, 0), None);
        post(&mem, RXQ, BUF + 0x1000, 2048, 2, 0);
        w(&mut t, &mem, 0x050, 0);
        assert_eq!(used(&mem, RXQ, 0), Some((NET_HDR_LEN + 11) as u32));
        let mut rx = [0xaau8; NET_HDR_LEN + 11];
        mem.read_slice(&mut rx, GuestAddress(BUF + 0x1000)).unwrap();
        assert_eq!(&rx[..NET_HDR_LEN], &[0; NET_HDR_LEN]);
        assert_eq!(&rx[NET_HDR_LEN..], b"reply-frame");
    }

    /// A frame arriving after the driver posted its buffer is delivered by
    /// the run loop's poll, without a kick, and raises an interrupt.
    #[test]
    fn poll_delivers_a_frame_without_a_kick() {
        let mem = mem();
        let (mut t, host) = device(&mem);
        post(&mem, RXQ, BUF, 2048, 2, 0);
        w(&mut t, &mem, 0x050, 0);
        assert_eq!(used(&mem, RXQ, 0), None);
        assert!(!t.take_interrupt());
        t.poll(&mem);
        assert!(!t.take_interrupt(), "nothing received, nothing used");
        host.send(b"unsolicited").unwrap();
        t.poll(&mem);
        assert_eq!(used(&mem, RXQ, 0), Some((NET_HDR_LEN + 11) as u32));
        assert!(t.take_interrupt());
        assert_eq!(t.interrupt_status(), crate::virtio::INT_VRING);
    }

    #[test]
    fn a_frame_larger_than_the_buffer_is_not_delivered() {
        let mem = mem();
        let (mut t, host) = device(&mem);
        mem.write_slice(&[0x55; 64], GuestAddress(BUF)).unwrap();
        host.send(&[7u8; 200]).unwrap();
        post(&mem, RXQ, BUF, 64, 2, 0);
        w(&mut t, &mem, 0x050, 0);
        assert_eq!(used(&mem, RXQ, 0), Some(0));
        let mut back = [0u8; 64];
        mem.read_slice(&mut back, GuestAddress(BUF)).unwrap();
        assert_eq!(back, [0x55; 64], "no partial frame");
    }

    #[test]
    fn guest_readable_receive_buffers_are_never_written() {
        let mem = mem();
        let (mut t, host) = device(&mem);
        mem.write_slice(&[0x55; 64], GuestAddress(BUF)).unwrap();
        host.send(&[7u8; 32]).unwrap();
        post(&mem, RXQ, BUF, 64, 0, 0);
        w(&mut t, &mem, 0x050, 0);
        assert_eq!(used(&mem, RXQ, 0), Some(0));
        let mut back = [0u8; 64];
        mem.read_slice(&mut back, GuestAddress(BUF)).unwrap();
        assert_eq!(back, [0x55; 64]);
    }
}
