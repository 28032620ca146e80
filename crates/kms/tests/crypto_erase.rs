//! Crypto-erase: once a volume record is destroyed (by itself, or with its
//! KEK at the end of the KEK's deletion window), no wrapped key of that
//! volume opens, and nothing under the state directory still holds the
//! data key or the volume's secret.

mod common;

use common::{Fixture, T0, copy_tree, files_holding, key, kms_principal, name};
use nitrile_kms::{KeyName, KeyState, Kms, KmsError, Recipient};
use time::Duration;

#[test]
fn claim3_a_destroyed_volume_record_is_gone_from_the_store_and_its_wrapped_key_never_opens() {
    let f = Fixture::new();
    let v = name("v1");
    let made = f
        .kms
        .generate_volume_key(&v, &KeyName::default_key(), T0)
        .unwrap();
    // A second volume stays, to show the search looks at live records.
    let keep = f
        .kms
        .generate_volume_key(&name("v2"), &KeyName::default_key(), T0)
        .unwrap();
    let wrapped = made.wrapped.encode();
    let dek = f.kms.export_volume_key_for_tests(&v, &wrapped).unwrap();
    let secrets = f.kms.export_volume_secrets_for_tests(&v).unwrap();
    let keep_secret = f
        .kms
        .export_volume_secrets_for_tests(&name("v2"))
        .unwrap()
        .secret;

    // A backup of the whole state directory, taken before the destroy.
    let backup = f.dir.path().join("backup");
    copy_tree(&f.state, &backup);
    // Positive controls: the search finds the secret where it is.
    assert_eq!(files_holding(&backup, &secrets.secret[..]).len(), 1);
    assert_eq!(files_holding(&f.state, &secrets.secret[..]).len(), 1);

    let destroyed = f.kms.destroy_volume(&v).unwrap();
    assert_eq!(destroyed.volume, v);
    assert_eq!(destroyed.key, KeyName::default_key());

    // The current store refuses the wrapped key kept by the host.
    let r = Recipient::generate().unwrap();
    let e = f
        .kms
        .unwrap_sealed(&v, &wrapped, r.public_key(), T0)
        .unwrap_err();
    assert!(matches!(&e, KmsError::UnknownVolume(x) if x == &v), "{e:?}");
    assert!(matches!(
        f.kms.export_volume_key_for_tests(&v, &wrapped),
        Err(KmsError::UnknownVolume(_))
    ));
    assert!(matches!(
        f.kms.describe_volume(&v),
        Err(KmsError::UnknownVolume(_))
    ));
    // Destroying it again says it is gone.
    assert!(matches!(
        f.kms.destroy_volume(&v),
        Err(KmsError::UnknownVolume(_))
    ));

    // Nothing under the current state directory holds the data key or the
    // volume's secret, in any encoding; the other volume's secret is still
    // found (the search works on this directory).
    for half in [&dek[..], &dek[..32], &dek[32..]] {
        assert_eq!(
            files_holding(&f.state, half),
            Vec::<std::path::PathBuf>::new()
        );
    }
    assert_eq!(
        files_holding(&f.state, &secrets.secret[..]),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(files_holding(&f.state, &keep_secret[..]).len(), 1);

    // A key service started on the current directory refuses as well.
    drop(f.kms);
    let reopened = Kms::open(&f.state).unwrap();
    assert!(matches!(
        reopened.unwrap_sealed(&v, &wrapped, r.public_key(), T0),
        Err(KmsError::UnknownVolume(_))
    ));
    reopened
        .unwrap_sealed(&name("v2"), &keep.wrapped.encode(), r.public_key(), T0)
        .unwrap();
}

#[test]
fn claim3_a_new_volume_of_the_same_name_does_not_open_the_old_wrapped_key() {
    let f = Fixture::new();
    let v = name("v1");
    let old = f
        .kms
        .generate_volume_key(&v, &KeyName::default_key(), T0)
        .unwrap()
        .wrapped
        .encode();
    f.kms.destroy_volume(&v).unwrap();
    let new = f
        .kms
        .generate_volume_key(&v, &KeyName::default_key(), T0)
        .unwrap()
        .wrapped
        .encode();
    let r = Recipient::generate().unwrap();
    let e = f
        .kms
        .unwrap_sealed(&v, &old, r.public_key(), T0)
        .unwrap_err();
    assert!(matches!(&e, KmsError::Unauthentic(x) if x == &v), "{e:?}");
    f.kms.unwrap_sealed(&v, &new, r.public_key(), T0).unwrap();
}

#[test]
fn claim3_at_the_end_of_its_deletion_window_a_kek_is_destroyed_with_every_volume_under_it() {
    let f = Fixture::new();
    let team = key("team-a");
    let owner = nitrile_api::PrincipalId::parse("nitrile://c1/operator/alice").unwrap();
    f.kms.create_key(&team, &owner, T0).unwrap();
    let mut wrapped = Vec::new();
    let mut secrets = Vec::new();
    for i in 0..3 {
        let v = name(&format!("t{i}"));
        let w = f
            .kms
            .generate_volume_key(&v, &team, T0)
            .unwrap()
            .wrapped
            .encode();
        secrets.push(f.kms.export_volume_secrets_for_tests(&v).unwrap());
        wrapped.push((v, w));
    }
    let other = f
        .kms
        .generate_volume_key(&name("d1"), &KeyName::default_key(), T0)
        .unwrap()
        .wrapped
        .encode();
    let kek = secrets[0].kek.clone();
    assert_eq!(
        files_holding(&f.state, &kek[..]).len(),
        1,
        "the KEK's own file"
    );

    let t = f
        .kms
        .schedule_key_deletion(&team, Some(7), T0 + Duration::hours(1))
        .unwrap();
    let delete_at = T0 + Duration::hours(1) + Duration::days(7);
    assert_eq!(t.key.state, KeyState::PendingDeletion { delete_at });

    // A sweep before the window ends destroys nothing.
    let early = f.kms.sweep(delete_at - Duration::seconds(1)).unwrap();
    assert!(early.keys.is_empty());
    assert_eq!(f.kms.describe_key(&team).unwrap().volumes, 3);

    // The clock moves past delete_at: the sweep destroys the key and its
    // volumes, and says so.
    let report = f.kms.sweep(delete_at + Duration::minutes(5)).unwrap();
    assert_eq!(report.keys.len(), 1);
    let swept = &report.keys[0];
    assert_eq!(swept.key, team);
    assert_eq!(swept.owner, owner);
    assert_eq!(swept.delete_at, delete_at);
    assert_eq!(swept.volumes, vec![name("t0"), name("t1"), name("t2")]);

    let r = Recipient::generate().unwrap();
    for (v, w) in &wrapped {
        let e = f
            .kms
            .unwrap_sealed(v, w, r.public_key(), delete_at + Duration::hours(1))
            .unwrap_err();
        assert!(matches!(&e, KmsError::UnknownVolume(x) if x == v), "{e:?}");
    }
    assert!(matches!(
        f.kms.describe_key(&team),
        Err(KmsError::UnknownKey(_))
    ));
    assert!(f.kms.list_volumes().iter().all(|v| v.key != team));
    for s in &secrets {
        assert!(files_holding(&f.state, &s.secret[..]).is_empty());
    }
    assert!(
        files_holding(&f.state, &kek[..]).is_empty(),
        "the KEK is erased"
    );
    // The other key's volume is untouched, and a second sweep does nothing.
    f.kms
        .unwrap_sealed(
            &name("d1"),
            &other,
            r.public_key(),
            delete_at + Duration::hours(1),
        )
        .unwrap();
    assert!(
        f.kms
            .sweep(delete_at + Duration::days(1))
            .unwrap()
            .keys
            .is_empty()
    );

    // After a restart too.
    drop(f.kms);
    let reopened = Kms::open(&f.state).unwrap();
    assert!(matches!(
        reopened.describe_key(&team),
        Err(KmsError::UnknownKey(_))
    ));
    for (v, w) in &wrapped {
        assert!(
            reopened
                .unwrap_sealed(v, w, r.public_key(), delete_at)
                .is_err()
        );
    }
}

#[test]
fn claim3_a_key_past_its_window_refuses_even_before_the_sweep() {
    let f = Fixture::new();
    let team = key("team-b");
    f.kms.create_key(&team, &kms_principal(), T0).unwrap();
    let w = f
        .kms
        .generate_volume_key(&name("v1"), &team, T0)
        .unwrap()
        .wrapped
        .encode();
    f.kms.schedule_key_deletion(&team, None, T0).unwrap();
    let delete_at = T0 + Duration::days(30);
    let r = Recipient::generate().unwrap();
    let e = f
        .kms
        .unwrap_sealed(&name("v1"), &w, r.public_key(), delete_at)
        .unwrap_err();
    assert!(
        matches!(&e, KmsError::KeyDeleted { key: k, delete_at: d } if k == &team && *d == delete_at),
        "{e:?}"
    );
    assert!(e.to_string().contains("kms-key/team-b"), "{e}");
    // Nor can its deletion be cancelled any more.
    assert!(matches!(
        f.kms.cancel_key_deletion(&team, delete_at),
        Err(KmsError::KeyDeleted { .. })
    ));
}
