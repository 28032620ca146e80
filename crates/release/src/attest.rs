//! The test attestation: an in-toto Statement v1 whose subjects are the
//! release's files (name and SHA-256) and whose predicate is in-toto's
//! test result (`https://in-toto.io/attestation/test-result/v0.1`,
//! `result: PASSED`), in a DSSE envelope (payload type
//! `application/vnd.in-toto+json`) signed with Ed25519 over DSSE's
//! pre-authentication encoding by the cell's CI key.
//!
//! [`verify`] accepts an envelope only when a signature verifies under the
//! pinned CI key, the statement is a passing test result, and its subjects
//! are exactly the manifest's files: no file missing, none added, no
//! digest different.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::keys::ReleaseKey;
use crate::{ReleaseError, ReleaseManifest};

/// DSSE's payload type for in-toto statements.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The statement type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// in-toto's test result predicate.
pub const TEST_RESULT: &str = "https://in-toto.io/attestation/test-result/v0.1";
/// Largest envelope read.
pub const MAX_ENVELOPE_LEN: u64 = 256 * 1024;

/// A DSSE envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The payload type.
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// The payload, base64.
    pub payload: String,
    /// Its signatures.
    pub signatures: Vec<EnvelopeSignature>,
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    /// The signer's key id (the TUF key id of the CI key).
    #[serde(default)]
    pub keyid: String,
    /// The signature, base64.
    pub sig: String,
}

/// A subject of a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    /// The file's name.
    pub name: String,
    /// Its digests (`sha256`).
    pub digest: BTreeMap<String, String>,
}

/// An in-toto Statement v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    /// [`STATEMENT_TYPE`].
    #[serde(rename = "_type")]
    pub statement_type: String,
    /// What it is about.
    pub subject: Vec<Subject>,
    /// [`TEST_RESULT`].
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    /// The predicate.
    pub predicate: serde_json::Value,
}

/// DSSE's pre-authentication encoding.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The statement that the test suite `suite` passed on `manifest`'s files.
pub fn statement(manifest: &ReleaseManifest, suite: &str) -> Statement {
    Statement {
        statement_type: STATEMENT_TYPE.to_owned(),
        subject: manifest
            .files
            .iter()
            .map(|(name, d)| Subject {
                name: name.clone(),
                digest: BTreeMap::from([("sha256".to_owned(), d.sha256.clone())]),
            })
            .collect(),
        predicate_type: TEST_RESULT.to_owned(),
        predicate: serde_json::json!({
            "result": "PASSED",
            "configuration": [{ "name": suite }],
            "passedTests": [suite],
            "warnedTests": [],
            "failedTests": [],
        }),
    }
}

/// Signs `statement` with `key` into an envelope.
pub fn sign(statement: &Statement, key: &ReleaseKey) -> Envelope {
    let payload = serde_json::to_vec(statement).unwrap_or_default();
    let sig = key.sign(&pae(PAYLOAD_TYPE, &payload));
    Envelope {
        payload_type: PAYLOAD_TYPE.to_owned(),
        payload: STANDARD.encode(&payload),
        signatures: vec![EnvelopeSignature {
            keyid: key.key_id(),
            sig: STANDARD.encode(sig),
        }],
    }
}

/// Checks `envelope` (its bytes) against the pinned CI key and `manifest`;
/// returns the statement.
pub fn verify(
    bytes: &[u8],
    ci_key: &VerifyingKey,
    manifest: &ReleaseManifest,
) -> Result<Statement, ReleaseError> {
    let refuse = |reason: String| ReleaseError::Attestation {
        version: manifest.version,
        reason,
    };
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| refuse(format!("not a DSSE envelope ({e})")))?;
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(refuse(format!(
            "payload type {:?}, not {PAYLOAD_TYPE}",
            envelope.payload_type.chars().take(64).collect::<String>()
        )));
    }
    let payload = STANDARD
        .decode(&envelope.payload)
        .map_err(|_| refuse("the payload is not base64".to_owned()))?;
    let signed = pae(PAYLOAD_TYPE, &payload);
    let good = envelope.signatures.iter().any(|s| {
        STANDARD
            .decode(&s.sig)
            .ok()
            .and_then(|b| Signature::from_slice(&b).ok())
            .is_some_and(|sig| ci_key.verify_strict(&signed, &sig).is_ok())
    });
    if !good {
        return Err(refuse(
            "no signature verifies under the pinned CI key".to_owned(),
        ));
    }
    let statement: Statement = serde_json::from_slice(&payload)
        .map_err(|e| refuse(format!("not an in-toto statement ({e})")))?;
    if statement.statement_type != STATEMENT_TYPE || statement.predicate_type != TEST_RESULT {
        return Err(refuse("not an in-toto v1 test result".to_owned()));
    }
    if statement.predicate.get("result").and_then(|r| r.as_str()) != Some("PASSED") {
        return Err(refuse("the tests did not pass".to_owned()));
    }
    let attested: BTreeMap<&str, Option<&str>> = statement
        .subject
        .iter()
        .map(|s| (s.name.as_str(), s.digest.get("sha256").map(String::as_str)))
        .collect();
    let released: BTreeMap<&str, Option<&str>> = manifest
        .files
        .iter()
        .map(|(n, d)| (n.as_str(), Some(d.sha256.as_str())))
        .collect();
    if attested.len() != statement.subject.len() || attested != released {
        return Err(refuse(
            "its subjects are not exactly the release's files and digests".to_owned(),
        ));
    }
    Ok(statement)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Environment, FileDigest, MANIFEST_FORMAT, Version};

    fn manifest() -> ReleaseManifest {
        ReleaseManifest {
            format: MANIFEST_FORMAT.to_owned(),
            version: Version::new(1, 2, 3),
            environment: Environment::new("prod").unwrap(),
            files: BTreeMap::from([
                (
                    "nitrile".to_owned(),
                    FileDigest {
                        sha256: "aa".repeat(32),
                        length: 1,
                    },
                ),
                (
                    "vmlinux".to_owned(),
                    FileDigest {
                        sha256: "bb".repeat(32),
                        length: 2,
                    },
                ),
            ]),
            built: String::new(),
        }
    }

    #[test]
    fn an_attestation_verifies_only_for_its_key_and_exactly_its_files() {
        let ci = ReleaseKey::generate();
        let m = manifest();
        let env = sign(&statement(&m, "scripts/test.sh"), &ci);
        let bytes = serde_json::to_vec(&env).unwrap();
        verify(&bytes, &ci.verifying_key(), &m).unwrap();
        // Another key.
        let other = ReleaseKey::generate();
        assert!(verify(&bytes, &other.verifying_key(), &m).is_err());
        // Other digests, a file more, a file less.
        let mut changed = m.clone();
        changed.files.get_mut("nitrile").unwrap().sha256 = "cc".repeat(32);
        assert!(verify(&bytes, &ci.verifying_key(), &changed).is_err());
        let mut more = m.clone();
        more.files.insert(
            "initramfs".into(),
            FileDigest {
                sha256: "dd".repeat(32),
                length: 3,
            },
        );
        assert!(verify(&bytes, &ci.verifying_key(), &more).is_err());
        let mut less = m.clone();
        less.files.remove("vmlinux");
        assert!(verify(&bytes, &ci.verifying_key(), &less).is_err());
        // A changed payload byte.
        let mut tampered = env.clone();
        let mut p = STANDARD.decode(&tampered.payload).unwrap();
        let i = p.len() / 2;
        p[i] ^= 1;
        tampered.payload = STANDARD.encode(p);
        assert!(
            verify(
                &serde_json::to_vec(&tampered).unwrap(),
                &ci.verifying_key(),
                &m
            )
            .is_err()
        );
        // A failed run, signed by the right key.
        let mut failed = statement(&m, "scripts/test.sh");
        failed.predicate["result"] = "FAILED".into();
        let bytes = serde_json::to_vec(&sign(&failed, &ci)).unwrap();
        assert!(verify(&bytes, &ci.verifying_key(), &m).is_err());
    }

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }
}
