//! A host's TPM 2.0, and the checks of what it says.
//!
//! The host side ([`Tpm`], over tss-esapi and tpm2-tss; the TCTI comes from
//! the host's config: `swtpm:path=...` in tests, `device:/dev/tpmrm0` on
//! hardware) reads and extends PCRs, derives the attestation key, quotes,
//! signs attestation documents and keeps the anti-rollback record of host
//! software in NV memory. The verifier side ([`verify_quote`], [`compare`],
//! [`Challenges`]) uses no TPM library: it parses the TPM's structures
//! itself and checks the signature with ring.
//!
//! # The attestation key
//!
//! A restricted ECDSA P-384 signing key, a primary of the endorsement
//! hierarchy ([`tpm::attestation_key_template`]): the TPM derives the same
//! key from its endorsement seed every time, so nothing of it is stored on
//! the host's disk and a copy of the disk holds nothing that can sign. It
//! signs quotes, and documents only through a TPM hash ticket, so a document
//! signature can never be passed off as a quote.
//!
//! # What this crate guarantees, and what not
//!
//! A quote that [`verify_quote`] accepts was made by the TPM holding the
//! attestation key, over the PCR values it carries, with the given nonce.
//! Whether the nonce is fresh is [`Challenges`]' check, whether the values
//! are the expected ones is [`compare`]'s, and whether the key is a genuine
//! TPM's is enrollment's (the endorsement key's certificate).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub mod cose;
pub mod credential;
pub mod enroll;
pub mod quote;
pub mod signer;
pub mod swtpm;
pub mod tpm;

pub use quote::{PcrMatch, Quote, QuoteInfo, all_match, compare, replay, verify_quote};
pub use tpm::{BoundKey, Tpm};

/// The PCR that `nitrile host-init` extends with what it loads (hostd's
/// config, the pinned issuer keys, the trust roots).
pub const INIT_PCR: u8 = 15;
/// The PCRs a host quotes: the firmware's measurement of the boot
/// application (4), the UKI stub's of its sections (11), and init's (15).
pub const HOST_PCRS: [u8; 3] = [4, 11, INIT_PCR];

/// Why a TPM operation or a check failed.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The TCTI string is not one this crate opens.
    #[error("TPM interface: {0}")]
    Tcti(String),
    /// The TPM (or tpm2-tss) refused or failed.
    #[error("TPM: {what}: {source}")]
    Tpm {
        /// What was being done.
        what: &'static str,
        /// tss-esapi's error.
        source: Box<tss_esapi::Error>,
    },
    /// A PCR index outside 0..=23 (or not extendable).
    #[error("PCR {0} is not one this crate reads or extends")]
    PcrIndex(u8),
    /// The TPM has no SHA-256 PCR bank.
    #[error("the TPM has no active SHA-256 PCR bank")]
    NoBank,
    /// A nonce longer than a quote can carry.
    #[error("a nonce of {0} bytes (at most 64)")]
    Nonce(usize),
    /// Data too large to sign in one TPM hash.
    #[error("{0} bytes are too many to sign (at most 1024)")]
    TooLarge(usize),
    /// A structure that does not parse.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// The signature is not the attestation key's.
    #[error("the signature does not verify under the attestation key")]
    BadSignature,
    /// The quote's qualifying data is not the nonce asked for.
    #[error("the quote's nonce is not the one asked for")]
    NonceMismatch,
    /// The nonce was never issued here, was used already, or expired.
    #[error("the nonce is {0}")]
    StaleNonce(&'static str),
    /// The PCRs carried are not the ones quoted.
    #[error("the quote covers PCRs {quoted:?} but carries values of {carried:?}")]
    PcrSelection {
        /// Selected in the signed structure.
        quoted: Vec<u8>,
        /// Carried beside it.
        carried: Vec<u8>,
    },
    /// The values carried do not hash to the quoted digest.
    #[error("the PCR values do not match the quoted digest")]
    PcrDigest,
    /// The TPM refused a key's use: its policy (the PCR values it is bound
    /// to) does not hold.
    #[error("the TPM refused to use the key (its PCR policy does not hold): {0}")]
    PolicyRefused(String),
    /// The TPM's anti-rollback record is above the version offered.
    #[error(
        "the TPM records version {} and refuses {}",
        version_string(recorded),
        version_string(offered)
    )]
    Rollback {
        /// The TPM's record.
        recorded: [u8; 8],
        /// What was offered.
        offered: [u8; 8],
    },
}

/// PCR values of the SHA-256 bank, by index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pcrs(pub BTreeMap<u8, [u8; 32]>);

impl Serialize for Pcrs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let m: BTreeMap<String, String> = self
            .0
            .iter()
            .map(|(k, v)| (k.to_string(), hex::encode(v)))
            .collect();
        m.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Pcrs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let m = BTreeMap::<String, String>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (k, v) in m {
            let i: u8 = k
                .parse()
                .map_err(|_| D::Error::custom(format!("PCR index {k:?}")))?;
            if i > 23 {
                return Err(D::Error::custom(format!("PCR index {i}")));
            }
            let v: [u8; 32] = hex::decode(&v)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| D::Error::custom(format!("PCR {i}: not 32 bytes of hex")))?;
            out.insert(i, v);
        }
        Ok(Pcrs(out))
    }
}

/// The attestation key's public area (a marshalled TPMT_PUBLIC), the form
/// `tpm2_checkquote -u` reads and a TPM names the key by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AkPublic {
    /// The marshalled TPMT_PUBLIC.
    #[serde(with = "hex::serde")]
    pub tpmt_public: Vec<u8>,
}

const TPM_ALG_ECC: u16 = 0x0023;
const TPM_ALG_NULL: u16 = 0x0010;
const TPM_ECC_NIST_P384: u16 = 0x0004;
// TPMA_OBJECT bits.
const FIXED_TPM: u32 = 1 << 1;
const FIXED_PARENT: u32 = 1 << 4;
const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
const RESTRICTED: u32 = 1 << 16;
const DECRYPT: u32 = 1 << 17;
const SIGN: u32 = 1 << 18;

impl AkPublic {
    pub(crate) fn from_tpm_public(
        public: &tss_esapi::structures::Public,
    ) -> Result<Self, AttestError> {
        let ak = Self::from_tpm_public_any(public)?;
        ak.point()?;
        Ok(ak)
    }

    pub(crate) fn from_tpm_public_any(
        public: &tss_esapi::structures::Public,
    ) -> Result<Self, AttestError> {
        use tss_esapi::traits::Marshall;
        let tpmt_public = public.marshall().map_err(|e| AttestError::Tpm {
            what: "marshalling a public key",
            source: Box::new(e),
        })?;
        Ok(Self { tpmt_public })
    }

    /// The uncompressed P-384 point (`04 || x || y`), after checking that
    /// this is a restricted, TPM-fixed ECDSA P-384 signing key.
    pub fn point(&self) -> Result<Vec<u8>, AttestError> {
        self.point_of(true)
    }

    /// The uncompressed point of the document key: a TPM-fixed ECDSA P-384
    /// signing key that is not restricted.
    pub fn document_point(&self) -> Result<Vec<u8>, AttestError> {
        self.point_of(false)
    }

    fn point_of(&self, restricted: bool) -> Result<Vec<u8>, AttestError> {
        let b = &self.tpmt_public;
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], AttestError> {
            let s = b
                .get(at..at + n)
                .ok_or(AttestError::Malformed("a public key ends early"))?;
            at += n;
            Ok(s)
        };
        let u16_of = |s: &[u8]| u16::from_be_bytes([s[0], s[1]]);
        if u16_of(take(2)?) != TPM_ALG_ECC {
            return Err(AttestError::Malformed(
                "the attestation key is not an ECC key",
            ));
        }
        let _name_alg = take(2)?;
        let a = take(4)?;
        let attrs = u32::from_be_bytes([a[0], a[1], a[2], a[3]]);
        let want = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | SIGN;
        if attrs & want != want || attrs & DECRYPT != 0 || (attrs & RESTRICTED != 0) != restricted {
            return Err(AttestError::Malformed(
                "the attestation key is not a restricted, TPM-fixed signing key",
            ));
        }
        let policy_len = u16_of(take(2)?) as usize;
        take(policy_len)?;
        if u16_of(take(2)?) != TPM_ALG_NULL {
            return Err(AttestError::Malformed(
                "the attestation key has a symmetric algorithm",
            ));
        }
        let scheme = u16_of(take(2)?);
        if scheme != TPM_ALG_NULL {
            take(2)?;
        }
        if u16_of(take(2)?) != TPM_ECC_NIST_P384 {
            return Err(AttestError::Malformed(
                "the attestation key is not on P-384",
            ));
        }
        if u16_of(take(2)?) != TPM_ALG_NULL {
            take(2)?;
        }
        let mut point = vec![4u8];
        for _ in 0..2 {
            let n = u16_of(take(2)?) as usize;
            let c = take(n)?;
            let c = &c[c.iter().position(|&x| x != 0).unwrap_or(c.len())..];
            if c.len() > 48 {
                return Err(AttestError::Malformed(
                    "a P-384 coordinate longer than 48 bytes",
                ));
            }
            point.extend(std::iter::repeat_n(0u8, 48 - c.len()));
            point.extend_from_slice(c);
        }
        Ok(point)
    }

    /// The key's TPM name: `000b || SHA-256(TPMT_PUBLIC)`.
    pub fn name(&self) -> Vec<u8> {
        let mut n = vec![0x00, 0x0b];
        n.extend_from_slice(&Sha256::digest(&self.tpmt_public));
        n
    }

    /// The key as a DER SubjectPublicKeyInfo (id-ecPublicKey, secp384r1).
    pub fn spki_der(&self) -> Result<Vec<u8>, AttestError> {
        self.spki_of(self.point()?)
    }

    fn spki_of(&self, point: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        const PREFIX: [u8; 23] = [
            0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x05, 0x2b, 0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
        ];
        let mut der = PREFIX.to_vec();
        der.extend_from_slice(&point);
        Ok(der)
    }

    /// The key as PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn pem(&self) -> Result<String, AttestError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.spki_der()?);
        let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
        Ok(out)
    }
}

/// Encodes a version `major.minor.patch` as 8 bytes whose order is the
/// versions' order (u16, u16, u32, big-endian), for the TPM's
/// anti-rollback record; `None` if a part does not fit.
pub fn version_bytes(major: u64, minor: u64, patch: u64) -> Option<[u8; 8]> {
    let major = u16::try_from(major).ok()?;
    let minor = u16::try_from(minor).ok()?;
    let patch = u32::try_from(patch).ok()?;
    let mut out = [0u8; 8];
    out[..2].copy_from_slice(&major.to_be_bytes());
    out[2..4].copy_from_slice(&minor.to_be_bytes());
    out[4..].copy_from_slice(&patch.to_be_bytes());
    Some(out)
}

/// The inverse of [`version_bytes`], as `major.minor.patch`.
pub fn version_string(b: &[u8; 8]) -> String {
    let major = u16::from_be_bytes([b[0], b[1]]);
    let minor = u16::from_be_bytes([b[2], b[3]]);
    let patch = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    format!("{major}.{minor}.{patch}")
}

/// Nonces a verifier issued: each may be redeemed once, within its
/// lifetime. A quote whose nonce is not redeemable is stale or replayed.
#[derive(Debug)]
pub struct Challenges {
    lifetime: Duration,
    issued: Mutex<BTreeMap<[u8; 32], Instant>>,
}

impl Challenges {
    /// Nonces that live `lifetime`.
    pub fn new(lifetime: Duration) -> Self {
        Self {
            lifetime,
            issued: Mutex::new(BTreeMap::new()),
        }
    }

    /// A fresh random nonce.
    pub fn issue(&self) -> [u8; 32] {
        let mut n = [0u8; 32];
        let rng = ring::rand::SystemRandom::new();
        ring::rand::SecureRandom::fill(&rng, &mut n).unwrap_or_else(|_| {
            // The OS random source failing is not recoverable.
            std::process::abort()
        });
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        issued.retain(|_, t| now.duration_since(*t) < self.lifetime);
        issued.insert(n, now);
        n
    }

    /// Redeems `nonce`: refused if it was never issued here, was redeemed
    /// already, or is older than the lifetime.
    pub fn redeem(&self, nonce: &[u8]) -> Result<(), AttestError> {
        let key: [u8; 32] = nonce
            .try_into()
            .map_err(|_| AttestError::StaleNonce("not one issued here"))?;
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        match issued.remove(&key) {
            None => Err(AttestError::StaleNonce(
                "not one issued here, or used already",
            )),
            Some(t) if t.elapsed() >= self.lifetime => Err(AttestError::StaleNonce("expired")),
            Some(_) => Ok(()),
        }
    }
}

/// Reads reference values: a JSON object with `pcr<N>` keys (or a `pcrs`
/// object of index to value), 64 hex digits each, as `nitrile image
/// build-host` writes `reference.json`. Other keys are ignored; none at
/// all is an error.
pub fn reference_values(json: &[u8]) -> Result<BTreeMap<u8, [u8; 32]>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let mut out = BTreeMap::new();
    let mut take = |k: &str, v: &serde_json::Value| -> Result<(), String> {
        let i: u8 = k
            .parse()
            .ok()
            .filter(|i| *i < 24)
            .ok_or_else(|| format!("PCR {k:?}"))?;
        let value: [u8; 32] = v
            .as_str()
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("PCR {i} is not 64 hex digits"))?;
        out.insert(i, value);
        Ok(())
    };
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            if let Some(n) = k
                .strip_prefix("pcr")
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            {
                take(n, val)?;
            }
        }
        if let Some(pcrs) = obj.get("pcrs").and_then(|p| p.as_object()) {
            for (k, val) in pcrs {
                take(k, val)?;
            }
        }
    }
    if out.is_empty() {
        return Err("no reference PCR values in it".into());
    }
    Ok(out)
}
