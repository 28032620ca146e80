//! SHA-256 digests and kernel command lines: the two parsed inputs of an image.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// The longest kernel command line accepted, in bytes: x86-64 Linux's
/// `COMMAND_LINE_SIZE` (2048) minus its terminating NUL.
pub const MAX_CMDLINE_LEN: usize = 2047;

/// Optional prefix accepted when parsing a [`Digest`] (`sha256:<hex>`).
pub const DIGEST_PREFIX: &str = "sha256:";

/// A SHA-256 digest. Shown and parsed as 64 lowercase hex digits (the
/// `sha256:` prefix is accepted on input).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a string is not a [`Digest`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// a SHA-256 digest is 64 hex digits, got {0} characters
    #[error("a SHA-256 digest is 64 hex digits, got {0} characters")]
    Length(usize),
    /// a digest is written in lowercase hex digits only
    #[error("a digest is written in lowercase hex digits (0-9, a-f) only")]
    NotLowerHex,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_prefix(DIGEST_PREFIX).unwrap_or(s);
        if s.len() != 64 {
            return Err(DigestError::Length(s.chars().count()));
        }
        if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestError::NotLowerHex);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| DigestError::NotLowerHex)?;
        Ok(Self(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // Stored form only: no prefix.
        if s.starts_with(DIGEST_PREFIX) {
            return Err(serde::de::Error::custom(DigestError::NotLowerHex));
        }
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A kernel command line: printable ASCII and spaces, at most
/// [`MAX_CMDLINE_LEN`] bytes, no leading or trailing space. It is measured
/// exactly as these bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Cmdline(String);

/// Why a string is not a [`Cmdline`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CmdlineError {
    /// the command line is longer than the kernel accepts
    #[error("the kernel command line is {len} bytes, more than the {max} the kernel accepts")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// [`MAX_CMDLINE_LEN`].
        max: usize,
    },
    /// a character other than printable ASCII or space
    #[error("the kernel command line has a byte other than printable ASCII or space at offset {0}")]
    BadByte(usize),
    /// leading or trailing whitespace (it would change the measured bytes
    /// without changing the meaning)
    #[error("the kernel command line has leading or trailing spaces")]
    Untrimmed,
}

impl Cmdline {
    /// Parses a command line.
    pub fn new(s: &str) -> Result<Self, CmdlineError> {
        if s.len() > MAX_CMDLINE_LEN {
            return Err(CmdlineError::TooLong {
                len: s.len(),
                max: MAX_CMDLINE_LEN,
            });
        }
        if let Some(at) = s.bytes().position(|b| !(b == b' ' || b.is_ascii_graphic())) {
            return Err(CmdlineError::BadByte(at));
        }
        if s.trim() != s {
            return Err(CmdlineError::Untrimmed);
        }
        Ok(Self(s.to_owned()))
    }

    /// The command line.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the command line's bytes (no terminator).
    pub fn digest(&self) -> Digest {
        Digest::of(self.0.as_bytes())
    }
}

impl FromStr for Cmdline {
    type Err = CmdlineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for Cmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Cmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cmdline({:?})", self.0)
    }
}

impl Serialize for Cmdline {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Cmdline {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// The image digest: SHA-256 over the three component digests, in this
/// order, as raw 32-byte values (96 bytes in all):
///
/// ```text
/// image = SHA-256( SHA-256(kernel file) || SHA-256(initramfs file) || SHA-256(cmdline bytes) )
/// ```
pub fn image_digest(kernel: &Digest, initramfs: &Digest, cmdline: &Digest) -> Digest {
    image_digest_with_root_disk(kernel, initramfs, cmdline, None)
}

/// The digest of an image that may have a root disk: without one, the same
/// as [`image_digest`]; with one, its file's digest follows the other three
/// (128 bytes in all, so an image with a root disk never shares a digest
/// with one without):
///
/// ```text
/// image = SHA-256( kernel || initramfs || cmdline || SHA-256(root disk file) )
/// ```
pub fn image_digest_with_root_disk(
    kernel: &Digest,
    initramfs: &Digest,
    cmdline: &Digest,
    root_disk: Option<&Digest>,
) -> Digest {
    let mut h = Sha256::new();
    h.update(kernel.as_bytes());
    h.update(initramfs.as_bytes());
    h.update(cmdline.as_bytes());
    if let Some(root) = root_disk {
        h.update(root.as_bytes());
    }
    Digest(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn digest_of_empty_is_the_sha256_vector() {
        assert_eq!(
            Digest::of(b"").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn image_digest_is_over_the_concatenated_component_digests() {
        let (k, i, c) = (Digest::of(b"k"), Digest::of(b"i"), Digest::of(b"c"));
        let mut all = Vec::new();
        for d in [k, i, c] {
            all.extend_from_slice(d.as_bytes());
        }
        assert_eq!(image_digest(&k, &i, &c), Digest::of(&all));
        // Order matters.
        assert_ne!(image_digest(&k, &i, &c), image_digest(&i, &k, &c));
        let r = Digest::of(b"r");
        all.extend_from_slice(r.as_bytes());
        assert_eq!(
            image_digest_with_root_disk(&k, &i, &c, Some(&r)),
            Digest::of(&all)
        );
        assert_eq!(
            image_digest_with_root_disk(&k, &i, &c, None),
            image_digest(&k, &i, &c)
        );
    }

    #[test]
    fn digest_parse_accepts_prefix_and_refuses_uppercase() {
        let d = Digest::of(b"x");
        assert_eq!(format!("sha256:{d}").parse::<Digest>(), Ok(d));
        assert_eq!(
            d.to_hex().to_uppercase().parse::<Digest>(),
            Err(DigestError::NotLowerHex)
        );
        assert_eq!("abc".parse::<Digest>(), Err(DigestError::Length(3)));
    }

    #[test]
    fn cmdline_refuses_control_bytes_and_padding() {
        assert!(Cmdline::new("console=ttyS0 quiet").is_ok());
        assert_eq!(Cmdline::new("a\nb"), Err(CmdlineError::BadByte(1)));
        assert_eq!(Cmdline::new(" a"), Err(CmdlineError::Untrimmed));
        assert!(matches!(
            Cmdline::new(&"x".repeat(MAX_CMDLINE_LEN + 1)),
            Err(CmdlineError::TooLong { .. })
        ));
        assert!(Cmdline::new(&"x".repeat(MAX_CMDLINE_LEN)).is_ok());
    }

    proptest! {
        #[test]
        fn digest_display_parse_round_trip(bytes in any::<[u8; 32]>()) {
            let d = Digest::from_bytes(bytes);
            prop_assert_eq!(d.to_string().parse::<Digest>(), Ok(d));
        }

        #[test]
        fn digest_parse_never_panics_and_only_accepts_64_lower_hex(s in "\\PC{0,80}") {
            if let Ok(d) = s.parse::<Digest>() {
                let bare = s.strip_prefix(DIGEST_PREFIX).unwrap_or(&s);
                prop_assert_eq!(d.to_hex(), bare);
            }
        }

        #[test]
        fn cmdline_accepted_iff_printable_trimmed_and_short(s in "[ -~\\t\\n\\x00]{0,64}") {
            let ok = s.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) && s.trim() == s;
            prop_assert_eq!(Cmdline::new(&s).is_ok(), ok);
            if let Ok(c) = Cmdline::new(&s) {
                prop_assert_eq!(c.as_str(), s.as_str());
            }
        }
    }
}
