//! Process handles that cannot be fooled by a recycled pid.
//!
//! A [`PidFd`] is opened from a pid once (`pidfd_open`); from then on it
//! names that process and no other, whatever the kernel later does with the
//! number. Signals go through it (`pidfd_send_signal`), so once the process
//! has been reaped a signal is refused (`ESRCH`) rather than delivered to a
//! newer process that got the same pid; its exit is seen by polling it; a
//! child of ours is reaped through it (`waitid(P_PIDFD)`).
//!
//! What it does not do: tell whether the pid named the intended process at
//! the moment it was opened. A caller that remembered a pid from earlier
//! compares something stable about the process (its start time in
//! `/proc/<pid>/stat`) after opening.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;

/// A handle on one process. See the [module documentation](self).
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: u32,
}

impl PidFd {
    /// Opens a handle on the process that has `pid` now (`ESRCH` when none
    /// has).
    pub fn open(pid: u32) -> io::Result<Self> {
        let raw =
            libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open takes a pid and a flags word, touches no memory
        // of ours and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0 as libc::c_uint) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: `fd` was just returned by the kernel as a new descriptor of
        // this process; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, pid })
    }

    /// The pid the handle was opened with.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` to the process. Refused with `ESRCH` once it has been
    /// reaped, whoever has its pid now; a zombie takes the signal and
    /// ignores it.
    pub fn send_signal(&self, signal: Signal) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with a pidfd we own, a signal number, a
        // null siginfo (meaning "as kill(2)") and no flags; no memory is
        // read or written.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether the process has exited (it may still be a zombie); never
    /// blocks.
    pub fn has_exited(&self) -> io::Result<bool> {
        self.wait_exit(Duration::ZERO)
    }

    /// Waits up to `timeout` for the process to exit; whether it has.
    pub fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid, writable pollfd on our stack for the duration
        // of the call; poll writes only its `revents`.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0)
    }

    /// Reaps the process if it is an exited child of ours: its status, or
    /// `None` while it runs. `ECHILD` when it is not our child (or was
    /// reaped already).
    pub fn try_reap(&self) -> io::Result<Option<ExitStatus>> {
        // SAFETY: siginfo_t is plain data for which all-zero bytes are valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t that outlives the
        // call; the id is a pidfd we own.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.fd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: waitid filled `info` for a child-state change, so the
        // pid and status fields of the SIGCHLD layout are the ones set
        // (si_pid is 0 when no child has changed state).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        Ok(Some(match info.si_code {
            libc::CLD_EXITED => ExitStatus::from_raw((status & 0xff) << 8),
            libc::CLD_DUMPED => ExitStatus::from_raw((status & 0x7f) | 0x80),
            _ => ExitStatus::from_raw(status & 0x7f),
        }))
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sleeper() -> std::process::Child {
        Command::new("sleep").arg("30").spawn().unwrap()
    }

    /// Waits for the process to exit, for as long as it takes.
    fn wait_exited(p: &PidFd) {
        while !p.wait_exit(Duration::from_secs(1)).unwrap() {}
    }

    #[test]
    fn a_pidfd_signals_and_reaps_its_child() {
        let child = sleeper();
        let p = PidFd::open(child.id()).unwrap();
        assert_eq!(p.pid(), child.id());
        assert!(!p.has_exited().unwrap());
        assert!(p.try_reap().unwrap().is_none(), "reaped while running");
        p.send_signal(Signal::SIGKILL).unwrap();
        wait_exited(&p);
        let status = p.try_reap().unwrap().expect("an exited child");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Reaped: no second status, and no signal to whoever has the pid.
        assert_eq!(p.try_reap().unwrap_err().raw_os_error(), Some(libc::ECHILD));
        assert_eq!(
            p.send_signal(Signal::SIGKILL).unwrap_err().raw_os_error(),
            Some(libc::ESRCH)
        );
        drop(child);
    }

    #[test]
    // Reaped through the pidfd, not the `Child`.
    #[allow(clippy::zombie_processes)]
    fn an_exit_code_is_reported() {
        let child = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
        let p = PidFd::open(child.id()).unwrap();
        wait_exited(&p);
        assert_eq!(p.try_reap().unwrap().unwrap().code(), Some(7));
    }

    #[test]
    fn a_process_that_is_not_our_child_is_watched_but_not_reaped() {
        // Our own process: alive, not our child.
        let me = PidFd::open(std::process::id()).unwrap();
        assert!(!me.has_exited().unwrap());
        assert_eq!(
            me.try_reap().unwrap_err().raw_os_error(),
            Some(libc::ECHILD)
        );
        assert!(PidFd::open(u32::MAX).is_err());
    }

    /// The pid of a reaped child is handed to a new process (`clone3` with
    /// `set_tid`, root only): the old handle's signal is refused and the new
    /// process lives on, while a handle opened now names the new process.
    #[test]
    fn a_recycled_pid_gets_no_signal() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: choosing a pid (clone3 set_tid) needs root");
            return;
        }
        let child = sleeper();
        let pid = child.id();
        let old = PidFd::open(pid).unwrap();
        old.send_signal(Signal::SIGKILL).unwrap();
        wait_exited(&old);
        old.try_reap().unwrap().unwrap();
        drop(child);

        let Some(new) = spawn_with_pid(pid) else {
            println!("SKIPPED: pid {pid} was taken again before it could be recycled");
            return;
        };
        let again = PidFd::open(pid).unwrap();
        assert_eq!(
            old.send_signal(Signal::SIGKILL).unwrap_err().raw_os_error(),
            Some(libc::ESRCH),
            "a signal for the old process went to the new one"
        );
        assert!(!again.has_exited().unwrap());
        assert!(!new.has_exited().unwrap());
        again.send_signal(Signal::SIGTERM).unwrap();
        wait_exited(&new);
        let status = new.try_reap().unwrap().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    /// A child with pid `pid` that waits for a signal (`clone3` with
    /// `set_tid`); `None` when that pid is in use.
    fn spawn_with_pid(pid: u32) -> Option<PidFd> {
        #[repr(C)]
        #[derive(Default)]
        struct CloneArgs {
            flags: u64,
            pidfd: u64,
            child_tid: u64,
            parent_tid: u64,
            exit_signal: u64,
            stack: u64,
            stack_size: u64,
            tls: u64,
            set_tid: u64,
            set_tid_size: u64,
            cgroup: u64,
        }
        let tid = [libc::pid_t::try_from(pid).unwrap()];
        let args = CloneArgs {
            exit_signal: libc::SIGCHLD as u64,
            set_tid: tid.as_ptr() as u64,
            set_tid_size: 1,
            ..CloneArgs::default()
        };
        // SAFETY: clone3 without CLONE_VM is a fork: the child gets a copy
        // of this address space and runs only `pause`/`_exit` (system
        // calls) below, never returning into the harness; `args` and `tid`
        // are valid for the call and the size is that of the struct.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &raw const args,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if rc == 0 {
            loop {
                // SAFETY: pause has no preconditions; the child waits for
                // the signal that ends it.
                unsafe { libc::pause() };
            }
        }
        if rc < 0 {
            assert_eq!(
                io::Error::last_os_error().raw_os_error(),
                Some(libc::EEXIST),
                "clone3"
            );
            return None;
        }
        assert_eq!(rc, i64::from(pid));
        Some(PidFd::open(pid).unwrap())
    }
}
