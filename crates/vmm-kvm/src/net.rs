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
use std::os::fd::AsRawFd;

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
        let fd = config.tap.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor owned by `config.tap`; no
        // memory is passed.
        let ok = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !ok {
            return Err(NetError::NonBlocking(std::io::Error::last_os_error()));
        }
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
            if rx.is_empty(mem)? {
                self.pending = Some(frame);
                break;
            }
            let Some((head, chain)) = rx.pop(mem)? else {
                self.pending = Some(frame);
                break;
            };
            let hdr = [0u8; NET_HDR_LEN];
            let mut src = hdr.iter().chain(frame.iter()).copied();
            let total = NET_HDR_LEN + frame.len();
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
            // A chain too short for the frame gets none of it (no partial
            // frames reach the guest).
            let used = if written == total { total as u32 } else { 0 };
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
