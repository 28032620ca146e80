//! The mTLS client of the deployment service.

use bytes::Bytes;
use http::{Method, StatusCode};
use nitrile_api::PrincipalId;
use nitrile_api::wire::Refusal;
use nitrile_net::{CallError, Client, NetError};

use crate::{ClientTls, Deployment, StartRequest};

/// Why a call to the deployment service did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployClientError {
    /// The deployment service could not be reached, or the exchange failed.
    #[error("deployment service unreachable")]
    Net(#[from] NetError),
    /// The deployment service refused.
    #[error("the deployment service refused: {}", refusal.with_status(status))]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The refusal.
        refusal: Refusal,
    },
    /// The answer is not what the protocol prescribes.
    #[error("malformed answer from the deployment service (status {status})")]
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

/// A keep-alive mTLS connection to the deployment service.
#[derive(Debug)]
pub struct DeployClient {
    client: Client,
}

impl DeployClient {
    /// Connects to the deployment service at `addr`, authenticating it as
    /// `deployer` ([`crate::deployer_principal`]).
    pub async fn connect(
        addr: &str,
        deployer: &PrincipalId,
        tls: ClientTls,
    ) -> Result<Self, DeployClientError> {
        Ok(Self {
            client: Client::connect(addr, deployer, tls).await?,
        })
    }

    /// `POST /v1/deployments`.
    pub async fn start(
        &mut self,
        req: &StartRequest,
        token: &str,
    ) -> Result<Deployment, DeployClientError> {
        let body = serde_json::to_vec(req).map_err(NetError::Json)?;
        self.call(Method::POST, "/v1/deployments", token, Some(body))
            .await
    }

    /// `GET /v1/deployments/current`.
    pub async fn describe(&mut self, token: &str) -> Result<Deployment, DeployClientError> {
        self.call(Method::GET, "/v1/deployments/current", token, None)
            .await
    }

    /// `POST /v1/deployments/current/abort`.
    pub async fn abort(&mut self, token: &str) -> Result<Deployment, DeployClientError> {
        self.call(Method::POST, "/v1/deployments/current/abort", token, None)
            .await
    }

    async fn call(
        &mut self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Deployment, DeployClientError> {
        let body = body.map(|b| ("application/json", Bytes::from(b)));
        let resp = self
            .client
            .call_with_bearer(method, path, token, body)
            .await
            .map_err(|e| match e {
                CallError::Net(NetError::InvalidToken) => DeployClientError::BadToken,
                CallError::Net(e) => DeployClientError::Net(e),
                CallError::Refused { status, refusal } => {
                    DeployClientError::Refused { status, refusal }
                }
                CallError::BadAnswer { status, source } => {
                    DeployClientError::BadAnswer { status, source }
                }
            })?;
        serde_json::from_slice(&resp.body).map_err(|source| DeployClientError::BadAnswer {
            status: resp.status,
            source,
        })
    }
}
