//! Every refusal of `Verifier::verify`, with real keys and the SHA-256 of real
//! X.509 certificates, and property tests of minting and verifying.

use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId};
use nitrile_token::paseto::v4_public_sign;
use nitrile_token::{
    CertThumbprint, ClaimsInput, FixedClock, IMPLICIT_ASSERTION, IssuerKeys, MAX_LIFETIME,
    ReplayCache, Request, SigningKey, TokenError, TokenIssuer, Verifier,
};
use proptest::prelude::*;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const T0: OffsetDateTime = datetime!(2030-01-01 12:00 UTC);

fn issuer_id() -> PrincipalId {
    PrincipalId::parse("nitrile://c1/service/tokend").unwrap()
}

/// A fresh key as both our type and the raw Ed25519 key, to forge tokens the
/// issuer would never mint.
fn keypair() -> (SigningKey, ed25519_dalek::SigningKey) {
    let raw = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
    let ours = SigningKey::from_pkcs8_pem(&raw.to_pkcs8_pem(LineEnding::LF).unwrap()).unwrap();
    (ours, raw)
}

/// The SHA-256 of the DER of a freshly made self-signed certificate.
fn real_cert(name: &str) -> CertThumbprint {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    CertThumbprint::of_der(ck.cert.der())
}

struct Fixture {
    issuer: TokenIssuer,
    raw: ed25519_dalek::SigningKey,
    verifier: Verifier,
    cert: CertThumbprint,
    clock: FixedClock,
}

fn fixture() -> Fixture {
    let (key, raw) = keypair();
    let keys = IssuerKeys::with_keys(issuer_id(), [key.verifying_key()]).unwrap();
    Fixture {
        issuer: TokenIssuer::new(issuer_id(), key),
        raw,
        verifier: Verifier::new(keys, Audience::new("h1").unwrap()),
        cert: real_cert("alice.operator.c1"),
        clock: FixedClock::new(T0),
    }
}

fn input(cert: CertThumbprint) -> ClaimsInput {
    ClaimsInput {
        subject: PrincipalId::parse("nitrile://c1/operator/alice").unwrap(),
        group: Name::new("oncall").unwrap(),
        audience: Audience::new("h1").unwrap(),
        operations: vec![Operation::HostDescribe, Operation::HostDrain],
        resources: vec![ResourceId::parse("host/h1").unwrap()],
        cert,
        lifetime: None,
    }
}

fn describe_h1() -> Request {
    Request {
        operation: Operation::HostDescribe,
        resource: ResourceId::parse("host/h1").unwrap(),
    }
}

impl Fixture {
    fn mint(&self, input: ClaimsInput) -> String {
        self.issuer
            .mint(input, T0, &mut rand_core::OsRng)
            .unwrap()
            .0
    }

    fn verify(&self, token: &str) -> Result<nitrile_token::VerifiedGrant, TokenError> {
        self.verifier
            .verify(token, &describe_h1(), self.cert.as_bytes(), &self.clock)
    }

    /// Signs `payload` with the issuer's real key and footer, as the issuer
    /// never would.
    fn forge(&self, payload: &str) -> String {
        let footer = format!(r#"{{"kid":"{}"}}"#, self.issuer.key_id());
        v4_public_sign(
            &self.raw,
            payload.as_bytes(),
            footer.as_bytes(),
            IMPLICIT_ASSERTION,
        )
    }

    fn payload(&self, exp: &str) -> String {
        format!(
            r#"{{"iss":"nitrile://c1/service/tokend","sub":"nitrile://c1/operator/alice","grp":"oncall","aud":"h1","ops":["host.describe"],"res":["host/h1"],"iat":"2030-01-01T12:00:00Z","nbf":"2030-01-01T12:00:00Z","exp":"{exp}","jti":"AAECAwQFBgcICQoLDA0ODw","cnf":{{"x5t#S256":"{}"}}}}"#,
            base64_url(self.cert.as_bytes())
        )
    }
}

fn base64_url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[test]
fn a_good_token_is_accepted_and_says_what_it_grants() {
    let f = fixture();
    let (token, claims) = f
        .issuer
        .mint(input(f.cert), T0, &mut rand_core::OsRng)
        .unwrap();
    let grant = f.verify(&token).unwrap();
    assert_eq!(grant.claims(), &claims);
    assert_eq!(grant.subject().uri(), "nitrile://c1/operator/alice");
    assert_eq!(grant.group().as_str(), "oncall");
    assert_eq!(grant.operation(), Operation::HostDescribe);
    assert_eq!(grant.resource().to_string(), "host/h1");
    assert_eq!(grant.expires_at(), T0 + Duration::minutes(5));
    assert_eq!(grant.token_id(), claims.token_id());
    // The forged-payload helper makes tokens the verifier accepts, so the
    // refusals below are caused by what each changes.
    let forged = f.forge(&f.payload("2030-01-01T12:05:00Z"));
    f.verify(&forged).unwrap();
}

#[test]
fn too_large_is_refused() {
    let f = fixture();
    let token = format!("v4.public.{}", "A".repeat(4096));
    assert!(matches!(f.verify(&token), Err(TokenError::TooLarge(_))));
}

#[test]
fn malformed_is_refused() {
    let f = fixture();
    let token = f.mint(input(f.cert));
    let v3 = token.replacen("v4.public.", "v3.public.", 1);
    let padded = format!("{token}=");
    let bad_footer = format!(
        "{}.{}",
        token.split('.').take(3).collect::<Vec<_>>().join("."),
        base64_url(b"{}")
    );
    for (bad, code) in [
        (v3.as_str(), "malformed"),
        (padded.as_str(), "malformed"),
        (bad_footer.as_str(), "malformed"),
        ("", "malformed"),
    ] {
        let err = f.verify(bad).unwrap_err();
        assert_eq!(err.code(), code, "{err}");
    }
}

#[test]
fn unknown_key_is_refused() {
    let f = fixture();
    let (stranger, _) = keypair();
    let token =
        TokenIssuer::new(issuer_id(), stranger).mint(input(f.cert), T0, &mut rand_core::OsRng);
    let err = f.verify(&token.unwrap().0).unwrap_err();
    assert!(matches!(err, TokenError::UnknownKey(_)), "{err}");
}

#[test]
fn rotated_out_key_is_refused_and_new_key_accepted() {
    let mut f = fixture();
    let old_token = f.mint(input(f.cert));
    let (new_key, _) = keypair();
    let new_issuer = TokenIssuer::new(issuer_id(), new_key);
    f.verifier
        .keys_mut()
        .insert(new_issuer.verifying_key())
        .unwrap();
    let new_token = new_issuer
        .mint(input(f.cert), T0, &mut rand_core::OsRng)
        .unwrap()
        .0;
    // During rotation both verify.
    f.verify(&old_token).unwrap();
    f.verify(&new_token).unwrap();
    let old_kid = f.issuer.key_id();
    assert!(f.verifier.keys_mut().remove(&old_kid).is_some());
    assert!(matches!(f.verify(&old_token), Err(TokenError::UnknownKey(k)) if k == old_kid));
    f.verify(&new_token).unwrap();
}

#[test]
fn bad_signature_is_refused() {
    let f = fixture();
    // Signed by another key while naming the pinned key.
    let (_, other) = keypair();
    let footer = format!(r#"{{"kid":"{}"}}"#, f.issuer.key_id());
    let payload = f.payload("2030-01-01T12:05:00Z");
    let forged = v4_public_sign(
        &other,
        payload.as_bytes(),
        footer.as_bytes(),
        IMPLICIT_ASSERTION,
    );
    assert!(matches!(f.verify(&forged), Err(TokenError::BadSignature)));
    // Signed by the right key for another token format (implicit assertion).
    let other_format = v4_public_sign(&f.raw, payload.as_bytes(), footer.as_bytes(), b"");
    assert!(matches!(
        f.verify(&other_format),
        Err(TokenError::BadSignature)
    ));
}

#[test]
fn invalid_claims_are_refused_even_when_signed() {
    let f = fixture();
    let payload = f.payload("2030-01-01T12:05:00Z");
    for bad in [
        payload.replacen(r#""aud":"h1""#, r#""aud":"h1","admin":true"#, 1),
        payload.replacen(r#"["host.describe"]"#, "[]", 1),
        payload.replacen(r#"["host/h1"]"#, r#"["host/h1","host/h1"]"#, 1),
        "not json".to_owned(),
    ] {
        let err = f.verify(&f.forge(&bad)).unwrap_err();
        assert!(matches!(err, TokenError::InvalidClaims(_)), "{err}");
    }
}

#[test]
fn wrong_issuer_is_refused() {
    let f = fixture();
    let (key, _) = keypair();
    let mut keys = IssuerKeys::new(issuer_id());
    keys.insert(key.verifying_key()).unwrap();
    let verifier = Verifier::new(keys, Audience::new("h1").unwrap());
    // Same pinned key, but the token claims another issuer.
    let rogue = TokenIssuer::new(
        PrincipalId::parse("nitrile://c2/service/tokend").unwrap(),
        key,
    );
    let token = rogue
        .mint(input(f.cert), T0, &mut rand_core::OsRng)
        .unwrap()
        .0;
    let err = verifier
        .verify(&token, &describe_h1(), f.cert.as_bytes(), &f.clock)
        .unwrap_err();
    assert!(matches!(err, TokenError::WrongIssuer { .. }), "{err}");
}

#[test]
fn not_yet_valid_is_refused_beyond_clock_skew() {
    let f = fixture();
    let token = f.mint(input(f.cert));
    f.clock.set(T0 - Duration::seconds(29));
    f.verify(&token).unwrap();
    f.clock.set(T0 - Duration::seconds(31));
    let err = f.verify(&token).unwrap_err();
    assert!(matches!(err, TokenError::NotYetValid { .. }), "{err}");
    assert_eq!(err.code(), "not_yet_valid");
}

#[test]
fn expired_is_refused() {
    let f = fixture();
    let token = f.mint(input(f.cert));
    f.clock
        .set(T0 + Duration::minutes(5) - Duration::seconds(1));
    f.verify(&token).unwrap();
    f.clock.set(T0 + Duration::minutes(5));
    let err = f.verify(&token).unwrap_err();
    assert!(matches!(err, TokenError::Expired { .. }), "{err}");
    assert_eq!(err.code(), "expired");
}

#[test]
fn lifetime_over_five_minutes_is_refused_at_mint_and_at_verify() {
    assert_eq!(MAX_LIFETIME, Duration::minutes(5));
    let f = fixture();
    let mut long = input(f.cert);
    long.lifetime = Some(MAX_LIFETIME + Duration::seconds(1));
    let err = f.issuer.mint(long, T0, &mut rand_core::OsRng).unwrap_err();
    assert!(matches!(err, TokenError::LifetimeTooLong { .. }), "{err}");
    let mut max = input(f.cert);
    max.lifetime = Some(MAX_LIFETIME);
    f.verify(&f.mint(max)).unwrap();

    // Signed by the issuer's real key, five minutes and one second.
    let forged = f.forge(&f.payload("2030-01-01T12:05:01Z"));
    let err = f.verify(&forged).unwrap_err();
    assert!(matches!(err, TokenError::LifetimeTooLong { .. }), "{err}");
    // Exactly five minutes verifies (the forge is faithful).
    f.verify(&f.forge(&f.payload("2030-01-01T12:05:00Z")))
        .unwrap();
}

/// A token minted by hand with a six-minute lifetime, signed with the
/// issuer's real key, is refused by a host's verifier at every moment of
/// its life, not only after five minutes.
#[test]
fn a_hand_minted_six_minute_token_is_refused_by_the_host_verifier() {
    let f = fixture();
    let token = f.forge(&f.payload("2030-01-01T12:06:00Z"));
    for at in [T0, T0 + Duration::minutes(1), T0 + Duration::minutes(5)] {
        let clock = FixedClock::new(at);
        let err = f
            .verifier
            .verify(&token, &describe_h1(), f.cert.as_bytes(), &clock)
            .unwrap_err();
        assert!(matches!(err, TokenError::LifetimeTooLong { .. }), "{err}");
        assert_eq!(err.code(), "lifetime_too_long");
    }
}

#[test]
fn wrong_audience_is_refused() {
    let f = fixture();
    let mut other_host = input(f.cert);
    other_host.audience = Audience::new("h2").unwrap();
    let err = f.verify(&f.mint(other_host)).unwrap_err();
    assert!(matches!(err, TokenError::WrongAudience { .. }), "{err}");
}

#[test]
fn operation_not_granted_is_refused() {
    let f = fixture();
    let token = f.mint(input(f.cert));
    let req = Request {
        operation: Operation::HostUpdate,
        resource: ResourceId::parse("host/h1").unwrap(),
    };
    let err = f
        .verifier
        .verify(&token, &req, f.cert.as_bytes(), &f.clock)
        .unwrap_err();
    assert!(
        matches!(err, TokenError::OperationNotGranted(Operation::HostUpdate)),
        "{err}"
    );
}

#[test]
fn resource_not_granted_is_refused() {
    let f = fixture();
    let token = f.mint(input(f.cert));
    let req = Request {
        operation: Operation::HostDescribe,
        resource: ResourceId::parse("host/h2").unwrap(),
    };
    let err = f
        .verifier
        .verify(&token, &req, f.cert.as_bytes(), &f.clock)
        .unwrap_err();
    assert!(matches!(err, TokenError::ResourceNotGranted(_)), "{err}");
}

#[test]
fn a_relayed_token_is_checked_for_everything_but_the_callers_certificate() {
    let f = fixture();
    let token = f.mint(input(f.cert));
    let keys = f.verifier.keys();
    let h1 = Audience::new("h1").unwrap();
    // Relayed by h1: every check but the binding, which h1 made.
    let grant = keys
        .verify_relayed(&token, &describe_h1(), &h1, &f.clock)
        .unwrap();
    assert_eq!(grant.operation(), Operation::HostDescribe);
    // Relayed by another host: its audience is not the relaying party.
    let h2 = Audience::new("h2").unwrap();
    assert!(matches!(
        keys.verify_relayed(&token, &describe_h1(), &h2, &f.clock),
        Err(TokenError::WrongAudience { .. })
    ));
    // Another operation, another resource, expired, tampered: refused.
    let other_op = Request {
        operation: Operation::InstanceList,
        ..describe_h1()
    };
    assert!(matches!(
        keys.verify_relayed(&token, &other_op, &h1, &f.clock),
        Err(TokenError::OperationNotGranted(_))
    ));
    let other_res = Request {
        resource: ResourceId::parse("host/h2").unwrap(),
        ..describe_h1()
    };
    assert!(matches!(
        keys.verify_relayed(&token, &other_res, &h1, &f.clock),
        Err(TokenError::ResourceNotGranted(_))
    ));
    let late = FixedClock::new(T0 + MAX_LIFETIME);
    assert!(matches!(
        keys.verify_relayed(&token, &describe_h1(), &h1, &late),
        Err(TokenError::Expired { .. })
    ));
    let mut tampered = token.clone().into_bytes();
    let at = tampered.len() / 2;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert!(
        keys.verify_relayed(&tampered, &describe_h1(), &h1, &f.clock)
            .is_err()
    );
}

#[test]
fn stolen_token_from_another_certificate_is_refused() {
    let f = fixture();
    let token = f.mint(input(f.cert));
    let thief = real_cert("mallory.operator.c1");
    assert_ne!(thief, f.cert);
    let err = f
        .verifier
        .verify(&token, &describe_h1(), thief.as_bytes(), &f.clock)
        .unwrap_err();
    assert!(matches!(err, TokenError::CertificateMismatch), "{err}");
}

#[test]
fn replayed_mutation_token_is_refused() {
    let f = fixture();
    let token = f.mint(input(f.cert));
    let drain = Request {
        operation: Operation::HostDrain,
        resource: ResourceId::parse("host/h1").unwrap(),
    };
    assert!(drain.operation.is_mutation());
    let cache = ReplayCache::new(16);
    let grant = f
        .verifier
        .verify(&token, &drain, f.cert.as_bytes(), &f.clock)
        .unwrap();
    let first = cache
        .check_and_record(grant.token_id(), grant.expires_at(), T0)
        .unwrap();
    assert_eq!(first.token_id(), grant.token_id());
    let again = f
        .verifier
        .verify(&token, &drain, f.cert.as_bytes(), &f.clock)
        .unwrap();
    let err = cache
        .check_and_record(again.token_id(), again.expires_at(), T0)
        .unwrap_err();
    assert!(matches!(err, TokenError::Replayed), "{err}");
}

#[test]
fn full_replay_cache_refuses_new_tokens() {
    let f = fixture();
    let cache = ReplayCache::new(1);
    let a = f.verify(&f.mint(input(f.cert))).unwrap();
    let b = f.verify(&f.mint(input(f.cert))).unwrap();
    let _ = cache
        .check_and_record(a.token_id(), a.expires_at(), T0)
        .unwrap();
    let err = cache
        .check_and_record(b.token_id(), b.expires_at(), T0)
        .unwrap_err();
    assert!(matches!(err, TokenError::ReplayCacheFull), "{err}");
}

#[test]
fn signature_only_inspection_checks_time_but_not_grant() {
    let f = fixture();
    let token = f.mint(input(f.cert));
    let signed = f
        .verifier
        .keys()
        .verify_signature_only(&token, &f.clock)
        .unwrap();
    assert_eq!(signed.key_id(), f.issuer.key_id());
    assert_eq!(signed.claims().audience().as_str(), "h1");
    f.clock.set(T0 + Duration::hours(1));
    assert!(matches!(
        f.verifier.keys().verify_signature_only(&token, &f.clock),
        Err(TokenError::Expired { .. })
    ));
    let unverified = nitrile_token::danger_decode_unverified(&token).unwrap();
    assert_eq!(unverified.unverified_claims(), signed.claims());
}

#[test]
fn flipping_any_bit_of_a_token_makes_it_fail() {
    let f = fixture();
    let token = f.mint(input(f.cert));
    f.verify(&token).unwrap();
    let mut tried = 0;
    for i in 0..token.len() {
        for bit in 0..8 {
            let mut bytes = token.clone().into_bytes();
            bytes[i] ^= 1 << bit;
            let Ok(t) = String::from_utf8(bytes) else {
                continue;
            };
            assert!(f.verify(&t).is_err(), "byte {i} bit {bit} accepted");
            tried += 1;
        }
    }
    // Every flip of bits 0-6 of an ASCII token is still text; bit 7 never is.
    assert_eq!(tried, token.len() * 7);
}

#[test]
fn error_codes_are_distinct() {
    let codes = [
        TokenError::BadSignature.code(),
        TokenError::UnknownKey("AAECAwQFBgcICQoLDA0ODw".parse().unwrap()).code(),
        TokenError::CertificateMismatch.code(),
        TokenError::Replayed.code(),
        TokenError::ReplayCacheFull.code(),
        TokenError::TooLarge(1).code(),
        TokenError::OperationNotGranted(Operation::HostDrain).code(),
        TokenError::ResourceNotGranted(ResourceId::parse("host/h1").unwrap()).code(),
    ];
    let set: std::collections::BTreeSet<_> = codes.iter().collect();
    assert_eq!(set.len(), codes.len());
}

fn arb_name() -> impl Strategy<Value = Name> {
    "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?".prop_map(|s| Name::new(&s).unwrap())
}

fn arb_claims_input(cert: CertThumbprint) -> impl Strategy<Value = ClaimsInput> {
    (
        arb_name(),
        arb_name(),
        arb_name(),
        arb_name(),
        // At most as many operations as a token may carry.
        proptest::sample::subsequence(
            Operation::ALL.to_vec(),
            1..=Operation::ALL
                .len()
                .min(nitrile_api::wire::MAX_REQUEST_OPERATIONS),
        ),
        proptest::collection::btree_set(
            (
                proptest::sample::select(nitrile_api::ResourceKind::ALL.to_vec()),
                arb_name(),
            ),
            1..8,
        ),
        1i64..=300,
    )
        .prop_map(
            move |(cell, user, group, aud, ops, res, secs)| ClaimsInput {
                subject: PrincipalId::new(cell, nitrile_api::PrincipalKind::Operator, user),
                group,
                audience: Audience::new(aud.as_str()).unwrap(),
                operations: ops,
                resources: res
                    .into_iter()
                    .map(|(k, n)| ResourceId::new(k, n))
                    .collect(),
                cert,
                lifetime: Some(Duration::seconds(secs)),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn mint_then_verify_round_trips(
        input in arb_claims_input(CertThumbprint::from_sha256([7; 32])),
        op_pick in any::<prop::sample::Index>(),
        res_pick in any::<prop::sample::Index>(),
        offset in 0i64..900,
    ) {
        let (key, _) = keypair();
        let issuer = TokenIssuer::new(issuer_id(), key);
        let keys = IssuerKeys::with_keys(issuer_id(), [issuer.verifying_key()]).unwrap();
        let verifier = Verifier::new(keys, input.audience.clone());
        let (token, claims) = issuer.mint(input.clone(), T0, &mut rand_core::OsRng).unwrap();
        prop_assert!(token.len() <= nitrile_token::MAX_TOKEN_LEN);
        let request = Request {
            operation: *op_pick.get(&input.operations),
            resource: res_pick.get(&input.resources).clone(),
        };
        let clock = FixedClock::new(T0 + Duration::seconds(offset));
        let lifetime = input.lifetime.unwrap().whole_seconds();
        let result = verifier.verify(&token, &request, &[7; 32], &clock);
        if offset < lifetime {
            let grant = result.unwrap();
            prop_assert_eq!(grant.claims(), &claims);
            prop_assert_eq!(claims.subject(), &input.subject);
            prop_assert_eq!(claims.operations(), input.operations.as_slice());
            prop_assert_eq!(claims.resources(), input.resources.as_slice());
            prop_assert_eq!(claims.expires_at(), T0 + Duration::seconds(lifetime));
        } else {
            let expired = matches!(result, Err(TokenError::Expired { .. }));
            prop_assert!(expired, "expected expiry");
        }
        // Another certificate is always refused.
        let mismatch = matches!(
            verifier.verify(&token, &request, &[8; 32], &FixedClock::new(T0)),
            Err(TokenError::CertificateMismatch)
        );
        prop_assert!(mismatch, "another certificate accepted");
    }

    #[test]
    fn flipping_a_random_bit_makes_verification_fail(
        input in arb_claims_input(CertThumbprint::from_sha256([7; 32])),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let (key, _) = keypair();
        let issuer = TokenIssuer::new(issuer_id(), key);
        let keys = IssuerKeys::with_keys(issuer_id(), [issuer.verifying_key()]).unwrap();
        let verifier = Verifier::new(keys, input.audience.clone());
        let token = issuer.mint(input.clone(), T0, &mut rand_core::OsRng).unwrap().0;
        let request = Request {
            operation: input.operations[0],
            resource: input.resources[0].clone(),
        };
        let clock = FixedClock::new(T0);
        prop_assert!(verifier.verify(&token, &request, &[7; 32], &clock).is_ok());
        let mut bytes = token.into_bytes();
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        if let Ok(t) = String::from_utf8(bytes) {
            prop_assert!(verifier.verify(&t, &request, &[7; 32], &clock).is_err());
            prop_assert!(verifier.keys().verify_signature_only(&t, &clock).is_err());
        }
    }
}
