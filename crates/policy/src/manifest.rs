//! `bundle.toml`: the serial that orders bundles.
//!
//! ```toml
//! # Raise the serial with every change; services never load a bundle whose
//! # serial is below one they have loaded.
//! serial = 2
//! ```
//!
//! The file is a reviewed file like any other, so the serial is covered by
//! the digest the reviewers sign: it cannot be changed without new
//! signatures. Only `serial` is allowed; it is an integer from 1 to
//! [`MAX_BUNDLE_SERIAL`].

use std::fmt;

use serde::Deserialize;

use crate::bundle::BundleDigest;
use crate::{Location, PolicyError};

/// The file of a bundle that holds its serial.
pub const MANIFEST_FILE: &str = "bundle.toml";

/// The largest serial (TOML integers are signed 64-bit).
pub const MAX_BUNDLE_SERIAL: u64 = i64::MAX as u64;

/// A bundle's serial: from 1 to [`MAX_BUNDLE_SERIAL`], raised by every
/// reviewed change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BundleSerial(u64);

impl BundleSerial {
    /// `n` if it is a valid serial.
    pub fn new(n: u64) -> Option<Self> {
        (1..=MAX_BUNDLE_SERIAL).contains(&n).then_some(Self(n))
    }

    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for BundleSerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl serde::Serialize for BundleSerial {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for BundleSerial {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        Self::new(n).ok_or_else(|| {
            serde::de::Error::custom(format!("serial must be 1 to {MAX_BUNDLE_SERIAL}"))
        })
    }
}

/// Which bundle: its serial and digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleVersion {
    /// The serial of its `bundle.toml`.
    pub serial: BundleSerial,
    /// The digest its reviewers signed.
    #[serde(with = "digest_hex")]
    pub digest: BundleDigest,
}

impl fmt::Display for BundleVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "serial {} (digest {})", self.serial, self.digest)
    }
}

mod digest_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::bundle::BundleDigest;

    pub(super) fn serialize<S: Serializer>(d: &BundleDigest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_hex())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BundleDigest, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        BundleDigest::from_hex(&text)
            .ok_or_else(|| serde::de::Error::custom("digest must be 64 hex digits"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    serial: toml::Spanned<i64>,
}

/// Parses `bundle.toml`.
pub(crate) fn parse_serial(bytes: &[u8]) -> Result<BundleSerial, PolicyError> {
    let text = crate::load::utf8(MANIFEST_FILE, bytes)?;
    let file: ManifestFile = toml::from_str(text).map_err(|source| PolicyError::Manifest {
        at: match source.span() {
            Some(span) => Location::at_offset(MANIFEST_FILE, text, span.start),
            None => Location::line(MANIFEST_FILE, 1),
        },
        source: Box::new(source),
    })?;
    u64::try_from(*file.serial.get_ref())
        .ok()
        .and_then(BundleSerial::new)
        .ok_or_else(|| PolicyError::BadSerial {
            at: Location::at_offset(MANIFEST_FILE, text, file.serial.span().start),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serial_is_a_positive_integer_and_nothing_else() {
        assert_eq!(parse_serial(b"serial = 7\n").unwrap().get(), 7);
        assert_eq!(
            parse_serial(b"# a comment\nserial = 1\n").unwrap(),
            BundleSerial::new(1).unwrap()
        );
        for (bad, at) in [
            ("serial = 0\n", "bundle.toml:1:10"),
            ("serial = -3\n", "bundle.toml:1:10"),
            ("\nserial = \"2\"\n", "bundle.toml:2:10"),
            ("serial = 1\nextra = 2\n", "bundle.toml:2:1"),
            ("", "bundle.toml:1"),
            ("serial = 1.5\n", "bundle.toml:1:10"),
        ] {
            let e = parse_serial(bad.as_bytes()).unwrap_err();
            assert!(e.to_string().starts_with(at), "{bad:?}: {e}");
        }
        assert!(matches!(
            parse_serial(b"serial = 0\n"),
            Err(PolicyError::BadSerial { .. })
        ));
        assert_eq!(BundleSerial::new(0), None);
        assert_eq!(BundleSerial::new(MAX_BUNDLE_SERIAL + 1), None);
    }

    #[test]
    fn versions_round_trip_as_json() {
        let v = BundleVersion {
            serial: BundleSerial::new(3).unwrap(),
            digest: BundleDigest([0xab; 32]),
        };
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(
            json,
            format!(r#"{{"serial":3,"digest":"{}"}}"#, "ab".repeat(32))
        );
        assert_eq!(serde_json::from_str::<BundleVersion>(&json).unwrap(), v);
        assert!(serde_json::from_str::<BundleVersion>(r#"{"serial":0,"digest":"ab"}"#).is_err());
    }
}
