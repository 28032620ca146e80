//! The stack's side of the link: two bounded frame queues that smoltcp
//! reads and writes as its device, with frame buffers reused.

use std::collections::VecDeque;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant as SmolInstant;

use super::{MAX_FRAME_LEN, MAX_PENDING_FRAMES, MTU};

/// Spare frame buffers kept for reuse.
const MAX_SPARE_BUFFERS: usize = 2 * MAX_PENDING_FRAMES;

/// Frames from the instance (rx) and to it (tx).
#[derive(Debug, Default)]
pub(super) struct Frames {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    /// The frame smoltcp is reading now (kept so its buffer is reused).
    current: Vec<u8>,
}

impl Frames {
    /// Queues a frame from the instance; false when the queue is full.
    pub(super) fn push_rx(&mut self, frame: &[u8]) -> bool {
        if self.rx.len() >= MAX_PENDING_FRAMES {
            return false;
        }
        let buf = self.copy(frame);
        self.rx.push_back(buf);
        true
    }

    /// Queues a frame the stack made itself ahead of the instance's (never
    /// refused: at most one such frame per processing round).
    pub(super) fn push_rx_front(&mut self, frame: &[u8]) {
        let buf = self.copy(frame);
        self.rx.push_front(buf);
    }

    pub(super) fn has_rx(&self) -> bool {
        !self.rx.is_empty()
    }

    pub(super) fn has_tx(&self) -> bool {
        !self.tx.is_empty()
    }

    pub(super) fn pop_tx(&mut self) -> Option<Vec<u8>> {
        self.tx.pop_front()
    }

    /// Gives a frame buffer back for reuse.
    pub(super) fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE_BUFFERS && buf.capacity() <= MAX_FRAME_LEN {
            buf.clear();
            self.spare.push(buf);
        }
    }

    fn copy(&mut self, frame: &[u8]) -> Vec<u8> {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(frame);
        buf
    }
}

impl Device for Frames {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: SmolInstant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        // No room for an answer: leave the frame queued until `poll` drains.
        if self.tx.len() >= MAX_PENDING_FRAMES {
            return None;
        }
        let next = self.rx.pop_front()?;
        let done = std::mem::replace(&mut self.current, next);
        self.recycle(done);
        Some((
            RxToken {
                frame: &self.current,
            },
            TxToken {
                tx: &mut self.tx,
                spare: &mut self.spare,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: SmolInstant) -> Option<TxToken<'_>> {
        if self.tx.len() >= MAX_PENDING_FRAMES {
            return None;
        }
        Some(TxToken {
            tx: &mut self.tx,
            spare: &mut self.spare,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU + 14;
        caps.max_burst_size = None;
        caps
    }
}

#[derive(Debug)]
pub(super) struct RxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.frame)
    }
}

#[derive(Debug)]
pub(super) struct TxToken<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let result = f(&mut buf);
        self.tx.push_back(buf);
        result
    }
}
