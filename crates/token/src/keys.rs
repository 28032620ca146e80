//! Ed25519 keys of the token service: the signing key, its public half, key
//! ids, and the pinned set of public keys a host trusts for one issuer.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _, EncodePublicKey as _,
};
use nitrile_api::PrincipalId;
use rand_core::CryptoRngCore;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// Largest key file, in bytes, that is read.
pub const MAX_KEY_FILE_LEN: usize = 4096;

/// Most keys one issuer may have pinned at once (current, next and a few
/// being retired).
pub const MAX_ISSUER_KEYS: usize = 16;

/// Why a key could not be loaded, saved or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("cannot access key file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The key file is larger than [`MAX_KEY_FILE_LEN`].
    #[error("key file {0} is larger than {MAX_KEY_FILE_LEN} bytes; it is not a key")]
    TooLarge(PathBuf),
    /// The private key file can be read by someone other than its owner.
    #[error("private key file {path} has mode {mode:o}; run `chmod 600` on it (or make a new key)")]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The text is not a PKCS#8 Ed25519 private key in PEM form.
    #[error("not a PKCS#8 PEM Ed25519 private key (expected -----BEGIN PRIVATE KEY-----)")]
    BadPrivateKey,
    /// The text is not an SPKI Ed25519 public key in PEM form.
    #[error("not an Ed25519 public key in PEM form (expected -----BEGIN PUBLIC KEY-----)")]
    BadPublicKey,
    /// The key id is not 22 characters of base64url.
    #[error("key id {0:?} is not 16 bytes of unpadded base64url")]
    BadKeyId(String),
    /// The issuer already has [`MAX_ISSUER_KEYS`] keys pinned.
    #[error("issuer already has {MAX_ISSUER_KEYS} keys pinned; remove a retired one first")]
    TooManyKeys,
}

/// Identifies a public key: the first 16 bytes of SHA-256 of its 32 bytes,
/// written as unpadded base64url (22 characters). Tokens name their key with
/// it in the footer (`{"kid":"..."}`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId([u8; 16]);

impl KeyId {
    /// The key id of `key`.
    pub fn of(key: &VerifyingKey) -> Self {
        let digest = Sha256::digest(key.0.as_bytes());
        let mut id = [0; 16];
        id.copy_from_slice(&digest[..16]);
        Self(id)
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || KeyError::BadKeyId(s.chars().take(40).collect());
        if s.len() != 22 {
            return Err(bad());
        }
        let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
        Ok(Self(bytes.try_into().map_err(|_| bad())?))
    }
}

/// An Ed25519 public key that verifies tokens.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VerifyingKey(ed25519_dalek::VerifyingKey);

impl VerifyingKey {
    /// Parses an SPKI (`-----BEGIN PUBLIC KEY-----`) PEM Ed25519 public key.
    pub fn from_public_key_pem(pem: &str) -> Result<Self, KeyError> {
        if pem.len() > MAX_KEY_FILE_LEN {
            return Err(KeyError::BadPublicKey);
        }
        ed25519_dalek::VerifyingKey::from_public_key_pem(pem.trim())
            .map(Self)
            .map_err(|_| KeyError::BadPublicKey)
    }

    /// Reads a PEM public key file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read_bounded(path)?;
        Self::from_public_key_pem(&text)
    }

    /// Builds a key from its 32 bytes, refusing points that are not valid keys.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| KeyError::BadPublicKey)
    }

    /// The key's 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The key as SPKI PEM.
    pub fn to_public_key_pem(&self) -> String {
        self.0
            .to_public_key_pem(LineEnding::LF)
            .unwrap_or_else(|_| unreachable!("encoding a 32-byte Ed25519 public key cannot fail"))
    }

    /// The key's id.
    pub fn key_id(&self) -> KeyId {
        KeyId::of(self)
    }

    pub(crate) fn dalek(&self) -> &ed25519_dalek::VerifyingKey {
        &self.0
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey(kid {})", self.key_id())
    }
}

/// The token service's Ed25519 signing key. Its secret is zeroized when
/// dropped and is never printed (`Debug` shows the key id only).
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// Makes a new key from `rng`.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        Self(ed25519_dalek::SigningKey::generate(rng))
    }

    /// Parses a PKCS#8 (`-----BEGIN PRIVATE KEY-----`) PEM Ed25519 key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        if pem.len() > MAX_KEY_FILE_LEN {
            return Err(KeyError::BadPrivateKey);
        }
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem.trim())
            .map(Self)
            .map_err(|_| KeyError::BadPrivateKey)
    }

    /// The key as PKCS#8 PEM. The string is zeroized when dropped.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        self.0
            .to_pkcs8_pem(LineEnding::LF)
            .unwrap_or_else(|_| unreachable!("encoding an Ed25519 key as PKCS#8 cannot fail"))
    }

    /// Reads a PKCS#8 PEM key file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::InsecurePermissions {
                path: path.to_owned(),
                mode: mode & 0o7777,
            });
        }
        let text = read_bounded(path)?;
        Self::from_pkcs8_pem(&text)
    }

    /// Writes the key as PKCS#8 PEM with mode 0600, atomically: a temporary
    /// file in the same directory is written and synced, then renamed over
    /// `path`, then the directory is synced.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        write_atomic_private(path, self.to_pkcs8_pem().as_bytes())
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey(self.0.verifying_key())
    }

    /// The id of the public half.
    pub fn key_id(&self) -> KeyId {
        self.verifying_key().key_id()
    }

    pub(crate) fn dalek(&self) -> &ed25519_dalek::SigningKey {
        &self.0
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(kid {}, secret redacted)", self.key_id())
    }
}

/// Reads a key file (at most [`MAX_KEY_FILE_LEN`] bytes) into a buffer
/// that is zeroized when dropped.
fn read_bounded(path: &Path) -> Result<Zeroizing<String>, KeyError> {
    nitrile_fs::read_secret_to_string(path, MAX_KEY_FILE_LEN as u64).map_err(|e| match e {
        nitrile_fs::FsError::TooLarge { path, .. } => KeyError::TooLarge(path),
        e => KeyError::Io {
            path: path.to_owned(),
            source: e.into(),
        },
    })
}

fn write_atomic_private(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    nitrile_fs::write_atomic(path, contents, 0o600).map_err(|e| KeyError::Io {
        path: path.to_owned(),
        source: e.into(),
    })
}

/// The public keys a verifier pins for one issuer principal (the token
/// service), by key id. Several keys may be pinned at once for rotation;
/// removing a key makes every token signed by it fail with `UnknownKey`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerKeys {
    issuer: PrincipalId,
    keys: BTreeMap<KeyId, VerifyingKey>,
}

impl IssuerKeys {
    /// No keys yet for `issuer`.
    pub fn new(issuer: PrincipalId) -> Self {
        Self {
            issuer,
            keys: BTreeMap::new(),
        }
    }

    /// `issuer` with `keys` pinned.
    pub fn with_keys(
        issuer: PrincipalId,
        keys: impl IntoIterator<Item = VerifyingKey>,
    ) -> Result<Self, KeyError> {
        let mut s = Self::new(issuer);
        for k in keys {
            s.insert(k)?;
        }
        Ok(s)
    }

    /// Pins `key`; returns its id.
    pub fn insert(&mut self, key: VerifyingKey) -> Result<KeyId, KeyError> {
        let id = key.key_id();
        if !self.keys.contains_key(&id) && self.keys.len() >= MAX_ISSUER_KEYS {
            return Err(KeyError::TooManyKeys);
        }
        self.keys.insert(id, key);
        Ok(id)
    }

    /// Unpins a key; returns it if it was pinned.
    pub fn remove(&mut self, id: &KeyId) -> Option<VerifyingKey> {
        self.keys.remove(id)
    }

    /// The key with id `id`, if pinned.
    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.get(id)
    }

    /// The pinned key ids, in order.
    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    /// The issuer principal these keys speak for.
    pub fn issuer(&self) -> &PrincipalId {
        &self.issuer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_round_trips_and_depends_on_the_key() {
        let a = SigningKey::generate(&mut rand_core::OsRng);
        let b = SigningKey::generate(&mut rand_core::OsRng);
        let id = a.key_id();
        assert_eq!(id.to_string().len(), 22);
        assert_eq!(id.to_string().parse::<KeyId>().unwrap(), id);
        assert_ne!(id, b.key_id());
        assert!("short".parse::<KeyId>().is_err());
        assert!("AAAAAAAAAAAAAAAAAAAAA=".parse::<KeyId>().is_err());
    }

    #[test]
    fn save_is_0600_and_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let k = SigningKey::generate(&mut rand_core::OsRng);
        k.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = SigningKey::load(&path).unwrap();
        assert_eq!(back.verifying_key(), k.verifying_key());
        // Overwriting works and leaves no temporary files behind.
        k.save(&path).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(!format!("{k:?}").contains(&*k.to_pkcs8_pem()));
    }

    #[test]
    fn group_readable_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        SigningKey::generate(&mut rand_core::OsRng)
            .save(&path)
            .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            SigningKey::load(&path),
            Err(KeyError::InsecurePermissions { mode: 0o640, .. })
        ));
    }

    #[test]
    fn public_pem_round_trips_and_garbage_is_refused() {
        let k = SigningKey::generate(&mut rand_core::OsRng);
        let pem = k.verifying_key().to_public_key_pem();
        assert_eq!(
            VerifyingKey::from_public_key_pem(&pem).unwrap(),
            k.verifying_key()
        );
        assert!(VerifyingKey::from_public_key_pem("nope").is_err());
        assert!(SigningKey::from_pkcs8_pem(&pem).is_err());
    }

    #[test]
    fn issuer_keys_are_bounded() {
        let issuer = PrincipalId::parse("nitrile://c1/service/tokend").unwrap();
        let mut keys = IssuerKeys::new(issuer);
        for _ in 0..MAX_ISSUER_KEYS {
            keys.insert(SigningKey::generate(&mut rand_core::OsRng).verifying_key())
                .unwrap();
        }
        assert!(matches!(
            keys.insert(SigningKey::generate(&mut rand_core::OsRng).verifying_key()),
            Err(KeyError::TooManyKeys)
        ));
    }
}
