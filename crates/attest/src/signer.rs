//! A TLS key that never leaves the TPM: rustls signs its handshakes through
//! [`Tpm::sign_bound`], so the host proves its identity only while its PCRs
//! hold the values the key is bound to (the software it was enrolled with).

use std::sync::{Arc, Mutex, PoisonError};

use rustls::SignatureScheme;
use rustls::sign::{Signer, SigningKey};
use sha2::{Digest as _, Sha256};

use crate::{BoundKey, Tpm};

/// A TPM-bound ECDSA P-256 key as rustls's [`SigningKey`].
pub struct TpmSigningKey {
    tcti: String,
    key: BoundKey,
    /// One TPM command stream at a time from this process.
    lock: Arc<Mutex<()>>,
}

impl std::fmt::Debug for TpmSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmSigningKey")
            .field("tcti", &self.tcti)
            .finish_non_exhaustive()
    }
}

impl TpmSigningKey {
    /// The key `key` in the TPM behind `tcti`; `lock` serializes this
    /// process's use of the TPM.
    pub fn new(tcti: &str, key: BoundKey, lock: Arc<Mutex<()>>) -> Self {
        Self {
            tcti: tcti.to_owned(),
            key,
            lock,
        }
    }
}

impl SigningKey for TpmSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| {
                Box::new(TpmSigner {
                    tcti: self.tcti.clone(),
                    key: self.key.clone(),
                    lock: Arc::clone(&self.lock),
                }) as Box<dyn Signer>
            })
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ECDSA
    }
}

struct TpmSigner {
    tcti: String,
    key: BoundKey,
    lock: Arc<Mutex<()>>,
}

impl std::fmt::Debug for TpmSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmSigner").finish_non_exhaustive()
    }
}

impl Signer for TpmSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(message).into();
        let _one = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let rs = Tpm::open(&self.tcti)
            .and_then(|mut t| t.sign_bound(&self.key, digest))
            .map_err(|e| rustls::Error::General(format!("the TPM did not sign: {e}")))?;
        Ok(der_signature(&rs[..32], &rs[32..]))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// `r || s` as the DER ECDSA-Sig-Value TLS carries.
fn der_signature(r: &[u8], s: &[u8]) -> Vec<u8> {
    let int = |v: &[u8]| {
        let v = &v[v
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(v.len().saturating_sub(1))..];
        let mut out = vec![0x02];
        let pad = v.first().is_some_and(|b| b & 0x80 != 0);
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    };
    let (r, s) = (int(r), int(s));
    let mut out = vec![0x30, (r.len() + s.len()) as u8];
    out.extend(r);
    out.extend(s);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn der_signatures_are_minimal_and_positive() {
        let mut r = [0u8; 32];
        r[31] = 1;
        let s = [0xffu8; 32];
        let der = super::der_signature(&r, &s);
        assert_eq!(&der[..5], &[0x30, 3 + 35, 0x02, 0x01, 0x01]);
        assert_eq!(&der[5..8], &[0x02, 33, 0x00]);
        assert_eq!(der.len(), 2 + 3 + 35);
    }
}
