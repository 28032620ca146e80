//! The writing side: open (verify, optionally repair a torn tail), then
//! group-committed appends from any number of threads or tasks.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, BufReader, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use crate::error::JournalError;
use crate::format::{
    ChainHash, ChainHead, JournalHeader, JournalId, MAX_BATCH_BYTES, MAX_BATCH_RECORDS,
    MAX_RECORD_LEN, RECORD_OVERHEAD, Scanner, check_source, encode_record,
};

/// Proof that a record is durable: its sequence number and chain hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Receipt {
    /// The record's sequence number.
    pub seq: u64,
    /// The record's chain hash.
    pub hash: ChainHash,
}

/// Counters of a journal since it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JournalMetrics {
    /// Records made durable and acknowledged.
    pub appends: u64,
    /// Batches attempted (one write each).
    pub batches: u64,
    /// fdatasync calls that succeeded.
    pub fsyncs: u64,
    /// Batches whose write or sync failed.
    pub failures: u64,
    /// Sequence number of the last durable record (0: none).
    pub last_seq: u64,
}

/// What `open_repairing` moved out of the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTailRepair {
    /// Offset the journal was cut back to.
    pub offset: u64,
    /// Number of bytes moved.
    pub bytes: u64,
    /// The last good record's sequence number.
    pub last_seq: u64,
    /// The side file now holding the moved bytes.
    pub side_file: PathBuf,
}

/// How to open a journal. The defaults are the safe ones.
#[derive(Debug, Clone, Default)]
pub struct JournalOptions {
    danger_no_sync: bool,
    journal_id: Option<JournalId>,
}

impl JournalOptions {
    /// Safe defaults: every acknowledged record is fdatasync'd.
    pub fn new() -> Self {
        Self::default()
    }

    /// Skip fdatasync. Records are then acknowledged before they are durable
    /// and a crash can lose them: for benchmarks only, never for a journal
    /// anyone relies on.
    pub fn danger_no_sync(mut self, yes: bool) -> Self {
        self.danger_no_sync = yes;
        self
    }

    /// The id to give the journal if this open creates it (default: random
    /// from the operating system).
    pub fn journal_id(mut self, id: JournalId) -> Self {
        self.journal_id = Some(id);
        self
    }

    /// Opens (or creates) and fully verifies the journal at `path`; a torn
    /// tail is an error ([`JournalError::TornTail`]).
    pub fn open(&self, path: impl AsRef<Path>, source: &str) -> Result<Journal, JournalError> {
        self.open_inner(path.as_ref(), source, false)
            .map(|(j, _)| j)
    }

    /// Like [`JournalOptions::open`], but a torn tail is moved to the side
    /// file `<path>.torn-<offset>` (synced) and cut off. Corruption before the
    /// tail is still an error and is never repaired.
    pub fn open_repairing(
        &self,
        path: impl AsRef<Path>,
        source: &str,
    ) -> Result<(Journal, Option<TornTailRepair>), JournalError> {
        self.open_inner(path.as_ref(), source, true)
    }

    fn open_inner(
        &self,
        path: &Path,
        source: &str,
        repair: bool,
    ) -> Result<(Journal, Option<TornTailRepair>), JournalError> {
        let source = check_source(source.as_bytes())?;
        if !path.exists() {
            let id = match self.journal_id {
                Some(id) => id,
                None => JournalId::random(&mut rand_core::OsRng),
            };
            create(path, &JournalHeader::new(id, &source))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("opening"))?;
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => JournalError::Locked,
            std::fs::TryLockError::Error(source) => JournalError::Io {
                op: "locking",
                source,
            },
        })?;
        let (header, head, repaired) = verify_for_append(&file, path, repair)?;
        if header.source != source {
            return Err(JournalError::SourceMismatch {
                expected: source,
                found: header.source,
            });
        }
        let journal = Journal::start(file, header, head, self.danger_no_sync)?;
        Ok((journal, repaired))
    }
}

fn io_err(op: &'static str) -> impl Fn(io::Error) -> JournalError {
    move |source| JournalError::Io { op, source }
}

/// Writes a new journal holding only its header, atomically: a temporary
/// file is written and synced, then linked into place (never over an
/// existing file), and the directory is synced.
fn create(path: &Path, header: &JournalHeader) -> Result<(), JournalError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".creating");
    let tmp = PathBuf::from(tmp_name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(JournalError::Io {
                op: "removing a stale temporary file of",
                source,
            });
        }
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&tmp)
        .map_err(io_err("creating"))?;
    f.write_all(&header.encode())
        .and_then(|()| f.sync_all())
        .map_err(io_err("writing the header of"))?;
    drop(f);
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        // Another opener created it first; theirs is as good as ours.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(JournalError::Io {
                op: "creating",
                source,
            });
        }
    }
    sync_parent(path)
}

fn sync_parent(path: &Path) -> Result<(), JournalError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing the directory of"))
}

/// Reads the header, verifies every record and, if asked, repairs a torn tail.
fn verify_for_append(
    file: &File,
    path: &Path,
    repair: bool,
) -> Result<(JournalHeader, ChainHead, Option<TornTailRepair>), JournalError> {
    let len = file.metadata().map_err(io_err("reading"))?.len();
    let mut r = BufReader::new(file);
    let header = JournalHeader::read(&mut r, len)?;
    let mut scanner = Scanner::new(r, header.encoded_len(), len, header.genesis);
    for item in scanner.by_ref() {
        match item {
            Ok(_) => {}
            Err(JournalError::TornTail {
                offset,
                torn_bytes,
                last_seq,
                ..
            }) if repair => {
                let side_file = move_tail_aside(file, path, offset, torn_bytes)?;
                let report = TornTailRepair {
                    offset,
                    bytes: torn_bytes,
                    last_seq,
                    side_file,
                };
                return Ok((header, scanner.head(), Some(report)));
            }
            Err(e) => return Err(e),
        }
    }
    Ok((header, scanner.head(), None))
}

/// Copies `file[offset..]` to a new side file, syncs it and its directory,
/// then truncates and syncs the journal.
fn move_tail_aside(
    file: &File,
    path: &Path,
    offset: u64,
    bytes: u64,
) -> Result<PathBuf, JournalError> {
    let mut tail = vec![0u8; bytes as usize];
    file.read_exact_at(&mut tail, offset)
        .map_err(io_err("reading the torn tail of"))?;
    let (side_path, mut side) = (0..1000)
        .find_map(|k| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".torn-{offset}"));
            if k > 0 {
                name.push(format!("-{k}"));
            }
            let p = PathBuf::from(name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(&p)
            {
                Ok(f) => Some(Ok((p, f))),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
                Err(e) => Some(Err(e)),
            }
        })
        .unwrap_or_else(|| {
            Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "too many torn-tail side files",
            ))
        })
        .map_err(io_err("creating the torn-tail side file of"))?;
    side.write_all(&tail)
        .and_then(|()| side.sync_all())
        .map_err(io_err("writing the torn-tail side file of"))?;
    sync_parent(&side_path)?;
    file.set_len(offset)
        .and_then(|()| file.sync_all())
        .map_err(io_err("truncating"))?;
    Ok(side_path)
}

/// An open journal. Appends from any thread are batched by one writer thread:
/// one write and one fdatasync per batch. Dropping the journal writes what is
/// queued, then stops the writer and releases the file lock.
#[derive(Debug)]
pub struct Journal {
    shared: Arc<Shared>,
    header: JournalHeader,
    writer: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    poisoned: AtomicBool,
    appends: AtomicU64,
    batches: AtomicU64,
    fsyncs: AtomicU64,
    failures: AtomicU64,
    last_seq: AtomicU64,
    head: Mutex<Receipt>,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Request>,
    shutdown: bool,
}

#[derive(Debug)]
struct Request {
    payload: Vec<u8>,
    reply: Reply,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Journal {
    /// Opens (or creates) the journal at `path` for `source` with the safe
    /// defaults; see [`JournalOptions::open`].
    pub fn open(path: impl AsRef<Path>, source: &str) -> Result<Journal, JournalError> {
        JournalOptions::new().open(path, source)
    }

    /// Opens the journal at `path`, moving a torn tail aside; see
    /// [`JournalOptions::open_repairing`].
    pub fn open_repairing(
        path: impl AsRef<Path>,
        source: &str,
    ) -> Result<(Journal, Option<TornTailRepair>), JournalError> {
        JournalOptions::new().open_repairing(path, source)
    }

    fn start(
        file: File,
        header: JournalHeader,
        head: ChainHead,
        no_sync: bool,
    ) -> Result<Journal, JournalError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            poisoned: AtomicBool::new(false),
            appends: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_seq: AtomicU64::new(head.seq),
            head: Mutex::new(Receipt {
                seq: head.seq,
                hash: head.hash,
            }),
        });
        let writer = Writer {
            shared: Arc::clone(&shared),
            file,
            head,
            no_sync,
            poisoned: false,
        };
        let handle = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run())
            .map_err(io_err("starting the writer of"))?;
        Ok(Journal {
            shared,
            header,
            writer: Some(handle),
        })
    }

    /// Appends `payload` and returns once it is durable (written and
    /// fdatasync'd). Blocks the calling thread: from async code use
    /// [`Journal::submit`].
    pub fn append(&self, payload: &[u8]) -> Result<Receipt, JournalError> {
        self.submit(payload).wait()
    }

    /// Queues `payload` and returns a future that resolves once it is
    /// durable. Dropping the future does not withdraw the record: it may
    /// still be written.
    pub fn submit(&self, payload: &[u8]) -> Pending {
        let (reply, pending) = oneshot();
        if payload.is_empty() {
            reply.send(Err(JournalError::PayloadEmpty));
        } else if payload.len() > MAX_RECORD_LEN {
            reply.send(Err(JournalError::PayloadTooLarge { len: payload.len() }));
        } else if self.shared.poisoned.load(Ordering::Acquire) {
            reply.send(Err(JournalError::Poisoned));
        } else {
            let mut q = lock(&self.shared.queue);
            q.items.push_back(Request {
                payload: payload.to_vec(),
                reply,
            });
            drop(q);
            self.shared.wake.notify_one();
        }
        pending
    }

    /// Counters since the journal was opened.
    pub fn metrics(&self) -> JournalMetrics {
        let s = &self.shared;
        JournalMetrics {
            appends: s.appends.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            fsyncs: s.fsyncs.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            last_seq: s.last_seq.load(Ordering::Acquire),
        }
    }

    /// The last durable record (sequence 0 and the genesis hash when empty).
    pub fn head(&self) -> Receipt {
        *lock(&self.shared.head)
    }

    /// The journal's header.
    pub fn header(&self) -> &JournalHeader {
        &self.header
    }

    /// Whether an unrecoverable write failure has stopped the journal.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// The writer thread's state: the only place that knows the chain head.
struct Writer {
    shared: Arc<Shared>,
    file: File,
    head: ChainHead,
    no_sync: bool,
    poisoned: bool,
}

impl Writer {
    fn run(mut self) {
        while let Some(batch) = self.next_batch() {
            self.commit(batch);
        }
    }

    /// Waits for work; takes up to one batch's worth. `None` at shutdown
    /// once the queue is empty.
    fn next_batch(&self) -> Option<Vec<Request>> {
        let mut q = lock(&self.shared.queue);
        while q.items.is_empty() {
            if q.shutdown {
                return None;
            }
            q = self
                .shared
                .wake
                .wait(q)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let mut bytes = 0;
        let mut batch = Vec::new();
        while let Some(next) = q.items.front() {
            let size = next.payload.len() + RECORD_OVERHEAD;
            if !batch.is_empty()
                && (bytes + size > MAX_BATCH_BYTES || batch.len() >= MAX_BATCH_RECORDS)
            {
                break;
            }
            bytes += size;
            batch.extend(q.items.pop_front());
        }
        Some(batch)
    }

    fn commit(&mut self, batch: Vec<Request>) {
        if self.poisoned {
            for r in batch {
                r.reply.send(Err(JournalError::Poisoned));
            }
            return;
        }
        let size: usize = batch
            .iter()
            .map(|r| r.payload.len() + RECORD_OVERHEAD)
            .sum();
        let mut buf = Vec::with_capacity(size);
        let mut prev = self.head.hash;
        let mut receipts = Vec::with_capacity(batch.len());
        for (i, r) in batch.iter().enumerate() {
            let seq = self.head.seq + 1 + i as u64;
            prev = encode_record(&mut buf, &prev, seq, &r.payload);
            receipts.push(Receipt { seq, hash: prev });
        }
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        let result = self.file.write_all_at(&buf, self.head.end).and_then(|()| {
            if self.no_sync {
                Ok(())
            } else {
                self.file.sync_data()?;
                self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                let last = receipts[receipts.len() - 1];
                self.head = ChainHead {
                    seq: last.seq,
                    hash: last.hash,
                    end: self.head.end + buf.len() as u64,
                };
                *lock(&self.shared.head) = last;
                self.shared.last_seq.store(last.seq, Ordering::Release);
                self.shared
                    .appends
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for (r, receipt) in batch.into_iter().zip(receipts) {
                    r.reply.send(Ok(receipt));
                }
            }
            Err(e) => {
                self.shared.failures.fetch_add(1, Ordering::Relaxed);
                // Cut back to the last durable length so that the next batch
                // continues the chain from the last acknowledged record.
                if self.file.set_len(self.head.end).is_err() {
                    self.poisoned = true;
                    self.shared.poisoned.store(true, Ordering::Release);
                } else {
                    // Best effort: a later successful sync persists the size too.
                    let _ = self.file.sync_all();
                }
                let source = Arc::new(e);
                for r in batch {
                    r.reply.send(Err(JournalError::WriteFailed {
                        source: Arc::clone(&source),
                    }));
                }
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Whatever is still queued when the writer stops is refused, never
        // left waiting.
        let mut q = lock(&self.shared.queue);
        q.shutdown = true;
        let left: Vec<Request> = q.items.drain(..).collect();
        drop(q);
        for r in left {
            r.reply.send(Err(JournalError::Closed));
        }
    }
}

/// One-shot channel between the writer and one appender.
#[derive(Debug, Default)]
struct Slot {
    state: Mutex<SlotState>,
    ready: Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    result: Option<Result<Receipt, JournalError>>,
    waker: Option<Waker>,
}

fn oneshot() -> (Reply, Pending) {
    let slot = Arc::new(Slot::default());
    (
        Reply {
            slot: Some(Arc::clone(&slot)),
        },
        Pending { slot },
    )
}

/// The writer's end: answers once; dropped unanswered it answers `Closed`.
#[derive(Debug)]
struct Reply {
    slot: Option<Arc<Slot>>,
}

impl Reply {
    fn send(mut self, result: Result<Receipt, JournalError>) {
        if let Some(slot) = self.slot.take() {
            let mut st = lock(&slot.state);
            st.result = Some(result);
            let waker = st.waker.take();
            drop(st);
            slot.ready.notify_all();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.slot.is_some() {
            Reply {
                slot: self.slot.take(),
            }
            .send(Err(JournalError::Closed));
        }
    }
}

/// A queued append: a future that resolves to the record's [`Receipt`] once
/// it is durable, or to the error that kept it from being written. Usable
/// from any async runtime; [`Pending::wait`] blocks instead.
#[derive(Debug)]
#[must_use = "the record is only known to be durable once this resolves"]
pub struct Pending {
    slot: Arc<Slot>,
}

impl Pending {
    /// Blocks the calling thread until the outcome is known.
    pub fn wait(self) -> Result<Receipt, JournalError> {
        let mut st = lock(&self.slot.state);
        loop {
            if let Some(r) = st.result.take() {
                return r;
            }
            st = self
                .slot
                .ready
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Future for Pending {
    type Output = Result<Receipt, JournalError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = lock(&self.slot.state);
        match st.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_reply_answers_closed() {
        let (reply, pending) = oneshot();
        drop(reply);
        assert!(matches!(pending.wait(), Err(JournalError::Closed)));
    }

    #[test]
    fn bad_payloads_are_refused_before_queueing() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path().join("j"), "src").unwrap();
        assert!(matches!(j.append(b""), Err(JournalError::PayloadEmpty)));
        let big = vec![b'x'; MAX_RECORD_LEN + 1];
        assert!(matches!(
            j.append(&big),
            Err(JournalError::PayloadTooLarge { .. })
        ));
        assert_eq!(j.metrics().batches, 0);
        assert_eq!(j.append(&big[..MAX_RECORD_LEN]).unwrap().seq, 1);
    }
}
