//! Atomic file writes with explicit permissions.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::PkiError;

/// Mode of private key files.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
pub(crate) const CERT_MODE: u32 = 0o644;

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory created with `mode`, fsync, rename over `path`, fsync of the
/// directory. Readers see the old content or the new one, never a mix, and a
/// key is never readable by others, not even briefly.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| {
            PkiError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
            )
        })?
        .to_string_lossy()
        .into_owned();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{n}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| PkiError::io(&tmp, e))?;
        // The umask may have removed bits; set exactly what was asked.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| PkiError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| PkiError::io(&tmp, e))?;
        f.sync_all().map_err(|e| PkiError::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| PkiError::io(path, e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| PkiError::io(dir, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
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
