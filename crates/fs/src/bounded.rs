//! Reading a whole file, at most a bound.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use zeroize::Zeroizing;

use crate::{FsError, Step};

/// The whole of `path`, at most `max` bytes: a larger file is refused with
/// [`FsError::TooLarge`] (not truncated), a missing one is
/// [`FsError::Missing`]. At most `max + 1` bytes are read whatever the
/// file's size.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, FsError> {
    let file = open(path)?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(FsError::io(Step::Read, path))?;
    check_len(path, bytes.len(), max)?;
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text; other bytes are [`FsError::NotText`].
pub fn read_bounded_to_string(path: &Path, max: u64) -> Result<String, FsError> {
    String::from_utf8(read_bounded(path, max)?).map_err(|e| FsError::NotText {
        path: path.to_owned(),
        error: e.utf8_error(),
    })
}

/// [`read_bounded`] for a secret (a key file): the bytes are read into one
/// buffer of `max + 1` bytes that never grows, so no copy is left in freed
/// memory, and the buffer is zeroized when dropped (on every error too).
pub fn read_secret(path: &Path, max: u64) -> Result<Zeroizing<Vec<u8>>, FsError> {
    let mut file = open(path)?;
    let cap = usize::try_from(max.saturating_add(1)).unwrap_or(usize::MAX);
    let mut buf = Zeroizing::new(vec![0u8; cap]);
    let mut len = 0;
    while len < cap {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FsError::io(Step::Read, path)(e)),
        }
    }
    check_len(path, len, max)?;
    buf.truncate(len);
    Ok(buf)
}

/// [`read_secret`] as UTF-8 text, zeroized when dropped; other bytes are
/// [`FsError::NotText`].
pub fn read_secret_to_string(path: &Path, max: u64) -> Result<Zeroizing<String>, FsError> {
    let mut bytes = read_secret(path, max)?;
    if let Err(error) = std::str::from_utf8(&bytes) {
        return Err(FsError::NotText {
            path: path.to_owned(),
            error,
        });
    }
    // Moves the buffer, copies nothing.
    let text = String::from_utf8(std::mem::take(&mut *bytes))
        .unwrap_or_else(|_| unreachable!("checked to be UTF-8 just above"));
    Ok(Zeroizing::new(text))
}

fn open(path: &Path) -> Result<File, FsError> {
    File::open(path).map_err(|error| {
        if error.kind() == io::ErrorKind::NotFound {
            FsError::Missing {
                path: path.to_owned(),
                error,
            }
        } else {
            FsError::io(Step::Open, path)(error)
        }
    })
}

fn check_len(path: &Path, len: usize, max: u64) -> Result<(), FsError> {
    if len as u64 > max {
        return Err(FsError::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    Ok(())
}
