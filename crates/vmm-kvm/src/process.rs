//! The `nitrile vmm` process: one VM per process, set up from inherited file
//! descriptors and driven over the control channel of
//! [`nitrile_vmm::kvm::control`].
//!
//! [`run_from_fds`] reads the [`VmSpec`] from the spec pipe (at most
//! [`nitrile_vmm::MAX_SPEC_LEN`] bytes), makes one recipient key pair per
//! volume and offers their public keys on the control channel, opens the
//! sealed keys the backend relays back straight into mlocked, zeroizing
//! pages ([`nitrile_vmm::unlock`]; the private keys are zeroized at once),
//! generates the instance-store disk's key itself when the spec has one (it
//! never leaves this process), opens `/dev/kvm`, the kernel and the disks,
//! builds the VM, and jails itself: `chroot` into the
//! working directory, `setgroups([])`, `setresgid`, `setresuid` to the given
//! unprivileged ids and `PR_SET_NO_NEW_PRIVS` (the jails' one privilege
//! drop, `nitrile_vmm_sys::privilege`, which refuses unless the process
//! still has one thread), non-dumpable with `RLIMIT_CORE` 0, and seccomp
//! allowlists on the vCPU thread ([`harden::vcpu_filter`]) and on the control
//! thread ([`control_filter`]), all before any guest code runs. Only then
//! does it send `Ready`. It answers `Status`, runs the vCPU on `Start`, and
//! exits after sending `Exited` on `Stop` or when the guest ends.
//!
//! A spec's network device is a tap the parent opened in the host's network
//! namespace and passed in (`tap_fd`); the process is in a network namespace
//! of its own and could not open it itself.
//!
//! Not done here: namespaces and cgroups (the parent applies them before
//! exec, see `nitrile_vmm::kvm`). A non-empty initramfs is loaded with
//! [`Vmm::with_initramfs`]; an empty file means none.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use nitrile_vmm::kvm::control::{self, ControlError, Event, ExitKind, Request, RunState};
use nitrile_vmm::{MAX_SPEC_LEN, SCRATCH_DISK_ID, SpecError, UnlockError, VmSpec, VolumeKey};
use nitrile_vmm_sys::privilege::{self, Ids, PrivilegeError};
use nitrile_vmm_sys::process::exit_now;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::harden::{self, HardenError};
use crate::{
    DiskConfig, DiskEncryption, ExitReason, KernelFormat, NetConfig, VmConfig, Vmm, VsockConfig,
};

/// Makes the volume at `path` from `seed`, a raw disk image of exactly
/// `size_mib` MiB: every sector encrypted under `key` as the block device
/// does, written beside `path` and renamed when whole (a process that dies
/// while copying leaves no volume a later one would take as made).
pub fn seed_volume(
    path: &std::path::Path,
    size_mib: u64,
    seed: &std::path::Path,
    key: &VolumeKey,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidData, msg);
    let cipher = crate::SectorCipher::new(key).map_err(|e| invalid(e.to_string()))?;
    let mut input = File::open(seed)?;
    let len = input.metadata()?.len();
    if len != size_mib << 20 {
        return Err(invalid(format!(
            "seed {} is {len} bytes, its volume {}",
            seed.display(),
            size_mib << 20
        )));
    }
    let tmp = path.with_extension("seeding");
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut buf = zeroize::Zeroizing::new(vec![0u8; 1 << 20]);
        let mut sector = 0u64;
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                match input.read(&mut buf[filled..])? {
                    0 => break,
                    n => filled += n,
                }
            }
            if filled == 0 {
                break;
            }
            // The size is a whole number of MiB, so every chunk is whole.
            cipher
                .encrypt(&mut buf[..filled], sector)
                .map_err(|e| invalid(e.to_string()))?;
            out.write_all(&buf[..filled])?;
            sector += (filled / crate::SECTOR_SIZE) as u64;
        }
        out.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The vsock socket, relative to the working directory (the chroot).
pub const VSOCK_SOCKET: &str = "vsock.sock";

/// What the process was started with: inherited descriptor numbers and the
/// ids to drop to.
#[derive(Debug, Clone, Copy)]
pub struct ProcessArgs {
    /// Pipe holding the spec JSON.
    pub spec_fd: RawFd,
    /// Unix socket of the control channel (the key exchange, then
    /// [`nitrile_vmm::kvm::control`]).
    pub control_fd: RawFd,
    /// The serial console file, open for writing.
    pub serial_fd: RawFd,
    /// The tap device (opened with `IFF_TAP | IFF_NO_PI` in the host's
    /// network namespace), when the spec has a network device.
    pub tap_fd: Option<RawFd>,
    /// The unprivileged uid to run as (not 0).
    pub uid: u32,
    /// The unprivileged gid to run as (not 0).
    pub gid: u32,
}

/// Why the process could not set up or run its VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// A descriptor number is not an open, inherited descriptor above 2, or
    /// two of them are the same.
    #[error("file descriptor {0} is not a distinct inherited descriptor")]
    BadFd(RawFd),
    /// uid or gid 0 was asked for.
    #[error("the VMM must drop to a non-root uid and gid")]
    RootIds,
    /// Reading the spec failed.
    #[error("reading the spec")]
    ReadSpec(#[source] std::io::Error),
    /// The spec was refused.
    #[error("invalid spec")]
    Spec(#[from] SpecError),
    /// The volume-key exchange failed (a sealed key that does not open
    /// among others).
    #[error("volume keys")]
    Unlock(#[from] UnlockError),
    /// The instance-store disk's key could not be made.
    #[error("instance-store key")]
    Key(#[from] nitrile_vmm::KeyError),
    /// The spec asks for a network device but no tap descriptor was given,
    /// or a tap was given for a spec without one.
    #[error("a tap descriptor must be given exactly when the spec has a network device")]
    TapMismatch,
    /// The kernel is neither ELF nor bzImage.
    #[error("the kernel is neither an ELF file nor a bzImage")]
    UnknownKernelFormat,
    /// Opening a file named by the spec failed.
    #[error("opening {what}")]
    Open {
        /// which file
        what: &'static str,
        /// the cause
        #[source]
        source: std::io::Error,
    },
    /// Building the VM failed.
    #[error("building the VM")]
    Vmm(#[from] crate::VmmError),
    /// A jail step failed.
    #[error("jail: {step}")]
    Jail {
        /// which step
        step: &'static str,
        /// the cause
        #[source]
        source: std::io::Error,
    },
    /// Dropping to the jail's ids failed.
    #[error("jail: dropping privileges")]
    Privileges(#[from] PrivilegeError),
    /// Hardening failed.
    #[error("hardening")]
    Harden(#[from] HardenError),
    /// The control channel failed.
    #[error("control channel")]
    Control(#[from] ControlError),
}

/// Takes an inherited descriptor ([`nitrile_vmm_sys::fd::take_inherited`]:
/// not a standard stream, open, passed by the parent, never taken twice).
fn take_fd(fd: RawFd) -> Result<OwnedFd, ProcessError> {
    nitrile_vmm_sys::fd::take_inherited(fd).map_err(|_| ProcessError::BadFd(fd))
}

/// Most bytes of a kernel read to find its format.
const MAX_HEADER_SCAN: usize = 64 * 1024;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Whether a 64-bit ELF file has a PVH entry note (Xen note type 18) in a
/// `PT_NOTE` segment within the first [`MAX_HEADER_SCAN`] bytes.
fn has_pvh_note(head: &[u8]) -> bool {
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (u64_at(head, 0x20), u16_at(head, 0x36), u16_at(head, 0x38))
    else {
        return false;
    };
    for i in 0..usize::from(phnum) {
        let Some(ph) = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i * usize::from(phentsize)))
        else {
            return false;
        };
        if u32_at(head, ph) != Some(4) {
            continue; // not PT_NOTE
        }
        let (Some(off), Some(size)) = (u64_at(head, ph + 8), u64_at(head, ph + 32)) else {
            continue;
        };
        let (Ok(mut at), Ok(size)) = (usize::try_from(off), usize::try_from(size)) else {
            continue;
        };
        let end = at.saturating_add(size).min(head.len());
        while at + 12 <= end {
            let (Some(namesz), Some(descsz), Some(ty)) =
                (u32_at(head, at), u32_at(head, at + 4), u32_at(head, at + 8))
            else {
                break;
            };
            let name_len = (namesz as usize).div_ceil(4) * 4;
            let desc_len = (descsz as usize).div_ceil(4) * 4;
            if ty == XEN_ELFNOTE_PHYS32_ENTRY && head.get(at + 12..at + 16) == Some(b"Xen\0") {
                return true;
            }
            at = at.saturating_add(12 + name_len + desc_len);
        }
    }
    false
}

/// ELF with a PVH note, plain ELF, or bzImage, from the file's first bytes.
fn kernel_format(kernel: &mut File) -> Result<KernelFormat, ProcessError> {
    let mut head = Vec::with_capacity(MAX_HEADER_SCAN);
    kernel
        .take(MAX_HEADER_SCAN as u64)
        .read_to_end(&mut head)
        .map_err(|source| ProcessError::Open {
            what: "the kernel",
            source,
        })?;
    if head.starts_with(b"\x7fELF") {
        return Ok(if has_pvh_note(&head) {
            KernelFormat::Pvh
        } else {
            KernelFormat::Elf
        });
    }
    if head.get(0x202..0x206) == Some(b"HdrS") {
        return Ok(KernelFormat::BzImage);
    }
    Err(ProcessError::UnknownKernelFormat)
}

/// The guest's MAC address when the spec names none: locally
/// administered, unicast, derived from the instance name, so it is stable
/// across restarts of the VM ([`nitrile_vmm::derived_mac`]).
pub fn guest_mac(instance: &str) -> [u8; 6] {
    nitrile_vmm::derived_mac(instance)
}

fn jail_err(step: &'static str) -> impl FnOnce(std::io::Error) -> ProcessError {
    move |source| ProcessError::Jail { step, source }
}

/// chroot into the working directory, then the jails' one privilege drop
/// ([`nitrile_vmm_sys::privilege`]: no groups, gid, uid, no new
/// privileges; refused unless this process still has one thread).
fn enter_jail(ids: Ids) -> Result<(), ProcessError> {
    privilege::chroot_and_drop(std::path::Path::new("."), ids)?;
    // Changing ids resets dumpability: set it (and the core limit) again.
    harden::harden_process()?;
    Ok(())
}

/// System calls the control thread may make once the VM runs: reading and
/// writing its socket and stderr, allocation, thread synchronisation, exit.
const CONTROL_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_close,
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The control thread's allowlist; anything else kills the process.
pub fn control_filter() -> Result<BpfProgram, HardenError> {
    let rules = CONTROL_SYSCALLS
        .iter()
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

fn exit_kind(r: &Result<ExitReason, crate::VmmError>) -> ExitKind {
    match r {
        Ok(ExitReason::Shutdown { code }) => ExitKind::Shutdown { code: *code },
        Ok(ExitReason::Halted) => ExitKind::Halted,
        Ok(ExitReason::TripleFault) => ExitKind::TripleFault,
        Ok(ExitReason::SystemEvent) => ExitKind::SystemEvent,
        Err(_) => ExitKind::VmmFailed,
    }
}

/// Sets up the VM from the inherited descriptors, jails the process, and
/// serves the control channel until the VM ends. On success it does not
/// return: the process exits (status 0 for a clean end, 1 otherwise).
///
/// Call it once, at the start of the process, with descriptors inherited
/// from the parent: it takes ownership of them.
pub fn run_from_fds(args: ProcessArgs) -> Result<std::convert::Infallible, ProcessError> {
    let ids = Ids::new(args.uid, args.gid).map_err(|_| ProcessError::RootIds)?;
    let spec_fd = take_fd(args.spec_fd)?;
    let control_fd = take_fd(args.control_fd)?;
    let serial_fd = take_fd(args.serial_fd)?;
    let tap_fd = args.tap_fd.map(take_fd).transpose()?;

    let mut spec_bytes = Vec::new();
    File::from(spec_fd)
        .take(MAX_SPEC_LEN as u64 + 1)
        .read_to_end(&mut spec_bytes)
        .map_err(ProcessError::ReadSpec)?;
    let spec = VmSpec::parse_json(&spec_bytes)?;
    if spec.net().is_some() != tap_fd.is_some() {
        return Err(ProcessError::TapMismatch);
    }
    let control = UnixStream::from(control_fd);
    let mut reader = BufReader::new(
        control
            .try_clone()
            .map_err(jail_err("cloning the control socket"))?,
    );
    let mut writer = control;
    // The volume keys, opened here from what the key service sealed to
    // this process; the instance-store key, made here and nowhere else.
    let keys = nitrile_vmm::unlock::receive_keys(&spec, &mut reader, &mut writer)?;
    let scratch_key = spec
        .scratch()
        .map(|_| VolumeKey::generate(&mut rand_core::OsRng))
        .transpose()?;

    let image = spec.image();
    let mut kernel = File::open(image.kernel.as_path()).map_err(|source| ProcessError::Open {
        what: "the kernel",
        source,
    })?;
    let kernel_format = kernel_format(&mut kernel)?;
    let initramfs = File::open(image.initramfs.as_path()).map_err(|source| ProcessError::Open {
        what: "the initramfs",
        source,
    })?;
    let initramfs_len = initramfs
        .metadata()
        .map_err(|source| ProcessError::Open {
            what: "the initramfs",
            source,
        })?
        .len();
    let mut disks = Vec::with_capacity(keys.len() + 1);
    for (vol, key) in spec.volumes().iter().zip(keys) {
        if let Some(seed) = &vol.seed
            && !vol.path.as_path().exists()
        {
            seed_volume(vol.path.as_path(), vol.size_mib, seed.as_path(), &key).map_err(
                |source| ProcessError::Open {
                    what: "a volume's seed",
                    source,
                },
            )?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!vol.read_only)
            .open(vol.path.as_path())
            .map_err(|source| ProcessError::Open {
                what: "a volume",
                source,
            })?;
        disks.push(DiskConfig {
            file,
            encryption: DiskEncryption::Xts(key),
            read_only: vol.read_only,
            id: vol.id.as_str().chars().take(crate::blk::ID_BYTES).collect(),
        });
    }
    if let (Some(scratch), Some(key)) = (spec.scratch(), scratch_key) {
        // Made empty by the backend for this process alone.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(scratch.path.as_path())
            .map_err(|source| ProcessError::Open {
                what: "the instance-store disk",
                source,
            })?;
        disks.push(DiskConfig {
            file,
            encryption: DiskEncryption::Xts(key),
            read_only: false,
            id: SCRATCH_DISK_ID.to_owned(),
        });
    }
    let config = VmConfig {
        memory_bytes: u64::from(spec.memory_mib()) << 20,
        kernel,
        kernel_format,
        cmdline: image.cmdline.as_str().to_owned(),
        serial_out: Box::new(File::from(serial_fd)),
        disks,
        vsock: spec.vsock().map(|v| VsockConfig {
            guest_cid: u64::from(v.guest_cid),
            // Relative to the working directory, which becomes the root.
            uds_path: VSOCK_SOCKET.into(),
        }),
    };
    // An empty initramfs file means none.
    let mut vmm = if initramfs_len > 0 {
        Vmm::with_initramfs(config, initramfs)?
    } else {
        Vmm::new(config)?
    };
    if let Some(tap) = tap_fd {
        vmm.attach_net(NetConfig {
            tap: File::from(tap),
            mac: spec
                .net()
                .and_then(|n| n.mac)
                .unwrap_or_else(|| guest_mac(spec.instance().as_str())),
        })?;
    }

    enter_jail(ids)?;
    let writer = Arc::new(Mutex::new(writer));

    // The vCPU thread: confined first, then waits for Start.
    let (start_tx, start_rx) = mpsc::channel::<()>();
    let (confined_tx, confined_rx) = mpsc::channel::<Result<(), HardenError>>();
    let vcpu_writer = Arc::clone(&writer);
    std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || {
            let confined = harden::confine_vcpu_thread();
            let ok = confined.is_ok();
            let _ = confined_tx.send(confined);
            if !ok || start_rx.recv().is_err() {
                return;
            }
            let result = vmm.run();
            if let Err(e) = &result {
                let _ = writeln!(std::io::stderr(), "vCPU: {e}");
            }
            let reason = exit_kind(&result);
            if let Ok(mut w) = vcpu_writer.lock() {
                let _ = control::write_message(&mut *w, &Event::Exited { reason });
            }
            exit_now(if reason.is_clean() { 0 } else { 1 });
        })
        .map_err(jail_err("spawning the vCPU thread"))?;
    confined_rx.recv().map_err(|_| {
        ProcessError::Harden(HardenError::Dumpable(std::io::Error::other(
            "vCPU thread died",
        )))
    })??;
    seccompiler::apply_filter(&control_filter()?).map_err(HardenError::from)?;

    let send = |event: &Event| -> Result<(), ProcessError> {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        control::write_message(&mut *w, event)?;
        Ok(())
    };
    send(&Event::Ready)?;
    let mut state = RunState::Created;
    loop {
        let request = match control::read_message::<Request>(&mut reader) {
            Ok(r) => r,
            // The backend went away or spoke nonsense: end the VM.
            Err(_) => exit_now(1),
        };
        match request {
            Request::Start => {
                if state == RunState::Created {
                    let _ = start_tx.send(());
                    state = RunState::Running;
                }
            }
            Request::Status => send(&Event::Status { state })?,
            Request::Stop => {
                send(&Event::Exited {
                    reason: ExitKind::Stopped,
                })?;
                exit_now(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal 64-bit ELF header with one `PT_NOTE` segment holding one
    /// note of type `ty` owned by "Xen".
    fn elf_with_note(ty: u32) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"\x7fELF");
        h[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        h[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        h[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        h[64..68].copy_from_slice(&4u32.to_le_bytes());
        h[72..80].copy_from_slice(&200u64.to_le_bytes());
        h[96..104].copy_from_slice(&20u64.to_le_bytes());
        h[200..204].copy_from_slice(&4u32.to_le_bytes());
        h[204..208].copy_from_slice(&4u32.to_le_bytes());
        h[208..212].copy_from_slice(&ty.to_le_bytes());
        h[212..216].copy_from_slice(b"Xen\0");
        h
    }

    fn format_of(bytes: &[u8]) -> Result<KernelFormat, ProcessError> {
        use std::io::Seek;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f.rewind().unwrap();
        kernel_format(&mut f)
    }

    #[test]
    fn elf_kernels_with_a_pvh_note_enter_through_it() {
        assert_eq!(format_of(&elf_with_note(18)).unwrap(), KernelFormat::Pvh);
        assert_eq!(format_of(&elf_with_note(17)).unwrap(), KernelFormat::Elf);
        let mut bz = vec![0u8; 1024];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(format_of(&bz).unwrap(), KernelFormat::BzImage);
        // The test guest boots either way; it is one of the two ELF kinds.
        assert!(matches!(
            format_of(crate::TEST_GUEST_ELF).unwrap(),
            KernelFormat::Elf | KernelFormat::Pvh
        ));
    }

    proptest::proptest! {
        #[test]
        fn format_detection_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let mut elf = b"\x7fELF".to_vec();
            elf.extend_from_slice(&bytes);
            let _ = has_pvh_note(&elf);
            let _ = has_pvh_note(&bytes);
        }
    }

    #[test]
    fn garbage_kernel_is_refused() {
        assert!(matches!(
            format_of(&[0u8; 1024]),
            Err(ProcessError::UnknownKernelFormat)
        ));
    }

    #[test]
    fn bad_fds_are_refused() {
        assert!(matches!(take_fd(1), Err(ProcessError::BadFd(1))));
        assert!(matches!(take_fd(987_654), Err(ProcessError::BadFd(_))));
    }

    const CHILD_ENV: &str = "NITRILE_PROCESS_TEST_CHILD";

    /// Runs this test binary again, only `test`, in child `mode`.
    fn run_child(test: &str, mode: &str) -> std::process::ExitStatus {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, mode)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
    }

    #[test]
    fn a_syscall_outside_the_control_allowlist_kills_the_process() {
        use std::os::unix::process::ExitStatusExt;
        const NAME: &str =
            "process::tests::a_syscall_outside_the_control_allowlist_kills_the_process";
        if let Ok(mode) = std::env::var(CHILD_ENV).as_deref() {
            seccompiler::apply_filter(&control_filter().unwrap()).unwrap();
            // Allowed: writing to a descriptor.
            let _ = std::io::stderr().write_all(b"filtered\n");
            if mode == "forbidden" {
                // socket(AF_INET, ...) is its first system call.
                let _ = std::net::UdpSocket::bind("127.0.0.1:0");
            }
            exit_now(0);
        }
        let killed = run_child(NAME, "forbidden");
        assert_eq!(killed.signal(), Some(libc::SIGSYS), "{killed:?}");
        // Control: the same child without the forbidden call exits normally.
        let allowed = run_child(NAME, "allowed");
        assert_eq!(allowed.code(), Some(0), "{allowed:?}");
    }

    #[test]
    fn guest_macs_are_local_unicast_and_stable() {
        let a = guest_mac("web-1");
        assert_eq!(a, guest_mac("web-1"));
        assert_ne!(a, guest_mac("web-2"));
        assert_eq!(a[0] & 0x03, 0x02, "locally administered unicast");
    }

    #[test]
    fn control_filter_compiles() {
        assert!(!control_filter().unwrap().is_empty());
    }

    #[test]
    fn a_seeded_volume_holds_the_seed_encrypted_and_only_whole() {
        let dir = tempfile::tempdir().unwrap();
        let key = VolumeKey::generate(&mut rand_core::OsRng).unwrap();
        let mut plain = vec![0u8; 2 << 20];
        for (i, chunk) in plain.chunks_mut(4096).enumerate() {
            chunk[..32].copy_from_slice(format!("NITRILE-SEED-{i:019}").as_bytes());
        }
        let seed = dir.path().join("root.img");
        std::fs::write(&seed, &plain).unwrap();
        let disk = dir.path().join("disk.img");
        seed_volume(&disk, 2, &seed, &key).unwrap();
        let mut stored = std::fs::read(&disk).unwrap();
        assert_eq!(stored.len(), plain.len());
        assert!(
            !stored.windows(12).any(|w| w == b"NITRILE-SEED"),
            "plaintext in the volume file"
        );
        // The block device's cipher opens it, sector numbers from 0.
        crate::SectorCipher::new(&key)
            .unwrap()
            .decrypt(&mut stored, 0)
            .unwrap();
        assert_eq!(stored, plain);
        assert!(!dir.path().join("disk.seeding").exists());

        // A seed of another size than the volume: refused, nothing made.
        let other = dir.path().join("other.img");
        seed_volume(&other, 3, &seed, &key).unwrap_err();
        assert!(!other.exists() && !dir.path().join("other.seeding").exists());
    }
}
