//! The protocol of nitrile's key service (`nitrile kms`) as both sides
//! speak it: the routes ([`ROUTES`]) and the one parser of a request
//! ([`KmsRequest::parse`]), the JSON bodies ([`wire`]) with their bounds, and
//! [`KmsClient`], the mTLS client a host and the CLI call the key service
//! with. A host needs only this crate, never the key service's.
//!
//! Two kinds of call:
//! - A host's volume-key calls, over the host's own mTLS identity
//!   (`nitrile://<cell>/host/<h>`), each relaying in `Authorization: Bearer`
//!   the token its caller presented to the host for `volume.create`
//!   (generate: `POST /v1/volume-keys/{volume}`), `volume.attach` (unwrap:
//!   `POST /v1/volume-keys/{volume}/unwrap`, the data key sealed to a
//!   recipient key the VMM made) or `volume.delete` (destroy:
//!   `DELETE /v1/volume-keys/{volume}`). The key service checks the token
//!   itself: its audience must be the host that relays it.
//! - Key management by any principal with its own token for audience
//!   `kms`: `/v1/keys` (list, create), `/v1/keys/{key}` (describe) and
//!   `/v1/keys/{key}/disable|enable|schedule-deletion|cancel-deletion`.
//!
//! Every refusal is a [`nitrile_api::wire::Refusal`].
//!
//! What it guarantees: a request body is read only up to
//! [`MAX_REQUEST_BODY`] bytes, byte fields only up to their named bounds
//! ([`MAX_WRAPPED_KEY_LEN`], [`RECIPIENT_KEY_LEN`], [`SEALED_KEY_LEN`],
//! checked on the base64 text before it is decoded), names in paths and
//! bodies only as [`nitrile_api::Name`]s, and unknown fields are refused;
//! no type here prints key bytes in its `Debug` output.
//!
//! What it does not do: check tokens, open or seal keys (the key service
//! and the VMM do), or keep any state.

#![forbid(unsafe_code)]

mod client;
mod request;
pub mod wire;

use serde::{Deserialize, Serialize};

pub use client::{KmsClient, KmsClientError, kms_principal};
pub use request::{Caller, KmsRequest, ROUTES, RequestError, Route};
pub use wire::{
    MAX_LISTED_KEYS, MAX_REQUEST_BODY, MAX_WRAPPED_KEY_LEN, RECIPIENT_KEY_LEN, SEALED_KEY_LEN,
};

/// The key service's service name: its principal is
/// `nitrile://<cell>/service/kms`, and the audience of key management
/// tokens is `kms`.
pub const KMS_SERVICE: &str = "kms";

/// Where a host (or any client) finds the key service: the `[kms]`
/// section of its config.
///
/// ```toml
/// [kms]
/// addr = "127.0.0.1:7447"    # its principal is nitrile://<cell>/service/kms
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsTarget {
    /// The key service's mTLS address, `host:port`.
    pub addr: String,
}
