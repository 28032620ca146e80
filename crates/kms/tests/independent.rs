//! Independent verifiers open what the key service makes: Python's
//! `cryptography` (HKDF-SHA256 and AES-256-GCM) opens a wrapped data key
//! from the KEK and the volume's secret, and `pyhpke` (RFC 9180) opens a
//! sealed one with the recipient's private key; both must give the data
//! key the test export returns, and both must refuse another volume.
//! Neither shares code with this crate. They run from the virtual
//! environment `scripts/setup.sh --tests` makes in `.venv-verify/` at the
//! root of the repository; without it the test prints SKIPPED and why.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Fixture, T0, key, kms_principal, name};
use nitrile_kms::{KeyName, Recipient};
use serde_json::{Value, json};

/// The verifiers' Python, or why there is none.
fn verifier_python() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv-verify/bin/python3");
    if !python.exists() {
        return Err(format!(
            "no verifier environment at {} (scripts/setup.sh --tests makes it)",
            python.display()
        ));
    }
    let out = Command::new(&python)
        .args(["-c", "import pyhpke, cryptography"])
        .output()
        .map_err(|e| format!("{} cannot run: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} lacks pyhpke or cryptography: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(python)
}

#[test]
fn claim3_independent_implementations_open_wrapped_and_sealed_keys_to_the_same_data_key() {
    let python = match verifier_python() {
        Ok(p) => p,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let f = Fixture::new();
    f.kms
        .create_key(&key("team-a"), &kms_principal(), T0)
        .unwrap();
    let long = "v".repeat(63);
    let mut cases = Vec::new();
    let mut deks = Vec::new();
    for (v, k) in [
        ("v1", KeyName::default_key()),
        ("data-2", key("team-a")),
        (long.as_str(), key("team-a")),
    ] {
        let v = name(v);
        let wrapped = f
            .kms
            .generate_volume_key(&v, &k, T0)
            .unwrap()
            .wrapped
            .encode();
        let dek = f.kms.export_volume_key_for_tests(&v, &wrapped).unwrap();
        let secrets = f.kms.export_volume_secrets_for_tests(&v).unwrap();
        let r = Recipient::generate().unwrap();
        let sealed = f
            .kms
            .unwrap_sealed(&v, &wrapped, r.public_key(), T0)
            .unwrap();
        cases.push(json!({
            "volume": v.as_str(),
            "other_volume": "v-other",
            "wrapped": hex::encode(&wrapped),
            "kek": hex::encode(&secrets.kek[..]),
            "secret": hex::encode(&secrets.secret[..]),
            "sealed": hex::encode(sealed.encode()),
            "recipient_private_key": hex::encode(&r.export_private_key_for_tests()[..]),
        }));
        deks.push(hex::encode(&dek[..]));
    }

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cases.json");
    std::fs::write(
        &input,
        serde_json::to_vec(&json!({ "cases": cases })).unwrap(),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/independent/verify.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the verifier failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = results["results"].as_array().unwrap();
    assert_eq!(results.len(), deks.len());
    for (r, dek) in results.iter().zip(&deks) {
        assert_eq!(
            r["from_wrapped"].as_str().unwrap(),
            dek,
            "cryptography's HKDF + AES-GCM"
        );
        assert_eq!(r["from_sealed"].as_str().unwrap(), dek, "pyhpke");
        assert_eq!(r["wrapped_as_other_volume"], "refused");
        assert_eq!(r["sealed_as_other_volume"], "refused");
        assert_eq!(r["wrapped_with_other_salt"], "refused");
    }
    println!(
        "independent verifiers opened {} wrapped and sealed keys",
        deks.len()
    );
}
