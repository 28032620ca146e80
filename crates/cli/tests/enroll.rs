//! Enrollment of a host with a TPM (swtpm), through the CLI only:
//! `nitrile pki enroll-host` issues the host a certificate for a TLS key in
//! its TPM once the TPM proved itself and its measurements match the
//! reference values; the host agent then serves with that key (the TPM
//! signs every handshake), `host attest` returns a quote and a Nitro-layout
//! document that `host verify-attestation` checks under the pinned
//! attestation key. Rebooted into a changed image (one changed byte of its
//! initramfs, so another PCR 11), the host is refused a new enrollment and
//! its TPM refuses to sign with the key bound to the old measurements: the
//! host can no longer prove to be h1.
//!
//! Needs root and swtpm (tpm2-tools not needed); prints `SKIPPED: <reason>`
//! without them.

mod cell;

use std::path::Path;

use cell::{Cell, skipped};
use nitrile_attest::swtpm::{self, Swtpm};
use nitrile_attest::{Tpm, replay};
use sha2::{Digest as _, Sha256};

/// What firmware, the UKI stub and init extend for an image whose
/// initramfs is `initrd`; init's events go to `log`.
fn boot(tcti: &str, initrd: &[u8], log: &Path) {
    let mut tpm = Tpm::open(tcti).unwrap();
    tpm.extend(4, Sha256::digest(b"the UKI").into()).unwrap();
    tpm.extend(11, Sha256::digest(b".initrd\0").into()).unwrap();
    tpm.extend(11, Sha256::digest(initrd).into()).unwrap();
    let events = [
        ("hostd-config", Sha256::digest(b"hostd.toml")),
        ("issuer-keys", Sha256::digest(b"keys")),
    ];
    let mut text = String::new();
    for (name, d) in events {
        tpm.extend(15, d.into()).unwrap();
        text.push_str(&format!(
            "{{\"pcr\":15,\"name\":\"{name}\",\"sha256\":\"{}\"}}\n",
            hex::encode(d)
        ));
    }
    std::fs::write(log, text).unwrap();
}

fn reference(initrd: &[u8]) -> serde_json::Value {
    let h = |b: &[u8]| -> [u8; 32] { Sha256::digest(b).into() };
    serde_json::json!({
        "pcr4": hex::encode(replay(vec![h(b"the UKI")])),
        "pcr11": hex::encode(replay(vec![h(b".initrd\0"), h(initrd)])),
        "pcr15": hex::encode(replay(vec![h(b"hostd.toml"), h(b"keys")])),
    })
}

/// The verifier environment's Python with pycose, else why not.
fn pycose() -> Result<std::path::PathBuf, String> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv-verify/bin/python3");
    let ok = std::process::Command::new(&python)
        .args(["-c", "import pycose, cbor2"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(python)
    } else {
        Err(format!(
            "no pycose in {} (scripts/setup.sh --tests installs it)",
            python.display()
        ))
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn an_enrolled_host_serves_with_its_tpm_key_and_a_changed_one_cannot() {
    if let Err(e) = swtpm::available() {
        skipped(&e.to_string());
        return;
    }
    if !is_root() {
        skipped("manufacturing a TPM with swtpm's local CA needs root");
        return;
    }
    let mut cell = Cell::up();
    cell.stop_up();
    let root = cell.root().to_owned();
    let tpm_state = root.join("h1-tpm");
    let mut swtpm = Swtpm::start(&tpm_state).unwrap();
    let image = b"an initramfs with nitrile and its libraries".to_vec();
    let events = root.join("init-events.jsonl");
    boot(&swtpm.tcti(), &image, &events);
    std::fs::write(root.join("reference.json"), reference(&image).to_string()).unwrap();
    let mut ek_ca = std::fs::read("/var/lib/swtpm-localca/issuercert.pem").unwrap();
    ek_ca.extend(std::fs::read("/var/lib/swtpm-localca/swtpm-localca-rootca-cert.pem").unwrap());
    std::fs::write(root.join("tpm-ca.pem"), ek_ca).unwrap();
    let config = cell.hostd_config();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{text}\n[tpm]\ntcti = \"{}\"\nevent_log = \"{}\"\n",
            swtpm.tcti(),
            events.display()
        ),
    )
    .unwrap();

    let enroll = |cell: &Cell, tcti: &str| {
        cell.nitrile(
            Path::new("/dev/null"),
            &[
                "pki",
                "enroll-host",
                "--dir",
                root.join("state/pki").to_str().unwrap(),
                "--host-config",
                config.to_str().unwrap(),
                "--tcti",
                tcti,
                "--reference",
                root.join("reference.json").to_str().unwrap(),
                "--ek-ca",
                root.join("tpm-ca.pem").to_str().unwrap(),
            ],
        )
    };
    let out = enroll(&cell, &swtpm.tcti());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let enrolled = std::fs::read_to_string(&config).unwrap();
    assert!(enrolled.contains("tls_key"), "{enrolled}");
    let tpm_dir = cell.host_dir().join("tpm");
    assert!(tpm_dir.join("host.pem").is_file() && tpm_dir.join("attestation-key").is_file());

    // The agent serves with the TPM's key: every handshake is signed there.
    cell.start_tokend();
    cell.start_kms();
    cell.start_hostd();
    let alice = root.join("state/clients/operator-alice.toml");
    let carol = root.join("state/clients/auditor-carol.toml");
    let described = cell.ok(&alice, &["host", "describe", "-o", "json"]);
    assert!(described.contains("tpm-pcr15"), "{described}");
    // The certificate it presents is the one issued for the TPM key, and
    // no private key file of it exists.
    let pem = std::fs::read_to_string(tpm_dir.join("host.pem")).unwrap();
    assert!(!pem.contains("PRIVATE KEY"));
    assert!(!std::fs::read_dir(&tpm_dir).unwrap().any(|e| {
        std::fs::read_to_string(e.unwrap().path())
            .unwrap_or_default()
            .contains("PRIVATE KEY")
    }));

    // host.attest: a quote and a document; verified against the reference
    // under the attestation key pinned at enrollment.
    let nonce = "5a".repeat(32);
    let attested = cell.ok(&carol, &["host", "attest", "--nonce", &nonce, "-o", "json"]);
    let a: serde_json::Value = serde_json::from_str(&attested).unwrap();
    let document = a["document"].as_str().expect("a document").to_owned();
    assert!(
        document.starts_with("d2"),
        "not tagged COSE_Sign1: {attested}"
    );
    // pycose opens it: the signature under its certificate's key, the
    // Nitro layout, the nonce; the PCRs are the quote's.
    std::fs::write(root.join("document.cbor"), hex::decode(&document).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/independent/cose_verify.py");
    match pycose() {
        Err(why) => skipped(&why),
        Ok(python) => {
            let out = std::process::Command::new(&python)
                .arg(&script)
                .arg(root.join("document.cbor"))
                .arg(&nonce)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "pycose: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let opened: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(opened["module_id"], "h1");
            for p in a["quote"]["pcrs"].as_array().unwrap() {
                assert_eq!(
                    opened["pcrs"][p["index"].to_string()],
                    p["sha256"],
                    "{opened}"
                );
            }
            // One changed byte of the document: pycose refuses it.
            let mut bad = hex::decode(&document).unwrap();
            let at = bad.len() - 10;
            bad[at] ^= 1;
            std::fs::write(root.join("bad.cbor"), bad).unwrap();
            let out = std::process::Command::new(&python)
                .arg(&script)
                .arg(root.join("bad.cbor"))
                .output()
                .unwrap();
            assert!(!out.status.success(), "pycose accepted a changed document");
        }
    }
    let verified = cell.ok(
        &carol,
        &[
            "host",
            "verify-attestation",
            "--reference",
            root.join("reference.json").to_str().unwrap(),
            "--attestation-key",
            tpm_dir.join("attestation-key").to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&verified).unwrap();
    assert_eq!(v["verified"], true, "{verified}");
    for check in [
        "attestation key",
        "quote",
        "pcr 4",
        "pcr 11",
        "pcr 15",
        "event log",
        "document",
    ] {
        assert!(
            v["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["check"] == check && c["ok"] == true),
            "{check}: {verified}"
        );
    }
    // A saved answer checked against another nonce: refused.
    std::fs::write(root.join("attested.json"), &attested).unwrap();
    let out = cell.nitrile(
        &carol,
        &[
            "host",
            "verify-attestation",
            "--reference",
            root.join("reference.json").to_str().unwrap(),
            "--attestation-key",
            tpm_dir.join("attestation-key").to_str().unwrap(),
            "--from",
            root.join("attested.json").to_str().unwrap(),
            "--nonce",
            &"5b".repeat(32),
        ],
    );
    assert!(!out.status.success(), "a replayed attestation verified");

    // The host reboots into an image with one changed byte.
    cell.kill_hostd();
    drop(swtpm);
    swtpm = Swtpm::start(&tpm_state).unwrap();
    let mut changed = image.clone();
    changed[7] ^= 1;
    boot(&swtpm.tcti(), &changed, &events);
    let text = std::fs::read_to_string(&config).unwrap();
    let old_tcti = text
        .lines()
        .find(|l| l.starts_with("tcti = "))
        .unwrap()
        .to_owned();
    std::fs::write(
        &config,
        text.replace(&old_tcti, &format!("tcti = \"{}\"", swtpm.tcti())),
    )
    .unwrap();
    let before = std::fs::read(&config).unwrap();
    // The CA refuses to enroll it: its PCR 11 is not the reference's.
    let out = enroll(&cell, &swtpm.tcti());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PCR 11"), "{err}");
    assert_eq!(
        std::fs::read(&config).unwrap(),
        before,
        "a refused enrollment changed the config"
    );
    // Its TPM refuses to sign with the key bound to the old measurements:
    // the agent cannot even sign its network announcement as h1, and does
    // not start.
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_nitrile"))
        .args(["--config", config.to_str().unwrap(), "hostd"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = agent.kill();
            panic!("a changed host's agent kept running as h1");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut agent.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("PCR policy does not hold"), "{err}");
    let out = cell.nitrile(&alice, &["host", "describe"]);
    assert!(
        !out.status.success(),
        "a changed host still proved to be h1"
    );
    // And the refusal is the TPM's: the key's PCR policy does not hold.
    let key: nitrile_attest::BoundKey =
        serde_json::from_slice(&std::fs::read(tpm_dir.join("tls-key.json")).unwrap()).unwrap();
    let err = Tpm::open(&swtpm.tcti())
        .unwrap()
        .sign_bound(&key, [1u8; 32])
        .unwrap_err();
    assert!(
        matches!(err, nitrile_attest::AttestError::PolicyRefused(_)),
        "{err}"
    );
}

/// `nitrile <args>` with no client config, its output.
fn bare(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_nitrile"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_host_awaiting_enrollment_is_enrolled_over_the_network_and_keeps_only_what_checks() {
    if let Err(e) = swtpm::available() {
        skipped(&e.to_string());
        return;
    }
    if !is_root() {
        skipped("manufacturing a TPM with swtpm's local CA needs root");
        return;
    }
    let mut cell = Cell::up();
    cell.stop_up();
    let root = cell.root().to_owned();
    let swtpm = Swtpm::start(&root.join("h1-tpm")).unwrap();
    let image = b"an initramfs with nitrile and its libraries".to_vec();
    let events = root.join("init-events.jsonl");
    boot(&swtpm.tcti(), &image, &events);
    std::fs::write(root.join("reference.json"), reference(&image).to_string()).unwrap();
    let mut changed = image.clone();
    changed[3] ^= 1;
    std::fs::write(root.join("changed.json"), reference(&changed).to_string()).unwrap();
    let mut ek_ca = std::fs::read("/var/lib/swtpm-localca/issuercert.pem").unwrap();
    ek_ca.extend(std::fs::read("/var/lib/swtpm-localca/swtpm-localca-rootca-cert.pem").unwrap());
    std::fs::write(root.join("tpm-ca.pem"), ek_ca).unwrap();

    // The host as the image provisions it: no key or certificate of its
    // own, the paths enrollment fills on its state disk.
    let config = cell.hostd_config();
    let host_dir = cell.host_dir();
    let enrolled = host_dir.join("enrolled");
    for f in ["host.pem", "host.key"] {
        let _ = std::fs::remove_file(host_dir.join(f));
    }
    let text = std::fs::read_to_string(&config).unwrap();
    let cell_name = text
        .lines()
        .find_map(|l| l.strip_prefix("cell = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let port = text
        .lines()
        .find_map(|l| l.strip_prefix("listen = "))
        .unwrap()
        .trim_matches('"')
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let addr = format!("127.0.0.1:{port}");
    std::fs::write(
        &config,
        format!(
            "{text}\n[tpm]\ntcti = \"{}\"\nevent_log = \"{}\"\ntls_key = \"{}\"\ndocument_certificate = \"{}\"\n",
            swtpm.tcti(),
            events.display(),
            enrolled.join("tls-key.json").display(),
            enrolled.join("document.pem").display(),
        ),
    )
    .unwrap();
    cell::set_line(&config, "cert", enrolled.join("host.pem").to_str().unwrap());
    cell::set_line(
        &config,
        "key",
        enrolled.join("tls-key.json").to_str().unwrap(),
    );

    // Not enrolled, and not told to wait: the agent does not start.
    let out = bare(&["--config", config.to_str().unwrap(), "hostd"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not enrolled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    cell.start_tokend();
    cell.start_kms();
    cell.start_service(
        "hostd-enroll",
        &[
            "--config",
            config.to_str().unwrap(),
            "hostd",
            "--await-enrollment",
        ],
        "serving the enrollment exchange",
    );
    let pki = root.join("state/pki");
    let ek_ca = root.join("tpm-ca.pem").to_str().unwrap().to_owned();
    let good_reference = root.join("reference.json").to_str().unwrap().to_owned();
    let enroll = |dir: &Path, extra: &[&str]| {
        let mut args = vec![
            "pki",
            "enroll-host",
            "--dir",
            dir.to_str().unwrap(),
            "--address",
            &addr,
            "--ek-ca",
            &ek_ca,
            "--out",
            root.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        if !extra.contains(&"--host") {
            args.extend(["--host", "h1"]);
        }
        if !extra.contains(&"--reference") {
            args.extend(["--reference", good_reference.as_str()]);
        }
        bare(&args)
    };
    let refused = |out: &std::process::Output, why: &str| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && err.contains(why), "{why}: {err}");
        assert!(!enrolled.join("tls-key.json").exists(), "{why}: enrolled");
    };
    // Bytes that are no request: the host answers nothing and goes on.
    {
        use std::io::Write as _;
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"\x16\x03\x01 not HTTP\r\n\r\n").unwrap();
    }
    // Another host name than the one at the address: refused.
    refused(
        &enroll(&pki, &["--host", "h2"]),
        "the host at the address is h1",
    );
    // Another TPM than the inventory's: refused before any challenge.
    refused(
        &enroll(&pki, &["--ek-sha256", &"00".repeat(32)]),
        "not the one pinned",
    );
    // Another image's reference: the CA refuses, no certificate.
    refused(
        &enroll(
            &pki,
            &["--reference", root.join("changed.json").to_str().unwrap()],
        ),
        "PCR 11",
    );
    // A CA of the same cell name that is not the host's pinned cell CA
    // passes its own checks and issues certificates; the host keeps none.
    let rogue = root.join("rogue-ca");
    assert!(
        bare(&[
            "pki",
            "init",
            "--dir",
            rogue.to_str().unwrap(),
            "--cell",
            &cell_name
        ])
        .status
        .success()
    );
    refused(&enroll(&rogue, &[]), "not issued by the cell CA");

    // The cell CA: enrolled; the host keeps the certificates and its
    // TPM-wrapped key on its state disk and serves the admin API.
    let out = enroll(&pki, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["tls-key.json", "host.pem", "document.pem"] {
        let text = std::fs::read_to_string(enrolled.join(f)).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{f}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(cell.log("hostd-enroll"))
        .unwrap_or_default()
        .contains(" serving on ")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the enrolled agent did not serve\n{}",
            std::fs::read_to_string(cell.log("hostd-enroll")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let alice = root.join("state/clients/operator-alice.toml");
    let carol = root.join("state/clients/auditor-carol.toml");
    let described = cell.ok(&alice, &["host", "describe", "-o", "json"]);
    assert!(described.contains("tpm-pcr15"), "{described}");
    let verified = cell.ok(
        &carol,
        &[
            "host",
            "verify-attestation",
            "--reference",
            root.join("reference.json").to_str().unwrap(),
            "--attestation-key",
            root.join("h1.attestation-key").to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&verified).unwrap();
    assert_eq!(v["verified"], true, "{verified}");
    assert!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["check"] == "document" && c["ok"] == true),
        "{verified}"
    );

    // Restarted, it is enrolled: it serves at once, no exchange.
    cell.kill_service("hostd-enroll");
    let line = cell.start_service(
        "hostd-again",
        &[
            "--config",
            config.to_str().unwrap(),
            "hostd",
            "--await-enrollment",
        ],
        " serving on ",
    );
    assert!(line.contains("h1 serving on"), "{line}");
    let log = std::fs::read_to_string(cell.log("hostd-again")).unwrap();
    assert!(!log.contains("enrollment exchange"), "{log}");
    cell.ok(&alice, &["host", "describe"]);
}
