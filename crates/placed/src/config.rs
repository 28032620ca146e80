//! The placement service's configuration file (`placed.toml`).
//!
//! ```toml
//! cell = "local"
//! listen = "127.0.0.1:7448"
//! state = "."                          # journal, log-anchor.json, placement.json
//! ca = "../pki/ca.pem"
//! cert = "../pki/service-placement.pem" # principal nitrile://<cell>/service/placement
//! key = "../pki/service-placement.key"
//! issuer_keys = "issuer-keys.toml"     # the token issuer keys pinned at provisioning
//! images = "../images"                 # the cell's image store, shared with every host
//! tokend = "127.0.0.1:7443"            # where placement gets its own tokens for host calls
//! # metrics = "127.0.0.1:9448"         # optional: Prometheus, loopback only
//! network_refresh_secs = 10            # how often hosts' announcements are checked
//!
//! [hosts]                              # the fleet: host id -> admin API address
//! h1 = "127.0.0.1:7444"
//!
//! [logd]                               # optional: ship the journal to the audit log
//! addr = "127.0.0.1:7445"
//! ```
//!
//! Relative paths are resolved against the directory of the file when it is
//! loaded; [`PlacedConfig::write`] writes paths as they are in the value.

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
/// How often (seconds) placement describes its hosts by default, pushing
/// `network.update` to all when an announcement or a host's reachability
/// changed.
pub const DEFAULT_NETWORK_REFRESH_SECS: u64 = 10;
/// The shortest refresh period a config may ask for.
pub const MIN_NETWORK_REFRESH_SECS: u64 = 1;
/// The longest refresh period a config may ask for.
pub const MAX_NETWORK_REFRESH_SECS: u64 = 3600;
/// The placement record's file name in the state directory.
pub const STATE_FILE: &str = "placement.json";

/// Why a config could not be read.
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
    /// the file is not TOML
    #[error("{}: not TOML", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// a field is missing, unknown or invalid
    #[error("{}: field {field}", path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// the fleet is empty or too large
    #[error("{}: [hosts] lists {count} hosts; 1 to {MAX_HOSTS} are needed", path.display())]
    Hosts {
        /// The file.
        path: PathBuf,
        /// How many.
        count: usize,
    },
    /// the refresh period is out of bounds
    #[error(
        "{}: network_refresh_secs = {secs}; {MIN_NETWORK_REFRESH_SECS} to {MAX_NETWORK_REFRESH_SECS} are allowed",
        path.display()
    )]
    Refresh {
        /// The file.
        path: PathBuf,
        /// What it asked for.
        secs: u64,
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

/// The placement service's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacedConfig {
    /// The cell.
    pub cell: Name,
    /// The mTLS listen address (the only port besides metrics).
    pub listen: SocketAddr,
    /// The state directory (mode 0700): `journal`, `log-anchor.json`,
    /// `placement.json`.
    pub state: PathBuf,
    /// The cell CA certificate.
    pub ca: PathBuf,
    /// The service's certificate (principal
    /// `nitrile://<cell>/service/placement`).
    pub cert: PathBuf,
    /// Its key (owner-only).
    pub key: PathBuf,
    /// The token issuer keys pinned at provisioning.
    pub issuer_keys: PathBuf,
    /// The cell's image store, the directory every host agent launches from.
    pub images: PathBuf,
    /// The token service placement asks for its own host-call tokens.
    pub tokend: String,
    /// The loopback address of the Prometheus metrics endpoint, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// How often (seconds) every host is described; when any host's
    /// signed announcement or reachability changed since the last push,
    /// every host gets `network.update` again.
    #[serde(default = "default_refresh")]
    pub network_refresh_secs: u64,
    /// The fleet: host id -> the host's admin API address.
    pub hosts: BTreeMap<Name, String>,
    /// The audit log service the journal is shipped to (none: not
    /// shipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logd: Option<LogdTarget>,
}

fn default_refresh() -> u64 {
    DEFAULT_NETWORK_REFRESH_SECS
}

impl PlacedConfig {
    /// Reads a config (at most [`MAX_CONFIG_LEN`] bytes, unknown fields
    /// refused, 1 to [`MAX_HOSTS`] hosts); relative paths in it are made
    /// relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = nitrile_fs::read_bounded_to_string(path, MAX_CONFIG_LEN).map_err(|source| {
            ConfigError::Io {
                path: path.to_owned(),
                source,
            }
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
        if config.hosts.is_empty() || config.hosts.len() > MAX_HOSTS {
            return Err(ConfigError::Hosts {
                path: path.to_owned(),
                count: config.hosts.len(),
            });
        }
        if !(MIN_NETWORK_REFRESH_SECS..=MAX_NETWORK_REFRESH_SECS)
            .contains(&config.network_refresh_secs)
        {
            return Err(ConfigError::Refresh {
                path: path.to_owned(),
                secs: config.network_refresh_secs,
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.state,
            &mut config.ca,
            &mut config.cert,
            &mut config.key,
            &mut config.issuer_keys,
            &mut config.images,
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

    /// The journal's path.
    pub fn journal_path(&self) -> PathBuf {
        self.state.join(JOURNAL_FILE)
    }

    /// The placement record's path.
    pub fn state_path(&self) -> PathBuf {
        self.state.join(STATE_FILE)
    }
}
