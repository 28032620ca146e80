//! The `kvm` backend: one jailed `nitrile vmm` process per VM (our own VMM,
//! crate `nitrile-vmm-kvm`), driven over a tiny typed control channel.
//!
//! # The process protocol
//! The backend spawns `<vmm_binary> vmm --spec-fd N --control-fd C
//! --serial-fd S [--tap-fd T] --uid U --gid G`: only descriptor numbers and
//! the jail's ids are on the command line, the environment is empty.
//! Descriptor `N` is a pipe holding the spec's canonical JSON; `C` one end of
//! a Unix socketpair speaking first the volume-key exchange of
//! [`crate::unlock`] (the VMM offers one recipient public key per volume,
//! [`Hypervisor::create`] returns them, [`Hypervisor::supply_keys`] relays
//! the sealed keys, which the VMM opens into mlocked, zeroizing pages), then
//! [`control`]; `S` the serial console file (`serial.log` in the VM
//! directory, mode 0600, opened here). No key, plaintext or sealed, is on a
//! pipe, the command line or the environment. The working directory is the
//! VM's chroot directory.
//!
//! # Instance store
//! A spec's scratch disk is a raw file the backend makes anew (empty, mode
//! 0600, sized from the spec) before each VMM starts; the VMM encrypts it
//! with AES-256-XTS under a key it generates in a locked page and never
//! sends anywhere, so what it wrote is noise once the process has ended.
//! The backend removes the file whenever it sees the VM end (stop, destroy,
//! a VMM that died, a failed creation).
//!
//! # The jail
//! Before exec (the same code as the QEMU backend, `nitrile_vmm_sys::jail`):
//! `RLIMIT_CORE` 0, not dumpable, the per-VM cgroup (v2, or v1 `memory` and
//! `cpu`) limiting memory to guest memory plus [`VMM_OVERHEAD_MIB`] and CPU to
//! one core per vCPU, new mount, IPC, UTS, network and PID namespaces (the
//! VMM is PID 1 of its PID namespace). The VMM itself then opens `/dev/kvm`,
//! the kernel and the volumes, builds the VM, `chroot`s into its working
//! directory (`root/` in the VM directory, empty but for the vsock socket,
//! owned by the jail uid, mode 0700), drops to the jail uid/gid
//! (`setgroups`, `setresgid`, `setresuid`, `PR_SET_NO_NEW_PRIVS`: the same
//! drop as the QEMU backend's vsock daemon, `nitrile_vmm_sys::privilege`),
//! sets `PR_SET_DUMPABLE` 0 again
//! and installs seccomp allowlists on its control thread and its vCPU thread
//! before any guest code runs. Guest memory is `MADV_DONTDUMP`.
//!
//! # vsock
//! The VMM's vsock socket is `root/vsock.sock` inside the VM directory (it
//! must live inside the chroot); guest connections to host port `P` go to
//! `root/vsock.sock_P`. When the spec names a `uds_path`, the backend puts
//! a symbolic link there to `root/vsock.sock`, removed with the VM.
//!
//! # Network
//! A spec's `net.tap` is opened here (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`,
//! created if missing) in the host's network namespace and passed as
//! `--tap-fd`; the VMM, in its own network namespace, only reads and writes
//! frames on it. Configuring the host side of the tap (bridge, addresses,
//! filtering) is the caller's job.
//!
//! # Linux guests
//! The VMM loads the spec's initramfs, generates ACPI tables whose DSDT
//! declares each virtio-mmio device, and drives one interrupt line per
//! device through KVM's in-kernel irqchip: what Debian's cloud kernel needs
//! to find its devices. Booting Linux this way cannot be tested on a software
//! KVM (`kvm_pvm`) and must be verified on hardware KVM; see `docs/VMM.md`
//! for what is still missing (one vCPU, no power-off path).
//!
//! # Adoption
//! Not supported yet: [`Hypervisor::adopt`] returns
//! [`VmmError::AdoptionUnsupported`] and [`Hypervisor::detach_all`] does
//! nothing. The control channel is a socketpair inherited at spawn, which no
//! later backend process can obtain, and the VMM ends when its end of the
//! channel closes; adoption needs the VMM to accept a reconnection on a Unix
//! socket in its state directory, a change to the `nitrile vmm` process.

pub mod control;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nitrile_vmm_sys::jail::{self, Plan};

use crate::qemu::cgroup::Cgroup;
use crate::qemu::{create_private_file, io_err, tail};
use crate::{
    CreatedVm, DisplayPath, Hypervisor, JailConfig, SealedVolumeKeys, VmId, VmSpec, VmStatus,
    VmmError,
};
use control::{ControlError, Event, Request, RunState};

/// Memory allowed to a `nitrile vmm` process beyond guest memory, in MiB.
pub const VMM_OVERHEAD_MIB: u64 = 64;
/// How long the VMM may take to build and jail the VM.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a reply on the control channel may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

const SERIAL_FILE: &str = "serial.log";
const STDERR_FILE: &str = "vmm.stderr";
const CHROOT_DIR: &str = "root";
/// The vsock socket's name inside the chroot directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";

struct Proc {
    child: Child,
    vmm_pid: Option<u32>,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    cgroup: Option<Cgroup>,
    stderr_path: PathBuf,
    /// Whether the VMM waits for its volumes' sealed keys.
    awaiting_keys: bool,
    state: RunState,
}

struct Vm {
    spec: VmSpec,
    dir: PathBuf,
    vsock_link: Option<PathBuf>,
    proc: Option<Proc>,
    /// Set once the process has gone; `None` means a clean end.
    ended: Option<Option<String>>,
}

impl Vm {
    /// Removes what the VM leaves behind once its process has gone: the
    /// instance-store disk's backing file (its key died with the process).
    fn forget_scratch(&self) {
        if let Some(s) = self.spec.scratch() {
            remove_file_if_present(s.path.as_path());
        }
    }
}

fn remove_file_if_present(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "nitrile-vmm: could not remove {}: {e}",
                path.display()
            );
        }
    }
}

/// The `kvm` backend. See the module documentation for what it guarantees.
pub struct KvmBackend {
    state_dir: PathBuf,
    vmm_binary: PathBuf,
    jail: JailConfig,
    vms: Mutex<BTreeMap<VmId, Vm>>,
}

impl std::fmt::Debug for KvmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmBackend")
            .field("state_dir", &self.state_dir)
            .field("vmm_binary", &self.vmm_binary)
            .field("jail", &self.jail)
            .finish_non_exhaustive()
    }
}

/// A pipe holding `bytes` (at most 1 MiB), write end closed; returns the read end.
fn filled_pipe(bytes: &[u8]) -> Result<OwnedFd, VmmError> {
    let pipe_err = |e: nix::Error| VmmError::Io {
        what: "creating a pipe",
        path: DisplayPath(PathBuf::from("pipe")),
        source: std::io::Error::from_raw_os_error(e as i32),
    };
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(pipe_err)?;
    // Grow the pipe so the whole message fits and the write never blocks.
    let want = bytes.len().next_power_of_two().max(4096);
    let size = i32::try_from(want).unwrap_or(i32::MAX);
    nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size)).map_err(pipe_err)?;
    let mut w = File::from(w);
    w.write_all(bytes)
        .map_err(io_err("writing a pipe", Path::new("pipe")))?;
    drop(w);
    Ok(r)
}

/// Opens (creating it if needed) the tap device of `net`, without packet
/// information headers: in the network namespace the spec names (the
/// host data path's), else in this process's.
pub(crate) fn open_tap(net: &crate::NetSpec) -> Result<File, VmmError> {
    use nitrile_vmm_sys::tap::{self, TapError};
    let name = &net.tap;
    let opened = match &net.netns {
        Some(ns) => tap::open_in(ns.as_path(), name.as_str()),
        None => tap::open(name.as_str()),
    };
    opened.map_err(|e| match e {
        TapError::OpenTun(source) => VmmError::Io {
            what: "opening",
            path: DisplayPath(PathBuf::from(tap::TUN_PATH)),
            source,
        },
        TapError::Namespace { path, source } => VmmError::Io {
            what: "entering the network namespace",
            path: DisplayPath(path),
            source,
        },
        // A `TapName` is always a valid interface name; were it not, the
        // kernel's refusal and this one read alike.
        TapError::Attach(source) => VmmError::Io {
            what: "attaching to tap device",
            path: DisplayPath(PathBuf::from(name.as_str())),
            source,
        },
        other => VmmError::Io {
            what: "attaching to tap device",
            path: DisplayPath(PathBuf::from(name.as_str())),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, other),
        },
    })
}

/// Creates a raw disk file of `size_mib` MiB (sparse, mode 0600); with
/// `fresh`, one already there is replaced.
fn create_disk_file(path: &Path, size_mib: u64, fresh: bool) -> Result<(), VmmError> {
    if fresh {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("replacing", path)(e)),
        }
    } else if path.exists() {
        return Ok(());
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("creating volume", path))?;
    f.set_len(size_mib << 20)
        .map_err(io_err("sizing volume", path))
}

impl KvmBackend {
    /// A backend keeping per-VM state under `state_dir` and running
    /// `vmm_binary` (the `nitrile` executable) with its `vmm` subcommand.
    /// Default jail: [`JailConfig::default`].
    pub fn new(
        state_dir: impl Into<PathBuf>,
        vmm_binary: impl Into<PathBuf>,
    ) -> Result<Self, VmmError> {
        let state_dir = state_dir.into();
        let vmm_binary = vmm_binary.into();
        if !vmm_binary.is_file() {
            return Err(VmmError::BackendUnavailable {
                backend: "kvm",
                reason: crate::Unavailable::NoVmmBinary,
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_dir)
            .map_err(io_err("creating state directory", &state_dir))?;
        Ok(Self {
            state_dir,
            vmm_binary,
            jail: JailConfig::default(),
            vms: Mutex::new(BTreeMap::new()),
        })
    }

    /// Uses `jail` to confine the VMM process.
    pub fn with_jail(mut self, jail: JailConfig) -> Self {
        self.jail = jail;
        self
    }

    /// The state directory of VM `id` (holds `serial.log`).
    pub fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.state_dir.join(id.name().as_str())
    }

    /// The host PID of VM `id`'s VMM process, while it runs.
    pub fn vmm_pid(&self, id: &VmId) -> Option<u32> {
        let vms = self.lock();
        vms.get(id)?.proc.as_ref()?.vmm_pid
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<VmId, Vm>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_volumes(spec: &VmSpec) -> Result<(), VmmError> {
        // A volume with a seed is made by the VMM process itself, which
        // holds its key, from the seed.
        for vol in spec.volumes().iter().filter(|v| v.seed.is_none()) {
            create_disk_file(vol.path.as_path(), vol.size_mib, false)?;
        }
        if let Some(s) = spec.scratch() {
            create_disk_file(s.path.as_path(), s.size_mib, true)?;
        }
        Ok(())
    }

    /// Spawns the VMM and reads its recipient keys, one per volume.
    fn spawn(
        &self,
        spec: &VmSpec,
        dir: &Path,
    ) -> Result<(Proc, Vec<crate::VolumeRecipient>), VmmError> {
        let serial_path = dir.join(SERIAL_FILE);
        let stderr_path = dir.join(STDERR_FILE);
        let serial = create_private_file(&serial_path)?;
        let stderr = create_private_file(&stderr_path)?;
        let root = dir.join(CHROOT_DIR);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&root)
            .map_err(io_err("creating", &root))?;
        std::os::unix::fs::chown(&root, Some(self.jail.uid), Some(self.jail.gid))
            .map_err(io_err("changing the owner of", &root))?;

        let spec_pipe = filled_pipe(&spec.to_json())?;
        let (ours, theirs) =
            UnixStream::pair().map_err(io_err("creating the control socket", dir))?;
        let theirs = OwnedFd::from(theirs);
        // The tap lives in the host's network namespace or the data path's:
        // open it here, before the VMM gets a namespace of its own.
        let tap = spec.net().map(open_tap).transpose()?;

        let mut cmd = Command::new(&self.vmm_binary);
        cmd.arg("vmm")
            .arg("--spec-fd")
            .arg(spec_pipe.as_raw_fd().to_string())
            .arg("--control-fd")
            .arg(theirs.as_raw_fd().to_string())
            .arg("--serial-fd")
            .arg(serial.as_raw_fd().to_string());
        if let Some(tap) = &tap {
            cmd.arg("--tap-fd").arg(tap.as_raw_fd().to_string());
        }
        cmd.arg("--uid")
            .arg(self.jail.uid.to_string())
            .arg("--gid")
            .arg(self.jail.gid.to_string())
            .current_dir(&root)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let cgroup = match &self.jail.cgroup_root {
            None => None,
            Some(cg_root) => Cgroup::create(
                cg_root,
                spec.instance().as_str(),
                (u64::from(spec.memory_mib()) + VMM_OVERHEAD_MIB) << 20,
                u32::from(spec.vcpus()),
            )
            .map_err(io_err("creating the VM cgroup under", cg_root))?,
        };
        let mut inherit = vec![
            spec_pipe.as_raw_fd(),
            theirs.as_raw_fd(),
            serial.as_raw_fd(),
        ];
        inherit.extend(tap.as_ref().map(AsRawFd::as_raw_fd));
        let plan = Plan {
            inherit,
            cgroup_procs: cgroup.as_ref().map(Cgroup::procs).unwrap_or_default(),
            namespaces: self.jail.namespaces,
            user: None,
        };
        jail::install(&mut cmd, plan);
        let spawned = cmd.spawn();
        // Our copies: the child has its own now.
        drop((spec_pipe, theirs, serial, tap));
        let child = match spawned {
            Ok(c) => c,
            Err(source) => {
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                return Err(VmmError::Spawn {
                    program: DisplayPath(self.vmm_binary.clone()),
                    source,
                });
            }
        };
        let vmm_pid = jail::exec_pid(child.id(), self.jail.namespaces);
        let channel = (|| {
            ours.set_read_timeout(Some(READY_TIMEOUT))?;
            let writer = ours.try_clone()?;
            Ok::<_, std::io::Error>((writer, BufReader::new(ours)))
        })();
        let (writer, reader) = match channel {
            Ok(c) => c,
            Err(e) => {
                let mut child = child;
                kill(&mut child, vmm_pid);
                let _ = child.wait();
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                return Err(io_err("setting up the control socket of", dir)(e));
            }
        };
        let mut proc = Proc {
            child,
            vmm_pid,
            writer,
            reader,
            cgroup,
            stderr_path,
            awaiting_keys: !spec.volumes().is_empty(),
            state: RunState::Created,
        };
        match crate::unlock::read_offers(spec, &mut proc.reader) {
            Ok(recipients) => Ok((proc, recipients)),
            Err(e) => Err(setup_failed(&mut proc, e)),
        }
    }
}

/// Waits for the VMM's `Ready` (VM built, process jailed), then sets the
/// reply timeout of the control channel.
fn await_ready(proc: &mut Proc) -> Result<(), ControlError> {
    proc.reader
        .get_ref()
        .set_read_timeout(Some(READY_TIMEOUT))?;
    match control::read_message::<Event>(&mut proc.reader)? {
        Event::Ready => {}
        other => {
            return Err(ControlError::Io(std::io::Error::other(format!(
                "expected ready, got {other:?}"
            ))));
        }
    }
    proc.reader
        .get_ref()
        .set_read_timeout(Some(CONTROL_TIMEOUT))?;
    Ok(())
}

/// Ends a VMM that failed during setup (it closed the channel, spoke out
/// of turn, or took too long) and says why, quoting its stderr when it
/// exited on its own.
fn setup_failed(proc: &mut Proc, e: impl Into<crate::UnlockError>) -> VmmError {
    let e = e.into();
    // A VMM that closed the channel is exiting: let it finish writing why
    // (its stderr) before reaping it.
    let status = match e {
        crate::UnlockError::Control(ControlError::Closed) => {
            wait_exit(&mut proc.child, proc.vmm_pid)
        }
        _ => {
            kill(&mut proc.child, proc.vmm_pid);
            proc.child.wait()
        }
    };
    if let Some(cg) = &proc.cgroup {
        cg.remove();
    }
    match (e, status) {
        (crate::UnlockError::Control(ControlError::Closed), Ok(status)) => VmmError::VmmExited {
            status,
            stderr: tail(&proc.stderr_path),
        },
        (crate::UnlockError::Control(ControlError::Io(io)), _)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            VmmError::Timeout(READY_TIMEOUT)
        }
        (crate::UnlockError::Control(e), _) => VmmError::KvmControl(e),
        (e, _) => VmmError::Unlock(e),
    }
}

/// Waits up to [`CONTROL_TIMEOUT`] for the process to exit, then kills it.
fn wait_exit(child: &mut Child, vmm_pid: Option<u32>) -> std::io::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + CONTROL_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Ok(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                kill(child, vmm_pid);
                return child.wait();
            }
        }
    }
}

fn kill(child: &mut Child, vmm_pid: Option<u32>) {
    if let Some(pid) = vmm_pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
}

/// Ends the process: asks it to stop, then kills it if it lingers. Returns
/// why it ended, `None` when cleanly.
fn end(proc: &mut Proc) -> Option<String> {
    if proc.awaiting_keys {
        // Still in the key exchange, where `Stop` is not a message: closing
        // the channel ends it.
        let _ = proc.writer.shutdown(std::net::Shutdown::Both);
    } else {
        let _ = control::write_message(&mut proc.writer, &Request::Stop);
    }
    let status = wait_exit(&mut proc.child, proc.vmm_pid).ok();
    if let Some(cg) = &proc.cgroup {
        cg.remove();
    }
    match status {
        Some(s) if s.success() => None,
        Some(s) => Some(format!("the VMM exited with {s}")),
        None => Some("the VMM could not be reaped".to_owned()),
    }
}

/// Reads the VM's state from the process, without looking inside the guest.
fn status_of(vm: &mut Vm) -> VmStatus {
    let Some(proc) = vm.proc.as_mut() else {
        return match &vm.ended {
            Some(Some(reason)) => VmStatus::Failed {
                reason: reason.clone(),
            },
            _ => VmStatus::Stopped,
        };
    };
    if proc.awaiting_keys {
        return match proc.child.try_wait() {
            Ok(None) => VmStatus::AwaitingKeys,
            _ => {
                let reason = end(proc).unwrap_or_else(|| "the VMM exited".to_owned());
                vm.ended = Some(Some(format!(
                    "the VMM ended while waiting for its volume keys: {reason}"
                )));
                vm.proc = None;
                vm.forget_scratch();
                status_of(vm)
            }
        };
    }
    // If the VMM has already exited the write fails, but its last event
    // (`Exited`) may still be waiting to be read.
    let _ = control::write_message(&mut proc.writer, &Request::Status);
    let asked = control::read_message::<Event>(&mut proc.reader);
    let exited = match asked {
        Ok(Event::Status { state }) => {
            proc.state = state;
            return match state {
                RunState::Created => VmStatus::Created,
                RunState::Running => VmStatus::Running,
            };
        }
        Ok(Event::Exited { reason }) => Some(reason),
        Ok(Event::Ready) | Err(_) => None,
    };
    // The VM ended (or the channel broke): reap the process.
    let status = wait_exit(&mut proc.child, proc.vmm_pid).ok();
    if let Some(cg) = &proc.cgroup {
        cg.remove();
    }
    vm.ended = Some(match (exited, status) {
        (Some(reason), _) if !reason.is_clean() => Some(format!("the VM ended: {reason:?}")),
        // The VMM exits 0 only after a clean end.
        (_, Some(s)) if s.success() => None,
        (_, Some(s)) => Some(format!("the VMM exited with {s}")),
        (_, None) => Some("the VMM could not be reaped".to_owned()),
    });
    vm.proc = None;
    vm.forget_scratch();
    status_of(vm)
}

impl KvmBackend {
    /// Removes a VM that failed to come up: its process (already ended),
    /// its vsock link, instance-store disk and directory.
    fn discard(&self, spec: &VmSpec, dir: &Path, vsock_link: Option<&Path>) {
        if let Some(link) = vsock_link {
            let _ = fs::remove_file(link);
        }
        if let Some(s) = spec.scratch() {
            remove_file_if_present(s.path.as_path());
        }
        let _ = fs::remove_dir_all(dir);
    }
}

impl Hypervisor for KvmBackend {
    fn create(&self, spec: &VmSpec) -> Result<CreatedVm, VmmError> {
        let id = VmId::new(spec.instance().clone());
        let mut vms = self.lock();
        if vms.contains_key(&id) {
            return Err(VmmError::AlreadyExists(id));
        }
        let dir = self.vm_dir(&id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating VM directory", &dir))?;
        let mut vsock_link = None;
        let result = (|| {
            Self::open_volumes(spec)?;
            if let Some(v) = spec.vsock() {
                let link = v.uds_path.as_path();
                std::os::unix::fs::symlink(dir.join(CHROOT_DIR).join(VSOCK_SOCKET), link)
                    .map_err(io_err("linking the vsock socket at", link))?;
                vsock_link = Some(link.to_path_buf());
            }
            let (mut proc, recipients) = self.spawn(spec, &dir)?;
            if !proc.awaiting_keys {
                // No volume keys to wait for: the VMM builds the VM now.
                if let Err(e) = await_ready(&mut proc) {
                    return Err(setup_failed(&mut proc, e));
                }
            }
            Ok((proc, recipients))
        })();
        match result {
            Ok((proc, recipients)) => {
                vms.insert(
                    id.clone(),
                    Vm {
                        spec: spec.clone(),
                        dir,
                        vsock_link,
                        proc: Some(proc),
                        ended: None,
                    },
                );
                Ok(CreatedVm { id, recipients })
            }
            Err(e) => {
                self.discard(spec, &dir, vsock_link.as_deref());
                Err(e)
            }
        }
    }

    fn supply_keys(&self, id: &VmId, keys: SealedVolumeKeys) -> Result<(), VmmError> {
        let mut vms = self.lock();
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| VmmError::UnknownVm(id.clone()))?;
        let state = status_of(vm);
        if state != VmStatus::AwaitingKeys {
            return Err(VmmError::WrongState {
                vm: id.clone(),
                state,
                op: "supply keys",
            });
        }
        keys.check(&vm.spec)?;
        let Some(proc) = vm.proc.as_mut() else {
            unreachable!("a VM awaiting keys has a process")
        };
        let relayed = crate::unlock::send_sealed(&vm.spec, &keys, &mut proc.writer)
            .map_err(|e| setup_failed(proc, e))
            .and_then(|()| await_ready(proc).map_err(|e| setup_failed(proc, e)));
        // The sealed keys are useless outside the VMM; drop them anyway.
        drop(keys);
        match relayed {
            Ok(()) => {
                proc.awaiting_keys = false;
                Ok(())
            }
            Err(e) => {
                // Forgotten as if its creation had failed.
                if let Some(vm) = vms.remove(id) {
                    self.discard(&vm.spec, &vm.dir, vm.vsock_link.as_deref());
                }
                Err(e)
            }
        }
    }

    fn start(&self, id: &VmId) -> Result<(), VmmError> {
        let mut vms = self.lock();
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| VmmError::UnknownVm(id.clone()))?;
        match vm.proc.as_mut() {
            Some(proc) if proc.awaiting_keys => Err(VmmError::WrongState {
                vm: id.clone(),
                state: VmStatus::AwaitingKeys,
                op: "start",
            }),
            Some(proc) if proc.state == RunState::Running => Ok(()),
            Some(proc) => {
                control::write_message(&mut proc.writer, &Request::Start)?;
                proc.state = RunState::Running;
                Ok(())
            }
            None => Err(VmmError::WrongState {
                vm: id.clone(),
                state: status_of(vm),
                op: "start",
            }),
        }
    }

    fn stop(&self, id: &VmId) -> Result<(), VmmError> {
        let mut vms = self.lock();
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| VmmError::UnknownVm(id.clone()))?;
        if let Some(mut proc) = vm.proc.take() {
            // A stop we asked for is a clean stop.
            let _ = end(&mut proc);
            vm.ended = Some(None);
        }
        vm.forget_scratch();
        Ok(())
    }

    fn status(&self, id: &VmId) -> Result<VmStatus, VmmError> {
        let mut vms = self.lock();
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| VmmError::UnknownVm(id.clone()))?;
        Ok(status_of(vm))
    }

    fn destroy(&self, id: &VmId) -> Result<(), VmmError> {
        let mut vms = self.lock();
        let mut vm = vms
            .remove(id)
            .ok_or_else(|| VmmError::UnknownVm(id.clone()))?;
        if let Some(mut proc) = vm.proc.take() {
            end(&mut proc);
        }
        vm.forget_scratch();
        if let Some(link) = &vm.vsock_link {
            let _ = fs::remove_file(link);
        }
        fs::remove_dir_all(&vm.dir).map_err(io_err("removing VM directory", &vm.dir))
    }

    /// Not supported yet (see the module documentation, "Adoption").
    fn adopt(&self, _spec: &VmSpec) -> Result<VmStatus, VmmError> {
        Err(VmmError::AdoptionUnsupported { backend: "kvm" })
    }

    /// Does nothing: VMs of this backend cannot be adopted, so they are
    /// still stopped when it is dropped.
    fn vms_outlive_agent(&self) -> bool {
        false
    }

    fn detach_all(&self) {}
}

impl Drop for KvmBackend {
    fn drop(&mut self) {
        let vms = self.vms.get_mut().unwrap_or_else(|p| p.into_inner());
        for vm in vms.values_mut() {
            if let Some(mut proc) = vm.proc.take() {
                end(&mut proc);
            }
            vm.forget_scratch();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn filled_pipe_holds_a_whole_spec_sized_message() {
        let msg = vec![b'x'; crate::MAX_SPEC_LEN];
        let r = filled_pipe(&msg).unwrap();
        let mut got = Vec::new();
        File::from(r).read_to_end(&mut got).unwrap();
        assert_eq!(got, msg);
    }

    #[test]
    fn missing_binary_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let err = KvmBackend::new(dir.path().join("state"), dir.path().join("no-nitrile"));
        assert!(matches!(
            err,
            Err(VmmError::BackendUnavailable {
                reason: crate::Unavailable::NoVmmBinary,
                ..
            })
        ));
    }
}
