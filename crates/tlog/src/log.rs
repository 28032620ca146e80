//! The log: append entries, write tiles, sign and publish checkpoints, prove.

use crate::Hash;
use crate::merkle::{ProofError, Tree, leaf_hash};
use crate::note::{
    Checkpoint, KeyKind, MAX_NOTE_SIZE, NoteError, NoteSigner, NoteVerifier, SignedNote,
    open_checkpoint,
};
use crate::storage::{Storage, StorageError};
use crate::tile::{
    ENTRIES_PER_BUNDLE, HASHES_PER_TILE, MAX_ENTRY_SIZE, TileError, TilePath, decode_bundle,
    decode_tile, encode_bundle,
};

/// Path of the latest published checkpoint.
pub(crate) const CHECKPOINT_PATH: &str = "checkpoint";
/// Directory of every published checkpoint, by size (`checkpoints/<size>`).
pub(crate) const HISTORY_PREFIX: &str = "checkpoints/";

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// storage failed
    #[error("storage failed")]
    Storage(#[from] StorageError),
    /// an entry is larger than a bundle can hold (caller error)
    #[error("entry {index} of the batch has {len} bytes, more than the {MAX_ENTRY_SIZE} allowed")]
    EntryTooLarge {
        /// Position in the batch.
        index: usize,
        /// Its length.
        len: usize,
    },
    /// the signer is not an Ed25519 note key named after the origin (caller error)
    #[error("the log key must be an Ed25519 note key named {origin:?}")]
    WrongKey {
        /// The log's origin.
        origin: String,
    },
    /// a stored object the log needs is missing
    #[error("{path} is missing from storage")]
    Missing {
        /// The path.
        path: String,
    },
    /// a stored object is corrupt: it does not match the tree or its checkpoint
    #[error("{path} is corrupt (index {index:?}): {what}")]
    Corrupt {
        /// The path.
        path: String,
        /// The entry index, where one is known.
        index: Option<u64>,
        /// What does not match.
        what: &'static str,
    },
    /// a stored tile or bundle is malformed
    #[error("{path} is malformed")]
    Malformed {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: TileError,
    },
    /// a note was refused (stored checkpoint or note given to publish)
    #[error("checkpoint note refused")]
    Note(#[from] NoteError),
    /// a proof was asked for sizes or indexes the log cannot prove (caller error)
    #[error("cannot prove")]
    Proof(#[from] ProofError),
    /// no entry at that index
    #[error("no entry {index}: the log has {size}")]
    NoSuchEntry {
        /// Index asked for.
        index: u64,
        /// Log size.
        size: u64,
    },
    /// publish was given a checkpoint larger than the last prepared one
    #[error("checkpoint of size {size} was not prepared (last prepared size {prepared})")]
    NotPrepared {
        /// Its size.
        size: u64,
        /// The last prepared (synced) size.
        prepared: u64,
    },
    /// publish was given a checkpoint whose root is not this tree's root at its size
    #[error("the checkpoint of size {size} does not match this log's tree")]
    NotThisTree {
        /// Its size.
        size: u64,
    },
    /// publish was given a checkpoint smaller than the one already published
    #[error("checkpoint of size {size} is older than the published size {published}")]
    Rollback {
        /// Its size.
        size: u64,
        /// The published size.
        published: u64,
    },
    /// an earlier write failed: the log must be reopened
    #[error("an earlier storage write failed; reopen the log")]
    Failed,
}

/// The entry bundle and hash tiles a checkpoint of one size needs, computed
/// by [`Log::stage_checkpoint`] and not stored yet.
#[derive(Debug)]
pub struct StagedCheckpoint {
    size: u64,
    root: Hash,
    writes: Vec<(String, Vec<u8>)>,
    /// The tail's bundle index and the width of its partial bundle staged.
    tail: Option<(u64, usize)>,
}

impl StagedCheckpoint {
    /// The tree size it is of.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes the staged objects into `storage`, which must be the log's
    /// own, and syncs it. This is the slow part, and it needs no access to
    /// the log: readers and appenders of the log go on meanwhile.
    pub fn store(&self, storage: &dyn Storage) -> Result<(), StorageError> {
        for (path, bytes) in &self.writes {
            storage.write(path, bytes)?;
        }
        storage.sync()
    }
}

/// An append-only transparency log over a [`Storage`].
///
/// Layout (C2SP tlog-tiles): full entry bundles `tile/entries/<N>` are
/// written by [`Log::append`] as soon as they fill; the partial bundle of the
/// tail and every hash tile `tile/<L>/<N>[.p/<W>]` the size needs are written
/// by [`Log::prepare_checkpoint`], which then syncs storage and signs.
/// [`Log::publish`] stores the note (with any cosignature lines) at
/// `checkpoint` and `checkpoints/<size>`.
///
/// Crash recovery ([`Log::open`]): the tree up to the published checkpoint
/// is rebuilt from the level-0 tiles and must hash to the checkpoint's root
/// (else the open fails: the store is corrupt). Entries after it are
/// recovered from the entry bundles on storage — full bundles in order, then
/// the widest partial bundle of the next index — each re-hashed, checked
/// against the leaves already known, rewritten and kept; the first bundle
/// missing or malformed ends the log there, and anything after it is cut (it
/// was never covered by a checkpoint, and is overwritten as the log grows
/// again). Entries appended but not yet in a full bundle or a prepared
/// checkpoint live only in memory: a caller treats an entry as durable once a
/// checkpoint covering it is published.
pub struct Log<S: Storage> {
    storage: S,
    origin: String,
    signer: NoteSigner,
    verifier: NoteVerifier,
    tree: Tree,
    /// Entries of the incomplete last bundle: indexes `size - tail.len() .. size`.
    tail: Vec<Vec<u8>>,
    /// Width of the partial bundle of the tail last written (0: none).
    tail_written: usize,
    /// Size of the last prepared checkpoint: tiles and bundles up to it are durable.
    synced_size: u64,
    /// Size up to which hash tiles were written.
    tiles_size: u64,
    published: Option<(SignedNote, Checkpoint)>,
    /// Sizes of the published checkpoints under `checkpoints/`, ascending.
    history: Vec<u64>,
    prepared_at: Option<u64>,
    failed: bool,
}

impl<S: Storage + std::fmt::Debug> std::fmt::Debug for Log<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("origin", &self.origin)
            .field("size", &self.tree.size())
            .field("synced_size", &self.synced_size)
            .field(
                "published_size",
                &self.published.as_ref().map(|(_, c)| c.size),
            )
            .field("failed", &self.failed)
            .field("storage", &self.storage)
            .finish_non_exhaustive()
    }
}

fn bundle_path(index: u64, width: u64) -> String {
    TilePath::entries(index, width as u16).to_string()
}

impl<S: Storage> Log<S> {
    /// Opens the log in `storage` (empty storage: a new log), recovering
    /// entries appended after the last published checkpoint (see the type docs).
    pub fn open(storage: S, origin: &str, signer: NoteSigner) -> Result<Self, LogError> {
        if signer.kind() != KeyKind::Ed25519 || signer.name() != origin {
            return Err(LogError::WrongKey {
                origin: origin.to_owned(),
            });
        }
        let verifier = signer.verifier();
        let mut log = Self {
            storage,
            origin: origin.to_owned(),
            signer,
            verifier,
            tree: Tree::new(),
            tail: Vec::new(),
            tail_written: 0,
            synced_size: 0,
            tiles_size: 0,
            published: None,
            history: Vec::new(),
            prepared_at: None,
            failed: false,
        };
        let mut history: Vec<u64> = log
            .storage
            .list(HISTORY_PREFIX)?
            .iter()
            .filter_map(|p| p[HISTORY_PREFIX.len()..].parse().ok())
            .collect();
        history.sort_unstable();
        log.history = history;
        if let Some(bytes) = log.storage.read(CHECKPOINT_PATH)? {
            let text = String::from_utf8(bytes).map_err(|_| NoteError::Malformed("not UTF-8"))?;
            let cp = open_checkpoint(&text, origin, &log.verifier)?;
            log.load_leaf_tiles(cp.size)?;
            if log.tree.root() != cp.root {
                return Err(LogError::Corrupt {
                    path: CHECKPOINT_PATH.to_owned(),
                    index: None,
                    what: "the level-0 tiles do not hash to the checkpoint's root",
                });
            }
            log.synced_size = cp.size;
            log.tiles_size = cp.size;
            log.published = Some((SignedNote { text }, cp));
        }
        log.recover_entries()?;
        Ok(log)
    }

    /// Loads the leaf hashes of `[0, size)` from the level-0 tiles.
    fn load_leaf_tiles(&mut self, size: u64) -> Result<(), LogError> {
        let full = size / HASHES_PER_TILE;
        for n in 0..full {
            let path = TilePath::hashes(0, n, 256).to_string();
            for h in self.read_tile(&path, 256)? {
                self.tree.push(h);
            }
        }
        let w = size % HASHES_PER_TILE;
        if w > 0 {
            let partial = TilePath::hashes(0, full, w as u16).to_string();
            let hashes = match self.storage.read(&partial)? {
                Some(b) => decode_tile(&b, w as u16).map_err(|source| LogError::Malformed {
                    path: partial,
                    source,
                })?,
                None => {
                    let path = TilePath::hashes(0, full, 256).to_string();
                    let mut all = self.read_tile(&path, 256)?;
                    all.truncate(w as usize);
                    all
                }
            };
            for h in hashes {
                self.tree.push(h);
            }
        }
        Ok(())
    }

    fn read_tile(&self, path: &str, width: u16) -> Result<Vec<Hash>, LogError> {
        let bytes = self.storage.read(path)?.ok_or_else(|| LogError::Missing {
            path: path.to_owned(),
        })?;
        decode_tile(&bytes, width).map_err(|source| LogError::Malformed {
            path: path.to_owned(),
            source,
        })
    }

    /// Re-reads the entry bundles from the bundle holding the current size on.
    fn recover_entries(&mut self) -> Result<(), LogError> {
        let checkpointed = self.tree.size();
        let mut n = checkpointed / ENTRIES_PER_BUNDLE;
        loop {
            let known = self.tree.size() - n * ENTRIES_PER_BUNDLE;
            let full_path = bundle_path(n, ENTRIES_PER_BUNDLE);
            let full = match self.storage.read(&full_path)? {
                Some(bytes) => decode_bundle(&bytes, ENTRIES_PER_BUNDLE)
                    .ok()
                    .map(|e| (bytes, e)),
                None => None,
            };
            if let Some((bytes, entries)) = full {
                self.check_known(&full_path, n, &entries[..known as usize])?;
                for e in &entries[known as usize..] {
                    self.tree.push(leaf_hash(e));
                }
                // Written by a process that may have died before syncing it.
                self.storage.write(&full_path, &bytes)?;
                n += 1;
                continue;
            }
            // The widest partial bundle of index n that decodes.
            let prefix = format!("{full_path}.p/");
            let mut widths: Vec<u64> = self
                .storage
                .list(&prefix)?
                .iter()
                .filter_map(|p| TilePath::parse(p).ok())
                .filter(|t| t.index == n && t.is_partial())
                .map(|t| u64::from(t.width))
                .collect();
            widths.sort_unstable_by(|a, b| b.cmp(a));
            for w in widths.into_iter().filter(|&w| w >= known) {
                let path = bundle_path(n, w);
                let Some(bytes) = self.storage.read(&path)? else {
                    continue;
                };
                let Ok(entries) = decode_bundle(&bytes, w) else {
                    continue;
                };
                self.check_known(&path, n, &entries[..known as usize])?;
                for e in &entries[known as usize..] {
                    self.tree.push(leaf_hash(e));
                }
                self.tail = entries;
                break;
            }
            if known > 0 && self.tail.is_empty() {
                return Err(LogError::Missing {
                    path: format!("{prefix}{known}"),
                });
            }
            return Ok(());
        }
    }

    /// Checks that re-read entries hash to the leaves the tree already has.
    fn check_known(&self, path: &str, bundle: u64, entries: &[Vec<u8>]) -> Result<(), LogError> {
        for (i, e) in entries.iter().enumerate() {
            let index = bundle * ENTRIES_PER_BUNDLE + i as u64;
            if self.tree.leaf(index) != Some(leaf_hash(e)) {
                return Err(LogError::Corrupt {
                    path: path.to_owned(),
                    index: Some(index),
                    what: "the entry does not hash to the checkpointed leaf",
                });
            }
        }
        Ok(())
    }

    fn check_usable(&self) -> Result<(), LogError> {
        if self.failed {
            Err(LogError::Failed)
        } else {
            Ok(())
        }
    }

    /// Appends entries; returns the index of the first. Bundles that fill are
    /// written at once; nothing is durable until a checkpoint is prepared.
    /// After an error the log refuses further changes until reopened.
    pub fn append(&mut self, entries: &[Vec<u8>]) -> Result<u64, LogError> {
        self.check_usable()?;
        if let Some((index, e)) = entries
            .iter()
            .enumerate()
            .find(|(_, e)| e.len() > MAX_ENTRY_SIZE)
        {
            return Err(LogError::EntryTooLarge {
                index,
                len: e.len(),
            });
        }
        let first = self.tree.size();
        for e in entries {
            self.tree.push(leaf_hash(e));
            self.tail.push(e.clone());
            if self.tail.len() as u64 == ENTRIES_PER_BUNDLE {
                let n = (self.tree.size() - 1) / ENTRIES_PER_BUNDLE;
                let bytes = encode_bundle(&self.tail).map_err(|source| LogError::Malformed {
                    path: bundle_path(n, ENTRIES_PER_BUNDLE),
                    source,
                })?;
                if let Err(e) = self
                    .storage
                    .write(&bundle_path(n, ENTRIES_PER_BUNDLE), &bytes)
                {
                    self.failed = true;
                    return Err(e.into());
                }
                self.tail.clear();
                self.tail_written = 0;
            }
        }
        Ok(first)
    }

    /// Number of entries.
    pub fn size(&self) -> u64 {
        self.tree.size()
    }

    /// Root hash of the whole tree.
    pub fn root(&self) -> Hash {
        self.tree.root()
    }

    /// The log's origin line.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The log's public key.
    pub fn verifier(&self) -> &NoteVerifier {
        &self.verifier
    }

    /// The in-memory tree (every stored hash).
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Writes the tail bundle and every tile the current size needs, syncs
    /// storage, then signs a checkpoint of the current size. The note is not
    /// served until [`Log::publish`]. `now_unix_ms` is the signing time,
    /// kept as [`Log::prepared_at`]: a tlog-checkpoint body carries no
    /// timestamp and an Ed25519 note signature signs none (witness
    /// cosignatures carry theirs), so it is not part of the note.
    ///
    /// The same as [`Log::stage_checkpoint`], [`StagedCheckpoint::store`]
    /// into this log's storage and [`Log::seal_checkpoint`]; a caller that
    /// shares the log between threads uses those three to store and sync
    /// without holding the log.
    pub fn prepare_checkpoint(&mut self, now_unix_ms: u64) -> Result<SignedNote, LogError> {
        let staged = self.stage_checkpoint()?;
        let stored = staged.store(&self.storage);
        self.seal_checkpoint(&staged, stored, now_unix_ms)
    }

    /// Computes the tail's partial entry bundle and every hash tile a
    /// checkpoint of the current size needs and that is not stored yet,
    /// without storing them. One staged checkpoint at a time: the caller
    /// stores it ([`StagedCheckpoint::store`], into this log's storage) and
    /// seals it before it stages the next. Appends may go on meanwhile.
    pub fn stage_checkpoint(&mut self) -> Result<StagedCheckpoint, LogError> {
        self.check_usable()?;
        let size = self.tree.size();
        let mut writes = Vec::new();
        let mut tail = None;
        let w = self.tail.len();
        if w > 0 && w != self.tail_written {
            let n = size / ENTRIES_PER_BUNDLE;
            let path = bundle_path(n, w as u64);
            let bytes = encode_bundle(&self.tail).map_err(|source| LogError::Malformed {
                path: path.clone(),
                source,
            })?;
            writes.push((path, bytes));
            tail = Some((n, w));
        }
        if size != self.tiles_size {
            for level in 0u8..64 {
                let tree_level = u32::from(level) * 8;
                let count = self.tree.complete_count(tree_level);
                if count == 0 {
                    break;
                }
                let old_count = if tree_level < 64 {
                    self.tiles_size >> tree_level
                } else {
                    0
                };
                let first_full = old_count / HASHES_PER_TILE;
                let full = count / HASHES_PER_TILE;
                for n in first_full..full {
                    let path = TilePath::hashes(level, n, 256).to_string();
                    let bytes =
                        self.hashes(&path, tree_level, n * HASHES_PER_TILE, HASHES_PER_TILE)?;
                    writes.push((path, bytes));
                }
                let width = count % HASHES_PER_TILE;
                if width > 0 && count != old_count {
                    let path = TilePath::hashes(level, full, width as u16).to_string();
                    let bytes = self.hashes(&path, tree_level, full * HASHES_PER_TILE, width)?;
                    writes.push((path, bytes));
                }
            }
        }
        Ok(StagedCheckpoint {
            size,
            root: self.tree.root(),
            writes,
            tail,
        })
    }

    /// Signs a checkpoint of a staged size once `stored` says its objects
    /// were stored and synced: the size is then durable (tiles and bundles
    /// up to it are not written again). A failed store fails the log (it
    /// must be reopened), as a failed write does.
    pub fn seal_checkpoint(
        &mut self,
        staged: &StagedCheckpoint,
        stored: Result<(), StorageError>,
        now_unix_ms: u64,
    ) -> Result<SignedNote, LogError> {
        self.check_usable()?;
        if let Err(e) = stored {
            self.failed = true;
            return Err(e.into());
        }
        if staged.size < self.synced_size || self.tree.root_at(staged.size)? != staged.root {
            return Err(LogError::NotThisTree { size: staged.size });
        }
        if let Some((n, w)) = staged.tail
            && self.tree.size() / ENTRIES_PER_BUNDLE == n
            && self.tail.len() >= w
        {
            self.tail_written = w;
        }
        self.synced_size = staged.size;
        self.tiles_size = staged.size;
        self.prepared_at = Some(now_unix_ms);
        let cp = Checkpoint {
            origin: self.origin.clone(),
            size: staged.size,
            root: staged.root,
        };
        Ok(SignedNote::sign(
            &cp.body(),
            &self.signer,
            now_unix_ms / 1000,
        )?)
    }

    fn hashes(
        &self,
        path: &str,
        tree_level: u32,
        start: u64,
        len: u64,
    ) -> Result<Vec<u8>, LogError> {
        let hashes = self
            .tree
            .hashes(tree_level, start, len)
            .ok_or(LogError::Corrupt {
                path: path.to_owned(),
                index: Some(start),
                what: "the tree lacks hashes for this tile",
            })?;
        Ok(hashes.concat())
    }

    /// Publishes a prepared checkpoint (possibly with cosignature lines added):
    /// it must be signed by this log, be of this tree, no larger than the last
    /// prepared size and no smaller than the published one. It is stored at
    /// `checkpoints/<size>` and `checkpoint`, and synced.
    pub fn publish(&mut self, note: &SignedNote) -> Result<(), LogError> {
        self.check_usable()?;
        if note.text.len() > MAX_NOTE_SIZE {
            return Err(NoteError::TooLarge(note.text.len()).into());
        }
        let cp = open_checkpoint(&note.text, &self.origin, &self.verifier)?;
        if cp.size > self.synced_size {
            return Err(LogError::NotPrepared {
                size: cp.size,
                prepared: self.synced_size,
            });
        }
        if self.tree.root_at(cp.size)? != cp.root {
            return Err(LogError::NotThisTree { size: cp.size });
        }
        if let Some((_, published)) = &self.published
            && cp.size < published.size
        {
            return Err(LogError::Rollback {
                size: cp.size,
                published: published.size,
            });
        }
        let history = format!("{HISTORY_PREFIX}{}", cp.size);
        let result = self
            .storage
            .write(&history, note.text.as_bytes())
            .and_then(|()| self.storage.write(CHECKPOINT_PATH, note.text.as_bytes()))
            .and_then(|()| self.storage.sync());
        if let Err(e) = result {
            self.failed = true;
            return Err(e.into());
        }
        if self.history.last().is_none_or(|&last| last < cp.size) {
            self.history.push(cp.size);
        }
        self.published = Some((note.clone(), cp));
        Ok(())
    }

    /// Up to `max` published checkpoints (`checkpoints/<size>`) of size
    /// `from` or more, by size, and the size to ask for next when more are
    /// stored. The notes are as stored: a reader verifies them.
    pub fn history(
        &self,
        from: u64,
        max: usize,
    ) -> Result<(Vec<SignedNote>, Option<u64>), LogError> {
        let start = self.history.partition_point(|&s| s < from);
        let sizes = &self.history[start..];
        let mut notes = Vec::with_capacity(sizes.len().min(max));
        for size in sizes.iter().take(max) {
            let path = format!("{HISTORY_PREFIX}{size}");
            let bytes = self
                .storage
                .read(&path)?
                .ok_or_else(|| LogError::Missing { path: path.clone() })?;
            let text = String::from_utf8(bytes).map_err(|_| LogError::Corrupt {
                path,
                index: None,
                what: "the checkpoint is not UTF-8",
            })?;
            notes.push(SignedNote { text });
        }
        let next = sizes.get(max).copied();
        Ok((notes, next))
    }

    /// The `now_unix_ms` of the last [`Log::prepare_checkpoint`] of this process.
    pub fn prepared_at(&self) -> Option<u64> {
        self.prepared_at
    }

    /// The last published checkpoint.
    pub fn checkpoint(&self) -> Option<SignedNote> {
        self.published.as_ref().map(|(n, _)| n.clone())
    }

    /// The entry at `index` (read from its bundle, checked against the tree).
    pub fn entry(&self, index: u64) -> Result<Vec<u8>, LogError> {
        let size = self.tree.size();
        if index >= size {
            return Err(LogError::NoSuchEntry { index, size });
        }
        let tail_start = size - self.tail.len() as u64;
        if index >= tail_start {
            return Ok(self.tail[(index - tail_start) as usize].clone());
        }
        let n = index / ENTRIES_PER_BUNDLE;
        let path = bundle_path(n, ENTRIES_PER_BUNDLE);
        let bytes = self
            .storage
            .read(&path)?
            .ok_or_else(|| LogError::Missing { path: path.clone() })?;
        let mut entries =
            decode_bundle(&bytes, ENTRIES_PER_BUNDLE).map_err(|source| LogError::Malformed {
                path: path.clone(),
                source,
            })?;
        let entry = entries.swap_remove((index % ENTRIES_PER_BUNDLE) as usize);
        if self.tree.leaf(index) != Some(leaf_hash(&entry)) {
            return Err(LogError::Corrupt {
                path,
                index: Some(index),
                what: "the entry does not hash to its leaf",
            });
        }
        Ok(entry)
    }

    /// The leaf hash of entry `index`.
    pub fn leaf_hash(&self, index: u64) -> Result<Hash, LogError> {
        self.tree.leaf(index).ok_or(LogError::NoSuchEntry {
            index,
            size: self.tree.size(),
        })
    }

    /// RFC 9162 inclusion proof of entry `index` in the tree of `tree_size`.
    pub fn inclusion_proof(&self, index: u64, tree_size: u64) -> Result<Vec<Hash>, LogError> {
        Ok(self.tree.inclusion_proof(index, tree_size)?)
    }

    /// RFC 9162 consistency proof between tree sizes `old` and `new`.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, LogError> {
        Ok(self.tree.consistency_proof(old, new)?)
    }

    /// The storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }
}
