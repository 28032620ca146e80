//! The state directory: one key service at a time, private modes, every
//! file refused by name when malformed, everything back after a restart,
//! leftovers of interrupted writes erased, and unwrapping that neither
//! reads nor writes a file.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{Fixture, T0, files_under, key, kms_principal, name};
use nitrile_kms::{KeyName, KeyState, Kms, Malformed, Recipient, StoreError};
use time::Duration;

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_second_open_of_one_state_directory_is_refused() {
    let f = Fixture::new();
    let e = Kms::open(&f.state).unwrap_err();
    assert!(
        matches!(&e, StoreError::Locked { path } if path == &f.state.join("lock")),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("locked by another key service"),
        "{e}"
    );
    // Another process sees the lock held (util-linux flock(1), the same
    // flock(2) lock).
    let other_process = |state: &Path| {
        std::process::Command::new("flock")
            .arg("--nonblock")
            .arg(state.join("lock"))
            .arg("true")
            .status()
    };
    match other_process(&f.state) {
        Ok(status) => assert!(!status.success(), "another process took the lock"),
        Err(e) => println!("SKIPPED: the other-process check: flock(1) cannot run: {e}"),
    }
    // Once the first is dropped, the directory opens.
    drop(f.kms);
    if let Ok(status) = other_process(&f.state) {
        assert!(
            status.success(),
            "the lock is released when the Kms is dropped"
        );
    }
    let again = Kms::open(&f.state).unwrap();
    assert_eq!(again.list_keys().len(), 1);
}

#[test]
fn the_state_directory_and_its_files_are_private() {
    let f = Fixture::new();
    f.kms
        .generate_volume_key(&name("v1"), &KeyName::default_key(), T0)
        .unwrap();
    for d in [
        f.state.clone(),
        f.state.join("keys"),
        f.state.join("volumes"),
    ] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    let files = files_under(&f.state);
    assert_eq!(
        files,
        [
            f.state.join("keys/default.json"),
            f.state.join("keys/default.key"),
            f.state.join("lock"),
            f.state.join("volumes/v1.json"),
        ]
    );
    for file in files {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    assert_eq!(
        fs::read(f.state.join("keys/default.key")).unwrap().len(),
        32
    );
}

#[test]
fn a_state_directory_open_to_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("kms");
    drop(Kms::open(&state).unwrap());
    for m in [0o755, 0o710, 0o701] {
        fs::set_permissions(&state, fs::Permissions::from_mode(m)).unwrap();
        let e = Kms::open(&state).unwrap_err();
        assert!(
            matches!(&e, StoreError::Permissions { path, mode } if path == &state && *mode == m),
            "{e:?}"
        );
    }
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(state.join("volumes"), fs::Permissions::from_mode(0o750)).unwrap();
    assert!(matches!(
        Kms::open(&state),
        Err(StoreError::Permissions { path, .. }) if path == state.join("volumes")
    ));
}

#[test]
fn a_restart_reloads_every_key_state_and_volume_record() {
    let f = Fixture::new();
    let owner = nitrile_api::PrincipalId::parse("nitrile://c1/operator/carol").unwrap();
    f.kms.create_key(&key("off"), &owner, T0).unwrap();
    f.kms.create_key(&key("going"), &owner, T0).unwrap();
    let mut wrapped = Vec::new();
    for (v, k) in [("v1", "default"), ("v2", "off"), ("v3", "going")] {
        let w = f
            .kms
            .generate_volume_key(&name(v), &key(k), T0 + Duration::seconds(1))
            .unwrap()
            .wrapped
            .encode();
        let dek = f.kms.export_volume_key_for_tests(&name(v), &w).unwrap();
        wrapped.push((name(v), w, dek));
    }
    f.kms
        .disable_key(&key("off"), T0 + Duration::seconds(2))
        .unwrap();
    f.kms
        .schedule_key_deletion(&key("going"), Some(9), T0 + Duration::nanoseconds(1_500))
        .unwrap();
    let keys = f.kms.list_keys();
    let volumes = f.kms.list_volumes();
    drop(f.kms);

    let k = Kms::open(&f.state).unwrap();
    assert_eq!(k.list_keys(), keys);
    assert_eq!(k.list_volumes(), volumes);
    assert_eq!(k.open_report().keys, 3);
    assert_eq!(k.open_report().volumes, 3);
    assert!(k.open_report().erased.is_empty());
    assert_eq!(
        k.describe_key(&key("going")).unwrap().state,
        KeyState::PendingDeletion {
            delete_at: T0 + Duration::nanoseconds(1_500) + Duration::days(9)
        }
    );
    // The same wrapped keys open to the same data keys.
    let r = Recipient::generate().unwrap();
    k.enable_key(&key("off"), T0).unwrap();
    k.cancel_key_deletion(&key("going"), T0).unwrap();
    k.enable_key(&key("going"), T0).unwrap();
    for (v, w, dek) in &wrapped {
        let sealed = k.unwrap_sealed(v, w, r.public_key(), T0).unwrap();
        assert_eq!(*r.open(&sealed, v).unwrap(), **dek);
    }
}

/// A change to a file's text, and what it breaks.
type Edit = Box<dyn Fn(&str) -> String>;

/// Opens `state` and expects a refusal naming `path`.
fn refused_naming(state: &Path, path: &Path) -> StoreError {
    let e = Kms::open(state).unwrap_err();
    assert!(
        e.to_string().contains(&path.display().to_string()),
        "{e} does not name {}",
        path.display()
    );
    e
}

/// A state directory with the default key and volume v1, closed.
fn closed_store() -> (tempfile::TempDir, PathBuf) {
    let f = Fixture::new();
    f.kms
        .generate_volume_key(&name("v1"), &KeyName::default_key(), T0)
        .unwrap();
    let Fixture { dir, state, kms } = f;
    drop(kms);
    (dir, state)
}

#[test]
fn a_malformed_key_file_is_refused_naming_it() {
    let cases: Vec<(&str, Edit)> = vec![
        ("not json", Box::new(|_| "{".to_owned())),
        ("empty", Box::new(|_| String::new())),
        (
            "unknown field",
            Box::new(|t| t.replacen('{', "{\"extra\": 1,", 1)),
        ),
        (
            "another format",
            Box::new(|t| t.replace("nitrile-kms key v1", "nitrile-kms key v2")),
        ),
        (
            "another name",
            Box::new(|t| t.replace("kms-key/default", "kms-key/other")),
        ),
        (
            "pending without a time",
            Box::new(|t| t.replace("\"enabled\"", "\"pending_deletion\"")),
        ),
        (
            "an unknown state",
            Box::new(|t| t.replace("\"enabled\"", "\"revoked\"")),
        ),
        (
            "a bad owner",
            Box::new(|t| t.replace("nitrile://c1/service/kms", "nitrile://c1/admin/kms")),
        ),
        (
            "a time not in UTC",
            Box::new(|t| {
                let at = t.find("\"created\": \"").unwrap() + 12;
                let end = at + t[at..].find('"').unwrap();
                format!("{}2026-03-01T13:00:00+01:00{}", &t[..at], &t[end..])
            }),
        ),
        (
            "oversized",
            Box::new(|t| format!("{t}{}", " ".repeat(5000))),
        ),
    ];
    for (what, edit) in cases {
        let (_dir, state) = closed_store();
        let file = state.join("keys/default.json");
        let text = fs::read_to_string(&file).unwrap();
        let edited = edit(&text);
        assert_ne!(edited, text, "{what}");
        fs::write(&file, edited).unwrap();
        let e = refused_naming(&state, &file);
        assert!(
            matches!(e, StoreError::Malformed { .. } | StoreError::Fs(_)),
            "{what}: {e:?}"
        );
    }
}

#[test]
fn key_material_of_the_wrong_length_or_missing_is_refused_naming_it() {
    for len in [0usize, 31, 33, 64] {
        let (_dir, state) = closed_store();
        let file = state.join("keys/default.key");
        fs::write(&file, vec![1u8; len]).unwrap();
        refused_naming(&state, &file);
    }
    let (_dir, state) = closed_store();
    fs::remove_file(state.join("keys/default.key")).unwrap();
    let e = refused_naming(&state, &state.join("keys/default.json"));
    assert!(
        matches!(
            e,
            StoreError::Malformed {
                reason: Malformed::MissingMaterial,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn a_malformed_volume_record_is_refused_naming_it() {
    let cases: Vec<(&str, Edit)> = vec![
        ("not json", Box::new(|t| t[..t.len() / 2].to_owned())),
        (
            "short secret",
            Box::new(|t| {
                let at = t.find("\"secret\":\"").unwrap() + 10;
                format!("{}{}", &t[..at], &t[at + 2..])
            }),
        ),
        (
            "secret not hex",
            Box::new(|t| {
                let at = t.find("\"secret\":\"").unwrap() + 10;
                format!("{}zz{}", &t[..at], &t[at + 2..])
            }),
        ),
        (
            "another volume",
            Box::new(|t| t.replace("\"v1\"", "\"v2\"")),
        ),
        (
            "a key that does not exist",
            Box::new(|t| t.replace("kms-key/default", "kms-key/gone")),
        ),
        (
            "unknown field",
            Box::new(|t| t.replacen('{', "{\"dek\":\"00\",", 1)),
        ),
        (
            "oversized",
            Box::new(|t| format!("{t}{}", " ".repeat(5000))),
        ),
    ];
    for (what, edit) in cases {
        let (_dir, state) = closed_store();
        let file = state.join("volumes/v1.json");
        let text = fs::read_to_string(&file).unwrap();
        let edited = edit(&text);
        assert_ne!(edited, text, "{what}");
        fs::write(&file, edited).unwrap();
        refused_naming(&state, &file);
    }
}

#[test]
fn files_that_are_no_part_of_the_store_are_refused_naming_them() {
    for (rel, dir) in [
        ("keys/notes.txt", false),
        ("keys/UPPER.json", false),
        ("keys/a.b.json", false),
        ("volumes/v2.key", false),
        ("volumes/sub", true),
        ("keys/sub.json", true),
    ] {
        let (_dir, state) = closed_store();
        let path = state.join(rel);
        if dir {
            fs::create_dir(&path).unwrap();
        } else {
            fs::write(&path, b"{}").unwrap();
        }
        let e = refused_naming(&state, &path);
        assert!(
            matches!(e, StoreError::UnexpectedFile { .. }),
            "{rel}: {e:?}"
        );
    }
    // A symbolic link in place of a record is refused, not followed.
    let (_dir, state) = closed_store();
    let elsewhere = state.parent().unwrap().join("elsewhere.json");
    fs::rename(state.join("volumes/v1.json"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, state.join("volumes/v1.json")).unwrap();
    refused_naming(&state, &state.join("volumes/v1.json"));
}

#[test]
fn leftovers_of_interrupted_writes_are_erased_and_reported() {
    let (_dir, state) = closed_store();
    let temp_volume = state.join("volumes/.v9.json.tmp-4242-0");
    let temp_key = state.join("keys/.x.json.tmp-4242-1");
    let orphan = state.join("keys/half.key");
    fs::write(&temp_volume, b"{\"secret\":\"...\"}").unwrap();
    fs::write(&temp_key, b"partial").unwrap();
    fs::write(&orphan, [7u8; 32]).unwrap();
    let k = Kms::open(&state).unwrap();
    let mut erased = k.open_report().erased.clone();
    erased.sort();
    let mut expected = vec![temp_volume.clone(), temp_key.clone(), orphan.clone()];
    expected.sort();
    assert_eq!(erased, expected);
    for p in expected {
        assert!(!p.exists(), "{}", p.display());
    }
    assert!(matches!(
        k.describe_key(&key("half")),
        Err(nitrile_kms::KmsError::UnknownKey(_))
    ));
    assert_eq!(k.list_volumes().len(), 1);
}

/// Every file under `dir`: its path, content and modification time.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, std::time::SystemTime)> {
    files_under(dir)
        .into_iter()
        .map(|p| {
            let m = fs::metadata(&p).unwrap().modified().unwrap();
            let c = fs::read(&p).unwrap();
            (p, c, m)
        })
        .collect()
}

#[test]
fn unwrapping_reads_no_file_and_writes_nothing() {
    let f = Fixture::new();
    f.kms.create_key(&key("k2"), &kms_principal(), T0).unwrap();
    let mut wrapped = Vec::new();
    for i in 0..4 {
        let v = name(&format!("v{i}"));
        let k = if i % 2 == 0 {
            KeyName::default_key()
        } else {
            key("k2")
        };
        wrapped.push((
            v.clone(),
            f.kms
                .generate_volume_key(&v, &k, T0)
                .unwrap()
                .wrapped
                .encode(),
        ));
    }
    let before = snapshot(&f.state);
    let dir_mtime = |d: &Path| fs::metadata(d).unwrap().modified().unwrap();
    let dirs_before: Vec<_> = ["", "keys", "volumes"]
        .iter()
        .map(|d| dir_mtime(&f.state.join(d)))
        .collect();
    // Move the whole directory away: unwrapping must not need it.
    let moved = f.dir.path().join("moved");
    fs::rename(&f.state, &moved).unwrap();
    let r = Recipient::generate().unwrap();
    for _ in 0..50 {
        for (v, w) in &wrapped {
            f.kms.unwrap_sealed(v, w, r.public_key(), T0).unwrap();
        }
    }
    // Refusals write nothing either.
    let _ = f
        .kms
        .unwrap_sealed(&name("nope"), &wrapped[0].1, r.public_key(), T0);
    let _ = f
        .kms
        .unwrap_sealed(&wrapped[0].0, &[0u8; 3], r.public_key(), T0);
    fs::rename(&moved, &f.state).unwrap();
    assert_eq!(snapshot(&f.state), before);
    let dirs_after: Vec<_> = ["", "keys", "volumes"]
        .iter()
        .map(|d| dir_mtime(&f.state.join(d)))
        .collect();
    assert_eq!(dirs_after, dirs_before);
}

#[test]
fn concurrent_unwraps_and_a_destroy_agree() {
    let f = Fixture::new();
    let w = f
        .kms
        .generate_volume_key(&name("v1"), &KeyName::default_key(), T0)
        .unwrap()
        .wrapped
        .encode();
    let r = Recipient::generate().unwrap();
    let destroyed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..200 {
                    let was_destroyed = destroyed.load(std::sync::atomic::Ordering::SeqCst);
                    let got = f.kms.unwrap_sealed(&name("v1"), &w, r.public_key(), T0);
                    if was_destroyed {
                        // Destroyed before this unwrap began: refused.
                        assert!(got.is_err());
                    }
                    if let Ok(sealed) = got {
                        r.open(&sealed, &name("v1")).unwrap();
                    }
                }
            });
        }
        s.spawn(|| {
            std::thread::yield_now();
            f.kms.destroy_volume(&name("v1")).unwrap();
            destroyed.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    });
    assert!(
        f.kms
            .unwrap_sealed(&name("v1"), &w, r.public_key(), T0)
            .is_err()
    );
}
