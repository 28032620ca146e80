//! An environment's repository end to end, and every way a release is
//! refused by the client a host runs (tough's TUF client and the release
//! checks on top): too few signer signatures, a non-signer's signature, no
//! test attestation or one about other files, a tampered file, an expired
//! timestamp, rolled-back metadata, a release of another environment.
//! What a key service reads of a repository: the host references of the
//! newest releases that verify, the others passed over with why.

use std::path::{Path, PathBuf};

use nitrile_release::client::{self, Trust};
use nitrile_release::keys::ReleaseKey;
use nitrile_release::references::{HOST_REFERENCES_FILE, HostReference, HostReferences};
use nitrile_release::repo::{self, InitOptions, Repo};
use nitrile_release::{Environment, ReleaseError, Version, attest, manifest};
use time::OffsetDateTime;

struct Keys {
    root: Vec<ReleaseKey>,
    signers: Vec<ReleaseKey>,
    online: ReleaseKey,
    ci: ReleaseKey,
}

fn keys() -> Keys {
    Keys {
        root: (0..2).map(|_| ReleaseKey::generate()).collect(),
        signers: (0..3).map(|_| ReleaseKey::generate()).collect(),
        online: ReleaseKey::generate(),
        ci: ReleaseKey::generate(),
    }
}

fn env(s: &str) -> Environment {
    Environment::new(s).unwrap()
}

fn v(s: &str) -> Version {
    s.parse().unwrap()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A repository for `environment`: 2 of 2 root keys, 2 of 3 signers.
fn init(dir: &Path, k: &Keys, environment: &str) -> Repo {
    repo::init(
        dir,
        &InitOptions {
            environment: env(environment),
            root_keys: k.root.iter().map(ReleaseKey::public).collect(),
            root_threshold: 2,
            signers: k.signers.iter().map(ReleaseKey::public).collect(),
            threshold: 2,
            online: k.online.public(),
            root_expiry_days: 365,
        },
        &k.root,
        now(),
    )
    .unwrap()
}

/// A bundle of `version` for `environment` in `dir`, attested by `ci` when
/// given.
fn bundle(dir: &Path, version: &str, environment: &str, ci: Option<&ReleaseKey>) -> PathBuf {
    let src = dir.join(format!("src-{version}-{environment}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("nitrile"), format!("binary {version}")).unwrap();
    std::fs::write(src.join("vmlinux"), vec![7u8; 100_000]).unwrap();
    let out = dir.join(format!("bundle-{version}-{environment}"));
    let m = manifest::build(
        v(version),
        env(environment),
        &[
            ("nitrile".into(), src.join("nitrile")),
            ("vmlinux".into(), src.join("vmlinux")),
        ],
        &out,
        now(),
    )
    .unwrap();
    if let Some(ci) = ci {
        let e = attest::sign(&attest::statement(&m, "scripts/test.sh"), ci);
        std::fs::write(
            out.join(manifest::ATTESTATION_FILE),
            serde_json::to_vec(&e).unwrap(),
        )
        .unwrap();
    }
    out
}

fn trust(repo: &Repo, k: &Keys, environment: &str) -> Trust {
    Trust {
        environment: env(environment),
        root: std::fs::read(repo.dir().join("metadata/root.json")).unwrap(),
        ci_key: k.ci.verifying_key(),
    }
}

/// Stages, signs with `signers` and publishes `bundle`.
fn release(repo: &Repo, k: &Keys, bundle: &Path, signers: &[usize]) {
    repo.stage(bundle, false, now()).unwrap();
    for &i in signers {
        repo.sign(&k.signers[i]).unwrap();
    }
    repo.publish(&k.online, now(), None).unwrap();
}

/// What a host gets for `version`.
async fn fetch(
    repo: &Repo,
    t: &Trust,
    datastore: &Path,
    version: &str,
    out: &Path,
) -> Result<nitrile_release::client::VerifiedRelease, ReleaseError> {
    let loaded = client::load(repo.dir(), t, datastore).await?;
    client::fetch_release(&loaded, t, v(version), out).await
}

#[tokio::test]
async fn a_release_signed_by_k_of_n_and_attested_reaches_a_host_of_its_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let k = keys();
    let repo = init(&tmp.path().join("repo"), &k, "prod");
    let b = bundle(tmp.path(), "1.0.0", "prod", Some(&k.ci));
    repo.stage(&b, true, now()).unwrap();
    assert_eq!(repo.sign(&k.signers[0]).unwrap(), (1, 2));
    // Below the threshold the publisher refuses.
    assert!(matches!(
        repo.publish(&k.online, now(), None),
        Err(ReleaseError::Threshold {
            valid: 1,
            threshold: 2
        })
    ));
    assert_eq!(repo.sign(&k.signers[2]).unwrap().1, 2);
    repo.publish(&k.online, now(), None).unwrap();
    assert_eq!(repo.releases().unwrap(), vec![v("1.0.0")]);

    let t = trust(&repo, &k, "prod");
    let out = tmp.path().join("host/1.0.0");
    let got = fetch(&repo, &t, &tmp.path().join("host/tuf"), "1.0.0", &out)
        .await
        .unwrap();
    assert_eq!(got.manifest.version, v("1.0.0"));
    assert_eq!(std::fs::read(out.join("nitrile")).unwrap(), b"binary 1.0.0");

    // A second release keeps the first; the host sees both.
    let b2 = bundle(tmp.path(), "1.1.0", "prod", Some(&k.ci));
    release(&repo, &k, &b2, &[1, 2]);
    let loaded = client::load(repo.dir(), &t, &tmp.path().join("host/tuf"))
        .await
        .unwrap();
    assert_eq!(client::releases(&loaded), vec![v("1.0.0"), v("1.1.0")]);
    // Nor is a version staged twice.
    assert!(matches!(
        repo.stage(&b2, true, now()),
        Err(ReleaseError::Exists(_))
    ));
}

#[tokio::test]
async fn too_few_or_foreign_signatures_are_refused_by_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let k = keys();
    let repo = init(&tmp.path().join("repo"), &k, "prod");
    let b = bundle(tmp.path(), "1.0.0", "prod", Some(&k.ci));
    repo.stage(&b, true, now()).unwrap();
    repo.sign(&k.signers[0]).unwrap();
    // A key that is not a signer's cannot sign through the tool...
    let stranger = ReleaseKey::generate();
    assert!(matches!(
        repo.sign(&stranger),
        Err(ReleaseError::NotARoleKey { .. })
    ));
    // ...and a rogue publisher who adds its signature anyway, and publishes
    // k-1 signer signatures, gets nothing past the host's TUF client.
    let staged_path = repo.dir().join("staged/targets.json");
    let mut staged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&staged_path).unwrap()).unwrap();
    let signed = repo.staged().unwrap().unwrap();
    let canonical = tough::schema::Role::canonical_form(&signed.signed).unwrap();
    staged["signatures"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "keyid": stranger.key_id(),
            "sig": hex::encode(stranger.sign(&canonical)),
        }));
    std::fs::write(
        repo.dir().join("metadata/1.targets.json"),
        serde_json::to_vec(&staged).unwrap(),
    )
    .unwrap();
    std::fs::remove_file(&staged_path).unwrap();
    repo.publish(&k.online, now(), None).unwrap();
    let t = trust(&repo, &k, "prod");
    let err = fetch(
        &repo,
        &t,
        &tmp.path().join("tuf"),
        "1.0.0",
        &tmp.path().join("o"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ReleaseError::Tuf(_)), "{err}");
    assert!(
        err.to_string().contains("threshold") || err.to_string().contains("signature"),
        "{err}"
    );
    assert!(!tmp.path().join("o/nitrile").exists());
}

#[tokio::test]
async fn a_release_without_its_attestation_or_with_another_ones_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let k = keys();
    let repo = init(&tmp.path().join("repo"), &k, "prod");
    // The tool refuses to stage an unattested bundle.
    let bare = bundle(tmp.path(), "1.0.0", "prod", None);
    assert!(matches!(
        repo.stage(&bare, true, now()),
        Err(ReleaseError::Attestation { .. })
    ));
    // Signed by k signers anyway, the host refuses it.
    release(&repo, &k, &bare, &[0, 1]);
    let t = trust(&repo, &k, "prod");
    let ds = tmp.path().join("tuf");
    let err = fetch(&repo, &t, &ds, "1.0.0", &tmp.path().join("o1"))
        .await
        .unwrap_err();
    assert!(matches!(err, ReleaseError::Attestation { .. }), "{err}");

    // An attestation for other files (another build's), or signed by
    // another key than the pinned CI key.
    let other = bundle(tmp.path(), "1.1.0", "prod", Some(&k.ci));
    let b = bundle(tmp.path(), "1.2.0", "prod", None);
    std::fs::copy(
        other.join(manifest::ATTESTATION_FILE),
        b.join(manifest::ATTESTATION_FILE),
    )
    .unwrap();
    release(&repo, &k, &b, &[0, 1]);
    let err = fetch(&repo, &t, &ds, "1.2.0", &tmp.path().join("o2"))
        .await
        .unwrap_err();
    assert!(matches!(err, ReleaseError::Attestation { .. }), "{err}");
    let rogue_ci = ReleaseKey::generate();
    let b = bundle(tmp.path(), "1.3.0", "prod", Some(&rogue_ci));
    release(&repo, &k, &b, &[0, 1]);
    let err = fetch(&repo, &t, &ds, "1.3.0", &tmp.path().join("o3"))
        .await
        .unwrap_err();
    assert!(matches!(err, ReleaseError::Attestation { .. }), "{err}");
}

#[tokio::test]
async fn a_tampered_file_an_expired_timestamp_and_rolled_back_metadata_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let k = keys();
    let repo = init(&tmp.path().join("repo"), &k, "prod");
    let b = bundle(tmp.path(), "1.0.0", "prod", Some(&k.ci));
    release(&repo, &k, &b, &[0, 1]);
    let t = trust(&repo, &k, "prod");
    let ds = tmp.path().join("tuf");

    // A changed byte of the binary in the repository.
    let digest = manifest::digest_file(&b.join("nitrile")).unwrap().sha256;
    let stored = repo.dir().join(format!("targets/{digest}.v1.0.0-nitrile"));
    let good = std::fs::read(&stored).unwrap();
    let mut bad = good.clone();
    bad[0] ^= 1;
    std::fs::write(&stored, &bad).unwrap();
    let err = fetch(&repo, &t, &ds, "1.0.0", &tmp.path().join("o1"))
        .await
        .unwrap_err();
    assert!(matches!(err, ReleaseError::Tuf(_)), "{err}");
    assert!(
        err.to_string().contains("Hash mismatch") || err.to_string().contains("hash"),
        "{err}"
    );
    assert!(!tmp.path().join("o1/nitrile").exists());
    std::fs::write(&stored, &good).unwrap();
    fetch(&repo, &t, &ds, "1.0.0", &tmp.path().join("o2"))
        .await
        .unwrap();

    // Keep the metadata of now, release 1.1.0, then put the old metadata
    // back (a mirror replaying it): the host, which saw the newer, refuses.
    let meta = repo.dir().join("metadata");
    let old_timestamp = std::fs::read(meta.join("timestamp.json")).unwrap();
    let b2 = bundle(tmp.path(), "1.1.0", "prod", Some(&k.ci));
    release(&repo, &k, &b2, &[0, 2]);
    fetch(&repo, &t, &ds, "1.1.0", &tmp.path().join("o3"))
        .await
        .unwrap();
    std::fs::write(meta.join("timestamp.json"), &old_timestamp).unwrap();
    let err = fetch(&repo, &t, &ds, "1.0.0", &tmp.path().join("o4"))
        .await
        .unwrap_err();
    assert!(matches!(err, ReleaseError::Tuf(_)), "{err}");
    assert!(
        err.to_string().contains("previously fetched version"),
        "{err}"
    );

    // A timestamp that expired (the online key stopped renewing it, or a
    // mirror freezes the repository): refused.
    repo.publish(&k.online, now(), Some(now() - time::Duration::hours(1)))
        .unwrap();
    let err = fetch(&repo, &t, &ds, "1.1.0", &tmp.path().join("o5"))
        .await
        .unwrap_err();
    assert!(matches!(err, ReleaseError::Tuf(_)), "{err}");
    assert!(err.to_string().contains("xpired"), "{err}");
    // Renewed, it is served again.
    repo.publish(&k.online, now(), None).unwrap();
    fetch(&repo, &t, &ds, "1.1.0", &tmp.path().join("o6"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_release_of_another_environment_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let k = keys();
    let prod = init(&tmp.path().join("prod"), &k, "prod");
    let staging_keys = keys();
    let staging = init(&tmp.path().join("staging"), &staging_keys, "staging");
    // A staging bundle is not staged into the prod repository.
    let sb = bundle(tmp.path(), "2.0.0", "staging", Some(&staging_keys.ci));
    assert!(matches!(
        prod.stage(&sb, true, now()),
        Err(ReleaseError::WrongEnvironment { .. })
    ));
    release(&staging, &staging_keys, &sb, &[0, 1]);
    // A prod host offered the staging repository: its root does not chain.
    let t = trust(&prod, &k, "prod");
    let err = fetch(
        &staging,
        &t,
        &tmp.path().join("tuf1"),
        "2.0.0",
        &tmp.path().join("o1"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ReleaseError::Tuf(_)), "{err}");
    // A prod host that pinned the staging root by mistake still refuses a
    // release built for staging.
    let mistaken = Trust {
        environment: env("prod"),
        root: std::fs::read(staging.dir().join("metadata/root.json")).unwrap(),
        ci_key: staging_keys.ci.verifying_key(),
    };
    let err = fetch(
        &staging,
        &mistaken,
        &tmp.path().join("tuf2"),
        "2.0.0",
        &tmp.path().join("o2"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ReleaseError::WrongEnvironment { .. }),
        "{err}"
    );
    // A version the repository does not have.
    let t = trust(&staging, &staging_keys, "staging");
    let err = fetch(
        &staging,
        &t,
        &tmp.path().join("tuf3"),
        "9.9.9",
        &tmp.path().join("o3"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ReleaseError::NoSuchRelease(_)), "{err}");
}

/// A bundle of `version` for prod carrying `references` (host h1's PCR 4
/// is `pcr4`), attested by `ci` when given.
fn bundle_with_references(
    dir: &Path,
    version: &str,
    pcr4: Option<u8>,
    ci: Option<&ReleaseKey>,
) -> PathBuf {
    let src = dir.join(format!("src-{version}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("nitrile"), format!("binary {version}")).unwrap();
    let mut files = vec![("nitrile".to_owned(), src.join("nitrile"))];
    if let Some(b) = pcr4 {
        let references = HostReferences::new(
            [(
                "h1".parse().unwrap(),
                HostReference::new([(4, [b; 32])].into()).unwrap(),
            )]
            .into(),
        )
        .unwrap();
        std::fs::write(src.join(HOST_REFERENCES_FILE), references.to_bytes()).unwrap();
        files.push((
            HOST_REFERENCES_FILE.to_owned(),
            src.join(HOST_REFERENCES_FILE),
        ));
    }
    let out = dir.join(format!("bundle-{version}"));
    let m = manifest::build(v(version), env("prod"), &files, &out, now()).unwrap();
    if let Some(ci) = ci {
        let e = attest::sign(&attest::statement(&m, "scripts/test.sh"), ci);
        std::fs::write(
            out.join(manifest::ATTESTATION_FILE),
            serde_json::to_vec(&e).unwrap(),
        )
        .unwrap();
    }
    out
}

#[tokio::test]
async fn a_key_service_reads_the_host_references_of_the_newest_verified_releases() {
    let tmp = tempfile::tempdir().unwrap();
    let k = keys();
    let repo = init(&tmp.path().join("repo"), &k, "prod");
    let t = trust(&repo, &k, "prod");
    let h1 = "h1".parse().unwrap();
    // 1.0.0 and 1.3.0 verify and carry references; 1.1.0 carries none;
    // 1.2.0 is not attested.
    for (version, pcr4, ci) in [
        ("1.0.0", Some(1), Some(&k.ci)),
        ("1.1.0", None, Some(&k.ci)),
        ("1.2.0", Some(2), None),
        ("1.3.0", Some(3), Some(&k.ci)),
    ] {
        release(
            &repo,
            &k,
            &bundle_with_references(tmp.path(), version, pcr4, ci),
            &[0, 1],
        );
    }
    let ds = tmp.path().join("tuf");
    let loaded = client::load(repo.dir(), &t, &ds).await.unwrap();
    let found = client::newest_host_references(&loaded, &t, 2).await;
    let got: Vec<(Version, [u8; 32])> = found
        .releases
        .iter()
        .map(|(v, r)| (*v, r.get(&h1).unwrap().pcrs()[&4]))
        .collect();
    assert_eq!(got, [(v("1.3.0"), [3; 32]), (v("1.0.0"), [1; 32])]);
    let passed: Vec<(Version, &str)> = found
        .passed_over
        .iter()
        .map(|(v, e)| (*v, e.code()))
        .collect();
    assert_eq!(
        passed,
        [(v("1.2.0"), "attestation"), (v("1.1.0"), "no_such_file")]
    );
    // Only the newest one asked for.
    let found = client::newest_host_references(&loaded, &t, 1).await;
    assert_eq!(found.releases.len(), 1);
    assert!(found.passed_over.is_empty());

    // One changed byte of 1.3.0's references in the repository: tough
    // refuses the file, and 1.3.0 keeps its place among the newest without
    // being believed (1.0.0 is not brought back).
    let digest = manifest::digest_file(
        &tmp.path()
            .join(format!("bundle-1.3.0/{HOST_REFERENCES_FILE}")),
    )
    .unwrap()
    .sha256;
    let stored = repo
        .dir()
        .join(format!("targets/{digest}.v1.3.0-{HOST_REFERENCES_FILE}"));
    let good = std::fs::read(&stored).unwrap();
    std::fs::write(
        &stored,
        String::from_utf8(good).unwrap().replace("03", "01"),
    )
    .unwrap();
    let found = client::newest_host_references(&loaded, &t, 1).await;
    assert!(found.releases.is_empty(), "{:?}", found.releases);
    assert_eq!(found.damaged[0].0, v("1.3.0"));
    assert_eq!(found.damaged[0].1.code(), "tuf");
    let found = client::newest_host_references(&loaded, &t, 2).await;
    assert_eq!(found.releases[0].0, v("1.0.0"));
    assert_eq!(found.damaged.len(), 1);
}
