//! virtio-blk (virtio 1.x, one queue) whose backing file holds ciphertext
//! only: every sector is AES-256-XTS encrypted in this process before it is
//! written and decrypted after it is read.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use nitrile_vmm::VolumeKey;
use nitrile_vmm_sys::{LockError, Locked};

use crate::crypt::{SECTOR_SIZE, SectorCipher, XtsKeyError};

/// How a disk's sectors are stored in its backing file.
#[derive(Debug)]
#[non_exhaustive]
pub enum DiskEncryption {
    /// AES-256-XTS per sector under this key (the only mode for real volumes).
    Xts(VolumeKey),
    /// Guest data stored as is. Exists only to measure the cost of
    /// encryption; never use it for a volume that holds customer data.
    DangerPlaintext,
}

use crate::virtio::{Descriptor, F_VERSION_1, Queue, QueueError, VirtioDevice};

/// Largest data transfer in one request.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Length of the device ID string (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlkError {
    /// Reading the backing file's size failed.
    #[error("backing file metadata")]
    Metadata(#[source] std::io::Error),
    /// The backing file is not a whole number of sectors.
    #[error("backing file size {0} is not a multiple of {SECTOR_SIZE}")]
    Unaligned(u64),
    /// The volume key cannot be an XTS key.
    #[error("volume key")]
    Key(#[from] XtsKeyError),
    /// The expanded key could not be locked in memory.
    #[error("locking the expanded volume key")]
    Lock(#[source] LockError),
}

/// One encrypted block device.
pub struct Blk {
    file: File,
    /// `None` only for [`DiskEncryption::DangerPlaintext`]. The expanded key
    /// schedules sit on locked pages of their own, zeroed on drop (the
    /// `aes` crate wipes them first).
    cipher: Option<Locked<SectorCipher>>,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    config: [u8; 8],
}

impl std::fmt::Debug for Blk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blk")
            .field("sectors", &self.sectors)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Blk {
    /// Serves `file` (ciphertext under `encryption`); `id` is reported by GET_ID.
    pub fn new(
        file: File,
        encryption: &DiskEncryption,
        read_only: bool,
        id: &str,
    ) -> Result<Self, BlkError> {
        let len = file.metadata().map_err(BlkError::Metadata)?.len();
        if !len.is_multiple_of(SECTOR_SIZE as u64) {
            return Err(BlkError::Unaligned(len));
        }
        let sectors = len / SECTOR_SIZE as u64;
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            file,
            cipher: match encryption {
                DiskEncryption::Xts(key) => {
                    Some(Locked::new(SectorCipher::new(key)?).map_err(BlkError::Lock)?)
                }
                DiskEncryption::DangerPlaintext => None,
            },
            sectors,
            read_only,
            id: idb,
            config: sectors.to_le_bytes(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Serves one chain; returns the bytes written into the guest.
    fn request(&self, chain: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, QueueError> {
        let (Some(hdr), Some(status)) = (chain.first(), chain.last()) else {
            return Ok(0);
        };
        if chain.len() < 2
            || hdr.is_write_only()
            || hdr.len < 16
            || !status.is_write_only()
            || status.len < 1
        {
            // Not a well-formed request: nothing to answer into.
            return Ok(0);
        }
        let kind: u32 = mem.read_obj(GuestAddress(hdr.addr))?;
        let sector: u64 = mem.read_obj(GuestAddress(hdr.addr + 8))?;
        let data = &chain[1..chain.len() - 1];
        let (code, written) = self.execute(kind, sector, data, mem)?;
        mem.write_obj(code, GuestAddress(status.addr))?;
        Ok(written + 1)
    }

    fn execute(
        &self,
        kind: u32,
        sector: u64,
        data: &[Descriptor],
        mem: &GuestMemoryMmap,
    ) -> Result<(u8, u32), QueueError> {
        let total: usize = data.iter().map(|d| d.len as usize).sum();
        match kind {
            T_IN | T_OUT => {
                let write = kind == T_OUT;
                if write && self.read_only {
                    return Ok((S_IOERR, 0));
                }
                let dir_ok = data.iter().all(|d| d.is_write_only() != write);
                let in_range = (total as u64 / SECTOR_SIZE as u64)
                    .checked_add(sector)
                    .is_some_and(|end| end <= self.sectors);
                if !dir_ok
                    || !total.is_multiple_of(SECTOR_SIZE)
                    || total > MAX_REQUEST_BYTES
                    || !in_range
                {
                    return Ok((S_IOERR, 0));
                }
                let mut buf = vec![0u8; total];
                let offset = sector * SECTOR_SIZE as u64;
                if write {
                    gather(&mut buf, data, mem)?;
                    if self
                        .cipher
                        .as_ref()
                        .is_some_and(|c| c.encrypt(&mut buf, sector).is_err())
                        || self.file.write_all_at(&buf, offset).is_err()
                    {
                        return Ok((S_IOERR, 0));
                    }
                    Ok((S_OK, 0))
                } else {
                    if self.file.read_exact_at(&mut buf, offset).is_err()
                        || self
                            .cipher
                            .as_ref()
                            .is_some_and(|c| c.decrypt(&mut buf, sector).is_err())
                    {
                        return Ok((S_IOERR, 0));
                    }
                    scatter(&buf, data, mem)?;
                    Ok((S_OK, total as u32))
                }
            }
            T_FLUSH => Ok((
                if self.file.sync_data().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                },
                0,
            )),
            T_GET_ID => {
                let Some(d) = data.first().filter(|d| d.is_write_only()) else {
                    return Ok((S_IOERR, 0));
                };
                let n = (d.len as usize).min(ID_BYTES);
                mem.write_slice(&self.id[..n], GuestAddress(d.addr))?;
                Ok((S_OK, n as u32))
            }
            _ => Ok((S_UNSUPP, 0)),
        }
    }
}

fn gather(buf: &mut [u8], data: &[Descriptor], mem: &GuestMemoryMmap) -> Result<(), QueueError> {
    let mut at = 0;
    for d in data {
        let len = d.len as usize;
        mem.read_slice(&mut buf[at..at + len], GuestAddress(d.addr))?;
        at += len;
    }
    Ok(())
}

fn scatter(buf: &[u8], data: &[Descriptor], mem: &GuestMemoryMmap) -> Result<(), QueueError> {
    let mut at = 0;
    for d in data {
        let len = d.len as usize;
        mem.write_slice(&buf[at..at + len], GuestAddress(d.addr))?;
        at += len;
    }
    Ok(())
}

impl VirtioDevice for Blk {
    fn device_id(&self) -> u32 {
        2
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    fn queue_count(&self) -> usize {
        1
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn process(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), QueueError> {
        let Some(queue) = queues.first_mut() else {
            return Ok(());
        };
        while let Some((head, chain)) = queue.pop(mem)? {
            let written = self.request(&chain, mem)?;
            queue.add_used(mem, head, written)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::MmioTransport;
    use nitrile_vmm::VOLUME_KEY_LEN;
    use proptest::prelude::*;
    use zeroize::Zeroizing;

    const MEM: usize = 64 * 1024;

    fn key() -> VolumeKey {
        let mut b = Zeroizing::new([0u8; VOLUME_KEY_LEN]);
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        VolumeKey::from_bytes(&b[..]).unwrap()
    }

    fn reg(t: &mut MmioTransport<Blk>, off: u64, v: u32, mem: &GuestMemoryMmap) {
        t.write(off, &v.to_le_bytes(), mem);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the guest puts in its rings, the device neither panics
        /// nor touches the backing file outside its capacity.
        #[test]
        fn arbitrary_rings_are_contained(
            bytes in proptest::collection::vec(any::<u8>(), MEM),
            size in prop_oneof![Just(1u32), Just(4), Just(8), Just(256), any::<u32>()],
            desc in 0u32..MEM as u32,
            avail in 0u32..MEM as u32,
            used in 0u32..MEM as u32,
            kicks in 1usize..4,
            published in 1u16..8,
        ) {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            mem.write_slice(&bytes, GuestAddress(0)).unwrap();
            // Usually publish a few chains, so requests get parsed.
            let _ = mem.write_obj(published, GuestAddress(u64::from(avail) + 2));
            let file = tempfile::tempfile().unwrap();
            file.set_len(8 * SECTOR_SIZE as u64).unwrap();
            let blk = Blk::new(file.try_clone().unwrap(), &DiskEncryption::Xts(key()), false, "p").unwrap();
            let mut t = MmioTransport::new(blk);
            reg(&mut t, 0x070, 1 | 2, &mem);
            reg(&mut t, 0x024, 1, &mem);
            reg(&mut t, 0x020, 1, &mem);
            reg(&mut t, 0x070, 1 | 2 | 8, &mem);
            reg(&mut t, 0x038, size, &mem);
            reg(&mut t, 0x080, desc, &mem);
            reg(&mut t, 0x090, avail, &mem);
            reg(&mut t, 0x0a0, used, &mem);
            reg(&mut t, 0x044, 1, &mem);
            reg(&mut t, 0x070, 1 | 2 | 4 | 8, &mem);
            for _ in 0..kicks {
                reg(&mut t, 0x050, 0, &mem);
            }
            prop_assert_eq!(file.metadata().unwrap().len(), 8 * SECTOR_SIZE as u64);
        }
    }

    #[test]
    fn features_need_version_1() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let file = tempfile::tempfile().unwrap();
        file.set_len(SECTOR_SIZE as u64).unwrap();
        let blk = Blk::new(file, &DiskEncryption::DangerPlaintext, true, "x").unwrap();
        let mut t = MmioTransport::new(blk);
        reg(&mut t, 0x070, 1 | 2 | 8, &mem);
        let mut status = [0u8; 4];
        t.read(0x070, &mut status);
        assert_eq!(
            u32::from_le_bytes(status) & 8,
            0,
            "FEATURES_OK without VERSION_1"
        );
        // Capacity in the config space, read byte by byte.
        let mut cap = [0u8; 1];
        t.read(0x100, &mut cap);
        assert_eq!(cap[0], 1);
    }

    #[test]
    fn unaligned_backing_file_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1000).unwrap();
        assert!(matches!(
            Blk::new(file, &DiskEncryption::DangerPlaintext, false, "x"),
            Err(BlkError::Unaligned(1000))
        ));
    }
}
