//! The mTLS client of the customer API.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use nitrile_api::wire::Refusal;
use nitrile_api::{Name, PrincipalId, PrincipalKind};
use nitrile_image::Digest;
use nitrile_net::{CallError, Client, NetError, Response};
use serde::de::DeserializeOwned;

use crate::PLACEMENT_SERVICE;
use crate::wire::{CustomerImage, CustomerInstance, ImageList, InstanceList, RunRequest};

/// Why a call to the placement service did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlacedClientError {
    /// The placement service could not be reached, or the exchange failed.
    #[error("placement service unreachable")]
    Net(#[from] NetError),
    /// The placement service refused (its refusal names the step, the
    /// reason and its journal record).
    #[error("the placement service refused: {}", refusal.with_status(status))]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The refusal.
        refusal: Refusal,
    },
    /// The answer is not what the protocol prescribes.
    #[error("malformed answer from the placement service (status {status})")]
    BadAnswer {
        /// The HTTP status.
        status: StatusCode,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// A token that cannot be sent in a header.
    #[error("the token cannot be sent: it is not a header value")]
    BadToken,
}

/// The principal of the placement service of `cell`:
/// `nitrile://<cell>/service/placement`.
pub fn placement_principal(cell: &Name) -> PrincipalId {
    PrincipalId::new(
        cell.clone(),
        PrincipalKind::Service,
        Name::new(PLACEMENT_SERVICE).unwrap_or_else(|_| unreachable!("`placement` is a name")),
    )
}

/// A keep-alive mTLS connection to the placement service.
#[derive(Debug)]
pub struct PlacedClient {
    client: Client,
}

impl PlacedClient {
    /// Connects to the placement service at `addr`, authenticating it as
    /// `placement` (e.g. [`placement_principal`]); `tls` is the customer's
    /// client configuration.
    pub async fn connect(
        addr: &str,
        placement: &PrincipalId,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, PlacedClientError> {
        Ok(Self {
            client: Client::connect(addr, placement, tls).await?,
        })
    }

    /// `POST /v1/instances`.
    pub async fn run(
        &mut self,
        req: &RunRequest,
        token: &str,
    ) -> Result<CustomerInstance, PlacedClientError> {
        let body = serde_json::to_vec(req).map_err(NetError::Json)?;
        self.call(Method::POST, "/v1/instances", token, Some(body))
            .await
    }

    /// `GET /v1/instances`.
    pub async fn list(&mut self, token: &str) -> Result<InstanceList, PlacedClientError> {
        self.call(Method::GET, "/v1/instances", token, None).await
    }

    /// `GET /v1/instances/{name}`.
    pub async fn describe(
        &mut self,
        name: &Name,
        token: &str,
    ) -> Result<CustomerInstance, PlacedClientError> {
        self.call(Method::GET, &format!("/v1/instances/{name}"), token, None)
            .await
    }

    /// `POST /v1/instances/{name}/stop`.
    pub async fn stop(
        &mut self,
        name: &Name,
        token: &str,
    ) -> Result<CustomerInstance, PlacedClientError> {
        self.call(
            Method::POST,
            &format!("/v1/instances/{name}/stop"),
            token,
            None,
        )
        .await
    }

    /// `POST /v1/instances/{name}/start`.
    pub async fn start(
        &mut self,
        name: &Name,
        token: &str,
    ) -> Result<CustomerInstance, PlacedClientError> {
        self.call(
            Method::POST,
            &format!("/v1/instances/{name}/start"),
            token,
            None,
        )
        .await
    }

    /// `DELETE /v1/instances/{name}`.
    pub async fn terminate(
        &mut self,
        name: &Name,
        token: &str,
    ) -> Result<CustomerInstance, PlacedClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/instances/{name}"),
            token,
            None,
        )
        .await
    }

    /// `POST /v1/images`: `upload` is a framed body
    /// ([`crate::upload::encode`]).
    pub async fn import(
        &mut self,
        upload: Vec<u8>,
        token: &str,
    ) -> Result<CustomerImage, PlacedClientError> {
        self.call(Method::POST, "/v1/images", token, Some(upload))
            .await
    }

    /// `GET /v1/images`.
    pub async fn list_images(&mut self, token: &str) -> Result<ImageList, PlacedClientError> {
        self.call(Method::GET, "/v1/images", token, None).await
    }

    /// `GET /v1/images/{digest}`.
    pub async fn describe_image(
        &mut self,
        digest: &Digest,
        token: &str,
    ) -> Result<CustomerImage, PlacedClientError> {
        self.call(Method::GET, &format!("/v1/images/{digest}"), token, None)
            .await
    }

    /// `DELETE /v1/images/{digest}`.
    pub async fn delete_image(
        &mut self,
        digest: &Digest,
        token: &str,
    ) -> Result<CustomerImage, PlacedClientError> {
        self.call(Method::DELETE, &format!("/v1/images/{digest}"), token, None)
            .await
    }

    async fn call<T: DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, PlacedClientError> {
        let resp = self.send(method, path, token, body).await?;
        serde_json::from_slice(&resp.body).map_err(|source| PlacedClientError::BadAnswer {
            status: resp.status,
            source,
        })
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, PlacedClientError> {
        let body = body.map(|b| ("application/octet-stream", Bytes::from(b)));
        self.client
            .call_with_bearer(method, path, token, body)
            .await
            .map_err(|e| match e {
                CallError::Net(NetError::InvalidToken) => PlacedClientError::BadToken,
                CallError::Net(e) => PlacedClientError::Net(e),
                CallError::Refused { status, refusal } => {
                    PlacedClientError::Refused { status, refusal }
                }
                CallError::BadAnswer { status, source } => {
                    PlacedClientError::BadAnswer { status, source }
                }
            })
    }
}
