//! The README's main command, end to end: `nitrile up` brings a cell up,
//! prints the `export NITRILE_CONFIG=` line, the CLI gets tokens through it
//! (and is refused what alice is not entitled to), the journal verifies, and
//! SIGTERM stops it cleanly; a second start reuses the state.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NITRILE: &str = env!("CARGO_BIN_EXE_nitrile");

struct Up {
    child: Child,
    config: String,
    stdout: Vec<String>,
}

fn start(state: &Path) -> Up {
    let mut child = Command::new(NITRILE)
        .args([
            "up",
            "--tokend-listen",
            "127.0.0.1:0",
            "--tokend-metrics",
            "127.0.0.1:0",
        ])
        .arg("--state")
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stdout = Vec::new();
    let config = loop {
        assert!(Instant::now() < deadline, "no export line; got {stdout:?}");
        let line = lines.next().expect("nitrile up exited early").unwrap();
        if let Some(path) = line.strip_prefix("export NITRILE_CONFIG=") {
            break path.to_owned();
        }
        stdout.push(line);
    };
    Up {
        child,
        config,
        stdout,
    }
}

fn nitrile(config: &str, args: &[&str]) -> std::process::Output {
    Command::new(NITRILE)
        .env("NITRILE_CONFIG", config)
        .args(args)
        .output()
        .unwrap()
}

fn stop(mut up: Up) {
    // SIGTERM, then wait for a clean exit.
    let pid = up.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = up.child.wait().unwrap();
    assert!(
        status.success(),
        "nitrile up did not stop cleanly: {status}"
    );
}

#[test]
fn nitrile_up_serves_tokens_and_journals_them() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let up = start(&state);
    assert!(Path::new(&up.config).is_absolute());
    assert!(
        up.stdout.iter().any(|l| l.contains("(created)")),
        "{:?}",
        up.stdout
    );

    let out = nitrile(
        &up.config,
        &[
            "token",
            "request",
            "--op",
            "host.describe",
            "--resource",
            "host/h1",
            "--audience",
            "h1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    assert!(token.trim().starts_with("v4.public."), "{token}");

    // The token decodes and verifies against the published issuer keys.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token.trim()).unwrap();
    let keys = state.join("tokend/issuer-keys.toml");
    let out = nitrile(
        &up.config,
        &[
            "token",
            "inspect",
            token_file.to_str().unwrap(),
            "--issuer-keys",
            keys.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspected = String::from_utf8(out.stdout).unwrap();
    assert!(inspected.contains("\"verified\""), "{inspected}");

    // Not entitled: exit 1, the step named, the audit record named.
    let out = nitrile(
        &up.config,
        &[
            "token",
            "request",
            "--op",
            "instance.launch",
            "--resource",
            "host/h1",
            "--audience",
            "h1",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("entitlement") && err.contains("audit record"),
        "{err}"
    );

    // Usage errors exit 2.
    let out = nitrile(
        &up.config,
        &[
            "token",
            "request",
            "--op",
            "host.shell",
            "--resource",
            "host/h1",
            "--audience",
            "h1",
        ],
    );
    assert_eq!(out.status.code(), Some(2));

    // Both requests are in the journal, whose chain verifies.
    let journal = state.join("tokend/journal");
    let out = nitrile(
        &up.config,
        &[
            "audit",
            "verify-journal",
            journal.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["records"], 2, "{report}");

    stop(up);

    // Again: the state is reused, the same journal grows.
    let up = start(&state);
    assert!(
        up.stdout.iter().any(|l| l.contains("(reused)")),
        "{:?}",
        up.stdout
    );
    let out = nitrile(
        &up.config,
        &[
            "token",
            "request",
            "--op",
            "host.describe",
            "--resource",
            "host/h2",
            "--audience",
            "h2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop(up);
    let out = nitrile(
        "/nonexistent",
        &[
            "audit",
            "verify-journal",
            journal.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["records"], 3, "{report}");
}

#[test]
fn client_verbs_without_a_config_say_what_to_do() {
    let out = nitrile(
        "/nonexistent/config.toml",
        &[
            "token",
            "request",
            "--op",
            "host.describe",
            "--resource",
            "host/h1",
            "--audience",
            "h1",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nitrile up") && err.contains("NITRILE_CONFIG"),
        "{err}"
    );
}
