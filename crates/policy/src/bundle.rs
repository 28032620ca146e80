//! Reading a bundle directory into memory and computing its digest.
//!
//! A bundle is read once, with every bound checked, and everything after that
//! (digest, signature check, parsing) works on the same bytes, so a file that
//! changes while it is being checked cannot be half-reviewed.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::PolicyError;
use crate::manifest::{BundleSerial, BundleVersion};

/// Largest file a bundle may contain.
pub const MAX_BUNDLE_FILE_SIZE: u64 = 1024 * 1024;
/// Most files a bundle may contain, signatures included.
pub const MAX_BUNDLE_FILES: usize = 512;
/// Largest total size of a bundle.
pub const MAX_BUNDLE_TOTAL_SIZE: u64 = 16 * 1024 * 1024;

/// The directory holding detached reviewer signatures, excluded from the digest.
pub const SIGNATURES_DIR: &str = "signatures";

/// The directory holding the audit log monitor's rules (`rules/*.yml`),
/// covered by the digest like every other reviewed file.
pub const RULES_DIR: &str = "rules";

/// Domain separator of the bundle digest.
const DIGEST_DOMAIN: &[u8] = b"nitrile-entitlements-bundle-v1\n";

/// What a file of a bundle is, decided by its name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileRole {
    /// `schema.cedarschema`.
    Schema,
    /// `groups.json` or `*.entities.json`.
    Entities,
    /// `*.cedar`.
    Policies,
    /// `quotas.toml`.
    Quotas,
    /// `bundle.toml`: the serial.
    Manifest,
    /// `rules/<name>.yml` or `rules/<name>.yaml`: a monitor rule file.
    Rule,
    /// `signatures/<name>.sig`.
    Signature,
}

/// Whether `name` is `<stem><suffix>` with a stem of ASCII letters, digits,
/// `-` and `_`.
fn stem_ok(name: &str, suffix: &str) -> bool {
    name.strip_suffix(suffix).is_some_and(|stem| {
        !stem.is_empty()
            && stem
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    })
}

impl FileRole {
    fn of(path: &str) -> Option<Self> {
        if let Some(name) = path.strip_prefix("signatures/") {
            return (!name.contains('/') && name.ends_with(".sig") && name.len() > 4)
                .then_some(Self::Signature);
        }
        if let Some(name) = path.strip_prefix("rules/") {
            return (stem_ok(name, ".yml") || stem_ok(name, ".yaml")).then_some(Self::Rule);
        }
        if path.contains('/') {
            return None;
        }
        let stem_ok = |suffix: &str| stem_ok(path, suffix);
        match path {
            "schema.cedarschema" => Some(Self::Schema),
            "quotas.toml" => Some(Self::Quotas),
            crate::manifest::MANIFEST_FILE => Some(Self::Manifest),
            "groups.json" => Some(Self::Entities),
            _ if stem_ok(".entities.json") => Some(Self::Entities),
            _ if stem_ok(".cedar") => Some(Self::Policies),
            _ => None,
        }
    }
}

/// One file of a bundle, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BundleFile {
    pub(crate) role: FileRole,
    pub(crate) bytes: Vec<u8>,
}

/// The SHA-256 digest of a bundle's reviewed content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BundleDigest(pub(crate) [u8; 32]);

impl BundleDigest {
    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for BundleDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A bundle directory read into memory: every file, by relative path.
///
/// Reading refuses unknown files, symbolic links, subdirectories other than
/// `signatures/` and `rules/`, a missing or malformed `bundle.toml`, and
/// anything over the `MAX_BUNDLE_*` bounds, so nothing in the directory is
/// silently ignored and every bundle has a serial.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub(crate) dir: PathBuf,
    pub(crate) files: BTreeMap<String, BundleFile>,
    pub(crate) serial: BundleSerial,
}

impl Bundle {
    /// Reads every file of the bundle at `dir` and its serial.
    pub fn read(dir: &Path) -> Result<Self, PolicyError> {
        let files = read_files(dir)?;
        let manifest = files
            .get(crate::manifest::MANIFEST_FILE)
            .ok_or(PolicyError::MissingManifest)?;
        let serial = crate::manifest::parse_serial(&manifest.bytes)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            serial,
        })
    }

    /// The directory the bundle was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The serial of `bundle.toml`, covered by the digest.
    pub fn serial(&self) -> BundleSerial {
        self.serial
    }

    /// The serial and digest together.
    pub fn version(&self) -> BundleVersion {
        BundleVersion {
            serial: self.serial,
            digest: self.digest(),
        }
    }

    /// The monitor rule files (`rules/*.yml`, `rules/*.yaml`) as read, by
    /// relative path in name order.
    pub fn rule_files(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files_of(FileRole::Rule)
            .map(|(p, f)| (p.as_str(), f.bytes.as_slice()))
    }

    /// The digest over every file except `signatures/`: SHA-256 of a domain
    /// separator, then for each file sorted by relative path (`/`-separated,
    /// byte order) the path length and length of the content as 8-byte
    /// big-endian integers, the path and the content.
    pub fn digest(&self) -> BundleDigest {
        digest_files(&self.files)
    }

    /// Files covered by the digest, sorted by path.
    pub(crate) fn reviewed_files(&self) -> impl Iterator<Item = (&String, &BundleFile)> {
        self.files
            .iter()
            .filter(|(_, f)| f.role != FileRole::Signature)
    }

    /// Files of one role, sorted by path.
    pub(crate) fn files_of(&self, role: FileRole) -> impl Iterator<Item = (&String, &BundleFile)> {
        files_of(&self.files, role)
    }

    /// Relative paths of every file covered by the digest.
    pub fn reviewed_paths(&self) -> Vec<String> {
        self.reviewed_files().map(|(p, _)| p.clone()).collect()
    }
}

/// Every file of the bundle directory `dir`, by relative path, with every
/// bound checked.
pub(crate) fn read_files(dir: &Path) -> Result<BTreeMap<String, BundleFile>, PolicyError> {
    let mut files = BTreeMap::new();
    let mut total = 0u64;
    read_dir_into(dir, dir, "", &mut files, &mut total)?;
    Ok(files)
}

/// The files of one role, sorted by path.
pub(crate) fn files_of(
    files: &BTreeMap<String, BundleFile>,
    role: FileRole,
) -> impl Iterator<Item = (&String, &BundleFile)> {
    files.iter().filter(move |(_, f)| f.role == role)
}

/// The digest of [`Bundle::digest`] over `files`.
pub(crate) fn digest_files(files: &BTreeMap<String, BundleFile>) -> BundleDigest {
    let mut h = Sha256::new();
    h.update(DIGEST_DOMAIN);
    for (path, file) in files.iter().filter(|(_, f)| f.role != FileRole::Signature) {
        h.update((path.len() as u64).to_be_bytes());
        h.update((file.bytes.len() as u64).to_be_bytes());
        h.update(path.as_bytes());
        h.update(&file.bytes);
    }
    BundleDigest(h.finalize().into())
}

fn read_dir_into(
    root: &Path,
    dir: &Path,
    prefix: &str,
    files: &mut BTreeMap<String, BundleFile>,
    total: &mut u64,
) -> Result<(), PolicyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PolicyError::Io { path, source }
    };
    let entries = fs::read_dir(dir).map_err(io(dir))?;
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            return Err(PolicyError::UnknownFile {
                path: path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .display()
                    .to_string(),
            });
        };
        let rel = format!("{prefix}{name}");
        let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
        if meta.is_dir() && prefix.is_empty() && (name == SIGNATURES_DIR || name == RULES_DIR) {
            read_dir_into(root, &path, &format!("{name}/"), files, total)?;
            continue;
        }
        if !meta.is_file() {
            return Err(PolicyError::NotARegularFile { path: rel });
        }
        let Some(role) = FileRole::of(&rel) else {
            return Err(PolicyError::UnknownFile { path: rel });
        };
        if files.len() >= MAX_BUNDLE_FILES {
            return Err(PolicyError::TooManyFiles {
                max: MAX_BUNDLE_FILES,
            });
        }
        let bytes = nitrile_fs::read_bounded(&path, MAX_BUNDLE_FILE_SIZE).map_err(|e| match e {
            nitrile_fs::FsError::TooLarge { max, .. } => PolicyError::FileTooLarge {
                path: rel.clone(),
                max,
            },
            e => io(&path)(e.into()),
        })?;
        *total += bytes.len() as u64;
        if *total > MAX_BUNDLE_TOTAL_SIZE {
            return Err(PolicyError::BundleTooLarge {
                max: MAX_BUNDLE_TOTAL_SIZE,
            });
        }
        files.insert(rel, BundleFile { role, bytes });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_decided_by_name() {
        assert_eq!(FileRole::of("schema.cedarschema"), Some(FileRole::Schema));
        assert_eq!(FileRole::of("groups.json"), Some(FileRole::Entities));
        assert_eq!(
            FileRole::of("hosts.entities.json"),
            Some(FileRole::Entities)
        );
        assert_eq!(FileRole::of("oncall.cedar"), Some(FileRole::Policies));
        assert_eq!(FileRole::of("quotas.toml"), Some(FileRole::Quotas));
        assert_eq!(FileRole::of("bundle.toml"), Some(FileRole::Manifest));
        assert_eq!(FileRole::of("rules/many-hosts.yml"), Some(FileRole::Rule));
        assert_eq!(FileRole::of("rules/x_1.yaml"), Some(FileRole::Rule));
        assert_eq!(
            FileRole::of("signatures/alice.sig"),
            Some(FileRole::Signature)
        );
        for bad in [
            "README.md",
            ".cedar",
            "x.cedar.bak",
            "sub/x.cedar",
            "signatures/a/b.sig",
            "signatures/.sig",
            "signatures/x.txt",
            "other.json",
            ".entities.json",
            "a b.cedar",
            "rules/README.md",
            "rules/.yml",
            "rules/a/b.yml",
            "rules/a b.yml",
            "x.yml",
            "rules",
            "other.toml",
        ] {
            assert_eq!(FileRole::of(bad), None, "{bad}");
        }
    }

    #[test]
    fn digest_covers_paths_and_content_but_not_signatures() {
        let mk = |files: &[(&str, &str)]| Bundle {
            dir: PathBuf::new(),
            serial: BundleSerial::new(1).unwrap(),
            files: files
                .iter()
                .map(|(p, c)| {
                    (
                        p.to_string(),
                        BundleFile {
                            role: FileRole::of(p).unwrap(),
                            bytes: c.as_bytes().to_vec(),
                        },
                    )
                })
                .collect(),
        };
        let a = mk(&[("a.cedar", "x"), ("b.cedar", "y")]);
        let signed = mk(&[
            ("a.cedar", "x"),
            ("b.cedar", "y"),
            ("signatures/r.sig", "s"),
        ]);
        assert_eq!(a.digest(), signed.digest());
        // Moving bytes between files or renaming changes the digest.
        assert_ne!(
            a.digest(),
            mk(&[("a.cedar", "xy"), ("b.cedar", "")]).digest()
        );
        assert_ne!(
            a.digest(),
            mk(&[("a.cedar", "x"), ("c.cedar", "y")]).digest()
        );
        assert_ne!(a.digest(), mk(&[("a.cedar", "x")]).digest());
        // The serial and the monitor rules are reviewed content.
        let v1 = mk(&[("a.cedar", "x"), ("bundle.toml", "serial = 1\n")]);
        let v2 = mk(&[("a.cedar", "x"), ("bundle.toml", "serial = 2\n")]);
        assert_ne!(v1.digest(), v2.digest());
        let ruled = mk(&[("a.cedar", "x"), ("rules/r.yml", "title: a\n")]);
        let edited = mk(&[("a.cedar", "x"), ("rules/r.yml", "title: b\n")]);
        assert_ne!(ruled.digest(), edited.digest());
        assert_ne!(ruled.digest(), a.digest());
        let hex = a.digest().to_hex();
        assert_eq!(BundleDigest::from_hex(&hex), Some(a.digest()));
        assert_eq!(BundleDigest::from_hex("zz"), None);
    }
}
