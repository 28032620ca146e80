//! Claim 3 against the real binary and a whole cell (`nitrile up`: the key
//! service `nitrile kms` as a process of its own, the host agent asking it
//! over mTLS): a guest writes a pattern to a volume; the volume is detached
//! and attached to a new instance whose guest reads the pattern back;
//! neither the pattern nor the volume's data key is in any file under the
//! cell's state directory (the volume's ciphertext, every journal, the
//! audit log's storage, the key service's store, the host's records), in
//! any answer of the CLI or in the services' logs. Then `volume delete`
//! crypto-erases it: with a copy of the ciphertext and a backup of the
//! host's state and the volume store taken before, no key material left
//! opens the wrapped key again.
//!
//! The data key comes from the key service's test-only export
//! (`danger-test-export`, a dev-dependency feature) on a copy of its store.
//!
//! Needs QEMU and the guest image; prints `SKIPPED: <reason>` without them.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod cell;
use cell::{Cell, wait_for_line};

/// How long a guest under TCG may take to boot and write or read.
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(STANDARD[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Base64 of `data` as it reads inside a longer stream at each of the three
/// alignments, the partial groups at the ends dropped.
fn base64_forms(data: &[u8]) -> Vec<String> {
    (0..3)
        .map(|k| {
            let mut stream = vec![0u8; k];
            stream.extend_from_slice(data);
            let text = base64(&stream);
            let skip = (k * 4).div_ceil(3);
            let keep = (stream.len() / 3) * 4;
            text[skip..keep.max(skip)].to_owned()
        })
        .collect()
}

/// The forms of the pattern and of the data key the scan looks for.
fn needles(dek: &[u8; 64]) -> Vec<(String, Vec<u8>)> {
    // Lines of what the guest writes (`NITRILE-PLAINTEXT-<n>`, n = 0..1023;
    // the guest image's init script holds only the prefix and `$n`).
    let lines: String = (500..504)
        .map(|n| format!("NITRILE-PLAINTEXT-{n}\n"))
        .collect();
    let mut forms = vec![
        ("the pattern".to_owned(), lines.as_bytes().to_vec()),
        (
            "the pattern, hex".to_owned(),
            hex(lines.as_bytes()).into_bytes(),
        ),
        ("the data key".to_owned(), dek.to_vec()),
        ("its first XTS half".to_owned(), dek[..32].to_vec()),
        ("its second XTS half".to_owned(), dek[32..].to_vec()),
        ("the data key, hex".to_owned(), hex(dek).into_bytes()),
        (
            "the data key, HEX".to_owned(),
            hex(dek).to_uppercase().into_bytes(),
        ),
    ];
    for (what, data) in [
        ("the pattern", lines.as_bytes()),
        ("the data key", &dek[..]),
    ] {
        for (k, form) in base64_forms(data).into_iter().enumerate() {
            forms.push((format!("{what}, base64 at offset {k}"), form.into_bytes()));
        }
    }
    forms
}

fn find(hay: &[u8], needles: &[(String, Vec<u8>)]) -> Option<String> {
    needles
        .iter()
        .find(|(_, n)| hay.windows(n.len()).any(|w| w == n.as_slice()))
        .map(|(name, _)| name.clone())
}

/// Every regular file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(read) = std::fs::read_dir(dir) {
        for e in read.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                out.extend(files(&e.path()));
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// `cp -a from to`.
fn copy_tree(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

/// The data key of `volume` given its wrapped key, from a copy of the key
/// service's store (the service holds the store's lock while it runs).
fn export_dek(store: &Path, volume: &str, wrapped: &[u8]) -> Result<[u8; 64], String> {
    let copy = tempfile::tempdir().unwrap();
    copy_tree(store, &copy.path().join("store"));
    let kms = nitrile_kms::Kms::open(&copy.path().join("store")).map_err(|e| e.to_string())?;
    kms.export_volume_key_for_tests(&nitrile_api::Name::new(volume).unwrap(), wrapped)
        .map(|k| *k)
        .map_err(|e| e.to_string())
}

/// The wrapped key in a volume record.
fn wrapped_key(record: &Path) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
    (0..v["wrapped_key"].as_str().unwrap().len() / 2)
        .map(|i| {
            u8::from_str_radix(&v["wrapped_key"].as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap()
        })
        .collect()
}

fn said(cell: &Cell, config: &Path, args: &[&str], all: &mut Vec<(String, Vec<u8>)>) -> String {
    let out = cell.nitrile(config, args);
    assert!(
        out.status.success(),
        "nitrile {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bytes = out.stdout.clone();
    bytes.extend_from_slice(&out.stderr);
    all.push((format!("nitrile {}", args.join(" ")), bytes));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn claim3_a_volume_s_pattern_and_key_are_nowhere_and_delete_erases_it() {
    let built = guest_or_skip!();
    let cell = Cell::up();
    let store = nitrile_image::ImageStore::open(cell.images_dir()).unwrap();
    let image = |action: &str| {
        let cmdline = nitrile_image::Cmdline::new(&format!(
            "{} nitrile.test={action}",
            built.cmdline.as_str()
        ))
        .unwrap();
        store
            .import(&built.kernel, &built.initramfs, &cmdline)
            .unwrap()
            .digest()
            .to_hex()
    };
    let (writer, reader) = (image("volume-write"), image("volume-read"));
    let mut all = Vec::new();
    let p = &cell.placement;

    // A volume under the cell's default key; a guest writes the pattern.
    let created = said(
        &cell,
        p,
        &["volume", "create", "data", "--size", "16M", "-o", "json"],
        &mut all,
    );
    let v: serde_json::Value = serde_json::from_str(&created).unwrap();
    assert_eq!(
        (v["state"].as_str(), v["kms_key"].as_str()),
        (Some("available"), Some("default"))
    );
    said(
        &cell,
        p,
        &[
            "instance", "launch", "w1", "--image", &writer, "--memory", "128M", "--volume", "data",
            "-o", "json",
        ],
        &mut all,
    );
    let serial = cell.vm_dir("w1").join("serial.log");
    assert!(
        wait_for_line(&serial, "NITRILE-VOLUME-WRITTEN", GUEST_TIMEOUT),
        "the guest did not write; serial:\n{}",
        String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default())
    );
    said(&cell, p, &["instance", "stop", "w1"], &mut all);
    said(
        &cell,
        p,
        &["volume", "detach", "data", "-o", "json"],
        &mut all,
    );

    // Attached to a new instance, whose guest reads the pattern back.
    said(
        &cell,
        p,
        &[
            "instance", "launch", "r1", "--image", &reader, "--memory", "128M", "--volume", "data",
        ],
        &mut all,
    );
    let serial = cell.vm_dir("r1").join("serial.log");
    assert!(
        wait_for_line(&serial, "NITRILE-VOLUME-OK", GUEST_TIMEOUT),
        "the guest did not read the pattern back; serial:\n{}",
        String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default())
    );
    for config in [&cell.alice, &cell.placement] {
        for args in [
            &["volume", "list"][..],
            &["volume", "list", "-o", "json"],
            &["volume", "describe", "data", "-o", "json"],
            &["instance", "describe", "r1", "-o", "json"],
        ] {
            said(&cell, config, args, &mut all);
        }
    }
    said(
        &cell,
        p,
        &["instance", "terminate", "r1", "--yes"],
        &mut all,
    );
    said(
        &cell,
        p,
        &["instance", "terminate", "w1", "--yes"],
        &mut all,
    );

    // The data key, from a copy of the key service's store.
    let record = cell.state.join("volumes/data/volume.json");
    let wrapped = wrapped_key(&record);
    let kms_store = cell.state.join("kms/store");
    let dek = export_dek(&kms_store, "data", &wrapped).expect("the key service opens its own key");
    let needles = needles(&dek);

    // Controls: the scan finds each form where it is put, and finds the
    // wrapped key (hex) in the volume's record, so it reads that store.
    for (name, n) in &needles {
        let mut sample = b"prefix ".to_vec();
        sample.extend_from_slice(n);
        sample.extend_from_slice(b" suffix");
        assert!(find(&sample, &needles).is_some(), "{name}");
    }
    let wrapped_hex = hex(&wrapped).into_bytes();
    let all_files = files(&cell.state);
    assert!(
        all_files.iter().any(|f| {
            let b = std::fs::read(f).unwrap_or_default();
            b.windows(wrapped_hex.len()).any(|w| w == wrapped_hex)
        }),
        "the scan does not see the volume store"
    );

    // The volume's ciphertext is there, and holds neither.
    let disk = cell.state.join("volumes/data/disk.img");
    let ciphertext = std::fs::read(&disk).unwrap();
    assert!(ciphertext.len() > 1 << 20, "{}", disk.display());
    assert_eq!(
        find(&ciphertext, &needles),
        None,
        "in the volume's ciphertext"
    );
    // No file under the cell's state: journals (host, token service, key
    // service), the audit log's storage, the key service's store, records,
    // configs, consoles, metrics.
    assert!(all_files.len() > 20, "{all_files:?}");
    for f in &all_files {
        let bytes = std::fs::read(f).unwrap_or_default();
        if let Some(what) = find(&bytes, &needles) {
            panic!("{what} is in {}", f.display());
        }
    }
    for (what, bytes) in &all {
        assert_eq!(find(bytes, &needles), None, "{what} answered it");
    }
    assert_eq!(find(cell.logs().as_bytes(), &needles), None, "in the logs");

    // Crypto-erase: keep the ciphertext and a backup of the host's state
    // and the volume store, then delete.
    let backup = tempfile::tempdir().unwrap();
    copy_tree(&cell.state.join("hosts"), &backup.path().join("hosts"));
    copy_tree(&cell.state.join("volumes"), &backup.path().join("volumes"));
    let deleted = said(
        &cell,
        p,
        &["volume", "delete", "data", "--yes", "-o", "json"],
        &mut all,
    );
    let v: serde_json::Value = serde_json::from_str(&deleted).unwrap();
    assert_eq!(v["state"].as_str(), Some("deleted"), "{deleted}");
    assert!(!disk.exists() && !record.exists());
    // The key service no longer opens the wrapped key, from the backup or
    // from anywhere: its record (the volume's secret) is gone.
    let backed_up = wrapped_key(&backup.path().join("volumes/data/volume.json"));
    assert_eq!(backed_up, wrapped);
    let err = export_dek(&kms_store, "data", &backed_up).unwrap_err();
    assert!(err.contains("data"), "{err}");
    // And no key material left on the machine is the data key: the cell's
    // state and the backup hold it nowhere.
    for f in files(&cell.state).iter().chain(files(backup.path()).iter()) {
        let bytes = std::fs::read(f).unwrap_or_default();
        if let Some(what) = find(&bytes, &needles[2..7]) {
            panic!("{what} is in {} after the delete", f.display());
        }
    }
    // The backup's ciphertext is what it was: the bytes survive, the key
    // does not.
    assert_eq!(
        std::fs::read(backup.path().join("volumes/data/disk.img")).unwrap(),
        ciphertext
    );

    // The host journaled the delete before it acted, and the key service
    // journaled the destruction.
    let host = cell.journal(&cell.host_journal());
    let at = |op: &str, kind: &str| {
        host.iter()
            .position(|r| r["kind"] == kind && r["operations"][0] == op)
    };
    let request = at("volume.delete", "request").expect("no request record");
    assert!(request < host.len() - 1);
    let kms = cell.journal(&cell.state.join("kms/journal"));
    assert!(
        kms.iter()
            .any(|r| r.to_string().contains("volume/data")
                && r.to_string().contains("volume.delete")),
        "the key service's journal has no destroy of volume/data"
    );
}
