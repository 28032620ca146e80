//! The witness's durable state: for each log origin, the size and root hash
//! of the latest checkpoint it cosigned, and that checkpoint.
//!
//! One file per origin, `logs/<hex SHA-256 of the origin>.json`, replaced
//! atomically (temporary file, fsync, rename, fsync of the directory). A
//! state is durable when [`StateStore::save`] returns.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use nitrile_tlog::Hash;
use nitrile_witness_api::MAX_NOTE_SIZE;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest state file read.
pub const MAX_STATE_FILE: u64 = 4 * MAX_NOTE_SIZE as u64;
/// Most state files (known logs with state) read at open.
pub const MAX_STATE_FILES: usize = 10_000;

const LOGS_DIR: &str = "logs";
const SPLIT_VIEWS_DIR: &str = "split-views";

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file or directory could not be read, written or synced.
    #[error("state file {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A state file is larger than [`MAX_STATE_FILE`].
    #[error("state file {} is larger than {MAX_STATE_FILE} bytes", path.display())]
    TooLarge {
        /// The path.
        path: PathBuf,
    },
    /// A state file is not valid JSON of the expected shape.
    #[error("state file {} is corrupt", path.display())]
    Corrupt {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A state file's root is not the base64 of 32 bytes, or its name does
    /// not match its origin.
    #[error("state file {} is inconsistent: {what}", path.display())]
    Inconsistent {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
    /// More than [`MAX_STATE_FILES`] state files.
    #[error("more than {MAX_STATE_FILES} state files")]
    TooManyFiles,
}

impl StateError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// What the witness knows of one log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    /// The log's origin line.
    pub origin: String,
    /// Size of the latest cosigned checkpoint.
    pub size: u64,
    /// Its root hash.
    pub root: Hash,
    /// That checkpoint, with the log's signatures and the witness's
    /// cosignature.
    pub checkpoint: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    origin: String,
    size: u64,
    root: String,
    checkpoint: String,
}

/// The state directory.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
}

/// File name for an origin: the hex SHA-256 of the origin line.
pub fn origin_hash(origin: &str) -> String {
    hex::encode(Sha256::digest(origin.as_bytes()))
}

impl StateStore {
    /// Opens (creating, mode 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        for d in [
            dir.to_owned(),
            dir.join(LOGS_DIR),
            dir.join(SPLIT_VIEWS_DIR),
        ] {
            fs::create_dir_all(&d).map_err(|e| StateError::io(&d, e))?;
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700))
                .map_err(|e| StateError::io(&d, e))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn log_path(&self, origin: &str) -> PathBuf {
        self.dir
            .join(LOGS_DIR)
            .join(format!("{}.json", origin_hash(origin)))
    }

    /// Every state recorded so far.
    pub fn load_all(&self) -> Result<Vec<LogState>, StateError> {
        let logs = self.dir.join(LOGS_DIR);
        let mut out = Vec::new();
        for entry in fs::read_dir(&logs).map_err(|e| StateError::io(&logs, e))? {
            let entry = entry.map_err(|e| StateError::io(&logs, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.ends_with(".json") || name.starts_with('.') {
                continue; // temporary files of an interrupted save
            }
            if out.len() == MAX_STATE_FILES {
                return Err(StateError::TooManyFiles);
            }
            out.push(self.read(&entry.path())?);
        }
        Ok(out)
    }

    fn read(&self, path: &Path) -> Result<LogState, StateError> {
        let bytes = nitrile_fs::read_bounded(path, MAX_STATE_FILE).map_err(|e| match e {
            nitrile_fs::FsError::TooLarge { path, .. } => StateError::TooLarge { path },
            e => StateError::io(path, e.into()),
        })?;
        let f: StateFile =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: path.to_owned(),
                source,
            })?;
        let inconsistent = |what| StateError::Inconsistent {
            path: path.to_owned(),
            what,
        };
        let root: Hash = B64
            .decode(&f.root)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| inconsistent("root is not a base64 SHA-256 hash"))?;
        if self.log_path(&f.origin) != path {
            return Err(inconsistent("file name does not match the origin"));
        }
        Ok(LogState {
            origin: f.origin,
            size: f.size,
            root,
            checkpoint: f.checkpoint,
        })
    }

    /// Records `state` durably: when this returns, it survives a crash.
    pub fn save(&self, state: &LogState) -> Result<(), StateError> {
        let file = StateFile {
            origin: state.origin.clone(),
            size: state.size,
            root: B64.encode(state.root),
            checkpoint: state.checkpoint.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|source| StateError::Corrupt {
            path: self.log_path(&state.origin),
            source,
        })?;
        atomic_write(&self.log_path(&state.origin), &bytes)
    }

    /// Keeps the evidence of a split view: the checkpoint the witness
    /// cosigned and the conflicting one, both signed by the log. Returns
    /// the file written.
    pub fn save_split_view(
        &self,
        recorded: &LogState,
        conflicting_note: &str,
        now: u64,
    ) -> Result<PathBuf, StateError> {
        let path = self.dir.join(SPLIT_VIEWS_DIR).join(format!(
            "{}-{}-{now}.txt",
            origin_hash(&recorded.origin),
            recorded.size
        ));
        let text = format!(
            "split view of {} at size {}\n\ncosigned:\n{}\nconflicting:\n{}",
            recorded.origin, recorded.size, recorded.checkpoint, conflicting_note
        );
        atomic_write(&path, text.as_bytes())?;
        Ok(path)
    }
}

/// Writes `bytes` to `path` atomically and durably, owner-only, with
/// [`nitrile_fs::write_atomic`] (a unique temporary file in the same
/// directory, fsync, rename, fsync of the directory).
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    nitrile_fs::write_atomic(path, bytes, 0o600).map_err(|e| StateError::io(path, e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_survive_reopening_and_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert!(store.load_all().unwrap().is_empty());
        let mut s = LogState {
            origin: "local.nitrile/log".into(),
            size: 3,
            root: [7; 32],
            checkpoint: "local.nitrile/log\n3\nBwcH\n\n".into(),
        };
        store.save(&s).unwrap();
        s.size = 9;
        s.root = [9; 32];
        store.save(&s).unwrap();
        let again = StateStore::open(dir.path()).unwrap();
        assert_eq!(again.load_all().unwrap(), vec![s.clone()]);
        let files: Vec<_> = fs::read_dir(dir.path().join(LOGS_DIR)).unwrap().collect();
        assert_eq!(files.len(), 1, "no temporary file left");
    }

    #[test]
    fn a_tampered_or_misplaced_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let s = LogState {
            origin: "a.example/log".into(),
            size: 1,
            root: [1; 32],
            checkpoint: String::new(),
        };
        store.save(&s).unwrap();
        let path = store.log_path("a.example/log");
        // Renamed to another origin's file: refused, not silently adopted.
        fs::rename(&path, store.log_path("b.example/log")).unwrap();
        assert!(matches!(
            store.load_all(),
            Err(StateError::Inconsistent { .. })
        ));
        fs::write(store.log_path("b.example/log"), b"{not json").unwrap();
        assert!(matches!(store.load_all(), Err(StateError::Corrupt { .. })));
    }
}
