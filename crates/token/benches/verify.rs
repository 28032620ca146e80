//! Cost of verifying a token at a host: full `Verifier::verify` (size, form,
//! key lookup, Ed25519 signature, claims, times, grant and certificate
//! binding) against a raw Ed25519 `verify_strict` of a message of the same
//! size, the floor of any signed-token scheme.
//!
//! Run with `cargo bench -p nitrile-token --bench verify`. Target: full verify
//! p50 <= 60 us.

use std::hint::black_box;
use std::time::{Duration, Instant};

use ed25519_dalek::Signer as _;
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId};
use nitrile_token::{
    CertThumbprint, ClaimsInput, FixedClock, IssuerKeys, Request, SigningKey, TokenIssuer, Verifier,
};

const ITERATIONS: usize = 20_000;
const WARMUP: usize = 1_000;

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

fn measure(mut f: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..WARMUP {
        f();
    }
    let mut samples = Vec::with_capacity(ITERATIONS);
    for _ in 0..ITERATIONS {
        let start = Instant::now();
        f();
        samples.push(start.elapsed());
    }
    percentiles(samples)
}

fn main() {
    let rng = &mut rand_core::OsRng;
    let issuer_id = PrincipalId::parse("nitrile://c1/service/tokend").unwrap();
    let issuer = TokenIssuer::new(issuer_id.clone(), SigningKey::generate(rng));
    let keys = IssuerKeys::with_keys(issuer_id, [issuer.verifying_key()]).unwrap();
    let verifier = Verifier::new(keys, Audience::new("h1").unwrap());
    let cert = CertThumbprint::of_der(b"a client certificate stands in here");
    let now = time::macros::datetime!(2030-01-01 12:00 UTC);
    let input = ClaimsInput {
        subject: PrincipalId::parse("nitrile://c1/operator/alice").unwrap(),
        group: Name::new("oncall").unwrap(),
        audience: Audience::new("h1").unwrap(),
        operations: vec![Operation::HostDescribe, Operation::HostDrain],
        resources: vec![ResourceId::parse("host/h1").unwrap()],
        cert,
        lifetime: None,
    };
    let (token, claims) = issuer.mint(input, now, rng).unwrap();
    let request = Request {
        operation: Operation::HostDescribe,
        resource: ResourceId::parse("host/h1").unwrap(),
    };
    let clock = FixedClock::new(now);

    let (full_p50, full_p99) = measure(|| {
        let grant = verifier
            .verify(black_box(&token), &request, cert.as_bytes(), &clock)
            .unwrap();
        black_box(grant);
    });

    // The signed message of a v4.public token is PAE(header, payload, footer,
    // implicit): 5 length fields plus the pieces.
    let signed_len = 8
        + 4 * 8
        + "v4.public.".len()
        + claims.to_json().len()
        + format!(r#"{{"kid":"{}"}}"#, issuer.key_id()).len()
        + nitrile_token::IMPLICIT_ASSERTION.len();
    let message = vec![0x5a; signed_len];
    let raw = ed25519_dalek::SigningKey::generate(rng);
    let sig = raw.sign(&message);
    let raw_pk = raw.verifying_key();
    let (raw_p50, raw_p99) = measure(|| {
        raw_pk
            .verify_strict(black_box(&message), black_box(&sig))
            .unwrap();
    });

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "token verify, {ITERATIONS} iterations, one thread, {} byte token, {signed_len} byte signed message",
        token.len()
    );
    println!("{:<36} {:>10} {:>10}", "what", "p50 us", "p99 us");
    println!(
        "{:<36} {:>10.1} {:>10.1}",
        "Verifier::verify (full)",
        us(full_p50),
        us(full_p99)
    );
    println!(
        "{:<36} {:>10.1} {:>10.1}",
        "ed25519 verify_strict (baseline)",
        us(raw_p50),
        us(raw_p99)
    );
    println!(
        "ratio full/baseline: p50 {:.2}x, p99 {:.2}x (target: full p50 <= 60 us: {})",
        us(full_p50) / us(raw_p50),
        us(full_p99) / us(raw_p99),
        if us(full_p50) <= 60.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}
