//! Volume keys inside the VMM: 64-byte AES-256-XTS keys held in locked,
//! zeroized memory.
//!
//! [`VolumeKey`] is the one key type of both backends' VMM side: the
//! `nitrile vmm` process and the QEMU launcher open a volume's sealed key
//! straight into one ([`VolumeKey::open_sealed`], see [`crate::unlock`]) or
//! generate one for an instance-store disk ([`VolumeKey::generate`]); the
//! `kvm` VMM encrypts sectors with it, the QEMU launcher turns it into a LUKS
//! passphrase. The host agent never holds one. Its bytes live alone on a page
//! of their own ([`nitrile_vmm_sys::Locked`]), which is `mlock`ed (never
//! swapped) and excluded from core dumps (`MADV_DONTDUMP`) for the key's
//! lifetime, and overwritten with zeros before it is unlocked and freed; a
//! key whose page cannot be locked is not made. It has no `Display`, `Clone`
//! or serde implementation, and its `Debug` shows no byte of it; the bytes
//! are reached only through [`VolumeKey::expose_secret`].

use std::fmt;

use nitrile_api::Name;
use nitrile_vmm_sys::{LockError, Locked};
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::unlock::{OpenError, Recipient, SealedKey};

/// Length of a volume key: two AES-256 keys for XTS (the key service's
/// 512-bit data key).
pub const VOLUME_KEY_LEN: usize = 64;

/// Why a volume key could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// the key material has the wrong length
    #[error("volume key must be {VOLUME_KEY_LEN} bytes, got {0}")]
    BadLength(usize),
    /// the page holding the key could not be locked in memory
    #[error("could not mlock the volume key page (check RLIMIT_MEMLOCK)")]
    Mlock(#[source] LockError),
    /// the sealed key does not open with this recipient as this volume's key
    #[error("the sealed volume key does not open")]
    DoesNotOpen(#[source] OpenError),
}

/// A 64-byte AES-256-XTS volume key in locked memory, zeroized on drop.
pub struct VolumeKey {
    bytes: Locked<[u8; VOLUME_KEY_LEN]>,
}

impl VolumeKey {
    /// Copies `bytes` (exactly [`VOLUME_KEY_LEN`]) into a locked page.
    ///
    /// The caller should zeroize its own copy. For tests and benchmarks: a
    /// VMM gets its keys from [`VolumeKey::open_sealed`] or
    /// [`VolumeKey::generate`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != VOLUME_KEY_LEN {
            return Err(KeyError::BadLength(bytes.len()));
        }
        let mut key = Self::locked_zero()?;
        key.bytes.copy_from_slice(bytes);
        Ok(key)
    }

    /// A fresh random key, made in its locked page (an instance-store disk's
    /// key, which never leaves the process that made it).
    pub fn generate(rng: &mut impl CryptoRngCore) -> Result<Self, KeyError> {
        let mut key = Self::locked_zero()?;
        rng.fill_bytes(&mut key.bytes[..]);
        Ok(key)
    }

    /// Opens `sealed` with `recipient` as `volume`'s data key, decrypted
    /// straight into a locked page (no other copy of the plaintext is made).
    /// A key sealed to another recipient, for another volume, or altered is
    /// refused ([`KeyError::DoesNotOpen`]) and nothing of it is kept.
    pub fn open_sealed(
        recipient: &Recipient,
        sealed: &SealedKey,
        volume: &Name,
    ) -> Result<Self, KeyError> {
        let mut key = Self::locked_zero()?;
        recipient
            .open_into(sealed, volume, &mut key.bytes)
            .map_err(KeyError::DoesNotOpen)?;
        Ok(key)
    }

    fn locked_zero() -> Result<Self, KeyError> {
        Ok(Self {
            bytes: Locked::new([0u8; VOLUME_KEY_LEN]).map_err(KeyError::Mlock)?,
        })
    }

    /// The raw key bytes, for a VMM expanding it into a cipher or a
    /// launcher handing it to QEMU.
    ///
    /// Never log, print or persist them.
    pub fn expose_secret(&self) -> &[u8; VOLUME_KEY_LEN] {
        &self.bytes
    }

    /// The key as standard base64 text (88 ASCII bytes), zeroized on drop.
    ///
    /// This is the LUKS passphrase the QEMU launcher hands to QEMU.
    pub(crate) fn to_base64(&self) -> Zeroizing<String> {
        use base64::Engine as _;
        let mut text = Zeroizing::new(String::with_capacity(88));
        base64::engine::general_purpose::STANDARD.encode_string(self.expose_secret(), &mut text);
        text
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_length_is_refused() {
        assert!(matches!(
            VolumeKey::from_bytes(&[0u8; 32]),
            Err(KeyError::BadLength(32))
        ));
        assert!(matches!(
            VolumeKey::from_bytes(&[0u8; 65]),
            Err(KeyError::BadLength(65))
        ));
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let key = VolumeKey::from_bytes(&[0xabu8; VOLUME_KEY_LEN]).unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.to_lowercase().contains("ab, ") && !shown.contains("171"));
        assert!(!shown.contains(&"ab".repeat(8)));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn key_page_is_locked_and_aligned() {
        let key = VolumeKey::generate(&mut rand_core::OsRng).unwrap();
        let addr = key.expose_secret().as_ptr() as usize;
        assert_eq!(addr % nitrile_vmm_sys::locked::PAGE_SIZE, 0);
        // /proc/self/smaps reports the locked size of every mapping; the
        // page holding the key must be in a mapping with Locked > 0.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_range = false;
        let mut locked = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                in_range = (lo..hi).contains(&addr);
                continue;
            }
            if in_range && let Some(rest) = line.strip_prefix("Locked:") {
                locked = Some(rest.trim().trim_end_matches(" kB").parse::<u64>().unwrap());
            }
        }
        assert!(locked.unwrap() >= 4, "key page not locked: {locked:?}");
    }

    #[test]
    fn generated_keys_differ() {
        let a = VolumeKey::generate(&mut rand_core::OsRng).unwrap();
        let b = VolumeKey::generate(&mut rand_core::OsRng).unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_ne!(a.expose_secret(), &[0u8; VOLUME_KEY_LEN]);
    }

    #[test]
    fn base64_passphrase_is_88_ascii_bytes() {
        let key = VolumeKey::from_bytes(&[7u8; VOLUME_KEY_LEN]).unwrap();
        let p = key.to_base64();
        assert_eq!(p.len(), 88);
        assert!(p.is_ascii());
    }
}
