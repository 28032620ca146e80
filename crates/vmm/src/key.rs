//! Volume keys: 64-byte AES-256-XTS keys held in locked, zeroized memory.
//!
//! A [`VolumeKey`] lives alone on its own page, which is `mlock`ed (never
//! swapped) and excluded from core dumps (`MADV_DONTDUMP`) for the key's
//! lifetime, and overwritten with zeros before it is unlocked and freed. It has
//! no `Debug`, `Display`, `Clone` or serde implementation that could leak it;
//! the bytes are reached only through [`VolumeKey::expose_secret`].

use std::collections::BTreeMap;
use std::fmt;
use std::io;

use nitrile_api::Name;
use rand_core::CryptoRngCore;
use zeroize::{Zeroize, Zeroizing};

/// Length of a volume key: two AES-256 keys for XTS.
pub const VOLUME_KEY_LEN: usize = 64;

const PAGE: usize = 4096;

/// Why a volume key could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// the key material has the wrong length
    #[error("volume key must be {VOLUME_KEY_LEN} bytes, got {0}")]
    BadLength(usize),
    /// the page holding the key could not be locked in memory
    #[error("could not mlock the volume key page (check RLIMIT_MEMLOCK)")]
    Mlock(#[source] io::Error),
}

// One key per page, so that unlocking one key's page never unlocks another's.
#[repr(C, align(4096))]
struct KeyPage([u8; PAGE]);

/// A 64-byte AES-256-XTS volume key in locked memory, zeroized on drop.
pub struct VolumeKey {
    page: Box<KeyPage>,
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
        key.page.0[..VOLUME_KEY_LEN].copy_from_slice(bytes);
        Ok(key)
    }

    /// A fresh random key (e.g. for an instance-store volume that is never persisted).
    pub fn generate(rng: &mut impl CryptoRngCore) -> Result<Self, KeyError> {
        let mut key = Self::locked_zero()?;
        rng.fill_bytes(&mut key.page.0[..VOLUME_KEY_LEN]);
        Ok(key)
    }

    fn locked_zero() -> Result<Self, KeyError> {
        let page = Box::new(KeyPage([0u8; PAGE]));
        let ptr = page.0.as_ptr().cast::<libc::c_void>();
        // SAFETY: `ptr` points to the start of a live, page-aligned allocation
        // of exactly PAGE bytes owned by `page`; mlock only changes whether
        // those pages may be swapped and does not touch their contents.
        let rc = unsafe { libc::mlock(ptr, PAGE) };
        if rc != 0 {
            return Err(KeyError::Mlock(io::Error::last_os_error()));
        }
        // SAFETY: same allocation as above; MADV_DONTDUMP only removes the
        // range from core dumps. Failure is harmless (the process is also
        // non-dumpable), so its result is ignored.
        unsafe {
            libc::madvise(ptr.cast_mut(), PAGE, libc::MADV_DONTDUMP);
        }
        Ok(Self { page })
    }

    /// The raw key bytes, for a backend handing the key to a VMM.
    ///
    /// Never log, print or persist them.
    pub fn expose_secret(&self) -> &[u8; VOLUME_KEY_LEN] {
        self.page.0[..VOLUME_KEY_LEN]
            .try_into()
            .unwrap_or_else(|_| unreachable!("the key page holds at least VOLUME_KEY_LEN bytes"))
    }

    /// The key as standard base64 text (88 ASCII bytes), zeroized on drop.
    ///
    /// This is the LUKS passphrase the QEMU backend hands to QEMU.
    pub(crate) fn to_base64(&self) -> Zeroizing<String> {
        use base64::Engine as _;
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.expose_secret()))
    }
}

impl Drop for VolumeKey {
    fn drop(&mut self) {
        self.page.0.zeroize();
        let ptr = self.page.0.as_ptr().cast::<libc::c_void>();
        // SAFETY: the page is still owned by `self.page` (freed only after
        // this function returns) and was locked in `locked_zero`.
        unsafe {
            libc::munlock(ptr, PAGE);
        }
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
        assert_eq!(addr % PAGE, 0);
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
    fn base64_passphrase_is_88_ascii_bytes() {
        let key = VolumeKey::from_bytes(&[7u8; VOLUME_KEY_LEN]).unwrap();
        let p = key.to_base64();
        assert_eq!(p.len(), 88);
        assert!(p.is_ascii());
    }
}
