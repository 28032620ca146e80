//! `host.update`: checking and staging a signed release (claim 7).
//!
//! The host installs releases only from the TUF repository of its
//! environment named in its config (`[release]`), trusting only what it
//! pinned at provisioning: the environment's root metadata and the CI key.
//! For a version it refuses first what is not higher than the version
//! running or is lower than the highest it has run (`highest.json`, kept
//! durably; restored from an older backup it still cannot go below the
//! version running). Then `nitrile_release::client`: `tough`'s TUF client
//! with the datastore `<state>/releases/tuf` (the metadata it accepted
//! before, so rolled-back metadata is refused), the manifest's version and
//! environment, the test attestation, each file. The files are written to
//! `<state>/releases/<version>.partial` and renamed to
//! `<state>/releases/<version>` when all are checked.
//!
//! With live updates on, the agent then hands its socket and instances to
//! the staged release ([`crate::live`]). The version an agent runs is its
//! release's when its binary is a staged release's
//! (`<state>/releases/<version>/nitrile`), else its build's.

use std::path::{Path, PathBuf};

use nitrile_api::Name;
use nitrile_api::admin::{HostUpdate, HostUpdateRequest, Sha256Hex};
use nitrile_release::client::{self, Trust};
use nitrile_release::{Environment, ReleaseError, Version};
use serde::{Deserialize, Serialize};

use crate::config::ReleaseConfig;

/// The version of this agent.
pub const RUNNING_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The file of a release that a host runs.
pub const BINARY: &str = "nitrile";

/// The version this process runs: the release's when it is a staged
/// release's binary (`<state>/releases/<version>/nitrile`, made only by
/// staging a verified release), else the build's.
pub fn running_version(state: &Path) -> Version {
    let build = RUNNING_VERSION.parse().unwrap_or(Version::new(0, 0, 0));
    let released = || -> Option<Version> {
        let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
        let releases = state.join("releases").canonicalize().ok()?;
        if exe.file_name()? != BINARY {
            return None;
        }
        let dir = exe.parent()?;
        if dir.parent()? != releases {
            return None;
        }
        dir.file_name()?.to_str()?.parse().ok()
    };
    released().unwrap_or(build)
}

/// Why an update was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// No `[release]` in the config.
    #[error("this host pins no release repository ([release] in its config); it installs nothing")]
    NoRepository,
    /// Lower than the highest version run, or not higher than the running.
    #[error("release {asked} is not higher than {floor}, which this host runs or has run")]
    Rollback {
        /// The version asked for.
        asked: Version,
        /// The version it must exceed.
        floor: Version,
    },
    /// A check of the release failed.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// The TPM's anti-rollback record could not be read or written: fail
    /// closed.
    #[error("the TPM's highest-version record: {0}")]
    Tpm(String),
    /// Instances run under a backend whose VMs end with the agent.
    #[error(
        "{running} instance(s) run under a hypervisor backend whose VMs end with the host agent; \
         a live update would stop them (stop them or move them first)"
    )]
    NoLiveUpdate {
        /// How many run.
        running: usize,
    },
}

impl UpdateError {
    /// The refusal's code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoRepository => "no_release_repository",
            Self::Rollback { .. } => "rollback",
            Self::NoLiveUpdate { .. } => "no_live_update",
            Self::Tpm(_) => "tpm",
            Self::Release(e) => e.code(),
        }
    }

    /// Whether the caller's input is at fault.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Release(ReleaseError::BadVersion(_) | ReleaseError::BadEnvironment(_))
        )
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Highest {
    version: Version,
}

/// Releases of this host: the pinned trust and the state directory.
pub struct Releases {
    config: ReleaseConfig,
    dir: PathBuf,
    running: Version,
    tpm: Option<String>,
    lock: tokio::sync::Mutex<()>,
}

fn tpm_bytes(v: &Version) -> Result<[u8; 8], UpdateError> {
    nitrile_attest::version_bytes(v.major, v.minor, v.patch)
        .ok_or_else(|| UpdateError::Tpm(format!("version {v} does not fit the TPM's record")))
}

impl std::fmt::Debug for Releases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Releases")
            .field("dir", &self.dir)
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

impl Releases {
    /// The releases of a host whose state directory is `state`.
    pub fn new(config: ReleaseConfig, state: &Path) -> Self {
        Self {
            config,
            dir: state.join("releases"),
            running: running_version(state),
            tpm: None,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Keeps the highest version run in the TPM behind `tcti` too (NV
    /// memory, which a restored or replaced disk does not touch).
    pub fn with_tpm(mut self, tcti: Option<String>) -> Self {
        self.tpm = tcti;
        self
    }

    /// The TPM's record, if this host has a TPM (`Ok(None)` without one or
    /// before the first record).
    fn tpm_highest(&self) -> Result<Option<Version>, UpdateError> {
        let Some(tcti) = &self.tpm else {
            return Ok(None);
        };
        let mut tpm =
            nitrile_attest::Tpm::open(tcti).map_err(|e| UpdateError::Tpm(e.to_string()))?;
        let b = tpm.highest().map_err(|e| UpdateError::Tpm(e.to_string()))?;
        Ok(b.map(|b| {
            let s = nitrile_attest::version_string(&b);
            s.parse().unwrap_or(Version::new(0, 0, 0))
        }))
    }

    fn trust(&self) -> Result<Trust, ReleaseError> {
        Trust::load(
            Environment::new(&self.config.environment)?,
            &self.config.root,
            &self.config.ci_key,
        )
    }

    /// The highest version this host has run: the record on disk, the
    /// TPM's when it has one, and never below the version running. With a
    /// TPM that cannot be read, an error: updates fail closed.
    pub fn highest(&self) -> Result<Version, UpdateError> {
        let recorded = nitrile_fs::read_bounded(&self.dir.join("highest.json"), 4096)
            .ok()
            .and_then(|b| serde_json::from_slice::<Highest>(&b).ok())
            .map(|h| h.version);
        let mut highest = recorded.map_or(self.running, |r| r.max(self.running));
        if let Some(t) = self.tpm_highest()? {
            highest = highest.max(t);
        }
        Ok(highest)
    }

    /// Records that this host runs its version (at start): the highest
    /// version it has run never goes down, on disk and in the TPM.
    pub fn record_running(&self) -> std::io::Result<()> {
        let highest = self.highest().map_err(std::io::Error::other)?;
        std::fs::create_dir_all(&self.dir)?;
        let bytes = serde_json::to_vec(&Highest { version: highest }).unwrap_or_default();
        nitrile_fs::write_atomic(&self.dir.join("highest.json"), &bytes, 0o600)
            .map_err(std::io::Error::other)?;
        if let Some(tcti) = &self.tpm {
            let v = tpm_bytes(&highest).map_err(std::io::Error::other)?;
            nitrile_attest::Tpm::open(tcti)
                .and_then(|mut t| t.advance_highest(v))
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// The binary of staged release `version`.
    pub fn staged_binary(&self, version: &Version) -> PathBuf {
        self.dir.join(version.to_string()).join(BINARY)
    }

    /// How long a new agent has to report serving ([`crate::live`]).
    pub fn health_deadline(&self) -> std::time::Duration {
        self.config.health_deadline()
    }

    /// `host.update`: checks and stages `req.version`; `live` says whether
    /// the agent hands over to it next (the answer's `handing_over`).
    pub async fn update(
        &self,
        host: &Name,
        req: &HostUpdateRequest,
        live: bool,
    ) -> Result<HostUpdate, UpdateError> {
        let _one_at_a_time = self.lock.lock().await;
        let version: Version = req.version.parse()?;
        let highest = self.highest()?;
        let floor = highest.max(self.running);
        if version <= floor {
            return Err(UpdateError::Rollback {
                asked: version,
                floor,
            });
        }
        if self.tpm.is_some() {
            tpm_bytes(&version)?;
        }
        let trust = self.trust()?;
        let repo = client::load(&self.config.repository, &trust, &self.dir.join("tuf")).await?;
        let partial = self.dir.join(format!("{version}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        let verified = match client::fetch_release(&repo, &trust, version, &partial).await {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(e.into());
            }
        };
        let staged = self.dir.join(version.to_string());
        let _ = std::fs::remove_dir_all(&staged);
        // The binary is the one file run: owner-executable, nothing more.
        let io = |op: &'static str, path: PathBuf| {
            move |source| {
                UpdateError::Release(ReleaseError::Io {
                    op,
                    path: path.clone(),
                    source,
                })
            }
        };
        {
            use std::os::unix::fs::PermissionsExt as _;
            let bin = partial.join(BINARY);
            if bin.is_file() {
                std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o700))
                    .map_err(io("make executable", bin.clone()))?;
            }
        }
        std::fs::rename(&partial, &staged).map_err(io("stage", staged.clone()))?;
        let binary = verified
            .manifest
            .files
            .get("nitrile")
            .map(|d| d.sha256.clone())
            .unwrap_or_default();
        Ok(HostUpdate {
            host: host.clone(),
            running: self.running.to_string(),
            staged: version.to_string(),
            environment: trust.environment.to_string(),
            highest: highest.to_string(),
            binary_sha256: binary
                .parse()
                .unwrap_or_else(|_| Sha256Hex::from_bytes([0; 32])),
            handing_over: live && staged.join(BINARY).is_file(),
        })
    }
}
