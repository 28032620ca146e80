//! The deployment service's configuration file (`deployd.toml`).
//!
//! ```toml
//! cell = "local"
//! listen = "127.0.0.1:7449"
//! state = "."                           # journal, log-anchor.json, deployments.json
//! ca = "../pki/ca.pem"
//! cert = "../pki/service-deployer.pem"  # principal nitrile://<cell>/service/deployer
//! key = "../pki/service-deployer.key"
//! issuer_keys = "issuer-keys.toml"      # the token issuer keys pinned at provisioning
//! tokend = "127.0.0.1:7443"             # where it gets its own tokens for host calls
//! waves = [1, 2]                        # default wave sizes (the last repeats)
//! bake_secs = 30                        # default bake time of a wave
//! health_timeout_secs = 60              # how long a host has to serve the new version
//!
//! [hosts]                               # the fleet: host id -> admin API address
//! h1 = "127.0.0.1:7444"
//!
//! [logd]                                # optional: ship the journal to the audit log
//! addr = "127.0.0.1:7445"
//! ```
//!
//! Relative paths are resolved against the directory of the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nitrile_api::Name;
use nitrile_logclient::LogdTarget;
use serde::{Deserialize, Serialize};

/// Largest config file read.
pub const MAX_CONFIG_LEN: u64 = 64 * 1024;
/// Most hosts a fleet may list.
pub const MAX_HOSTS: usize = 1024;
/// The journal's file name in the state directory.
pub const JOURNAL_FILE: &str = "journal";
/// The rollouts' record in the state directory.
pub const STATE_FILE: &str = "deployments.json";
/// Default bake time.
pub const DEFAULT_BAKE_SECS: u64 = 30;
/// Default time a host has to serve the new version.
pub const DEFAULT_HEALTH_TIMEOUT_SECS: u64 = 60;

/// Why a config could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// the file could not be read
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nitrile_fs::FsError,
    },
    /// the file is not TOML or a field is missing, unknown or invalid
    #[error("{}: field {field}", path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// The field (empty: the syntax).
        field: String,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// a value is out of bounds
    #[error("{}: {what}", path.display())]
    Bounds {
        /// The file.
        path: PathBuf,
        /// What.
        what: String,
    },
    /// the config could not be written
    #[error("{}: cannot write", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nitrile_fs::FsError,
    },
    /// the config could not be encoded
    #[error("cannot encode the config")]
    Encode(#[from] toml::ser::Error),
}

/// The deployment service's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploydConfig {
    /// The cell.
    pub cell: Name,
    /// The mTLS listen address (the only port besides metrics).
    pub listen: SocketAddr,
    /// The state directory (mode 0700).
    pub state: PathBuf,
    /// The cell CA certificate.
    pub ca: PathBuf,
    /// The service's certificate (`nitrile://<cell>/service/deployer`).
    pub cert: PathBuf,
    /// Its key (owner-only).
    pub key: PathBuf,
    /// The token issuer keys pinned at provisioning.
    pub issuer_keys: PathBuf,
    /// The token service it asks for its own host-call tokens.
    pub tokend: String,
    /// The loopback address of the Prometheus metrics endpoint, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// Default wave sizes (the last repeats until every host had its turn).
    #[serde(default = "default_waves")]
    pub waves: Vec<u32>,
    /// Default bake time of a wave, seconds.
    #[serde(default = "default_bake")]
    pub bake_secs: u64,
    /// How long a host has, after host.update, to serve the new version.
    #[serde(default = "default_health")]
    pub health_timeout_secs: u64,
    /// The fleet: host id -> the host's admin API address, in rollout order.
    pub hosts: BTreeMap<Name, String>,
    /// The audit log service the journal is shipped to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logd: Option<LogdTarget>,
}

fn default_waves() -> Vec<u32> {
    vec![1]
}

fn default_bake() -> u64 {
    DEFAULT_BAKE_SECS
}

fn default_health() -> u64 {
    DEFAULT_HEALTH_TIMEOUT_SECS
}

impl DeploydConfig {
    /// Reads a config (at most [`MAX_CONFIG_LEN`] bytes, unknown fields
    /// refused); relative paths are made relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = nitrile_fs::read_bounded_to_string(path, MAX_CONFIG_LEN).map_err(|source| {
            ConfigError::Io {
                path: path.to_owned(),
                source,
            }
        })?;
        let field = |field: String, e: toml::de::Error| ConfigError::Field {
            path: path.to_owned(),
            field,
            source: Box::new(e),
        };
        let de = toml::de::Deserializer::parse(&text).map_err(|e| field(String::new(), e))?;
        let mut config: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let f = e.path().to_string();
            field(f, e.into_inner())
        })?;
        let bounds = |what: String| ConfigError::Bounds {
            path: path.to_owned(),
            what,
        };
        if config.hosts.is_empty() || config.hosts.len() > MAX_HOSTS {
            return Err(bounds(format!(
                "[hosts] lists {} hosts; 1 to {MAX_HOSTS} are needed",
                config.hosts.len()
            )));
        }
        let probe = nitrile_deployd_api::StartRequest {
            version: "0.0.0".into(),
            waves: config.waves.clone(),
            bake_secs: Some(config.bake_secs),
        };
        probe
            .validate()
            .map_err(|e| bounds(format!("waves or bake_secs: {e}")))?;
        if config.waves.is_empty() {
            return Err(bounds("waves is empty".into()));
        }
        if !(1..=3600).contains(&config.health_timeout_secs) {
            return Err(bounds("health_timeout_secs: 1 to 3600".into()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.state,
            &mut config.ca,
            &mut config.cert,
            &mut config.key,
            &mut config.issuer_keys,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// Writes the config atomically, owner-only.
    pub fn write(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string(self)?;
        nitrile_fs::write_atomic(path, text.as_bytes(), 0o600).map_err(|source| {
            ConfigError::Write {
                path: path.to_owned(),
                source,
            }
        })
    }
}
