//! The hypervisor boundary of a nitrile host.
//!
//! This crate guarantees that hostd can drive a microVM only through the small,
//! closed [`Hypervisor`] trait: create from a validated [`VmSpec`], supply
//! the volumes' sealed keys, start, stop, status, destroy, and take over a VM
//! that an earlier backend process left running (adopt, detach_all; the qemu
//! backend only, see [`qemu`]). No method reads guest memory,
//! disk contents or the console, and there is no pass-through for arbitrary
//! hypervisor commands. Specs are parsed strictly ([`VmSpec::parse_json`],
//! bounded by [`MAX_SPEC_LEN`]).
//!
//! No plaintext volume key passes through the trait or the host agent
//! ([`unlock`]): the process that serves a VM's volumes (`nitrile vmm`, or
//! the QEMU launcher) makes one ephemeral recipient key pair per volume;
//! [`Hypervisor::create`] returns their public halves, the host has the key
//! service seal each volume's data key to its recipient, and
//! [`Hypervisor::supply_keys`] relays the sealed keys, which that process
//! opens into locked, zeroized memory ([`VolumeKey`], never printed) before
//! the VM may start. An instance-store disk ([`ScratchSpec`]) gets a key the
//! process generates itself, which never leaves it and dies with it; the
//! backend removes the disk's backing file when the VM ends.
//!
//! Backends are chosen by [`select`] from facts about the host
//! ([`HostProbe`]): `kvm` ([`KvmBackend`], the separate, jailed `nitrile vmm`
//! process; `auto` picks it only where `/dev/kvm` is hardware KVM and the
//! binary is configured) or `qemu` ([`QemuBackend`], KVM acceleration where it
//! is usable, TCG otherwise).
//!
//! What it does not do: the QEMU backend has no network device yet and
//! refuses specs asking for one (vsock is served over vhost-user); its jail is
//! described, step by step, in the [`qemu`] module documentation, including
//! what is not jailed.
//! This crate does not decide who may create a VM (hostd does, from tokens) and
//! does not talk to the key service (hostd relays the sealed keys).

// No unsafe code here. The four things that need it are in
// `nitrile-vmm-sys`, behind safe APIs: the locked page of a volume key
// (key.rs), the pre-exec jail of the QEMU launcher, vsock daemon and
// `nitrile vmm` processes (qemu/, kvm/), the pidfds that track them
// (process.rs), and opening tap devices (kvm/).
#![forbid(unsafe_code)]

pub mod control;
mod key;
pub mod kvm;
mod process;
pub mod qemu;
mod select;
mod spec;
pub mod unlock;

use std::fmt;
use std::io;
use std::path::PathBuf;

use nitrile_api::Name;

pub use key::{KeyError, VOLUME_KEY_LEN, VolumeKey};
pub use kvm::KvmBackend;
pub use process::{MAX_RECORD_LEN, RecordError};
pub use qemu::{JailConfig, QemuBackend};
pub use select::{Accel, Backend, BackendChoice, HostProbe, KvmDevice, Unavailable, select};
pub use spec::{
    Cmdline, HostPath, ImageDigest, ImageSpec, MAX_CMDLINE_LEN, MAX_MEMORY_MIB, MAX_PATH_LEN,
    MAX_SPEC_LEN, MAX_TAP_NAME_LEN, MAX_VCPUS, MAX_VOLUME_MIB, MAX_VOLUMES, MIN_MEMORY_MIB,
    NetSpec, SCRATCH_DISK_ID, ScratchSpec, SpecError, TapName, VmSpec, VolumeSpec, VsockSpec,
    derived_mac,
};
pub use unlock::{
    CreatedVm, RecipientPublicKey, SealedKey, SealedVolumeKeys, UnlockError, VolumeRecipient,
};

/// Identifies a VM within one backend: the instance name of its spec.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(Name);

impl VmId {
    /// The VM id of an instance.
    pub fn new(instance: Name) -> Self {
        Self(instance)
    }

    /// The instance name.
    pub fn name(&self) -> &Name {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a VM is doing, as far as the backend can tell without looking inside.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmStatus {
    /// Created; its VMM waits for its volumes' sealed keys
    /// ([`Hypervisor::supply_keys`]) and cannot start before.
    AwaitingKeys,
    /// Created (every volume's key open), vCPUs not started.
    Created,
    /// vCPUs running.
    Running,
    /// Stopped by [`Hypervisor::stop`] or by the guest powering off.
    Stopped,
    /// The VMM died or refused to run; `reason` comes from the VMM, not the guest.
    Failed {
        /// What went wrong.
        reason: String,
    },
}

/// A guest feature a backend does not provide (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Feature {
    /// virtio-vsock.
    Vsock,
    /// virtio-net on a tap device.
    Net,
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Feature::Vsock => "vsock",
            Feature::Net => "net",
        })
    }
}

/// Why a hypervisor call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmmError {
    /// the requested backend cannot run on this host
    #[error("backend {backend} is unavailable: {reason}")]
    BackendUnavailable {
        /// `kvm` or `qemu`
        backend: &'static str,
        /// why
        reason: Unavailable,
    },
    /// the spec asks for a device this backend does not provide
    #[error("the {backend} backend does not support {feature} devices yet")]
    Unsupported {
        /// the backend
        backend: &'static str,
        /// the missing feature
        feature: Feature,
    },
    /// caller misuse: a VM with this id already exists
    #[error("VM {0} already exists")]
    AlreadyExists(VmId),
    /// caller misuse: no VM with this id
    #[error("no VM {0}")]
    UnknownVm(VmId),
    /// caller misuse: a volume of the spec has no sealed key
    #[error("volume {0} has no key")]
    MissingKey(Name),
    /// caller misuse: a key was given for a volume the spec does not have
    #[error("a key was given for volume {0}, which the spec does not attach")]
    UnexpectedKey(Name),
    /// the volume-key exchange with the VMM failed (its recipients, or the
    /// relay of the sealed keys)
    #[error("volume keys")]
    Unlock(#[from] UnlockError),
    /// caller misuse: the VM is not in a state that allows the call
    #[error("VM {vm} is {state:?}; cannot {op}")]
    WrongState {
        /// the VM
        vm: VmId,
        /// its state
        state: VmStatus,
        /// the refused operation
        op: &'static str,
    },
    /// a host file or directory operation failed
    #[error("{what} {path}")]
    Io {
        /// what was being done
        what: &'static str,
        /// on which path
        path: DisplayPath,
        /// the cause
        #[source]
        source: io::Error,
    },
    /// the VMM or a helper program could not be started
    #[error("could not start {program}")]
    Spawn {
        /// the program
        program: DisplayPath,
        /// the cause
        #[source]
        source: io::Error,
    },
    /// a helper program (e.g. `qemu-img`) failed
    #[error("{program} failed ({status}): {stderr}")]
    Helper {
        /// the program
        program: DisplayPath,
        /// its exit status
        status: std::process::ExitStatus,
        /// the end of its standard error (never contains key material)
        stderr: String,
    },
    /// the VMM exited while being set up
    #[error("the VMM exited during setup ({status}): {stderr}")]
    VmmExited {
        /// its exit status
        status: std::process::ExitStatus,
        /// the end of its standard error (VMM diagnostics, not guest output)
        stderr: String,
    },
    /// the VMM's control channel misbehaved
    #[error("VMM control channel: {0}")]
    Control(#[from] qemu::QmpError),
    /// the `nitrile vmm` control channel misbehaved
    #[error("VMM control channel")]
    KvmControl(#[from] kvm::control::ControlError),
    /// the VMM did not become ready in time
    #[error("the VMM did not become ready within {0:?}")]
    Timeout(std::time::Duration),
    /// a process of an adopted VM (not our child, so its exit status is
    /// unknown) has ended
    #[error("{program} has exited: {stderr}")]
    ProcessGone {
        /// the program
        program: DisplayPath,
        /// the end of its standard error (never guest output)
        stderr: String,
    },
    /// the adoption record in a VM's state directory cannot be used (it was
    /// not written by this crate, or was changed since)
    #[error("unusable adoption record {path}")]
    Record {
        /// the record file
        path: DisplayPath,
        /// why
        #[source]
        source: RecordError,
    },
    /// this backend cannot take over VMs left by an earlier backend process
    #[error("the {backend} backend cannot adopt running VMs")]
    AdoptionUnsupported {
        /// the backend
        backend: &'static str,
    },
}

/// A path shown in an error message.
#[derive(Debug)]
pub struct DisplayPath(pub PathBuf);

impl fmt::Display for DisplayPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// The only way hostd drives a microVM.
///
/// Implementations must not offer any other channel into the VM: no method
/// here, or added to an implementation, reads guest memory, disk contents or
/// the console. Calls for one VM may block for a few seconds (the VMM
/// starting, a graceful stop); callers in async code use `spawn_blocking`.
pub trait Hypervisor: Send + Sync {
    /// Creates the VM (vCPUs not running); its id is its instance name.
    ///
    /// The VMM process makes one recipient key pair per volume of the spec
    /// and the public halves are returned, in the spec's volume order
    /// ([`CreatedVm`]). Without volumes the VM is then `Created`; with
    /// volumes it is [`VmStatus::AwaitingKeys`] until
    /// [`supply_keys`](Self::supply_keys).
    fn create(&self, spec: &VmSpec) -> Result<CreatedVm, VmmError>;
    /// Relays each volume's data key, sealed to the recipient
    /// [`create`](Self::create) returned for it, to the VMM, which opens
    /// them; returns once the VM is `Created` (every key open, devices
    /// attached). A missing or extra key is refused before anything is
    /// relayed ([`VmmError::MissingKey`], [`VmmError::UnexpectedKey`]); a
    /// key that does not open ends the VMM, and the VM is forgotten as if
    /// its creation had failed.
    fn supply_keys(&self, id: &VmId, keys: SealedVolumeKeys) -> Result<(), VmmError>;
    /// Starts (or resumes) the vCPUs; refused while the VM awaits its keys.
    fn start(&self, id: &VmId) -> Result<(), VmmError>;
    /// Stops the VM: the VMM process ends, and with it every key it held;
    /// volumes stay on disk, the instance-store disk's backing file is
    /// removed.
    fn stop(&self, id: &VmId) -> Result<(), VmmError>;
    /// What the VM is doing.
    fn status(&self, id: &VmId) -> Result<VmStatus, VmmError>;
    /// Stops the VM if needed and removes all its host state except volumes.
    fn destroy(&self, id: &VmId) -> Result<(), VmmError>;
    /// Takes over the VM of `spec.instance()` that an earlier backend
    /// process, using the same state directory, created and left running
    /// (see [`detach_all`](Self::detach_all)); `spec` must be the spec it
    /// was created from.
    ///
    /// If its VMM still runs, this backend controls it from now on exactly
    /// as if it had created it, and `Running` or `Created` is returned. If
    /// not, its leftover host state is removed as by
    /// [`destroy`](Self::destroy) (volumes stay), the VM stays known as
    /// ended, and `Stopped` is returned, or `Failed` with the reason the
    /// VMM itself left in its own diagnostics (never guest output). A
    /// process is recognised by its pid and start time, so a recycled pid is
    /// never taken for the VMM, and no signal is sent to such a process.
    ///
    /// Errors: [`VmmError::UnknownVm`] when there is no trace of the VM,
    /// [`VmmError::AlreadyExists`] when this backend already has it,
    /// [`VmmError::AdoptionUnsupported`] from a backend that cannot adopt.
    fn adopt(&self, spec: &VmSpec) -> Result<VmStatus, VmmError>;
    /// Leaves every VM running when this backend is dropped, so that a later
    /// backend process can [`adopt`](Self::adopt) them (e.g. hostd being
    /// replaced). Without it, dropping a backend stops its VMs. It changes
    /// nothing else: calls keep working until the drop. In a backend that
    /// can adopt, VMMs never depend on the process that started them: they
    /// run in their own session and are not killed when it dies, even by
    /// `SIGKILL`. In one that cannot ([`VmmError::AdoptionUnsupported`]),
    /// this does nothing and VMs are stopped on drop as before.
    fn detach_all(&self);

    /// Whether this backend's VMs outlive the agent after
    /// [`Hypervisor::detach_all`] (so a successor adopts them).
    fn vms_outlive_agent(&self) -> bool;
}
