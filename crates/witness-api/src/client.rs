//! The client a log uses to ask a witness for a cosignature.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use nitrile_api::PrincipalId;
use nitrile_net::{Client, NetError};
use nitrile_tlog::Hash;

use crate::SPLIT_VIEW_HEADER;
use crate::request::{AddCheckpoint, RequestError, parse_cosignature_lines};

/// Longest refusal reason kept from an answer.
pub const MAX_REASON: usize = 1024;

/// Why a witness did not cosign.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WitnessError {
    /// The witness could not be reached or the exchange failed.
    #[error("witness unreachable")]
    Net(#[from] NetError),
    /// `409`: the witness last cosigned a checkpoint of size `recorded`;
    /// send again with that old size and a proof from it.
    #[error("the witness last cosigned size {recorded}")]
    Conflict {
        /// The witness's recorded size.
        recorded: u64,
    },
    /// `422` with the split view mark: the witness cosigned another
    /// checkpoint of the same size for this log. The log misbehaved (or
    /// its key is used by someone else): raise an alert.
    #[error("SPLIT VIEW reported by the witness: {reason}")]
    SplitView {
        /// The witness's explanation.
        reason: String,
    },
    /// `422`: the consistency proof does not verify (or a size-0
    /// checkpoint has another root).
    #[error("the witness found the checkpoint inconsistent: {reason}")]
    Inconsistent {
        /// The witness's explanation.
        reason: String,
    },
    /// `404`: the witness does not know this log.
    #[error("the witness does not know this log: {reason}")]
    UnknownLog {
        /// The witness's explanation.
        reason: String,
    },
    /// `403`: the witness did not accept the log's signature.
    #[error("the witness refused the log's signature: {reason}")]
    BadSignature {
        /// The witness's explanation.
        reason: String,
    },
    /// Any other status (400, 5xx, ...).
    #[error("the witness answered {status}: {reason}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The witness's explanation.
        reason: String,
    },
    /// The answer is not what the protocol prescribes.
    #[error("malformed answer from the witness")]
    BadAnswer(#[source] RequestError),
}

/// A keep-alive mTLS connection to one witness.
#[derive(Debug)]
pub struct WitnessClient {
    client: Client,
}

fn reason(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    s.trim_end().chars().take(MAX_REASON).collect()
}

impl WitnessClient {
    /// Connects to the witness at `addr` (`host:port`), authenticating it as
    /// `witness` (e.g. `nitrile://local/service/w1`); `tls` comes from
    /// [`nitrile_pki::tls::client_config`].
    pub async fn connect(
        addr: &str,
        witness: &PrincipalId,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, WitnessError> {
        Ok(Self {
            client: Client::connect(addr, witness, tls).await?,
        })
    }

    /// The witness principal.
    pub fn witness(&self) -> &PrincipalId {
        self.client.server()
    }

    /// Asks for a cosignature of `note` (a checkpoint signed by its log),
    /// given the size the witness last cosigned (`old_size`, 0 at first)
    /// and the consistency proof from it. Returns the cosignature lines
    /// (`— <name> <base64>`, without newline), checked for form only:
    /// verify them with the witness's key before use
    /// (`nitrile_tlog::cosignatures` on the note with them appended).
    pub async fn add_checkpoint(
        &mut self,
        old_size: u64,
        proof: &[Hash],
        note: &str,
    ) -> Result<Vec<String>, WitnessError> {
        let body = AddCheckpoint {
            old_size,
            proof: proof.to_vec(),
            note: note.to_owned(),
        }
        .encode();
        let req = Request::builder()
            .method(Method::POST)
            .uri("/add-checkpoint")
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Bytes::from(body))
            .map_err(|e| WitnessError::Net(NetError::InvalidRequest(e)))?;
        let resp = self.client.send(req).await?;
        match resp.status {
            StatusCode::OK => parse_cosignature_lines(&resp.body).map_err(WitnessError::BadAnswer),
            StatusCode::CONFLICT => {
                let recorded = std::str::from_utf8(&resp.body)
                    .ok()
                    .and_then(|s| s.strip_suffix('\n'))
                    .filter(|s| {
                        !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
                    })
                    .and_then(|s| s.parse().ok())
                    .ok_or(WitnessError::BadAnswer(RequestError::BadOldSize))?;
                Err(WitnessError::Conflict { recorded })
            }
            StatusCode::UNPROCESSABLE_ENTITY if resp.headers.contains_key(SPLIT_VIEW_HEADER) => {
                Err(WitnessError::SplitView {
                    reason: reason(&resp.body),
                })
            }
            StatusCode::UNPROCESSABLE_ENTITY => Err(WitnessError::Inconsistent {
                reason: reason(&resp.body),
            }),
            StatusCode::NOT_FOUND => Err(WitnessError::UnknownLog {
                reason: reason(&resp.body),
            }),
            StatusCode::FORBIDDEN => Err(WitnessError::BadSignature {
                reason: reason(&resp.body),
            }),
            status => Err(WitnessError::Refused {
                status: status.as_u16(),
                reason: reason(&resp.body),
            }),
        }
    }
}
