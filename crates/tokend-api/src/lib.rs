//! The token service's client: asking `tokend`, over mutual TLS with the
//! caller's own certificate, for a token for exactly the operations,
//! resources and audience of one call.
//!
//! Guarantees: the token service is authenticated as
//! `nitrile://<cell>/service/tokend` (the cell CA, TLS 1.3, by
//! `nitrile_net::Client`); a refusal comes back as [`TokendError::Refused`]
//! naming the step that refused (tls, entitlement, quota, journal, ...), why,
//! and its audit record; a token is returned, never printed or logged, and
//! the error type holds none. The answer is parsed with the API's wire types
//! (`nitrile_api::wire::TokenResponse`, unknown fields refused).
//!
//! Not here: choosing what to ask for (the caller builds the
//! [`TokenRequest`]) and reading client configs (the CLI's).

#![forbid(unsafe_code)]

mod hosts;

pub use hosts::{HostCallError, HostCaller};

use std::fmt;
use std::sync::Arc;

use http::StatusCode;
use nitrile_api::wire::{Refusal, TokenRequest, TokenResponse};
use nitrile_api::{Name, PrincipalId, PrincipalKind};
use nitrile_net::{Client, NetError};

/// The token service's name within its cell: `service/tokend`.
pub const TOKEND_SERVICE: &str = "tokend";

/// The path of the token request.
pub const TOKENS_PATH: &str = "/v1/tokens";

/// The principal of the token service of `cell`: `nitrile://<cell>/service/tokend`.
pub fn tokend_principal(cell: &Name) -> PrincipalId {
    PrincipalId::new(
        cell.clone(),
        PrincipalKind::Service,
        Name::new(TOKEND_SERVICE).unwrap_or_else(|_| unreachable!("`tokend` is a valid name")),
    )
}

/// `items` separated by commas, as refusals and the token verbs show lists.
pub fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why no token was obtained.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokendError {
    /// The token service could not be reached, or the exchange failed
    /// (TLS refused: [`TokendError::is_tls`]).
    #[error("cannot get a token from tokend at {addr}: {source}")]
    Unreachable {
        /// The address called.
        addr: String,
        /// What failed.
        #[source]
        source: NetError,
    },
    /// The token service refused: the refusal names the step, the reason
    /// and its audit record.
    #[error("tokend refused a token for {asked} at step {}", refusal.with_status(*status))]
    Refused {
        /// What was asked: `<operations> on <resources>`.
        asked: String,
        /// The HTTP status.
        status: StatusCode,
        /// The refusal as the service sent it.
        refusal: Refusal,
    },
    /// A failure status without a refusal body.
    #[error("tokend answered {status} to the token request for {asked}")]
    Status {
        /// What was asked.
        asked: String,
        /// The HTTP status.
        status: StatusCode,
    },
    /// A success status whose body is not a token response.
    #[error("tokend's answer is not a token response")]
    BadAnswer(#[source] NetError),
}

impl TokendError {
    /// Whether TLS refused the connection (a certificate not of this cell,
    /// or expired).
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Unreachable { source, .. } if source.is_tls())
    }

    /// The refusal, when the token service refused.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Self::Refused { refusal, .. } => Some(refusal),
            _ => None,
        }
    }
}

/// Where and as whom to ask for tokens: the token service's address, its
/// principal and the caller's client TLS configuration (its certificate
/// binds every token obtained to that certificate).
#[derive(Clone)]
pub struct TokendClient {
    addr: String,
    tokend: PrincipalId,
    tls: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for TokendClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokendClient")
            .field("addr", &self.addr)
            .field("tokend", &self.tokend)
            .finish_non_exhaustive()
    }
}

impl TokendClient {
    /// A client of the token service at `addr` (`host:port`) authenticated
    /// as `tokend` (e.g. [`tokend_principal`]), calling with `tls` (from
    /// `nitrile_pki::tls::client_config`).
    pub fn new(
        addr: impl Into<String>,
        tokend: PrincipalId,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        Self {
            addr: addr.into(),
            tokend,
            tls,
        }
    }

    /// The token service's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Asks for a token for exactly `body`, on a fresh connection.
    pub async fn obtain(&self, body: &TokenRequest) -> Result<TokenResponse, TokendError> {
        let unreachable = |source| TokendError::Unreachable {
            addr: self.addr.clone(),
            source,
        };
        let mut client = Client::connect(&self.addr, &self.tokend, self.tls.clone())
            .await
            .map_err(unreachable)?;
        let response = client
            .post_json(TOKENS_PATH, body)
            .await
            .map_err(unreachable)?;
        if !response.status.is_success() {
            let asked = format!("{} on {}", join(&body.operations), join(&body.resources));
            return Err(match response.refusal() {
                Some(refusal) => TokendError::Refused {
                    asked,
                    status: response.status,
                    refusal,
                },
                None => TokendError::Status {
                    asked,
                    status: response.status,
                },
            });
        }
        response.json().map_err(TokendError::BadAnswer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_principal_is_the_cells_token_service() {
        let cell = Name::new("cell1").expect("name");
        assert_eq!(
            tokend_principal(&cell).to_string(),
            "nitrile://cell1/service/tokend"
        );
    }

    #[test]
    fn join_separates_with_commas() {
        assert_eq!(join(&["a", "b", "c"]), "a, b, c");
        assert_eq!(join::<&str>(&[]), "");
    }
}
