//! The ingest protocol's JSON bodies.
//!
//! `POST /v1/ingest` carries an [`IngestBatch`] (at most
//! [`MAX_INGEST_BODY`] bytes, [`MAX_INGEST_ENTRIES`] entries) and is
//! answered with an [`IngestAck`] once every entry is durable in the log;
//! `GET /v1/ingest/head/<kind>/<name>` answers a [`SourceHead`] and
//! `GET /v1/ingest/anchor/<kind>/<name>/<old>` an [`AnchorBody`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use nitrile_audit::{ChainHash, JournalId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Largest ingest request body, in bytes.
pub const MAX_INGEST_BODY: usize = 1024 * 1024;

/// Most entries in one ingest request.
pub const MAX_INGEST_ENTRIES: usize = 1024;

/// Which journal a batch comes from: its header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalRef {
    /// The journal's source name, e.g. `nitrile://local/host/h1`.
    pub source: String,
    /// The journal's id (32 lowercase hex digits).
    #[serde(with = "journal_id_hex")]
    pub journal_id: JournalId,
    /// The journal's genesis hash (64 hex digits).
    pub genesis: ChainHash,
}

/// One journal record as shipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestEntry {
    /// Its sequence number.
    pub seq: u64,
    /// Its chain hash (64 hex digits).
    pub hash: ChainHash,
    /// Its payload (standard base64).
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
}

impl From<nitrile_audit::JournalEntry> for IngestEntry {
    fn from(e: nitrile_audit::JournalEntry) -> Self {
        Self {
            seq: e.seq,
            hash: e.hash,
            payload: e.payload,
        }
    }
}

/// The body of `POST /v1/ingest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestBatch {
    /// The journal.
    pub journal: JournalRef,
    /// Consecutive records, oldest first.
    pub entries: Vec<IngestEntry>,
    /// The journal's durable head as its writer knows it, when the shipper
    /// runs in the writer's process: how far the log lags behind the
    /// journal, for the monitor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<u64>,
}

/// The answer to an accepted batch: every record up to `acked_seq` is
/// durable in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestAck {
    /// The last record of the source that the log holds.
    pub acked_seq: u64,
}

/// What the log holds of one source, so that its shipper resumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceHead {
    /// The last record of the source that the log holds (0: none).
    pub acked_seq: u64,
    /// Its chain hash (the genesis hash when `acked_seq` is 0; `null` for a
    /// source never seen).
    pub hash: Option<ChainHash>,
    /// The id of the source's journal (`null` for a source never seen).
    #[serde(with = "journal_id_hex::option")]
    pub journal_id: Option<JournalId>,
}

/// What a source learns of the log to anchor its journal in it, as served
/// by `GET /v1/ingest/anchor/<kind>/<name>/<old>`: the latest published
/// checkpoint, a consistency proof from the tree size `old` the source last
/// remembered, and the last record of the source that the checkpoint covers
/// with its inclusion proof. The source checks all three against the log's
/// key and its own journal before it remembers the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorBody {
    /// The signed checkpoint (a signed note, with any witness cosignatures).
    pub checkpoint: String,
    /// The RFC 9162 consistency proof from `old` to the checkpoint's size
    /// (empty when `old` is 0 or not smaller than the size).
    pub consistency: Vec<String>,
    /// The source's last record the checkpoint covers, if any.
    pub covered: Option<CoveredRecord>,
}

/// A record of a source and where the log holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoveredRecord {
    /// Its sequence number in the source's journal.
    pub seq: u64,
    /// Its index in the log.
    pub index: u64,
    /// Its RFC 9162 inclusion proof in the checkpoint's tree.
    pub inclusion: Vec<String>,
}

/// An inclusion or consistency proof (hashes as 64 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofBody {
    /// The proof's hashes, in RFC 9162 order.
    pub proof: Vec<String>,
}

/// Inclusion proofs of consecutive entries, as served by
/// `GET /v1/log/proofs/inclusion/<start>/<count>/<size>`: `proofs[i]` is
/// the RFC 9162 inclusion proof of entry `start + i` in the tree of `size`
/// (hashes as 64 hex digits). At most 256 proofs, fewer at the end of the
/// tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofsBody {
    /// The index of the first entry.
    pub start: u64,
    /// The tree size the proofs are for.
    pub size: u64,
    /// The proofs.
    pub proofs: Vec<Vec<String>>,
}

/// A page of published checkpoints, as served by
/// `GET /v1/log/history/<from>`: the signed notes of size `from` or more,
/// by size, as stored (a reader verifies each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryBody {
    /// The notes.
    pub checkpoints: Vec<String>,
    /// The `from` of the next page, when there is one.
    pub next: Option<u64>,
}

/// One decoded log entry as served by `GET /v1/log/entries/...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryBody {
    /// Its index in the log.
    pub index: u64,
    /// Its journal's source.
    pub source: String,
    /// Its journal's id.
    #[serde(with = "journal_id_hex")]
    pub journal_id: JournalId,
    /// Its sequence number in that journal.
    pub seq: u64,
    /// Its chain hash in that journal.
    pub hash: ChainHash,
    /// The audit record (the payload as JSON; the raw payload in base64
    /// under `payload` when it is not JSON).
    pub record: Option<serde_json::Value>,
    /// The payload in base64, when it is not JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

mod b64 {
    use super::*;

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        B64.decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// Parses exactly 32 lowercase hex digits.
pub fn parse_journal_id(s: &str) -> Option<JournalId> {
    if s.len() != 32 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut id = [0u8; 16];
    hex::decode_to_slice(s, &mut id).ok()?;
    Some(JournalId(id))
}

pub(crate) mod journal_id_hex {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(v: &JournalId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<JournalId, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        parse_journal_id(&s)
            .ok_or_else(|| serde::de::Error::custom("expected 32 lowercase hex digits"))
    }

    pub(crate) mod option {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(
            v: &Option<JournalId>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(id) => s.collect_str(id),
                None => s.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<JournalId>, D::Error> {
            let s = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
            s.map(|s| {
                parse_journal_id(&s)
                    .ok_or_else(|| serde::de::Error::custom("expected 32 lowercase hex digits"))
            })
            .transpose()
        }
    }
}

/// Standard base64 of `bytes`.
pub fn base64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trips_and_refuses_unknown_fields() {
        let batch = IngestBatch {
            journal: JournalRef {
                source: "nitrile://local/host/h1".into(),
                journal_id: JournalId([1; 16]),
                genesis: ChainHash([2; 32]),
            },
            entries: vec![IngestEntry {
                seq: 1,
                hash: ChainHash([3; 32]),
                payload: b"{}".to_vec(),
            }],
            head: None,
        };
        let json = serde_json::to_string(&batch).unwrap();
        assert!(!json.contains("head"), "{json}");
        assert!(json.contains(r#""payload":"e30=""#), "{json}");
        assert!(json.contains(&"01".repeat(16)), "{json}");
        assert_eq!(serde_json::from_str::<IngestBatch>(&json).unwrap(), batch);
        let extra = json.replacen('{', r#"{"x":1,"#, 1);
        assert!(serde_json::from_str::<IngestBatch>(&extra).is_err());
        let upper = json.replace(&"02".repeat(32), &"AB".repeat(32));
        assert!(serde_json::from_str::<IngestBatch>(&upper).is_err());
        let bad_b64 = json.replace("e30=", "e30");
        assert!(serde_json::from_str::<IngestBatch>(&bad_b64).is_err());
        let with_head = IngestBatch {
            head: Some(9),
            ..batch
        };
        let json = serde_json::to_string(&with_head).unwrap();
        assert!(json.ends_with(r#","head":9}"#), "{json}");
        assert_eq!(
            serde_json::from_str::<IngestBatch>(&json).unwrap(),
            with_head
        );
    }
}
