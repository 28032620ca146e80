//! Finding the client config, the kubectl way: `--config FILE`, else
//! `$NITRILE_CONFIG`, else `$XDG_CONFIG_HOME/nitrile/config.toml` (by default
//! `~/.config/nitrile/config.toml`). The format is
//! [`nitrile_cell::ClientConfig`]; `nitrile up` writes one per sample
//! principal.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use nitrile_api::PrincipalId;
use nitrile_cell::ClientConfig;
use nitrile_pki::tls::{CaRoots, TlsIdentity};

use crate::Global;

/// Environment variable naming the client config file.
pub(crate) const CONFIG_ENV: &str = "NITRILE_CONFIG";

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

/// A config that was found and parsed, with paths made absolute.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) config: ClientConfig,
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

/// Finds, reads and parses the client config.
pub(crate) fn load(global: &Global) -> anyhow::Result<Loaded> {
    let (path, source) = locate(global)?;
    if !path.exists() {
        anyhow::bail!(
            "no client config at {} (from {source}); start a cell with `nitrile up` and run the \
             `export NITRILE_CONFIG=...` line it prints, or pass --config FILE",
            path.display()
        );
    }
    let config = ClientConfig::load(&path)?;
    Ok(Loaded {
        config,
        path,
        source,
    })
}

impl Loaded {
    /// The mTLS client configuration of this principal.
    pub(crate) fn tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let roots = CaRoots::load(&self.config.ca)
            .with_context(|| format!("cell CA {}", self.config.ca.display()))?;
        let identity =
            TlsIdentity::load(&self.config.cert, &self.config.key).with_context(|| {
                format!(
                    "certificate {} and key {}; if it expired, restart `nitrile up` or renew it \
                 with `nitrile pki renew`",
                    self.config.cert.display(),
                    self.config.key.display()
                )
            })?;
        Ok(nitrile_pki::tls::client_config(&roots, &identity)?)
    }

    /// The token service principal of this config's cell.
    pub(crate) fn tokend_principal(&self) -> anyhow::Result<PrincipalId> {
        PrincipalId::parse(&format!("nitrile://{}/service/tokend", self.config.cell))
            .with_context(|| format!("cell name in {}", self.path.display()))
    }
}
