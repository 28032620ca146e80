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
//!
//! [attestation]                      # optional: volume keys only to attested hosts
//! max_age_secs = 300                 # optional: how old a host's document may be
//! # the reference PCR values, exactly one of:
//! reference = "reference.json"       # one host image's, for every host
//! # release = { repository = "../releases/repo-prod", root = "root.json",
//! #             ci_key = "ci.key.pub.json", environment = "prod",
//! #             releases = 2, refresh_secs = 60 }
//! ```
//!
//! With `release`, each host's reference values come from the signed
//! releases of the environment's TUF repository (`host-references.json` of
//! `nitrile release build --host-reference`), checked as a host checks a
//! release before it runs it, from the pinned `root` and CI key
//! ([`ReleaseReferences`]).
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

/// The TUF client's datastore of `[attestation] release`, under the state
/// directory.
pub const RELEASES_DATASTORE: &str = "releases/tuf";

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
    /// The state directory (mode 0700): `journal`, `log-anchor.json`,
    /// `store/` (the keys and volume records) and, with `[attestation]
    /// release`, `releases/tuf` (the release metadata accepted).
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
    /// document (sent with the unwrap) verifies and shows the reference
    /// values: one file's, or the host's own in a signed release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationPolicy>,
}

/// `[attestation]`: the measurements a host must prove before the key
/// service releases a volume key to it, and where they come from: exactly
/// one of `reference` (a file) or `release` (signed releases); a config
/// with both or neither is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "AttestationTable", into = "AttestationTable")]
pub struct AttestationPolicy {
    /// Where the reference values come from.
    pub references: ReferenceSource,
    /// How old a document may be, in seconds (default 300).
    pub max_age_secs: Option<u64>,
}

/// Where the reference PCR values of `[attestation]` come from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReferenceSource {
    /// `reference = FILE`: one host image's values (`reference.json` of
    /// `nitrile image build-host`: `pcr<N>` keys, 64 hex digits each),
    /// required of every host; every PCR named must match.
    File(PathBuf),
    /// `release = {...}`: each host's own values, from the signed releases
    /// of a TUF repository.
    Release(ReleaseReferences),
}

/// How many of the newest verified releases are believed, by default: a
/// host not yet updated to the newest still gets its keys.
pub const DEFAULT_RELEASES: u32 = 2;
/// Most releases believed at once.
pub const MAX_RELEASES: u32 = 16;
/// How often the repository is read again, by default, in seconds.
pub const DEFAULT_REFRESH_SECS: u64 = 60;

/// `[attestation] release`: the environment's TUF repository of signed
/// releases (as a host pins it: `[release]` of the host agent's config),
/// whose `host-references.json` say what PCR values each host shows. A
/// host's document must show every PCR of its entry in one of the newest
/// `releases` releases that verify (the TUF client from the pinned root,
/// the manifest's environment, the test attestation under the CI key, the
/// files' signed digests). The repository is read at start and again at
/// most every `refresh_secs`; the metadata accepted is kept under the
/// service's state directory (`releases/tuf`), so that older metadata is
/// refused later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseReferences {
    /// The repository (a directory: `metadata/`, `targets/`).
    pub repository: PathBuf,
    /// The environment's `root.json`, pinned at provisioning.
    pub root: PathBuf,
    /// The CI key (its TUF key JSON) whose test attestation a release
    /// needs.
    pub ci_key: PathBuf,
    /// The environment (`dev`, `staging`, `prod`, ...): a release built
    /// for another is not believed.
    pub environment: nitrile_release::Environment,
    /// How many of the newest verified releases are believed (1 to
    /// [`MAX_RELEASES`]; [`DEFAULT_RELEASES`] when not set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub releases: Option<u32>,
    /// Seconds between reads of the repository (1 to a day;
    /// [`DEFAULT_REFRESH_SECS`] when not set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_secs: Option<u64>,
}

impl ReleaseReferences {
    /// How many of the newest verified releases are believed.
    pub fn releases(&self) -> usize {
        self.releases.unwrap_or(DEFAULT_RELEASES) as usize
    }

    /// How often the repository is read again.
    pub fn refresh(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.refresh_secs.unwrap_or(DEFAULT_REFRESH_SECS))
    }
}

/// `[attestation]` as written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttestationTable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reference: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    release: Option<ReleaseReferences>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_age_secs: Option<u64>,
}

impl TryFrom<AttestationTable> for AttestationPolicy {
    type Error = String;
    fn try_from(t: AttestationTable) -> Result<Self, String> {
        let references = match (t.reference, t.release) {
            (Some(file), None) => ReferenceSource::File(file),
            (None, Some(release)) => {
                if let Some(n) = release.releases
                    && !(1..=MAX_RELEASES).contains(&n)
                {
                    return Err(format!(
                        "release.releases = {n} is outside 1 to {MAX_RELEASES}"
                    ));
                }
                if let Some(secs) = release.refresh_secs
                    && !(1..=MAX_SWEEP_INTERVAL_SECS).contains(&secs)
                {
                    return Err(format!(
                        "release.refresh_secs = {secs} is outside 1 to {MAX_SWEEP_INTERVAL_SECS}"
                    ));
                }
                ReferenceSource::Release(release)
            }
            (Some(_), Some(_)) => {
                return Err("[attestation] takes one source of reference values, \
                            `reference` (a file) or `release` (signed releases), not both"
                    .to_owned());
            }
            (None, None) => {
                return Err("[attestation] needs its reference values: \
                            `reference` (a file) or `release` (signed releases)"
                    .to_owned());
            }
        };
        Ok(Self {
            references,
            max_age_secs: t.max_age_secs,
        })
    }
}

impl From<AttestationPolicy> for AttestationTable {
    fn from(p: AttestationPolicy) -> Self {
        let (reference, release) = match p.references {
            ReferenceSource::File(f) => (Some(f), None),
            ReferenceSource::Release(r) => (None, Some(r)),
        };
        Self {
            reference,
            release,
            max_age_secs: p.max_age_secs,
        }
    }
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
        .chain(
            config
                .attestation
                .as_mut()
                .into_iter()
                .flat_map(|a| match &mut a.references {
                    ReferenceSource::File(f) => vec![f],
                    ReferenceSource::Release(r) => {
                        vec![&mut r.repository, &mut r.root, &mut r.ci_key]
                    }
                }),
        ) {
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

    /// The TUF client's datastore of `[attestation] release`: the
    /// repository metadata it accepted (which refuses older metadata).
    pub fn releases_datastore(&self) -> PathBuf {
        self.state.join(RELEASES_DATASTORE)
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

    /// The message of a refused config, with its causes.
    fn refused(path: &Path) -> (String, String) {
        match KmsConfig::load(path).unwrap_err() {
            ConfigError::Field { field, source, .. } => (field, source.to_string()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn attestation_takes_a_file_or_signed_releases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms/kms.toml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            format!("{SAMPLE}[attestation]\nreference = \"reference.json\"\n"),
        )
        .unwrap();
        let c = KmsConfig::load(&path).unwrap();
        let policy = c.attestation.clone().unwrap();
        assert_eq!(
            policy.references,
            ReferenceSource::File(dir.path().join("kms/reference.json"))
        );
        assert_eq!(policy.max_age_secs, None);

        let release = r#"release = { repository = "../repo", root = "root.json", ci_key = "/pins/ci.pub.json", environment = "prod" }"#;
        std::fs::write(
            &path,
            format!("{SAMPLE}[attestation]\n{release}\nmax_age_secs = 60\n"),
        )
        .unwrap();
        let c = KmsConfig::load(&path).unwrap();
        let policy = c.attestation.clone().unwrap();
        let ReferenceSource::Release(r) = &policy.references else {
            panic!("{policy:?}");
        };
        assert_eq!(r.repository, dir.path().join("kms/../repo"));
        assert_eq!(r.root, dir.path().join("kms/root.json"));
        assert_eq!(r.ci_key, Path::new("/pins/ci.pub.json"));
        assert_eq!(r.environment.as_str(), "prod");
        assert_eq!(r.releases(), DEFAULT_RELEASES as usize);
        assert_eq!(r.refresh().as_secs(), DEFAULT_REFRESH_SECS);
        assert_eq!(policy.max_age_secs, Some(60));
        assert_eq!(c.releases_datastore(), dir.path().join("kms/releases/tuf"));
        let out = dir.path().join("kms/again.toml");
        c.write(&out).unwrap();
        assert_eq!(KmsConfig::load(&out).unwrap(), c);

        // Both, neither, or a release source out of bounds: refused, saying
        // why.
        for (table, why) in [
            (format!("reference = \"r.json\"\n{release}"), "not both"),
            ("max_age_secs = 60".to_owned(), "needs its reference values"),
            (
                release.replace("\"prod\"", "\"prod\", releases = 0"),
                "releases = 0 is outside 1 to 16",
            ),
            (
                release.replace("\"prod\"", "\"prod\", releases = 17"),
                "outside 1 to 16",
            ),
            (
                release.replace("\"prod\"", "\"prod\", refresh_secs = 0"),
                "refresh_secs = 0",
            ),
            (release.replace("\"prod\"", "\"Prod\""), "environment name"),
            (
                release.replace("\"prod\"", "\"prod\", extra = 1"),
                "unknown field",
            ),
        ] {
            std::fs::write(&path, format!("{SAMPLE}[attestation]\n{table}\n")).unwrap();
            let (field, message) = refused(&path);
            assert!(field.starts_with("attestation"), "{table}: {field}");
            assert!(message.contains(why), "{table}: {message}");
        }
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
