//! Jailing a child process between `fork` and `exec`: the steps both
//! backends apply to the processes they start (QEMU, the vsock daemon,
//! `qemu-img`, `nitrile vmm`).
//!
//! [`install`] sets a [`Plan`] as a `Command`'s `pre_exec` hook. In the
//! child, in this order:
//! 1. `setsid`: a session of its own, so no terminal's Ctrl-C or hang-up and
//!    no signal to the spawner's process group reaches it (a VMM outlives
//!    its spawner);
//! 2. no core dumps ([`crate::process::forbid_core_dumps`]: `RLIMIT_CORE` 0,
//!    which survives exec, and not dumpable until exec);
//! 3. close-on-exec set on every descriptor above stderr, then cleared on
//!    exactly the [`Plan::inherit`] descriptors: the child keeps nothing the
//!    spawner itself inherited without close-on-exec (a lock its own parent
//!    held, say);
//! 4. the process joins each cgroup whose `cgroup.procs` is open in
//!    [`Plan::cgroup_procs`];
//! 5. with [`Plan::namespaces`]: new mount (propagation made private), IPC,
//!    UTS, network and PID namespaces; since a new PID namespace applies to
//!    children only, the child forks again: the grandchild, PID 1 of the
//!    namespace, goes on to exec, and the child waits for it and exits with
//!    its status ([`exec_pid`] finds the grandchild);
//! 6. with [`Plan::user`]: the privilege drop of [`crate::privilege`]
//!    (no groups, gid, uid, `PR_SET_NO_NEW_PRIVS`), last, in the process
//!    that execs.
//!
//! Everything in the hook runs in the forked child of a possibly
//! multi-threaded parent, so it makes only system calls: no allocation, no
//! locks. What it needs is prepared in the [`Plan`] before the fork.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;

use crate::privilege::Ids;

/// What to do to a child before it execs.
///
/// The descriptors are numbers in the parent: they must stay open until the
/// command has been spawned (the hook runs during the spawn).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Descriptors the child keeps across exec (e.g. key pipes).
    pub inherit: Vec<RawFd>,
    /// Open `cgroup.procs` files of the cgroups to join.
    pub cgroup_procs: Vec<RawFd>,
    /// New mount, IPC, UTS, network and PID namespaces.
    pub namespaces: bool,
    /// Drop to these ids as the last step.
    pub user: Option<Ids>,
}

/// Installs `plan` as the `pre_exec` hook of `cmd`.
pub fn install(cmd: &mut Command, plan: Plan) {
    // SAFETY: `child_setup` makes only system calls and touches no locks or
    // allocator state (the plan's vectors were allocated before the fork
    // and are only read; errors are built from errno without allocating).
    unsafe {
        cmd.pre_exec(move || child_setup(&plan));
    }
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn child_setup(plan: &Plan) -> io::Result<()> {
    nix::unistd::setsid().map_err(errno)?;
    crate::process::forbid_core_dumps().map_err(|e| match e {
        crate::process::DumpError::Dumpable(e) | crate::process::DumpError::CoreLimit(e) => e,
    })?;
    close_on_exec_above_stderr();
    for &fd in &plan.inherit {
        // SAFETY: F_SETFD takes an integer argument and changes only the
        // flags of descriptor `fd` in this (child) process; `fd` is open
        // (the plan's contract) or the call fails with EBADF.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // "0" means the writing process.
    for &fd in &plan.cgroup_procs {
        // SAFETY: the buffer is a static one-byte string, valid for the
        // one byte written; `fd` is an open `cgroup.procs` file (the plan's
        // contract) or the call fails with EBADF.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    if plan.namespaces {
        enter_namespaces()?;
    }
    if let Some(ids) = plan.user {
        crate::privilege::set_ids(ids).map_err(|(_, e)| e)?;
    }
    Ok(())
}

/// Marks every descriptor from 3 up close-on-exec: `close_range` with
/// `CLOSE_RANGE_CLOEXEC` (Linux 5.11), else `F_SETFD` on each descriptor
/// below the soft `RLIMIT_NOFILE` (at most 65,536 tried).
fn close_on_exec_above_stderr() {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: close_range takes integers and only changes the flags of
    // this (child) process's descriptors.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if rc == 0 {
        return;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur.min(65_536) as i32
    } else {
        65_536
    };
    for fd in 3..max {
        // SAFETY: F_GETFD/F_SETFD take integers and change only descriptor
        // flags; a descriptor that is not open fails with EBADF.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Step 5: returns in the grandchild, the namespace's PID 1; the child in
/// between never returns.
fn enter_namespaces() -> io::Result<()> {
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWPID,
    )
    .map_err(errno)?;
    // Mounts made on the host later do not propagate in, ours not out.
    // SAFETY: every pointer is a static NUL-terminated string or null, as
    // mount(2) allows for a propagation change; no memory is written.
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
    // SAFETY: this process has one thread (it is a fork child); the new
    // child only makes system calls (prctl) before returning to std's exec
    // path, and this process only calls close_range, waitpid and _exit.
    match unsafe { nix::unistd::fork() }.map_err(errno)? {
        nix::unistd::ForkResult::Child => {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(errno)?;
            Ok(())
        }
        nix::unistd::ForkResult::Parent { child } => {
            // Close everything but stdio: in particular std's exec-error
            // pipe, whose EOF tells the spawning parent that the exec
            // happened.
            // SAFETY: close_range takes integers and only closes descriptors
            // of this process, none of which is used again here.
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
            crate::process::exit_now(code)
        }
    }
}

/// The host PID of the process a jailed child exec'd: the child itself
/// without namespaces, else its only child (the PID namespace's init),
/// looked for for up to two seconds.
pub fn exec_pid(child_pid: u32, namespaces: bool) -> Option<u32> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::process::Stdio;

    /// The field `name` of `/proc/self/status` as the jailed shell prints it.
    fn field<'a>(status: &'a str, name: &str) -> &'a str {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    }

    /// A shell run under a plan reads a pipe it inherited and reports its
    /// session, ids and limits; a pipe not in the plan stays closed to it.
    #[test]
    fn a_jailed_child_keeps_only_its_descriptors_and_drops_root() {
        let root = nix::unistd::geteuid().is_root();
        let (inherited, mut w) = std::io::pipe().unwrap();
        w.write_all(b"through the pipe").unwrap();
        drop(w);
        let (other, _w2) = std::io::pipe().unwrap();
        let script = format!(
            "cat <&{inh}; echo; cat /proc/self/status; echo core=$(ulimit -c); \
             if (: <&{other}) 2>/dev/null; then echo LEAKED; fi",
            inh = inherited.as_raw_fd(),
            other = other.as_raw_fd(),
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).stdout(Stdio::piped());
        let user = if root {
            Some(Ids::new(65534, 65534).unwrap())
        } else {
            println!("SKIPPED: the privilege drop step needs root");
            None
        };
        install(
            &mut cmd,
            Plan {
                inherit: vec![inherited.as_raw_fd()],
                user,
                ..Plan::default()
            },
        );
        let mut child = cmd.spawn().unwrap();
        drop(inherited);
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(child.wait().unwrap().success(), "{out}");
        assert!(out.starts_with("through the pipe\n"), "{out}");
        assert!(!out.contains("LEAKED"), "{out}");
        assert!(out.contains("\ncore=0\n"), "core limit: {out}");
        if root {
            assert_eq!(field(&out, "Uid:"), "65534\t65534\t65534\t65534", "{out}");
            assert_eq!(field(&out, "Gid:"), "65534\t65534\t65534\t65534", "{out}");
            assert_eq!(field(&out, "Groups:"), "", "{out}");
            assert_eq!(field(&out, "NoNewPrivs:"), "1", "{out}");
        }
    }

    /// A descriptor the spawner holds without close-on-exec (as one its own
    /// parent passed it would be) does not reach the child; the plan's does.
    #[test]
    fn a_descriptor_the_spawner_inherited_does_not_reach_the_child() {
        let (stray, _w) = std::io::pipe().unwrap();
        let (inherited, mut w) = std::io::pipe().unwrap();
        w.write_all(b"planned").unwrap();
        drop(w);
        // SAFETY: F_SETFD on a descriptor this test owns, clearing its
        // close-on-exec flag as a spawner's parent would have left it.
        let rc = unsafe { libc::fcntl(stray.as_raw_fd(), libc::F_SETFD, 0) };
        assert_eq!(rc, 0);
        // Control: without a plan, the stray descriptor reaches a child.
        let probe =
            |fd: i32| format!("if (: <&{fd}) 2>/dev/null; then echo OPEN; else echo CLOSED; fi");
        let out = Command::new("sh")
            .arg("-c")
            .arg(probe(stray.as_raw_fd()))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "OPEN\n",
            "the control"
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "{}; cat <&{}",
                probe(stray.as_raw_fd()),
                inherited.as_raw_fd()
            ))
            .stdout(Stdio::piped());
        install(
            &mut cmd,
            Plan {
                inherit: vec![inherited.as_raw_fd()],
                ..Plan::default()
            },
        );
        let out = cmd.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "CLOSED\nplanned");
    }

    #[test]
    fn the_child_leads_a_session_of_its_own() {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("cat /proc/self/stat")
            .stdout(Stdio::piped());
        install(&mut cmd, Plan::default());
        let mut child = cmd.spawn().unwrap();
        let mut stat = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stat)
            .unwrap();
        assert!(child.wait().unwrap().success());
        // Fields after the command name: state, ppid, pgrp, session. `cat`
        // is in the session the shell (our child) leads.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        assert_eq!(
            fields[3],
            child.id().to_string(),
            "not a session of its own: {stat}"
        );
        let ours = nix::unistd::getsid(None).unwrap().to_string();
        assert_ne!(fields[3], ours);
    }

    #[test]
    fn namespaces_put_the_exec_in_a_pid_namespace_of_its_own() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: new namespaces need root");
            return;
        }
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$; read _ || true")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        install(
            &mut cmd,
            Plan {
                namespaces: true,
                ..Plan::default()
            },
        );
        let mut child = cmd.spawn().unwrap();
        let mut line = [0u8; 2];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut line)
            .unwrap();
        // PID 1 of its namespace, as the shell sees itself.
        assert_eq!(&line, b"1\n");
        let grandchild = exec_pid(child.id(), true).expect("the namespace's init");
        assert_ne!(grandchild, child.id());
        let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
        assert_ne!(ns(grandchild), ns(std::process::id()));
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        assert_eq!(exec_pid(42, false), Some(42));
    }
}
