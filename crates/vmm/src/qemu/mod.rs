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
//! # Volumes
//! Volumes are qcow2 files with LUKS encryption, created with `qemu-img` when
//! missing. The 64-byte [`VolumeKey`](crate::VolumeKey) is turned into a LUKS
//! passphrase: its standard base64 text (88 ASCII bytes; QEMU requires LUKS
//! passphrases to be UTF-8, so raw key bytes cannot be used). QEMU reads it
//! from a `secret` object with `file=/dev/fd/N`, where `N` is the read end of
//! a pipe: the backend writes the passphrase into the pipe, closes the write
//! end, and the child inherits only the read end. The key is never in a file,
//! on the command line or in the environment. The LUKS volume master key is
//! random, made by `qemu-img` and stored wrapped under the passphrase; since
//! the passphrase has 512 bits of entropy, the PBKDF iteration time is set
//! low (`encrypt.iter-time`) so that opening a volume is fast.
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
//!    0555): QEMU opens the kernel, initramfs, volumes, key pipes, serial file
//!    and QMP socket as root, then `-run-with chroot=...,user=...` switches
//!    root and uid before the guest runs. QEMU's seccomp filter is on
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
//! [`JailConfig`] to separate VMs from each other); QEMU runs as root until
//! its devices are open; `qemu-img` (volume creation) gets only
//! `RLIMIT_CORE=0` and `PR_SET_DUMPABLE=0`.

pub(crate) mod cgroup;
mod qmp;
mod vsock;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
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
    Accel, DisplayPath, Feature, Hypervisor, VmId, VmSpec, VmStatus, VmmError, VolumeKeys,
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
const MAX_STDERR_TAIL: usize = 2048;

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

struct Vm {
    dir: PathBuf,
    proc: Option<Proc>,
    /// Set once the process has gone; `None` reason means a clean stop.
    ended: Option<Option<String>>,
}

/// The QEMU backend. See the module documentation for what it guarantees.
pub struct QemuBackend {
    state_dir: PathBuf,
    qemu: PathBuf,
    qemu_img: PathBuf,
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
fn opt(s: &Path) -> String {
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

/// A pipe holding `secret`, write end closed; returns the read end.
fn secret_pipe(secret: &[u8]) -> Result<OwnedFd, VmmError> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| VmmError::Io {
        what: "creating a key pipe",
        path: DisplayPath(PathBuf::from("pipe")),
        source: std::io::Error::from_raw_os_error(e as i32),
    })?;
    // The secret (88 bytes) is far below the pipe buffer, so this never blocks.
    let mut w = File::from(w);
    w.write_all(secret)
        .map_err(io_err("writing a key pipe", Path::new("pipe")))?;
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
    /// stderr) under `state_dir` and running `qemu_binary`; `qemu-img` is
    /// looked up next to it. Defaults: TCG, [`JailConfig::default`].
    pub fn new(
        state_dir: impl Into<PathBuf>,
        qemu_binary: impl Into<PathBuf>,
    ) -> Result<Self, VmmError> {
        let state_dir = state_dir.into();
        let qemu = qemu_binary.into();
        let qemu_img = qemu.with_file_name("qemu-img");
        for p in [&qemu, &qemu_img] {
            if !p.is_file() {
                return Err(VmmError::BackendUnavailable {
                    backend: "qemu",
                    reason: crate::Unavailable::NoQemu,
                });
            }
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

    fn create_volume(
        &self,
        vol: &crate::VolumeSpec,
        key: &crate::VolumeKey,
    ) -> Result<(), VmmError> {
        let path = vol.path.as_path();
        create_private_file(path)?;
        let pipe = secret_pipe(key.to_base64().as_bytes())?;
        let mut cmd = Command::new(&self.qemu_img);
        cmd.arg("create")
            .arg("-q")
            .arg("--object")
            .arg(format!(
                "secret,id=sec0,format=raw,file=/dev/fd/{}",
                pipe.as_raw_fd()
            ))
            .args(["-f", "qcow2", "-o"])
            .arg(format!(
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time={LUKS_ITER_TIME_MS}"
            ))
            .arg(path)
            .arg(format!("{}M", vol.size_mib))
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        jail::install(
            &mut cmd,
            Plan {
                inherit: vec![pipe.as_raw_fd()],
                ..Plan::default()
            },
        );
        let out = cmd.output().map_err(|source| VmmError::Spawn {
            program: DisplayPath(self.qemu_img.clone()),
            source,
        });
        drop(pipe);
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                let _ = fs::remove_file(path);
                return Err(e);
            }
        };
        if !out.status.success() {
            let _ = fs::remove_file(path);
            let start = out.stderr.len().saturating_sub(MAX_STDERR_TAIL);
            return Err(VmmError::Helper {
                program: DisplayPath(self.qemu_img.clone()),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr[start..])
                    .trim()
                    .to_owned(),
            });
        }
        Ok(())
    }

    fn spawn(&self, spec: &VmSpec, keys: &VolumeKeys, dir: &Path) -> Result<Proc, VmmError> {
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
        match self.spawn_qemu(spec, keys, dir, cgroup.as_ref(), daemon.as_ref()) {
            Ok((spawned, qemu, qmp)) => Ok(Proc {
                spawned,
                qemu,
                qmp,
                cgroup,
                vsock: daemon,
            }),
            Err(e) => {
                if let Some(d) = daemon.as_mut() {
                    d.stop();
                }
                remove_cgroup(&cgroup);
                Err(e)
            }
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

    /// Starts QEMU (in `cgroup`, which the caller removes on failure) and
    /// waits for its control socket.
    fn spawn_qemu(
        &self,
        spec: &VmSpec,
        keys: &VolumeKeys,
        dir: &Path,
        cgroup: Option<&Cgroup>,
        daemon: Option<&vsock::Daemon>,
    ) -> Result<(Tracked, Option<Tracked>, Qmp), VmmError> {
        let serial = dir.join(SERIAL_FILE);
        let stderr_path = dir.join(STDERR_FILE);
        let qmp_path = dir.join(QMP_SOCKET);
        create_private_file(&serial)?;
        let stderr = create_private_file(&stderr_path)?;
        // An empty directory QEMU chroots into once it has opened everything.
        let root = dir.join(CHROOT_DIR);
        fs::DirBuilder::new()
            .mode(0o555)
            .create(&root)
            .map_err(io_err("creating", &root))?;

        let image = spec.image();
        let mut cmd = Command::new(&self.qemu);
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
        cmd.args(["-M", machine])
            .args(["-accel", self.accel.qemu_arg()])
            .args(["-cpu", "max,-la57"])
            .args(["-smp", &spec.vcpus().to_string()])
            .args(["-m", &format!("{}M", spec.memory_mib())])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-monitor", "none"])
            .args(["-chardev", &format!("file,id=ser0,path={}", opt(&serial))])
            .args(["-serial", "chardev:ser0"])
            .args([
                "-chardev",
                &format!("socket,id=qmp0,path={},server=on,wait=off", opt(&qmp_path)),
            ])
            .args(["-mon", "chardev=qmp0,mode=control"])
            .arg("-kernel")
            .arg(image.kernel.as_path())
            .arg("-initrd")
            .arg(image.initramfs.as_path())
            .args(["-append", image.cmdline.as_str()]);
        if let Some(d) = daemon {
            cmd.args([
                "-object",
                &format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on,dump=off,merge=off",
                    spec.memory_mib()
                ),
            ])
            .args([
                "-chardev",
                &format!("socket,id=vsock0,path={}", opt(d.socket())),
            ])
            .args(["-device", "vhost-user-vsock-device,chardev=vsock0"]);
        }
        let mut pipes = Vec::new();
        for (i, vol) in spec.volumes().iter().enumerate() {
            let key = keys
                .get(&vol.id)
                .ok_or_else(|| VmmError::MissingKey(vol.id.clone()))?;
            let pipe = secret_pipe(key.to_base64().as_bytes())?;
            let ro = if vol.read_only { "on" } else { "off" };
            cmd.args([
                "-object",
                &format!(
                    "secret,id=sec{i},format=raw,file=/dev/fd/{}",
                    pipe.as_raw_fd()
                ),
            ])
            .args([
                "-blockdev",
                &format!(
                    "driver=qcow2,node-name=vol{i},read-only={ro},encrypt.format=luks,encrypt.key-secret=sec{i},file.driver=file,file.filename={}",
                    opt(vol.path.as_path())
                ),
            ])
            .args(["-device", &format!("virtio-blk-device,drive=vol{i}")]);
            pipes.push(pipe);
        }
        cmd.args([
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
        ])
        .args([
            "-run-with",
            &format!(
                "chroot={},user={}:{}",
                opt(&root),
                self.jail.uid,
                self.jail.gid
            ),
        ])
        .arg("-S")
        .current_dir(dir)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);

        let plan = Plan {
            inherit: pipes.iter().map(AsRawFd::as_raw_fd).collect(),
            cgroup_procs: cgroup.map(Cgroup::procs).unwrap_or_default(),
            namespaces: self.jail.namespaces,
            user: None,
        };
        jail::install(&mut cmd, plan);
        let spawned = cmd.spawn();
        drop(pipes);
        let mut child = match spawned {
            Ok(c) => c,
            Err(source) => {
                return Err(VmmError::Spawn {
                    program: DisplayPath(self.qemu.clone()),
                    source,
                });
            }
        };
        let qemu_pid = jail::exec_pid(child.id(), self.jail.namespaces);

        let deadline = Instant::now() + READY_TIMEOUT;
        let fail = |child: &mut Child, err: VmmError| {
            let _ = child.kill();
            if let Some(pid) = qemu_pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
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
                            Tracked::spawned(child).map_err(io_err("watching", &self.qemu))?;
                        return Ok((spawned, qemu, qmp));
                    }
                    Err(e) => {
                        // QEMU may have opened the socket and then failed
                        // (e.g. a wrong volume key): report its exit.
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
    fn create(&self, spec: &VmSpec, keys: VolumeKeys) -> Result<VmId, VmmError> {
        let id = VmId::new(spec.instance().clone());
        let mut vms = self.lock();
        if vms.contains_key(&id) {
            return Err(VmmError::AlreadyExists(id));
        }
        if spec.net().is_some() {
            return Err(VmmError::Unsupported {
                backend: "qemu",
                feature: Feature::Net,
            });
        }
        for vol in spec.volumes() {
            if keys.get(&vol.id).is_none() {
                return Err(VmmError::MissingKey(vol.id.clone()));
            }
        }
        if let Some(extra) = keys
            .ids()
            .find(|k| !spec.volumes().iter().any(|v| &v.id == *k))
        {
            return Err(VmmError::UnexpectedKey(extra.clone()));
        }
        let dir = self.vm_dir(&id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating VM directory", &dir))?;
        let result = (|| {
            for vol in spec.volumes() {
                if !vol.path.as_path().exists() {
                    let key = keys
                        .get(&vol.id)
                        .ok_or_else(|| VmmError::MissingKey(vol.id.clone()))?;
                    self.create_volume(vol, key)?;
                }
            }
            let mut proc = self.spawn(spec, &keys, &dir)?;
            // Before returning: a successor must find every VM we report.
            let path = dir.join(RECORD_FILE);
            if let Err(e) = process::write_record(&path, &proc.record()) {
                Self::end(&mut proc, &dir);
                return Err(io_err("writing", &path)(e));
            }
            Ok(proc)
        })();
        // The keys are dropped (zeroized) here: QEMU holds what it needs.
        drop(keys);
        match result {
            Ok(proc) => {
                vms.insert(
                    id.clone(),
                    Vm {
                        dir,
                        proc: Some(proc),
                        ended: None,
                    },
                );
                Ok(id)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
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
        if let Some(mut proc) = vm.proc.take() {
            let _ = proc.qmp.execute(QmpCommand::Stop);
            // A stop we asked for is a clean stop.
            let _ = Self::end(&mut proc, &vm.dir);
            vm.ended = Some(None);
        }
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
            Self::end(&mut proc, &vm.dir);
        }
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
                            dir,
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
        remove_vm_dir(&dir)?;
        let mut vm = Vm {
            dir,
            proc: None,
            ended: Some(reason),
        };
        let status = status_of(&mut vm);
        vms.insert(id, vm);
        Ok(status)
    }

    fn detach_all(&self) {
        self.detached.store(true, Ordering::SeqCst);
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
            // closes our QMP connection and pidfds and kills nothing.
            return;
        }
        let vms = self.vms.get_mut().unwrap_or_else(|p| p.into_inner());
        for vm in vms.values_mut() {
            if let Some(mut proc) = vm.proc.take() {
                Self::end(&mut proc, &vm.dir);
            }
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
    fn secret_pipe_holds_exactly_the_secret() {
        let r = secret_pipe(b"passphrase").unwrap();
        let mut s = String::new();
        File::from(r).read_to_string(&mut s).unwrap();
        assert_eq!(s, "passphrase");
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
        let err = QemuBackend::new(dir.path().join("state"), dir.path().join("no-qemu"));
        assert!(matches!(
            err,
            Err(VmmError::BackendUnavailable {
                reason: crate::Unavailable::NoQemu,
                ..
            })
        ));
    }
}
