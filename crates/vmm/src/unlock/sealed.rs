//! The recipient's side of a sealed volume key: the format the key service
//! seals a data key in (version 1), and the ephemeral key pair a VMM opens
//! it with.
//!
//! HPKE (RFC 9180), base mode, single shot, one fixed suite:
//! DHKEM(X25519, HKDF-SHA256) (KEM 0x0020), HKDF-SHA256 (KDF 0x0001),
//! AES-256-GCM (AEAD 0x0002), through the `hpke` crate. The bytes, all
//! lengths in bytes:
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
//! The associated data is the first 11 bytes; the info is [`seal_info`],
//! naming the volume, so a key sealed for one volume opens as no other's.
//! This is the format of the key service's core (`nitrile-kms`), which
//! seals; this crate only opens, and cannot depend on that service's crate
//! (the host agent, which depends on this one, must not reach the key
//! service's code). The tests hold the two to each other: keys the key
//! service seals open here, the constants agree.

use std::fmt;

use hpke::aead::{AeadTag, AesGcm256};
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, Serializable};
use nitrile_api::Name;
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::VOLUME_KEY_LEN;

type Kem = X25519HkdfSha256;
type Kdf = HkdfSha256;
type Aead = AesGcm256;
type PrivateKey = <Kem as hpke::Kem>::PrivateKey;
type EncappedKey = <Kem as hpke::Kem>::EncappedKey;

/// The first bytes of every sealed key.
pub const SEALED_KEY_MAGIC: [u8; 4] = *b"NKSK";
/// The format version this crate reads.
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
pub const SEALED_KEY_LEN: usize = HEADER_LEN + ENC_LEN + VOLUME_KEY_LEN + TAG_LEN;

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

/// Why a recipient public key is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecipientKeyError {
    /// not 32 bytes
    #[error("{len} bytes; an X25519 public key is {RECIPIENT_KEY_LEN}")]
    Length {
        /// Its length.
        len: usize,
    },
}

/// Why a sealed key did not open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// sealed to another recipient, for another volume, or altered
    #[error("the sealed key does not open as volume/{0}'s key with this recipient's key")]
    DoesNotOpen(Name),
}

/// A recipient's X25519 public key: what the VMM offers, what the key
/// service seals to.
#[derive(Clone, PartialEq, Eq)]
pub struct RecipientPublicKey([u8; RECIPIENT_KEY_LEN]);

impl RecipientPublicKey {
    /// Exactly 32 bytes (a point of small order is refused by the key
    /// service when it seals: it gives no shared secret).
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

/// A volume's data key sealed to one recipient: ciphertext that a host may
/// hold and relay but not open.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedKey([u8; SEALED_KEY_LEN]);

impl SealedKey {
    /// Parses a sealed key: exactly [`SEALED_KEY_LEN`] bytes of format
    /// version 1 and this suite.
    pub fn decode(bytes: &[u8]) -> Result<Self, SealedKeyError> {
        let bytes: [u8; SEALED_KEY_LEN] = bytes
            .try_into()
            .map_err(|_| SealedKeyError::Length { len: bytes.len() })?;
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
        Ok(Self(bytes))
    }

    /// The bytes of the sealed key.
    pub fn encode(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    fn enc(&self) -> &[u8] {
        &self.0[HEADER_LEN..HEADER_LEN + ENC_LEN]
    }

    fn ciphertext(&self) -> &[u8] {
        &self.0[HEADER_LEN + ENC_LEN..HEADER_LEN + ENC_LEN + VOLUME_KEY_LEN]
    }

    fn tag(&self) -> &[u8] {
        &self.0[HEADER_LEN + ENC_LEN + VOLUME_KEY_LEN..]
    }
}

impl fmt::Debug for SealedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedKey")
            .field("version", &SEALED_KEY_VERSION)
            .field("enc", &hex::encode(self.enc()))
            .finish_non_exhaustive()
    }
}

/// An ephemeral X25519 key pair made where a key is to be used (the VMM):
/// its private half never leaves the process and is zeroized on drop.
pub struct Recipient {
    private: PrivateKey,
    public: RecipientPublicKey,
}

impl Recipient {
    /// A fresh key pair, derived (RFC 9180 `DeriveKeyPair`) from 32 random
    /// bytes of the operating system, which are zeroized after.
    pub fn generate() -> Result<Self, rand_core::Error> {
        let mut ikm = Zeroizing::new([0u8; 32]);
        OsRng.try_fill_bytes(&mut ikm[..])?;
        let (private, public) = Kem::derive_keypair(&ikm[..]);
        let mut pk = [0u8; RECIPIENT_KEY_LEN];
        public.write_exact(&mut pk);
        Ok(Self {
            private,
            public: RecipientPublicKey(pk),
        })
    }

    /// The public key to have the data key sealed to.
    pub fn public_key(&self) -> &RecipientPublicKey {
        &self.public
    }

    /// Opens `sealed` as `volume`'s data key straight into `out` (a locked
    /// page). On failure `out` is zeroed.
    pub fn open_into(
        &self,
        sealed: &SealedKey,
        volume: &Name,
        out: &mut [u8; VOLUME_KEY_LEN],
    ) -> Result<(), OpenError> {
        let fail = || OpenError::DoesNotOpen(volume.clone());
        let enc = EncappedKey::from_bytes(sealed.enc()).map_err(|_| fail())?;
        let tag = AeadTag::<Aead>::from_bytes(sealed.tag()).map_err(|_| fail())?;
        out.copy_from_slice(sealed.ciphertext());
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
    fn the_constants_are_the_key_services() {
        assert_eq!(SEALED_KEY_LEN, nitrile_kms::SEALED_KEY_LEN);
        assert_eq!(SEALED_KEY_MAGIC, nitrile_kms::SEALED_KEY_MAGIC);
        assert_eq!(SEALED_KEY_VERSION, nitrile_kms::SEALED_KEY_VERSION);
        assert_eq!(
            (HPKE_KEM_ID, HPKE_KDF_ID, HPKE_AEAD_ID),
            (
                nitrile_kms::HPKE_KEM_ID,
                nitrile_kms::HPKE_KDF_ID,
                nitrile_kms::HPKE_AEAD_ID
            )
        );
        assert_eq!(RECIPIENT_KEY_LEN, nitrile_kms::RECIPIENT_KEY_LEN);
        let v = Name::new("data").unwrap();
        assert_eq!(seal_info(&v), nitrile_kms::seal_info(&v));
        assert_eq!(HEADER, *b"NKSK\x01\x00\x20\x00\x01\x00\x02");
    }

    #[test]
    fn a_key_the_key_service_sealed_opens_for_its_recipient_and_volume_only() {
        let dir = tempfile::tempdir().unwrap();
        let kms = nitrile_kms::Kms::open(&dir.path().join("kms")).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let owner = nitrile_api::PrincipalId::parse("nitrile://local/service/kms").unwrap();
        let kek = nitrile_kms::KeyName::default_key();
        kms.create_key(&kek, &owner, now).unwrap();
        let v1 = Name::new("v1").unwrap();
        let v2 = Name::new("v2").unwrap();
        let wrapped = kms
            .generate_volume_key(&v1, &kek, now)
            .unwrap()
            .wrapped
            .encode();
        let dek = kms.export_volume_key_for_tests(&v1, &wrapped).unwrap();

        let r = Recipient::generate().unwrap();
        let other = Recipient::generate().unwrap();
        assert_ne!(r.public_key(), other.public_key());
        let to = nitrile_kms::RecipientPublicKey::from_bytes(r.public_key().as_bytes()).unwrap();
        let sealed = kms.unwrap_sealed(&v1, &wrapped, &to, now).unwrap();
        let sealed = SealedKey::decode(&sealed.encode()).unwrap();
        let mut out = [0u8; 64];
        r.open_into(&sealed, &v1, &mut out).unwrap();
        assert_eq!(&out, &*dek);
        // Not as another volume's key, not with another key pair.
        let mut out = [0xffu8; 64];
        assert!(matches!(
            r.open_into(&sealed, &v2, &mut out),
            Err(OpenError::DoesNotOpen(_))
        ));
        assert_eq!(out, [0u8; 64], "zeroed on failure");
        assert!(other.open_into(&sealed, &v1, &mut out).is_err());
        // Not altered, in any part.
        for at in [HEADER_LEN, HEADER_LEN + ENC_LEN, SEALED_KEY_LEN - 1] {
            let mut bytes = sealed.encode();
            bytes[at] ^= 1;
            let altered = SealedKey::decode(&bytes).unwrap();
            assert!(r.open_into(&altered, &v1, &mut out).is_err(), "{at}");
        }
    }

    #[test]
    fn malformed_sealed_keys_are_refused_by_name() {
        let mut good = HEADER.to_vec();
        good.resize(SEALED_KEY_LEN, 0);
        assert!(SealedKey::decode(&good).is_ok());
        assert_eq!(
            SealedKey::decode(&good[..SEALED_KEY_LEN - 1]),
            Err(SealedKeyError::Length {
                len: SEALED_KEY_LEN - 1
            })
        );
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(SealedKey::decode(&b), Err(SealedKeyError::BadMagic));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(
            SealedKey::decode(&b),
            Err(SealedKeyError::UnsupportedVersion(2))
        );
        let mut b = good;
        b[10] = 3;
        assert!(matches!(
            SealedKey::decode(&b),
            Err(SealedKeyError::UnsupportedSuite { aead: 3, .. })
        ));
        assert!(RecipientPublicKey::from_bytes(&[0; 31]).is_err());
    }

    #[test]
    fn debug_shows_public_material_only() {
        let r = Recipient::generate().unwrap();
        let text = format!("{r:?}");
        assert!(text.contains(&hex::encode(r.public_key().as_bytes())));
        let mut sk = [0u8; 32];
        r.private.write_exact(&mut sk);
        assert!(!text.contains(&hex::encode(sk)));
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = SealedKey::decode(&bytes);
        }
    }
}
