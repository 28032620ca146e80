//! The witness service configuration file (TOML).
//!
//! ```toml
//! cell = "local"
//! name = "w1"                      # principal nitrile://local/service/w1
//! listen = "127.0.0.1:7460"
//! state = "witness"                # state directory
//! ca = "ca/ca.pem"
//! cert = "certs/service-w1.pem"
//! key = "certs/service-w1.key"
//! signing_key = "witness/cosigner.skey"   # optional; default <state>/cosigner.skey
//!
//! [[logs]]
//! origin = "local.nitrile/log"
//! vkey = "local.nitrile/log+01234567+AQ..."
//! ```
//!
//! Relative paths are relative to the directory of the configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nitrile_api::{Name, PrincipalId, PrincipalKind};
use serde::{Deserialize, Serialize};

/// Largest configuration file read.
pub const MAX_CONFIG_FILE: u64 = 1024 * 1024;
/// Default file name of the cosigning key in the state directory.
pub const DEFAULT_SIGNING_KEY: &str = "cosigner.skey";

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("configuration file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_CONFIG_FILE`].
    #[error("configuration file {} is larger than {MAX_CONFIG_FILE} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("configuration file {} is invalid at {field:?}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field at fault (empty for a syntax error).
        field: String,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
}

/// One log the witness cosigns for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// The log's origin line (e.g. `local.nitrile/log`).
    pub origin: String,
    /// The log's signed-note verifier key.
    pub vkey: String,
}

/// Where the witness service finds its inputs and keeps its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// The cell.
    pub cell: Name,
    /// The witness's name: its principal is
    /// `nitrile://<cell>/service/<name>`.
    pub name: Name,
    /// The mTLS listen address.
    pub listen: SocketAddr,
    /// The state directory (latest cosigned checkpoint of each log).
    pub state: PathBuf,
    /// The cell CA certificate.
    pub ca: PathBuf,
    /// The witness's TLS certificate.
    pub cert: PathBuf,
    /// Its TLS key.
    pub key: PathBuf,
    /// The cosigning key (skey, mode 0600); default
    /// `<state>/cosigner.skey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<PathBuf>,
    /// The logs to cosign for.
    #[serde(default)]
    pub logs: Vec<LogConfig>,
}

impl WitnessConfig {
    /// Reads a configuration file; relative paths in it are resolved
    /// against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let io = |source| ConfigError::Io {
            path: path.to_owned(),
            source,
        };
        let text =
            nitrile_fs::read_bounded_to_string(path, MAX_CONFIG_FILE).map_err(|e| match e {
                nitrile_fs::FsError::TooLarge { path, .. } => ConfigError::TooLarge { path },
                e => io(e.into()),
            })?;
        let mut config = Self::parse(&text).map_err(|(field, source)| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            source: Box::new(source),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve(base);
        Ok(config)
    }

    /// Parses configuration text (paths left as written); on error, the
    /// field at fault (empty for a syntax error) and why.
    fn parse(text: &str) -> Result<Self, (String, toml::de::Error)> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| (String::new(), e))?;
        serde_path_to_error::deserialize(de).map_err(|e| (e.path().to_string(), e.into_inner()))
    }

    fn resolve(&mut self, base: &Path) {
        for p in [&mut self.state, &mut self.ca, &mut self.cert, &mut self.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = &mut self.signing_key
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
    }

    /// The configuration as TOML text, paths as they are (relative ones
    /// stay relative to the file it is written to).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|_| {
            unreachable!("a witness config is names, an address, paths and strings")
        })
    }

    /// The witness's principal.
    pub fn principal(&self) -> PrincipalId {
        PrincipalId::new(self.cell.clone(), PrincipalKind::Service, self.name.clone())
    }

    /// The cosigning key file.
    pub fn signing_key_path(&self) -> PathBuf {
        self.signing_key
            .clone()
            .unwrap_or_else(|| self.state.join(DEFAULT_SIGNING_KEY))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_loads_with_paths_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.toml");
        std::fs::write(
            &path,
            r#"
cell = "local"
name = "w1"
listen = "127.0.0.1:0"
state = "state"
ca = "ca.pem"
cert = "w1.pem"
key = "/abs/w1.key"

[[logs]]
origin = "local.nitrile/log"
vkey = "local.nitrile/log+01234567+AQ"
"#,
        )
        .unwrap();
        let c = WitnessConfig::load(&path).unwrap();
        assert_eq!(c.principal().uri(), "nitrile://local/service/w1");
        assert_eq!(c.state, dir.path().join("state"));
        assert_eq!(c.key, PathBuf::from("/abs/w1.key"));
        assert_eq!(c.signing_key_path(), dir.path().join("state/cosigner.skey"));
        assert_eq!(c.logs.len(), 1);
    }

    #[test]
    fn a_written_config_reads_back() {
        let c = WitnessConfig {
            cell: Name::new("local").unwrap(),
            name: Name::new("witness").unwrap(),
            listen: "127.0.0.1:0".parse().unwrap(),
            state: PathBuf::from("."),
            ca: PathBuf::from("../pki/ca.pem"),
            cert: PathBuf::from("../pki/service-witness.pem"),
            key: PathBuf::from("../pki/service-witness.key"),
            signing_key: None,
            logs: vec![LogConfig {
                origin: "local.nitrile/log".into(),
                vkey: "local.nitrile/log+01234567+AQ".into(),
            }],
        };
        assert_eq!(WitnessConfig::parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn unknown_fields_and_bad_names_are_refused() {
        let base = "cell = \"local\"\nname = \"w1\"\nlisten = \"127.0.0.1:0\"\nstate = \"s\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n";
        assert!(WitnessConfig::parse(base).is_ok());
        let (_, e) = WitnessConfig::parse(&format!("{base}extra = 1\n")).unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        let (field, _) = WitnessConfig::parse(&base.replace("w1", "W 1")).unwrap_err();
        assert_eq!(field, "name");
    }
}
