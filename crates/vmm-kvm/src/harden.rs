//! Process hardening for the VMM: not dumpable (no `/proc/<pid>/mem` or
//! ptrace for other users, no core), `RLIMIT_CORE` 0, and a seccomp allowlist
//! for the vCPU thread, built with `seccompiler`. Anything outside the list
//! kills the whole process.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Why hardening failed; the VMM must not run a guest then.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardenError {
    /// `prctl(PR_SET_DUMPABLE, 0)` failed.
    #[error("prctl(PR_SET_DUMPABLE, 0) failed")]
    Dumpable(#[source] std::io::Error),
    /// `setrlimit(RLIMIT_CORE, 0)` failed.
    #[error("setrlimit(RLIMIT_CORE, 0) failed")]
    CoreLimit(#[source] std::io::Error),
    /// The seccomp filter could not be built or installed.
    #[error("seccomp filter")]
    Seccomp(#[from] seccompiler::Error),
    /// The seccomp filter could not be compiled.
    #[error("seccomp filter compilation")]
    SeccompBackend(#[from] seccompiler::BackendError),
}

/// Makes the process non-dumpable and sets its core size limit to zero
/// (the jails' one implementation, [`nitrile_vmm_sys::process::forbid_core_dumps`]).
pub fn harden_process() -> Result<(), HardenError> {
    use nitrile_vmm_sys::process::{DumpError, forbid_core_dumps};
    forbid_core_dumps().map_err(|e| match e {
        DumpError::Dumpable(e) => HardenError::Dumpable(e),
        DumpError::CoreLimit(e) => HardenError::CoreLimit(e),
        other => HardenError::Dumpable(std::io::Error::other(other)),
    })
}

/// System calls the vCPU thread may make without conditions once the VM is
/// built: device emulation (positioned file I/O, serial writes, Unix socket
/// I/O for vsock, allocation) and exit.
const VCPU_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_close,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // The receive poll timer (`Vmm::run`): its signal handler and the
    // per-thread POSIX timer that interrupts `KVM_RUN`.
    libc::SYS_rt_sigaction,
    libc::SYS_gettid,
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_delete,
];

/// `KVM_RUN`, `_IO(0xAE, 0x80)`.
const KVM_RUN: u64 = 0xae80;
/// `KVM_IRQ_LINE`, `_IOW(0xAE, 0x61, struct kvm_irq_level)`: device
/// interrupts are signalled from the vCPU thread.
const KVM_IRQ_LINE: u64 = 0x4008_ae61;

/// The vCPU thread's allowlist; every other system call, `ioctl` other than
/// `KVM_RUN`, `KVM_IRQ_LINE` and `FIONBIO`, `fcntl` other than getting and setting flags,
/// and `socket` other than `AF_UNIX` stream sockets
/// kill the process.
pub fn vcpu_filter() -> Result<BpfProgram, HardenError> {
    use seccompiler::{
        SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompRule as Rule,
    };
    let mut rules: BTreeMap<i64, Vec<Rule>> =
        VCPU_SYSCALLS.iter().map(|&nr| (nr, Vec::new())).collect();
    rules.insert(
        libc::SYS_ioctl,
        vec![
            Rule::new(vec![Cond::new(1, Len::Dword, Op::Eq, KVM_RUN)?])?,
            Rule::new(vec![Cond::new(1, Len::Dword, Op::Eq, KVM_IRQ_LINE)?])?,
            Rule::new(vec![Cond::new(1, Len::Dword, Op::Eq, libc::FIONBIO)?])?,
        ],
    );
    rules.insert(
        libc::SYS_fcntl,
        [libc::F_GETFL, libc::F_SETFL, libc::F_GETFD, libc::F_SETFD]
            .into_iter()
            .map(|cmd| Rule::new(vec![Cond::new(1, Len::Dword, Op::Eq, cmd as u64)?]))
            .collect::<Result<Vec<_>, _>>()?,
    );
    rules.insert(
        libc::SYS_socket,
        vec![Rule::new(vec![
            Cond::new(0, Len::Dword, Op::Eq, libc::AF_UNIX as u64)?,
            Cond::new(1, Len::Dword, Op::MaskedEq(0xff), libc::SOCK_STREAM as u64)?,
        ])?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// Installs the vCPU allowlist on the calling thread (irreversible).
pub fn confine_vcpu_thread() -> Result<(), HardenError> {
    let program = vcpu_filter()?;
    seccompiler::apply_filter(&program)?;
    Ok(())
}
