//! Asking the token service for a token: over mutual TLS with the client
//! config's certificate, for exactly the operations, resources and audience
//! of one call. Every client verb that needs a token (`token request`, the
//! host verbs, the auditor's reads) gets it here.

use std::sync::Arc;

use anyhow::{Context, bail};
use nitrile_api::wire::{TokenRequest, TokenResponse};

use crate::config::Loaded;

/// `items` separated by commas, as the token verbs show lists.
pub(crate) fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Asks the token service of `loaded`'s cell, over mTLS with `tls`, for a
/// token for exactly `body`. A refusal names the service, the step that
/// refused (tls, entitlement, quota, journal, ...), why, and its audit record.
/// The token is returned, never printed.
pub(crate) async fn obtain(
    loaded: &Loaded,
    tls: Arc<rustls::ClientConfig>,
    body: &TokenRequest,
) -> anyhow::Result<TokenResponse> {
    let tokend = loaded.tokend_principal()?;
    let addr = loaded.config.endpoints.tokend.clone();
    let response = async {
        let mut client = nitrile_net::Client::connect(&addr, &tokend, tls).await?;
        client.post_json("/v1/tokens", body).await
    }
    .await
    .map_err(|e| {
        let hint = if e.is_tls() {
            "the TLS handshake was refused: is the client certificate of this cell and unexpired?"
        } else {
            "is the cell running (`nitrile up`)?"
        };
        anyhow::anyhow!("cannot get a token from tokend at {addr}: {e}; {hint}")
    })?;
    if !response.status.is_success() {
        let asked = format!("{} on {}", join(&body.operations), join(&body.resources));
        match response.refusal() {
            Some(r) => bail!(
                "tokend refused a token for {asked} at step {}",
                r.with_status(response.status)
            ),
            None => bail!(
                "tokend answered {} to the token request for {asked}",
                response.status
            ),
        }
    }
    response
        .json()
        .context("tokend's answer is not a token response")
}
