//! The file operations every nitrile service shares: one atomic write, one
//! bounded read, and one syntax for durations written by people.
//!
//! This crate guarantees that:
//! - [`write_atomic`] (and [`AtomicFile`], for content that is streamed or
//!   named only once written) replaces a file whole or not at all: the bytes
//!   go to a temporary file in the target's own directory, named uniquely
//!   (`.<name>.tmp-<pid>-<counter>`, created exclusively, never an existing
//!   file), created with exactly the requested mode whatever the umask,
//!   fsynced, renamed over the target, and the directory fsynced. When it
//!   returns `Ok` the new content survives a crash; when it fails, the target
//!   is as it was and the temporary file is gone. Readers and concurrent
//!   writers of the same path only ever see one writer's whole content.
//! - [`read_bounded`] and its text and secret forms read at most `max` bytes
//!   and refuse a larger file with [`FsError::TooLarge`], naming the path and
//!   the bound; a missing file is [`FsError::Missing`], told apart from every
//!   other failure. [`read_secret`] reads into one buffer that never grows, so
//!   no copy of a key is left behind in freed memory, and zeroizes it on drop.
//! - [`duration::parse_duration`] is the one parser of `90s`, `30m`, `8h`,
//!   `7d`, `1h30m`: certificate and token lifetimes, quota windows and the
//!   monitor's Sigma timespans differ only in the explicit
//!   [`duration::DurationSyntax`] they pass, never in code.
//!
//! Every error carries the path it is about. It does not lock files (two
//! writers of one path each win whole, the later rename last), create
//! directories, or clean up temporary files left by a process that died
//! between creating and renaming one: their names start with a dot and end
//! in `.tmp-<pid>-<n>`, so directory listings can skip them.

#![forbid(unsafe_code)]

mod atomic;
mod bounded;
pub mod duration;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub use atomic::{AtomicFile, sync_dir, write_atomic};
pub use bounded::{read_bounded, read_bounded_to_string, read_secret, read_secret_to_string};

/// The step of a file operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Opening the file to read it.
    Open,
    /// Reading it.
    Read,
    /// Creating the temporary file.
    CreateTemp,
    /// Setting the temporary file's mode.
    SetMode,
    /// Writing the temporary file.
    Write,
    /// Fsyncing the temporary file.
    SyncFile,
    /// Renaming the temporary file over the target.
    Rename,
    /// Opening or fsyncing the directory.
    SyncDir,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Open => "open",
            Step::Read => "read",
            Step::CreateTemp => "create",
            Step::SetMode => "set the mode of",
            Step::Write => "write",
            Step::SyncFile => "fsync",
            Step::Rename => "rename a temporary file over",
            Step::SyncDir => "fsync the directory",
        })
    }
}

/// Why a file could not be read or written. Each variant names the path it
/// is about: the file read, the temporary file being written, the target
/// of the rename, or the directory fsynced. What the operating system said
/// is part of the message (it has no cause of its own), so the one line
/// says all even where only the top of an error is shown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    /// the file to read does not exist
    #[error("{} does not exist", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        error: io::Error,
    },
    /// the file is larger than the caller's bound
    #[error("{} is larger than {max} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The bound.
        max: u64,
    },
    /// the file was read as text and is not UTF-8
    #[error("{} is not UTF-8 text: {error}", path.display())]
    NotText {
        /// The file.
        path: PathBuf,
        /// Where the first invalid byte is.
        error: std::str::Utf8Error,
    },
    /// the path names no file to write (`/`, `..`, or empty)
    #[error("{} does not name a file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// a temporary file was renamed to a path outside its own directory
    #[error("{} is not in the directory {} of its temporary file", path.display(), dir.display())]
    OtherDirectory {
        /// The target asked for.
        path: PathBuf,
        /// The temporary file's directory.
        dir: PathBuf,
    },
    /// a step of reading or writing failed
    #[error("cannot {step} {}: {error}", path.display())]
    Io {
        /// The step that failed.
        step: Step,
        /// The path the step acted on.
        path: PathBuf,
        /// What the operating system said.
        error: io::Error,
    },
}

impl FsError {
    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            FsError::Missing { path, .. }
            | FsError::TooLarge { path, .. }
            | FsError::NotText { path, .. }
            | FsError::NotAFile { path }
            | FsError::OtherDirectory { path, .. }
            | FsError::Io { path, .. } => path,
        }
    }

    /// The kind of I/O error this is, as `std::io` would have reported it
    /// (`NotFound` for [`FsError::Missing`], `FileTooLarge` for
    /// [`FsError::TooLarge`], `InvalidData` for [`FsError::NotText`]).
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            FsError::Missing { error, .. } | FsError::Io { error, .. } => error.kind(),
            FsError::TooLarge { .. } => io::ErrorKind::FileTooLarge,
            FsError::NotText { .. } => io::ErrorKind::InvalidData,
            FsError::NotAFile { .. } | FsError::OtherDirectory { .. } => {
                io::ErrorKind::InvalidInput
            }
        }
    }

    fn io(step: Step, path: &Path) -> impl FnOnce(io::Error) -> FsError + use<> {
        let path = path.to_owned();
        move |error| FsError::Io { step, path, error }
    }
}

/// For callers whose errors hold an `io::Error`: the `FsError` becomes its
/// inner error (its message, reachable by `get_ref`), with the same
/// [`FsError::kind`], so checks of the kind keep working.
impl From<FsError> for io::Error {
    fn from(e: FsError) -> Self {
        io::Error::new(e.kind(), e)
    }
}
