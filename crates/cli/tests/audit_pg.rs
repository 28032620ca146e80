//! `nitrile audit verify --postgres`: the whole-log audit over a log kept in
//! PostgreSQL (a private server started for the test) passes, fails naming
//! the row altered with SQL, and a connection string holding a password is
//! refused without being echoed. The auditor's memory works over it too: a
//! growth is checked with a consistency proof computed from the rows, and
//! another tree of the remembered size signed with the same key is refused.

// The shared server helper prints for the person running the test; the rule
// that everything goes through the output layer is for the binary.
#[allow(clippy::disallowed_macros)]
#[path = "../../tlog/tests/support/pg_server.rs"]
mod pg_server;

mod cell;

use std::process::{Command, Output};

use nitrile_tlog::{Log, NoteSigner};
use pg_server::Server;

const ORIGIN: &str = "local.nitrile/log";

fn nitrile(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nitrile"))
        .args(args)
        .env("NITRILE_CONFIG", dir.join("no-client-config.toml"))
        .env("HOME", dir)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_STATE_HOME")
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn audit_verify_over_postgres_passes_then_names_the_altered_row() {
    let Some(server) = Server::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let signer = NoteSigner::generate(ORIGIN).unwrap();
    let forger = NoteSigner::from_skey(&signer.to_skey()).unwrap();
    let vkey = dir.path().join("log.vkey");
    std::fs::write(&vkey, signer.verifier().to_vkey()).unwrap();
    let mut log = Log::open(server.storage("cell-a"), ORIGIN, signer).unwrap();
    for (from, to, now) in [(0u64, 300u64, 1_000u64), (300, 420, 2_000)] {
        let batch = cell::journal_leaves("r", to)[from as usize..].to_vec();
        log.append(&batch).unwrap();
        let note = log.prepare_checkpoint(now).unwrap();
        log.publish(&note).unwrap();
    }

    let conninfo = server.conninfo();
    let verify = |extra: &str| {
        nitrile(
            dir.path(),
            &[
                "audit",
                "verify",
                "--postgres",
                &format!("{conninfo}{extra}"),
                "--log-name",
                "cell-a",
                "--log-key",
                vkey.to_str().unwrap(),
                "-o",
                "json",
            ],
        )
    };
    let out = verify("");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["ok"], true);
    assert_eq!(v["size"], 420);
    assert_eq!(v["checkpoints"], 2);
    assert!(v["source"].as_str().unwrap().contains("cell-a"), "{v}");
    assert_eq!(v["remembered"]["step"], "first", "{v}");

    // The log grows: the growth is checked with a consistency proof from
    // the remembered size, computed from the rows, and remembered.
    let batch = cell::journal_leaves("r", 500)[420..].to_vec();
    log.append(&batch).unwrap();
    let note = log.prepare_checkpoint(3_000).unwrap();
    log.publish(&note).unwrap();
    drop(log);
    let v = json(&verify(""));
    assert_eq!(v["size"], 500, "{v}");
    assert_eq!(v["remembered"]["step"], "extended", "{v}");
    assert_eq!(v["remembered"]["from_size"], 420, "{v}");

    // Another tree of the same size, signed with the same key, in another
    // log of the table: it verifies on its own, but not after this one.
    let mut forged = Log::open(server.storage("cell-c"), ORIGIN, forger).unwrap();
    let batch = cell::journal_leaves("forged", 500);
    forged.append(&batch).unwrap();
    let note = forged.prepare_checkpoint(4_000).unwrap();
    forged.publish(&note).unwrap();
    drop(forged);
    let out = nitrile(
        dir.path(),
        &[
            "audit",
            "verify",
            "--postgres",
            &conninfo,
            "--log-name",
            "cell-c",
            "--log-key",
            vkey.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NOT consistent"), "{stderr}");
    assert!(stderr.contains("(size 500, root "), "{stderr}");

    // One byte of an entry bundle flipped in the database.
    let path = "tile/entries/000";
    let flipped = server
        .client()
        .execute(
            "UPDATE tlog_objects SET bytes = set_byte(bytes, 9, get_byte(bytes, 9) # 1) \
             WHERE log = 'cell-a' AND path = $1",
            &[&path],
        )
        .unwrap();
    assert_eq!(flipped, 1);
    let out = verify("");
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["ok"], false);
    assert_eq!(v["path"], path, "{v}");

    // Another log in the same table is not this one.
    let out = nitrile(
        dir.path(),
        &[
            "audit",
            "verify",
            "--postgres",
            &conninfo,
            "--log-name",
            "cell-b",
            "--log-key",
            vkey.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("there is no log `cell-b`"), "{stderr}");

    // A password is not taken from the command line, nor shown.
    let out = verify(" password=hunter2");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("password"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
