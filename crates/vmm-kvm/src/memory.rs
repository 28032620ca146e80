//! Guest memory handed to KVM: every region of the guest's memory is
//! excluded from core dumps and registered as a KVM memory slot.
//!
//! This is one of the two places of this crate allowed `unsafe` (see
//! lib.rs): registering memory lets KVM read and write it for the guest
//! without Rust knowing, which is sound only while the mapping outlives the
//! VM. The device model reaches guest memory only through `vm-memory`'s
//! checked accessors and never turns it into a Rust reference.
#![allow(unsafe_code)]

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::VmmError;

/// Excludes each region of `mem` from core dumps and registers it with `vm`
/// as slot 0, 1, ...
///
/// The caller keeps `mem` mapped, unchanged, for as long as `vm` exists
/// ([`crate::Vmm`] declares `vm` before `mem`, so it is dropped first).
pub(crate) fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region.as_ptr();
        let len = region.len() as usize;
        // SAFETY: `host..host+len` is the anonymous mapping owned by `mem`;
        // MADV_DONTDUMP only excludes it from core dumps and changes no
        // byte of it.
        unsafe {
            libc::madvise(host.cast(), len, libc::MADV_DONTDUMP);
        }
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping outlives the VM (this function's contract:
        // `mem` is dropped after `vm`, and it is never unmapped or resized
        // while the VM exists), and no Rust reference into it is held across
        // guest execution.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(|source| VmmError::Kvm {
            op: "set_user_memory_region",
            source,
        })?;
    }
    Ok(())
}
