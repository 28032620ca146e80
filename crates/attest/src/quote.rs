//! The verifier side of a TPM quote, written from the TPM 2.0 structures
//! (Part 2: TPMS_ATTEST, TPMS_QUOTE_INFO, TPMT_SIGNATURE, TPMT_PUBLIC) with
//! no TPM library: what it accepts is checked against tpm2-tools'
//! `tpm2_checkquote` in the tests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{AkPublic, AttestError, Pcrs};

/// The PCR bank quoted: SHA-256 (the bank swtpm and OVMF extend).
pub const PCR_BANK: tss_esapi::interface_types::algorithm::HashingAlgorithm =
    tss_esapi::interface_types::algorithm::HashingAlgorithm::Sha256;

const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
const TPM_ALG_SHA256: u16 = 0x000b;
const TPM_ALG_SHA384: u16 = 0x000c;
const TPM_ALG_ECDSA: u16 = 0x0018;

/// A quote as the host returns it: the signed TPMS_ATTEST, its
/// TPMT_SIGNATURE, and the values of the quoted PCRs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    /// The marshalled TPMS_ATTEST (what `tpm2_quote -m` writes).
    #[serde(with = "hex::serde")]
    pub message: Vec<u8>,
    /// The marshalled TPMT_SIGNATURE (what `tpm2_quote -s` writes).
    #[serde(with = "hex::serde")]
    pub signature: Vec<u8>,
    /// The PCR values (SHA-256 bank) the quote covers.
    pub pcrs: Pcrs,
}

/// What a verified quote says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteInfo {
    /// The TPM's clock (ms) when it quoted.
    pub clock: u64,
    /// TPM resets (reboots) since it was cleared.
    pub reset_count: u32,
    /// TPM restarts (resumes) since the last reset.
    pub restart_count: u32,
    /// The TPM's firmware version.
    pub firmware_version: u64,
    /// The quoted PCRs, in order.
    pub pcrs: Vec<u8>,
}

pub(crate) struct Reader<'a> {
    pub(crate) b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], AttestError> {
        if self.b.len() < n {
            return Err(AttestError::Malformed("a TPM structure ends early"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, AttestError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, AttestError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, AttestError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, AttestError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().unwrap_or_default()))
    }
    pub(crate) fn tpm2b(&mut self) -> Result<&'a [u8], AttestError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// The TPMS_ATTEST of a quote, parsed.
struct Attest<'a> {
    extra_data: &'a [u8],
    info: QuoteInfo,
    pcr_digest: &'a [u8],
}

fn parse_attest(message: &[u8]) -> Result<Attest<'_>, AttestError> {
    let mut r = Reader { b: message };
    if r.u32()? != TPM_GENERATED_VALUE {
        return Err(AttestError::Malformed("not a TPM-generated structure"));
    }
    if r.u16()? != TPM_ST_ATTEST_QUOTE {
        return Err(AttestError::Malformed("not a quote"));
    }
    let _qualified_signer = r.tpm2b()?;
    let extra_data = r.tpm2b()?;
    let clock = r.u64()?;
    let reset_count = r.u32()?;
    let restart_count = r.u32()?;
    let _safe = r.u8()?;
    let firmware_version = r.u64()?;
    let banks = r.u32()?;
    let mut pcrs = Vec::new();
    for _ in 0..banks {
        let hash = r.u16()?;
        let size = r.u8()? as usize;
        let bits = r.take(size)?;
        if hash != TPM_ALG_SHA256 {
            return Err(AttestError::Malformed(
                "a quote of a bank other than SHA-256",
            ));
        }
        if !pcrs.is_empty() {
            return Err(AttestError::Malformed(
                "a quote selecting the SHA-256 bank twice",
            ));
        }
        for (byte, b) in bits.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pcrs.push((byte * 8 + bit) as u8);
                }
            }
        }
    }
    let pcr_digest = r.tpm2b()?;
    if !r.b.is_empty() {
        return Err(AttestError::Malformed("bytes after a quote"));
    }
    Ok(Attest {
        extra_data,
        info: QuoteInfo {
            clock,
            reset_count,
            restart_count,
            firmware_version,
            pcrs,
        },
        pcr_digest,
    })
}

/// The `r || s` of an ECDSA P-384 TPMT_SIGNATURE.
pub fn ecdsa_p384_rs(signature: &[u8]) -> Result<[u8; 96], AttestError> {
    let mut r = Reader { b: signature };
    if r.u16()? != TPM_ALG_ECDSA || r.u16()? != TPM_ALG_SHA384 {
        return Err(AttestError::Malformed(
            "a signature other than ECDSA with SHA-384",
        ));
    }
    let sr = r.tpm2b()?;
    let ss = r.tpm2b()?;
    if !r.b.is_empty() {
        return Err(AttestError::Malformed("bytes after a signature"));
    }
    let mut out = [0u8; 96];
    let (lo, hi) = out.split_at_mut(48);
    for (part, dst) in [(sr, lo), (ss, hi)] {
        let part = strip(part);
        if part.len() > 48 {
            return Err(AttestError::Malformed(
                "an ECDSA component longer than 48 bytes",
            ));
        }
        dst[48 - part.len()..].copy_from_slice(part);
    }
    Ok(out)
}

fn strip(v: &[u8]) -> &[u8] {
    &v[v.iter().position(|&b| b != 0).unwrap_or(v.len())..]
}

/// Checks an ECDSA P-384/SHA-384 signature (`r || s`) by the attestation key.
pub fn verify_signature(ak: &AkPublic, data: &[u8], rs: &[u8]) -> Result<(), AttestError> {
    let point = ak.point()?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P384_SHA384_FIXED, point)
        .verify(data, rs)
        .map_err(|_| AttestError::BadSignature)
}

/// Verifies a quote: signed by `ak`, of the SHA-256 bank, over exactly the
/// PCR values it carries, with `nonce` as its qualifying data. Whether the
/// nonce is fresh, and whether the values are the expected ones, are the
/// caller's checks ([`crate::Challenges`], [`compare`]).
pub fn verify_quote(ak: &AkPublic, quote: &Quote, nonce: &[u8]) -> Result<QuoteInfo, AttestError> {
    let rs = ecdsa_p384_rs(&quote.signature)?;
    verify_signature(ak, &quote.message, &rs)?;
    let attest = parse_attest(&quote.message)?;
    if attest.extra_data != nonce {
        return Err(AttestError::NonceMismatch);
    }
    let listed: Vec<u8> = quote.pcrs.0.keys().copied().collect();
    if listed != attest.info.pcrs {
        return Err(AttestError::PcrSelection {
            quoted: attest.info.pcrs,
            carried: listed,
        });
    }
    // The digest of the quoted PCRs is made with the signing scheme's hash
    // (SHA-384 for the attestation key), whatever the bank.
    let mut h = sha2::Sha384::new();
    for v in quote.pcrs.0.values() {
        h.update(v);
    }
    if h.finalize().as_slice() != attest.pcr_digest {
        return Err(AttestError::PcrDigest);
    }
    Ok(attest.info)
}

/// One PCR compared with its reference value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcrMatch {
    /// The PCR.
    pub index: u8,
    /// Its value in the quote (hex).
    pub measured: String,
    /// The reference value (hex).
    pub expected: String,
    /// Whether they are equal.
    pub matched: bool,
}

/// Compares quoted PCRs with reference values: every reference PCR must be
/// quoted. Returns one line per reference PCR; [`all_match`] says whether
/// the host runs what the reference describes.
pub fn compare(pcrs: &Pcrs, reference: &BTreeMap<u8, [u8; 32]>) -> Vec<PcrMatch> {
    reference
        .iter()
        .map(|(&index, expected)| {
            let measured = pcrs.0.get(&index);
            PcrMatch {
                index,
                measured: measured
                    .map(hex::encode)
                    .unwrap_or_else(|| "(not quoted)".into()),
                expected: hex::encode(expected),
                matched: measured == Some(expected),
            }
        })
        .collect()
}

/// Whether every line of [`compare`] matched (and there was one).
pub fn all_match(lines: &[PcrMatch]) -> bool {
    !lines.is_empty() && lines.iter().all(|l| l.matched)
}

/// The value a PCR holds after extending it from zero with `digests`.
pub fn replay(digests: impl IntoIterator<Item = [u8; 32]>) -> [u8; 32] {
    let mut pcr = [0u8; 32];
    for d in digests {
        let mut h = Sha256::new();
        h.update(pcr);
        h.update(d);
        pcr = h.finalize().into();
    }
    pcr
}
