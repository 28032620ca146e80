//! Secret bytes: made in place on the heap, zeroized on drop, never printed.

use std::fmt;
use std::sync::Arc;

use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::error::KmsError;

/// `N` secret bytes on the heap, zeroized when the last reference goes.
/// Filled where they live, so no copy is left on a stack.
pub(crate) struct Secret<const N: usize>(Zeroizing<[u8; N]>);

impl<const N: usize> Secret<N> {
    /// `N` zero bytes, to be filled in place before the secret is shared.
    fn zeroed() -> Arc<Self> {
        Arc::new(Secret(Zeroizing::new([0u8; N])))
    }

    /// Fills a secret through `fill`, which writes all `N` bytes.
    pub(crate) fn filled<E>(
        fill: impl FnOnce(&mut [u8; N]) -> Result<(), E>,
    ) -> Result<Arc<Self>, E> {
        let mut s = Self::zeroed();
        let bytes = Arc::get_mut(&mut s).unwrap_or_else(|| unreachable!("made just above"));
        fill(&mut bytes.0)?;
        Ok(s)
    }

    /// `N` random bytes from the operating system.
    pub(crate) fn random() -> Result<Arc<Self>, KmsError> {
        Self::filled(|b| fill_random(b))
    }

    /// The bytes.
    pub(crate) fn bytes(&self) -> &[u8; N] {
        &self.0
    }
}

impl<const N: usize> fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret<{N}>(..)")
    }
}

/// Fills `buf` from the operating system's random source.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), KmsError> {
    OsRng.try_fill_bytes(buf).map_err(KmsError::Random)
}

/// Hex text of a 32-byte secret for a JSON file, in a buffer zeroized on
/// drop; serializing it hands the text to the serializer without copying
/// it anywhere else.
pub(crate) struct HexOut<'a>(pub(crate) &'a [u8; 32]);

impl serde::Serialize for HexOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut text = Zeroizing::new([0u8; 64]);
        hex::encode_to_slice(self.0, &mut text[..]).map_err(serde::ser::Error::custom)?;
        let text = std::str::from_utf8(&text[..]).map_err(serde::ser::Error::custom)?;
        s.serialize_str(text)
    }
}

/// A 32-byte secret read from its hex text in a JSON file, decoded straight
/// into its zeroized buffer (the text is borrowed from the file's buffer,
/// itself zeroized by the reader).
pub(crate) struct HexIn(pub(crate) Arc<Secret<32>>);

impl<'de> serde::Deserialize<'de> for HexIn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HexIn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HexIn, E> {
                if v.len() != 64 {
                    return Err(E::custom(format!(
                        "a secret is 64 hex digits, not {} characters",
                        v.len()
                    )));
                }
                Secret::filled(|b| hex::decode_to_slice(v, &mut b[..]))
                    .map(HexIn)
                    .map_err(|_| E::custom("a secret is 64 hex digits"))
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let s = Secret::<32>::filled(|b| {
            b.fill(0xab);
            Ok::<_, ()>(())
        })
        .unwrap();
        let text = format!("{s:?}");
        assert_eq!(text, "Secret<32>(..)");
        assert!(!text.contains("ab") && !text.contains("171"));
    }

    #[test]
    fn hex_round_trips_and_refuses_other_text() {
        let s = Secret::<32>::random().unwrap();
        let json = serde_json::to_string(&HexOut(s.bytes())).unwrap();
        assert_eq!(json, format!("\"{}\"", hex::encode(s.bytes())));
        let back: HexIn = serde_json::from_str(&json).unwrap();
        assert_eq!(back.0.bytes(), s.bytes());
        for bad in [
            "\"\"",
            "\"00\"",
            &format!("\"{}\"", "g".repeat(64)),
            &format!("\"{}\"", "0".repeat(66)),
            "12",
        ] {
            assert!(serde_json::from_str::<HexIn>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn random_secrets_differ() {
        let a = Secret::<32>::random().unwrap();
        let b = Secret::<32>::random().unwrap();
        assert_ne!(a.bytes(), b.bytes());
    }
}
