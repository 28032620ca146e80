//! The key service with an attestation policy: a volume key is released
//! only to a host whose attestation document (COSE_Sign1 of the Nitro
//! layout, signed in its TPM by a key the cell CA certified) names that
//! host, binds the recipient key the VMM made, is recent, and shows the
//! reference PCR values. Without a document, with one binding another
//! recipient, presented by another host, showing other PCRs, or old: the
//! key is not released and the refusal is journaled.
//!
//! Needs swtpm and root (swtpm's local CA); prints `SKIPPED: <reason>`
//! without them.

mod svc;

use nitrile_api::Operation;
use nitrile_attest::swtpm::{self, Swtpm};
use nitrile_attest::{HOST_PCRS, Tpm, cose};
use nitrile_kms::Recipient;
use nitrile_kms_api::wire::{AttestationHex, RecipientKey};
use nitrile_pki::{CellCa, KeyPurpose};
use svc::{Cell, n, p, refusal};

fn skip() -> bool {
    match swtpm::usable() {
        Ok(()) => false,
        Err(why) => {
            println!("SKIPPED: {why}");
            true
        }
    }
}

/// A document as an enrolled host makes it for an unwrap.
fn document(
    tcti: &str,
    cert: &[u8],
    ca: &[u8],
    host: &str,
    recipient: &[u8; 32],
    at_ms: u64,
) -> AttestationHex {
    let pcrs = Tpm::open(tcti).unwrap().pcrs(&HOST_PCRS).unwrap();
    document_showing(tcti, cert, ca, host, recipient, at_ms, &pcrs)
}

/// A document whose payload shows `pcrs`, signed by the document key bound
/// to the PCRs the TPM holds.
fn document_showing(
    tcti: &str,
    cert: &[u8],
    ca: &[u8],
    host: &str,
    recipient: &[u8; 32],
    at_ms: u64,
    pcrs: &nitrile_attest::Pcrs,
) -> AttestationHex {
    let mut tpm = Tpm::open(tcti).unwrap();
    let payload = cose::payload(
        host,
        at_ms,
        pcrs,
        cert,
        &[ca.to_vec()],
        Some(recipient),
        None,
        None,
    );
    let sig = tpm.sign_document(&cose::to_be_signed(&payload)).unwrap();
    AttestationHex::new(&cose::sign1(&payload, &sig)).unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_key_goes_only_to_a_host_that_proves_what_it_runs() {
    if skip() {
        return;
    }
    let mut cell = Cell::new();
    let swtpm = Swtpm::start(&cell.dir.path().join("tpm")).unwrap();
    let tcti = swtpm.tcti();
    // The host booted and measured: these are its reference values.
    let mut tpm = Tpm::open(&tcti).unwrap();
    tpm.extend(11, [1u8; 32]).unwrap();
    tpm.extend(15, [2u8; 32]).unwrap();
    let pcrs = tpm.pcrs(&HOST_PCRS).unwrap();
    let doc_point = tpm.document_key().unwrap().document_point().unwrap();
    drop(tpm);
    let reference: serde_json::Map<String, serde_json::Value> = pcrs
        .0
        .iter()
        .map(|(i, v)| (format!("pcr{i}"), hex::encode(v).into()))
        .collect();
    let reference_path = cell.dir.path().join("reference.json");
    std::fs::write(
        &reference_path,
        serde_json::Value::Object(reference).to_string(),
    )
    .unwrap();
    // Enrollment certified the TPM's document key for host h1.
    let now = time::OffsetDateTime::now_utc();
    let ca = CellCa::load(&cell.dir.path().join("pki"), &n(svc::CELL), now).unwrap();
    let cert = der(&ca
        .issue_for_key(
            &p("host/h1"),
            &doc_point,
            KeyPurpose::Attestation,
            None,
            now,
        )
        .unwrap());
    let ca_der = der(&std::fs::read_to_string(&cell.config.ca).unwrap());
    cell.config.attestation = Some(nitrile_kms::AttestationPolicy {
        references: nitrile_kms::ReferenceSource::File(reference_path),
        max_age_secs: Some(300),
    });
    let running = cell.start().await;

    let token = |v: &str| {
        cell.token(
            "service/placement",
            "h1",
            &[Operation::VolumeCreate],
            &[&format!("volume/{v}")],
        )
    };
    let mut h1 = cell.client(&running, "host/h1").await;
    let wrapped = h1
        .generate(&n("v1"), &n("default"), &token("v1"))
        .await
        .unwrap()
        .wrapped_key;
    let vmm = Recipient::generate().unwrap();
    let pk = RecipientKey(*vmm.public_key().as_bytes());
    let attach = || {
        cell.token(
            "service/placement",
            "h1",
            &[Operation::VolumeAttach],
            &["volume/v1"],
        )
    };
    let refused_for = |r: Result<_, _>, why: &str| {
        let (status, refusal) = refusal(r);
        assert_eq!(status, 403, "{why}: {refusal:?}");
        assert!(refusal.reason.contains(why), "{why}: {}", refusal.reason);
    };

    // No document.
    refused_for(
        h1.unwrap(&n("v1"), &wrapped, &pk, &attach()).await,
        "no attestation document",
    );
    // A document binding another recipient key.
    let other = [9u8; 32];
    let d = document(&tcti, &cert, &ca_der, "h1", &other, now_ms());
    refused_for(
        h1.unwrap_attested(&n("v1"), &wrapped, &pk, Some(d), &attach())
            .await,
        "does not bind this recipient",
    );
    // h1's document presented by host h2.
    let d = document(&tcti, &cert, &ca_der, "h1", &pk.0, now_ms());
    let mut h2 = cell.client(&running, "host/h2").await;
    let t2 = cell.token(
        "service/placement",
        "h2",
        &[Operation::VolumeAttach],
        &["volume/v1"],
    );
    refused_for(
        h2.unwrap_attested(&n("v1"), &wrapped, &pk, Some(d), &t2)
            .await,
        "not the caller",
    );
    // An old document.
    let d = document(&tcti, &cert, &ca_der, "h1", &pk.0, now_ms() - 600_000);
    refused_for(
        h1.unwrap_attested(&n("v1"), &wrapped, &pk, Some(d), &attach())
            .await,
        "not recent",
    );
    // A document signed by another TPM's key under h1's certificate.
    let dir2 = tempfile::tempdir().unwrap();
    let other_tpm = Swtpm::start(&dir2.path().join("tpm")).unwrap();
    let d = document(&other_tpm.tcti(), &cert, &ca_der, "h1", &pk.0, now_ms());
    refused_for(
        h1.unwrap_attested(&n("v1"), &wrapped, &pk, Some(d), &attach())
            .await,
        "attestation document",
    );

    // The right document: released, sealed to the VMM.
    let d = document(&tcti, &cert, &ca_der, "h1", &pk.0, now_ms());
    let sealed = h1
        .unwrap_attested(&n("v1"), &wrapped, &pk, Some(d), &attach())
        .await
        .unwrap();
    let sealed = nitrile_kms::SealedKey::decode(sealed.as_bytes()).unwrap();
    assert!(vmm.open(&sealed, &n("v1")).is_ok());

    // A document under the certified key showing another PCR 15: refused.
    let mut shown = Tpm::open(&tcti).unwrap().pcrs(&HOST_PCRS).unwrap();
    shown.0.insert(15, [3u8; 32]);
    let d = document_showing(&tcti, &cert, &ca_der, "h1", &pk.0, now_ms(), &shown);
    refused_for(
        h1.unwrap_attested(&n("v1"), &wrapped, &pk, Some(d), &attach())
            .await,
        "PCR 15",
    );

    // The host's software changed (PCR 15 extended again): the TPM refuses
    // to sign with the certified document key, bound to the old values,
    // and a document under the key it derives now is refused: no CA
    // certified that key.
    let mut tpm = Tpm::open(&tcti).unwrap();
    let before: Vec<[u8; 32]> = tpm.pcrs(&HOST_PCRS).unwrap().0.into_values().collect();
    tpm.extend(15, [3u8; 32]).unwrap();
    assert!(matches!(
        tpm.sign_document_bound_to(&before, b"a document"),
        Err(nitrile_attest::AttestError::PolicyRefused(_))
    ));
    drop(tpm);
    let d = document(&tcti, &cert, &ca_der, "h1", &pk.0, now_ms());
    refused_for(
        h1.unwrap_attested(&n("v1"), &wrapped, &pk, Some(d), &attach())
            .await,
        "attestation document",
    );
    // Every refusal is in the journal.
    let refusals = cell
        .journal()
        .into_iter()
        .filter(|r| {
            r.reason
                .as_deref()
                .is_some_and(|x| x.starts_with("attestation:"))
        })
        .count();
    assert_eq!(refusals, 7);
    running.stop().await;
}
