//! A source's own memory of the log: the last checkpoint that covered its
//! journal, kept in the source's state directory, and the check that the
//! log it ships to is still consistent with it.
//!
//! A shipper asks logd for an [`AnchorBody`] every so often: the latest
//! checkpoint, its consistency proof from the remembered tree and the
//! source's last record it covers with an inclusion proof. [`check_anchor`]
//! (pure) accepts it only if the checkpoint is signed by the pinned log key
//! for the log's origin, extends the remembered tree by a verified
//! consistency proof (a smaller tree, or the same size with another root, is
//! a rewritten log), and, when the shipper still knows the covered record's
//! leaf hash, proves that record is in the tree. Only then is the new
//! checkpoint remembered ([`RememberedCheckpoint::save`], atomic and
//! synced). Anything else is a [`AnchorProblem`], which the shipper raises
//! as a `log_inconsistent` alert in its own journal.
//!
//! This does not stop whoever holds the source's own state directory from
//! deleting the file; it stops a log rewritten elsewhere (logd's machine)
//! from going unnoticed by the sources whose records it dropped.

use std::path::Path;

use nitrile_tlog::{Hash, NoteVerifier, verify_consistency, verify_inclusion};
use serde::{Deserialize, Serialize};

use crate::protocol::AnchorBody;

/// Largest remembered-checkpoint file read.
pub const MAX_ANCHOR_FILE: u64 = 64 * 1024;

/// The checkpoint a source last saw covering its journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RememberedCheckpoint {
    /// The log's origin.
    pub origin: String,
    /// The tree size.
    pub size: u64,
    /// The root hash (64 hex digits).
    pub root: String,
    /// The signed note as served.
    pub checkpoint: String,
    /// The last record of the source known to be in that tree.
    pub seq: u64,
}

/// Why a source's memory of the log could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnchorFileError {
    /// the file could not be read or written
    #[error("remembered checkpoint {}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the file is not what a shipper writes
    #[error("remembered checkpoint {} is malformed", path.display())]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

impl RememberedCheckpoint {
    /// Reads the file at `path`; `None` when there is none yet.
    pub fn load(path: &Path) -> Result<Option<Self>, AnchorFileError> {
        use std::io::Read;
        let io = |source| AnchorFileError::Io {
            path: path.to_owned(),
            source,
        };
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut bytes = Vec::new();
        f.take(MAX_ANCHOR_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_ANCHOR_FILE {
            return Err(io(std::io::Error::other("too large")));
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| AnchorFileError::Format {
                path: path.to_owned(),
                source,
            })
    }

    /// Writes it to `path` (atomic replace, file and directory synced).
    pub fn save(&self, path: &Path) -> Result<(), AnchorFileError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| AnchorFileError::Format {
            path: path.to_owned(),
            source,
        })?;
        nitrile_fs::write_atomic(path, &bytes, 0o600).map_err(|e| AnchorFileError::Io {
            path: path.to_owned(),
            source: e.into(),
        })
    }

    fn root_hash(&self) -> Option<Hash> {
        let mut h = [0u8; 32];
        hex::decode_to_slice(&self.root, &mut h).ok()?;
        Some(h)
    }
}

/// What is wrong with the log a source ships to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AnchorProblem {
    /// the checkpoint is not signed by the pinned log key for the origin
    #[error("the log's checkpoint does not verify with the pinned log key: {reason}")]
    BadSignature {
        /// Why.
        reason: String,
    },
    /// the log holds fewer entries than a checkpoint this source saw
    #[error(
        "the log shrank: its checkpoint has {size} entries, this source saw one of {remembered} covering its journal"
    )]
    Shrank {
        /// The remembered size.
        remembered: u64,
        /// The size now.
        size: u64,
    },
    /// the same size with another root, or a consistency proof that fails
    #[error(
        "the log's tree of {size} entries is not consistent with the tree of {remembered} entries this source saw covering its journal: it was rewritten"
    )]
    Inconsistent {
        /// The remembered size.
        remembered: u64,
        /// The size now.
        size: u64,
    },
    /// the log says it holds a record of the source that it cannot prove
    #[error("the log cannot prove that record {seq} of this source is in it")]
    NotIncluded {
        /// The record.
        seq: u64,
    },
    /// a proof hash is not 64 hex digits
    #[error("the log's answer is malformed")]
    Malformed,
}

fn hashes(hex_hashes: &[String]) -> Result<Vec<Hash>, AnchorProblem> {
    hex_hashes
        .iter()
        .map(|h| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h, &mut out).map_err(|_| AnchorProblem::Malformed)?;
            Ok(out)
        })
        .collect()
}

/// Checks `body` against what the source remembers; the checkpoint to
/// remember now, if it covers the source's journal and is newer, else
/// `None`. `leaf_hash` gives the leaf hash of one of the source's records
/// when the shipper still knows it.
pub fn check_anchor(
    remembered: Option<&RememberedCheckpoint>,
    body: &AnchorBody,
    origin: &str,
    verifier: &NoteVerifier,
    leaf_hash: impl Fn(u64) -> Option<Hash>,
) -> Result<Option<RememberedCheckpoint>, AnchorProblem> {
    let cp = nitrile_tlog::open_checkpoint(&body.checkpoint, origin, verifier).map_err(|e| {
        AnchorProblem::BadSignature {
            reason: e.to_string(),
        }
    })?;
    let mut extends = false;
    if let Some(r) = remembered {
        let old_root = r.root_hash().ok_or(AnchorProblem::Malformed)?;
        if cp.size < r.size {
            return Err(AnchorProblem::Shrank {
                remembered: r.size,
                size: cp.size,
            });
        }
        let inconsistent = AnchorProblem::Inconsistent {
            remembered: r.size,
            size: cp.size,
        };
        if cp.size == r.size {
            if cp.root != old_root {
                return Err(inconsistent);
            }
        } else {
            let proof = hashes(&body.consistency)?;
            verify_consistency(r.size, cp.size, &old_root, &cp.root, &proof)
                .map_err(|_| inconsistent)?;
        }
        extends = cp.size > r.size;
    }
    let mut proven = None;
    if let Some(c) = &body.covered {
        if c.index >= cp.size {
            return Err(AnchorProblem::NotIncluded { seq: c.seq });
        }
        if let Some(leaf) = leaf_hash(c.seq) {
            let proof = hashes(&c.inclusion)?;
            verify_inclusion(&leaf, c.index, cp.size, &proof, &cp.root)
                .map_err(|_| AnchorProblem::NotIncluded { seq: c.seq })?;
            proven = Some(c.seq);
        }
    }
    let seq = match (remembered, proven) {
        // A checkpoint that extends one covering the journal covers it too.
        (Some(r), p) if extends => p.unwrap_or(r.seq).max(r.seq),
        (None, Some(p)) => p,
        _ => return Ok(None),
    };
    Ok(Some(RememberedCheckpoint {
        origin: cp.origin,
        size: cp.size,
        root: hex::encode(cp.root),
        checkpoint: body.checkpoint.clone(),
        seq,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::CoveredRecord;
    use nitrile_tlog::{NoteSigner, leaf_hash};

    const ORIGIN: &str = "local.nitrile/log";

    /// A tree over `leaves`, its signed checkpoint, and proofs.
    struct Tree {
        leaves: Vec<Hash>,
    }

    impl Tree {
        fn new(n: usize, salt: u8) -> Self {
            Self {
                leaves: (0..n).map(|i| leaf_hash(&[salt, i as u8])).collect(),
            }
        }
        fn log(&self) -> nitrile_tlog::Tree {
            let mut t = nitrile_tlog::Tree::new();
            for l in &self.leaves {
                t.push(*l);
            }
            t
        }
    }

    fn signed(signer: &NoteSigner, size: u64, root: Hash) -> String {
        let cp = nitrile_tlog::Checkpoint {
            origin: ORIGIN.into(),
            size,
            root,
        };
        nitrile_tlog::SignedNote::sign(&cp.body(), signer, 1_700_000_000)
            .unwrap()
            .text
    }

    fn hexes(h: Vec<Hash>) -> Vec<String> {
        h.into_iter().map(hex::encode).collect()
    }

    #[test]
    fn a_growing_log_is_remembered_and_a_rewritten_one_is_refused() {
        let signer = NoteSigner::generate(ORIGIN).unwrap();
        let v = signer.verifier();
        let t = Tree::new(10, 1);
        let m = t.log();
        // First sight: record 3 of the source at index 4, proven.
        let body = AnchorBody {
            checkpoint: signed(&signer, 6, m.root_at(6).unwrap()),
            consistency: vec![],
            covered: Some(CoveredRecord {
                seq: 3,
                index: 4,
                inclusion: hexes(m.inclusion_proof(4, 6).unwrap()),
            }),
        };
        let known = |seq| (seq == 3).then_some(t.leaves[4]);
        let r = check_anchor(None, &body, ORIGIN, &v, known)
            .unwrap()
            .unwrap();
        assert_eq!((r.size, r.seq), (6, 3));
        // Growth with a consistency proof, covered record unknown now.
        let body2 = AnchorBody {
            checkpoint: signed(&signer, 10, m.root_at(10).unwrap()),
            consistency: hexes(m.consistency_proof(6, 10).unwrap()),
            covered: None,
        };
        let r2 = check_anchor(Some(&r), &body2, ORIGIN, &v, |_| None)
            .unwrap()
            .unwrap();
        assert_eq!((r2.size, r2.seq), (10, 3));
        // The same checkpoint again: nothing new to remember.
        assert_eq!(
            check_anchor(Some(&r2), &body2, ORIGIN, &v, |_| None).unwrap(),
            None
        );
        // A shorter log (deleted and rebuilt).
        let short = AnchorBody {
            checkpoint: signed(&signer, 4, m.root_at(4).unwrap()),
            consistency: vec![],
            covered: None,
        };
        assert_eq!(
            check_anchor(Some(&r2), &short, ORIGIN, &v, |_| None),
            Err(AnchorProblem::Shrank {
                remembered: 10,
                size: 4
            })
        );
        // Another tree of the same size, and a longer one that forked.
        let other = Tree::new(12, 2).log();
        let fork = AnchorBody {
            checkpoint: signed(&signer, 10, other.root_at(10).unwrap()),
            consistency: vec![],
            covered: None,
        };
        assert!(matches!(
            check_anchor(Some(&r2), &fork, ORIGIN, &v, |_| None),
            Err(AnchorProblem::Inconsistent { .. })
        ));
        let longer = AnchorBody {
            checkpoint: signed(&signer, 12, other.root_at(12).unwrap()),
            consistency: hexes(other.consistency_proof(10, 12).unwrap()),
            covered: None,
        };
        assert!(matches!(
            check_anchor(Some(&r2), &longer, ORIGIN, &v, |_| None),
            Err(AnchorProblem::Inconsistent { .. })
        ));
        // A checkpoint under another key.
        let rogue = NoteSigner::generate(ORIGIN).unwrap();
        let forged = AnchorBody {
            checkpoint: signed(&rogue, 10, m.root_at(10).unwrap()),
            ..body2.clone()
        };
        assert!(matches!(
            check_anchor(Some(&r2), &forged, ORIGIN, &v, |_| None),
            Err(AnchorProblem::BadSignature { .. })
        ));
        // A record the log claims but cannot prove.
        let unproven = AnchorBody {
            covered: Some(CoveredRecord {
                seq: 3,
                index: 5,
                inclusion: hexes(m.inclusion_proof(5, 6).unwrap()),
            }),
            ..body
        };
        assert_eq!(
            check_anchor(None, &unproven, ORIGIN, &v, known),
            Err(AnchorProblem::NotIncluded { seq: 3 })
        );
    }

    #[test]
    fn the_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log-anchor.json");
        assert_eq!(RememberedCheckpoint::load(&path).unwrap(), None);
        let r = RememberedCheckpoint {
            origin: ORIGIN.into(),
            size: 7,
            root: "ab".repeat(32),
            checkpoint: "note".into(),
            seq: 2,
        };
        r.save(&path).unwrap();
        assert_eq!(RememberedCheckpoint::load(&path).unwrap(), Some(r));
        std::fs::write(&path, b"{").unwrap();
        assert!(RememberedCheckpoint::load(&path).is_err());
    }
}
