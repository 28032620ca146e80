//! `nitrile release`: the offline tool of release signers and of the
//! project's CI: keys, bundles, the test attestation, and an environment's
//! TUF repository (init, stage, sign, publish), and the check a host makes
//! before it runs a release (`verify`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use nitrile_release::keys::{self, ReleaseKey};
use nitrile_release::repo::{InitOptions, Repo};
use nitrile_release::{Environment, Version, attest, client, manifest};

use crate::Global;
use crate::output::{Output, print_json, print_pairs};
use crate::service::block_on;

/// The files of a release, by the name each has in it.
const BINARY: &str = "nitrile";

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Make a release key (Ed25519): FILE (PKCS#8 PEM, mode 0600) and
    /// FILE.pub.json (its public half, a TUF key object). For release
    /// signers, an environment's root and online keys, and the CI key.
    ///
    /// Example: `nitrile release keygen --out ~/.nitrile/signer-rita.key`
    Keygen {
        /// The private key file to write (refused if it exists).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Make an environment's TUF repository: its root (version 1) names
    /// the root keys, the release signers and how many of them a release
    /// needs (k, at least 2 unless --threshold says otherwise), and the
    /// online key that signs snapshots and timestamps; signed here by the
    /// root keys given with --sign-with. Hosts of the environment pin its
    /// metadata/root.json at provisioning.
    ///
    /// Example: `nitrile release init --repo repo-prod --env prod --root-key r1.key.pub.json --root-key r2.key.pub.json --signer s1.key.pub.json --signer s2.key.pub.json --signer s3.key.pub.json --online-key online.key.pub.json --sign-with r1.key --sign-with r2.key`
    Init {
        /// The repository directory.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The environment (dev, staging, prod, ...).
        #[arg(long)]
        env: Environment,
        /// A root key (public); repeatable.
        #[arg(long = "root-key", value_name = "FILE", required = true)]
        root_keys: Vec<PathBuf>,
        /// How many root keys sign a root.
        #[arg(long, default_value_t = 1)]
        root_threshold: u64,
        /// A release signer's key (public); repeatable.
        #[arg(long = "signer", value_name = "FILE", required = true)]
        signers: Vec<PathBuf>,
        /// How many signers a release needs.
        #[arg(long, default_value_t = 2)]
        threshold: u64,
        /// The online key (public) that signs snapshots and timestamps.
        #[arg(long, value_name = "FILE")]
        online_key: PathBuf,
        /// A root private key that signs the root; repeatable.
        #[arg(long = "sign-with", value_name = "FILE", required = true)]
        sign_with: Vec<PathBuf>,
        /// How long the root is valid, in days.
        #[arg(long, default_value_t = 365)]
        root_expiry_days: u32,
    },
    /// Build a release bundle in a new directory: the `nitrile` binary,
    /// the guest image and the entitlement schema, and manifest.json (the
    /// version, the one environment it is for, each file's SHA-256). With
    /// --host-reference, host-references.json too: the PCR values each
    /// named host shows when it runs the release, which a key service
    /// pinned to the repository (`[attestation] release` of its config)
    /// requires before it releases a volume key to that host.
    ///
    /// Example: `nitrile release build 1.4.0 --env prod --out bundle-1.4.0 --host-reference h1=out/h1/reference.json`
    Build {
        /// The version (MAJOR.MINOR.PATCH).
        #[arg(value_name = "VERSION")]
        release: Version,
        /// The environment it is for.
        #[arg(long)]
        env: Environment,
        /// The bundle directory to make.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The binary (default: this one).
        #[arg(long, value_name = "FILE")]
        binary: Option<PathBuf>,
        /// The guest image directory (vmlinux, initramfs; default: the
        /// built one in the cache); `none` for a release without one.
        #[arg(long, value_name = "DIR")]
        guest_image: Option<PathBuf>,
        /// A host's reference values: NAME is the host's name, FILE the
        /// reference.json of its host image (`nitrile image build-host`),
        /// whose pcr<N> values (64 hex digits each) are copied into the
        /// release's host-references.json; its other fields are not.
        /// Repeatable, once per host; the file is signed with the release.
        #[arg(long = "host-reference", value_name = "NAME=FILE", value_parser = host_reference_arg)]
        host_references: Vec<(nitrile_api::Name, PathBuf)>,
    },
    /// Sign the test attestation of a bundle with the CI key: an in-toto
    /// Statement v1 (test result PASSED) about exactly its files, in a
    /// DSSE envelope, written as attestation.dsse.json. The project's test
    /// script runs it on what it built once every test passed.
    ///
    /// Example: `nitrile release attest --bundle bundle-1.4.0 --key ci.key`
    Attest {
        /// The bundle directory.
        #[arg(long, value_name = "DIR")]
        bundle: PathBuf,
        /// The CI key.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The test suite that passed.
        #[arg(long, default_value = "scripts/test.sh")]
        suite: String,
    },
    /// Stage a bundle in the repository: its files become targets and the
    /// next targets metadata lists them, waiting for the signers. A bundle
    /// for another environment, or without its test attestation, is
    /// refused.
    ///
    /// Example: `nitrile release stage --repo repo-prod --bundle bundle-1.4.0`
    Stage {
        /// The repository directory.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The bundle directory.
        #[arg(long, value_name = "DIR")]
        bundle: PathBuf,
    },
    /// Sign the staged targets metadata as one release signer; says how
    /// many signatures it has of the threshold.
    ///
    /// Example: `nitrile release sign --repo repo-prod --key signer-rita.key`
    Sign {
        /// The repository directory.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The signer's key.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Publish: the staged targets metadata (refused below the signer
    /// threshold), then a new snapshot and timestamp signed by the online
    /// key. Without anything staged it renews snapshot and timestamp.
    ///
    /// Example: `nitrile release publish --repo repo-prod --online-key online.key`
    Publish {
        /// The repository directory.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The online key.
        #[arg(long, value_name = "FILE")]
        online_key: PathBuf,
        /// When the timestamp expires (RFC 3339; default: in the
        /// repository's timestamp period, 24 h).
        #[arg(long, value_name = "TIME")]
        timestamp_expires: Option<String>,
    },
    /// List the releases of a repository as a host of its environment
    /// would see them (through the TUF client, from the pinned root).
    ///
    /// Example: `nitrile release list --repo repo-prod --root root.json`
    List {
        /// The repository directory.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The pinned root.json.
        #[arg(long, value_name = "FILE")]
        root: PathBuf,
    },
    /// Check a release as a host does before it runs it, and write its
    /// files: the TUF client's checks from the pinned root, the manifest's
    /// version and environment, the test attestation under the CI key,
    /// every file's digest.
    ///
    /// Example: `nitrile release verify 1.4.0 --repo repo-prod --root root.json --env prod --ci-key ci.key.pub.json --out /tmp/r`
    Verify {
        /// The version to check.
        #[arg(value_name = "VERSION")]
        release: Version,
        /// The repository directory.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The pinned root.json.
        #[arg(long, value_name = "FILE")]
        root: PathBuf,
        /// The environment of the host.
        #[arg(long)]
        env: Environment,
        /// The pinned CI key (public).
        #[arg(long, value_name = "FILE")]
        ci_key: PathBuf,
        /// Where to write its files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The TUF client's datastore (what it accepted before; default:
        /// OUT/.tuf).
        #[arg(long, value_name = "DIR")]
        datastore: Option<PathBuf>,
    },
}

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    match command {
        Command::Keygen { out } => {
            let key = ReleaseKey::generate();
            key.write(&out)?;
            pairs(
                global,
                &[
                    ("key", out.display().to_string()),
                    ("public", keys::public_path(&out).display().to_string()),
                    ("key id", key.key_id()),
                ],
            )
        }
        Command::Init {
            repo,
            env,
            root_keys,
            root_threshold,
            signers,
            threshold,
            online_key,
            sign_with,
            root_expiry_days,
        } => {
            let load_all = |paths: &[PathBuf]| -> anyhow::Result<Vec<_>> {
                paths
                    .iter()
                    .map(|p| keys::load_public(p).map_err(anyhow::Error::from))
                    .collect()
            };
            let options = InitOptions {
                environment: env.clone(),
                root_keys: load_all(&root_keys)?,
                root_threshold,
                signers: load_all(&signers)?,
                threshold,
                online: keys::load_public(&online_key)?,
                root_expiry_days,
            };
            let signing: Vec<ReleaseKey> = sign_with
                .iter()
                .map(|p| ReleaseKey::load(p))
                .collect::<Result<_, _>>()?;
            nitrile_release::repo::init(&repo, &options, &signing, now)?;
            pairs(
                global,
                &[
                    ("repository", repo.display().to_string()),
                    ("environment", env.to_string()),
                    (
                        "signers",
                        format!("{threshold} of {} sign a release", signers.len()),
                    ),
                    ("pin", repo.join("metadata/root.json").display().to_string()),
                ],
            )
        }
        Command::Build {
            release: version,
            env,
            out,
            binary,
            guest_image,
            host_references,
        } => {
            let binary = match binary {
                Some(b) => b,
                None => std::env::current_exe().context("the path of this binary")?,
            };
            let mut files = vec![(BINARY.to_owned(), binary)];
            let guest = match guest_image {
                Some(p) if p.as_os_str() == "none" => None,
                Some(p) => Some(p),
                None => Some(nitrile_image::output_dir(
                    &nitrile_image::default_cache_dir()?,
                )),
            };
            if let Some(dir) = guest {
                for f in ["vmlinux", "initramfs"] {
                    let p = dir.join(f);
                    anyhow::ensure!(
                        p.is_file(),
                        "no guest image file {} (build it with scripts/guest-image.sh, or pass \
                         --guest-image none)",
                        p.display()
                    );
                    files.push((f.to_owned(), p));
                }
            }
            let mut made = vec![(
                "schema.cedarschema",
                nitrile_policy::SCHEMA_TEXT.as_bytes().to_vec(),
            )];
            if !host_references.is_empty() {
                made.push((
                    nitrile_release::HOST_REFERENCES_FILE,
                    read_host_references(&host_references)?.to_bytes(),
                ));
            }
            let mut temporary = Vec::new();
            let mut built = Ok(());
            for (name, bytes) in &made {
                match tempfile_with(&out, name, bytes) {
                    Ok(path) => {
                        files.push(((*name).to_owned(), path.clone()));
                        temporary.push(path);
                    }
                    Err(e) => {
                        built = Err(e);
                        break;
                    }
                }
            }
            let built = built.and_then(|()| {
                manifest::build(version, env, &files, &out, now).map_err(anyhow::Error::from)
            });
            for path in temporary {
                let _ = std::fs::remove_file(path);
            }
            let built = built?;
            show_manifest(global, &out, &built)
        }
        Command::Attest { bundle, key, suite } => {
            let m = manifest::read_bundle(&bundle)?;
            let key = ReleaseKey::load(&key)?;
            let envelope = attest::sign(&attest::statement(&m, &suite), &key);
            let mut bytes = serde_json::to_vec_pretty(&envelope)?;
            bytes.push(b'\n');
            let path = bundle.join(manifest::ATTESTATION_FILE);
            nitrile_fs::write_atomic(&path, &bytes, 0o644)?;
            pairs(
                global,
                &[
                    ("attestation", path.display().to_string()),
                    ("release", format!("{} for {}", m.version, m.environment)),
                    ("files", m.files.len().to_string()),
                    ("signed by", key.key_id()),
                ],
            )
        }
        Command::Stage { repo, bundle } => {
            let repo = Repo::open(&repo)?;
            let m = repo.stage(&bundle, true, now)?;
            pairs(
                global,
                &[
                    ("staged", format!("{} for {}", m.version, m.environment)),
                    (
                        "next",
                        "each release signer runs `nitrile release sign`, then `nitrile release \
                         publish`"
                            .to_owned(),
                    ),
                ],
            )
        }
        Command::Sign { repo, key } => {
            let repo = Repo::open(&repo)?;
            let key = ReleaseKey::load(&key)?;
            let staged = repo.staged()?.ok_or_else(|| {
                nitrile_release::ReleaseError::NothingStaged(repo.dir().to_owned())
            })?;
            let releases = nitrile_release::repo::releases_of(&staged.signed);
            let (valid, threshold) = repo.sign(&key)?;
            pairs(
                global,
                &[
                    (
                        "signed",
                        format!("targets version {}", staged.signed.version),
                    ),
                    (
                        "releases",
                        releases
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                    ("signatures", format!("{valid} of the {threshold} needed")),
                ],
            )
        }
        Command::Publish {
            repo,
            online_key,
            timestamp_expires,
        } => {
            let repo = Repo::open(&repo)?;
            let key = ReleaseKey::load(&online_key)?;
            let expires = timestamp_expires
                .map(|t| {
                    time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                        .with_context(|| format!("--timestamp-expires {t:?} is not RFC 3339"))
                })
                .transpose()?;
            let published = repo.publish(&key, now, expires)?;
            pairs(
                global,
                &[
                    (
                        "published",
                        published.map_or("snapshot and timestamp renewed".to_owned(), |n| {
                            format!("targets version {n}")
                        }),
                    ),
                    (
                        "releases",
                        repo.releases()?
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                ],
            )
        }
        Command::List { repo, root } => {
            let trust_root =
                nitrile_fs::read_bounded(&root, nitrile_release::repo::MAX_METADATA_LEN)?;
            // A datastore of its own, so that listing remembers nothing.
            let datastore = std::env::temp_dir().join(format!(
                "nitrile-release-list-{}-{}",
                std::process::id(),
                now.unix_timestamp_nanos()
            ));
            let trust = client::Trust {
                environment: Environment::new("any")?,
                root: trust_root,
                ci_key: ReleaseKey::generate().verifying_key(),
            };
            let loaded = block_on(client::load(&repo, &trust, &datastore));
            let _ = std::fs::remove_dir_all(&datastore);
            let loaded = loaded??;
            let versions: Vec<String> = client::releases(&loaded)
                .iter()
                .map(ToString::to_string)
                .collect();
            match global.output {
                Output::Json => print_json(&versions),
                Output::Table => pairs(global, &[("releases", versions.join(", "))]),
            }
        }
        Command::Verify {
            release: version,
            repo,
            root,
            env,
            ci_key,
            out,
            datastore,
        } => {
            let trust = client::Trust {
                environment: env,
                root: nitrile_fs::read_bounded(&root, nitrile_release::repo::MAX_METADATA_LEN)?,
                ci_key: keys::ed25519_of(&keys::load_public(&ci_key)?)
                    .map_err(|e| anyhow::anyhow!("--ci-key: {e}"))?,
            };
            let datastore = datastore.unwrap_or_else(|| out.join(".tuf"));
            let verified = block_on(async {
                let loaded = client::load(&repo, &trust, &datastore).await?;
                client::fetch_release(&loaded, &trust, version, &out).await
            })??;
            show_manifest(global, &out, &verified.manifest)
        }
    }
}

/// `--host-reference NAME=FILE`.
fn host_reference_arg(s: &str) -> Result<(nitrile_api::Name, PathBuf), String> {
    let (name, file) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=FILE"))?;
    let name = nitrile_api::Name::new(name).map_err(|e| format!("host {name:?}: {e}"))?;
    if file.is_empty() {
        return Err(format!("{s:?} names no file"));
    }
    Ok((name, PathBuf::from(file)))
}

/// The host references of `--host-reference` arguments: each host once,
/// each file a host image's reference.json with its pcr<N> values.
fn read_host_references(
    args: &[(nitrile_api::Name, PathBuf)],
) -> anyhow::Result<nitrile_release::HostReferences> {
    use nitrile_release::references::MAX_REFERENCE_JSON_LEN;
    let mut hosts = std::collections::BTreeMap::new();
    for (name, file) in args {
        let bytes = nitrile_fs::read_bounded(file, MAX_REFERENCE_JSON_LEN)
            .with_context(|| format!("--host-reference {name}={}", file.display()))?;
        let reference = nitrile_release::HostReference::from_reference_json(&bytes)
            .with_context(|| format!("--host-reference {name}={}", file.display()))?;
        anyhow::ensure!(
            hosts.insert(name.clone(), reference).is_none(),
            "--host-reference names host {name} twice"
        );
    }
    Ok(nitrile_release::HostReferences::new(hosts)?)
}

/// A file in the parent of `dir` holding `bytes`, for a bundle built there
/// (its name in the bundle is `name`).
fn tempfile_with(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let path = parent.join(format!(".nitrile-release-{name}-{}", std::process::id()));
    nitrile_fs::write_atomic(&path, bytes, 0o600)?;
    Ok(path)
}

fn pairs(global: &Global, pairs: &[(&str, String)]) -> anyhow::Result<()> {
    match global.output {
        Output::Json => print_json(
            &pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect::<std::collections::BTreeMap<_, _>>(),
        ),
        Output::Table => Ok(print_pairs(
            &pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect::<Vec<_>>(),
        )?),
    }
}

fn show_manifest(
    global: &Global,
    dir: &Path,
    m: &nitrile_release::ReleaseManifest,
) -> anyhow::Result<()> {
    if global.output == Output::Json {
        return print_json(m);
    }
    let mut lines = vec![
        ("release".to_owned(), m.version.to_string()),
        ("environment".to_owned(), m.environment.to_string()),
        ("directory".to_owned(), dir.display().to_string()),
    ];
    for (name, d) in &m.files {
        lines.push((name.clone(), format!("{} ({} bytes)", d.sha256, d.length)));
    }
    Ok(print_pairs(&lines)?)
}
