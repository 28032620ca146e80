//! The files of an entitlement bundle that people edit and sign: the quota
//! file inside the bundle, the reviewer set the cell keeps beside it, and
//! detached reviewer signatures.
//!
//! These are read from directories, so each input is written into a fresh
//! temporary copy of the sample bundle. The input is split at the first two
//! zero bytes into the quota file, the reviewer-set file and one signature
//! file (by `alice`). In the signature file, `@DIGEST@` is replaced by the
//! hex digest of the bundle, so the fuzzer gets past the digest comparison.
//! A genuine signature by `bob` is always present.
//!
//! Properties: nothing panics; quota windows print back to what they parse
//! from; the fuzzed signature never counts, so with the fixed reviewer set
//! exactly `bob` is valid and the bundle is refused at the minimum of two
//! reviewers, and with the fuzzed reviewer set too it is never accepted; a
//! bundle accepted at one reviewer loads as the unreviewed bundle does.

#![no_main]

use std::fs;
use std::path::Path;
use std::sync::LazyLock;

use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use libfuzzer_sys::fuzz_target;
use nitrile_api::Name;
use nitrile_policy::{
    Bundle, Entitlements, MIN_REVIEWERS, PolicyError, QuotaWindow, Reviewer, ReviewerKey,
    ReviewerSet, SIGNATURES_DIR, verify_bundle,
};

/// The sample bundle of the repository, without its quota file.
const SAMPLE: &[(&str, &[u8])] = &[
    (
        "schema.cedarschema",
        include_bytes!("../../entitlements/schema.cedarschema"),
    ),
    (
        "groups.json",
        include_bytes!("../../entitlements/groups.json"),
    ),
    (
        "hosts.entities.json",
        include_bytes!("../../entitlements/hosts.entities.json"),
    ),
    (
        "auditor.cedar",
        include_bytes!("../../entitlements/auditor.cedar"),
    ),
    (
        "deployer.cedar",
        include_bytes!("../../entitlements/deployer.cedar"),
    ),
    (
        "guardrails.cedar",
        include_bytes!("../../entitlements/guardrails.cedar"),
    ),
    (
        "oncall.cedar",
        include_bytes!("../../entitlements/oncall.cedar"),
    ),
    (
        "placement.cedar",
        include_bytes!("../../entitlements/placement.cedar"),
    ),
];

const ALICE_SECRET: [u8; 32] = [0xa1; 32];
const BOB_SECRET: [u8; 32] = [0xb0; 32];

struct Fixture {
    bob: ReviewerKey,
    reviewers: ReviewerSet,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let name = |s: &str| Name::new(s).expect("valid name");
    let key = |secret: &[u8; 32]| ed25519_dalek::SigningKey::from_bytes(secret);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pem_path = dir.path().join("bob.key");
    let pem = key(&BOB_SECRET)
        .to_pkcs8_pem(LineEnding::LF)
        .expect("a key encodes");
    fs::write(&pem_path, pem.as_bytes()).expect("writing the key");
    let bob = ReviewerKey::load(&pem_path, name("bob")).expect("the key loads");
    let alice = Reviewer {
        name: name("alice"),
        key: key(&ALICE_SECRET).verifying_key(),
    };
    let reviewers = ReviewerSet::new([alice, bob.reviewer()]).expect("two distinct reviewers");
    Fixture { bob, reviewers }
});

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = rest.windows(needle.len()).position(|w| w == needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

fn write(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).expect("writing a bundle file");
}

fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;
    let mut parts = data.splitn(3, |&b| b == 0);
    let quotas = parts.next().unwrap_or_default();
    let reviewer_file = parts.next().unwrap_or_default();
    let signature = parts.next().unwrap_or_default();

    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().join("bundle");
    fs::create_dir(&dir).expect("creating the bundle directory");
    for (file, bytes) in SAMPLE {
        write(&dir.join(file), bytes);
    }
    write(&dir.join("quotas.toml"), quotas);

    let loaded = Bundle::load(&dir);
    match &loaded {
        Ok(entitlements) => {
            for q in entitlements.quotas().iter() {
                assert_eq!(QuotaWindow::parse(&q.window.to_string()), Ok(q.window));
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    let digest = Bundle::read(&dir).expect("the bundle reads").digest();
    let sig_dir = dir.join(SIGNATURES_DIR);
    fs::create_dir(&sig_dir).expect("creating the signature directory");
    write(
        &sig_dir.join("bob.sig"),
        f.bob.signature_file(&digest).as_bytes(),
    );
    let signature = replace(signature, b"@DIGEST@", digest.to_hex().as_bytes());
    write(&sig_dir.join("alice.sig"), &signature);

    match verify_bundle(&dir, &f.reviewers, MIN_REVIEWERS) {
        Err(PolicyError::NotEnoughReviewers { valid, .. }) => {
            assert_eq!(valid, [Name::new("bob").expect("valid name")]);
        }
        Err(e) => panic!("unexpected refusal: {e}"),
        Ok(_) => panic!("a fuzzed signature counted"),
    }
    let reviewed = verify_bundle(&dir, &f.reviewers, 1).expect("bob's signature counts");
    assert_eq!(reviewed.digest(), digest);
    match (Entitlements::from_reviewed(reviewed), &loaded) {
        (Ok(e), Ok(l)) => assert_eq!(e.digest(), l.digest()),
        (Err(_), Err(_)) => {}
        (r, l) => panic!(
            "reviewed load ({}) disagrees with unreviewed load ({})",
            r.is_ok(),
            l.is_ok()
        ),
    }

    let reviewer_path = tmp.path().join("reviewers.toml");
    write(&reviewer_path, reviewer_file);
    if let Ok(set) = ReviewerSet::load(&reviewer_path) {
        assert!(
            verify_bundle(&dir, &set, MIN_REVIEWERS).is_err(),
            "a bundle with one genuine signature was accepted"
        );
    }
});
