//! C2SP tlog-tiles paths, hash tiles and entry bundles.

use std::fmt;

use crate::Hash;

/// Hashes in a full hash tile (tiles are 8 levels of the tree high).
pub const HASHES_PER_TILE: u64 = 256;
/// Entries in a full entry bundle.
pub const ENTRIES_PER_BUNDLE: u64 = 256;
/// The largest entry: bundles prefix each entry with a big-endian `u16` length.
pub const MAX_ENTRY_SIZE: usize = u16::MAX as usize;
/// The largest entry bundle a decoder accepts.
pub const MAX_BUNDLE_SIZE: usize = ENTRIES_PER_BUNDLE as usize * (2 + MAX_ENTRY_SIZE);
/// The highest tile level tlog-tiles allows.
const MAX_LEVEL: u8 = 63;

/// A malformed tile path, tile or entry bundle.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TileError {
    /// not a tlog-tiles path
    #[error("not a tlog-tiles path: {0:?}")]
    BadPath(String),
    /// the bundle is larger than MAX_BUNDLE_SIZE
    #[error("the bundle has {0} bytes, more than the {MAX_BUNDLE_SIZE} allowed")]
    TooLarge(usize),
    /// an entry's length prefix runs past the end of the bundle
    #[error("entry {entry} of the bundle is cut short")]
    Truncated {
        /// Position of the entry within the bundle.
        entry: usize,
    },
    /// the bundle holds a different number of entries than its path says
    #[error("the bundle holds {found} entries; its path says {expected}")]
    WrongCount {
        /// Entries the path says.
        expected: u64,
        /// Entries found.
        found: u64,
    },
    /// a hash tile's length is not its width times 32 bytes
    #[error("the tile has {found} bytes; its path says {expected}")]
    WrongTileLength {
        /// Bytes the path says.
        expected: usize,
        /// Bytes found.
        found: usize,
    },
    /// an entry is larger than MAX_ENTRY_SIZE
    #[error("an entry of {0} bytes is larger than the {MAX_ENTRY_SIZE} allowed")]
    EntryTooLarge(usize),
}

/// Which resource a tile path names: a hash tile at a level, or an entry bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TileKind {
    /// A hash tile at level `L` (hashes of subtrees of `256^L` leaves).
    Hashes(u8),
    /// An entry bundle.
    Entries,
}

/// A parsed tlog-tiles path: `tile/<L>/<N>[.p/<W>]` or `tile/entries/<N>[.p/<W>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TilePath {
    /// Hash tile level or entry bundle.
    pub kind: TileKind,
    /// Index of the tile within its level.
    pub index: u64,
    /// Width: 256 for a full tile, 1..=255 for a partial one.
    pub width: u16,
}

impl TilePath {
    /// A hash tile path.
    pub fn hashes(level: u8, index: u64, width: u16) -> Self {
        Self {
            kind: TileKind::Hashes(level),
            index,
            width,
        }
    }

    /// An entry bundle path.
    pub fn entries(index: u64, width: u16) -> Self {
        Self {
            kind: TileKind::Entries,
            index,
            width,
        }
    }

    /// Whether the tile is partial (fewer than 256 hashes or entries).
    pub fn is_partial(&self) -> bool {
        u64::from(self.width) < HASHES_PER_TILE
    }

    /// Parses a path; fails closed on anything that is not canonical.
    pub fn parse(path: &str) -> Result<Self, TileError> {
        let bad = || TileError::BadPath(path.chars().take(200).collect());
        let rest = path.strip_prefix("tile/").ok_or_else(bad)?;
        let (kind, rest) = rest.split_once('/').ok_or_else(bad)?;
        let kind = if kind == "entries" {
            TileKind::Entries
        } else {
            let level = parse_decimal(kind).ok_or_else(bad)?;
            if level > u64::from(MAX_LEVEL) {
                return Err(bad());
            }
            TileKind::Hashes(level as u8)
        };
        let (index_part, width) = match rest.split_once(".p/") {
            Some((i, w)) => {
                let w = parse_decimal(w).ok_or_else(bad)?;
                if w == 0 || w >= HASHES_PER_TILE {
                    return Err(bad());
                }
                (i, w as u16)
            }
            None => (rest, HASHES_PER_TILE as u16),
        };
        let elems: Vec<&str> = index_part.split('/').collect();
        let mut index: u64 = 0;
        for (i, e) in elems.iter().enumerate() {
            let last = i + 1 == elems.len();
            let digits = if last {
                *e
            } else {
                e.strip_prefix('x').ok_or_else(bad)?
            };
            if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let d: u64 = digits.parse().map_err(|_| bad())?;
            index = index
                .checked_mul(1000)
                .and_then(|x| x.checked_add(d))
                .ok_or_else(bad)?;
        }
        let parsed = Self { kind, index, width };
        // Canonical form only: no superfluous leading `x000` elements.
        if parsed.to_string() != path {
            return Err(bad());
        }
        Ok(parsed)
    }
}

fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

/// Formats a tile index as tlog-tiles path elements: 1234067 -> `x001/x234/067`.
fn index_elements(mut n: u64) -> String {
    let mut parts = vec![format!("{:03}", n % 1000)];
    n /= 1000;
    while n > 0 {
        parts.push(format!("x{:03}", n % 1000));
        n /= 1000;
    }
    parts.reverse();
    parts.join("/")
}

impl fmt::Display for TilePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            TileKind::Hashes(level) => write!(f, "tile/{level}/")?,
            TileKind::Entries => f.write_str("tile/entries/")?,
        }
        f.write_str(&index_elements(self.index))?;
        if self.is_partial() {
            write!(f, ".p/{}", self.width)?;
        }
        Ok(())
    }
}

/// Encodes entries as an entry bundle (each entry prefixed by its `u16` BE length).
pub fn encode_bundle<E: AsRef<[u8]>>(entries: &[E]) -> Result<Vec<u8>, TileError> {
    let total: usize = entries.iter().map(|e| 2 + e.as_ref().len()).sum();
    let mut out = Vec::with_capacity(total);
    for e in entries {
        let e = e.as_ref();
        let len = u16::try_from(e.len()).map_err(|_| TileError::EntryTooLarge(e.len()))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(e);
    }
    Ok(out)
}

/// Decodes an entry bundle; `expected` is the width its path names.
pub fn decode_bundle(bytes: &[u8], expected: u64) -> Result<Vec<Vec<u8>>, TileError> {
    if bytes.len() > MAX_BUNDLE_SIZE {
        return Err(TileError::TooLarge(bytes.len()));
    }
    let mut entries = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 2 {
            return Err(TileError::Truncated {
                entry: entries.len(),
            });
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = rest.get(2..2 + len).ok_or(TileError::Truncated {
            entry: entries.len(),
        })?;
        entries.push(body.to_vec());
        rest = &rest[2 + len..];
        if entries.len() as u64 > ENTRIES_PER_BUNDLE {
            break;
        }
    }
    if entries.len() as u64 != expected {
        return Err(TileError::WrongCount {
            expected,
            found: entries.len() as u64,
        });
    }
    Ok(entries)
}

/// Decodes a hash tile of `width` hashes.
pub(crate) fn decode_tile(bytes: &[u8], width: u16) -> Result<Vec<Hash>, TileError> {
    let expected = usize::from(width) * 32;
    if bytes.len() != expected {
        return Err(TileError::WrongTileLength {
            expected,
            found: bytes.len(),
        });
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_spec_examples() {
        assert_eq!(
            TilePath::hashes(0, 1_234_067, 256).to_string(),
            "tile/0/x001/x234/067"
        );
        assert_eq!(TilePath::hashes(1, 0, 17).to_string(), "tile/1/000.p/17");
        assert_eq!(
            TilePath::entries(273, 112).to_string(),
            "tile/entries/273.p/112"
        );
        for p in [
            "tile/0/x001/x234/067",
            "tile/1/000.p/17",
            "tile/entries/273.p/112",
            "tile/63/x999/999",
        ] {
            assert_eq!(TilePath::parse(p).unwrap().to_string(), p);
        }
        for bad in [
            "tile/0/1",
            "tile/0/x000/001",
            "tile/00/001",
            "tile/64/001",
            "tile/0/001.p/0",
            "tile/0/001.p/256",
            "tile/0/001.p/07",
            "tile/0/001/",
            "tile/entries/0010",
            "tiles/0/001",
            "tile/0/x01/001",
        ] {
            assert!(TilePath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bundles_round_trip_and_fail_closed() {
        let entries = vec![b"".to_vec(), b"a".to_vec(), vec![7u8; 300]];
        let b = encode_bundle(&entries).unwrap();
        assert_eq!(&b[..3], &[0, 0, 0]);
        assert_eq!(decode_bundle(&b, 3).unwrap(), entries);
        assert_eq!(
            decode_bundle(&b, 4),
            Err(TileError::WrongCount {
                expected: 4,
                found: 3
            })
        );
        assert_eq!(
            decode_bundle(&b[..b.len() - 1], 3),
            Err(TileError::Truncated { entry: 2 })
        );
        assert!(encode_bundle(&[vec![0u8; 65536]]).is_err());
    }
}
