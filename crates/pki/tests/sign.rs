//! Documents signed with a certificate key: they verify under the cell's
//! CA, and a changed byte, another cell's CA or a principal of another cell
//! does not.

use nitrile_api::{Name, PrincipalId};
use nitrile_pki::CellCa;
use nitrile_pki::sign::{CellSigner, SignError, verify_signed};
use nitrile_pki::tls::{CaRoots, TlsIdentity};
use rustls_pki_types::UnixTime;
use time::OffsetDateTime;

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn cell(dir: &std::path::Path, cell: &str) -> (CellCa, CaRoots) {
    let ca = CellCa::init_or_load(&dir.join(cell), &name(cell), OffsetDateTime::now_utc()).unwrap();
    let roots = CaRoots::from_pem(ca.cert_pem().as_bytes()).unwrap();
    (ca, roots)
}

fn signer(ca: &CellCa, uri: &str) -> CellSigner {
    let issued = ca
        .issue(
            &PrincipalId::parse(uri).unwrap(),
            None,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    CellSigner::new(&TlsIdentity::from_issued(&issued).unwrap()).unwrap()
}

#[test]
fn a_signed_document_verifies_and_names_its_signer() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, roots) = cell(dir.path(), "c1");
    let s = signer(&ca, "nitrile://c1/host/h1");
    let doc = b"instance i-1 runs on h1";
    let sig = s.sign(doc).unwrap();
    let who = verify_signed(
        &roots,
        &name("c1"),
        s.certificate_pem().as_bytes(),
        doc,
        &sig,
        UnixTime::now(),
    )
    .unwrap();
    assert_eq!(who.uri(), "nitrile://c1/host/h1");
}

#[test]
fn a_changed_byte_of_document_or_signature_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, roots) = cell(dir.path(), "c1");
    let s = signer(&ca, "nitrile://c1/host/h1");
    let doc = b"instance i-1 runs on h1".to_vec();
    let sig = s.sign(&doc).unwrap();
    let cert = s.certificate_pem().as_bytes();
    for i in 0..doc.len() {
        let mut d = doc.clone();
        d[i] ^= 0x01;
        let r = verify_signed(&roots, &name("c1"), cert, &d, &sig, UnixTime::now());
        assert!(matches!(r, Err(SignError::BadSignature)), "byte {i}: {r:?}");
    }
    let mut bad = sig.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    assert!(verify_signed(&roots, &name("c1"), cert, &doc, &bad, UnixTime::now()).is_err());
}

#[test]
fn another_cells_ca_or_cell_name_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, roots1) = cell(dir.path(), "c1");
    let (ca2, roots2) = cell(dir.path(), "c2");
    let s1 = signer(&ca1, "nitrile://c1/host/h1");
    let s2 = signer(&ca2, "nitrile://c2/host/h1");
    let doc = b"doc";
    let sig2 = s2.sign(doc).unwrap();
    // A document of cell c2, checked with c1's CA: untrusted.
    let r = verify_signed(
        &roots1,
        &name("c1"),
        s2.certificate_pem().as_bytes(),
        doc,
        &sig2,
        UnixTime::now(),
    );
    assert!(matches!(r, Err(SignError::Untrusted(_))), "{r:?}");
    // c2's document under c2's CA, but expected to be of cell c1.
    let r = verify_signed(
        &roots2,
        &name("c1"),
        s2.certificate_pem().as_bytes(),
        doc,
        &sig2,
        UnixTime::now(),
    );
    assert!(matches!(r, Err(SignError::NoPrincipal(_))), "{r:?}");
    // c1's certificate with c2's signature: bad signature.
    let r = verify_signed(
        &roots1,
        &name("c1"),
        s1.certificate_pem().as_bytes(),
        doc,
        &sig2,
        UnixTime::now(),
    );
    assert!(matches!(r, Err(SignError::BadSignature)), "{r:?}");
    // Not a certificate at all.
    let r = verify_signed(&roots1, &name("c1"), b"junk", doc, &sig2, UnixTime::now());
    assert!(matches!(r, Err(SignError::Certificate)), "{r:?}");
}
