//! The JSON bodies of the key service's endpoints, each parsed within a
//! named bound. Byte fields are standard base64 (with padding); their
//! encoded length is checked before they are decoded.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use nitrile_api::{Name, PrincipalId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Largest request body the key service reads, in bytes: every request
/// body of this protocol fits in far less.
pub const MAX_REQUEST_BODY: usize = 4096;

/// Largest wrapped data key, in bytes (the key service's wrapped-key
/// format, version 1: a header naming the volume and the key, a nonce, the
/// 64-byte ciphertext and its tag).
pub const MAX_WRAPPED_KEY_LEN: usize = 225;

/// Length of a recipient's public key: an X25519 public key.
pub const RECIPIENT_KEY_LEN: usize = 32;

/// Length of a sealed data key (the key service's sealed-key format,
/// version 1: HPKE base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
/// AES-256-GCM).
pub const SEALED_KEY_LEN: usize = 123;

/// Most keys one list answer carries (the key service holds at most
/// 10,000).
pub const MAX_LISTED_KEYS: usize = 10_000;

/// Longest base64 text (standard, padded) of `n` bytes.
const fn b64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

fn decode_bounded<'de, D: Deserializer<'de>>(
    d: D,
    min: usize,
    max: usize,
    what: &'static str,
) -> Result<Vec<u8>, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    if text.len() > b64_len(max) {
        return Err(serde::de::Error::custom(format_args!(
            "{what} is {} characters of base64; at most {} ({max} bytes) are allowed",
            text.len(),
            b64_len(max)
        )));
    }
    let bytes = STANDARD
        .decode(text.as_bytes())
        .map_err(|e| serde::de::Error::custom(format_args!("{what} is not base64: {e}")))?;
    if bytes.len() < min || bytes.len() > max {
        return Err(serde::de::Error::custom(if min == max {
            format!("{what} is {} bytes; it must be exactly {max}", bytes.len())
        } else {
            format!("{what} is {} bytes; it must be {min} to {max}", bytes.len())
        }));
    }
    Ok(bytes)
}

/// A volume's data key wrapped under a key of the key service: 1 to
/// [`MAX_WRAPPED_KEY_LEN`] bytes, opaque to everyone but the key service.
/// What a host stores for a volume.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKeyBytes(Vec<u8>);

impl WrappedKeyBytes {
    /// Takes `bytes` if they are 1 to [`MAX_WRAPPED_KEY_LEN`] long.
    pub fn new(bytes: Vec<u8>) -> Option<Self> {
        (!bytes.is_empty() && bytes.len() <= MAX_WRAPPED_KEY_LEN).then_some(Self(bytes))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for WrappedKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedKeyBytes({} bytes)", self.0.len())
    }
}

impl Serialize for WrappedKeyBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for WrappedKeyBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        decode_bounded(d, 1, MAX_WRAPPED_KEY_LEN, "wrapped_key").map(Self)
    }
}

/// A recipient's X25519 public key: the key a VMM made inside its jail,
/// which the data key is sealed to. Exactly [`RECIPIENT_KEY_LEN`] bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RecipientKey(pub [u8; RECIPIENT_KEY_LEN]);

impl fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecipientKey(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("..)")
    }
}

impl Serialize for RecipientKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(self.0))
    }
}

impl<'de> Deserialize<'de> for RecipientKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = decode_bounded(d, RECIPIENT_KEY_LEN, RECIPIENT_KEY_LEN, "recipient")?;
        let mut key = [0u8; RECIPIENT_KEY_LEN];
        key.copy_from_slice(&bytes);
        Ok(Self(key))
    }
}

/// A volume's data key sealed to one recipient: exactly [`SEALED_KEY_LEN`]
/// bytes that only the recipient's private key opens, and only as that
/// volume's key. A host relays it and cannot open it.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedKeyBytes(Box<[u8; SEALED_KEY_LEN]>);

impl SealedKeyBytes {
    /// Takes `bytes` if they are exactly [`SEALED_KEY_LEN`] long.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        let array: [u8; SEALED_KEY_LEN] = bytes.try_into().ok()?;
        Some(Self(Box::new(array)))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8; SEALED_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for SealedKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedKeyBytes({SEALED_KEY_LEN} bytes)")
    }
}

impl Serialize for SealedKeyBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0[..]))
    }
}

impl<'de> Deserialize<'de> for SealedKeyBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = decode_bounded(d, SEALED_KEY_LEN, SEALED_KEY_LEN, "sealed_key")?;
        Self::new(&bytes).ok_or_else(|| unreachable!("decode_bounded checked the length"))
    }
}

/// `POST /v1/volume-keys/{volume}`: make the volume's data key under the
/// key `kms_key` (its bare name, e.g. `default`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// The key that wraps the data key.
    pub kms_key: Name,
}

/// The answer to [`GenerateRequest`]: the data key, wrapped, for the host
/// to keep with the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateResponse {
    /// The wrapped data key.
    pub wrapped_key: WrappedKeyBytes,
    /// The key it is wrapped under.
    pub kms_key: Name,
}

/// `POST /v1/volume-keys/{volume}/unwrap`: release the volume's data key,
/// sealed to `recipient`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnwrapRequest {
    /// The wrapped data key the host keeps for the volume.
    pub wrapped_key: WrappedKeyBytes,
    /// The public key the VMM made for this volume inside its jail.
    pub recipient: RecipientKey,
    /// The host's attestation document (hex COSE_Sign1 of the Nitro
    /// layout) binding `recipient` as its `public_key`: a key service with
    /// an attestation policy releases the key only with one that matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationHex>,
}

/// An attestation document as hex, at most [`MAX_ATTESTATION_HEX`] digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttestationHex(String);

/// The longest attestation document accepted, in hex digits (16 KiB).
pub const MAX_ATTESTATION_HEX: usize = 32 * 1024;

impl AttestationHex {
    /// The document's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        hex::decode(&self.0).unwrap_or_default()
    }

    /// Wraps a document's bytes.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        (bytes.len() * 2 <= MAX_ATTESTATION_HEX).then(|| Self(hex::encode(bytes)))
    }
}

impl<'de> Deserialize<'de> for AttestationHex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let s = String::deserialize(d)?;
        if s.len() > MAX_ATTESTATION_HEX
            || s.len() % 2 != 0
            || !s.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(D::Error::custom(
                "an attestation document must be at most 16 KiB of hex",
            ));
        }
        Ok(Self(s.to_ascii_lowercase()))
    }
}

/// The answer to [`UnwrapRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnwrapResponse {
    /// The data key sealed to the recipient, for this volume only.
    pub sealed_key: SealedKeyBytes,
}

/// The answer to `DELETE /v1/volume-keys/{volume}`: the volume's key
/// record is destroyed, durably, and no wrapped key of the volume opens
/// again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyResponse {
    /// Always `true`: any failure is a refusal.
    pub destroyed: bool,
}

/// `POST /v1/keys`: create a key owned by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// The key's bare name (`kms-key/<name>`).
    pub name: Name,
}

/// `POST /v1/keys/{key}/schedule-deletion`: the waiting period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleDeletionRequest {
    /// Days until the key and every volume key under it are destroyed:
    /// 7 to 30, 30 when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<u32>,
}

/// A key's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStateName {
    /// Wraps new volume keys and releases existing ones.
    Enabled,
    /// Refuses every new volume key and every release; volumes attached
    /// before keep running until detached.
    Disabled,
    /// Refuses like a disabled key; destroyed with every volume key under
    /// it at `delete_at`, unless the deletion is cancelled before.
    PendingDeletion,
}

impl KeyStateName {
    /// The state's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
            Self::PendingDeletion => "pending_deletion",
        }
    }
}

/// What the key service tells of a key: metadata only, never its material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDescription {
    /// The key's bare name (`kms-key/<name>`).
    pub name: Name,
    /// Who owns it: the key service itself for the cell's default key, a
    /// customer for a customer-managed key.
    pub owner: PrincipalId,
    /// Its state.
    pub state: KeyStateName,
    /// When a key pending deletion is destroyed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_at: Option<String>,
    /// When it was created (RFC 3339).
    pub created: String,
    /// When its state last changed (RFC 3339).
    pub updated: String,
    /// How many volume keys are wrapped under it.
    pub volumes: u64,
}

/// The answer to `GET /v1/keys`: the keys the caller may see (a customer
/// sees its own), in name order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyList {
    /// The keys.
    pub keys: Vec<KeyDescription>,
}

impl<'de> Deserialize<'de> for KeyList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            keys: Vec<KeyDescription>,
        }
        let raw = Raw::deserialize(d)?;
        if raw.keys.len() > MAX_LISTED_KEYS {
            return Err(serde::de::Error::custom(format_args!(
                "{} keys listed; at most {MAX_LISTED_KEYS} are allowed",
                raw.keys.len()
            )));
        }
        Ok(Self { keys: raw.keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_fields_are_bounded_before_and_after_decoding() {
        let ok = format!(
            r#"{{"wrapped_key":"{}","recipient":"{}"}}"#,
            STANDARD.encode([7u8; MAX_WRAPPED_KEY_LEN]),
            STANDARD.encode([9u8; RECIPIENT_KEY_LEN])
        );
        let req: UnwrapRequest = serde_json::from_str(&ok).unwrap();
        assert_eq!(req.wrapped_key.as_bytes().len(), MAX_WRAPPED_KEY_LEN);
        assert_eq!(req.recipient.0, [9u8; RECIPIENT_KEY_LEN]);
        assert_eq!(
            serde_json::from_str::<UnwrapRequest>(&serde_json::to_string(&req).unwrap()).unwrap(),
            req
        );
        for (wrapped, recipient, why) in [
            (
                vec![7u8; MAX_WRAPPED_KEY_LEN + 1],
                vec![9u8; 32],
                "wrapped_key",
            ),
            (vec![], vec![9u8; 32], "wrapped_key"),
            (vec![7u8; 10], vec![9u8; 31], "recipient"),
            (vec![7u8; 10], vec![9u8; 33], "recipient"),
        ] {
            let text = format!(
                r#"{{"wrapped_key":"{}","recipient":"{}"}}"#,
                STANDARD.encode(wrapped),
                STANDARD.encode(recipient)
            );
            let e = serde_json::from_str::<UnwrapRequest>(&text).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
        let huge = format!(
            r#"{{"wrapped_key":"{}","recipient":"AA=="}}"#,
            "A".repeat(10_000)
        );
        let e = serde_json::from_str::<UnwrapRequest>(&huge).unwrap_err();
        assert!(e.to_string().contains("at most 300"), "{e}");
        let not_b64 = r#"{"wrapped_key":"!!!!","recipient":"AA=="}"#;
        assert!(serde_json::from_str::<UnwrapRequest>(not_b64).is_err());
    }

    #[test]
    fn bodies_refuse_unknown_fields_and_bad_names() {
        assert!(serde_json::from_str::<GenerateRequest>(r#"{"kms_key":"default"}"#).is_ok());
        for bad in [
            r#"{"kms_key":"default","extra":1}"#,
            r#"{"kms_key":"../x"}"#,
            r#"{"kms_key":"a\u0000b"}"#,
            r#"{"kms_key":"Default"}"#,
            r#"{}"#,
        ] {
            assert!(
                serde_json::from_str::<GenerateRequest>(bad).is_err(),
                "{bad}"
            );
        }
        let long = format!(r#"{{"name":"{}"}}"#, "a".repeat(10_240));
        assert!(serde_json::from_str::<CreateKeyRequest>(&long).is_err());
        assert_eq!(
            serde_json::from_str::<ScheduleDeletionRequest>("{}").unwrap(),
            ScheduleDeletionRequest::default()
        );
        assert!(serde_json::from_str::<ScheduleDeletionRequest>(r#"{"days":-1}"#).is_err());
    }

    #[test]
    fn debug_output_shows_no_key_bytes() {
        let w = WrappedKeyBytes::new(vec![0xab; 100]).unwrap();
        assert_eq!(format!("{w:?}"), "WrappedKeyBytes(100 bytes)");
        let s = SealedKeyBytes::new(&[0xcd; SEALED_KEY_LEN]).unwrap();
        assert!(!format!("{s:?}").contains("cd"));
        assert!(WrappedKeyBytes::new(vec![]).is_none());
        assert!(SealedKeyBytes::new(&[0; 5]).is_none());
    }
}
