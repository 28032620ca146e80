//! Calling a host's admin API as a service of the cell (the placement
//! service, the deployment service): for each call a token from the token
//! service for exactly that call (the operation, the resource, the host as
//! audience), bound to the service's own certificate, then the call over
//! mTLS with the host authenticated as `nitrile://<cell>/host/<h>`.

use std::sync::Arc;

use crate::{TokendClient, TokendError};
use bytes::Bytes;
use http::{HeaderValue, Request, header};
use nitrile_api::admin::AdminRequest;
use nitrile_api::wire::TokenRequest;
use nitrile_api::{Audience, Name, PrincipalId, PrincipalKind};
use nitrile_net::{Client, NetError};
use serde::de::DeserializeOwned;

/// Why a host call did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostCallError {
    /// The token service gave no token for the call.
    #[error("no token for {operation} on host {host}")]
    Token {
        /// The host.
        host: Name,
        /// The operation.
        operation: nitrile_api::Operation,
        /// Why.
        #[source]
        source: TokendError,
    },
    /// The host could not be reached.
    #[error("host {host} at {addr} unreachable")]
    Unreachable {
        /// The host.
        host: Name,
        /// Its address.
        addr: String,
        /// Why.
        #[source]
        source: NetError,
    },
    /// The host refused or failed.
    #[error("host {host} refused {operation} at step {}", refusal.with_status(status))]
    Refused {
        /// The host.
        host: Name,
        /// The operation.
        operation: nitrile_api::Operation,
        /// The HTTP status.
        status: http::StatusCode,
        /// The refusal.
        refusal: nitrile_api::wire::Refusal,
    },
    /// The host answered outside the API.
    #[error("host {host} answered {status} to {operation} outside the API")]
    BadAnswer {
        /// The host.
        host: Name,
        /// The operation.
        operation: nitrile_api::Operation,
        /// The HTTP status.
        status: http::StatusCode,
    },
}

/// Calls hosts' admin APIs with a service's identity.
#[derive(Clone)]
pub struct HostCaller {
    /// The cell.
    pub cell: Name,
    /// The token service, reached with the service's identity.
    pub tokend: TokendClient,
    /// The service's client configuration.
    pub tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for HostCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCaller")
            .field("cell", &self.cell)
            .finish_non_exhaustive()
    }
}

impl HostCaller {
    /// Calls `req` on `host` at `addr`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        host: &Name,
        addr: &str,
        req: &AdminRequest,
    ) -> Result<T, HostCallError> {
        self.call_with_volumes(host, addr, req, &[]).await
    }

    /// Calls `req`, which boots an instance with `volumes`, on `host` at
    /// `addr`: beside the call's token, a second one for `volume.attach` on
    /// exactly those volumes, which the host relays to the key service.
    pub async fn call_with_volumes<T: DeserializeOwned>(
        &self,
        host: &Name,
        addr: &str,
        req: &AdminRequest,
        volumes: &[Name],
    ) -> Result<T, HostCallError> {
        let operation = req.operation();
        let audience = Audience::new(host.as_str())
            .unwrap_or_else(|_| unreachable!("a host id is an audience"));
        let volume_token = if volumes.is_empty() {
            None
        } else {
            let ask = TokenRequest {
                operations: vec![nitrile_api::Operation::VolumeAttach],
                resources: volumes
                    .iter()
                    .map(|v| {
                        nitrile_api::ResourceId::new(nitrile_api::ResourceKind::Volume, v.clone())
                    })
                    .collect(),
                audience: audience.clone(),
                group: None,
                lifetime_secs: None,
            };
            let granted =
                self.tokend
                    .obtain(&ask)
                    .await
                    .map_err(|source| HostCallError::Token {
                        host: host.clone(),
                        operation: nitrile_api::Operation::VolumeAttach,
                        source,
                    })?;
            let mut value =
                HeaderValue::from_str(&granted.token).map_err(|_| HostCallError::BadAnswer {
                    host: host.clone(),
                    operation,
                    status: http::StatusCode::BAD_REQUEST,
                })?;
            value.set_sensitive(true);
            Some(value)
        };
        let ask = TokenRequest {
            operations: vec![operation],
            resources: vec![req.resource(host)],
            audience,
            group: None,
            lifetime_secs: None,
        };
        let granted = self
            .tokend
            .obtain(&ask)
            .await
            .map_err(|source| HostCallError::Token {
                host: host.clone(),
                operation,
                source,
            })?;
        let unreachable = |source| HostCallError::Unreachable {
            host: host.clone(),
            addr: addr.to_owned(),
            source,
        };
        let server = PrincipalId::new(self.cell.clone(), PrincipalKind::Host, host.clone());
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", granted.token)).map_err(|_| {
                HostCallError::BadAnswer {
                    host: host.clone(),
                    operation,
                    status: http::StatusCode::BAD_REQUEST,
                }
            })?;
        auth.set_sensitive(true);
        let mut builder = Request::builder()
            .method(req.method())
            .uri(req.path())
            .header(header::ACCEPT, "application/json")
            .header(header::AUTHORIZATION, auth);
        if let Some(value) = volume_token {
            builder = builder.header(nitrile_api::admin::VOLUME_TOKEN_HEADER, value);
        }
        let body = req.body();
        if !body.is_empty() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Bytes::from(body))
            .map_err(|e| unreachable(NetError::InvalidRequest(e)))?;
        let mut client = Client::connect(addr, &server, self.tls.clone())
            .await
            .map_err(unreachable)?;
        let response = client.send(request).await.map_err(unreachable)?;
        if !response.status.is_success() {
            return Err(match response.refusal() {
                Some(refusal) => HostCallError::Refused {
                    host: host.clone(),
                    operation,
                    status: response.status,
                    refusal,
                },
                None => HostCallError::BadAnswer {
                    host: host.clone(),
                    operation,
                    status: response.status,
                },
            });
        }
        response.json().map_err(|_| HostCallError::BadAnswer {
            host: host.clone(),
            operation,
            status: response.status,
        })
    }
}
