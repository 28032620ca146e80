//! Atomic, durable replacement of a file.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{FsError, Step};

/// Longest part of the target's name kept in a temporary file's name, so
/// that `.<name>.tmp-<pid>-<n>` stays within the 255 bytes of a file name.
const MAX_NAME_IN_TEMP: usize = 200;

/// How many taken temporary names (left by a process that died, whose pid
/// came round again) are skipped before giving up.
const MAX_TEMP_ATTEMPTS: u32 = 64;

/// Counts the temporary files of this process: with the pid, it makes
/// every temporary name unique.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `bytes`, atomically and durably: a temporary file
/// in the same directory created with exactly `mode` (whatever the umask),
/// written, fsynced, renamed over `path`, and the directory fsynced. On
/// failure `path` is as it was and the temporary file is removed. The
/// directory must exist.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FsError> {
    let (dir, name) = split(path)?;
    let mut file = AtomicFile::create_in(dir, name, mode)?;
    file.write_all(bytes)
        .map_err(FsError::io(Step::Write, file.temp_path()))?;
    file.commit(path)
}

/// Fsyncs the directory `dir`, making the renames and creations in it
/// durable.
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(FsError::io(Step::SyncDir, dir))
}

/// A file being written under a temporary name, to replace its target
/// whole by [`AtomicFile::commit`]. Dropped without a commit, it removes its
/// temporary file.
#[derive(Debug)]
pub struct AtomicFile {
    file: File,
    temp: PathBuf,
    dir: PathBuf,
    committed: bool,
}

impl AtomicFile {
    /// A new, empty temporary file in `dir` (`.<name>.tmp-<pid>-<n>`, or
    /// `.tmp-<pid>-<n>` for an empty `name`), created exclusively with
    /// exactly `mode`. `dir` must be where the target will be.
    pub fn create_in(dir: &Path, name: &OsStr, mode: u32) -> Result<Self, FsError> {
        create_temp(dir, name, mode, &TEMP_COUNTER)
    }

    /// The temporary file's path.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Sets the temporary file's mode exactly, e.g. read-only before a
    /// content-addressed file is committed.
    pub fn set_mode(&self, mode: u32) -> Result<(), FsError> {
        self.file
            .set_permissions(Permissions::from_mode(mode))
            .map_err(FsError::io(Step::SetMode, &self.temp))
    }

    /// Fsyncs the file, renames it over `target` (which must be in the
    /// temporary file's directory) and fsyncs the directory: when this
    /// returns `Ok`, `target` has the new content durably.
    pub fn commit(self, target: &Path) -> Result<(), FsError> {
        let dir = self.rename_over(target)?;
        sync_dir(&dir)
    }

    /// Like [`AtomicFile::commit`] but without the fsync of the directory:
    /// `target` is whole at once, but the rename is durable only after the
    /// caller's own [`sync_dir`] of the returned directory. For a store that
    /// fsyncs each directory once for many files.
    pub fn commit_unsynced_dir(self, target: &Path) -> Result<PathBuf, FsError> {
        self.rename_over(target)
    }

    fn rename_over(mut self, target: &Path) -> Result<PathBuf, FsError> {
        let (dir, _) = split(target)?;
        if dir != self.dir {
            return Err(FsError::OtherDirectory {
                path: target.to_owned(),
                dir: self.dir.clone(),
            });
        }
        self.file
            .sync_all()
            .map_err(FsError::io(Step::SyncFile, &self.temp))?;
        fs::rename(&self.temp, target).map_err(FsError::io(Step::Rename, target))?;
        self.committed = true;
        Ok(std::mem::take(&mut self.dir))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// The directory of `path` (`.` for a bare name) and its file name.
fn split(path: &Path) -> Result<(&Path, &OsStr), FsError> {
    let name = path.file_name().ok_or_else(|| FsError::NotAFile {
        path: path.to_owned(),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Ok((dir, name))
}

fn temp_name(name: &OsStr, pid: u32, n: u64) -> OsString {
    let kept = &name.as_bytes()[..name.len().min(MAX_NAME_IN_TEMP)];
    let mut out = Vec::with_capacity(kept.len() + 40);
    out.push(b'.');
    if !kept.is_empty() {
        out.extend_from_slice(kept);
        out.push(b'.');
    }
    out.extend_from_slice(format!("tmp-{pid}-{n}").as_bytes());
    OsString::from_vec(out)
}

fn create_temp(
    dir: &Path,
    name: &OsStr,
    mode: u32,
    counter: &AtomicU64,
) -> Result<AtomicFile, FsError> {
    let pid = std::process::id();
    let mut attempts = 0;
    loop {
        let temp = dir.join(temp_name(
            name,
            pid,
            counter.fetch_add(1, Ordering::Relaxed),
        ));
        // create_new: O_CREAT|O_EXCL, which never follows a symbolic link
        // nor opens a file someone else made.
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
        {
            Ok(file) => {
                let file = AtomicFile {
                    file,
                    temp,
                    dir: dir.to_owned(),
                    committed: false,
                };
                // The umask may have removed bits: set exactly what was asked.
                file.set_mode(mode)?;
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < MAX_TEMP_ATTEMPTS => {
                attempts += 1;
            }
            Err(e) => return Err(FsError::io(Step::CreateTemp, &temp)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_hidden_unique_and_fit_a_file_name() {
        assert_eq!(temp_name(OsStr::new("a.json"), 7, 3), ".a.json.tmp-7-3");
        assert_eq!(temp_name(OsStr::new(""), 7, 3), ".tmp-7-3");
        assert_ne!(
            temp_name(OsStr::new("a"), 7, 3),
            temp_name(OsStr::new("a"), 7, 4)
        );
        assert_ne!(
            temp_name(OsStr::new("a"), 7, 3),
            temp_name(OsStr::new("a"), 8, 3)
        );
        let long = "x".repeat(255);
        let t = temp_name(OsStr::new(&long), u32::MAX, u64::MAX);
        assert!(t.len() <= 255, "{}", t.len());
        // Not valid UTF-8: kept as bytes, not replaced.
        let odd = OsStr::from_bytes(b"k\xff");
        assert_eq!(temp_name(odd, 1, 0).as_bytes(), b".k\xff.tmp-1-0");
    }

    #[test]
    fn taken_temporary_names_are_skipped_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let pid = std::process::id();
        for n in 0..3 {
            let stale = dir.path().join(temp_name(OsStr::new("f"), pid, n));
            fs::write(&stale, b"stale").unwrap();
        }
        let counter = AtomicU64::new(0);
        let mut f = create_temp(dir.path(), OsStr::new("f"), 0o600, &counter).unwrap();
        assert_eq!(
            f.temp_path(),
            dir.path().join(temp_name(OsStr::new("f"), pid, 3))
        );
        f.write_all(b"new").unwrap();
        f.commit(&dir.path().join("f")).unwrap();
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"new");
        for n in 0..3 {
            let stale = dir.path().join(temp_name(OsStr::new("f"), pid, n));
            assert_eq!(fs::read(stale).unwrap(), b"stale");
        }
    }

    #[test]
    fn a_directory_full_of_taken_names_is_an_error_not_a_loop() {
        let dir = tempfile::tempdir().unwrap();
        let pid = std::process::id();
        for n in 0..=u64::from(MAX_TEMP_ATTEMPTS) {
            fs::write(dir.path().join(temp_name(OsStr::new("f"), pid, n)), b"").unwrap();
        }
        let counter = AtomicU64::new(0);
        let e = create_temp(dir.path(), OsStr::new("f"), 0o600, &counter).unwrap_err();
        assert!(
            matches!(&e, FsError::Io { step: Step::CreateTemp, error, .. }
                if error.kind() == io::ErrorKind::AlreadyExists),
            "{e:?}"
        );
    }

    #[test]
    fn a_bare_name_is_in_the_current_directory_and_a_root_is_no_file() {
        assert_eq!(
            split(Path::new("f")).unwrap(),
            (Path::new("."), OsStr::new("f"))
        );
        assert_eq!(
            split(Path::new("/a/b/f")).unwrap(),
            (Path::new("/a/b"), OsStr::new("f"))
        );
        for bad in ["/", "", "a/.."] {
            assert!(
                matches!(split(Path::new(bad)), Err(FsError::NotAFile { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_commit_outside_the_temporary_files_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let f = AtomicFile::create_in(dir.path(), OsStr::new("f"), 0o600).unwrap();
        let temp = f.temp_path().to_owned();
        let e = f.commit(&other.path().join("f")).unwrap_err();
        assert!(matches!(e, FsError::OtherDirectory { .. }), "{e:?}");
        assert!(!temp.exists(), "the refused temporary file is removed");
        assert!(!other.path().join("f").exists());
    }
}
