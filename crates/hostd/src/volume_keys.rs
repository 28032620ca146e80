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
//! The host agent is given its source ([`crate::HostdOptions::volume_keys`]);
//! without one it launches only instances without volumes.

use std::error::Error;
use std::fmt;

use nitrile_api::Name;
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
    /// Makes `volume`'s data key; returns it wrapped.
    fn generate(
        &self,
        volume: &Name,
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
