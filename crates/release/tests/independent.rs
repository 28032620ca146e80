//! An independent TUF client, python-tuf's `ngclient` (PyPI `tuf`, pinned
//! by `scripts/setup.sh --tests` in `.venv-verify/`), reads a repository
//! this crate writes: it refreshes the metadata from the pinned root and
//! downloads a release's file, byte for byte; it refuses a tampered file,
//! targets metadata signed by fewer signers than the threshold, and an
//! expired timestamp. It shares no code with this crate or `tough`.
//! Without the environment the test prints SKIPPED and why.

use std::path::{Path, PathBuf};
use std::process::Command;

use nitrile_release::keys::ReleaseKey;
use nitrile_release::repo::{self, InitOptions, Repo};
use nitrile_release::{Environment, attest, manifest};
use time::OffsetDateTime;

fn python() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv-verify/bin/python3");
    if !python.exists() {
        return Err(format!(
            "no verifier environment at {} (scripts/setup.sh --tests makes it)",
            python.display()
        ));
    }
    let out = Command::new(&python)
        .args(["-c", "import tuf.ngclient"])
        .output()
        .map_err(|e| format!("{} cannot run: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} lacks python-tuf: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(python)
}

/// Runs ngclient for `target`; its exit code and output.
fn ngclient(python: &Path, repo: &Repo, work: &Path, target: &str) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/independent/ngclient.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(repo.dir())
        .arg(repo.dir().join("metadata/1.root.json"))
        .arg(work)
        .arg(target)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn python_tuf_downloads_a_release_and_refuses_what_tough_refuses() {
    let python = match python() {
        Ok(p) => p,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let root_key = ReleaseKey::generate();
    let signers: Vec<ReleaseKey> = (0..3).map(|_| ReleaseKey::generate()).collect();
    let online = ReleaseKey::generate();
    let ci = ReleaseKey::generate();
    let repo = repo::init(
        &tmp.path().join("repo"),
        &InitOptions {
            environment: Environment::new("prod").unwrap(),
            root_keys: vec![root_key.public()],
            root_threshold: 1,
            signers: signers.iter().map(ReleaseKey::public).collect(),
            threshold: 2,
            online: online.public(),
            root_expiry_days: 30,
        },
        std::slice::from_ref(&root_key),
        now,
    )
    .unwrap();
    let src = tmp.path().join("nitrile");
    std::fs::write(&src, b"the nitrile binary of 1.0.0").unwrap();
    let bundle = tmp.path().join("bundle");
    let m = manifest::build(
        "1.0.0".parse().unwrap(),
        Environment::new("prod").unwrap(),
        &[("nitrile".into(), src.clone())],
        &bundle,
        now,
    )
    .unwrap();
    std::fs::write(
        bundle.join(manifest::ATTESTATION_FILE),
        serde_json::to_vec(&attest::sign(
            &attest::statement(&m, "scripts/test.sh"),
            &ci,
        ))
        .unwrap(),
    )
    .unwrap();
    repo.stage(&bundle, true, now).unwrap();
    repo.sign(&signers[0]).unwrap();
    repo.sign(&signers[2]).unwrap();
    repo.publish(&online, now, None).unwrap();

    let (code, out) = ngclient(&python, &repo, &tmp.path().join("w1"), "v1.0.0-nitrile");
    assert_eq!(code, 0, "{out}");
    let path = out.trim().strip_prefix("OK ").unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"the nitrile binary of 1.0.0");
    let (code, out) = ngclient(
        &python,
        &repo,
        &tmp.path().join("w1b"),
        "v1.0.0-manifest.json",
    );
    assert_eq!(code, 0, "{out}");

    // A changed byte of the file in the repository.
    let digest = manifest::digest_file(&src).unwrap().sha256;
    let stored = repo.dir().join(format!("targets/{digest}.v1.0.0-nitrile"));
    let good = std::fs::read(&stored).unwrap();
    let mut bad = good.clone();
    bad[3] ^= 1;
    std::fs::write(&stored, &bad).unwrap();
    let (code, out) = ngclient(&python, &repo, &tmp.path().join("w2"), "v1.0.0-nitrile");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("LengthOrHashMismatchError"), "{out}");
    std::fs::write(&stored, &good).unwrap();

    // An expired timestamp.
    repo.publish(&online, now, Some(now - time::Duration::hours(1)))
        .unwrap();
    let (code, out) = ngclient(&python, &repo, &tmp.path().join("w3"), "v1.0.0-nitrile");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("xpired"), "{out}");
    repo.publish(&online, now, None).unwrap();
    let (code, out) = ngclient(&python, &repo, &tmp.path().join("w4"), "v1.0.0-nitrile");
    assert_eq!(code, 0, "{out}");

    // Targets metadata with one signer's signature of the two needed,
    // published by a rogue publisher around the tool's check.
    let src2 = tmp.path().join("nitrile2");
    std::fs::write(&src2, b"1.1.0").unwrap();
    let bundle2 = tmp.path().join("bundle2");
    let m2 = manifest::build(
        "1.1.0".parse().unwrap(),
        Environment::new("prod").unwrap(),
        &[("nitrile".into(), src2)],
        &bundle2,
        now,
    )
    .unwrap();
    std::fs::write(
        bundle2.join(manifest::ATTESTATION_FILE),
        serde_json::to_vec(&attest::sign(
            &attest::statement(&m2, "scripts/test.sh"),
            &ci,
        ))
        .unwrap(),
    )
    .unwrap();
    repo.stage(&bundle2, true, now).unwrap();
    repo.sign(&signers[1]).unwrap();
    let staged = repo.dir().join("staged/targets.json");
    std::fs::rename(&staged, repo.dir().join("metadata/2.targets.json")).unwrap();
    repo.publish(&online, now, None).unwrap();
    let (code, out) = ngclient(&python, &repo, &tmp.path().join("w5"), "v1.1.0-nitrile");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("UnsignedMetadataError"), "{out}");
}
