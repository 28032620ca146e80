//! KEK states: a disabled key or one pending deletion refuses every unwrap
//! and every new volume key, naming the key; enabling restores it; the
//! deletion window is bounded; no description shows key material.

mod common;

use common::{Fixture, T0, key, kms_principal, name};
use nitrile_api::PrincipalId;
use nitrile_kms::{
    DEFAULT_DELETION_WINDOW_DAYS, ErrorClass, KeyName, KeyState, KmsError,
    MAX_DELETION_WINDOW_DAYS, MIN_DELETION_WINDOW_DAYS, Recipient,
};
use time::Duration;

fn customer() -> PrincipalId {
    PrincipalId::parse("nitrile://c1/operator/carol").unwrap()
}

#[test]
fn claim3_a_disabled_key_refuses_unwrap_naming_the_key_and_enable_restores_it() {
    let f = Fixture::new();
    let k = key("carol-key");
    f.kms.create_key(&k, &customer(), T0).unwrap();
    let w = f
        .kms
        .generate_volume_key(&name("v1"), &k, T0)
        .unwrap()
        .wrapped
        .encode();
    let r = Recipient::generate().unwrap();
    f.kms
        .unwrap_sealed(&name("v1"), &w, r.public_key(), T0)
        .unwrap();

    let t = f.kms.disable_key(&k, T0 + Duration::minutes(1)).unwrap();
    assert_eq!(t.previous, KeyState::Enabled);
    assert_eq!(t.key.state, KeyState::Disabled);
    assert_eq!(t.key.updated, T0 + Duration::minutes(1));
    assert_eq!(t.key.created, T0);

    let e = f
        .kms
        .unwrap_sealed(&name("v1"), &w, r.public_key(), T0 + Duration::minutes(2))
        .unwrap_err();
    assert!(matches!(&e, KmsError::KeyDisabled(x) if x == &k), "{e:?}");
    assert_eq!(e.to_string(), "kms-key/carol-key is disabled");
    assert_eq!(e.class(), ErrorClass::Conflict);
    // No new volume keys under it either.
    assert!(matches!(
        f.kms.generate_volume_key(&name("v2"), &k, T0),
        Err(KmsError::KeyDisabled(_))
    ));
    assert!(matches!(
        f.kms.describe_volume(&name("v2")),
        Err(KmsError::UnknownVolume(_))
    ));
    // Other keys' volumes are not affected.
    let d = f
        .kms
        .generate_volume_key(&name("d1"), &KeyName::default_key(), T0)
        .unwrap()
        .wrapped
        .encode();
    f.kms
        .unwrap_sealed(&name("d1"), &d, r.public_key(), T0)
        .unwrap();

    // Disabling again changes nothing and writes nothing.
    let again = f.kms.disable_key(&k, T0 + Duration::minutes(3)).unwrap();
    assert_eq!(again.previous, KeyState::Disabled);
    assert_eq!(again.key.updated, T0 + Duration::minutes(1));

    let t = f.kms.enable_key(&k, T0 + Duration::minutes(4)).unwrap();
    assert_eq!(t.previous, KeyState::Disabled);
    assert_eq!(t.key.state, KeyState::Enabled);
    let sealed = f
        .kms
        .unwrap_sealed(&name("v1"), &w, r.public_key(), T0 + Duration::minutes(5))
        .unwrap();
    assert_eq!(
        *r.open(&sealed, &name("v1")).unwrap(),
        *f.kms.export_volume_key_for_tests(&name("v1"), &w).unwrap()
    );
}

#[test]
fn claim3_a_key_pending_deletion_refuses_unwrap_naming_the_key_until_cancelled_and_enabled() {
    let f = Fixture::new();
    let k = key("carol-key");
    f.kms.create_key(&k, &customer(), T0).unwrap();
    let w = f
        .kms
        .generate_volume_key(&name("v1"), &k, T0)
        .unwrap()
        .wrapped
        .encode();
    let r = Recipient::generate().unwrap();
    let t = f.kms.schedule_key_deletion(&k, None, T0).unwrap();
    let delete_at = T0 + Duration::days(i64::from(DEFAULT_DELETION_WINDOW_DAYS));
    assert_eq!(t.key.state, KeyState::PendingDeletion { delete_at });
    assert_eq!(t.previous, KeyState::Enabled);

    let e = f
        .kms
        .unwrap_sealed(&name("v1"), &w, r.public_key(), T0 + Duration::days(1))
        .unwrap_err();
    assert!(
        matches!(&e, KmsError::KeyPendingDeletion { key: x, delete_at: d } if x == &k && *d == delete_at),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("kms-key/carol-key is pending deletion"),
        "{e}"
    );
    assert!(matches!(
        f.kms.generate_volume_key(&name("v2"), &k, T0),
        Err(KmsError::KeyPendingDeletion { .. })
    ));
    // Neither enable nor disable nor a second schedule applies to it.
    for e in [
        f.kms.enable_key(&k, T0).unwrap_err(),
        f.kms.disable_key(&k, T0).unwrap_err(),
        f.kms.schedule_key_deletion(&k, Some(7), T0).unwrap_err(),
    ] {
        assert!(matches!(e, KmsError::KeyPendingDeletion { .. }), "{e:?}");
    }

    // Cancelling leaves it disabled; enabling restores it.
    let t = f
        .kms
        .cancel_key_deletion(&k, T0 + Duration::days(2))
        .unwrap();
    assert_eq!(t.previous, KeyState::PendingDeletion { delete_at });
    assert_eq!(t.key.state, KeyState::Disabled);
    assert!(matches!(
        f.kms
            .unwrap_sealed(&name("v1"), &w, r.public_key(), T0 + Duration::days(2)),
        Err(KmsError::KeyDisabled(_))
    ));
    // A sweep after the old window destroys nothing.
    assert!(
        f.kms
            .sweep(delete_at + Duration::days(1))
            .unwrap()
            .keys
            .is_empty()
    );
    f.kms.enable_key(&k, T0 + Duration::days(3)).unwrap();
    f.kms
        .unwrap_sealed(
            &name("v1"),
            &w,
            r.public_key(),
            delete_at + Duration::days(2),
        )
        .unwrap();
    // Cancelling what is not pending is refused, naming the state.
    let e = f.kms.cancel_key_deletion(&k, T0).unwrap_err();
    assert!(
        matches!(
            &e,
            KmsError::KeyNotPendingDeletion {
                state: "enabled",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn the_deletion_window_is_seven_to_thirty_days() {
    let f = Fixture::new();
    for days in [
        0,
        1,
        MIN_DELETION_WINDOW_DAYS - 1,
        MAX_DELETION_WINDOW_DAYS + 1,
        365,
        u32::MAX,
    ] {
        let e = f
            .kms
            .schedule_key_deletion(&KeyName::default_key(), Some(days), T0)
            .unwrap_err();
        assert!(
            matches!(e, KmsError::BadDeletionWindow { days: d } if d == days),
            "{e:?}"
        );
        assert_eq!(e.class(), ErrorClass::BadInput);
        assert_eq!(
            f.kms.describe_key(&KeyName::default_key()).unwrap().state,
            KeyState::Enabled
        );
    }
    for (i, days) in [MIN_DELETION_WINDOW_DAYS, 19, MAX_DELETION_WINDOW_DAYS]
        .into_iter()
        .enumerate()
    {
        let k = key(&format!("k{i}"));
        f.kms.create_key(&k, &kms_principal(), T0).unwrap();
        let t = f.kms.schedule_key_deletion(&k, Some(days), T0).unwrap();
        assert_eq!(
            t.key.state,
            KeyState::PendingDeletion {
                delete_at: T0 + Duration::days(i64::from(days))
            }
        );
    }
    assert_eq!(
        (
            MIN_DELETION_WINDOW_DAYS,
            MAX_DELETION_WINDOW_DAYS,
            DEFAULT_DELETION_WINDOW_DAYS
        ),
        (7, 30, 30)
    );
}

#[test]
fn keys_are_described_and_listed_without_their_material() {
    let f = Fixture::new();
    f.kms.create_key(&key("b"), &customer(), T0).unwrap();
    f.kms.create_key(&key("a"), &customer(), T0).unwrap();
    assert!(matches!(
        f.kms.create_key(&key("a"), &kms_principal(), T0),
        Err(KmsError::KeyExists(_))
    ));
    assert!(matches!(
        f.kms.describe_key(&key("nope")),
        Err(KmsError::UnknownKey(_))
    ));
    f.kms
        .generate_volume_key(&name("v1"), &key("a"), T0)
        .unwrap();
    assert!(matches!(
        f.kms.generate_volume_key(&name("v1"), &key("b"), T0),
        Err(KmsError::VolumeExists(_))
    ));
    assert!(matches!(
        f.kms.generate_volume_key(&name("v9"), &key("nope"), T0),
        Err(KmsError::UnknownKey(_))
    ));
    let list = f.kms.list_keys();
    let names: Vec<String> = list.iter().map(|k| k.name.to_string()).collect();
    assert_eq!(names, ["kms-key/a", "kms-key/b", "kms-key/default"]);
    assert_eq!(list[0].volumes, 1);
    assert_eq!(list[0].owner, customer());
    assert_eq!(list[2].owner, kms_principal());

    let kek = f.kms.export_volume_secrets_for_tests(&name("v1")).unwrap();
    let shown = format!(
        "{:?} {:?} {:?} {:?} {:?}",
        f.kms,
        list,
        f.kms.list_volumes(),
        f.kms.describe_key(&key("a")).unwrap(),
        kek
    );
    for secret in [&kek.kek[..], &kek.secret[..]] {
        for needle in common::encodings(secret) {
            let needle = String::from_utf8_lossy(&needle).into_owned();
            assert!(!shown.contains(&needle), "{shown}");
        }
        // Nor as a Debug list of numbers.
        assert!(
            !shown.contains(
                &format!("{:?}", &secret[..4])
                    .trim_end_matches(']')
                    .to_owned()
            )
        );
    }
}
