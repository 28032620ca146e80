//! Writing an environment's TUF repository: `init` (the root, signed by
//! the root keys), `stage` (a bundle's files as targets and the next
//! targets metadata, unsigned), `sign` (one release signer adds a
//! signature to the staged targets), `publish` (with at least the
//! threshold of signer signatures: the targets metadata, then snapshot and
//! timestamp signed by the online key; without anything staged it only
//! renews snapshot and timestamp).
//!
//! Every metadata object is a `tough` schema type; what is signed is its
//! canonical JSON as `tough` computes it, so `tough`'s client (and
//! python-tuf, in the tests) check exactly these bytes.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tough::TargetName;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::key::Key;
use tough::schema::{
    Hashes, Metafile, Role, RoleKeys, RoleType, Root, Signature, Signed, Snapshot, Target, Targets,
    Timestamp,
};

use crate::keys::{ReleaseKey, decoded_id, key_id};
use crate::manifest::{ATTESTATION_FILE, MANIFEST_FILE, read_bundle};
use crate::{Environment, ReleaseError, ReleaseManifest, SPEC_VERSION, Version};

const CONFIG_FILE: &str = "repository.json";
const STAGED: &str = "staged/targets.json";
/// Largest metadata file read.
pub const MAX_METADATA_LEN: u64 = 10 * 1024 * 1024;

/// The repository's own settings (not metadata: clients never read it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// The environment whose releases it holds.
    pub environment: Environment,
    /// How long a targets metadata version is valid, in days.
    pub targets_expiry_days: u32,
    /// How long a snapshot is valid, in days.
    pub snapshot_expiry_days: u32,
    /// How long a timestamp is valid, in hours (the online key renews it).
    pub timestamp_expiry_hours: u32,
}

/// What `init` makes the root of.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The environment.
    pub environment: Environment,
    /// The root role's keys.
    pub root_keys: Vec<Key>,
    /// How many of them sign a root.
    pub root_threshold: u64,
    /// The release signers (the targets role).
    pub signers: Vec<Key>,
    /// How many signers a release needs (k).
    pub threshold: u64,
    /// The online key (snapshot and timestamp).
    pub online: Key,
    /// How long the root is valid, in days.
    pub root_expiry_days: u32,
}

/// The repository directory.
#[derive(Debug, Clone)]
pub struct Repo {
    dir: PathBuf,
    config: RepoConfig,
}

fn nz(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n.max(1)).unwrap_or(NonZeroU64::MIN)
}

fn jiff_at(now: time::OffsetDateTime, plus_secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(now.unix_timestamp().saturating_add(plus_secs))
        .unwrap_or(jiff::Timestamp::MAX)
}

/// Signs a role's canonical form with `key`.
fn signature<T: Role>(role: &T, key: &ReleaseKey) -> Result<Signature, ReleaseError> {
    let canonical = role
        .canonical_form()
        .map_err(|e| ReleaseError::malformed("metadata", e))?;
    Ok(Signature {
        keyid: decoded_id(&key.key_id()),
        sig: Decoded::from(key.sign(&canonical)),
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ReleaseError> {
    let mut bytes =
        serde_json::to_vec_pretty(value).map_err(|e| ReleaseError::malformed("metadata", e))?;
    bytes.push(b'\n');
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(ReleaseError::io("create", parent))?;
    }
    nitrile_fs::write_atomic(path, &bytes, 0o644)?;
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ReleaseError> {
    let bytes = nitrile_fs::read_bounded(path, MAX_METADATA_LEN)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ReleaseError::malformed(path.display().to_string(), e))
}

/// Makes a repository in `dir` (refused if it has one): the first root
/// signed by `signing` (at least `root_threshold` of the root keys) and the
/// settings; no release yet.
pub fn init(
    dir: &Path,
    options: &InitOptions,
    signing: &[ReleaseKey],
    now: time::OffsetDateTime,
) -> Result<Repo, ReleaseError> {
    if dir.join(CONFIG_FILE).exists() {
        return Err(ReleaseError::BadBundle {
            path: dir.to_owned(),
            reason: "already a repository".to_owned(),
        });
    }
    let bad = |reason: String| ReleaseError::BadBundle {
        path: dir.to_owned(),
        reason,
    };
    if options.threshold < 1 || options.threshold > options.signers.len() as u64 {
        return Err(bad(format!(
            "the signer threshold {} must be 1 to the {} signers",
            options.threshold,
            options.signers.len()
        )));
    }
    if options.root_threshold < 1 || options.root_threshold > options.root_keys.len() as u64 {
        return Err(bad(
            "the root threshold must be 1 to the root keys".to_owned()
        ));
    }
    let mut keys = HashMap::new();
    let ids = |ks: &[Key], keys: &mut HashMap<Decoded<Hex>, Key>| -> Vec<Decoded<Hex>> {
        let mut out: Vec<Decoded<Hex>> = Vec::new();
        for k in ks {
            let id = decoded_id(&key_id(k));
            if !out.contains(&id) {
                out.push(id.clone());
            }
            keys.insert(id, k.clone());
        }
        out
    };
    let root_ids = ids(&options.root_keys, &mut keys);
    let signer_ids = ids(&options.signers, &mut keys);
    if signer_ids.len() != options.signers.len() || root_ids.len() != options.root_keys.len() {
        return Err(bad("a key is listed twice".to_owned()));
    }
    let online_ids = ids(std::slice::from_ref(&options.online), &mut keys);
    let role = |keyids: Vec<Decoded<Hex>>, threshold: u64| RoleKeys {
        keyids,
        threshold: nz(threshold),
        _extra: HashMap::new(),
    };
    let root = Root {
        spec_version: SPEC_VERSION.to_owned(),
        consistent_snapshot: true,
        version: nz(1),
        expires: jiff_at(now, i64::from(options.root_expiry_days) * 86_400),
        keys,
        roles: HashMap::from([
            (
                RoleType::Root,
                role(root_ids.clone(), options.root_threshold),
            ),
            (RoleType::Targets, role(signer_ids, options.threshold)),
            (RoleType::Snapshot, role(online_ids.clone(), 1)),
            (RoleType::Timestamp, role(online_ids, 1)),
        ]),
        _extra: HashMap::new(),
    };
    let mut signed = Signed {
        signed: root,
        signatures: Vec::new(),
    };
    for k in signing {
        let id = decoded_id(&k.key_id());
        if !root_ids.contains(&id) {
            return Err(ReleaseError::NotARoleKey {
                key_id: k.key_id(),
                role: "root",
            });
        }
        signed.signatures.push(signature(&signed.signed, k)?);
    }
    signed.signed.verify_role(&signed).map_err(|e| match e {
        tough::schema::Error::SignatureThreshold {
            threshold, valid, ..
        } => ReleaseError::Threshold { valid, threshold },
        e => ReleaseError::Tuf(e.to_string()),
    })?;
    std::fs::create_dir_all(dir.join("metadata")).map_err(ReleaseError::io("create", dir))?;
    std::fs::create_dir_all(dir.join("targets")).map_err(ReleaseError::io("create", dir))?;
    write_json(&dir.join("metadata/1.root.json"), &signed)?;
    write_json(&dir.join("metadata/root.json"), &signed)?;
    let config = RepoConfig {
        environment: options.environment.clone(),
        targets_expiry_days: 90,
        snapshot_expiry_days: 7,
        timestamp_expiry_hours: 24,
    };
    write_json(&dir.join(CONFIG_FILE), &config)?;
    Ok(Repo {
        dir: dir.to_owned(),
        config,
    })
}

impl Repo {
    /// Opens the repository in `dir`.
    pub fn open(dir: &Path) -> Result<Self, ReleaseError> {
        let config = read_json(&dir.join(CONFIG_FILE))?;
        Ok(Self {
            dir: dir.to_owned(),
            config,
        })
    }

    /// Its settings.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The newest root.
    pub fn root(&self) -> Result<Signed<Root>, ReleaseError> {
        read_json(&self.dir.join("metadata/root.json"))
    }

    /// The newest published version of a role's numbered metadata file
    /// (`<n>.<role>.json`), if any.
    fn newest(&self, role: &str) -> Result<Option<u64>, ReleaseError> {
        let dir = self.dir.join("metadata");
        let mut best = None;
        for e in std::fs::read_dir(&dir).map_err(ReleaseError::io("read", &dir))? {
            let e = e.map_err(ReleaseError::io("read", &dir))?;
            let name = e.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_suffix(&format!(".{role}.json")))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            best = best.max(Some(n));
        }
        Ok(best)
    }

    /// The newest published targets metadata, if any.
    pub fn targets(&self) -> Result<Option<Signed<Targets>>, ReleaseError> {
        match self.newest("targets")? {
            None => Ok(None),
            Some(n) => read_json(&self.dir.join(format!("metadata/{n}.targets.json"))).map(Some),
        }
    }

    /// The versions released (published), sorted.
    pub fn releases(&self) -> Result<Vec<Version>, ReleaseError> {
        let mut out: Vec<Version> = self
            .targets()?
            .map(|t| releases_of(&t.signed))
            .unwrap_or_default();
        out.sort();
        Ok(out)
    }

    /// The staged targets metadata, if any.
    pub fn staged(&self) -> Result<Option<Signed<Targets>>, ReleaseError> {
        let path = self.dir.join(STAGED);
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }

    /// Stages the bundle in `bundle`: its files (checked against its
    /// manifest, which must be for this repository's environment) become
    /// targets `<version>/<file>`, beside every release published before,
    /// in the next targets metadata, unsigned. With `require_attestation`
    /// a bundle without one is refused.
    pub fn stage(
        &self,
        bundle: &Path,
        require_attestation: bool,
        now: time::OffsetDateTime,
    ) -> Result<ReleaseManifest, ReleaseError> {
        let manifest = read_bundle(bundle)?;
        if manifest.environment != self.config.environment {
            return Err(ReleaseError::WrongEnvironment {
                version: manifest.version,
                release: manifest.environment.clone(),
                here: self.config.environment.clone(),
            });
        }
        let attestation = bundle.join(ATTESTATION_FILE);
        if require_attestation && !attestation.exists() {
            return Err(ReleaseError::Attestation {
                version: manifest.version,
                reason: format!(
                    "the bundle has no {ATTESTATION_FILE} (run `nitrile release attest`)"
                ),
            });
        }
        let published = self.targets()?;
        let (mut targets, next) = match (&published, self.staged()?) {
            (_, Some(staged)) => (staged.signed.clone(), staged.signed.version.get()),
            (Some(p), None) => (p.signed.clone(), p.signed.version.get() + 1),
            (None, None) => (
                Targets::new(SPEC_VERSION.to_owned(), nz(1), jiff_at(now, 0)),
                1,
            ),
        };
        if releases_of(&targets).contains(&manifest.version) {
            return Err(ReleaseError::Exists(manifest.version));
        }
        let mut files: Vec<String> = manifest.files.keys().cloned().collect();
        files.push(MANIFEST_FILE.to_owned());
        if attestation.exists() {
            files.push(ATTESTATION_FILE.to_owned());
        }
        for file in files {
            let src = bundle.join(&file);
            let digest = crate::manifest::digest_file(&src)?;
            let name = target_name(manifest.version, &file);
            let dst = self
                .dir
                .join("targets")
                .join(format!("{}.{name}", digest.sha256));
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent).map_err(ReleaseError::io("create", parent))?;
            }
            std::fs::copy(&src, &dst).map_err(ReleaseError::io("copy", &src))?;
            let name =
                TargetName::new(name).map_err(|e| ReleaseError::malformed("a target name", e))?;
            targets.targets.insert(
                name,
                Target {
                    length: digest.length,
                    hashes: Hashes {
                        sha256: Decoded::from(hex::decode(&digest.sha256).unwrap_or_default()),
                        _extra: HashMap::new(),
                    },
                    custom: HashMap::new(),
                    _extra: HashMap::new(),
                },
            );
        }
        targets.version = nz(next);
        targets.expires = jiff_at(now, i64::from(self.config.targets_expiry_days) * 86_400);
        write_json(
            &self.dir.join(STAGED),
            &Signed {
                signed: targets,
                signatures: Vec::new(),
            },
        )?;
        Ok(manifest)
    }

    /// Adds `key`'s signature to the staged targets metadata (replacing an
    /// earlier one of the same key); refused unless `key` is one of the
    /// root's release signers. Returns how many valid signer signatures it
    /// has and the threshold.
    pub fn sign(&self, key: &ReleaseKey) -> Result<(u64, u64), ReleaseError> {
        let mut staged = self
            .staged()?
            .ok_or_else(|| ReleaseError::NothingStaged(self.dir.clone()))?;
        let root = self.root()?.signed;
        let role = root
            .roles
            .get(&RoleType::Targets)
            .ok_or_else(|| ReleaseError::Tuf("the root has no targets role".to_owned()))?;
        let id = decoded_id(&key.key_id());
        if !role.keyids.contains(&id) {
            return Err(ReleaseError::NotARoleKey {
                key_id: key.key_id(),
                role: "release signer",
            });
        }
        staged.signatures.retain(|s| s.keyid != id);
        staged.signatures.push(signature(&staged.signed, key)?);
        write_json(&self.dir.join(STAGED), &staged)?;
        Ok((count_valid(&root, &staged), role.threshold.get()))
    }

    /// Publishes: the staged targets metadata if there is one (refused
    /// below the signer threshold), then a new snapshot and timestamp
    /// signed by `online` (the timestamp expiring at `timestamp_expires`,
    /// or after the configured hours).
    pub fn publish(
        &self,
        online: &ReleaseKey,
        now: time::OffsetDateTime,
        timestamp_expires: Option<time::OffsetDateTime>,
    ) -> Result<Option<u64>, ReleaseError> {
        let root = self.root()?.signed;
        for (role, name) in [
            (RoleType::Snapshot, "snapshot"),
            (RoleType::Timestamp, "timestamp"),
        ] {
            let ok = root
                .roles
                .get(&role)
                .is_some_and(|r| r.keyids.contains(&decoded_id(&online.key_id())));
            if !ok {
                return Err(ReleaseError::NotARoleKey {
                    key_id: online.key_id(),
                    role: name,
                });
            }
        }
        let mut published = None;
        if let Some(staged) = self.staged()? {
            root.verify_role(&staged).map_err(|e| match e {
                tough::schema::Error::SignatureThreshold {
                    threshold, valid, ..
                } => ReleaseError::Threshold { valid, threshold },
                e => ReleaseError::Tuf(e.to_string()),
            })?;
            let n = staged.signed.version.get();
            write_json(
                &self.dir.join(format!("metadata/{n}.targets.json")),
                &staged,
            )?;
            std::fs::remove_file(self.dir.join(STAGED))
                .map_err(ReleaseError::io("remove", &self.dir.join(STAGED)))?;
            published = Some(n);
        }
        let Some(targets_version) = self.newest("targets")? else {
            return Err(ReleaseError::NothingStaged(self.dir.clone()));
        };
        let snapshot_version = self.newest("snapshot")?.unwrap_or(0) + 1;
        let mut snapshot = Snapshot::new(
            SPEC_VERSION.to_owned(),
            nz(snapshot_version),
            jiff_at(now, i64::from(self.config.snapshot_expiry_days) * 86_400),
        );
        snapshot.meta.insert(
            "targets.json".to_owned(),
            Metafile {
                length: None,
                hashes: None,
                version: nz(targets_version),
                _extra: HashMap::new(),
            },
        );
        let snapshot = Signed {
            signatures: vec![signature(&snapshot, online)?],
            signed: snapshot,
        };
        let snapshot_path = self
            .dir
            .join(format!("metadata/{snapshot_version}.snapshot.json"));
        write_json(&snapshot_path, &snapshot)?;
        let written = crate::manifest::digest_file(&snapshot_path)?;
        let previous: Option<Signed<Timestamp>> = {
            let p = self.dir.join("metadata/timestamp.json");
            if p.exists() {
                Some(read_json(&p)?)
            } else {
                None
            }
        };
        let expires = match timestamp_expires {
            Some(t) => jiff_at(t, 0),
            None => jiff_at(now, i64::from(self.config.timestamp_expiry_hours) * 3600),
        };
        let mut timestamp = Timestamp::new(
            SPEC_VERSION.to_owned(),
            nz(previous.map_or(0, |p| p.signed.version.get()) + 1),
            expires,
        );
        timestamp.meta.insert(
            "snapshot.json".to_owned(),
            Metafile {
                length: Some(written.length),
                hashes: Some(Hashes {
                    sha256: Decoded::from(hex::decode(&written.sha256).unwrap_or_default()),
                    _extra: HashMap::new(),
                }),
                version: nz(snapshot_version),
                _extra: HashMap::new(),
            },
        );
        let timestamp = Signed {
            signatures: vec![signature(&timestamp, online)?],
            signed: timestamp,
        };
        write_json(&self.dir.join("metadata/timestamp.json"), &timestamp)?;
        Ok(published)
    }
}

/// Valid signatures of the targets role in `targets` under `root`.
fn count_valid(root: &Root, targets: &Signed<Targets>) -> u64 {
    match root.verify_role(targets) {
        Ok(()) => root
            .roles
            .get(&RoleType::Targets)
            .map_or(0, |r| r.threshold.get()),
        Err(tough::schema::Error::SignatureThreshold { valid, .. }) => valid,
        Err(_) => 0,
    }
}

/// The target name of `file` of release `version`: `v<version>-<file>`
/// (flat: TUF clients differ in where they put a consistent snapshot's
/// hash in a name with directories).
pub fn target_name(version: Version, file: &str) -> String {
    format!("v{version}-{file}")
}

/// The release versions a targets metadata lists (by their manifests).
pub fn releases_of(targets: &Targets) -> Vec<Version> {
    let mut out: Vec<Version> = targets
        .targets
        .keys()
        .filter_map(|name| {
            let (v, file) = name.raw().strip_prefix('v')?.split_once('-')?;
            (file == MANIFEST_FILE).then(|| v.parse().ok()).flatten()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}
