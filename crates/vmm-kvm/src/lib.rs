//! The in-process KVM virtual machine monitor behind the `kvm` backend: one VM
//! with one vCPU, guest memory as anonymous `MADV_DONTDUMP` mappings, 64-bit
//! long-mode (or PVH) boot of an ELF or bzImage through `linux-loader`, a
//! 16550 serial port (`vm-superio`) whose output goes to a caller-given
//! writer, virtio-mmio block devices whose backing files hold only
//! AES-256-XTS ciphertext, encrypted per 512-byte sector in this process, and
//! a user-space virtio-vsock device relaying guest streams to host Unix
//! sockets (see [`vsock`]), and a virtio-net device on a tap descriptor the
//! caller opened (see [`net`]).
//!
//! It guarantees: the VMM offers no interface that reads guest memory, disk
//! plaintext or the console to anyone but the configured serial writer;
//! volume keys (`nitrile_vmm::VolumeKey`, the one key type of both backends)
//! and their expanded AES key schedules live on locked pages of their own,
//! are zeroized on drop and never printed, and a key whose halves are equal
//! makes no cipher ([`XtsKeyError`]); every guest-controlled ring index, chain and address is
//! bounded before use, and guest memory is never turned into a Rust
//! reference. The plaintext disk mode exists only behind
//! [`DiskEncryption::DangerPlaintext`], for measuring the cost of encryption. [`harden`] makes the process non-dumpable, without core files,
//! and confines threads with seccomp allowlists. [`process`] is the
//! `nitrile vmm` process form: the VM set up from inherited descriptors, the
//! process chrooted, on an unprivileged uid and under seccomp before the
//! guest runs, driven over a typed control channel.
//!
//! For Linux guests it provides the in-kernel interrupt controller (PIC,
//! I/O APIC, local APIC), an edge-triggered GSI per virtio-mmio device
//! ([`VIRTIO_IRQ_BASE`] + slot) pulsed when a used ring moves, the UART's
//! IRQ 4, ACPI tables whose DSDT declares the virtio-mmio devices
//! ([`acpi`]), and initramfs loading ([`Vmm::with_initramfs`]). Booting
//! Linux this way is exercised only through unit tests and the test guest:
//! it must be verified on hardware KVM.
//!
//! Host input (vsock streams, received frames) is delivered when the guest
//! kicks a queue or, at the latest, at the next device poll
//! ([`RX_POLL_INTERVAL`]).
//!
//! It does not (yet): run more than one vCPU, offer network offloads, power off or
//! reset through ACPI, enter namespaces or cgroups (the parent does, before
//! exec: `nitrile_vmm::kvm`), or check that a kernel is the one that was
//! measured (the caller's job).

// unsafe code is denied here (Cargo.toml) and allowed only where KVM itself
// needs it: the `memory` module (guest memory excluded from dumps and
// registered with `KVM_SET_USER_MEMORY_REGION`, which KVM then writes behind
// Rust's back) and this file's tests (reading the union KVM returns for the
// in-kernel PIC). Every block carries a SAFETY comment
// (clippy::undocumented_unsafe_blocks is denied). The other unsafe system
// code of the VMM (locked key schedules, the privilege drop, inherited
// descriptors, the poll timer, tap flags) is in `nitrile-vmm-sys`, behind
// safe APIs.

pub mod acpi;
pub mod blk;
pub mod boot;
pub mod crypt;
pub mod harden;
mod memory;
pub mod net;
pub mod process;
pub mod virtio;
pub mod vsock;

use std::fs::File;
use std::io::Write;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_fpu};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub use blk::{Blk, DiskEncryption};
pub use boot::KernelFormat;
pub use crypt::{SECTOR_SIZE, SectorCipher, XtsKeyError};

pub use net::{NetConfig, NetError};
use virtio::{MMIO_WINDOW, MmioTransport, VirtioDevice};
pub use vsock::{VsockConfig, VsockError};

/// The bare-metal test guest (see `guest/testguest`), an ELF loaded at 1 MiB.
pub const TEST_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// Guest-physical address of the first virtio-mmio device; device `i` sits
/// at `VIRTIO_MMIO_BASE + i * 0x1000`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The I/O port a guest writes its exit code to in order to stop the VM.
pub const SHUTDOWN_PORT: u16 = 0x501;
/// The 16550 UART (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// The UART's interrupt line (COM1's ISA IRQ 4).
pub const SERIAL_GSI: u32 = 4;
/// Most guest memory a VM may have.
pub const MAX_MEMORY: u64 = 64 << 30;
/// Most block devices per VM.
pub const MAX_DISKS: usize = 16;
/// The GSI of the first virtio-mmio device; device `i` signals GSI
/// `VIRTIO_IRQ_BASE + i` (edge-triggered, active high: an I/O APIC pin).
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// One encrypted block device.
#[derive(Debug)]
pub struct DiskConfig {
    /// The backing file, ciphertext only, a whole number of sectors.
    pub file: File,
    /// How sectors are stored: [`DiskEncryption::Xts`] with the volume key,
    /// which is expanded into the device's cipher and then dropped.
    pub encryption: DiskEncryption,
    /// Refuse guest writes.
    pub read_only: bool,
    /// Reported to the guest by GET_ID (at most 20 bytes are used).
    pub id: String,
}

/// Everything a VM is made of.
pub struct VmConfig {
    /// Guest RAM in bytes (a multiple of 4 KiB, at least 4 MiB).
    pub memory_bytes: u64,
    /// The kernel image file.
    pub kernel: File,
    /// How to load and enter it.
    pub kernel_format: KernelFormat,
    /// Kernel command line (printable ASCII).
    pub cmdline: String,
    /// Where the guest's serial output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Block devices, in MMIO slot order.
    pub disks: Vec<DiskConfig>,
    /// A vsock device, in the slot after the block devices.
    pub vsock: Option<VsockConfig>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("memory_bytes", &self.memory_bytes)
            .field("kernel_format", &self.kernel_format)
            .field("disks", &self.disks.len())
            .field("vsock", &self.vsock)
            .finish_non_exhaustive()
    }
}

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmmError {
    /// `/dev/kvm` could not be opened.
    #[error("no usable /dev/kvm")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM ioctl {op} failed")]
    Kvm {
        /// Which operation.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Memory size out of range or not page-aligned.
    #[error("guest memory must be page-aligned, between {min} and {MAX_MEMORY} bytes", min = boot::MIN_MEMORY)]
    MemorySize,
    /// Too many block devices.
    #[error("at most {MAX_DISKS} block devices")]
    TooManyDisks,
    /// Allocating guest memory failed.
    #[error("allocating guest memory failed")]
    Memory(#[source] vm_memory::mmap::FromRangesError),
    /// Loading the kernel failed.
    #[error("loading the guest failed")]
    Boot(#[from] boot::BootError),
    /// The ACPI tables could not be written.
    #[error("writing the ACPI tables failed")]
    Acpi(#[from] acpi::AcpiError),
    /// Reading the initramfs failed.
    #[error("reading the initramfs failed")]
    Initramfs(#[source] std::io::Error),
    /// A block device could not be set up.
    #[error("block device setup failed")]
    Blk(#[from] blk::BlkError),
    /// The network device could not be set up.
    #[error("network device setup failed")]
    Net(#[from] NetError),
    /// The vsock device could not be set up.
    #[error("vsock device setup failed")]
    Vsock(#[from] VsockError),
    /// Writing guest serial output failed.
    #[error("serial output failed")]
    Serial(#[source] std::io::Error),
    /// The vCPU stopped in a way the VMM cannot continue from.
    #[error("vCPU entry failed (hardware reason {0:#x})")]
    FailEntry(u64),
    /// The device poll timer could not be set up.
    #[error("setting up the device poll timer failed")]
    PollTimer(#[source] std::io::Error),
    /// KVM reported an internal error for the vCPU.
    #[error("KVM internal error")]
    InternalError,
}

/// How a VM run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// The guest wrote `code` to [`SHUTDOWN_PORT`].
    Shutdown {
        /// The guest's exit code.
        code: u8,
    },
    /// The vCPU halted in user-space emulation (with the in-kernel
    /// interrupt controller, KVM keeps a halted vCPU waiting for an
    /// interrupt instead, and the VM is ended by a stop).
    Halted,
    /// The guest triple-faulted or otherwise shut the vCPU down.
    TripleFault,
    /// The guest requested a reset or power-off through a system event.
    SystemEvent,
}

/// The serial port's interrupt: the UART raises it (the guest enabled a
/// UART interrupt and its condition occurred); the run loop then pulses
/// [`SERIAL_GSI`].
#[derive(Default)]
struct SerialIrq(std::sync::atomic::AtomicBool);

impl vm_superio::Trigger for SerialIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl SerialIrq {
    fn take(&self) -> bool {
        self.0.swap(false, std::sync::atomic::Ordering::Relaxed)
    }
}

/// One virtual machine, ready to run.
pub struct Vmm {
    // Field order is drop order: the vCPU and VM go before the memory they map.
    vcpu: VcpuFd,
    vm: VmFd,
    mem: GuestMemoryMmap,
    serial: vm_superio::Serial<SerialIrq, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    devices: Vec<MmioTransport<Box<dyn VirtioDevice>>>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// Creates the VM: memory, kernel, vCPU state and devices.
    pub fn new(config: VmConfig) -> Result<Self, VmmError> {
        Self::build(config, None)
    }

    /// [`Vmm::new`] with an initramfs, read whole (at most
    /// [`boot::MAX_INITRAMFS`] bytes) and placed high in guest memory, page
    /// aligned, below the kernel's `initrd_addr_max`; the boot parameters
    /// (zero page or PVH module list) point at it.
    pub fn with_initramfs(config: VmConfig, mut initramfs: File) -> Result<Self, VmmError> {
        use std::io::{Read, Seek, SeekFrom};
        // Refused before reading when it cannot fit anyway.
        let size = initramfs.metadata().map_err(VmmError::Initramfs)?.len();
        if size > config.memory_bytes.min(boot::MAX_INITRAMFS) {
            return Err(boot::BootError::InitrdTooLarge { size }.into());
        }
        initramfs
            .seek(SeekFrom::Start(0))
            .map_err(VmmError::Initramfs)?;
        let mut bytes = Vec::new();
        initramfs
            .take(boot::MAX_INITRAMFS + 1)
            .read_to_end(&mut bytes)
            .map_err(VmmError::Initramfs)?;
        Self::build(config, Some(bytes))
    }

    fn build(config: VmConfig, initramfs: Option<Vec<u8>>) -> Result<Self, VmmError> {
        let VmConfig {
            memory_bytes,
            mut kernel,
            kernel_format,
            cmdline,
            serial_out,
            disks,
            vsock,
        } = config;
        if !(boot::MIN_MEMORY..=MAX_MEMORY).contains(&memory_bytes)
            || !memory_bytes.is_multiple_of(4096)
        {
            return Err(VmmError::MemorySize);
        }
        if disks.len() > MAX_DISKS {
            return Err(VmmError::TooManyDisks);
        }
        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        let vm = kvm.create_vm().map_err(|source| VmmError::Kvm {
            op: "create_vm",
            source,
        })?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(|source| VmmError::Kvm {
                op: "set_tss_address",
                source,
            })?;
        // The in-kernel PIC, I/O APIC and local APICs, before any vCPU.
        vm.create_irq_chip().map_err(|source| VmmError::Kvm {
            op: "create_irq_chip",
            source,
        })?;
        let size = usize::try_from(memory_bytes).map_err(|_| VmmError::MemorySize)?;
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).map_err(VmmError::Memory)?;
        memory::register(&vm, &mem)?;
        let rsdp = acpi::write(
            &mem,
            1,
            &mmio_devices(disks.len() + usize::from(vsock.is_some())),
        )?;
        let extras = boot::BootExtras {
            initrd: initramfs.as_deref(),
            rsdp: Some(rsdp),
        };
        let entry = boot::load_with(
            &mem,
            memory_bytes,
            &mut kernel,
            kernel_format,
            &cmdline,
            extras,
        )?;
        let vcpu = vm.create_vcpu(0).map_err(|source| VmmError::Kvm {
            op: "create_vcpu",
            source,
        })?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmmError::Kvm {
                op: "get_supported_cpuid",
                source,
            })?;
        vcpu.set_cpuid2(&cpuid).map_err(|source| VmmError::Kvm {
            op: "set_cpuid2",
            source,
        })?;
        let sregs = vcpu.get_sregs().map_err(|source| VmmError::Kvm {
            op: "get_sregs",
            source,
        })?;
        let sregs = match entry {
            boot::Entry::Long64 { .. } => boot::long_mode_sregs(&mem, sregs)?,
            boot::Entry::Pvh32 { .. } => boot::pvh_sregs(&mem, sregs)?,
        };
        vcpu.set_sregs(&sregs).map_err(|source| VmmError::Kvm {
            op: "set_sregs",
            source,
        })?;
        vcpu.set_regs(&boot::entry_regs(entry))
            .map_err(|source| VmmError::Kvm {
                op: "set_regs",
                source,
            })?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu).map_err(|source| VmmError::Kvm {
            op: "set_fpu",
            source,
        })?;
        if disks.len() + usize::from(vsock.is_some()) > MAX_DISKS {
            return Err(VmmError::TooManyDisks);
        }
        let mut devices = Vec::with_capacity(disks.len() + 1);
        for d in disks {
            let blk: Box<dyn VirtioDevice> =
                Box::new(Blk::new(d.file, &d.encryption, d.read_only, &d.id)?);
            devices.push(MmioTransport::new(blk));
        }
        if let Some(v) = vsock {
            let dev: Box<dyn VirtioDevice> = Box::new(vsock::Vsock::new(v)?);
            devices.push(MmioTransport::new(dev));
        }
        let serial = vm_superio::Serial::new(SerialIrq::default(), serial_out);
        Ok(Self {
            vcpu,
            vm,
            mem,
            serial,
            devices,
        })
    }

    /// Attaches a virtio-net device on `net`'s tap in the next free MMIO
    /// slot (after the block and vsock devices). Call before [`Vmm::run`].
    pub fn attach_net(&mut self, net: NetConfig) -> Result<(), VmmError> {
        if self.devices.len() > MAX_DISKS {
            return Err(VmmError::TooManyDisks);
        }
        let dev: Box<dyn VirtioDevice> = Box::new(net::Net::new(net)?);
        self.devices.push(MmioTransport::new(dev));
        // The DSDT must list the new device too.
        acpi::write(&self.mem, 1, &mmio_devices(self.devices.len()))?;
        Ok(())
    }

    /// Runs the vCPU until the guest shuts down, halts or faults. Every
    /// [`RX_POLL_INTERVAL`] a timer signal interrupts the vCPU and the
    /// devices are polled ([`MmioTransport::poll`]), so host input reaches
    /// a guest that waits for interrupts.
    pub fn run(&mut self) -> Result<ExitReason, VmmError> {
        let _timer = nitrile_vmm_sys::timer::ThreadTimer::arm(RX_POLL_INTERVAL)
            .map_err(VmmError::PollTimer)?;
        loop {
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR => {
                    self.poll_devices()?;
                    continue;
                }
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(source) => return Err(VmmError::Kvm { op: "run", source }),
            };
            match exit {
                VcpuExit::IoOut(port, data) => {
                    if port == SHUTDOWN_PORT {
                        self.serial.writer_mut().flush().map_err(VmmError::Serial)?;
                        return Ok(ExitReason::Shutdown {
                            code: data.first().copied().unwrap_or(0),
                        });
                    }
                    if (SERIAL_PORT..SERIAL_PORT + 8).contains(&port) {
                        let value = data.first().copied().unwrap_or(0);
                        match self.serial.write((port - SERIAL_PORT) as u8, value) {
                            Ok(()) => {}
                            Err(vm_superio::serial::Error::IOError(e)) => {
                                return Err(VmmError::Serial(e));
                            }
                            Err(_) => {}
                        }
                        if self.serial.interrupt_evt().take() {
                            self.pulse(SERIAL_GSI)?;
                        }
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    let value = if (SERIAL_PORT..SERIAL_PORT + 8).contains(&port) {
                        self.serial.read((port - SERIAL_PORT) as u8)
                    } else {
                        0xff
                    };
                    data.fill(value);
                    if self.serial.interrupt_evt().take() {
                        self.pulse(SERIAL_GSI)?;
                    }
                }
                VcpuExit::MmioRead(addr, data) => match device_at(addr, self.devices.len()) {
                    Some((i, off)) => self.devices[i].read(off, data),
                    None => data.fill(0),
                },
                VcpuExit::MmioWrite(addr, data) => {
                    if let Some((i, off)) = device_at(addr, self.devices.len()) {
                        self.devices[i].write(off, data, &self.mem);
                        if self.devices[i].take_interrupt() {
                            self.pulse(gsi(i))?;
                        }
                    }
                }
                VcpuExit::Hlt => {
                    self.serial.writer_mut().flush().map_err(VmmError::Serial)?;
                    return Ok(ExitReason::Halted);
                }
                VcpuExit::Shutdown => return Ok(ExitReason::TripleFault),
                VcpuExit::SystemEvent(..) => return Ok(ExitReason::SystemEvent),
                VcpuExit::FailEntry(reason, _) => return Err(VmmError::FailEntry(reason)),
                VcpuExit::InternalError => return Err(VmmError::InternalError),
                _ => {}
            }
        }
    }
}

impl Vmm {
    /// Serves every device's queue 0 and signals the devices that used
    /// buffers.
    fn poll_devices(&mut self) -> Result<(), VmmError> {
        for i in 0..self.devices.len() {
            self.devices[i].poll(&self.mem);
            if self.devices[i].take_interrupt() {
                self.pulse(gsi(i))?;
            }
        }
        Ok(())
    }

    /// Signals an edge on `gsi` through the in-kernel interrupt controller.
    fn pulse(&self, gsi: u32) -> Result<(), VmmError> {
        for level in [true, false] {
            self.vm
                .set_irq_line(gsi, level)
                .map_err(|source| VmmError::Kvm {
                    op: "irq_line",
                    source,
                })?;
        }
        Ok(())
    }
}

/// How often a running vCPU is interrupted to poll the devices for host
/// input.
pub const RX_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// The GSI of device slot `i`.
fn gsi(i: usize) -> u32 {
    VIRTIO_IRQ_BASE + i as u32
}

/// The first `n` virtio-mmio slots as the DSDT declares them.
fn mmio_devices(n: usize) -> Vec<acpi::MmioDevice> {
    (0..n)
        .map(|i| acpi::MmioDevice {
            base: (VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW) as u32,
            gsi: gsi(i),
        })
        .collect()
}

/// The device slot and register offset of MMIO address `addr`, if any.
fn device_at(addr: u64, devices: usize) -> Option<(usize, u64)> {
    let rel = addr.checked_sub(VIRTIO_MMIO_BASE)?;
    let index = usize::try_from(rel / MMIO_WINDOW).ok()?;
    (index < devices).then_some((index, rel % MMIO_WINDOW))
}

#[cfg(test)]
#[allow(unsafe_code)] // reading the in-kernel PIC's state, a union KVM fills
mod tests {
    use super::*;
    use kvm_bindings::{KVM_IRQCHIP_PIC_MASTER, kvm_irqchip};

    /// The test guest kicks its block device; the device's GSI (5, a
    /// master PIC pin too) is pulsed, and the in-kernel PIC holds the edge
    /// in its request register since the guest never enables interrupts.
    #[test]
    fn a_used_ring_raises_the_device_gsi() {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            println!("SKIPPED: no usable /dev/kvm");
            return;
        }
        let pic_irr = |vmm: &Vmm| {
            let mut chip = kvm_irqchip {
                chip_id: KVM_IRQCHIP_PIC_MASTER,
                ..Default::default()
            };
            vmm.vm.get_irqchip(&mut chip).unwrap();
            // SAFETY: chip_id PIC_MASTER selects the `pic` member.
            unsafe { chip.chip.pic }.irr
        };
        let boot = |cmdline: &str| {
            let mut kernel = tempfile::tempfile().unwrap();
            kernel.write_all(TEST_GUEST_ELF).unwrap();
            let disk = tempfile::tempfile().unwrap();
            disk.set_len(1 << 20).unwrap();
            let bytes: zeroize::Zeroizing<[u8; 64]> =
                zeroize::Zeroizing::new(std::array::from_fn(|i| i as u8 ^ 0x5c));
            let key = nitrile_vmm::VolumeKey::from_bytes(&bytes[..]).unwrap();
            let config = VmConfig {
                memory_bytes: 32 << 20,
                kernel,
                kernel_format: KernelFormat::Elf,
                cmdline: cmdline.into(),
                serial_out: Box::new(std::io::sink()),
                disks: vec![DiskConfig {
                    file: disk,
                    encryption: DiskEncryption::Xts(key),
                    read_only: false,
                    id: "irq".into(),
                }],
                vsock: None,
            };
            let mut vmm = Vmm::new(config).unwrap();
            assert_eq!(pic_irr(&vmm), 0);
            assert_eq!(vmm.run().unwrap(), ExitReason::Shutdown { code: 0 });
            pic_irr(&vmm)
        };
        // Without block I/O nothing is used: no edge.
        assert_eq!(boot("") & (1 << VIRTIO_IRQ_BASE), 0);
        assert_eq!(
            boot("blk=rw") & (1 << VIRTIO_IRQ_BASE),
            1 << VIRTIO_IRQ_BASE
        );
    }

    /// The UART raises its trigger once the guest enables the transmitter
    /// empty interrupt and writes a byte; the run loop turns that into a
    /// pulse on [`SERIAL_GSI`].
    #[test]
    fn serial_interrupt_is_taken_once() {
        let mut serial = vm_superio::Serial::new(SerialIrq::default(), std::io::sink());
        serial.write(0, b'x').unwrap();
        assert!(!serial.interrupt_evt().take(), "no interrupt enabled yet");
        serial.write(1, 0b10).unwrap(); // IER: THR empty
        serial.write(0, b'y').unwrap();
        assert!(serial.interrupt_evt().take());
        assert!(!serial.interrupt_evt().take());
    }
}
