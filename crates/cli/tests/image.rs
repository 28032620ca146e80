//! `nitrile image list` and `show` run as a real binary on a real store.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use nitrile_image::{Cmdline, ImageStore};

fn nitrile(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nitrile"))
        .args(args)
        .env_remove("NITRILE_CONFIG")
        .output()
        .expect("nitrile runs")
}

#[test]
fn list_and_show_verify_and_refuse_a_tampered_image() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let state_s = state.to_str().unwrap();
    let kernel = tmp.path().join("vmlinux");
    let initramfs = tmp.path().join("initramfs");
    let mut k = b"\x7fELF\x02\x01\x01".to_vec();
    k.resize(8192, 0);
    k.extend_from_slice(b"Linux version 6.12.0-cli (b) #1\0");
    std::fs::write(&kernel, &k).unwrap();
    std::fs::write(&initramfs, b"cpio archive").unwrap();
    let store = ImageStore::open(state.join("images")).unwrap();
    let image = store
        .import(&kernel, &initramfs, &Cmdline::new("console=ttyS0").unwrap())
        .unwrap();
    let digest = image.digest().to_string();

    let out = nitrile(&["image", "list", "--state", state_s]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("DIGEST"), "{table}");
    assert!(
        table.contains(&digest) && table.contains("6.12.0-cli"),
        "{table}"
    );

    let out = nitrile(&["image", "list", "--state", state_s, "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["digest"], digest.as_str());
    assert_eq!(listed[0]["cmdline"], "console=ttyS0");

    let out = nitrile(&[
        "image",
        "show",
        &digest[..12],
        "--state",
        state_s,
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["digest"], digest.as_str());
    assert_eq!(shown["verified"], true);

    // A changed kernel in the store: show refuses with exit code 1.
    std::fs::set_permissions(image.kernel(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut changed = std::fs::read(image.kernel()).unwrap();
    changed[100] ^= 1;
    std::fs::write(image.kernel(), changed).unwrap();
    let out = nitrile(&["image", "show", &digest, "--state", state_s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match its digest"), "{err}");

    // Not a digest: refused as such.
    let out = nitrile(&["image", "show", "xyz", "--state", state_s]);
    assert_eq!(out.status.code(), Some(1));
}
