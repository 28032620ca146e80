//! The official PASETO v4.public test vectors (testdata/paseto-v4.json).

use ed25519_dalek::{SigningKey, VerifyingKey};
use nitrile_token::paseto::{v4_public_sign, v4_public_verify};
use serde_json::Value;

fn vectors() -> Vec<Value> {
    let text = include_str!("../testdata/paseto-v4.json");
    let doc: Value = serde_json::from_str(text).unwrap();
    doc["tests"].as_array().unwrap().clone()
}

fn str_field<'a>(v: &'a Value, name: &str) -> &'a str {
    v[name].as_str().unwrap_or_else(|| panic!("{name} missing"))
}

fn public_key(hex_key: &str) -> VerifyingKey {
    VerifyingKey::from_bytes(&hex::decode(hex_key).unwrap().try_into().unwrap()).unwrap()
}

#[test]
fn signing_vectors_sign_and_verify_exactly() {
    let mut ran = 0;
    for v in vectors()
        .iter()
        .filter(|v| !v["expect-fail"].as_bool().unwrap())
    {
        let name = str_field(v, "name");
        let seed: [u8; 32] = hex::decode(str_field(v, "secret-key-seed"))
            .unwrap()
            .try_into()
            .unwrap();
        let sk = SigningKey::from_bytes(&seed);
        let pk = public_key(str_field(v, "public-key"));
        assert_eq!(sk.verifying_key(), pk, "{name}: key pair");
        assert_eq!(
            hex::encode(sk.to_keypair_bytes()),
            str_field(v, "secret-key"),
            "{name}: secret key"
        );
        // The PEM forms of the vector parse to the same keys with our loaders.
        let ours =
            nitrile_token::SigningKey::from_pkcs8_pem(str_field(v, "secret-key-pem")).unwrap();
        assert_eq!(
            ours.verifying_key().to_bytes(),
            pk.to_bytes(),
            "{name}: PEM"
        );
        let ours_pk =
            nitrile_token::VerifyingKey::from_public_key_pem(str_field(v, "public-key-pem"))
                .unwrap();
        assert_eq!(ours_pk.to_bytes(), pk.to_bytes(), "{name}: public PEM");

        let payload = str_field(v, "payload").as_bytes();
        let footer = str_field(v, "footer").as_bytes();
        let implicit = str_field(v, "implicit-assertion").as_bytes();
        let token = str_field(v, "token");
        assert_eq!(
            v4_public_sign(&sk, payload, footer, implicit),
            token,
            "{name}: sign"
        );
        assert_eq!(
            v4_public_verify(&pk, token, Some(footer), implicit).unwrap(),
            payload,
            "{name}: verify"
        );
        assert_eq!(
            v4_public_verify(&pk, token, None, implicit).unwrap(),
            payload
        );
        // A different implicit assertion must not verify.
        assert!(v4_public_verify(&pk, token, None, b"nitrile-admin-token-v1").is_err());
        ran += 1;
    }
    assert_eq!(ran, 3);
}

#[test]
fn failure_vectors_are_refused() {
    let all = vectors();
    let signing_pk = str_field(&all[0], "public-key").to_owned();
    let mut ran = 0;
    for v in all.iter().filter(|v| v["expect-fail"].as_bool().unwrap()) {
        let name = str_field(v, "name");
        let pk = public_key(v["public-key"].as_str().unwrap_or(&signing_pk));
        let token = str_field(v, "token");
        let footer = str_field(v, "footer").as_bytes();
        let implicit = str_field(v, "implicit-assertion").as_bytes();
        assert!(
            v4_public_verify(&pk, token, Some(footer), implicit).is_err(),
            "{name} accepted"
        );
        assert!(
            v4_public_verify(&pk, token, None, implicit).is_err(),
            "{name} accepted"
        );
        ran += 1;
    }
    assert_eq!(ran, 2);
}
