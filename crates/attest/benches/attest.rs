//! Attestation against swtpm: what a quote, an attestation and an
//! enrollment cost, and how many quotes a verifier checks per second.
//!
//! Measured in one run, median of N each:
//! - `Tpm::quote` (PCRs 4, 11, 15 with a nonce; the attestation key derived
//!   again, the quote, the PCRs read), against a plain `TPM2_PCR_Read` of
//!   the same PCRs as the baseline of one TPM round trip;
//! - what `host.attest` asks of the TPM: the quote plus the document
//!   signature (`Tpm::sign_document`);
//! - a whole enrollment: both halves (`host_evidence`, `host_proof`) and
//!   the CA's checks, TPM commands included;
//! - `verify_quote` (parse, ECDSA P-384 with ring, nonce, PCR digest)
//!   against ring's ECDSA P-384 verification alone of the same message: the
//!   quotes a verifier checks per second and the ratio.
//!
//! Run: `cargo bench -p nitrile-attest --bench attest` (root and swtpm
//! needed; prints `SKIPPED: <reason>` otherwise). `NITRILE_BENCH_QUICK=1`
//! for fewer rounds.

#![allow(clippy::disallowed_macros)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nitrile_attest::enroll;
use nitrile_attest::swtpm::{self, Swtpm};
use nitrile_attest::{HOST_PCRS, Tpm, verify_quote};

fn quick() -> bool {
    std::env::var_os("NITRILE_BENCH_QUICK").is_some_and(|v| v == "1")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn main() {
    if let Err(why) = swtpm::usable() {
        println!("SKIPPED: {why}");
        return;
    }
    let rounds = if quick() { 5 } else { 21 };
    let tmp = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(&tmp.path().join("tpm")).unwrap();
    let tcti = swtpm.tcti();
    let nonce = [7u8; 32];

    let (mut read, mut quote, mut attest, mut enrollment) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        Tpm::open(&tcti).unwrap().pcrs(&HOST_PCRS).unwrap();
        read.push(t.elapsed());

        let t = Instant::now();
        Tpm::open(&tcti).unwrap().quote(&nonce, &HOST_PCRS).unwrap();
        quote.push(t.elapsed());

        let t = Instant::now();
        let mut tpm = Tpm::open(&tcti).unwrap();
        let q = tpm.quote(&nonce, &HOST_PCRS).unwrap();
        let payload = nitrile_attest::cose::payload(
            "h1",
            0,
            &q.pcrs,
            &[0u8; 400],
            &[vec![0u8; 400]],
            None,
            None,
            Some(&nonce),
        );
        tpm.sign_document(&nitrile_attest::cose::to_be_signed(&payload))
            .unwrap();
        drop(tpm);
        attest.push(t.elapsed());

        let t = Instant::now();
        let mut tpm = Tpm::open(&tcti).unwrap();
        let (evidence, tls) = enroll::host_evidence(&mut tpm).unwrap();
        let (challenge, secret) = enroll::challenge(&evidence).unwrap();
        let proof = enroll::host_proof(&mut tpm, &tls, &challenge).unwrap();
        let reference: BTreeMap<u8, [u8; 32]> = proof.quote.pcrs.0.clone();
        enroll::check_proof(&evidence, &challenge, &secret, &proof, &reference).unwrap();
        enrollment.push(t.elapsed());
    }

    // A TLS handshake's signature by the TPM-bound key (what every
    // handshake of an enrolled host costs), against a software ECDSA P-256
    // signature with ring.
    let values: Vec<[u8; 32]> = Tpm::open(&tcti)
        .unwrap()
        .pcrs(&HOST_PCRS)
        .unwrap()
        .0
        .values()
        .copied()
        .collect();
    let bound = Tpm::open(&tcti)
        .unwrap()
        .create_bound_key(&HOST_PCRS, &values)
        .unwrap();
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();
    let soft = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .unwrap();
    let (mut tpm_sign, mut soft_sign) = (vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        Tpm::open(&tcti)
            .unwrap()
            .sign_bound(&bound, [9u8; 32])
            .unwrap();
        tpm_sign.push(t.elapsed());
        let t = Instant::now();
        soft.sign(&rng, b"a handshake transcript").unwrap();
        soft_sign.push(t.elapsed());
    }
    let (tpm_sign, soft_sign) = (median(tpm_sign), median(soft_sign));

    // Verification, CPU only.
    let mut tpm = Tpm::open(&tcti).unwrap();
    let ak = tpm.attestation_key().unwrap();
    let q = tpm.quote(&nonce, &HOST_PCRS).unwrap();
    drop(tpm);
    let rs = nitrile_attest::quote::ecdsa_p384_rs(&q.signature).unwrap();
    let point = ak.point().unwrap();
    let n = if quick() { 500 } else { 3000 };
    let (mut full, mut bare) = (vec![], vec![]);
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..n {
            verify_quote(&ak, &q, &nonce).unwrap();
        }
        full.push(t.elapsed() / n);
        let t = Instant::now();
        for _ in 0..n {
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P384_SHA384_FIXED,
                &point,
            )
            .verify(&q.message, &rs)
            .unwrap();
        }
        bare.push(t.elapsed() / n);
    }
    let (read, quote, attest, enrollment) = (
        median(read),
        median(quote),
        median(attest),
        median(enrollment),
    );
    let (full, bare) = (median(full), median(bare));
    println!("swtpm, median of {rounds}:");
    println!(
        "  PCR read (baseline, one round trip)                  {} ms",
        ms(read)
    );
    println!(
        "  quote                                                {} ms ({:.1}x the PCR read)",
        ms(quote),
        quote.as_secs_f64() / read.as_secs_f64()
    );
    println!(
        "  host.attest's TPM work (quote + document signature)  {} ms",
        ms(attest)
    );
    println!(
        "  enrollment (both halves and the CA's checks)         {} ms",
        ms(enrollment)
    );
    println!(
        "  TLS signature by the TPM-bound key                   {} ms (software ECDSA P-256: {:.0} us)",
        ms(tpm_sign),
        soft_sign.as_secs_f64() * 1e6
    );
    println!(
        "verify_quote {:.0} us ({:.0} quotes/s), ECDSA P-384 alone {:.0} us; ratio {:.2}",
        full.as_secs_f64() * 1e6,
        1.0 / full.as_secs_f64(),
        bare.as_secs_f64() * 1e6,
        full.as_secs_f64() / bare.as_secs_f64()
    );
}
