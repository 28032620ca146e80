//! What a host does before it runs a release: `tough`'s TUF client loads
//! the environment's repository from the pinned root (the root chain,
//! signatures and thresholds, expiry, and versions against the metadata it
//! kept from earlier loads in its datastore), then [`fetch_release`]
//! checks the release's manifest (version and environment), the test
//! attestation (the pinned CI key, a passing result on exactly these
//! files), and writes every file, each read through `tough` (length and
//! hash of the targets metadata) and checked against the manifest.
//!
//! The same checks in parts, for a reader of one file: [`verify_manifest`]
//! (everything but reading the files' bytes) gives a [`VerifiedRelease`],
//! and [`read_file`] reads one of its files through `tough`.
//! [`newest_host_references`] is what a key service uses: the host
//! references of the newest releases that verify.

use std::path::Path;

use ed25519_dalek::VerifyingKey;
use tough::schema::Targets;
use tough::{ExpirationEnforcement, RepositoryLoader, TargetName};

use crate::manifest::{ATTESTATION_FILE, MANIFEST_FILE, MAX_MANIFEST_LEN};
use crate::references::{HOST_REFERENCES_FILE, HostReferences, MAX_HOST_REFERENCES_LEN};
use crate::{Environment, FileDigest, ReleaseError, ReleaseManifest, Version};

/// What a host pins at provisioning: its environment's root metadata and
/// the CI key whose attestation a release needs.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The environment the host runs in.
    pub environment: Environment,
    /// The environment's `root.json`.
    pub root: Vec<u8>,
    /// The CI key.
    pub ci_key: VerifyingKey,
}

impl Trust {
    /// The trust pinned in files: `root` (the environment's `root.json`)
    /// and `ci_key` (the CI key's TUF key JSON), for `environment`.
    pub fn load(
        environment: Environment,
        root: &Path,
        ci_key: &Path,
    ) -> Result<Self, ReleaseError> {
        let root = nitrile_fs::read_bounded(root, crate::repo::MAX_METADATA_LEN)?;
        let key = crate::keys::load_public(ci_key)?;
        let ci_key = crate::keys::ed25519_of(&key).map_err(|reason| ReleaseError::BadKey {
            path: ci_key.to_owned(),
            reason,
        })?;
        Ok(Self {
            environment,
            root,
            ci_key,
        })
    }
}

/// A release whose manifest passed [`verify_manifest`]: listed in the
/// signed targets, for this environment, attested by the pinned CI key, and
/// each of its files the one its signed targets entry names. Only this
/// crate makes one.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VerifiedRelease {
    /// Its manifest.
    pub manifest: ReleaseManifest,
}

fn file_url(dir: &Path) -> Result<url::Url, ReleaseError> {
    let abs = std::fs::canonicalize(dir).map_err(ReleaseError::io("open", dir))?;
    let mut url = url::Url::from_directory_path(&abs)
        .map_err(|()| ReleaseError::Tuf(format!("{} is not a directory path", abs.display())))?;
    if !url.path().ends_with('/') {
        url.set_path(&format!("{}/", url.path()));
    }
    Ok(url)
}

/// Loads the repository at `repo` (a directory: `metadata/`, `targets/`)
/// with `tough`, trusting `trust.root`, keeping the metadata it accepted in
/// `datastore` (which must persist: it is what refuses rolled-back
/// metadata next time).
pub async fn load(
    repo: &Path,
    trust: &Trust,
    datastore: &Path,
) -> Result<tough::Repository, ReleaseError> {
    std::fs::create_dir_all(datastore).map_err(ReleaseError::io("create", datastore))?;
    RepositoryLoader::new(
        &trust.root,
        file_url(&repo.join("metadata"))?,
        file_url(&repo.join("targets"))?,
    )
    .transport(crate::transport::ChunkedFileTransport)
    .datastore(datastore.to_owned())
    .expiration_enforcement(ExpirationEnforcement::Safe)
    .load()
    .await
    .map_err(|e| ReleaseError::Tuf(chain(&e)))
}

/// The error and its causes, one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The versions a loaded repository lists.
pub fn releases(repo: &tough::Repository) -> Vec<Version> {
    crate::repo::releases_of(&repo.targets().signed)
}

async fn read(
    repo: &tough::Repository,
    version: Version,
    file: &str,
) -> Result<Option<Vec<u8>>, ReleaseError> {
    read_sized(repo, version, file, 0).await
}

/// [`read`] into a buffer of `capacity` bytes to start with (the signed
/// length of a large file: no copies as it grows).
async fn read_sized(
    repo: &tough::Repository,
    version: Version,
    file: &str,
    capacity: usize,
) -> Result<Option<Vec<u8>>, ReleaseError> {
    use futures_util::TryStreamExt as _;
    let name = TargetName::new(crate::repo::target_name(version, file))
        .map_err(|e| ReleaseError::malformed("a target name", e))?;
    let Some(stream) = repo
        .read_target(&name)
        .await
        .map_err(|e| ReleaseError::Tuf(chain(&e)))?
    else {
        return Ok(None);
    };
    stream
        .try_fold(Vec::with_capacity(capacity), |mut acc, bytes| {
            acc.extend_from_slice(&bytes);
            std::future::ready(Ok(acc))
        })
        .await
        .map(Some)
        .map_err(|e| ReleaseError::Tuf(chain(&e)))
}

/// Checks release `version` of `repo` for `trust`'s environment and writes
/// its files into `out` (a directory made for it, mode 0700; the files
/// 0600, the caller makes the binary executable): [`verify_release`], then
/// each file written durably.
pub async fn fetch_release(
    repo: &tough::Repository,
    trust: &Trust,
    version: Version,
    out: &Path,
) -> Result<VerifiedRelease, ReleaseError> {
    let (verified, files) = verify_release(repo, trust, version).await?;
    std::fs::create_dir_all(out).map_err(ReleaseError::io("create", out))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700))
            .map_err(ReleaseError::io("chmod", out))?;
    }
    for (name, bytes) in &files {
        nitrile_fs::write_atomic(&out.join(name), bytes, 0o600)?;
    }
    Ok(verified)
}

/// Checks release `version` of `repo` for `trust`'s environment and
/// returns its files, in memory: [`verify_manifest`], then [`read_file`]
/// of each file.
pub async fn verify_release(
    repo: &tough::Repository,
    trust: &Trust,
    version: Version,
) -> Result<(VerifiedRelease, Vec<(String, Vec<u8>)>), ReleaseError> {
    let verified = verify_manifest(repo, trust, version).await?;
    let mut files = Vec::with_capacity(verified.manifest.files.len());
    for name in verified.manifest.files.keys() {
        files.push((name.clone(), read_file(repo, &verified, name).await?));
    }
    Ok((verified, files))
}

/// Checks release `version` of `repo` for `trust`'s environment, without
/// reading its files: the manifest's version and environment, the
/// attestation under the CI key, and that each file's signed targets entry
/// (length and SHA-256) is the manifest's digest of it, so that a file
/// read through `tough` ([`read_file`]) is the manifest's without hashing
/// it again.
pub async fn verify_manifest(
    repo: &tough::Repository,
    trust: &Trust,
    version: Version,
) -> Result<VerifiedRelease, ReleaseError> {
    let targets: &Targets = &repo.targets().signed;
    if !crate::repo::releases_of(targets).contains(&version) {
        return Err(ReleaseError::NoSuchRelease(version));
    }
    let manifest_bytes = read(repo, version, MANIFEST_FILE)
        .await?
        .ok_or(ReleaseError::NoSuchRelease(version))?;
    if manifest_bytes.len() as u64 > MAX_MANIFEST_LEN {
        return Err(ReleaseError::malformed("the manifest", "too large"));
    }
    let manifest = ReleaseManifest::parse(&manifest_bytes)?;
    if manifest.version != version {
        return Err(ReleaseError::WrongVersion {
            asked: version,
            stated: manifest.version,
        });
    }
    if manifest.environment != trust.environment {
        return Err(ReleaseError::WrongEnvironment {
            version,
            release: manifest.environment.clone(),
            here: trust.environment.clone(),
        });
    }
    let Some(attestation) = read(repo, version, ATTESTATION_FILE).await? else {
        return Err(ReleaseError::Attestation {
            version,
            reason: "the release has no test attestation".to_owned(),
        });
    };
    crate::attest::verify(&attestation, &trust.ci_key, &manifest)?;
    for (name, want) in &manifest.files {
        signed_as(targets, version, name, want)?;
    }
    Ok(VerifiedRelease { manifest })
}

/// Checks that `name` of release `version` has a signed targets entry and
/// that it is `want` (length and SHA-256).
fn signed_as(
    targets: &Targets,
    version: Version,
    name: &str,
    want: &FileDigest,
) -> Result<(), ReleaseError> {
    let mismatch = || ReleaseError::FileMismatch {
        version,
        file: name.to_owned(),
    };
    let target_name = TargetName::new(crate::repo::target_name(version, name))
        .map_err(|e| ReleaseError::malformed("a target name", e))?;
    let signed = targets.targets.get(&target_name).ok_or_else(mismatch)?;
    if hex::encode(&*signed.hashes.sha256) != want.sha256 || signed.length != want.length {
        return Err(mismatch());
    }
    Ok(())
}

/// Reads file `name` of a verified release through `tough`, which checks
/// its length and SHA-256 against the signed targets entry of `repo`; that
/// entry must be the manifest's digest of the file.
pub async fn read_file(
    repo: &tough::Repository,
    release: &VerifiedRelease,
    name: &str,
) -> Result<Vec<u8>, ReleaseError> {
    let version = release.manifest.version;
    let want = release
        .manifest
        .files
        .get(name)
        .ok_or_else(|| ReleaseError::NoSuchFile {
            version,
            file: name.chars().take(64).collect(),
        })?;
    signed_as(&repo.targets().signed, version, name, want)?;
    let mismatch = || ReleaseError::FileMismatch {
        version,
        file: name.to_owned(),
    };
    // At most the signed length is ever read (tough stops beyond it).
    let capacity = usize::try_from(want.length).unwrap_or(0);
    let bytes = read_sized(repo, version, name, capacity)
        .await?
        .ok_or_else(mismatch)?;
    if bytes.len() as u64 != want.length {
        return Err(mismatch());
    }
    Ok(bytes)
}

/// The host references of a verified release ([`HOST_REFERENCES_FILE`],
/// read through `tough` and parsed strictly); [`ReleaseError::NoSuchFile`]
/// when it carries none.
pub async fn host_references(
    repo: &tough::Repository,
    release: &VerifiedRelease,
) -> Result<HostReferences, ReleaseError> {
    let version = release.manifest.version;
    let Some(want) = release.manifest.files.get(HOST_REFERENCES_FILE) else {
        return Err(ReleaseError::NoSuchFile {
            version,
            file: HOST_REFERENCES_FILE.to_owned(),
        });
    };
    if want.length > MAX_HOST_REFERENCES_LEN {
        return Err(ReleaseError::malformed(
            "the host references",
            format!("larger than {MAX_HOST_REFERENCES_LEN} bytes"),
        ));
    }
    HostReferences::parse(&read_file(repo, release, HOST_REFERENCES_FILE).await?)
}

/// What [`newest_host_references`] found.
#[derive(Debug, Default)]
pub struct NewestHostReferences {
    /// The host references of the newest releases that verify and carry
    /// them, newest first.
    pub releases: Vec<(Version, HostReferences)>,
    /// Newer releases passed over for what was signed (another
    /// environment, no or another attestation, no host references, ...),
    /// and why, newest first.
    pub passed_over: Vec<(Version, ReleaseError)>,
    /// Releases among the newest whose files in the repository are not the
    /// signed ones (changed, missing, unreadable), and why, newest first.
    /// Each keeps its place among the newest: damaging a release's files
    /// never brings an older release's values back.
    pub damaged: Vec<(Version, ReleaseError)>,
}

/// The host references of the newest `count` releases of `repo` that pass
/// [`verify_manifest`] for `trust` and carry host references that read
/// ([`host_references`]). A release refused for what was signed is passed
/// over for an older one; a release whose files in the repository are not
/// the signed ones counts among the `count` without being believed.
pub async fn newest_host_references(
    repo: &tough::Repository,
    trust: &Trust,
    count: usize,
) -> NewestHostReferences {
    let mut found = NewestHostReferences::default();
    for version in releases(repo).into_iter().rev() {
        if found.releases.len() + found.damaged.len() >= count {
            break;
        }
        let read = match verify_manifest(repo, trust, version).await {
            Ok(verified) => host_references(repo, &verified).await,
            Err(e) => Err(e),
        };
        match read {
            Ok(references) => found.releases.push((version, references)),
            Err(e) if is_damage(&e) => found.damaged.push((version, e)),
            Err(e) => found.passed_over.push((version, e)),
        }
    }
    found
}

/// Whether `e` is about the repository's bytes rather than what was
/// signed: tough refused a file (its length or hash not the signed one, or
/// missing), or reading failed.
fn is_damage(e: &ReleaseError) -> bool {
    matches!(
        e,
        ReleaseError::Tuf(_) | ReleaseError::Io { .. } | ReleaseError::Fs(_)
    )
}
