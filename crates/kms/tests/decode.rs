//! The decoders of untrusted bytes (wrapped keys from a host, sealed keys
//! from the key service, key names from a request) never panic, accept
//! nothing above their bounds, and what they accept encodes back to the
//! same bytes.

mod common;

use common::{Fixture, T0, name};
use nitrile_kms::{KeyName, MAX_WRAPPED_KEY_LEN, Recipient, SEALED_KEY_LEN, SealedKey, WrappedKey};
use proptest::prelude::*;

/// Bytes shaped like a wrapped key: the magic, a version, two names of
/// any length and a tail of any length, each byte possibly changed.
fn wrapped_like() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        "[a-z0-9-]{0,70}",
        "[a-z0-9-]{0,70}",
        proptest::collection::vec(any::<u8>(), 0..120),
        proptest::option::of((any::<usize>(), any::<u8>())),
    )
        .prop_map(|(version, v, k, tail, flip)| {
            let mut b = b"NKWK".to_vec();
            b.push(version % 3);
            for n in [v, k] {
                b.push(n.len() as u8);
                b.extend_from_slice(n.as_bytes());
            }
            b.extend_from_slice(&tail);
            if let Some((at, x)) = flip {
                let at = at % b.len();
                b[at] ^= x;
            }
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_wrapped_key_decoder_never_panics_and_round_trips(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..(2 * MAX_WRAPPED_KEY_LEN)),
            wrapped_like(),
        ]
    ) {
        if let Ok(w) = WrappedKey::decode(&bytes) {
            prop_assert!(bytes.len() <= MAX_WRAPPED_KEY_LEN);
            prop_assert_eq!(w.encode(), bytes);
            prop_assert!(KeyName::new(w.key().as_str()).is_ok());
        }
    }

    #[test]
    fn the_sealed_key_decoder_never_panics_and_round_trips(
        bytes in proptest::collection::vec(any::<u8>(), 0..(2 * SEALED_KEY_LEN)),
        header in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if header && bytes.len() >= 11 {
            bytes[..11].copy_from_slice(b"NKSK\x01\x00\x20\x00\x01\x00\x02");
        }
        if let Ok(s) = SealedKey::decode(&bytes) {
            prop_assert_eq!(bytes.len(), SEALED_KEY_LEN);
            prop_assert_eq!(s.encode(), bytes);
        }
    }

    #[test]
    fn the_key_name_parser_never_panics(s in "\\PC{0,120}") {
        if let Ok(k) = KeyName::parse(&s) {
            prop_assert_eq!(k.to_string(), s);
            prop_assert!(k.as_str().len() <= 63);
        }
    }
}

#[test]
fn no_bytes_but_the_wrapped_key_unwrap() {
    let f = Fixture::new();
    let w = f
        .kms
        .generate_volume_key(&name("v1"), &KeyName::default_key(), T0)
        .unwrap()
        .wrapped
        .encode();
    let r = Recipient::generate().unwrap();
    proptest!(ProptestConfig::with_cases(1000), |(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            wrapped_like(),
            (any::<usize>(), 1u8..).prop_map({
                let w = w.clone();
                move |(at, x)| {
                    let mut b = w.clone();
                    let at = at % b.len();
                    b[at] ^= x;
                    b
                }
            }),
        ]
    )| {
        prop_assert!(f.kms.unwrap_sealed(&name("v1"), &bytes, r.public_key(), T0).is_err());
    });
    f.kms
        .unwrap_sealed(&name("v1"), &w, r.public_key(), T0)
        .unwrap();
}
