//! File descriptors: taking ownership of those inherited by number, and
//! making one non-blocking.
//!
//! A process started with descriptors passed by number (`--spec-fd 3`) must
//! turn each number into an owned descriptor exactly once, and never one it
//! already owns in another form. [`take_inherited`] refuses the standard
//! streams, numbers that are not open, and descriptors marked close-on-exec:
//! the parent clears that flag on exactly the descriptors it passes (see
//! [`crate::jail::Plan::inherit`]), while every descriptor the standard
//! library opens carries it. Taking a descriptor sets the flag, under a
//! lock, so a number is never taken twice. What remains the caller's
//! contract: no code of this process opened the descriptor without
//! close-on-exec (as a raw `libc::open` would) and owns it elsewhere.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// Why an inherited descriptor number cannot be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FdError {
    /// misuse: 0, 1 and 2 are the standard streams
    #[error("descriptor {0} is a standard stream")]
    Standard(RawFd),
    /// no such open descriptor
    #[error("descriptor {0} is not open")]
    NotOpen(RawFd),
    /// the descriptor is close-on-exec: opened by this process, or taken
    /// already
    #[error("descriptor {0} was not inherited, or was taken already")]
    NotInherited(RawFd),
    /// its flags could not be changed
    #[error("setting close-on-exec on descriptor {fd}")]
    Flags {
        /// the descriptor
        fd: RawFd,
        /// the cause
        #[source]
        source: io::Error,
    },
}

/// Serialises takes, so that two threads cannot both see a descriptor
/// without close-on-exec and take it.
static TAKING: Mutex<()> = Mutex::new(());

/// Takes ownership of descriptor `fd`, inherited from the parent process,
/// and makes it close-on-exec. See the [module documentation](self).
pub fn take_inherited(fd: RawFd) -> Result<OwnedFd, FdError> {
    if (0..=2).contains(&fd) {
        return Err(FdError::Standard(fd));
    }
    if fd < 0 {
        return Err(FdError::NotOpen(fd));
    }
    let _guard = TAKING.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: F_GETFD takes no pointer and only reads the descriptor's flags
    // (or fails with EBADF).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(FdError::NotOpen(fd));
    }
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(FdError::NotInherited(fd));
    }
    // SAFETY: F_SETFD takes an integer and only changes the flags of `fd`,
    // which is open (checked above, under the lock).
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } != 0 {
        return Err(FdError::Flags {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is open and was not close-on-exec: by this module's
    // contract it was inherited and no owner exists in this process; it now
    // is close-on-exec, so no later call takes it again. This is its only
    // owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets `O_NONBLOCK` on the open file description of `fd`.
pub fn set_nonblocking(fd: impl AsFd) -> io::Result<()> {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: F_GETFL takes no pointer and only reads the status flags of
    // `fd`, which is open (borrowed for the duration of this function).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an integer and only changes the status flags of
    // the open descriptor `fd`.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A pipe whose read end has close-on-exec cleared, as after exec from a
    /// parent that passed it.
    fn inherited_pipe() -> (OwnedFd, std::io::PipeWriter) {
        let (r, w) = std::io::pipe().unwrap();
        let r = OwnedFd::from(r);
        nix::fcntl::fcntl(
            &r,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        (r, w)
    }

    #[test]
    fn an_inherited_descriptor_is_taken_once() {
        let (r, mut w) = inherited_pipe();
        // Hand the number over, as a parent does on the command line.
        let n = r.as_raw_fd();
        std::mem::forget(r);
        let taken = take_inherited(n).unwrap();
        assert!(matches!(take_inherited(n), Err(FdError::NotInherited(_))));
        w.write_all(b"spec").unwrap();
        drop(w);
        let mut got = String::new();
        std::fs::File::from(taken).read_to_string(&mut got).unwrap();
        assert_eq!(got, "spec");
    }

    #[test]
    fn other_descriptors_are_refused() {
        for fd in [0, 1, 2] {
            assert!(matches!(take_inherited(fd), Err(FdError::Standard(_))));
        }
        assert!(matches!(take_inherited(987_654), Err(FdError::NotOpen(_))));
        assert!(matches!(take_inherited(-5), Err(FdError::NotOpen(_))));
        // Opened by this process (close-on-exec): owned elsewhere, refused.
        let file = tempfile_in_proc();
        assert!(matches!(
            take_inherited(file.as_raw_fd()),
            Err(FdError::NotInherited(_))
        ));
    }

    fn tempfile_in_proc() -> std::fs::File {
        std::fs::File::open("/proc/self/status").unwrap()
    }

    #[test]
    fn nonblocking_reads_do_not_wait() {
        let (r, _w) = std::io::pipe().unwrap();
        set_nonblocking(&r).unwrap();
        let mut buf = [0u8; 1];
        let err = (&r).read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    }
}
