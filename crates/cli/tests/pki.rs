//! `nitrile pki` run as a real binary: init, issue, renew, show.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn nitrile(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nitrile"))
        .args(args)
        .env_remove("NITRILE_CONFIG")
        .output()
        .expect("nitrile runs")
}

fn ok(args: &[&str]) -> String {
    let out = nitrile(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn init_issue_show_renew() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let created = json(&["pki", "init", "--dir", s(&ca), "--cell", "c1", "-o", "json"]);
    assert_eq!(created["cell"], "c1");
    assert_eq!(created["created"], true);
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    // A second init shows the same CA.
    let again = json(&["pki", "init", "--dir", s(&ca), "--cell", "c1", "-o", "json"]);
    assert_eq!(again["created"], false);
    assert_eq!(again["sha256"], created["sha256"]);
    // ... and refuses to call it another cell's.
    let out = nitrile(&["pki", "init", "--dir", s(&ca), "--cell", "c2"]);
    assert_eq!(out.status.code(), Some(1));

    let alice = tmp.path().join("alice");
    let issued = json(&[
        "pki",
        "issue",
        "--dir",
        s(&ca),
        "--principal",
        "nitrile://c1/operator/alice",
        "--lifetime",
        "2h",
        "--out",
        s(&alice),
        "-o",
        "json",
    ]);
    let cert = tmp.path().join("alice.pem");
    let key = tmp.path().join("alice.key");
    assert_eq!(mode(&key), 0o600);
    assert_eq!(issued["principal"], "nitrile://c1/operator/alice");

    let shown = json(&["pki", "show", s(&cert), "-o", "json"]);
    assert_eq!(shown["principal"], "nitrile://c1/operator/alice");
    assert_eq!(shown["sha256"], issued["sha256"]);
    assert_eq!(shown["status"], "valid");
    assert_eq!(shown["is_ca"], false);
    let not_before = time::OffsetDateTime::parse(
        shown["not_before"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let not_after = time::OffsetDateTime::parse(
        shown["not_after"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    // 2h asked for, plus the 5 minute backdating of not_before.
    assert_eq!(not_after - not_before, time::Duration::minutes(125));
    let table = ok(&["pki", "show", s(&cert)]);
    assert!(table.contains("nitrile://c1/operator/alice"), "{table}");
    assert!(!table.contains("PRIVATE"), "{table}");

    // Issuing over existing files needs --force.
    let out = nitrile(&[
        "pki",
        "issue",
        "--dir",
        s(&ca),
        "--principal",
        "nitrile://c1/operator/alice",
        "--out",
        s(&alice),
    ]);
    assert_eq!(out.status.code(), Some(1));
    // Another cell's principal, a lifetime above the maximum, and a bad
    // duration are refused.
    let out = nitrile(&[
        "pki",
        "issue",
        "--dir",
        s(&ca),
        "--principal",
        "nitrile://c2/operator/alice",
        "--out",
        s(&tmp.path().join("x")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let out = nitrile(&[
        "pki",
        "issue",
        "--dir",
        s(&ca),
        "--principal",
        "nitrile://c1/operator/alice",
        "--lifetime",
        "2d",
        "--out",
        s(&tmp.path().join("y")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most"));
    let out = nitrile(&[
        "pki",
        "issue",
        "--dir",
        s(&ca),
        "--principal",
        "nitrile://c1/operator/alice",
        "--lifetime",
        "8",
        "--out",
        s(&tmp.path().join("z")),
    ]);
    assert_eq!(out.status.code(), Some(2), "usage error");

    // Renewal: same principal, new certificate and key.
    let old_key = std::fs::read(&key).unwrap();
    let renewed = json(&[
        "pki",
        "renew",
        "--dir",
        s(&ca),
        "--cert",
        s(&cert),
        "--out",
        s(&alice),
        "-o",
        "json",
    ]);
    assert_eq!(renewed["principal"], "nitrile://c1/operator/alice");
    assert_ne!(renewed["sha256"], issued["sha256"]);
    assert_ne!(std::fs::read(&key).unwrap(), old_key);
    assert_eq!(mode(&key), 0o600);

    // The CA certificate shows as a CA with no principal.
    let ca_shown = json(&["pki", "show", s(&ca.join("ca.pem")), "-o", "json"]);
    assert_eq!(ca_shown["is_ca"], true);
    assert_eq!(ca_shown["principal"], serde_json::Value::Null);
}

#[test]
fn issue_without_ca_says_how_to_create_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = nitrile(&[
        "pki",
        "issue",
        "--dir",
        s(&tmp.path().join("none")),
        "--principal",
        "nitrile://c1/host/h1",
        "--out",
        s(&tmp.path().join("h1")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nitrile pki init"));
    assert!(!tmp.path().join("none").exists());
}
