//! A log's objects as rows of a PostgreSQL table, for a replicated deployment.
//!
//! Every log shares one table, `tlog_objects(log, path, bytes)`, keyed by
//! `(log, path)`; a [`PgStorage`] sees only the rows of its own log name.
//!
//! Durability: writes are buffered in one open transaction of the storage's
//! own session, which [`Storage::sync`] commits. The session runs with
//! `synchronous_commit = on` and [`PgStorage::connect`] refuses a server with
//! `fsync = off`, so a `COMMIT` returns only after its WAL record is flushed to
//! durable storage (and, with synchronous standbys configured on the server,
//! replicated to them). A crash before the commit rolls back every write
//! since the last sync and none before it: the store is then exactly as it was
//! at the last successful sync, a stronger state than the file store's (where
//! some unsynced writes may survive). Each object write is one `INSERT ... ON
//! CONFLICT DO UPDATE` statement, so a reader never sees part of an object.
//! Writes of `checkpoint` and `checkpoints/*` commit at once, as the file
//! store makes them durable at once.
//!
//! If a buffered write or a commit fails, the writes buffered since the last
//! sync are lost (PostgreSQL aborts the whole transaction), so every later
//! [`Storage::sync`] of this `PgStorage` fails: the caller must not sign a
//! checkpoint over objects it believes are stored. Open a new `PgStorage`
//! (and reopen the log on it) to continue from the committed state.
//!
//! What this does not do: TLS (connect over a unix socket or loopback), or
//! reconnect after the connection is lost.

use std::fmt;
use std::sync::Mutex;

use postgres::{Client, NoTls};

use crate::storage::{MAX_OBJECT_SIZE, Storage, StorageError, check_path};

/// The longest log name [`PgStorage::connect`] accepts.
pub const MAX_LOG_NAME: usize = 256;

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS tlog_objects (\
     log text NOT NULL, \
     path text COLLATE \"C\" NOT NULL, \
     bytes bytea NOT NULL, \
     PRIMARY KEY (log, path))";

const UPSERT: &str = "INSERT INTO tlog_objects (log, path, bytes) VALUES ($1, $2, $3) \
     ON CONFLICT (log, path) DO UPDATE SET bytes = EXCLUDED.bytes";

/// The bytes, unless larger than `$3` (then NULL), and the length: an
/// oversized object is never transferred.
const READ: &str = "SELECT CASE WHEN octet_length(bytes) > $3 THEN NULL ELSE bytes END, \
     octet_length(bytes) FROM tlog_objects WHERE log = $1 AND path = $2";

const LIST: &str = "SELECT path FROM tlog_objects \
     WHERE log = $1 AND path LIKE $2 ESCAPE '\\' ORDER BY path COLLATE \"C\"";

/// Why the database was refused (the cause of a [`StorageError::Database`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgRefusal {
    /// the server runs with `fsync = off`: a commit is not durable
    #[error("the server runs with fsync = off, so a commit is not durable")]
    FsyncOff,
    /// the log name is empty or longer than MAX_LOG_NAME bytes
    #[error("the log name is empty or longer than {MAX_LOG_NAME} bytes")]
    LogName,
    /// writes buffered since the last sync were rolled back by an earlier failure
    #[error("writes since the last sync were lost by an earlier failure; reopen the storage")]
    WritesLost,
}

fn db(op: &'static str) -> impl FnOnce(postgres::Error) -> StorageError {
    move |e| StorageError::Database {
        op,
        source: Box::new(e),
    }
}

fn refused(op: &'static str, why: PgRefusal) -> StorageError {
    StorageError::Database {
        op,
        source: Box::new(why),
    }
}

struct Session {
    client: Client,
    /// A transaction is open with writes not yet committed.
    open: bool,
    /// Buffered writes were rolled back: sync must never succeed again.
    lost: bool,
}

impl Session {
    /// Rolls back after a failure inside the open transaction.
    fn abandon(&mut self) {
        if self.open {
            // Whatever the outcome, the buffered writes are gone.
            let _ = self.client.batch_execute("ROLLBACK");
            self.open = false;
            self.lost = true;
        }
    }

    fn commit(&mut self) -> Result<(), StorageError> {
        if self.lost {
            return Err(refused("sync", PgRefusal::WritesLost));
        }
        if !self.open {
            return Ok(());
        }
        self.open = false;
        if let Err(e) = self.client.batch_execute("COMMIT") {
            self.lost = true;
            return Err(db("commit")(e));
        }
        Ok(())
    }
}

/// Objects as rows of the `tlog_objects` table of a PostgreSQL database.
///
/// See the module documentation for when a write is durable.
pub struct PgStorage {
    log: String,
    session: Mutex<Session>,
}

impl fmt::Debug for PgStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection string may hold a password: never shown.
        f.debug_struct("PgStorage")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl PgStorage {
    /// Connects with `conninfo` (a libpq connection string or URL, without
    /// TLS), creates the table if it is missing, and opens the objects of the
    /// log named `log_name`.
    pub fn connect(conninfo: &str, log_name: &str) -> Result<Self, StorageError> {
        if log_name.is_empty() || log_name.len() > MAX_LOG_NAME {
            return Err(refused("connect", PgRefusal::LogName));
        }
        let mut client = Client::connect(conninfo, NoTls).map_err(db("connect"))?;
        client
            .batch_execute("SET synchronous_commit = on")
            .map_err(db("set synchronous_commit"))?;
        let fsync: String = client
            .query_one("SHOW fsync", &[])
            .and_then(|row| row.try_get(0))
            .map_err(db("show fsync"))?;
        if fsync != "on" {
            return Err(refused("connect", PgRefusal::FsyncOff));
        }
        client
            .batch_execute(CREATE_TABLE)
            .map_err(db("create table"))?;
        Ok(Self {
            log: log_name.to_owned(),
            session: Mutex::new(Session {
                client,
                open: false,
                lost: false,
            }),
        })
    }

    /// The log name this storage reads and writes.
    pub fn log_name(&self) -> &str {
        &self.log
    }

    fn session(&self) -> Result<std::sync::MutexGuard<'_, Session>, StorageError> {
        self.session.lock().map_err(|_| StorageError::Poisoned)
    }
}

/// `prefix` as a LIKE pattern matching the strings that start with it.
fn like_prefix(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '\\' | '%' | '_') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

impl Storage for PgStorage {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StorageError> {
        check_path(path)?;
        let mut s = self.session()?;
        let max = MAX_OBJECT_SIZE as i32;
        let row = match s.client.query_opt(READ, &[&self.log, &path, &max]) {
            Ok(row) => row,
            Err(e) => {
                s.abandon();
                return Err(db("read")(e));
            }
        };
        let Some(row) = row else { return Ok(None) };
        let bytes: Option<Vec<u8>> = row.try_get(0).map_err(db("read"))?;
        bytes
            .filter(|b| b.len() <= MAX_OBJECT_SIZE)
            .map(Some)
            .ok_or_else(|| StorageError::TooLarge(path.to_owned()))
    }

    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StorageError> {
        check_path(path)?;
        if bytes.len() > MAX_OBJECT_SIZE {
            return Err(StorageError::TooLarge(path.to_owned()));
        }
        let mut s = self.session()?;
        if !s.open {
            s.client.batch_execute("BEGIN").map_err(db("begin"))?;
            s.open = true;
        }
        if let Err(e) = s.client.execute(UPSERT, &[&self.log, &path, &bytes]) {
            s.abandon();
            return Err(db("write")(e));
        }
        if path == "checkpoint" || path.starts_with("checkpoints/") {
            s.commit()?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.session()?.commit()
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let pattern = like_prefix(prefix);
        let mut s = self.session()?;
        let rows = match s.client.query(LIST, &[&self.log, &pattern]) {
            Ok(rows) => rows,
            Err(e) => {
                s.abandon();
                return Err(db("list")(e));
            }
        };
        rows.iter()
            .map(|row| row.try_get::<_, String>(0).map_err(db("list")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_prefix_escapes_wildcards() {
        assert_eq!(like_prefix(""), "%");
        assert_eq!(like_prefix("tile/"), "tile/%");
        assert_eq!(like_prefix("a_b%c\\"), "a\\_b\\%c\\\\%");
    }
}
