//! The key service's state directory.
//!
//! ```text
//! <dir>/                 0700
//!   lock                 held with an exclusive flock while a Kms is open
//!   keys/                0700
//!     <name>.key         a KEK's 32 bytes (0600), written once, erased when the key is destroyed
//!     <name>.json        its metadata (0600): owner, state, times; rewritten on state changes
//!   volumes/             0700
//!     <volume>.json      a volume record (0600): its KEK, its secret, when it was made
//! ```
//!
//! Every file is written with [`nitrile_fs::write_atomic`] (a temporary file,
//! fsynced, renamed, the directory fsynced). Key material sits in a file of
//! its own that is never rewritten, so the only copy on disk is the one
//! erased when the key is destroyed. Erasing a file overwrites it with
//! zeros and fsyncs it, removes it and fsyncs the directory; the overwrite
//! helps only on file systems that write in place, the removal is what
//! counts. Loading refuses anything it does not recognise, naming it,
//! except what an interrupted write leaves (temporary files, the material
//! of a key whose metadata was never written), which it erases and reports.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nitrile_api::{Name, PrincipalId};
use nitrile_fs::{read_bounded, read_secret, sync_dir, write_atomic};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::KEK_LEN;
use crate::error::{Malformed, StoreError};
use crate::key::{KeyName, KeyState};
use crate::secret::{HexIn, HexOut, Secret};
use crate::time_format;

/// Longest key metadata file read.
pub const MAX_KEY_FILE_LEN: u64 = 4096;

/// Longest volume record file read.
pub const MAX_VOLUME_FILE_LEN: u64 = 4096;

/// Most keys a store holds.
pub const MAX_KEYS: usize = 10_000;

/// Most volume records a store holds.
pub const MAX_VOLUMES: usize = 1_000_000;

/// Entries of a directory beyond its files' bound that loading reads (the
/// leftovers of interrupted writes, erased as they are found).
const MAX_LEFTOVERS: usize = 1024;

const KEY_FORMAT: &str = "nitrile-kms key v1";
const VOLUME_FORMAT: &str = "nitrile-kms volume v1";
const FILE_MODE: u32 = 0o600;

/// A KEK's metadata file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: String,
    key: KeyName,
    owner: PrincipalId,
    state: String,
    #[serde(with = "time_format::option")]
    delete_at: Option<OffsetDateTime>,
    #[serde(with = "time_format")]
    created: OffsetDateTime,
    #[serde(with = "time_format")]
    updated: OffsetDateTime,
}

/// A volume record as written.
#[derive(Serialize)]
struct VolumeFileOut<'a> {
    format: &'static str,
    volume: &'a Name,
    key: &'a KeyName,
    #[serde(with = "time_format")]
    created: OffsetDateTime,
    secret: HexOut<'a>,
}

/// A volume record as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeFileIn {
    format: String,
    volume: Name,
    key: KeyName,
    #[serde(with = "time_format")]
    created: OffsetDateTime,
    secret: HexIn,
}

/// A KEK as stored.
pub(crate) struct StoredKey {
    pub(crate) name: KeyName,
    pub(crate) owner: PrincipalId,
    pub(crate) state: KeyState,
    pub(crate) created: OffsetDateTime,
    pub(crate) updated: OffsetDateTime,
    pub(crate) material: Arc<Secret<KEK_LEN>>,
}

/// A volume record as stored.
pub(crate) struct StoredVolume {
    pub(crate) volume: Name,
    pub(crate) key: KeyName,
    pub(crate) created: OffsetDateTime,
    pub(crate) secret: Arc<Secret<32>>,
}

/// What [`Store::open`] found.
pub(crate) struct Loaded {
    pub(crate) keys: Vec<StoredKey>,
    pub(crate) volumes: Vec<StoredVolume>,
    /// Leftovers of interrupted writes that were erased.
    pub(crate) erased: Vec<PathBuf>,
}

/// An open state directory, locked.
#[derive(Debug)]
pub(crate) struct Store {
    dir: PathBuf,
    keys: PathBuf,
    volumes: PathBuf,
    /// Holds the exclusive lock until dropped.
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the state directory `dir`, takes its lock
    /// and loads every key and volume record.
    pub(crate) fn open(dir: &Path) -> Result<(Self, Loaded), StoreError> {
        private_dir(dir)?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        lock.try_lock().map_err(|e| match e {
            fs::TryLockError::WouldBlock => StoreError::Locked {
                path: lock_path.clone(),
            },
            fs::TryLockError::Error(error) => StoreError::Io {
                step: "lock",
                path: lock_path.clone(),
                error,
            },
        })?;
        let store = Self {
            dir: dir.to_owned(),
            keys: dir.join("keys"),
            volumes: dir.join("volumes"),
            _lock: lock,
        };
        private_dir(&store.keys)?;
        private_dir(&store.volumes)?;
        sync_dir(dir)?;
        let loaded = store.load()?;
        Ok((store, loaded))
    }

    /// The state directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        let mut erased = Vec::new();
        let (metas, materials) = {
            let mut metas = BTreeMap::new();
            let mut materials = BTreeMap::new();
            for (stem, ext, path) in self.scan(&self.keys, 2 * MAX_KEYS, &mut erased)? {
                match ext {
                    Ext::Json => metas.insert(stem, path),
                    Ext::Key => materials.insert(stem, path),
                };
            }
            (metas, materials)
        };
        if metas.len() > MAX_KEYS {
            return Err(StoreError::TooManyFiles {
                path: self.keys.clone(),
                max: MAX_KEYS,
            });
        }
        let mut keys = Vec::with_capacity(metas.len());
        for (stem, path) in &metas {
            let material = materials.get(stem).ok_or_else(|| StoreError::Malformed {
                path: path.clone(),
                reason: Malformed::MissingMaterial,
            })?;
            keys.push(read_key(stem, path, material)?);
        }
        // Material without metadata: a creation that never finished.
        for (stem, path) in &materials {
            if !metas.contains_key(stem) {
                erase_file(path)?;
                erased.push(path.clone());
            }
        }
        let names: BTreeSet<&KeyName> = keys.iter().map(|k| &k.name).collect();
        let mut volumes = Vec::new();
        for (stem, ext, path) in self.scan(&self.volumes, MAX_VOLUMES, &mut erased)? {
            if ext != Ext::Json {
                return Err(StoreError::UnexpectedFile { path });
            }
            let v = read_volume(&stem, &path)?;
            if !names.contains(&v.key) {
                return Err(StoreError::Malformed {
                    path,
                    reason: Malformed::MissingKey(v.key),
                });
            }
            volumes.push(v);
        }
        if !erased.is_empty() {
            sync_dir(&self.keys)?;
            sync_dir(&self.volumes)?;
        }
        Ok(Loaded {
            keys,
            volumes,
            erased,
        })
    }

    /// The files of `dir` as (name, extension, path), at most `max` of
    /// them; temporary files left by an interrupted write are erased and
    /// added to `erased`; anything else is refused.
    fn scan(
        &self,
        dir: &Path,
        max: usize,
        erased: &mut Vec<PathBuf>,
    ) -> Result<Vec<(String, Ext, PathBuf)>, StoreError> {
        let mut out = Vec::new();
        let mut seen = 0usize;
        for entry in fs::read_dir(dir).map_err(io("read the directory", dir))? {
            let entry = entry.map_err(io("read the directory", dir))?;
            seen += 1;
            if seen > max + MAX_LEFTOVERS {
                return Err(StoreError::TooManyFiles {
                    path: dir.to_owned(),
                    max,
                });
            }
            let path = entry.path();
            let file_type = entry.file_type().map_err(io("stat", &path))?;
            if !file_type.is_file() {
                return Err(StoreError::UnexpectedFile { path });
            }
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                return Err(StoreError::UnexpectedFile { path });
            };
            if name.starts_with('.') && name.contains(".tmp-") {
                erase_file(&path)?;
                erased.push(path);
                continue;
            }
            let parsed = [(".json", Ext::Json), (".key", Ext::Key)]
                .into_iter()
                .find_map(|(suffix, ext)| name.strip_suffix(suffix).map(|stem| (stem, ext)))
                .filter(|(stem, _)| Name::new(stem).is_ok());
            let Some((stem, ext)) = parsed else {
                return Err(StoreError::UnexpectedFile { path });
            };
            out.push((stem.to_owned(), ext, path));
        }
        Ok(out)
    }

    fn key_paths(&self, name: &KeyName) -> (PathBuf, PathBuf) {
        (
            self.keys.join(format!("{}.json", name.as_str())),
            self.keys.join(format!("{}.key", name.as_str())),
        )
    }

    fn volume_path(&self, volume: &Name) -> PathBuf {
        self.volumes.join(format!("{volume}.json"))
    }

    /// Writes a new key: its material, then its metadata. If the metadata
    /// cannot be written, the material is erased again.
    pub(crate) fn create_key(&self, key: &StoredKey) -> Result<(), StoreError> {
        let (_, material) = self.key_paths(&key.name);
        write_atomic(&material, key.material.bytes(), FILE_MODE)?;
        if let Err(e) = self.write_key_meta(key) {
            let _ = erase_file(&material).and_then(|()| sync_dir(&self.keys).map_err(Into::into));
            return Err(e);
        }
        Ok(())
    }

    /// Replaces a key's metadata (its state changed).
    pub(crate) fn write_key_meta(&self, key: &StoredKey) -> Result<(), StoreError> {
        let (meta, _) = self.key_paths(&key.name);
        let (state, delete_at) = match key.state {
            KeyState::PendingDeletion { delete_at } => (key.state.as_str(), Some(delete_at)),
            _ => (key.state.as_str(), None),
        };
        let file = KeyFile {
            format: KEY_FORMAT.to_owned(),
            key: key.name.clone(),
            owner: key.owner.clone(),
            state: state.to_owned(),
            delete_at,
            created: key.created,
            updated: key.updated,
        };
        let mut bytes = serde_json::to_vec_pretty(&file)
            .unwrap_or_else(|_| unreachable!("key metadata serializes"));
        bytes.push(b'\n');
        write_atomic(&meta, &bytes, FILE_MODE)?;
        Ok(())
    }

    /// Destroys a key: its metadata is removed, its material erased, the
    /// directory fsynced.
    pub(crate) fn destroy_key(&self, name: &KeyName) -> Result<(), StoreError> {
        let (meta, material) = self.key_paths(name);
        remove_file(&meta)?;
        erase_file(&material)?;
        sync_dir(&self.keys)?;
        Ok(())
    }

    /// Writes a new volume record.
    pub(crate) fn write_volume(&self, v: &StoredVolume) -> Result<(), StoreError> {
        let record = VolumeFileOut {
            format: VOLUME_FORMAT,
            volume: &v.volume,
            key: &v.key,
            created: v.created,
            secret: HexOut(v.secret.bytes()),
        };
        // The buffer holds the secret's hex: it never grows (a record is a
        // few hundred bytes) and is zeroized on drop.
        let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_VOLUME_FILE_LEN as usize));
        serde_json::to_writer(&mut *bytes, &record)
            .unwrap_or_else(|_| unreachable!("a volume record serializes"));
        bytes.push(b'\n');
        debug_assert!(bytes.len() <= MAX_VOLUME_FILE_LEN as usize);
        write_atomic(&self.volume_path(&v.volume), &bytes, FILE_MODE)?;
        Ok(())
    }

    /// Erases a volume record's file, without the directory fsync (see
    /// [`Store::sync_volumes`]).
    pub(crate) fn erase_volume_unsynced(&self, volume: &Name) -> Result<(), StoreError> {
        erase_file(&self.volume_path(volume))
    }

    /// Fsyncs the volumes' directory, making erasures durable.
    pub(crate) fn sync_volumes(&self) -> Result<(), StoreError> {
        Ok(sync_dir(&self.volumes)?)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ext {
    Json,
    Key,
}

fn read_key(stem: &str, meta: &Path, material: &Path) -> Result<StoredKey, StoreError> {
    let malformed = |reason| StoreError::Malformed {
        path: meta.to_owned(),
        reason,
    };
    let bytes = read_bounded(meta, MAX_KEY_FILE_LEN)?;
    let file: KeyFile =
        serde_json::from_slice(&bytes).map_err(|e| malformed(Malformed::Json(e)))?;
    if file.format != KEY_FORMAT {
        return Err(malformed(Malformed::Format(
            file.format.chars().take(80).collect(),
        )));
    }
    if file.key.as_str() != stem {
        return Err(malformed(Malformed::NameMismatch {
            inside: file.key.to_string(),
            file: stem.to_owned(),
        }));
    }
    let state = match (file.state.as_str(), file.delete_at) {
        ("enabled", None) => KeyState::Enabled,
        ("disabled", None) => KeyState::Disabled,
        ("pending_deletion", Some(delete_at)) => KeyState::PendingDeletion { delete_at },
        (state, delete_at) => {
            return Err(malformed(Malformed::State {
                state: state.chars().take(40).collect(),
                has_delete_at: delete_at.is_some(),
            }));
        }
    };
    let raw = read_secret(material, KEK_LEN as u64)?;
    if raw.len() != KEK_LEN {
        return Err(StoreError::Malformed {
            path: material.to_owned(),
            reason: Malformed::KeyLength(raw.len()),
        });
    }
    let material = Secret::filled(|b| {
        b.copy_from_slice(&raw);
        Ok::<_, StoreError>(())
    })?;
    Ok(StoredKey {
        name: file.key,
        owner: file.owner,
        state,
        created: file.created,
        updated: file.updated,
        material,
    })
}

fn read_volume(stem: &str, path: &Path) -> Result<StoredVolume, StoreError> {
    let malformed = |reason| StoreError::Malformed {
        path: path.to_owned(),
        reason,
    };
    // The record holds the volume's secret: read into a buffer that is
    // zeroized, and decoded from it without copies.
    let bytes = read_secret(path, MAX_VOLUME_FILE_LEN)?;
    let file: VolumeFileIn =
        serde_json::from_slice(&bytes).map_err(|e| malformed(Malformed::Json(e)))?;
    if file.format != VOLUME_FORMAT {
        return Err(malformed(Malformed::Format(
            file.format.chars().take(80).collect(),
        )));
    }
    if file.volume.as_str() != stem {
        return Err(malformed(Malformed::NameMismatch {
            inside: file.volume.to_string(),
            file: stem.to_owned(),
        }));
    }
    Ok(StoredVolume {
        volume: file.volume,
        key: file.key,
        created: file.created,
        secret: file.secret.0,
    })
}

/// Creates `dir` with mode 0700, or checks that the existing one is a
/// directory that no one but its owner may enter.
fn private_dir(dir: &Path) -> Result<(), StoreError> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            // The umask may have taken bits away: set exactly 0700.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io("set the mode of", dir))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(dir).map_err(io("stat", dir))?;
            if !meta.is_dir() {
                return Err(StoreError::UnexpectedFile {
                    path: dir.to_owned(),
                });
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(StoreError::Permissions {
                    path: dir.to_owned(),
                    mode,
                });
            }
            Ok(())
        }
        Err(e) => Err(io("create", dir)(e)),
    }
}

/// Overwrites `path` with zeros, fsyncs it and removes it (the caller
/// fsyncs the directory). A missing file is already erased.
fn erase_file(path: &Path) -> Result<(), StoreError> {
    match OpenOptions::new().write(true).open(path) {
        Ok(mut file) => {
            let len = file.metadata().map_err(io("stat", path))?.len();
            let zeros = [0u8; 4096];
            let mut left = len;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                file.write_all(&zeros[..n]).map_err(io("overwrite", path))?;
                left -= n as u64;
            }
            file.sync_data().map_err(io("fsync", path))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("open to erase", path)(e)),
    }
    remove_file(path)
}

/// Removes `path`; a missing file is already removed.
fn remove_file(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", path)(e)),
    }
}

fn io(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError + use<> {
    let path = path.to_owned();
    move |error| StoreError::Io { step, path, error }
}
