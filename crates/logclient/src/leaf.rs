//! The log leaf: one shipped journal record as it is hashed into the
//! transparency log and stored in entry bundles.
//!
//! ```text
//! "nitrile/log/leaf/v1\0"  20 bytes
//! source_len               u16, big-endian, 1 to MAX_SOURCE_LEN
//! source                   visible ASCII (0x21..=0x7e), e.g. nitrile://local/host/h1
//! journal_id               16 bytes
//! seq                      u64, big-endian, >= 1
//! hash                     32 bytes, the record's journal chain hash
//! payload                  the rest, at least one byte: the journal record payload
//! ```
//!
//! A leaf is at most [`MAX_LEAF_LEN`] bytes (tlog-tiles entry bundles carry a
//! `u16` length). [`decode`] refuses anything else and never reads past the
//! bound.

use nitrile_audit::{ChainHash, JournalId, MAX_SOURCE_LEN};

/// The leaf's domain tag and version.
pub const LEAF_PREFIX: &[u8; 20] = b"nitrile/log/leaf/v1\0";

/// Largest leaf, in bytes.
pub const MAX_LEAF_LEN: usize = u16::MAX as usize;

/// Bytes of a leaf that are not the source or the payload.
pub const LEAF_OVERHEAD: usize = LEAF_PREFIX.len() + 2 + 16 + 8 + 32;

/// Why a leaf could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeafError {
    /// the leaf is longer than `MAX_LEAF_LEN`
    #[error("the leaf would be {len} bytes; at most {MAX_LEAF_LEN} are allowed")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// the bytes do not start with the v1 leaf tag
    #[error("not a nitrile v1 log leaf")]
    BadPrefix,
    /// the bytes end before the fixed fields do
    #[error("the leaf is truncated")]
    Truncated,
    /// the source is empty, too long or not visible ASCII
    #[error("the leaf's source is not a valid journal source name")]
    BadSource,
    /// the sequence number is 0
    #[error("the leaf's sequence number is 0")]
    ZeroSeq,
    /// the payload is empty
    #[error("the leaf has no payload")]
    EmptyPayload,
}

/// One shipped journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafV1 {
    /// The journal's source (its header's source name).
    pub source: String,
    /// The journal's id.
    pub journal_id: JournalId,
    /// The record's sequence number in its journal.
    pub seq: u64,
    /// The record's chain hash in its journal.
    pub hash: ChainHash,
    /// The record's payload (an audit record, JSON).
    pub payload: Vec<u8>,
}

impl LeafV1 {
    /// The encoded length of this leaf.
    pub fn encoded_len(&self) -> usize {
        LEAF_OVERHEAD + self.source.len() + self.payload.len()
    }
}

fn valid_source(s: &[u8]) -> bool {
    (1..=MAX_SOURCE_LEN).contains(&s.len()) && s.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// Encodes `leaf`, refusing one that [`decode`] would refuse.
pub fn encode(leaf: &LeafV1) -> Result<Vec<u8>, LeafError> {
    if !valid_source(leaf.source.as_bytes()) {
        return Err(LeafError::BadSource);
    }
    if leaf.seq == 0 {
        return Err(LeafError::ZeroSeq);
    }
    if leaf.payload.is_empty() {
        return Err(LeafError::EmptyPayload);
    }
    let len = leaf.encoded_len();
    if len > MAX_LEAF_LEN {
        return Err(LeafError::TooLarge { len });
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(LEAF_PREFIX);
    out.extend_from_slice(&(leaf.source.len() as u16).to_be_bytes());
    out.extend_from_slice(leaf.source.as_bytes());
    out.extend_from_slice(&leaf.journal_id.0);
    out.extend_from_slice(&leaf.seq.to_be_bytes());
    out.extend_from_slice(&leaf.hash.0);
    out.extend_from_slice(&leaf.payload);
    Ok(out)
}

/// Decodes a leaf of at most [`MAX_LEAF_LEN`] bytes.
pub fn decode(bytes: &[u8]) -> Result<LeafV1, LeafError> {
    if bytes.len() > MAX_LEAF_LEN {
        return Err(LeafError::TooLarge { len: bytes.len() });
    }
    let rest =
        bytes
            .strip_prefix(LEAF_PREFIX.as_slice())
            .ok_or(if bytes.len() < LEAF_PREFIX.len() {
                LeafError::Truncated
            } else {
                LeafError::BadPrefix
            })?;
    let (len, rest) = split::<2>(rest)?;
    let source_len = usize::from(u16::from_be_bytes(len));
    if rest.len() < source_len {
        return Err(LeafError::Truncated);
    }
    let (source, rest) = rest.split_at(source_len);
    if !valid_source(source) {
        return Err(LeafError::BadSource);
    }
    let (journal_id, rest) = split::<16>(rest)?;
    let (seq, rest) = split::<8>(rest)?;
    let (hash, payload) = split::<32>(rest)?;
    let seq = u64::from_be_bytes(seq);
    if seq == 0 {
        return Err(LeafError::ZeroSeq);
    }
    if payload.is_empty() {
        return Err(LeafError::EmptyPayload);
    }
    Ok(LeafV1 {
        // Visible ASCII is valid UTF-8.
        source: source.iter().map(|&b| char::from(b)).collect(),
        journal_id: JournalId(journal_id),
        seq,
        hash: ChainHash(hash),
        payload: payload.to_vec(),
    })
}

fn split<const N: usize>(b: &[u8]) -> Result<([u8; N], &[u8]), LeafError> {
    let (head, rest) = b.split_first_chunk::<N>().ok_or(LeafError::Truncated)?;
    Ok((*head, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> LeafV1 {
        LeafV1 {
            source: "nitrile://local/host/h1".into(),
            journal_id: JournalId([7; 16]),
            seq: 42,
            hash: ChainHash([9; 32]),
            payload: br#"{"kind":"request"}"#.to_vec(),
        }
    }

    #[test]
    fn layout_is_the_documented_one() {
        let leaf = sample();
        let bytes = encode(&leaf).unwrap();
        assert_eq!(&bytes[..20], b"nitrile/log/leaf/v1\0");
        assert_eq!(&bytes[20..22], &23u16.to_be_bytes());
        assert_eq!(&bytes[22..45], b"nitrile://local/host/h1");
        assert_eq!(&bytes[45..61], &[7; 16]);
        assert_eq!(&bytes[61..69], &42u64.to_be_bytes());
        assert_eq!(&bytes[69..101], &[9; 32]);
        assert_eq!(&bytes[101..], leaf.payload.as_slice());
        assert_eq!(bytes.len(), leaf.encoded_len());
    }

    #[test]
    fn bounds_are_enforced_both_ways() {
        let mut leaf = sample();
        let room = MAX_LEAF_LEN - LEAF_OVERHEAD - leaf.source.len();
        leaf.payload = vec![b'x'; room];
        let max = encode(&leaf).unwrap();
        assert_eq!(max.len(), MAX_LEAF_LEN);
        assert_eq!(decode(&max).unwrap(), leaf);
        leaf.payload.push(b'x');
        assert_eq!(
            encode(&leaf),
            Err(LeafError::TooLarge {
                len: MAX_LEAF_LEN + 1
            })
        );
        let mut long = max.clone();
        long.push(b'x');
        assert!(matches!(decode(&long), Err(LeafError::TooLarge { .. })));
    }

    #[test]
    fn malformed_leaves_are_refused() {
        let good = encode(&sample()).unwrap();
        assert_eq!(decode(&good[..10]), Err(LeafError::Truncated));
        let mut bad = good.clone();
        bad[0] ^= 1;
        assert_eq!(decode(&bad), Err(LeafError::BadPrefix));
        // Everything up to and including the hash, no payload.
        assert_eq!(decode(&good[..101]), Err(LeafError::EmptyPayload));
        assert_eq!(decode(&good[..100]), Err(LeafError::Truncated));
        let mut zero = good.clone();
        zero[61..69].copy_from_slice(&0u64.to_be_bytes());
        assert_eq!(decode(&zero), Err(LeafError::ZeroSeq));
        let mut space = good.clone();
        space[30] = b' ';
        assert_eq!(decode(&space), Err(LeafError::BadSource));
        let mut huge_len = good.clone();
        huge_len[20..22].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(decode(&huge_len), Err(LeafError::Truncated));
        let mut empty_source = sample();
        empty_source.source.clear();
        assert_eq!(encode(&empty_source), Err(LeafError::BadSource));
    }

    proptest! {
        #[test]
        fn round_trip(
            source in "[!-~]{1,255}",
            id in any::<[u8; 16]>(),
            seq in 1u64..,
            hash in any::<[u8; 32]>(),
            payload in proptest::collection::vec(any::<u8>(), 1..2048),
        ) {
            let leaf = LeafV1 {
                source,
                journal_id: JournalId(id),
                seq,
                hash: ChainHash(hash),
                payload,
            };
            let bytes = encode(&leaf).unwrap();
            prop_assert_eq!(decode(&bytes).unwrap(), leaf);
        }

        #[test]
        fn decode_never_panics_and_reencodes_exactly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(leaf) = decode(&bytes) {
                prop_assert_eq!(encode(&leaf).unwrap(), bytes);
            }
        }

        #[test]
        fn mutated_prefix_bytes_never_decode_to_the_same_leaf(
            pos in 0usize..101,
            flip in 1u8..,
        ) {
            let leaf = sample();
            let mut bytes = encode(&leaf).unwrap();
            bytes[pos] ^= flip;
            if let Ok(other) = decode(&bytes) {
                prop_assert_ne!(other, leaf);
            }
        }
    }
}
