//! The auditor's check of a whole log: fetch everything a checkpoint covers
//! from logd ([`fetch_log`]) or open a store, then recompute it all
//! ([`audit_log`]): every checkpoint's signature, its root against the
//! recomputed tree and its consistency with the one before, every entry
//! bundle and hash tile, and every source's journal replayed through the
//! entries ([`crate::chain::SourceChains`]). A log appended out of order
//! (duplicates, a forged continuation, a second journal) fails at the entry
//! where it breaks, even though its tree verifies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use nitrile_tlog::{
    AuditFailure, AuditReport, ENTRIES_PER_BUNDLE, HASHES_PER_TILE, Hash, NoteVerifier, ProofError,
    Storage, StorageError, TilePath, Tree,
};

use crate::chain::SourceChains;
use crate::reader::{LogReader, ReadError};
use crate::storage::LOG_DIR;

/// Log objects held in memory: what an auditor fetched from logd, audited
/// like a log directory.
#[derive(Debug, Default)]
pub struct MemStorage(Mutex<BTreeMap<String, Vec<u8>>>);

impl MemStorage {
    /// Keeps `bytes` at `path`.
    pub fn put(&self, path: &str, bytes: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.to_owned(), bytes.to_vec());
    }
}

impl Storage for MemStorage {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(path)
            .cloned())
    }

    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.put(path, bytes);
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }
}

/// What a long fetch reports as it goes (a progress bar, or nothing:
/// `()`).
pub trait FetchProgress {
    /// The fetch needs `objects` entry bundles and hash tiles.
    fn start(&mut self, objects: u64);
    /// What it fetches now.
    fn message(&mut self, text: &str);
    /// One more bundle or tile fetched.
    fn advance(&mut self);
}

impl FetchProgress for () {
    fn start(&mut self, _: u64) {}
    fn message(&mut self, _: &str) {}
    fn advance(&mut self) {}
}

/// The size in a checkpoint note's body (its second line), unverified: only
/// to know what to fetch; the audit verifies the note.
pub fn note_size(note: &str) -> Option<u64> {
    note.lines().nth(1)?.parse().ok()
}

/// Fetches into memory everything logd's latest checkpoint covers: the
/// checkpoint, every checkpoint published up to it, every entry bundle and
/// every hash tile a tree of its size needs. Nothing is verified here:
/// [`audit_log`] does. An empty store when logd published no checkpoint.
pub async fn fetch_log(
    reader: &mut LogReader,
    progress: &mut (dyn FetchProgress + Send),
) -> Result<MemStorage, ReadError> {
    let mem = MemStorage::default();
    let Some(note) = reader.checkpoint().await? else {
        return Ok(mem);
    };
    let size = note_size(&note).ok_or(ReadError::CheckpointWithoutSize)?;
    mem.put("checkpoint", note.as_bytes());
    let tiles: u64 = (0u32..8)
        .map(|level| (size >> (level * 8)).div_ceil(HASHES_PER_TILE))
        .sum();
    progress.start(size.div_ceil(ENTRIES_PER_BUNDLE) + tiles);
    progress.message("checkpoints");
    // Every checkpoint published up to it, each checked by the audit.
    let mut from = 0;
    loop {
        let page: crate::protocol::HistoryBody =
            reader.get_json(&format!("/v1/log/history/{from}")).await?;
        for note in &page.checkpoints {
            let at = note_size(note).ok_or(ReadError::HistoryWithoutSize)?;
            if at <= size {
                mem.put(&format!("checkpoints/{at}"), note.as_bytes());
            }
        }
        progress.message(&format!("checkpoints up to {}", page.next.unwrap_or(size)));
        match page.next {
            Some(next) if next > from && next <= size => from = next,
            _ => break,
        }
    }
    for n in 0..size.div_ceil(ENTRIES_PER_BUNDLE) {
        let need = (size - n * ENTRIES_PER_BUNDLE).min(ENTRIES_PER_BUNDLE);
        progress.advance();
        let full = TilePath::entries(n, 256).to_string();
        if let Some(b) = reader.tile(&full).await? {
            mem.put(&full, &b);
        } else if need < ENTRIES_PER_BUNDLE {
            let partial = TilePath::entries(n, need as u16).to_string();
            if let Some(b) = reader.tile(&partial).await? {
                mem.put(&partial, &b);
            }
        }
    }
    for level in 0u8..8 {
        let shift = u32::from(level) * 8;
        let count = size >> shift;
        if count == 0 {
            break;
        }
        for n in 0..count.div_ceil(HASHES_PER_TILE) {
            progress.advance();
            let width = (count - n * HASHES_PER_TILE).min(HASHES_PER_TILE);
            let path = TilePath::hashes(level, n, width as u16).to_string();
            if let Some(b) = reader.tile(&path).await? {
                mem.put(&path, &b);
            } else if width < HASHES_PER_TILE {
                // The log grew past it: the full tile starts with the same
                // hashes (and the audit checks them).
                let full = TilePath::hashes(level, n, 256).to_string();
                if let Some(b) = reader.tile(&full).await? {
                    let cut = (width as usize * 32).min(b.len());
                    mem.put(&path, &b[..cut]);
                }
            }
        }
    }
    Ok(mem)
}

/// The log directory of `dir`: itself when it holds a log, else its
/// [`LOG_DIR`] (logd's state directory was given).
pub fn store_dir(dir: &Path) -> PathBuf {
    let log = dir.join(LOG_DIR);
    if !dir.join("checkpoint").exists() && !dir.join("tile").exists() && log.is_dir() {
        log
    } else {
        dir.to_owned()
    }
}

/// What [`audit_log`] checked of a log: its tree, checkpoints and tiles,
/// and every source's journal replayed through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditedLog {
    /// The tree, checkpoints, bundles and tiles.
    pub tree: AuditReport,
    /// How many sources' journals were replayed.
    pub journals: usize,
    /// How many records were replayed (each once, in order).
    pub records: u64,
}

/// Audits the log in `storage` (the tree, every checkpoint, every tile)
/// against the log key `verifier`, and replays each source's journal
/// through its entries ([`SourceChains`]): one journal per source, each
/// record once and in order, every chain hash recomputed. The failure names
/// the storage path and entry where the log breaks.
pub fn audit_log(
    storage: &dyn Storage,
    verifier: &NoteVerifier,
) -> Result<AuditedLog, AuditFailure> {
    let mut chains = SourceChains::new();
    let tree = nitrile_tlog::audit_entries(storage, verifier.name(), verifier, &mut |_, e| {
        chains
            .push(e)
            .map_err(|b| Box::new(b) as nitrile_tlog::EntryCheckError)
    })?;
    Ok(AuditedLog {
        tree,
        journals: chains.sources(),
        records: chains.records(),
    })
}

/// Why a proof could not be computed from a stored log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoredTreeError {
    /// the store could not be read
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// a level-0 hash tile is missing
    #[error("the log holds neither {full} nor {partial}")]
    NoTile {
        /// The full tile's path.
        full: String,
        /// The partial tile's path.
        partial: String,
    },
    /// a level-0 hash tile is shorter than the tree needs
    #[error("tile {path} is cut short")]
    CutShort {
        /// The tile's path.
        path: String,
    },
    /// the tree has no such proof (sizes reversed or beyond the tree)
    #[error("no consistency proof from {from} to {to}")]
    NoProof {
        /// The older size.
        from: u64,
        /// The newer size.
        to: u64,
        /// Why.
        #[source]
        source: ProofError,
    },
}

/// The tree of the first `size` leaves of a stored log, from its level-0
/// hash tiles (which an audit checks against the entries).
pub fn stored_tree(storage: &dyn Storage, size: u64) -> Result<Tree, StoredTreeError> {
    let mut tree = Tree::new();
    for n in 0..size.div_ceil(HASHES_PER_TILE) {
        let width = (size - n * HASHES_PER_TILE).min(HASHES_PER_TILE);
        let full = TilePath::hashes(0, n, 256).to_string();
        let bytes = match storage.read(&full)? {
            Some(b) => b,
            None => {
                let partial = TilePath::hashes(0, n, width as u16).to_string();
                match storage.read(&partial)? {
                    Some(b) => b,
                    None => return Err(StoredTreeError::NoTile { full, partial }),
                }
            }
        };
        let need = width as usize * 32;
        if bytes.len() < need {
            return Err(StoredTreeError::CutShort { path: full });
        }
        for h in bytes[..need].chunks_exact(32) {
            let mut leaf: Hash = [0u8; 32];
            leaf.copy_from_slice(h);
            tree.push(leaf);
        }
    }
    Ok(tree)
}

/// The consistency proof from the tree of `from` leaves to the one of `to`
/// of a stored log, computed from its level-0 hash tiles.
pub fn stored_consistency_proof(
    storage: &dyn Storage,
    from: u64,
    to: u64,
) -> Result<Vec<Hash>, StoredTreeError> {
    stored_tree(storage, to)?
        .consistency_proof(from, to)
        .map_err(|source| StoredTreeError::NoProof { from, to, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leaf::{self, LeafV1};
    use nitrile_audit::{FORMAT_VERSION, JournalId, genesis_hash, record_hash};
    use nitrile_tlog::{Log, NoteSigner, verify_consistency};

    const ORIGIN: &str = "local.nitrile/log";

    #[test]
    fn the_note_size_is_its_second_line() {
        assert_eq!(
            note_size("local.nitrile/log\n42\nAAAA=\n\n— sig\n"),
            Some(42)
        );
        assert_eq!(note_size("local.nitrile/log\n"), None);
    }

    /// The leaves of the first `n` records of one journal.
    fn journal_leaves(n: u64) -> Vec<Vec<u8>> {
        let source = "nitrile://local/host/h1";
        let id = JournalId([5; 16]);
        let mut prev = genesis_hash(FORMAT_VERSION, &id, source.as_bytes());
        (1..=n)
            .map(|seq| {
                let payload = format!(r#"{{"n":{seq}}}"#).into_bytes();
                let hash = record_hash(&prev, seq, &payload);
                prev = hash;
                leaf::encode(&LeafV1 {
                    source: source.into(),
                    journal_id: id,
                    seq,
                    hash,
                    payload,
                })
                .unwrap()
            })
            .collect()
    }

    /// A log in memory holding `leaves`, with a published checkpoint.
    fn log_of(leaves: &[Vec<u8>], signer: &NoteSigner) -> Log<MemStorage> {
        let signer = NoteSigner::from_skey(&signer.to_skey()).unwrap();
        let mut log = Log::open(MemStorage::default(), ORIGIN, signer).unwrap();
        log.append(leaves).unwrap();
        let note = log.prepare_checkpoint(1_700_000_000_000).unwrap();
        log.publish(&note).unwrap();
        log
    }

    #[test]
    fn a_log_in_order_verifies_and_a_record_logged_twice_does_not() {
        let signer = NoteSigner::generate(ORIGIN).unwrap();
        let leaves = journal_leaves(300);
        let log = log_of(&leaves, &signer);
        let audited = audit_log(log.storage(), &signer.verifier()).unwrap();
        assert_eq!(audited.tree.size, 300);
        assert_eq!((audited.journals, audited.records), (1, 300));

        // The tree of a log that took record 7 twice verifies; the journal
        // replay does not, at the second copy.
        let mut twice = leaves[..7].to_vec();
        twice.push(leaves[6].clone());
        let log = log_of(&twice, &signer);
        let failure = audit_log(log.storage(), &signer.verifier()).unwrap_err();
        assert_eq!(failure.index, Some(7), "{failure:?}");

        // Another key: refused.
        let rogue = NoteSigner::generate(ORIGIN).unwrap();
        let log = log_of(&leaves, &signer);
        assert!(audit_log(log.storage(), &rogue.verifier()).is_err());
    }

    #[test]
    fn consistency_proofs_come_from_the_stored_tiles() {
        let signer = NoteSigner::generate(ORIGIN).unwrap();
        let leaves = journal_leaves(600);
        let log = log_of(&leaves, &signer);
        let mem = log.storage();
        let mut tree = Tree::new();
        for l in &leaves {
            tree.push(nitrile_tlog::leaf_hash(l));
        }
        for (from, to) in [(1, 600), (256, 600), (300, 512), (599, 600)] {
            let proof = stored_consistency_proof(mem, from, to).unwrap();
            verify_consistency(
                from,
                to,
                &tree.root_at(from).unwrap(),
                &tree.root_at(to).unwrap(),
                &proof,
            )
            .unwrap();
        }
        assert!(matches!(
            stored_consistency_proof(mem, 10, 700),
            Err(StoredTreeError::NoTile { .. })
        ));
        assert!(matches!(
            stored_consistency_proof(mem, 500, 400),
            Err(StoredTreeError::NoProof { .. })
        ));
    }

    #[test]
    fn a_state_directory_names_its_log() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(store_dir(dir.path()), dir.path());
        std::fs::create_dir(dir.path().join(LOG_DIR)).unwrap();
        assert_eq!(store_dir(dir.path()), dir.path().join(LOG_DIR));
        std::fs::write(dir.path().join("checkpoint"), b"x").unwrap();
        assert_eq!(store_dir(dir.path()), dir.path());
    }
}
