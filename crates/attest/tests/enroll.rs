//! Enrollment against real TPMs (swtpm): a host whose TPM and measurements
//! check is enrolled and its TPM-bound TLS key signs; a host running a
//! changed image (one byte of its initramfs) is refused and its TPM will
//! not sign with the key bound to the old measurements; a credential made
//! for one TPM cannot be opened by another; an endorsement key certificate
//! from a CA nobody pinned is refused.
//!
//! Needs swtpm and root (swtpm's local CA); prints `SKIPPED: <reason>`
//! without them.

use std::collections::BTreeMap;
use std::path::Path;

use nitrile_attest::enroll::{self, EnrollError};
use nitrile_attest::swtpm::{self, Swtpm};
use nitrile_attest::{HOST_PCRS, Tpm};
use sha2::{Digest as _, Sha256};

fn skip() -> bool {
    match swtpm::usable() {
        Ok(()) => false,
        Err(why) => {
            println!("SKIPPED: {why}");
            true
        }
    }
}

/// swtpm's local CA: the EK certificates' issuer and its root.
fn ek_cas() -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    let mut out = Vec::new();
    for f in ["issuercert.pem", "swtpm-localca-rootca-cert.pem"] {
        let pem = std::fs::read(Path::new("/var/lib/swtpm-localca").join(f)).unwrap();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            out.push(c.unwrap().as_ref().to_vec());
        }
    }
    out
}

/// What firmware, the UKI stub and init extend for an image whose
/// initramfs is `initrd` (a stand-in for the boot the image test does).
fn boot(tpm: &mut Tpm, initrd: &[u8]) {
    tpm.extend(4, Sha256::digest(b"the UKI").into()).unwrap();
    tpm.extend(11, Sha256::digest(b".initrd\0").into()).unwrap();
    tpm.extend(11, Sha256::digest(initrd).into()).unwrap();
    tpm.extend(15, Sha256::digest(b"hostd-config").into())
        .unwrap();
}

fn reference(initrd: &[u8]) -> BTreeMap<u8, [u8; 32]> {
    let z = |d: Vec<[u8; 32]>| nitrile_attest::replay(d);
    BTreeMap::from([
        (4, z(vec![Sha256::digest(b"the UKI").into()])),
        (
            11,
            z(vec![
                Sha256::digest(b".initrd\0").into(),
                Sha256::digest(initrd).into(),
            ]),
        ),
        (15, z(vec![Sha256::digest(b"hostd-config").into()])),
    ])
}

#[test]
fn a_measured_host_is_enrolled_and_a_changed_one_is_not() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("tpm");
    let image = b"the initramfs: nitrile and its libraries".to_vec();
    let reference = reference(&image);

    let swtpm = Swtpm::start(&state).unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    boot(&mut tpm, &image);
    let (evidence, tls) = enroll::host_evidence(&mut tpm).unwrap();
    enroll::check_evidence(&evidence, &ek_cas()).unwrap();
    let (challenge, secret) = enroll::challenge(&evidence).unwrap();
    let proof = enroll::host_proof(&mut tpm, &tls, &challenge).unwrap();
    let enrolled = enroll::check_proof(&evidence, &challenge, &secret, &proof, &reference).unwrap();
    assert_eq!(enrolled.attestation_key, evidence.attestation_key);
    // The TLS key signs while the measurements hold, verifiably.
    let digest: [u8; 32] = Sha256::digest(b"a TLS handshake").into();
    let sig = tpm.sign_bound(&tls, digest).unwrap();
    assert_eq!(sig.len(), 64);
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        &enrolled.tls_point,
    )
    .verify(b"a TLS handshake", &sig)
    .unwrap();

    // So does the document key, and the CA certified that very key.
    let sig = tpm.sign_document(b"an attestation document").unwrap();
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P384_SHA384_FIXED,
        &enrolled.document_point,
    )
    .verify(b"an attestation document", &sig)
    .unwrap();

    // The proof replayed against another challenge: refused.
    let (other, other_secret) = enroll::challenge(&evidence).unwrap();
    assert!(matches!(
        enroll::check_proof(&evidence, &other, &other_secret, &proof, &reference),
        Err(EnrollError::Activation)
    ));
    drop(tpm);

    // The same host reboots into an image with one changed byte.
    drop(swtpm);
    let swtpm = Swtpm::start(&state).unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let mut changed = image.clone();
    changed[5] ^= 1;
    boot(&mut tpm, &changed);
    let (evidence2, tls2) = enroll::host_evidence(&mut tpm).unwrap();
    let (challenge2, secret2) = enroll::challenge(&evidence2).unwrap();
    let proof2 = enroll::host_proof(&mut tpm, &tls2, &challenge2).unwrap();
    let refused = enroll::check_proof(&evidence2, &challenge2, &secret2, &proof2, &reference);
    assert!(
        matches!(&refused, Err(EnrollError::Measurements(m)) if m.contains("PCR 11")),
        "{refused:?}"
    );
    // A TLS key the host made under the changed image, even presented with
    // the good image's quote, is not bound to the reference values.
    let mut mixed = proof.clone();
    mixed.activated = proof2.activated.clone();
    mixed.quote = proof2.quote.clone();
    assert!(enroll::check_proof(&evidence2, &challenge2, &secret2, &mixed, &reference).is_err());
    // And its TPM refuses to sign with the key bound to the old image.
    let err = tpm.sign_bound(&tls, digest).unwrap_err();
    assert!(
        matches!(err, nitrile_attest::AttestError::PolicyRefused(_)),
        "{err}"
    );
    // Nor will it sign a document with the document key the CA certified:
    // that key is bound to the good image's PCRs too.
    let good: Vec<[u8; 32]> = reference.values().copied().collect();
    let err = tpm
        .sign_document_bound_to(&good, b"nitrotpm_pcrs of the good image")
        .unwrap_err();
    assert!(
        matches!(err, nitrile_attest::AttestError::PolicyRefused(_)),
        "{err}"
    );
    // What it can sign a document with is another key, which the CA never
    // certified: a document claiming the good values does not verify.
    let sig = tpm
        .sign_document(b"nitrotpm_pcrs of the good image")
        .unwrap();
    assert!(
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P384_SHA384_FIXED,
            &enrolled.document_point,
        )
        .verify(b"nitrotpm_pcrs of the good image", &sig)
        .is_err()
    );
    assert_ne!(
        tpm.document_key().unwrap().document_point().unwrap(),
        enrolled.document_point
    );
    // A document key of this TPM bound to other values (the changed
    // image's), certified under a good quote: refused at enrollment.
    let now: Vec<[u8; 32]> = tpm.pcrs(&HOST_PCRS).unwrap().0.values().copied().collect();
    let mut other = evidence2.clone();
    other.tls_key = evidence.tls_key.clone();
    other.document_key = tpm.document_key_bound_to(&now).unwrap().tpmt_public;
    let (c, s) = enroll::challenge(&other).unwrap();
    drop(tpm);
    drop(swtpm);
    // Back in the good image, whose quote and TLS key pass.
    let swtpm = Swtpm::start(&state).unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    boot(&mut tpm, &image);
    let mut p = enroll::host_proof(&mut tpm, &tls, &c).unwrap();
    assert!(enroll::check_proof(&evidence, &c, &s, &p, &reference).is_ok());
    (p.document_certify, p.document_certify_signature) =
        tpm.certify_document_key_bound_to(&now, &c.nonce).unwrap();
    let refused = enroll::check_proof(&other, &c, &s, &p, &reference);
    assert!(
        matches!(&refused, Err(EnrollError::Key { key: "document", reason }) if reason.contains("policy")),
        "{refused:?}"
    );
    // The PCRs this all rests on are the host's.
    assert_eq!(HOST_PCRS, [4, 11, 15]);
}

#[test]
fn another_tpm_cannot_open_the_credential_and_an_unpinned_ek_ca_is_refused() {
    if skip() {
        return;
    }
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let a = Swtpm::start(&a_dir.path().join("tpm")).unwrap();
    let b = Swtpm::start(&b_dir.path().join("tpm")).unwrap();
    let mut ta = Tpm::open(&a.tcti()).unwrap();
    let mut tb = Tpm::open(&b.tcti()).unwrap();
    let (ea, _) = enroll::host_evidence(&mut ta).unwrap();
    let (challenge, secret) = enroll::challenge(&ea).unwrap();
    // The TPM it was made for opens it.
    assert_eq!(
        ta.activate_credential(&challenge.credential).unwrap(),
        secret
    );
    // Another TPM does not (its endorsement key differs).
    assert!(tb.activate_credential(&challenge.credential).is_err());
    // Evidence whose attestation key is another TPM's: the credential is
    // for that key's name, which TPM A does not hold.
    let (eb, _) = enroll::host_evidence(&mut tb).unwrap();
    let mut swapped = ea.clone();
    swapped.attestation_key = eb.attestation_key.clone();
    let (c2, _) = enroll::challenge(&swapped).unwrap();
    assert!(ta.activate_credential(&c2.credential).is_err());
    // An EK certificate checked against a CA nobody pinned, or against
    // nothing: refused; swtpm's local CA: accepted.
    assert!(enroll::check_evidence(&ea, &[]).is_err());
    let mut forged = ea.clone();
    forged.ek_public = eb.ek_public.clone();
    assert!(matches!(
        enroll::check_evidence(&forged, &ek_cas()),
        Err(EnrollError::EndorsementKey(m)) if m.contains("another key")
    ));
    enroll::check_evidence(&ea, &ek_cas()).unwrap();
}
