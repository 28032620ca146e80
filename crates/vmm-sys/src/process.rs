//! The process-wide switches of a jailed VMM: no core dumps, and ending the
//! process at once.

use std::io;

/// Why core dumps could not be forbidden; the VMM must not run a guest then.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DumpError {
    /// `prctl(PR_SET_DUMPABLE, 0)` failed
    #[error("prctl(PR_SET_DUMPABLE, 0) failed")]
    Dumpable(#[source] io::Error),
    /// `setrlimit(RLIMIT_CORE, 0)` failed
    #[error("setrlimit(RLIMIT_CORE, 0) failed")]
    CoreLimit(#[source] io::Error),
}

/// Makes the process non-dumpable (no core file; `/proc/<pid>/mem` and
/// ptrace closed to every other process of its uid) and sets its core size
/// limit to zero, soft and hard, which survives `exec`.
///
/// Changing the process's ids resets "dumpable": call it again after
/// [`crate::privilege::drop_privileges`]. It allocates nothing, so the
/// pre-exec jail calls it between `fork` and `exec` too.
pub fn forbid_core_dumps() -> Result<(), DumpError> {
    let errno = |e: nix::Error| io::Error::from_raw_os_error(e as i32);
    nix::sys::prctl::set_dumpable(false).map_err(|e| DumpError::Dumpable(errno(e)))?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| DumpError::CoreLimit(errno(e)))
}

/// Ends the process now with `code`: no destructors, no `atexit` handlers,
/// no flushing of buffers (one system call, `exit_group`, which a seccomp
/// allowlist can admit alone).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` has no preconditions; it ends the process and never
    // returns, so nothing after it relies on any state.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forked_child_forbids_its_core_dumps() {
        // SAFETY: the child (one thread) makes only system calls and ends
        // with `_exit`, never returning into the harness.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = match forbid_core_dumps() {
                    Err(_) => 1,
                    Ok(()) if nix::sys::prctl::get_dumpable() != Ok(false) => 2,
                    Ok(()) => match nix::sys::resource::getrlimit(
                        nix::sys::resource::Resource::RLIMIT_CORE,
                    ) {
                        Ok((0, 0)) => 0,
                        _ => 3,
                    },
                };
                exit_now(code)
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
