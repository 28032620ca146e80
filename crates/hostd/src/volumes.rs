//! The volume store: volumes as resources of their own, shared by the hosts
//! of a cell.
//!
//! A directory (`volumes` in the host agent's config; in `nitrile up` the
//! cell's `<state>/volumes`, which every host agent of the cell is given)
//! with one directory per volume:
//!
//! ```text
//! <store>/<volume>/volume.json   its record: size, key name, format, the data
//!                                key wrapped by the key service, attachment
//! <store>/<volume>/lock          flock'ed while a host changes the record
//! <store>/<volume>/disk.img      the ciphertext, made by the first VMM the
//!                                volume is attached to
//! ```
//!
//! The record holds the data key only as the key service wrapped it (bytes
//! no host can open: the key service's key-encryption key and the volume's
//! own secret never leave the key service). Every change of a record is
//! made under an exclusive `flock` of the volume's lock file, so two host
//! agents sharing the store never attach one volume twice. Records are
//! written atomically (temporary file, fsync, rename, fsync of the
//! directory) and read within [`MAX_VOLUME_RECORD_LEN`].

use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nitrile_api::Name;
use nitrile_api::admin::{VolumeAttachment, VolumeDescription, VolumeState};
use serde::{Deserialize, Serialize};

use crate::volume_keys::{MAX_WRAPPED_KEY_LEN, WrappedVolumeKey};

/// Largest volume record read: names, numbers, a time and the wrapped key
/// in hex.
pub const MAX_VOLUME_RECORD_LEN: u64 = 4 * 1024 + 2 * MAX_WRAPPED_KEY_LEN as u64;

const RECORD_FILE: &str = "volume.json";
const LOCK_FILE: &str = "lock";
const DISK_FILE: &str = "disk.img";

/// Why the volume store could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeStoreError {
    /// no volume with this id in the store
    #[error("no volume {0} in the volume store")]
    NoSuchVolume(Name),
    /// the id is taken
    #[error("volume {0} already exists")]
    Exists(Name),
    /// a file of the store could not be read or written
    #[error("volume store file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// a record is not what a host agent writes
    #[error("volume record {} is damaged: {reason}", path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VolumeStoreError + '_ {
    move |source| VolumeStoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A volume's record as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    /// Its id.
    pub volume: Name,
    /// Size in MiB.
    pub size_mib: u64,
    /// The key service's key its data key is wrapped under.
    pub kms_key: Name,
    /// `luks` (the qemu backend) or `xts` (the kvm backend).
    pub format: String,
    /// The data key as the key service wrapped it, hex.
    pub wrapped_key: String,
    /// Where it is attached.
    pub attachment: Option<VolumeAttachment>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// The image whose root disk is the volume's first contents, written
    /// into the ciphertext by the first VMM that opens it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_image: Option<nitrile_api::admin::Sha256Hex>,
}

impl VolumeRecord {
    /// The metadata a caller sees: everything but the wrapped key.
    pub fn describe(&self) -> VolumeDescription {
        VolumeDescription {
            volume: self.volume.clone(),
            size_mib: self.size_mib,
            kms_key: self.kms_key.clone(),
            format: self.format.clone(),
            state: if self.attachment.is_some() {
                VolumeState::Attached
            } else {
                VolumeState::Available
            },
            attachment: self.attachment.clone(),
            created_at: self.created_at.clone(),
        }
    }

    /// The wrapped data key.
    pub fn wrapped(&self, path: &Path) -> Result<WrappedVolumeKey, VolumeStoreError> {
        let damaged = |reason: String| VolumeStoreError::Damaged {
            path: path.to_owned(),
            reason,
        };
        let bytes = hex::decode(&self.wrapped_key)
            .map_err(|_| damaged("the wrapped key is not hex".into()))?;
        WrappedVolumeKey::new(bytes).map_err(|e| damaged(format!("the wrapped key: {e}")))
    }
}

/// An exclusive hold on one volume's record, across processes; released
/// when dropped.
#[derive(Debug)]
pub struct VolumeLock {
    file: File,
}

impl Drop for VolumeLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// The volume store. See the module documentation.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    dir: PathBuf,
}

impl VolumeStore {
    /// Opens (creating, owner-only) the store at `dir`.
    pub fn open(dir: &Path) -> Result<Self, VolumeStoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let dir = std::fs::canonicalize(dir).map_err(io(dir))?;
        Ok(Self { dir })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn volume_dir(&self, id: &Name) -> PathBuf {
        self.dir.join(id.as_str())
    }

    fn record_path(&self, id: &Name) -> PathBuf {
        self.volume_dir(id).join(RECORD_FILE)
    }

    /// The ciphertext file of a volume (absent until its first attach).
    pub fn disk_path(&self, id: &Name) -> PathBuf {
        self.volume_dir(id).join(DISK_FILE)
    }

    /// Reserves `id`: makes its directory, failing with
    /// [`VolumeStoreError::Exists`] when another volume (on any host of the
    /// store) has it, and takes its lock. The record is written by
    /// [`VolumeStore::write`]; [`VolumeStore::abandon`] undoes a reservation
    /// whose key could not be made.
    pub fn reserve(&self, id: &Name) -> Result<VolumeLock, VolumeStoreError> {
        let dir = self.volume_dir(id);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(VolumeStoreError::Exists(id.clone()));
            }
            Err(e) => return Err(io(&dir)(e)),
        }
        nitrile_fs::sync_dir(&self.dir).map_err(|e| io(&self.dir)(e.into()))?;
        self.lock_dir(&dir)
    }

    /// Removes the directory of a reservation that has no record.
    pub fn abandon(&self, id: &Name, lock: VolumeLock) {
        let dir = self.volume_dir(id);
        drop(lock);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::error!(volume = %id, error = %e, "could not remove an abandoned volume reservation");
        }
    }

    /// Takes the exclusive lock of an existing volume (blocking until the
    /// host that holds it lets go).
    pub fn lock(&self, id: &Name) -> Result<VolumeLock, VolumeStoreError> {
        let dir = self.volume_dir(id);
        if !dir.join(RECORD_FILE).exists() {
            return Err(VolumeStoreError::NoSuchVolume(id.clone()));
        }
        self.lock_dir(&dir)
    }

    fn lock_dir(&self, dir: &Path) -> Result<VolumeLock, VolumeStoreError> {
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        file.lock().map_err(io(&path))?;
        Ok(VolumeLock { file })
    }

    /// Reads a volume's record.
    pub fn read(&self, id: &Name) -> Result<VolumeRecord, VolumeStoreError> {
        let path = self.record_path(id);
        let bytes = match nitrile_fs::read_secret(&path, MAX_VOLUME_RECORD_LEN) {
            Ok(b) => b,
            Err(nitrile_fs::FsError::TooLarge { path, max }) => {
                return Err(VolumeStoreError::Damaged {
                    path,
                    reason: format!("larger than {max} bytes"),
                });
            }
            Err(e) => {
                let e: std::io::Error = e.into();
                if e.kind() == std::io::ErrorKind::NotFound {
                    return Err(VolumeStoreError::NoSuchVolume(id.clone()));
                }
                return Err(io(&path)(e));
            }
        };
        let record: VolumeRecord =
            serde_json::from_slice(&bytes).map_err(|e| VolumeStoreError::Damaged {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if record.volume != *id {
            return Err(VolumeStoreError::Damaged {
                path,
                reason: format!("names volume {}", record.volume),
            });
        }
        Ok(record)
    }

    /// Writes a volume's record (the caller holds its lock).
    pub fn write(&self, _lock: &VolumeLock, record: &VolumeRecord) -> Result<(), VolumeStoreError> {
        let path = self.record_path(&record.volume);
        let bytes = serde_json::to_vec_pretty(record)
            .unwrap_or_else(|_| unreachable!("a record serializes"));
        nitrile_fs::write_atomic(&path, &bytes, 0o600).map_err(|e| io(&path)(e.into()))
    }

    /// Removes a volume: its ciphertext, then its record and directory (the
    /// caller holds its lock, and the key service destroyed its key first).
    pub fn remove(&self, id: &Name, lock: VolumeLock) -> Result<(), VolumeStoreError> {
        let disk = self.disk_path(id);
        match std::fs::remove_file(&disk) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&disk)(e)),
        }
        let record = self.record_path(id);
        std::fs::remove_file(&record).map_err(io(&record))?;
        let dir = self.volume_dir(id);
        drop(lock);
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        nitrile_fs::sync_dir(&self.dir).map_err(|e| io(&self.dir)(e.into()))
    }

    /// Every volume's record, by id (directories without a record, a
    /// reservation in progress, are skipped).
    pub fn list(&self) -> Result<Vec<VolumeRecord>, VolumeStoreError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let Some(id) = entry.file_name().to_str().and_then(|n| Name::new(n).ok()) else {
                continue;
            };
            match self.read(&id) {
                Ok(r) => out.push(r),
                Err(VolumeStoreError::NoSuchVolume(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.volume.cmp(&b.volume));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> VolumeRecord {
        VolumeRecord {
            volume: Name::new(id).unwrap(),
            size_mib: 64,
            kms_key: Name::new("default").unwrap(),
            format: "luks".into(),
            wrapped_key: "ab".repeat(100),
            attachment: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            seed_image: None,
        }
    }

    #[test]
    fn an_id_is_reserved_once_and_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(&dir.path().join("v")).unwrap();
        let id = Name::new("data").unwrap();
        let lock = store.reserve(&id).unwrap();
        assert!(matches!(
            store.reserve(&id),
            Err(VolumeStoreError::Exists(_))
        ));
        // No record yet: not listed, not found.
        assert!(store.list().unwrap().is_empty());
        assert!(matches!(
            store.read(&id),
            Err(VolumeStoreError::NoSuchVolume(_))
        ));
        store.write(&lock, &record("data")).unwrap();
        drop(lock);
        assert_eq!(store.read(&id).unwrap(), record("data"));
        assert_eq!(store.list().unwrap().len(), 1);
        let d = store.read(&id).unwrap().describe();
        assert_eq!(d.state, VolumeState::Available);
        assert!(
            !serde_json::to_string(&d)
                .unwrap()
                .contains(&"ab".repeat(100))
        );
        let lock = store.lock(&id).unwrap();
        store.remove(&id, lock).unwrap();
        assert!(matches!(
            store.lock(&id),
            Err(VolumeStoreError::NoSuchVolume(_))
        ));
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn damaged_records_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();
        let id = Name::new("data").unwrap();
        let lock = store.reserve(&id).unwrap();
        store.write(&lock, &record("data")).unwrap();
        let path = dir.path().join("data").join(RECORD_FILE);
        for bad in [
            serde_json::to_vec(&record("other")).unwrap(),
            br#"{"volume":"data"}"#.to_vec(),
            vec![b' '; usize::try_from(MAX_VOLUME_RECORD_LEN).unwrap() + 1],
        ] {
            std::fs::write(&path, &bad).unwrap();
            assert!(
                matches!(store.read(&id), Err(VolumeStoreError::Damaged { .. })),
                "{}",
                String::from_utf8_lossy(&bad[..40.min(bad.len())])
            );
        }
        let mut r = record("data");
        r.wrapped_key = "zz".into();
        assert!(r.wrapped(&path).is_err());
    }

    #[test]
    fn the_lock_excludes_another_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();
        let id = Name::new("data").unwrap();
        let lock = store.reserve(&id).unwrap();
        store.write(&lock, &record("data")).unwrap();
        // Another open file description (another host agent) cannot take it.
        let other = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("data").join(LOCK_FILE))
            .unwrap();
        assert!(other.try_lock().is_err());
        drop(lock);
        assert!(other.try_lock().is_ok());
    }
}
