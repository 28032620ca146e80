//! Claim 6 through the real binary: `nitrile up` runs the audit log
//! service and ships the host's and the token service's journals to it;
//! carol (auditor) reads them with `nitrile audit tail`, proves a record's
//! inclusion and verifies the whole log locally; alice (operator) is
//! refused at the entitlement step and that refusal is itself in the log.
//! Tampering with a copy of the log store (a flipped byte in an entry
//! bundle or a tile, a deleted record, two records swapped, a truncated
//! tail) makes `nitrile audit verify --store` fail naming where. SIGTERM
//! stops the cell cleanly and a second `nitrile up` serves the same log.

mod cell;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cell::Cell;
use nitrile_tlog::{ENTRIES_PER_BUNDLE, TilePath, decode_bundle, encode_bundle};

/// carol's `audit tail -o json`, one object per entry.
fn tail(cell: &Cell) -> Vec<serde_json::Value> {
    cell.ok(&cell.carol, &["audit", "tail", "-o", "json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits (up to a minute) until carol's tail has an entry for which `f`
/// holds; returns the tail.
fn wait_for(
    cell: &Cell,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    wait_for_all(cell, what, |t| t.iter().any(&f))
}

/// Waits (up to a minute) until `f` holds for carol's tail; returns it.
fn wait_for_all(
    cell: &Cell,
    what: &str,
    f: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let entries = tail(cell);
        if f(&entries) {
            return entries;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in the log: {entries:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn field<'a>(e: &'a serde_json::Value, key: &str) -> &'a str {
    e["record"][key].as_str().unwrap_or_default()
}

fn has_op(e: &serde_json::Value, op: &str) -> bool {
    e["record"]["operations"]
        .as_array()
        .is_some_and(|ops| ops.iter().any(|o| o == op))
}

/// Copies a directory tree.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The log's size in the stored latest checkpoint.
fn stored_size(store: &Path) -> u64 {
    let note = std::fs::read_to_string(store.join("checkpoint")).unwrap();
    note.lines().nth(1).unwrap().parse().unwrap()
}

/// The entry bundle or level-0 tile the audit reads for the last leaves
/// of a log of `size`: the full one if stored, else the partial one.
fn last_tile(store: &Path, size: u64, entries: bool) -> (String, u64) {
    let n = (size - 1) / ENTRIES_PER_BUNDLE;
    let width = size - n * ENTRIES_PER_BUNDLE;
    let make = |w: u64| {
        if entries {
            TilePath::entries(n, w as u16)
        } else {
            TilePath::hashes(0, n, w as u16)
        }
        .to_string()
    };
    let full = make(ENTRIES_PER_BUNDLE);
    if store.join(&full).exists() {
        (full, ENTRIES_PER_BUNDLE)
    } else {
        (make(width), width)
    }
}

/// `nitrile audit verify --store <copy>` after `tamper` changed the copy:
/// exits 1; returns its stderr and JSON.
fn verify_tampered(
    cell: &Cell,
    original: &Path,
    name: &str,
    tamper: impl FnOnce(&Path),
) -> (String, serde_json::Value) {
    let copy = cell.root().join(format!("tampered-{name}"));
    copy_dir(original, &copy);
    tamper(&copy);
    let out = cell.nitrile(
        &cell.carol,
        &[
            "audit",
            "verify",
            "--store",
            copy.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ok"], false, "{name}: {json}");
    assert!(stderr.contains("does NOT verify"), "{name}: {stderr}");
    (stderr, json)
}

/// Rewrites entry bundle `path` of `store` after `f` edited its entries.
fn edit_bundle(store: &Path, path: &str, width: u64, f: impl FnOnce(&mut Vec<Vec<u8>>)) {
    let file = store.join(path);
    let mut entries = decode_bundle(&std::fs::read(&file).unwrap(), width).unwrap();
    f(&mut entries);
    std::fs::write(&file, encode_bundle(&entries).unwrap()).unwrap();
}

#[test]
fn claim6_auditor_reads_proves_and_verifies_the_log_and_tampering_is_named() {
    let mut cell = Cell::up();
    let said = cell.up_stdout.join("\n");
    assert!(said.contains("logd "), "{said}");
    assert!(said.contains("audit log"), "{said}");

    // Admin calls: journaled by the host and the token service, shipped.
    for _ in 0..3 {
        cell.ok(&cell.alice, &["host", "describe"]);
    }
    cell.ok(&cell.alice, &["instance", "list"]);
    let entries = wait_for_all(&cell, "host and token service records", |t| {
        let host = t.iter().any(|e| {
            e["source"] == "nitrile://local/host/h1"
                && has_op(e, "host.describe")
                && field(e, "principal") == "nitrile://local/operator/alice"
        });
        let tokend = t.iter().any(|e| {
            e["source"] == "nitrile://local/service/tokend"
                && has_op(e, "instance.list")
                && field(e, "outcome") == "granted"
        });
        host && tokend
    });
    // Indexes are the leaves' positions, in order, with no gap.
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["index"], i as u64, "{e}");
    }
    // The table form and the filters.
    let table = cell.ok(&cell.carol, &["audit", "tail", "--host", "h1", "-n", "2"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("INDEX"), "{table}");
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[1..].iter().all(|l| l.contains("host/h1")), "{table}");
    let by_alice = cell.ok(
        &cell.carol,
        &[
            "audit",
            "tail",
            "--principal",
            "operator/alice",
            "-o",
            "json",
        ],
    );
    assert!(!by_alice.is_empty());
    assert!(
        by_alice
            .lines()
            .all(|l| l.contains("nitrile://local/operator/alice")),
        "{by_alice}"
    );

    // --follow prints records as they enter the log, until SIGTERM.
    let mut follow = Command::new(cell::NITRILE)
        .env("XDG_STATE_HOME", cell.auditor_state())
        .arg("--config")
        .arg(&cell.carol)
        .args(["audit", "tail", "--follow", "-n", "1", "-o", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Its first line is the last record of the log when it started: its
    // first pass is over, and a record that enters the log from now on is
    // one it follows (a call made before that line could enter the log
    // during the first pass, which prints only the last record).
    let first = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("tail --follow printed no first record");
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    let start = first["index"].as_u64().unwrap();
    assert!(start >= entries.len() as u64, "{first}");
    cell.ok(&cell.alice, &["host", "describe"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("no new record followed");
        let e: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(e["index"].as_u64().unwrap() > start, "{e}");
        if e["source"] == "nitrile://local/host/h1" && has_op(&e, "host.describe") {
            break;
        }
    }
    assert!(cell::wait_catches(
        follow.id(),
        nix::sys::signal::Signal::SIGTERM
    ));
    cell::signal(follow.id(), nix::sys::signal::Signal::SIGTERM);
    assert!(follow.wait().unwrap().success());

    // alice may not read the log: refused at the entitlement step, exit 1...
    let out = cell.nitrile(&cell.alice, &["audit", "tail"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("audit.read") && err.contains("step entitlement"),
        "{err}"
    );
    // ...and her refused attempt is in the log, for carol to see.
    wait_for(&cell, "alice's refused read", |e| {
        e["source"] == "nitrile://local/service/tokend"
            && has_op(e, "audit.read")
            && field(e, "principal") == "nitrile://local/operator/alice"
            && field(e, "step") == "entitlement"
    });
    // carol's own reads are logged by logd.
    wait_for(&cell, "carol's reads", |e| {
        e["source"] == "nitrile://local/service/logd"
            && has_op(e, "audit.read")
            && field(e, "principal") == "nitrile://local/auditor/carol"
    });

    // Inclusion of one host record, by journal record and by index,
    // verified locally against the signed checkpoint.
    let proved = cell.ok(&cell.carol, &["audit", "prove", "--record", "host/h1:1"]);
    assert!(proved.starts_with("OK: record "), "{proved}");
    assert!(proved.contains("verified locally"), "{proved}");
    let json = cell.ok(
        &cell.carol,
        &["audit", "prove", "--record", "host/h1:2", "-o", "json"],
    );
    let proof: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(proof["ok"], true);
    assert_eq!(proof["source"], "nitrile://local/host/h1");
    assert_eq!(proof["seq"], 2);
    let index = proof["index"].as_u64().unwrap().to_string();
    let again = cell.ok(
        &cell.carol,
        &["audit", "prove", "--record", &index, "-o", "json"],
    );
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["leaf_hash"], proof["leaf_hash"]);
    // A record the log does not hold: exit 1.
    let out = cell.nitrile(
        &cell.carol,
        &["audit", "prove", "--record", "host/h1:100000"],
    );
    assert_eq!(out.status.code(), Some(1));
    // A malformed id: usage, exit 2.
    let out = cell.nitrile(&cell.carol, &["audit", "prove", "--record", "h1:x"]);
    assert_eq!(out.status.code(), Some(2));

    // The whole log, fetched from logd and recomputed.
    let verified = cell.ok(&cell.carol, &["audit", "verify", "-o", "json"]);
    let verified: serde_json::Value = serde_json::from_str(&verified).unwrap();
    assert_eq!(verified["ok"], true, "{verified}");
    assert!(verified["size"].as_u64().unwrap() >= entries.len() as u64 / 2);
    // The monitor runs the cell's rules: a drain is a sensitive operation.
    cell.ok(&cell.alice, &["host", "drain"]);
    cell.ok(&cell.alice, &["host", "undrain"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let alerts = loop {
        let alerts = cell.ok(&cell.carol, &["audit", "alerts", "-o", "json"]);
        let alerts: Vec<serde_json::Value> = serde_json::from_str(&alerts).unwrap();
        if alerts.iter().any(|a| {
            a["alert"] == "monitor"
                && a["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("Sensitive operation"))
                && a["source"] == "nitrile://local/host/h1"
        }) {
            break alerts;
        }
        assert!(Instant::now() < deadline, "no monitor alert: {alerts:#?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        alerts.iter().all(|a| a["alert"] != "integrity"),
        "{alerts:#?}"
    );
    let table = cell.ok(&cell.carol, &["audit", "alerts"]);
    assert!(
        table.starts_with("CURSOR") && table.contains("Sensitive operation"),
        "{table}"
    );

    // SIGTERM: a clean stop (asserted by stop_up), the last checkpoint
    // written. The stored log verifies as it is.
    cell.stop_up();
    let store: PathBuf = cell.state.join("logd/log");
    let out = cell.ok(
        &cell.carol,
        &["audit", "verify", "--store", store.to_str().unwrap()],
    );
    assert!(out.starts_with("OK: "), "{out}");
    let stored = cell.ok(
        &cell.carol,
        &[
            "audit",
            "verify",
            "--store",
            store.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    let stored_checkpoints = stored["checkpoints"].as_u64().unwrap();
    assert!(stored_checkpoints >= 2, "{stored}");
    // The log's key is found beside the store too (no client config).
    let out = std::process::Command::new(cell::NITRILE)
        .env("XDG_STATE_HOME", cell.auditor_state())
        .args([
            "--config",
            "/nonexistent/config.toml",
            "audit",
            "verify",
            "--store",
        ])
        .arg(cell.state.join("logd"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let size = stored_size(&store);
    assert!(size >= 4, "{size}");
    let (bundle, width) = last_tile(&store, size, true);
    let (tile, tile_width) = last_tile(&store, size, false);
    let first_of_bundle = (size - 1) / ENTRIES_PER_BUNDLE * ENTRIES_PER_BUNDLE;

    // One byte of a leaf in an entry bundle.
    let (err, json) = verify_tampered(&cell, &store, "leaf-byte", |s| {
        edit_bundle(s, &bundle, width, |e| {
            let last = e.len() - 2;
            let at = e[last].len() - 3;
            e[last][at] ^= 0x01;
        });
    });
    let want = first_of_bundle + width - 2;
    assert!(err.contains(&format!("(entry {want})")), "{err}");
    assert_eq!(json["index"], want, "{json}");
    assert!(
        json["path"].as_str().unwrap().starts_with("tile/"),
        "{json}"
    );

    // One byte of a hash tile.
    let (err, json) = verify_tampered(&cell, &store, "tile-byte", |s| {
        let file = s.join(&tile);
        let mut bytes = std::fs::read(&file).unwrap();
        let at = (tile_width as usize - 1) * 32 + 7;
        bytes[at] ^= 0x80;
        std::fs::write(&file, bytes).unwrap();
    });
    assert_eq!(json["path"], tile.as_str(), "{json}");
    assert!(err.contains(&tile), "{err}");

    // A record deleted.
    let (err, json) = verify_tampered(&cell, &store, "deleted", |s| {
        edit_bundle(s, &bundle, width, |e| {
            e.remove(1);
        });
    });
    assert_eq!(json["path"], bundle.as_str(), "{json}");
    assert!(err.contains(&bundle), "{err}");
    assert_eq!(json["index"], first_of_bundle + 1, "{json}");

    // Two records swapped.
    let (err, json) = verify_tampered(&cell, &store, "reordered", |s| {
        edit_bundle(s, &bundle, width, |e| e.swap(1, 2));
    });
    assert_eq!(json["index"], first_of_bundle + 1, "{json}");
    assert!(err.contains("tile/"), "{err}");

    // The tail truncated: the bundle cut short.
    let (err, json) = verify_tampered(&cell, &store, "truncated", |s| {
        let file = s.join(&bundle);
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    });
    assert_eq!(json["path"], bundle.as_str(), "{json}");
    assert_eq!(json["index"], first_of_bundle + width - 1, "{json}");
    assert!(err.contains(&bundle), "{err}");

    // A second start serves the same log, grown, and it still verifies.
    cell.start_up();
    cell.ok(&cell.alice, &["host", "describe"]);
    let grown = wait_for(&cell, "records after the restart", |e| {
        e["index"].as_u64().unwrap() >= size && e["source"] == "nitrile://local/host/h1"
    });
    assert_eq!(grown[0], entries[0]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = cell.ok(&cell.carol, &["audit", "verify", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        if v["size"].as_u64().unwrap() > size {
            // Fetched from logd: every checkpoint of before the restart too.
            assert!(
                v["checkpoints"].as_u64().unwrap() > stored_checkpoints,
                "{v} vs {stored}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the checkpoint never grew: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    cell.stop_up();
}

#[test]
fn claim6_separate_services_ship_their_journals_to_nitrile_logd() {
    let mut cell = Cell::up();
    cell.stop_up();
    // The services as processes of their own, on a known logd port.
    let logd_addr = format!("127.0.0.1:{}", cell::free_port());
    let logd_config = cell.state.join("logd/logd.toml");
    cell::set_line(&logd_config, "listen", &logd_addr);
    cell::set_section_line(&cell.hostd_config(), "logd", "addr", &logd_addr);
    cell::set_line(&cell.carol, "logd", &logd_addr);

    let mut logd = Command::new(cell::NITRILE)
        .arg("logd")
        .arg("--config")
        .arg(&logd_config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = logd.stderr.take().unwrap();
    let mut log = std::fs::File::create(cell.root().join("logd.log")).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(log, "{line}");
            if line.starts_with("nitrile logd: serving on ")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(line, format!("nitrile logd: serving on {logd_addr}"));

    cell.start_tokend_with(&["--logd", &logd_addr]);
    cell.start_hostd();
    cell.ok(&cell.alice, &["host", "describe"]);
    wait_for_all(&cell, "both journals shipped", |t| {
        let from = |source: &str| {
            t.iter().any(|e| {
                e["source"] == source
                    && has_op(e, "host.describe")
                    && field(e, "principal") == "nitrile://local/operator/alice"
            })
        };
        from("nitrile://local/host/h1") && from("nitrile://local/service/tokend")
    });
    let verified = cell.ok(&cell.carol, &["audit", "verify"]);
    assert!(verified.starts_with("OK: "), "{verified}");

    // SIGTERM: logd stops cleanly.
    cell::signal(logd.id(), nix::sys::signal::Signal::SIGTERM);
    let status = logd.wait().unwrap();
    assert!(status.success(), "nitrile logd stopped with {status}");
}

#[test]
fn audit_witness_keygen_writes_a_private_key_and_prints_the_vkey() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("w/cosigner.skey");
    let keygen = || {
        Command::new(cell::NITRILE)
            .args([
                "audit",
                "witness",
                "keygen",
                "--name",
                "local.nitrile/witness/w1",
            ])
            .arg("--out")
            .arg(&key)
            .output()
            .unwrap()
    };
    let out = keygen();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vkey = String::from_utf8(out.stdout).unwrap();
    assert!(vkey.starts_with("local.nitrile/witness/w1+"), "{vkey}");
    let secret = std::fs::read_to_string(&key).unwrap();
    assert!(!vkey.contains(secret.trim()));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0);
    // Never replaces a key.
    let again = keygen();
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&key).unwrap(), secret);
    // Running it needs a config.
    let out = Command::new(cell::NITRILE)
        .args(["audit", "witness"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
