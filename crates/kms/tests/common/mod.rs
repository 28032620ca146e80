//! What the key service's tests share: a store in a temporary directory,
//! fixed times, owners, and searches of files for bytes.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};

use nitrile_api::{Name, PrincipalId};
use nitrile_kms::{KeyName, Kms};
use time::OffsetDateTime;
use time::macros::datetime;

/// The time the tests start at.
pub const T0: OffsetDateTime = datetime!(2026-03-01 12:00 UTC);

/// The key service's own principal, owner of the default key.
pub fn kms_principal() -> PrincipalId {
    PrincipalId::parse("nitrile://c1/service/kms").unwrap()
}

pub fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

pub fn key(s: &str) -> KeyName {
    KeyName::new(s).unwrap()
}

/// A key service in a fresh temporary directory, with the default key.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    /// The state directory.
    pub state: PathBuf,
    pub kms: Kms,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("kms");
        let kms = Kms::open(&state).unwrap();
        kms.create_key(&KeyName::default_key(), &kms_principal(), T0)
            .unwrap();
        Self { dir, state, kms }
    }
}

/// Every regular file under `dir`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// The forms a secret could take in a file: its bytes, its hex in either
/// case, and its standard and URL-safe base64 (without the last partial
/// group, which depends on what follows).
pub fn encodings(secret: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    let b64 = |e: &base64::engine::GeneralPurpose| {
        let full = secret.len() / 3 * 3;
        e.encode(&secret[..full]).into_bytes()
    };
    vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
        b64(&base64::engine::general_purpose::STANDARD),
        b64(&base64::engine::general_purpose::URL_SAFE),
    ]
}

/// The files under `dir` that hold `secret` in any of its [`encodings`].
pub fn files_holding(dir: &Path, secret: &[u8]) -> Vec<PathBuf> {
    let needles = encodings(secret);
    files_under(dir)
        .into_iter()
        .filter(|f| {
            let bytes = std::fs::read(f).unwrap();
            needles
                .iter()
                .any(|n| bytes.windows(n.len()).any(|w| w == n.as_slice()))
        })
        .collect()
}

/// Copies the tree `from` to `to`.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}
