//! Finding QEMU, the launcher and the guest image, and a key service to
//! seal volume keys with, shared by the tests and the benchmark.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nitrile_api::Name;
use nitrile_vmm::{Backend, BackendChoice, CreatedVm, HostProbe, SealedVolumeKeys, VmSpec, select};

/// How long a guest may take to print a marker (TCG on a busy machine).
pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// The guest init's readiness marker.
pub(crate) const READY: &str = "NITRILE-GUEST-READY";

pub(crate) struct Env {
    pub(crate) qemu: PathBuf,
    /// The `nitrile` binary, run as `nitrile qemu-launch`.
    pub(crate) launcher: PathBuf,
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

/// The `nitrile` binary the qemu backend starts QEMU through:
/// `NITRILE_BIN`, else `nitrile` in the target directory these tests were
/// built in (`cargo build -p nitrile-cli` puts it there; build it in the
/// same command as the tests, so that it is this tree's).
pub(crate) fn nitrile_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("NITRILE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // <target>/<profile>/deps/<test>
    let bin = exe
        .ancestors()
        .nth(2)
        .map(|profile| profile.join("nitrile"))
        .filter(|p| p.is_file())
        .ok_or("no nitrile binary next to the tests (run `cargo build -p nitrile-cli` first, or set NITRILE_BIN)")?;
    Ok(bin)
}

pub(crate) fn env() -> Result<Env, String> {
    use std::os::unix::fs::MetadataExt as _;
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
        return Err("needs root (QEMU drops to uid 65534 and joins a per-VM cgroup)".to_owned());
    }
    let qemu = find_in_path("qemu-system-x86_64").ok_or("qemu-system-x86_64 is not installed")?;
    let launcher = nitrile_binary()?;
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
    let probe = HostProbe::detect(Some(&launcher), Some(&qemu));
    let (backend, why) = select(BackendChoice::Qemu, &probe).map_err(|e| e.to_string())?;
    println!("backend: {why}");
    let Backend::Qemu { accel, .. } = backend else {
        return Err("select(qemu) did not return qemu".to_owned());
    };
    Ok(Env {
        qemu,
        launcher,
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

/// A key service in a temporary directory (the kms core library), standing
/// in for `nitrile kms`: it makes volume keys, keeps them wrapped, seals them
/// to a VMM's recipients and, for the tests' checks only, exports them.
pub(crate) struct KeyService {
    _dir: tempfile::TempDir,
    kms: nitrile_kms::Kms,
    kek: nitrile_kms::KeyName,
    now: time::OffsetDateTime,
    wrapped: BTreeMap<Name, Vec<u8>>,
}

impl KeyService {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kms = nitrile_kms::Kms::open(&dir.path().join("kms")).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let owner = nitrile_api::PrincipalId::parse("nitrile://local/service/kms").unwrap();
        let kek = nitrile_kms::KeyName::default_key();
        kms.create_key(&kek, &owner, now).unwrap();
        Self {
            _dir: dir,
            kms,
            kek,
            now,
            wrapped: BTreeMap::new(),
        }
    }

    /// Makes volume `id`'s data key (a new one if it had one).
    pub(crate) fn make(&mut self, id: &str) {
        let id = Name::new(id).unwrap();
        if self.wrapped.remove(&id).is_some() {
            self.kms.destroy_volume(&id).unwrap();
        }
        let g = self
            .kms
            .generate_volume_key(&id, &self.kek, self.now)
            .unwrap();
        self.wrapped.insert(id, g.wrapped.encode());
    }

    /// Seals every volume's key to the recipient the VMM made for it.
    pub(crate) fn seal(&self, created: &CreatedVm) -> SealedVolumeKeys {
        let mut keys = SealedVolumeKeys::new();
        for r in &created.recipients {
            let to = nitrile_kms::RecipientPublicKey::from_bytes(r.key.as_bytes()).unwrap();
            let sealed = self
                .kms
                .unwrap_sealed(&r.volume, &self.wrapped[&r.volume], &to, self.now)
                .unwrap();
            keys.insert(
                r.volume.clone(),
                nitrile_vmm::SealedKey::decode(&sealed.encode()).unwrap(),
            );
        }
        keys
    }

    /// Volume `id`'s data key in plaintext, to search for it.
    pub(crate) fn dek(&self, id: &str) -> [u8; 64] {
        let id = Name::new(id).unwrap();
        *self
            .kms
            .export_volume_key_for_tests(&id, &self.wrapped[&id])
            .unwrap()
    }
}
