//! ACPI tables for Linux guests, generated here: an RSDP at [`RSDP_ADDR`]
//! (inside the BIOS area the kernel scans, and also handed over in the boot
//! parameters), an XSDT, a hardware-reduced FADT pointing at the DSDT, a MADT
//! with one local APIC per vCPU and the I/O APIC at [`IOAPIC_ADDR`] (GSI
//! base 0), and a DSDT declaring each virtio-mmio device as `LNRO0005` with
//! its register window and its edge-triggered, active-high interrupt, which
//! is how Linux finds virtio-mmio devices without command-line devices.
//!
//! Tables are plain bytes with correct lengths and checksums; nothing here
//! reads guest memory.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the RSDP is written (16-byte aligned, in the 0xe0000-0xfffff BIOS
/// area the kernel scans for "RSD PTR ").
pub const RSDP_ADDR: u64 = 0xe_0000;
/// End of the area the tables are placed in.
const TABLES_END: u64 = 0x10_0000;
/// The I/O APIC's MMIO base (KVM's in-kernel I/O APIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Size of each virtio-mmio register window declared in the DSDT.
pub const MMIO_WINDOW: u32 = 0x1000;
/// Most vCPUs the MADT describes.
pub const MAX_VCPUS: usize = 254;
/// Most devices the DSDT describes.
pub const MAX_DEVICES: usize = 256;

const OEM_ID: &[u8; 6] = b"NITRIL";
const OEM_TABLE_ID: &[u8; 8] = b"NITRILE ";
const CREATOR_ID: &[u8; 4] = b"NTRL";
const HEADER_LEN: usize = 36;

/// Why the tables could not be built or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcpiError {
    /// More vCPUs than [`MAX_VCPUS`], or none.
    #[error("the MADT describes 1 to {MAX_VCPUS} vCPUs")]
    VcpuCount,
    /// More devices than [`MAX_DEVICES`].
    #[error("the DSDT describes at most {MAX_DEVICES} devices")]
    TooManyDevices,
    /// The tables do not fit below 1 MiB.
    #[error("the ACPI tables do not fit in the BIOS area")]
    TooLarge,
    /// Writing the tables into guest memory failed.
    #[error("writing ACPI tables into guest memory failed")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// One virtio-mmio device as the DSDT declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of its 4 KiB register window.
    pub base: u32,
    /// Its global system interrupt (an I/O APIC pin).
    pub gsi: u32,
}

/// The tables and where each goes in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// `(guest-physical address, bytes)`, RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

/// The 8-bit checksum byte that makes `bytes` (with it) sum to zero.
pub fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table header with length and checksum left zero.
fn header(signature: &[u8; 4], revision: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(64);
    t.extend_from_slice(signature);
    t.extend_from_slice(&0u32.to_le_bytes()); // length, set by `finish`
    t.push(revision);
    t.push(0); // checksum, set by `finish`
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t
}

/// Sets the table's length and checksum fields.
fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    t[9] = checksum(&t);
    t
}

/// AML `PkgLength` for a package whose contents (after the length) are
/// `content` bytes long; the encoded length counts its own bytes.
pub fn pkg_length(content: usize) -> Vec<u8> {
    if content + 1 < 1 << 6 {
        return vec![(content + 1) as u8];
    }
    let (n, total) = if content + 2 < 1 << 12 {
        (1, content + 2)
    } else if content + 3 < 1 << 20 {
        (2, content + 3)
    } else {
        (3, content + 4)
    };
    let mut out = vec![((n as u8) << 6) | (total & 0xf) as u8];
    for i in 0..n {
        out.push((total >> (4 + 8 * i)) as u8);
    }
    out
}

/// The AML encoding of integer `v` (ZeroOp, OneOp or the smallest prefix).
pub fn aml_integer(v: u64) -> Vec<u8> {
    match v {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, v as u8],
        0x100..=0xffff => [&[0x0b][..], &(v as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[0x0c][..], &(v as u32).to_le_bytes()].concat(),
        _ => [&[0x0e][..], &v.to_le_bytes()].concat(),
    }
}

/// `Name(<seg>, <object>)`.
fn aml_name(seg: &[u8; 4], object: &[u8]) -> Vec<u8> {
    [&[0x08][..], seg, object].concat()
}

/// The `_CRS` resource template of one device: its register window as
/// `Memory32Fixed(ReadWrite, base, 0x1000)` and its GSI as an extended
/// `Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive)`.
pub fn resource_template(dev: MmioDevice) -> Vec<u8> {
    let mut r = Vec::with_capacity(23);
    // Memory32Fixed: large item 0x06, length 9, read-write.
    r.extend_from_slice(&[0x86, 0x09, 0x00, 0x01]);
    r.extend_from_slice(&dev.base.to_le_bytes());
    r.extend_from_slice(&MMIO_WINDOW.to_le_bytes());
    // Extended Interrupt: large item 0x09, length 6; flags: consumer (bit 0),
    // edge (bit 1), active high (bit 2 clear), exclusive (bit 3 clear).
    r.extend_from_slice(&[0x89, 0x06, 0x00, 0x03, 0x01]);
    r.extend_from_slice(&dev.gsi.to_le_bytes());
    // End tag with a zero checksum ("treated as correct").
    r.extend_from_slice(&[0x79, 0x00]);
    r
}

/// `Device(VRnn) { Name(_HID, "LNRO0005") Name(_UID, n) Name(_CRS, ...) }`
/// for device `index`.
pub fn device_aml(index: usize, dev: MmioDevice) -> Vec<u8> {
    let name = format!("VR{:02X}", index & 0xff);
    let mut body = name.into_bytes();
    body.extend(aml_name(b"_HID", b"\x0dLNRO0005\x00"));
    body.extend(aml_name(b"_UID", &aml_integer(index as u64)));
    let template = resource_template(dev);
    let mut buffer = aml_integer(template.len() as u64);
    buffer.extend_from_slice(&template);
    let mut crs = vec![0x11];
    crs.extend(pkg_length(buffer.len()));
    crs.extend(buffer);
    body.extend(aml_name(b"_CRS", &crs));
    let mut out = vec![0x5b, 0x82];
    out.extend(pkg_length(body.len()));
    out.extend(body);
    out
}

/// The DSDT: `Scope(\_SB) { <one Device per virtio-mmio device> }`.
pub fn dsdt(devices: &[MmioDevice]) -> Result<Vec<u8>, AcpiError> {
    if devices.len() > MAX_DEVICES {
        return Err(AcpiError::TooManyDevices);
    }
    let mut scope = b"\\_SB_".to_vec();
    for (i, d) in devices.iter().enumerate() {
        scope.extend(device_aml(i, *d));
    }
    let mut t = header(b"DSDT", 2);
    t.push(0x10);
    t.extend(pkg_length(scope.len()));
    t.extend(scope);
    Ok(finish(t))
}

/// A hardware-reduced FADT (revision 6.5) pointing at the DSDT, declaring
/// no VGA, no MSI, no CMOS RTC and no 8042.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    const LEN: usize = 276;
    const FLAG_PWR_BUTTON: u32 = 1 << 4;
    const FLAG_SLP_BUTTON: u32 = 1 << 5;
    const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;
    const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
    const BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
    const BOOT_ARCH_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
    // No CMOS RTC is emulated: keeps the kernel off IRQ 8, a device GSI.
    const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
    let mut t = header(b"FACP", 6);
    t.resize(LEN, 0);
    // DSDT (32-bit) at 40 and X_DSDT at 140 name the same table.
    t[40..44].copy_from_slice(&(dsdt_addr as u32).to_le_bytes());
    let boot_arch = BOOT_ARCH_VGA_NOT_PRESENT
        | BOOT_ARCH_MSI_NOT_SUPPORTED
        | BOOT_ARCH_PCIE_ASPM_CONTROLS
        | BOOT_ARCH_CMOS_RTC_NOT_PRESENT;
    t[109..111].copy_from_slice(&boot_arch.to_le_bytes());
    let flags = FLAG_HW_REDUCED_ACPI | FLAG_PWR_BUTTON | FLAG_SLP_BUTTON;
    t[112..116].copy_from_slice(&flags.to_le_bytes());
    t[131] = 5; // FADT minor version
    t[140..148].copy_from_slice(&dsdt_addr.to_le_bytes());
    t[268..276].copy_from_slice(b"NITRILE\0"); // hypervisor vendor identity
    finish(t)
}

/// The MADT: local APIC base, one enabled local APIC per vCPU (ids 0..n),
/// and the I/O APIC with GSI base 0.
pub fn madt(vcpus: usize) -> Result<Vec<u8>, AcpiError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(AcpiError::VcpuCount);
    }
    let mut t = header(b"APIC", 5);
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes()); // flags: no dual 8259 setup
    for id in 0..vcpus as u8 {
        // Processor Local APIC: type 0, length 8, UID, APIC id, enabled.
        t.extend_from_slice(&[0, 8, id, id]);
        t.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    t.extend_from_slice(&[1, 12, vcpus as u8, 0]);
    t.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    Ok(finish(t))
}

/// The XSDT listing `entries`.
pub fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = header(b"XSDT", 1);
    for e in entries {
        t.extend_from_slice(&e.to_le_bytes());
    }
    finish(t)
}

/// The ACPI 2.0+ RSDP pointing at the XSDT (no RSDT).
pub fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // RSDT address: none
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.push(0); // extended checksum
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// All tables for `vcpus` vCPUs and `devices`, laid out from [`RSDP_ADDR`].
pub fn build(vcpus: usize, devices: &[MmioDevice]) -> Result<Tables, AcpiError> {
    let dsdt = dsdt(devices)?;
    let madt = madt(vcpus)?;
    let align = |a: u64| a.next_multiple_of(16);
    let xsdt_addr = align(RSDP_ADDR + 36);
    let xsdt_len = (HEADER_LEN + 16) as u64;
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let madt_addr = align(fadt_addr + 276);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    if dsdt_addr + dsdt.len() as u64 > TABLES_END {
        return Err(AcpiError::TooLarge);
    }
    Ok(Tables {
        blobs: vec![
            (RSDP_ADDR, rsdp(xsdt_addr)),
            (xsdt_addr, xsdt(&[fadt_addr, madt_addr])),
            (fadt_addr, fadt(dsdt_addr)),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
    })
}

/// Builds the tables and writes them into guest memory; returns the RSDP
/// address.
pub fn write(
    mem: &GuestMemoryMmap,
    vcpus: usize,
    devices: &[MmioDevice],
) -> Result<u64, AcpiError> {
    for (addr, bytes) in build(vcpus, devices)?.blobs {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(AcpiError::GuestMemory)?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn devices(n: u32) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                base: 0xd000_0000 + i * 0x1000,
                gsi: 5 + i,
            })
            .collect()
    }

    /// Every table sums to zero over its stated length, which is its size;
    /// the RSDP's two checksums hold; the pointers chain RSDP -> XSDT ->
    /// FADT -> DSDT and XSDT -> MADT.
    #[test]
    fn tables_have_lengths_checksums_and_pointers() {
        for n in [0, 1, 3, 18] {
            let t = build(2, &devices(n)).unwrap();
            let find = |addr: u64| t.blobs.iter().find(|(a, _)| *a == addr).unwrap().1.clone();
            let (rsdp_addr, rsdp) = &t.blobs[0];
            assert_eq!(*rsdp_addr, 0xe_0000);
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0);
            assert_eq!(sum(rsdp), 0);
            assert_eq!((rsdp.len(), u32_at(rsdp, 20), rsdp[15]), (36, 36, 2));
            for (addr, table) in &t.blobs[1..] {
                assert_eq!(addr % 16, 0);
                assert_eq!(u32_at(table, 4) as usize, table.len());
                assert_eq!(sum(table), 0, "{:?}", &table[..4]);
            }
            let xsdt = find(u64_at(rsdp, 24));
            assert_eq!(&xsdt[..4], b"XSDT");
            assert_eq!(xsdt.len(), 36 + 16);
            let fadt = find(u64_at(&xsdt, 36));
            let madt = find(u64_at(&xsdt, 44));
            assert_eq!((&fadt[..4], &madt[..4]), (&b"FACP"[..], &b"APIC"[..]));
            assert_eq!(fadt.len(), 276);
            assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
            assert_eq!(u64_at(&fadt, 140), u64::from(u32_at(&fadt, 40)));
            let dsdt = find(u64_at(&fadt, 140));
            assert_eq!(&dsdt[..4], b"DSDT");
            // Tables do not overlap.
            let mut spans: Vec<(u64, u64)> = t
                .blobs
                .iter()
                .map(|(a, b)| (*a, *a + b.len() as u64))
                .collect();
            spans.sort();
            assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
            assert!(spans.last().unwrap().1 <= 0x10_0000);
        }
    }

    #[test]
    fn madt_lists_each_vcpu_and_the_ioapic() {
        let m = madt(2).unwrap();
        assert_eq!(m.len(), 36 + 8 + 2 * 8 + 12);
        assert_eq!(u32_at(&m, 36), 0xfee0_0000);
        assert_eq!(&m[44..52], &[0, 8, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&m[52..60], &[0, 8, 1, 1, 1, 0, 0, 0]);
        assert_eq!(
            &m[60..72],
            &[1, 12, 2, 0, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0]
        );
        assert!(matches!(madt(0), Err(AcpiError::VcpuCount)));
        assert!(matches!(madt(255), Err(AcpiError::VcpuCount)));
    }

    /// Device 0 at 0xd0000000 on GSI 5, encoded by hand from the ACPI
    /// specification's AML grammar (section 20) and resource descriptors
    /// (section 6.4).
    #[test]
    fn device_aml_matches_hand_encoding() {
        let expected: Vec<u8> = [
            &[0x5b, 0x82, 0x3a][..], // DeviceOp, PkgLength 58
            b"VR00",
            &[0x08], // NameOp
            b"_HID",
            &[0x0d], // StringPrefix
            b"LNRO0005\0",
            &[0x08],
            b"_UID",
            &[0x00], // ZeroOp
            &[0x08],
            b"_CRS",
            &[0x11, 0x1a, 0x0a, 0x17], // BufferOp, PkgLength 26, ByteConst 23
            // Memory32Fixed(ReadWrite, 0xd0000000, 0x1000)
            &[
                0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00,
            ],
            // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {5}
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00],
            &[0x79, 0x00], // EndTag
        ]
        .concat();
        let got = device_aml(
            0,
            MmioDevice {
                base: 0xd000_0000,
                gsi: 5,
            },
        );
        assert_eq!(got, expected);
        // _UID 2 takes a BytePrefix: one byte more, PkgLength 59.
        let two = device_aml(
            2,
            MmioDevice {
                base: 0xd000_2000,
                gsi: 7,
            },
        );
        assert_eq!(&two[..7], &[0x5b, 0x82, 0x3b, b'V', b'R', b'0', b'2']);
        assert_eq!(two.len(), 61);
    }

    #[test]
    fn dsdt_scope_wraps_every_device() {
        let devs = devices(3);
        let d = dsdt(&devs).unwrap();
        let aml = &d[36..];
        assert_eq!(aml[0], 0x10); // ScopeOp
        // Devices of 60, 60 and 61 bytes (_UID Zero, One, then BytePrefix
        // 2) plus the 5-byte name: a 2-byte PkgLength of 2 + 5 + 181 = 188
        // = 0x0bc.
        assert_eq!(&aml[1..3], &[0x4c, 0x0b]);
        assert_eq!(&aml[3..8], b"\\_SB_");
        assert_eq!(aml.len(), 3 + 5 + 181);
        let mut at = 8;
        for (i, dev) in devs.iter().enumerate() {
            let one = device_aml(i, *dev);
            assert_eq!(&aml[at..at + one.len()], &one[..]);
            at += one.len();
        }
        assert!(matches!(
            dsdt(&vec![devs[0]; MAX_DEVICES + 1]),
            Err(AcpiError::TooManyDevices)
        ));
    }

    #[test]
    fn pkg_length_encodings() {
        assert_eq!(pkg_length(0), vec![0x01]);
        assert_eq!(pkg_length(62), vec![0x3f]);
        // 63 bytes need two length bytes: 65 = 0x041.
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
        assert_eq!(pkg_length(4093), vec![0x4f, 0xff]);
        // 4094 bytes: three length bytes, 4097 = 0x01001.
        assert_eq!(pkg_length(4094), vec![0x81, 0x00, 0x01]);
        assert_eq!(aml_integer(0x1234), vec![0x0b, 0x34, 0x12]);
        assert_eq!(aml_integer(0x1_0000), vec![0x0c, 0, 0, 1, 0]);
    }

    #[test]
    fn write_puts_rsdp_where_the_kernel_scans() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        assert_eq!(write(&mem, 1, &devices(2)).unwrap(), 0xe_0000);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(0xe_0000)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }
}
