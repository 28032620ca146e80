//! Enrollment, the CA's checks: a host gets a certificate only after its TPM
//! proved (1) it is a genuine TPM (its endorsement key's certificate chains
//! to a pinned manufacturer CA), (2) its attestation key lives in that TPM
//! (credential activation), (3) it runs what the reference values describe
//! (a quote with a fresh nonce), and (4) its TLS key and its document key
//! live in that TPM and can sign only while the PCRs hold those reference
//! values (TPM2_Certify of each key, whose name covers its PCR policy). No
//! quote, no certificate.
//!
//! The host's half is [`host_evidence`] and [`host_proof`] over a [`Tpm`];
//! the CA's is [`check_evidence`], [`challenge`] and [`check_proof`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::credential::{Credential, make_credential, policy_pcr_digest};
use crate::quote::{Quote, all_match, compare, verify_quote, verify_signature};
use crate::tpm::BoundKey;
use crate::{AkPublic, AttestError, HOST_PCRS, Tpm};

/// What a host sends first: its TPM's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEvidence {
    /// The endorsement key's certificate (DER).
    #[serde(with = "hex::serde")]
    pub ek_certificate: Vec<u8>,
    /// The endorsement key's TPMT_PUBLIC.
    #[serde(with = "hex::serde")]
    pub ek_public: Vec<u8>,
    /// The attestation key.
    pub attestation_key: AkPublic,
    /// The TLS key's TPMT_PUBLIC (bound to the PCR values).
    #[serde(with = "hex::serde")]
    pub tls_key: Vec<u8>,
    /// The document key's TPMT_PUBLIC (bound to the PCR values).
    #[serde(with = "hex::serde")]
    pub document_key: Vec<u8>,
}

/// The CA's challenge: a credential only the host's TPM can open, for its
/// attestation key, and a fresh nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The credential.
    pub credential: Credential,
    /// The nonce for the quote and the certifications.
    #[serde(with = "hex::serde")]
    pub nonce: Vec<u8>,
}

/// The host's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProof {
    /// The credential's secret as the TPM recovered it.
    #[serde(with = "hex::serde")]
    pub activated: Vec<u8>,
    /// A quote of the host's PCRs with the nonce.
    pub quote: Quote,
    /// TPM2_Certify of the TLS key by the attestation key (TPMS_ATTEST).
    #[serde(with = "hex::serde")]
    pub tls_certify: Vec<u8>,
    /// Its signature (TPMT_SIGNATURE).
    #[serde(with = "hex::serde")]
    pub tls_certify_signature: Vec<u8>,
    /// TPM2_Certify of the document key.
    #[serde(with = "hex::serde")]
    pub document_certify: Vec<u8>,
    /// Its signature.
    #[serde(with = "hex::serde")]
    pub document_certify_signature: Vec<u8>,
}

/// What the CA may certify once every check passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// The TLS key's uncompressed P-256 point.
    pub tls_point: Vec<u8>,
    /// The document key's uncompressed P-384 point.
    pub document_point: Vec<u8>,
    /// The attestation key to pin.
    pub attestation_key: AkPublic,
    /// The PCR values quoted.
    pub pcrs: crate::Pcrs,
}

/// Why enrollment was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The endorsement key's certificate does not chain to a pinned CA, or
    /// is not for this endorsement key.
    #[error("endorsement key certificate: {0}")]
    EndorsementKey(String),
    /// The TPM could not open the credential: another TPM, or another key.
    #[error("credential activation failed: the attestation key is not in the certified TPM")]
    Activation,
    /// The quote does not verify.
    #[error("quote: {0}")]
    Quote(AttestError),
    /// The measured PCRs are not the reference values.
    #[error("the host does not run what the reference values describe: {0}")]
    Measurements(String),
    /// A key's certification does not verify or the key is not as required.
    #[error("{key} key: {reason}")]
    Key {
        /// Which key.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// A TPM or parsing failure.
    #[error(transparent)]
    Attest(#[from] AttestError),
}

/// The host's half, first step: reads its TPM's keys, creating the TLS key
/// bound to the PCR values the TPM holds now (which are the measured boot's
/// when init calls this).
pub fn host_evidence(tpm: &mut Tpm) -> Result<(HostEvidence, BoundKey), AttestError> {
    let pcrs = tpm.pcrs(&HOST_PCRS)?;
    let values: Vec<[u8; 32]> = pcrs.0.values().copied().collect();
    let tls = tpm.create_bound_key(&HOST_PCRS, &values)?;
    let evidence = HostEvidence {
        ek_certificate: tpm.ek_certificate()?.unwrap_or_default(),
        ek_public: tpm.ek_public()?,
        attestation_key: tpm.attestation_key()?,
        tls_key: tls.public.clone(),
        document_key: tpm.document_key()?.tpmt_public,
    };
    Ok((evidence, tls))
}

/// The host's half, second step: opens the credential, quotes, certifies.
pub fn host_proof(
    tpm: &mut Tpm,
    tls: &BoundKey,
    challenge: &Challenge,
) -> Result<HostProof, AttestError> {
    let activated = tpm.activate_credential(&challenge.credential)?;
    let quote = tpm.quote(&challenge.nonce, &HOST_PCRS)?;
    let (tls_certify, tls_certify_signature) = tpm.certify(tls, &challenge.nonce)?;
    let (document_certify, document_certify_signature) =
        tpm.certify_document_key(&challenge.nonce)?;
    Ok(HostProof {
        activated,
        quote,
        tls_certify,
        tls_certify_signature,
        document_certify,
        document_certify_signature,
    })
}

/// Checks the endorsement key's certificate: signed by one of `ek_cas`
/// (DER; the manufacturer's root and intermediates, pinned), valid now, and
/// for the endorsement key the host named.
pub fn check_evidence(evidence: &HostEvidence, ek_cas: &[Vec<u8>]) -> Result<(), EnrollError> {
    use x509_parser::prelude::*;
    let bad = |s: String| EnrollError::EndorsementKey(s);
    let (_, cert) = X509Certificate::from_der(&evidence.ek_certificate)
        .map_err(|e| bad(format!("not a certificate: {e}")))?;
    if !cert.validity().is_valid() {
        return Err(bad("not valid now".into()));
    }
    let signed = ek_cas.iter().any(|ca| {
        X509Certificate::from_der(ca)
            .ok()
            .is_some_and(|(_, ca)| ca.validity().is_valid() && signed_by(&cert, &ca))
    });
    if !signed {
        return Err(bad("not signed by a pinned manufacturer CA".into()));
    }
    // The certified key is the endorsement key the host named.
    let (a, b) = crate::credential::ek_key(&evidence.ek_public)?;
    let strip = |v: &[u8]| v[v.iter().position(|&x| x != 0).unwrap_or(v.len())..].to_vec();
    let same = match cert.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
            strip(rsa.modulus) == strip(&a) && strip(rsa.exponent) == strip(&b)
        }
        Ok(x509_parser::public_key::PublicKey::EC(point)) => {
            let mut p = vec![4u8];
            p.extend_from_slice(&a);
            p.extend_from_slice(&b);
            point.data() == p.as_slice()
        }
        _ => false,
    };
    if !same {
        return Err(bad("the certificate is for another key".into()));
    }
    Ok(())
}

/// The host's check of a certificate the CA sends back after enrollment:
/// issued by `ca` (DER, the cell CA pinned at provisioning), valid now,
/// and for the key whose uncompressed point is `point` (a key of this
/// host's TPM). Anyone may send a host certificates; only these are kept.
pub fn check_issued(cert: &[u8], ca: &[u8], point: &[u8]) -> Result<(), String> {
    use x509_parser::prelude::*;
    if !issued_by(cert, ca) {
        return Err("not issued by the cell CA, or not valid now".into());
    }
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| format!("not a certificate: {e}"))?;
    if parsed.public_key().subject_public_key.data.as_ref() != point {
        return Err("not for this host's key".into());
    }
    Ok(())
}

/// Whether `cert` (DER) names `ca` (DER) as its issuer, is signed by its
/// key, and both are valid now.
pub fn issued_by(cert: &[u8], ca: &[u8]) -> bool {
    use x509_parser::prelude::*;
    match (
        X509Certificate::from_der(cert),
        X509Certificate::from_der(ca),
    ) {
        (Ok((_, c)), Ok((_, a))) => {
            c.validity().is_valid() && a.validity().is_valid() && signed_by(&c, &a)
        }
        _ => false,
    }
}

fn signed_by(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    ca: &x509_parser::certificate::X509Certificate<'_>,
) -> bool {
    use ring::signature as sig;
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    let alg: &dyn sig::VerificationAlgorithm = match oid.as_str() {
        "1.2.840.113549.1.1.11" => &sig::RSA_PKCS1_2048_8192_SHA256,
        "1.2.840.113549.1.1.12" => &sig::RSA_PKCS1_2048_8192_SHA384,
        "1.2.840.10045.4.3.2" => &sig::ECDSA_P256_SHA256_ASN1,
        "1.2.840.10045.4.3.3" => &sig::ECDSA_P384_SHA384_ASN1,
        _ => return false,
    };
    cert.issuer() == ca.subject()
        && sig::UnparsedPublicKey::new(alg, &ca.public_key().subject_public_key.data)
            .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
            .is_ok()
}

/// The CA's challenge for checked evidence: a fresh 32-byte secret in a
/// credential for the attestation key, and a fresh nonce. The secret stays
/// with the CA.
pub fn challenge(evidence: &HostEvidence) -> Result<(Challenge, [u8; 32]), EnrollError> {
    evidence.attestation_key.point()?;
    let rng = ring::rand::SystemRandom::new();
    let mut secret = [0u8; 32];
    let mut nonce = [0u8; 32];
    ring::rand::SecureRandom::fill(&rng, &mut secret)
        .map_err(|_| AttestError::Malformed("randomness"))?;
    ring::rand::SecureRandom::fill(&rng, &mut nonce)
        .map_err(|_| AttestError::Malformed("randomness"))?;
    let credential = make_credential(
        &evidence.ek_public,
        &evidence.attestation_key.name(),
        &secret,
    )?;
    Ok((
        Challenge {
            credential,
            nonce: nonce.to_vec(),
        },
        secret,
    ))
}

const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;
const TPM_GENERATED_VALUE: u32 = 0xff54_4347;

/// The name a certification names, after checking its signature by `ak`,
/// its type and its nonce.
fn certified_name(
    ak: &AkPublic,
    message: &[u8],
    signature: &[u8],
    nonce: &[u8],
) -> Result<Vec<u8>, String> {
    let rs = crate::quote::ecdsa_p384_rs(signature).map_err(|e| e.to_string())?;
    verify_signature(ak, message, &rs).map_err(|e| e.to_string())?;
    let mut r = crate::quote::Reader { b: message };
    let e = |e: AttestError| e.to_string();
    if r.u32().map_err(e)? != TPM_GENERATED_VALUE {
        return Err("not a TPM-generated structure".into());
    }
    if r.u16().map_err(e)? != TPM_ST_ATTEST_CERTIFY {
        return Err("not a certification".into());
    }
    let _signer = r.tpm2b().map_err(e)?;
    if r.tpm2b().map_err(e)? != nonce {
        return Err("its nonce is not the challenge's".into());
    }
    r.take(8 + 4 + 4 + 1 + 8).map_err(e)?; // clock info and firmware version
    let name = r.tpm2b().map_err(e)?.to_vec();
    Ok(name)
}

fn key_name(tpmt_public: &[u8]) -> Vec<u8> {
    let mut n = vec![0x00, 0x0b];
    n.extend_from_slice(&Sha256::digest(tpmt_public));
    n
}

/// A TPM-fixed signing key's public area (ECC, named with SHA-256),
/// checked to be usable only through its policy (userWithAuth clear, not
/// restricted) and that policy to be PolicyPCR over `reference`'s host
/// PCRs. Returns where its parameters start.
fn check_bound_policy(
    tpmt_public: &[u8],
    reference: &BTreeMap<u8, [u8; 32]>,
) -> Result<usize, String> {
    let b = tpmt_public;
    let get = |at: usize, n: usize| b.get(at..at + n).ok_or("the key's public area ends early");
    let u16_at = |at: usize| get(at, 2).map(|s| u16::from_be_bytes([s[0], s[1]]));
    if u16_at(0)? != 0x0023 || u16_at(2)? != 0x000b {
        return Err("not an ECC key named with SHA-256".into());
    }
    let attrs = u32::from_be_bytes(get(4, 4)?.try_into().unwrap_or_default());
    let (fixed_tpm, fixed_parent, sdo, user_with_auth, sign, restricted) =
        (1 << 1, 1 << 4, 1 << 5, 1 << 6, 1 << 18, 1 << 16);
    if attrs & (fixed_tpm | fixed_parent | sdo | sign) != (fixed_tpm | fixed_parent | sdo | sign)
        || attrs & (user_with_auth | restricted) != 0
    {
        return Err("not a TPM-fixed signing key usable only through its policy".into());
    }
    let policy_len = u16_at(8)? as usize;
    let policy = get(10, policy_len)?;
    let values: Vec<[u8; 32]> = HOST_PCRS
        .iter()
        .filter_map(|i| reference.get(i).copied())
        .collect();
    if values.len() != HOST_PCRS.len() {
        return Err("the reference values lack a host PCR".into());
    }
    if policy != policy_pcr_digest(&HOST_PCRS, &values) {
        return Err("its policy is not bound to the reference values".into());
    }
    Ok(10 + policy_len)
}

/// The TLS key's public area, checked: ECC P-256, a TPM-fixed signing key
/// usable only through its policy, which is PolicyPCR over `reference`.
fn check_tls_key(
    tpmt_public: &[u8],
    reference: &BTreeMap<u8, [u8; 32]>,
) -> Result<Vec<u8>, String> {
    check_bound_policy(tpmt_public, reference)?;
    tls_point(tpmt_public)
}

/// The uncompressed point (`04 || x || y`) of a TLS key's public area
/// (ECC P-256), without checking its policy.
pub fn tls_point(tpmt_public: &[u8]) -> Result<Vec<u8>, String> {
    let b = tpmt_public;
    let get = |at: usize, n: usize| b.get(at..at + n).ok_or("the key's public area ends early");
    let u16_at = |at: usize| get(at, 2).map(|s| u16::from_be_bytes([s[0], s[1]]));
    if u16_at(0)? != 0x0023 {
        return Err("not an ECC key".into());
    }
    let parameters = 10 + u16_at(8)? as usize;
    // symmetric NULL, scheme ECDSA(hash), curve P-256, kdf NULL, then x, y.
    let mut at = parameters;
    if u16_at(at)? != 0x0010 {
        return Err("it has a symmetric algorithm".into());
    }
    at += 2;
    if u16_at(at)? != 0x0010 {
        at += 2;
    }
    at += 2;
    if u16_at(at)? != 0x0003 {
        return Err("not on P-256".into());
    }
    at += 2;
    if u16_at(at)? != 0x0010 {
        at += 2;
    }
    at += 2;
    let mut point = vec![4u8];
    for _ in 0..2 {
        let n = u16_at(at)? as usize;
        let c = get(at + 2, n)?;
        let c = &c[c.iter().position(|&x| x != 0).unwrap_or(c.len())..];
        if c.len() > 32 {
            return Err("a coordinate longer than 32 bytes".into());
        }
        point.extend(std::iter::repeat_n(0u8, 32 - c.len()));
        point.extend_from_slice(c);
        at += 2 + n;
    }
    Ok(point)
}

/// The CA's final check of a host's proof against its challenge, the
/// secret it put in the credential, and the reference values (PCRs 4, 11
/// and 15, computed from the host image). Every check must pass.
pub fn check_proof(
    evidence: &HostEvidence,
    challenge: &Challenge,
    secret: &[u8; 32],
    proof: &HostProof,
    reference: &BTreeMap<u8, [u8; 32]>,
) -> Result<Enrolled, EnrollError> {
    use subtle_free::ct_eq;
    if !ct_eq(&proof.activated, secret) {
        return Err(EnrollError::Activation);
    }
    let ak = &evidence.attestation_key;
    verify_quote(ak, &proof.quote, &challenge.nonce).map_err(EnrollError::Quote)?;
    let lines = compare(&proof.quote.pcrs, reference);
    if !all_match(&lines) || HOST_PCRS.iter().any(|i| !reference.contains_key(i)) {
        let wrong: Vec<String> = lines
            .iter()
            .filter(|l| !l.matched)
            .map(|l| format!("PCR {} is {}, expected {}", l.index, l.measured, l.expected))
            .collect();
        return Err(EnrollError::Measurements(if wrong.is_empty() {
            "the reference values lack a host PCR".into()
        } else {
            wrong.join("; ")
        }));
    }
    let key = |key: &'static str| move |reason: String| EnrollError::Key { key, reason };
    let name = certified_name(
        ak,
        &proof.tls_certify,
        &proof.tls_certify_signature,
        &challenge.nonce,
    )
    .map_err(key("TLS"))?;
    if name != key_name(&evidence.tls_key) {
        return Err(key("TLS")("the certified key is not the one named".into()));
    }
    let tls_point = check_tls_key(&evidence.tls_key, reference).map_err(key("TLS"))?;
    let name = certified_name(
        ak,
        &proof.document_certify,
        &proof.document_certify_signature,
        &challenge.nonce,
    )
    .map_err(key("document"))?;
    if name != key_name(&evidence.document_key) {
        return Err(key("document")(
            "the certified key is not the one named".into(),
        ));
    }
    check_bound_policy(&evidence.document_key, reference).map_err(key("document"))?;
    let document_point = AkPublic {
        tpmt_public: evidence.document_key.clone(),
    }
    .document_point()
    .map_err(|e| key("document")(e.to_string()))?;
    Ok(Enrolled {
        tls_point,
        document_point,
        attestation_key: ak.clone(),
        pcrs: proof.quote.pcrs.clone(),
    })
}

mod subtle_free {
    /// Compares in time independent of where the inputs differ.
    pub(super) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}
