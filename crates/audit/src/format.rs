//! The on-disk format: header, record framing, hash chain and the scanner that
//! verifies a file and tells a torn tail from corruption.
//!
//! The byte layout is documented in the crate root; this module is its only
//! implementation.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::error::{HeaderProblem, JournalError, RecordProblem};

/// The first eight bytes of every journal file.
pub const MAGIC: [u8; 8] = *b"NITRILEJ";

/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// Largest payload of one record, in bytes. Larger payloads are refused on
/// append and a length field above it is never trusted on read.
pub const MAX_RECORD_LEN: usize = 64 * 1024;

/// Longest journal source name, in bytes.
pub const MAX_SOURCE_LEN: usize = 255;

/// Bytes of framing around each payload: `len` (4), `seq` (8), `hash` (32).
pub const RECORD_OVERHEAD: usize = 4 + 8 + 32;

/// Most bytes the writer puts in one write + fdatasync. Only the last batch
/// can be torn by a crash, so a damaged region longer than this is never
/// taken for a torn tail.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// Most records in one batch.
pub const MAX_BATCH_RECORDS: usize = 4096;

/// Domain tag hashed in front of every record.
pub const RECORD_DOMAIN: &[u8] = b"nitrile/journal/record/v1\0";

/// Domain tag hashed in front of the header fields to make the genesis hash.
pub const GENESIS_DOMAIN: &[u8] = b"nitrile/journal/genesis/v1\0";

/// Fixed part of the header: magic, version, source length, journal id.
const HEADER_FIXED: usize = 8 + 2 + 2 + 16;

/// A SHA-256 value of the chain: the genesis hash or a record hash.
/// Shown and serialized as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({self})")
    }
}

impl Serialize for ChainHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ChainHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        parse_hex_array(&s)
            .map(Self)
            .ok_or_else(|| serde::de::Error::custom("expected 64 lowercase hex digits"))
    }
}

/// The random id a journal gets when it is created; it makes the genesis hash
/// (and so every record hash) unique to one file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JournalId(pub [u8; 16]);

impl JournalId {
    /// A fresh id from `rng`.
    pub fn random(rng: &mut (impl rand_core::RngCore + rand_core::CryptoRng)) -> Self {
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        Self(id)
    }
}

impl fmt::Display for JournalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for JournalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JournalId({self})")
    }
}

impl FromStr for JournalId {
    type Err = hex::FromHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id)?;
        Ok(Self(id))
    }
}

impl Serialize for JournalId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses exactly `2 * N` lowercase hex digits.
pub(crate) fn parse_hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The parsed, verified header of a journal file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalHeader {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u16,
    /// The journal's random id.
    pub journal_id: JournalId,
    /// Who writes this journal, e.g. `nitrile://cell-1/host/h1`.
    pub source: String,
    /// The hash the first record chains from.
    pub genesis: ChainHash,
}

impl JournalHeader {
    /// A header for a new journal. `source` must already be checked.
    pub(crate) fn new(journal_id: JournalId, source: &str) -> Self {
        Self {
            version: FORMAT_VERSION,
            journal_id,
            source: source.to_owned(),
            genesis: genesis_hash(FORMAT_VERSION, &journal_id, source.as_bytes()),
        }
    }

    /// Length of the encoded header, i.e. the offset of the first record.
    pub fn encoded_len(&self) -> u64 {
        (HEADER_FIXED + self.source.len() + 32) as u64
    }

    /// The header's bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len() as usize);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.source.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.journal_id.0);
        out.extend_from_slice(self.source.as_bytes());
        out.extend_from_slice(&self.genesis.0);
        out
    }

    /// Reads and verifies a header from the start of `r`; `file_len` bounds
    /// what may be read.
    pub(crate) fn read(r: &mut impl Read, file_len: u64) -> Result<Self, JournalError> {
        let bad = |problem| JournalError::BadHeader { problem };
        if file_len < HEADER_FIXED as u64 {
            return Err(bad(HeaderProblem::Truncated));
        }
        let mut fixed = [0u8; HEADER_FIXED];
        read_exact(r, &mut fixed)?;
        if fixed[..8] != MAGIC {
            return Err(bad(HeaderProblem::BadMagic));
        }
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        if version != FORMAT_VERSION {
            return Err(bad(HeaderProblem::UnsupportedVersion(version)));
        }
        let source_len = u16::from_le_bytes([fixed[10], fixed[11]]);
        if source_len == 0 || usize::from(source_len) > MAX_SOURCE_LEN {
            return Err(bad(HeaderProblem::BadSourceLength(source_len)));
        }
        let mut journal_id = [0u8; 16];
        journal_id.copy_from_slice(&fixed[12..28]);
        let journal_id = JournalId(journal_id);
        if file_len < (HEADER_FIXED + usize::from(source_len) + 32) as u64 {
            return Err(bad(HeaderProblem::Truncated));
        }
        let mut rest = vec![0u8; usize::from(source_len) + 32];
        read_exact(r, &mut rest)?;
        let (source, stored) = rest.split_at(usize::from(source_len));
        let source = check_source(source).map_err(|_| bad(HeaderProblem::BadSourceName))?;
        let genesis = genesis_hash(version, &journal_id, source.as_bytes());
        if genesis.0[..] != stored[..] {
            return Err(bad(HeaderProblem::GenesisMismatch));
        }
        Ok(Self {
            version,
            journal_id,
            source,
            genesis,
        })
    }
}

/// Checks a source name: 1 to [`MAX_SOURCE_LEN`] bytes of visible ASCII.
pub(crate) fn check_source(source: &[u8]) -> Result<String, JournalError> {
    if source.is_empty()
        || source.len() > MAX_SOURCE_LEN
        || !source.iter().all(|b| b.is_ascii_graphic())
    {
        return Err(JournalError::BadSourceName { len: source.len() });
    }
    // Visible ASCII is valid UTF-8.
    Ok(source.iter().map(|&b| char::from(b)).collect())
}

/// `SHA-256(GENESIS_DOMAIN || version || journal_id || source_len || source)`.
pub fn genesis_hash(version: u16, journal_id: &JournalId, source: &[u8]) -> ChainHash {
    let mut h = Sha256::new();
    h.update(GENESIS_DOMAIN);
    h.update(version.to_le_bytes());
    h.update(journal_id.0);
    h.update((source.len() as u16).to_le_bytes());
    h.update(source);
    ChainHash(h.finalize().into())
}

/// `SHA-256(RECORD_DOMAIN || prev_hash || seq || len || payload)`, integers
/// little-endian.
pub fn record_hash(prev: &ChainHash, seq: u64, payload: &[u8]) -> ChainHash {
    let mut h = Sha256::new();
    h.update(RECORD_DOMAIN);
    h.update(prev.0);
    h.update(seq.to_le_bytes());
    h.update((payload.len() as u32).to_le_bytes());
    h.update(payload);
    ChainHash(h.finalize().into())
}

/// Appends one framed record to `out` and returns its hash.
pub(crate) fn encode_record(
    out: &mut Vec<u8>,
    prev: &ChainHash,
    seq: u64,
    payload: &[u8],
) -> ChainHash {
    let hash = record_hash(prev, seq, payload);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&hash.0);
    hash
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), JournalError> {
    r.read_exact(buf).map_err(|source| JournalError::Io {
        op: "reading",
        source,
    })
}

/// One verified record as found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    /// Its sequence number (1, 2, ...).
    pub seq: u64,
    /// Its byte offset in the file.
    pub offset: u64,
    /// Its chain hash.
    pub hash: ChainHash,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

/// Where a verified prefix of a journal ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChainHead {
    /// Sequence number of the last good record, 0 when there is none.
    pub(crate) seq: u64,
    /// Hash of the last good record, or the genesis hash.
    pub(crate) hash: ChainHash,
    /// Offset just past the last good record.
    pub(crate) end: u64,
}

/// Reads records one by one after the header, verifying framing, sequence
/// and chain, and classifies the first failure.
#[derive(Debug)]
pub(crate) struct Scanner<R> {
    r: R,
    file_len: u64,
    head: ChainHead,
    failed: bool,
}

impl<R: Read + Seek> Scanner<R> {
    /// `r` must be positioned at `start`, the first byte after the header.
    pub(crate) fn new(r: R, start: u64, file_len: u64, genesis: ChainHash) -> Self {
        Self {
            r,
            file_len,
            head: ChainHead {
                seq: 0,
                hash: genesis,
                end: start,
            },
            failed: false,
        }
    }

    /// A scanner that continues after record `seq` (hash `hash`), whose
    /// next record starts at `start`, where `r` is positioned.
    pub(crate) fn resume(r: R, start: u64, file_len: u64, seq: u64, hash: ChainHash) -> Self {
        Self {
            r,
            file_len,
            head: ChainHead {
                seq,
                hash,
                end: start,
            },
            failed: false,
        }
    }

    /// The verified prefix so far.
    pub(crate) fn head(&self) -> ChainHead {
        self.head
    }

    fn try_next(&mut self) -> Result<Option<RawRecord>, JournalError> {
        let offset = self.head.end;
        if offset >= self.file_len {
            return Ok(None);
        }
        let remaining = self.file_len - offset;
        let expected = self.head.seq + 1;
        if remaining < 12 {
            return Err(self.classify(RecordProblem::Truncated));
        }
        let mut frame = [0u8; 12];
        read_exact(&mut self.r, &mut frame)?;
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(&frame[4..]);
        let seq = u64::from_le_bytes(seq_bytes);
        if len == 0 || len as usize > MAX_RECORD_LEN {
            return Err(self.classify(RecordProblem::BadLength(len)));
        }
        let total = (RECORD_OVERHEAD as u64) + u64::from(len);
        if total > remaining {
            return Err(self.classify(RecordProblem::Truncated));
        }
        let mut body = vec![0u8; len as usize + 32];
        read_exact(&mut self.r, &mut body)?;
        if seq != expected {
            return Err(self.classify(RecordProblem::SeqMismatch { found: seq }));
        }
        let (payload, stored) = body.split_at(len as usize);
        let hash = record_hash(&self.head.hash, seq, payload);
        if hash.0[..] != stored[..] {
            return Err(self.classify(RecordProblem::BadHash));
        }
        body.truncate(len as usize);
        self.head = ChainHead {
            seq,
            hash,
            end: offset + total,
        };
        Ok(Some(RawRecord {
            seq,
            offset,
            hash,
            payload: body,
        }))
    }

    /// Decides whether a failure at the head is a torn tail (the damaged
    /// bytes run to the end of the file, are no longer than one batch, and
    /// no later record follows them) or corruption.
    fn classify(&mut self, problem: RecordProblem) -> JournalError {
        let offset = self.head.end;
        let torn_bytes = self.file_len - offset;
        let corrupt = JournalError::Corrupt {
            offset,
            seq: self.head.seq + 1,
            problem,
        };
        if torn_bytes > MAX_BATCH_BYTES as u64 {
            return corrupt;
        }
        let mut tail = Vec::with_capacity(torn_bytes as usize);
        let read = self
            .r
            .seek(SeekFrom::Start(offset))
            .and_then(|_| (&mut self.r).take(torn_bytes).read_to_end(&mut tail));
        if let Err(source) = read {
            return JournalError::Io {
                op: "reading",
                source,
            };
        }
        if tail.len() as u64 != torn_bytes {
            return JournalError::Io {
                op: "reading",
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "journal shrank while read"),
            };
        }
        if has_later_record(&tail, self.head.seq + 1) {
            return corrupt;
        }
        JournalError::TornTail {
            offset,
            torn_bytes,
            last_seq: self.head.seq,
            problem,
        }
    }
}

/// Whether `tail` (bytes from a damaged record to the end of the file) holds,
/// after its first byte, a complete frame numbered after `bad_seq`: then the
/// damage is followed by later records and is not a torn tail.
fn has_later_record(tail: &[u8], bad_seq: u64) -> bool {
    let window = bad_seq..bad_seq.saturating_add(MAX_BATCH_RECORDS as u64 + 1);
    (1..tail.len()).any(|p| {
        let Some(frame) = tail.get(p..p + 12) else {
            return false;
        };
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&frame[4..]);
        let seq = u64::from_le_bytes(seq);
        seq > bad_seq
            && window.contains(&seq)
            && (1..=MAX_RECORD_LEN).contains(&len)
            && p + RECORD_OVERHEAD + len <= tail.len()
    })
}

impl<R: Read + Seek> Iterator for Scanner<R> {
    type Item = Result<RawRecord, JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.try_next() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn journal(payloads: &[&[u8]]) -> (JournalHeader, Vec<u8>) {
        let header = JournalHeader::new(JournalId([7; 16]), "nitrile://c/host/h1");
        let mut bytes = header.encode();
        let mut prev = header.genesis;
        for (i, p) in payloads.iter().enumerate() {
            prev = encode_record(&mut bytes, &prev, i as u64 + 1, p);
        }
        (header, bytes)
    }

    fn scan(bytes: &[u8]) -> Result<Vec<RawRecord>, JournalError> {
        let mut cur = Cursor::new(bytes);
        let header = JournalHeader::read(&mut cur, bytes.len() as u64)?;
        Scanner::new(
            cur,
            header.encoded_len(),
            bytes.len() as u64,
            header.genesis,
        )
        .collect()
    }

    #[test]
    fn header_round_trips() {
        let (header, bytes) = journal(&[]);
        assert_eq!(bytes.len() as u64, header.encoded_len());
        let read = JournalHeader::read(&mut Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!(read, header);
    }

    #[test]
    fn header_problems_are_named() {
        let (_, bytes) = journal(&[]);
        let problem = |b: &[u8]| match JournalHeader::read(&mut Cursor::new(b), b.len() as u64) {
            Err(JournalError::BadHeader { problem }) => problem,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(problem(&bytes[..10]), HeaderProblem::Truncated);
        assert_eq!(problem(&bytes[..bytes.len() - 1]), HeaderProblem::Truncated);
        let mut b = bytes.clone();
        b[0] = b'X';
        assert_eq!(problem(&b), HeaderProblem::BadMagic);
        let mut b = bytes.clone();
        b[8] = 9;
        assert_eq!(problem(&b), HeaderProblem::UnsupportedVersion(9));
        let mut b = bytes.clone();
        b[30] ^= 1;
        assert_eq!(problem(&b), HeaderProblem::GenesisMismatch);
        let mut b = bytes.clone();
        b[30] = b' ';
        assert_eq!(problem(&b), HeaderProblem::BadSourceName);
    }

    #[test]
    fn records_verify_in_order() {
        let (_, bytes) = journal(&[b"one", b"two", b"three"]);
        let recs = scan(&bytes).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(recs[2].payload, b"three");
    }

    #[test]
    fn truncated_last_record_is_a_torn_tail() {
        let (header, bytes) = journal(&[b"one", b"two"]);
        let second = header.encoded_len() + (RECORD_OVERHEAD + 3) as u64;
        match scan(&bytes[..bytes.len() - 5]) {
            Err(JournalError::TornTail {
                offset, last_seq, ..
            }) => {
                assert_eq!(offset, second);
                assert_eq!(last_seq, 1);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn damage_before_a_later_record_is_corruption() {
        let (header, bytes) = journal(&[b"one", b"two", b"three"]);
        let first = header.encoded_len() as usize;
        let mut b = bytes.clone();
        b[first + 13] ^= 0x40;
        match scan(&b) {
            Err(JournalError::Corrupt { seq, problem, .. }) => {
                assert_eq!(seq, 1);
                assert_eq!(problem, RecordProblem::BadHash);
            }
            other => panic!("unexpected {other:?}"),
        }
        // A length field blown up beyond the end of the file.
        let mut b = bytes.clone();
        b[first + 2] = 0x7f;
        assert!(matches!(
            scan(&b),
            Err(JournalError::Corrupt { seq: 1, .. })
        ));
    }

    #[test]
    fn hash_binds_every_input() {
        let g = ChainHash([1; 32]);
        let base = record_hash(&g, 1, b"x");
        assert_ne!(base, record_hash(&ChainHash([2; 32]), 1, b"x"));
        assert_ne!(base, record_hash(&g, 2, b"x"));
        assert_ne!(base, record_hash(&g, 1, b"y"));
        assert_ne!(base, record_hash(&g, 1, b"x\0"));
    }
}
