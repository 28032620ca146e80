//! The token service's signing keys, with rotation.
//!
//! ```text
//! <dir>/keys/<kid>.key      PKCS#8 Ed25519 private keys, mode 0600
//! <dir>/keys/current        the key id that signs new tokens
//! <dir>/issuer-keys.toml    the public key set hosts pin (no secrets)
//! ```
//!
//! The format of `issuer-keys.toml` is the token crate's
//! ([`nitrile_token::IssuerFile`], re-exported here); the ring writes it.
//!
//! Rotation adds a key and makes it current; the previous key stays in the
//! published set, so tokens it signed stay valid until they expire, until it
//! is retired. A retired key's private half is deleted and its public half
//! leaves the published set.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nitrile_api::PrincipalId;
pub use nitrile_token::IssuerFile;
use nitrile_token::{IssuerKeys, KeyError, KeyId, SigningKey, TokenIssuer, VerifyingKey};
use rand_core::CryptoRngCore;

/// Why the key ring could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyRingError {
    /// a file of the key ring could not be read or written
    #[error("key ring file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// a key file is not a valid key
    #[error("key file {}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: KeyError,
    },
    /// a private key file is readable by others than its owner
    #[error("key file {} has mode {mode:o}; it must be 0600 (owner only)", path.display())]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// the ring already holds as many keys as a published set may
    #[error(
        "issuer key set {} already has {} keys; retire one before rotating",
        path.display(),
        nitrile_token::MAX_ISSUER_KEYS
    )]
    Full {
        /// The published set.
        path: PathBuf,
    },
    /// the key id named as current has no key file
    #[error("current key {0} has no key file; the key ring is damaged")]
    MissingCurrent(String),
    /// retiring the key that signs new tokens is refused
    #[error("key {0} is the current signing key; rotate first, then retire it")]
    RetireCurrent(String),
    /// no such key
    #[error("no key {0} in the key ring")]
    UnknownKey(String),
}

/// The signing keys of one token service.
#[derive(Debug)]
pub struct KeyRing {
    dir: PathBuf,
    issuer: PrincipalId,
    keys: BTreeMap<String, VerifyingKey>,
    current: String,
}

impl KeyRing {
    /// Opens the key ring under `dir`, generating the first key if there is
    /// none, and (re)writes the published key set.
    pub fn init_or_load(
        dir: &Path,
        issuer: PrincipalId,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, KeyRingError> {
        let keys_dir = dir.join("keys");
        std::fs::create_dir_all(&keys_dir).map_err(|e| io(&keys_dir, e))?;
        set_mode(&keys_dir, 0o700)?;
        let mut keys = BTreeMap::new();
        for entry in std::fs::read_dir(&keys_dir).map_err(|e| io(&keys_dir, e))? {
            let path = entry.map_err(|e| io(&keys_dir, e))?.path();
            if path.extension().is_some_and(|e| e == "key") {
                let mode = std::fs::metadata(&path)
                    .map_err(|e| io(&path, e))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(KeyRingError::Permissions {
                        path,
                        mode: mode & 0o777,
                    });
                }
                let key = SigningKey::load(&path).map_err(|source| KeyRingError::Key {
                    path: path.clone(),
                    source,
                })?;
                keys.insert(key.key_id().to_string(), key.verifying_key());
            }
        }
        let current_path = keys_dir.join("current");
        let ring = match std::fs::read_to_string(&current_path) {
            Ok(kid) => {
                let kid = kid.trim().to_owned();
                if !keys.contains_key(&kid) {
                    return Err(KeyRingError::MissingCurrent(kid));
                }
                Self {
                    dir: dir.to_owned(),
                    issuer,
                    keys,
                    current: kid,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut ring = Self {
                    dir: dir.to_owned(),
                    issuer,
                    keys,
                    current: String::new(),
                };
                ring.add_key(rng)?;
                ring
            }
            Err(e) => return Err(io(&current_path, e)),
        };
        ring.publish()?;
        Ok(ring)
    }

    /// Generates a new key and makes it the one that signs new tokens.
    /// Returns its key id.
    pub fn rotate(&mut self, rng: &mut impl CryptoRngCore) -> Result<KeyId, KeyRingError> {
        let kid = self.add_key(rng)?;
        self.publish()?;
        Ok(kid)
    }

    /// Deletes a key that no longer signs; tokens it signed stop verifying
    /// once hosts pick up the new published set.
    pub fn retire(&mut self, kid: &str) -> Result<(), KeyRingError> {
        if kid == self.current {
            return Err(KeyRingError::RetireCurrent(kid.to_owned()));
        }
        if self.keys.remove(kid).is_none() {
            return Err(KeyRingError::UnknownKey(kid.to_owned()));
        }
        let path = self.dir.join("keys").join(format!("{kid}.key"));
        std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
        self.publish()
    }

    /// A token issuer signing with the current key (read from its file).
    pub fn issuer(&self) -> Result<TokenIssuer, KeyRingError> {
        let path = self.dir.join("keys").join(format!("{}.key", self.current));
        let key = SigningKey::load(&path).map_err(|source| KeyRingError::Key {
            path: path.clone(),
            source,
        })?;
        Ok(TokenIssuer::new(self.issuer.clone(), key))
    }

    /// The key id of the current signing key.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// Every key id, current or not.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// The public key set hosts pin.
    pub fn issuer_keys(&self) -> IssuerKeys {
        let mut keys = IssuerKeys::new(self.issuer.clone());
        for k in self.keys.values() {
            keys.insert(*k)
                .unwrap_or_else(|_| unreachable!("the ring holds at most MAX_ISSUER_KEYS keys"));
        }
        keys
    }

    /// Path of the published key set.
    pub fn issuer_file_path(dir: &Path) -> PathBuf {
        dir.join("issuer-keys.toml")
    }

    fn add_key(&mut self, rng: &mut impl CryptoRngCore) -> Result<KeyId, KeyRingError> {
        if self.keys.len() >= nitrile_token::MAX_ISSUER_KEYS {
            return Err(KeyRingError::Full {
                path: Self::issuer_file_path(&self.dir),
            });
        }
        let key = SigningKey::generate(rng);
        let kid = key.key_id();
        let path = self.dir.join("keys").join(format!("{kid}.key"));
        key.save(&path).map_err(|source| KeyRingError::Key {
            path: path.clone(),
            source,
        })?;
        write_atomic(
            &self.dir.join("keys").join("current"),
            kid.to_string().as_bytes(),
            0o600,
        )?;
        self.keys.insert(kid.to_string(), key.verifying_key());
        self.current = kid.to_string();
        Ok(kid)
    }

    fn publish(&self) -> Result<(), KeyRingError> {
        let file = IssuerFile::new(self.issuer.clone(), self.keys.values());
        write_atomic(
            &Self::issuer_file_path(&self.dir),
            file.render().as_bytes(),
            0o644,
        )
    }
}

fn io(path: &Path, source: std::io::Error) -> KeyRingError {
    KeyRingError::Io {
        path: path.to_owned(),
        source,
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), KeyRingError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| io(path, e))
}

/// Writes a file with [`nitrile_fs::write_atomic`]: a unique temporary
/// file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyRingError> {
    nitrile_fs::write_atomic(path, bytes, mode).map_err(|e| io(path, e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> PrincipalId {
        PrincipalId::parse("nitrile://c1/service/tokend").unwrap()
    }

    #[test]
    fn first_start_creates_a_key_and_publishes_it() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::init_or_load(dir.path(), issuer(), &mut rand_core::OsRng).unwrap();
        let published = IssuerFile::load(&KeyRing::issuer_file_path(dir.path())).unwrap();
        assert_eq!(published.key_ids().count(), 1);
        assert_eq!(
            published.key_ids().next().unwrap().to_string(),
            ring.current()
        );
        let mode = std::fs::metadata(
            dir.path()
                .join("keys")
                .join(format!("{}.key", ring.current())),
        )
        .unwrap()
        .permissions()
        .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Reopening keeps the same key.
        let again = KeyRing::init_or_load(dir.path(), issuer(), &mut rand_core::OsRng).unwrap();
        assert_eq!(again.current(), ring.current());
    }

    #[test]
    fn rotation_keeps_the_old_key_until_retired() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = KeyRing::init_or_load(dir.path(), issuer(), &mut rand_core::OsRng).unwrap();
        let old = ring.current().to_owned();
        let new = ring.rotate(&mut rand_core::OsRng).unwrap().to_string();
        assert_ne!(old, new);
        assert_eq!(ring.current(), new);
        let published = IssuerFile::load(&KeyRing::issuer_file_path(dir.path())).unwrap();
        assert_eq!(published.key_ids().count(), 2);
        assert!(matches!(
            ring.retire(&new),
            Err(KeyRingError::RetireCurrent(_))
        ));
        ring.retire(&old).unwrap();
        let published = IssuerFile::load(&KeyRing::issuer_file_path(dir.path())).unwrap();
        assert_eq!(
            published
                .key_ids()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec![new]
        );
    }

    #[test]
    fn a_world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::init_or_load(dir.path(), issuer(), &mut rand_core::OsRng).unwrap();
        let path = dir
            .path()
            .join("keys")
            .join(format!("{}.key", ring.current()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = KeyRing::init_or_load(dir.path(), issuer(), &mut rand_core::OsRng).unwrap_err();
        assert!(matches!(err, KeyRingError::Permissions { .. }), "{err}");
    }
}
