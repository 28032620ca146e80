//! The unsafe system code of nitrile's VMMs that is not KVM itself, in one
//! place, behind small safe APIs.
//!
//! It guarantees, for each module:
//! - [`locked`]: a secret ([`Locked<T>`]) lives alone on pages of its own,
//!   locked in RAM and left out of core dumps for its whole life, and every
//!   byte of those pages is zeroed when it is dropped; it is never printed.
//! - [`privilege`]: the one privilege drop of both backends' jails (no
//!   groups, unprivileged gid and uid, `PR_SET_NO_NEW_PRIVS`, ids read back),
//!   refused in a process with more than one thread, where it could not be
//!   complete.
//! - [`jail`]: the steps applied between `fork` and `exec` to every process
//!   a backend starts (own session, no core dumps, exactly the inherited
//!   descriptors, cgroups, namespaces, the privilege drop), using only
//!   system calls in the child.
//! - [`pidfd`]: a process handle that a recycled pid cannot fool: signals
//!   through it never reach a later process with the same pid.
//! - [`tap`]: tap devices, with the interface name checked before any
//!   system call.
//! - [`ipv4`]: an interface's IPv4 address and the default route (the
//!   host's init configures its network with them).
//! - [`netns`]: named network namespaces (made, opened, entered by a
//!   thread of their own, removed) and setting an interface up.
//! - [`packet`]: `AF_PACKET` sockets that read and write the frames of
//!   exactly one interface, receiving nothing before they are bound to it.
//! - [`fd`]: inherited descriptors become owned exactly once; non-blocking
//!   mode.
//! - [`process`]: no core dumps (not dumpable, `RLIMIT_CORE` 0) and an
//!   immediate exit.
//! - [`timer`]: a periodic signal to one thread, to interrupt `KVM_RUN`.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment naming each invariant
//! it relies on (`clippy::undocumented_unsafe_blocks` is denied, and so is
//! `unsafe_op_in_unsafe_fn`); no public function is `unsafe`. What stays
//! the caller's: the descriptor numbers of a [`jail::Plan`] must be open
//! until the spawn, and [`fd::take_inherited`] trusts that no code of the
//! process opened a descriptor without close-on-exec and owns it elsewhere.
//!
//! What it does not do: KVM ioctls and guest memory (that unsafe code stays
//! in `nitrile-vmm-kvm`, next to the device model it serves), seccomp
//! filters (built and installed through `seccompiler`'s safe API), and any
//! policy: which ids, which descriptors, which names are the callers' to
//! choose. Linux on x86_64 only.

// Holding the unsafe code is this crate's purpose; see the paragraph above.
#![allow(unsafe_code)]

pub mod fd;
pub mod ipv4;
pub mod jail;
pub mod locked;
pub mod netns;
pub mod packet;
pub mod pidfd;
pub mod privilege;
pub mod process;
pub mod tap;
pub mod timer;

pub use locked::{LockError, Locked};
pub use pidfd::PidFd;
pub use privilege::{Ids, PrivilegeError};
