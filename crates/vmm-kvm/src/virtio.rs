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

/// `base + offset` in guest-physical space. The driver places the rings
/// anywhere; one placed so that an offset into it would wrap past 2^64 lies
/// outside guest memory, and is refused as such (never wrapped to address 0).
fn ring_addr(base: u64, offset: u64) -> Result<GuestAddress, QueueError> {
    base.checked_add(offset)
        .map(GuestAddress)
        .ok_or(QueueError::Memory(GuestMemoryError::InvalidGuestAddress(
            GuestAddress(base),
        )))
}

impl Queue {
    fn valid(&self, max: u16) -> bool {
        self.ready && self.size != 0 && self.size <= max && self.size.is_power_of_two()
    }

    /// Whether the driver has published no chain that was not taken yet.
    pub fn is_empty(&self, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let avail_idx: u16 = mem.read_obj(ring_addr(self.avail, 2)?)?;
        Ok(avail_idx == self.next_avail)
    }

    /// Takes the next available chain, or `None` when the driver has
    /// published nothing new. Returns the head index and its descriptors.
    pub fn pop(
        &mut self,
        mem: &GuestMemoryMmap,
    ) -> Result<Option<(u16, Vec<Descriptor>)>, QueueError> {
        let avail_idx: u16 = mem.read_obj(ring_addr(self.avail, 2)?)?;
        fence(Ordering::Acquire);
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailOverrun);
        }
        let slot = u64::from(self.next_avail % self.size);
        let head: u16 = mem.read_obj(ring_addr(self.avail, 4 + 2 * slot)?)?;
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
            let base = 16 * u64::from(idx);
            let d = Descriptor {
                addr: mem.read_obj(ring_addr(self.desc, base)?)?,
                len: mem.read_obj(ring_addr(self.desc, base + 8)?)?,
                flags: mem.read_obj(ring_addr(self.desc, base + 12)?)?,
                next: mem.read_obj(ring_addr(self.desc, base + 14)?)?,
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
        // No index is below a size of 0: a queue never set up has no slot.
        let slot = u64::from(
            self.next_used
                .checked_rem(self.size)
                .ok_or(QueueError::BadIndex(head))?,
        );
        let elem = 4 + 8 * slot;
        mem.write_obj(u32::from(head), ring_addr(self.used, elem)?)?;
        mem.write_obj(len, ring_addr(self.used, elem + 4)?)?;
        self.next_used = self.next_used.wrapping_add(1);
        fence(Ordering::Release);
        mem.write_obj(self.next_used, ring_addr(self.used, 2)?)?;
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

    /// Rings the driver placed at the top of the address space, where an
    /// offset into them wraps past 2^64, are outside guest memory: refused,
    /// not wrapped to low addresses (and no overflow panic).
    #[test]
    fn rings_wrapping_past_the_address_space_are_refused() {
        let m = mem();
        let mut q = Queue {
            avail: u64::MAX - 1,
            ..queue(4)
        };
        assert!(matches!(q.is_empty(&m), Err(QueueError::Memory(_))));
        assert!(matches!(q.pop(&m), Err(QueueError::Memory(_))));
        // A valid available ring naming descriptor 1 of a table at 2^64 - 16:
        // its entry would start at address 0.
        let mut q = Queue {
            desc: u64::MAX - 15,
            ..queue(4)
        };
        publish(&m, 0, 1, 1);
        assert!(matches!(q.pop(&m), Err(QueueError::Memory(_))));
        let mut q = Queue {
            used: u64::MAX - 3,
            ..queue(4)
        };
        assert!(matches!(q.add_used(&m, 0, 0), Err(QueueError::Memory(_))));
        let wrapped: u32 = m.read_obj(GuestAddress(0)).unwrap();
        assert_eq!(wrapped, 0, "nothing was written at the wrapped address");
        // A queue never set up has no slot to use.
        let mut q = Queue::default();
        assert!(matches!(q.add_used(&m, 0, 0), Err(QueueError::BadIndex(0))));
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

    // Properties of the ring code against a guest that controls every byte
    // of its memory and every register: nothing panics, nothing is read or
    // written outside the rings and descriptors the spec places, indices
    // wrap at 2^16, and no chain is longer than the queue.

    use proptest::prelude::*;

    /// Guest memory of the property tests: one region at address 0.
    const PROP_MEM: u64 = 16 * 1024;

    fn prop_mem(bytes: &[u8]) -> GuestMemoryMmap {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes.len())]).unwrap();
        m.write_slice(bytes, GuestAddress(0)).unwrap();
        m
    }

    fn snapshot(m: &GuestMemoryMmap) -> Vec<u8> {
        let mut out = vec![0; PROP_MEM as usize];
        m.read_slice(&mut out, GuestAddress(0)).unwrap();
        out
    }

    /// A guest-physical address: mostly inside guest memory, often at its
    /// end, sometimes where adding an offset wraps past 2^64.
    fn guest_addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => 0..PROP_MEM,
            1 => PROP_MEM - 64..PROP_MEM + 64,
            1 => u64::MAX - 64..=u64::MAX,
            1 => any::<u64>(),
        ]
    }

    /// A queue size as a driver may write it: valid ones and any other.
    fn queue_size() -> impl Strategy<Value = u16> {
        prop_oneof![
            3 => (0u32..=8).prop_map(|s| 1u16 << s),
            1 => any::<u16>(),
        ]
    }

    /// What `pop` did, comparable with the model.
    #[derive(Debug, PartialEq, Eq)]
    enum Popped {
        Nothing,
        Chain(u16, Vec<Descriptor>),
        Memory,
        BadIndex(u16),
        TooLong,
        Overrun,
    }

    fn popped(r: Result<Option<(u16, Vec<Descriptor>)>, QueueError>) -> Popped {
        match r {
            Ok(None) => Popped::Nothing,
            Ok(Some((head, chain))) => Popped::Chain(head, chain),
            Err(QueueError::Memory(_)) => Popped::Memory,
            Err(QueueError::BadIndex(i)) => Popped::BadIndex(i),
            Err(QueueError::ChainTooLong) => Popped::TooLong,
            Err(QueueError::AvailOverrun) => Popped::Overrun,
        }
    }

    /// `N` bytes of `bytes` at `base + offset`, `None` where that is not
    /// inside them (wrapping past 2^64 included).
    fn model_read<const N: usize>(bytes: &[u8], base: u64, offset: u64) -> Option<[u8; N]> {
        let start = usize::try_from(base.checked_add(offset)?).ok()?;
        bytes.get(start..start.checked_add(N)?)?.try_into().ok()
    }

    /// The split virtqueue of the virtio 1.x spec (section 2.7), read from a
    /// copy of guest memory with checked arithmetic: what `pop` must do,
    /// and the next available index after it.
    fn model_pop(bytes: &[u8], q: &Queue) -> (Popped, u16) {
        let u16_at = |base, off| model_read::<2>(bytes, base, off).map(u16::from_le_bytes);
        let Some(avail_idx) = u16_at(q.avail, 2) else {
            return (Popped::Memory, q.next_avail);
        };
        let pending = avail_idx.wrapping_sub(q.next_avail);
        if pending == 0 {
            return (Popped::Nothing, q.next_avail);
        }
        if pending > q.size {
            return (Popped::Overrun, q.next_avail);
        }
        let slot = q.next_avail % q.size;
        let Some(head) = u16_at(q.avail, 4 + 2 * u64::from(slot)) else {
            return (Popped::Memory, q.next_avail);
        };
        let next_avail = q.next_avail.wrapping_add(1);
        let mut chain = Vec::new();
        let mut idx = head;
        loop {
            if idx >= q.size {
                return (Popped::BadIndex(idx), next_avail);
            }
            if chain.len() >= usize::from(q.size) {
                return (Popped::TooLong, next_avail);
            }
            let Some(raw) = model_read::<16>(bytes, q.desc, 16 * u64::from(idx)) else {
                return (Popped::Memory, next_avail);
            };
            let d = Descriptor {
                addr: u64::from_le_bytes(raw[0..8].try_into().unwrap()),
                len: u32::from_le_bytes(raw[8..12].try_into().unwrap()),
                flags: u16::from_le_bytes([raw[12], raw[13]]),
                next: u16::from_le_bytes([raw[14], raw[15]]),
            };
            chain.push(d);
            if d.flags & DESC_F_NEXT == 0 {
                return (Popped::Chain(head, chain), next_avail);
            }
            idx = d.next;
        }
    }

    /// The indices a chain visited: its head, then each `next` it followed.
    fn visited(head: u16, chain: &[Descriptor]) -> Vec<u16> {
        std::iter::once(head)
            .chain(
                chain
                    .iter()
                    .take(chain.len().saturating_sub(1))
                    .map(|d| d.next),
            )
            .collect()
    }

    /// Writes descriptor `i` of the table at `desc` into `bytes`, where it fits.
    fn model_put_desc(bytes: &mut [u8], desc: u64, i: u16, d: Descriptor) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&d.next.to_le_bytes());
        if let Some(dst) = model_slice(bytes, desc, 16 * u64::from(i), 16) {
            dst.copy_from_slice(&raw);
        }
    }

    /// `len` bytes of `bytes` at `base + offset`, where they all fit.
    fn model_slice(bytes: &mut [u8], base: u64, offset: u64, len: usize) -> Option<&mut [u8]> {
        let start = usize::try_from(base.checked_add(offset)?).ok()?;
        bytes.get_mut(start..start.checked_add(len)?)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the guest wrote and wherever it put its rings, `pop`
        /// does what the spec's ring layout says, read with checked
        /// arithmetic: the same chains, the same refusals, no panic and no
        /// read outside the rings and descriptors. A driver that publishes
        /// once gets at most a queue's worth of chains taken, and every
        /// chain taken visits distinct descriptors, at most the queue size.
        #[test]
        fn pop_follows_the_spec_for_any_guest_memory(
            mut bytes in proptest::collection::vec(any::<u8>(), PROP_MEM as usize),
            size in queue_size(),
            desc in guest_addr(),
            avail in guest_addr(),
            used in guest_addr(),
            next_avail in any::<u16>(),
            published in any::<u16>(),
            links in proptest::collection::vec((any::<u16>(), any::<bool>()), 0..64),
        ) {
            // Random bytes rarely form a chain: lay some descriptors out as
            // a driver would, linking to (mostly) valid indices.
            for (i, (next, more)) in links.iter().enumerate() {
                let i = u16::try_from(i).unwrap();
                let d = Descriptor {
                    addr: u64::from(*next) * 64,
                    len: u32::from(*next),
                    flags: if *more { DESC_F_NEXT } else { 0 },
                    next: if size == 0 { *next } else { *next % size.saturating_add(2) },
                };
                model_put_desc(&mut bytes, desc, i, d);
            }
            if let Some(dst) = model_slice(&mut bytes, avail, 2, 2) {
                dst.copy_from_slice(&next_avail.wrapping_add(published % 8).to_le_bytes());
            }
            let m = prop_mem(&bytes);
            let mut q = Queue { size, ready: true, desc, avail, used, next_avail, next_used: 0 };
            let mut taken = 0u32;
            loop {
                let (expected, next) = model_pop(&bytes, &q);
                let got = popped(q.pop(&m));
                prop_assert_eq!(&got, &expected);
                prop_assert_eq!(q.next_avail, next);
                match got {
                    Popped::Chain(head, chain) => {
                        taken += 1;
                        prop_assert!(taken <= u32::from(size), "more chains than the queue holds");
                        prop_assert!(chain.len() <= usize::from(size));
                        let mut seen = visited(head, &chain);
                        prop_assert!(seen.iter().all(|&i| i < size));
                        seen.sort_unstable();
                        seen.dedup();
                        prop_assert_eq!(seen.len(), chain.len(), "a chain visited a descriptor twice");
                    }
                    _ => break,
                }
            }
            // Popping reads only.
            prop_assert_eq!(snapshot(&m), bytes);
        }

        /// `add_used` writes exactly the used element of its slot and the
        /// used index, wherever the guest put the used ring, from any
        /// position of the index: nothing else in guest memory changes, and
        /// a ring that does not fit in guest memory is refused, not wrapped.
        #[test]
        fn add_used_writes_only_its_slot_and_index(
            bytes in proptest::collection::vec(any::<u8>(), PROP_MEM as usize),
            size in (0u32..=8).prop_map(|s| 1u16 << s),
            used in guest_addr(),
            next_used in any::<u16>(),
            head in any::<u16>(),
            len in any::<u32>(),
        ) {
            let m = prop_mem(&bytes);
            let mut q = Queue { size, ready: true, used, next_used, ..queue(size) };
            let slot = 4 + 8 * u64::from(next_used % size);
            let r = q.add_used(&m, head, len);
            let after = snapshot(&m);
            // Only the slot's element and the index may change (vm-memory
            // writes the part of a buffer that lies in guest memory).
            let writable = |a: u64| {
                a.checked_sub(used)
                    .is_some_and(|o| (2..4).contains(&o) || (slot..slot + 8).contains(&o))
            };
            for (a, (x, y)) in (0u64..).zip(bytes.iter().zip(&after)) {
                prop_assert!(x == y || writable(a), "add_used wrote at {:#x}", a);
            }
            let fits = |offset: u64, n: u64| {
                used.checked_add(offset)
                    .and_then(|a| a.checked_add(n))
                    .is_some_and(|end| end <= PROP_MEM)
            };
            prop_assert_eq!(r.is_ok(), fits(slot, 8) && fits(2, 2), "{:?}", r);
            if r.is_ok() {
                prop_assert_eq!(q.next_used, next_used.wrapping_add(1));
                let at = |o: u64| GuestAddress(used + o);
                prop_assert_eq!(m.read_obj::<u32>(at(slot)).unwrap(), u32::from(head));
                prop_assert_eq!(m.read_obj::<u32>(at(slot + 4)).unwrap(), len);
                prop_assert_eq!(m.read_obj::<u16>(at(2)).unwrap(), q.next_used);
            }
        }

        /// Chains published across the 2^16 wrap of the available index
        /// are each taken once, in order, from their slots, and returned in
        /// order through the used ring, whose index wraps the same way;
        /// more chains than the queue holds are refused without taking any.
        #[test]
        fn ring_indices_wrap_at_two_to_the_sixteen(
            size in (0u32..=8).prop_map(|s| 1u16 << s),
            start in prop_oneof![u16::MAX - 300..=u16::MAX, any::<u16>()],
            count in 0u16..=300,
        ) {
            let m = mem();
            let mut q = Queue { next_avail: start, next_used: start, ..queue(size) };
            for i in 0..size {
                put_desc(&m, u64::from(i), 0x8000 + 16 * u64::from(i), 16, 0, 0);
            }
            let shown = count.min(size);
            for k in 0..shown {
                let idx = start.wrapping_add(k);
                let head = (idx.wrapping_mul(7)) % size;
                m.write_obj(head, GuestAddress(0x2004 + 2 * u64::from(idx % size))).unwrap();
            }
            m.write_obj(start.wrapping_add(count), GuestAddress(0x2002)).unwrap();
            if count > size {
                prop_assert!(matches!(q.pop(&m), Err(QueueError::AvailOverrun)));
                prop_assert_eq!(q.next_avail, start);
                return Ok(());
            }
            for k in 0..count {
                let idx = start.wrapping_add(k);
                let (head, chain) = q.pop(&m).unwrap().expect("a published chain");
                prop_assert_eq!(head, idx.wrapping_mul(7) % size);
                prop_assert_eq!(chain.len(), 1);
                prop_assert_eq!(chain[0].addr, 0x8000 + 16 * u64::from(head));
                q.add_used(&m, head, u32::from(k)).unwrap();
                let slot = 0x3004 + 8 * u64::from(idx % size);
                prop_assert_eq!(m.read_obj::<u32>(GuestAddress(slot)).unwrap(), u32::from(head));
                prop_assert_eq!(m.read_obj::<u32>(GuestAddress(slot + 4)).unwrap(), u32::from(k));
            }
            prop_assert!(q.pop(&m).unwrap().is_none());
            prop_assert_eq!(q.next_avail, start.wrapping_add(count));
            if count > 0 {
                prop_assert_eq!(
                    m.read_obj::<u16>(GuestAddress(0x3002)).unwrap(),
                    start.wrapping_add(count)
                );
            }
        }

        /// A chain of distinct descriptors as long as the queue is taken;
        /// one more link, which can only lead back into the chain, is
        /// refused as too long instead of looping.
        #[test]
        fn chains_longer_than_the_queue_are_refused(
            size in (0u32..=8).prop_map(|s| 1u16 << s),
            order in Just((0..256u16).collect::<Vec<_>>()).prop_shuffle(),
            length in 1usize..=256,
            back in any::<prop::sample::Index>(),
            looped in any::<bool>(),
        ) {
            let m = mem();
            let mut q = queue(size);
            let chain: Vec<u16> = order.into_iter().filter(|&i| i < size).collect();
            let chain = &chain[..length.min(chain.len())];
            for (n, &i) in chain.iter().enumerate() {
                let (flags, next) = match chain.get(n + 1) {
                    Some(&next) => (DESC_F_NEXT, next),
                    None if looped => (DESC_F_NEXT, chain[back.index(n + 1)]),
                    None => (0, 0),
                };
                put_desc(&m, u64::from(i), 0x8000, 1, flags, next);
            }
            publish(&m, 0, chain[0], 1);
            match q.pop(&m) {
                Ok(Some((head, got))) => {
                    prop_assert!(!looped);
                    prop_assert_eq!(head, chain[0]);
                    prop_assert_eq!(visited(head, &got), chain.to_vec());
                }
                Err(QueueError::ChainTooLong) => prop_assert!(looped),
                other => prop_assert!(false, "{:?}", other.map(|c| c.map(|(h, d)| (h, d.len())))),
            }
        }
    }

    /// A register access by the driver.
    #[derive(Debug, Clone)]
    enum Access {
        Write(u64, u32),
        Read(u64, usize),
        Kick(u32),
        Poll,
    }

    fn access() -> impl Strategy<Value = Access> {
        let offset = prop_oneof![
            3 => (0u64..0x40).prop_map(|r| r * 4),
            1 => 0..MMIO_WINDOW,
        ];
        let value = prop_oneof![
            any::<u32>(),
            0u32..16,
            0u32..PROP_MEM as u32,
            Just(u32::MAX),
            Just(u32::MAX - 1),
        ];
        prop_oneof![
            4 => (offset.clone(), value).prop_map(|(o, v)| Access::Write(o, v)),
            1 => (offset, 1usize..=8).prop_map(|(o, n)| Access::Read(o, n)),
            2 => (0u32..3).prop_map(Access::Kick),
            1 => Just(Access::Poll),
        ]
    }

    fn queue_config(q: &Queue) -> (u16, bool, u64, u64, u64) {
        (q.size, q.ready, q.desc, q.avail, q.used)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any sequence of register accesses over any guest memory: no
        /// panic; once `DRIVER_OK` is set the queues and features cannot be
        /// reconfigured (short of writing the status); `NEEDS_RESET` stays
        /// until the driver resets the device; only the two defined
        /// interrupt bits are ever raised.
        #[test]
        fn any_register_sequence_is_contained(
            bytes in proptest::collection::vec(any::<u8>(), PROP_MEM as usize),
            set_up in any::<bool>(),
            rings in (guest_addr(), guest_addr(), guest_addr(), queue_size()),
            accesses in proptest::collection::vec(access(), 1..48),
        ) {
            let m = prop_mem(&bytes);
            let mut t = MmioTransport::new(Consume);
            if set_up {
                let (desc, avail, used, size) = rings;
                w(&mut t, &m, 0x070, 1 | 2);
                w(&mut t, &m, 0x024, 1);
                w(&mut t, &m, 0x020, 1);
                w(&mut t, &m, 0x070, 1 | 2 | STATUS_FEATURES_OK);
                w(&mut t, &m, 0x038, u32::from(size));
                for (off, a) in [(0x080, desc), (0x090, avail), (0x0a0, used)] {
                    w(&mut t, &m, off, a as u32);
                    w(&mut t, &m, off + 4, (a >> 32) as u32);
                }
                w(&mut t, &m, 0x044, 1);
                w(&mut t, &m, 0x070, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
            }
            for a in accesses {
                let before = t.status;
                let queues: Vec<_> = t.queues.iter().map(queue_config).collect();
                let features = t.driver_features;
                let status_write = matches!(a, Access::Write(0x070, _));
                match a {
                    Access::Write(off, v) => t.write(off, &v.to_le_bytes(), &m),
                    Access::Read(off, n) => {
                        let mut data = [0u8; 8];
                        t.read(off, &mut data[..n]);
                    }
                    Access::Kick(q) => w(&mut t, &m, 0x050, q),
                    Access::Poll => t.poll(&m),
                }
                prop_assert_eq!(t.interrupt_status & !(INT_VRING | INT_CONFIG), 0);
                if status_write {
                    continue;
                }
                if before & STATUS_DRIVER_OK != 0 {
                    let now: Vec<_> = t.queues.iter().map(queue_config).collect();
                    prop_assert_eq!(now, queues, "a queue was reconfigured while live");
                    prop_assert_eq!(t.driver_features, features);
                }
                if before & STATUS_NEEDS_RESET != 0 {
                    prop_assert_ne!(t.status & STATUS_NEEDS_RESET, 0, "NEEDS_RESET was lost");
                }
            }
        }
    }
}
