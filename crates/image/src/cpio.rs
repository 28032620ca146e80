//! A reproducible cpio archive in the "newc" format (`070701`), the format
//! the kernel unpacks into its initial root filesystem.
//!
//! [`Archive`] holds entries by path; [`Archive::to_bytes`] writes them
//! sorted by path with fixed metadata (mtime 0, uid and gid 0, inode
//! numbers counted from 1 in that order), so the same entries always give
//! the same bytes. [`parse`] reads such an archive back (bounded by
//! [`MAX_ENTRIES`] and the input's length), for checks of what an image
//! holds.

use std::collections::BTreeMap;

/// The magic of a newc header.
const MAGIC: &[u8; 6] = b"070701";
/// A newc header: the magic and 13 fields of 8 hex digits.
const HEADER_LEN: usize = 110;
/// The name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";

/// Most entries [`parse`] reads.
pub const MAX_ENTRIES: usize = 100_000;

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file and its contents.
    File(Vec<u8>),
    /// A symbolic link and its target.
    Symlink(String),
    /// A character device (major, minor).
    CharDevice(u32, u32),
}

/// One entry: what it is and its permission bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits (`0o7777` at most).
    pub perm: u32,
}

impl Entry {
    fn mode(&self) -> u32 {
        let kind = match self.kind {
            EntryKind::Dir => S_IFDIR,
            EntryKind::File(_) => S_IFREG,
            EntryKind::Symlink(_) => S_IFLNK,
            EntryKind::CharDevice(..) => S_IFCHR,
        };
        kind | (self.perm & 0o7777)
    }

    /// The entry's size in the archive's data (file contents, link target).
    pub fn size(&self) -> usize {
        match &self.kind {
            EntryKind::File(data) => data.len(),
            EntryKind::Symlink(target) => target.len(),
            EntryKind::Dir | EntryKind::CharDevice(..) => 0,
        }
    }
}

/// Why an archive could not be built or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CpioError {
    /// misuse: a path is empty, absolute, has `.`/`..` components or a NUL
    #[error("invalid archive path {0:?}")]
    Path(String),
    /// misuse: a path is added twice
    #[error("{0:?} is in the archive twice")]
    Duplicate(String),
    /// misuse: a path's parent directory is not in the archive
    #[error("the parent directory of {0:?} is not in the archive")]
    NoParent(String),
    /// bad input: the bytes are not a newc archive
    #[error("not a newc cpio archive at offset {0}")]
    Malformed(usize),
    /// bad input: more than [`MAX_ENTRIES`] entries
    #[error("more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    /// a file is larger than the format's 32-bit size field
    #[error("{0:?} is larger than 4 GiB")]
    TooLarge(String),
}

/// Entries by path (relative, without a leading `/`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

fn check_path(path: &str) -> Result<(), CpioError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.ends_with('/')
        || path.contains('\0')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(CpioError::Path(path.to_owned()))
    } else {
        Ok(())
    }
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `entry` at `path` (e.g. `usr/bin/nitrile`); its parent
    /// directory must have been added before.
    pub fn add(&mut self, path: &str, entry: Entry) -> Result<(), CpioError> {
        check_path(path)?;
        if let Some((parent, _)) = path.rsplit_once('/')
            && !matches!(
                self.entries.get(parent),
                Some(Entry {
                    kind: EntryKind::Dir,
                    ..
                })
            )
        {
            return Err(CpioError::NoParent(path.to_owned()));
        }
        if u32::try_from(entry.size()).is_err() {
            return Err(CpioError::TooLarge(path.to_owned()));
        }
        if self.entries.contains_key(path) {
            return Err(CpioError::Duplicate(path.to_owned()));
        }
        self.entries.insert(path.to_owned(), entry);
        Ok(())
    }

    /// Adds directory `path` and every missing parent of it (mode 0755).
    pub fn add_dirs(&mut self, path: &str) -> Result<(), CpioError> {
        check_path(path)?;
        let mut at = String::new();
        for part in path.split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            match self.entries.get(&at) {
                Some(Entry {
                    kind: EntryKind::Dir,
                    ..
                }) => {}
                Some(_) => return Err(CpioError::Duplicate(at)),
                None => {
                    self.entries.insert(
                        at.clone(),
                        Entry {
                            kind: EntryKind::Dir,
                            perm: 0o755,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// The entries, sorted by path.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(p, e)| (p.as_str(), e))
    }

    /// The entry at `path`.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// The archive's bytes: entries sorted by path, mtime 0, uid and gid 0,
    /// inode numbers 1, 2, ... in that order, then the trailer, padded
    /// with NULs to a multiple of 512 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let total: usize = self
            .entries
            .iter()
            .map(|(p, e)| HEADER_LEN + p.len() + e.size() + 8)
            .sum();
        let mut out = Vec::with_capacity(total + 1024);
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (rmaj, rmin) = match entry.kind {
                EntryKind::CharDevice(ma, mi) => (ma, mi),
                _ => (0, 0),
            };
            let nlink = if matches!(entry.kind, EntryKind::Dir) {
                2
            } else {
                1
            };
            let data: &[u8] = match &entry.kind {
                EntryKind::File(d) => d,
                EntryKind::Symlink(t) => t.as_bytes(),
                _ => &[],
            };
            let ino = u32::try_from(ino + 1).unwrap_or(u32::MAX);
            write_entry(&mut out, path, ino, entry.mode(), nlink, (rmaj, rmin), data);
        }
        write_entry(&mut out, TRAILER, 0, 0, 1, (0, 0), &[]);
        out.resize(out.len().next_multiple_of(512), 0);
        out
    }
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

fn write_entry(
    out: &mut Vec<u8>,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    data: &[u8],
) {
    let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let namesize = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
    out.extend_from_slice(MAGIC);
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
    // rdevminor namesize check
    for field in [
        ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
    ] {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn field(bytes: &[u8], at: usize, n: usize) -> Result<u32, CpioError> {
    let start = at + MAGIC.len() + 8 * n;
    let text = bytes
        .get(start..start + 8)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or(CpioError::Malformed(at))?;
    u32::from_str_radix(text, 16).map_err(|_| CpioError::Malformed(at))
}

/// Reads a newc archive (uncompressed) back into entries; the trailer ends
/// it. Hard links, mtimes, owners and inode numbers are not kept; block
/// devices, FIFOs and sockets are refused as malformed.
pub fn parse(bytes: &[u8]) -> Result<Archive, CpioError> {
    let mut archive = Archive::new();
    let mut at = 0;
    loop {
        if archive.entries.len() > MAX_ENTRIES {
            return Err(CpioError::TooManyEntries);
        }
        if bytes.get(at..at + MAGIC.len()) != Some(MAGIC.as_slice()) {
            return Err(CpioError::Malformed(at));
        }
        let mode = field(bytes, at, 1)?;
        let size = field(bytes, at, 6)? as usize;
        let (rmaj, rmin) = (field(bytes, at, 9)?, field(bytes, at, 10)?);
        let namesize = field(bytes, at, 11)? as usize;
        let name_start = at + HEADER_LEN;
        let name = bytes
            .get(name_start..name_start + namesize.saturating_sub(1))
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or(CpioError::Malformed(at))?
            .to_owned();
        let data_start = (name_start + namesize).next_multiple_of(4);
        let data = bytes
            .get(data_start..data_start + size)
            .ok_or(CpioError::Malformed(at))?;
        if name == TRAILER {
            return Ok(archive);
        }
        let perm = mode & 0o7777;
        let kind = match mode & 0o170_000 {
            S_IFDIR => EntryKind::Dir,
            S_IFREG => EntryKind::File(data.to_vec()),
            S_IFLNK => EntryKind::Symlink(
                String::from_utf8(data.to_vec()).map_err(|_| CpioError::Malformed(at))?,
            ),
            S_IFCHR => EntryKind::CharDevice(rmaj, rmin),
            _ => return Err(CpioError::Malformed(at)),
        };
        let path = name.trim_start_matches("./").to_owned();
        check_path(&path)?;
        if archive
            .entries
            .insert(path.clone(), Entry { kind, perm })
            .is_some()
        {
            return Err(CpioError::Duplicate(path));
        }
        at = (data_start + size).next_multiple_of(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Archive {
        let mut a = Archive::new();
        a.add_dirs("usr/bin").unwrap();
        a.add(
            "usr/bin/tool",
            Entry {
                kind: EntryKind::File(b"#!binary".to_vec()),
                perm: 0o755,
            },
        )
        .unwrap();
        a.add(
            "init",
            Entry {
                kind: EntryKind::Symlink("usr/bin/tool".into()),
                perm: 0o777,
            },
        )
        .unwrap();
        a.add_dirs("dev").unwrap();
        a.add(
            "dev/console",
            Entry {
                kind: EntryKind::CharDevice(5, 1),
                perm: 0o600,
            },
        )
        .unwrap();
        a
    }

    #[test]
    fn an_archive_reads_back_as_written() {
        let a = sample();
        let bytes = a.to_bytes();
        assert_eq!(bytes.len() % 512, 0);
        assert_eq!(parse(&bytes).unwrap(), a);
    }

    #[test]
    fn the_same_entries_in_any_order_give_the_same_bytes() {
        let mut b = Archive::new();
        b.add_dirs("dev").unwrap();
        b.add(
            "dev/console",
            Entry {
                kind: EntryKind::CharDevice(5, 1),
                perm: 0o600,
            },
        )
        .unwrap();
        b.add(
            "init",
            Entry {
                kind: EntryKind::Symlink("usr/bin/tool".into()),
                perm: 0o777,
            },
        )
        .unwrap();
        b.add_dirs("usr/bin").unwrap();
        b.add(
            "usr/bin/tool",
            Entry {
                kind: EntryKind::File(b"#!binary".to_vec()),
                perm: 0o755,
            },
        )
        .unwrap();
        assert_eq!(b.to_bytes(), sample().to_bytes());
    }

    #[test]
    fn bad_paths_and_orphans_are_refused() {
        let mut a = Archive::new();
        for p in ["", "/abs", "a/../b", "a//b", "./a", "a/"] {
            assert!(matches!(a.add_dirs(p), Err(CpioError::Path(_))), "{p:?}");
        }
        let file = Entry {
            kind: EntryKind::File(vec![]),
            perm: 0o644,
        };
        assert!(matches!(
            a.add("no/parent", file.clone()),
            Err(CpioError::NoParent(_))
        ));
        a.add("f", file.clone()).unwrap();
        assert!(matches!(a.add("f", file), Err(CpioError::Duplicate(_))));
    }

    #[test]
    fn truncated_archives_are_refused() {
        let bytes = sample().to_bytes();
        for cut in [0, 5, 100, 200] {
            assert!(parse(&bytes[..cut]).is_err(), "{cut}");
        }
    }
}
