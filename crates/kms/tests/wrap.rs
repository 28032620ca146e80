//! The wrapped data key: it opens for its own volume under its own KEK, and
//! any other use of it is refused with the error that says why.

mod common;

use common::{Fixture, T0, key, kms_principal, name};
use nitrile_kms::{
    ErrorClass, KeyName, KmsError, MAX_WRAPPED_KEY_LEN, Recipient, WrappedKey, WrappedKeyError,
};

#[test]
fn a_wrapped_key_round_trips_to_the_same_data_key() {
    let f = Fixture::new();
    let made = f
        .kms
        .generate_volume_key(&name("v1"), &KeyName::default_key(), T0)
        .unwrap();
    assert_eq!(made.volume.volume, name("v1"));
    assert_eq!(made.volume.key, KeyName::default_key());
    let bytes = made.wrapped.encode();
    assert!(bytes.len() <= MAX_WRAPPED_KEY_LEN);
    let decoded = WrappedKey::decode(&bytes).unwrap();
    assert_eq!(decoded.volume(), &name("v1"));
    assert_eq!(decoded.key(), &KeyName::default_key());

    let dek = f
        .kms
        .export_volume_key_for_tests(&name("v1"), &bytes)
        .unwrap();
    let r = Recipient::generate().unwrap();
    for _ in 0..3 {
        let sealed = f
            .kms
            .unwrap_sealed(&name("v1"), &bytes, r.public_key(), T0)
            .unwrap();
        assert_eq!(*r.open(&sealed, &name("v1")).unwrap(), *dek);
    }
    // Each volume gets a key of its own.
    let other = f
        .kms
        .generate_volume_key(&name("v2"), &KeyName::default_key(), T0)
        .unwrap();
    let dek2 = f
        .kms
        .export_volume_key_for_tests(&name("v2"), &other.wrapped.encode())
        .unwrap();
    assert_ne!(*dek, *dek2);
    assert_ne!(*dek, [0u8; 64]);
}

/// Rewrites the volume id inside a wrapped key (same length), as someone
/// moving it onto another volume would.
fn renamed_volume(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = bytes.to_vec();
    let at = 6;
    assert_eq!(&out[at..at + from.len()], from.as_bytes());
    out[at..at + to.len()].copy_from_slice(to.as_bytes());
    out
}

#[test]
fn a_wrapped_key_moved_to_another_volume_is_refused() {
    let f = Fixture::new();
    let a = f
        .kms
        .generate_volume_key(&name("va"), &KeyName::default_key(), T0)
        .unwrap();
    f.kms
        .generate_volume_key(&name("vb"), &KeyName::default_key(), T0)
        .unwrap();
    let r = Recipient::generate().unwrap();
    let bytes = a.wrapped.encode();

    // Presented as vb's as it is: the wrapped key says it is va's.
    let e = f
        .kms
        .unwrap_sealed(&name("vb"), &bytes, r.public_key(), T0)
        .unwrap_err();
    assert!(
        matches!(&e, KmsError::WrongVolume { asked, wrapped } if asked == &name("vb") && wrapped == &name("va")),
        "{e:?}"
    );
    assert_eq!(e.class(), ErrorClass::BadInput);

    // Edited to say vb: it names the right volume but does not open (the
    // volume id is authenticated, and vb's secret is another).
    let moved = renamed_volume(&bytes, "va", "vb");
    let e = f
        .kms
        .unwrap_sealed(&name("vb"), &moved, r.public_key(), T0)
        .unwrap_err();
    assert!(
        matches!(&e, KmsError::Unauthentic(v) if v == &name("vb")),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "the wrapped key of volume/vb does not open: altered, or not made for this volume"
    );
}

#[test]
fn a_wrapped_key_moved_to_another_kek_is_refused() {
    let f = Fixture::new();
    f.kms
        .create_key(&key("other"), &kms_principal(), T0)
        .unwrap();
    let a = f
        .kms
        .generate_volume_key(&name("v1"), &KeyName::default_key(), T0)
        .unwrap();
    let r = Recipient::generate().unwrap();
    // The KEK name is after the volume id: "default" (7) -> "other01" (7).
    let mut moved = a.wrapped.encode();
    let at = 6 + 2 + 1;
    assert_eq!(&moved[at..at + 7], b"default");
    moved[at..at + 7].copy_from_slice(b"other01");
    let e = f
        .kms
        .unwrap_sealed(&name("v1"), &moved, r.public_key(), T0)
        .unwrap_err();
    assert!(
        matches!(&e, KmsError::WrongKey { volume, key: k, wrapped }
            if volume == &name("v1") && k == &KeyName::default_key() && wrapped == &key("other01")),
        "{e:?}"
    );
    assert!(e.to_string().contains("kms-key/other01"), "{e}");

    // A volume under the other KEK, given a wrapped key relabelled from
    // the default KEK: names the right KEK, does not open.
    let b = f
        .kms
        .generate_volume_key(&name("v2"), &key("other"), T0)
        .unwrap();
    let mut relabelled = a.wrapped.encode();
    // Rebuild the header for v2 under "other": same nonce and ciphertext.
    let tail = relabelled.split_off(relabelled.len() - (12 + 64 + 16));
    let mut forged = b"NKWK\x01".to_vec();
    forged.extend_from_slice(&[2]);
    forged.extend_from_slice(b"v2");
    forged.extend_from_slice(&[5]);
    forged.extend_from_slice(b"other");
    forged.extend_from_slice(&tail);
    assert_eq!(WrappedKey::decode(&forged).unwrap().key(), &key("other"));
    let e = f
        .kms
        .unwrap_sealed(&name("v2"), &forged, r.public_key(), T0)
        .unwrap_err();
    assert!(
        matches!(&e, KmsError::Unauthentic(v) if v == &name("v2")),
        "{e:?}"
    );
    // Its own wrapped key still opens.
    f.kms
        .unwrap_sealed(&name("v2"), &b.wrapped.encode(), r.public_key(), T0)
        .unwrap();
}

#[test]
fn every_flipped_bit_of_a_wrapped_key_is_refused() {
    let f = Fixture::new();
    let a = f
        .kms
        .generate_volume_key(&name("v1"), &KeyName::default_key(), T0)
        .unwrap();
    let r = Recipient::generate().unwrap();
    let bytes = a.wrapped.encode();
    for bit in 0..bytes.len() * 8 {
        let mut bad = bytes.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let e = f
            .kms
            .unwrap_sealed(&name("v1"), &bad, r.public_key(), T0)
            .unwrap_err();
        // Which error depends on the field hit; none opens.
        assert!(
            matches!(
                e,
                KmsError::Unauthentic(_)
                    | KmsError::MalformedWrappedKey(_)
                    | KmsError::WrongVolume { .. }
                    | KmsError::WrongKey { .. }
            ),
            "bit {bit}: {e:?}"
        );
        if bit >= 16 * 8 {
            // Nonce, ciphertext and tag: well-formed, does not open.
            assert!(matches!(e, KmsError::Unauthentic(_)), "bit {bit}: {e:?}");
        }
    }
    assert!(matches!(
        f.kms.unwrap_sealed(
            &name("v1"),
            &[&bytes[..3], b"X", &bytes[4..]].concat(),
            r.public_key(),
            T0
        ),
        Err(KmsError::MalformedWrappedKey(WrappedKeyError::BadMagic))
    ));
    let mut v2 = bytes.clone();
    v2[4] = 2;
    assert!(matches!(
        f.kms.unwrap_sealed(&name("v1"), &v2, r.public_key(), T0),
        Err(KmsError::MalformedWrappedKey(
            WrappedKeyError::UnsupportedVersion(2)
        ))
    ));
}

#[test]
fn a_truncated_or_oversized_wrapped_key_is_refused_before_anything_else() {
    let f = Fixture::new();
    let a = f
        .kms
        .generate_volume_key(&name("v1"), &KeyName::default_key(), T0)
        .unwrap();
    let r = Recipient::generate().unwrap();
    let bytes = a.wrapped.encode();
    for len in 0..bytes.len() {
        let e = f
            .kms
            .unwrap_sealed(&name("v1"), &bytes[..len], r.public_key(), T0)
            .unwrap_err();
        assert!(
            matches!(
                e,
                KmsError::MalformedWrappedKey(
                    WrappedKeyError::Truncated { .. } | WrappedKeyError::BadName { .. }
                )
            ),
            "{len}: {e:?}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        f.kms
            .unwrap_sealed(&name("v1"), &longer, r.public_key(), T0),
        Err(KmsError::MalformedWrappedKey(
            WrappedKeyError::TrailingBytes { extra: 1 }
        ))
    ));
    let huge = vec![0u8; 10_000];
    let e = f
        .kms
        .unwrap_sealed(&name("v1"), &huge, r.public_key(), T0)
        .unwrap_err();
    assert!(
        matches!(
            e,
            KmsError::MalformedWrappedKey(WrappedKeyError::TooLong { len: 10_000 })
        ),
        "{e:?}"
    );
    assert_eq!(e.class(), ErrorClass::BadInput);
    assert!(matches!(
        WrappedKey::decode(&vec![0u8; MAX_WRAPPED_KEY_LEN + 1]),
        Err(WrappedKeyError::TooLong { .. })
    ));
}

#[test]
fn names_inside_a_wrapped_key_follow_the_rules_of_names() {
    let f = Fixture::new();
    let a = f
        .kms
        .generate_volume_key(&name("v1"), &KeyName::default_key(), T0)
        .unwrap();
    let bytes = a.wrapped.encode();
    for (at, byte) in [(6, b'/'), (6, 0), (6, b'.'), (7, b'A'), (9, b'-')] {
        let mut bad = bytes.clone();
        bad[at] = byte;
        assert!(
            matches!(
                WrappedKey::decode(&bad),
                Err(WrappedKeyError::BadName { .. })
            ),
            "{at} {byte}"
        );
    }
    let mut empty = bytes.clone();
    empty[5] = 0;
    assert!(matches!(
        WrappedKey::decode(&empty),
        Err(WrappedKeyError::BadName {
            field: "volume id",
            ..
        })
    ));
}
