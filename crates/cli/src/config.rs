//! The operator config file, found the kubectl way: `--config FILE`, else
//! `$NITRILE_CONFIG`, else `$XDG_CONFIG_HOME/nitrile/config.toml` (by default
//! `~/.config/nitrile/config.toml`).
//!
//! ```toml
//! cell = "local"
//! ca = "pki/ca.pem"             # the cell CA certificate
//! cert = "pki/alice.pem"        # this principal's certificate
//! key = "pki/alice.key"         # and its key (owner-only permissions)
//!
//! [endpoints]
//! tokend = "127.0.0.1:7443"
//!
//! [hosts]
//! h1 = "127.0.0.1:7444"
//! ```
//!
//! Relative paths are relative to the directory of the config file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::Global;

/// Environment variable naming the operator config file.
pub(crate) const CONFIG_ENV: &str = "NITRILE_CONFIG";

/// The operator config as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OperatorConfig {
    /// The cell this config talks to.
    pub(crate) cell: String,
    /// The cell CA certificate (PEM).
    pub(crate) ca: PathBuf,
    /// This principal's certificate (PEM).
    pub(crate) cert: PathBuf,
    /// This principal's private key (PEM, owner-only permissions).
    pub(crate) key: PathBuf,
    /// Cell service endpoints, `host:port`.
    pub(crate) endpoints: Endpoints,
    /// Host id -> admin API endpoint, `host:port`.
    #[serde(default)]
    pub(crate) hosts: BTreeMap<String, String>,
}

/// Addresses of the cell's services.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Endpoints {
    /// The token service.
    pub(crate) tokend: String,
    /// The audit log service, once the cell runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) logd: Option<String>,
}

/// Where the config in effect came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// `--config FILE`.
    Flag,
    /// `$NITRILE_CONFIG`.
    Env,
    /// The per-user default location.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flag => "--config",
            Self::Env => "$NITRILE_CONFIG",
            Self::Default => "default location",
        })
    }
}

/// A config file that was found and parsed, with paths made absolute.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) config: OperatorConfig,
    pub(crate) path: PathBuf,
    pub(crate) source: Source,
}

/// The per-user default config location.
pub(crate) fn default_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("nitrile/config.toml"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/nitrile/config.toml"))
}

/// Which file would be used, and why.
pub(crate) fn locate(global: &Global) -> anyhow::Result<(PathBuf, Source)> {
    if let Some(p) = &global.config {
        return Ok((p.clone(), Source::Flag));
    }
    if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return Ok((PathBuf::from(p), Source::Env));
    }
    let p = default_path().context("no --config, no $NITRILE_CONFIG and no $HOME to look in")?;
    Ok((p, Source::Default))
}

/// Finds, reads and parses the operator config.
pub(crate) fn load(global: &Global) -> anyhow::Result<Loaded> {
    let (path, source) = locate(global)?;
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read operator config {} (from {source}); start a cell with `nitrile up` \
             and run the `export NITRILE_CONFIG=...` line it prints",
            path.display()
        )
    })?;
    let mut config: OperatorConfig = toml::from_str(&text)
        .with_context(|| format!("operator config {} is not valid", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut config.ca, &mut config.cert, &mut config.key] {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(Loaded {
        config,
        path,
        source,
    })
}

impl OperatorConfig {
    /// The admin API endpoint of a host.
    pub(crate) fn host_endpoint(&self, host: &str) -> anyhow::Result<&str> {
        self.hosts
            .get(host)
            .map(String::as_str)
            .with_context(|| format!("host {host:?} is not in the operator config's [hosts] table"))
    }

    /// Writes the config as TOML with owner-only permissions.
    pub(crate) fn write(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let text = toml::to_string_pretty(self)?;
        let tmp = path.with_extension("toml.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(b"# nitrile operator config: see `nitrile config show`\n")?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}
