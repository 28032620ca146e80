//! The errors of the key service's core.

use std::io;
use std::path::PathBuf;

use nitrile_api::Name;
use nitrile_fs::FsError;
use time::OffsetDateTime;

use crate::key::KeyName;
use crate::kms::SweepReport;
use crate::seal::RecipientKeyError;
use crate::wrap::WrappedKeyError;

/// What kind of failure an error is, for a service to answer with the right
/// status: the caller's input, a missing thing, a thing in the wrong state,
/// or the service's own store or system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The request's bytes or values are malformed or do not belong
    /// together (a wrapped key of another volume, a bad public key).
    BadInput,
    /// The named key or volume does not exist (or no longer does).
    NotFound,
    /// The key or volume exists but its state refuses the request (a
    /// disabled key, a name already taken).
    Conflict,
    /// The store or the system failed; nothing was changed that the error
    /// does not say.
    Internal,
}

/// Why an operation of [`crate::Kms`] was refused or failed. Messages name
/// keys and volumes, never key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// no key of that name
    #[error("{0} does not exist")]
    UnknownKey(KeyName),
    /// a key of that name exists
    #[error("{0} already exists")]
    KeyExists(KeyName),
    /// the key is disabled
    #[error("{0} is disabled")]
    KeyDisabled(KeyName),
    /// the key is scheduled for deletion
    #[error("{key} is pending deletion (at {})", crate::time_format::format(*delete_at))]
    KeyPendingDeletion {
        /// The key.
        key: KeyName,
        /// When its window ends.
        delete_at: OffsetDateTime,
    },
    /// the key's deletion window has ended: it is deleted, and the next
    /// sweep destroys it
    #[error("{key} was deleted at the end of its deletion window ({})", crate::time_format::format(*delete_at))]
    KeyDeleted {
        /// The key.
        key: KeyName,
        /// When its window ended.
        delete_at: OffsetDateTime,
    },
    /// cancelling a deletion of a key that is not pending deletion
    #[error("{key} is not pending deletion (it is {state})")]
    KeyNotPendingDeletion {
        /// The key.
        key: KeyName,
        /// Its state's name.
        state: &'static str,
    },
    /// a deletion window outside the allowed days
    #[error(
        "a deletion window of {days} days is outside {min} to {max} days",
        min = crate::MIN_DELETION_WINDOW_DAYS,
        max = crate::MAX_DELETION_WINDOW_DAYS
    )]
    BadDeletionWindow {
        /// The days asked for.
        days: u32,
    },
    /// the store holds as many keys as it may
    #[error("the key service holds {max} keys, its maximum", max = crate::MAX_KEYS)]
    TooManyKeys,
    /// no record of that volume: never made, or destroyed
    #[error("volume/{0} has no key in the key service (never made, or destroyed)")]
    UnknownVolume(Name),
    /// the volume already has a record
    #[error("volume/{0} already has a key")]
    VolumeExists(Name),
    /// the store holds as many volume records as it may
    #[error("the key service holds {max} volume keys, its maximum", max = crate::MAX_VOLUMES)]
    TooManyVolumes,
    /// the wrapped key is not a wrapped key of this format
    #[error("the wrapped key is malformed: {0}")]
    MalformedWrappedKey(#[from] WrappedKeyError),
    /// the wrapped key says it belongs to another volume
    #[error("the wrapped key is volume/{wrapped}'s, not volume/{asked}'s")]
    WrongVolume {
        /// The volume asked for.
        asked: Name,
        /// The volume the wrapped key names.
        wrapped: Name,
    },
    /// the wrapped key says it is wrapped under another KEK than the
    /// volume's
    #[error("the wrapped key of volume/{volume} names {wrapped}, but the volume's key is {key}")]
    WrongKey {
        /// The volume.
        volume: Name,
        /// The volume's KEK.
        key: KeyName,
        /// The KEK the wrapped key names.
        wrapped: KeyName,
    },
    /// the wrapped key does not open with the volume's key (altered, or
    /// not made by this key service for this volume)
    #[error("the wrapped key of volume/{0} does not open: altered, or not made for this volume")]
    Unauthentic(Name),
    /// the recipient's public key is malformed or gives no shared secret
    #[error("the recipient public key is unusable: {0}")]
    BadRecipientKey(#[from] RecipientKeyError),
    /// the operating system's random source failed
    #[error("the operating system's random source failed")]
    Random(#[source] rand_core::Error),
    /// the store failed
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl KmsError {
    /// A short stable code for a journal record or a metric:
    /// `unknown_key`, `key_disabled`, `wrong_volume`, ...
    pub fn code(&self) -> &'static str {
        match self {
            KmsError::UnknownKey(_) => "unknown_key",
            KmsError::KeyExists(_) => "key_exists",
            KmsError::KeyDisabled(_) => "key_disabled",
            KmsError::KeyPendingDeletion { .. } => "key_pending_deletion",
            KmsError::KeyDeleted { .. } => "key_deleted",
            KmsError::KeyNotPendingDeletion { .. } => "key_not_pending_deletion",
            KmsError::BadDeletionWindow { .. } => "bad_deletion_window",
            KmsError::TooManyKeys => "too_many_keys",
            KmsError::UnknownVolume(_) => "unknown_volume",
            KmsError::VolumeExists(_) => "volume_exists",
            KmsError::TooManyVolumes => "too_many_volumes",
            KmsError::MalformedWrappedKey(_) => "malformed_wrapped_key",
            KmsError::WrongVolume { .. } => "wrong_volume",
            KmsError::WrongKey { .. } => "wrong_key",
            KmsError::Unauthentic(_) => "unauthentic",
            KmsError::BadRecipientKey(_) => "bad_recipient_key",
            KmsError::Random(_) => "random",
            KmsError::Store(_) => "store",
        }
    }

    /// What kind of failure this is.
    pub fn class(&self) -> ErrorClass {
        match self {
            KmsError::UnknownKey(_) | KmsError::UnknownVolume(_) => ErrorClass::NotFound,
            KmsError::KeyExists(_)
            | KmsError::KeyDisabled(_)
            | KmsError::KeyPendingDeletion { .. }
            | KmsError::KeyDeleted { .. }
            | KmsError::KeyNotPendingDeletion { .. }
            | KmsError::TooManyKeys
            | KmsError::VolumeExists(_)
            | KmsError::TooManyVolumes => ErrorClass::Conflict,
            KmsError::BadDeletionWindow { .. }
            | KmsError::MalformedWrappedKey(_)
            | KmsError::WrongVolume { .. }
            | KmsError::WrongKey { .. }
            | KmsError::Unauthentic(_)
            | KmsError::BadRecipientKey(_) => ErrorClass::BadInput,
            KmsError::Random(_) | KmsError::Store(_) => ErrorClass::Internal,
        }
    }
}

/// Why the state directory could not be opened, read or written. Each
/// variant names the path it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// another process (or another open in this one) holds the directory
    #[error("{} is locked by another key service", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// the directory can be read or entered by others than its owner
    #[error("{} has mode {mode:o}; the key service's directories must be 0700", path.display())]
    Permissions {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// a file of the store is malformed
    #[error("{} is malformed: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: Malformed,
    },
    /// a file that is no part of the store is in it
    #[error("{} is not a file of the key service's store", path.display())]
    UnexpectedFile {
        /// The file.
        path: PathBuf,
    },
    /// a directory of the store has more entries than the store may hold
    #[error("{} has more than {max} entries", path.display())]
    TooManyFiles {
        /// The directory.
        path: PathBuf,
        /// The bound.
        max: usize,
    },
    /// reading or writing a file failed
    #[error(transparent)]
    Fs(#[from] FsError),
    /// another file system step failed
    #[error("cannot {step} {}: {error}", path.display())]
    Io {
        /// What was being done.
        step: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// What the operating system said.
        error: io::Error,
    },
}

/// What is wrong with a malformed file of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    /// not the JSON the file should hold
    #[error("{0}")]
    Json(#[source] serde_json::Error),
    /// the format string is not the one this version writes
    #[error("unknown format {0:?}")]
    Format(String),
    /// the name inside differs from the file's name
    #[error("it names {inside}, but its file name says {file}")]
    NameMismatch {
        /// The name in the file.
        inside: String,
        /// The name the file name gives.
        file: String,
    },
    /// a key's state and deletion time disagree
    #[error("state {state} with delete_at {}", if *has_delete_at { "set" } else { "missing" })]
    State {
        /// The state named.
        state: String,
        /// Whether a deletion time is given.
        has_delete_at: bool,
    },
    /// key material of the wrong length
    #[error("key material is {0} bytes, not {len}", len = crate::KEK_LEN)]
    KeyLength(usize),
    /// key metadata without its material
    #[error("its key material is missing")]
    MissingMaterial,
    /// a volume record under a key that does not exist
    #[error("its key {0} does not exist")]
    MissingKey(KeyName),
}

/// A sweep that stopped on a failure: what it destroyed before, and the
/// failure. Whatever it had not removed yet is still in place and is
/// destroyed by the next sweep.
#[derive(Debug, thiserror::Error)]
#[error("sweeping {key} failed: {source}")]
pub struct SweepError {
    /// What was destroyed before the failure (whole keys, and volume
    /// records of the key that failed in `partial_volumes`).
    pub done: SweepReport,
    /// The key being destroyed.
    pub key: KeyName,
    /// Volume records of `key` destroyed before the failure.
    pub partial_volumes: Vec<Name>,
    /// The failure.
    #[source]
    pub source: StoreError,
}
