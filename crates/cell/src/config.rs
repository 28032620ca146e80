//! The client config a principal's CLI reads (like a kubeconfig).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest config file read.
pub const MAX_CONFIG_LEN: u64 = 64 * 1024;

/// Why a client config could not be read or written.
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
    /// the file is not a valid config
    #[error("{} is not a valid nitrile client config", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
}

/// A principal's client config.
///
/// ```toml
/// cell = "local"
/// principal = "nitrile://local/operator/alice"
/// ca = "../pki/ca.pem"                 # relative to this file
/// cert = "../pki/operator-alice.pem"
/// key = "../pki/operator-alice.key"    # owner-only
///
/// log_vkey = "local.nitrile/log+1a2b3c4d+AQ..."  # optional: the audit log's key
/// witness_vkeys = ["local.nitrile/witness+5e6f7a8b+BA..."]  # optional: its witnesses
///
/// [endpoints]
/// tokend = "127.0.0.1:7443"
/// logd = "127.0.0.1:7445"             # optional: the audit log service
/// kms = "127.0.0.1:7447"              # optional: the key service
///
/// [hosts]
/// h1 = "127.0.0.1:7444"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The cell.
    pub cell: String,
    /// The principal whose certificate this is.
    pub principal: String,
    /// The cell CA certificate.
    pub ca: PathBuf,
    /// The principal's certificate.
    pub cert: PathBuf,
    /// The principal's key (owner-only).
    pub key: PathBuf,
    /// The audit log's signed-note verifier key, against which `nitrile
    /// audit prove` and `audit verify` check checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_vkey: Option<String>,
    /// The cosignature verifier keys of the witnesses of the audit log: a
    /// checkpoint the auditor accepts must carry a cosignature of one of
    /// them (none named: not checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub witness_vkeys: Vec<String>,
    /// Cell service endpoints.
    pub endpoints: Endpoints,
    /// Host id -> admin API endpoint.
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
}

/// Addresses (`host:port`) of the cell's services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoints {
    /// The token service.
    pub tokend: String,
    /// The audit log service, once the cell runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logd: Option<String>,
    /// The key service, once the cell runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<String>,
    /// The placement service (customers' API), once the cell runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// The deployment service, once the cell runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployer: Option<String>,
}

impl ClientConfig {
    /// Reads a config; relative paths in it are made relative to its
    /// directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            nitrile_fs::read_bounded_to_string(path, MAX_CONFIG_LEN).map_err(|e| match e {
                nitrile_fs::FsError::TooLarge { path, .. } => ConfigError::TooLarge { path },
                e => ConfigError::Io {
                    path: path.to_owned(),
                    source: e.into(),
                },
            })?;
        let mut config: Self = toml::from_str(&text).map_err(|source| ConfigError::Invalid {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut config.ca, &mut config.cert, &mut config.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// Writes the config atomically with owner-only permissions.
    pub fn write(&self, path: &Path) -> Result<(), ConfigError> {
        let io = |source| ConfigError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = toml::to_string_pretty(self)
            .unwrap_or_else(|_| unreachable!("a client config is plain strings and serializes"));
        let text = format!("# nitrile client config: `nitrile config show` explains it\n{text}");
        nitrile_fs::write_atomic(path, text.as_bytes(), 0o600).map_err(|e| io(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients/alice.toml");
        let config = ClientConfig {
            cell: "local".into(),
            principal: "nitrile://local/operator/alice".into(),
            ca: "../pki/ca.pem".into(),
            cert: "../pki/a.pem".into(),
            key: "../pki/a.key".into(),
            log_vkey: Some("local.nitrile/log+01020304+AQ".into()),
            witness_vkeys: vec!["local.nitrile/witness+05060708+BA".into()],
            endpoints: Endpoints {
                tokend: "127.0.0.1:7443".into(),
                logd: None,
                kms: Some("127.0.0.1:7447".into()),
                placement: Some("127.0.0.1:7448".into()),
                deployer: None,
            },
            hosts: BTreeMap::new(),
        };
        config.write(&path).unwrap();
        let loaded = ClientConfig::load(&path).unwrap();
        assert_eq!(loaded.ca, dir.path().join("clients/../pki/ca.pem"));
        assert_eq!(loaded.endpoints, config.endpoints);
        assert_eq!(loaded.log_vkey, config.log_vkey);
        assert_eq!(loaded.witness_vkeys, config.witness_vkeys);
        std::fs::write(&path, "cell = 1").unwrap();
        assert!(matches!(
            ClientConfig::load(&path),
            Err(ConfigError::Invalid { .. })
        ));
    }
}
