//! The sealed release of a data key: it opens only with the recipient's
//! private key and only as the volume it was sealed for; a recipient key
//! that gives no shared secret is refused.

mod common;

use common::{Fixture, T0, name};
use nitrile_kms::{
    ErrorClass, KeyName, KmsError, OpenError, RECIPIENT_KEY_LEN, Recipient, RecipientKeyError,
    RecipientPublicKey, SEALED_KEY_LEN, SealedKey, SealedKeyError,
};

#[test]
fn claim3_a_sealed_key_opens_only_with_the_recipients_private_key() {
    let f = Fixture::new();
    let w = f
        .kms
        .generate_volume_key(&name("v1"), &KeyName::default_key(), T0)
        .unwrap()
        .wrapped
        .encode();
    let dek = f.kms.export_volume_key_for_tests(&name("v1"), &w).unwrap();
    let r = Recipient::generate().unwrap();
    let sealed = f
        .kms
        .unwrap_sealed(&name("v1"), &w, r.public_key(), T0)
        .unwrap();
    let bytes = sealed.encode();
    assert_eq!(bytes.len(), SEALED_KEY_LEN);
    // The data key is not in the sealed bytes.
    assert!(!bytes.windows(16).any(|w| dek.windows(16).any(|d| d == w)));
    let decoded = SealedKey::decode(&bytes).unwrap();
    assert_eq!(*r.open(&decoded, &name("v1")).unwrap(), *dek);

    // Every other recipient fails, including one made the same way.
    for _ in 0..8 {
        let other = Recipient::generate().unwrap();
        assert_ne!(other.public_key(), r.public_key());
        let e = other.open(&decoded, &name("v1")).unwrap_err();
        assert!(
            matches!(&e, OpenError::DoesNotOpen(v) if v == &name("v1")),
            "{e:?}"
        );
    }
    // Two seals of one key to one recipient differ (fresh ephemeral keys).
    let again = f
        .kms
        .unwrap_sealed(&name("v1"), &w, r.public_key(), T0)
        .unwrap();
    assert_ne!(again.encode(), bytes);
    assert_eq!(*r.open(&again, &name("v1")).unwrap(), *dek);
}

#[test]
fn claim3_a_sealed_key_for_volume_a_does_not_open_as_volume_b() {
    let f = Fixture::new();
    let wa = f
        .kms
        .generate_volume_key(&name("va"), &KeyName::default_key(), T0)
        .unwrap()
        .wrapped
        .encode();
    f.kms
        .generate_volume_key(&name("vb"), &KeyName::default_key(), T0)
        .unwrap();
    let r = Recipient::generate().unwrap();
    let sealed = f
        .kms
        .unwrap_sealed(&name("va"), &wa, r.public_key(), T0)
        .unwrap();
    let mut out = [0xaau8; 64];
    let e = r.open_into(&sealed, &name("vb"), &mut out).unwrap_err();
    assert!(
        matches!(&e, OpenError::DoesNotOpen(v) if v == &name("vb")),
        "{e:?}"
    );
    assert_eq!(out, [0u8; 64], "nothing half-opened is left");
    r.open_into(&sealed, &name("va"), &mut out).unwrap();
    assert_eq!(
        out,
        *f.kms.export_volume_key_for_tests(&name("va"), &wa).unwrap()
    );
}

#[test]
fn every_flipped_bit_of_a_sealed_key_is_refused() {
    let f = Fixture::new();
    let w = f
        .kms
        .generate_volume_key(&name("v1"), &KeyName::default_key(), T0)
        .unwrap()
        .wrapped
        .encode();
    let r = Recipient::generate().unwrap();
    let bytes = f
        .kms
        .unwrap_sealed(&name("v1"), &w, r.public_key(), T0)
        .unwrap()
        .encode();
    for bit in 0..bytes.len() * 8 {
        let mut bad = bytes.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        match SealedKey::decode(&bad) {
            Err(e) => assert!(bit < 11 * 8, "bit {bit}: {e:?}"),
            Ok(s) => assert!(r.open(&s, &name("v1")).is_err(), "bit {bit} opened"),
        }
    }
    assert!(matches!(
        SealedKey::decode(&bytes[..SEALED_KEY_LEN - 1]),
        Err(SealedKeyError::Length { .. })
    ));
    assert!(matches!(
        SealedKey::decode(&[bytes.as_slice(), &[0]].concat()),
        Err(SealedKeyError::Length { .. })
    ));
    let mut suite = bytes.clone();
    suite[10] = 3; // ChaCha20-Poly1305
    assert!(matches!(
        SealedKey::decode(&suite),
        Err(SealedKeyError::UnsupportedSuite {
            kem: 0x20,
            kdf: 1,
            aead: 3
        })
    ));
}

#[test]
fn a_recipient_key_of_the_wrong_length_or_of_small_order_is_refused() {
    for len in [0, 31, 33, 64] {
        assert_eq!(
            RecipientPublicKey::from_bytes(&vec![9u8; len]),
            Err(RecipientKeyError::Length { len })
        );
    }
    let f = Fixture::new();
    let w = f
        .kms
        .generate_volume_key(&name("v1"), &KeyName::default_key(), T0)
        .unwrap()
        .wrapped
        .encode();
    // Points of small order on Curve25519 (u-coordinates; any scalar gives
    // the all-zero shared secret).
    let mut small_order: Vec<[u8; RECIPIENT_KEY_LEN]> = vec![[0; 32], {
        let mut one = [0; 32];
        one[0] = 1;
        one
    }];
    small_order.push(
        hex::decode("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
            .unwrap()
            .try_into()
            .unwrap(),
    );
    small_order.push(
        hex::decode("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157")
            .unwrap()
            .try_into()
            .unwrap(),
    );
    // p - 1 and p (p = 2^255 - 19), which are 0 and -1 mod p.
    small_order.push(
        hex::decode("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")
            .unwrap()
            .try_into()
            .unwrap(),
    );
    small_order.push(
        hex::decode("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")
            .unwrap()
            .try_into()
            .unwrap(),
    );
    for point in small_order {
        let pk = RecipientPublicKey::from_bytes(&point).unwrap();
        let e = f.kms.unwrap_sealed(&name("v1"), &w, &pk, T0).unwrap_err();
        assert!(
            matches!(
                e,
                KmsError::BadRecipientKey(RecipientKeyError::NoSharedSecret)
            ),
            "{}: {e:?}",
            hex::encode(point)
        );
        assert_eq!(e.class(), ErrorClass::BadInput);
    }
}
