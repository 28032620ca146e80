//! `nitrile release` as release signers, CI and a host would run it: keys,
//! an environment's repository with 2 of 3 signers, a bundle of this very
//! binary, its test attestation, staging, signing, publishing, and the
//! host's check; a staging host, a bundle for another environment, one
//! signature short and a key that is not a signer's are refused with a
//! clear error.

use std::path::Path;
use std::process::{Command, Output};

fn nitrile(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nitrile"))
        .args(args)
        .current_dir(dir)
        .env_remove("NITRILE_CONFIG")
        .output()
        .expect("nitrile runs")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = nitrile(dir, args);
    assert!(
        out.status.success(),
        "nitrile {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn refused(dir: &Path, args: &[&str]) -> String {
    let out = nitrile(dir, args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "nitrile {args:?} was not refused"
    );
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn a_release_goes_from_build_to_a_host_through_two_signers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for k in ["root", "s1", "s2", "s3", "online", "ci"] {
        ok(d, &["release", "keygen", "--out", &format!("{k}.key")]);
    }
    assert!(refused(d, &["release", "keygen", "--out", "s1.key"]).contains("exists"));
    let out = ok(
        d,
        &[
            "release",
            "init",
            "--repo",
            "repo",
            "--env",
            "prod",
            "--root-key",
            "root.key.pub.json",
            "--signer",
            "s1.key.pub.json",
            "--signer",
            "s2.key.pub.json",
            "--signer",
            "s3.key.pub.json",
            "--online-key",
            "online.key.pub.json",
            "--sign-with",
            "root.key",
        ],
    );
    assert!(out.contains("2 of 3 sign a release"), "{out}");

    let binary = env!("CARGO_BIN_EXE_nitrile");
    let build = |version: &str, env: &str, out: &str| {
        ok(
            d,
            &[
                "release",
                "build",
                version,
                "--env",
                env,
                "--out",
                out,
                "--binary",
                binary,
                "--guest-image",
                "none",
                "-o",
                "json",
            ],
        )
    };
    let manifest: serde_json::Value = serde_json::from_str(&build("1.0.0", "prod", "b1")).unwrap();
    assert_eq!(manifest["environment"], "prod");
    assert!(manifest["files"]["nitrile"]["sha256"].is_string());
    assert!(manifest["files"]["schema.cedarschema"]["sha256"].is_string());

    // Unattested, the bundle is not staged.
    let err = refused(d, &["release", "stage", "--repo", "repo", "--bundle", "b1"]);
    assert!(err.contains("nitrile release attest"), "{err}");
    ok(
        d,
        &["release", "attest", "--bundle", "b1", "--key", "ci.key"],
    );
    // A bundle built for staging is not staged into prod.
    build("1.0.1", "staging", "b-staging");
    ok(
        d,
        &[
            "release",
            "attest",
            "--bundle",
            "b-staging",
            "--key",
            "ci.key",
        ],
    );
    let err = refused(
        d,
        &[
            "release",
            "stage",
            "--repo",
            "repo",
            "--bundle",
            "b-staging",
        ],
    );
    assert!(err.contains("built for staging"), "{err}");

    ok(d, &["release", "stage", "--repo", "repo", "--bundle", "b1"]);
    let out = ok(d, &["release", "sign", "--repo", "repo", "--key", "s1.key"]);
    assert!(out.contains("1 of the 2 needed"), "{out}");
    let err = refused(
        d,
        &["release", "sign", "--repo", "repo", "--key", "online.key"],
    );
    assert!(
        err.contains("not one of the repository's release signer keys"),
        "{err}"
    );
    let err = refused(
        d,
        &[
            "release",
            "publish",
            "--repo",
            "repo",
            "--online-key",
            "online.key",
        ],
    );
    assert!(
        err.contains("1 valid release signer signature(s) of the 2 needed"),
        "{err}"
    );
    ok(d, &["release", "sign", "--repo", "repo", "--key", "s3.key"]);
    let out = ok(
        d,
        &[
            "release",
            "publish",
            "--repo",
            "repo",
            "--online-key",
            "online.key",
        ],
    );
    assert!(out.contains("1.0.0"), "{out}");

    // The host's view, from the pinned root.
    let listed = ok(
        d,
        &[
            "release",
            "list",
            "--repo",
            "repo",
            "--root",
            "repo/metadata/root.json",
            "-o",
            "json",
        ],
    );
    let listed: Vec<String> = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed, ["1.0.0"]);
    let verify = |env: &str, out: &str| {
        nitrile(
            d,
            &[
                "release",
                "verify",
                "1.0.0",
                "--repo",
                "repo",
                "--root",
                "repo/metadata/root.json",
                "--env",
                env,
                "--ci-key",
                "ci.key.pub.json",
                "--out",
                out,
            ],
        )
    };
    let out = verify("prod", "host");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(d.join("host/nitrile")).unwrap(),
        std::fs::read(binary).unwrap()
    );
    let out = verify("staging", "host-staging");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("built for prod, and this is staging"), "{err}");
    assert!(!d.join("host-staging/nitrile").exists());
}

#[test]
fn a_release_carries_the_host_references_it_is_built_with() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let a = "ab".repeat(32);
    let b = "CD".repeat(32);
    // A host image's reference.json: its pcr<N> values and much else.
    std::fs::write(
        d.join("h1.json"),
        format!(
            r#"{{"format": "nitrile-host-image/1", "pcr4": "{a}", "pcr11": "{b}", "pcr15": "{a}",
                "pcr4_events": [], "kernel_release": "6.1", "annotations": {{}}}}"#
        ),
    )
    .unwrap();
    std::fs::write(d.join("h2.json"), format!(r#"{{"pcr15": "{b}"}}"#)).unwrap();
    std::fs::write(
        d.join("bad.json"),
        format!(r#"{{"pcr15": "{}"}}"#, &a[..62]),
    )
    .unwrap();
    let binary = env!("CARGO_BIN_EXE_nitrile");
    let build = |out: &str, refs: &[&str]| {
        let mut args = vec![
            "release",
            "build",
            "1.0.0",
            "--env",
            "prod",
            "--out",
            out,
            "--binary",
            binary,
            "--guest-image",
            "none",
            "-o",
            "json",
        ];
        for r in refs {
            args.extend(["--host-reference", r]);
        }
        nitrile(d, &args)
    };
    let out = build("b", &["h1=h1.json", "h2=h2.json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(manifest["files"]["host-references.json"]["sha256"].is_string());
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("b/host-references.json")).unwrap()).unwrap();
    assert_eq!(
        written,
        serde_json::json!({
            "format": "nitrile-host-references/1",
            "hosts": {
                "h1": {"pcr4": a, "pcr11": b.to_lowercase(), "pcr15": a},
                "h2": {"pcr15": b.to_lowercase()},
            }
        })
    );
    // What the release signs is exactly that file.
    let back = nitrile_release::manifest::read_bundle(&d.join("b")).unwrap();
    assert!(back.files.contains_key("host-references.json"));
    // No temporary file is left beside the bundle.
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".nitrile-release-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    for (refs, why) in [
        (&["h1=bad.json"][..], "64 hex digits"),
        (&["H1=h1.json"][..], "host \"H1\""),
        (&["h1"][..], "is not NAME=FILE"),
        (&["h1=h1.json", "h1=h2.json"][..], "names host h1 twice"),
        (&["h1=missing.json"][..], "missing.json"),
    ] {
        let out = build("refused", refs);
        assert!(!out.status.success(), "{refs:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{refs:?}: {err}");
        assert!(!d.join("refused").exists(), "{refs:?}");
    }
    // The help says what the flag does.
    let help = nitrile(d, &["release", "build", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--host-reference <NAME=FILE>"), "{help}");
    assert!(help.contains("host-references.json"), "{help}");
}
