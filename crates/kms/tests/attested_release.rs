//! The key service taking each host's reference PCR values from the signed
//! releases of its environment (`[attestation] release`): a TUF repository
//! with 2 of 3 release signers, the CI's test attestation, and releases
//! carrying `host-references.json`. A host whose document shows its entry
//! in a release that verifies gets its volume key; each of these is
//! refused, journaled, and no key leaves: a host the releases do not list
//! (showing another host's values), a release below the signer threshold
//! (staged, or published around the tool), a tampered references file in
//! the repository (which does not bring older values back either), a
//! release built for another environment, a release
//! without the CI's attestation or with another key's, a repository whose
//! root is not the pinned one, and the values of a release no longer among
//! the newest believed once the repository is read again.
//!
//! Needs swtpm and root (swtpm's local CA); prints `SKIPPED: <reason>`
//! without them.

mod svc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nitrile_api::Operation;
use nitrile_attest::swtpm::{self, Swtpm};
use nitrile_attest::{HOST_PCRS, Tpm, cose};
use nitrile_audit::{AuditRecord, RecordKind};
use nitrile_kms::{AttestationPolicy, KmsConfig, Recipient, ReferenceSource, ReleaseReferences};
use nitrile_kms_api::KmsClientError;
use nitrile_kms_api::wire::{AttestationHex, RecipientKey, WrappedKeyBytes};
use nitrile_pki::{CellCa, KeyPurpose};
use nitrile_release::keys::ReleaseKey;
use nitrile_release::repo::{self, InitOptions, Repo};
use nitrile_release::{
    Environment, HOST_REFERENCES_FILE, HostReference, HostReferences, attest, manifest,
};
use svc::{Cell, Running, n, p};
use time::OffsetDateTime;

fn skip() -> bool {
    match swtpm::usable() {
        Ok(()) => false,
        Err(why) => {
            println!("SKIPPED: {why}");
            true
        }
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

struct Keys {
    root: ReleaseKey,
    signers: Vec<ReleaseKey>,
    online: ReleaseKey,
    ci: ReleaseKey,
}

/// Host values: the TPM's own, or the TPM's with another PCR 15.
#[derive(Clone, Copy)]
enum Values {
    Tpm,
    Other,
}

/// A cell whose key service takes host references from the signed
/// releases of `repo`, and host h1 (and h2, on the same TPM) booted and
/// enrolled: the CA certified the TPM's document key for each.
struct Setup {
    cell: Cell,
    _swtpm: Swtpm,
    tcti: String,
    pcrs: BTreeMap<u8, [u8; 32]>,
    certs: BTreeMap<&'static str, Vec<u8>>,
    ca_der: Vec<u8>,
    keys: Keys,
    repo: Repo,
    bundles: PathBuf,
    next_bundle: std::cell::Cell<u32>,
}

impl Setup {
    /// The repository is for `repo_env`; the key service believes
    /// releases for prod only.
    fn new(repo_env: &str) -> Self {
        let mut cell = Cell::new();
        let swtpm = Swtpm::start(&cell.dir.path().join("tpm")).unwrap();
        let tcti = swtpm.tcti();
        let mut tpm = Tpm::open(&tcti).unwrap();
        tpm.extend(11, [1u8; 32]).unwrap();
        tpm.extend(15, [2u8; 32]).unwrap();
        let pcrs = tpm.pcrs(&HOST_PCRS).unwrap().0;
        let doc_point = tpm.document_key().unwrap().document_point().unwrap();
        drop(tpm);
        let at = now();
        let ca = CellCa::load(&cell.dir.path().join("pki"), &n(svc::CELL), at).unwrap();
        let certs = ["h1", "h2"]
            .into_iter()
            .map(|h| {
                let pem = ca
                    .issue_for_key(
                        &p(&format!("host/{h}")),
                        &doc_point,
                        KeyPurpose::Attestation,
                        None,
                        at,
                    )
                    .unwrap();
                (h, der(&pem))
            })
            .collect();
        let ca_der = der(&std::fs::read_to_string(&cell.config.ca).unwrap());

        let keys = Keys {
            root: ReleaseKey::generate(),
            signers: (0..3).map(|_| ReleaseKey::generate()).collect(),
            online: ReleaseKey::generate(),
            ci: ReleaseKey::generate(),
        };
        let releases = cell.dir.path().join("releases");
        let repo = repo::init(
            &releases.join("repo"),
            &InitOptions {
                environment: Environment::new(repo_env).unwrap(),
                root_keys: vec![keys.root.public()],
                root_threshold: 1,
                signers: keys.signers.iter().map(ReleaseKey::public).collect(),
                threshold: 2,
                online: keys.online.public(),
                root_expiry_days: 30,
            },
            std::slice::from_ref(&keys.root),
            now(),
        )
        .unwrap();
        // What the key service pins at provisioning.
        let pins = releases.join("pins");
        std::fs::create_dir_all(&pins).unwrap();
        std::fs::copy(
            repo.dir().join("metadata/root.json"),
            pins.join("root.json"),
        )
        .unwrap();
        std::fs::write(pins.join("ci.pub.json"), keys.ci.public_json()).unwrap();
        cell.config.attestation = Some(AttestationPolicy {
            references: ReferenceSource::Release(ReleaseReferences {
                repository: repo.dir().to_owned(),
                root: pins.join("root.json"),
                ci_key: pins.join("ci.pub.json"),
                environment: Environment::new("prod").unwrap(),
                releases: None,
                refresh_secs: None,
            }),
            max_age_secs: Some(300),
        });
        Self {
            cell,
            _swtpm: swtpm,
            tcti,
            pcrs,
            certs,
            ca_der,
            keys,
            repo,
            bundles: releases,
            next_bundle: std::cell::Cell::new(0),
        }
    }

    fn release_config(&mut self) -> &mut ReleaseReferences {
        match &mut self.cell.config.attestation {
            Some(AttestationPolicy {
                references: ReferenceSource::Release(r),
                ..
            }) => r,
            _ => unreachable!("the setup pins a release repository"),
        }
    }

    fn values(&self, v: Values) -> BTreeMap<u8, [u8; 32]> {
        let mut pcrs = self.pcrs.clone();
        if let Values::Other = v {
            pcrs.insert(15, [3u8; 32]);
        }
        pcrs
    }

    /// A bundle of `version` for `env` whose host references give each of
    /// `hosts` its values, attested by `ci` when given.
    fn bundle(
        &self,
        version: &str,
        env: &str,
        hosts: &[(&str, Values)],
        ci: Option<&ReleaseKey>,
    ) -> PathBuf {
        let i = self.next_bundle.get();
        self.next_bundle.set(i + 1);
        let src = self.bundles.join(format!("src-{i}"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("nitrile"), format!("the nitrile binary {version}")).unwrap();
        let references = HostReferences::new(
            hosts
                .iter()
                .map(|(h, v)| (n(h), HostReference::new(self.values(*v)).unwrap()))
                .collect(),
        )
        .unwrap();
        std::fs::write(src.join(HOST_REFERENCES_FILE), references.to_bytes()).unwrap();
        let out = self.bundles.join(format!("bundle-{i}"));
        let m = manifest::build(
            version.parse().unwrap(),
            Environment::new(env).unwrap(),
            &[
                ("nitrile".into(), src.join("nitrile")),
                (HOST_REFERENCES_FILE.into(), src.join(HOST_REFERENCES_FILE)),
            ],
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

    /// Stages `bundle` and signs it with `signers`.
    fn stage(&self, bundle: &Path, signers: &[usize]) {
        self.repo.stage(bundle, false, now()).unwrap();
        for &i in signers {
            self.repo.sign(&self.keys.signers[i]).unwrap();
        }
    }

    /// Stages, signs with `signers` (at least the threshold) and publishes.
    fn publish(&self, bundle: &Path, signers: &[usize]) {
        self.stage(bundle, signers);
        self.repo.publish(&self.keys.online, now(), None).unwrap();
    }

    /// A document h1 or h2 makes for an unwrap to `recipient`: signed in
    /// the TPM by the certified document key, showing the PCRs it holds.
    fn document(&self, host: &str, recipient: &[u8; 32]) -> AttestationHex {
        let mut tpm = Tpm::open(&self.tcti).unwrap();
        let pcrs = tpm.pcrs(&HOST_PCRS).unwrap();
        let payload = cose::payload(
            host,
            now_ms(),
            &pcrs,
            &self.certs[host],
            std::slice::from_ref(&self.ca_der),
            Some(recipient),
            None,
            None,
        );
        let sig = tpm.sign_document(&cose::to_be_signed(&payload)).unwrap();
        AttestationHex::new(&cose::sign1(&payload, &sig)).unwrap()
    }

    /// Makes volume v1's key (no attestation is needed for that).
    async fn volume(&self, running: &Running) -> WrappedKeyBytes {
        let token = self.cell.token(
            "service/placement",
            "h1",
            &[Operation::VolumeCreate],
            &["volume/v1"],
        );
        let mut h1 = self.cell.client(running, "host/h1").await;
        h1.generate(&n("v1"), &n("default"), &token)
            .await
            .unwrap()
            .wrapped_key
    }

    /// `host` asks for v1's key with its document.
    async fn unwrap(
        &self,
        running: &Running,
        host: &str,
        wrapped: &WrappedKeyBytes,
    ) -> Result<(), KmsClientError> {
        let vmm = Recipient::generate().unwrap();
        let pk = RecipientKey(*vmm.public_key().as_bytes());
        let token = self.cell.token(
            "service/placement",
            host,
            &[Operation::VolumeAttach],
            &["volume/v1"],
        );
        let doc = self.document(host, &pk.0);
        let mut client = self.cell.client(running, &format!("host/{host}")).await;
        let sealed = client
            .unwrap_attested(&n("v1"), wrapped, &pk, Some(doc), &token)
            .await?;
        let sealed = nitrile_kms::SealedKey::decode(sealed.as_bytes()).unwrap();
        assert!(vmm.open(&sealed, &n("v1")).is_ok());
        Ok(())
    }

    /// `host` gets v1's key, and the record says which release's values
    /// it showed.
    async fn released(
        &self,
        running: &Running,
        host: &str,
        wrapped: &WrappedKeyBytes,
        release: &str,
    ) {
        let before = self.released_count();
        self.unwrap(running, host, wrapped)
            .await
            .unwrap_or_else(|e| panic!("{host} was refused: {e:?}"));
        assert_eq!(self.released_count(), before + 1);
        let record = self
            .cell
            .journal()
            .into_iter()
            .rev()
            .find(is_release)
            .unwrap();
        assert_eq!(
            record.detail.unwrap()["params"]["attested"],
            format!("release {release}")
        );
    }

    /// `host` is refused v1's key for a reason containing `why`: 403, the
    /// refusal journaled, no key released.
    async fn refused(&self, running: &Running, host: &str, wrapped: &WrappedKeyBytes, why: &str) {
        let before = self.released_count();
        let (status, refusal) = svc::refusal(self.unwrap(running, host, wrapped).await);
        assert_eq!(status, 403, "{why}: {refusal:?}");
        assert!(
            refusal.reason.contains(why),
            "expected {why:?}, refused for {:?}",
            refusal.reason
        );
        let start: String = refusal.reason.chars().take(80).collect();
        let journaled = self.cell.journal().into_iter().any(|r| {
            r.kind == RecordKind::Refusal
                && r.reason
                    .as_deref()
                    .is_some_and(|x| x.starts_with(&format!("attestation: {start}")))
        });
        assert!(journaled, "{why}: not journaled");
        assert_eq!(self.released_count(), before, "{why}: a key was released");
    }

    fn released_count(&self) -> usize {
        self.cell.journal().iter().filter(|r| is_release(r)).count()
    }

    /// The records the service made of what it believes, in order.
    fn believed(&self) -> Vec<String> {
        self.cell
            .journal()
            .into_iter()
            .filter(|r| {
                r.detail
                    .as_ref()
                    .is_some_and(|d| d.get("host_references").is_some())
            })
            .filter_map(|r| r.reason)
            .collect()
    }

    /// Moves the service's clock past its refresh interval.
    fn after_refresh(&self) {
        self.cell.clock.advance(time::Duration::seconds(
            nitrile_kms::service::DEFAULT_REFRESH_SECS as i64 + 1,
        ));
    }
}

fn is_release(r: &AuditRecord) -> bool {
    r.kind == RecordKind::Outcome
        && r.detail
            .as_ref()
            .is_some_and(|d| d["released"] == "sealed to the recipient")
}

/// Restarts the service with its config changed (same state, keys and
/// datastore).
async fn restart(s: &mut Setup, running: Running, change: impl FnOnce(&mut KmsConfig)) -> Running {
    running.stop().await;
    change(&mut s.cell.config);
    s.cell.start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_in_a_signed_attested_release_gets_its_key_and_an_unlisted_host_does_not() {
    if skip() {
        return;
    }
    let s = Setup::new("prod");
    // h1's image is in the release; h2, on the very same TPM and software,
    // is not (h3 is, with other values).
    let b = s.bundle(
        "1.0.0",
        "prod",
        &[("h1", Values::Tpm), ("h3", Values::Other)],
        Some(&s.keys.ci),
    );
    s.publish(&b, &[0, 2]);
    let running = s.cell.start().await;
    assert_eq!(
        s.believed(),
        ["host references believed from signed releases 1.0.0"]
    );
    let wrapped = s.volume(&running).await;
    s.released(&running, "h1", &wrapped, "1.0.0").await;
    // h2 shows exactly h1's values, which are not h2's.
    s.refused(
        &running,
        "h2",
        &wrapped,
        "h2 is in no signed release's host references (releases 1.0.0)",
    )
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_below_the_signer_threshold_is_not_believed() {
    if skip() {
        return;
    }
    let s = Setup::new("prod");
    s.publish(
        &s.bundle("1.0.0", "prod", &[("h1", Values::Other)], Some(&s.keys.ci)),
        &[0, 1],
    );
    // 1.1.0 names h1's values but only one signer signed it: staged, not
    // published.
    s.stage(
        &s.bundle("1.1.0", "prod", &[("h1", Values::Tpm)], Some(&s.keys.ci)),
        &[2],
    );
    let running = s.cell.start().await;
    let wrapped = s.volume(&running).await;
    s.refused(
        &running,
        "h1",
        &wrapped,
        "h1's PCRs are not its reference values in any signed release believed (PCR 15 in 1.0.0 differ)",
    )
    .await;

    // Published around the tool's check, with its one signature: the TUF
    // client refuses the repository, and nothing is believed.
    let staged = s.repo.staged().unwrap().unwrap().signed.version;
    let staged_path = s.repo.dir().join("staged/targets.json");
    let published_path = s.repo.dir().join(format!("metadata/{staged}.targets.json"));
    std::fs::rename(&staged_path, &published_path).unwrap();
    s.repo.publish(&s.keys.online, now(), None).unwrap();
    s.after_refresh();
    s.refused(
        &running,
        "h1",
        &wrapped,
        "no signed release's host references are believed: the TUF repository was refused",
    )
    .await;
    assert!(
        s.believed()
            .last()
            .unwrap()
            .starts_with("no host references believed: the TUF repository was refused"),
        "{:?}",
        s.believed()
    );

    // A second signer signs the same targets: now it is a release, and h1
    // gets its key under it.
    std::fs::rename(&published_path, &staged_path).unwrap();
    assert_eq!(s.repo.sign(&s.keys.signers[0]).unwrap(), (2, 2));
    s.repo.publish(&s.keys.online, now(), None).unwrap();
    s.after_refresh();
    s.released(&running, "h1", &wrapped, "1.1.0").await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_host_references_file_is_not_believed_nor_brings_older_values_back() {
    if skip() {
        return;
    }
    let mut s = Setup::new("prod");
    s.release_config().releases = Some(1);
    s.publish(
        &s.bundle("1.0.0", "prod", &[("h1", Values::Tpm)], Some(&s.keys.ci)),
        &[0, 1],
    );
    let running = s.cell.start().await;
    let wrapped = s.volume(&running).await;
    s.released(&running, "h1", &wrapped, "1.0.0").await;
    // 1.1.0 gives h1 other values; the repository's copy of its file is
    // then changed to give h1 the values its TPM shows.
    let b = s.bundle("1.1.0", "prod", &[("h1", Values::Other)], Some(&s.keys.ci));
    s.publish(&b, &[0, 1]);
    let digest = manifest::digest_file(&b.join(HOST_REFERENCES_FILE))
        .unwrap()
        .sha256;
    let stored = s
        .repo
        .dir()
        .join(format!("targets/{digest}.v1.1.0-{HOST_REFERENCES_FILE}"));
    assert!(stored.is_file());
    let forged =
        HostReferences::new([(n("h1"), HostReference::new(s.values(Values::Tpm)).unwrap())].into())
            .unwrap();
    std::fs::write(&stored, forged.to_bytes()).unwrap();
    s.after_refresh();
    // Neither the forged values nor 1.0.0's, which 1.1.0 retired.
    s.refused(
        &running,
        "h1",
        &wrapped,
        "no signed release's host references are believed: no release of the repository \
         verifies with host references (1.1.0: the TUF repository was refused",
    )
    .await;
    assert_eq!(s.released_count(), 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_for_another_environment_is_not_believed() {
    if skip() {
        return;
    }
    // A staging repository, whose root the prod key service pinned by
    // mistake: its release names h1's values, and is built for staging.
    let mut s = Setup::new("staging");
    s.publish(
        &s.bundle("1.0.0", "staging", &[("h1", Values::Tpm)], Some(&s.keys.ci)),
        &[0, 1],
    );
    let running = s.cell.start().await;
    let wrapped = s.volume(&running).await;
    s.refused(
        &running,
        "h1",
        &wrapped,
        "release 1.0.0 is built for staging, and this is prod",
    )
    .await;
    // A key service of staging believes it.
    let running = restart(&mut s, running, |c| {
        if let Some(AttestationPolicy {
            references: ReferenceSource::Release(r),
            ..
        }) = &mut c.attestation
        {
            r.environment = Environment::new("staging").unwrap();
        }
    })
    .await;
    s.released(&running, "h1", &wrapped, "1.0.0").await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_without_the_ci_attestation_is_not_believed() {
    if skip() {
        return;
    }
    let s = Setup::new("prod");
    s.publish(
        &s.bundle("1.0.0", "prod", &[("h1", Values::Tpm)], None),
        &[0, 1],
    );
    let running = s.cell.start().await;
    let wrapped = s.volume(&running).await;
    s.refused(
        &running,
        "h1",
        &wrapped,
        "the test attestation of 1.0.0 is refused: the release has no test attestation",
    )
    .await;
    // Attested by a key that is not the pinned CI key.
    let rogue = ReleaseKey::generate();
    s.publish(
        &s.bundle("1.1.0", "prod", &[("h1", Values::Tpm)], Some(&rogue)),
        &[0, 1],
    );
    s.after_refresh();
    s.refused(
        &running,
        "h1",
        &wrapped,
        "the test attestation of 1.1.0 is refused",
    )
    .await;
    // Attested by CI: believed.
    s.publish(
        &s.bundle("1.2.0", "prod", &[("h1", Values::Tpm)], Some(&s.keys.ci)),
        &[1, 2],
    );
    s.after_refresh();
    s.released(&running, "h1", &wrapped, "1.2.0").await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_release_retires_the_oldest_values_once_the_repository_is_read_again() {
    if skip() {
        return;
    }
    let mut s = Setup::new("prod");
    s.release_config().releases = Some(1);
    s.publish(
        &s.bundle("1.0.0", "prod", &[("h1", Values::Tpm)], Some(&s.keys.ci)),
        &[0, 1],
    );
    let running = s.cell.start().await;
    let wrapped = s.volume(&running).await;
    s.released(&running, "h1", &wrapped, "1.0.0").await;
    // 1.1.0 gives h1 other values. Until the repository is read again,
    // 1.0.0's still hold.
    s.publish(
        &s.bundle("1.1.0", "prod", &[("h1", Values::Other)], Some(&s.keys.ci)),
        &[0, 2],
    );
    s.released(&running, "h1", &wrapped, "1.0.0").await;
    s.after_refresh();
    s.refused(
        &running,
        "h1",
        &wrapped,
        "h1's PCRs are not its reference values in any signed release believed (PCR 15 in 1.1.0 differ)",
    )
    .await;
    assert_eq!(
        s.believed(),
        [
            "host references believed from signed releases 1.0.0",
            "host references believed from signed releases 1.1.0",
        ]
    );
    // With the two newest believed (the default), a host not yet updated
    // still gets its key.
    let running = restart(&mut s, running, |c| {
        if let Some(AttestationPolicy {
            references: ReferenceSource::Release(r),
            ..
        }) = &mut c.attestation
        {
            r.releases = None;
        }
    })
    .await;
    s.released(&running, "h1", &wrapped, "1.0.0").await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_that_does_not_verify_releases_no_key_and_the_service_still_starts() {
    if skip() {
        return;
    }
    let mut s = Setup::new("prod");
    s.publish(
        &s.bundle("1.0.0", "prod", &[("h1", Values::Tpm)], Some(&s.keys.ci)),
        &[0, 1],
    );
    // The pinned root is another repository's.
    let other = ReleaseKey::generate();
    let elsewhere = s.bundles.join("elsewhere");
    repo::init(
        &elsewhere,
        &InitOptions {
            environment: Environment::new("prod").unwrap(),
            root_keys: vec![other.public()],
            root_threshold: 1,
            signers: vec![other.public()],
            threshold: 1,
            online: other.public(),
            root_expiry_days: 30,
        },
        std::slice::from_ref(&other),
        now(),
    )
    .unwrap();
    let pinned = s.release_config().root.clone();
    std::fs::copy(elsewhere.join("metadata/root.json"), &pinned).unwrap();
    let running = s.cell.start().await;
    let believed = s.believed();
    assert_eq!(believed.len(), 1);
    assert!(
        believed[0].starts_with("no host references believed: the TUF repository was refused"),
        "{believed:?}"
    );
    let wrapped = s.volume(&running).await;
    s.refused(
        &running,
        "h1",
        &wrapped,
        "no signed release's host references are believed: the TUF repository was refused",
    )
    .await;
    // The right root pinned: a failed lookup reads the repository again,
    // at most once per 10 s.
    std::fs::copy(s.repo.dir().join("metadata/1.root.json"), &pinned).unwrap();
    s.refused(
        &running,
        "h1",
        &wrapped,
        "no signed release's host references are believed",
    )
    .await;
    s.cell.clock.advance(time::Duration::seconds(10));
    s.released(&running, "h1", &wrapped, "1.0.0").await;
    running.stop().await;
}
