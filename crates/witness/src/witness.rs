//! The cosigner: checks a checkpoint against what it last cosigned for the
//! same log and, if the log only grew, records it durably and cosigns it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use nitrile_tlog::{Hash, KeyKind, NoteError, NoteSigner, NoteVerifier};
use nitrile_witness_api::MAX_NOTE_SIZE;

use crate::state::{LogState, StateError, StateStore};

/// Why a checkpoint was not cosigned. [`AddError::status`] is the HTTP status
/// c2sp.org/tlog-witness prescribes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddError {
    /// The note is larger than [`MAX_NOTE_SIZE`], not a note, or has no
    /// origin line (400).
    #[error("the checkpoint is malformed: {0}")]
    Malformed(&'static str),
    /// No log with this origin is configured (404).
    #[error("unknown log origin {origin:?}")]
    UnknownOrigin {
        /// The origin line of the checkpoint (clipped).
        origin: String,
    },
    /// The note carries no valid signature of the log's key, or a signature
    /// line of the log's key that does not verify, or is not a checkpoint
    /// (403).
    #[error("the checkpoint is not signed by the log {origin}")]
    BadSignature {
        /// The origin.
        origin: String,
        /// Why.
        #[source]
        source: nitrile_tlog::NoteError,
    },
    /// The old size is above the checkpoint's size (400).
    #[error("old size {old_size} is above the checkpoint size {size}")]
    OldSizeAboveSize {
        /// The old size of the request.
        old_size: u64,
        /// The checkpoint size.
        size: u64,
    },
    /// The old size is not the size of the latest checkpoint this witness
    /// cosigned for the log (409; the answer carries `recorded`).
    #[error("old size {old_size} does not match the witness's recorded size {recorded}")]
    Conflict {
        /// The old size of the request.
        old_size: u64,
        /// The size the witness last cosigned (0 if none).
        recorded: u64,
    },
    /// A checkpoint of size zero whose root is not the empty tree's (422).
    #[error("a checkpoint of size 0 must have the empty tree's root")]
    EmptyTreeRoot,
    /// A consistency proof was sent with old size zero (422).
    #[error("old size is 0 but a consistency proof was sent")]
    ProofFromEmpty,
    /// The consistency proof from the recorded checkpoint to this one does
    /// not verify (422).
    #[error("the consistency proof from size {old_size} to {size} does not verify")]
    Inconsistent {
        /// The recorded (old) size.
        old_size: u64,
        /// The checkpoint size.
        size: u64,
        /// Why.
        #[source]
        source: nitrile_tlog::ProofError,
    },
    /// SPLIT VIEW: the log signed two checkpoints of the same size with
    /// different roots, the one this witness cosigned and this one (422).
    /// This is proof that the log misbehaved: raise an alert. The evidence
    /// (both notes) is kept in the state directory.
    #[error(
        "split view: log {origin} signed two different trees of size {size} (cosigned root {}, now root {})",
        B64.encode(recorded_root),
        B64.encode(submitted_root)
    )]
    SplitView {
        /// The log.
        origin: String,
        /// The size of both checkpoints.
        size: u64,
        /// The root this witness cosigned.
        recorded_root: Hash,
        /// The root of the refused checkpoint.
        submitted_root: Hash,
        /// Where the two signed notes were kept (if writing them worked).
        evidence: Option<PathBuf>,
    },
    /// The new state could not be made durable; nothing was cosigned (500).
    #[error("the witness state could not be saved; nothing was cosigned")]
    State(#[from] StateError),
    /// The cosignature could not be made (500).
    #[error("the cosignature could not be made")]
    Cosign(#[source] NoteError),
    /// `now` is zero or above 2^63 - 1 (500: the caller's clock is wrong).
    #[error("cosignature timestamp {0} is out of range")]
    BadTimestamp(u64),
}

impl AddError {
    /// The HTTP status of this refusal per c2sp.org/tlog-witness.
    pub fn status(&self) -> u16 {
        match self {
            Self::Malformed(_) | Self::OldSizeAboveSize { .. } => 400,
            Self::BadSignature { .. } => 403,
            Self::UnknownOrigin { .. } => 404,
            Self::Conflict { .. } => 409,
            Self::EmptyTreeRoot
            | Self::ProofFromEmpty
            | Self::Inconsistent { .. }
            | Self::SplitView { .. } => 422,
            Self::State(_) | Self::Cosign(_) | Self::BadTimestamp(_) => 500,
        }
    }

    /// Whether this refusal proves that the log misbehaved.
    pub fn is_split_view(&self) -> bool {
        matches!(self, Self::SplitView { .. })
    }
}

/// Why a witness could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The state directory could not be read.
    #[error("witness state")]
    State(#[from] StateError),
    /// The same origin was configured twice.
    #[error("log origin {0:?} is configured twice")]
    DuplicateOrigin(String),
    /// The cosigning key is not a `cosignature/v1` (type 0x04) key.
    #[error("the cosigning key is a {0:?} key, not a cosignature/v1 key")]
    NotACosigner(KeyKind),
    /// An origin is empty, too long or has a control character.
    #[error("log origin {0:?} is not a valid origin line")]
    BadOrigin(String),
}

/// A successful `add-checkpoint`: the cosignature line(s) to return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cosigned {
    /// The log.
    pub origin: String,
    /// The cosigned size.
    pub size: u64,
    /// The cosigned root.
    pub root: Hash,
    /// The cosignature lines (`— <name> <base64>`, without newline).
    pub lines: Vec<String>,
}

impl Cosigned {
    /// The response body: each line followed by a newline.
    pub fn body(&self) -> String {
        let mut out = String::new();
        for l in &self.lines {
            out.push_str(l);
            out.push('\n');
        }
        out
    }
}

/// The note text: up to and including the newline before the last blank
/// line (signed notes put their signatures after the last blank line).
pub(crate) fn note_body(note: &str) -> Option<&str> {
    note.rfind("\n\n").map(|i| &note[..=i])
}

/// Largest cosignature timestamp (the spec's 2^63 - 1).
pub const MAX_TIMESTAMP: u64 = (1 << 63) - 1;

fn check_origin(origin: &str) -> Result<(), OpenError> {
    if origin.is_empty() || origin.len() > 255 || origin.chars().any(char::is_control) {
        return Err(OpenError::BadOrigin(origin.chars().take(80).collect()));
    }
    Ok(())
}

/// A checkpoint witness: the known logs, their durable state and the
/// cosigning key.
#[derive(Debug)]
pub struct Witness {
    key: NoteSigner,
    logs: BTreeMap<String, NoteVerifier>,
    store: StateStore,
    /// The recorded state of each log; held locked from the old-size check
    /// to the durable save, so two requests cannot roll each other back.
    state: Mutex<BTreeMap<String, LogState>>,
}

impl Witness {
    /// A fresh cosigning key named `name` (e.g. `local.nitrile/witness/w1`).
    pub fn generate_key(name: &str) -> Result<NoteSigner, NoteError> {
        NoteSigner::generate_cosigner(name)
    }

    /// Opens the witness state in `state_dir` (created if missing) for the
    /// given logs (origin, the log's note verifier), cosigning with `key`
    /// (a `cosignature/v1` key, [`Witness::generate_key`]). State of logs
    /// no longer configured is kept on disk but not served.
    pub fn open(
        state_dir: &std::path::Path,
        key: NoteSigner,
        logs: impl IntoIterator<Item = (String, NoteVerifier)>,
    ) -> Result<Self, OpenError> {
        if key.kind() != KeyKind::CosignatureV1 {
            return Err(OpenError::NotACosigner(key.kind()));
        }
        let mut known = BTreeMap::new();
        for (origin, verifier) in logs {
            check_origin(&origin)?;
            if known.insert(origin.clone(), verifier).is_some() {
                return Err(OpenError::DuplicateOrigin(origin));
            }
        }
        let store = StateStore::open(state_dir)?;
        let state = store
            .load_all()?
            .into_iter()
            .map(|s| (s.origin.clone(), s))
            .collect();
        Ok(Self {
            key,
            logs: known,
            store,
            state: Mutex::new(state),
        })
    }

    /// The cosigning key's name.
    pub fn name(&self) -> &str {
        self.key.name()
    }

    /// The public cosigning key, as a vkey.
    pub fn vkey(&self) -> String {
        self.key.verifier().to_vkey()
    }

    /// The public cosigning key.
    pub fn verifier(&self) -> NoteVerifier {
        self.key.verifier()
    }

    /// The origins this witness cosigns for.
    pub fn origins(&self) -> impl Iterator<Item = &str> {
        self.logs.keys().map(String::as_str)
    }

    /// The latest cosigned state of a log, if any.
    pub fn recorded(&self, origin: &str) -> Option<LogState> {
        self.lock().get(origin).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LogState>> {
        // A panic while holding the lock cannot leave a half-updated map:
        // the map is only changed after the durable save succeeded.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// c2sp.org/tlog-witness `add-checkpoint`: verifies `note` (a checkpoint
    /// signed by its log), then that it extends the checkpoint last cosigned
    /// for its origin (`old_size` must be that size; `proof` is the
    /// consistency proof from it), records it durably and returns the
    /// cosignature made at `now` (POSIX seconds, not zero).
    ///
    /// A checkpoint of the recorded size with another root is a split view:
    /// refused with [`AddError::SplitView`] whatever the old size, logged,
    /// and both notes kept as evidence.
    pub fn add_checkpoint(
        &self,
        old_size: u64,
        proof: &[Hash],
        note: &str,
        now: u64,
    ) -> Result<Cosigned, AddError> {
        if note.len() > MAX_NOTE_SIZE {
            return Err(AddError::Malformed("note is too large"));
        }
        let body = note_body(note).ok_or(AddError::Malformed("no signature block"))?;
        let origin = body
            .split_once('\n')
            .map(|(o, _)| o)
            .ok_or(AddError::Malformed("no origin line"))?;
        let Some(verifier) = self.logs.get(origin) else {
            return Err(AddError::UnknownOrigin {
                origin: origin.chars().take(80).collect(),
            });
        };
        let checkpoint = nitrile_tlog::open_checkpoint(note, origin, verifier).map_err(|source| {
            tracing::warn!(origin, error = %source, "checkpoint refused: not signed by the log");
            AddError::BadSignature {
                origin: origin.to_owned(),
                source,
            }
        })?;
        let (size, root) = (checkpoint.size, checkpoint.root);
        if old_size > size {
            return Err(AddError::OldSizeAboveSize { old_size, size });
        }
        if size == 0 && root != nitrile_tlog::empty_root() {
            return Err(AddError::EmptyTreeRoot);
        }
        // Fail before touching the state if the cosignature cannot be made.
        if now == 0 || now > MAX_TIMESTAMP {
            return Err(AddError::BadTimestamp(now));
        }

        let mut state = self.lock();
        let recorded = state.get(origin);
        let (rec_size, rec_root) =
            recorded.map_or((0, nitrile_tlog::empty_root()), |r| (r.size, r.root));
        if let Some(rec) = recorded
            && rec.size == size
            && rec.root != root
        {
            let evidence = match self.store.save_split_view(rec, note, now) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!(error = %e, "split view evidence could not be saved");
                    None
                }
            };
            tracing::error!(
                origin,
                size,
                cosigned_root = %B64.encode(rec.root),
                submitted_root = %B64.encode(root),
                evidence = ?evidence,
                "SPLIT VIEW: the log signed two different trees of the same size"
            );
            return Err(AddError::SplitView {
                origin: origin.to_owned(),
                size,
                recorded_root: rec.root,
                submitted_root: root,
                evidence,
            });
        }
        if old_size != rec_size {
            return Err(AddError::Conflict {
                old_size,
                recorded: rec_size,
            });
        }
        if old_size == 0 {
            if !proof.is_empty() {
                return Err(AddError::ProofFromEmpty);
            }
        } else {
            nitrile_tlog::verify_consistency(old_size, size, &rec_root, &root, proof).map_err(
                |source| {
                    tracing::warn!(origin, old_size, size, error = %source, "inconsistent checkpoint refused");
                    AddError::Inconsistent {
                        old_size,
                        size,
                        source,
                    }
                },
            )?;
        }
        let line = self.key.sign_line(body, now).map_err(AddError::Cosign)?;
        let mut cosigned_note = note.to_owned();
        if !cosigned_note.ends_with('\n') {
            cosigned_note.push('\n');
        }
        cosigned_note.push_str(&line);
        let line = line.trim_end_matches('\n').to_owned();
        let new = LogState {
            origin: origin.to_owned(),
            size,
            root,
            checkpoint: cosigned_note,
        };
        // Durable before the cosignature leaves, and before the in-memory
        // state moves: a failed save changes nothing.
        self.store.save(&new)?;
        state.insert(origin.to_owned(), new);
        drop(state);
        tracing::info!(origin, old_size, size, "checkpoint cosigned");
        Ok(Cosigned {
            origin: origin.to_owned(),
            size,
            root,
            lines: vec![line],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn note_body_stops_at_the_last_blank_line() {
        assert_eq!(note_body("a\n\nb\n\n\u{2014} k x\n"), Some("a\n\nb\n"));
        assert_eq!(note_body("a\nb\n"), None);
    }

    #[test]
    fn statuses_follow_the_spec() {
        assert_eq!(AddError::Malformed("x").status(), 400);
        assert_eq!(
            AddError::UnknownOrigin {
                origin: String::new()
            }
            .status(),
            404
        );
        assert_eq!(
            AddError::Conflict {
                old_size: 1,
                recorded: 2
            }
            .status(),
            409
        );
        assert_eq!(AddError::ProofFromEmpty.status(), 422);
        assert_eq!(AddError::EmptyTreeRoot.status(), 422);
    }
}
