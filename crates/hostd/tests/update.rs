//! `host.update` on a host agent pinned to its environment's release
//! repository: a release signed by 2 of 3 signers and attested by CI is
//! checked and staged; each of these is refused by the host with its
//! journal record, nothing staged and the host still running its version:
//! one signature short, a foreign signature, no attestation, an attestation
//! of other files, a tampered file, an expired timestamp, rolled-back
//! metadata, a staging release offered to a prod host, a version not
//! higher than the running one (also after the state directory lost its
//! record); an operator's call is refused at the token service's
//! entitlement step; a host without a pinned repository refuses.

use std::path::{Path, PathBuf};

use nitrile_api::Operation;
use nitrile_api::admin::{AdminRequest, HostUpdate, HostUpdateRequest};
use nitrile_audit::{AuditRecord, RecordKind};
use nitrile_hostd::ReleaseConfig;
use nitrile_release::keys::ReleaseKey;
use nitrile_release::repo::{self, InitOptions, Repo};
use nitrile_release::{Environment, attest, manifest};
use support::{TestCell, journal_records, refusal};
use time::OffsetDateTime;

mod support;

const DEPLOYER: &str = "service/deployer";

struct Keys {
    root: ReleaseKey,
    signers: Vec<ReleaseKey>,
    online: ReleaseKey,
    ci: ReleaseKey,
}

fn keys() -> Keys {
    Keys {
        root: ReleaseKey::generate(),
        signers: (0..3).map(|_| ReleaseKey::generate()).collect(),
        online: ReleaseKey::generate(),
        ci: ReleaseKey::generate(),
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn init(dir: &Path, k: &Keys, env: &str) -> Repo {
    repo::init(
        dir,
        &InitOptions {
            environment: Environment::new(env).unwrap(),
            root_keys: vec![k.root.public()],
            root_threshold: 1,
            signers: k.signers.iter().map(ReleaseKey::public).collect(),
            threshold: 2,
            online: k.online.public(),
            root_expiry_days: 30,
        },
        std::slice::from_ref(&k.root),
        now(),
    )
    .unwrap()
}

/// A bundle of `version` for `env`, attested by `ci` (if any) over
/// `attested_files` (its own files when none).
fn bundle(dir: &Path, version: &str, env: &str, ci: Option<&ReleaseKey>) -> PathBuf {
    let src = dir.join(format!("src-{version}-{env}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("nitrile"), format!("the nitrile binary {version}")).unwrap();
    let out = dir.join(format!("bundle-{version}-{env}"));
    let m = manifest::build(
        version.parse().unwrap(),
        Environment::new(env).unwrap(),
        &[("nitrile".into(), src.join("nitrile"))],
        &out,
        now(),
    )
    .unwrap();
    if let Some(ci) = ci {
        std::fs::write(
            out.join(manifest::ATTESTATION_FILE),
            serde_json::to_vec(&attest::sign(&attest::statement(&m, "scripts/test.sh"), ci))
                .unwrap(),
        )
        .unwrap();
    }
    out
}

fn publish(repo: &Repo, k: &Keys, bundle: &Path, signers: &[usize]) {
    repo.stage(bundle, false, now()).unwrap();
    for &i in signers {
        repo.sign(&k.signers[i]).unwrap();
    }
    repo.publish(&k.online, now(), None).unwrap();
}

/// Publishes `bundle` with only `signers` (below the threshold), as a rogue
/// publisher would, around the tool's check.
fn publish_short(repo: &Repo, k: &Keys, bundle: &Path, signers: &[usize]) {
    repo.stage(bundle, false, now()).unwrap();
    for &i in signers {
        repo.sign(&k.signers[i]).unwrap();
    }
    let n = repo.staged().unwrap().unwrap().signed.version;
    std::fs::rename(
        repo.dir().join("staged/targets.json"),
        repo.dir().join(format!("metadata/{n}.targets.json")),
    )
    .unwrap();
    repo.publish(&k.online, now(), None).unwrap();
}

fn update(version: &str) -> AdminRequest {
    AdminRequest::HostUpdate(HostUpdateRequest {
        version: version.into(),
    })
}

/// Calls host.update as the deployer: the status, the body and the
/// request's last journal record.
async fn call(cell: &TestCell, version: &str) -> (u16, Vec<u8>, AuditRecord) {
    let req = update(version);
    let token = cell.token_for(DEPLOYER, "h1", &req).await;
    let (status, body) = cell.call(DEPLOYER, "h1", &req, Some(&token)).await;
    let last = journal_records(&cell.host_journal("h1")).pop().unwrap();
    (status, body.to_vec(), last)
}

/// Asserts a refusal with `code`, journaled, nothing staged.
async fn refused(cell: &TestCell, state: &Path, version: &str, code: &str) {
    let (status, body, record) = call(cell, version).await;
    assert_eq!(status, 409, "{version}: {}", String::from_utf8_lossy(&body));
    let r = refusal(&body);
    assert!(
        record.detail.as_ref().is_some_and(|d| d["code"] == code)
            || record
                .reason
                .as_deref()
                .is_some_and(|r| r.starts_with(code)),
        "{version}: expected {code}, journaled {record:?}; answer {}",
        r.reason
    );
    assert_eq!(record.kind, RecordKind::Outcome, "{record:?}");
    assert!(
        !state.join(format!("releases/{version}")).exists(),
        "{version} staged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_attested_release_is_staged_and_every_bad_one_refused() {
    let mut cell = TestCell::new().await;
    let tmp = cell.scratch("releases");
    let k = keys();
    let repo_dir = tmp.join("repo");
    let repo = init(&repo_dir, &k, "prod");
    let pins = tmp.join("pins");
    std::fs::create_dir_all(&pins).unwrap();
    std::fs::copy(repo_dir.join("metadata/root.json"), pins.join("root.json")).unwrap();
    std::fs::write(pins.join("ci.pub.json"), k.ci.public_json()).unwrap();
    let mut setup = cell.default_setup();
    // A release-pinned host names no binary of its own (see
    // claim7_only_released_code.rs): the host image's QEMU.
    setup.hypervisor.qemu = None;
    setup.release = Some(ReleaseConfig {
        environment: "prod".into(),
        repository: repo_dir.clone(),
        root: pins.join("root.json"),
        ci_key: pins.join("ci.pub.json"),
        health_deadline_secs: None,
    });
    cell.start_host_with("h1", setup).await;
    let state = cell.host_config("h1").state.clone();
    let running = env!("CARGO_PKG_VERSION");
    assert_eq!(running, "0.1.0", "the versions below assume 0.1.0 runs");

    // Good: 2 of 3 signers, attested.
    publish(
        &repo,
        &k,
        &bundle(&tmp, "0.2.0", "prod", Some(&k.ci)),
        &[0, 2],
    );
    let (status, body, record) = call(&cell, "0.2.0").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let done: HostUpdate = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (done.running.as_str(), done.staged.as_str()),
        (running, "0.2.0")
    );
    assert_eq!(done.environment, "prod");
    assert_eq!(record.outcome, Some(nitrile_audit::Outcome::Executed));
    assert_eq!(
        std::fs::read(state.join("releases/0.2.0/nitrile")).unwrap(),
        b"the nitrile binary 0.2.0"
    );

    // One signer short.
    publish_short(&repo, &k, &bundle(&tmp, "0.3.0", "prod", Some(&k.ci)), &[1]);
    refused(&cell, &state, "0.3.0", "tuf").await;

    // A fresh repository per case below, so that one refusal's metadata
    // does not hide the next; the host pins each one's root unless the
    // case says it keeps the prod root it has.
    type Make = Box<dyn Fn(&Path, &Repo, &Keys)>;
    let cases: Vec<(&str, Make, &str, bool)> = vec![
        (
            "a foreign signature beside one signer's",
            Box::new(|t: &Path, r: &Repo, k: &Keys| {
                r.stage(&bundle(t, "0.4.0", "prod", Some(&k.ci)), false, now())
                    .unwrap();
                r.sign(&k.signers[0]).unwrap();
                let staged = r.dir().join("staged/targets.json");
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&staged).unwrap()).unwrap();
                let stranger = ReleaseKey::generate();
                let canonical =
                    tough::schema::Role::canonical_form(&r.staged().unwrap().unwrap().signed)
                        .unwrap();
                v["signatures"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::json!({
                        "keyid": stranger.key_id(),
                        "sig": hex::encode(stranger.sign(&canonical)),
                    }));
                std::fs::write(r.dir().join("metadata/1.targets.json"), v.to_string()).unwrap();
                std::fs::remove_file(&staged).unwrap();
                r.publish(&k.online, now(), None).unwrap();
            }),
            "tuf",
            true,
        ),
        (
            "no attestation",
            Box::new(|t: &Path, r: &Repo, k: &Keys| {
                publish(r, k, &bundle(t, "0.4.0", "prod", None), &[0, 1])
            }),
            "attestation",
            true,
        ),
        (
            "attestation of other files",
            Box::new(|t: &Path, r: &Repo, k: &Keys| {
                let other = bundle(t, "0.9.0", "prod", Some(&k.ci));
                let b = bundle(t, "0.4.0", "prod", None);
                std::fs::copy(
                    other.join(manifest::ATTESTATION_FILE),
                    b.join(manifest::ATTESTATION_FILE),
                )
                .unwrap();
                publish(r, k, &b, &[0, 1]);
            }),
            "attestation",
            true,
        ),
        (
            "tampered file",
            Box::new(|t: &Path, r: &Repo, k: &Keys| {
                let b = bundle(t, "0.4.0", "prod", Some(&k.ci));
                publish(r, k, &b, &[0, 1]);
                let d = manifest::digest_file(&b.join("nitrile")).unwrap().sha256;
                let stored = r.dir().join(format!("targets/{d}.v0.4.0-nitrile"));
                std::fs::write(&stored, b"the nitrile binary 0.4.1").unwrap();
            }),
            "tuf",
            true,
        ),
        (
            "expired timestamp",
            Box::new(|t: &Path, r: &Repo, k: &Keys| {
                publish(r, k, &bundle(t, "0.4.0", "prod", Some(&k.ci)), &[0, 1]);
                r.publish(&k.online, now(), Some(now() - time::Duration::minutes(5)))
                    .unwrap();
            }),
            "tuf",
            true,
        ),
        (
            "the staging repository offered to a prod host",
            Box::new(|t: &Path, _r: &Repo, _k: &Keys| {
                let sk = keys();
                let staging = init(&t.join("staging-repo"), &sk, "staging");
                publish(
                    &staging,
                    &sk,
                    &bundle(t, "0.4.0", "staging", Some(&sk.ci)),
                    &[0, 1],
                );
                let prod = t.join("repo");
                std::fs::remove_dir_all(&prod).unwrap();
                std::fs::rename(t.join("staging-repo"), &prod).unwrap();
            }),
            "tuf",
            false,
        ),
        (
            "a staging release under the pinned root",
            Box::new(|t: &Path, _r: &Repo, k: &Keys| {
                // Signed by the prod signers by mistake, in a repository
                // the prod host trusts: the manifest still says staging.
                let staging = init(&t.join("staging-repo"), k, "staging");
                publish(
                    &staging,
                    k,
                    &bundle(t, "0.4.0", "staging", Some(&k.ci)),
                    &[0, 1],
                );
                let prod = t.join("repo");
                std::fs::remove_dir_all(&prod).unwrap();
                std::fs::rename(t.join("staging-repo"), &prod).unwrap();
            }),
            "wrong_environment",
            true,
        ),
    ];
    for (i, (what, make, code, repin)) in cases.into_iter().enumerate() {
        let case_dir = cell.scratch(&format!("case{i}"));
        let r = init(&case_dir.join("repo"), &k, "prod");
        make(&case_dir, &r, &k);
        swap_repository(&state, &repo_dir, &case_dir.join("repo"), repin);
        eprintln!("case: {what}");
        refused(&cell, &state, "0.4.0", code).await;
    }

    // Rolled-back metadata: the host accepts 0.6.0's metadata, then the
    // timestamp of 0.5.0's is put back (a mirror replaying it).
    let case_dir = cell.scratch("rollback");
    let r = init(&case_dir.join("repo"), &k, "prod");
    publish(
        &r,
        &k,
        &bundle(&case_dir, "0.5.0", "prod", Some(&k.ci)),
        &[0, 1],
    );
    let old = std::fs::read(case_dir.join("repo/metadata/timestamp.json")).unwrap();
    publish(
        &r,
        &k,
        &bundle(&case_dir, "0.6.0", "prod", Some(&k.ci)),
        &[0, 1],
    );
    swap_repository(&state, &repo_dir, &case_dir.join("repo"), true);
    let (status, body, _) = call(&cell, "0.6.0").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    std::fs::write(repo_dir.join("metadata/timestamp.json"), old).unwrap();
    refused(&cell, &state, "0.5.0", "tuf").await;

    // Not higher than the running version, also once the record of the
    // highest version run is gone (a restored backup).
    refused(&cell, &state, "0.0.9", "rollback").await;
    refused(&cell, &state, running, "rollback").await;
    std::fs::remove_file(state.join("releases/highest.json")).unwrap();
    refused(&cell, &state, "0.0.9", "rollback").await;

    // Nothing of the refused ones was staged; the good ones were.
    let staged: Vec<String> = std::fs::read_dir(state.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("0."))
        .collect();
    let mut staged = staged;
    staged.sort();
    assert_eq!(staged, ["0.2.0", "0.6.0"]);
}

/// Replaces the host's repository (the directory its config names, `at`)
/// with a copy of `with`, and forgets the metadata the host accepted from
/// the old one; with `repin` the host pins the new repository's root.
fn swap_repository(state: &Path, at: &Path, with: &Path, repin: bool) {
    let _ = std::fs::remove_dir_all(at);
    copy_dir(with, at);
    let _ = std::fs::remove_dir_all(state.join("releases/tuf"));
    if repin {
        let pins = at.parent().unwrap().join("pins");
        std::fs::copy(at.join("metadata/root.json"), pins.join("root.json")).unwrap();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_deployer_updates_and_only_a_pinned_host() {
    let mut cell = TestCell::new().await;
    cell.start_host("h1").await;
    // An operator gets no token for host.update: the token service refuses
    // at its entitlement step (the guardrail), and journals it.
    let req = update("0.2.0");
    let resp = cell
        .token_request(
            "operator/alice",
            &support::token_request(Operation::HostUpdate, "host/h1", "h1"),
        )
        .await;
    assert_eq!(
        resp.status.as_u16(),
        403,
        "{}",
        String::from_utf8_lossy(&resp.body)
    );
    let r = refusal(&resp.body);
    assert_eq!(r.step, nitrile_api::wire::RefusalStep::Entitlement);
    let tokend = journal_records(&cell.tokend_journal());
    assert!(
        tokend
            .iter()
            .rev()
            .take(3)
            .any(|rec| rec.kind == RecordKind::Refusal
                && rec.operations.contains(&Operation::HostUpdate)),
        "the refusal is not in the token service's journal"
    );
    // The deployer gets one, and a host with no pinned repository refuses.
    let token = cell.token_for(DEPLOYER, "h1", &req).await;
    let (status, body) = cell.call(DEPLOYER, "h1", &req, Some(&token)).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert!(
        refusal(&body).reason.contains("no release repository"),
        "{body:?}"
    );
}

/// With a TPM, the highest version run is also in the TPM's NV memory: a
/// host whose disk is put back to an older copy (its record says 0.1.0)
/// still refuses a release below the highest it ran (0.6.0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tpm_refuses_a_downgrade_after_the_disk_is_restored() {
    let mut cell = TestCell::new().await;
    let tpm_state = cell.scratch("tpm");
    if let Err(e) = nitrile_attest::swtpm::available() {
        println!("SKIPPED: {e}");
        return;
    }
    if !support::is_root() {
        println!("SKIPPED: manufacturing a TPM with swtpm's local CA needs root");
        return;
    }
    let swtpm = nitrile_attest::swtpm::Swtpm::start(&tpm_state).unwrap();
    let tmp = cell.scratch("releases");
    let k = keys();
    let repo_dir = tmp.join("repo");
    let repo = init(&repo_dir, &k, "prod");
    let pins = tmp.join("pins");
    std::fs::create_dir_all(&pins).unwrap();
    std::fs::copy(repo_dir.join("metadata/root.json"), pins.join("root.json")).unwrap();
    std::fs::write(pins.join("ci.pub.json"), k.ci.public_json()).unwrap();
    let mut setup = cell.default_setup();
    setup.hypervisor.qemu = None;
    setup.release = Some(ReleaseConfig {
        environment: "prod".into(),
        repository: repo_dir.clone(),
        root: pins.join("root.json"),
        ci_key: pins.join("ci.pub.json"),
        health_deadline_secs: None,
    });
    setup.tpm = Some(nitrile_hostd::config::TpmConfig {
        tcti: swtpm.tcti(),
        event_log: None,
        document_certificate: None,
        tls_key: None,
    });
    cell.start_host_with("h1", setup).await;
    let state = cell.host_config("h1").state.clone();
    // The agent recorded the version it runs in the TPM at start.
    let mut tpm = nitrile_attest::Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(
        tpm.highest()
            .unwrap()
            .map(|b| nitrile_attest::version_string(&b)),
        Some("0.1.0".to_owned())
    );
    // A copy of the disk as it is now.
    let backup = cell.scratch("backup");
    copy_dir(&state.join("releases"), &backup);

    for v in ["0.5.0", "0.6.0"] {
        publish(&repo, &k, &bundle(&tmp, v, "prod", Some(&k.ci)), &[0, 1]);
    }
    let (status, body, _) = call(&cell, "0.6.0").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // 0.6.0 ran and was committed: its agent recorded it, on disk and in
    // the TPM (what `HostdHandle::committed` does).
    std::fs::write(
        state.join("releases/highest.json"),
        br#"{"version":"0.6.0"}"#,
    )
    .unwrap();
    tpm.advance_highest(nitrile_attest::version_bytes(0, 6, 0).unwrap())
        .unwrap();
    drop(tpm);

    // The disk is put back to the older copy: its record says 0.1.0.
    cell.stop_host("h1").await;
    std::fs::remove_dir_all(state.join("releases")).unwrap();
    copy_dir(&backup, &state.join("releases"));
    let restored = std::fs::read_to_string(state.join("releases/highest.json")).unwrap();
    assert!(restored.contains("0.1.0"), "{restored}");
    let setup = {
        let mut s = cell.default_setup();
        s.hypervisor.qemu = None;
        s.release = Some(ReleaseConfig {
            environment: "prod".into(),
            repository: repo_dir.clone(),
            root: pins.join("root.json"),
            ci_key: pins.join("ci.pub.json"),
            health_deadline_secs: None,
        });
        s.tpm = Some(nitrile_hostd::config::TpmConfig {
            tcti: swtpm.tcti(),
            event_log: None,
            document_certificate: None,
            tls_key: None,
        });
        s
    };
    cell.start_host_with("h1", setup).await;
    // 0.5.0 is above what the disk says, below what the TPM says: refused.
    refused(&cell, &state, "0.5.0", "rollback").await;
    let (_, body, _) = call(&cell, "0.5.0").await;
    assert!(
        refusal(&body).reason.contains("0.6.0"),
        "{}",
        refusal(&body).reason
    );
}
