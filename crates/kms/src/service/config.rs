//! The key service's configuration file (`kms.toml`).
//!
//! ```toml
//! cell = "local"
//! listen = "127.0.0.1:7447"
//! state = "."                        # journal, log-anchor.json, store/ (the keys)
//! ca = "../pki/ca.pem"
//! cert = "../pki/service-kms.pem"    # principal nitrile://<cell>/service/kms
//! key = "../pki/service-kms.key"
//! issuer_keys = "issuer-keys.toml"   # the token issuer keys pinned at provisioning
//! default_key = true                 # optional: make kms-key/default, owned by the service
//! # metrics = "127.0.0.1:9447"       # optional: Prometheus, loopback only
//! # sweep_interval_secs = 60         # optional: how often keys past their window are destroyed
//!
//! [logd]                             # optional: ship the journal to the audit log
//! addr = "127.0.0.1:7445"
//! log_vkey = "local.nitrile/log+..." # optional: anchor the journal in the log
//! ```
//!
//! Relative paths are resolved against the directory of the file when it is
//! loaded; [`KmsConfig::write`] writes paths as they are in the value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nitrile_api::{Name, PrincipalId};
use nitrile_logclient::LogdTarget;
use serde::{Deserialize, Serialize};

/// Largest config file read.
pub const MAX_CONFIG_LEN: u64 = 64 * 1024;

/// How often keys whose deletion window ended are destroyed, by default.
pub const DEFAULT_SWEEP_INTERVAL_SECS: u64 = 60;

/// Longest sweep interval allowed: a day.
pub const MAX_SWEEP_INTERVAL_SECS: u64 = 24 * 60 * 60;

/// The directory of the key service's keys and volume records, under its
/// state directory.
pub const STORE_DIR: &str = "store";

/// The key service's journal, under its state directory.
pub const JOURNAL_FILE: &str = "journal";

/// Why a key service config could not be read or written.
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
    /// the sweep interval is 0 or longer than a day
    #[error(
        "{}: sweep_interval_secs = {secs} is outside 1 to {MAX_SWEEP_INTERVAL_SECS}",
        path.display()
    )]
    SweepInterval {
        /// The file.
        path: PathBuf,
        /// The value.
        secs: u64,
    },
}

/// The key service's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsConfig {
    /// The cell.
    pub cell: Name,
    /// The mTLS listen address (the only port besides metrics).
    pub listen: SocketAddr,
    /// The state directory (mode 0700): `journal`, `log-anchor.json` and
    /// `store/`, the keys and volume records.
    pub state: PathBuf,
    /// The cell CA certificate.
    pub ca: PathBuf,
    /// The service's certificate (principal `nitrile://<cell>/service/kms`).
    pub cert: PathBuf,
    /// Its key (owner-only).
    pub key: PathBuf,
    /// The token issuer keys pinned at provisioning.
    pub issuer_keys: PathBuf,
    /// Whether the service makes the cell's default key
    /// (`kms-key/default`, owned by the service itself) when it is missing.
    #[serde(default)]
    pub default_key: bool,
    /// The loopback address of the Prometheus metrics endpoint, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// How often keys whose deletion window ended are destroyed, in
    /// seconds (1 to a day; [`DEFAULT_SWEEP_INTERVAL_SECS`] when not set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep_interval_secs: Option<u64>,
    /// The audit log service the journal is shipped to (none: not
    /// shipped); the service ships it itself while it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logd: Option<LogdTarget>,
    /// The placement service's principal: its relayed token may use a
    /// customer's key for a volume of that same customer
    /// (`volume/<customer>--...`), as it makes and boots the root volumes
    /// of the instances the customer runs; for no other customer's volume,
    /// and never to manage the key. None: only a key's owner uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PrincipalId>,
    /// With it, a volume key is released only to a host whose attestation
    /// document (sent with the unwrap) verifies and matches these
    /// reference values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationPolicy>,
}

/// `[attestation]`: the measurements a host must prove before the key
/// service releases a volume key to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationPolicy {
    /// The reference values (`reference.json` of `nitrile image
    /// build-host`: `pcr<N>` keys, 64 hex digits each); every PCR named
    /// must match.
    pub reference: PathBuf,
    /// How old a document may be, in seconds (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_secs: Option<u64>,
}

impl KmsConfig {
    /// A config with no default key, no metrics, the default sweep
    /// interval, shipping nowhere.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cell: Name,
        listen: SocketAddr,
        state: PathBuf,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        issuer_keys: PathBuf,
    ) -> Self {
        Self {
            cell,
            listen,
            state,
            ca,
            cert,
            key,
            issuer_keys,
            default_key: false,
            metrics: None,
            sweep_interval_secs: None,
            logd: None,
            placement: None,
            attestation: None,
        }
    }

    /// Reads a config (at most [`MAX_CONFIG_LEN`] bytes, unknown fields
    /// refused); relative paths in it are made relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            nitrile_fs::read_bounded_to_string(path, MAX_CONFIG_LEN).map_err(|e| match e {
                nitrile_fs::FsError::TooLarge { path, .. } => ConfigError::TooLarge { path },
                e => ConfigError::Io {
                    path: path.to_owned(),
                    source: e.into(),
                },
            })?;
        let de = toml::de::Deserializer::parse(&text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        let mut config: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::Field {
                path: path.to_owned(),
                field,
                source: Box::new(e.into_inner()),
            }
        })?;
        if let Some(secs) = config.sweep_interval_secs
            && !(1..=MAX_SWEEP_INTERVAL_SECS).contains(&secs)
        {
            return Err(ConfigError::SweepInterval {
                path: path.to_owned(),
                secs,
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.state,
            &mut config.ca,
            &mut config.cert,
            &mut config.key,
            &mut config.issuer_keys,
        ]
        .into_iter()
        .chain(config.attestation.as_mut().map(|a| &mut a.reference))
        {
            if p.is_relative() {
                // `state = "."` is the file's directory itself.
                *p = base
                    .join(&*p)
                    .components()
                    .filter(|c| *c != std::path::Component::CurDir)
                    .collect();
            }
        }
        Ok(config)
    }

    /// The sweep interval in force.
    pub fn sweep_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.sweep_interval_secs
                .unwrap_or(DEFAULT_SWEEP_INTERVAL_SECS),
        )
    }

    /// The journal's path.
    pub fn journal_path(&self) -> PathBuf {
        self.state.join(JOURNAL_FILE)
    }

    /// The keys' directory.
    pub fn store_dir(&self) -> PathBuf {
        self.state.join(STORE_DIR)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|_| unreachable!("a key service config is names, paths and numbers"))
    }

    /// Writes the config atomically with owner-only permissions, making its
    /// directory first if there is none.
    pub fn write(&self, path: &Path) -> Result<(), ConfigError> {
        let mut text = String::from("# nitrile key service config (`nitrile kms --config`)\n");
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

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
cell = "local"
listen = "127.0.0.1:7447"
state = "."
ca = "../pki/ca.pem"
cert = "../pki/service-kms.pem"
key = "../pki/service-kms.key"
issuer_keys = "issuer-keys.toml"
default_key = true
"#;

    #[test]
    fn sample_loads_with_paths_resolved_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms/kms.toml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, SAMPLE).unwrap();
        let c = KmsConfig::load(&path).unwrap();
        assert_eq!(c.state, dir.path().join("kms"));
        assert_eq!(c.store_dir(), dir.path().join("kms/store"));
        assert_eq!(c.ca, dir.path().join("kms/../pki/ca.pem"));
        assert!(c.default_key);
        assert_eq!(c.sweep_interval().as_secs(), DEFAULT_SWEEP_INTERVAL_SECS);
        let mut c = c;
        c.logd = Some(LogdTarget {
            addr: "127.0.0.1:7445".into(),
            log_vkey: None,
        });
        c.sweep_interval_secs = Some(5);
        let out = dir.path().join("other/kms.toml");
        c.write(&out).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(KmsConfig::load(&out).unwrap(), c);
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.toml");
        std::fs::write(&path, format!("{SAMPLE}extra = 1\n")).unwrap();
        assert!(matches!(
            KmsConfig::load(&path),
            Err(ConfigError::Field { .. })
        ));
        std::fs::write(&path, SAMPLE.replace("\"local\"", "\"../x\"")).unwrap();
        match KmsConfig::load(&path).unwrap_err() {
            ConfigError::Field { field, .. } => assert_eq!(field, "cell"),
            other => panic!("{other:?}"),
        }
        std::fs::write(&path, format!("{SAMPLE}sweep_interval_secs = 0\n")).unwrap();
        assert!(matches!(
            KmsConfig::load(&path),
            Err(ConfigError::SweepInterval { secs: 0, .. })
        ));
        std::fs::write(&path, "cell = ").unwrap();
        assert!(matches!(
            KmsConfig::load(&path),
            Err(ConfigError::Syntax { .. })
        ));
        std::fs::write(&path, vec![b'#'; MAX_CONFIG_LEN as usize + 1]).unwrap();
        assert!(matches!(
            KmsConfig::load(&path),
            Err(ConfigError::TooLarge { .. })
        ));
    }
}
