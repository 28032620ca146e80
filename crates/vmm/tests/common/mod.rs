//! Finding QEMU and the guest image, shared by the tests and the benchmark.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use nitrile_vmm::{Backend, BackendChoice, HostProbe, VmSpec, select};

/// How long a guest may take to print a marker (TCG on a busy machine).
pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// The guest init's readiness marker.
pub(crate) const READY: &str = "NITRILE-GUEST-READY";

pub(crate) struct Env {
    pub(crate) qemu: PathBuf,
    pub(crate) kernel: PathBuf,
    pub(crate) initramfs: PathBuf,
    pub(crate) cmdline: String,
    pub(crate) accel: nitrile_vmm::Accel,
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn image_dir() -> PathBuf {
    let cache = std::env::var_os("NITRILE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("nitrile")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("nitrile"))
        })
        .unwrap_or_default();
    cache.join("guest-image").join("out")
}

pub(crate) fn env() -> Result<Env, String> {
    use std::os::unix::fs::MetadataExt as _;
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
        return Err("needs root (QEMU drops to uid 65534 and joins a per-VM cgroup)".to_owned());
    }
    let qemu = find_in_path("qemu-system-x86_64").ok_or("qemu-system-x86_64 is not installed")?;
    let dir = image_dir();
    let kernel = std::env::var_os("NITRILE_TEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("vmlinux"));
    let initramfs = std::env::var_os("NITRILE_TEST_INITRAMFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("initramfs"));
    if !kernel.is_file() || !initramfs.is_file() {
        return Err(format!(
            "no guest image (run scripts/guest-image.sh or set NITRILE_TEST_KERNEL and NITRILE_TEST_INITRAMFS); looked for {}",
            kernel.display()
        ));
    }
    let cmdline = std::fs::read_to_string(dir.join("cmdline"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "console=ttyS0 tsc_early_khz=2000000 panic=-1".to_owned());
    let probe = HostProbe::detect(None, Some(&qemu));
    let (backend, why) = select(BackendChoice::Qemu, &probe).map_err(|e| e.to_string())?;
    println!("backend: {why}");
    let Backend::Qemu { accel, .. } = backend else {
        return Err("select(qemu) did not return qemu".to_owned());
    };
    Ok(Env {
        qemu,
        kernel,
        initramfs,
        cmdline,
        accel,
    })
}

/// A spec booting the guest image with an optional test action and volume `data`.
pub(crate) fn spec(
    env: &Env,
    instance: &str,
    action: Option<&str>,
    volume: Option<&Path>,
) -> VmSpec {
    let mut cmdline = env.cmdline.clone();
    if let Some(a) = action {
        cmdline.push_str(" nitrile.test=");
        cmdline.push_str(a);
    }
    let volumes: Vec<_> = volume
        .into_iter()
        .map(|p| serde_json::json!({ "id": "data", "path": p, "size_mib": 16 }))
        .collect();
    let json = serde_json::json!({
        "instance": instance,
        "image": {
            "digest": "00".repeat(32),
            "kernel": env.kernel,
            "initramfs": env.initramfs,
            "cmdline": cmdline,
        },
        "vcpus": 1,
        "memory_mib": 256,
        "volumes": volumes,
    });
    VmSpec::parse_json(&serde_json::to_vec(&json).unwrap()).unwrap()
}
