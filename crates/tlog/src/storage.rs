//! Where a log keeps its tiles, entry bundles and checkpoints.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nitrile_fs::{AtomicFile, FsError};

use crate::tile::MAX_BUNDLE_SIZE;

/// The largest object [`FileStorage::read`] returns.
pub const MAX_OBJECT_SIZE: usize = MAX_BUNDLE_SIZE;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// the path is not a relative path of `[A-Za-z0-9._-]` elements
    #[error("invalid storage path {0:?}")]
    InvalidPath(String),
    /// an I/O operation failed
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path it was done on.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// a stored object is larger than MAX_OBJECT_SIZE
    #[error("{0} is larger than {MAX_OBJECT_SIZE} bytes")]
    TooLarge(String),
    /// the storage lock was poisoned by a panic in another thread
    #[error("the storage lock was poisoned")]
    Poisoned,
    /// a database operation failed or the database refused it
    #[error("database: {op}")]
    Database {
        /// What was being done.
        op: &'static str,
        /// The cause (the database client's error).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// Object storage for a log: paths are `/`-separated relative names
/// (`tile/0/000`, `checkpoint`). [`FileStorage`] by default;
/// `PgStorage` (cargo feature `postgres`) for a replicated deployment.
pub trait Storage: Send + Sync + 'static {
    /// The object at `path`, or `None` if there is none.
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// Replaces the object at `path` atomically: a reader (or a restart after
    /// a crash) sees the old object or the new one, never a mix.
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StorageError>;
    /// Makes everything written so far durable.
    fn sync(&self) -> Result<(), StorageError>;
    /// Every stored path that starts with `prefix`, sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError>;
}

impl<S: Storage + ?Sized> Storage for Box<S> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
        (**self).read(path)
    }
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StorageError> {
        (**self).write(path, bytes)
    }
    fn sync(&self) -> Result<(), StorageError> {
        (**self).sync()
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        (**self).list(prefix)
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
        (**self).read(path)
    }
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StorageError> {
        (**self).write(path, bytes)
    }
    fn sync(&self) -> Result<(), StorageError> {
        (**self).sync()
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        (**self).list(prefix)
    }
}

/// Mode of stored objects: public data (served to auditors), guarded by the
/// mode of the store's directory.
const OBJECT_MODE: u32 = 0o644;

fn valid_element(e: &str) -> bool {
    !e.is_empty()
        && e != "."
        && e != ".."
        && !e.starts_with('.')
        && e.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub(crate) fn check_path(path: &str) -> Result<(), StorageError> {
    if path.len() > 512 || !path.split('/').all(valid_element) {
        return Err(StorageError::InvalidPath(path.chars().take(200).collect()));
    }
    Ok(())
}

/// Objects as files under a directory.
///
/// `write` writes a temporary file in the target directory, fsyncs it and
/// renames it over the target, so a file is always whole; `sync` fsyncs every
/// directory changed since the last `sync`, which makes the renames durable.
/// Writes of `checkpoint` and `checkpoints/*` fsync their directory at once.
#[derive(Debug)]
pub struct FileStorage {
    root: PathBuf,
    dirty_dirs: Mutex<BTreeSet<PathBuf>>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

fn fsync_dir(dir: &Path) -> Result<(), StorageError> {
    nitrile_fs::sync_dir(dir).map_err(|e| io_err("fsync directory", dir)(e.into()))
}

impl FileStorage {
    /// Opens (creating it if needed) the store rooted at `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StorageError> {
        let root = dir.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(io_err("create directory", &root))?;
        Ok(Self {
            root,
            dirty_dirs: Mutex::new(BTreeSet::new()),
        })
    }

    /// The directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    fn file(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }

    fn walk(&self, dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), StorageError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("list", dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("list", dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !valid_element(&name) {
                continue;
            }
            let child = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let ft = entry.file_type().map_err(io_err("stat", &entry.path()))?;
            if ft.is_dir() {
                self.walk(&entry.path(), &child, out)?;
            } else if ft.is_file() {
                out.push(child);
            }
        }
        Ok(())
    }
}

impl Storage for FileStorage {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
        check_path(path)?;
        let file = self.file(path);
        match nitrile_fs::read_bounded(&file, MAX_OBJECT_SIZE as u64) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(FsError::Missing { .. }) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::IsADirectory => Ok(None),
            Err(FsError::TooLarge { .. }) => Err(StorageError::TooLarge(path.to_owned())),
            Err(e) => Err(io_err("read", &file)(e.into())),
        }
    }

    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StorageError> {
        check_path(path)?;
        let file = self.file(path);
        let dir = file
            .parent()
            .map_or_else(|| self.root.clone(), Path::to_path_buf);
        let mut newly_created = Vec::new();
        if !dir.is_dir() {
            let mut d = dir.as_path();
            while !d.is_dir() && d != self.root {
                newly_created.push(d.to_path_buf());
                let Some(parent) = d.parent() else { break };
                d = parent;
            }
            fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        }
        // The file is whole once renamed; the rename is durable once the
        // directory is fsynced, below for checkpoints, else by `sync`.
        let fs_err = |e: FsError| io_err("write", &file)(e.into());
        let mut f = AtomicFile::create_in(&dir, file.file_name().unwrap_or_default(), OBJECT_MODE)
            .map_err(fs_err)?;
        f.write_all(bytes).map_err(io_err("write", f.temp_path()))?;
        f.commit_unsynced_dir(&file).map_err(fs_err)?;
        let immediate = path == "checkpoint" || path.starts_with("checkpoints/");
        {
            let mut dirty = self.dirty_dirs.lock().map_err(|_| StorageError::Poisoned)?;
            for created in &newly_created {
                if let Some(parent) = created.parent() {
                    dirty.insert(parent.to_path_buf());
                }
            }
            if !immediate {
                dirty.insert(dir.clone());
            }
        }
        if immediate {
            fsync_dir(&dir)?;
            for created in &newly_created {
                if let Some(parent) = created.parent() {
                    fsync_dir(parent)?;
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        let dirs =
            std::mem::take(&mut *self.dirty_dirs.lock().map_err(|_| StorageError::Poisoned)?);
        // Deepest first, so a new directory's own entries are durable before
        // the entry that names it.
        for d in dirs.iter().rev() {
            if let Err(e) = fsync_dir(d) {
                // Keep the rest dirty so a retry covers them.
                if let Ok(mut dirty) = self.dirty_dirs.lock() {
                    dirty.extend(dirs.iter().cloned());
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let (dir_part, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        if !dir_part.is_empty() {
            check_path(dir_part)?;
        }
        let mut out = Vec::new();
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.file(dir_part)
        };
        self.walk(&start, dir_part, &mut out)?;
        out.retain(|p| p.starts_with(prefix));
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_list_and_refuse_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::open(dir.path()).unwrap();
        s.write("tile/0/x001/002", b"a").unwrap();
        s.write("tile/0/x001/002", b"b").unwrap();
        s.write("tile/entries/000.p/3", b"c").unwrap();
        s.write("checkpoint", b"d").unwrap();
        s.sync().unwrap();
        assert_eq!(s.read("tile/0/x001/002").unwrap().unwrap(), b"b");
        assert_eq!(s.read("tile/0/x001/003").unwrap(), None);
        assert_eq!(s.read("tile/0").unwrap(), None);
        assert_eq!(
            s.list("tile/").unwrap(),
            vec!["tile/0/x001/002", "tile/entries/000.p/3"]
        );
        assert_eq!(
            s.list("tile/entries/000.p/").unwrap(),
            vec!["tile/entries/000.p/3"]
        );
        assert_eq!(s.list("").unwrap().len(), 3);
        assert!(s.list("nothing/here/").unwrap().is_empty());
        for bad in ["", "/abs", "a/../b", "a//b", ".tmp-x", "a/", "a b", "ü"] {
            assert!(
                matches!(s.write(bad, b"x"), Err(StorageError::InvalidPath(_))),
                "{bad}"
            );
        }
        // No temporary files are left behind.
        fn count(d: &Path) -> usize {
            fs::read_dir(d)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    if e.file_type().unwrap().is_dir() {
                        count(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        }
        assert_eq!(count(dir.path()), 3);
    }
}
