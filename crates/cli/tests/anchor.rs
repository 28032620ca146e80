//! Checkpoints anchored outside logd, through the real binary: `nitrile up`
//! runs a checkpoint witness (its own process, state directory and key)
//! and logd publishes a checkpoint only with its cosignature; the auditor's
//! CLI remembers the last checkpoint it verified of the log and refuses a
//! log that is not consistent with it.
//!
//! The attacks are a thief of logd's state directory: the log deleted and
//! the host's and token service's journals cut to a prefix (which still
//! verifies), then the cell started again; and forged logs signed with the
//! log's own key (the same size with another tree, a smaller tree, a larger
//! tree that does not extend the remembered one).

mod cell;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use cell::Cell;
use nitrile_tlog::{FileStorage, Log, NoteSigner, NoteVerifier, verify_cosignature};

const ORIGIN: &str = "local.nitrile/log";

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {}\nstderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// carol's `audit verify -o json` with `extra` arguments; must pass.
fn verify_ok(cell: &Cell, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["audit", "verify", "-o", "json"];
    args.extend_from_slice(extra);
    let out = cell.nitrile(&cell.carol, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["ok"], true, "{v}");
    v
}

/// Waits (up to a minute) until carol's `audit verify` (with `extra`)
/// passes with a checkpoint of more than `size` entries; returns it.
fn verify_beyond(cell: &Cell, size: u64, extra: &[&str]) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = verify_ok(cell, extra);
        if v["size"].as_u64().unwrap() > size {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint beyond {size}: {v}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The one file of `dir/checkpoints/` remembering a log.
fn remembered_file(state: &Path) -> PathBuf {
    let dir = state.join("checkpoints");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

fn remembered(state: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(remembered_file(state)).unwrap()).unwrap()
}

/// The witness's public key, from its own key file (not from any config
/// `nitrile up` wrote).
fn witness_verifier(cell: &Cell) -> NoteVerifier {
    let skey = std::fs::read_to_string(cell.state.join("witness/cosigner.skey")).unwrap();
    NoteSigner::from_skey(skey.trim()).unwrap().verifier()
}

/// The `witness` readiness line of `nitrile up`: address and pid.
fn witness_line(cell: &Cell) -> (String, u32) {
    let line = cell
        .up_stdout
        .iter()
        .find(|l| l.trim_start().starts_with("witness "))
        .unwrap_or_else(|| panic!("no witness line in {:?}", cell.up_stdout));
    let addr = line.split_whitespace().nth(1).unwrap().to_owned();
    let pid = line
        .split("pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"));
    (addr, pid)
}

/// The alerts `audit alerts -o json` lists (a list, or pages of them).
fn alerts(cell: &Cell) -> Vec<serde_json::Value> {
    let out = cell.nitrile(&cell.carol, &["audit", "alerts", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    match json(&out) {
        serde_json::Value::Array(a) => a,
        v => v["alerts"].as_array().cloned().unwrap_or_default(),
    }
}

/// Cuts a journal to its first `keep` records (a prefix of the hash chain,
/// which still verifies).
fn cut_journal(cell: &Cell, journal: &Path, keep: usize) {
    let out = std::process::Command::new(cell::NITRILE)
        .args(["audit", "show-journal", "-o", "json"])
        .arg(journal)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > keep, "{} records", lines.len());
    let at = lines[keep]["offset"].as_u64().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(journal)
        .unwrap()
        .set_len(at)
        .unwrap();
    let report = cell.verify_journal(journal);
    assert_eq!(report["records"], keep as u64, "{report}");
}

/// A log of `entries` in a new directory, checkpointed, signed with the
/// cell's own log key (which a thief of logd's state directory holds).
fn forged_log(cell: &Cell, name: &str, entries: &[Vec<u8>]) -> PathBuf {
    let skey = std::fs::read_to_string(cell.state.join("logd/log.key")).unwrap();
    let signer = NoteSigner::from_skey(skey.trim()).unwrap();
    let dir = cell.root().join(name);
    let mut log = Log::open(FileStorage::open(&dir).unwrap(), ORIGIN, signer).unwrap();
    log.append(entries).unwrap();
    let note = log.prepare_checkpoint(1_000).unwrap();
    log.publish(&note).unwrap();
    dir
}

#[test]
fn nitrile_up_runs_a_witness_whose_cosignature_every_checkpoint_carries() {
    let mut cell = Cell::up();
    let (addr, pid) = witness_line(&cell);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    // A process of its own (not logd's, which runs inside `nitrile up`).
    let cmdline = cell::cmdline(pid).expect("the witness runs");
    let needle = b"audit\0witness\0";
    assert!(
        cmdline.windows(needle.len()).any(|w| w == needle),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    assert_ne!(pid, cell.hostd_pid());
    // Its own state directory and key, owner-only.
    let key = cell.state.join("witness/cosigner.skey");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the witness's key is readable by others");
    let witness = witness_verifier(&cell);
    // logd needs it; the auditors' configs name it.
    let logd = std::fs::read_to_string(cell.state.join("logd/logd.toml")).unwrap();
    assert!(logd.contains("witness_quorum = 1"), "{logd}");
    assert!(logd.contains(&witness.to_vkey()), "{logd}");
    let carol = nitrile_cell::ClientConfig::load(&cell.carol).unwrap();
    assert_eq!(carol.witness_vkeys, vec![witness.to_vkey()]);

    cell.ok(&cell.alice, &["host", "describe"]);
    let v = verify_beyond(&cell, 0, &[]);
    assert_eq!(
        v["witnessed_by"],
        serde_json::json!(["local.nitrile/witness"]),
        "{v}"
    );
    let table = cell.ok(&cell.carol, &["audit", "verify"]);
    assert!(table.contains("local.nitrile/witness"), "{table}");

    // Stopped with the cell; every checkpoint logd published carries a
    // cosignature that verifies with the witness's key.
    cell.stop_up();
    assert!(
        cell::start_time(pid).is_none(),
        "the witness outlived the cell"
    );
    let store = cell.state.join("logd/log");
    let mut notes = vec![store.join("checkpoint")];
    for e in std::fs::read_dir(store.join("checkpoints")).unwrap() {
        notes.push(e.unwrap().path());
    }
    assert!(notes.len() >= 2, "{notes:?}");
    for path in &notes {
        let note = std::fs::read_to_string(path).unwrap();
        verify_cosignature(&note, &witness)
            .unwrap_or_else(|e| panic!("{}: {e}\n{note}", path.display()));
    }

    // A cell made before the witness (logd.toml without witnesses, quorum
    // 0) gains it on its next start.
    let path = cell.state.join("logd/logd.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let old = text
        .split("[[witnesses]]")
        .next()
        .unwrap()
        .replace("witness_quorum = 1", "witness_quorum = 0");
    std::fs::write(&path, &old).unwrap();
    let config = nitrile_logd::LogdConfig::load(&path).unwrap();
    assert!(config.witnesses.is_empty() && config.witness_quorum == 0);
    cell.start_up();
    let config = nitrile_logd::LogdConfig::load(&path).unwrap();
    assert_eq!(config.witness_quorum, 1);
    assert_eq!(config.witnesses.len(), 1);
    assert_eq!(config.witnesses[0].vkey, witness.to_vkey());
    cell.ok(&cell.alice, &["host", "describe"]);
    let size = v["size"].as_u64().unwrap();
    let v = verify_beyond(&cell, size, &[]);
    assert_eq!(
        v["witnessed_by"],
        serde_json::json!(["local.nitrile/witness"]),
        "{v}"
    );
    cell.stop_up();
}

#[test]
fn a_deleted_log_and_cut_journals_fail_audit_verify_and_raise_a_witness_alert() {
    let mut cell = Cell::up();
    for _ in 0..3 {
        cell.ok(&cell.alice, &["host", "describe"]);
    }
    cell.ok(&cell.alice, &["instance", "list"]);
    // The auditor verifies the log and remembers its checkpoint.
    let v = verify_beyond(&cell, 8, &[]);
    let auditor = cell.auditor_state().join("nitrile");
    let kept = remembered(&auditor);
    let size = kept["size"].as_u64().unwrap();
    let root = kept["root"].as_str().unwrap().to_owned();
    assert_eq!(kept["size"], v["size"]);
    assert_eq!(kept["root"], v["root"]);
    cell.stop_up();

    // The thief: the log and logd's journal and sources gone, the host's
    // and the token service's journals cut to a prefix.
    let logd = cell.state.join("logd");
    std::fs::remove_dir_all(logd.join("log")).unwrap();
    std::fs::remove_file(logd.join("journal")).unwrap();
    std::fs::remove_file(logd.join("sources.json")).unwrap();
    cut_journal(&cell, &cell.host_journal(), 2);
    cut_journal(&cell, &cell.tokend_journal(), 2);
    cell.start_up();

    // The witness refuses the new tree: logd raises the alert, on its
    // output as JSON and to the auditor...
    let deadline = Instant::now() + Duration::from_secs(60);
    let alert = loop {
        if let Some(a) = alerts(&cell)
            .into_iter()
            .find(|a| a["kind"] == "witness_quorum")
        {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no witness_quorum alert: {:#?}\n{}",
            alerts(&cell),
            cell.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(alert["alert"], "integrity", "{alert}");
    // The witness's answer: it cosigned a larger tree than this one, or
    // this one does not extend what it cosigned.
    let failures = alert["detail"]["failures"].to_string();
    assert!(
        failures.contains("the witness last cosigned size") || failures.contains("inconsistent"),
        "{alert}"
    );
    let up_log = std::fs::read_to_string(cell.log("up")).unwrap();
    let printed: Vec<serde_json::Value> = up_log
        .lines()
        .filter_map(|l| l.strip_prefix("logd alert: "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        printed.iter().any(|a| a["kind"] == "witness_quorum"),
        "{up_log}"
    );
    // ...and publishes no checkpoint.
    assert!(!logd.join("log/checkpoint").exists());

    // The auditor refuses the log, naming what it remembered.
    let out = cell.nitrile(&cell.carol, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("NOT consistent"), "{err}");
    assert!(err.contains(&format!("size {size}, root {root}")), "{err}");
    assert!(err.contains("no checkpoint"), "{err}");
    assert!(
        err.contains("nitrile audit forget --log local.nitrile/log"),
        "{err}"
    );
    let out = cell.nitrile(&cell.carol, &["audit", "verify", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["ok"], false);
    // So do the other verbs that read a checkpoint.
    for verb in [
        &["audit", "prove", "--record", "0"][..],
        &["audit", "tail"][..],
    ] {
        let out = cell.nitrile(&cell.carol, verb);
        assert_eq!(out.status.code(), Some(1), "{verb:?}");
        assert!(
            stderr(&out).contains("NOT consistent"),
            "{verb:?}: {}",
            stderr(&out)
        );
    }
    // The memory is unchanged.
    assert_eq!(remembered(&auditor), kept);
    cell.stop_up();
}

#[test]
fn forged_logs_signed_with_the_log_key_are_refused_and_forget_starts_over() {
    let mut cell = Cell::up();
    cell.ok(&cell.alice, &["host", "describe"]);
    verify_beyond(&cell, 2, &[]);
    cell.stop_up();
    // The stored log, grown since: a consistent extension, remembered.
    let store = cell.state.join("logd/log");
    let v = verify_ok(&cell, &["--store", store.to_str().unwrap()]);
    assert!(
        ["extended", "same"].contains(&v["remembered"]["step"].as_str().unwrap()),
        "{v}"
    );
    let auditor = cell.auditor_state().join("nitrile");
    let file = remembered_file(&auditor);
    let kept = std::fs::read(&file).unwrap();
    let size = v["size"].as_u64().unwrap();
    assert_eq!(remembered(&auditor)["size"], size);

    let entries = |n: u64, tag: &str| -> Vec<Vec<u8>> { cell::journal_leaves(tag, n) };
    // An auditor whose config names no witness (only the log's key, and
    // the same memory): only the memory tells a forged log.
    let vkey = cell.state.join("logd/log.vkey");
    let no_config = Path::new("/nonexistent/config.toml");
    let verify_store = |dir: &Path, extra: &[&str]| {
        let mut args = vec![
            "audit",
            "verify",
            "--store",
            dir.to_str().unwrap(),
            "--log-key",
            vkey.to_str().unwrap(),
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        cell.nitrile(no_config, &args)
    };
    let refused = |dir: &Path, what: &str| {
        let out = verify_store(dir, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert_eq!(json(&out)["ok"], false, "{what}");
        assert!(err.contains("NOT consistent"), "{what}: {err}");
        assert!(
            err.contains(&format!("(size {size}, root ")),
            "{what}: {err}"
        );
        assert!(err.contains(what), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), kept, "{what}");
    };
    let same = forged_log(&cell, "forged-same", &entries(size, "forged"));
    // It verifies on its own (a fresh memory)...
    let fresh = cell.root().join("fresh");
    let out = verify_store(&same, &["--state-dir", fresh.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // ...but an auditor whose config names the witness sees that no
    // witness cosigned it...
    let out = cell.nitrile(
        &cell.carol,
        &["audit", "verify", "--store", same.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not witnessed"), "{}", stderr(&out));
    // ...and the memory refuses it, and the other forgeries.
    refused(&same, "of the same size has another root");
    let smaller = forged_log(&cell, "forged-smaller", &entries(size - 1, "forged"));
    refused(&smaller, "a smaller tree");
    let larger = forged_log(&cell, "forged-larger", &entries(size + 5, "forged"));
    refused(&larger, "does not extend it");

    // Starting over is a decision: forget, then the next log is a first use.
    let out = cell.nitrile(
        &cell.carol,
        &["audit", "forget", "--log", "local.nitrile/log"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("size {size}")), "{said}");
    assert!(!file.exists());
    let out = verify_store(&same, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["remembered"]["step"], "first");
}

#[test]
fn a_fresh_auditor_accepts_the_log_then_remembers_its_consistent_growth() {
    let mut cell = Cell::up();
    let mine = cell.root().join("my-auditor");
    let flag = ["--state-dir", mine.to_str().unwrap()];
    cell.ok(&cell.alice, &["host", "describe"]);
    let first = verify_beyond(&cell, 0, &flag);
    assert_eq!(first["remembered"]["step"], "first", "{first}");
    let file = remembered_file(&mine);
    let was = remembered(&mine);
    assert_eq!(was["size"], first["size"]);
    assert_eq!(was["root"], first["root"]);
    assert_eq!(was["origin"], ORIGIN);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o077, 0);

    // The log grows; the auditor checks the growth with a consistency
    // proof from what it remembered, and the file advances.
    cell.ok(&cell.alice, &["host", "describe"]);
    let size = first["size"].as_u64().unwrap();
    let grown = verify_beyond(&cell, size, &flag);
    assert_eq!(grown["remembered"]["step"], "extended", "{grown}");
    let now = remembered(&mine);
    assert_eq!(now["size"], grown["size"]);
    assert!(now["size"].as_u64().unwrap() > size);
    assert!(grown["remembered"]["from_size"].as_u64().unwrap() >= size);

    // prove and tail check the checkpoint against the same memory.
    let mut args = vec!["audit", "prove", "--record", "host/h1:1", "-o", "json"];
    args.extend_from_slice(&flag);
    let proved = json(&cell.nitrile(&cell.carol, &args));
    assert_eq!(proved["ok"], true, "{proved}");
    assert!(
        ["same", "extended"].contains(&proved["remembered"]["step"].as_str().unwrap()),
        "{proved}"
    );
    assert_eq!(
        proved["witnessed_by"],
        serde_json::json!(["local.nitrile/witness"])
    );
    let mut args = vec!["audit", "tail", "-n", "1"];
    args.extend_from_slice(&flag);
    cell.ok(&cell.carol, &args);
    let table = {
        let mut args = vec!["audit", "verify"];
        args.extend_from_slice(&flag);
        cell.ok(&cell.carol, &args)
    };
    assert!(table.contains("remembered"), "{table}");
    assert!(table.contains("witnessed by"), "{table}");

    // A dev cell reset, keys and all: a log of the same origin under
    // another key is refused like any rewrite (a thief who deletes the key
    // too gains nothing), until the auditor forgets the origin on purpose.
    cell.stop_up();
    std::fs::remove_dir_all(&cell.state).unwrap();
    cell.start_up();
    cell.ok(&cell.alice, &["host", "describe"]);
    let mut args = vec!["audit", "verify"];
    args.extend_from_slice(&flag);
    let refused = cell.nitrile(&cell.carol, &args);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("another key") && err.contains("audit forget"),
        "{err}"
    );
    assert!(file.exists(), "the old log's memory is kept");
    let mut args = vec!["audit", "forget", "--log", "local.nitrile/log"];
    args.extend_from_slice(&flag);
    cell.ok(&cell.carol, &args);
    let again = verify_beyond(&cell, 0, &flag);
    assert_eq!(again["remembered"]["step"], "first", "{again}");
    cell.stop_up();
}
