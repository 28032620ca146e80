//! Atomic file writes with explicit permissions, and the key file check.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::PkiError;

/// Mode of private key files.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
pub(crate) const CERT_MODE: u32 = 0o644;

/// Writes `bytes` to `path` with [`nitrile_fs::write_atomic`]: a uniquely
/// named temporary file in the same directory created with exactly `mode`,
/// fsync, rename over `path`, fsync of the directory. Readers see the old
/// content or the new one, never a mix, and a key is never readable by
/// others, not even briefly.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    nitrile_fs::write_atomic(path, bytes, mode).map_err(|e| PkiError::io(path, e.into()))
}

/// Refuses a key file that group or others can access.
pub(crate) fn check_key_mode(path: &Path) -> Result<(), PkiError> {
    let meta = fs::metadata(path).map_err(|e| PkiError::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::KeyFileTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_private_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        atomic_write(&p, b"one", KEY_MODE).unwrap();
        atomic_write(&p, b"two", KEY_MODE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        check_key_mode(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            check_key_mode(&p),
            Err(PkiError::KeyFileTooOpen { mode: 0o640, .. })
        ));
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
