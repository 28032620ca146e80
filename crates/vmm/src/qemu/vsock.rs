//! The vhost-user vsock device: one jailed `vhost-device-vsock` process per
//! VM, started before QEMU and stopped with it.
//!
//! The daemon maps the guest's CID to the spec's host Unix socket in the
//! Firecracker style: a host program connects to `uds_path` and writes
//! `CONNECT <port>\n` to reach a guest listener; a guest connection to port
//! `P` is forwarded to a host listener at `<uds_path>_<P>`.
//!
//! Jail: the same uid/gid as QEMU (switched before exec by the jails' one
//! privilege drop, `nitrile_vmm_sys::privilege`: no supplementary groups,
//! `PR_SET_NO_NEW_PRIVS`; uid or gid 0 is refused), `RLIMIT_CORE` 0, the
//! VM's namespaces and cgroup. Its working directory is `vsock/` in the VM directory (owned by
//! that uid, mode 0700), where it creates the vhost-user socket QEMU connects
//! to. It runs from a per-VM copy of the binary that its uid may execute but
//! not read, so the kernel makes the process non-dumpable at exec: its memory,
//! which maps all of guest memory, cannot be read through `/proc/<pid>/mem`
//! by other processes of the same uid. Not chrooted: it must reach
//! `uds_path`, whose directory must therefore be writable by the jail uid, and
//! a host listener for guest-initiated connections must be connectable by
//! that uid (this is how a host grants a VM a port). A socket left at
//! `uds_path` (by an earlier run of the VM) is removed before the daemon
//! starts, and the daemon's socket is removed when it stops: `uds_path` must
//! belong to this VM alone.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use nitrile_vmm_sys::Ids;
use nitrile_vmm_sys::jail::{self, Plan};

use super::cgroup::Cgroup;
use super::{JailConfig, create_private_file, io_err, tail};
use crate::process::{Exit, ProcRecord, Tracked};
use crate::{DisplayPath, VmmError, VsockSpec};

/// The daemon's directory inside the VM directory.
const DIR: &str = "vsock";
/// The vhost-user socket, inside [`DIR`].
const SOCKET: &str = "vhost-vsock.sock";
/// The per-VM execute-only copy of the daemon, inside [`DIR`].
const PROGRAM: &str = "vhost-device-vsock";
/// The daemon's standard error, in the VM directory.
const STDERR_FILE: &str = "vhost-vsock.stderr";
/// How often a spawn failing with ETXTBSY is retried, 10 ms apart.
const MAX_BUSY_RETRIES: u32 = 200;

/// A running vsock daemon.
#[derive(Debug)]
pub(crate) struct Daemon {
    /// The process we spawned: the daemon, or its namespace's waiting parent.
    spawned: Tracked,
    /// The daemon itself, when its pid is known.
    daemon: Option<Tracked>,
    uds: PathBuf,
    socket: PathBuf,
    stderr: PathBuf,
    program: PathBuf,
}

/// What a successor backend needs to adopt the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DaemonRecord {
    /// The process the backend spawned.
    spawned: ProcRecord,
    /// The daemon itself (the same process without namespaces).
    daemon: Option<ProcRecord>,
}

/// Removes `path` if it is a Unix socket (a daemon's leftover).
pub(super) fn remove_socket(path: &Path) {
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = fs::remove_file(path);
    }
}

impl Daemon {
    /// Starts `binary` for `spec` in `vm_dir` and waits until its vhost-user
    /// socket exists (or `timeout` passes).
    pub(crate) fn spawn(
        binary: &Path,
        vm_dir: &Path,
        spec: &VsockSpec,
        config: &JailConfig,
        cgroup: Option<&Cgroup>,
        timeout: Duration,
    ) -> Result<Self, VmmError> {
        // The daemon runs as the jail's unprivileged ids, never as root.
        let user = Ids::new(config.uid, config.gid).map_err(|e| VmmError::Spawn {
            program: DisplayPath(binary.to_path_buf()),
            source: std::io::Error::new(ErrorKind::InvalidInput, e),
        })?;
        let dir = vm_dir.join(DIR);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating", &dir))?;
        std::os::unix::fs::chown(&dir, Some(config.uid), Some(config.gid))
            .map_err(io_err("handing the vsock directory to the jail uid", &dir))?;
        // Executable, not readable, by the jail uid: see the module docs.
        let program = dir.join(PROGRAM);
        fs::copy(binary, &program).map_err(io_err("copying", binary))?;
        fs::set_permissions(&program, fs::Permissions::from_mode(0o111))
            .map_err(io_err("restricting", &program))?;
        let stderr_path = vm_dir.join(STDERR_FILE);
        let stderr = create_private_file(&stderr_path)?;
        let uds = spec.uds_path.as_path().to_path_buf();
        remove_socket(&uds);

        let mut cmd = Command::new(Path::new(".").join(PROGRAM));
        cmd.arg("--guest-cid")
            .arg(spec.guest_cid.to_string())
            .arg("--socket")
            .arg(SOCKET)
            .arg("--uds-path")
            .arg(&uds)
            // Relative paths (program, socket) are resolved in here.
            .current_dir(&dir)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let plan = Plan {
            inherit: Vec::new(),
            cgroup_procs: cgroup.map(Cgroup::procs).unwrap_or_default(),
            namespaces: config.namespaces,
            user: Some(user),
        };
        jail::install(&mut cmd, plan);
        // A child forked by another thread while the copy was open for
        // writing holds it until its own exec: the exec here then fails
        // with ETXTBSY for a moment.
        let mut tries = 0;
        let child = loop {
            match cmd.spawn() {
                Err(e) if e.kind() == ErrorKind::ExecutableFileBusy && tries < MAX_BUSY_RETRIES => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => {
                    break other.map_err(|source| VmmError::Spawn {
                        program: DisplayPath(binary.to_path_buf()),
                        source,
                    })?;
                }
            }
        };
        let pid = jail::exec_pid(child.id(), config.namespaces);
        let spawned = Tracked::spawned(child).map_err(io_err("watching", binary))?;
        let mut daemon = Self {
            spawned,
            daemon: pid.and_then(|p| Tracked::observe(p).ok()),
            uds,
            socket: dir.join(SOCKET),
            stderr: stderr_path,
            program: binary.to_path_buf(),
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Err(e) = daemon.check() {
                daemon.stop();
                return Err(e);
            }
            if daemon.socket.exists() {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                daemon.stop();
                return Err(VmmError::Timeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Takes over the daemon of the VM in `vm_dir` that `record` names,
    /// serving `uds`; `None` when it no longer runs.
    pub(crate) fn adopt(record: DaemonRecord, vm_dir: &Path, uds: Option<PathBuf>) -> Option<Self> {
        let spawned = Tracked::adopt(record.spawned)?;
        let dir = vm_dir.join(DIR);
        Some(Self {
            spawned,
            daemon: record.daemon.and_then(Tracked::adopt),
            uds: uds.unwrap_or_default(),
            socket: dir.join(SOCKET),
            stderr: vm_dir.join(STDERR_FILE),
            program: dir.join(PROGRAM),
        })
    }

    /// What to persist so a successor backend can adopt the daemon.
    pub(crate) fn record(&self) -> DaemonRecord {
        DaemonRecord {
            spawned: self.spawned.record(),
            daemon: self.daemon.as_ref().map(Tracked::record),
        }
    }

    /// The vhost-user socket QEMU connects to.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's host PID, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Tracked::pid)
    }

    /// Fails if the daemon has exited.
    pub(crate) fn check(&mut self) -> Result<(), VmmError> {
        match self.spawned.try_exit() {
            Ok(None) => Ok(()),
            Ok(Some(Exit::Status(status))) => Err(VmmError::Helper {
                program: DisplayPath(self.program.clone()),
                status,
                stderr: tail(&self.stderr),
            }),
            Ok(Some(Exit::Unknown)) => Err(VmmError::ProcessGone {
                program: DisplayPath(self.program.clone()),
                stderr: tail(&self.stderr),
            }),
            Err(source) => Err(VmmError::Io {
                what: "waiting for",
                path: DisplayPath(self.program.clone()),
                source,
            }),
        }
    }

    /// Kills the daemon (nothing of it needs a graceful end), waits until
    /// it has gone, and removes its host socket.
    pub(crate) fn stop(&mut self) {
        match &self.daemon {
            // The waiting parent reaps the daemon, then exits itself.
            Some(d) => d.signal(Signal::SIGKILL),
            None => self.spawned.signal(Signal::SIGKILL),
        }
        let _ = self.spawned.wait();
        if let Some(d) = self.daemon.as_mut() {
            let _ = d.wait();
        }
        remove_socket(&self.uds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_socket_leaves_other_files_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        fs::write(&file, b"x").unwrap();
        remove_socket(&file);
        assert!(file.exists());
        let sock = dir.path().join("sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        remove_socket(&sock);
        assert!(!sock.exists());
    }
}
