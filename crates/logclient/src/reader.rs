//! Reading the log from logd as an auditor: with an `audit.read` token for
//! `log/<cell>` at audience `logd` (the caller gets it from the token
//! service), reads of logd's API over mutual TLS. Reads are not mutations,
//! so logd accepts the one token for every read until it expires; logd
//! journals each read.
//!
//! Nothing read is trusted for what it says: a record's inclusion is
//! verified here against a checkpoint the caller opened with the log's key
//! ([`LogReader::prove`]), proofs and leaves are decoded within their
//! bounds, and a whole log is fetched to be audited locally
//! ([`crate::audit`]).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use nitrile_api::Name;
use nitrile_api::wire::Refusal;
use nitrile_tlog::{
    Checkpoint, ENTRIES_PER_BUNDLE, Hash, ProofError, TileError, TilePath, decode_bundle,
    leaf_hash, verify_inclusion,
};
use rustls::ClientConfig;
use serde::de::DeserializeOwned;

use crate::alert::{Alert, AlertPage};
use crate::leaf::{self, LeafError, LeafV1};
use crate::protocol::{EntryBody, ProofBody};

/// Entries asked for per read of `/v1/log/entries` (logd answers at most
/// 256).
pub const ENTRIES_PER_READ: u64 = 256;
/// Most pages of alerts read in one listing (256 alerts a page).
pub const MAX_ALERT_PAGES: usize = 4096;

/// Why a read of the log failed, or what it returned does not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// logd could not be reached, or the TLS handshake failed
    #[error(
        "cannot read the audit log at {addr}: {error}; {}",
        unreachable_hint(error)
    )]
    Unreachable {
        /// logd's address.
        addr: String,
        /// What failed (shown in the message).
        error: nitrile_net::NetError,
    },
    /// the read token cannot be sent in a header
    #[error("the read token is not a header value")]
    BadToken,
    /// the request could not be built
    #[error("cannot build the request")]
    Request(#[source] http::Error),
    /// logd refused the read
    #[error("logd refused the read {path} at step {}", .refusal.with_status(.status))]
    Refused {
        /// The path read.
        path: String,
        /// The HTTP status.
        status: StatusCode,
        /// logd's refusal.
        refusal: Refusal,
    },
    /// logd refused the read without a refusal body
    #[error("logd answered {status} to the read {path} without saying why")]
    Unexplained {
        /// The path read.
        path: String,
        /// The HTTP status.
        status: StatusCode,
    },
    /// logd has nothing at the path
    #[error("logd has no {path}")]
    Missing {
        /// The path read.
        path: String,
    },
    /// logd's answer is not the JSON its API describes
    #[error("logd's answer to {path} is not what its API says")]
    Decode {
        /// The path read.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// logd's answer is not a proof
    #[error("logd's answer to {path} is not a proof")]
    NotAProof {
        /// The path read.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// a hash of a proof is not 64 hex digits
    #[error("{text:?} is not a 32-byte hex hash")]
    BadHash {
        /// The text (at most 80 characters of it).
        text: String,
        /// Why.
        #[source]
        source: hex::FromHexError,
    },
    /// the checkpoint is not UTF-8
    #[error("the checkpoint is not text")]
    CheckpointNotText(#[source] std::string::FromUtf8Error),
    /// the checkpoint names no tree size
    #[error("logd's checkpoint names no size")]
    CheckpointWithoutSize,
    /// a checkpoint of the history names no tree size
    #[error("logd's history holds a note without a size")]
    HistoryWithoutSize,
    /// neither the full nor the partial entry bundle holding an entry is
    /// served
    #[error("logd serves neither {full} nor {partial}")]
    NoBundle {
        /// The full bundle's path.
        full: String,
        /// The partial bundle's path.
        partial: String,
    },
    /// an entry bundle does not decode
    #[error("entry bundle {path}")]
    Bundle {
        /// The bundle's path.
        path: String,
        /// Why.
        #[source]
        source: TileError,
    },
    /// an entry bundle holds fewer entries than it should
    #[error("entry bundle {path} does not hold entry {index}")]
    NotInBundle {
        /// The bundle's path.
        path: String,
        /// The entry.
        index: u64,
    },
    /// the inclusion proof of a record does not verify
    #[error(
        "the inclusion proof of record {index} does NOT verify against the signed checkpoint of size {size}"
    )]
    NotIncluded {
        /// The record's index.
        index: u64,
        /// The checkpoint's size.
        size: u64,
        /// Why.
        #[source]
        source: ProofError,
    },
    /// a log entry is not a leaf
    #[error("leaf {index}")]
    NotALeaf {
        /// The entry's index.
        index: u64,
        /// Why.
        #[source]
        source: LeafError,
    },
}

fn unreachable_hint(e: &nitrile_net::NetError) -> &'static str {
    if e.is_tls() {
        "the TLS handshake failed: is logd's certificate from this cell's CA, and ours?"
    } else {
        "is the audit log service running (`nitrile up`)?"
    }
}

/// A hash of a proof, from 64 hex digits.
pub fn hash_of(text: &str) -> Result<Hash, ReadError> {
    let mut h = [0u8; 32];
    hex::decode_to_slice(text, &mut h).map_err(|source| ReadError::BadHash {
        text: text.chars().take(80).collect(),
        source,
    })?;
    Ok(h)
}

fn hashes(texts: &[String]) -> Result<Vec<Hash>, ReadError> {
    texts.iter().map(|h| hash_of(h)).collect()
}

/// A record proven to be in the log ([`LogReader::prove`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenRecord {
    /// Its index in the log.
    pub index: u64,
    /// The leaf, decoded.
    pub leaf: LeafV1,
    /// Its leaf hash.
    pub leaf_hash: Hash,
    /// The inclusion proof that verified against the checkpoint.
    pub proof: Vec<Hash>,
}

/// A connection to logd with a read token.
pub struct LogReader {
    client: nitrile_net::Client,
    bearer: HeaderValue,
    addr: String,
    cell: Name,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("LogReader")
            .field("addr", &self.addr)
            .field("cell", &self.cell)
            .finish_non_exhaustive()
    }
}

impl LogReader {
    /// Connects to logd of `cell` at `addr` (`host:port`) with the client
    /// identity `tls`, to read with `token` (an `audit.read` token for
    /// `log/<cell>` at audience `logd`). The token goes only into the
    /// sensitive `Authorization` header of each read; no error shows it.
    pub async fn connect(
        addr: &str,
        cell: &Name,
        tls: Arc<ClientConfig>,
        token: &str,
    ) -> Result<Self, ReadError> {
        let mut bearer =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ReadError::BadToken)?;
        bearer.set_sensitive(true);
        let client = nitrile_net::Client::connect(addr, &crate::logd_principal(cell), tls)
            .await
            .map_err(|error| ReadError::Unreachable {
                addr: addr.to_owned(),
                error,
            })?;
        Ok(Self {
            client,
            bearer,
            addr: addr.to_owned(),
            cell: cell.clone(),
        })
    }

    /// The cell.
    pub fn cell(&self) -> &Name {
        &self.cell
    }

    /// Where logd is, as an auditor's memory records it: `logd at <addr>`.
    pub fn source(&self) -> String {
        format!("logd at {}", self.addr)
    }

    /// `GET path`: the body, `None` for a 404, an error naming the step
    /// for any other refusal.
    pub async fn get(&mut self, path: &str) -> Result<Option<Bytes>, ReadError> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(header::AUTHORIZATION, self.bearer.clone())
            .body(Bytes::new())
            .map_err(ReadError::Request)?;
        let response = self
            .client
            .send(request)
            .await
            .map_err(|error| ReadError::Unreachable {
                addr: self.addr.clone(),
                error,
            })?;
        if response.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status.is_success() {
            return Err(match response.refusal() {
                Some(refusal) => ReadError::Refused {
                    path: path.to_owned(),
                    status: response.status,
                    refusal,
                },
                None => ReadError::Unexplained {
                    path: path.to_owned(),
                    status: response.status,
                },
            });
        }
        Ok(Some(response.body))
    }

    /// `GET path` as JSON; a 404 is an error.
    pub async fn get_json<T: DeserializeOwned>(&mut self, path: &str) -> Result<T, ReadError> {
        let body = self.get(path).await?.ok_or_else(|| ReadError::Missing {
            path: path.to_owned(),
        })?;
        serde_json::from_slice(&body).map_err(|source| ReadError::Decode {
            path: path.to_owned(),
            source,
        })
    }

    /// The latest checkpoint note, if logd published one (not verified
    /// here).
    pub async fn checkpoint(&mut self) -> Result<Option<String>, ReadError> {
        match self.get("/v1/log/checkpoint").await? {
            Some(b) => Ok(Some(
                String::from_utf8(b.to_vec()).map_err(ReadError::CheckpointNotText)?,
            )),
            None => Ok(None),
        }
    }

    /// A tile or entry bundle by its tlog-tiles path (`tile/...`).
    pub async fn tile(&mut self, path: &str) -> Result<Option<Bytes>, ReadError> {
        self.get(&format!("/v1/log/{path}")).await
    }

    /// The consistency proof from the tree of `from` leaves to the one of
    /// `to` (`None`: logd has none), for the caller to verify.
    pub async fn consistency_proof(
        &mut self,
        from: u64,
        to: u64,
    ) -> Result<Option<Vec<Hash>>, ReadError> {
        let path = format!("/v1/log/proof/consistency/{from}/{to}");
        match self.get(&path).await? {
            Some(body) => {
                let body: ProofBody = serde_json::from_slice(&body)
                    .map_err(|source| ReadError::NotAProof { path, source })?;
                Ok(Some(hashes(&body.proof)?))
            }
            None => Ok(None),
        }
    }

    /// Reads the entries from `next` on, page by page, into `f`, until a
    /// page comes back short (the end of the log when it was read); `next`
    /// is moved past each page read, even when a later one fails.
    ///
    /// Stopping at a short page, not at an empty one, matters: every read
    /// is itself logged, so on a slow machine a reader that waited for an
    /// empty page could chase its own read records forever.
    pub async fn read_entries(
        &mut self,
        next: &mut u64,
        mut f: impl FnMut(EntryBody),
    ) -> Result<(), ReadError> {
        loop {
            let page: Vec<EntryBody> = self
                .get_json(&format!("/v1/log/entries/{next}/{ENTRIES_PER_READ}"))
                .await?;
            let short = (page.len() as u64) < ENTRIES_PER_READ;
            *next += page.len() as u64;
            page.into_iter().for_each(&mut f);
            if short {
                return Ok(());
            }
        }
    }

    /// The index in the log of record `seq` of the journal of `source` (a
    /// principal URI), reading the entries from the start; `None` when
    /// the log holds no such record yet.
    pub async fn find_record(&mut self, source: &str, seq: u64) -> Result<Option<u64>, ReadError> {
        let mut found = None;
        self.read_entries(&mut 0, |e| {
            if found.is_none() && e.source == source && e.seq == seq {
                found = Some(e.index);
            }
        })
        .await?;
        Ok(found)
    }

    /// The raw bytes of leaf `index` from the entry bundle that holds it,
    /// for a tree of `size` leaves.
    pub async fn raw_leaf(&mut self, index: u64, size: u64) -> Result<Vec<u8>, ReadError> {
        let n = index / ENTRIES_PER_BUNDLE;
        let full = TilePath::entries(n, 256).to_string();
        let (path, bytes, width) = match self.tile(&full).await? {
            Some(b) => (full, b, ENTRIES_PER_BUNDLE),
            None => {
                let width = (size - n * ENTRIES_PER_BUNDLE).min(ENTRIES_PER_BUNDLE);
                let partial = TilePath::entries(n, width as u16).to_string();
                match self.tile(&partial).await? {
                    Some(b) => (partial, b, width),
                    None => return Err(ReadError::NoBundle { full, partial }),
                }
            }
        };
        let entries = decode_bundle(&bytes, width).map_err(|source| ReadError::Bundle {
            path: path.clone(),
            source,
        })?;
        entries
            .into_iter()
            .nth((index % ENTRIES_PER_BUNDLE) as usize)
            .ok_or(ReadError::NotInBundle { path, index })
    }

    /// Proves that entry `index` is in the tree of `checkpoint` (which the
    /// caller opened with the log's key, and which covers the entry): the
    /// entry from its bundle, its inclusion proof from logd, the proof
    /// verified here against the checkpoint's root, then the leaf decoded.
    pub async fn prove(
        &mut self,
        index: u64,
        checkpoint: &Checkpoint,
    ) -> Result<ProvenRecord, ReadError> {
        let size = checkpoint.size;
        let raw = self.raw_leaf(index, size).await?;
        let proof: ProofBody = self
            .get_json(&format!("/v1/log/proof/inclusion/{index}/{size}"))
            .await?;
        let proof = hashes(&proof.proof)?;
        let lh = leaf_hash(&raw);
        verify_inclusion(&lh, index, size, &proof, &checkpoint.root).map_err(|source| {
            ReadError::NotIncluded {
                index,
                size,
                source,
            }
        })?;
        let leaf = leaf::decode(&raw).map_err(|source| ReadError::NotALeaf { index, source })?;
        Ok(ProvenRecord {
            index,
            leaf,
            leaf_hash: lh,
            proof,
        })
    }

    /// Every alert raised (or raised again) after the cursor `after`, page
    /// by page until the end (at most [`MAX_ALERT_PAGES`] pages), so no
    /// alert is cut off however many there are.
    pub async fn alerts(&mut self, after: u64) -> Result<Vec<Alert>, ReadError> {
        let mut alerts: Vec<Alert> = Vec::new();
        let mut after = after;
        for _ in 0..MAX_ALERT_PAGES {
            let page: AlertPage = self.get_json(&format!("/v1/alerts/{after}")).await?;
            let last = page.alerts.last().map(|a| a.cursor);
            alerts.extend(page.alerts);
            match (page.next, last) {
                (Some(next), Some(_)) if next > after => after = next,
                _ => break,
            }
        }
        Ok(alerts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_read_names_the_step_status_and_record() {
        let e = ReadError::Refused {
            path: "/v1/log/checkpoint".into(),
            status: StatusCode::FORBIDDEN,
            refusal: Refusal {
                step: nitrile_api::wire::RefusalStep::Token,
                reason: "the token does not grant audit.read".into(),
                quota: None,
                retry_after_secs: None,
                audit_seq: Some(12),
            },
        };
        assert_eq!(
            e.to_string(),
            "logd refused the read /v1/log/checkpoint at step token (403 Forbidden): the token \
             does not grant audit.read [audit record 12]"
        );
    }

    #[test]
    fn proof_hashes_are_64_hex_digits() {
        assert_eq!(hash_of(&"ab".repeat(32)).unwrap(), [0xab; 32]);
        for bad in ["", "ab", &"ab".repeat(33), &"zz".repeat(32)] {
            assert!(
                matches!(hash_of(bad), Err(ReadError::BadHash { .. })),
                "{bad}"
            );
        }
        // A long bad hash is not echoed whole.
        let long = "x".repeat(10_000);
        let e = hash_of(&long).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
    }
}
