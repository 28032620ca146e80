//! Bundles are ordered: the serial in `bundle.toml` is signed with the
//! rest, a bundle without one is refused, and a service that has loaded a
//! serial never loads an older bundle again, however valid its signatures.

mod common;

use std::fs;

use common::*;
use nitrile_policy::{
    Bundle, PolicyError, ReviewerKey, ReviewerSet, SERIAL_FILE, SerialError, SerialStore,
    SignatureProblem, verify_bundle, verify_unserialed_bundle,
};

fn reviewers() -> (ReviewerKey, ReviewerKey, ReviewerSet) {
    let rita = ReviewerKey::generate(name("rita"));
    let sam = ReviewerKey::generate(name("sam"));
    let set = ReviewerSet::new([rita.reviewer(), sam.reviewer()]).unwrap();
    (rita, sam, set)
}

fn set_serial(dir: &std::path::Path, serial: u64) {
    fs::write(dir.join("bundle.toml"), format!("serial = {serial}\n")).unwrap();
}

#[test]
fn a_bundle_without_a_serial_is_refused() {
    let dir = sample_copy();
    fs::remove_file(dir.path().join("bundle.toml")).unwrap();
    let e = Bundle::read(dir.path()).unwrap_err();
    assert!(matches!(e, PolicyError::MissingManifest), "{e}");
    assert!(e.to_string().contains("serial = 1"), "{e}");
    // Nor can it be signed.
    let (rita, _, _) = reviewers();
    assert!(rita.sign_dir(dir.path()).is_err());

    for (bad, what) in [
        ("serial = 0\n", "from 1"),
        ("serial = \"one\"\n", "invalid bundle.toml"),
        ("serial = 1\nowner = \"me\"\n", "invalid bundle.toml"),
    ] {
        fs::write(dir.path().join("bundle.toml"), bad).unwrap();
        let e = Bundle::read(dir.path()).unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("bundle.toml:") && s.contains(what),
            "{bad:?}: {s}"
        );
    }
}

#[test]
fn the_serial_is_signed_with_the_rest() {
    let (rita, sam, set) = reviewers();
    let dir = sample_copy();
    assert_eq!(Bundle::read(dir.path()).unwrap().serial().get(), 1);
    rita.sign_dir(dir.path()).unwrap();
    sam.sign_dir(dir.path()).unwrap();
    let reviewed = verify_bundle(dir.path(), &set, 2).unwrap();
    assert_eq!(reviewed.serial().get(), 1);
    assert_eq!(reviewed.version().digest, reviewed.digest());
    // Raising the serial after review needs new signatures: old ones are stale.
    set_serial(dir.path(), 7);
    let e = verify_bundle(dir.path(), &set, 2).unwrap_err();
    let PolicyError::NotEnoughReviewers { rejected, .. } = &e else {
        panic!("{e}")
    };
    assert!(
        rejected
            .iter()
            .all(|r| matches!(r.problem, SignatureProblem::StaleDigest { .. }))
    );
    rita.sign_dir(dir.path()).unwrap();
    sam.sign_dir(dir.path()).unwrap();
    assert_eq!(
        verify_bundle(dir.path(), &set, 2).unwrap().serial().get(),
        7
    );
}

#[test]
fn monitor_rules_are_reviewed_files_of_the_bundle() {
    let (rita, sam, set) = reviewers();
    let dir = sample_copy();
    rita.sign_dir(dir.path()).unwrap();
    sam.sign_dir(dir.path()).unwrap();
    let reviewed = verify_bundle(dir.path(), &set, 2).unwrap();
    let rules: Vec<&str> = reviewed.bundle().rule_files().map(|(p, _)| p).collect();
    assert!(
        rules.contains(&"rules/sensitive-operation.yml"),
        "{rules:?}"
    );
    assert!(
        reviewed
            .bundle()
            .reviewed_paths()
            .contains(&"rules/sensitive-operation.yml".to_owned())
    );
    // An edited rule is a change after review.
    let rule = dir.path().join("rules/sensitive-operation.yml");
    let text = fs::read_to_string(&rule).unwrap();
    fs::write(&rule, text.replace("host.drain", "host.nothing")).unwrap();
    assert!(verify_bundle(dir.path(), &set, 2).is_err());
    // So is a new or a removed one.
    let dir = sample_copy();
    rita.sign_dir(dir.path()).unwrap();
    sam.sign_dir(dir.path()).unwrap();
    fs::remove_file(dir.path().join("rules/many-hosts.yml")).unwrap();
    assert!(verify_bundle(dir.path(), &set, 2).is_err());
    // Only rule files live under rules/.
    let dir = sample_copy();
    fs::write(dir.path().join("rules/notes.txt"), "x").unwrap();
    assert!(matches!(
        Bundle::read(dir.path()),
        Err(PolicyError::UnknownFile { .. })
    ));
}

/// The attack: serial 1 signed and loaded, serial 2 (a revocation) signed
/// and loaded, then the serial-1 directory restored with its valid
/// signatures.
#[test]
fn a_restored_older_bundle_with_valid_signatures_is_refused() {
    let (rita, sam, set) = reviewers();
    let state = tempfile::tempdir().unwrap();
    let serial_file = state.path().join(SERIAL_FILE);
    let v1 = sample_copy();
    rita.sign_dir(v1.path()).unwrap();
    sam.sign_dir(v1.path()).unwrap();
    let mut store = SerialStore::open(&serial_file).unwrap();
    let loaded_1 = verify_bundle(v1.path(), &set, 2).unwrap().version();
    let advance = store.check(loaded_1).unwrap();
    store.record(&advance).unwrap();

    // Serial 2 revokes bob's on-call membership.
    let v2 = sample_copy();
    edit(
        v2.path(),
        "groups.json",
        r#"{"uid": {"type": "Nitrile::Operator", "id": "bob"}, "attrs": {},
   "parents": [{"type": "Nitrile::Group", "id": "oncall"}]}"#,
        r#"{"uid": {"type": "Nitrile::Operator", "id": "bob"}, "attrs": {}, "parents": []}"#,
    );
    set_serial(v2.path(), 2);
    rita.sign_dir(v2.path()).unwrap();
    sam.sign_dir(v2.path()).unwrap();
    let loaded_2 = verify_bundle(v2.path(), &set, 2).unwrap().version();
    let mut store = SerialStore::open(&serial_file).unwrap();
    let advance = store.check(loaded_2).unwrap();
    assert_eq!(advance.previous(), Some(loaded_1));
    store.record(&advance).unwrap();

    // The old directory still verifies...
    let restored = verify_bundle(v1.path(), &set, 2).unwrap();
    // ...but is older than what was loaded.
    let store = SerialStore::open(&serial_file).unwrap();
    let e = store.check(restored.version()).unwrap_err();
    assert!(matches!(e, SerialError::Rollback { .. }), "{e}");
    let s = e.to_string();
    assert!(s.contains("serial 1") && s.contains("serial 2"), "{s}");
    assert_eq!(store.recorded(), Some(loaded_2));

    // Re-signing the old content under serial 2 does not pass either.
    set_serial(v1.path(), 2);
    rita.sign_dir(v1.path()).unwrap();
    sam.sign_dir(v1.path()).unwrap();
    let resigned = verify_bundle(v1.path(), &set, 2).unwrap();
    let e = store.check(resigned.version()).unwrap_err();
    assert!(matches!(e, SerialError::SerialReused { .. }), "{e}");
}

#[test]
fn a_bundle_of_the_format_before_serials_is_verified_for_migration_only() {
    let (rita, sam, set) = reviewers();
    let dir = sample_copy();
    fs::remove_file(dir.path().join("bundle.toml")).unwrap();
    fs::remove_dir_all(dir.path().join("rules")).unwrap();
    // Signed the way it was: over the digest of what is there.
    let PolicyError::NotEnoughReviewers { digest, .. } =
        verify_unserialed_bundle(dir.path(), &set).unwrap_err()
    else {
        panic!()
    };
    fs::create_dir(dir.path().join("signatures")).unwrap();
    for k in [&rita, &sam] {
        fs::write(
            dir.path().join(format!("signatures/{}.sig", k.name())),
            k.signature_file(&digest),
        )
        .unwrap();
    }
    let old = verify_unserialed_bundle(dir.path(), &set).unwrap();
    assert_eq!(old.digest(), digest);
    assert_eq!(old.reviewers(), &[name("rita"), name("sam")]);
    // It is never loaded as it is.
    assert!(matches!(
        verify_bundle(dir.path(), &set, 2),
        Err(PolicyError::MissingManifest)
    ));
    // An edit without review is refused by the migration check too.
    edit(dir.path(), "oncall.cedar", "host.drain", "host.update");
    assert!(verify_unserialed_bundle(dir.path(), &set).is_err());
}
