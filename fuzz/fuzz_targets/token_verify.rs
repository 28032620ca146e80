//! Admin tokens as a host receives them: the PASETO v4.public layer, the
//! unverified decoder used for display, the claims parser and the whole
//! verifier, with a fixed issuer key and a fixed clock.
//!
//! Properties: nothing panics; parsed claims re-encode to claims that parse
//! equal; a token the verifier accepts decodes (unverified) to the same
//! claims and carries a payload the PASETO layer also accepts.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use nitrile_api::{Audience, Operation, PrincipalId, ResourceId};
use nitrile_token::{
    Claims, FixedClock, IMPLICIT_ASSERTION, IssuerKeys, Request, Verifier, VerifyingKey,
    danger_decode_unverified, paseto,
};
use time::macros::datetime;

/// Private half of the pinned issuer key. The seed tokens in
/// `fuzz/seeds/token_verify` are signed with it (see `examples/make_seeds.rs`).
const ISSUER_SECRET: [u8; 32] = [7; 32];

struct Fixture {
    key: ed25519_dalek::VerifyingKey,
    verifier: Verifier,
    clock: FixedClock,
    request: Request,
    peer_cert_sha256: [u8; 32],
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let key = ed25519_dalek::SigningKey::from_bytes(&ISSUER_SECRET).verifying_key();
    let pinned = VerifyingKey::from_bytes(key.as_bytes()).expect("a valid Ed25519 key");
    let issuer = PrincipalId::parse("nitrile://cell-1/service/tokend").expect("valid principal");
    let keys = IssuerKeys::with_keys(issuer, [pinned]).expect("one key fits");
    Fixture {
        key,
        verifier: Verifier::new(keys, Audience::new("h1").expect("valid audience")),
        clock: FixedClock::new(datetime!(2030-01-01 00:01:00 UTC)),
        request: Request {
            operation: Operation::HostDescribe,
            resource: ResourceId::parse("host/h1").expect("valid resource"),
        },
        peer_cert_sha256: [0xc0; 32],
    }
});

fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;

    if let Ok(claims) = Claims::from_json(data) {
        let again = Claims::from_json(&claims.to_json()).expect("re-encoded claims parse");
        assert_eq!(again, claims, "claims changed in a JSON round trip");
    }

    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let unverified = danger_decode_unverified(token);
    let _ = paseto::untrusted_footer(token);
    let payload = paseto::v4_public_verify(&f.key, token, None, IMPLICIT_ASSERTION);
    let _ = f
        .verifier
        .verify(token, &f.request, &f.peer_cert_sha256, &f.clock);
    if let Ok(signed) = f.verifier.verify_signature_only(token, &f.clock) {
        let payload = payload.expect("the PASETO layer accepts what the verifier accepts");
        assert_eq!(
            Claims::from_json(&payload).as_ref().ok(),
            Some(signed.claims())
        );
        let unverified = unverified.expect("a verified token decodes without verification");
        assert_eq!(unverified.unverified_claims(), signed.claims());
        assert_eq!(unverified.unverified_key_id(), signed.key_id());
    }
});
