//! Per-sector AES-256-XTS for volumes: the cipher that encrypts every
//! 512-byte sector under a [`VolumeKey`] with its sector number as the
//! tweak (little endian, IEEE 1619 / `dm-crypt` `aes-xts-plain64`).
//!
//! The key type is `nitrile_vmm`'s, the one of both backends (locked,
//! zeroized, never printed); what XTS adds is checked here: a key whose two
//! halves are equal makes no cipher.

use aes::Aes256;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use nitrile_vmm::{VOLUME_KEY_LEN, VolumeKey};
use zeroize::Zeroize;

/// Bytes in a sector, the unit of encryption.
pub const SECTOR_SIZE: usize = 512;

/// Why a volume key cannot be an XTS key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XtsKeyError {
    /// The two halves of the key are equal, which XTS forbids.
    #[error("the two halves of an XTS key must differ")]
    EqualHalves,
}

/// AES-256-XTS over whole sectors (IEEE 1619: data key first, tweak key
/// second, tweak = sector number as a 128-bit little-endian integer). The
/// blocks of a sector go through AES as one batch, so AES-NI can pipeline
/// them. The expanded key schedules are zeroized on drop (the `aes` crate's
/// `zeroize` feature); per-sector tweaks are wiped after use.
pub struct SectorCipher {
    data: Aes256,
    tweak: Aes256,
}

/// A buffer that is not a whole number of sectors.
#[derive(Debug, thiserror::Error)]
#[error("buffer of {len} bytes is not a whole number of {SECTOR_SIZE}-byte sectors")]
pub struct SectorAlignError {
    /// The length given.
    pub len: usize,
}

const BLOCKS: usize = SECTOR_SIZE / 16;
type Block = GenericArray<u8, aes::cipher::consts::U16>;

impl SectorCipher {
    /// Expands the key; refuses one whose halves are equal. The key itself
    /// can be dropped afterwards.
    pub fn new(key: &VolumeKey) -> Result<Self, XtsKeyError> {
        let (k1, k2) = key.expose_secret().split_at(VOLUME_KEY_LEN / 2);
        if k1 == k2 {
            return Err(XtsKeyError::EqualHalves);
        }
        let data = Aes256::new_from_slice(k1).unwrap_or_else(|_| unreachable!("32-byte half"));
        let tweak = Aes256::new_from_slice(k2).unwrap_or_else(|_| unreachable!("32-byte half"));
        Ok(Self { data, tweak })
    }

    /// Encrypts `buf` in place; its first sector is `first_sector`.
    pub fn encrypt(&self, buf: &mut [u8], first_sector: u64) -> Result<(), SectorAlignError> {
        self.apply(buf, first_sector, true)
    }

    /// Decrypts `buf` in place; its first sector is `first_sector`.
    pub fn decrypt(&self, buf: &mut [u8], first_sector: u64) -> Result<(), SectorAlignError> {
        self.apply(buf, first_sector, false)
    }

    fn apply(
        &self,
        buf: &mut [u8],
        first_sector: u64,
        encrypt: bool,
    ) -> Result<(), SectorAlignError> {
        check_len(buf.len())?;
        let mut tweaks = [0u128; BLOCKS];
        let mut blocks = [Block::default(); BLOCKS];
        for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            let number = u128::from(first_sector) + i as u128;
            let mut t = Block::from(number.to_le_bytes());
            self.tweak.encrypt_block(&mut t);
            let mut t = u128::from_le_bytes(t.into());
            for tweak in tweaks.iter_mut() {
                *tweak = t;
                // Multiply by alpha in GF(2^128), little-endian convention.
                t = (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 };
            }
            for ((block, bytes), tweak) in
                blocks.iter_mut().zip(sector.chunks_exact(16)).zip(&tweaks)
            {
                let x = u128::from_le_bytes(bytes.try_into().unwrap_or([0; 16])) ^ tweak;
                *block = Block::from(x.to_le_bytes());
            }
            if encrypt {
                self.data.encrypt_blocks(&mut blocks);
            } else {
                self.data.decrypt_blocks(&mut blocks);
            }
            for ((block, bytes), tweak) in
                blocks.iter().zip(sector.chunks_exact_mut(16)).zip(&tweaks)
            {
                let x = u128::from_le_bytes((*block).into()) ^ tweak;
                bytes.copy_from_slice(&x.to_le_bytes());
            }
            t.zeroize();
        }
        tweaks.zeroize();
        for b in blocks.iter_mut() {
            b.as_mut_slice().zeroize();
        }
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
    use zeroize::Zeroizing;

    fn key(seed: u8) -> VolumeKey {
        let mut b = Zeroizing::new([0u8; VOLUME_KEY_LEN]);
        for (i, x) in b.iter_mut().enumerate() {
            *x = seed.wrapping_add(i as u8).wrapping_mul(7);
        }
        VolumeKey::from_bytes(&b[..]).unwrap()
    }

    fn cipher(bytes: &[u8]) -> SectorCipher {
        SectorCipher::new(&VolumeKey::from_bytes(bytes).unwrap()).unwrap()
    }

    /// IEEE 1619-2007 vector 10 (AES-256, data unit 512 bytes, sector 0xff).
    #[test]
    fn ieee_1619_vector_10() {
        let k1 = hex32("2718281828459045235360287471352662497757247093699959574966967627");
        let k2 = hex32("3141592653589793238462643383279502884197169399375105820974944592");
        let mut kb = Zeroizing::new([0u8; VOLUME_KEY_LEN]);
        kb[..32].copy_from_slice(&k1);
        kb[32..].copy_from_slice(&k2);
        let cipher = cipher(&kb[..]);
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
        let key = VolumeKey::from_bytes(&[9u8; VOLUME_KEY_LEN]).unwrap();
        assert!(matches!(
            SectorCipher::new(&key),
            Err(XtsKeyError::EqualHalves)
        ));
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = key(1);
        let shown = format!("{k:?} {:?}", SectorCipher::new(&k).unwrap());
        assert!(shown.contains("redacted"));
        assert!(!shown.contains("7,"));
    }

    #[test]
    fn unaligned_refused() {
        let c = SectorCipher::new(&key(3)).unwrap();
        assert!(c.encrypt(&mut [0u8; 100], 0).is_err());
    }

    proptest! {
        /// Agrees with the independent `xts-mode` implementation.
        #[test]
        fn matches_xts_mode_crate(kb in proptest::collection::vec(any::<u8>(), VOLUME_KEY_LEN), sector in any::<u64>(), sectors in 1usize..4, fill in any::<u8>()) {
            prop_assume!(kb[..32] != kb[32..]);
            let ours = cipher(&kb);
            let oracle = xts_mode::Xts128::new(
                Aes256::new_from_slice(&kb[..32]).unwrap(),
                Aes256::new_from_slice(&kb[32..]).unwrap(),
            );
            let plain: Vec<u8> = (0..sectors * SECTOR_SIZE).map(|i| fill.wrapping_add(i as u8)).collect();
            let mut a = plain.clone();
            let mut b = plain.clone();
            ours.encrypt(&mut a, sector).unwrap();
            oracle.encrypt_area(&mut b, SECTOR_SIZE, u128::from(sector), xts_mode::get_tweak_default);
            prop_assert_eq!(&a, &b);
            ours.decrypt(&mut a, sector).unwrap();
            prop_assert_eq!(a, plain);
        }

        #[test]
        fn roundtrip_and_tweak_matters(sector in 0u64..u64::MAX - 4, seed in any::<u8>(), fill in any::<u8>()) {
            let c = SectorCipher::new(&key(seed)).unwrap();
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
