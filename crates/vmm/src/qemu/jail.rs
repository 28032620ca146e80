//! Jailing a child process between `fork` and `exec`.
//!
//! Everything in the `pre_exec` hook runs in the forked child of a possibly
//! multi-threaded parent, so it only makes raw system calls: no allocation, no
//! locks. Whatever it needs (file descriptors, flags) is prepared before.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::CloneFlags;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::Signal;

/// A per-VM cgroup, created before the process starts and removed after.
#[derive(Debug)]
pub(crate) struct Cgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<OwnedFd>,
}

impl Cgroup {
    /// Creates `nitrile/<name>` with the given memory and CPU limits, under
    /// cgroup v2 if the host is pure v2, else under the v1 `memory` and `cpu`
    /// hierarchies. Returns `None` when no usable hierarchy exists.
    pub(crate) fn create(
        root: &Path,
        name: &str,
        memory_bytes: u64,
        cpus: u32,
    ) -> io::Result<Option<Self>> {
        const PERIOD_US: u64 = 100_000;
        let quota_us = u64::from(cpus) * PERIOD_US;
        let mut cg = Self {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        if root.join("cgroup.controllers").exists() {
            let parent = root.join("nitrile");
            std::fs::create_dir_all(&parent)?;
            // Enable the controllers for our subtree (idempotent).
            std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu")?;
            std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu")?;
            let dir = parent.join(name);
            // An empty cgroup left by a VM whose backend died is replaced.
            let _ = std::fs::remove_dir(&dir);
            std::fs::create_dir(&dir)?;
            cg.dirs.push(dir.clone());
            std::fs::write(dir.join("memory.max"), memory_bytes.to_string())?;
            std::fs::write(dir.join("memory.swap.max"), "0").ok();
            std::fs::write(dir.join("cpu.max"), format!("{quota_us} {PERIOD_US}"))?;
            cg.procs.push(open_procs(&dir)?);
            return Ok(Some(cg));
        }
        let mem = root.join("memory");
        let cpu = root.join("cpu");
        if !mem.join("memory.limit_in_bytes").exists() || !cpu.join("cpu.cfs_quota_us").exists() {
            return Ok(None);
        }
        let mdir = mem.join("nitrile").join(name);
        let cdir = cpu.join("nitrile").join(name);
        // A cgroup left by a VM whose backend died keeps that VM's limits;
        // start from a fresh one when it is empty (rmdir fails otherwise).
        for dir in [&mdir, &cdir] {
            let _ = std::fs::remove_dir(dir);
        }
        std::fs::create_dir_all(&mdir)?;
        cg.dirs.push(mdir.clone());
        // v1 refuses a memory limit above the memory+swap limit: lift the
        // latter first (it may hold an older, smaller value), then set both.
        std::fs::write(mdir.join("memory.memsw.limit_in_bytes"), "-1").ok();
        std::fs::write(mdir.join("memory.limit_in_bytes"), memory_bytes.to_string())?;
        // No escape into swap either, where the kernel accounts it.
        std::fs::write(
            mdir.join("memory.memsw.limit_in_bytes"),
            memory_bytes.to_string(),
        )
        .ok();
        std::fs::create_dir_all(&cdir)?;
        cg.dirs.push(cdir.clone());
        std::fs::write(cdir.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
        std::fs::write(cdir.join("cpu.cfs_quota_us"), quota_us.to_string())?;
        cg.procs.push(open_procs(&mdir)?);
        cg.procs.push(open_procs(&cdir)?);
        Ok(Some(cg))
    }

    /// The cgroup of an earlier backend process's VM `name`, for removal
    /// only (no processes can join it); `None` when none exists.
    pub(crate) fn existing(root: &Path, name: &str) -> Option<Self> {
        let dirs: Vec<PathBuf> = [
            root.join("nitrile").join(name),
            root.join("memory").join("nitrile").join(name),
            root.join("cpu").join("nitrile").join(name),
        ]
        .into_iter()
        .filter(|d| d.is_dir())
        .collect();
        (!dirs.is_empty()).then_some(Self {
            dirs,
            procs: Vec::new(),
        })
    }

    /// Kills every process left in the cgroup (e.g. a QEMU whose backend
    /// died before recording it) and waits, up to `timeout`, until none is
    /// left. A listed pid is signalled through a pidfd, and only if that
    /// process is still in this cgroup once the pidfd is open.
    pub(crate) fn kill_all(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let mut left = false;
            for dir in &self.dirs {
                let name = dir.to_string_lossy();
                for pid in members(dir) {
                    left = true;
                    let Ok(p) = crate::process::Tracked::observe(pid) else {
                        continue;
                    };
                    let in_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                        .is_ok_and(|c| {
                            c.lines().any(|l| {
                                l.rsplit(':')
                                    .next()
                                    .is_some_and(|path| !path.is_empty() && name.ends_with(path))
                            })
                        });
                    if in_cgroup {
                        p.signal(Signal::SIGKILL);
                    }
                }
            }
            if !left || std::time::Instant::now() > deadline {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Removes the cgroup directories (they must be empty of processes).
    pub(crate) fn remove(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The pids listed in `dir/cgroup.procs` (at most [`MAX_CGROUP_PROCS`]).
fn members(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .take(MAX_CGROUP_PROCS)
        .collect()
}

/// Most processes looked at in one VM cgroup (a VM has a handful).
const MAX_CGROUP_PROCS: usize = 1024;

fn open_procs(dir: &Path) -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))?;
    Ok(f.into())
}

/// What to do to the child before it execs.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Descriptors the child must inherit across exec (key pipes).
    pub(crate) inherit: Vec<RawFd>,
    /// `cgroup.procs` descriptors to join.
    pub(crate) cgroup_procs: Vec<RawFd>,
    /// New mount, IPC, UTS, network and PID namespaces.
    pub(crate) namespaces: bool,
}

impl Plan {
    pub(crate) fn for_cgroup(mut self, cg: Option<&Cgroup>) -> Self {
        if let Some(cg) = cg {
            self.cgroup_procs = cg.procs.iter().map(AsRawFd::as_raw_fd).collect();
        }
        self
    }
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn child_setup(plan: &Plan) -> io::Result<()> {
    // 0. A session of its own: no terminal's Ctrl-C or hang-up, and no
    // signal sent to the spawning process's group, reaches the VMM, which
    // must outlive its spawner (see `Hypervisor::detach_all`).
    nix::unistd::setsid().map_err(errno)?;
    // 1. No core files, ever: RLIMIT_CORE survives exec.
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(errno)?;
    // Not dumpable until exec (exec resets it; QEMU's own switch to the
    // unprivileged uid makes it non-dumpable again, see the module docs).
    nix::sys::prctl::set_dumpable(false).map_err(errno)?;
    // 2. Key pipes: clear close-on-exec on exactly these descriptors.
    for &fd in &plan.inherit {
        // SAFETY: `fd` is an open pipe read end owned by the parent's
        // `OwnedFd`, which outlives the spawn; F_SETFD only changes the
        // descriptor's flags in this (child) process.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // 3. Join the VM's cgroup ("0" means the writing process).
    for &fd in &plan.cgroup_procs {
        // SAFETY: `fd` is an open `cgroup.procs` file owned by the parent's
        // `Cgroup`, which outlives the spawn; the buffer is a static
        // one-byte string.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    if !plan.namespaces {
        return Ok(());
    }
    // 4. New namespaces. A new PID namespace applies to children only, so
    // fork once more below: the grandchild becomes PID 1 of the namespace
    // and execs QEMU; this process stays outside to wait for it.
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWPID,
    )
    .map_err(errno)?;
    // Mounts made on the host later do not propagate in, ours not out.
    // SAFETY: all pointers are static NUL-terminated strings or null, as
    // mount(2) allows for a propagation change.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the child only makes async-signal-safe system calls (prctl)
    // before returning to std's exec path; the parent only calls close_range,
    // waitpid and _exit.
    match unsafe { nix::unistd::fork() }.map_err(errno)? {
        nix::unistd::ForkResult::Child => {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(errno)?;
            Ok(())
        }
        nix::unistd::ForkResult::Parent { child } => {
            // Close everything but stdio: in particular std's exec-error pipe,
            // whose EOF tells the spawning parent that the exec happened.
            // SAFETY: close_range only closes descriptors of this process,
            // none of which is used again here.
            unsafe {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            }
            let code = loop {
                match nix::sys::wait::waitpid(child, None) {
                    Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => break code,
                    Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
                    Ok(_) | Err(nix::Error::EINTR) => continue,
                    Err(_) => break 255,
                }
            };
            // SAFETY: _exit ends this process without running atexit
            // handlers or flushing buffers shared with the parent.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Installs the plan as the command's `pre_exec` hook.
pub(crate) fn install(cmd: &mut Command, plan: Plan) {
    // SAFETY: `child_setup` makes only raw system calls and touches no
    // locks or allocator state (the plan's vectors were allocated before
    // the fork and are only read).
    unsafe {
        cmd.pre_exec(move || child_setup(&plan));
    }
}

/// Like [`install`], then, as the last step before exec (in the namespace's
/// init when there are namespaces): no supplementary groups, `gid` and `uid`
/// as real, effective and saved ids, and `PR_SET_NO_NEW_PRIVS`.
pub(crate) fn install_as(cmd: &mut Command, plan: Plan, uid: u32, gid: u32) {
    // SAFETY: as for `install`; `become_user` makes only raw system calls.
    unsafe {
        cmd.pre_exec(move || {
            child_setup(&plan)?;
            become_user(uid, gid)
        });
    }
}

fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    // Raw system calls rather than libc's wrappers, which coordinate the
    // change across threads: after the fork this process has one thread.
    let check = |rc: libc::c_long| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let (u, g) = (libc::c_ulong::from(uid), libc::c_ulong::from(gid));
    // SAFETY: a zero-length group list, so no memory is read.
    check(unsafe { libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) })?;
    // SAFETY: integer arguments only; changes only this process's gids.
    check(unsafe { libc::syscall(libc::SYS_setresgid, g, g, g) })?;
    // SAFETY: integer arguments only; changes only this process's uids.
    check(unsafe { libc::syscall(libc::SYS_setresuid, u, u, u) })?;
    // SAFETY: integer arguments only; sets a flag of this process.
    check(unsafe {
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

/// The host PID of the process the jailed child exec'd: the child itself
/// without namespaces, else its only child (the PID namespace's init).
pub(crate) fn exec_pid(child_pid: u32, namespaces: bool) -> Option<u32> {
    if !namespaces {
        return Some(child_pid);
    }
    let path = format!("/proc/{child_pid}/task/{child_pid}/children");
    for _ in 0..200 {
        if let Ok(s) = std::fs::read_to_string(&path)
            && let Some(pid) = s.split_whitespace().next().and_then(|p| p.parse().ok())
        {
            return Some(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    None
}
