//! The attest crate against a real TPM 2.0 (swtpm), and its quotes against
//! an independent verifier (tpm2-tools' `tpm2_checkquote`).
//!
//! Needs swtpm and swtpm_setup (and tpm2-tools for the independent check);
//! prints `SKIPPED: <reason>` without them.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nitrile_attest::swtpm::{self, Swtpm};
use nitrile_attest::{
    AttestError, Challenges, HOST_PCRS, Tpm, all_match, compare, cose, replay, verify_quote,
};

fn tpm_or_skip(dir: &Path) -> Option<Swtpm> {
    if let Err(why) = swtpm::usable() {
        println!("SKIPPED: {why}");
        return None;
    }
    Some(Swtpm::start(dir).expect("swtpm starts"))
}

#[test]
fn a_quote_verifies_and_every_forgery_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some(swtpm) = tpm_or_skip(&dir.path().join("tpm")) else {
        return;
    };
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();

    // init's PCR holds what was extended into it.
    let events = [[1u8; 32], [2u8; 32]];
    for e in events {
        tpm.extend(15, e).unwrap();
    }
    let before = tpm.pcrs(&[15]).unwrap();
    assert_eq!(before.0[&15], replay(events));

    let ak = tpm.attestation_key().unwrap();
    assert_eq!(
        ak,
        tpm.attestation_key().unwrap(),
        "the TPM derives the same key again"
    );
    let challenges = Challenges::new(Duration::from_secs(60));
    let nonce = challenges.issue();
    let quote = tpm.quote(&nonce, &HOST_PCRS).unwrap();
    challenges.redeem(&nonce).unwrap();
    let info = verify_quote(&ak, &quote, &nonce).unwrap();
    assert_eq!(info.pcrs, HOST_PCRS.to_vec());

    // A replayed quote: its nonce was redeemed already.
    assert!(matches!(
        challenges.redeem(&nonce),
        Err(AttestError::StaleNonce(_))
    ));
    // A quote for another nonce.
    let other = challenges.issue();
    assert!(matches!(
        verify_quote(&ak, &quote, &other),
        Err(AttestError::NonceMismatch)
    ));
    // A nonce never issued, and one that expired.
    assert!(challenges.redeem(&[7u8; 32]).is_err());
    let short = Challenges::new(Duration::from_millis(1));
    let old = short.issue();
    std::thread::sleep(Duration::from_millis(5));
    assert!(matches!(
        short.redeem(&old),
        Err(AttestError::StaleNonce("expired"))
    ));

    // Values that are not the quoted ones.
    let mut lying = quote.clone();
    lying.pcrs.0.insert(15, [9u8; 32]);
    assert!(matches!(
        verify_quote(&ak, &lying, &nonce),
        Err(AttestError::PcrDigest)
    ));
    let mut fewer = quote.clone();
    fewer.pcrs.0.remove(&4);
    assert!(matches!(
        verify_quote(&ak, &fewer, &nonce),
        Err(AttestError::PcrSelection { .. })
    ));
    // One flipped byte of the signed structure.
    let mut flipped = quote.clone();
    let last = flipped.message.len() - 1;
    flipped.message[last] ^= 1;
    assert!(matches!(
        verify_quote(&ak, &flipped, &nonce),
        Err(AttestError::BadSignature)
    ));

    // Reference values: a changed PCR does not match.
    let reference: BTreeMap<u8, [u8; 32]> = quote.pcrs.0.clone();
    assert!(all_match(&compare(&quote.pcrs, &reference)));
    let mut changed = reference.clone();
    changed.insert(15, replay([[1u8; 32], [3u8; 32]]));
    let lines = compare(&quote.pcrs, &changed);
    assert!(!all_match(&lines));
    assert!(lines.iter().any(|l| l.index == 15 && !l.matched));

    // A quote from another TPM does not verify under this one's key.
    let dir2 = tempfile::tempdir().unwrap();
    let swtpm2 = Swtpm::start(&dir2.path().join("tpm")).unwrap();
    let mut tpm2 = Tpm::open(&swtpm2.tcti()).unwrap();
    let ak2 = tpm2.attestation_key().unwrap();
    assert_ne!(ak, ak2);
    let nonce2 = challenges.issue();
    let foreign = tpm2.quote(&nonce2, &HOST_PCRS).unwrap();
    assert!(verify_quote(&ak2, &foreign, &nonce2).is_ok());
    assert!(matches!(
        verify_quote(&ak, &foreign, &nonce2),
        Err(AttestError::BadSignature)
    ));
}

#[test]
fn tpm2_checkquote_accepts_our_quote_and_refuses_a_changed_one() {
    let dir = tempfile::tempdir().unwrap();
    let Some(swtpm) = tpm_or_skip(&dir.path().join("tpm")) else {
        return;
    };
    if Command::new("tpm2_checkquote")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIPPED: tpm2_checkquote (tpm2-tools) is not installed");
        return;
    }
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    tpm.extend(15, [5u8; 32]).unwrap();
    let ak = tpm.attestation_key().unwrap();
    let nonce = [0x42u8; 32];
    let quote = tpm.quote(&nonce, &HOST_PCRS).unwrap();
    drop(tpm);

    let d = dir.path();
    std::fs::write(d.join("ak.pem"), ak.pem().unwrap()).unwrap();
    std::fs::write(d.join("quote.msg"), &quote.message).unwrap();
    std::fs::write(d.join("quote.sig"), &quote.signature).unwrap();
    let values: Vec<u8> = quote.pcrs.0.values().flatten().copied().collect();
    std::fs::write(d.join("quote.pcrs"), &values).unwrap();
    let check = |nonce_hex: &str, pcrs: &str| {
        Command::new("tpm2_checkquote")
            .current_dir(d)
            .args([
                "-u",
                "ak.pem",
                "-m",
                "quote.msg",
                "-s",
                "quote.sig",
                "-g",
                "sha384",
            ])
            .args(["-f", pcrs, "-l", "sha256:4,11,15", "-q", nonce_hex])
            .output()
            .unwrap()
    };
    let ok = check(&hex::encode(nonce), "quote.pcrs");
    assert!(
        ok.status.success(),
        "tpm2_checkquote refused: {}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    // The same tool refuses another nonce and other PCR values.
    assert!(
        !check(&hex::encode([0x43u8; 32]), "quote.pcrs")
            .status
            .success()
    );
    let mut other = values.clone();
    other[0] ^= 1;
    std::fs::write(d.join("other.pcrs"), &other).unwrap();
    assert!(!check(&hex::encode(nonce), "other.pcrs").status.success());
}

#[test]
fn the_highest_version_survives_the_disk_and_refuses_a_downgrade() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("tpm");
    let Some(swtpm) = tpm_or_skip(&state) else {
        return;
    };
    let v = |a, b, c| nitrile_attest::version_bytes(a, b, c).unwrap();
    {
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        assert_eq!(tpm.highest().unwrap(), None);
        tpm.advance_highest(v(0, 2, 0)).unwrap();
        tpm.advance_highest(v(0, 10, 0)).unwrap();
        assert!(matches!(
            tpm.advance_highest(v(0, 9, 99)),
            Err(AttestError::Rollback { .. })
        ));
        tpm.advance_highest(v(0, 10, 0)).unwrap();
    }
    // The TPM restarted (its NV memory is its own state, not the host's disk).
    drop(swtpm);
    let swtpm = Swtpm::start(&state).unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.highest().unwrap(), Some(v(0, 10, 0)));
    let err = tpm.advance_highest(v(0, 2, 0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the TPM records version 0.10.0 and refuses 0.2.0"
    );
}

#[test]
fn a_document_in_the_nitro_layout_is_signed_by_the_tpm() {
    let dir = tempfile::tempdir().unwrap();
    let Some(swtpm) = tpm_or_skip(&dir.path().join("tpm")) else {
        return;
    };
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let key = tpm.document_key().unwrap();
    let point = key.document_point().unwrap();
    let pcrs = tpm.pcrs(&HOST_PCRS).unwrap();
    let payload = cose::payload(
        "h1",
        1_700_000_000_000,
        &pcrs,
        b"leaf",
        &[b"root".to_vec()],
        None,
        None,
        Some(b"n"),
    );
    let signature = tpm.sign_document(&cose::to_be_signed(&payload)).unwrap();
    let doc = cose::sign1(&payload, &signature);
    let verify = |point: Vec<u8>| {
        move |tbs: &[u8], sig: &[u8], _cert: &[u8], _bundle: &[Vec<u8>]| {
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P384_SHA384_FIXED,
                point,
            )
            .verify(tbs, sig)
            .map_err(|_| AttestError::BadSignature)
        }
    };
    let opened = cose::open(&doc, verify(point.clone())).unwrap();
    assert_eq!(opened.module_id, "h1");
    assert_eq!(opened.pcrs, pcrs);
    assert_eq!(opened.nonce.as_deref(), Some("6e"));
    // One changed byte of the payload, and another TPM's key: refused.
    let mut bad = doc.clone();
    let at = bad.len() - 120;
    bad[at] ^= 1;
    assert!(cose::open(&bad, verify(point.clone())).is_err());
    let dir2 = tempfile::tempdir().unwrap();
    let swtpm2 = Swtpm::start(&dir2.path().join("tpm")).unwrap();
    let other = Tpm::open(&swtpm2.tcti())
        .unwrap()
        .document_key()
        .unwrap()
        .document_point()
        .unwrap();
    assert!(matches!(
        cose::open(&doc, verify(other)),
        Err(AttestError::BadSignature)
    ));
    // The attestation key is restricted: it is not the document key.
    assert!(tpm.attestation_key().unwrap().document_point().is_err());
}
