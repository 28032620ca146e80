//! virtio 1.x over MMIO (modern register layout, version 2) and split
//! virtqueues, read and written through `vm-memory` only: guest memory is
//! never turned into a Rust reference, and every index and chain coming from
//! the guest is bounded.

use std::sync::atomic::{Ordering, fence};

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Largest queue a device offers.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// `VIRTIO_F_VERSION_1`: the only transport feature offered.
pub const F_VERSION_1: u64 = 1 << 32;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4e49_5452; // "NITR"

/// `InterruptStatus` bit: the device used buffers in a queue.
pub const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: the device configuration (here: the device status,
/// set to `NEEDS_RESET`) changed.
pub const INT_CONFIG: u32 = 2;

/// Device status bits (virtio 1.x section 2.1).
pub const STATUS_DRIVER_OK: u32 = 4;
/// Features negotiated.
pub const STATUS_FEATURES_OK: u32 = 8;
/// The device hit an error and needs a reset.
pub const STATUS_NEEDS_RESET: u32 = 64;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;

/// A guest request the device cannot serve; the device stops the queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// A ring, descriptor or buffer lies outside guest memory.
    #[error("virtqueue access outside guest memory")]
    Memory(#[from] GuestMemoryError),
    /// A descriptor index is not below the queue size.
    #[error("descriptor index {0} out of range")]
    BadIndex(u16),
    /// A chain is longer than the queue (a loop).
    #[error("descriptor chain longer than the queue")]
    ChainTooLong,
    /// The driver published more new buffers than the queue holds.
    #[error("available index moved by more than the queue size")]
    AvailOverrun,
}

/// One descriptor as read from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `DESC_F_*` flags.
    pub flags: u16,
    next: u16,
}

impl Descriptor {
    /// Whether the device may write this buffer (and may not read it).
    pub fn is_write_only(&self) -> bool {
        self.flags & DESC_F_WRITE != 0
    }
}

/// A split virtqueue as configured by the driver.
#[derive(Debug, Clone, Default)]
pub struct Queue {
    /// Size the driver chose (a power of two, at most the device maximum).
    pub size: u16,
    /// Whether the driver set `QueueReady`.
    pub ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
}

impl Queue {
    fn valid(&self, max: u16) -> bool {
        self.ready && self.size != 0 && self.size <= max && self.size.is_power_of_two()
    }

    /// Whether the driver has published no chain that was not taken yet.
    pub fn is_empty(&self, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let avail_idx: u16 = mem.read_obj(GuestAddress(self.avail + 2))?;
        Ok(avail_idx == self.next_avail)
    }

    /// Takes the next available chain, or `None` when the driver has
    /// published nothing new. Returns the head index and its descriptors.
    pub fn pop(
        &mut self,
        mem: &GuestMemoryMmap,
    ) -> Result<Option<(u16, Vec<Descriptor>)>, QueueError> {
        let avail_idx: u16 = mem.read_obj(GuestAddress(self.avail + 2))?;
        fence(Ordering::Acquire);
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailOverrun);
        }
        let slot = u64::from(self.next_avail % self.size);
        let head: u16 = mem.read_obj(GuestAddress(self.avail + 4 + 2 * slot))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        let mut chain = Vec::new();
        let mut idx = head;
        loop {
            if idx >= self.size {
                return Err(QueueError::BadIndex(idx));
            }
            if chain.len() >= usize::from(self.size) {
                return Err(QueueError::ChainTooLong);
            }
            let base = GuestAddress(self.desc + 16 * u64::from(idx));
            let d = Descriptor {
                addr: mem.read_obj(base)?,
                len: mem.read_obj(GuestAddress(base.0 + 8))?,
                flags: mem.read_obj(GuestAddress(base.0 + 12))?,
                next: mem.read_obj(GuestAddress(base.0 + 14))?,
            };
            chain.push(d);
            if d.flags & DESC_F_NEXT == 0 {
                break;
            }
            idx = d.next;
        }
        Ok(Some((head, chain)))
    }

    /// Returns chain `head` to the driver, `len` bytes written into it.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let slot = u64::from(self.next_used % self.size);
        let elem = GuestAddress(self.used + 4 + 8 * slot);
        mem.write_obj(u32::from(head), elem)?;
        mem.write_obj(len, GuestAddress(elem.0 + 4))?;
        self.next_used = self.next_used.wrapping_add(1);
        fence(Ordering::Release);
        mem.write_obj(self.next_used, GuestAddress(self.used + 2))?;
        Ok(())
    }
}

/// What a virtio device behind the MMIO transport provides.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The virtio device ID (2 = block, 19 = vsock).
    fn device_id(&self) -> u32;
    /// Device features, `F_VERSION_1` included.
    fn features(&self) -> u64;
    /// Number of queues.
    fn queue_count(&self) -> usize;
    /// The device configuration space.
    fn config(&self) -> &[u8];
    /// Serves queue `index` after a notification; `queues` are all the
    /// device's queues (some devices answer on another queue).
    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), QueueError>;
    /// Called when the driver resets the device.
    fn reset(&mut self) {}
}

/// The virtio-mmio register block in front of one device.
#[derive(Debug)]
pub struct MmioTransport<D> {
    device: D,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    irq_pending: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` behind a fresh transport.
    pub fn new(device: D) -> Self {
        let queues = vec![Queue::default(); device.queue_count()];
        Self {
            device,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            irq_pending: false,
        }
    }

    /// Whether the device raised an interrupt (set a bit in
    /// `InterruptStatus`) since the last call; the caller then signals the
    /// device's interrupt line once. Clears the pending edge.
    pub fn take_interrupt(&mut self) -> bool {
        std::mem::take(&mut self.irq_pending)
    }

    /// The `InterruptStatus` register as the driver reads it.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        self.irq_pending = true;
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    fn reset(&mut self) {
        self.queues = vec![Queue::default(); self.device.queue_count()];
        self.queue_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.irq_pending = false;
        self.device.reset();
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            let cfg = self.device.config();
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(offset - 0x100 + i as u64)
                    .ok()
                    .and_then(|o| cfg.get(o).copied())
                    .unwrap_or(0);
            }
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.device.device_id(),
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.selected().map_or(0, |_| u32::from(MAX_QUEUE_SIZE)),
            0x044 => self.selected().map_or(0, |q| u32::from(q.ready)),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => 0, // config generation: the config never changes
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A guest write at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) {
        if data.len() != 4 || offset >= 0x100 {
            return; // the config space is read-only; registers are 32-bit
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let set_lo = |a: &mut u64, v: u32| *a = (*a & !0xffff_ffff) | u64::from(v);
        let set_hi = |a: &mut u64, v: u32| *a = (*a & 0xffff_ffff) | (u64::from(v) << 32);
        let configurable = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 if configurable => match self.driver_features_sel {
                0 => set_lo(&mut self.driver_features, v),
                1 => set_hi(&mut self.driver_features, v),
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if configurable => {
                if let Some(q) = self.selected() {
                    q.size = v.try_into().unwrap_or(0);
                }
            }
            0x044 if configurable => {
                if let Some(q) = self.selected() {
                    q.ready = v == 1;
                }
            }
            0x050 => self.notify(v as usize, mem),
            0x064 => self.interrupt_status &= !v,
            0x070 => self.set_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if configurable => {
                if let Some(q) = self.selected() {
                    let field = match offset & !0xf {
                        0x080 => &mut q.desc,
                        0x090 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    if offset & 0x4 == 0 {
                        set_lo(field, v)
                    } else {
                        set_hi(field, v)
                    }
                }
            }
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Accept only a subset of what is offered, VERSION_1 included.
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                v &= !STATUS_FEATURES_OK;
            }
        }
        self.status = v;
    }

    /// Serves queue 0 as if the driver had notified it: the receive queue
    /// of the vsock and net devices (filled from host input) or the block
    /// request queue. The run loop calls it periodically so host input
    /// reaches a driver that waits for interrupts instead of kicking.
    /// Does nothing before `DRIVER_OK`.
    pub fn poll(&mut self, mem: &GuestMemoryMmap) {
        self.notify(0, mem);
    }

    fn notify(&mut self, index: usize, mem: &GuestMemoryMmap) {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        // Every queue of the device must be set up before any is served.
        if index >= self.queues.len() || !self.queues.iter().all(|q| q.valid(MAX_QUEUE_SIZE)) {
            return;
        }
        let used_before: Vec<u16> = self.queues.iter().map(|q| q.next_used).collect();
        match self.device.process(index, &mut self.queues, mem) {
            Ok(()) => {
                // Interrupt only when some used ring moved.
                let moved = self
                    .queues
                    .iter()
                    .zip(&used_before)
                    .any(|(q, before)| q.next_used != *before);
                if moved {
                    self.raise(INT_VRING);
                }
            }
            Err(_) => {
                // A malformed ring: stop serving this device until reset.
                self.status |= STATUS_NEEDS_RESET;
                self.raise(INT_CONFIG);
            }
        }
    }
}

impl<T: VirtioDevice + ?Sized> VirtioDevice for Box<T> {
    fn device_id(&self) -> u32 {
        (**self).device_id()
    }
    fn features(&self) -> u64 {
        (**self).features()
    }
    fn queue_count(&self) -> usize {
        (**self).queue_count()
    }
    fn config(&self) -> &[u8] {
        (**self).config()
    }
    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), QueueError> {
        (**self).process(index, queues, mem)
    }
    fn reset(&mut self) {
        (**self).reset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn queue(size: u16) -> Queue {
        Queue {
            size,
            ready: true,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            ..Default::default()
        }
    }

    fn put_desc(m: &GuestMemoryMmap, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        m.write_obj(addr, GuestAddress(0x1000 + 16 * i)).unwrap();
        m.write_obj(len, GuestAddress(0x1000 + 16 * i + 8)).unwrap();
        m.write_obj(flags, GuestAddress(0x1000 + 16 * i + 12))
            .unwrap();
        m.write_obj(next, GuestAddress(0x1000 + 16 * i + 14))
            .unwrap();
    }

    fn publish(m: &GuestMemoryMmap, slot: u64, head: u16, idx: u16) {
        m.write_obj(head, GuestAddress(0x2004 + 2 * slot)).unwrap();
        m.write_obj(idx, GuestAddress(0x2002)).unwrap();
    }

    #[test]
    fn pop_follows_chain_and_add_used_publishes() {
        let m = mem();
        let mut q = queue(4);
        assert!(q.pop(&m).unwrap().is_none());
        put_desc(&m, 2, 0x8000, 16, DESC_F_NEXT, 3);
        put_desc(&m, 3, 0x9000, 1, DESC_F_WRITE, 0);
        publish(&m, 0, 2, 1);
        let (head, chain) = q.pop(&m).unwrap().unwrap();
        assert_eq!(head, 2);
        assert_eq!(chain.len(), 2);
        assert!(chain[1].is_write_only());
        q.add_used(&m, head, 1).unwrap();
        let used_idx: u16 = m.read_obj(GuestAddress(0x3002)).unwrap();
        let id: u32 = m.read_obj(GuestAddress(0x3004)).unwrap();
        assert_eq!((used_idx, id), (1, 2));
    }

    #[test]
    fn looping_chain_refused() {
        let m = mem();
        let mut q = queue(4);
        put_desc(&m, 0, 0x8000, 16, DESC_F_NEXT, 1);
        put_desc(&m, 1, 0x8000, 16, DESC_F_NEXT, 0);
        publish(&m, 0, 0, 1);
        assert!(matches!(q.pop(&m), Err(QueueError::ChainTooLong)));
    }

    #[test]
    fn out_of_range_index_refused() {
        let m = mem();
        let mut q = queue(4);
        publish(&m, 0, 9, 1);
        assert!(matches!(q.pop(&m), Err(QueueError::BadIndex(9))));
        let mut q = queue(4);
        publish(&m, 0, 0, 100);
        assert!(matches!(q.pop(&m), Err(QueueError::AvailOverrun)));
    }

    #[test]
    fn ring_outside_memory_refused() {
        let m = mem();
        let mut q = Queue {
            avail: 2 << 20,
            ..queue(4)
        };
        assert!(matches!(q.pop(&m), Err(QueueError::Memory(_))));
    }

    /// Uses every published chain, answering on the queue it came from.
    #[derive(Debug)]
    struct Consume;

    impl VirtioDevice for Consume {
        fn device_id(&self) -> u32 {
            0xffff
        }
        fn features(&self) -> u64 {
            F_VERSION_1
        }
        fn queue_count(&self) -> usize {
            1
        }
        fn config(&self) -> &[u8] {
            &[]
        }
        fn process(
            &mut self,
            index: usize,
            queues: &mut [Queue],
            mem: &GuestMemoryMmap,
        ) -> Result<(), QueueError> {
            while let Some((head, _)) = queues[index].pop(mem)? {
                queues[index].add_used(mem, head, 0)?;
            }
            Ok(())
        }
    }

    fn w(t: &mut MmioTransport<Consume>, m: &GuestMemoryMmap, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes(), m);
    }

    fn r(t: &mut MmioTransport<Consume>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// InterruptStatus (0x060) gets VRING only when a used ring moved and
    /// CONFIG when the device needs a reset; InterruptACK (0x064) clears
    /// exactly the bits written; each new interrupt is one pending edge.
    #[test]
    fn interrupt_status_and_ack() {
        let m = mem();
        let mut t = MmioTransport::new(Consume);
        w(&mut t, &m, 0x070, 1 | 2);
        w(&mut t, &m, 0x024, 1);
        w(&mut t, &m, 0x020, 1); // VERSION_1 (bit 32)
        w(&mut t, &m, 0x070, 1 | 2 | STATUS_FEATURES_OK);
        w(&mut t, &m, 0x030, 0);
        w(&mut t, &m, 0x038, 4);
        for (off, v) in [(0x080, 0x1000), (0x090, 0x2000), (0x0a0, 0x3000)] {
            w(&mut t, &m, off, v);
        }
        w(&mut t, &m, 0x044, 1);
        w(
            &mut t,
            &m,
            0x070,
            1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        // A kick with nothing published: no used buffer, no interrupt.
        w(&mut t, &m, 0x050, 0);
        assert_eq!((r(&mut t, 0x060), t.take_interrupt()), (0, false));
        // One chain used: VRING set, one edge.
        put_desc(&m, 0, 0x8000, 16, 0, 0);
        publish(&m, 0, 0, 1);
        w(&mut t, &m, 0x050, 0);
        assert_eq!(r(&mut t, 0x060), INT_VRING);
        assert!(t.take_interrupt());
        assert!(!t.take_interrupt());
        // ACK of another bit leaves VRING; ACK of VRING clears it.
        w(&mut t, &m, 0x064, INT_CONFIG);
        assert_eq!(r(&mut t, 0x060), INT_VRING);
        w(&mut t, &m, 0x064, INT_VRING);
        assert_eq!(r(&mut t, 0x060), 0);
        // A malformed ring: NEEDS_RESET and a configuration interrupt.
        publish(&m, 1, 9, 2);
        w(&mut t, &m, 0x050, 0);
        assert_eq!(r(&mut t, 0x060), INT_CONFIG);
        assert_ne!(r(&mut t, 0x070) & STATUS_NEEDS_RESET, 0);
        assert!(t.take_interrupt());
        // Reset clears the status and any pending edge.
        w(&mut t, &m, 0x070, 0);
        assert_eq!((r(&mut t, 0x060), t.take_interrupt()), (0, false));
    }
}
