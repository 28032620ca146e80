//! Peer review by machine: reviewer keys, detached signatures over the bundle
//! digest, and verification that at least [`MIN_REVIEWERS`] distinct reviewers
//! signed the current content.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::spki::{DecodePublicKey, EncodePublicKey};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use nitrile_api::Name;
use nitrile_fs::FsError;
use serde::Deserialize;

use crate::PolicyError;
use crate::bundle::{Bundle, BundleDigest, FileRole};

/// Signatures of distinct reviewers a bundle needs; callers may ask for more,
/// never fewer.
pub const MIN_REVIEWERS: usize = 2;
/// Largest signature file accepted.
pub const MAX_SIGNATURE_FILE_SIZE: usize = 4096;
/// Largest reviewer-set or key file accepted.
pub const MAX_REVIEWER_FILE_SIZE: u64 = 256 * 1024;

const SIGNATURE_HEADER: &str = "nitrile-entitlements-signature-v1";
const SIGNED_DOMAIN: &str = "nitrile-entitlements-v1\n";

/// The message a reviewer signs: a domain separator and the digest.
fn signed_message(digest: &BundleDigest) -> Vec<u8> {
    format!("{SIGNED_DOMAIN}{}\n", digest.to_hex()).into_bytes()
}

/// Why reviewer keys or the reviewer set could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReviewError {
    /// reading or writing a file failed
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// a reviewer or key file is larger than [`MAX_REVIEWER_FILE_SIZE`]
    #[error("{}: larger than {MAX_REVIEWER_FILE_SIZE} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// a reviewer-set or key file is not UTF-8 text
    #[error("{}: not UTF-8 text", path.display())]
    NotText {
        /// The file.
        path: PathBuf,
    },
    /// the reviewer set is not valid TOML of the expected shape
    #[error("{}: invalid reviewer set", path.display())]
    ReviewerToml {
        /// The file.
        path: PathBuf,
        /// The TOML error.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// a reviewer name is not a valid nitrile name
    #[error("reviewer name {0:?} is not a valid name")]
    BadReviewerName(String, #[source] nitrile_api::IdError),
    /// a reviewer's public key is neither base64 of 32 bytes nor an Ed25519 PEM key
    #[error("reviewer {0}: public_key is neither base64 of an Ed25519 key nor a PEM public key")]
    BadPublicKey(Name),
    /// the same reviewer name appears twice
    #[error("reviewer {0} is listed twice")]
    DuplicateReviewer(Name),
    /// two reviewer names share one key, which would let one person count twice
    #[error("reviewers {0} and {1} have the same public key")]
    SharedKey(Name, Name),
    /// the reviewer set lists no reviewer
    #[error("the reviewer set lists no reviewer")]
    NoReviewers,
    /// a private key file is not an Ed25519 PKCS#8 PEM key
    #[error("{}: not an Ed25519 PKCS#8 PEM private key", path.display())]
    BadPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// refusing to overwrite an existing key file
    #[error("{} already exists; refusing to overwrite a key", path.display())]
    KeyExists {
        /// The file.
        path: PathBuf,
    },
    /// the bundle to sign could not be read
    #[error("cannot read the bundle to sign")]
    Bundle(#[source] Box<PolicyError>),
}

/// A reviewer: a name and an Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewer {
    /// The reviewer's name, also the name of their signature file.
    pub name: Name,
    /// Their public key.
    pub key: VerifyingKey,
}

/// The reviewers whose signatures count, kept by the cell outside the bundle.
///
/// TOML: `[[reviewer]] name = "alice" public_key = "<base64 or PEM>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewerSet {
    reviewers: BTreeMap<Name, VerifyingKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewerFile {
    #[serde(default)]
    reviewer: Vec<ReviewerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewerEntry {
    name: String,
    public_key: String,
}

impl ReviewerSet {
    /// Reads a reviewer set file.
    pub fn load(path: &Path) -> Result<Self, ReviewError> {
        let text = read_small_text(path)?;
        let file: ReviewerFile =
            toml::from_str(&text).map_err(|source| ReviewError::ReviewerToml {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        let mut reviewers = Vec::new();
        for entry in file.reviewer {
            let name = Name::new(&entry.name)
                .map_err(|e| ReviewError::BadReviewerName(entry.name.clone(), e))?;
            let key = parse_public_key(&entry.public_key)
                .ok_or_else(|| ReviewError::BadPublicKey(name.clone()))?;
            reviewers.push(Reviewer { name, key });
        }
        Self::new(reviewers)
    }

    /// A set from reviewers; names and keys must be unique.
    pub fn new(reviewers: impl IntoIterator<Item = Reviewer>) -> Result<Self, ReviewError> {
        let mut map: BTreeMap<Name, VerifyingKey> = BTreeMap::new();
        for r in reviewers {
            if map.contains_key(&r.name) {
                return Err(ReviewError::DuplicateReviewer(r.name));
            }
            if let Some((other, _)) = map.iter().find(|(_, k)| **k == r.key) {
                return Err(ReviewError::SharedKey(other.clone(), r.name));
            }
            map.insert(r.name, r.key);
        }
        if map.is_empty() {
            return Err(ReviewError::NoReviewers);
        }
        Ok(Self { reviewers: map })
    }

    /// The reviewer names, in order.
    pub fn names(&self) -> impl Iterator<Item = &Name> {
        self.reviewers.keys()
    }

    fn key(&self, name: &Name) -> Option<&VerifyingKey> {
        self.reviewers.get(name)
    }
}

fn parse_public_key(s: &str) -> Option<VerifyingKey> {
    let s = s.trim();
    if s.starts_with("-----BEGIN") {
        return VerifyingKey::from_public_key_pem(s).ok();
    }
    let bytes = B64.decode(s).ok()?;
    let bytes: [u8; 32] = bytes.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

fn read_small_text(path: &Path) -> Result<String, ReviewError> {
    nitrile_fs::read_bounded_to_string(path, MAX_REVIEWER_FILE_SIZE).map_err(|e| match e {
        FsError::TooLarge { path, .. } => ReviewError::TooLarge { path },
        FsError::NotText { path, .. } => ReviewError::NotText { path },
        e => ReviewError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        },
    })
}

/// A reviewer's signing key. Its `Debug` output does not show the key.
pub struct ReviewerKey {
    name: Name,
    key: SigningKey,
}

impl fmt::Debug for ReviewerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReviewerKey")
            .field("name", &self.name)
            .field("public_key", &self.public_key_base64())
            .finish_non_exhaustive()
    }
}

impl ReviewerKey {
    /// A new random key for reviewer `name`.
    pub fn generate(name: Name) -> Self {
        let key = SigningKey::generate(&mut rand_core::OsRng);
        Self { name, key }
    }

    /// Reads a PKCS#8 PEM private key written by [`ReviewerKey::write`].
    pub fn load(path: &Path, name: Name) -> Result<Self, ReviewError> {
        let text = zeroize::Zeroizing::new(read_small_text(path)?);
        let key = SigningKey::from_pkcs8_pem(&text).map_err(|_| ReviewError::BadPrivateKey {
            path: path.to_path_buf(),
        })?;
        Ok(Self { name, key })
    }

    /// The reviewer's name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// The public half, as a [`Reviewer`].
    pub fn reviewer(&self) -> Reviewer {
        Reviewer {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The public key as base64 of its 32 bytes.
    pub fn public_key_base64(&self) -> String {
        B64.encode(self.key.verifying_key().as_bytes())
    }

    /// Writes `PREFIX.key` (PKCS#8 PEM, mode 0600) and `PREFIX.pub` (SPKI PEM),
    /// each atomically. Refuses to overwrite an existing key.
    pub fn write(&self, prefix: &Path) -> Result<(PathBuf, PathBuf), ReviewError> {
        let key_path = with_suffix(prefix, ".key");
        let pub_path = with_suffix(prefix, ".pub");
        for p in [&key_path, &pub_path] {
            if fs::symlink_metadata(p).is_ok() {
                return Err(ReviewError::KeyExists { path: p.clone() });
            }
        }
        let pem =
            self.key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|_| ReviewError::BadPrivateKey {
                    path: key_path.clone(),
                })?;
        write_atomic(&key_path, pem.as_bytes(), 0o600)?;
        let public = self
            .key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|_| ReviewError::BadPublicKey(self.name.clone()))?;
        write_atomic(&pub_path, public.as_bytes(), 0o644)?;
        Ok((key_path, pub_path))
    }

    /// The signature file text for a bundle with `digest`.
    pub fn signature_file(&self, digest: &BundleDigest) -> String {
        let sig = self.key.sign(&signed_message(digest));
        format!(
            "{SIGNATURE_HEADER}\nreviewer: {}\ndigest: {}\nsignature: {}\n",
            self.name,
            digest.to_hex(),
            B64.encode(sig.to_bytes())
        )
    }

    /// Signs the current content of the bundle at `dir` and writes
    /// `dir/signatures/<name>.sig` atomically. Returns the digest signed.
    pub fn sign_dir(&self, dir: &Path) -> Result<BundleDigest, ReviewError> {
        let bundle = Bundle::read(dir).map_err(|e| ReviewError::Bundle(Box::new(e)))?;
        let digest = bundle.digest();
        let sig_dir = dir.join(crate::SIGNATURES_DIR);
        fs::create_dir_all(&sig_dir).map_err(|source| ReviewError::Io {
            path: sig_dir.clone(),
            source,
        })?;
        let path = sig_dir.join(format!("{}.sig", self.name));
        write_atomic(&path, self.signature_file(&digest).as_bytes(), 0o644)?;
        Ok(digest)
    }
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes a file with [`nitrile_fs::write_atomic`] (a unique temporary
/// file in the same directory created with `mode`, fsync, rename, fsync of
/// the directory).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ReviewError> {
    nitrile_fs::write_atomic(path, bytes, mode).map_err(|e| ReviewError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// Why a signature file did not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureProblem {
    /// the file is not a signature file of the expected format
    #[error("malformed signature file: {0}")]
    Malformed(&'static str),
    /// the file name is not `<reviewer>.sig` with a valid name
    #[error("file name is not <reviewer>.sig")]
    BadFileName,
    /// the reviewer named inside differs from the file name
    #[error("file names reviewer {file_name} but the signature says {inside}")]
    NameMismatch {
        /// From the file name.
        file_name: String,
        /// From the content.
        inside: String,
    },
    /// the reviewer is not in the reviewer set
    #[error("reviewer {0} is not in the reviewer set")]
    UnknownReviewer(String),
    /// the signature is over another digest (the bundle changed after signing)
    #[error("signed digest {signed} is not the current digest (the bundle changed after signing)")]
    StaleDigest {
        /// The digest in the file.
        signed: String,
    },
    /// the signature does not verify under the reviewer's key
    #[error("signature does not verify under the reviewer's key")]
    BadSignature,
    /// the reviewer's signature was already counted
    #[error("reviewer already counted")]
    Duplicate,
}

/// A signature that did not count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedSignature {
    /// Path of the signature file relative to the bundle.
    pub file: String,
    /// Why.
    pub problem: SignatureProblem,
}

impl fmt::Display for RejectedSignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.problem)
    }
}

/// A bundle whose current digest is signed by enough distinct reviewers. Only
/// [`verify_bundle`] makes one; [`crate::Entitlements::from_reviewed`] needs one.
#[derive(Debug, Clone)]
pub struct ReviewedBundle {
    bundle: Bundle,
    digest: BundleDigest,
    reviewers: Vec<Name>,
    rejected: Vec<RejectedSignature>,
}

impl ReviewedBundle {
    /// The bundle, as read and verified.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The digest the reviewers signed.
    pub fn digest(&self) -> BundleDigest {
        self.digest
    }

    /// The serial of the bundle, covered by the digest.
    pub fn serial(&self) -> crate::BundleSerial {
        self.bundle.serial()
    }

    /// The serial and digest together.
    pub fn version(&self) -> crate::BundleVersion {
        crate::BundleVersion {
            serial: self.bundle.serial(),
            digest: self.digest,
        }
    }

    /// Reviewers whose signatures are valid, in name order.
    pub fn reviewers(&self) -> &[Name] {
        &self.reviewers
    }

    /// Signature files that did not count (they do not prevent acceptance).
    pub fn rejected(&self) -> &[RejectedSignature] {
        &self.rejected
    }
}

/// Reads the bundle at `dir` and accepts it if at least
/// `max(min_reviewers, MIN_REVIEWERS)` distinct reviewers of `reviewers` signed
/// its current digest.
pub fn verify_bundle(
    dir: &Path,
    reviewers: &ReviewerSet,
    min_reviewers: usize,
) -> Result<ReviewedBundle, PolicyError> {
    let bundle = Bundle::read(dir)?;
    let digest = bundle.digest();
    let (valid, rejected) = count_signatures(&bundle.files, &digest, reviewers, min_reviewers)?;
    Ok(ReviewedBundle {
        bundle,
        digest,
        reviewers: valid,
        rejected,
    })
}

/// A bundle of the format before serials whose signatures verified: only
/// [`verify_unserialed_bundle`] makes one.
#[derive(Debug, Clone)]
pub struct ReviewedUnserialed {
    digest: BundleDigest,
    reviewers: Vec<Name>,
}

impl ReviewedUnserialed {
    /// The digest its reviewers signed.
    pub fn digest(&self) -> BundleDigest {
        self.digest
    }

    /// Reviewers whose signatures are valid, in name order.
    pub fn reviewers(&self) -> &[Name] {
        &self.reviewers
    }
}

/// Checks the signatures of a bundle written before bundles had a serial
/// (no `bundle.toml`), as [`verify_bundle`] does, for a migration only:
/// such a bundle is never loaded ([`Bundle::read`] refuses it). A migration
/// that finds it reviewed adds `bundle.toml` and has the result signed again.
pub fn verify_unserialed_bundle(
    dir: &Path,
    reviewers: &ReviewerSet,
) -> Result<ReviewedUnserialed, PolicyError> {
    let files = crate::bundle::read_files(dir)?;
    let digest = crate::bundle::digest_files(&files);
    let (valid, _) = count_signatures(&files, &digest, reviewers, MIN_REVIEWERS)?;
    Ok(ReviewedUnserialed {
        digest,
        reviewers: valid,
    })
}

/// The distinct reviewers whose signature files among `files` are valid for
/// `digest`, and the signatures that did not count; an error when fewer
/// than `max(min_reviewers, MIN_REVIEWERS)`.
fn count_signatures(
    files: &BTreeMap<String, crate::bundle::BundleFile>,
    digest: &BundleDigest,
    reviewers: &ReviewerSet,
    min_reviewers: usize,
) -> Result<(Vec<Name>, Vec<RejectedSignature>), PolicyError> {
    let message = signed_message(digest);
    let mut valid: Vec<Name> = Vec::new();
    let mut rejected = Vec::new();
    for (path, file) in crate::bundle::files_of(files, FileRole::Signature) {
        match check_signature(path, &file.bytes, reviewers, digest, &message) {
            Ok(name) if valid.contains(&name) => rejected.push(RejectedSignature {
                file: path.clone(),
                problem: SignatureProblem::Duplicate,
            }),
            Ok(name) => valid.push(name),
            Err(problem) => rejected.push(RejectedSignature {
                file: path.clone(),
                problem,
            }),
        }
    }
    valid.sort();
    let required = min_reviewers.max(MIN_REVIEWERS);
    if valid.len() < required {
        return Err(PolicyError::NotEnoughReviewers {
            digest: *digest,
            valid,
            required,
            rejected,
        });
    }
    Ok((valid, rejected))
}

fn check_signature(
    path: &str,
    bytes: &[u8],
    reviewers: &ReviewerSet,
    digest: &BundleDigest,
    message: &[u8],
) -> Result<Name, SignatureProblem> {
    let file_name = path
        .strip_prefix("signatures/")
        .and_then(|n| n.strip_suffix(".sig"))
        .and_then(|n| Name::new(n).ok())
        .ok_or(SignatureProblem::BadFileName)?;
    if bytes.len() > MAX_SIGNATURE_FILE_SIZE {
        return Err(SignatureProblem::Malformed("too large"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| SignatureProblem::Malformed("not UTF-8"))?;
    let body = text
        .strip_suffix('\n')
        .ok_or(SignatureProblem::Malformed("no final newline"))?;
    let lines: Vec<&str> = body.split('\n').collect();
    let [header, reviewer, signed_digest, signature] = lines.as_slice() else {
        return Err(SignatureProblem::Malformed("expected 4 lines"));
    };
    if *header != SIGNATURE_HEADER {
        return Err(SignatureProblem::Malformed("unknown header"));
    }
    let field = |line: &'static str, value: &str| -> Result<String, SignatureProblem> {
        value
            .strip_prefix(line)
            .map(str::to_owned)
            .ok_or(SignatureProblem::Malformed(
                "fields must be reviewer, digest, signature",
            ))
    };
    let inside = field("reviewer: ", reviewer)?;
    let signed_digest = field("digest: ", signed_digest)?;
    let signature = field("signature: ", signature)?;
    if inside != file_name.as_str() {
        return Err(SignatureProblem::NameMismatch {
            file_name: file_name.to_string(),
            inside: inside.chars().take(80).collect(),
        });
    }
    let key = reviewers
        .key(&file_name)
        .ok_or_else(|| SignatureProblem::UnknownReviewer(file_name.to_string()))?;
    let signed = BundleDigest::from_hex(&signed_digest)
        .ok_or(SignatureProblem::Malformed("digest is not 64 hex digits"))?;
    if signed != *digest {
        return Err(SignatureProblem::StaleDigest {
            signed: signed.to_hex(),
        });
    }
    let sig_bytes: [u8; 64] = B64
        .decode(signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(SignatureProblem::Malformed(
            "signature is not base64 of 64 bytes",
        ))?;
    key.verify_strict(message, &Signature::from_bytes(&sig_bytes))
        .map_err(|_| SignatureProblem::BadSignature)?;
    Ok(file_name)
}
