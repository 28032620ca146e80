//! Attestation documents in the layout of AWS Nitro: a COSE_Sign1 (RFC
//! 9052, tag 18) with the protected header `{1: -35}` (ES384), an empty
//! unprotected header, and as payload the Nitro Enclaves attestation
//! document's CBOR map, with the TPM's PCRs under `nitrotpm_pcrs` as AWS
//! NitroTPM writes them. One verifier and one key-policy language then
//! serve hosts now and enclaves later.
//!
//! The payload's keys, in this order: `module_id` (text), `digest`
//! (`"SHA256"`: the PCR bank), `timestamp` (ms since the epoch),
//! `nitrotpm_pcrs` (`{index: bytes}`), `certificate` (DER of the signing
//! key's certificate), `cabundle` (`[root, ..., issuer]` DER), `public_key`,
//! `user_data`, `nonce` (bytes or null).

use ciborium::value::{Integer, Value};
use serde::{Deserialize, Serialize};

use crate::{AttestError, Pcrs};

/// The protected header: `{1: -35}` (alg ES384).
pub const PROTECTED: [u8; 4] = [0xa1, 0x01, 0x38, 0x22];
const COSE_SIGN1_TAG: u64 = 18;

/// What a document says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// The host.
    pub module_id: String,
    /// The PCR bank (`"SHA256"`).
    pub digest: String,
    /// When it was made, ms since the epoch.
    pub timestamp: u64,
    /// The PCRs.
    pub pcrs: Pcrs,
    /// DER of the signing key's certificate.
    #[serde(with = "hex::serde")]
    pub certificate: Vec<u8>,
    /// DER certificates from the root to the issuer of `certificate`.
    pub cabundle: Vec<String>,
    /// A public key the requester asked to bind (optional).
    pub public_key: Option<String>,
    /// Data the requester asked to bind (optional).
    pub user_data: Option<String>,
    /// The requester's nonce (optional).
    pub nonce: Option<String>,
}

fn bytes_or_null(v: Option<&[u8]>) -> Value {
    v.map_or(Value::Null, |b| Value::Bytes(b.to_vec()))
}

/// The payload of a document (deterministic CBOR, keys in the Nitro order).
#[allow(clippy::too_many_arguments)]
pub fn payload(
    module_id: &str,
    timestamp_ms: u64,
    pcrs: &Pcrs,
    certificate: &[u8],
    cabundle: &[Vec<u8>],
    public_key: Option<&[u8]>,
    user_data: Option<&[u8]>,
    nonce: Option<&[u8]>,
) -> Vec<u8> {
    let pcr_map = pcrs
        .0
        .iter()
        .map(|(i, v)| (Value::Integer(Integer::from(*i)), Value::Bytes(v.to_vec())))
        .collect();
    let map = Value::Map(vec![
        (
            Value::Text("module_id".into()),
            Value::Text(module_id.into()),
        ),
        (Value::Text("digest".into()), Value::Text("SHA256".into())),
        (
            Value::Text("timestamp".into()),
            Value::Integer(Integer::from(timestamp_ms)),
        ),
        (Value::Text("nitrotpm_pcrs".into()), Value::Map(pcr_map)),
        (
            Value::Text("certificate".into()),
            Value::Bytes(certificate.to_vec()),
        ),
        (
            Value::Text("cabundle".into()),
            Value::Array(cabundle.iter().map(|c| Value::Bytes(c.clone())).collect()),
        ),
        (Value::Text("public_key".into()), bytes_or_null(public_key)),
        (Value::Text("user_data".into()), bytes_or_null(user_data)),
        (Value::Text("nonce".into()), bytes_or_null(nonce)),
    ]);
    encode(&map)
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = ciborium::ser::into_writer(v, &mut out);
    out
}

/// The bytes a COSE_Sign1 signature covers: `["Signature1", protected, h'',
/// payload]`.
pub fn to_be_signed(payload: &[u8]) -> Vec<u8> {
    encode(&Value::Array(vec![
        Value::Text("Signature1".into()),
        Value::Bytes(PROTECTED.to_vec()),
        Value::Bytes(Vec::new()),
        Value::Bytes(payload.to_vec()),
    ]))
}

/// The tagged COSE_Sign1 of `payload` with `signature` (`r || s`).
pub fn sign1(payload: &[u8], signature: &[u8]) -> Vec<u8> {
    encode(&Value::Tag(
        COSE_SIGN1_TAG,
        Box::new(Value::Array(vec![
            Value::Bytes(PROTECTED.to_vec()),
            Value::Map(Vec::new()),
            Value::Bytes(payload.to_vec()),
            Value::Bytes(signature.to_vec()),
        ])),
    ))
}

fn field<'a>(map: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(k, _)| k.as_text() == Some(key))
        .map(|(_, v)| v)
}

fn opt_hex(v: Option<&Value>) -> Result<Option<String>, AttestError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bytes(b)) => Ok(Some(hex::encode(b))),
        _ => Err(AttestError::Malformed(
            "an optional document field that is not bytes",
        )),
    }
}

/// Parses a COSE_Sign1 document (tagged or not) and checks its signature
/// with `verify(to_be_signed, signature, certificate_der)`, which must check
/// the certificate's chain and use its key. Returns what it says.
pub fn open(
    doc: &[u8],
    verify: impl FnOnce(&[u8], &[u8], &[u8], &[Vec<u8>]) -> Result<(), AttestError>,
) -> Result<Document, AttestError> {
    let value: Value = ciborium::de::from_reader(doc)
        .map_err(|_| AttestError::Malformed("a document that is not CBOR"))?;
    let value = match value {
        Value::Tag(COSE_SIGN1_TAG, inner) => *inner,
        Value::Tag(..) => return Err(AttestError::Malformed("a CBOR tag other than COSE_Sign1")),
        v => v,
    };
    let Value::Array(parts) = value else {
        return Err(AttestError::Malformed("a COSE_Sign1 that is not an array"));
    };
    let [
        Value::Bytes(protected),
        Value::Map(unprotected),
        Value::Bytes(payload),
        Value::Bytes(signature),
    ] = parts.as_slice()
    else {
        return Err(AttestError::Malformed(
            "a COSE_Sign1 without its four parts",
        ));
    };
    if protected.as_slice() != PROTECTED || !unprotected.is_empty() {
        return Err(AttestError::Malformed(
            "a COSE header other than {1: -35}, {}",
        ));
    }
    // ES384: r and s, 48 bytes each (RFC 9053), before any check sees it.
    if signature.len() != 96 {
        return Err(AttestError::Malformed("an ES384 signature not of 96 bytes"));
    }
    let map: Value = ciborium::de::from_reader(payload.as_slice())
        .map_err(|_| AttestError::Malformed("a payload that is not CBOR"))?;
    let Value::Map(map) = map else {
        return Err(AttestError::Malformed("a payload that is not a map"));
    };
    let text = |k: &str| field(&map, k).and_then(Value::as_text).map(str::to_owned);
    let bytes = |k: &str| field(&map, k).and_then(Value::as_bytes).cloned();
    let certificate = bytes("certificate").ok_or(AttestError::Malformed("no certificate"))?;
    let cabundle: Vec<Vec<u8>> = match field(&map, "cabundle") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|c| {
                c.as_bytes()
                    .cloned()
                    .ok_or(AttestError::Malformed("a cabundle entry"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(AttestError::Malformed("no cabundle")),
    };
    verify(&to_be_signed(payload), signature, &certificate, &cabundle)?;
    let mut pcrs = std::collections::BTreeMap::new();
    match field(&map, "nitrotpm_pcrs") {
        Some(Value::Map(m)) => {
            for (k, v) in m {
                let i = k
                    .as_integer()
                    .and_then(|i| u8::try_from(i).ok())
                    .filter(|i| *i < 24)
                    .ok_or(AttestError::Malformed("a PCR index"))?;
                let v: [u8; 32] = v
                    .as_bytes()
                    .and_then(|b| b.as_slice().try_into().ok())
                    .ok_or(AttestError::Malformed("a PCR value"))?;
                pcrs.insert(i, v);
            }
        }
        _ => return Err(AttestError::Malformed("no nitrotpm_pcrs")),
    }
    let timestamp = field(&map, "timestamp")
        .and_then(Value::as_integer)
        .and_then(|i| u64::try_from(i).ok())
        .ok_or(AttestError::Malformed("no timestamp"))?;
    Ok(Document {
        module_id: text("module_id")
            .filter(|m| !m.is_empty())
            .ok_or(AttestError::Malformed("no module_id"))?,
        digest: text("digest").ok_or(AttestError::Malformed("no digest"))?,
        timestamp,
        pcrs: Pcrs(pcrs),
        certificate,
        cabundle: cabundle.iter().map(hex::encode).collect(),
        public_key: opt_hex(field(&map, "public_key"))?,
        user_data: opt_hex(field(&map, "user_data"))?,
        nonce: opt_hex(field(&map, "nonce"))?,
    })
}

/// Checks a document's signature the way [`open`] needs it: `certificate`
/// (DER) must be issued by `root` (DER, the cell CA) and be the first of
/// the bundle's issuers' leaf, and its P-384 key must have made
/// `signature` over `to_be_signed`.
#[allow(clippy::type_complexity)] // the check `open` takes, spelled out
pub fn verify_with_root(
    root: &[u8],
) -> impl FnOnce(&[u8], &[u8], &[u8], &[Vec<u8>]) -> Result<(), AttestError> + '_ {
    move |tbs, signature, certificate, cabundle| {
        if cabundle.first().map(Vec::as_slice) != Some(root) {
            return Err(AttestError::Malformed(
                "the document's bundle does not start at the cell CA",
            ));
        }
        if !crate::enroll::issued_by(certificate, root) {
            return Err(AttestError::Malformed(
                "the document's certificate is not the cell CA's",
            ));
        }
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(certificate)
            .map_err(|_| AttestError::Malformed("the document's certificate"))?;
        let point = cert.public_key().subject_public_key.data.to_vec();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P384_SHA384_FIXED, point)
            .verify(tbs, signature)
            .map_err(|_| AttestError::BadSignature)
    }
}
