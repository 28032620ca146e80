//! The plaintext exports exist only with the `danger-test-export` feature:
//! a build of the library without it has no such function. The test builds
//! the library both ways (`cargo check`, in the target directory the test
//! was built in, so only this crate is checked anew) and searches each
//! one's metadata, which names every item the library has, for the
//! exports' names: absent without the feature, present with it (the
//! control that shows the search finds them).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const EXPORTS: [&str; 3] = [
    "export_volume_key_for_tests",
    "export_volume_secrets_for_tests",
    "export_private_key_for_tests",
];

/// The target directory this test was built in (`<target>/debug/deps/<exe>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .expect("the test runs from <target>/<profile>/deps")
        .to_owned()
}

/// Checks the library with `features` and returns its metadata file.
fn library_metadata(features: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "check",
            "--offline",
            "--locked",
            "--quiet",
            "--package",
            "nitrile-kms",
            "--lib",
            "--message-format",
            "json",
        ])
        .env("CARGO_TARGET_DIR", target_dir());
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let out = cmd.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut found = None;
    for line in out.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let msg: Value = serde_json::from_slice(line).unwrap();
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "nitrile_kms" {
            let files = msg["filenames"].as_array().unwrap();
            found = files
                .iter()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(".rmeta"))
                .map(PathBuf::from);
        }
    }
    found.expect("cargo reports the library's metadata")
}

fn names_in(file: &Path) -> Vec<&'static str> {
    let bytes = std::fs::read(file).unwrap();
    EXPORTS
        .into_iter()
        .filter(|name| bytes.windows(name.len()).any(|w| w == name.as_bytes()))
        .collect()
}

#[test]
fn claim3_a_build_without_the_test_feature_has_no_plaintext_export() {
    let without = library_metadata(&[]);
    let with = library_metadata(&["danger-test-export"]);
    assert_ne!(without, with, "two builds, two artifacts");
    assert_eq!(
        names_in(&without),
        Vec::<&str>::new(),
        "{} names a plaintext export",
        without.display()
    );
    assert_eq!(names_in(&with), EXPORTS.to_vec(), "{}", with.display());
}
