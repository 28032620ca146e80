//! The vhost-user vsock device: one jailed `vhost-device-vsock` process per
//! VM, started before QEMU and stopped with it.
//!
//! The daemon maps the guest's CID to the spec's host Unix socket in the
//! Firecracker style: a host program connects to `uds_path` and writes
//! `CONNECT <port>\n` to reach a guest listener; a guest connection to port
//! `P` is forwarded to a host listener at `<uds_path>_<P>`.
//!
//! Jail: the same uid/gid as QEMU (switched before exec, with no supplementary
//! groups and `PR_SET_NO_NEW_PRIVS`), `RLIMIT_CORE` 0, the VM's namespaces and
//! cgroup. Its working directory is `vsock/` in the VM directory (owned by
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
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::jail::{self, Cgroup, Plan};
use super::{JailConfig, create_private_file, io_err, tail};
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
    child: Child,
    pid: Option<u32>,
    uds: PathBuf,
    socket: PathBuf,
    stderr: PathBuf,
    program: PathBuf,
}

fn kill(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Removes `path` if it is a Unix socket (a daemon's leftover).
fn remove_socket(path: &Path) {
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
            cgroup_procs: Vec::new(),
            namespaces: config.namespaces,
        }
        .for_cgroup(cgroup);
        jail::install_as(&mut cmd, plan, config.uid, config.gid);
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
        let mut daemon = Self {
            child,
            pid,
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

    /// The vhost-user socket QEMU connects to.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's host PID, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Fails if the daemon has exited.
    pub(crate) fn check(&mut self) -> Result<(), VmmError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(VmmError::Helper {
                program: DisplayPath(self.program.clone()),
                status,
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
    /// it is reaped, and removes its host socket.
    pub(crate) fn stop(&mut self) {
        match self.pid {
            // The waiting parent reaps the daemon, then exits itself.
            Some(_) => kill(self.pid),
            None => {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
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
