//! `nitrile instance verify-identity` run as a real binary: an identity
//! document signed by a host of the cell verifies with the cell's CA
//! certificate alone; a changed byte, another cell's host, a document
//! naming another host than its signer, and junk do not.

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;
use nitrile_api::network::{IDENTITY_CONTEXT, SignedIdentityDocument};
use nitrile_api::{Name, PrincipalId};
use nitrile_pki::CellCa;
use nitrile_pki::sign::CellSigner;
use nitrile_pki::tls::TlsIdentity;
use time::OffsetDateTime;

fn nitrile(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nitrile"))
        .args(args)
        .env_remove("NITRILE_CONFIG")
        .env("HOME", "/nonexistent")
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .expect("nitrile runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn host_signer(ca: &CellCa, cell: &str, host: &str) -> CellSigner {
    let issued = ca
        .issue(
            &PrincipalId::parse(&format!("nitrile://{cell}/host/{host}")).unwrap(),
            None,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    CellSigner::new(&TlsIdentity::from_issued(&issued).unwrap()).unwrap()
}

/// The document as a host agent makes it.
fn document(signer: &CellSigner, cell: &str, host: &str) -> (String, Vec<u8>) {
    let json = serde_json::json!({
        "version": 1,
        "cell": cell,
        "host": host,
        "instance": "acme--web1",
        "customer": "acme",
        "image": "ab".repeat(32),
        "vni": 100,
        "private_ipv4": "10.80.0.10",
        "mac": "02:4e:00:64:00:0a",
        "launched_at": "2026-12-06T10:00:00Z",
        "issued_at": "2026-12-06T10:00:01Z",
    })
    .to_string()
    .into_bytes();
    let mut message = IDENTITY_CONTEXT.as_bytes().to_vec();
    message.extend_from_slice(&json);
    let b64 = base64::engine::general_purpose::STANDARD;
    let doc = SignedIdentityDocument {
        document: b64.encode(&json),
        signature: b64.encode(signer.sign(&message).unwrap()),
        certificate: signer.certificate_pem().to_owned(),
    };
    (serde_json::to_string_pretty(&doc).unwrap(), json)
}

#[test]
fn an_identity_document_verifies_with_the_ca_alone_and_nothing_else_does() {
    let tmp = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let ca =
        CellCa::init_or_load(&tmp.path().join("ca"), &Name::new("local").unwrap(), now).unwrap();
    let ca_file = tmp.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let h1 = host_signer(&ca, "local", "h1");

    let (good, json) = document(&h1, "local", "h1");
    let file = tmp.path().join("doc.json");
    std::fs::write(&file, &good).unwrap();
    let out = nitrile(&["instance", "verify-identity", s(&file), "--ca", s(&ca_file)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nitrile://local/host/h1"), "{text}");
    assert!(
        text.contains("acme--web1") && text.contains("10.80.0.10"),
        "{text}"
    );
    let out = nitrile(&[
        "instance",
        "verify-identity",
        s(&file),
        "--ca",
        s(&ca_file),
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["identity"]["instance"], "acme--web1");

    let refused = |doc: &str, what: &str| {
        std::fs::write(&file, doc).unwrap();
        let out = nitrile(&["instance", "verify-identity", s(&file), "--ca", s(&ca_file)]);
        assert_eq!(out.status.code(), Some(1), "{what} verified");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // Any one changed byte of the document's content.
    let mut v: SignedIdentityDocument = serde_json::from_str(&good).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut changed = json.clone();
    let at = changed
        .windows(10)
        .position(|w| w == b"10.80.0.10")
        .unwrap();
    changed[at + 9] = b'1'; // 10.80.0.11
    v.document = b64.encode(&changed);
    let err = refused(&serde_json::to_string(&v).unwrap(), "a changed address");
    assert!(err.contains("does not verify"), "{err}");

    // A document of another cell's host, checked with this cell's CA.
    let other =
        CellCa::init_or_load(&tmp.path().join("other"), &Name::new("local").unwrap(), now).unwrap();
    let (foreign, _) = document(&host_signer(&other, "local", "h1"), "local", "h1");
    let err = refused(&foreign, "another cell's document");
    assert!(err.contains("does not verify"), "{err}");

    // Signed by h2 but naming h1.
    let h2 = host_signer(&ca, "local", "h2");
    let (lying, _) = document(&h2, "local", "h1");
    let err = refused(&lying, "a document naming another host");
    assert!(err.contains("signed by nitrile://local/host/h2"), "{err}");

    // Junk, and a document with an escape sequence where a name goes.
    let err = refused("{\"document\": 1}", "junk");
    assert!(err.contains("not an instance identity document"), "{err}");
    let (evil, _) = document(&h1, "local", "h1");
    let evil = evil.replace(
        &b64.encode(&json),
        &b64.encode(
            String::from_utf8(json.clone())
                .unwrap()
                .replace("acme--web1", "\u{1b}[2J"),
        ),
    );
    let err = refused(&evil, "a document with an escape sequence");
    assert!(
        !err.contains('\u{1b}'),
        "an escape sequence reached the terminal: {err:?}"
    );
}
