//! Peer review by machine: only signatures of distinct known reviewers over
//! the current digest count, and two are needed.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::*;
use nitrile_policy::{
    Bundle, Entitlements, PolicyError, ReviewerKey, ReviewerSet, SignatureProblem, verify_bundle,
};

fn keys() -> (ReviewerKey, ReviewerKey, ReviewerKey) {
    (
        ReviewerKey::generate(name("rita")),
        ReviewerKey::generate(name("sam")),
        ReviewerKey::generate(name("tess")),
    )
}

fn set(keys: &[&ReviewerKey]) -> ReviewerSet {
    ReviewerSet::new(keys.iter().map(|k| k.reviewer())).unwrap()
}

fn rejected_problems(e: &PolicyError) -> Vec<SignatureProblem> {
    match e {
        PolicyError::NotEnoughReviewers { rejected, .. } => {
            rejected.iter().map(|r| r.problem.clone()).collect()
        }
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn unsigned_and_single_reviewer_bundles_are_refused() {
    let (rita, sam, _) = keys();
    let reviewers = set(&[&rita, &sam]);
    let dir = sample_copy();
    let e = Entitlements::load_reviewed(dir.path(), &reviewers).unwrap_err();
    assert!(
        e.to_string().contains("0 valid reviewer signature(s)"),
        "{e}"
    );

    rita.sign_dir(dir.path()).unwrap();
    let e = Entitlements::load_reviewed(dir.path(), &reviewers).unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("1 valid reviewer signature(s) (rita), 2 required"),
        "{s}"
    );
    // Asking for fewer than two does not lower the bar.
    assert!(verify_bundle(dir.path(), &reviewers, 1).is_err());
    assert!(verify_bundle(dir.path(), &reviewers, 0).is_err());
}

#[test]
fn two_distinct_reviewers_are_accepted() {
    let (rita, sam, tess) = keys();
    let reviewers = set(&[&rita, &sam, &tess]);
    let dir = sample_copy();
    let d1 = rita.sign_dir(dir.path()).unwrap();
    let d2 = sam.sign_dir(dir.path()).unwrap();
    assert_eq!(d1, d2, "signatures are not part of the digest");
    let e = Entitlements::load_reviewed(dir.path(), &reviewers).unwrap();
    assert_eq!(e.reviewers(), &[name("rita"), name("sam")]);
    assert_eq!(e.digest(), Bundle::read(dir.path()).unwrap().digest());
    // The digest is the one of the unsigned sample.
    assert_eq!(e.digest(), Bundle::read(&sample_dir()).unwrap().digest());
    // Three are fine too, and a caller may require three.
    assert!(verify_bundle(dir.path(), &reviewers, 3).is_err());
    tess.sign_dir(dir.path()).unwrap();
    assert_eq!(
        verify_bundle(dir.path(), &reviewers, 3)
            .unwrap()
            .reviewers()
            .len(),
        3
    );
}

#[test]
fn the_same_reviewer_twice_counts_once() {
    let (rita, sam, _) = keys();
    let reviewers = set(&[&rita, &sam]);
    let dir = sample_copy();
    rita.sign_dir(dir.path()).unwrap();
    // A copy of rita's signature under another file name.
    fs::copy(
        dir.path().join("signatures/rita.sig"),
        dir.path().join("signatures/sam.sig"),
    )
    .unwrap();
    let e = verify_bundle(dir.path(), &reviewers, 2).unwrap_err();
    assert!(matches!(
        rejected_problems(&e).as_slice(),
        [SignatureProblem::NameMismatch { .. }]
    ));
    // Rita renaming herself inside the file does not help either: her key
    // does not verify as sam's.
    let text = fs::read_to_string(dir.path().join("signatures/rita.sig")).unwrap();
    fs::write(
        dir.path().join("signatures/sam.sig"),
        text.replace("reviewer: rita", "reviewer: sam"),
    )
    .unwrap();
    let e = verify_bundle(dir.path(), &reviewers, 2).unwrap_err();
    assert_eq!(rejected_problems(&e), vec![SignatureProblem::BadSignature]);
    // One person cannot be listed under two names with one key.
    let mut twin = rita.reviewer();
    twin.name = name("rita-2");
    assert!(ReviewerSet::new([rita.reviewer(), twin]).is_err());
}

#[test]
fn signature_over_an_old_digest_is_refused() {
    let (rita, sam, _) = keys();
    let reviewers = set(&[&rita, &sam]);
    let dir = sample_copy();
    rita.sign_dir(dir.path()).unwrap();
    sam.sign_dir(dir.path()).unwrap();
    assert!(verify_bundle(dir.path(), &reviewers, 2).is_ok());
    // A change after review: a new grant slipped in.
    edit(
        dir.path(),
        "oncall.cedar",
        "\"host.drain\"",
        "\"host.update\", Nitrile::Action::\"host.drain\"",
    );
    let e = verify_bundle(dir.path(), &reviewers, 2).unwrap_err();
    let problems = rejected_problems(&e);
    assert_eq!(problems.len(), 2);
    assert!(
        problems
            .iter()
            .all(|p| matches!(p, SignatureProblem::StaleDigest { .. }))
    );
    assert!(
        e.to_string().contains("bundle changed after signing"),
        "{e}"
    );
    // Adding a file is a change too.
    let dir = sample_copy();
    rita.sign_dir(dir.path()).unwrap();
    sam.sign_dir(dir.path()).unwrap();
    fs::write(dir.path().join("extra.cedar"), "// nothing\n").unwrap();
    assert!(verify_bundle(dir.path(), &reviewers, 2).is_err());
}

#[test]
fn unknown_reviewer_is_refused() {
    let (rita, sam, tess) = keys();
    let reviewers = set(&[&rita, &sam]);
    let dir = sample_copy();
    rita.sign_dir(dir.path()).unwrap();
    tess.sign_dir(dir.path()).unwrap();
    let e = verify_bundle(dir.path(), &reviewers, 2).unwrap_err();
    assert_eq!(
        rejected_problems(&e),
        vec![SignatureProblem::UnknownReviewer("tess".into())]
    );
    assert!(
        e.to_string()
            .contains("signatures/tess.sig: reviewer tess is not in the reviewer set"),
        "{e}"
    );
}

#[test]
fn tampered_and_malformed_signatures_are_refused() {
    let (rita, sam, _) = keys();
    let reviewers = set(&[&rita, &sam]);
    let dir = sample_copy();
    rita.sign_dir(dir.path()).unwrap();
    sam.sign_dir(dir.path()).unwrap();
    let path = dir.path().join("signatures/sam.sig");
    let text = fs::read_to_string(&path).unwrap();
    let sig_line = text.lines().nth(3).unwrap().to_owned();
    let flipped = if sig_line.ends_with("A=") {
        sig_line.replace("A=", "B=")
    } else {
        format!("{}A=", &sig_line[..sig_line.len() - 2])
    };
    fs::write(&path, text.replace(&sig_line, &flipped)).unwrap();
    let e = verify_bundle(dir.path(), &reviewers, 2).unwrap_err();
    assert!(matches!(
        rejected_problems(&e).as_slice(),
        [SignatureProblem::BadSignature | SignatureProblem::Malformed(_)]
    ));
    fs::write(&path, "garbage").unwrap();
    let e = verify_bundle(dir.path(), &reviewers, 2).unwrap_err();
    assert!(matches!(
        rejected_problems(&e).as_slice(),
        [SignatureProblem::Malformed(_)]
    ));
}

#[test]
fn keys_round_trip_through_files_and_reviewer_toml() {
    let tmp = tempfile::tempdir().unwrap();
    let rita = ReviewerKey::generate(name("rita"));
    let sam = ReviewerKey::generate(name("sam"));
    let (key_path, pub_path) = rita.write(&tmp.path().join("rita")).unwrap();
    sam.write(&tmp.path().join("sam")).unwrap();
    let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        rita.write(&tmp.path().join("rita")).is_err(),
        "overwrote a key"
    );
    assert!(!format!("{rita:?}").contains("PRIVATE"));

    let pem = fs::read_to_string(&pub_path).unwrap();
    let toml = format!(
        "[[reviewer]]\nname = \"rita\"\npublic_key = \"\"\"\n{pem}\"\"\"\n\n\
         [[reviewer]]\nname = \"sam\"\npublic_key = \"{}\"\n",
        sam.public_key_base64()
    );
    let toml_path = tmp.path().join("reviewers.toml");
    fs::write(&toml_path, toml).unwrap();
    let reviewers = ReviewerSet::load(&toml_path).unwrap();

    let dir = sample_copy();
    ReviewerKey::load(&key_path, name("rita"))
        .unwrap()
        .sign_dir(dir.path())
        .unwrap();
    sam.sign_dir(dir.path()).unwrap();
    let reviewed = verify_bundle(dir.path(), &reviewers, 2).unwrap();
    assert_eq!(reviewed.reviewers(), &[name("rita"), name("sam")]);
    let e = Entitlements::from_reviewed(reviewed).unwrap();
    assert_eq!(e.reviewers().len(), 2);
}
