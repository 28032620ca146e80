//! The wrapped form of a volume's data key, which the host keeps.
//!
//! Format version 1, all lengths in bytes:
//!
//! ```text
//! magic      4   "NKWK"
//! version    1   1
//! volume     1 + n   the volume id: its length (1 to 63), then its text
//! key        1 + m   the KEK's bare name: its length (1 to 63), then its text
//! nonce      12  random
//! ciphertext 64  the data key under AES-256-GCM
//! tag        16  the GCM tag
//! ```
//!
//! The AES-256-GCM key is HKDF-SHA256 (RFC 5869) of the KEK, with the
//! volume's 32-byte secret as salt and [`wrap_info`] as info, 32 bytes
//! long. The associated data is everything before the nonce, so the format
//! version, the volume id and the KEK name are all authenticated: a wrapped
//! key edited to name another volume or KEK does not open, and one left
//! naming its own opens only under its own volume's secret.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};
use hkdf::Hkdf;
use nitrile_api::{IdError, MAX_NAME_LEN, Name};
use sha2::Sha256;
use std::fmt;
use zeroize::Zeroizing;

use crate::DEK_LEN;
use crate::key::KeyName;

/// The first bytes of every wrapped key.
pub const WRAPPED_KEY_MAGIC: [u8; 4] = *b"NKWK";

/// The format version this crate writes and reads.
pub const WRAPPED_KEY_VERSION: u8 = 1;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes after the two names: nonce, ciphertext and tag.
const TAIL_LEN: usize = NONCE_LEN + DEK_LEN + TAG_LEN;

/// Longest wrapped key: both names at their longest. Anything longer is
/// refused before it is parsed.
pub const MAX_WRAPPED_KEY_LEN: usize = 4 + 1 + 2 * (1 + MAX_NAME_LEN) + TAIL_LEN;

/// The HKDF info of a volume's wrapping key: the format version and the
/// volume id.
pub fn wrap_info(volume: &Name) -> String {
    format!("nitrile-kms wrapped-key v{WRAPPED_KEY_VERSION} volume/{volume}")
}

/// Why bytes are not a wrapped key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WrappedKeyError {
    /// longer than any wrapped key
    #[error("{len} bytes; a wrapped key is at most {MAX_WRAPPED_KEY_LEN}")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// ends before its last field
    #[error("{len} bytes end before the {field}")]
    Truncated {
        /// Its length.
        len: usize,
        /// The field that is cut.
        field: &'static str,
    },
    /// bytes after the tag
    #[error("{extra} bytes after the tag")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// does not start with the magic bytes
    #[error("it does not start with \"NKWK\"")]
    BadMagic,
    /// a format version this build does not read
    #[error("format version {0} is not supported (this build reads version {WRAPPED_KEY_VERSION})")]
    UnsupportedVersion(u8),
    /// a volume id or KEK name that breaks the rules of names
    #[error("its {field} is not a valid name: {source}")]
    BadName {
        /// Which name.
        field: &'static str,
        /// What is wrong with it.
        #[source]
        source: IdError,
    },
}

/// A volume's data key wrapped under a KEK, as the host keeps it. Decoding
/// checks the format only; whether it opens is the key service's to say.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    volume: Name,
    key: KeyName,
    nonce: [u8; NONCE_LEN],
    ciphertext: [u8; DEK_LEN],
    tag: [u8; TAG_LEN],
}

impl WrappedKey {
    /// Parses a wrapped key, refusing anything but exactly one of format
    /// version 1 of at most [`MAX_WRAPPED_KEY_LEN`] bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WrappedKeyError> {
        let len = bytes.len();
        if len > MAX_WRAPPED_KEY_LEN {
            return Err(WrappedKeyError::TooLong { len });
        }
        let mut r = Reader { bytes, at: 0 };
        if r.take(4, "magic")? != WRAPPED_KEY_MAGIC {
            return Err(WrappedKeyError::BadMagic);
        }
        let version = r.take(1, "version")?[0];
        if version != WRAPPED_KEY_VERSION {
            return Err(WrappedKeyError::UnsupportedVersion(version));
        }
        let volume = r.name("volume id")?;
        let key = KeyName::from(r.name("key name")?);
        let rest = &bytes[r.at..];
        if rest.len() < TAIL_LEN {
            return Err(WrappedKeyError::Truncated {
                len,
                field: "nonce, ciphertext and tag",
            });
        }
        if rest.len() > TAIL_LEN {
            return Err(WrappedKeyError::TrailingBytes {
                extra: rest.len() - TAIL_LEN,
            });
        }
        let mut nonce = [0u8; NONCE_LEN];
        let mut ciphertext = [0u8; DEK_LEN];
        let mut tag = [0u8; TAG_LEN];
        nonce.copy_from_slice(&rest[..NONCE_LEN]);
        ciphertext.copy_from_slice(&rest[NONCE_LEN..NONCE_LEN + DEK_LEN]);
        tag.copy_from_slice(&rest[NONCE_LEN + DEK_LEN..]);
        Ok(Self {
            volume,
            key,
            nonce,
            ciphertext,
            tag,
        })
    }

    /// The bytes of the wrapped key.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.header();
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.ciphertext);
        out.extend_from_slice(&self.tag);
        out
    }

    /// The volume it says it belongs to.
    pub fn volume(&self) -> &Name {
        &self.volume
    }

    /// The KEK it says it is wrapped under.
    pub fn key(&self) -> &KeyName {
        &self.key
    }

    /// Everything before the nonce: the associated data.
    fn header(&self) -> Vec<u8> {
        header(&self.volume, &self.key)
    }

    /// Makes a fresh data key and wraps it for `volume` under `kek` and the
    /// volume's `secret`. The plaintext exists only in `buf`, zeroized on
    /// drop, and is encrypted where it was made.
    pub(crate) fn generate(
        kek: &[u8; 32],
        secret: &[u8; 32],
        volume: &Name,
        key: &KeyName,
    ) -> Result<Self, crate::KmsError> {
        let mut nonce = [0u8; NONCE_LEN];
        crate::secret::fill_random(&mut nonce)?;
        let mut buf = Zeroizing::new([0u8; DEK_LEN]);
        crate::secret::fill_random(&mut buf[..])?;
        let aad = header(volume, key);
        let tag = cipher(kek, secret, volume)
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut buf[..])
            .unwrap_or_else(|_| unreachable!("AES-GCM seals 64 bytes"));
        let mut ciphertext = [0u8; DEK_LEN];
        ciphertext.copy_from_slice(&buf[..]);
        Ok(Self {
            volume: volume.clone(),
            key: key.clone(),
            nonce,
            ciphertext,
            tag: tag.into(),
        })
    }

    /// Opens the data key into `out` with `kek` and the volume's `secret`.
    /// On failure `out` is zeroed.
    pub(crate) fn open_into(
        &self,
        kek: &[u8; 32],
        secret: &[u8; 32],
        out: &mut [u8; DEK_LEN],
    ) -> Result<(), Unauthentic> {
        out.copy_from_slice(&self.ciphertext);
        let aad = self.header();
        let opened = cipher(kek, secret, &self.volume).decrypt_in_place_detached(
            Nonce::from_slice(&self.nonce),
            &aad,
            &mut out[..],
            Tag::from_slice(&self.tag),
        );
        if opened.is_err() {
            out.fill(0);
            return Err(Unauthentic);
        }
        Ok(())
    }
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("version", &WRAPPED_KEY_VERSION)
            .field("volume", &self.volume)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// A wrapped key that does not open.
#[derive(Debug)]
pub(crate) struct Unauthentic;

/// AES-256-GCM under the volume's wrapping key: HKDF-SHA256 of the KEK,
/// salted with the volume's secret, for the volume's info. The derived key
/// is zeroized once the cipher is keyed (the cipher's key schedule is
/// zeroized on drop by the `aes` crate's `zeroize` feature).
fn cipher(kek: &[u8; 32], secret: &[u8; 32], volume: &Name) -> Aes256Gcm {
    let mut okm = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(secret), kek)
        .expand(wrap_info(volume).as_bytes(), &mut okm[..])
        .unwrap_or_else(|_| unreachable!("HKDF-SHA256 gives 32 bytes"));
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&okm[..]))
}

fn header(volume: &Name, key: &KeyName) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_WRAPPED_KEY_LEN);
    out.extend_from_slice(&WRAPPED_KEY_MAGIC);
    out.push(WRAPPED_KEY_VERSION);
    for name in [volume.as_str(), key.as_str()] {
        // Names are at most MAX_NAME_LEN (63) bytes: one byte holds it.
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WrappedKeyError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(WrappedKeyError::Truncated {
                len: self.bytes.len(),
                field,
            });
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn name(&mut self, field: &'static str) -> Result<Name, WrappedKeyError> {
        let n = self.take(1, field)?[0] as usize;
        let text = self.take(n, field)?;
        let bad = |source| WrappedKeyError::BadName { field, source };
        let text = std::str::from_utf8(text).map_err(|_| {
            bad(IdError::BadCharacter(
                String::from_utf8_lossy(text).chars().take(80).collect(),
            ))
        })?;
        Name::new(text).map_err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn the_longest_wrapped_key_is_the_bound() {
        let long = "a".repeat(MAX_NAME_LEN);
        let w = WrappedKey::generate(
            &[1; 32],
            &[2; 32],
            &name(&long),
            &KeyName::new(&long).unwrap(),
        )
        .unwrap();
        let bytes = w.encode();
        assert_eq!(bytes.len(), MAX_WRAPPED_KEY_LEN);
        assert_eq!(MAX_WRAPPED_KEY_LEN, 225);
        assert_eq!(WrappedKey::decode(&bytes).unwrap(), w);
    }

    #[test]
    fn the_layout_is_as_documented() {
        let w = WrappedKey::generate(
            &[1; 32],
            &[2; 32],
            &name("v1"),
            &KeyName::new("default").unwrap(),
        )
        .unwrap();
        let b = w.encode();
        assert_eq!(&b[..4], b"NKWK");
        assert_eq!(b[4], 1);
        assert_eq!(b[5], 2);
        assert_eq!(&b[6..8], b"v1");
        assert_eq!(b[8], 7);
        assert_eq!(&b[9..16], b"default");
        assert_eq!(b.len(), 16 + 12 + 64 + 16);
        assert_eq!(&b[16..28], &w.nonce);
    }

    #[test]
    fn an_opened_key_is_what_was_wrapped_and_a_wrong_secret_zeroes_the_output() {
        let (kek, secret) = ([7u8; 32], [9u8; 32]);
        let w =
            WrappedKey::generate(&kek, &secret, &name("v1"), &KeyName::new("k").unwrap()).unwrap();
        let mut a = [0u8; DEK_LEN];
        w.open_into(&kek, &secret, &mut a).unwrap();
        assert_ne!(a, [0u8; DEK_LEN]);
        assert_ne!(a, w.ciphertext, "the data key is encrypted");
        let mut b = [0xffu8; DEK_LEN];
        assert!(w.open_into(&kek, &[8u8; 32], &mut b).is_err());
        assert_eq!(b, [0u8; DEK_LEN]);
        assert!(w.open_into(&[6u8; 32], &secret, &mut b).is_err());
    }
}
