//! Volume keys: 64-byte AES-256-XTS keys held in locked, zeroized memory.
//!
//! [`VolumeKey`] is the one key type of both backends: hostd makes or
//! unwraps it, the QEMU backend turns it into a LUKS passphrase, and the
//! `nitrile vmm` process reads it from its key pipe and encrypts sectors
//! with it. Its bytes live alone on a page of their own
//! ([`nitrile_vmm_sys::Locked`]), which is `mlock`ed (never swapped) and
//! excluded from core dumps (`MADV_DONTDUMP`) for the key's lifetime, and
//! overwritten with zeros before it is unlocked and freed; a key whose page
//! cannot be locked is not made. Keys read from a descriptor go straight
//! into that page. It has no `Display`, `Clone` or serde implementation,
//! and its `Debug` shows no byte of it; the bytes are reached only through
//! [`VolumeKey::expose_secret`].

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};

use nitrile_api::Name;
use nitrile_vmm_sys::{LockError, Locked};
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

/// Length of a volume key: two AES-256 keys for XTS.
pub const VOLUME_KEY_LEN: usize = 64;

/// Why a volume key could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// the key material has the wrong length (from a reader: the bytes it
    /// held before its end)
    #[error("volume key must be {VOLUME_KEY_LEN} bytes, got {0}")]
    BadLength(usize),
    /// the key's source holds more than one key
    #[error("the volume key source holds more than {VOLUME_KEY_LEN} bytes")]
    TooLong,
    /// the page holding the key could not be locked in memory
    #[error("could not mlock the volume key page (check RLIMIT_MEMLOCK)")]
    Mlock(#[source] LockError),
    /// reading the key from its source failed
    #[error("reading the volume key failed")]
    Read(#[source] io::Error),
}

/// A 64-byte AES-256-XTS volume key in locked memory, zeroized on drop.
pub struct VolumeKey {
    bytes: Locked<[u8; VOLUME_KEY_LEN]>,
}

impl VolumeKey {
    /// Copies `bytes` (exactly [`VOLUME_KEY_LEN`]) into a locked page.
    ///
    /// The caller should zeroize its own copy.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != VOLUME_KEY_LEN {
            return Err(KeyError::BadLength(bytes.len()));
        }
        let mut key = Self::locked_zero()?;
        key.bytes.copy_from_slice(bytes);
        Ok(key)
    }

    /// A fresh random key (e.g. for an instance-store volume that is never persisted).
    pub fn generate(rng: &mut impl CryptoRngCore) -> Result<Self, KeyError> {
        let mut key = Self::locked_zero()?;
        rng.fill_bytes(&mut key.bytes[..]);
        Ok(key)
    }

    /// Reads the next [`VOLUME_KEY_LEN`] bytes of `source` straight into a
    /// locked page; fewer before the end of `source` are refused
    /// ([`KeyError::BadLength`]). Whatever follows is left unread.
    pub fn read_next(source: &mut impl Read) -> Result<Self, KeyError> {
        let mut key = Self::locked_zero()?;
        let mut filled = 0;
        while filled < VOLUME_KEY_LEN {
            match source.read(&mut key.bytes[filled..]) {
                Ok(0) => return Err(KeyError::BadLength(filled)),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(KeyError::Read(e)),
            }
        }
        Ok(key)
    }

    /// Reads exactly [`VOLUME_KEY_LEN`] bytes and then the end of `source`
    /// (the process form of the VMM takes its key on an inherited
    /// descriptor); anything else is refused.
    pub fn read_from(source: &mut impl Read) -> Result<Self, KeyError> {
        let key = Self::read_next(source)?;
        let mut extra = [0u8; 1];
        loop {
            match source.read(&mut extra) {
                Ok(0) => return Ok(key),
                Ok(_) => return Err(KeyError::TooLong),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(KeyError::Read(e)),
            }
        }
    }

    /// Reads the key from a descriptor inherited from the parent, then
    /// closes it. See [`VolumeKey::read_from`].
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Result<Self, KeyError> {
        Self::read_from(&mut std::fs::File::from(fd))
    }

    fn locked_zero() -> Result<Self, KeyError> {
        Ok(Self {
            bytes: Locked::new([0u8; VOLUME_KEY_LEN]).map_err(KeyError::Mlock)?,
        })
    }

    /// The raw key bytes, for a backend handing the key to a VMM or a VMM
    /// expanding it into a cipher.
    ///
    /// Never log, print or persist them.
    pub fn expose_secret(&self) -> &[u8; VOLUME_KEY_LEN] {
        &self.bytes
    }

    /// The key as standard base64 text (88 ASCII bytes), zeroized on drop.
    ///
    /// This is the LUKS passphrase the QEMU backend hands to QEMU.
    pub(crate) fn to_base64(&self) -> Zeroizing<String> {
        use base64::Engine as _;
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.expose_secret()))
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey(<redacted>)")
    }
}

/// The keys for a VM's volumes, by volume id.
#[derive(Default)]
pub struct VolumeKeys {
    keys: BTreeMap<Name, VolumeKey>,
}

impl VolumeKeys {
    /// No keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the key of volume `id`, returning the key it replaces, if any.
    pub fn insert(&mut self, id: Name, key: VolumeKey) -> Option<VolumeKey> {
        self.keys.insert(id, key)
    }

    /// The key of volume `id`.
    pub fn get(&self, id: &Name) -> Option<&VolumeKey> {
        self.keys.get(id)
    }

    /// The volume ids that have keys.
    pub fn ids(&self) -> impl Iterator<Item = &Name> {
        self.keys.keys()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl fmt::Debug for VolumeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeKeys")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
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
        let mut keys = VolumeKeys::new();
        keys.insert(Name::new("data").unwrap(), key);
        let shown = format!("{:?} {:?}", keys, keys.get(&Name::new("data").unwrap()));
        assert!(!shown.to_lowercase().contains("ab, ") && !shown.contains("171"));
        assert!(!shown.contains(&"ab".repeat(8)));
        assert!(shown.contains("data") && shown.contains("redacted"));
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
    fn read_from_requires_exact_length() {
        let bytes: Vec<u8> = (0..VOLUME_KEY_LEN as u8).collect();
        let key = VolumeKey::read_from(&mut &bytes[..]).unwrap();
        assert_eq!(&key.expose_secret()[..], &bytes[..]);
        assert!(matches!(
            VolumeKey::read_from(&mut &bytes[..63]),
            Err(KeyError::BadLength(63))
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            VolumeKey::read_from(&mut &long[..]),
            Err(KeyError::TooLong)
        ));
        // One key after another from the same source.
        let two = [bytes.clone(), bytes.iter().map(|b| !b).collect()].concat();
        let mut source = &two[..];
        let a = VolumeKey::read_next(&mut source).unwrap();
        let b = VolumeKey::read_next(&mut source).unwrap();
        assert_eq!(&a.expose_secret()[..], &two[..64]);
        assert_eq!(&b.expose_secret()[..], &two[64..]);
        assert!(matches!(
            VolumeKey::read_next(&mut source),
            Err(KeyError::BadLength(0))
        ));
    }

    #[test]
    fn key_from_inherited_pipe_fd() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let bytes: Vec<u8> = (0..VOLUME_KEY_LEN as u8).map(|b| b ^ 0x5a).collect();
        std::io::Write::write_all(&mut writer, &bytes).unwrap();
        drop(writer);
        let key = VolumeKey::from_fd(reader.into()).unwrap();
        assert_eq!(&key.expose_secret()[..], &bytes[..]);
    }

    #[test]
    fn base64_passphrase_is_88_ascii_bytes() {
        let key = VolumeKey::from_bytes(&[7u8; VOLUME_KEY_LEN]).unwrap();
        let p = key.to_base64();
        assert_eq!(p.len(), 88);
        assert!(p.is_ascii());
    }
}
