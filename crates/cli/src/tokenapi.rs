//! Asking the token service for a token with the client config's
//! certificate: the client is `nitrile_tokend_api`'s; this module adds the
//! config and the hints a person at a terminal needs. Every client verb that
//! needs a token (`token request`, the host verbs, the auditor's reads, the
//! customer verbs) gets it here.

use std::sync::Arc;

use nitrile_api::wire::{TokenRequest, TokenResponse};
use nitrile_tokend_api::{TokendClient, TokendError};

use crate::config::Loaded;

pub(crate) use nitrile_tokend_api::join;

/// Asks the token service of `loaded`'s cell, over mTLS with `tls`, for a
/// token for exactly `body`. A refusal names the service, the step that
/// refused (tls, entitlement, quota, journal, ...), why, and its audit record.
/// The token is returned, never printed.
pub(crate) async fn obtain(
    loaded: &Loaded,
    tls: Arc<rustls::ClientConfig>,
    body: &TokenRequest,
) -> anyhow::Result<TokenResponse> {
    let client = TokendClient::new(
        loaded.config.endpoints.tokend.clone(),
        loaded.tokend_principal()?,
        tls,
    );
    client.obtain(body).await.map_err(|e| match &e {
        TokendError::Unreachable { .. } => {
            let hint = if e.is_tls() {
                "the TLS handshake was refused: is the client certificate of this cell and unexpired?"
            } else {
                "is the cell running (`nitrile up`)?"
            };
            anyhow::anyhow!("{e}; {hint}")
        }
        TokendError::BadAnswer(source) => anyhow::anyhow!("{e}: {source}"),
        _ => anyhow::Error::new(e),
    })
}
