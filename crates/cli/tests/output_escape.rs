//! What reaches the auditor's terminal, through the real binary: strings an
//! attacker chooses (a journal record's reason and detail keys, a file
//! name, a journal source an operator forges in an ingest request, an
//! unknown field name, an argument clap echoes) are shown escaped by every
//! verb that prints them, tables, JSON and error messages alike, and by the
//! services' log lines; a reader that closes its pipe early ends the verb
//! quietly with status 141, never a panic.

mod cell;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cell::Cell;
use nitrile_api::wire::RefusalStep;
use nitrile_api::{Operation, PrincipalId};
use nitrile_audit::{AuditRecord, JournalOptions, RequestId};
use nitrile_tlog::{FileStorage, Log, NoteSigner};

/// An OSC window title with a bell, a screen clear, a right-to-left
/// override: enough to rewrite what the auditor sees.
const EVIL: &str = "\x1b]0;pwned\x07\x1b[2J\u{202e}";
/// [`EVIL`] as the output layer shows it.
const EVIL_SHOWN: &str = "\\x1b]0;pwned\\x07\\x1b[2J\\u{202e}";

/// The characters that must never reach a terminal from outside: C0
/// controls but the newline (and the tab of no line of ours), DEL, C1
/// controls, bidi controls and the other invisible formatting characters.
fn is_raw_control(c: char) -> bool {
    (c.is_control() && c != '\n')
        || matches!(
            c,
            '\u{61c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206f}'
                | '\u{feff}'
        )
}

/// Panics, naming the first one, if `text` holds a raw control character.
fn assert_no_raw_control(what: &str, text: &str) {
    if let Some((at, c)) = text.char_indices().find(|&(_, c)| is_raw_control(c)) {
        panic!(
            "{what}: raw control character {:?} at byte {at} reaches the terminal: {:?}",
            c,
            &text[at.saturating_sub(60)..(at + 60).min(text.len())]
        );
    }
}

/// Both streams of a run, checked for raw controls; stdout returned.
fn shown(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    assert_no_raw_control(&format!("{what} (stdout)"), &stdout);
    assert_no_raw_control(&format!("{what} (stderr)"), &stderr);
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    stdout
}

fn nitrile(args: &[&str], file: Option<&Path>) -> Output {
    let mut cmd = Command::new(cell::NITRILE);
    cmd.args(args).stdin(Stdio::null());
    if let Some(f) = file {
        cmd.arg(f);
    }
    cmd.output().unwrap()
}

fn host_h1() -> PrincipalId {
    PrincipalId::parse("nitrile://local/host/h1").unwrap()
}

/// A journal of host h1 whose file name, refusal reasons and detail keys
/// and values carry [`EVIL`], and `extra` ordinary records after them.
fn evil_journal(dir: &Path, extra: usize) -> PathBuf {
    let path = dir.join(format!("journal-{EVIL}"));
    let journal = JournalOptions::new()
        .danger_no_sync(true)
        .open(&path, "nitrile://local/host/h1")
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let mut rng = rand_core::OsRng;
    let refusal = AuditRecord::refusal(
        now,
        host_h1(),
        RequestId::random(&mut rng),
        RefusalStep::Request,
        &format!("unknown field `{EVIL}`"),
    )
    .with_detail(serde_json::json!({ EVIL: EVIL, "path": format!("/v1/{EVIL}") }));
    journal.append(&refusal.encode().unwrap()).unwrap();
    for i in 0..extra {
        let r = AuditRecord::request(now, host_h1(), RequestId::random(&mut rng))
            .with_operations([Operation::HostDescribe])
            .with_detail(serde_json::json!({ "n": i }));
        journal.append(&r.encode().unwrap()).unwrap();
    }
    drop(journal);
    path
}

#[test]
fn journal_records_and_file_names_reach_the_terminal_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let path = evil_journal(dir.path(), 2);

    // The table: the reason column shows the escaped form.
    let out = nitrile(&["audit", "show-journal"], Some(&path));
    assert!(out.status.success(), "{out:?}");
    let table = shown("show-journal", &out);
    assert!(
        table.contains(&format!("unknown field `{EVIL_SHOWN}`")),
        "{table}"
    );
    assert_eq!(table.lines().count(), 4, "{table}");

    // JSON lines: still JSON, and a script reads exactly what was written.
    let out = nitrile(&["audit", "show-journal", "-o", "json"], Some(&path));
    assert!(out.status.success(), "{out:?}");
    let json = shown("show-journal -o json", &out);
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    let record = &first["record"];
    assert_eq!(
        record["reason"],
        format!("unknown field `{EVIL}`"),
        "{first}"
    );
    assert_eq!(record["detail"][EVIL], EVIL, "{first}");

    // verify-journal names the file: escaped, in the table and in JSON.
    let out = nitrile(&["audit", "verify-journal"], Some(&path));
    assert!(out.status.success(), "{out:?}");
    let report = shown("verify-journal", &out);
    assert!(
        report.contains(&format!("journal-{EVIL_SHOWN}")),
        "{report}"
    );
    assert!(report.contains("verified:  ok"), "{report}");
    let out = nitrile(&["audit", "verify-journal", "-o", "json"], Some(&path));
    let json: serde_json::Value =
        serde_json::from_str(&shown("verify-journal -o json", &out)).unwrap();
    assert_eq!(json["file"], path.to_str().unwrap(), "{json}");

    // A damaged journal: the error message names the file, escaped.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 5;
    bytes[last] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let out = nitrile(&["audit", "verify-journal"], Some(&path));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    shown("verify-journal of a damaged journal", &out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: journal ") && err.contains(&format!("journal-{EVIL_SHOWN}")),
        "{err}"
    );
}

#[test]
fn arguments_echoed_in_a_usage_error_are_escaped() {
    let arg = format!("--{EVIL}");
    let out = nitrile(&["audit", "show-journal", &arg], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    shown("usage error", &out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("--{EVIL_SHOWN}")), "{err}");
    // Help is ours, and still printed whole.
    let out = nitrile(&["audit", "--help"], None);
    assert!(out.status.success(), "{out:?}");
    assert!(shown("help", &out).contains("verify-journal"));
}

/// Runs `nitrile args`, reads one line of its stdout, then closes the pipe
/// while it still has much to write. Returns the line, the status and
/// stderr.
fn read_one_line_then_close(config: Option<&Path>, args: &[&str]) -> (String, Option<i32>, String) {
    let mut cmd = Command::new(cell::NITRILE);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    drop(stdout);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    (line, status.code(), stderr)
}

/// A pipe whose reading end is already closed.
fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer
}

#[test]
fn a_closed_pipe_ends_a_verb_quietly_with_status_141() {
    let dir = tempfile::tempdir().unwrap();
    // Far more than a pipe holds (64 KiB): the verb must hit the closed end.
    let path = evil_journal(dir.path(), 3000);
    let file = path.to_str().unwrap();

    // `nitrile audit show-journal FILE | head -n 1`, table and JSON.
    for args in [
        vec!["audit", "show-journal", file],
        vec!["audit", "show-journal", "-o", "json", file],
    ] {
        let (line, status, stderr) = read_one_line_then_close(None, &args);
        assert!(!line.is_empty(), "{args:?}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
        assert_eq!(status, Some(141), "{args:?}: {stderr}");
    }

    // A reader gone before the first byte.
    let out = Command::new(cell::NITRILE)
        .args(["audit", "verify-journal", file])
        .stdin(Stdio::null())
        .stdout(closed_pipe())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr, "");
    assert_eq!(out.status.code(), Some(141), "{stderr}");

    // `nitrile audit verify --store <log dir> | head -n 1`, the reader
    // gone before the first byte.
    let store = dir.path().join("log");
    std::fs::create_dir_all(&store).unwrap();
    let signer = NoteSigner::generate("local.nitrile/log").unwrap();
    let vkey = dir.path().join("log.vkey");
    std::fs::write(&vkey, signer.verifier().to_vkey()).unwrap();
    let mut log = Log::open(
        FileStorage::open(&store).unwrap(),
        "local.nitrile/log",
        signer,
    )
    .unwrap();
    let batch = cell::journal_leaves("r", 300);
    log.append(&batch).unwrap();
    let note = log.prepare_checkpoint(1_000).unwrap();
    log.publish(&note).unwrap();
    drop(log);
    let verify = |stdout: Stdio| {
        Command::new(cell::NITRILE)
            .args(["audit", "verify", "--store"])
            .arg(&store)
            .arg("--log-key")
            .arg(&vkey)
            .env("NITRILE_CONFIG", dir.path().join("no-client-config.toml"))
            .env("HOME", dir.path())
            .env_remove("XDG_CONFIG_HOME")
            .stdin(Stdio::null())
            .stdout(stdout)
            .output()
            .unwrap()
    };
    let out = verify(Stdio::piped());
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("OK: "),
        "{out:?}"
    );
    let out = verify(closed_pipe().into());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr, "");
    assert_eq!(out.status.code(), Some(141), "{stderr}");

    // Standard error closed while the verb fails: its status still tells.
    let out = Command::new(cell::NITRILE)
        .args(["audit", "verify-journal"])
        .arg(dir.path().join("no-such-journal"))
        .stdin(Stdio::null())
        .stderr(closed_pipe())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = Command::new(cell::NITRILE)
        .args(["audit", "show-journal", "--no-such-flag"])
        .stdin(Stdio::null())
        .stderr(closed_pipe())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// POSTs `body` to logd's ingest endpoint (at the address `config` names)
/// as the principal `kind-name` whose certificate is in the cell's `pki/`
/// (any principal may try); returns the HTTP status.
fn post_ingest(config: &Path, state: &Path, kind_name: &str, body: Vec<u8>) -> u16 {
    let config = nitrile_cell::ClientConfig::load(config).unwrap();
    let roots = nitrile_pki::tls::CaRoots::load(&config.ca).unwrap();
    let pki = state.join("pki");
    let me = nitrile_pki::tls::TlsIdentity::load(
        &pki.join(format!("{kind_name}.pem")),
        &pki.join(format!("{kind_name}.key")),
    )
    .unwrap();
    let tls = nitrile_pki::tls::client_config(&roots, &me).unwrap();
    let logd = PrincipalId::parse(&format!("nitrile://{}/service/logd", config.cell)).unwrap();
    let addr = config.endpoints.logd.clone().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut client = nitrile_net::Client::connect(&addr, &logd, Arc::clone(&tls))
            .await
            .unwrap();
        let req = http::Request::builder()
            .method(http::Method::POST)
            .uri("/v1/ingest")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Bytes::from(body))
            .unwrap();
        client.send(req).await.unwrap().status.as_u16()
    })
}

/// Every string of a JSON value, keys included.
fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                out.push(k.clone());
                strings(x, out);
            }
        }
        _ => {}
    }
}

#[test]
fn strings_an_operator_forges_reach_the_auditor_escaped() {
    let mut cell = Cell::up();
    let forged_source = format!("nitrile://local/host/h1{EVIL}");

    // The cell's host ships a journal under a source name of its choosing
    // (refused, and an integrity alert naming what it claimed), and a batch
    // with an unknown field name (refused, the serde error naming the field
    // journaled as the reason). An operator is refused before its body is
    // read at all.
    let batch = serde_json::json!({
        "journal": {
            "source": forged_source,
            "journal_id": "00".repeat(16),
            "genesis": "00".repeat(32),
        },
        "entries": [],
    });
    let body = serde_json::to_vec(&batch).unwrap();
    assert_eq!(
        post_ingest(&cell.alice, &cell.state, "operator-alice", body.clone()),
        403
    );
    assert_eq!(post_ingest(&cell.alice, &cell.state, "host-h1", body), 403);
    let unknown = serde_json::to_vec(&serde_json::json!({ EVIL: 1 })).unwrap();
    assert_eq!(
        post_ingest(&cell.alice, &cell.state, "host-h1", unknown),
        400
    );

    // `audit alerts`, JSON then table, once the alert is there.
    let deadline = Instant::now() + Duration::from_secs(60);
    let alerts = loop {
        let out = cell.nitrile(&cell.carol, &["audit", "alerts", "-o", "json"]);
        assert!(out.status.success(), "{out:?}");
        let json = shown("audit alerts -o json", &out);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        if json.contains("wrong_source") {
            break value;
        }
        assert!(Instant::now() < deadline, "no wrong_source alert: {json}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut sent = Vec::new();
    strings(&alerts, &mut sent);
    let out = cell.nitrile(&cell.carol, &["audit", "alerts"]);
    assert!(out.status.success(), "{out:?}");
    let table = shown("audit alerts", &out);
    assert!(table.contains("wrong_source"), "{table}");
    // logd keeps the forged name only as the alert's detail (the source it
    // names is the authenticated caller); it reached the auditor's screen
    // in the JSON above, escaped (`shown` refuses a raw control byte).
    assert!(sent.iter().any(|s| s.contains("pwned")), "{alerts}");
    assert!(!table.contains("pwned"), "{table}");

    // The refusals are in logd's journal and, shipped, in the log.
    let journal = cell.state.join("logd/journal");
    let out = nitrile(&["audit", "show-journal"], Some(&journal));
    assert!(out.status.success(), "{out:?}");
    let table = shown("show-journal of logd's journal", &out);
    assert!(table.contains("pwned"), "{table}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cell.nitrile(&cell.carol, &["audit", "tail", "-o", "json"]);
        assert!(out.status.success(), "{out:?}");
        let json = shown("audit tail -o json", &out);
        if json.contains("pwned") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refusals never reached the log"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = cell.nitrile(&cell.carol, &["audit", "tail"]);
    assert!(out.status.success(), "{out:?}");
    shown("audit tail", &out);

    // What the services logged meanwhile (logd's alert lines among them).
    cell.stop_up();
    assert_no_raw_control("the services' log lines", &cell.logs());

    // `nitrile logd` on its own prints its alerts as JSON lines on stdout:
    // JSON-safe too.
    let logd_addr = format!("127.0.0.1:{}", cell::free_port());
    let logd_config = cell.state.join("logd/logd.toml");
    cell::set_line(&logd_config, "listen", &logd_addr);
    cell::set_line(&cell.alice, "logd", &logd_addr);
    let mut logd = Command::new(cell::NITRILE)
        .arg("logd")
        .arg("--config")
        .arg(&logd_config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = |stream: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    };
    let stdout = lines(Box::new(logd.stdout.take().unwrap()));
    let stderr = lines(Box::new(logd.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = stderr
            .recv_timeout(left)
            .expect("nitrile logd never served");
        assert_no_raw_control("nitrile logd's log lines", &line);
        if line.starts_with("nitrile logd: serving on ") {
            break;
        }
    }
    assert_eq!(
        post_ingest(
            &cell.alice,
            &cell.state,
            "host-h1",
            serde_json::to_vec(&batch).unwrap()
        ),
        403
    );
    let alert = stdout
        .recv_timeout(Duration::from_secs(60))
        .expect("nitrile logd printed no alert");
    assert_no_raw_control("nitrile logd's alert line", &alert);
    let alert: serde_json::Value = serde_json::from_str(&alert).unwrap();
    assert_eq!(alert["kind"], "wrong_source", "{alert}");
    cell::signal(logd.id(), nix::sys::signal::Signal::SIGTERM);
    assert!(logd.wait().unwrap().success());
    while let Ok(line) = stderr.try_recv() {
        assert_no_raw_control("nitrile logd's log lines", &line);
    }
}
