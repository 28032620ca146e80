//! Choosing a backend from facts about the host.
//!
//! [`HostProbe::detect`] gathers the facts (the only I/O here); [`select`] is a
//! pure function of them, so every branch is tested.
//!
//! The `kvm` backend is the separate `nitrile vmm` process
//! ([`KvmBackend`](crate::KvmBackend)); the `qemu` backend starts QEMU
//! through the `nitrile qemu-launch` launcher, which holds the volume keys
//! ([`QemuBackend`](crate::QemuBackend)). Both need the `nitrile` binary:
//! hostd configures its path in [`HostProbe::vmm_binary`] (by default the
//! running executable when it is `nitrile`, see
//! [`HostProbe::default_vmm_binary`]). An explicit
//! `kvm` choice needs the binary and an openable `/dev/kvm` (the `kvm_pvm`
//! software hypervisor included: it runs the test guest); `auto` picks `kvm`
//! only on hardware KVM, since Linux guests are unusable under `kvm_pvm`, and
//! otherwise falls through to QEMU, saying why.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::VmmError;

/// Which kind of `/dev/kvm` the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmDevice {
    /// No `/dev/kvm` (or it cannot be opened).
    Absent,
    /// `/dev/kvm` is served by the `kvm_pvm` module: a software hypervisor
    /// that runs tiny guests but not Linux at usable speed.
    Pvm,
    /// Hardware-assisted KVM (VT-x / AMD-V).
    Hardware,
}

/// Facts about the host that decide the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProbe {
    /// The kind of `/dev/kvm`.
    pub kvm: KvmDevice,
    /// The `nitrile` binary (`nitrile vmm`, `nitrile qemu-launch`), if
    /// configured.
    pub vmm_binary: Option<PathBuf>,
    /// The QEMU system emulator, if installed.
    pub qemu_binary: Option<PathBuf>,
}

impl HostProbe {
    /// The default `nitrile vmm` binary: the running executable, when its
    /// file name is `nitrile`.
    pub fn default_vmm_binary() -> Option<PathBuf> {
        std::env::current_exe()
            .ok()
            .filter(|p| p.file_name().is_some_and(|n| n == "nitrile"))
    }

    /// Looks at `/dev/kvm`, `/sys/module` and `/proc/modules`, and checks that
    /// the given binaries exist.
    pub fn detect(vmm_binary: Option<&Path>, qemu_binary: Option<&Path>) -> Self {
        let kvm = if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            KvmDevice::Absent
        } else if Path::new("/sys/module/kvm_pvm").exists()
            || std::fs::read_to_string("/proc/modules")
                .map(|m| m.lines().any(|l| l.split(' ').next() == Some("kvm_pvm")))
                .unwrap_or(false)
        {
            KvmDevice::Pvm
        } else {
            KvmDevice::Hardware
        };
        let existing = |p: Option<&Path>| p.filter(|p| p.is_file()).map(Path::to_path_buf);
        Self {
            kvm,
            vmm_binary: existing(vmm_binary),
            qemu_binary: existing(qemu_binary),
        }
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// The first backend that works: `kvm`, else `qemu`.
    Auto,
    /// Only `nitrile vmm`.
    Kvm,
    /// Only QEMU.
    Qemu,
}

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware KVM.
    Kvm,
    /// QEMU's software translator.
    Tcg,
}

impl Accel {
    pub(crate) fn qemu_arg(self) -> &'static str {
        match self {
            // Bound TCG's translation cache (default 1 GiB) so the per-VM
            // memory limit holds.
            Accel::Tcg => "tcg,tb-size=64",
            Accel::Kvm => "kvm",
        }
    }
}

/// The chosen backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `nitrile vmm`, at this path.
    Kvm {
        /// the `nitrile vmm` binary
        vmm_binary: PathBuf,
    },
    /// QEMU, at this path, with this accelerator, started by the launcher.
    Qemu {
        /// the QEMU binary
        qemu_binary: PathBuf,
        /// the accelerator
        accel: Accel,
        /// the `nitrile` binary, run as `nitrile qemu-launch`
        launcher: PathBuf,
    },
}

/// Why a backend cannot run here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unavailable {
    /// `/dev/kvm` is missing or cannot be opened.
    NoKvmDevice,
    /// `/dev/kvm` is the `kvm_pvm` software hypervisor.
    KvmIsPvm,
    /// The `nitrile` binary path (`nitrile vmm`, the QEMU launcher) is not
    /// configured (or does not exist).
    NoVmmBinary,
    /// The QEMU binary is not installed.
    NoQemu,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unavailable::NoKvmDevice => "/dev/kvm is missing or cannot be opened",
            Unavailable::KvmIsPvm => {
                "/dev/kvm is kvm_pvm, a software hypervisor not usable for Linux guests"
            }
            Unavailable::NoVmmBinary => {
                "the nitrile binary path (nitrile vmm, nitrile qemu-launch) is not configured"
            }
            Unavailable::NoQemu => "qemu-system-x86_64 is not installed",
        })
    }
}

/// The `kvm` backend if `/dev/kvm` opens and the binary is configured;
/// `hardware_only` also refuses `kvm_pvm` (for `auto`: Linux guests).
fn kvm_backend(host: &HostProbe, hardware_only: bool) -> Result<Backend, Unavailable> {
    match host.kvm {
        KvmDevice::Absent => return Err(Unavailable::NoKvmDevice),
        KvmDevice::Pvm if hardware_only => return Err(Unavailable::KvmIsPvm),
        KvmDevice::Pvm | KvmDevice::Hardware => {}
    }
    match &host.vmm_binary {
        None => Err(Unavailable::NoVmmBinary),
        Some(p) => Ok(Backend::Kvm {
            vmm_binary: p.clone(),
        }),
    }
}

fn qemu_backend(host: &HostProbe) -> Result<(Backend, String), Unavailable> {
    let qemu_binary = host.qemu_binary.clone().ok_or(Unavailable::NoQemu)?;
    let launcher = host.vmm_binary.clone().ok_or(Unavailable::NoVmmBinary)?;
    let (accel, why) = match host.kvm {
        KvmDevice::Hardware => (Accel::Kvm, "with -accel kvm (hardware KVM)".to_owned()),
        KvmDevice::Absent => (
            Accel::Tcg,
            format!("with -accel tcg ({})", Unavailable::NoKvmDevice),
        ),
        KvmDevice::Pvm => (
            Accel::Tcg,
            format!("with -accel tcg ({})", Unavailable::KvmIsPvm),
        ),
    };
    Ok((
        Backend::Qemu {
            qemu_binary,
            accel,
            launcher,
        },
        why,
    ))
}

/// Picks the backend for `choice` on `host`, and says why.
pub fn select(choice: BackendChoice, host: &HostProbe) -> Result<(Backend, String), VmmError> {
    let unavailable = |backend, reason| VmmError::BackendUnavailable { backend, reason };
    match choice {
        BackendChoice::Kvm => kvm_backend(host, false)
            .map(|b| {
                let why = match host.kvm {
                    KvmDevice::Pvm => format!(
                        "kvm backend requested; warning: {} (the test guest runs, Linux does not)",
                        Unavailable::KvmIsPvm
                    ),
                    _ => "kvm backend requested; /dev/kvm is hardware KVM".to_owned(),
                };
                (b, why)
            })
            .map_err(|r| unavailable("kvm", r)),
        BackendChoice::Qemu => qemu_backend(host)
            .map(|(b, why)| (b, format!("qemu backend requested, {why}")))
            .map_err(|r| unavailable("qemu", r)),
        BackendChoice::Auto => match kvm_backend(host, true) {
            Ok(b) => Ok((b, "auto: kvm (/dev/kvm is hardware KVM)".to_owned())),
            Err(kvm_reason) => qemu_backend(host)
                .map(|(b, why)| (b, format!("auto: qemu {why}; kvm skipped: {kvm_reason}")))
                .map_err(|r| unavailable("qemu", r)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(kvm: KvmDevice, vmm: bool, qemu: bool) -> HostProbe {
        HostProbe {
            kvm,
            vmm_binary: vmm.then(|| PathBuf::from("vmm")),
            qemu_binary: qemu.then(|| PathBuf::from("qemu")),
        }
    }

    fn reason(r: Result<(Backend, String), VmmError>) -> Unavailable {
        match r {
            Err(VmmError::BackendUnavailable { reason, .. }) => reason,
            other => panic!("expected BackendUnavailable, got {other:?}"),
        }
    }

    #[test]
    fn auto_prefers_kvm_on_hardware_with_binary() {
        let (b, why) = select(BackendChoice::Auto, &host(KvmDevice::Hardware, true, true)).unwrap();
        assert!(matches!(b, Backend::Kvm { .. }));
        assert!(why.contains("hardware"));
    }

    #[test]
    fn auto_on_pvm_picks_qemu_tcg_and_says_why() {
        let (b, why) = select(BackendChoice::Auto, &host(KvmDevice::Pvm, true, true)).unwrap();
        assert!(matches!(
            b,
            Backend::Qemu {
                accel: Accel::Tcg,
                ..
            }
        ));
        assert!(why.contains("kvm_pvm"), "{why}");
    }

    #[test]
    fn qemu_needs_the_launcher_binary_too() {
        // Without the nitrile binary neither backend can hold volume keys.
        assert_eq!(
            reason(select(
                BackendChoice::Auto,
                &host(KvmDevice::Hardware, false, true)
            )),
            Unavailable::NoVmmBinary
        );
        assert_eq!(
            reason(select(
                BackendChoice::Qemu,
                &host(KvmDevice::Pvm, false, true)
            )),
            Unavailable::NoVmmBinary
        );
        let (b, _) = select(BackendChoice::Qemu, &host(KvmDevice::Hardware, true, true)).unwrap();
        assert!(matches!(
            b,
            Backend::Qemu {
                accel: Accel::Kvm,
                ref launcher,
                ..
            } if launcher == Path::new("vmm")
        ));
    }

    #[test]
    fn explicit_kvm_on_pvm_is_allowed_with_a_warning() {
        let (b, why) = select(BackendChoice::Kvm, &host(KvmDevice::Pvm, true, true)).unwrap();
        assert!(matches!(b, Backend::Kvm { .. }));
        assert!(why.contains("kvm_pvm"), "{why}");
    }

    #[test]
    fn explicit_kvm_refusals_name_the_reason() {
        assert_eq!(
            reason(select(
                BackendChoice::Kvm,
                &host(KvmDevice::Pvm, false, true)
            )),
            Unavailable::NoVmmBinary
        );
        assert_eq!(
            reason(select(
                BackendChoice::Kvm,
                &host(KvmDevice::Hardware, false, true)
            )),
            Unavailable::NoVmmBinary
        );
        assert_eq!(
            reason(select(
                BackendChoice::Kvm,
                &host(KvmDevice::Absent, true, true)
            )),
            Unavailable::NoKvmDevice
        );
    }

    #[test]
    fn nothing_usable_is_an_error() {
        assert_eq!(
            reason(select(
                BackendChoice::Auto,
                &host(KvmDevice::Pvm, true, false)
            )),
            Unavailable::NoQemu
        );
        assert_eq!(
            reason(select(
                BackendChoice::Qemu,
                &host(KvmDevice::Hardware, true, false)
            )),
            Unavailable::NoQemu
        );
    }

    #[test]
    fn default_vmm_binary_is_only_the_nitrile_executable() {
        // The test harness is not named `nitrile`.
        let exe = std::env::current_exe().unwrap();
        assert_ne!(exe.file_name().unwrap(), "nitrile");
        assert_eq!(HostProbe::default_vmm_binary(), None);
    }

    #[test]
    fn detect_on_this_host_is_consistent_with_select() {
        let probe = HostProbe::detect(None, None);
        assert!(probe.vmm_binary.is_none() && probe.qemu_binary.is_none());
        // Without binaries nothing can be selected, whatever /dev/kvm is.
        assert!(select(BackendChoice::Auto, &probe).is_err());
    }
}
