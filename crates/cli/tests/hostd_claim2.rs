//! Claim 2 against the real binary: a guest plants a random secret in its
//! volume and memory; every read operation of the host API (and the
//! lifecycle mutations) answers, and neither any answer nor the host and
//! token service journals nor the services' logs carry the secret, as text,
//! hex or base64. The scanner is shown to find it where it does belong (the
//! image manifest's command line, the guest's serial console, encoded
//! samples), and the volume's backing file does not hold it (encrypted).
//!
//! Needs QEMU and the guest image; prints `SKIPPED: <reason>` without them.

use std::path::Path;
use std::time::Duration;

use rand_core::RngCore;

mod cell;
use cell::{Cell, wait_for_line};

/// How long a guest under TCG may take to boot and plant the secret.
const PLANT_TIMEOUT: Duration = Duration::from_secs(240);
const PLANTED: &str = "NITRILE-SECRET-PLANTED";
const INSTANCE: &str = "s1";

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Base64 without padding.
fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(alphabet[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// The base64 characters that encode only `data`, for each of the three
/// offsets (mod 3) `data` can have inside a longer encoded stream.
fn base64_forms(data: &[u8], alphabet: &[u8; 64]) -> Vec<String> {
    (0..3)
        .map(|k| {
            let mut padded = vec![0u8; k];
            padded.extend_from_slice(data);
            let enc = base64(&padded, alphabet);
            // Character j holds bits 6j..6j+6; keep those inside data's bits.
            let first = (8 * k).div_ceil(6);
            let last = (8 * (k + data.len()) - 6) / 6;
            enc[first..=last].to_owned()
        })
        .collect()
}

/// Every form of the secret the scan looks for: (name, bytes).
fn needles(secret: &str, raw: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut forms = vec![
        ("text".to_owned(), secret.as_bytes().to_vec()),
        (
            "text, upper case".to_owned(),
            secret.to_uppercase().into_bytes(),
        ),
        (
            "hex of the text".to_owned(),
            hex(secret.as_bytes()).into_bytes(),
        ),
        (
            "hex of the text, upper case".to_owned(),
            hex(secret.as_bytes()).to_uppercase().into_bytes(),
        ),
    ];
    for (what, data) in [("text", secret.as_bytes()), ("bytes", raw)] {
        for (alpha, alphabet) in [("base64", STANDARD), ("base64url", URL_SAFE)] {
            for (k, form) in base64_forms(data, alphabet).into_iter().enumerate() {
                forms.push((
                    format!("{alpha} of the {what} at offset {k}"),
                    form.into_bytes(),
                ));
            }
        }
    }
    forms
}

/// The first form of the secret found in `hay`.
fn find(hay: &[u8], needles: &[(String, Vec<u8>)]) -> Option<String> {
    needles
        .iter()
        .find(|(_, n)| hay.windows(n.len()).any(|w| w == n.as_slice()))
        .map(|(name, _)| name.clone())
}

/// Everything one CLI call printed, named.
struct Said {
    what: String,
    bytes: Vec<u8>,
}

fn call(cell: &Cell, config: &Path, args: &[&str], must_succeed: bool) -> Said {
    let out = cell.nitrile(config, args);
    if must_succeed {
        assert!(
            out.status.success(),
            "nitrile {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut bytes = out.stdout;
    bytes.extend_from_slice(&out.stderr);
    Said {
        what: format!("nitrile {}", args.join(" ")),
        bytes,
    }
}

/// Every read operation as both principals, as table and JSON.
fn read_everything(cell: &Cell, said: &mut Vec<Said>) {
    for (config, is_operator) in [(&cell.alice, true), (&cell.placement, false)] {
        for output in [&[][..], &["-o", "json"][..]] {
            let with = |args: &[&'static str]| -> Vec<&str> {
                args.iter().chain(output.iter()).copied().collect()
            };
            // The placement service may not describe hosts: its refusal is
            // an answer too, and scanned.
            said.push(call(
                cell,
                config,
                &with(&["host", "describe"]),
                is_operator,
            ));
            said.push(call(cell, config, &with(&["instance", "list"]), true));
            said.push(call(
                cell,
                config,
                &with(&["instance", "describe", INSTANCE]),
                true,
            ));
        }
    }
}

#[test]
fn claim2_a_secret_planted_by_the_guest_appears_in_no_answer_journal_or_log() {
    let built = guest_or_skip!();
    let cell = Cell::up();

    let mut raw = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut raw);
    let secret = hex(&raw);
    let needles = needles(&secret, &raw);

    // The standard image with the planting command line, in the host's store.
    let cmdline = nitrile_image::Cmdline::new(&format!(
        "{} nitrile.test=plant-secret nitrile.secret={secret}",
        built.cmdline.as_str()
    ))
    .unwrap();
    let store = nitrile_image::ImageStore::open(cell.images_dir()).unwrap();
    let image = store
        .import(&built.kernel, &built.initramfs, &cmdline)
        .unwrap();
    let digest = image.digest().to_hex();

    let mut said = Vec::new();
    said.push(call(
        &cell,
        &cell.placement,
        &[
            "instance", "launch", INSTANCE, "--image", &digest, "--memory", "128M", "--volume",
            "data=16M", "-o", "json",
        ],
        true,
    ));
    let serial = cell.vm_dir(INSTANCE).join("serial.log");
    assert!(
        wait_for_line(&serial, PLANTED, PLANT_TIMEOUT),
        "the guest did not plant the secret; serial:\n{}",
        String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default())
    );
    // The console of this boot (a restart writes a new one).
    let console = std::fs::read(&serial).unwrap();

    read_everything(&cell, &mut said);
    for verb in ["drain", "undrain"] {
        said.push(call(
            &cell,
            &cell.alice,
            &["host", verb, "-o", "json"],
            true,
        ));
    }
    said.push(call(
        &cell,
        &cell.placement,
        &["instance", "stop", INSTANCE, "-o", "json"],
        true,
    ));
    // Stopped, the volume's backing file is complete on disk: the guest
    // wrote the secret over its start, and the file holds ciphertext only.
    // The cell's volume store (`<state>/volumes`), one directory per volume.
    let volume = cell.state.join("volumes").join("data").join("disk.img");
    let backing = std::fs::read(&volume).unwrap();
    assert!(backing.len() > 4096, "{}", volume.display());
    assert_eq!(
        find(&backing, &needles),
        None,
        "the volume's backing file holds the secret"
    );
    read_everything(&cell, &mut said);
    said.push(call(
        &cell,
        &cell.placement,
        &["instance", "start", INSTANCE],
        true,
    ));
    assert!(
        wait_for_line(&serial, PLANTED, PLANT_TIMEOUT),
        "the restarted guest did not plant the secret again"
    );
    read_everything(&cell, &mut said);

    // Positive controls: the scan finds the secret where it belongs.
    let manifest = cell
        .images_dir()
        .join("manifests")
        .join(format!("{digest}.json"));
    assert_eq!(
        find(&std::fs::read(&manifest).unwrap(), &needles).as_deref(),
        Some("text"),
        "the image manifest's command line must show the scan works"
    );
    assert_eq!(
        find(&console, &needles).as_deref(),
        Some("text"),
        "the guest console (kernel command line) must show the scan works"
    );
    for (name, _) in &needles[2..] {
        // Each encoded form, embedded in a longer encoded stream.
        let sample = if name.starts_with("hex") {
            let h = format!("00{}ff", hex(secret.as_bytes()));
            if name.contains("upper") {
                h.to_uppercase()
            } else {
                h
            }
        } else {
            let data = if name.contains("bytes") {
                &raw[..]
            } else {
                secret.as_bytes()
            };
            let k: usize = name.rsplit(' ').next().unwrap().parse().unwrap();
            let mut stream = vec![7u8; k + 3];
            stream.extend_from_slice(data);
            stream.extend_from_slice(b"tail");
            let alphabet = if name.starts_with("base64url") {
                URL_SAFE
            } else {
                STANDARD
            };
            base64(&stream, alphabet)
        };
        assert!(
            find(sample.as_bytes(), &needles).is_some(),
            "the scan misses the {name} form in {sample}"
        );
    }

    // Nothing the API said carries it.
    assert!(said.len() > 30);
    for s in &said {
        assert_eq!(
            find(&s.bytes, &needles),
            None,
            "{} answered the secret: {}",
            s.what,
            String::from_utf8_lossy(&s.bytes)
        );
    }
    // Nor the journals, raw and as decoded records.
    for journal in [cell.host_journal(), cell.tokend_journal()] {
        let bytes = std::fs::read(&journal).unwrap();
        assert_eq!(find(&bytes, &needles), None, "{}", journal.display());
        let records = serde_json::to_vec(&cell.journal(&journal)).unwrap();
        assert_eq!(find(&records, &needles), None, "{}", journal.display());
        cell.verify_journal(&journal);
    }
    // The host journal saw every call that reached the host.
    let host_records = cell.journal(&cell.host_journal());
    for op in [
        "host.describe",
        "host.drain",
        "host.undrain",
        "instance.launch",
        "instance.list",
        "instance.describe",
        "instance.stop",
        "instance.start",
    ] {
        assert!(
            host_records
                .iter()
                .any(|r| r["kind"] == "request" && r["operations"][0] == op),
            "no request record for {op}"
        );
    }
    // Nor what the services logged, nor the metrics file.
    assert_eq!(
        find(cell.logs().as_bytes(), &needles),
        None,
        "{}",
        cell.logs()
    );
    let metrics = std::fs::read(cell.host_dir().join("metrics.prom")).unwrap();
    assert_eq!(find(&metrics, &needles), None);

    let gone = cell.ok(
        &cell.placement,
        &["instance", "terminate", INSTANCE, "-o", "json"],
    );
    assert_eq!(find(gone.as_bytes(), &needles), None);
}
