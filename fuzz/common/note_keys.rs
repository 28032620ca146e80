//! The fixed keys of the `checkpoint_note` target, shared with
//! `examples/make_seeds.rs` so that the seeds carry genuine signatures.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use nitrile_tlog::{KeyKind, NoteSigner};
use sha2::{Digest as _, Sha256};

/// The log's origin and key name (`<cell>.nitrile/log`).
pub const ORIGIN: &str = "cell-1.nitrile/log";

/// The log's checkpoint key (Ed25519, type 0x01).
pub fn log() -> NoteSigner {
    signer(ORIGIN, KeyKind::Ed25519, &[0x10; 32])
}

/// A witness's key (`cosignature/v1`, type 0x04).
pub fn witness() -> NoteSigner {
    signer("witness-1", KeyKind::CosignatureV1, &[0x20; 32])
}

/// A note key the target trusts for nothing.
pub fn stranger() -> NoteSigner {
    signer("stranger", KeyKind::Ed25519, &[0x30; 32])
}

/// Loads a private key string built as C2SP signed-note specifies it (key
/// ID: the first four bytes of SHA-256 of name, newline, type and public
/// key), so that loading it also checks the parser against the spec.
fn signer(name: &str, kind: KeyKind, seed: &[u8; 32]) -> NoteSigner {
    let alg = match kind {
        KeyKind::Ed25519 => 0x01,
        KeyKind::CosignatureV1 => 0x04,
    };
    let public = ed25519_dalek::SigningKey::from_bytes(seed).verifying_key();
    let digest = Sha256::new()
        .chain_update(name.as_bytes())
        .chain_update(b"\n")
        .chain_update([alg])
        .chain_update(public.as_bytes())
        .finalize();
    let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    let mut raw = vec![alg];
    raw.extend_from_slice(seed);
    let skey = format!("PRIVATE+KEY+{name}+{id:08x}+{}", B64.encode(raw));
    NoteSigner::from_skey(&skey).expect("a key made per the spec loads")
}
