//! C2SP signed-note (Ed25519, type 0x01), tlog-checkpoint bodies and
//! tlog-cosignature `cosignature/v1` (timestamped Ed25519, type 0x04).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand_core::{CryptoRngCore, OsRng};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::Hash;

/// The largest note (text and signature lines) a parser accepts.
pub const MAX_NOTE_SIZE: usize = 64 * 1024;
/// The most signature lines a parser accepts (the spec asks for at least 16).
pub const MAX_NOTE_SIGNATURES: usize = 100;
/// The longest vkey or skey string a parser accepts.
pub const MAX_KEY_SIZE: usize = 1024;
/// The largest checkpoint tree size: timestamps and sizes stay below 2^63.
const MAX_SIZE: u64 = i64::MAX as u64;

const ALG_ED25519: u8 = 0x01;
const ALG_COSIGNATURE_V1: u8 = 0x04;

/// Why a note, key or checkpoint was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum NoteError {
    /// the note is larger than MAX_NOTE_SIZE
    #[error("the note has {0} bytes, more than the {MAX_NOTE_SIZE} allowed")]
    TooLarge(usize),
    /// the note is not text, blank line, signature lines
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    /// the note has more than MAX_NOTE_SIGNATURES signature lines
    #[error("the note has more than {MAX_NOTE_SIGNATURES} signature lines")]
    TooManySignatures,
    /// a key string is malformed
    #[error("malformed key: {0}")]
    BadKey(&'static str),
    /// a key name is empty or contains a space or a plus
    #[error("invalid key name")]
    BadKeyName,
    /// the key ID in a vkey does not match its name and key
    #[error("the key ID does not match the key name and public key")]
    KeyIdMismatch,
    /// a signature from the trusted key is present but does not verify
    #[error("a signature by {0} does not verify")]
    BadSignature(String),
    /// no signature by the trusted key is on the note
    #[error("the note carries no signature by {0}")]
    NotSigned(String),
    /// the note body is not a tlog-checkpoint
    #[error("malformed checkpoint: {0}")]
    BadCheckpoint(&'static str),
    /// the checkpoint is for another log
    #[error("the checkpoint is for origin {found:?}, expected {expected:?}")]
    WrongOrigin {
        /// Origin expected.
        expected: String,
        /// Origin found.
        found: String,
    },
    /// the key is of the wrong type for this use
    #[error("the key is a {found:?} key; this needs a {expected:?} key")]
    WrongKeyKind {
        /// Kind this operation needs.
        expected: KeyKind,
        /// Kind of the key given.
        found: KeyKind,
    },
}

/// The signature types this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// Ed25519 over the note text (signed-note type 0x01): log checkpoint keys.
    Ed25519,
    /// Timestamped Ed25519 `cosignature/v1` (type 0x04): witness keys.
    CosignatureV1,
}

impl KeyKind {
    fn alg(self) -> u8 {
        match self {
            KeyKind::Ed25519 => ALG_ED25519,
            KeyKind::CosignatureV1 => ALG_COSIGNATURE_V1,
        }
    }

    fn from_alg(alg: u8) -> Result<Self, NoteError> {
        match alg {
            ALG_ED25519 => Ok(KeyKind::Ed25519),
            ALG_COSIGNATURE_V1 => Ok(KeyKind::CosignatureV1),
            _ => Err(NoteError::BadKey("unsupported signature type")),
        }
    }
}

fn check_name(name: &str) -> Result<(), NoteError> {
    if name.is_empty()
        || name.len() > 256
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '+')
    {
        return Err(NoteError::BadKeyName);
    }
    Ok(())
}

fn key_id(name: &str, kind: KeyKind, public: &[u8; 32]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([kind.alg()]);
    h.update(public);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// A public key that verifies note signatures or cosignatures, parsed from a
/// vkey `<name>+<hex key ID>+<base64(type || key)>`.
#[derive(Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    id: u32,
    kind: KeyKind,
    key: VerifyingKey,
}

impl fmt::Debug for NoteVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_vkey())
    }
}

impl NoteVerifier {
    /// Parses a vkey; fails closed on a bad name, type, key or key ID.
    pub fn from_vkey(vkey: &str) -> Result<Self, NoteError> {
        if vkey.len() > MAX_KEY_SIZE {
            return Err(NoteError::BadKey("too long"));
        }
        let (name, rest) = vkey.split_once('+').ok_or(NoteError::BadKey("no '+'"))?;
        let (id_hex, b64) = rest.split_once('+').ok_or(NoteError::BadKey("no key ID"))?;
        check_name(name)?;
        if id_hex.len() != 8
            || !id_hex
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(NoteError::BadKey("key ID is not 8 lowercase hex digits"));
        }
        let id = u32::from_str_radix(id_hex, 16).map_err(|_| NoteError::BadKey("key ID"))?;
        let raw = B64
            .decode(b64)
            .map_err(|_| NoteError::BadKey("key is not base64"))?;
        let (&alg, public) = raw.split_first().ok_or(NoteError::BadKey("empty key"))?;
        let kind = KeyKind::from_alg(alg)?;
        let public: [u8; 32] = public
            .try_into()
            .map_err(|_| NoteError::BadKey("Ed25519 keys are 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&public)
            .map_err(|_| NoteError::BadKey("not an Ed25519 public key"))?;
        if key.is_weak() {
            return Err(NoteError::BadKey("weak Ed25519 public key"));
        }
        if key_id(name, kind, &public) != id {
            return Err(NoteError::KeyIdMismatch);
        }
        Ok(Self {
            name: name.to_owned(),
            id,
            kind,
            key,
        })
    }

    /// The vkey string.
    pub fn to_vkey(&self) -> String {
        let mut raw = vec![self.kind.alg()];
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.id, B64.encode(raw))
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key ID.
    pub fn key_id(&self) -> u32 {
        self.id
    }

    /// The signature type.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// Verifies one signature (the bytes after the key ID) over `body`.
    /// Returns the cosignature timestamp for a `cosignature/v1` key, 0 else.
    fn verify_sig(&self, body: &str, sig: &[u8]) -> Result<u64, NoteError> {
        let bad = || NoteError::BadSignature(self.name.clone());
        match self.kind {
            KeyKind::Ed25519 => {
                let sig = Signature::from_slice(sig).map_err(|_| bad())?;
                self.key
                    .verify_strict(body.as_bytes(), &sig)
                    .map_err(|_| bad())?;
                Ok(0)
            }
            KeyKind::CosignatureV1 => {
                if sig.len() != 8 + 64 {
                    return Err(bad());
                }
                let ts = u64::from_be_bytes(sig[..8].try_into().map_err(|_| bad())?);
                if ts > MAX_SIZE {
                    return Err(bad());
                }
                let sig = Signature::from_slice(&sig[8..]).map_err(|_| bad())?;
                let msg = cosignature_message(ts, body);
                self.key
                    .verify_strict(msg.as_bytes(), &sig)
                    .map_err(|_| bad())?;
                Ok(ts)
            }
        }
    }
}

fn cosignature_message(timestamp: u64, body: &str) -> String {
    format!("cosignature/v1\ntime {timestamp}\n{body}")
}

/// A private key that signs notes (type 0x01) or cosigns checkpoints (type 0x04).
///
/// Its `Debug` shows only the name and key ID; the key is zeroed on drop.
pub struct NoteSigner {
    name: String,
    id: u32,
    kind: KeyKind,
    key: SigningKey,
}

impl fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoteSigner")
            .field("name", &self.name)
            .field("key_id", &format_args!("{:08x}", self.id))
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl NoteSigner {
    /// A new Ed25519 note key (type 0x01) named `name`, from the OS RNG.
    pub fn generate(name: &str) -> Result<Self, NoteError> {
        Self::generate_with(&mut OsRng, name, KeyKind::Ed25519)
    }

    /// A new `cosignature/v1` witness key (type 0x04) named `name`, from the OS RNG.
    pub fn generate_cosigner(name: &str) -> Result<Self, NoteError> {
        Self::generate_with(&mut OsRng, name, KeyKind::CosignatureV1)
    }

    /// A new key of `kind` from `rng`.
    pub fn generate_with(
        rng: &mut impl CryptoRngCore,
        name: &str,
        kind: KeyKind,
    ) -> Result<Self, NoteError> {
        check_name(name)?;
        let key = SigningKey::generate(rng);
        let id = key_id(name, kind, key.verifying_key().as_bytes());
        Ok(Self {
            name: name.to_owned(),
            id,
            kind,
            key,
        })
    }

    /// Parses a private key `PRIVATE+KEY+<name>+<hex key ID>+<base64(type || seed)>`.
    pub fn from_skey(skey: &str) -> Result<Self, NoteError> {
        if skey.len() > MAX_KEY_SIZE {
            return Err(NoteError::BadKey("too long"));
        }
        let rest = skey
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(NoteError::BadKey("no PRIVATE+KEY+ prefix"))?;
        let (name, rest) = rest.split_once('+').ok_or(NoteError::BadKey("no key ID"))?;
        let (id_hex, b64) = rest.split_once('+').ok_or(NoteError::BadKey("no key"))?;
        check_name(name)?;
        if id_hex.len() != 8
            || !id_hex
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(NoteError::BadKey("key ID is not 8 lowercase hex digits"));
        }
        let id = u32::from_str_radix(id_hex, 16).map_err(|_| NoteError::BadKey("key ID"))?;
        let raw = Zeroizing::new(
            B64.decode(b64)
                .map_err(|_| NoteError::BadKey("key is not base64"))?,
        );
        let (&alg, seed) = raw.split_first().ok_or(NoteError::BadKey("empty key"))?;
        let kind = KeyKind::from_alg(alg)?;
        let seed: &[u8; 32] = seed
            .try_into()
            .map_err(|_| NoteError::BadKey("Ed25519 seeds are 32 bytes"))?;
        let key = SigningKey::from_bytes(seed);
        if key_id(name, kind, key.verifying_key().as_bytes()) != id {
            return Err(NoteError::KeyIdMismatch);
        }
        Ok(Self {
            name: name.to_owned(),
            id,
            kind,
            key,
        })
    }

    /// The private key string (secret: write it with mode 0600, never log it).
    pub fn to_skey(&self) -> Zeroizing<String> {
        let mut raw = Zeroizing::new(vec![self.kind.alg()]);
        raw.extend_from_slice(self.key.as_bytes());
        Zeroizing::new(format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.id,
            B64.encode(&*raw)
        ))
    }

    /// The matching verifier.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            id: self.id,
            kind: self.kind,
            key: self.key.verifying_key(),
        }
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The signature type.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// One signature line (`— <name> <base64>\n`) over the note text `body`.
    /// `now_unix_secs` is the cosignature timestamp; Ed25519 note keys ignore it.
    pub fn sign_line(&self, body: &str, now_unix_secs: u64) -> Result<String, NoteError> {
        check_body(body)?;
        let mut sig = self.id.to_be_bytes().to_vec();
        match self.kind {
            KeyKind::Ed25519 => sig.extend_from_slice(&self.key.sign(body.as_bytes()).to_bytes()),
            KeyKind::CosignatureV1 => {
                if now_unix_secs > MAX_SIZE {
                    return Err(NoteError::Malformed("timestamp above 2^63 - 1"));
                }
                let msg = cosignature_message(now_unix_secs, body);
                sig.extend_from_slice(&now_unix_secs.to_be_bytes());
                sig.extend_from_slice(&self.key.sign(msg.as_bytes()).to_bytes());
            }
        }
        Ok(format!("\u{2014} {} {}\n", self.name, B64.encode(sig)))
    }
}

/// A whole signed note: text, a blank line, one or more signature lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedNote {
    /// The note exactly as served.
    pub text: String,
}

impl SignedNote {
    /// Signs `body` (a note text ending in a newline) with `signer`.
    pub fn sign(body: &str, signer: &NoteSigner, now_unix_secs: u64) -> Result<Self, NoteError> {
        let line = signer.sign_line(body, now_unix_secs)?;
        Ok(Self {
            text: format!("{body}\n{line}"),
        })
    }

    /// The note text (everything before the blank line, final newline included).
    pub fn body(&self) -> Result<&str, NoteError> {
        Ok(split_note(&self.text)?.0)
    }

    /// This note with one more signature line (e.g. a witness cosignature).
    /// A line already on the note is not added twice.
    pub fn with_signature_line(&self, line: &str) -> Result<Self, NoteError> {
        let (_, sigs) = split_note(&self.text)?;
        let line = line.strip_suffix('\n').unwrap_or(line);
        parse_sig_line(line)?;
        if sigs.iter().any(|s| s.line == line) {
            return Ok(self.clone());
        }
        let text = format!("{}{line}\n", self.text);
        split_note(&text)?;
        Ok(Self { text })
    }
}

impl fmt::Display for SignedNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

struct SigLine<'a> {
    line: &'a str,
    name: &'a str,
    id: u32,
    sig: Vec<u8>,
}

fn check_body(body: &str) -> Result<(), NoteError> {
    if !body.ends_with('\n') {
        return Err(NoteError::Malformed("the text does not end in a newline"));
    }
    if body.len() > MAX_NOTE_SIZE {
        return Err(NoteError::TooLarge(body.len()));
    }
    if body.chars().any(|c| c < ' ' && c != '\n') {
        return Err(NoteError::Malformed("control character"));
    }
    Ok(())
}

fn parse_sig_line(line: &str) -> Result<SigLine<'_>, NoteError> {
    let rest = line
        .strip_prefix("\u{2014} ")
        .ok_or(NoteError::Malformed("signature line without em dash"))?;
    let (name, b64) = rest
        .split_once(' ')
        .ok_or(NoteError::Malformed("signature line without name"))?;
    check_name(name).map_err(|_| NoteError::Malformed("bad key name in a signature line"))?;
    let sig = B64
        .decode(b64)
        .map_err(|_| NoteError::Malformed("signature is not base64"))?;
    if sig.len() < 5 {
        return Err(NoteError::Malformed("signature too short"));
    }
    let id = u32::from_be_bytes([sig[0], sig[1], sig[2], sig[3]]);
    Ok(SigLine {
        line,
        name,
        id,
        sig: sig[4..].to_vec(),
    })
}

/// Splits a note into its text and its parsed signature lines.
fn split_note(note: &str) -> Result<(&str, Vec<SigLine<'_>>), NoteError> {
    if note.len() > MAX_NOTE_SIZE {
        return Err(NoteError::TooLarge(note.len()));
    }
    if note.chars().any(|c| c < ' ' && c != '\n') {
        return Err(NoteError::Malformed("control character"));
    }
    if !note.ends_with('\n') {
        return Err(NoteError::Malformed("does not end in a newline"));
    }
    let split = note
        .rfind("\n\n")
        .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
    let body = &note[..split + 1];
    let sigs_text = &note[split + 2..];
    let mut sigs = Vec::new();
    for line in sigs_text
        .strip_suffix('\n')
        .unwrap_or(sigs_text)
        .split('\n')
    {
        if sigs.len() == MAX_NOTE_SIGNATURES {
            return Err(NoteError::TooManySignatures);
        }
        sigs.push(parse_sig_line(line)?);
    }
    if sigs.is_empty() {
        return Err(NoteError::Malformed("no signature lines"));
    }
    Ok((body, sigs))
}

/// A verified signature: which key, and the cosignature timestamp if any.
fn verify_by<'a>(note: &'a str, verifier: &NoteVerifier) -> Result<(&'a str, u64), NoteError> {
    let (body, sigs) = split_note(note)?;
    let mut verified = None;
    for s in sigs
        .iter()
        .filter(|s| s.name == verifier.name && s.id == verifier.id)
    {
        // A signature from a known key that fails rejects the whole note.
        let ts = verifier.verify_sig(body, &s.sig)?;
        verified.get_or_insert(ts);
    }
    match verified {
        Some(ts) => Ok((body, ts)),
        None => Err(NoteError::NotSigned(verifier.name.clone())),
    }
}

/// A tlog-checkpoint: the log's origin, tree size and root hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's identity (`<cell>.nitrile/log`).
    pub origin: String,
    /// Number of leaves.
    pub size: u64,
    /// RFC 9162 root hash of the tree of that size.
    pub root: Hash,
}

impl Checkpoint {
    /// The note text: origin, size and base64 root, one a line.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }

    /// Parses a checkpoint note text (extension lines are accepted and ignored).
    pub fn parse_body(body: &str) -> Result<Self, NoteError> {
        let lines: Vec<&str> = body
            .strip_suffix('\n')
            .unwrap_or(body)
            .split('\n')
            .collect();
        if lines.len() < 3 {
            return Err(NoteError::BadCheckpoint("fewer than three lines"));
        }
        if lines.iter().any(|l| l.is_empty()) {
            return Err(NoteError::BadCheckpoint("empty line"));
        }
        let origin = lines[0];
        let size_s = lines[1];
        if size_s.len() > 20
            || !size_s.bytes().all(|b| b.is_ascii_digit())
            || (size_s.len() > 1 && size_s.starts_with('0'))
        {
            return Err(NoteError::BadCheckpoint("size is not a canonical decimal"));
        }
        let size: u64 = size_s
            .parse()
            .map_err(|_| NoteError::BadCheckpoint("size"))?;
        if size > MAX_SIZE {
            return Err(NoteError::BadCheckpoint("size too large"));
        }
        let root = B64
            .decode(lines[2])
            .map_err(|_| NoteError::BadCheckpoint("root is not base64"))?;
        let root: Hash = root
            .try_into()
            .map_err(|_| NoteError::BadCheckpoint("root is not 32 bytes"))?;
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

/// Verifies that `note` is signed by `log` and is a checkpoint of `origin`.
pub fn open_checkpoint(
    note: &str,
    origin: &str,
    log: &NoteVerifier,
) -> Result<Checkpoint, NoteError> {
    let (body, _) = verify_by(note, log)?;
    let cp = Checkpoint::parse_body(body)?;
    if cp.origin != origin {
        return Err(NoteError::WrongOrigin {
            expected: origin.to_owned(),
            found: cp.origin,
        });
    }
    Ok(cp)
}

/// A `cosignature/v1` cosignature verified: the witness and its timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CosignatureValid {
    /// The witness key name.
    pub name: String,
    /// When the witness cosigned (POSIX seconds).
    pub timestamp: u64,
}

/// Verifies the cosignature of `witness` (a type 0x04 key) on `note`.
pub fn verify_cosignature(
    note: &str,
    witness: &NoteVerifier,
) -> Result<CosignatureValid, NoteError> {
    if witness.kind != KeyKind::CosignatureV1 {
        return Err(NoteError::WrongKeyKind {
            expected: KeyKind::CosignatureV1,
            found: witness.kind,
        });
    }
    let (_, timestamp) = verify_by(note, witness)?;
    Ok(CosignatureValid {
        name: witness.name.clone(),
        timestamp,
    })
}

/// The names of the `witnesses` whose cosignature on `note` verifies (in the
/// order given, each once). Unknown signatures are ignored, as the spec asks.
pub fn cosignatures(note: &str, witnesses: &[NoteVerifier]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for w in witnesses {
        if verify_cosignature(note, w).is_ok() && !names.contains(&w.name) {
            names.push(w.name.clone());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_and_sign() {
        for kind in [KeyKind::Ed25519, KeyKind::CosignatureV1] {
            let s = NoteSigner::generate_with(&mut OsRng, "local.nitrile/log", kind).unwrap();
            let again = NoteSigner::from_skey(&s.to_skey()).unwrap();
            assert_eq!(again.verifier(), s.verifier());
            let v = NoteVerifier::from_vkey(&s.verifier().to_vkey()).unwrap();
            assert_eq!(v, s.verifier());
            let note = SignedNote::sign("a\nb\n", &s, 1_700_000_000).unwrap();
            let (body, ts) = verify_by(&note.text, &v).unwrap();
            assert_eq!(body, "a\nb\n");
            assert_eq!(
                ts,
                if kind == KeyKind::CosignatureV1 {
                    1_700_000_000
                } else {
                    0
                }
            );
            let tampered = note.text.replacen("a\n", "A\n", 1);
            assert!(matches!(
                verify_by(&tampered, &v),
                Err(NoteError::BadSignature(_))
            ));
            assert!(!format!("{s:?}").contains(&*s.to_skey()));
        }
    }

    #[test]
    fn bad_names_and_keys_are_refused() {
        for n in ["", "a b", "a+b", "a\nb"] {
            assert_eq!(NoteSigner::generate(n).unwrap_err(), NoteError::BadKeyName);
        }
        let v = NoteSigner::generate("x").unwrap().verifier().to_vkey();
        let wrong_id = format!("y{}", &v[1..]);
        assert_eq!(
            NoteVerifier::from_vkey(&wrong_id).unwrap_err(),
            NoteError::KeyIdMismatch
        );
    }
}
