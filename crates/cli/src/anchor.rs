//! The auditor's memory: the last checkpoint it verified of each log, so
//! that a log cut short, rewritten or deleted and started anew is refused
//! instead of verified as if it were the first look.
//!
//! One file per log under `<state>/checkpoints/` (the state directory is
//! `--state-dir DIR`, else `$XDG_STATE_HOME/nitrile`, else
//! `~/.local/state/nitrile`), named after the log's origin and a hash of
//! its verifier key, holding the signed checkpoint note, its size and root,
//! when it was verified and where from. A file is replaced atomically
//! (temporary file, fsync, rename, fsync of the directory) and only under
//! an exclusive lock on the log's lock file, held from the comparison with
//! the remembered checkpoint to the write, so two auditors running at once
//! cannot roll the memory back.
//!
//! A checkpoint is accepted only if it is the remembered one (same size and
//! root) or a larger tree that a verified RFC 9162 consistency proof links
//! to it; a smaller tree, another root of the same size, a failed or
//! missing proof, or no checkpoint at all where one was remembered are
//! refused ([`Refusal`]). The first checkpoint of a log is accepted as it
//! is (trust on first use), unless a checkpoint of the same origin is
//! remembered under another key: a log replaced with its key is refused
//! like any other rewrite. A remembered file is verified again when read
//! (its note against the log's key); one that does not verify is an error,
//! never a fresh start. Starting over is explicit: [`Anchors::forget`]
//! (`nitrile audit forget --log ORIGIN`).

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use nitrile_fs::FsError;
use nitrile_tlog::{
    Checkpoint, Hash, MAX_NOTE_SIZE, NoteError, NoteVerifier, ProofError, open_checkpoint,
    verify_consistency,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

/// Environment variable of the per-user state directory (XDG).
pub(crate) const STATE_ENV: &str = "XDG_STATE_HOME";
/// Largest remembered-checkpoint file read.
pub(crate) const MAX_ANCHOR_FILE: u64 = 2 * MAX_NOTE_SIZE as u64;
/// Most remembered-checkpoint files looked at by [`Anchors::forget`].
pub(crate) const MAX_ANCHOR_FILES: usize = 10_000;
/// The subdirectory of the state directory holding one file per log.
const CHECKPOINTS_DIR: &str = "checkpoints";

/// Where the auditor's memory is, for every verb that verifies a
/// checkpoint.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct AnchorArgs {
    /// The auditor's state directory, where the last checkpoint verified of
    /// each log is remembered [default: $XDG_STATE_HOME/nitrile, else
    /// ~/.local/state/nitrile].
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
}

/// Why the auditor's memory could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AnchorError {
    /// No directory to keep the memory in.
    #[error(
        "no state directory for the auditor's remembered checkpoints: set $XDG_STATE_HOME or \
         $HOME, or pass --state-dir DIR"
    )]
    NoStateDir,
    /// A file or directory could not be read, written or locked.
    #[error("auditor state {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A remembered file is not what this auditor wrote.
    #[error(
        "the remembered checkpoint {} of {origin} cannot be trusted ({what}); find out who \
         changed it, then delete it (or run `nitrile audit forget --log {origin}`) to start over",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The log.
        origin: String,
        /// What is wrong.
        what: String,
    },
    /// The log is not consistent with what this auditor verified before.
    #[error(transparent)]
    Refused(#[from] Box<Refusal>),
}

/// The last checkpoint an auditor verified of one log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Remembered {
    /// The log's origin.
    pub(crate) origin: String,
    /// The log's verifier key.
    pub(crate) log_vkey: String,
    /// The checkpoint's tree size.
    pub(crate) size: u64,
    /// Its root hash (hex).
    pub(crate) root: String,
    /// When it was verified (RFC 3339 UTC).
    pub(crate) verified_at: String,
    /// Where it was read from (`logd at ...`, a store, a database).
    pub(crate) source: String,
    /// The signed note itself.
    pub(crate) checkpoint: String,
}

impl Remembered {
    /// `size N, root R, verified T from S`.
    pub(crate) fn describe(&self) -> String {
        format!(
            "size {}, root {}, verified {} from {}",
            self.size, self.root, self.verified_at, self.source
        )
    }
}

/// How the log now differs from what was remembered.
#[derive(Debug)]
pub(crate) enum Conflict {
    /// It serves no checkpoint at all.
    NoCheckpoint,
    /// Its checkpoint is of a smaller tree.
    Smaller {
        /// The size it has now.
        size: u64,
    },
    /// Its checkpoint of the same size has another root.
    OtherRoot {
        /// That root (hex).
        root: String,
    },
    /// No consistency proof was given for the larger tree.
    NoProof {
        /// The size it has now.
        size: u64,
    },
    /// The log is signed by another key than the remembered checkpoint.
    OtherKey {
        /// The key it is signed by now.
        key: String,
    },
    /// The consistency proof to the larger tree does not verify.
    Inconsistent {
        /// The size it has now.
        size: u64,
        /// Why.
        source: ProofError,
    },
}

/// A log that is not consistent with the checkpoint this auditor verified
/// before: cut short, rewritten or deleted and started anew.
#[derive(Debug, thiserror::Error)]
#[error(
    "the log {} ({where_}) is NOT consistent with the checkpoint this auditor verified before \
     ({}): {}. Either the log was cut or rewritten (see `nitrile audit alerts`, keep the \
     evidence), or it was reset on purpose: then, and only then, start over with `nitrile \
     audit forget --log {}`",
    remembered.origin,
    remembered.describe(),
    conflict_text(found, remembered.size),
    remembered.origin
)]
pub(crate) struct Refusal {
    /// What was remembered.
    pub(crate) remembered: Remembered,
    /// Where the log was read now.
    pub(crate) where_: String,
    /// What is wrong.
    pub(crate) found: Conflict,
}

fn conflict_text(c: &Conflict, remembered: u64) -> String {
    match c {
        Conflict::NoCheckpoint => "it now serves no checkpoint at all".to_owned(),
        Conflict::Smaller { size } => {
            format!("its checkpoint now has size {size}, a smaller tree")
        }
        Conflict::OtherRoot { root } => {
            format!("its checkpoint of the same size has another root, {root}")
        }
        Conflict::NoProof { size } => {
            format!("there is no consistency proof from size {remembered} to its size {size}")
        }
        Conflict::OtherKey { key } => format!(
            "it is now under another key, {key}: a log replaced with its key is not the same \
             log"
        ),
        Conflict::Inconsistent { size, source } => format!(
            "its checkpoint of size {size} does not extend it (the consistency proof from size \
             {remembered} does not verify: {source})"
        ),
    }
}

/// What accepting a checkpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing is remembered of this log: the checkpoint is its first.
    First,
    /// The checkpoint is the remembered one.
    Same,
    /// A larger tree: a consistency proof from `from` to `to` is needed.
    Extends {
        /// The remembered size.
        from: u64,
        /// The new size.
        to: u64,
    },
    /// No checkpoint, and none remembered: nothing to do.
    Nothing,
}

/// What became of the memory when a checkpoint was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// Nothing was remembered: this checkpoint now is.
    First,
    /// It is the checkpoint remembered.
    Same,
    /// It extends the one remembered (proof verified) and now is.
    Extended,
    /// The log has no checkpoint yet and nothing was remembered.
    None,
}

/// The outcome of an accepted checkpoint, for the report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Accepted {
    /// What became of the memory.
    pub(crate) step: Outcome,
    /// What was remembered before, if anything.
    #[serde(skip)]
    pub(crate) previous: Option<Remembered>,
    /// The size remembered before, if any.
    pub(crate) from_size: Option<u64>,
    /// The size remembered now (none when the log has no checkpoint).
    pub(crate) size: Option<u64>,
    /// The file.
    pub(crate) file: PathBuf,
}

impl Accepted {
    /// One line for people.
    pub(crate) fn describe(&self) -> String {
        let file = self.file.display();
        match (self.step, &self.previous, self.size) {
            (Outcome::First, _, Some(size)) => {
                format!("first use: size {size} remembered in {file}")
            }
            (Outcome::Same, Some(p), _) => {
                format!(
                    "the checkpoint verified {} from {}",
                    p.verified_at, p.source
                )
            }
            (Outcome::Extended, Some(p), Some(size)) => format!(
                "consistent with size {} verified {}; size {size} remembered in {file}",
                p.size, p.verified_at
            ),
            _ => "no checkpoint yet, nothing remembered".to_owned(),
        }
    }
}

/// The auditor's state directory.
#[derive(Debug, Clone)]
pub(crate) struct Anchors {
    dir: PathBuf,
}

/// The default state directory: `$XDG_STATE_HOME/nitrile` (when set and
/// absolute), else `$HOME/.local/state/nitrile`.
fn default_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os(STATE_ENV).map(PathBuf::from)
        && d.is_absolute()
    {
        return Some(d.join("nitrile"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".local/state/nitrile"))
}

/// The file name of a log's memory: its origin made safe for a file name,
/// and 16 hex digits of the SHA-256 of its verifier key.
fn file_stem(log: &NoteVerifier) -> String {
    let safe: String = log
        .name()
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let digest = Sha256::digest(log.to_vkey().as_bytes());
    format!("{safe}-{}", hex::encode(&digest[..8]))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AnchorError + '_ {
    move |source| AnchorError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Anchors {
    /// The state directory named by `args`, else the default one. Nothing
    /// is created until a checkpoint is remembered.
    pub(crate) fn open(args: &AnchorArgs) -> Result<Self, AnchorError> {
        let dir = match &args.state_dir {
            Some(d) => d.clone(),
            None => default_dir().ok_or(AnchorError::NoStateDir)?,
        };
        Ok(Self {
            dir: dir.join(CHECKPOINTS_DIR),
        })
    }

    /// The directory of the remembered checkpoints.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding what is remembered of `log`.
    pub(crate) fn file(&self, log: &NoteVerifier) -> PathBuf {
        self.dir.join(format!("{}.json", file_stem(log)))
    }

    fn create_dir(&self) -> Result<(), AnchorError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))
    }

    /// Takes the exclusive lock of `log`'s memory, waiting for another
    /// auditor to finish with it.
    fn lock_file(&self, log: &NoteVerifier) -> Result<nix::fcntl::Flock<File>, AnchorError> {
        self.create_dir()?;
        let lock_path = self.dir.join(format!("{}.lock", file_stem(log)));
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| io(&lock_path)(std::io::Error::from(errno)))
    }

    /// Takes the exclusive lock of `log`'s memory (waiting for another
    /// auditor to finish) and reads what is remembered.
    pub(crate) fn lock(&self, log: &NoteVerifier) -> Result<Held, AnchorError> {
        let lock = self.lock_file(log)?;
        let file = self.file(log);
        let remembered = read_remembered(&file, log.name())?
            .map(|r| check_remembered(&file, r, log))
            .transpose()?;
        Ok(Held {
            _lock: lock,
            file,
            dir: self.dir.clone(),
            log: log.clone(),
            remembered,
        })
    }

    /// Every remembered log whose origin is `origin` (under any key).
    pub(crate) fn of_origin(
        &self,
        origin: &str,
    ) -> Result<Vec<(PathBuf, Remembered)>, AnchorError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut found = Vec::new();
        for entry in entries.take(MAX_ANCHOR_FILES) {
            let path = entry.map_err(io(&self.dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            // Unreadable or foreign files are not ours to judge here.
            if let Ok(Some(r)) = read_remembered(&path, origin)
                && r.origin == origin
            {
                found.push((path, r));
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    /// Forgets every remembered checkpoint of `origin` (under any key):
    /// the next verification of that log is a first use again. Returns
    /// what was forgotten.
    pub(crate) fn forget(&self, origin: &str) -> Result<Vec<Remembered>, AnchorError> {
        let mut forgotten = Vec::new();
        for (path, r) in self.of_origin(origin)? {
            // Under the log's lock, so that no auditor writes it meanwhile.
            let _lock = match NoteVerifier::from_vkey(&r.log_vkey) {
                Ok(log) => Some(self.lock_file(&log)?),
                Err(_) => None,
            };
            std::fs::remove_file(&path).map_err(io(&path))?;
            forgotten.push(r);
        }
        if !forgotten.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(forgotten)
    }
}

/// Reads a remembered file (`None` when there is none), at most
/// [`MAX_ANCHOR_FILE`] bytes.
fn read_remembered(path: &Path, origin: &str) -> Result<Option<Remembered>, AnchorError> {
    let corrupt = |what: String| AnchorError::Corrupt {
        path: path.to_owned(),
        origin: origin.to_owned(),
        what,
    };
    let text = match nitrile_fs::read_bounded_to_string(path, MAX_ANCHOR_FILE) {
        Ok(text) => text,
        Err(FsError::Missing { .. }) => return Ok(None),
        Err(FsError::TooLarge { max, .. }) => {
            return Err(corrupt(format!("larger than {max} bytes")));
        }
        Err(e) => return Err(io(path)(e.into())),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| corrupt(format!("not a remembered checkpoint: {e}")))
}

/// Checks that a remembered file is of `log` and that its note verifies
/// and says what the file says.
fn check_remembered(
    path: &Path,
    r: Remembered,
    log: &NoteVerifier,
) -> Result<Remembered, AnchorError> {
    let corrupt = |what: String| AnchorError::Corrupt {
        path: path.to_owned(),
        origin: log.name().to_owned(),
        what,
    };
    if r.origin != log.name() || r.log_vkey != log.to_vkey() {
        return Err(corrupt("it is of another log or key".into()));
    }
    let cp = open_checkpoint(&r.checkpoint, log.name(), log)
        .map_err(|e| corrupt(format!("its note does not verify against the log key: {e}")))?;
    if cp.size != r.size || hex::encode(cp.root) != r.root {
        return Err(corrupt("its size or root differ from its note's".into()));
    }
    Ok(r)
}

fn sync_dir(dir: &Path) -> Result<(), AnchorError> {
    nitrile_fs::sync_dir(dir).map_err(|e| io(dir)(e.into()))
}

/// Writes `bytes` to `path` owner-only with [`nitrile_fs::write_atomic`]: a
/// unique temporary file beside it, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AnchorError> {
    nitrile_fs::write_atomic(path, bytes, 0o600).map_err(|e| io(path)(e.into()))
}

/// A log's memory, locked: compare a checkpoint with it, then accept the
/// checkpoint (and remember it) or refuse it.
#[derive(Debug)]
pub(crate) struct Held {
    _lock: nix::fcntl::Flock<File>,
    file: PathBuf,
    dir: PathBuf,
    log: NoteVerifier,
    remembered: Option<Remembered>,
}

impl Held {
    /// What is remembered, if anything.
    #[cfg(test)]
    fn remembered(&self) -> Option<&Remembered> {
        self.remembered.as_ref()
    }

    /// A checkpoint of the same origin remembered under another key: the
    /// log was replaced together with its key (or a key rotated), which is
    /// refused like any other rewrite until the auditor forgets the origin.
    fn other_key(&self) -> Result<Option<Remembered>, AnchorError> {
        let anchors = Anchors {
            dir: self.dir.clone(),
        };
        let vkey = self.log.to_vkey();
        Ok(anchors
            .of_origin(self.log.name())?
            .into_iter()
            .map(|(_, r)| r)
            .find(|r| r.log_vkey != vkey))
    }

    fn open(&self, note: &str) -> Result<Checkpoint, NoteError> {
        open_checkpoint(note, self.log.name(), &self.log)
    }

    /// Compares the log's checkpoint `note` (`None`: the log has none),
    /// read from `where_`, with the remembered one: what accepting it
    /// needs, or the refusal. A note that does not verify against the log
    /// key is refused outright.
    pub(crate) fn check(&self, note: Option<&str>, where_: &str) -> anyhow::Result<Step> {
        let cp = note.map(|n| self.open(n)).transpose()?;
        let (cp, r) = match (cp, &self.remembered) {
            (None, None) => return Ok(Step::Nothing),
            (Some(_), None) => return Ok(Step::First),
            (None, Some(r)) => return Err(refuse(r, where_, Conflict::NoCheckpoint)),
            (Some(cp), Some(r)) => (cp, r),
        };
        if cp.size < r.size {
            return Err(refuse(r, where_, Conflict::Smaller { size: cp.size }));
        }
        if cp.size == r.size {
            let root = hex::encode(cp.root);
            if root != r.root {
                return Err(refuse(r, where_, Conflict::OtherRoot { root }));
            }
            return Ok(Step::Same);
        }
        Ok(Step::Extends {
            from: r.size,
            to: cp.size,
        })
    }

    /// Accepts the checkpoint `note` read from `where_`, with `proof` the
    /// consistency proof from the remembered size (needed when
    /// [`Held::check`] says [`Step::Extends`]; `None` when none was
    /// given), and remembers it, stamped `now`; or refuses it.
    pub(crate) fn accept(
        self,
        note: Option<&str>,
        proof: Option<&[Hash]>,
        where_: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<Accepted> {
        let step = self.check(note, where_)?;
        let step_name = match step {
            Step::First => Outcome::First,
            Step::Same => Outcome::Same,
            Step::Extends { .. } => Outcome::Extended,
            Step::Nothing => Outcome::None,
        };
        if matches!(step, Step::First | Step::Nothing)
            && let Some(r) = self.other_key()?
        {
            let found = Conflict::OtherKey {
                key: self.log.to_vkey(),
            };
            return Err(refuse(&r, where_, found));
        }
        let Some(note) = note else {
            return Ok(Accepted {
                step: step_name,
                previous: None,
                from_size: None,
                size: None,
                file: self.file.clone(),
            });
        };
        let cp = self.open(note)?;
        if let (Step::Extends { from, to }, Some(r)) = (step, &self.remembered) {
            let old_root = hash_of_hex(&r.root);
            let verified = match proof {
                None if from > 0 => Err(Conflict::NoProof { size: to }),
                _ => verify_consistency(from, to, &old_root, &cp.root, proof.unwrap_or(&[]))
                    .map(|_| ())
                    .map_err(|source| Conflict::Inconsistent { size: to, source }),
            };
            if let Err(found) = verified {
                return Err(refuse(r, where_, found));
            }
        }
        if step != Step::Same {
            let new = Remembered {
                origin: self.log.name().to_owned(),
                log_vkey: self.log.to_vkey(),
                size: cp.size,
                root: hex::encode(cp.root),
                verified_at: nitrile_audit::format_time(now),
                source: where_.to_owned(),
                checkpoint: note.to_owned(),
            };
            let mut text = serde_json::to_string_pretty(&new)?;
            text.push('\n');
            write_atomic(&self.file, text.as_bytes())?;
        }
        Ok(Accepted {
            step: step_name,
            from_size: self.remembered.as_ref().map(|r| r.size),
            previous: self.remembered.clone(),
            size: Some(cp.size),
            file: self.file.clone(),
        })
    }
}

/// The refusal of a log read from `where_` that is not consistent with `r`.
fn refuse(r: &Remembered, where_: &str, found: Conflict) -> anyhow::Error {
    AnchorError::Refused(Box::new(Refusal {
        remembered: r.clone(),
        where_: where_.to_owned(),
        found,
    }))
    .into()
}

/// A hex root as remembered (checked when read); all zeros if it is not,
/// which no proof verifies against.
fn hash_of_hex(text: &str) -> Hash {
    let mut h = [0u8; 32];
    if hex::decode_to_slice(text, &mut h).is_err() {
        return [0u8; 32];
    }
    h
}

/// The names of the witnesses among `witnesses` that cosigned `note`;
/// an error when `witnesses` is not empty and none did.
pub(crate) fn witnessed(note: &str, witnesses: &[NoteVerifier]) -> anyhow::Result<Vec<String>> {
    let by = nitrile_tlog::cosignatures(note, witnesses);
    if !witnesses.is_empty() && by.is_empty() {
        let size = note.lines().nth(1).unwrap_or("?");
        anyhow::bail!(
            "the log's checkpoint of size {size} carries no valid cosignature of the witness \
             the client config names ({}): it was not witnessed, so it is not accepted",
            witnesses
                .iter()
                .map(NoteVerifier::name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(by)
}

#[cfg(test)]
mod tests {
    use nitrile_tlog::{NoteSigner, SignedNote, Tree, leaf_hash};

    use super::*;

    const ORIGIN: &str = "local.nitrile/log";

    fn tree(leaves: &[&str]) -> Tree {
        let mut t = Tree::new();
        for l in leaves {
            t.push(leaf_hash(l.as_bytes()));
        }
        t
    }

    fn note(key: &NoteSigner, t: &Tree, size: u64) -> String {
        let cp = Checkpoint {
            origin: ORIGIN.to_owned(),
            size,
            root: t.root_at(size).unwrap(),
        };
        SignedNote::sign(&cp.body(), key, 1).unwrap().text
    }

    fn anchors(dir: &Path) -> Anchors {
        Anchors::open(&AnchorArgs {
            state_dir: Some(dir.to_owned()),
        })
        .unwrap()
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH
    }

    fn refusal(e: &anyhow::Error) -> &Refusal {
        match e.downcast_ref::<AnchorError>() {
            Some(AnchorError::Refused(r)) => r,
            _ => panic!("not a refusal: {e:#}"),
        }
    }

    #[test]
    fn the_first_checkpoint_is_remembered_and_a_consistent_growth_advances_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = anchors(dir.path());
        let key = NoteSigner::generate(ORIGIN).unwrap();
        let log = key.verifier();
        let t = tree(&["a", "b", "c", "d", "e"]);
        let n3 = note(&key, &t, 3);
        let held = a.lock(&log).unwrap();
        assert!(held.remembered().is_none());
        assert_eq!(held.check(Some(&n3), "here").unwrap(), Step::First);
        let ok = held.accept(Some(&n3), None, "here", now()).unwrap();
        assert_eq!((ok.step, ok.size), (Outcome::First, Some(3)));
        let file = a.file(&log);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0);

        // The same again: nothing to prove, nothing written.
        let held = a.lock(&log).unwrap();
        assert_eq!(held.remembered().unwrap().size, 3);
        assert_eq!(
            held.accept(Some(&n3), None, "here", now()).unwrap().step,
            Outcome::Same
        );

        // Growth, with the proof from 3 to 5.
        let n5 = note(&key, &t, 5);
        let held = a.lock(&log).unwrap();
        assert_eq!(
            held.check(Some(&n5), "here").unwrap(),
            Step::Extends { from: 3, to: 5 }
        );
        let proof = t.consistency_proof(3, 5).unwrap();
        let ok = held.accept(Some(&n5), Some(&proof), "here", now()).unwrap();
        assert_eq!(ok.step, Outcome::Extended);
        assert_eq!(ok.previous.unwrap().size, 3);
        assert_eq!(a.lock(&log).unwrap().remembered().unwrap().size, 5);
    }

    #[test]
    fn a_smaller_tree_another_root_and_a_bad_or_missing_proof_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = anchors(dir.path());
        let key = NoteSigner::generate(ORIGIN).unwrap();
        let log = key.verifier();
        let t = tree(&["a", "b", "c", "d", "e", "f"]);
        let n4 = note(&key, &t, 4);
        a.lock(&log)
            .unwrap()
            .accept(Some(&n4), None, "here", now())
            .unwrap();
        let remembered = std::fs::read(a.file(&log)).unwrap();

        // Smaller.
        let e = a
            .lock(&log)
            .unwrap()
            .accept(Some(&note(&key, &t, 3)), None, "there", now())
            .unwrap_err();
        assert!(matches!(refusal(&e).found, Conflict::Smaller { size: 3 }));
        let text = e.to_string();
        assert!(text.contains("size 4"), "{text}");
        assert!(text.contains(&hex::encode(t.root_at(4).unwrap())), "{text}");
        assert!(
            text.contains("nitrile audit forget --log local.nitrile/log"),
            "{text}"
        );

        // The same size, another tree (a rewritten history).
        let other = tree(&["a", "b", "x", "d"]);
        let e = a
            .lock(&log)
            .unwrap()
            .accept(Some(&note(&key, &other, 4)), None, "there", now())
            .unwrap_err();
        assert!(matches!(refusal(&e).found, Conflict::OtherRoot { .. }));

        // A larger tree that does not extend it: the honest-looking proof
        // of the other tree does not verify.
        let other = tree(&["a", "b", "x", "d", "e", "f"]);
        let n6 = note(&key, &other, 6);
        let proof = other.consistency_proof(4, 6).unwrap();
        let e = a
            .lock(&log)
            .unwrap()
            .accept(Some(&n6), Some(&proof), "there", now())
            .unwrap_err();
        assert!(matches!(refusal(&e).found, Conflict::Inconsistent { .. }));
        // Without a proof.
        let e = a
            .lock(&log)
            .unwrap()
            .accept(Some(&note(&key, &t, 6)), None, "there", now())
            .unwrap_err();
        assert!(matches!(refusal(&e).found, Conflict::NoProof { size: 6 }));
        // No checkpoint at all.
        let held = a.lock(&log).unwrap();
        let e = held.check(None, "there").unwrap_err();
        assert!(matches!(refusal(&e).found, Conflict::NoCheckpoint));
        // A note not signed by the log's key.
        let thief = NoteSigner::generate(ORIGIN).unwrap();
        assert!(held.check(Some(&note(&thief, &t, 6)), "there").is_err());
        drop(held);

        // Nothing refused was remembered.
        assert_eq!(std::fs::read(a.file(&log)).unwrap(), remembered);
    }

    #[test]
    fn an_edited_memory_is_an_error_and_forget_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let a = anchors(dir.path());
        let key = NoteSigner::generate(ORIGIN).unwrap();
        let log = key.verifier();
        let t = tree(&["a", "b", "c"]);
        a.lock(&log)
            .unwrap()
            .accept(Some(&note(&key, &t, 3)), None, "here", now())
            .unwrap();
        let file = a.file(&log);
        let text = std::fs::read_to_string(&file).unwrap();
        // Someone lowers the remembered size to let a cut log through.
        std::fs::write(&file, text.replace("\"size\": 3", "\"size\": 1")).unwrap();
        let e = a.lock(&log).unwrap_err();
        assert!(matches!(e, AnchorError::Corrupt { .. }), "{e}");
        std::fs::write(&file, &text).unwrap();

        // The same origin under another key (a log replaced with its key) is
        // refused, with a checkpoint or without one, and nothing is written.
        let other = NoteSigner::generate(ORIGIN).unwrap();
        assert!(a.lock(&other.verifier()).unwrap().remembered().is_none());
        for n in [Some(note(&other, &t, 2)), None] {
            let e = a
                .lock(&other.verifier())
                .unwrap()
                .accept(n.as_deref(), None, "here", now())
                .unwrap_err();
            assert!(e.to_string().contains("audit forget"), "{e}");
        }
        assert_eq!(a.of_origin(ORIGIN).unwrap().len(), 1);

        let forgotten = a.forget(ORIGIN).unwrap();
        assert_eq!(forgotten.len(), 1);
        assert!(a.lock(&log).unwrap().remembered().is_none());
        assert!(a.forget(ORIGIN).unwrap().is_empty());
        // Forgotten on purpose, the other key is a first use.
        a.lock(&other.verifier())
            .unwrap()
            .accept(Some(&note(&other, &t, 2)), None, "here", now())
            .unwrap();
    }

    #[test]
    fn witnessed_needs_a_cosignature_of_a_named_witness() {
        let key = NoteSigner::generate(ORIGIN).unwrap();
        let witness = NoteSigner::generate_cosigner("local.nitrile/witness").unwrap();
        let t = tree(&["a"]);
        let bare = note(&key, &t, 1);
        assert!(witnessed(&bare, &[]).unwrap().is_empty());
        assert!(witnessed(&bare, &[witness.verifier()]).is_err());
        let body = bare.split("\n\n").next().unwrap().to_owned() + "\n";
        let line = witness.sign_line(&body, 7).unwrap();
        let cosigned = SignedNote { text: bare.clone() }
            .with_signature_line(line.trim_end())
            .unwrap()
            .text;
        assert_eq!(
            witnessed(&cosigned, &[witness.verifier()]).unwrap(),
            vec!["local.nitrile/witness".to_owned()]
        );
    }
}
