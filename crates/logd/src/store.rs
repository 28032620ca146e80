//! The log and what it holds of each source, kept consistent with each
//! other (blocking I/O; callers run it off the async threads).
//!
//! Per source, the state (journal id, last record, its hash) advances only
//! together with the append of that source's leaves, under one lock; a
//! batch is acknowledged only after the storage is synced. The states are
//! written to `sources.json` with the log size they describe; on open, any
//! leaves appended after that size are replayed from the log itself, so the
//! file may lag but never disagrees with the log.
//!
//! The log is kept in files under the state directory, or in PostgreSQL
//! ([`LogBackend`], from `[storage]` in logd.toml); the source states stay
//! in a file either way. A storage failure is handled the same for both:
//! the store refuses every later write until logd is restarted. Every
//! method may block on the storage (the PostgreSQL client is synchronous
//! and runs a runtime of its own), so none may be called on an async
//! thread, except [`Store::head`], [`Store::sizes`] and [`Store::with_log`]
//! closures that read only what the log keeps in memory (size,
//! checkpoint, proofs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use nitrile_logclient::chain::{Checked, SourceState, check_batch};
use nitrile_logclient::leaf::{self, LeafError, LeafV1};
use nitrile_logclient::protocol::IngestBatch;
use nitrile_logclient::storage::Conninfo;
pub use nitrile_logclient::storage::LOG_DIR;
use nitrile_tlog::{
    FileStorage, Log, LogError, NoteSigner, PgStorage, SignedNote, Storage, StorageError,
};
use serde::{Deserialize, Serialize};

use crate::config::LogdConfig;

/// The file the source states are kept in.
pub const SOURCES_FILE: &str = "sources.json";
/// Largest sources file read.
pub const MAX_SOURCES_FILE: u64 = 64 * 1024 * 1024;

/// Why the log store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// the log failed (storage, signing, a missing entry)
    #[error("log")]
    Log(#[from] LogError),
    /// the log storage could not be synced
    #[error("log storage")]
    Storage(#[from] StorageError),
    /// the sources file could not be read or written
    #[error("sources file {}", path.display())]
    SourcesIo {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the sources file is not what logd writes
    #[error("sources file {} is malformed", path.display())]
    SourcesFormat {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// the sources file describes more of the log than the log holds: the
    /// log lost entries that were acknowledged
    #[error("the sources file describes a log of {file} entries, the log holds {log}")]
    LogShrank {
        /// Size in the file.
        file: u64,
        /// Size of the log.
        log: u64,
    },
    /// a stored leaf is not a leaf
    #[error("log entry {index} is not a valid leaf")]
    BadLeaf {
        /// The entry.
        index: u64,
        /// Why.
        #[source]
        source: LeafError,
    },
    /// an earlier sync failed, so nothing more is acknowledged
    #[error("the log storage failed earlier; restart logd")]
    Poisoned,
    /// the PostgreSQL database that keeps the log could not be opened
    #[error("could not open log `{log_name}` in the PostgreSQL database {target}")]
    Database {
        /// Its host(s) and database name (never the whole connection
        /// string, which may hold a password).
        target: String,
        /// The log's name in the database.
        log_name: String,
        /// Why.
        #[source]
        source: StorageError,
    },
}

/// The storage the log is kept in.
pub(crate) type LogStorage = Arc<dyn Storage>;

/// Where the log is kept.
#[derive(Debug)]
pub(crate) enum LogBackend {
    /// Files under this directory.
    Files(PathBuf),
    /// The rows of log `log_name` in a PostgreSQL database.
    Postgres {
        /// How to connect.
        conninfo: Conninfo,
        /// The log's name in the database.
        log_name: String,
    },
}

impl LogBackend {
    /// The backend `config` chooses: files under `<state>/log` unless
    /// `[storage] postgres` is set.
    pub(crate) fn of(config: &LogdConfig) -> Self {
        match &config.storage.postgres {
            None => Self::Files(config.state.join(LOG_DIR)),
            Some(conninfo) => Self::Postgres {
                conninfo: conninfo.clone(),
                log_name: config
                    .storage
                    .log_name
                    .as_ref()
                    .unwrap_or(&config.cell)
                    .as_str()
                    .to_owned(),
            },
        }
    }

    /// Opens the storage (blocking: connects to the database).
    fn open(self) -> Result<LogStorage, StoreError> {
        match self {
            Self::Files(dir) => Ok(Arc::new(FileStorage::open(&dir)?)),
            Self::Postgres { conninfo, log_name } => {
                let target = conninfo.target().to_owned();
                match PgStorage::connect(conninfo.danger_full_text(), &log_name) {
                    Ok(pg) => {
                        tracing::info!(database = %target, log = %log_name, "log kept in PostgreSQL");
                        Ok(Arc::new(OffAsyncDrop(Some(pg))))
                    }
                    Err(source) => Err(StoreError::Database {
                        target,
                        log_name,
                        source,
                    }),
                }
            }
        }
    }
}

/// A storage that is never dropped on an async thread: the synchronous
/// PostgreSQL client owns a runtime of its own, and tokio refuses (panics)
/// to drop a runtime inside another runtime's context, which is where the
/// last reference to logd's state may go away.
struct OffAsyncDrop<S: Storage>(Option<S>);

impl<S: Storage> OffAsyncDrop<S> {
    fn get(&self) -> &S {
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only when dropped"))
    }
}

impl<S: Storage> Drop for OffAsyncDrop<S> {
    fn drop(&mut self) {
        let Some(storage) = self.0.take() else { return };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Should the thread not start, the storage is dropped here.
            let _ = std::thread::Builder::new()
                .name("logd-storage-close".to_owned())
                .spawn(move || drop(storage));
        }
    }
}

impl<S: Storage> Storage for OffAsyncDrop<S> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.get().read(path)
    }
    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.get().write(path, bytes)
    }
    fn sync(&self) -> Result<(), StorageError> {
        self.get().sync()
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.get().list(prefix)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcesFile {
    log_size: u64,
    sources: BTreeMap<String, SourceState>,
}

struct Inner {
    log: Log<LogStorage>,
    sources: BTreeMap<String, SourceState>,
    /// Per source, where its latest batches ended: (seq, log index), newest
    /// last, at most [`RECENT_BATCH_ENDS`] (not persisted).
    recent: BTreeMap<String, std::collections::VecDeque<(u64, u64)>>,
    poisoned: bool,
}

/// How many batch ends are kept per source, to name a record that a
/// checkpoint covers while newer ones are not checkpointed yet.
const RECENT_BATCH_ENDS: usize = 64;

/// The log, read-locked.
pub(crate) struct LogGuard<'a>(std::sync::RwLockReadGuard<'a, Inner>);

impl LogGuard<'_> {
    /// The latest record of `source` known to lie in a tree of `size`:
    /// (seq, log index), under the lock this guard holds (a second read
    /// lock behind a waiting writer would never be granted).
    pub(crate) fn covered(&self, source: &str, size: u64) -> Option<(u64, u64)> {
        covered_in(&self.0, source, size)
    }
}

/// The latest record of `source` known to lie in a tree of `size`.
fn covered_in(inner: &Inner, source: &str, size: u64) -> Option<(u64, u64)> {
    let recent = inner
        .recent
        .get(source)
        .and_then(|ends| ends.iter().rev().find(|(_, i)| *i < size).copied());
    recent.or_else(|| {
        let s = inner.sources.get(source)?;
        s.acked_index
            .filter(|i| *i < size)
            .map(|i| (s.acked_seq, i))
    })
}

impl std::ops::Deref for LogGuard<'_> {
    type Target = Log<LogStorage>;
    fn deref(&self) -> &Log<LogStorage> {
        &self.0.log
    }
}

/// The log and the source states.
pub(crate) struct Store {
    inner: RwLock<Inner>,
    /// The log size known durable; held while making more durable, so
    /// concurrent ingests share one sync (group commit).
    durable: Mutex<u64>,
    /// The log's storage, to store and sync a staged checkpoint without
    /// holding the log: reads of the log go on during the sync.
    storage: LogStorage,
    sources_file: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("sources_file", &self.sources_file)
            .finish_non_exhaustive()
    }
}

/// What an ingest did.
#[derive(Debug)]
pub(crate) struct Ingested {
    /// The check's outcome (leaves appended, violation).
    pub(crate) checked: Checked,
    /// The log index of the first appended leaf.
    pub(crate) first_index: u64,
}

impl Store {
    /// Opens the log in `backend` and the source states in `state_dir`
    /// (blocking).
    pub(crate) fn open(
        state_dir: &Path,
        backend: LogBackend,
        origin: &str,
        signer: NoteSigner,
        now_unix_ms: u64,
    ) -> Result<Self, StoreError> {
        let storage = backend.open()?;
        let log = Log::open(Arc::clone(&storage), origin, signer)?;
        let sources_file = state_dir.join(SOURCES_FILE);
        let mut file = match std::fs::metadata(&sources_file) {
            Ok(m) if m.len() > MAX_SOURCES_FILE => {
                return Err(StoreError::SourcesIo {
                    path: sources_file,
                    source: std::io::Error::other("too large"),
                });
            }
            Ok(_) => {
                let bytes =
                    std::fs::read(&sources_file).map_err(|source| StoreError::SourcesIo {
                        path: sources_file.clone(),
                        source,
                    })?;
                serde_json::from_slice::<SourcesFile>(&bytes).map_err(|source| {
                    StoreError::SourcesFormat {
                        path: sources_file.clone(),
                        source,
                    }
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SourcesFile {
                log_size: 0,
                sources: BTreeMap::new(),
            },
            Err(source) => {
                return Err(StoreError::SourcesIo {
                    path: sources_file,
                    source,
                });
            }
        };
        let size = log.size();
        if file.log_size > size {
            return Err(StoreError::LogShrank {
                file: file.log_size,
                log: size,
            });
        }
        // Leaves appended after the file was written.
        for index in file.log_size..size {
            let leaf = leaf::decode(&log.entry(index)?)
                .map_err(|source| StoreError::BadLeaf { index, source })?;
            let state = file.sources.get(&leaf.source).copied().unwrap_or_else(|| {
                let genesis = nitrile_audit::genesis_hash(
                    nitrile_audit::FORMAT_VERSION,
                    &leaf.journal_id,
                    leaf.source.as_bytes(),
                );
                SourceState::empty(leaf.journal_id, genesis)
            });
            file.sources
                .insert(leaf.source.clone(), state.advanced(&leaf, Some(index)));
        }
        let store = Self {
            durable: Mutex::new(size),
            storage,
            inner: RwLock::new(Inner {
                log,
                sources: file.sources,
                recent: BTreeMap::new(),
                poisoned: false,
            }),
            sources_file,
        };
        store.persist(now_unix_ms)?;
        Ok(store)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks `batch` against its source's state, appends the leaves it
    /// may, makes them durable (entry bundle, tiles, sync) and advances the
    /// state. Returns only once the appended leaves are durable.
    pub(crate) fn ingest(
        &self,
        batch: &IngestBatch,
        now_unix_ms: u64,
    ) -> Result<Ingested, StoreError> {
        let (ingested, target) = self.append(batch)?;
        // Duplicates too: what the answer acknowledges must be durable.
        self.make_durable(target, now_unix_ms)?;
        Ok(ingested)
    }

    /// [`Store::ingest`] without waiting for durability: for logd's own
    /// journal, whose records are durable there already and acknowledged to
    /// no one. The next checkpoint makes the leaves durable; should logd
    /// stop before, they are ingested again from its journal (the source
    /// states saved never run ahead of the durable log).
    pub(crate) fn ingest_own(&self, batch: &IngestBatch) -> Result<Ingested, StoreError> {
        self.append(batch).map(|(ingested, _)| ingested)
    }

    /// Checks and appends `batch`; returns what it did and the log size
    /// after it.
    fn append(&self, batch: &IngestBatch) -> Result<(Ingested, u64), StoreError> {
        let (checked, first_index, target) = {
            let mut inner = self.write();
            if inner.poisoned {
                return Err(StoreError::Poisoned);
            }
            let checked = check_batch(inner.sources.get(&batch.journal.source), batch);
            let first_index = inner.log.size();
            if !checked.leaves.is_empty() {
                let mut entries = Vec::with_capacity(checked.leaves.len());
                for l in &checked.leaves {
                    entries.push(leaf::encode(l).map_err(|source| StoreError::BadLeaf {
                        index: first_index + entries.len() as u64,
                        source,
                    })?);
                }
                if let Err(e) = inner.log.append(&entries) {
                    inner.poisoned = true;
                    return Err(e.into());
                }
                let mut state = checked.state;
                let last_index = first_index + checked.leaves.len() as u64 - 1;
                state.acked_index = Some(last_index);
                inner.sources.insert(batch.journal.source.clone(), state);
                let ends = inner
                    .recent
                    .entry(batch.journal.source.clone())
                    .or_default();
                if ends.len() == RECENT_BATCH_ENDS {
                    ends.pop_front();
                }
                ends.push_back((state.acked_seq, last_index));
            }
            (checked, first_index, inner.log.size())
        };
        Ok((
            Ingested {
                checked,
                first_index,
            },
            target,
        ))
    }

    /// Makes the log durable up to at least `target` entries: entry
    /// bundles, tiles, sync (a prepared checkpoint, not published). One
    /// caller syncs for all that wait meanwhile.
    fn make_durable(&self, target: u64, now_unix_ms: u64) -> Result<(), StoreError> {
        let mut durable = self.durable.lock().unwrap_or_else(PoisonError::into_inner);
        if *durable >= target {
            return Ok(());
        }
        self.prepare_locked(&mut durable, now_unix_ms).map(|_| ())
    }

    /// Stages the tiles of the current size under the log's lock, stores
    /// and syncs them without it (the slow part: reads and appends go on),
    /// then seals the checkpoint under the lock again. The caller holds
    /// `durable`, so one checkpoint is staged at a time.
    fn prepare_locked(
        &self,
        durable: &mut u64,
        now_unix_ms: u64,
    ) -> Result<SignedNote, StoreError> {
        let staged = {
            let mut inner = self.write();
            if inner.poisoned {
                return Err(StoreError::Poisoned);
            }
            match inner.log.stage_checkpoint() {
                Ok(s) => s,
                Err(e) => {
                    inner.poisoned = true;
                    return Err(e.into());
                }
            }
        };
        let stored = staged.store(&*self.storage);
        let mut inner = self.write();
        match inner.log.seal_checkpoint(&staged, stored, now_unix_ms) {
            Ok(note) => {
                *durable = staged.size();
                Ok(note)
            }
            Err(e) => {
                inner.poisoned = true;
                Err(e.into())
            }
        }
    }

    /// Makes everything appended durable and signs a checkpoint of it (not
    /// yet published).
    pub(crate) fn prepare_checkpoint(&self, now_unix_ms: u64) -> Result<SignedNote, StoreError> {
        let mut durable = self.durable.lock().unwrap_or_else(PoisonError::into_inner);
        self.prepare_locked(&mut durable, now_unix_ms)
    }

    /// What the log holds of `source`.
    pub(crate) fn head(&self, source: &str) -> Option<SourceState> {
        self.read().sources.get(source).copied()
    }

    /// Writes the source states with the log size they describe (atomic
    /// replace, fsync), after making that size durable.
    pub(crate) fn persist(&self, now_unix_ms: u64) -> Result<(), StoreError> {
        let (bytes, size) = {
            // Lock order everywhere: durable, then the log.
            let mut durable = self.durable.lock().unwrap_or_else(PoisonError::into_inner);
            let mut inner = self.write();
            if inner.poisoned {
                return Err(StoreError::Poisoned);
            }
            if *durable < inner.log.size() {
                if let Err(e) = inner.log.prepare_checkpoint(now_unix_ms) {
                    inner.poisoned = true;
                    return Err(e.into());
                }
                *durable = inner.log.size();
            }
            let file = SourcesFile {
                log_size: inner.log.size(),
                sources: inner.sources.clone(),
            };
            (
                serde_json::to_vec_pretty(&file).map_err(|source| StoreError::SourcesFormat {
                    path: self.sources_file.clone(),
                    source,
                })?,
                file.log_size,
            )
        };
        nitrile_fs::write_atomic(&self.sources_file, &bytes, 0o600).map_err(|e| {
            StoreError::SourcesIo {
                path: self.sources_file.clone(),
                source: e.into(),
            }
        })?;
        tracing::debug!(size, "source states saved");
        Ok(())
    }

    /// The log for reading, waiting for the lock (blocking).
    pub(crate) fn read_log(&self) -> LogGuard<'_> {
        LogGuard(self.read())
    }

    /// The log for reading if no writer holds it now, without waiting.
    pub(crate) fn try_read_log(&self) -> Option<LogGuard<'_>> {
        match self.inner.try_read() {
            Ok(g) => Some(LogGuard(g)),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(LogGuard(p.into_inner())),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Runs `f` with the log for reading (off the async threads if `f`
    /// reads the storage).
    pub(crate) fn with_log<R>(&self, f: impl FnOnce(&Log<LogStorage>) -> R) -> R {
        f(&self.read().log)
    }

    /// The log size and the size of the last published checkpoint.
    pub(crate) fn sizes(&self, origin: &str, verifier: &nitrile_tlog::NoteVerifier) -> (u64, u64) {
        let inner = self.read();
        let published = inner
            .log
            .checkpoint()
            .and_then(|n| nitrile_tlog::open_checkpoint(&n.text, origin, verifier).ok())
            .map_or(0, |c| c.size);
        (inner.log.size(), published)
    }

    /// Publishes `note` as the log's checkpoint.
    pub(crate) fn publish(&self, note: &SignedNote) -> Result<(), StoreError> {
        self.write().log.publish(note)?;
        Ok(())
    }

    /// Decodes the leaves `start..start + count` (fewer at the end of the
    /// log).
    pub(crate) fn leaves(&self, start: u64, count: u64) -> Result<Vec<LeafV1>, StoreError> {
        let inner = self.read();
        let end = start.saturating_add(count).min(inner.log.size());
        (start..end)
            .map(|index| {
                leaf::decode(&inner.log.entry(index)?)
                    .map_err(|source| StoreError::BadLeaf { index, source })
            })
            .collect()
    }
}
