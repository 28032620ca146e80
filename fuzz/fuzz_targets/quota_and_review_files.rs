//! The files of an entitlement bundle that people edit and sign: the quota
//! file inside the bundle, the reviewer set the cell keeps beside it, and
//! detached reviewer signatures.
//!
//! These are read from directories, so each input is written into a fresh
//! temporary copy of the sample bundle. The input is split at the first two
//! zero bytes into the quota file, the reviewer-set file and one signature
//! file (by `alice`). In the signature file, `@DIGEST@` is replaced by the
//! hex digest of the bundle, so the fuzzer gets past the digest comparison.
//! Genuine signatures by `bob` and `carol` are always present.
//!
//! Properties: nothing panics; quota windows print back to what they parse
//! from; the fuzzed signature never counts, with the fixed reviewer set
//! (exactly `bob` and `carol` count: accepted at two reviewers, refused at
//! three) or with the fuzzed one.

#![no_main]

use std::fs;
use std::path::Path;
use std::sync::LazyLock;

use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use libfuzzer_sys::fuzz_target;
use nitrile_api::Name;
use nitrile_policy::{
    Bundle, MIN_REVIEWERS, PolicyError, QuotaWindow, Reviewer, ReviewerKey, ReviewerSet,
    SIGNATURES_DIR, verify_bundle,
};

/// The sample bundle of the repository, without its quota file and its
/// monitor rules.
const SAMPLE: &[(&str, &[u8])] = &[
    (
        "bundle.toml",
        include_bytes!("../../entitlements/bundle.toml"),
    ),
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
const CAROL_SECRET: [u8; 32] = [0xc0; 32];

struct Fixture {
    bob: ReviewerKey,
    carol: ReviewerKey,
    reviewers: ReviewerSet,
}

fn name(s: &str) -> Name {
    Name::new(s).expect("valid name")
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let key = |secret: &[u8; 32]| ed25519_dalek::SigningKey::from_bytes(secret);
    let dir = tempfile::tempdir().expect("a temporary directory");
    // ReviewerKey is built only by generating or loading a key file.
    let load = |who: &str, secret: &[u8; 32]| {
        let path = dir.path().join(format!("{who}.key"));
        let pem = key(secret)
            .to_pkcs8_pem(LineEnding::LF)
            .expect("a key encodes");
        fs::write(&path, pem.as_bytes()).expect("writing the key");
        ReviewerKey::load(&path, name(who)).expect("the key loads")
    };
    let bob = load("bob", &BOB_SECRET);
    let carol = load("carol", &CAROL_SECRET);
    let alice = Reviewer {
        name: name("alice"),
        key: key(&ALICE_SECRET).verifying_key(),
    };
    let reviewers =
        ReviewerSet::new([alice, bob.reviewer(), carol.reviewer()]).expect("distinct reviewers");
    Fixture {
        bob,
        carol,
        reviewers,
    }
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
    for reviewer in [&f.bob, &f.carol] {
        let file = sig_dir.join(format!("{}.sig", reviewer.name()));
        write(&file, reviewer.signature_file(&digest).as_bytes());
    }
    let signature = replace(signature, b"@DIGEST@", digest.to_hex().as_bytes());
    write(&sig_dir.join("alice.sig"), &signature);

    // bob and carol signed; alice's signature is the fuzzer's and never counts.
    let genuine = [name("bob"), name("carol")];
    match verify_bundle(&dir, &f.reviewers, genuine.len() + 1) {
        Err(PolicyError::NotEnoughReviewers { valid, .. }) => assert_eq!(valid, genuine),
        Err(e) => panic!("unexpected refusal: {e}"),
        Ok(_) => panic!("a fuzzed signature counted"),
    }
    let reviewed =
        verify_bundle(&dir, &f.reviewers, MIN_REVIEWERS).expect("two genuine signatures");
    assert_eq!(reviewed.reviewers(), genuine);
    assert_eq!(reviewed.digest(), digest);

    let reviewer_path = tmp.path().join("reviewers.toml");
    write(&reviewer_path, reviewer_file);
    if let Ok(set) = ReviewerSet::load(&reviewer_path) {
        let counted = match verify_bundle(&dir, &set, MIN_REVIEWERS) {
            Ok(reviewed) => reviewed.reviewers().to_vec(),
            Err(PolicyError::NotEnoughReviewers { valid, .. }) => valid,
            Err(e) => panic!("unexpected refusal: {e}"),
        };
        assert!(
            !counted.contains(&name("alice")),
            "a fuzzed signature counted"
        );
    }
});
