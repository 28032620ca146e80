//! Per-sector AES-256-XTS for volumes: the 64-byte volume key and the cipher
//! that encrypts every 512-byte sector with its sector number as the tweak
//! (little endian, IEEE 1619 / `dm-crypt` `aes-xts-plain64`).

use std::io::Read;

use aes::Aes256;
use aes::cipher::KeyInit;
use xts_mode::{Xts128, get_tweak_default};
use zeroize::Zeroizing;

/// Bytes in a volume key: two AES-256 keys (data key, tweak key).
pub const KEY_LEN: usize = 64;
/// Bytes in a sector, the unit of encryption.
pub const SECTOR_SIZE: usize = 512;

/// Why a volume key was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key source did not hold exactly 64 bytes.
    #[error("a volume key is exactly {KEY_LEN} bytes")]
    Length,
    /// The two halves of the key are equal, which XTS forbids.
    #[error("the two halves of an XTS key must differ")]
    EqualHalves,
    /// Reading the key from its file descriptor failed.
    #[error("reading the volume key failed")]
    Read(#[source] std::io::Error),
}

/// A 512-bit AES-XTS volume key. The bytes live in one heap allocation that is
/// locked into RAM where the process may (`mlock`), zeroized on drop, and never
/// printed: `Debug` shows only `VolumeKey(<redacted>)`.
pub struct VolumeKey {
    bytes: Box<Zeroizing<[u8; KEY_LEN]>>,
    locked: bool,
}

impl VolumeKey {
    /// Takes the key bytes. Refuses keys whose halves are equal.
    pub fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Result<Self, KeyError> {
        let bytes = Box::new(bytes);
        if bytes[..KEY_LEN / 2] == bytes[KEY_LEN / 2..] {
            return Err(KeyError::EqualHalves);
        }
        let locked = lock(bytes.as_ptr(), KEY_LEN);
        Ok(Self { bytes, locked })
    }

    /// Reads exactly 64 bytes and then end of file from `source` (the process
    /// form hands the key over on an inherited fd). Anything else is refused.
    pub fn read_from(source: &mut impl Read) -> Result<Self, KeyError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        source
            .read_exact(&mut bytes[..])
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => KeyError::Length,
                _ => KeyError::Read(e),
            })?;
        let mut extra = [0u8; 1];
        match source.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => return Err(KeyError::Length),
            Err(e) => return Err(KeyError::Read(e)),
        }
        Self::from_bytes(bytes)
    }

    /// Whether the key's page is locked in RAM (`mlock` succeeded).
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeKey(<redacted>)")
    }
}

impl Drop for VolumeKey {
    fn drop(&mut self) {
        // `Zeroizing` clears the bytes when the box drops, after this.
        if self.locked {
            // SAFETY: the pointer and length are those passed to mlock for an
            // allocation still alive here; munlock only changes page residency.
            unsafe {
                libc::munlock(self.bytes.as_ptr().cast(), KEY_LEN);
            }
        }
    }
}

fn lock(ptr: *const u8, len: usize) -> bool {
    // SAFETY: `ptr..ptr+len` is a live heap allocation; mlock reads no memory
    // and only pins the pages containing it.
    unsafe { libc::mlock(ptr.cast(), len) == 0 }
}

/// AES-256-XTS over whole sectors. The expanded key schedules are zeroized on
/// drop (the `aes` crate's `zeroize` feature).
pub struct SectorCipher {
    xts: Xts128<Aes256>,
}

/// A buffer that is not a whole number of sectors.
#[derive(Debug, thiserror::Error)]
#[error("buffer of {len} bytes is not a whole number of {SECTOR_SIZE}-byte sectors")]
pub struct SectorAlignError {
    /// The length given.
    pub len: usize,
}

impl SectorCipher {
    /// Expands the key. The key itself can be dropped afterwards.
    pub fn new(key: &VolumeKey) -> Self {
        let (k1, k2) = key.bytes.split_at(KEY_LEN / 2);
        let c1 = Aes256::new_from_slice(k1).unwrap_or_else(|_| unreachable!("32-byte half"));
        let c2 = Aes256::new_from_slice(k2).unwrap_or_else(|_| unreachable!("32-byte half"));
        Self {
            xts: Xts128::new(c1, c2),
        }
    }

    /// Encrypts `buf` in place; its first sector is `first_sector`.
    pub fn encrypt(&self, buf: &mut [u8], first_sector: u64) -> Result<(), SectorAlignError> {
        check_len(buf.len())?;
        self.xts.encrypt_area(
            buf,
            SECTOR_SIZE,
            u128::from(first_sector),
            get_tweak_default,
        );
        Ok(())
    }

    /// Decrypts `buf` in place; its first sector is `first_sector`.
    pub fn decrypt(&self, buf: &mut [u8], first_sector: u64) -> Result<(), SectorAlignError> {
        check_len(buf.len())?;
        self.xts.decrypt_area(
            buf,
            SECTOR_SIZE,
            u128::from(first_sector),
            get_tweak_default,
        );
        Ok(())
    }
}

fn check_len(len: usize) -> Result<(), SectorAlignError> {
    if len.is_multiple_of(SECTOR_SIZE) {
        Ok(())
    } else {
        Err(SectorAlignError { len })
    }
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectorCipher(aes-256-xts, <redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> VolumeKey {
        let mut b = Zeroizing::new([0u8; KEY_LEN]);
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed.wrapping_add(i as u8).wrapping_mul(7);
        }
        VolumeKey::from_bytes(b).unwrap()
    }

    /// IEEE 1619-2007 vector 10 (AES-256, data unit 512 bytes, sector 0xff).
    #[test]
    fn ieee_1619_vector_10() {
        let k1 = hex32("2718281828459045235360287471352662497757247093699959574966967627");
        let k2 = hex32("3141592653589793238462643383279502884197169399375105820974944592");
        let mut kb = Zeroizing::new([0u8; KEY_LEN]);
        kb[..32].copy_from_slice(&k1);
        kb[32..].copy_from_slice(&k2);
        let cipher = SectorCipher::new(&VolumeKey::from_bytes(kb).unwrap());
        let mut buf: Vec<u8> = (0..512).map(|i| i as u8).collect();
        cipher.encrypt(&mut buf, 0xff).unwrap();
        let expect_prefix =
            hex32("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b");
        assert_eq!(&buf[..32], &expect_prefix);
        cipher.decrypt(&mut buf, 0xff).unwrap();
        assert!(buf.iter().enumerate().all(|(i, &b)| b == i as u8));
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn equal_halves_refused() {
        let b = Zeroizing::new([9u8; KEY_LEN]);
        assert!(matches!(
            VolumeKey::from_bytes(b),
            Err(KeyError::EqualHalves)
        ));
    }

    #[test]
    fn read_from_requires_exact_length() {
        let bytes: Vec<u8> = (0..KEY_LEN as u8).collect();
        assert!(VolumeKey::read_from(&mut &bytes[..]).is_ok());
        assert!(matches!(
            VolumeKey::read_from(&mut &bytes[..63]),
            Err(KeyError::Length)
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            VolumeKey::read_from(&mut &long[..]),
            Err(KeyError::Length)
        ));
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = key(1);
        let shown = format!("{k:?} {:?}", SectorCipher::new(&k));
        assert!(shown.contains("redacted"));
        assert!(!shown.contains("7,"));
    }

    #[test]
    fn unaligned_refused() {
        let c = SectorCipher::new(&key(3));
        assert!(c.encrypt(&mut [0u8; 100], 0).is_err());
    }

    proptest! {
        #[test]
        fn roundtrip_and_tweak_matters(sector in 0u64..u64::MAX - 4, seed in any::<u8>(), fill in any::<u8>()) {
            let c = SectorCipher::new(&key(seed));
            let plain = vec![fill; 1024];
            let mut a = plain.clone();
            c.encrypt(&mut a, sector).unwrap();
            prop_assert_ne!(&a, &plain);
            let mut b = plain.clone();
            c.encrypt(&mut b, sector + 1).unwrap();
            prop_assert_ne!(&a[..512], &b[..512]);
            prop_assert_eq!(&a[512..], &b[..512]);
            c.decrypt(&mut a, sector).unwrap();
            prop_assert_eq!(a, plain);
        }
    }
}
