//! Dropping root for good: the one privilege drop of both backends' jails.
//!
//! [`drop_privileges`] (and [`chroot_and_drop`], which `chroot`s first)
//! leaves no supplementary groups, sets the real, effective and saved gid
//! and then uid to unprivileged [`Ids`], and sets `PR_SET_NO_NEW_PRIVS`, so
//! that neither a set-uid program nor file capabilities can give privileges
//! back. The ids are then read back and must be exactly those asked for.
//!
//! Linux keeps credentials per thread; the C library's wrappers change every
//! thread of a process by signalling each, which is neither possible between
//! `fork` and `exec` nor needed in a process that has one thread. This
//! module makes the raw system calls instead, so it changes only the calling
//! thread, and therefore refuses to run in a process with more than one
//! thread (counted in `/proc/self/status`): a thread left behind as root
//! would undo the drop. The pre-exec jail ([`crate::jail`]) runs the same
//! calls in the forked child, which has one thread by construction.

use std::io;
use std::path::Path;

/// Unprivileged ids to drop to: neither the uid nor the gid is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    uid: u32,
    gid: u32,
}

impl Ids {
    /// The ids `uid` and `gid`; refuses 0 for either.
    pub fn new(uid: u32, gid: u32) -> Result<Self, PrivilegeError> {
        if uid == 0 || gid == 0 {
            return Err(PrivilegeError::Root);
        }
        Ok(Self { uid, gid })
    }

    /// The uid.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The gid.
    pub fn gid(&self) -> u32 {
        self.gid
    }
}

/// Why privileges were not dropped; the process must not go on then.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrivilegeError {
    /// misuse: uid or gid 0 was asked for
    #[error("privileges are dropped to a non-root uid and gid only")]
    Root,
    /// misuse: the process has other threads, which would keep their ids
    #[error(
        "the process has {0} threads; privileges are dropped only in a process with one thread"
    )]
    Threads(usize),
    /// the thread count could not be read
    #[error("counting the process's threads")]
    ThreadCount(#[source] io::Error),
    /// a step of the drop failed
    #[error("{step} failed")]
    Step {
        /// which step
        step: &'static str,
        /// the cause
        #[source]
        source: io::Error,
    },
    /// the kernel reports other ids than those set (unreachable on Linux)
    #[error("the ids read back after the drop are not those asked for")]
    NotDropped,
}

/// Drops this process to `ids` for good (see the [module
/// documentation](self)). Refuses unless the process has exactly one thread.
pub fn drop_privileges(ids: Ids) -> Result<(), PrivilegeError> {
    one_thread()?;
    set_ids(ids).map_err(|(step, source)| PrivilegeError::Step { step, source })?;
    verify(ids)
}

/// `chroot` into `dir` and `chdir` to its root, then [`drop_privileges`].
/// The thread count is read before the `chroot` (which hides `/proc`).
pub fn chroot_and_drop(dir: &Path, ids: Ids) -> Result<(), PrivilegeError> {
    one_thread()?;
    let step = |step| move |source| PrivilegeError::Step { step, source };
    std::os::unix::fs::chroot(dir).map_err(step("chroot"))?;
    std::env::set_current_dir("/").map_err(step("chdir"))?;
    set_ids(ids).map_err(|(step, source)| PrivilegeError::Step { step, source })?;
    verify(ids)
}

/// Refuses unless the process has exactly one thread.
fn one_thread() -> Result<(), PrivilegeError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(PrivilegeError::ThreadCount)?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .ok_or_else(|| {
            PrivilegeError::ThreadCount(io::Error::new(
                io::ErrorKind::InvalidData,
                "no Threads: line in /proc/self/status",
            ))
        })?;
    if threads == 1 {
        Ok(())
    } else {
        Err(PrivilegeError::Threads(threads))
    }
}

fn verify(ids: Ids) -> Result<(), PrivilegeError> {
    let (u, g) = (
        nix::unistd::Uid::from_raw(ids.uid),
        nix::unistd::Gid::from_raw(ids.gid),
    );
    let uids = nix::unistd::getresuid().map_err(|e| PrivilegeError::Step {
        step: "getresuid",
        source: e.into(),
    })?;
    let gids = nix::unistd::getresgid().map_err(|e| PrivilegeError::Step {
        step: "getresgid",
        source: e.into(),
    })?;
    let groups = nix::unistd::getgroups().map_err(|e| PrivilegeError::Step {
        step: "getgroups",
        source: e.into(),
    })?;
    let same = [uids.real, uids.effective, uids.saved] == [u; 3]
        && [gids.real, gids.effective, gids.saved] == [g; 3]
        && groups.iter().all(|&x| x == g);
    if same {
        Ok(())
    } else {
        Err(PrivilegeError::NotDropped)
    }
}

/// The drop itself, for the calling thread only: raw system calls, no
/// allocation, no locks, so it may run between `fork` and `exec`.
pub(crate) fn set_ids(ids: Ids) -> Result<(), (&'static str, io::Error)> {
    let check = |step: &'static str, rc: libc::c_long| {
        if rc == 0 {
            Ok(())
        } else {
            Err((step, io::Error::last_os_error()))
        }
    };
    let (u, g) = (libc::c_ulong::from(ids.uid), libc::c_ulong::from(ids.gid));
    // The groups and gid first, while the uid may still change them.
    // SAFETY: a zero-length group list: the kernel reads no memory through
    // the null pointer; changes only this thread's credentials.
    check("setgroups", unsafe {
        libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>())
    })?;
    // SAFETY: integer arguments only; changes only this thread's gids.
    check("setresgid", unsafe {
        libc::syscall(libc::SYS_setresgid, g, g, g)
    })?;
    // SAFETY: integer arguments only; changes only this thread's uids.
    check("setresuid", unsafe {
        libc::syscall(libc::SYS_setresuid, u, u, u)
    })?;
    // SAFETY: integer arguments only; sets a flag of this thread that its
    // children and exec'd programs inherit.
    check("PR_SET_NO_NEW_PRIVS", unsafe {
        libc::syscall(
            libc::SYS_prctl,
            libc::PR_SET_NO_NEW_PRIVS,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOBODY: u32 = 65534;

    fn root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            println!("SKIPPED: dropping privileges needs root");
        }
        root
    }

    #[test]
    fn root_ids_are_refused() {
        assert!(matches!(Ids::new(0, NOBODY), Err(PrivilegeError::Root)));
        assert!(matches!(Ids::new(NOBODY, 0), Err(PrivilegeError::Root)));
        let ids = Ids::new(1000, 100).unwrap();
        assert_eq!((ids.uid(), ids.gid()), (1000, 100));
    }

    /// The test harness runs tests on threads of their own: the drop is
    /// refused, and this thread keeps its ids.
    #[test]
    fn a_process_with_other_threads_is_refused() {
        let before = nix::unistd::getresuid().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        let err = drop_privileges(Ids::new(NOBODY, NOBODY).unwrap()).unwrap_err();
        assert!(
            matches!(err, PrivilegeError::Threads(n) if n > 1),
            "{err:?}"
        );
        let dir = std::env::temp_dir();
        let err = chroot_and_drop(&dir, Ids::new(NOBODY, NOBODY).unwrap()).unwrap_err();
        assert!(matches!(err, PrivilegeError::Threads(_)), "{err:?}");
        assert_eq!(nix::unistd::getresuid().unwrap(), before);
        drop(tx);
        other.join().unwrap();
    }

    /// What the forked child checks after the drop; its exit code names the
    /// first check that failed.
    fn dropped_for_good() -> i32 {
        if drop_privileges(Ids::new(NOBODY, NOBODY).unwrap()).is_err() {
            return 1;
        }
        let (u, g) = (
            nix::unistd::Uid::from_raw(NOBODY),
            nix::unistd::Gid::from_raw(NOBODY),
        );
        let uids = nix::unistd::getresuid().unwrap();
        if [uids.real, uids.effective, uids.saved] != [u; 3] {
            return 2;
        }
        let gids = nix::unistd::getresgid().unwrap();
        if [gids.real, gids.effective, gids.saved] != [g; 3] {
            return 3;
        }
        if !nix::unistd::getgroups().unwrap().iter().all(|&x| x == g) {
            return 4;
        }
        if nix::sys::prctl::get_no_new_privs() != Ok(true) {
            return 5;
        }
        // For good: root cannot be taken back.
        if nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_ok() {
            return 6;
        }
        0
    }

    #[test]
    fn a_forked_child_drops_root_for_good() {
        if !root() {
            return;
        }
        // SAFETY: the child (one thread) only makes system calls and small
        // allocations (glibc's fork leaves the allocator usable in the
        // child) and ends with `_exit`, never returning into the harness.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => crate::process::exit_now(dropped_for_good()),
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
