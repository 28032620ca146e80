//! The key service's blobs as a host relays them or a VMM receives them:
//! wrapped data keys (`WrappedKey::decode`), sealed data keys
//! (`SealedKey::decode`), recipient public keys and key names. The first
//! byte picks the decoder, the rest is its input.
//!
//! Properties: nothing panics; whatever is accepted is within its stated
//! bound and encodes back to exactly the input; a key name prints back as
//! exactly the text it was parsed from; no sealed key made of arbitrary
//! bytes opens for a recipient that only this target knows.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nitrile_api::Name;
use nitrile_kms::{
    KeyName, MAX_WRAPPED_KEY_LEN, Recipient, RecipientPublicKey, SEALED_KEY_LEN, SealedKey,
    WrappedKey,
};

/// One recipient for the whole run: nothing was ever sealed to it.
fn recipient() -> &'static Recipient {
    static R: OnceLock<Recipient> = OnceLock::new();
    R.get_or_init(|| Recipient::generate().expect("the system has randomness"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(w) = WrappedKey::decode(rest) {
                assert!(rest.len() <= MAX_WRAPPED_KEY_LEN);
                assert_eq!(w.encode(), rest, "a wrapped key re-encodes to its bytes");
            }
        }
        1 => {
            if let Ok(s) = SealedKey::decode(rest) {
                assert_eq!(rest.len(), SEALED_KEY_LEN);
                assert_eq!(s.encode(), rest, "a sealed key re-encodes to its bytes");
                let volume = Name::new("data").expect("a valid name");
                assert!(
                    recipient().open(&s, &volume).is_err(),
                    "a sealed key nobody sealed to this recipient opened"
                );
            }
        }
        2 => {
            if let Ok(k) = RecipientPublicKey::from_bytes(rest) {
                assert_eq!(k.as_bytes().as_slice(), rest);
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(rest)
                && let Ok(k) = KeyName::parse(text)
            {
                assert_eq!(k.to_string(), text, "a key name prints as it was parsed");
            }
        }
    }
});
