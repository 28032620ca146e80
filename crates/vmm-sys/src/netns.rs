//! Named network namespaces, as `ip netns` keeps them: a namespace
//! bind-mounted on a file under [`NETNS_DIR`], so it outlives the threads
//! and processes in it, and any thread can enter it by opening that file.
//!
//! [`open_or_create`] returns a descriptor of the namespace named `name`,
//! making it (with a thread that unshares its network namespace and
//! bind-mounts it) when the file is missing or is not a namespace mount.
//! [`run_in`] runs a closure on a thread of its own that entered the
//! namespace, so the caller's thread never changes namespace; what that
//! closure creates (sockets, taps) keeps the namespace it was made in.
//! [`set_link_up`] sets an interface of the calling thread's namespace up.
//! Names are checked here before any system call. Which namespaces, and
//! what is configured in them, is the caller's.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// Where named network namespaces are bind-mounted (as `ip netns` does).
pub const NETNS_DIR: &str = "/run/netns";

/// Longest namespace name, in bytes.
pub const MAX_NETNS_NAME_LEN: usize = 64;

/// `SIOCGIFFLAGS` and `SIOCSIFFLAGS`.
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
/// Size of `struct ifreq` on x86_64: the name, then a union whose member
/// for the flag requests is a native-endian short.
const IFREQ_LEN: usize = 40;

/// Why a namespace could not be opened, made, entered or removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// misuse: the name is empty, longer than [`MAX_NETNS_NAME_LEN`] bytes,
    /// or holds a byte other than `a-z`, `0-9`, `-`, `_`, `.`, or is `.` or `..`
    #[error("invalid network namespace name")]
    Name,
    /// the namespace directory or file could not be made or opened
    #[error("preparing {0}")]
    File(PathBuf, #[source] io::Error),
    /// the kernel refused to make a network namespace
    #[error("making a network namespace")]
    Unshare(#[source] io::Error),
    /// the new namespace could not be bind-mounted on its file
    #[error("bind-mounting the network namespace on {0}")]
    Mount(PathBuf, #[source] io::Error),
    /// the file is not a network namespace after all
    #[error("{0} is not a network namespace")]
    NotANamespace(PathBuf),
    /// a thread could not enter the namespace
    #[error("entering the network namespace")]
    Enter(#[source] io::Error),
    /// the thread that worked in the namespace could not be run or panicked
    #[error("the thread working in the network namespace failed")]
    Thread,
}

/// Whether `name` may name a namespace file under [`NETNS_DIR`].
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NETNS_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

fn path_of(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Whether `file` is a namespace (an `nsfs` inode), not the plain file a
/// bind mount would cover.
fn is_namespace(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

fn open_file(path: &std::path::Path) -> Result<File, NetnsError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| NetnsError::File(path.to_owned(), e))
}

/// Opens the network namespace `name` under [`NETNS_DIR`], making it when
/// it does not exist. The second value says whether it was made now.
pub fn open_or_create(name: &str) -> Result<(OwnedFd, bool), NetnsError> {
    if !valid_name(name) {
        return Err(NetnsError::Name);
    }
    let path = path_of(name);
    if path.exists() {
        let file = open_file(&path)?;
        if is_namespace(&file) {
            return Ok((file.into(), false));
        }
    }
    std::fs::create_dir_all(NETNS_DIR)
        .map_err(|e| NetnsError::File(PathBuf::from(NETNS_DIR), e))?;
    // The mount point: an empty file, as `ip netns add` makes it.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o444)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| NetnsError::File(path.clone(), e))?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> Result<(), NetnsError> {
        // Changes this thread only, which ends here.
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Unshare(errno(e)))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| NetnsError::Mount(target.clone(), errno(e)))
    })
    .join()
    .map_err(|_| NetnsError::Thread)?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    let file = open_file(&path)?;
    if !is_namespace(&file) {
        return Err(NetnsError::NotANamespace(path));
    }
    Ok((file.into(), true))
}

/// Removes the namespace file `name` (unmounting the namespace first); the
/// namespace itself lives on while a thread, socket or descriptor holds it.
/// A missing file is not an error.
pub fn remove(name: &str) -> Result<(), NetnsError> {
    if !valid_name(name) {
        return Err(NetnsError::Name);
    }
    let path = path_of(name);
    if !path.exists() {
        return Ok(());
    }
    // Not mounted (a file left behind) is fine: the file goes either way.
    let _ = nix::mount::umount2(&path, MntFlags::MNT_DETACH);
    std::fs::remove_file(&path).map_err(|e| NetnsError::File(path, e))
}

/// Runs `f` on a new thread that entered the network namespace `ns`, and
/// returns its result; the calling thread stays where it is.
pub fn run_in<T, F>(ns: BorrowedFd<'_>, f: F) -> Result<T, NetnsError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(ns, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetnsError::Enter(errno(e)))?;
                Ok(f())
            })
            .join()
            .map_err(|_| NetnsError::Thread)?
    })
}

/// Sets the interface `name` of the calling thread's network namespace up.
pub fn set_link_up(name: &str) -> io::Result<()> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if cname.as_bytes().len() > libc::IFNAMSIZ - 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(errno)?;
    let mut req = [0u8; IFREQ_LEN];
    req[..cname.as_bytes().len()].copy_from_slice(cname.as_bytes());
    // SAFETY: SIOCGIFFLAGS reads and writes one `struct ifreq`; `req` is a
    // live, writable buffer of exactly that size for the whole call, its
    // name NUL-terminated (checked above), and `sock` an open socket.
    let rc = unsafe { libc::ioctl(sock.as_fd().as_raw_fd(), SIOCGIFFLAGS, req.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut flags = libc::c_short::from_ne_bytes([req[libc::IFNAMSIZ], req[libc::IFNAMSIZ + 1]]);
    flags |= libc::IFF_UP as libc::c_short;
    req[libc::IFNAMSIZ..libc::IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: as above, SIOCSIFFLAGS reads one `struct ifreq` from the
    // live buffer `req` of exactly that size.
    let rc = unsafe { libc::ioctl(sock.as_fd().as_raw_fd(), SIOCSIFFLAGS, req.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_system_call() {
        for name in ["", ".", "..", "a/b", "A", "a b", &"x".repeat(65)] {
            assert!(
                matches!(open_or_create(name), Err(NetnsError::Name)),
                "{name:?}"
            );
            assert!(matches!(remove(name), Err(NetnsError::Name)), "{name:?}");
        }
        assert!(valid_name("nitrile-dp-h1"));
    }

    /// A namespace is made once, opened again by name, entered by a thread
    /// of its own (its `lo` is not the caller's), and removed.
    #[test]
    fn a_namespace_is_made_entered_and_removed() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: making a network namespace needs root");
            return;
        }
        let name = format!("nitrile-sys-test-{}", std::process::id());
        let (ns, made) = open_or_create(&name).unwrap();
        assert!(made);
        let (again, made) = open_or_create(&name).unwrap();
        assert!(!made);
        let inode = |fd: BorrowedFd<'_>| nix::sys::stat::fstat(fd).unwrap().st_ino;
        assert_eq!(inode(ns.as_fd()), inode(again.as_fd()));
        let mine = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let theirs = run_in(ns.as_fd(), || {
            set_link_up("lo").unwrap();
            std::fs::read_link("/proc/thread-self/ns/net").unwrap()
        })
        .unwrap();
        assert_ne!(mine, theirs);
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            mine
        );
        remove(&name).unwrap();
        assert!(!path_of(&name).exists());
        remove(&name).unwrap();
    }
}
