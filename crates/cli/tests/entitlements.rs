//! `nitrile entitlements` on bundles with serials and monitor rules: check,
//! digest and diff show the serial, diff warns when it does not rise, and a
//! reviewer cannot sign rules that do not load.

use std::path::Path;
use std::process::{Command, Output};

const NITRILE: &str = env!("CARGO_BIN_EXE_nitrile");

fn nitrile(args: &[&str]) -> Output {
    Command::new(NITRILE)
        .env_remove("NITRILE_CONFIG")
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> (String, String) {
    let out = nitrile(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn check_digest_and_diff_show_the_serial_and_sign_refuses_rules_that_do_not_load() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../entitlements");
    let old = tmp.path().join("old");
    let new = tmp.path().join("new");
    copy_dir(&repo, &old);
    copy_dir(&repo, &new);

    let (out, _) = ok(&["entitlements", "digest", s(&old), "-o", "json"]);
    let digest: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(digest["serial"], 1, "{out}");
    let (out, _) = ok(&["entitlements", "check", s(&old)]);
    assert!(out.contains("serial     1"), "{out}");
    assert!(
        out.contains("monitor rule(s) in 5 file(s)"),
        "the rules are part of the bundle: {out}"
    );

    // A rule changed without raising the serial: diff says so.
    let rule = new.join("rules/sensitive-operation.yml");
    let text = std::fs::read_to_string(&rule).unwrap();
    std::fs::write(&rule, text.replace("level: high", "level: low")).unwrap();
    let (out, err) = ok(&["entitlements", "diff", s(&old), s(&new)]);
    assert!(out.contains("serial 1 -> 1"), "{out}");
    assert!(
        out.contains("~ rule file rules/sensitive-operation.yml changed"),
        "{out}"
    );
    assert!(err.contains("the serial does not rise"), "{err}");
    let (out, _) = ok(&["entitlements", "diff", s(&old), s(&new), "-o", "json"]);
    let diff: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(diff["serial_rises"], false, "{diff}");
    std::fs::write(new.join("bundle.toml"), "serial = 2\n").unwrap();
    let (out, err) = ok(&["entitlements", "diff", s(&old), s(&new)]);
    assert!(out.contains("serial 1 -> 2"), "{out}");
    assert!(!err.contains("warning"), "{err}");

    // Signing: the serial is named; a rule that does not load is refused.
    let key = tmp.path().join("rita");
    ok(&[
        "entitlements",
        "keygen",
        "--reviewer",
        "rita",
        "--out",
        s(&key),
    ]);
    let key_file = tmp.path().join("rita.key");
    let (_, err) = ok(&[
        "entitlements",
        "sign",
        "--key",
        s(&key_file),
        "--reviewer",
        "rita",
        s(&new),
    ]);
    assert!(err.contains("(serial 2)"), "{err}");
    std::fs::write(
        &rule,
        text.replace("level: high", "level: high\nsurprise: 1"),
    )
    .unwrap();
    let out = nitrile(&[
        "entitlements",
        "sign",
        "--key",
        s(&key_file),
        "--reviewer",
        "rita",
        s(&new),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("monitor rules"), "{err}");
    assert_eq!(
        nitrile(&["entitlements", "check", s(&new)]).status.code(),
        Some(1)
    );

    // A bundle without a serial is refused by every verb.
    std::fs::remove_file(old.join("bundle.toml")).unwrap();
    let out = nitrile(&["entitlements", "digest", s(&old)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bundle.toml"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
