//! The highest bundle a service has loaded, kept durably in the service's
//! own state, so that an older bundle is never loaded again however valid
//! its signatures are.
//!
//! Reviewers' signatures say that a bundle was reviewed, not that it is
//! the latest: a bundle that was once in force keeps valid signatures after
//! a later bundle revoked something. The serial in `bundle.toml` (covered by
//! the signatures) orders bundles, and [`SerialStore`] remembers the highest
//! serial loaded and its digest in one small file (`bundle-serial.json`,
//! written atomically: temporary file, fsync, rename, fsync of the
//! directory). [`SerialStore::check`] refuses a lower serial, and the same
//! serial with another digest (a changed bundle must raise its serial).
//!
//! What it cannot do: whoever can write the service's state directory can
//! delete or lower this file, after which an older bundle loads again. The
//! service journals the serial and digest in force at every start, so such
//! a rollback is on the record even then.

use std::path::{Path, PathBuf};

use nitrile_fs::FsError;

use crate::manifest::BundleVersion;

/// The file, in a service's state directory, holding the highest bundle it
/// has loaded.
pub const SERIAL_FILE: &str = "bundle-serial.json";

/// Largest serial file read (it holds one serial and one digest).
pub const MAX_SERIAL_FILE_LEN: u64 = 1024;

/// Why a bundle may not be loaded here, or the serial file is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SerialError {
    /// reading or writing the serial file failed
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the serial file is not one this crate wrote; nothing is loaded until
    /// it is fixed or removed by whoever knows why
    #[error(
        "{} is not a bundle serial record (larger than {MAX_SERIAL_FILE_LEN} bytes or not \
         {{\"serial\": N, \"digest\": HEX}})",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's error, when it parsed at all.
        #[source]
        source: Option<serde_json::Error>,
    },
    /// the bundle is older than one already loaded: a rollback
    #[error(
        "entitlement bundle serial {} is older than serial {} already loaded here \
         (digest {}); an older bundle is never loaded again, even with valid signatures: \
         have a bundle with a serial above {} signed",
        loaded.serial,
        recorded.serial,
        recorded.digest,
        recorded.serial
    )]
    Rollback {
        /// The bundle offered.
        loaded: BundleVersion,
        /// The highest bundle loaded before.
        recorded: BundleVersion,
    },
    /// the bundle has the serial of one already loaded but other content
    #[error(
        "entitlement bundle serial {} has digest {}, but serial {} was already loaded here \
         with digest {}; a changed bundle needs a higher serial: raise it in bundle.toml and \
         have the bundle signed again",
        loaded.serial,
        loaded.digest,
        recorded.serial,
        recorded.digest
    )]
    SerialReused {
        /// The bundle offered.
        loaded: BundleVersion,
        /// The bundle loaded before with the same serial.
        recorded: BundleVersion,
    },
}

/// A bundle that [`SerialStore::check`] found not older than any loaded
/// before; [`SerialStore::record`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a checked bundle must be recorded"]
pub struct BundleAdvance {
    current: BundleVersion,
    recorded: Option<BundleVersion>,
}

impl BundleAdvance {
    /// The bundle checked, to be in force.
    pub fn current(&self) -> BundleVersion {
        self.current
    }

    /// The bundle in force before, when this one replaces it (a higher
    /// serial); `None` when it is the same bundle or the first one.
    pub fn previous(&self) -> Option<BundleVersion> {
        self.recorded.filter(|r| *r != self.current)
    }

    /// Whether no bundle was recorded before.
    pub fn is_first(&self) -> bool {
        self.recorded.is_none()
    }

    /// Whether this changes what is recorded.
    pub fn changes_record(&self) -> bool {
        self.recorded != Some(self.current)
    }
}

/// The highest bundle (serial and digest) a service has loaded.
#[derive(Debug)]
pub struct SerialStore {
    path: PathBuf,
    recorded: Option<BundleVersion>,
}

impl SerialStore {
    /// Reads the record at `path` (normally `<state>/`[`SERIAL_FILE`]);
    /// none yet if the file does not exist. A file that exists but is not a
    /// record is an error: the store fails closed.
    pub fn open(path: &Path) -> Result<Self, SerialError> {
        let io = |source| SerialError::Io {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |source| SerialError::Corrupt {
            path: path.to_path_buf(),
            source,
        };
        let recorded = match nitrile_fs::read_bounded(path, MAX_SERIAL_FILE_LEN) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| corrupt(Some(e)))?),
            Err(FsError::Missing { .. }) => None,
            Err(FsError::TooLarge { .. }) => return Err(corrupt(None)),
            Err(e) => return Err(io(e.into())),
        };
        Ok(Self {
            path: path.to_path_buf(),
            recorded,
        })
    }

    /// The highest bundle loaded so far, if any.
    pub fn recorded(&self) -> Option<BundleVersion> {
        self.recorded
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `loaded` may be loaded: refused when its serial is below the
    /// recorded one ([`SerialError::Rollback`]) or equal to it with another
    /// digest ([`SerialError::SerialReused`]). Writes nothing.
    pub fn check(&self, loaded: BundleVersion) -> Result<BundleAdvance, SerialError> {
        if let Some(recorded) = self.recorded {
            if loaded.serial < recorded.serial {
                return Err(SerialError::Rollback { loaded, recorded });
            }
            if loaded.serial == recorded.serial && loaded.digest != recorded.digest {
                return Err(SerialError::SerialReused { loaded, recorded });
            }
        }
        Ok(BundleAdvance {
            current: loaded,
            recorded: self.recorded,
        })
    }

    /// Makes `advance` the recorded bundle, durably, before returning (the
    /// file is rewritten only when it changes). Checked again against the
    /// record as it is now.
    pub fn record(&mut self, advance: &BundleAdvance) -> Result<(), SerialError> {
        let again = self.check(advance.current)?;
        if !again.changes_record() {
            return Ok(());
        }
        let mut bytes = serde_json::to_vec(&advance.current)
            .unwrap_or_else(|_| unreachable!("a serial and a digest serialize"));
        bytes.push(b'\n');
        nitrile_fs::write_atomic(&self.path, &bytes, 0o600).map_err(|e| SerialError::Io {
            path: self.path.clone(),
            source: e.into(),
        })?;
        self.recorded = Some(advance.current);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::bundle::BundleDigest;
    use crate::manifest::BundleSerial;

    fn v(serial: u64, d: u8) -> BundleVersion {
        BundleVersion {
            serial: BundleSerial::new(serial).unwrap(),
            digest: BundleDigest([d; 32]),
        }
    }

    #[test]
    fn serials_only_go_up_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SERIAL_FILE);
        let mut store = SerialStore::open(&path).unwrap();
        assert_eq!(store.recorded(), None);
        let first = store.check(v(1, 1)).unwrap();
        assert!(first.is_first() && first.previous().is_none());
        store.record(&first).unwrap();

        let mut store = SerialStore::open(&path).unwrap();
        assert_eq!(store.recorded(), Some(v(1, 1)));
        // The same bundle again: nothing changes.
        let same = store.check(v(1, 1)).unwrap();
        assert!(!same.changes_record() && same.previous().is_none());
        // A newer one names the one it replaces.
        let newer = store.check(v(3, 2)).unwrap();
        assert_eq!(newer.previous(), Some(v(1, 1)));
        store.record(&newer).unwrap();

        let store = SerialStore::open(&path).unwrap();
        assert_eq!(store.recorded(), Some(v(3, 2)));
        let e = store.check(v(1, 1)).unwrap_err();
        assert!(matches!(e, SerialError::Rollback { .. }), "{e}");
        let s = e.to_string();
        assert!(s.contains("serial 1 is older than serial 3"), "{s}");
        let e = store.check(v(3, 9)).unwrap_err();
        assert!(matches!(e, SerialError::SerialReused { .. }), "{e}");
        assert!(e.to_string().contains("raise it in bundle.toml"), "{e}");
        // Owner-only.
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
    }

    #[test]
    fn a_stale_check_is_refused_when_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SERIAL_FILE);
        let mut store = SerialStore::open(&path).unwrap();
        let old = store.check(v(1, 1)).unwrap();
        let new = store.check(v(2, 2)).unwrap();
        store.record(&new).unwrap();
        assert!(matches!(
            store.record(&old),
            Err(SerialError::Rollback { .. })
        ));
        assert_eq!(SerialStore::open(&path).unwrap().recorded(), Some(v(2, 2)));
    }

    #[test]
    fn a_damaged_record_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SERIAL_FILE);
        for bad in [
            &b"not json"[..],
            br#"{"serial":0,"digest":"00"}"#,
            br#"{"serial":2}"#,
            &[b' '; 2048][..],
        ] {
            fs::write(&path, bad).unwrap();
            let e = SerialStore::open(&path).unwrap_err();
            assert!(matches!(e, SerialError::Corrupt { .. }), "{e}");
        }
    }
}
