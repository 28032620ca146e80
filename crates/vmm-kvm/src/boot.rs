//! Guest boot: the fixed low-memory layout, kernel loading (ELF, PVH, bzImage
//! through `linux-loader`), Linux boot parameters, and the vCPU register state
//! for 64-bit long mode or 32-bit PVH entry.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The GDT: null, 64-bit code, data, TSS.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT (interrupts stay off until the guest installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// Linux `boot_params` (the "zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for Linux entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page map level 4; the PDPT and four page directories follow it.
pub const PML4_ADDR: u64 = 0x9000;
/// The kernel command line (NUL-terminated), also read by the test guest.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted, NUL included.
pub const MAX_CMDLINE: usize = 4096;
/// Where kernels are loaded: 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// The first address after the low-memory layout that must stay RAM.
pub const MIN_MEMORY: u64 = 4 << 20;
/// Largest initramfs accepted.
pub const MAX_INITRAMFS: u64 = 1 << 30;
/// The highest initramfs end a kernel without an `initrd_addr_max` accepts
/// (the boot protocol's default for older headers).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Alignment of the initramfs in guest memory.
const INITRD_ALIGN: u64 = 0x1000;

const PDPT_ADDR: u64 = PML4_ADDR + 0x1000;
const PD_ADDR: u64 = PML4_ADDR + 0x2000;
/// Identity map this much with 2 MiB pages (covers the device window).
const IDENTITY_MAP: u64 = 4 << 30;

/// The kind of kernel image to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelFormat {
    /// An ELF executable entered in 64-bit mode at its ELF entry (the test
    /// guest, or a Linux `vmlinux` without a PVH note).
    Elf,
    /// An ELF `vmlinux` entered through its PVH note (32-bit protected mode).
    Pvh,
    /// A Linux `bzImage`, entered at its 64-bit entry point.
    BzImage,
}

/// Why a guest could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// The kernel image is not a loadable image of the requested format.
    #[error("kernel image could not be loaded")]
    Load(#[source] linux_loader::loader::Error),
    /// The image has no PVH note although PVH entry was requested.
    #[error("kernel image has no PVH entry note")]
    NoPvhEntry,
    /// The command line is too long or not printable ASCII.
    #[error("kernel command line rejected")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing boot structures into guest memory failed.
    #[error("writing boot structures into guest memory failed")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// Writing boot parameters failed.
    #[error("writing boot parameters failed")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// Rewinding the kernel image file failed.
    #[error("reading the kernel image failed")]
    Io(#[source] std::io::Error),
    /// Guest memory is smaller than the boot layout needs.
    #[error("guest memory must be at least {MIN_MEMORY} bytes")]
    MemoryTooSmall,
    /// The initramfs does not fit between the kernel's end and the highest
    /// address the kernel accepts (or exceeds [`MAX_INITRAMFS`]).
    #[error("the initramfs ({size} bytes) does not fit in guest memory below the kernel's limit")]
    InitrdTooLarge {
        /// Its size in bytes.
        size: u64,
    },
    /// An initramfs was given but it is empty.
    #[error("the initramfs is empty")]
    InitrdEmpty,
}

/// What the boot protocol hands the kernel besides its command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootExtras<'a> {
    /// The initramfs bytes, placed high in guest memory, page aligned.
    pub initrd: Option<&'a [u8]>,
    /// The guest-physical address of the ACPI RSDP, if tables were written.
    pub rsdp: Option<u64>,
}

/// Where an initramfs of `size` bytes goes: as high as possible, page
/// aligned, ending at or below both the end of memory and `addr_max + 1`,
/// and starting at or above `kernel_end`.
pub fn place_initrd(
    mem_size: u64,
    kernel_end: u64,
    size: u64,
    addr_max: u64,
) -> Result<u64, BootError> {
    if size == 0 {
        return Err(BootError::InitrdEmpty);
    }
    let too_large = BootError::InitrdTooLarge { size };
    if size > MAX_INITRAMFS {
        return Err(too_large);
    }
    let top = mem_size.min(addr_max.saturating_add(1));
    let start = top.checked_sub(size).ok_or(too_large)? & !(INITRD_ALIGN - 1);
    let floor = kernel_end.max(HIMEM_START).next_multiple_of(INITRD_ALIGN);
    if start < floor {
        return Err(BootError::InitrdTooLarge { size });
    }
    Ok(start)
}

fn write_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel_end: u64,
    initrd: &[u8],
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let size = initrd.len() as u64;
    let addr = place_initrd(mem_size, kernel_end, size, addr_max)?;
    mem.write_slice(initrd, GuestAddress(addr))
        .map_err(BootError::GuestMemory)?;
    Ok((addr, size))
}

/// How the boot vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit long mode at `rip` with `rsi` pointing at the zero page.
    Long64 {
        /// Entry point.
        rip: u64,
    },
    /// 32-bit protected mode, paging off, `rbx` pointing at `hvm_start_info`.
    Pvh32 {
        /// Entry point.
        rip: u64,
    },
}

/// Loads `kernel` into `mem`, writes the command line and the boot parameters
/// for its protocol, and returns how to enter it.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &mut File,
    format: KernelFormat,
    cmdline: &str,
) -> Result<Entry, BootError> {
    load_with(
        mem,
        mem_size,
        kernel,
        format,
        cmdline,
        BootExtras::default(),
    )
}

/// [`load`], also placing an initramfs and pointing the kernel at the ACPI
/// RSDP: `ramdisk_image`/`ramdisk_size` and `acpi_rsdp_addr` in the zero
/// page, or the module list and `rsdp_paddr` of `hvm_start_info` for PVH.
pub fn load_with(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &mut File,
    format: KernelFormat,
    cmdline: &str,
    extras: BootExtras<'_>,
) -> Result<Entry, BootError> {
    if mem_size < MIN_MEMORY {
        return Err(BootError::MemoryTooSmall);
    }
    kernel.seek(SeekFrom::Start(0)).map_err(BootError::Io)?;
    let mut cl = Cmdline::new(MAX_CMDLINE).map_err(BootError::Cmdline)?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(BootError::Load)?;
    let cmdline_size = cmdline.len() as u32 + 1;
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
                .map_err(BootError::Load)?;
            let hdr = linux_loader::loader::bootparam::setup_header::default();
            write_zero_page(mem, mem_size, hdr, cmdline_size, r.kernel_end, extras)?;
            Ok(Entry::Long64 {
                rip: r.kernel_load.0,
            })
        }
        KernelFormat::Pvh => {
            let r = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
                .map_err(BootError::Load)?;
            let PvhBootCapability::PvhEntryPresent(entry) = r.pvh_boot_cap else {
                return Err(BootError::NoPvhEntry);
            };
            write_pvh_info(mem, mem_size, r.kernel_end, extras)?;
            Ok(Entry::Pvh32 { rip: entry.0 })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
                .map_err(BootError::Load)?;
            let hdr = r.setup_header.unwrap_or_default();
            write_zero_page(mem, mem_size, hdr, cmdline_size, r.kernel_end, extras)?;
            // The 64-bit entry point is 0x200 past the protected-mode code.
            Ok(Entry::Long64 {
                rip: r.kernel_load.0 + 0x200,
            })
        }
    }
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    mut hdr: linux_loader::loader::bootparam::setup_header,
    cmdline_size: u32,
    kernel_end: u64,
    extras: BootExtras<'_>,
) -> Result<(), BootError> {
    hdr.type_of_loader = 0xff;
    hdr.boot_flag = 0xaa55;
    hdr.header = 0x5372_6448; // "HdrS"
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline_size;
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = 0x0100_0000;
    }
    if let Some(initrd) = extras.initrd {
        let addr_max = match hdr.initrd_addr_max {
            0 => DEFAULT_INITRD_ADDR_MAX,
            m => u64::from(m),
        };
        let (addr, size) = write_initrd(mem, mem_size, kernel_end, initrd, addr_max)?;
        // Both fit in 32 bits: addr_max is a u32 and size <= MAX_INITRAMFS.
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: extras.rsdp.unwrap_or(0),
        ..Default::default()
    };
    let map = memory_map(mem_size);
    for (i, (addr, size)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: 1,
        };
    }
    params.e820_entries = map.len() as u8;
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(BootError::BootParams)
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel_end: u64,
    extras: BootExtras<'_>,
) -> Result<(), BootError> {
    let map: Vec<hvm_memmap_table_entry> = memory_map(mem_size)
        .into_iter()
        .map(|(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: 1,
            reserved: 0,
        })
        .collect();
    let memmap_addr = PVH_INFO_ADDR + std::mem::size_of::<hvm_start_info>() as u64;
    let modlist_addr =
        memmap_addr + (map.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    let modules = match extras.initrd {
        Some(initrd) => {
            // PVH starts in 32-bit mode: the module must sit below 4 GiB.
            let (paddr, size) =
                write_initrd(mem, mem_size, kernel_end, initrd, DEFAULT_INITRD_ADDR_MAX)?;
            vec![hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            }]
        }
        None => Vec::new(),
    };
    let info = hvm_start_info {
        magic: 0x336e_c578, // XEN_HVM_START_MAGIC_VALUE
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { modlist_addr },
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: extras.rsdp.unwrap_or(0),
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut bp = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_ADDR));
    bp.set_sections::<hvm_memmap_table_entry>(&map, GuestAddress(memmap_addr));
    if !modules.is_empty() {
        bp.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(BootError::BootParams)
}

/// RAM as the guest sees it: below the EBDA, and from 1 MiB to the end.
fn memory_map(mem_size: u64) -> Vec<(u64, u64)> {
    vec![(0, 0x9_fc00), (HIMEM_START, mem_size - HIMEM_START)]
}

/// Writes the GDT, an empty IDT and identity-mapping page tables for the low
/// 4 GiB, and returns the special registers for 64-bit long mode.
pub fn long_mode_sregs(
    mem: &GuestMemoryMmap,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, BootError> {
    let gdt: [u64; 4] = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(BootError::GuestMemory)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(BootError::GuestMemory)?;
    // PML4[0] -> PDPT; PDPT[0..4] -> four PDs of 512 x 2 MiB pages each.
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(BootError::GuestMemory)?;
    let pds = IDENTITY_MAP >> 30;
    for i in 0..pds {
        let pd = PD_ADDR + i * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPT_ADDR + 8 * i))
            .map_err(BootError::GuestMemory)?;
        for j in 0..512u64 {
            let phys = (i << 30) | (j << 21);
            mem.write_obj(phys | 0x83, GuestAddress(pd + 8 * j))
                .map_err(BootError::GuestMemory)?;
        }
    }
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    let tss = segment(gdt[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (8 * gdt.len() - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// Special registers for PVH entry: flat 32-bit protected mode, paging off.
pub fn pvh_sregs(mem: &GuestMemoryMmap, mut sregs: kvm_sregs) -> Result<kvm_sregs, BootError> {
    let gdt: [u64; 4] = [
        0,
        gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x008b, 0, 0x67),    // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(BootError::GuestMemory)?;
    }
    let data = segment(gdt[2], 2);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (8 * gdt.len() - 1) as u16;
    sregs.cs = segment(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    Ok(sregs)
}

/// General registers for `entry`.
pub fn entry_regs(entry: Entry) -> kvm_regs {
    match entry {
        Entry::Long64 { rip } => kvm_regs {
            rflags: 0x2,
            rip,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rsi: ZERO_PAGE_ADDR,
            ..Default::default()
        },
        Entry::Pvh32 { rip } => kvm_regs {
            rflags: 0x2,
            rip,
            rbx: PVH_INFO_ADDR,
            ..Default::default()
        },
    }
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT descriptor from `flags` (access byte in the low 8 bits, then the
/// flags nibble in bits 12..16), `base` and a 20-bit `limit`.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn file(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn gdt_code_segment_is_64_bit() {
        let s = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (s.l, s.db, s.present, s.type_, s.selector),
            (1, 0, 1, 0xb, 8)
        );
        assert_eq!(s.limit, 0xffff_ffff);
    }

    #[test]
    fn page_tables_identity_map_device_window() {
        let mem = memory();
        let sregs = long_mode_sregs(&mem, kvm_sregs::default()).unwrap();
        assert_eq!(sregs.cr3, PML4_ADDR);
        // Walk 0xd000_0000: PDPT index 3, PD index 0x80.
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + 8 * 3))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + 8 * 0x80))
            .unwrap();
        assert_eq!(pde & !0xfff, 0xd000_0000);
        assert_eq!(pde & 0x83, 0x83);
    }

    #[test]
    fn test_guest_elf_loads_at_one_mib() {
        let mem = memory();
        let mut f = file(crate::TEST_GUEST_ELF);
        let entry = load(&mem, 16 << 20, &mut f, KernelFormat::Elf, "blk=rw").unwrap();
        assert_eq!(entry, Entry::Long64 { rip: HIMEM_START });
        let mut cl = [0u8; 7];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cl, b"blk=rw\0");
        // The test guest also has a PVH note naming its 32-bit entry.
        let mut f = file(crate::TEST_GUEST_ELF);
        let pvh = load(&mem, 16 << 20, &mut f, KernelFormat::Pvh, "").unwrap();
        assert!(matches!(pvh, Entry::Pvh32 { rip } if rip > HIMEM_START && rip < 2 << 20));
        // Without that note (its type changed), PVH entry is refused.
        let note: &[u8] = &[4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
        let mut elf = crate::TEST_GUEST_ELF.to_vec();
        let at = elf.windows(note.len()).position(|w| w == note).unwrap();
        elf[at + 8] = 17;
        let mut f = file(&elf);
        assert!(matches!(
            load(&mem, 16 << 20, &mut f, KernelFormat::Pvh, ""),
            Err(BootError::NoPvhEntry)
        ));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let mem = memory();
        for format in [KernelFormat::Elf, KernelFormat::Pvh, KernelFormat::BzImage] {
            let mut f = file(&[0x5a; 8192]);
            assert!(
                matches!(
                    load(&mem, 16 << 20, &mut f, format, ""),
                    Err(BootError::Load(_))
                ),
                "{format:?}"
            );
        }
    }

    /// A synthetic bzImage: one setup sector plus the boot sector, a valid
    /// setup header, and a recognisable protected-mode payload.
    fn synthetic_bzimage() -> Vec<u8> {
        let setup_sects = 1usize;
        let mut img = vec![0u8; (setup_sects + 1) * 512];
        img[0x1f1] = setup_sects as u8;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x0010_0000u32.to_le_bytes()); // code32_start
        img[0x230..0x234].copy_from_slice(&0x0020_0000u32.to_le_bytes()); // kernel_alignment
        img[0x234] = 1; // relocatable
        img.extend_from_slice(b"NITRILE-BZIMAGE-PAYLOAD");
        img.resize(img.len() + 4096, 0x90);
        img
    }

    #[test]
    fn bzimage_loads_payload_and_writes_zero_page() {
        let mem = memory();
        let mut f = file(&synthetic_bzimage());
        let entry = load(
            &mem,
            16 << 20,
            &mut f,
            KernelFormat::BzImage,
            "console=ttyS0",
        )
        .unwrap();
        let Entry::Long64 { rip } = entry else {
            panic!("bzImage enters in long mode")
        };
        let load_addr = rip - 0x200;
        let mut payload = [0u8; 23];
        mem.read_slice(&mut payload, GuestAddress(load_addr))
            .unwrap();
        assert_eq!(&payload, b"NITRILE-BZIMAGE-PAYLOAD");
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ params.hdr.header }, 0x5372_6448);
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!(params.e820_entries, 2);
        let last = params.e820_table[1];
        assert_eq!(
            ({ last.addr }, { last.size }),
            (HIMEM_START, (16 << 20) - HIMEM_START)
        );
    }

    #[test]
    fn bzimage_with_bad_magic_refused() {
        let mem = memory();
        let mut img = synthetic_bzimage();
        img[0x202] = b'X';
        let mut f = file(&img);
        assert!(matches!(
            load(&mem, 16 << 20, &mut f, KernelFormat::BzImage, ""),
            Err(BootError::Load(_))
        ));
    }

    /// A synthetic ELF vmlinux with a PVH note (Xen ELF note type 18).
    fn synthetic_pvh_elf(entry32: u32) -> Vec<u8> {
        let mut e = vec![0u8; 0x1000];
        // ELF header.
        e[0..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        // PT_LOAD: file 0x800..0x1000 at 16 MiB - no, at 2 MiB.
        let ph = |e: &mut Vec<u8>, at: usize, ty: u32, off: u64, addr: u64, sz: u64| {
            e[at..at + 4].copy_from_slice(&ty.to_le_bytes());
            e[at + 4..at + 8].copy_from_slice(&5u32.to_le_bytes());
            e[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            e[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
            e[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
            e[at + 32..at + 40].copy_from_slice(&sz.to_le_bytes());
            e[at + 40..at + 48].copy_from_slice(&sz.to_le_bytes());
            e[at + 48..at + 56].copy_from_slice(&4u64.to_le_bytes());
        };
        ph(&mut e, 64, 1, 0x800, 0x20_0000, 0x800);
        // PT_NOTE at 0x400: namesz 4 "Xen\0", descsz 4, type 18, desc entry32.
        let note_off = 0x400usize;
        e[note_off..note_off + 4].copy_from_slice(&4u32.to_le_bytes());
        e[note_off + 4..note_off + 8].copy_from_slice(&4u32.to_le_bytes());
        e[note_off + 8..note_off + 12].copy_from_slice(&18u32.to_le_bytes());
        e[note_off + 12..note_off + 16].copy_from_slice(b"Xen\0");
        e[note_off + 16..note_off + 20].copy_from_slice(&entry32.to_le_bytes());
        ph(&mut e, 64 + 56, 4, note_off as u64, 0, 20);
        e[0x800..0x808].copy_from_slice(b"PVH-CODE");
        e
    }

    #[test]
    fn pvh_elf_uses_the_note_entry_and_start_info() {
        let mem = memory();
        let mut f = file(&synthetic_pvh_elf(0x20_0010));
        let entry = load(&mem, 16 << 20, &mut f, KernelFormat::Pvh, "console=ttyS0").unwrap();
        assert_eq!(entry, Entry::Pvh32 { rip: 0x20_0010 });
        let mut code = [0u8; 8];
        mem.read_slice(&mut code, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&code, b"PVH-CODE");
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(
            (info.magic, info.cmdline_paddr, info.memmap_entries),
            (0x336e_c578, CMDLINE_ADDR, 2)
        );
        assert_eq!(entry_regs(entry).rbx, PVH_INFO_ADDR);
        let s = pvh_sregs(&mem, kvm_sregs::default()).unwrap();
        assert_eq!((s.cr0 & CR0_PG, s.cs.db, s.cs.l), (0, 1, 0));
        // The same image loaded as plain ELF enters at e_entry in long mode.
        let mut f = file(&synthetic_pvh_elf(0x20_0010));
        assert_eq!(
            load(&mem, 16 << 20, &mut f, KernelFormat::Elf, "").unwrap(),
            Entry::Long64 { rip: 0x100_0000 }
        );
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_below_the_limit() {
        // Top of memory when it is below the limit.
        assert_eq!(
            place_initrd(16 << 20, 2 << 20, 0x1234, DEFAULT_INITRD_ADDR_MAX).unwrap(),
            ((16 << 20) - 0x1234) & !0xfff
        );
        // Below the kernel's limit when memory reaches past it.
        let a = place_initrd(2 << 30, 2 << 20, 0x5000, 0x37ff_ffff).unwrap();
        assert_eq!(a, 0x3800_0000 - 0x5000);
        assert!(a + 0x5000 <= 0x3800_0000);
        // Never over the kernel, never empty, never huge.
        assert!(matches!(
            place_initrd(16 << 20, 15 << 20, 2 << 20, DEFAULT_INITRD_ADDR_MAX),
            Err(BootError::InitrdTooLarge { .. })
        ));
        assert!(matches!(
            place_initrd(16 << 20, 2 << 20, 0, DEFAULT_INITRD_ADDR_MAX),
            Err(BootError::InitrdEmpty)
        ));
        assert!(place_initrd(4 << 30, 2 << 20, MAX_INITRAMFS + 1, u64::MAX).is_err());
    }

    #[test]
    fn bzimage_gets_ramdisk_and_rsdp_in_zero_page() {
        let mem = memory();
        let mut img = synthetic_bzimage();
        // initrd_addr_max: 12 MiB - 1, below the 16 MiB of memory.
        img[0x22c..0x230].copy_from_slice(&0x00bf_ffffu32.to_le_bytes());
        let mut f = file(&img);
        let initrd: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let extras = BootExtras {
            initrd: Some(&initrd),
            rsdp: Some(0xe_0000),
        };
        load_with(&mem, 16 << 20, &mut f, KernelFormat::BzImage, "", extras).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let (image, size) = ({ params.hdr.ramdisk_image }, { params.hdr.ramdisk_size });
        assert_eq!(size, 10_000);
        assert_eq!(image % 0x1000, 0);
        assert_eq!(u64::from(image), (0xc0_0000 - 10_000) & !0xfff);
        let mut back = vec![0u8; initrd.len()];
        mem.read_slice(&mut back, GuestAddress(u64::from(image)))
            .unwrap();
        assert_eq!(back, initrd);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
    }

    #[test]
    fn pvh_gets_one_module_and_rsdp() {
        let mem = memory();
        let mut f = file(&synthetic_pvh_elf(0x20_0010));
        let initrd = b"070701-not-really-a-cpio".repeat(300);
        let extras = BootExtras {
            initrd: Some(&initrd),
            rsdp: Some(0xe_0000),
        };
        load_with(&mem, 16 << 20, &mut f, KernelFormat::Pvh, "", extras).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!((info.nr_modules, info.rsdp_paddr), (1, 0xe_0000));
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(m.size, initrd.len() as u64);
        assert_eq!(m.paddr % 0x1000, 0);
        assert!(m.paddr >= 0x20_1000 && m.paddr + m.size <= 16 << 20);
        let mut back = vec![0u8; initrd.len()];
        mem.read_slice(&mut back, GuestAddress(m.paddr)).unwrap();
        assert_eq!(back, initrd);
        // The module list does not overlap the memory map before it.
        assert!(info.modlist_paddr >= info.memmap_paddr + 2 * 24);
        // Without an initramfs there is no module list.
        let mut f = file(&synthetic_pvh_elf(0x20_0010));
        load(&mem, 16 << 20, &mut f, KernelFormat::Pvh, "").unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(
            (info.nr_modules, info.modlist_paddr, info.rsdp_paddr),
            (0, 0, 0)
        );
    }

    #[test]
    fn too_small_memory_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut f = file(crate::TEST_GUEST_ELF);
        assert!(matches!(
            load(&mem, 1 << 20, &mut f, KernelFormat::Elf, ""),
            Err(BootError::MemoryTooSmall)
        ));
    }
}
