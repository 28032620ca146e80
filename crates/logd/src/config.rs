//! logd's configuration file (`logd.toml`).
//!
//! ```toml
//! cell = "local"
//! listen = "127.0.0.1:7446"
//! state = "."                           # journal, sources, the log under log/
//! ca = "../pki/ca.pem"
//! cert = "../pki/service-logd.pem"      # principal nitrile://<cell>/service/logd
//! key = "../pki/service-logd.key"
//! issuer_keys = "issuer-keys.toml"      # the token issuer keys pinned at provisioning
//! checkpoint_interval_ms = 500          # optional: how often a grown log is checkpointed
//! max_checkpoint_age_ms = 60000         # optional: a checkpoint at least this often anyway
//! witness_quorum = 0                    # optional: cosignatures needed to publish
//! # webhook = "http://127.0.0.1:9000/alerts"   optional
//! # rules = "../rules"                  optional: run the monitor with these rules
//!
//! # [[witnesses]]                       optional, any number
//! # name = "witness-1"                  # service name: nitrile://<cell>/service/witness-1
//! # vkey = "witness-1+abcd1234+AQ..."   # its cosignature verifier key
//! # addr = "127.0.0.1:7447"
//! ```
//!
//! Relative paths are resolved against the directory of the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nitrile_api::Name;
use serde::{Deserialize, Serialize};

/// Largest config file read.
pub const MAX_CONFIG_LEN: u64 = 64 * 1024;
/// The default checkpoint interval.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 500;
/// The default longest time between two checkpoints, grown or not.
pub const DEFAULT_MAX_CHECKPOINT_AGE_MS: u64 = 60_000;
/// Most witnesses a config may name.
pub const MAX_WITNESSES: usize = 32;

/// Why a logd config could not be read.
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
        source: std::io::Error,
    },
    /// the file is larger than any config
    #[error("{} is larger than {MAX_CONFIG_LEN} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// a field is missing, unknown or has a wrong value, or the TOML is
    /// malformed
    #[error("{}: field `{field}` is invalid", path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// The field (dotted path; `.` for the file as a whole).
        field: String,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// the values do not fit together
    #[error("{}: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: ConfigProblem,
    },
}

/// A config whose fields parse but do not fit together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigProblem {
    /// the quorum is larger than the number of witnesses
    #[error("witness_quorum is larger than the number of witnesses")]
    QuorumTooLarge,
    /// too many witnesses
    #[error("more than {MAX_WITNESSES} witnesses")]
    TooManyWitnesses,
    /// an interval is 0 or the maximum age is below the interval
    #[error("checkpoint_interval_ms must be > 0 and <= max_checkpoint_age_ms")]
    BadInterval,
}

/// One witness logd asks to cosign its checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// The witness's service name in the cell (its mTLS principal is
    /// `nitrile://<cell>/service/<name>`).
    pub name: Name,
    /// Its cosignature verifier key (signed-note vkey).
    pub vkey: String,
    /// Its mTLS address.
    pub addr: String,
}

fn default_interval() -> u64 {
    DEFAULT_CHECKPOINT_INTERVAL_MS
}

fn default_max_age() -> u64 {
    DEFAULT_MAX_CHECKPOINT_AGE_MS
}

/// The whole config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogdConfig {
    /// The cell.
    pub cell: Name,
    /// The mTLS listen address.
    pub listen: SocketAddr,
    /// The state directory.
    pub state: PathBuf,
    /// The cell CA certificate.
    pub ca: PathBuf,
    /// logd's certificate (principal `nitrile://<cell>/service/logd`).
    pub cert: PathBuf,
    /// Its key (owner-only).
    pub key: PathBuf,
    /// The token issuer keys pinned at provisioning.
    pub issuer_keys: PathBuf,
    /// How often a grown log gets a checkpoint, in milliseconds.
    #[serde(default = "default_interval")]
    pub checkpoint_interval_ms: u64,
    /// The longest time between checkpoints even when the log did not grow,
    /// in milliseconds (so that a stale log is visible).
    #[serde(default = "default_max_age")]
    pub max_checkpoint_age_ms: u64,
    /// The witnesses.
    #[serde(default)]
    pub witnesses: Vec<WitnessConfig>,
    /// How many witness cosignatures a checkpoint needs to be published.
    #[serde(default)]
    pub witness_quorum: usize,
    /// Where alerts are posted, if anywhere.
    #[serde(default)]
    pub webhook: Option<String>,
    /// A directory of monitor rules (Sigma subset, `nitrile_monitor`),
    /// if the monitor is to run.
    #[serde(default)]
    pub rules: Option<PathBuf>,
}

impl LogdConfig {
    /// A config with default intervals, no witnesses and no webhook.
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
            checkpoint_interval_ms: DEFAULT_CHECKPOINT_INTERVAL_MS,
            max_checkpoint_age_ms: DEFAULT_MAX_CHECKPOINT_AGE_MS,
            witnesses: Vec::new(),
            witness_quorum: 0,
            webhook: None,
            rules: None,
        }
    }

    /// Reads a config (at most [`MAX_CONFIG_LEN`] bytes, unknown fields
    /// refused); relative paths are made relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let io = |source| ConfigError::Io {
            path: path.to_owned(),
            source,
        };
        let f = std::fs::File::open(path).map_err(io)?;
        let mut text = String::new();
        f.take(MAX_CONFIG_LEN + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_CONFIG_LEN {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let mut config = Self::parse(&text).map_err(|(field, source)| ConfigError::Field {
            path: path.to_owned(),
            field,
            source,
        })?;
        config.check().map_err(|problem| ConfigError::Invalid {
            path: path.to_owned(),
            problem,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.state,
            &mut config.ca,
            &mut config.cert,
            &mut config.key,
            &mut config.issuer_keys,
        ]
        .into_iter()
        .chain(config.rules.as_mut())
        {
            if p.is_relative() {
                *p = base
                    .join(&*p)
                    .components()
                    .filter(|c| *c != std::path::Component::CurDir)
                    .collect();
            }
        }
        Ok(config)
    }

    fn parse(text: &str) -> Result<Self, (String, Box<toml::de::Error>)> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| (".".to_owned(), Box::new(e)))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            (field, Box::new(e.into_inner()))
        })
    }

    /// Checks that the values fit together.
    pub fn check(&self) -> Result<(), ConfigProblem> {
        if self.witnesses.len() > MAX_WITNESSES {
            return Err(ConfigProblem::TooManyWitnesses);
        }
        if self.witness_quorum > self.witnesses.len() {
            return Err(ConfigProblem::QuorumTooLarge);
        }
        if self.checkpoint_interval_ms == 0
            || self.max_checkpoint_age_ms < self.checkpoint_interval_ms
        {
            return Err(ConfigProblem::BadInterval);
        }
        Ok(())
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|_| unreachable!("a logd config is names, paths and numbers"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
cell = "local"
listen = "127.0.0.1:7446"
state = "."
ca = "../pki/ca.pem"
cert = "c.pem"
key = "/abs/c.key"
issuer_keys = "issuer-keys.toml"
witness_quorum = 1
webhook = "http://127.0.0.1:9000/alerts"

[[witnesses]]
name = "witness-1"
vkey = "witness-1+01020304+AQ"
addr = "127.0.0.1:7447"
"#;

    #[test]
    fn loads_resolves_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logd.toml");
        std::fs::write(&path, SAMPLE).unwrap();
        let c = LogdConfig::load(&path).unwrap();
        assert_eq!(c.state, dir.path());
        assert_eq!(c.cert, dir.path().join("c.pem"));
        assert_eq!(c.key, PathBuf::from("/abs/c.key"));
        assert_eq!(c.checkpoint_interval_ms, 500);
        assert_eq!(c.witnesses[0].name.as_str(), "witness-1");
        assert_eq!(
            LogdConfig::parse(&c.to_toml()).unwrap().witnesses,
            c.witnesses
        );

        std::fs::write(
            &path,
            SAMPLE.replace("witness_quorum = 1", "witness_quorum = 2"),
        )
        .unwrap();
        assert!(matches!(
            LogdConfig::load(&path),
            Err(ConfigError::Invalid {
                problem: ConfigProblem::QuorumTooLarge,
                ..
            })
        ));
        std::fs::write(&path, format!("{SAMPLE}\nsurprise = 1\n")).unwrap();
        assert!(matches!(
            LogdConfig::load(&path),
            Err(ConfigError::Field { .. })
        ));
        std::fs::write(
            &path,
            SAMPLE.replace(
                "witness_quorum",
                "checkpoint_interval_ms = 0\nwitness_quorum",
            ),
        )
        .unwrap();
        assert!(matches!(
            LogdConfig::load(&path),
            Err(ConfigError::Invalid {
                problem: ConfigProblem::BadInterval,
                ..
            })
        ));
    }
}
