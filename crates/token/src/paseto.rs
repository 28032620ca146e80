//! PASETO version 4, purpose `public`: Ed25519 signatures over a
//! pre-authentication encoding of header, message, footer and implicit assertion.
//!
//! This module knows nothing about nitrile: it signs and verifies byte strings
//! as the PASETO v4 specification says
//! (<https://github.com/paseto-standard/paseto-spec/blob/master/docs/01-Protocol-Versions/Version4.md>),
//! and is checked against the official test vectors in `testdata/`.
//!
//! Decoding is strict: base64url without padding, canonical only (the unused
//! low bits of the last character must be zero), and no token longer than
//! [`MAX_TOKEN_LEN`] is looked at.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use subtle::ConstantTimeEq as _;

/// The header of every v4.public token.
pub const HEADER: &str = "v4.public.";

/// Longest token, in bytes, that is decoded at all.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Length of an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

/// Why a v4.public token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PasetoError {
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("token is {0} bytes long; at most {MAX_TOKEN_LEN} are accepted")]
    TooLarge(usize),
    /// The token does not start with `v4.public.`.
    #[error("token is not a PASETO v4.public token (it must start with \"v4.public.\")")]
    WrongHeader,
    /// The token has more than one footer, or an empty footer segment.
    #[error("token does not have the form v4.public.<payload>[.<footer>]")]
    BadStructure,
    /// A segment is not canonical unpadded base64url.
    #[error("token is not canonical unpadded base64url")]
    BadBase64,
    /// The payload is shorter than a signature.
    #[error("token payload is shorter than an Ed25519 signature")]
    TooShort,
    /// The footer differs from the one the caller expected.
    #[error("token footer is not the expected one")]
    FooterMismatch,
    /// The signature does not verify under the given public key.
    #[error("token signature does not verify")]
    BadSignature,
}

/// `PAE` of the PASETO specification: the count of pieces, then each piece
/// preceded by its length, all lengths as 64-bit little-endian with the top bit
/// cleared.
fn pae(pieces: &[&[u8]]) -> Vec<u8> {
    fn le64(n: usize) -> [u8; 8] {
        // Lengths here are bounded by MAX_TOKEN_LEN or by memory; the top bit
        // is cleared as the specification asks.
        ((n as u64) & (u64::MAX >> 1)).to_le_bytes()
    }
    let len = 8 + pieces.iter().map(|p| 8 + p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&le64(pieces.len()));
    for piece in pieces {
        out.extend_from_slice(&le64(piece.len()));
        out.extend_from_slice(piece);
    }
    out
}

/// Signs `message` with `footer` (empty for none) and the implicit assertion
/// `implicit`, returning the token `v4.public.<b64(m || sig)>[.<b64(f)>]`.
pub fn v4_public_sign(sk: &SigningKey, message: &[u8], footer: &[u8], implicit: &[u8]) -> String {
    let m2 = pae(&[HEADER.as_bytes(), message, footer, implicit]);
    let sig = sk.sign(&m2);
    let mut body = Vec::with_capacity(message.len() + SIGNATURE_LEN);
    body.extend_from_slice(message);
    body.extend_from_slice(&sig.to_bytes());
    let mut token = String::with_capacity(HEADER.len() + (body.len() + footer.len()) * 4 / 3 + 4);
    token.push_str(HEADER);
    URL_SAFE_NO_PAD.encode_string(&body, &mut token);
    if !footer.is_empty() {
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(footer, &mut token);
    }
    token
}

/// The two segments of a token after its header, decoded.
struct Parts {
    body: Vec<u8>,
    footer: Vec<u8>,
}

fn decode(segment: &str) -> Result<Vec<u8>, PasetoError> {
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| PasetoError::BadBase64)
}

fn split(token: &str) -> Result<Parts, PasetoError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(PasetoError::TooLarge(token.len()));
    }
    let rest = token.strip_prefix(HEADER).ok_or(PasetoError::WrongHeader)?;
    let (body, footer) = match rest.split_once('.') {
        None => (rest, None),
        Some((_, f)) if f.is_empty() || f.contains('.') => {
            return Err(PasetoError::BadStructure);
        }
        Some((b, f)) => (b, Some(f)),
    };
    Ok(Parts {
        body: decode(body)?,
        footer: footer.map(decode).transpose()?.unwrap_or_default(),
    })
}

/// Returns the footer of a token WITHOUT verifying anything but its form.
///
/// Use it only to pick the key to verify with (the `kid`); trust nothing in it
/// until [`v4_public_verify`] has succeeded with that same footer expected.
pub fn untrusted_footer(token: &str) -> Result<Vec<u8>, PasetoError> {
    split(token).map(|p| p.footer)
}

/// Verifies a v4.public token and returns its message.
///
/// With `footer_expected` set, the token's footer must be exactly that (empty
/// for none); without it any footer is accepted (it is covered by the
/// signature either way). `implicit` must be the implicit assertion the token
/// was signed with. The signature is checked with Ed25519 `verify_strict`.
pub fn v4_public_verify(
    pk: &VerifyingKey,
    token: &str,
    footer_expected: Option<&[u8]>,
    implicit: &[u8],
) -> Result<Vec<u8>, PasetoError> {
    let Parts { mut body, footer } = split(token)?;
    if let Some(expected) = footer_expected
        && !bool::from(footer.as_slice().ct_eq(expected))
    {
        return Err(PasetoError::FooterMismatch);
    }
    if body.len() < SIGNATURE_LEN {
        return Err(PasetoError::TooShort);
    }
    let sig_bytes: [u8; SIGNATURE_LEN] = body[body.len() - SIGNATURE_LEN..]
        .try_into()
        .map_err(|_| PasetoError::TooShort)?;
    body.truncate(body.len() - SIGNATURE_LEN);
    let sig = Signature::from_bytes(&sig_bytes);
    let m2 = pae(&[HEADER.as_bytes(), &body, &footer, implicit]);
    pk.verify_strict(&m2, &sig)
        .map_err(|_| PasetoError::BadSignature)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    #[test]
    fn pae_matches_the_specification_examples() {
        assert_eq!(pae(&[]), b"\x00\x00\x00\x00\x00\x00\x00\x00");
        assert_eq!(
            pae(&[b""]),
            b"\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
        );
        assert_eq!(
            pae(&[b"test"]),
            b"\x01\x00\x00\x00\x00\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00test"
        );
    }

    #[test]
    fn round_trip_with_and_without_footer() {
        let sk = key();
        let pk = sk.verifying_key();
        for footer in [&b""[..], b"{\"kid\":\"k\"}"] {
            let t = v4_public_sign(&sk, b"hello", footer, b"ia");
            assert_eq!(
                v4_public_verify(&pk, &t, Some(footer), b"ia").unwrap(),
                b"hello"
            );
            assert_eq!(v4_public_verify(&pk, &t, None, b"ia").unwrap(), b"hello");
            assert_eq!(untrusted_footer(&t).unwrap(), footer);
            assert_eq!(
                v4_public_verify(&pk, &t, None, b"other"),
                Err(PasetoError::BadSignature)
            );
            assert_eq!(
                v4_public_verify(&pk, &t, Some(b"x"), b"ia"),
                Err(PasetoError::FooterMismatch)
            );
        }
    }

    #[test]
    fn padding_and_non_canonical_base64_are_refused() {
        let sk = key();
        let pk = sk.verifying_key();
        // 4 + 64 = 68 bytes: 91 characters, the last carrying 2 unused bits.
        let t = v4_public_sign(&sk, b"hell", b"", b"");
        assert!(v4_public_verify(&pk, &t, None, b"").is_ok());
        let padded = format!("{t}==");
        assert_eq!(
            v4_public_verify(&pk, &padded, None, b""),
            Err(PasetoError::BadBase64)
        );
        let last = t.as_bytes()[t.len() - 1];
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let idx = alphabet.iter().position(|&c| c == last).unwrap();
        // Same decoded bytes with a non-zero unused bit: must not verify.
        let mut non_canonical = t.clone().into_bytes();
        let n = non_canonical.len();
        non_canonical[n - 1] = alphabet[idx ^ 1];
        let non_canonical = String::from_utf8(non_canonical).unwrap();
        assert_eq!(
            v4_public_verify(&pk, &non_canonical, None, b""),
            Err(PasetoError::BadBase64)
        );
        let standard = t.replace('-', "+").replace('_', "/");
        if standard != t {
            assert!(v4_public_verify(&pk, &standard, None, b"").is_err());
        }
    }

    #[test]
    fn structure_and_size_are_checked_first() {
        let pk = key().verifying_key();
        let long = format!("{HEADER}{}", "A".repeat(MAX_TOKEN_LEN));
        assert_eq!(
            v4_public_verify(&pk, &long, None, b""),
            Err(PasetoError::TooLarge(long.len()))
        );
        assert_eq!(
            v4_public_verify(&pk, "v4.local.AAAA", None, b""),
            Err(PasetoError::WrongHeader)
        );
        assert_eq!(
            v4_public_verify(&pk, "v4.public.AAAA.", None, b""),
            Err(PasetoError::BadStructure)
        );
        assert_eq!(
            v4_public_verify(&pk, "v4.public.AAAA.AAAA.AAAA", None, b""),
            Err(PasetoError::BadStructure)
        );
        assert_eq!(
            v4_public_verify(&pk, "v4.public.AAAA", None, b""),
            Err(PasetoError::TooShort)
        );
    }
}
