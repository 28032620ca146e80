//! The release manifest and bundles.
//!
//! A bundle is a directory `nitrile release build` makes: the release's
//! files and `manifest.json`, which names the version, the environment and
//! each file's SHA-256 and length. `attestation.dsse.json` is added by
//! `nitrile release attest`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{Environment, ReleaseError, Version};

/// The manifest format this crate writes and reads.
pub const MANIFEST_FORMAT: &str = "nitrile-release-v1";
/// The manifest's file name in a bundle and the repository.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The attestation's file name in a bundle and the repository.
pub const ATTESTATION_FILE: &str = "attestation.dsse.json";
/// Largest manifest read.
pub const MAX_MANIFEST_LEN: u64 = 64 * 1024;
/// Largest release file.
pub const MAX_FILE_LEN: u64 = 1 << 30;
/// Most files in a release.
pub const MAX_FILES: usize = 32;

/// One file of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// SHA-256, hex.
    pub sha256: String,
    /// Length in bytes.
    pub length: u64,
}

/// What a release is: its version, the one environment it is for, and its
/// files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseManifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// The version.
    pub version: Version,
    /// The environment it is built for.
    pub environment: Environment,
    /// Its files by name (`nitrile`, `vmlinux`, `initramfs`,
    /// `schema.cedarschema`).
    pub files: BTreeMap<String, FileDigest>,
    /// When it was built (RFC 3339).
    pub built: String,
}

impl ReleaseManifest {
    /// Parses and checks a manifest.
    pub fn parse(bytes: &[u8]) -> Result<Self, ReleaseError> {
        let m: Self = serde_json::from_slice(bytes)
            .map_err(|e| ReleaseError::malformed("the manifest", e))?;
        if m.format != MANIFEST_FORMAT {
            return Err(ReleaseError::malformed(
                "the manifest",
                format!("format {:?}, this build reads {MANIFEST_FORMAT}", m.format),
            ));
        }
        if m.files.is_empty() || m.files.len() > MAX_FILES {
            return Err(ReleaseError::malformed(
                "the manifest",
                format!("1 to {MAX_FILES} files"),
            ));
        }
        for (name, d) in &m.files {
            if !file_name_ok(name) {
                return Err(ReleaseError::malformed(
                    "the manifest",
                    format!(
                        "bad file name {:?}",
                        name.chars().take(64).collect::<String>()
                    ),
                ));
            }
            if d.sha256.len() != 64 || !d.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ReleaseError::malformed(
                    "the manifest",
                    "a sha256 is 64 hex digits",
                ));
            }
        }
        Ok(m)
    }

    /// The manifest as written (pretty JSON, final newline).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// Whether `name` may name a release file: 1 to 64 of `A-Za-z0-9._-`, not
/// starting with a dot, and not one of the bundle's own files.
pub fn file_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name != MANIFEST_FILE
        && name != ATTESTATION_FILE
}

/// SHA-256 and length of a file (at most [`MAX_FILE_LEN`]).
pub fn digest_file(path: &Path) -> Result<FileDigest, ReleaseError> {
    let file = std::fs::File::open(path).map_err(ReleaseError::io("open", path))?;
    let mut reader = file.take(MAX_FILE_LEN + 1);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut length = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(ReleaseError::io("read", path))?;
        if n == 0 {
            break;
        }
        length += n as u64;
        h.update(&buf[..n]);
    }
    if length > MAX_FILE_LEN {
        return Err(ReleaseError::BadBundle {
            path: path.to_owned(),
            reason: format!("larger than {MAX_FILE_LEN} bytes"),
        });
    }
    Ok(FileDigest {
        sha256: hex::encode(h.finalize()),
        length,
    })
}

/// Builds a bundle in `out` (made; refused if it exists) from `files`
/// (name, source path): copies each file and writes the manifest.
pub fn build(
    version: Version,
    environment: Environment,
    files: &[(String, PathBuf)],
    out: &Path,
    now: time::OffsetDateTime,
) -> Result<ReleaseManifest, ReleaseError> {
    if out.exists() {
        return Err(ReleaseError::BadBundle {
            path: out.to_owned(),
            reason: "exists; a bundle is built into a new directory".to_owned(),
        });
    }
    if files.is_empty() || files.len() > MAX_FILES {
        return Err(ReleaseError::BadBundle {
            path: out.to_owned(),
            reason: format!("a release has 1 to {MAX_FILES} files"),
        });
    }
    std::fs::create_dir_all(out).map_err(ReleaseError::io("create", out))?;
    let mut digests = BTreeMap::new();
    for (name, src) in files {
        if !file_name_ok(name) || digests.contains_key(name) {
            return Err(ReleaseError::BadBundle {
                path: out.to_owned(),
                reason: format!("bad or repeated file name {name:?}"),
            });
        }
        let dst = out.join(name);
        std::fs::copy(src, &dst).map_err(ReleaseError::io("copy", src))?;
        digests.insert(name.clone(), digest_file(&dst)?);
    }
    let manifest = ReleaseManifest {
        format: MANIFEST_FORMAT.to_owned(),
        version,
        environment,
        files: digests,
        built: now
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    };
    nitrile_fs::write_atomic(&out.join(MANIFEST_FILE), &manifest.to_bytes(), 0o644)?;
    Ok(manifest)
}

/// Reads a bundle's manifest and checks that its files are the ones it
/// names.
pub fn read_bundle(dir: &Path) -> Result<ReleaseManifest, ReleaseError> {
    let bytes = nitrile_fs::read_bounded(&dir.join(MANIFEST_FILE), MAX_MANIFEST_LEN)?;
    let manifest = ReleaseManifest::parse(&bytes)?;
    for (name, want) in &manifest.files {
        let got = digest_file(&dir.join(name))?;
        if &got != want {
            return Err(ReleaseError::FileMismatch {
                version: manifest.version,
                file: name.clone(),
            });
        }
    }
    Ok(manifest)
}
