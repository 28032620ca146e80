//! The `qemu` backend: one jailed QEMU `microvm` process per VM.
//!
//! # What a VM gets
//! `-M microvm` with the spec's ELF (PVH) kernel, initramfs and command line,
//! `-cpu max,-la57`, no legacy 8259 PIC or PIT, KVM or TCG acceleration, the serial port written to
//! `serial.log` in the VM's state directory, and one virtio-blk device per
//! volume, and a vhost-user vsock device when the spec has one. Nothing else:
//! `-nodefaults -no-user-config -nographic`, no monitor (`-monitor none`), no
//! gdbstub, no network device, no reboot (`-no-reboot`). Tap networking is not
//! implemented yet: specs asking for it are refused with
//! [`VmmError::Unsupported`].
//!
//! # vsock
//! There are no vhost kernel modules to rely on, so vsock is served in user
//! space by the rust-vmm `vhost-device-vsock` program
//! ([`QemuBackend::with_vsock_daemon`]), one jailed process per VM, started
//! before QEMU and stopped with it (see the `vsock` module for its jail).
//! Guest memory is then a shared `memfd` (`memory-backend-memfd,share=on`, not
//! dumped) that QEMU hands to the daemon over the vhost-user socket; QEMU's
//! `vhost-user-vsock-device` connects to that socket before it chroots. Host
//! programs reach the guest Firecracker-style: connect to the spec's
//! `uds_path` and write `CONNECT <port>\n`; guest connections to port `P` go
//! to a host listener at `<uds_path>_<P>`, which must be connectable by the
//! jail uid (whose write access to the directory of `uds_path` is required).
//!
//! # Volumes and their keys
//! Volumes are qcow2 files with LUKS encryption. The backend never holds a
//! volume key: it spawns the launcher ([`launch`], `nitrile qemu-launch`) in
//! QEMU's place and jail, which makes one recipient key pair per volume and
//! offers the public halves ([`crate::unlock`]); [`Hypervisor::create`]
//! returns them, and [`Hypervisor::supply_keys`] relays the volumes' sealed
//! keys back to it. The launcher opens them into locked pages, creates
//! missing volumes with `qemu-img`, turns each 64-byte
//! [`VolumeKey`](crate::VolumeKey) into a LUKS passphrase (its standard
//! base64 text, 88 ASCII bytes; QEMU requires LUKS passphrases to be UTF-8,
//! so raw key bytes cannot be used) in a pipe of its own, and execs QEMU,
//! which reads each from a `secret` object with `file=/dev/fd/N`. The key is
//! never in a file, on the command line or in the environment, and never in
//! the backend's process. The LUKS volume master key is random, made by
//! `qemu-img` and stored wrapped under the passphrase; since the passphrase
//! has 512 bits of entropy, the PBKDF iteration time is set low
//! (`encrypt.iter-time`) so that opening a volume is fast.
//!
//! # Instance store
//! A spec's scratch disk is made anew by the launcher for every QEMU, as a
//! LUKS qcow2 file under a key the launcher generates and hands only to
//! QEMU: once QEMU has gone no key of it exists anywhere. The backend
//! removes the file whenever it sees the VM end (stop, destroy, a QEMU that
//! died, a failed launch, the adoption of a VM found dead).
//!
//! # Control
//! QMP listens on a Unix socket in the VM's state directory (mode 0700, owned
//! by root). The backend sends only `query-status`, `cont`, `stop` and `quit`
//! (a closed command set). The console file is never read here.
//!
//! # Adoption
//! VMs outlive the backend that created them when it was told to
//! ([`Hypervisor::detach_all`]), and a later backend on the same state
//! directory takes one over with [`Hypervisor::adopt`]. What makes this
//! possible and safe:
//! - Before `create` returns, [`RECORD_FILE`] (`vmm.json`) in the VM's
//!   state directory records, for each process of the VM, its pid and its
//!   start time (field 22 of `/proc/<pid>/stat`): the process the backend
//!   spawned (with namespaces, the waiting parent outside QEMU's PID
//!   namespace, which exits with QEMU's status), QEMU itself, and the vsock
//!   daemon and its waiting parent. It is written atomically (temporary file
//!   with mode 0600, fsync, rename, fsync of the directory) and read back
//!   strictly (unknown fields refused, at most [`MAX_RECORD_LEN`](crate::MAX_RECORD_LEN) bytes).
//! - A successor identifies each process by pid *and* start time, so a pid
//!   the kernel recycled for another process is never adopted and never
//!   signalled. From then on it holds each process through a pidfd: exit is
//!   detected by polling it, signals go through `pidfd_send_signal`.
//! - It reconnects to QEMU over the QMP socket in the VM directory (QEMU
//!   serves a new client once the previous connection has closed), and
//!   leaves the vsock daemon serving the guest untouched.
//! - If QEMU is gone (or there is no record: the earlier backend died
//!   between starting QEMU and recording it), the successor kills what is
//!   left of the VM (the recorded vsock daemon, and every process still in
//!   the VM's cgroup), removes its host socket, cgroup and state directory
//!   (volumes stay) and reports `Stopped`, or `Failed` with the last lines QEMU
//!   itself wrote on its standard error (`qemu.stderr`) that are not
//!   warnings. The VM stays known as ended until `destroy`.
//! - VMMs never depend on their spawner: each jailed process calls `setsid`
//!   before exec (a terminal's Ctrl-C or hang-up does not reach it), no
//!   process is tied to the backend by `PR_SET_PDEATHSIG` (QEMU and the
//!   vsock daemon are tied only to their own waiting parents), and with a cgroup root they live in the
//!   VM's cgroup rather than the caller's. An adopted process is not our
//!   child: its parent (init or a subreaper) reaps it, and its exit status
//!   is not known to us.
//!
//! # The jail, and what is not jailed yet
//! In order of application:
//! 1. `RLIMIT_CORE` is 0 (survives exec), and the process is non-dumpable:
//!    `PR_SET_DUMPABLE=0` before exec, and after exec QEMU's own switch to the
//!    unprivileged uid (`-run-with user=`) resets "dumpable" to
//!    `fs.suid_dumpable` (0 by default), so `/proc/<qemu>/mem` stays owned by
//!    root. Guest memory is excluded from core dumps (`dump-guest-core=off`).
//! 2. Unprivileged uid/gid ([`JailConfig::uid`], default 65534) and a chroot
//!    into an empty directory (`root/` in the VM's state directory, mode
//!    0555): the launcher, then QEMU (the same process after exec), open the
//!    kernel, initramfs, volumes, key pipes, serial file and QMP socket as
//!    root, then `-run-with chroot=...,user=...` switches root and uid before
//!    the guest runs. QEMU's seccomp filter is on
//!    (`-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny`), but with
//!    `elevateprivileges=allow`: QEMU installs its filter before its own uid
//!    switch, which `deny` would kill; after the switch to a non-root uid the
//!    process has no capabilities left to regain root.
//! 3. New mount (propagation private), IPC, UTS, network (no interfaces but a
//!    down loopback) and PID namespaces; QEMU is PID 1 of its namespace,
//!    under a small waiting parent that exits with QEMU's status.
//! 4. A per-VM cgroup (`nitrile/<instance>`; v2, or the v1 `memory` and `cpu`
//!    hierarchies on hybrid hosts) limiting memory to guest memory plus
//!    [`QEMU_OVERHEAD_MIB`] and CPU to one core per vCPU.
//!
//! Not jailed yet: no seccomp allowlist of our own beyond QEMU's `-sandbox`
//! denylist (and that one allows set*uid, see above); the mount namespace is
//! a private copy of the host's (the chroot, not an unmount, hides it); one
//! shared uid for all VMs by default (give each VM its own uid through
//! [`JailConfig`] to separate VMs from each other); the launcher and QEMU
//! run as root until its devices are open; `qemu-img` (volume creation, run
//! by the launcher inside the jail) gets in addition only `RLIMIT_CORE=0`
//! and `PR_SET_DUMPABLE=0`.

pub(crate) mod cgroup;
pub mod launch;
mod qmp;
mod vsock;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

pub use qmp::{MAX_QMP_LINE, QmpError};

use crate::process::{self, Exit, ProcRecord, Tracked};
use crate::{
    Accel, CreatedVm, DisplayPath, Hypervisor, SealedVolumeKeys, VmId, VmSpec, VmStatus, VmmError,
    VolumeRecipient,
};
use cgroup::Cgroup;
use nitrile_vmm_sys::jail::{self, Plan};
use qmp::{Command as QmpCommand, Qmp, RunState};

/// Memory allowed to a QEMU process beyond guest memory, in MiB.
pub const QEMU_OVERHEAD_MIB: u64 = 384;
/// How long QEMU may take to open its control socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a graceful `quit` may take before the process is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// PBKDF iteration time for new LUKS volumes, in milliseconds (see module docs).
pub const LUKS_ITER_TIME_MS: u32 = 10;

const SERIAL_FILE: &str = "serial.log";
const STDERR_FILE: &str = "qemu.stderr";
const QMP_SOCKET: &str = "qmp.sock";
const CHROOT_DIR: &str = "root";
/// The adoption record in a VM's state directory (see the module docs).
pub const RECORD_FILE: &str = "vmm.json";
pub(crate) const MAX_STDERR_TAIL: usize = 2048;

/// How the QEMU process is confined.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// The uid QEMU switches to before the guest runs.
    pub uid: u32,
    /// The gid QEMU switches to before the guest runs.
    pub gid: u32,
    /// Whether to use new mount, IPC, UTS, network and PID namespaces.
    pub namespaces: bool,
    /// The cgroup filesystem root, or `None` for no per-VM cgroup.
    pub cgroup_root: Option<PathBuf>,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            uid: 65534,
            gid: 65534,
            namespaces: true,
            cgroup_root: Some(PathBuf::from("/sys/fs/cgroup")),
        }
    }
}

struct Proc {
    /// The process we spawned (or adopted): QEMU itself, or with namespaces
    /// the waiting parent that exits with QEMU's status.
    spawned: Tracked,
    /// QEMU itself, when its pid is known.
    qemu: Option<Tracked>,
    qmp: Qmp,
    cgroup: Option<Cgroup>,
    vsock: Option<vsock::Daemon>,
}

/// What a successor backend needs to adopt a VM, kept in [`RECORD_FILE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmmRecord {
    /// The process the backend spawned.
    spawned: ProcRecord,
    /// QEMU itself (the same process without namespaces).
    qemu: Option<ProcRecord>,
    /// The vsock daemon, if the VM has one.
    vsock: Option<vsock::DaemonRecord>,
}

impl Proc {
    fn record(&self) -> VmmRecord {
        VmmRecord {
            spawned: self.spawned.record(),
            qemu: self.qemu.as_ref().map(Tracked::record),
            vsock: self.vsock.as_ref().map(vsock::Daemon::record),
        }
    }
}

/// A launcher waiting for its volumes' sealed keys (QEMU does not exist
/// yet).
struct Launching {
    /// The process we spawned: the launcher, or with namespaces its
    /// waiting parent.
    child: Child,
    /// The launcher itself, which becomes QEMU.
    launcher_pid: Option<u32>,
    /// Our end of the key exchange.
    control: UnixStream,
    cgroup: Option<Cgroup>,
    vsock: Option<vsock::Daemon>,
}

impl Launching {
    /// Kills the launcher and what was made for it; returns its exit status
    /// when it was reaped.
    fn abort(&mut self) -> Option<std::process::ExitStatus> {
        let _ = self.control.shutdown(std::net::Shutdown::Both);
        // Give a launcher that is ending on its own a moment to say why.
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut status = None;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                status = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if status.is_none() {
            kill_pid(self.launcher_pid);
            let _ = self.child.kill();
            status = self.child.wait().ok();
        }
        if let Some(d) = self.vsock.as_mut() {
            d.stop();
        }
        if let Some(cg) = &self.cgroup {
            cg.remove();
        }
        status
    }
}

fn kill_pid(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

struct Vm {
    spec: VmSpec,
    dir: PathBuf,
    launching: Option<Launching>,
    proc: Option<Proc>,
    /// Set once the process has gone; `None` reason means a clean stop.
    ended: Option<Option<String>>,
}

impl Vm {
    /// Removes the instance-store disk once QEMU has gone (its key went
    /// with it).
    fn forget_scratch(&self) {
        if let Some(s) = self.spec.scratch() {
            remove_scratch(s.path.as_path());
        }
    }
}

fn remove_scratch(path: &Path) {
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

/// The QEMU backend. See the module documentation for what it guarantees.
pub struct QemuBackend {
    state_dir: PathBuf,
    qemu: PathBuf,
    qemu_img: PathBuf,
    launcher: PathBuf,
    accel: Accel,
    jail: JailConfig,
    vsock_daemon: Option<PathBuf>,
    vms: Mutex<BTreeMap<VmId, Vm>>,
    /// Set by [`Hypervisor::detach_all`]: leave VMs running on drop.
    detached: AtomicBool,
}

impl std::fmt::Debug for QemuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuBackend")
            .field("state_dir", &self.state_dir)
            .field("qemu", &self.qemu)
            .field("launcher", &self.launcher)
            .field("accel", &self.accel)
            .field("jail", &self.jail)
            .field("vsock_daemon", &self.vsock_daemon)
            .finish_non_exhaustive()
    }
}

pub(crate) fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VmmError {
    let path = DisplayPath(path.to_path_buf());
    move |source| VmmError::Io { what, path, source }
}

/// Escapes a value for QEMU's `key=value,...` option syntax.
pub(crate) fn opt(s: &Path) -> String {
    s.to_string_lossy().replace(',', ",,")
}

pub(crate) fn tail(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = File::open(path) {
        let _ = f.take(1 << 20).read_to_end(&mut buf);
    }
    let start = buf.len().saturating_sub(MAX_STDERR_TAIL);
    String::from_utf8_lossy(&buf[start..]).trim().to_owned()
}

/// A pipe holding `bytes` (at most 1 MiB), write end closed; returns the
/// read end.
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

pub(crate) fn create_private_file(path: &Path) -> Result<File, VmmError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("creating", path))
}

impl QemuBackend {
    /// A backend keeping per-VM state (serial log, QMP socket, QEMU's
    /// stderr) under `state_dir` and running `qemu_binary`, started by
    /// `launcher` (the `nitrile` executable, run as `nitrile qemu-launch`,
    /// see [`launch`]); `qemu-img` is looked up next to QEMU. Defaults: TCG,
    /// [`JailConfig::default`].
    pub fn new(
        state_dir: impl Into<PathBuf>,
        qemu_binary: impl Into<PathBuf>,
        launcher: impl Into<PathBuf>,
    ) -> Result<Self, VmmError> {
        let state_dir = state_dir.into();
        let qemu = qemu_binary.into();
        let launcher = launcher.into();
        let qemu_img = qemu.with_file_name("qemu-img");
        for p in [&qemu, &qemu_img] {
            if !p.is_file() {
                return Err(VmmError::BackendUnavailable {
                    backend: "qemu",
                    reason: crate::Unavailable::NoQemu,
                });
            }
        }
        if !launcher.is_file() {
            return Err(VmmError::BackendUnavailable {
                backend: "qemu",
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
            qemu,
            qemu_img,
            launcher,
            accel: Accel::Tcg,
            jail: JailConfig::default(),
            vsock_daemon: None,
            vms: Mutex::new(BTreeMap::new()),
            detached: AtomicBool::new(false),
        })
    }

    /// Uses `accel` (from [`select`](crate::select)).
    pub fn with_accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// Uses `jail` to confine QEMU.
    pub fn with_jail(mut self, jail: JailConfig) -> Self {
        self.jail = jail;
        self
    }

    /// Serves vsock devices with `binary`, the rust-vmm `vhost-device-vsock`
    /// program (without it, specs with a vsock device fail to start).
    pub fn with_vsock_daemon(mut self, binary: impl Into<PathBuf>) -> Self {
        self.vsock_daemon = Some(binary.into());
        self
    }

    /// The state directory of VM `id` (holds `serial.log`; tests read it).
    pub fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.state_dir.join(id.name().as_str())
    }

    /// The host PID of VM `id`'s QEMU process, while it runs.
    pub fn qemu_pid(&self, id: &VmId) -> Option<u32> {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms.get(id)?.proc.as_ref()?.qemu.as_ref().map(Tracked::pid)
    }

    /// The host PID of VM `id`'s vsock daemon, while it runs.
    pub fn vsock_daemon_pid(&self, id: &VmId) -> Option<u32> {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms.get(id)?.proc.as_ref()?.vsock.as_ref()?.pid()
    }

    /// Starts the vsock daemon (if any) and the launcher in QEMU's jail and
    /// reads the launcher's recipient keys, one per volume.
    fn launch(
        &self,
        spec: &VmSpec,
        dir: &Path,
    ) -> Result<(Launching, Vec<VolumeRecipient>), VmmError> {
        let cgroup = match &self.jail.cgroup_root {
            None => None,
            Some(root) => Cgroup::create(
                root,
                spec.instance().as_str(),
                (u64::from(spec.memory_mib()) + QEMU_OVERHEAD_MIB) << 20,
                u32::from(spec.vcpus()),
            )
            .map_err(io_err("creating the VM cgroup under", root))?,
        };
        let remove_cgroup = |cgroup: &Option<Cgroup>| {
            if let Some(cg) = cgroup {
                cg.remove();
            }
        };
        // The vsock daemon first: QEMU connects to its socket at start.
        let mut daemon = match spec.vsock() {
            None => None,
            Some(v) => match self.start_vsock(v, dir, cgroup.as_ref()) {
                Ok(d) => Some(d),
                Err(e) => {
                    remove_cgroup(&cgroup);
                    return Err(e);
                }
            },
        };
        let spawned = self.spawn_launcher(spec, dir, cgroup.as_ref(), daemon.as_ref());
        let (child, launcher_pid, control) = match spawned {
            Ok(s) => s,
            Err(e) => {
                if let Some(d) = daemon.as_mut() {
                    d.stop();
                }
                remove_cgroup(&cgroup);
                return Err(e);
            }
        };
        let mut launching = Launching {
            child,
            launcher_pid,
            control,
            cgroup,
            vsock: daemon,
        };
        let offers = launching
            .control
            .set_read_timeout(Some(READY_TIMEOUT))
            .and_then(|()| launching.control.try_clone())
            .map_err(crate::control::ControlError::Io)
            .map_err(crate::UnlockError::from)
            .and_then(|c| crate::unlock::read_offers(spec, &mut BufReader::new(c)));
        match offers {
            Ok(recipients) => Ok((launching, recipients)),
            Err(e) => Err(launch_failed(&mut launching, e, dir)),
        }
    }

    fn start_vsock(
        &self,
        spec: &crate::VsockSpec,
        dir: &Path,
        cgroup: Option<&Cgroup>,
    ) -> Result<vsock::Daemon, VmmError> {
        let Some(bin) = &self.vsock_daemon else {
            return Err(VmmError::Spawn {
                program: DisplayPath(PathBuf::from("vhost-device-vsock")),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no vsock daemon is configured for the qemu backend",
                ),
            });
        };
        vsock::Daemon::spawn(bin, dir, spec, &self.jail, cgroup, READY_TIMEOUT)
    }

    /// QEMU's arguments but for its disks (the launcher adds those).
    fn qemu_args(
        &self,
        spec: &VmSpec,
        dir: &Path,
        daemon: Option<&vsock::Daemon>,
        tap_fd: Option<i32>,
    ) -> Vec<String> {
        let serial = dir.join(SERIAL_FILE);
        let qmp_path = dir.join(QMP_SOCKET);
        let root = dir.join(CHROOT_DIR);
        let image = spec.image();
        // No 8259 PIC and no PIT: the guest routes interrupts through the
        // IOAPIC and uses its local APIC timer. With the PIC present, which
        // the guest kernel neither uses nor programs, about one Linux boot
        // in three under TCG took an interrupt at vector 0 the moment
        // start_kernel enabled interrupts, an "Oops: divide error"
        // (docs/VMM.md). vhost-user devices need guest memory the daemon
        // can map.
        let machine = if daemon.is_some() {
            "microvm,pic=off,pit=off,dump-guest-core=off,mem-merge=off,memory-backend=mem"
        } else {
            "microvm,pic=off,pit=off,dump-guest-core=off,mem-merge=off"
        };
        let mut args: Vec<String> = [
            "-M",
            machine,
            "-accel",
            self.accel.qemu_arg(),
            "-cpu",
            "max,-la57",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend([
            "-smp".to_owned(),
            spec.vcpus().to_string(),
            "-m".to_owned(),
            format!("{}M", spec.memory_mib()),
        ]);
        args.extend(
            ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]
                .iter()
                .map(|s| (*s).to_owned()),
        );
        args.extend([
            "-monitor".to_owned(),
            "none".to_owned(),
            "-chardev".to_owned(),
            format!("file,id=ser0,path={}", opt(&serial)),
            "-serial".to_owned(),
            "chardev:ser0".to_owned(),
            "-chardev".to_owned(),
            format!("socket,id=qmp0,path={},server=on,wait=off", opt(&qmp_path)),
            "-mon".to_owned(),
            "chardev=qmp0,mode=control".to_owned(),
            "-kernel".to_owned(),
            image.kernel.as_path().to_string_lossy().into_owned(),
            "-initrd".to_owned(),
            image.initramfs.as_path().to_string_lossy().into_owned(),
            "-append".to_owned(),
            image.cmdline.as_str().to_owned(),
        ]);
        if let Some(d) = daemon {
            args.extend([
                "-object".to_owned(),
                format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on,dump=off,merge=off",
                    spec.memory_mib()
                ),
                "-chardev".to_owned(),
                format!("socket,id=vsock0,path={}", opt(d.socket())),
                "-device".to_owned(),
                "vhost-user-vsock-device,chardev=vsock0".to_owned(),
            ]);
        }
        if let (Some(net), Some(fd)) = (spec.net(), tap_fd) {
            // The tap's descriptor, opened by the backend in the data
            // path's namespace and inherited through the launcher: QEMU
            // opens no device and has no network namespace to open one in.
            let mac = net
                .mac
                .unwrap_or_else(|| crate::derived_mac(spec.instance().as_str()));
            let mac = mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            args.extend([
                "-netdev".to_owned(),
                format!("tap,id=net0,fd={fd},vhost=off"),
                "-device".to_owned(),
                format!("virtio-net-device,netdev=net0,mac={mac}"),
            ]);
        }
        args.extend([
            "-sandbox".to_owned(),
            "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny".to_owned(),
            "-run-with".to_owned(),
            format!(
                "chroot={},user={}:{}",
                opt(&root),
                self.jail.uid,
                self.jail.gid
            ),
            "-S".to_owned(),
        ]);
        args
    }

    /// Spawns the launcher (in `cgroup`, which the caller removes on
    /// failure): returns the spawned process, the launcher's pid and our
    /// end of its control channel.
    fn spawn_launcher(
        &self,
        spec: &VmSpec,
        dir: &Path,
        cgroup: Option<&Cgroup>,
        daemon: Option<&vsock::Daemon>,
    ) -> Result<(Child, Option<u32>, UnixStream), VmmError> {
        let serial = dir.join(SERIAL_FILE);
        let stderr_path = dir.join(STDERR_FILE);
        create_private_file(&serial)?;
        let stderr = create_private_file(&stderr_path)?;
        // An empty directory QEMU chroots into once it has opened everything.
        let root = dir.join(CHROOT_DIR);
        fs::DirBuilder::new()
            .mode(0o555)
            .create(&root)
            .map_err(io_err("creating", &root))?;
        let tap = spec.net().map(crate::kvm::open_tap).transpose()?;
        let plan = launch::LaunchPlan {
            qemu: self.qemu.clone(),
            qemu_img: self.qemu_img.clone(),
            args: self.qemu_args(spec, dir, daemon, tap.as_ref().map(|t| t.as_raw_fd())),
            spec: String::from_utf8_lossy(&spec.to_json()).into_owned(),
        };
        let plan = serde_json::to_vec(&plan)
            .unwrap_or_else(|_| unreachable!("strings and paths from strings serialize"));
        let plan_pipe = filled_pipe(&plan)?;
        let (ours, theirs) =
            UnixStream::pair().map_err(io_err("creating the control socket", dir))?;
        let theirs = OwnedFd::from(theirs);

        let mut cmd = Command::new(&self.launcher);
        cmd.arg("qemu-launch")
            .arg("--plan-fd")
            .arg(plan_pipe.as_raw_fd().to_string())
            .arg("--control-fd")
            .arg(theirs.as_raw_fd().to_string())
            .current_dir(dir)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let mut inherit = vec![plan_pipe.as_raw_fd(), theirs.as_raw_fd()];
        inherit.extend(tap.as_ref().map(|t| t.as_raw_fd()));
        let plan = Plan {
            inherit,
            cgroup_procs: cgroup.map(Cgroup::procs).unwrap_or_default(),
            namespaces: self.jail.namespaces,
            user: None,
        };
        jail::install(&mut cmd, plan);
        let spawned = cmd.spawn();
        drop((plan_pipe, theirs, tap));
        let child = spawned.map_err(|source| VmmError::Spawn {
            program: DisplayPath(self.launcher.clone()),
            source,
        })?;
        let launcher_pid = jail::exec_pid(child.id(), self.jail.namespaces);
        Ok((child, launcher_pid, ours))
    }

    /// Lets the launcher exec QEMU (it has its keys, or needs none) and
    /// waits for QEMU's control socket.
    fn finish_launch(&self, launching: Launching, dir: &Path) -> Result<Proc, VmmError> {
        // The exchange is over: the launcher reads nothing more from us.
        let _ = launching.control.shutdown(std::net::Shutdown::Both);
        let Launching {
            child,
            launcher_pid,
            cgroup,
            mut vsock,
            ..
        } = launching;
        match wait_for_qmp(child, launcher_pid, dir) {
            Ok((spawned, qemu, qmp)) => Ok(Proc {
                spawned,
                qemu,
                qmp,
                cgroup,
                vsock,
            }),
            Err(e) => {
                if let Some(d) = vsock.as_mut() {
                    d.stop();
                }
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                Err(e)
            }
        }
    }

    /// Finishes the launch and writes the adoption record.
    fn finish_and_record(&self, launching: Launching, dir: &Path) -> Result<Proc, VmmError> {
        let mut proc = self.finish_launch(launching, dir)?;
        // Before returning: a successor must find every VM we report.
        let path = dir.join(RECORD_FILE);
        if let Err(e) = process::write_record(&path, &proc.record()) {
            Self::end(&mut proc, dir);
            return Err(io_err("writing", &path)(e));
        }
        Ok(proc)
    }

    /// Ends the process: `quit`, then `SIGKILL` after [`STOP_TIMEOUT`];
    /// waits until QEMU is gone, stops the vsock daemon, removes the
    /// cgroup. Returns why QEMU ended, `None` when cleanly.
    fn end(proc: &mut Proc, dir: &Path) -> Option<String> {
        let _ = proc.qmp.execute(QmpCommand::Quit);
        let exit = match proc.spawned.wait_until(Instant::now() + STOP_TIMEOUT) {
            Some(exit) => Some(exit),
            None => {
                // Still alive past the deadline: kill QEMU (PID 1 of its
                // namespace, which takes the namespace down) and its parent.
                if let Some(q) = &proc.qemu {
                    q.signal(Signal::SIGKILL);
                }
                proc.spawned.signal(Signal::SIGKILL);
                proc.spawned.wait().ok()
            }
        };
        if let Some(q) = proc.qemu.as_mut() {
            let _ = q.wait_until(Instant::now() + STOP_TIMEOUT);
        }
        if let Some(d) = proc.vsock.as_mut() {
            d.stop();
        }
        if let Some(cg) = &proc.cgroup {
            cg.remove();
        }
        exit_reason(exit, dir)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<VmId, Vm>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Hypervisor for QemuBackend {
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
        let result = (|| {
            let (launching, recipients) = self.launch(spec, &dir)?;
            if !recipients.is_empty() {
                return Ok((Some(launching), None, recipients));
            }
            // No volume keys to wait for: QEMU starts now.
            let proc = self.finish_and_record(launching, &dir)?;
            Ok((None, Some(proc), recipients))
        })();
        match result {
            Ok((launching, proc, recipients)) => {
                vms.insert(
                    id.clone(),
                    Vm {
                        spec: spec.clone(),
                        dir,
                        launching,
                        proc,
                        ended: None,
                    },
                );
                Ok(CreatedVm { id, recipients })
            }
            Err(e) => {
                if let Some(s) = spec.scratch() {
                    remove_scratch(s.path.as_path());
                }
                let _ = fs::remove_dir_all(&dir);
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
        let Some(mut launching) = vm.launching.take() else {
            unreachable!("a VM awaiting keys has a launcher")
        };
        let result = match crate::unlock::send_sealed(&vm.spec, &keys, &mut launching.control) {
            Ok(()) => self.finish_and_record(launching, &vm.dir),
            Err(e) => Err(launch_failed(&mut launching, e, &vm.dir)),
        };
        drop(keys);
        match result {
            Ok(proc) => {
                vm.proc = Some(proc);
                Ok(())
            }
            Err(e) => {
                // Forgotten as if its creation had failed.
                if let Some(vm) = vms.remove(id) {
                    vm.forget_scratch();
                    let _ = fs::remove_dir_all(&vm.dir);
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
        let state = status_of(vm);
        match (&state, vm.proc.as_mut()) {
            (VmStatus::Running, _) => Ok(()),
            (VmStatus::Created, Some(proc)) => {
                proc.qmp.execute(QmpCommand::Cont)?;
                Ok(())
            }
            _ => Err(VmmError::WrongState {
                vm: id.clone(),
                state,
                op: "start",
            }),
        }
    }

    fn stop(&self, id: &VmId) -> Result<(), VmmError> {
        let mut vms = self.lock();
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| VmmError::UnknownVm(id.clone()))?;
        if let Some(mut launching) = vm.launching.take() {
            launching.abort();
            vm.ended = Some(None);
        }
        if let Some(mut proc) = vm.proc.take() {
            let _ = proc.qmp.execute(QmpCommand::Stop);
            // A stop we asked for is a clean stop.
            let _ = Self::end(&mut proc, &vm.dir);
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
        if let Some(mut launching) = vm.launching.take() {
            launching.abort();
        }
        if let Some(mut proc) = vm.proc.take() {
            Self::end(&mut proc, &vm.dir);
        }
        vm.forget_scratch();
        remove_vm_dir(&vm.dir)
    }

    fn adopt(&self, spec: &VmSpec) -> Result<VmStatus, VmmError> {
        let id = VmId::new(spec.instance().clone());
        let mut vms = self.lock();
        if vms.contains_key(&id) {
            return Err(VmmError::AlreadyExists(id));
        }
        let dir = self.vm_dir(&id);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(VmmError::UnknownVm(id)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VmmError::UnknownVm(id));
            }
            Err(e) => return Err(io_err("reading", &dir)(e)),
        }
        let path = dir.join(RECORD_FILE);
        // No record: the earlier backend died between starting QEMU and
        // recording it (its QEMU cannot be identified) or while cleaning up.
        let record: Option<VmmRecord> =
            process::read_record(&path).map_err(|source| VmmError::Record {
                path: DisplayPath(path.clone()),
                source,
            })?;
        let cgroup = self
            .jail
            .cgroup_root
            .as_deref()
            .and_then(|root| Cgroup::existing(root, spec.instance().as_str()));
        let uds = spec.vsock().map(|v| v.uds_path.as_path().to_path_buf());
        let mut spawned = record.and_then(|r| Tracked::adopt(r.spawned));
        let mut qemu = record.and_then(|r| r.qemu).and_then(Tracked::adopt);
        let mut daemon = record
            .and_then(|r| r.vsock)
            .and_then(|r| vsock::Daemon::adopt(r, &dir, uds.clone()));
        // QEMU itself decides: its waiting parent may outlive it briefly.
        let qemu_recorded = record.is_some_and(|r| r.qemu.is_some());
        if let Some(mut s) = spawned.take() {
            if !qemu_recorded || qemu.is_some() {
                match Qmp::connect(&dir.join(QMP_SOCKET), READY_TIMEOUT) {
                    Ok(qmp) => {
                        let mut vm = Vm {
                            spec: spec.clone(),
                            dir,
                            launching: None,
                            proc: Some(Proc {
                                spawned: s,
                                qemu,
                                qmp,
                                cgroup,
                                vsock: daemon,
                            }),
                            ended: None,
                        };
                        let status = status_of(&mut vm);
                        vms.insert(id, vm);
                        return Ok(status);
                    }
                    // Refused because QEMU is ending right now: it is gone.
                    Err(e) => {
                        let watched = qemu.as_mut().unwrap_or(&mut s);
                        if watched
                            .wait_until(Instant::now() + Duration::from_secs(1))
                            .is_none()
                        {
                            return Err(e.into());
                        }
                    }
                }
            }
            spawned = Some(s);
        }
        // QEMU is gone: clean up what it left, as destroy would. Its waiting
        // parent follows it out.
        if let Some(s) = spawned.as_mut()
            && s.wait_until(Instant::now() + STOP_TIMEOUT).is_none()
        {
            s.signal(Signal::SIGKILL);
            let _ = s.wait_until(Instant::now() + STOP_TIMEOUT);
        }
        if let Some(q) = qemu.as_mut() {
            q.signal(Signal::SIGKILL);
            let _ = q.wait_until(Instant::now() + STOP_TIMEOUT);
        }
        if let Some(d) = daemon.as_mut() {
            d.stop();
        }
        if let Some(u) = &uds {
            vsock::remove_socket(u);
        }
        if let Some(cg) = &cgroup {
            // Whatever still runs in the VM's cgroup belongs to the dead VM
            // (e.g. a QEMU started by a backend that died before recording it).
            cg.kill_all(STOP_TIMEOUT);
            cg.remove();
        }
        let reason = stderr_reason(&dir.join(STDERR_FILE));
        if let Some(s) = spec.scratch() {
            remove_scratch(s.path.as_path());
        }
        remove_vm_dir(&dir)?;
        let mut vm = Vm {
            spec: spec.clone(),
            dir,
            launching: None,
            proc: None,
            ended: Some(reason),
        };
        let status = status_of(&mut vm);
        vms.insert(id, vm);
        Ok(status)
    }

    fn vms_outlive_agent(&self) -> bool {
        true
    }

    fn detach_all(&self) {
        self.detached.store(true, Ordering::SeqCst);
    }
}

/// Ends a launcher whose key exchange failed and says why: its own words
/// (stderr) when it ended on its own, else what went wrong on the channel.
fn launch_failed(launching: &mut Launching, e: crate::UnlockError, dir: &Path) -> VmmError {
    let status = launching.abort();
    match (e, status) {
        (
            crate::UnlockError::Control(
                crate::control::ControlError::Closed | crate::control::ControlError::Io(_),
            ),
            Some(status),
        ) if !status.success() && !tail(&dir.join(STDERR_FILE)).is_empty() => VmmError::VmmExited {
            status,
            stderr: tail(&dir.join(STDERR_FILE)),
        },
        (crate::UnlockError::Control(crate::control::ControlError::Io(io)), _)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            VmmError::Timeout(READY_TIMEOUT)
        }
        (e, _) => VmmError::Unlock(e),
    }
}

/// Waits for QEMU (the launcher after its exec) to open its control
/// socket; kills what was spawned if it does not, quoting its stderr when
/// it exited.
fn wait_for_qmp(
    mut child: Child,
    qemu_pid: Option<u32>,
    dir: &Path,
) -> Result<(Tracked, Option<Tracked>, Qmp), VmmError> {
    let stderr_path = dir.join(STDERR_FILE);
    let qmp_path = dir.join(QMP_SOCKET);
    let deadline = Instant::now() + READY_TIMEOUT;
    let fail = |child: &mut Child, err: VmmError| {
        let _ = child.kill();
        kill_pid(qemu_pid);
        let _ = child.wait();
        err
    };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let err = VmmError::VmmExited {
                status,
                stderr: tail(&stderr_path),
            };
            return Err(fail(&mut child, err));
        }
        if qmp_path.exists() {
            match Qmp::connect(&qmp_path, READY_TIMEOUT) {
                Ok(qmp) => {
                    let qemu = qemu_pid.and_then(|p| Tracked::observe(p).ok());
                    let spawned =
                        Tracked::spawned(child).map_err(io_err("watching the VMM in", dir))?;
                    return Ok((spawned, qemu, qmp));
                }
                Err(e) => {
                    // QEMU may have opened the socket and then failed
                    // (e.g. a volume that does not open): report its exit.
                    std::thread::sleep(Duration::from_millis(200));
                    if let Ok(Some(status)) = child.try_wait() {
                        let err = VmmError::VmmExited {
                            status,
                            stderr: tail(&stderr_path),
                        };
                        return Err(fail(&mut child, err));
                    }
                    if Instant::now() > deadline {
                        return Err(fail(&mut child, e.into()));
                    }
                }
            }
        }
        if Instant::now() > deadline {
            return Err(fail(&mut child, VmmError::Timeout(READY_TIMEOUT)));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes a VM's state directory; one already gone is fine.
fn remove_vm_dir(dir: &Path) -> Result<(), VmmError> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io_err("removing VM directory", dir)(e))
        }
        _ => Ok(()),
    }
}

/// Why QEMU ended, from its exit (see [`stderr_reason`] when the status
/// went to another parent); `None` when cleanly.
fn exit_reason(exit: Option<Exit>, dir: &Path) -> Option<String> {
    match exit {
        Some(Exit::Status(s)) if s.success() => None,
        Some(Exit::Status(s)) => Some(format!("QEMU exited with {s}")),
        Some(Exit::Unknown) => stderr_reason(&dir.join(STDERR_FILE)),
        None => Some("QEMU could not be reaped".to_owned()),
    }
}

/// The reason an adopted QEMU (whose exit status we cannot see) left in its
/// own standard error: its last lines that are not warnings, if any.
fn stderr_reason(path: &Path) -> Option<String> {
    let text = tail(path);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("warning:"))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// Reads the VM's state without looking inside the guest.
fn status_of(vm: &mut Vm) -> VmStatus {
    if let Some(launching) = vm.launching.as_mut() {
        if let Ok(None) = launching.child.try_wait() {
            return VmStatus::AwaitingKeys;
        }
        let status = launching.abort();
        let why = stderr_reason(&vm.dir.join(STDERR_FILE))
            .or_else(|| status.map(|s| format!("the launcher exited with {s}")))
            .unwrap_or_else(|| "the launcher could not be reaped".to_owned());
        vm.ended = Some(Some(format!(
            "the launcher ended while waiting for its volume keys: {why}"
        )));
        vm.launching = None;
        vm.forget_scratch();
        return status_of(vm);
    }
    if let Some(proc) = vm.proc.as_mut() {
        match proc.spawned.try_exit() {
            Ok(None) => {}
            Ok(Some(exit)) => {
                if let Some(d) = proc.vsock.as_mut() {
                    d.stop();
                }
                if let Some(cg) = &proc.cgroup {
                    cg.remove();
                }
                vm.ended = Some(exit_reason(Some(exit), &vm.dir));
                vm.proc = None;
                vm.forget_scratch();
                return status_of(vm);
            }
            Err(e) => {
                return VmStatus::Failed {
                    reason: format!("cannot wait for QEMU: {e}"),
                };
            }
        }
        // A VM whose vsock device is gone is broken, though QEMU still runs.
        if let Some(Err(e)) = proc.vsock.as_mut().map(vsock::Daemon::check) {
            return VmStatus::Failed {
                reason: format!("the vsock device failed: {e}"),
            };
        }
        return match proc.qmp.run_state() {
            Ok(RunState::Prelaunch) => VmStatus::Created,
            Ok(RunState::Running) => VmStatus::Running,
            Ok(RunState::Paused) => VmStatus::Failed {
                reason: "QEMU paused the VM (e.g. a volume I/O error)".to_owned(),
            },
            Ok(RunState::Terminal) => VmStatus::Stopped,
            Err(e) => {
                // A broken control channel usually means QEMU is exiting:
                // give it a moment so the exit status is what we report.
                let deadline = Instant::now() + Duration::from_secs(1);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = proc.spawned.try_exit() {
                        return status_of(vm);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                VmStatus::Failed {
                    reason: format!("QMP: {e}"),
                }
            }
        };
    }
    match &vm.ended {
        Some(Some(reason)) => VmStatus::Failed {
            reason: reason.clone(),
        },
        _ => VmStatus::Stopped,
    }
}

impl Drop for QemuBackend {
    fn drop(&mut self) {
        if *self.detached.get_mut() {
            // Leave every VM running for a successor: dropping a `Proc`
            // closes our QMP connection and pidfds and kills nothing. A
            // launcher still waiting for its keys sees its channel close
            // and exits (no record: a successor cleans up after it).
            return;
        }
        let vms = self.vms.get_mut().unwrap_or_else(|p| p.into_inner());
        for vm in vms.values_mut() {
            if let Some(mut launching) = vm.launching.take() {
                launching.abort();
            }
            if let Some(mut proc) = vm.proc.take() {
                Self::end(&mut proc, &vm.dir);
            }
            vm.forget_scratch();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_values_escape_commas() {
        assert_eq!(opt(Path::new("/a,b/c")), "/a,,b/c");
    }

    #[test]
    fn filled_pipe_holds_a_whole_plan_sized_message() {
        let msg = vec![b'x'; launch::MAX_PLAN_LEN];
        let r = filled_pipe(&msg).unwrap();
        let mut got = Vec::new();
        File::from(r).read_to_end(&mut got).unwrap();
        assert_eq!(got, msg);
    }

    #[test]
    fn stderr_reason_skips_warnings_and_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STDERR_FILE);
        assert_eq!(stderr_reason(&path), None);
        fs::write(
            &path,
            "qemu-system-x86_64: warning: host lacks a feature\n\n",
        )
        .unwrap();
        assert_eq!(stderr_reason(&path), None);
        fs::write(
            &path,
            "qemu-system-x86_64: warning: x\nqemu-system-x86_64: terminating on signal 15\n",
        )
        .unwrap();
        assert_eq!(
            stderr_reason(&path).as_deref(),
            Some("qemu-system-x86_64: terminating on signal 15")
        );
    }

    #[test]
    fn missing_qemu_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let err = QemuBackend::new(dir.path().join("state"), dir.path().join("no-qemu"), &exe);
        assert!(matches!(
            err,
            Err(VmmError::BackendUnavailable {
                reason: crate::Unavailable::NoQemu,
                ..
            })
        ));
        // A QEMU without the launcher is unavailable too.
        let qemu = dir.path().join("qemu-system-x86_64");
        std::fs::write(&qemu, b"").unwrap();
        std::fs::write(dir.path().join("qemu-img"), b"").unwrap();
        let err = QemuBackend::new(
            dir.path().join("state"),
            &qemu,
            dir.path().join("no-nitrile"),
        );
        assert!(matches!(
            err,
            Err(VmmError::BackendUnavailable {
                reason: crate::Unavailable::NoVmmBinary,
                ..
            })
        ));
    }
}
