//! A volume's data key sealed to one recipient with HPKE (RFC 9180).
//!
//! The suite is fixed: base mode, DHKEM(X25519, HKDF-SHA256) (KEM 0x0020),
//! HKDF-SHA256 (KDF 0x0001), AES-256-GCM (AEAD 0x0002), single shot. The
//! info is [`seal_info`] (the purpose and the volume id), so a key sealed
//! for one volume does not open as another's. Format version 1, all lengths
//! in bytes:
//!
//! ```text
//! magic      4   "NKSK"
//! version    1   1
//! suite      6   KEM, KDF and AEAD ids, big-endian u16 each: 0x0020 0x0001 0x0002
//! enc        32  the HPKE encapsulated key (the sender's ephemeral X25519 public key)
//! ciphertext 64  the data key
//! tag        16  the AEAD tag
//! ```
//!
//! The associated data is the first 11 bytes (magic, version, suite).
//! The recipient side ([`Recipient`]) is what a VMM uses: an ephemeral
//! X25519 key pair made where the key is to be used, whose private half is
//! zeroized on drop.

use std::fmt;

use hpke::aead::{AeadTag, AesGcm256};
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use nitrile_api::Name;
use rand_core::OsRng;
use zeroize::Zeroizing;

use crate::DEK_LEN;

type Kem = X25519HkdfSha256;
type Kdf = HkdfSha256;
type Aead = AesGcm256;
type PrivateKey = <Kem as hpke::Kem>::PrivateKey;
type PublicKey = <Kem as hpke::Kem>::PublicKey;
type EncappedKey = <Kem as hpke::Kem>::EncappedKey;

/// The first bytes of every sealed key.
pub const SEALED_KEY_MAGIC: [u8; 4] = *b"NKSK";

/// The format version this crate writes and reads.
pub const SEALED_KEY_VERSION: u8 = 1;

/// The HPKE KEM: DHKEM(X25519, HKDF-SHA256).
pub const HPKE_KEM_ID: u16 = 0x0020;

/// The HPKE KDF: HKDF-SHA256.
pub const HPKE_KDF_ID: u16 = 0x0001;

/// The HPKE AEAD: AES-256-GCM.
pub const HPKE_AEAD_ID: u16 = 0x0002;

/// Length of a recipient's X25519 public key.
pub const RECIPIENT_KEY_LEN: usize = 32;

const HEADER_LEN: usize = 4 + 1 + 6;
const ENC_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// Length of every sealed key; it is also the bound of the decoder.
pub const SEALED_KEY_LEN: usize = HEADER_LEN + ENC_LEN + DEK_LEN + TAG_LEN;

const HEADER: [u8; HEADER_LEN] = {
    let k = HPKE_KEM_ID.to_be_bytes();
    let d = HPKE_KDF_ID.to_be_bytes();
    let a = HPKE_AEAD_ID.to_be_bytes();
    let m = SEALED_KEY_MAGIC;
    [
        m[0],
        m[1],
        m[2],
        m[3],
        SEALED_KEY_VERSION,
        k[0],
        k[1],
        d[0],
        d[1],
        a[0],
        a[1],
    ]
};

/// The HPKE info of a volume's sealed key: the purpose, the format version
/// and the volume id.
pub fn seal_info(volume: &Name) -> String {
    format!("nitrile-kms sealed volume key v{SEALED_KEY_VERSION} volume/{volume}")
}

/// Why bytes are not a sealed key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealedKeyError {
    /// not the one length of a sealed key
    #[error("{len} bytes; a sealed key is exactly {SEALED_KEY_LEN}")]
    Length {
        /// Its length.
        len: usize,
    },
    /// does not start with the magic bytes
    #[error("it does not start with \"NKSK\"")]
    BadMagic,
    /// a format version this build does not read
    #[error("format version {0} is not supported (this build reads version {SEALED_KEY_VERSION})")]
    UnsupportedVersion(u8),
    /// another HPKE suite
    #[error(
        "HPKE suite KEM {kem:#06x}, KDF {kdf:#06x}, AEAD {aead:#06x} is not supported (this build uses {HPKE_KEM_ID:#06x}, {HPKE_KDF_ID:#06x}, {HPKE_AEAD_ID:#06x})"
    )]
    UnsupportedSuite {
        /// The KEM id.
        kem: u16,
        /// The KDF id.
        kdf: u16,
        /// The AEAD id.
        aead: u16,
    },
}

/// Why a recipient public key cannot be sealed to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecipientKeyError {
    /// not 32 bytes
    #[error("{len} bytes; an X25519 public key is {RECIPIENT_KEY_LEN}")]
    Length {
        /// Its length.
        len: usize,
    },
    /// a point of small order: Diffie-Hellman with it gives no secret
    #[error("it is a point of small order, which gives no shared secret")]
    NoSharedSecret,
}

/// Why a sealed key did not open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// the bytes are not a sealed key
    #[error("the sealed key is malformed: {0}")]
    Malformed(#[from] SealedKeyError),
    /// sealed to another recipient, for another volume, or altered
    #[error("the sealed key does not open as volume/{0}'s key with this recipient's key")]
    DoesNotOpen(Name),
}

/// A recipient's X25519 public key, as the VMM side sends it to be sealed to.
#[derive(Clone, PartialEq, Eq)]
pub struct RecipientPublicKey([u8; RECIPIENT_KEY_LEN]);

impl RecipientPublicKey {
    /// Parses a public key: exactly 32 bytes (a point of small order is
    /// refused when sealing, by the Diffie-Hellman check of RFC 9180).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RecipientKeyError> {
        let key: [u8; RECIPIENT_KEY_LEN] = bytes
            .try_into()
            .map_err(|_| RecipientKeyError::Length { len: bytes.len() })?;
        Ok(Self(key))
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; RECIPIENT_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for RecipientPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecipientPublicKey({})", hex::encode(self.0))
    }
}

/// A volume's data key sealed to one recipient.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedKey {
    enc: [u8; ENC_LEN],
    ciphertext: [u8; DEK_LEN],
    tag: [u8; TAG_LEN],
}

impl SealedKey {
    /// Parses a sealed key: exactly [`SEALED_KEY_LEN`] bytes of format
    /// version 1 and this suite.
    pub fn decode(bytes: &[u8]) -> Result<Self, SealedKeyError> {
        if bytes.len() != SEALED_KEY_LEN {
            return Err(SealedKeyError::Length { len: bytes.len() });
        }
        if bytes[..4] != SEALED_KEY_MAGIC {
            return Err(SealedKeyError::BadMagic);
        }
        if bytes[4] != SEALED_KEY_VERSION {
            return Err(SealedKeyError::UnsupportedVersion(bytes[4]));
        }
        if bytes[..HEADER_LEN] != HEADER {
            let id = |i: usize| u16::from_be_bytes([bytes[i], bytes[i + 1]]);
            return Err(SealedKeyError::UnsupportedSuite {
                kem: id(5),
                kdf: id(7),
                aead: id(9),
            });
        }
        let mut s = Self {
            enc: [0; ENC_LEN],
            ciphertext: [0; DEK_LEN],
            tag: [0; TAG_LEN],
        };
        let rest = &bytes[HEADER_LEN..];
        s.enc.copy_from_slice(&rest[..ENC_LEN]);
        s.ciphertext
            .copy_from_slice(&rest[ENC_LEN..ENC_LEN + DEK_LEN]);
        s.tag.copy_from_slice(&rest[ENC_LEN + DEK_LEN..]);
        Ok(s)
    }

    /// The bytes of the sealed key.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SEALED_KEY_LEN);
        out.extend_from_slice(&HEADER);
        out.extend_from_slice(&self.enc);
        out.extend_from_slice(&self.ciphertext);
        out.extend_from_slice(&self.tag);
        out
    }
}

impl fmt::Debug for SealedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedKey")
            .field("version", &SEALED_KEY_VERSION)
            .field("enc", &hex::encode(self.enc))
            .finish_non_exhaustive()
    }
}

/// Seals the data key in `dek` to `recipient` as `volume`'s key. `dek` is
/// encrypted in place: it holds ciphertext afterwards (and is the caller's
/// to zeroize).
pub(crate) fn seal_in_place(
    dek: &mut [u8; DEK_LEN],
    recipient: &RecipientPublicKey,
    volume: &Name,
) -> Result<SealedKey, RecipientKeyError> {
    let pk = PublicKey::from_bytes(&recipient.0)
        .map_err(|_| RecipientKeyError::Length { len: ENC_LEN })?;
    let (enc, tag) = hpke::single_shot_seal_in_place_detached::<Aead, Kdf, Kem, _>(
        &OpModeS::Base,
        &pk,
        seal_info(volume).as_bytes(),
        &mut dek[..],
        &HEADER,
        &mut OsRng,
    )
    // The only failure of a 64-byte base-mode seal is the all-zero
    // Diffie-Hellman result of a small-order point.
    .map_err(|_| RecipientKeyError::NoSharedSecret)?;
    let mut sealed = SealedKey {
        enc: [0; ENC_LEN],
        ciphertext: [0; DEK_LEN],
        tag: [0; TAG_LEN],
    };
    enc.write_exact(&mut sealed.enc);
    sealed.ciphertext.copy_from_slice(&dek[..]);
    tag.write_exact(&mut sealed.tag);
    Ok(sealed)
}

/// The recipient of a sealed data key: an X25519 key pair made where the
/// key is to be used (the VMM), whose private half never leaves it and is
/// zeroized on drop.
pub struct Recipient {
    private: PrivateKey,
    public: RecipientPublicKey,
}

impl Recipient {
    /// A fresh key pair, from 32 random bytes of the operating system
    /// (RFC 9180 `DeriveKeyPair`).
    pub fn generate() -> Result<Self, rand_core::Error> {
        let mut ikm = Zeroizing::new([0u8; 32]);
        rand_core::RngCore::try_fill_bytes(&mut OsRng, &mut ikm[..])?;
        let (private, public) = Kem::derive_keypair(&ikm[..]);
        let mut pk = [0u8; RECIPIENT_KEY_LEN];
        public.write_exact(&mut pk);
        Ok(Self {
            private,
            public: RecipientPublicKey(pk),
        })
    }

    /// The public key to send to the key service.
    pub fn public_key(&self) -> &RecipientPublicKey {
        &self.public
    }

    /// Opens `sealed` as `volume`'s data key.
    pub fn open(
        &self,
        sealed: &SealedKey,
        volume: &Name,
    ) -> Result<Zeroizing<[u8; DEK_LEN]>, OpenError> {
        let mut out = Zeroizing::new([0u8; DEK_LEN]);
        self.open_into(sealed, volume, &mut out)?;
        Ok(out)
    }

    /// Opens `sealed` as `volume`'s data key straight into `out` (a locked
    /// page, say). On failure `out` is zeroed.
    pub fn open_into(
        &self,
        sealed: &SealedKey,
        volume: &Name,
        out: &mut [u8; DEK_LEN],
    ) -> Result<(), OpenError> {
        let fail = || OpenError::DoesNotOpen(volume.clone());
        let enc = EncappedKey::from_bytes(&sealed.enc).map_err(|_| fail())?;
        let tag = AeadTag::<Aead>::from_bytes(&sealed.tag).map_err(|_| fail())?;
        out.copy_from_slice(&sealed.ciphertext);
        let opened = hpke::single_shot_open_in_place_detached::<Aead, Kdf, Kem>(
            &OpModeR::Base,
            &self.private,
            &enc,
            seal_info(volume).as_bytes(),
            &mut out[..],
            &HEADER,
            &tag,
        );
        if opened.is_err() {
            out.fill(0);
            return Err(fail());
        }
        Ok(())
    }

    /// The private key's 32 bytes, for tests that open a sealed key with an
    /// independent HPKE implementation.
    #[cfg(feature = "danger-test-export")]
    pub fn export_private_key_for_tests(&self) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        self.private.write_exact(&mut out[..]);
        out
    }
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recipient")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_magic_version_and_suite() {
        assert_eq!(HEADER, *b"NKSK\x01\x00\x20\x00\x01\x00\x02");
        assert_eq!(SEALED_KEY_LEN, 123);
    }

    #[test]
    fn a_sealed_key_opens_for_its_recipient_and_volume_only() {
        let r = Recipient::generate().unwrap();
        let other = Recipient::generate().unwrap();
        let v1 = Name::new("v1").unwrap();
        let v2 = Name::new("v2").unwrap();
        let mut dek = [0x5au8; DEK_LEN];
        let sealed = seal_in_place(&mut dek, r.public_key(), &v1).unwrap();
        assert_ne!(dek, [0x5au8; DEK_LEN], "sealed in place");
        let back = SealedKey::decode(&sealed.encode()).unwrap();
        assert_eq!(*r.open(&back, &v1).unwrap(), [0x5au8; DEK_LEN]);
        assert!(matches!(r.open(&back, &v2), Err(OpenError::DoesNotOpen(_))));
        assert!(other.open(&back, &v1).is_err());
        let mut out = [0xffu8; DEK_LEN];
        assert!(other.open_into(&back, &v1, &mut out).is_err());
        assert_eq!(out, [0u8; DEK_LEN], "zeroed on failure");
    }

    #[test]
    fn debug_shows_the_public_half_only() {
        let r = Recipient::generate().unwrap();
        let text = format!("{r:?}");
        assert!(text.contains(&hex::encode(r.public_key().as_bytes())));
        let mut sk = [0u8; 32];
        r.private.write_exact(&mut sk);
        assert!(!text.contains(&hex::encode(sk)));
    }
}
