//! The host agent's configuration file (`hostd.toml`).
//!
//! ```toml
//! cell = "local"
//! host = "h1"
//! listen = "127.0.0.1:7444"
//! state = "."                           # host state directory
//! ca = "../../pki/ca.pem"
//! cert = "../../pki/host-h1.pem"
//! key = "../../pki/host-h1.key"
//! issuer_keys = "issuer-keys.toml"      # the token issuer keys pinned at provisioning
//! images = "../../images"               # nitrile-image store of launchable images
//!
//! [hypervisor]
//! backend = "auto"                      # auto | kvm | qemu
//! # qemu = "/usr/bin/qemu-system-x86_64"   optional, else found on PATH
//! # vsock_daemon = "..."                   optional
//! # vmm = "..."                            optional: the nitrile binary for the kvm backend
//!
//! [capacity]                            # optional section
//! # vcpus = 2                           default: CPUs of the machine
//! # memory_mib = 4096                   default: 3/4 of MemTotal
//!
//! [logd]                                # optional: ship the journal to the audit log
//! addr = "127.0.0.1:7445"               # its principal is nitrile://<cell>/service/logd
//! log_vkey = "local.nitrile/log+..."    # optional: anchor the journal in the log
//! ```
//!
//! Relative paths are resolved against the directory of the file when it is
//! loaded; [`HostdConfig::write`] writes paths as they are in the value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nitrile_api::Name;
use nitrile_kms_api::KmsTarget;
use nitrile_logclient::LogdTarget;
use serde::{Deserialize, Serialize};

/// Largest config file read.
pub const MAX_CONFIG_LEN: u64 = 64 * 1024;

/// Why a host agent config could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// the file could not be read or written
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the file is larger than any config
    #[error("{} is larger than {MAX_CONFIG_LEN} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// the file is not TOML
    #[error("{} is not valid TOML", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// a field is missing, unknown or has a wrong value
    #[error("{}: field `{field}` is invalid", path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// The field (dotted path, `.` when the file as a whole is refused).
        field: String,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
}

/// Which hypervisor backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendName {
    /// `kvm` on hardware KVM with a `nitrile` binary, else `qemu`.
    Auto,
    /// Only the `nitrile vmm` backend.
    Kvm,
    /// Only QEMU.
    Qemu,
}

impl BackendName {
    /// The choice for [`nitrile_vmm::select`].
    pub fn choice(self) -> nitrile_vmm::BackendChoice {
        match self {
            BackendName::Auto => nitrile_vmm::BackendChoice::Auto,
            BackendName::Kvm => nitrile_vmm::BackendChoice::Kvm,
            BackendName::Qemu => nitrile_vmm::BackendChoice::Qemu,
        }
    }
}

/// The `[hypervisor]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypervisorConfig {
    /// `auto`, `kvm` or `qemu`.
    pub backend: BackendName,
    /// The QEMU system emulator (else `qemu-system-x86_64` on `PATH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<PathBuf>,
    /// The vhost-user vsock daemon for the QEMU backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_daemon: Option<PathBuf>,
    /// The `nitrile` binary, run as `nitrile vmm` by the kvm backend and as
    /// the QEMU launcher (`nitrile qemu-launch`) by the qemu backend (else
    /// the running executable when it is `nitrile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<PathBuf>,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            backend: BackendName::Auto,
            qemu: None,
            vsock_daemon: None,
            vmm: None,
        }
    }
}

/// The optional `[capacity]` section: what instances may use in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    /// vCPUs (default: the CPUs of the machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Memory in MiB (default: 3/4 of `MemTotal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
}

/// The host agent's configuration. All fields are public; [`HostdConfig::new`]
/// fills the optional sections with their defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostdConfig {
    /// The cell.
    pub cell: Name,
    /// This host's name (the audience of its tokens).
    pub host: Name,
    /// The mTLS listen address (the only port hostd opens).
    pub listen: SocketAddr,
    /// The host state directory (journal, instances, volumes, metrics).
    pub state: PathBuf,
    /// The cell CA certificate.
    pub ca: PathBuf,
    /// The host certificate (principal `nitrile://<cell>/host/<host>`).
    pub cert: PathBuf,
    /// Its key (owner-only).
    pub key: PathBuf,
    /// The token issuer keys pinned at provisioning.
    pub issuer_keys: PathBuf,
    /// The image store of launchable images.
    pub images: PathBuf,
    /// The hypervisor backend.
    #[serde(default)]
    pub hypervisor: HypervisorConfig,
    /// Capacity limits.
    #[serde(default, skip_serializing_if = "CapacityConfig::is_default")]
    pub capacity: CapacityConfig,
    /// The audit log service the journal is shipped to (none: not shipped);
    /// the host agent ships it itself from [`crate::Hostd::serve`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logd: Option<LogdTarget>,
    /// The key service that makes, releases and destroys volume keys
    /// (none: the host has no volumes; `volume.create` and launches with
    /// volumes are refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<KmsTarget>,
    /// The volume store: a directory of volume records and their
    /// ciphertext, shared by the hosts of a cell (default
    /// `<state>/volume-store`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<PathBuf>,
    /// The instance network: the host's data path (none: launches with a
    /// NIC are refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::network::NetworkConfig>,
    /// The signed releases this host installs (`host.update`): pinned at
    /// provisioning (none: `host.update` is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseConfig>,
    /// The host's TPM 2.0 (none: `host.attest` is refused and the highest
    /// version run is kept only on disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmConfig>,
}

/// `[tpm]`: the host's TPM 2.0 and what its init measured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// tpm2-tss's TCTI: `device:/dev/tpmrm0` on hardware,
    /// `swtpm:host=127.0.0.1,port=P` for swtpm.
    pub tcti: String,
    /// The event log of what the host's init measured into PCR 15 (JSON
    /// lines: `{"pcr":15,"name":...,"sha256":...}`), returned by
    /// `host.attest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_log: Option<PathBuf>,
    /// The certificate of the TPM's document key and its issuers (PEM, the
    /// key's certificate first, the root last): with it, `host.attest`
    /// also returns a Nitro-layout attestation document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_certificate: Option<PathBuf>,
    /// The host's TLS key as enrollment made it in the TPM (JSON: its
    /// public area and its private part encrypted by the TPM): with it the
    /// agent serves and calls with the certificate `cert` for that key, and
    /// `key` is not read. The TPM signs with it only while PCRs 4, 11 and
    /// 15 hold the measurements the host was enrolled with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
}

/// `[release]`: where this host's environment publishes its releases and
/// what it trusts them by, all pinned at provisioning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseConfig {
    /// The environment this host runs in (`dev`, `staging`, `prod`, ...).
    pub environment: String,
    /// The environment's TUF repository (a directory: `metadata/`,
    /// `targets/`).
    pub repository: PathBuf,
    /// The environment's root metadata (`root.json`) pinned at
    /// provisioning.
    pub root: PathBuf,
    /// The CI key (its TUF key JSON) whose test attestation a release needs.
    pub ci_key: PathBuf,
    /// Seconds a new agent has, after a live update starts it, to serve
    /// `host.describe` with every instance re-adopted; else the previous
    /// binary serves again (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_deadline_secs: Option<u64>,
}

impl ReleaseConfig {
    /// The live update's health check deadline.
    pub fn health_deadline(&self) -> std::time::Duration {
        self.health_deadline_secs
            .map_or(crate::live::DEFAULT_HEALTH_DEADLINE, |s| {
                std::time::Duration::from_secs(s.clamp(1, 3600))
            })
    }
}

impl CapacityConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl HostdConfig {
    /// A config with the `auto` backend and default capacity.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cell: Name,
        host: Name,
        listen: SocketAddr,
        state: PathBuf,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        issuer_keys: PathBuf,
        images: PathBuf,
    ) -> Self {
        Self {
            cell,
            host,
            listen,
            state,
            ca,
            cert,
            key,
            issuer_keys,
            images,
            hypervisor: HypervisorConfig::default(),
            capacity: CapacityConfig::default(),
            logd: None,
            kms: None,
            volumes: None,
            network: None,
            release: None,
            tpm: None,
        }
    }

    /// The volume store's directory.
    pub fn volume_store(&self) -> PathBuf {
        self.volumes
            .clone()
            .unwrap_or_else(|| self.state.join("volume-store"))
    }

    /// Reads a config (at most [`MAX_CONFIG_LEN`] bytes, unknown fields
    /// refused); relative paths in it are made relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_bounded(path)?;
        let mut config = Self::parse(&text).map_err(|e| e.at(path))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve(base);
        Ok(config)
    }

    /// Parses config text without resolving paths.
    fn parse(text: &str) -> Result<Self, Unlocated> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| Unlocated::Syntax(Box::new(e)))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            Unlocated::Field(field, Box::new(e.into_inner()))
        })
    }

    fn resolve(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                // `.` components are dropped (`state = "."` is the file's
                // directory itself); `..` is kept as written.
                *p = base
                    .join(&*p)
                    .components()
                    .filter(|c| *c != std::path::Component::CurDir)
                    .collect();
            }
        };
        for p in [
            &mut self.state,
            &mut self.ca,
            &mut self.cert,
            &mut self.key,
            &mut self.issuer_keys,
            &mut self.images,
        ] {
            join(p);
        }
        if let Some(r) = &mut self.release {
            for p in [&mut r.repository, &mut r.root, &mut r.ci_key] {
                join(p);
            }
        }
        if let Some(t) = &mut self.tpm {
            for p in [
                &mut t.event_log,
                &mut t.document_certificate,
                &mut t.tls_key,
            ]
            .into_iter()
            .flatten()
            {
                join(p);
            }
        }
        for p in [
            &mut self.volumes,
            &mut self.hypervisor.qemu,
            &mut self.hypervisor.vsock_daemon,
            &mut self.hypervisor.vmm,
        ]
        .into_iter()
        .flatten()
        {
            join(p);
        }
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|_| unreachable!("a host config is names, paths and numbers"))
    }

    /// Writes the config atomically (temporary file, fsync, rename, fsync of
    /// the directory) with owner-only permissions, making its directory
    /// first if there is none.
    pub fn write(&self, path: &Path) -> Result<(), ConfigError> {
        let mut text = String::from("# nitrile host agent config (`nitrile hostd --config`)\n");
        text.push_str(&self.to_toml());
        let io = |source| ConfigError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        nitrile_fs::write_atomic(path, text.as_bytes(), 0o600).map_err(|e| io(e.into()))
    }
}

enum Unlocated {
    Syntax(Box<toml::de::Error>),
    Field(String, Box<toml::de::Error>),
}

impl Unlocated {
    fn at(self, path: &Path) -> ConfigError {
        match self {
            Unlocated::Syntax(source) => ConfigError::Syntax {
                path: path.to_owned(),
                source,
            },
            Unlocated::Field(field, source) => ConfigError::Field {
                path: path.to_owned(),
                field,
                source,
            },
        }
    }
}

fn read_bounded(path: &Path) -> Result<String, ConfigError> {
    nitrile_fs::read_bounded_to_string(path, MAX_CONFIG_LEN).map_err(|e| match e {
        nitrile_fs::FsError::TooLarge { path, .. } => ConfigError::TooLarge { path },
        e => ConfigError::Io {
            path: path.to_owned(),
            source: e.into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const SAMPLE: &str = r#"
cell = "local"
host = "h1"
listen = "127.0.0.1:7444"
state = "."
ca = "../../pki/ca.pem"
cert = "../../pki/host-h1.pem"
key = "../../pki/host-h1.key"
issuer_keys = "issuer-keys.toml"
images = "../../images"

[hypervisor]
backend = "auto"
"#;

    #[test]
    fn sample_loads_with_paths_resolved_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts/h1/hostd.toml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, SAMPLE).unwrap();
        let c = HostdConfig::load(&path).unwrap();
        assert_eq!(c.host.as_str(), "h1");
        assert_eq!(c.state, dir.path().join("hosts/h1"));
        assert_eq!(c.ca, dir.path().join("hosts/h1/../../pki/ca.pem"));
        assert_eq!(c.hypervisor.backend, BackendName::Auto);
        assert_eq!(c.capacity, CapacityConfig::default());
        assert_eq!(c.logd, None);

        std::fs::write(
            &path,
            format!("{SAMPLE}\n[logd]\naddr = \"127.0.0.1:7445\"\n"),
        )
        .unwrap();
        let c = HostdConfig::load(&path).unwrap();
        assert_eq!(c.logd.unwrap().addr, "127.0.0.1:7445");
        std::fs::write(
            &path,
            format!("{SAMPLE}\n[logd]\naddr = \"x:1\"\nkey = \"k\"\n"),
        )
        .unwrap();
        assert!(matches!(
            HostdConfig::load(&path),
            Err(ConfigError::Field { .. })
        ));
    }

    #[test]
    fn write_then_load_round_trips_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hostd.toml");
        let mut c = HostdConfig::new(
            Name::new("local").unwrap(),
            Name::new("h1").unwrap(),
            "127.0.0.1:7444".parse().unwrap(),
            ".".into(),
            "ca.pem".into(),
            "h.pem".into(),
            "h.key".into(),
            "issuer-keys.toml".into(),
            "/abs/images".into(),
        );
        c.capacity.vcpus = Some(3);
        c.hypervisor.backend = BackendName::Qemu;
        c.logd = Some(LogdTarget {
            addr: "127.0.0.1:7445".into(),
            log_vkey: Some("local.nitrile/log+01234567+AQ".into()),
        });
        c.write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = HostdConfig::load(&path).unwrap();
        assert_eq!(loaded.capacity.vcpus, Some(3));
        assert_eq!(loaded.hypervisor.backend, BackendName::Qemu);
        assert_eq!(loaded.logd, c.logd);
        assert_eq!(loaded.images, PathBuf::from("/abs/images"));
        assert_eq!(loaded.key, dir.path().join("h.key"));
    }

    #[test]
    fn errors_name_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hostd.toml");
        std::fs::write(&path, format!("{SAMPLE}\nextra = 1\n")).unwrap();
        let e = HostdConfig::load(&path).unwrap_err();
        assert!(matches!(e, ConfigError::Field { .. }), "{e:?}");
        std::fs::write(&path, SAMPLE.replace("\"h1\"", "\"H_1\"")).unwrap();
        match HostdConfig::load(&path).unwrap_err() {
            ConfigError::Field { field, path: p, .. } => {
                assert_eq!(field, "host");
                assert_eq!(p, path);
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(&path, SAMPLE.replace("\"auto\"", "\"xen\"")).unwrap();
        match HostdConfig::load(&path).unwrap_err() {
            ConfigError::Field { field, .. } => assert_eq!(field, "hypervisor.backend"),
            other => panic!("{other:?}"),
        }
        std::fs::write(&path, "cell = ").unwrap();
        assert!(matches!(
            HostdConfig::load(&path),
            Err(ConfigError::Syntax { .. })
        ));
        std::fs::write(&path, vec![b'#'; MAX_CONFIG_LEN as usize + 1]).unwrap();
        assert!(matches!(
            HostdConfig::load(&path),
            Err(ConfigError::TooLarge { .. })
        ));
    }
}
