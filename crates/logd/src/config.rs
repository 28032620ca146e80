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
//! # metrics = "127.0.0.1:7448"          optional: Prometheus `GET /metrics`, loopback only
//!
//! # [monitor]                           optional: run the monitor
//! # bundle = "../entitlements"          the signed entitlement bundle; its rules/ are the rules
//! # reviewers = "../reviewers.toml"     the cell's reviewer set the bundle is checked against
//!
//! # [[witnesses]]                       optional, any number
//! # name = "witness-1"                  # service name: nitrile://<cell>/service/witness-1
//! # vkey = "witness-1+abcd1234+AQ..."   # its cosignature verifier key
//! # addr = "127.0.0.1:7447"
//!
//! [sources]                           # the journals the log takes (nothing else is ingested)
//! hosts = ["h1"]                      # nitrile://<cell>/host/<name>
//! token_service = "tokend"            # nitrile://<cell>/service/tokend
//! services = []                       # other cell services that ship a journal
//!
//! # [storage]                         optional; default: the log in files under <state>/log
//! # postgres = "host=/run/postgresql user=nitrile dbname=nitrile"   # libpq conninfo or URL
//! # log_name = "local"                optional; default: the cell name
//! ```
//!
//! Relative paths are resolved against the directory of the file.
//!
//! `[monitor]` runs the audit log monitor with the rules of the cell's
//! entitlement bundle (`rules/*.yml` of it), loaded only if the bundle is
//! signed by two distinct reviewers of `reviewers` and its serial is not
//! below the highest logd has loaded (`<state>/bundle-serial.json`): the
//! rules are reviewed like the entitlements, and an older bundle cannot
//! bring back rules a later one changed. The `rules = "<dir>"` key of
//! earlier versions (unreviewed rule files) is refused with
//! [`ConfigProblem::UnreviewedRules`]; [`LogdConfig::load_migrating`]
//! reads such a file for `nitrile up`, which rewrites it.
//!
//! `metrics` is a plain HTTP port for the local scraper; an address that
//! is not loopback is refused when the file is read ([`MetricsAddr`]).
//!
//! `[storage]` chooses where the transparency log (its tiles, entry bundles
//! and checkpoints) is kept: files under `<state>/log` by default, or rows
//! of a PostgreSQL database (`nitrile_tlog::PgStorage`, table
//! `tlog_objects`, the rows of log `log_name`) for a replicated deployment.
//! Everything else logd keeps — its own journal, `sources.json`, the log's
//! signing key, the alerts — stays in files under `state` either way. A
//! conninfo may hold a password: logd never logs or shows it, only its
//! host and database ([`Conninfo`]'s `Debug` and [`Conninfo::target`]); a
//! password file (`passfile`, `~/.pgpass`) or peer authentication over the
//! unix socket keeps it out of this file altogether. The connection is
//! made without TLS: use a unix socket or loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nitrile_api::Name;
use nitrile_logclient::storage::{Conninfo, ConninfoError};
use serde::{Deserialize, Serialize};

use crate::source::{MAX_DECLARED_SOURCES, SourcesConfig};

/// Largest config file read.
pub const MAX_CONFIG_LEN: u64 = 64 * 1024;
/// The default checkpoint interval.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 500;
/// The default longest time between two checkpoints, grown or not.
pub const DEFAULT_MAX_CHECKPOINT_AGE_MS: u64 = 60_000;
/// Most witnesses a config may name.
pub const MAX_WITNESSES: usize = 32;

/// Where the transparency log is kept (`[storage]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Keep the log in this PostgreSQL database instead of files under
    /// `<state>/log`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<Conninfo>,
    /// The log's name in the database (its rows of `tlog_objects`); the
    /// cell name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_name: Option<Name>,
}

impl StorageConfig {
    /// Whether this is the default: the log in files under the state
    /// directory.
    pub fn is_files(&self) -> bool {
        self.postgres.is_none() && self.log_name.is_none()
    }
}

/// An address that is not loopback, given for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsAddrError {
    /// the text is not an `ip:port` address
    #[error("{0:?} is not an ip:port address")]
    NotAnAddress(String),
    /// the address is not a loopback address
    #[error("{0} is not a loopback address; metrics are served on loopback only")]
    NotLoopback(SocketAddr),
}

/// The address metrics are served on: a loopback address, by construction
/// (`127.0.0.0/8` or `::1`; port 0 picks a free port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MetricsAddr(SocketAddr);

impl MetricsAddr {
    /// `addr` if it is a loopback address.
    pub fn new(addr: SocketAddr) -> Result<Self, MetricsAddrError> {
        if addr.ip().is_loopback() {
            Ok(Self(addr))
        } else {
            Err(MetricsAddrError::NotLoopback(addr))
        }
    }

    /// The address.
    pub fn addr(self) -> SocketAddr {
        self.0
    }
}

impl TryFrom<String> for MetricsAddr {
    type Error = MetricsAddrError;
    fn try_from(text: String) -> Result<Self, MetricsAddrError> {
        let addr = text
            .parse()
            .map_err(|_| MetricsAddrError::NotAnAddress(text.chars().take(64).collect()))?;
        Self::new(addr)
    }
}

impl From<MetricsAddr> for String {
    fn from(a: MetricsAddr) -> Self {
        a.0.to_string()
    }
}

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
    /// `storage.postgres` is not a connection string (the value is not
    /// shown: it may hold a password)
    #[error("{}: field `storage.postgres` is invalid", path.display())]
    Conninfo {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ConninfoError,
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
    /// `storage.log_name` is set without `storage.postgres`
    #[error("storage.log_name needs storage.postgres")]
    LogNameWithoutDatabase,
    /// too many declared sources
    #[error("more than {MAX_DECLARED_SOURCES} sources")]
    TooManySources,
    /// the file names a rules directory (`rules = ...`), whose rules nobody
    /// reviewed
    #[error(
        "`rules` is no longer read: the monitor's rules are part of the signed entitlement \
         bundle; replace it by [monitor] bundle = \"<entitlements dir>\" and reviewers = \
         \"<reviewers.toml>\" (`nitrile up` rewrites its cell's logd.toml)"
    )]
    UnreviewedRules,
}

/// Where the monitor's rules come from (`[monitor]`): the signed
/// entitlement bundle and the reviewers it must be signed by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorSource {
    /// The entitlement bundle directory; its `rules/*.yml` are the rules.
    pub bundle: PathBuf,
    /// The cell's reviewer set; the bundle needs two of them.
    pub reviewers: PathBuf,
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
    /// The signed bundle whose rules the monitor runs (Sigma subset,
    /// `nitrile_monitor`), if the monitor is to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<MonitorSource>,
    /// Where Prometheus metrics are served (plain HTTP, loopback only), if
    /// anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsAddr>,
    /// The journal sources of the cell; a journal from anyone else is
    /// refused (logd's own is always taken).
    #[serde(default)]
    pub sources: SourcesConfig,
    /// Where the transparency log is kept; files under `<state>/log` by
    /// default.
    #[serde(default, skip_serializing_if = "StorageConfig::is_files")]
    pub storage: StorageConfig,
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
            monitor: None,
            metrics: None,
            sources: SourcesConfig::default(),
            storage: StorageConfig::default(),
        }
    }

    /// Reads a config (at most [`MAX_CONFIG_LEN`] bytes, unknown fields
    /// refused); relative paths are made relative to its directory. The
    /// `rules` key of earlier versions is refused
    /// ([`ConfigProblem::UnreviewedRules`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (config, legacy) = Self::load_migrating(path)?;
        if legacy.is_some() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                problem: ConfigProblem::UnreviewedRules,
            });
        }
        Ok(config)
    }

    /// [`LogdConfig::load`], but a `rules = "<dir>"` key of earlier
    /// versions is taken out and returned (resolved against the file's
    /// directory) instead of refused, for a tool that rewrites the file with
    /// a `[monitor]` section. The config returned has no monitor unless the
    /// file also has `[monitor]`.
    pub fn load_migrating(path: &Path) -> Result<(Self, Option<PathBuf>), ConfigError> {
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
        let base = path.parent().unwrap_or(Path::new("."));
        let legacy = match text.parse::<toml::Table>() {
            Ok(mut table) => match table.remove("rules") {
                Some(toml::Value::String(dir)) => {
                    text = toml::to_string(&table)
                        .unwrap_or_else(|_| unreachable!("a parsed TOML table serializes"));
                    Some(resolve(base, PathBuf::from(dir)))
                }
                Some(_) => {
                    return Err(ConfigError::Invalid {
                        path: path.to_owned(),
                        problem: ConfigProblem::UnreviewedRules,
                    });
                }
                None => None,
            },
            // Reported with its place by the parse below.
            Err(_) => None,
        };
        let mut config = Self::parse(&text).map_err(|(field, source)| {
            if field == "storage.postgres" {
                // The TOML error quotes the line, password and all: only
                // the connection string parser's reason is kept.
                let source = text
                    .parse::<toml::Table>()
                    .ok()
                    .and_then(|t| {
                        t.get("storage")?
                            .get("postgres")?
                            .as_str()
                            .map(Conninfo::new)
                    })
                    .and_then(Result::err);
                if let Some(source) = source {
                    return ConfigError::Conninfo {
                        path: path.to_owned(),
                        source,
                    };
                }
            }
            ConfigError::Field {
                path: path.to_owned(),
                field,
                source,
            }
        })?;
        config.check().map_err(|problem| ConfigError::Invalid {
            path: path.to_owned(),
            problem,
        })?;
        let monitor = config
            .monitor
            .as_mut()
            .map(|m| [&mut m.bundle, &mut m.reviewers]);
        for p in [
            &mut config.state,
            &mut config.ca,
            &mut config.cert,
            &mut config.key,
            &mut config.issuer_keys,
        ]
        .into_iter()
        .chain(monitor.into_iter().flatten())
        {
            *p = resolve(base, std::mem::take(p));
        }
        Ok((config, legacy))
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
        if self.storage.log_name.is_some() && self.storage.postgres.is_none() {
            return Err(ConfigProblem::LogNameWithoutDatabase);
        }
        if self.sources.len() > MAX_DECLARED_SOURCES {
            return Err(ConfigProblem::TooManySources);
        }
        Ok(())
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|_| unreachable!("a logd config is names, paths, numbers and strings"))
    }
}

/// `p` against `base` when it is relative, without `.` components.
fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_relative() {
        base.join(&p)
            .components()
            .filter(|c| *c != std::path::Component::CurDir)
            .collect()
    } else {
        p
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

    fn load_with(dir: &Path, extra: &str) -> Result<LogdConfig, ConfigError> {
        let path = dir.join("logd.toml");
        std::fs::write(&path, format!("{SAMPLE}\n{extra}\n")).unwrap();
        LogdConfig::load(&path)
    }

    #[test]
    fn the_monitor_reads_a_signed_bundle_and_a_loose_rules_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = load_with(
            dir.path(),
            "[monitor]\nbundle = \"../entitlements\"\nreviewers = \"/abs/reviewers.toml\"",
        )
        .unwrap();
        let m = c.monitor.clone().unwrap();
        assert_eq!(m.bundle, dir.path().join("../entitlements"));
        assert_eq!(m.reviewers, PathBuf::from("/abs/reviewers.toml"));
        assert_eq!(LogdConfig::parse(&c.to_toml()).unwrap().monitor, c.monitor);
        assert!(load_with(dir.path(), "[monitor]\nbundle = \"b\"").is_err());
        assert!(load_with(dir.path(), "").unwrap().monitor.is_none());

        // The key of earlier versions: refused by load, handed over by
        // load_migrating, the rest of the file kept.
        let path = dir.path().join("logd.toml");
        std::fs::write(&path, format!("rules = \"../rules\"\n{SAMPLE}")).unwrap();
        let err = LogdConfig::load(&path).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    problem: ConfigProblem::UnreviewedRules,
                    ..
                }
            ),
            "{err}"
        );
        let (c, legacy) = LogdConfig::load_migrating(&path).unwrap();
        assert_eq!(legacy, Some(dir.path().join("../rules")));
        assert!(c.monitor.is_none());
        assert_eq!(c.witness_quorum, 1);
        assert_eq!(c.webhook.as_deref(), Some("http://127.0.0.1:9000/alerts"));
        std::fs::write(&path, format!("rules = 3\n{SAMPLE}")).unwrap();
        assert!(LogdConfig::load_migrating(&path).is_err());
    }

    #[test]
    fn metrics_are_loopback_only() {
        let dir = tempfile::tempdir().unwrap();
        // A top-level key, so before the [[witnesses]] table.
        let load_with = |dir: &Path, line: &str| {
            let path = dir.join("logd.toml");
            std::fs::write(&path, format!("{line}\n{SAMPLE}")).unwrap();
            LogdConfig::load(&path)
        };
        assert_eq!(load_with(dir.path(), "").unwrap().metrics, None);
        let c = load_with(dir.path(), "metrics = \"127.0.0.1:7448\"").unwrap();
        let addr = c.metrics.unwrap().addr();
        assert_eq!(addr, "127.0.0.1:7448".parse().unwrap());
        assert_eq!(LogdConfig::parse(&c.to_toml()).unwrap().metrics, c.metrics);
        assert!(load_with(dir.path(), "metrics = \"[::1]:0\"").is_ok());
        for bad in ["0.0.0.0:9", "10.0.0.1:9100", "[::]:9", "localhost:9", "9"] {
            let err = load_with(dir.path(), &format!("metrics = \"{bad}\"")).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Field { field, .. } if field == "metrics"),
                "{bad}: {err:?}"
            );
        }
        assert_eq!(
            MetricsAddr::new("0.0.0.0:9".parse().unwrap()),
            Err(MetricsAddrError::NotLoopback("0.0.0.0:9".parse().unwrap()))
        );
    }

    #[test]
    fn storage_defaults_to_files_and_takes_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let c = load_with(dir.path(), "").unwrap();
        assert!(c.storage.is_files());
        assert!(!c.to_toml().contains("[storage]"));

        let c = load_with(
            dir.path(),
            "[storage]\npostgres = \"host=/run/postgresql user=nitrile password=hunter2 dbname=logs\"\nlog_name = \"cell-a\"",
        )
        .unwrap();
        let pg = c.storage.postgres.as_ref().unwrap();
        assert_eq!(pg.target(), "host=/run/postgresql dbname=logs");
        assert!(pg.danger_full_text().contains("password=hunter2"));
        assert!(pg.has_password());
        assert_eq!(c.storage.log_name.as_ref().unwrap().as_str(), "cell-a");
        // Nothing that may be logged shows the password.
        assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
        // Written back whole, read back the same.
        assert_eq!(LogdConfig::parse(&c.to_toml()).unwrap().storage, c.storage);

        let c = load_with(
            dir.path(),
            "[storage]\npostgres = \"postgresql://nitrile:hunter2@db.example:5433/logs\"",
        )
        .unwrap();
        let pg = c.storage.postgres.unwrap();
        assert_eq!(pg.target(), "host=db.example dbname=logs");
        assert!(!format!("{pg:?}").contains("hunter2"));
        assert!(pg.has_password());
        assert_eq!(c.storage.log_name, None);
        assert!(
            !Conninfo::new("host=/run/postgresql dbname=x")
                .unwrap()
                .has_password()
        );
    }

    #[test]
    fn bad_storage_is_refused_without_showing_the_conninfo() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_with(
            dir.path(),
            "[storage]\npostgres = \"host=db password=hunter2 port=notaport\"",
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Conninfo { .. }), "{err:?}");
        let mut chain = String::new();
        let mut e: Option<&dyn std::error::Error> = Some(&err);
        while let Some(x) = e {
            chain.push_str(&format!("{x}: {x:?}\n"));
            e = x.source();
        }
        assert!(chain.contains("storage.postgres"), "{chain}");
        assert!(!chain.contains("hunter2"), "{chain}");

        // Unknown keys are refused here too.
        assert!(matches!(
            load_with(dir.path(), "[storage]\nmysql = \"x\""),
            Err(ConfigError::Field { field, .. }) if field.starts_with("storage")
        ));
        // A log name needs a database.
        assert!(matches!(
            load_with(dir.path(), "[storage]\nlog_name = \"a\""),
            Err(ConfigError::Invalid {
                problem: ConfigProblem::LogNameWithoutDatabase,
                ..
            })
        ));
        // A log name is a name.
        assert!(matches!(
            load_with(
                dir.path(),
                "[storage]\npostgres = \"host=db\"\nlog_name = \"Not A Name\""
            ),
            Err(ConfigError::Field { .. })
        ));
    }
}
