//! The mTLS client of the key service: a host's volume-key calls (relaying
//! its caller's token) and anyone's key management calls.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use nitrile_api::wire::Refusal;
use nitrile_api::{Name, PrincipalId};
use nitrile_net::{CallError, Client, NetError, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire::{
    CreateKeyRequest, DestroyResponse, GenerateRequest, GenerateResponse, KeyDescription, KeyList,
    RecipientKey, ScheduleDeletionRequest, SealedKeyBytes, UnwrapRequest, UnwrapResponse,
    WrappedKeyBytes,
};

/// Why a call to the key service did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsClientError {
    /// The key service could not be reached, or the exchange failed.
    #[error("key service unreachable")]
    Net(#[from] NetError),
    /// The key service refused (its refusal names the step, the reason and
    /// its journal record).
    #[error("the key service refused: {}", refusal.with_status(status))]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The refusal.
        refusal: Refusal,
    },
    /// The answer is not what the protocol prescribes.
    #[error("malformed answer from the key service (status {status})")]
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

/// A keep-alive mTLS connection to the key service.
#[derive(Debug)]
pub struct KmsClient {
    client: Client,
}

/// The principal of the key service of `cell`: `nitrile://<cell>/service/kms`.
pub fn kms_principal(cell: &Name) -> PrincipalId {
    PrincipalId::new(
        cell.clone(),
        nitrile_api::PrincipalKind::Service,
        Name::new(crate::KMS_SERVICE).unwrap_or_else(|_| unreachable!("`kms` is a valid name")),
    )
}

impl KmsClient {
    /// Connects to the key service at `addr` (`host:port`), authenticating
    /// it as `kms` (e.g. [`kms_principal`]); `tls` is the caller's client
    /// configuration from `nitrile_pki::tls::client_config`: a host's own
    /// identity for the volume-key calls.
    pub async fn connect(
        addr: &str,
        kms: &PrincipalId,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, KmsClientError> {
        Ok(Self {
            client: Client::connect(addr, kms, tls).await?,
        })
    }

    /// The key service's principal.
    pub fn server(&self) -> &PrincipalId {
        self.client.server()
    }

    /// `POST /v1/volume-keys/{volume}`: has the key service make
    /// `volume`'s data key under `kms_key` and returns it wrapped. `token`
    /// is the caller's `volume.create` token for `volume/<volume>`, at this
    /// host, that the host admitted.
    pub async fn generate(
        &mut self,
        volume: &Name,
        kms_key: &Name,
        token: &str,
    ) -> Result<GenerateResponse, KmsClientError> {
        let body = GenerateRequest {
            kms_key: kms_key.clone(),
        };
        self.call(
            Method::POST,
            &format!("/v1/volume-keys/{volume}"),
            token,
            Some(&body),
        )
        .await
    }

    /// `POST /v1/volume-keys/{volume}/unwrap`: the data key of `volume`,
    /// sealed to `recipient`. `token` is the caller's `volume.attach`
    /// token for `volume/<volume>`, at this host.
    pub async fn unwrap(
        &mut self,
        volume: &Name,
        wrapped_key: &WrappedKeyBytes,
        recipient: &RecipientKey,
        token: &str,
    ) -> Result<SealedKeyBytes, KmsClientError> {
        self.unwrap_attested(volume, wrapped_key, recipient, None, token)
            .await
    }

    /// [`KmsClient::unwrap`] with the host's attestation document, which
    /// binds `recipient` (a key service with an attestation policy needs
    /// it).
    pub async fn unwrap_attested(
        &mut self,
        volume: &Name,
        wrapped_key: &WrappedKeyBytes,
        recipient: &RecipientKey,
        attestation: Option<crate::wire::AttestationHex>,
        token: &str,
    ) -> Result<SealedKeyBytes, KmsClientError> {
        let body = UnwrapRequest {
            wrapped_key: wrapped_key.clone(),
            recipient: *recipient,
            attestation,
        };
        let resp: UnwrapResponse = self
            .call(
                Method::POST,
                &format!("/v1/volume-keys/{volume}/unwrap"),
                token,
                Some(&body),
            )
            .await?;
        Ok(resp.sealed_key)
    }

    /// `DELETE /v1/volume-keys/{volume}`: destroys `volume`'s key record,
    /// durably, before it answers. `token` is the caller's
    /// `volume.delete` token for `volume/<volume>`, at this host.
    pub async fn destroy(&mut self, volume: &Name, token: &str) -> Result<(), KmsClientError> {
        let _: DestroyResponse = self
            .call::<_, ()>(
                Method::DELETE,
                &format!("/v1/volume-keys/{volume}"),
                token,
                None,
            )
            .await?;
        Ok(())
    }

    /// `POST /v1/keys`: creates the key `name`, owned by the caller.
    pub async fn create_key(
        &mut self,
        name: &Name,
        token: &str,
    ) -> Result<KeyDescription, KmsClientError> {
        let body = CreateKeyRequest { name: name.clone() };
        self.call(Method::POST, "/v1/keys", token, Some(&body))
            .await
    }

    /// `GET /v1/keys`: the keys the caller may see.
    pub async fn list_keys(&mut self, token: &str) -> Result<KeyList, KmsClientError> {
        self.call::<_, ()>(Method::GET, "/v1/keys", token, None)
            .await
    }

    /// `GET /v1/keys/{key}`.
    pub async fn describe_key(
        &mut self,
        name: &Name,
        token: &str,
    ) -> Result<KeyDescription, KmsClientError> {
        self.call::<_, ()>(Method::GET, &format!("/v1/keys/{name}"), token, None)
            .await
    }

    /// `POST /v1/keys/{key}/disable`.
    pub async fn disable_key(
        &mut self,
        name: &Name,
        token: &str,
    ) -> Result<KeyDescription, KmsClientError> {
        self.action(name, "disable", token, None).await
    }

    /// `POST /v1/keys/{key}/enable`.
    pub async fn enable_key(
        &mut self,
        name: &Name,
        token: &str,
    ) -> Result<KeyDescription, KmsClientError> {
        self.action(name, "enable", token, None).await
    }

    /// `POST /v1/keys/{key}/schedule-deletion`, in `days` days (7 to 30,
    /// 30 when `None`).
    pub async fn schedule_key_deletion(
        &mut self,
        name: &Name,
        days: Option<u32>,
        token: &str,
    ) -> Result<KeyDescription, KmsClientError> {
        let body = ScheduleDeletionRequest { days };
        self.action(name, "schedule-deletion", token, Some(&body))
            .await
    }

    /// `POST /v1/keys/{key}/cancel-deletion`.
    pub async fn cancel_key_deletion(
        &mut self,
        name: &Name,
        token: &str,
    ) -> Result<KeyDescription, KmsClientError> {
        self.action(name, "cancel-deletion", token, None).await
    }

    async fn action(
        &mut self,
        name: &Name,
        action: &str,
        token: &str,
        body: Option<&ScheduleDeletionRequest>,
    ) -> Result<KeyDescription, KmsClientError> {
        self.call(
            Method::POST,
            &format!("/v1/keys/{name}/{action}"),
            token,
            body,
        )
        .await
    }

    /// Sends one request with `token` as its bearer and decodes a success
    /// as `T`, a failure as a refusal.
    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &mut self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&B>,
    ) -> Result<T, KmsClientError> {
        let resp = self.send(method, path, token, body).await?;
        serde_json::from_slice(&resp.body).map_err(|source| KmsClientError::BadAnswer {
            status: resp.status,
            source,
        })
    }

    /// Sends one request and returns the answer if it succeeded.
    async fn send<B: Serialize + ?Sized>(
        &mut self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&B>,
    ) -> Result<Response, KmsClientError> {
        let body = body
            .map(|b| serde_json::to_vec(b).map(|v| ("application/json", Bytes::from(v))))
            .transpose()
            .map_err(NetError::Json)?;
        self.client
            .call_with_bearer(method, path, token, body)
            .await
            .map_err(|e| match e {
                CallError::Net(NetError::InvalidToken) => KmsClientError::BadToken,
                CallError::Net(e) => KmsClientError::Net(e),
                CallError::Refused { status, refusal } => {
                    KmsClientError::Refused { status, refusal }
                }
                CallError::BadAnswer { status, source } => {
                    KmsClientError::BadAnswer { status, source }
                }
            })
    }
}
