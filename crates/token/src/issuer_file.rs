//! The issuer key file (`issuer-keys.toml`): the public key set of the token
//! service that hosts and logd pin. It holds no secret.
//!
//! ```toml
//! # Token issuer keys of this cell: hosts pin this set. Public, no secrets.
//! issuer = "nitrile://<cell>/service/tokend"
//!
//! [[key]]
//! kid = "<22 characters of base64url>"
//! public_key = """
//! -----BEGIN PUBLIC KEY-----
//! ...
//! """
//! ```
//!
//! [`IssuerFile::load`] reads at most [`MAX_ISSUER_FILE_LEN`] bytes, refuses
//! unknown fields, a key id that is not the id of its key, more than
//! [`crate::MAX_ISSUER_KEYS`] keys and a set without keys. The token
//! service writes the file ([`IssuerFile::render`]); it keeps the private
//! keys elsewhere.

use std::path::{Path, PathBuf};

use nitrile_api::PrincipalId;
use serde::{Deserialize, Serialize};

use crate::keys::{IssuerKeys, KeyError, VerifyingKey};

/// Largest `issuer-keys.toml` accepted.
pub const MAX_ISSUER_FILE_LEN: u64 = 64 * 1024;

/// The first line of a written issuer key file.
const HEADER: &str = "# Token issuer keys of this cell: hosts pin this set. Public, no secrets.\n";

/// Why an issuer key file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssuerFileError {
    /// The file could not be read.
    #[error("cannot read issuer key set {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_ISSUER_FILE_LEN`].
    #[error("issuer key set {} is larger than {MAX_ISSUER_FILE_LEN} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not an issuer key set (TOML syntax, a missing or unknown
    /// field, an issuer that is not a principal).
    #[error("issuer key set {} is not valid", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A key is not an Ed25519 public key in PEM form.
    #[error("issuer key set {}: key {kid} is not valid", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// The key id the file gives it.
        kid: String,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// A key id is not the id of the key it is written with.
    #[error("issuer key set {}: key id {kid} does not match its key", path.display())]
    KeyIdMismatch {
        /// The file.
        path: PathBuf,
        /// The key id the file gives.
        kid: String,
    },
    /// More keys than [`crate::MAX_ISSUER_KEYS`].
    #[error("issuer key set {} is not valid", path.display())]
    TooManyKeys {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// The set holds no key: no token could ever verify.
    #[error("issuer key set {} holds no keys", path.display())]
    NoKeys {
        /// The file.
        path: PathBuf,
    },
}

/// The published issuer key set, as written to `issuer-keys.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerFile {
    /// The token service principal that signs.
    pub issuer: PrincipalId,
    /// Every key whose tokens are accepted.
    #[serde(default, rename = "key")]
    pub keys: Vec<IssuerFileKey>,
}

/// One public key of the published set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerFileKey {
    /// Its key id.
    pub kid: String,
    /// SubjectPublicKeyInfo PEM.
    pub public_key: String,
}

impl IssuerFile {
    /// The file of `issuer`'s `keys`, in the order given.
    pub fn new<'a>(issuer: PrincipalId, keys: impl IntoIterator<Item = &'a VerifyingKey>) -> Self {
        Self {
            issuer,
            keys: keys
                .into_iter()
                .map(|k| IssuerFileKey {
                    kid: k.key_id().to_string(),
                    public_key: k.to_public_key_pem(),
                })
                .collect(),
        }
    }

    /// The file's text: a comment line, then the TOML.
    pub fn render(&self) -> String {
        let text = toml::to_string_pretty(self).unwrap_or_else(|_| {
            unreachable!("the issuer file is plain strings and always serializes")
        });
        format!("{HEADER}{text}")
    }

    /// Reads and checks a published key set: at most
    /// [`MAX_ISSUER_FILE_LEN`] bytes, every key id matches its key, at least
    /// one key.
    pub fn load(path: &Path) -> Result<IssuerKeys, IssuerFileError> {
        let text =
            nitrile_fs::read_bounded_to_string(path, MAX_ISSUER_FILE_LEN).map_err(|e| match e {
                nitrile_fs::FsError::TooLarge { path, .. } => IssuerFileError::TooLarge { path },
                e => IssuerFileError::Io {
                    path: path.to_owned(),
                    source: e.into(),
                },
            })?;
        Self::parse(&text, path)
    }

    /// Checks the text of a key set read from `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<IssuerKeys, IssuerFileError> {
        let file: IssuerFile = toml::from_str(text).map_err(|source| IssuerFileError::Syntax {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let mut keys = IssuerKeys::new(file.issuer);
        for k in file.keys {
            let key = VerifyingKey::from_public_key_pem(&k.public_key).map_err(|source| {
                IssuerFileError::BadKey {
                    path: path.to_owned(),
                    kid: k.kid.clone(),
                    source,
                }
            })?;
            if key.key_id().to_string() != k.kid {
                return Err(IssuerFileError::KeyIdMismatch {
                    path: path.to_owned(),
                    kid: k.kid,
                });
            }
            keys.insert(key)
                .map_err(|source| IssuerFileError::TooManyKeys {
                    path: path.to_owned(),
                    source,
                })?;
        }
        if keys.key_ids().next().is_none() {
            return Err(IssuerFileError::NoKeys {
                path: path.to_owned(),
            });
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{MAX_ISSUER_KEYS, SigningKey};

    fn issuer() -> PrincipalId {
        PrincipalId::parse("nitrile://c1/service/tokend").unwrap()
    }

    fn keys(n: usize) -> Vec<VerifyingKey> {
        (0..n)
            .map(|_| SigningKey::generate(&mut rand_core::OsRng).verifying_key())
            .collect()
    }

    fn path() -> &'static Path {
        Path::new("issuer-keys.toml")
    }

    #[test]
    fn a_rendered_file_loads_back_with_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("issuer-keys.toml");
        let ks = keys(2);
        std::fs::write(&file, IssuerFile::new(issuer(), &ks).render()).unwrap();
        let loaded = IssuerFile::load(&file).unwrap();
        assert_eq!(loaded.issuer(), &issuer());
        assert_eq!(loaded.key_ids().count(), 2);
        for k in &ks {
            assert_eq!(loaded.get(&k.key_id()), Some(k));
        }
    }

    #[test]
    fn a_key_id_of_another_key_is_refused() {
        let ks = keys(2);
        let mut file = IssuerFile::new(issuer(), &ks[..1]);
        file.keys[0].kid = ks[1].key_id().to_string();
        assert!(matches!(
            IssuerFile::parse(&file.render(), path()),
            Err(IssuerFileError::KeyIdMismatch { .. })
        ));
    }

    #[test]
    fn garbage_keys_unknown_fields_and_empty_sets_are_refused() {
        let mut file = IssuerFile::new(issuer(), &keys(1));
        file.keys[0].public_key = "-----BEGIN PUBLIC KEY-----\nAAAA\n".into();
        assert!(matches!(
            IssuerFile::parse(&file.render(), path()),
            Err(IssuerFileError::BadKey { .. })
        ));
        let text = IssuerFile::new(issuer(), &keys(1)).render() + "extra = 1\n";
        assert!(matches!(
            IssuerFile::parse(&text, path()),
            Err(IssuerFileError::Syntax { .. })
        ));
        assert!(matches!(
            IssuerFile::parse(&IssuerFile::new(issuer(), &[]).render(), path()),
            Err(IssuerFileError::NoKeys { .. })
        ));
        let text = IssuerFile::new(issuer(), &keys(MAX_ISSUER_KEYS + 1)).render();
        assert!(matches!(
            IssuerFile::parse(&text, path()),
            Err(IssuerFileError::TooManyKeys { .. })
        ));
    }

    #[test]
    fn a_file_larger_than_the_bound_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("issuer-keys.toml");
        let mut text = IssuerFile::new(issuer(), &keys(1)).render();
        while text.len() as u64 <= MAX_ISSUER_FILE_LEN {
            text.push_str("# padding\n");
        }
        std::fs::write(&file, text).unwrap();
        let err = IssuerFile::load(&file).unwrap_err();
        assert!(matches!(err, IssuerFileError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("issuer-keys.toml"), "{err}");
        let err = IssuerFile::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(matches!(err, IssuerFileError::Io { .. }), "{err}");
    }
}
