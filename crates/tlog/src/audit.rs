//! Whole-log audit: recompute the tree from the entry bundles and check every
//! tile, bundle and checkpoint stored.

use std::collections::BTreeMap;
use std::fmt;

use crate::Hash;
use crate::log::{CHECKPOINT_PATH, HISTORY_PREFIX};
use crate::merkle::{ProofError, Tree, leaf_hash, verify_consistency};
use crate::note::{Checkpoint, NoteError, NoteVerifier, open_checkpoint};
use crate::storage::{Storage, StorageError};
use crate::tile::{
    ENTRIES_PER_BUNDLE, HASHES_PER_TILE, TileError, TileKind, TilePath, decode_bundle, decode_tile,
};

/// What a successful audit checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// Size of the latest checkpoint.
    pub size: u64,
    /// Its root, recomputed from the entries.
    pub root: Hash,
    /// Checkpoints verified (signature, root, consistency with the previous).
    pub checkpoints: u64,
    /// Entry bundles read and checked.
    pub bundles: u64,
    /// Hash tiles read and checked.
    pub tiles: u64,
    /// Stored tiles and bundles past the latest checkpoint: covered by no
    /// signature, so neither trusted nor checked.
    pub beyond_checkpoint: u64,
}

/// What is wrong at the place an [`AuditFailure`] names.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditProblem {
    /// storage failed
    #[error("storage failed")]
    Storage(#[source] StorageError),
    /// the object is missing
    #[error("missing")]
    Missing,
    /// the object is not valid UTF-8 text
    #[error("not UTF-8 text")]
    NotText,
    /// the path is not a tile, bundle or checkpoint path
    #[error("unexpected object")]
    UnexpectedPath,
    /// a tile or bundle is malformed (wrong length, cut short, wrong count)
    #[error("malformed")]
    Malformed(#[source] TileError),
    /// a checkpoint note does not verify or parse
    #[error("checkpoint refused")]
    Checkpoint(#[source] NoteError),
    /// the note in `checkpoints/<size>` has another size
    #[error("the checkpoint's size is {found}")]
    SizeMismatch {
        /// Size in the note.
        found: u64,
    },
    /// the latest checkpoint is older than one in the history
    #[error("the latest checkpoint (size {latest}) is older than checkpoints/{newest}")]
    LatestNotNewest {
        /// Size of `checkpoint`.
        latest: u64,
        /// Largest size in the history.
        newest: u64,
    },
    /// the checkpoint differs from the one in the history with the same size
    #[error("differs from checkpoints/{0} of the same size")]
    LatestDiffers(u64),
    /// the entry does not hash to the leaf the level-0 tile and the checkpoint root commit to
    #[error("the entry does not match the checkpointed tree (the level-0 tile {tile} disagrees)")]
    EntryMismatch {
        /// The level-0 tile that disagrees.
        tile: String,
    },
    /// the entry in this (partial) bundle differs from the same entry in the full bundle
    #[error("differs from the same entry in the other bundle of this index")]
    EntryDiffers,
    /// the root recomputed from the entries differs from the checkpoint's root
    #[error("the root recomputed from the entries differs from the checkpoint's")]
    RootMismatch,
    /// a tile hash differs from the hash recomputed from the entries
    #[error("the tile hash differs from the one recomputed from the entries")]
    TileMismatch,
    /// two checkpoints in the history are not consistent
    #[error("not consistent with the previous checkpoint (size {previous})")]
    Inconsistent {
        /// Size of the previous checkpoint.
        previous: u64,
        /// The proof failure.
        #[source]
        source: ProofError,
    },
    /// the entry is not what the caller's check of entries accepts
    #[error("the entry fails the check of its content")]
    Entry(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Where the audit found a problem, and what.
#[derive(Debug, thiserror::Error)]
pub struct AuditFailure {
    /// The storage path (`tile/entries/001`, `tile/0/000.p/7`, `checkpoints/42`).
    pub path: String,
    /// The entry index (for a tile, the first leaf under the bad hash), if known.
    pub index: Option<u64>,
    /// What is wrong.
    #[source]
    pub problem: AuditProblem,
}

impl fmt::Display for AuditFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "{} (entry {i}): {}", self.path, self.problem),
            None => write!(f, "{}: {}", self.path, self.problem),
        }
    }
}

fn fail(path: impl Into<String>, index: Option<u64>, problem: AuditProblem) -> AuditFailure {
    AuditFailure {
        path: path.into(),
        index,
        problem,
    }
}

fn storage_fail(path: &str) -> impl FnOnce(StorageError) -> AuditFailure + '_ {
    move |e| fail(path, None, AuditProblem::Storage(e))
}

fn read_note(
    storage: &dyn Storage,
    path: &str,
    origin: &str,
    log: &NoteVerifier,
) -> Result<Option<(String, Checkpoint)>, AuditFailure> {
    let Some(bytes) = storage.read(path).map_err(storage_fail(path))? else {
        return Ok(None);
    };
    let text = String::from_utf8(bytes).map_err(|_| fail(path, None, AuditProblem::NotText))?;
    let cp = open_checkpoint(&text, origin, log)
        .map_err(|e| fail(path, None, AuditProblem::Checkpoint(e)))?;
    Ok(Some((text, cp)))
}

/// Decodes as many whole entries as the bundle holds (for locating a problem).
fn lenient_entries(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 2 && (out.len() as u64) < ENTRIES_PER_BUNDLE {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let Some(e) = rest.get(2..2 + len) else { break };
        out.push(e.to_vec());
        rest = &rest[2 + len..];
    }
    out
}

/// Audits a whole stored log: every checkpoint in `checkpoints/` and
/// `checkpoint` (signed by `log`, for `origin`, roots equal to the tree
/// recomputed from the entry bundles, each consistent with the previous),
/// every entry bundle and hash tile up to the latest checkpoint (decoded and
/// compared with the recomputed tree; the full tiles and the partial tiles of
/// the latest size must be present). The first problem found is returned,
/// naming the path and, where it can, the entry index.
pub fn audit(
    storage: &dyn Storage,
    origin: &str,
    log: &NoteVerifier,
) -> Result<AuditReport, AuditFailure> {
    audit_entries(storage, origin, log, &mut |_, _| Ok(()))
}

/// The error a check of entries ([`audit_entries`]) returns.
pub type EntryCheckError = Box<dyn std::error::Error + Send + Sync>;

/// A check of entries for [`audit_entries`]: the entry's index and bytes.
pub type EntryCheck<'a> = dyn FnMut(u64, &[u8]) -> Result<(), EntryCheckError> + 'a;

/// [`audit`], and hands every entry the latest checkpoint covers, in log
/// order, with its index, to `check`: a check of what the entries say
/// (the format of the log's leaves is not this crate's). The first entry
/// it refuses fails the audit with [`AuditProblem::Entry`], naming its
/// bundle and index, once the tree itself has verified (a broken tree is
/// reported first).
pub fn audit_entries(
    storage: &dyn Storage,
    origin: &str,
    log: &NoteVerifier,
    check: &mut EntryCheck<'_>,
) -> Result<AuditReport, AuditFailure> {
    let mut refused: Option<AuditFailure> = None;
    // 1. Checkpoints: the history and the latest.
    let mut history: BTreeMap<u64, (String, String, Checkpoint)> = BTreeMap::new();
    for path in storage
        .list(HISTORY_PREFIX)
        .map_err(storage_fail(HISTORY_PREFIX))?
    {
        let size = path[HISTORY_PREFIX.len()..]
            .parse::<u64>()
            .map_err(|_| fail(&path, None, AuditProblem::UnexpectedPath))?;
        let Some((text, cp)) = read_note(storage, &path, origin, log)? else {
            continue;
        };
        if cp.size != size {
            return Err(fail(
                &path,
                None,
                AuditProblem::SizeMismatch { found: cp.size },
            ));
        }
        history.insert(size, (path, text, cp));
    }
    let latest = read_note(storage, CHECKPOINT_PATH, origin, log)?;
    let newest = history.keys().next_back().copied();
    let size = match (&latest, newest) {
        (None, None) => 0,
        (None, Some(_)) => return Err(fail(CHECKPOINT_PATH, None, AuditProblem::Missing)),
        (Some((_, cp)), newest) => {
            if let Some(newest) = newest
                && cp.size < newest
            {
                return Err(fail(
                    CHECKPOINT_PATH,
                    None,
                    AuditProblem::LatestNotNewest {
                        latest: cp.size,
                        newest,
                    },
                ));
            }
            if let Some((_, _, h)) = history.get(&cp.size)
                && h.root != cp.root
            {
                return Err(fail(
                    CHECKPOINT_PATH,
                    None,
                    AuditProblem::LatestDiffers(cp.size),
                ));
            }
            cp.size
        }
    };
    let mut checkpoints: Vec<(String, Checkpoint)> = history
        .into_values()
        .map(|(path, _, cp)| (path, cp))
        .collect();
    if let Some((_, cp)) = latest
        && checkpoints.last().map(|(_, c)| c.size) != Some(cp.size)
    {
        checkpoints.push((CHECKPOINT_PATH.to_owned(), cp));
    }

    // 2. The tree, from the entry bundles up to the latest size.
    let mut tree = Tree::new();
    let mut bundle_paths: Vec<String> = Vec::new();
    let mut bundles = 0u64;
    let bundle_count = size.div_ceil(ENTRIES_PER_BUNDLE);
    for n in 0..bundle_count {
        let need = (size - n * ENTRIES_PER_BUNDLE).min(ENTRIES_PER_BUNDLE);
        let full = TilePath::entries(n, 256).to_string();
        let (path, bytes, width) = match storage.read(&full).map_err(storage_fail(&full))? {
            Some(b) => (full, b, ENTRIES_PER_BUNDLE),
            None if need < ENTRIES_PER_BUNDLE => {
                let partial = TilePath::entries(n, need as u16).to_string();
                match storage.read(&partial).map_err(storage_fail(&partial))? {
                    Some(b) => (partial, b, need),
                    None => {
                        return Err(fail(
                            partial,
                            Some(n * ENTRIES_PER_BUNDLE),
                            AuditProblem::Missing,
                        ));
                    }
                }
            }
            None => {
                return Err(fail(
                    full,
                    Some(n * ENTRIES_PER_BUNDLE),
                    AuditProblem::Missing,
                ));
            }
        };
        let entries = match decode_bundle(&bytes, width) {
            Ok(e) => e,
            Err(e) => {
                // Name the first entry that no longer matches the level-0 tile.
                let got = lenient_entries(&bytes);
                let tile = read_leaf_tile(storage, n, need);
                let first_bad = tile.as_ref().and_then(|t| {
                    (0..need as usize)
                        .find(|&i| got.get(i).map(|e| leaf_hash(e)) != t.get(i).copied())
                });
                let index = n * ENTRIES_PER_BUNDLE + first_bad.unwrap_or(got.len()) as u64;
                return Err(fail(path, Some(index), AuditProblem::Malformed(e)));
            }
        };
        for (i, e) in entries.iter().take(need as usize).enumerate() {
            let index = n * ENTRIES_PER_BUNDLE + i as u64;
            if refused.is_none()
                && let Err(source) = check(index, e)
            {
                refused = Some(fail(&path, Some(index), AuditProblem::Entry(source)));
            }
            tree.push(leaf_hash(e));
        }
        bundle_paths.push(path);
        bundles += 1;
    }

    // 3. Every checkpoint's root, and consistency with the previous one.
    let mut previous: Option<&Checkpoint> = None;
    for (path, cp) in &checkpoints {
        let root = tree.root_at(cp.size).map_err(|e| {
            fail(
                path,
                None,
                AuditProblem::Inconsistent {
                    previous: 0,
                    source: e,
                },
            )
        })?;
        if root != cp.root {
            return Err(
                locate_entry_mismatch(storage, &tree, &bundle_paths, cp.size)
                    .unwrap_or_else(|| fail(path, None, AuditProblem::RootMismatch)),
            );
        }
        if let Some(prev) = previous {
            let proof = tree.consistency_proof(prev.size, cp.size).map_err(|e| {
                fail(
                    path,
                    None,
                    AuditProblem::Inconsistent {
                        previous: prev.size,
                        source: e,
                    },
                )
            })?;
            verify_consistency(prev.size, cp.size, &prev.root, &cp.root, &proof).map_err(|e| {
                fail(
                    path,
                    None,
                    AuditProblem::Inconsistent {
                        previous: prev.size,
                        source: e,
                    },
                )
            })?;
        }
        previous = Some(cp);
    }

    // 4. Every stored tile and bundle, against the recomputed tree.
    let mut tiles = 0u64;
    let mut beyond = 0u64;
    for path in storage.list("tile/").map_err(storage_fail("tile/"))? {
        let tp =
            TilePath::parse(&path).map_err(|_| fail(&path, None, AuditProblem::UnexpectedPath))?;
        let width = u64::from(tp.width);
        match tp.kind {
            TileKind::Entries => {
                let end = tp.index * ENTRIES_PER_BUNDLE + width;
                if end > size {
                    beyond += 1;
                    continue;
                }
                if bundle_paths.get(tp.index as usize) == Some(&path) {
                    continue; // already read in step 2
                }
                let bytes = storage
                    .read(&path)
                    .map_err(storage_fail(&path))?
                    .unwrap_or_default();
                let entries = decode_bundle(&bytes, width).map_err(|e| {
                    fail(
                        &path,
                        Some(tp.index * ENTRIES_PER_BUNDLE),
                        AuditProblem::Malformed(e),
                    )
                })?;
                for (i, e) in entries.iter().enumerate() {
                    let index = tp.index * ENTRIES_PER_BUNDLE + i as u64;
                    if tree.leaf(index) != Some(leaf_hash(e)) {
                        return Err(fail(&path, Some(index), AuditProblem::EntryDiffers));
                    }
                }
                bundles += 1;
            }
            TileKind::Hashes(level) => {
                let tree_level = u32::from(level) * 8;
                let start = tp.index * HASHES_PER_TILE;
                if tree_level >= 64 || start + width > size >> tree_level {
                    beyond += 1;
                    continue;
                }
                let bytes = storage
                    .read(&path)
                    .map_err(storage_fail(&path))?
                    .unwrap_or_default();
                let hashes = decode_tile(&bytes, tp.width).map_err(|e| {
                    fail(&path, Some(start << tree_level), AuditProblem::Malformed(e))
                })?;
                for (i, h) in hashes.iter().enumerate() {
                    let at = start + i as u64;
                    if tree.complete(tree_level, at) != Some(*h) {
                        return Err(fail(
                            &path,
                            Some(at << tree_level),
                            AuditProblem::TileMismatch,
                        ));
                    }
                }
                tiles += 1;
            }
        }
    }

    // 5. The tiles the latest checkpoint needs are all there.
    for level in 0u8..64 {
        let tree_level = u32::from(level) * 8;
        if tree_level >= 64 || size >> tree_level == 0 {
            break;
        }
        let count = size >> tree_level;
        let mut needed: Vec<TilePath> = (0..count / HASHES_PER_TILE)
            .map(|n| TilePath::hashes(level, n, 256))
            .collect();
        if count % HASHES_PER_TILE > 0 {
            needed.push(TilePath::hashes(
                level,
                count / HASHES_PER_TILE,
                (count % HASHES_PER_TILE) as u16,
            ));
        }
        for tp in needed {
            let path = tp.to_string();
            if storage.read(&path).map_err(storage_fail(&path))?.is_none() {
                return Err(fail(
                    path,
                    Some((tp.index * HASHES_PER_TILE) << tree_level),
                    AuditProblem::Missing,
                ));
            }
        }
    }

    if let Some(f) = refused {
        return Err(f);
    }
    Ok(AuditReport {
        size,
        root: tree.root(),
        checkpoints: checkpoints.len() as u64,
        bundles,
        tiles,
        beyond_checkpoint: beyond,
    })
}

/// The level-0 tile of bundle `n` (full, or the partial of `need` hashes).
fn read_leaf_tile(storage: &dyn Storage, n: u64, need: u64) -> Option<Vec<Hash>> {
    let full = TilePath::hashes(0, n, 256).to_string();
    if let Ok(Some(b)) = storage.read(&full) {
        return decode_tile(&b, 256).ok();
    }
    let partial = TilePath::hashes(0, n, need as u16).to_string();
    storage
        .read(&partial)
        .ok()
        .flatten()
        .and_then(|b| decode_tile(&b, need as u16).ok())
}

/// After a root mismatch, the first entry whose hash differs from its
/// level-0 tile: that entry was changed (or moved) after it was checkpointed.
fn locate_entry_mismatch(
    storage: &dyn Storage,
    tree: &Tree,
    bundle_paths: &[String],
    size: u64,
) -> Option<AuditFailure> {
    for (n, path) in bundle_paths.iter().enumerate() {
        let n = n as u64;
        let start = n * ENTRIES_PER_BUNDLE;
        if start >= size {
            break;
        }
        let need = (size - start).min(ENTRIES_PER_BUNDLE);
        let tile = read_leaf_tile(storage, n, need)?;
        for i in 0..need {
            let index = start + i;
            if tree.leaf(index) != tile.get(i as usize).copied() {
                let tile_path = if need == ENTRIES_PER_BUNDLE || tile.len() == 256 {
                    TilePath::hashes(0, n, 256).to_string()
                } else {
                    TilePath::hashes(0, n, need as u16).to_string()
                };
                return Some(fail(
                    path.as_str(),
                    Some(index),
                    AuditProblem::EntryMismatch { tile: tile_path },
                ));
            }
        }
    }
    None
}
