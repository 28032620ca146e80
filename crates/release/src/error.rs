//! Why a release operation was refused or failed.

use std::path::PathBuf;

use crate::{Environment, Version};

/// Why a release operation was refused or failed. The refusals a host
/// meets when it checks a release ([`crate::client`]) each have their own
/// variant, so that the caller can journal which check failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// A file could not be read or written.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bounded file operation failed.
    #[error(transparent)]
    Fs(#[from] nitrile_fs::FsError),
    /// Not a version (`MAJOR.MINOR.PATCH`).
    #[error("{0:?} is not a version (MAJOR.MINOR.PATCH)")]
    BadVersion(String),
    /// Not an environment name.
    #[error(
        "{0:?} is not an environment name (a-z, 0-9 and -, starting with a letter, at most 32)"
    )]
    BadEnvironment(String),
    /// A key file is not what it should be.
    #[error("key {}: {reason}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A JSON document is malformed.
    #[error("{what} is malformed: {reason}")]
    Malformed {
        /// Which document.
        what: String,
        /// Why.
        reason: String,
    },
    /// The TUF repository or its metadata was refused by the TUF client (a
    /// signature threshold not met, expired or rolled-back metadata, a
    /// target whose length or hash is not the listed one, ...).
    #[error("the TUF repository was refused: {0}")]
    Tuf(String),
    /// The repository has no such release.
    #[error("the repository has no release {0}")]
    NoSuchRelease(Version),
    /// The release is for another environment than this one.
    #[error("release {version} is built for {release}, and this is {here}")]
    WrongEnvironment {
        /// The release.
        version: Version,
        /// Its environment.
        release: Environment,
        /// The environment here.
        here: Environment,
    },
    /// The manifest found under a version states another one.
    #[error("the manifest under {asked} states version {stated}")]
    WrongVersion {
        /// The version asked for.
        asked: Version,
        /// The one its manifest states.
        stated: Version,
    },
    /// The test attestation is missing, not signed by the pinned CI key,
    /// not a passing test result, or about other files.
    #[error("the test attestation of {version} is refused: {reason}")]
    Attestation {
        /// The release.
        version: Version,
        /// Why.
        reason: String,
    },
    /// A file of the release is not the one its manifest names.
    #[error("{file} of release {version} is not the file its manifest names")]
    FileMismatch {
        /// The release.
        version: Version,
        /// The file.
        file: String,
    },
    /// The release has no file of that name.
    #[error("release {version} has no file {file}")]
    NoSuchFile {
        /// The release.
        version: Version,
        /// The file.
        file: String,
    },
    /// Fewer valid release signer signatures than the threshold.
    #[error("{valid} valid release signer signature(s) of the {threshold} needed")]
    Threshold {
        /// Valid signatures.
        valid: u64,
        /// The threshold.
        threshold: u64,
    },
    /// A key that is not one of the role's keys.
    #[error("the key {key_id} is not one of the repository's {role} keys")]
    NotARoleKey {
        /// Its key id.
        key_id: String,
        /// The role.
        role: &'static str,
    },
    /// Nothing is staged.
    #[error("nothing is staged in {}: run `nitrile release stage` first", .0.display())]
    NothingStaged(PathBuf),
    /// A release of this version is already published or staged.
    #[error("release {0} is already in the repository")]
    Exists(Version),
    /// A bundle is not what `nitrile release build` makes.
    #[error("bundle {}: {reason}", path.display())]
    BadBundle {
        /// The bundle directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl ReleaseError {
    pub(crate) fn io<'a>(
        op: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| Self::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn malformed(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::Malformed {
            what: what.into(),
            reason: e.to_string(),
        }
    }

    /// A short code naming the check that refused, for journals and
    /// answers (`tuf`, `wrong_environment`, `attestation`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Io { .. } | Self::Fs(_) => "io",
            Self::BadVersion(_) => "bad_version",
            Self::BadEnvironment(_) => "bad_environment",
            Self::BadKey { .. } => "bad_key",
            Self::Malformed { .. } => "malformed",
            Self::Tuf(_) => "tuf",
            Self::NoSuchRelease(_) => "no_such_release",
            Self::WrongEnvironment { .. } => "wrong_environment",
            Self::WrongVersion { .. } => "wrong_version",
            Self::Attestation { .. } => "attestation",
            Self::FileMismatch { .. } => "file_mismatch",
            Self::NoSuchFile { .. } => "no_such_file",
            Self::Threshold { .. } => "threshold",
            Self::NotARoleKey { .. } => "not_a_role_key",
            Self::NothingStaged(_) => "nothing_staged",
            Self::Exists(_) => "exists",
            Self::BadBundle { .. } => "bad_bundle",
        }
    }
}
