//! Release keys: Ed25519, the private half in a PKCS#8 PEM file (0600), the
//! public half as a TUF key object (`{"keytype":"ed25519","scheme":
//! "ed25519","keyval":{"public":"<hex>"}}`), whose key id is the SHA-256
//! of its canonical JSON (computed by `tough`).

use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::key::{Ed25519Key, Ed25519Scheme, Key};

use crate::ReleaseError;

/// Largest key file read.
const MAX_KEY_FILE: u64 = 16 * 1024;

/// A release key (a signer's, the repository's root or online key, or the
/// cell's CI key).
pub struct ReleaseKey {
    key: SigningKey,
}

impl std::fmt::Debug for ReleaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseKey")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl ReleaseKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self {
            key: SigningKey::generate(&mut rand_core::OsRng),
        }
    }

    /// Reads a PKCS#8 PEM private key file.
    pub fn load(path: &Path) -> Result<Self, ReleaseError> {
        let text = nitrile_fs::read_bounded_to_string(path, MAX_KEY_FILE)?;
        let key = SigningKey::from_pkcs8_pem(&text).map_err(|e| ReleaseError::BadKey {
            path: path.to_owned(),
            reason: format!("not an Ed25519 PKCS#8 PEM private key ({e})"),
        })?;
        Ok(Self { key })
    }

    /// Writes the private key (PKCS#8 PEM, 0600; refused if the file
    /// exists) and the public key beside it (`<path>.pub.json`, 0644).
    pub fn write(&self, path: &Path) -> Result<(), ReleaseError> {
        if path.exists() {
            return Err(ReleaseError::BadKey {
                path: path.to_owned(),
                reason: "exists; a key file is never overwritten".to_owned(),
            });
        }
        let pem = self
            .key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| ReleaseError::BadKey {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        nitrile_fs::write_atomic(path, pem.as_bytes(), 0o600)?;
        let public = public_path(path);
        nitrile_fs::write_atomic(&public, &self.public_json(), 0o644)?;
        Ok(())
    }

    /// The public key as a TUF key object.
    pub fn public(&self) -> Key {
        tuf_key(&self.key.verifying_key())
    }

    /// The public key's TUF JSON (with a final newline).
    pub fn public_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(&self.public()).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The TUF key id (hex).
    pub fn key_id(&self) -> String {
        key_id(&self.public())
    }

    /// The Ed25519 verifying key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs `msg` (Ed25519, 64 bytes).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.key.sign(msg).to_bytes().to_vec()
    }
}

/// Where the public half of the key file `path` is written.
pub fn public_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".pub.json");
    path.with_file_name(name)
}

/// A TUF key object for an Ed25519 public key.
pub fn tuf_key(public: &VerifyingKey) -> Key {
    Key::Ed25519 {
        keyval: Ed25519Key {
            public: Decoded::from(public.as_bytes().to_vec()),
            _extra: Default::default(),
        },
        scheme: Ed25519Scheme::Ed25519,
        _extra: Default::default(),
    }
}

/// The TUF key id of `key` (hex).
pub fn key_id(key: &Key) -> String {
    key.key_id().map(|id| hex::encode(&*id)).unwrap_or_default()
}

/// Reads a public key file (a TUF Ed25519 key object).
pub fn load_public(path: &Path) -> Result<Key, ReleaseError> {
    let bytes = nitrile_fs::read_bounded(path, MAX_KEY_FILE)?;
    let key: Key = serde_json::from_slice(&bytes).map_err(|e| ReleaseError::BadKey {
        path: path.to_owned(),
        reason: format!("not a TUF key object ({e})"),
    })?;
    ed25519_of(&key).map_err(|reason| ReleaseError::BadKey {
        path: path.to_owned(),
        reason,
    })?;
    Ok(key)
}

/// The Ed25519 verifying key of a TUF key object.
pub fn ed25519_of(key: &Key) -> Result<VerifyingKey, String> {
    let Key::Ed25519 { keyval, .. } = key else {
        return Err("not an Ed25519 key".to_owned());
    };
    let bytes: [u8; 32] = keyval
        .public
        .as_ref()
        .try_into()
        .map_err(|_| "an Ed25519 public key is 32 bytes".to_owned())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| e.to_string())
}

/// The key id as tough keeps it.
pub(crate) fn decoded_id(id: &str) -> Decoded<Hex> {
    Decoded::from(hex::decode(id).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_round_trips_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signer.key");
        let key = ReleaseKey::generate();
        key.write(&path).unwrap();
        let back = ReleaseKey::load(&path).unwrap();
        assert_eq!(back.key_id(), key.key_id());
        assert_eq!(
            key_id(&load_public(&public_path(&path)).unwrap()),
            key.key_id()
        );
        assert!(ReleaseKey::generate().write(&path).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(dir.path().join("junk"), "not a key").unwrap();
        assert!(ReleaseKey::load(&dir.path().join("junk")).is_err());
    }
}
