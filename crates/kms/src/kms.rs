//! [`Kms`]: the keys and volume records of one state directory, and every
//! operation on them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use nitrile_api::{Name, PrincipalId};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::error::{KmsError, StoreError, SweepError};
use crate::key::{
    DEFAULT_DELETION_WINDOW_DAYS, KeyMetadata, KeyName, KeyState, MAX_DELETION_WINDOW_DAYS,
    MIN_DELETION_WINDOW_DAYS,
};
use crate::seal::{RecipientPublicKey, SealedKey, seal_in_place};
use crate::secret::Secret;
use crate::store::{MAX_KEYS, MAX_VOLUMES, Store, StoredKey, StoredVolume};
use crate::wrap::WrappedKey;
use crate::{DEK_LEN, KEK_LEN, VOLUME_SECRET_LEN};

/// What [`Kms::open`] found and did, for the service to journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// The state directory.
    pub dir: PathBuf,
    /// Keys loaded.
    pub keys: usize,
    /// Volume records loaded.
    pub volumes: usize,
    /// Leftovers of interrupted writes that were erased: temporary files,
    /// and the material of a key whose creation never finished.
    pub erased: Vec<PathBuf>,
}

/// What is known of a volume record (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMetadata {
    /// The volume.
    pub volume: Name,
    /// The KEK its data key is wrapped under.
    pub key: KeyName,
    /// When its data key was made.
    pub created: OffsetDateTime,
}

/// A new volume data key: the record made, and the data key wrapped for
/// the host to keep.
#[derive(Debug, Clone)]
pub struct GeneratedVolumeKey {
    /// The volume record.
    pub volume: VolumeMetadata,
    /// The wrapped data key (`wrapped.encode()` is what the host stores).
    pub wrapped: WrappedKey,
}

/// A key's state change: the key as it is now, and its state before. A
/// request that changes nothing (enabling an enabled key) has `previous`
/// equal to `key.state` and writes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTransition {
    /// The key after the change.
    pub key: KeyMetadata,
    /// Its state before.
    pub previous: KeyState,
}

/// A key destroyed by [`Kms::sweep`], with the volume records under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweptKey {
    /// The key.
    pub key: KeyName,
    /// Its owner.
    pub owner: PrincipalId,
    /// When its deletion window ended.
    pub delete_at: OffsetDateTime,
    /// The volume records destroyed with it.
    pub volumes: Vec<Name>,
}

/// What [`Kms::sweep`] destroyed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Each key destroyed, in name order.
    pub keys: Vec<SweptKey>,
}

/// A volume's KEK and secret in plaintext, for tests that open a wrapped
/// key with an independent implementation.
#[cfg(feature = "danger-test-export")]
pub struct VolumeSecretsForTests {
    /// The KEK's 32 bytes.
    pub kek: Zeroizing<[u8; KEK_LEN]>,
    /// The volume's secret, the HKDF salt.
    pub secret: Zeroizing<[u8; VOLUME_SECRET_LEN]>,
}

#[cfg(feature = "danger-test-export")]
impl std::fmt::Debug for VolumeSecretsForTests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeSecretsForTests(..)")
    }
}

struct KeyEntry {
    owner: PrincipalId,
    state: KeyState,
    created: OffsetDateTime,
    updated: OffsetDateTime,
    material: Arc<Secret<KEK_LEN>>,
    volumes: BTreeSet<Name>,
}

impl KeyEntry {
    fn metadata(&self, name: &KeyName) -> KeyMetadata {
        KeyMetadata {
            name: name.clone(),
            owner: self.owner.clone(),
            state: self.state,
            created: self.created,
            updated: self.updated,
            volumes: self.volumes.len(),
        }
    }

    fn stored(&self, name: &KeyName) -> StoredKey {
        StoredKey {
            name: name.clone(),
            owner: self.owner.clone(),
            state: self.state,
            created: self.created,
            updated: self.updated,
            material: self.material.clone(),
        }
    }

    /// Refuses unless the key may wrap and unwrap now.
    fn usable(&self, name: &KeyName, now: OffsetDateTime) -> Result<(), KmsError> {
        match self.state {
            KeyState::Enabled => Ok(()),
            KeyState::Disabled => Err(KmsError::KeyDisabled(name.clone())),
            KeyState::PendingDeletion { delete_at } if now >= delete_at => {
                Err(KmsError::KeyDeleted {
                    key: name.clone(),
                    delete_at,
                })
            }
            KeyState::PendingDeletion { delete_at } => Err(KmsError::KeyPendingDeletion {
                key: name.clone(),
                delete_at,
            }),
        }
    }
}

struct VolumeEntry {
    key: KeyName,
    created: OffsetDateTime,
    secret: Arc<Secret<VOLUME_SECRET_LEN>>,
}

impl VolumeEntry {
    fn metadata(&self, volume: &Name) -> VolumeMetadata {
        VolumeMetadata {
            volume: volume.clone(),
            key: self.key.clone(),
            created: self.created,
        }
    }
}

#[derive(Default)]
struct Index {
    keys: BTreeMap<KeyName, KeyEntry>,
    volumes: HashMap<Name, VolumeEntry>,
}

impl Index {
    fn key(&self, name: &KeyName) -> Result<&KeyEntry, KmsError> {
        self.keys
            .get(name)
            .ok_or_else(|| KmsError::UnknownKey(name.clone()))
    }

    fn volume(&self, volume: &Name) -> Result<&VolumeEntry, KmsError> {
        self.volumes
            .get(volume)
            .ok_or_else(|| KmsError::UnknownVolume(volume.clone()))
    }
}

/// The key service's keys and volume records, held by one process.
///
/// Every method takes `&self`; a `Kms` is shared between threads as is.
/// Changes are made one at a time, each durable on disk before the index
/// in memory shows it and before the method returns. Unwrapping reads only
/// the index (no file) and runs concurrently with other unwraps.
pub struct Kms {
    store: Store,
    /// Serializes changes (each writes files, then the index).
    writer: Mutex<()>,
    index: RwLock<Index>,
    opened: OpenReport,
}

impl std::fmt::Debug for Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kms")
            .field("dir", &self.store.dir())
            .finish_non_exhaustive()
    }
}

impl Kms {
    /// Opens the state directory `dir` (created with mode 0700 if missing;
    /// an existing one must be 0700 or stricter), locks it against every
    /// other open, and loads every key and volume record into memory.
    /// Refuses a malformed, oversized or unexpected file, naming it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let (store, loaded) = Store::open(dir)?;
        let mut index = Index::default();
        for k in loaded.keys {
            index.keys.insert(
                k.name,
                KeyEntry {
                    owner: k.owner,
                    state: k.state,
                    created: k.created,
                    updated: k.updated,
                    material: k.material,
                    volumes: BTreeSet::new(),
                },
            );
        }
        for v in loaded.volumes {
            if let Some(k) = index.keys.get_mut(&v.key) {
                k.volumes.insert(v.volume.clone());
            }
            index.volumes.insert(
                v.volume,
                VolumeEntry {
                    key: v.key,
                    created: v.created,
                    secret: v.secret,
                },
            );
        }
        let opened = OpenReport {
            dir: dir.to_owned(),
            keys: index.keys.len(),
            volumes: index.volumes.len(),
            erased: loaded.erased,
        };
        Ok(Self {
            store,
            writer: Mutex::new(()),
            index: RwLock::new(index),
            opened,
        })
    }

    /// What opening found and did.
    pub fn open_report(&self) -> &OpenReport {
        &self.opened
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    /// Creates the KEK `name`, owned by `owner`, enabled, from 256 random
    /// bits. Its material is durable before this returns and is never
    /// returned by any method.
    pub fn create_key(
        &self,
        name: &KeyName,
        owner: &PrincipalId,
        now: OffsetDateTime,
    ) -> Result<KeyMetadata, KmsError> {
        let _w = self.write_lock();
        {
            let index = self.read();
            if index.keys.contains_key(name) {
                return Err(KmsError::KeyExists(name.clone()));
            }
            if index.keys.len() >= MAX_KEYS {
                return Err(KmsError::TooManyKeys);
            }
        }
        let entry = KeyEntry {
            owner: owner.clone(),
            state: KeyState::Enabled,
            created: now,
            updated: now,
            material: Secret::random()?,
            volumes: BTreeSet::new(),
        };
        self.store.create_key(&entry.stored(name))?;
        let meta = entry.metadata(name);
        self.write().keys.insert(name.clone(), entry);
        Ok(meta)
    }

    /// The metadata of KEK `name` (never its material).
    pub fn describe_key(&self, name: &KeyName) -> Result<KeyMetadata, KmsError> {
        Ok(self.read().key(name)?.metadata(name))
    }

    /// Every KEK's metadata, in name order.
    pub fn list_keys(&self) -> Vec<KeyMetadata> {
        self.read()
            .keys
            .iter()
            .map(|(name, k)| k.metadata(name))
            .collect()
    }

    /// Disables KEK `name`: it refuses new volume keys and every unwrap
    /// until enabled. Refused for a key pending deletion.
    pub fn disable_key(
        &self,
        name: &KeyName,
        now: OffsetDateTime,
    ) -> Result<KeyTransition, KmsError> {
        self.transition(name, now, |state| match state {
            KeyState::Enabled | KeyState::Disabled => Ok(KeyState::Disabled),
            KeyState::PendingDeletion { delete_at } => Err(KmsError::KeyPendingDeletion {
                key: name.clone(),
                delete_at,
            }),
        })
    }

    /// Enables KEK `name` again. Refused for a key pending deletion (cancel
    /// the deletion first, which leaves it disabled).
    pub fn enable_key(
        &self,
        name: &KeyName,
        now: OffsetDateTime,
    ) -> Result<KeyTransition, KmsError> {
        self.transition(name, now, |state| match state {
            KeyState::Enabled | KeyState::Disabled => Ok(KeyState::Enabled),
            KeyState::PendingDeletion { delete_at } => Err(KmsError::KeyPendingDeletion {
                key: name.clone(),
                delete_at,
            }),
        })
    }

    /// Schedules KEK `name` for deletion `days` days from `now` (default
    /// [`DEFAULT_DELETION_WINDOW_DAYS`], between
    /// [`MIN_DELETION_WINDOW_DAYS`] and [`MAX_DELETION_WINDOW_DAYS`]). From
    /// now on it refuses like a disabled key; the first [`Kms::sweep`] at or
    /// after the end of the window destroys it with every volume record
    /// under it.
    pub fn schedule_key_deletion(
        &self,
        name: &KeyName,
        days: Option<u32>,
        now: OffsetDateTime,
    ) -> Result<KeyTransition, KmsError> {
        let days = days.unwrap_or(DEFAULT_DELETION_WINDOW_DAYS);
        if !(MIN_DELETION_WINDOW_DAYS..=MAX_DELETION_WINDOW_DAYS).contains(&days) {
            return Err(KmsError::BadDeletionWindow { days });
        }
        let delete_at = now + Duration::days(i64::from(days));
        self.transition(name, now, |state| match state {
            KeyState::Enabled | KeyState::Disabled => Ok(KeyState::PendingDeletion { delete_at }),
            KeyState::PendingDeletion { delete_at } => Err(KmsError::KeyPendingDeletion {
                key: name.clone(),
                delete_at,
            }),
        })
    }

    /// Cancels the scheduled deletion of KEK `name`, leaving it disabled.
    /// Refused for a key whose window has already ended: it is deleted.
    pub fn cancel_key_deletion(
        &self,
        name: &KeyName,
        now: OffsetDateTime,
    ) -> Result<KeyTransition, KmsError> {
        self.transition(name, now, |state| match state {
            KeyState::PendingDeletion { delete_at } if now >= delete_at => {
                Err(KmsError::KeyDeleted {
                    key: name.clone(),
                    delete_at,
                })
            }
            KeyState::PendingDeletion { .. } => Ok(KeyState::Disabled),
            other => Err(KmsError::KeyNotPendingDeletion {
                key: name.clone(),
                state: other.as_str(),
            }),
        })
    }

    fn transition(
        &self,
        name: &KeyName,
        now: OffsetDateTime,
        next: impl FnOnce(KeyState) -> Result<KeyState, KmsError>,
    ) -> Result<KeyTransition, KmsError> {
        let _w = self.write_lock();
        let (previous, mut stored) = {
            let index = self.read();
            let k = index.key(name)?;
            (k.state, k.stored(name))
        };
        let state = next(previous)?;
        if state == previous {
            return Ok(KeyTransition {
                key: self.describe_key(name)?,
                previous,
            });
        }
        stored.state = state;
        stored.updated = now;
        self.store.write_key_meta(&stored)?;
        let mut index = self.write();
        let k = index
            .keys
            .get_mut(name)
            .unwrap_or_else(|| unreachable!("keys change only under the writer lock"));
        k.state = state;
        k.updated = now;
        Ok(KeyTransition {
            key: k.metadata(name),
            previous,
        })
    }

    /// Destroys every KEK whose deletion window has ended by `now`, each
    /// with every volume record under it: the records first, then the
    /// key, each durable before the next. Returns what was destroyed; on a
    /// failure, what was destroyed before it and the failure (the rest is
    /// destroyed by the next sweep).
    pub fn sweep(&self, now: OffsetDateTime) -> Result<SweepReport, Box<SweepError>> {
        let _w = self.write_lock();
        let due: Vec<(KeyName, PrincipalId, OffsetDateTime, Vec<Name>)> = self
            .read()
            .keys
            .iter()
            .filter_map(|(name, k)| match k.state {
                KeyState::PendingDeletion { delete_at } if delete_at <= now => Some((
                    name.clone(),
                    k.owner.clone(),
                    delete_at,
                    k.volumes.iter().cloned().collect(),
                )),
                _ => None,
            })
            .collect();
        let mut report = SweepReport::default();
        for (key, owner, delete_at, volumes) in due {
            let mut destroyed = Vec::with_capacity(volumes.len());
            let fail = |report: &mut SweepReport, destroyed: &mut Vec<Name>, source| {
                Box::new(SweepError {
                    done: std::mem::take(report),
                    key: key.clone(),
                    partial_volumes: std::mem::take(destroyed),
                    source,
                })
            };
            for volume in &volumes {
                if let Err(e) = self.store.erase_volume_unsynced(volume) {
                    return Err(fail(&mut report, &mut destroyed, e));
                }
                self.forget_volume(volume);
                destroyed.push(volume.clone());
            }
            if let Err(e) = self
                .store
                .sync_volumes()
                .and_then(|()| self.store.destroy_key(&key))
            {
                return Err(fail(&mut report, &mut destroyed, e));
            }
            self.write().keys.remove(&key);
            report.keys.push(SweptKey {
                key,
                owner,
                delete_at,
                volumes: destroyed,
            });
        }
        Ok(report)
    }

    /// Makes a volume's data key under KEK `key`: a fresh 512-bit data key
    /// and a 256-bit volume secret. The record (the secret, never the data
    /// key) is durable before this returns the data key, wrapped.
    /// Refused for a volume that has a record and a KEK that is not
    /// enabled.
    pub fn generate_volume_key(
        &self,
        volume: &Name,
        key: &KeyName,
        now: OffsetDateTime,
    ) -> Result<GeneratedVolumeKey, KmsError> {
        let _w = self.write_lock();
        let material = {
            let index = self.read();
            if index.volumes.contains_key(volume) {
                return Err(KmsError::VolumeExists(volume.clone()));
            }
            if index.volumes.len() >= MAX_VOLUMES {
                return Err(KmsError::TooManyVolumes);
            }
            let k = index.key(key)?;
            k.usable(key, now)?;
            k.material.clone()
        };
        let secret = Secret::random()?;
        let wrapped = WrappedKey::generate(material.bytes(), secret.bytes(), volume, key)?;
        let entry = VolumeEntry {
            key: key.clone(),
            created: now,
            secret,
        };
        self.store.write_volume(&StoredVolume {
            volume: volume.clone(),
            key: key.clone(),
            created: now,
            secret: entry.secret.clone(),
        })?;
        let meta = entry.metadata(volume);
        let mut index = self.write();
        if let Some(k) = index.keys.get_mut(key) {
            k.volumes.insert(volume.clone());
        }
        index.volumes.insert(volume.clone(), entry);
        Ok(GeneratedVolumeKey {
            volume: meta,
            wrapped,
        })
    }

    /// The record of `volume` (never its secret).
    pub fn describe_volume(&self, volume: &Name) -> Result<VolumeMetadata, KmsError> {
        Ok(self.read().volume(volume)?.metadata(volume))
    }

    /// Every volume record, in volume order.
    pub fn list_volumes(&self) -> Vec<VolumeMetadata> {
        let index = self.read();
        let mut out: Vec<VolumeMetadata> =
            index.volumes.iter().map(|(v, e)| e.metadata(v)).collect();
        out.sort_by(|a, b| a.volume.cmp(&b.volume));
        out
    }

    /// Opens `volume`'s wrapped data key and seals it to `recipient` with
    /// HPKE, for `volume` only. Refuses a malformed wrapped key, one naming
    /// another volume or KEK or that does not open, a volume without a
    /// record, a KEK that is not enabled (naming it), and a recipient key
    /// of small order. Reads no file and writes nothing; the data key is in
    /// plaintext only in one zeroized buffer, sealed where it was opened.
    pub fn unwrap_sealed(
        &self,
        volume: &Name,
        wrapped: &[u8],
        recipient: &RecipientPublicKey,
        now: OffsetDateTime,
    ) -> Result<SealedKey, KmsError> {
        let wrapped = WrappedKey::decode(wrapped)?;
        let (kek, secret) = self.unwrap_keys(volume, &wrapped, Some(now))?;
        let mut dek = Box::new(Zeroizing::new([0u8; DEK_LEN]));
        wrapped
            .open_into(kek.bytes(), secret.bytes(), &mut dek)
            .map_err(|_| KmsError::Unauthentic(volume.clone()))?;
        Ok(seal_in_place(&mut dek, recipient, volume)?)
    }

    /// The KEK and secret that open `wrapped` as `volume`'s, after every
    /// check but the cryptographic one; the key's state is checked at `now`
    /// unless `now` is `None` (the test exports).
    fn unwrap_keys(
        &self,
        volume: &Name,
        wrapped: &WrappedKey,
        now: Option<OffsetDateTime>,
    ) -> Result<(Arc<Secret<KEK_LEN>>, Arc<Secret<VOLUME_SECRET_LEN>>), KmsError> {
        if wrapped.volume() != volume {
            return Err(KmsError::WrongVolume {
                asked: volume.clone(),
                wrapped: wrapped.volume().clone(),
            });
        }
        let index = self.read();
        let v = index.volume(volume)?;
        let k = index.key(&v.key)?;
        if let Some(now) = now {
            k.usable(&v.key, now)?;
        }
        if wrapped.key() != &v.key {
            return Err(KmsError::WrongKey {
                volume: volume.clone(),
                key: v.key.clone(),
                wrapped: wrapped.key().clone(),
            });
        }
        Ok((k.material.clone(), v.secret.clone()))
    }

    /// Destroys `volume`'s record: its file is overwritten, removed and
    /// its directory fsynced before this returns, after which no wrapped
    /// key of the volume opens anywhere, the KEK and a backup of the
    /// wrapped key notwithstanding. Returns the record destroyed.
    pub fn destroy_volume(&self, volume: &Name) -> Result<VolumeMetadata, KmsError> {
        let _w = self.write_lock();
        let meta = self.read().volume(volume)?.metadata(volume);
        self.store.erase_volume_unsynced(volume)?;
        self.store.sync_volumes()?;
        self.forget_volume(volume);
        Ok(meta)
    }

    fn forget_volume(&self, volume: &Name) {
        let mut index = self.write();
        if let Some(v) = index.volumes.remove(volume)
            && let Some(k) = index.keys.get_mut(&v.key)
        {
            k.volumes.remove(volume);
        }
    }

    /// `volume`'s data key in plaintext, opened from its wrapped key
    /// whatever the state of its KEK: for tests that search memory and
    /// files for it. Only with the `danger-test-export` feature.
    #[cfg(feature = "danger-test-export")]
    pub fn export_volume_key_for_tests(
        &self,
        volume: &Name,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; DEK_LEN]>, KmsError> {
        let wrapped = WrappedKey::decode(wrapped)?;
        let (kek, secret) = self.unwrap_keys(volume, &wrapped, None)?;
        let mut dek = Zeroizing::new([0u8; DEK_LEN]);
        wrapped
            .open_into(kek.bytes(), secret.bytes(), &mut dek)
            .map_err(|_| KmsError::Unauthentic(volume.clone()))?;
        Ok(dek)
    }

    /// `volume`'s KEK and secret in plaintext: for tests that open a
    /// wrapped key with an independent implementation. Only with the
    /// `danger-test-export` feature.
    #[cfg(feature = "danger-test-export")]
    pub fn export_volume_secrets_for_tests(
        &self,
        volume: &Name,
    ) -> Result<VolumeSecretsForTests, KmsError> {
        let index = self.read();
        let v = index.volume(volume)?;
        let k = index.key(&v.key)?;
        let mut out = VolumeSecretsForTests {
            kek: Zeroizing::new([0; KEK_LEN]),
            secret: Zeroizing::new([0; VOLUME_SECRET_LEN]),
        };
        out.kek.copy_from_slice(k.material.bytes());
        out.secret.copy_from_slice(v.secret.bytes());
        Ok(out)
    }

    fn write_lock(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }
}
