//! The host agent's seam to the key service: how an instance's volume keys
//! are made, released to a VMM and destroyed without the host ever holding
//! one in plaintext.
//!
//! A [`VolumeKeySource`] does the three things the host asks of the key
//! service: make a volume's data key and return it wrapped
//! ([`VolumeKeySource::generate`]; the host keeps only the
//! [`WrappedVolumeKey`], opaque bytes it never opens), seal it to the
//! recipient key a VMM made for the volume ([`VolumeKeySource::unwrap_sealed`];
//! the host relays the [`SealedKey`] to the VMM through
//! [`nitrile_vmm::Hypervisor::supply_keys`]), and crypto-erase it
//! ([`VolumeKeySource::destroy`]). Each call carries the token of the caller
//! whose request it serves, for the key service to check itself. Calls
//! block; the host makes them on blocking threads.
//!
//! The host agent is given its source ([`crate::HostdOptions::volume_keys`]),
//! or makes a [`KmsVolumeKeys`] from the `[kms]` section of its config: the
//! key service over mTLS, with the host's own certificate. Without either
//! it has no volumes.

use std::error::Error;
use std::fmt;

use std::sync::Arc;

use nitrile_api::{Name, PrincipalId};
use nitrile_kms_api::wire::{RecipientKey, WrappedKeyBytes};
use nitrile_kms_api::{KmsClient, KmsClientError};
use nitrile_vmm::{RecipientPublicKey, SealedKey};

/// Longest wrapped key the host keeps or accepts from a key source.
pub const MAX_WRAPPED_KEY_LEN: usize = 1024;

/// A volume's data key as the key service wrapped it: bytes the host keeps
/// and relays but cannot open.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedVolumeKey(Vec<u8>);

/// Why bytes are not a wrapped key the host keeps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WrappedKeyError {
    /// empty, or longer than [`MAX_WRAPPED_KEY_LEN`]
    #[error("a wrapped key is 1 to {MAX_WRAPPED_KEY_LEN} bytes, not {0}")]
    Length(usize),
}

impl WrappedVolumeKey {
    /// Takes 1 to [`MAX_WRAPPED_KEY_LEN`] bytes.
    pub fn new(bytes: Vec<u8>) -> Result<Self, WrappedKeyError> {
        if bytes.is_empty() || bytes.len() > MAX_WRAPPED_KEY_LEN {
            return Err(WrappedKeyError::Length(bytes.len()));
        }
        Ok(Self(bytes))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for WrappedVolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedVolumeKey({} bytes)", self.0.len())
    }
}

/// Why the key service did not do what the host asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeKeyError {
    /// the key service refused (a token it does not accept, a disabled
    /// key, an unknown volume); the cause says why
    #[error("the key service refused")]
    Refused(#[source] Box<dyn Error + Send + Sync>),
    /// the key service could not be asked, or failed
    #[error("the key service failed")]
    Failed(#[source] Box<dyn Error + Send + Sync>),
}

/// The key service as the host agent uses it. See the module documentation.
pub trait VolumeKeySource: Send + Sync {
    /// Makes `volume`'s data key under the key service's key `kms_key`
    /// (its bare name); returns it wrapped.
    fn generate(
        &self,
        volume: &Name,
        kms_key: &Name,
        caller_token: &str,
    ) -> Result<WrappedVolumeKey, VolumeKeyError>;

    /// Seals `volume`'s data key, given wrapped, to `recipient` (a key pair
    /// the VMM that serves the volume made), for that volume only.
    fn unwrap_sealed(
        &self,
        volume: &Name,
        wrapped: &WrappedVolumeKey,
        recipient: &RecipientPublicKey,
        caller_token: &str,
    ) -> Result<SealedKey, VolumeKeyError>;

    /// Destroys `volume`'s key for good (crypto-erase): no wrapped key of
    /// it opens afterwards.
    fn destroy(&self, volume: &Name, caller_token: &str) -> Result<(), VolumeKeyError>;
}

/// The key service over mutual TLS, as the host's own identity: each call
/// opens a connection (the host's certificate is what the key service
/// checks as the relayed token's audience), relays the caller's token and
/// returns what the key service answered. Calls block on `runtime`; the
/// host makes them on blocking threads.
pub struct KmsVolumeKeys {
    addr: String,
    server: PrincipalId,
    tls: Arc<rustls::ClientConfig>,
    runtime: tokio::runtime::Handle,
    attester: Option<Attester>,
}

/// Makes the host's attestation document binding a recipient key.
pub type Attester =
    Arc<dyn Fn(&[u8; 32]) -> Result<nitrile_kms_api::wire::AttestationHex, String> + Send + Sync>;

impl fmt::Debug for KmsVolumeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsVolumeKeys")
            .field("addr", &self.addr)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl KmsVolumeKeys {
    /// The key service at `addr`, authenticated as `server`
    /// (`nitrile://<cell>/service/kms`), called with the host's client
    /// configuration `tls`.
    pub fn new(
        addr: String,
        server: PrincipalId,
        tls: Arc<rustls::ClientConfig>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            addr,
            server,
            tls,
            runtime,
            attester: None,
        }
    }

    /// Sends with every unwrap an attestation document binding the
    /// recipient key, made by `attester` (the host's TPM).
    pub fn with_attester(mut self, attester: Attester) -> Self {
        self.attester = Some(attester);
        self
    }

    fn call<T>(
        &self,
        f: impl AsyncFnOnce(&mut KmsClient) -> Result<T, KmsClientError>,
    ) -> Result<T, VolumeKeyError> {
        self.runtime
            .block_on(async {
                let mut client =
                    KmsClient::connect(&self.addr, &self.server, Arc::clone(&self.tls)).await?;
                f(&mut client).await
            })
            .map_err(|e| match e {
                // The refusal as the key service gave it (step, reason, its
                // journal record), under this error's own words.
                KmsClientError::Refused { status, refusal } => {
                    VolumeKeyError::Refused(refusal.with_status(status).to_string().into())
                }
                e => VolumeKeyError::Failed(Box::new(e)),
            })
    }
}

impl VolumeKeySource for KmsVolumeKeys {
    fn generate(
        &self,
        volume: &Name,
        kms_key: &Name,
        caller_token: &str,
    ) -> Result<WrappedVolumeKey, VolumeKeyError> {
        let answer = self.call(async |c| c.generate(volume, kms_key, caller_token).await)?;
        WrappedVolumeKey::new(answer.wrapped_key.into_bytes())
            .map_err(|e| VolumeKeyError::Failed(Box::new(e)))
    }

    fn unwrap_sealed(
        &self,
        volume: &Name,
        wrapped: &WrappedVolumeKey,
        recipient: &RecipientPublicKey,
        caller_token: &str,
    ) -> Result<SealedKey, VolumeKeyError> {
        let wrapped = WrappedKeyBytes::new(wrapped.as_bytes().to_vec()).ok_or_else(|| {
            VolumeKeyError::Failed("the wrapped key is longer than the key service takes".into())
        })?;
        let attestation = match &self.attester {
            None => None,
            Some(a) => Some(a(recipient.as_bytes()).map_err(|e| {
                VolumeKeyError::Failed(format!("the host's attestation: {e}").into())
            })?),
        };
        let recipient = RecipientKey(*recipient.as_bytes());
        let sealed = self.call(async |c| {
            c.unwrap_attested(volume, &wrapped, &recipient, attestation, caller_token)
                .await
        })?;
        SealedKey::decode(sealed.as_bytes()).map_err(|e| VolumeKeyError::Failed(Box::new(e)))
    }

    fn destroy(&self, volume: &Name, caller_token: &str) -> Result<(), VolumeKeyError> {
        self.call(async |c| c.destroy(volume, caller_token).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_keys_are_bounded_and_never_shown() {
        assert_eq!(
            WrappedVolumeKey::new(Vec::new()),
            Err(WrappedKeyError::Length(0))
        );
        assert_eq!(
            WrappedVolumeKey::new(vec![0; MAX_WRAPPED_KEY_LEN + 1]),
            Err(WrappedKeyError::Length(MAX_WRAPPED_KEY_LEN + 1))
        );
        let w = WrappedVolumeKey::new(vec![0xab; 100]).unwrap();
        assert_eq!(format!("{w:?}"), "WrappedVolumeKey(100 bytes)");
    }
}
