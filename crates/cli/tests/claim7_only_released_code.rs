//! Claim 7: code reaches a host only as a signed release from the
//! repository it pinned. No admin operation carries a binary, a script or a
//! configuration file to a host (every request schema of the admin API, as
//! `crates/api/openapi.json` states it, is read: no field names code, a file
//! or a location, and none holds bytes); no flag of `nitrile hostd` names
//! code; no key of a release-pinned host's config does (the agent refuses
//! to start); the agent answers no signal but SIGTERM and SIGINT, both to
//! stop (its sources are read).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Words that, as a part of a field name, would say that it carries code,
/// a file or where to fetch one from.
const CODE_WORDS: &[&str] = &[
    "binary", "bin", "script", "code", "exec", "command", "cmd", "plugin", "module", "upload",
    "file", "path", "url", "uri", "program", "shell", "config", "payload", "library", "elf",
    "source", "blob", "content", "data",
];

/// Every property name of `schema`, following `$ref`s into `schemas`.
fn properties(
    schema: &Value,
    schemas: &serde_json::Map<String, Value>,
    seen: &mut BTreeSet<String>,
    out: &mut Vec<(String, Value)>,
) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/").to_owned();
        if seen.insert(name.clone()) {
            properties(&schemas[&name], schemas, seen, out);
        }
        return;
    }
    match schema {
        Value::Object(map) => {
            if let Some(Value::Object(props)) = map.get("properties") {
                for (k, v) in props {
                    out.push((k.clone(), v.clone()));
                    properties(v, schemas, seen, out);
                }
            }
            for (k, v) in map {
                if k != "properties" {
                    properties(v, schemas, seen, out);
                }
            }
        }
        Value::Array(items) => {
            for v in items {
                properties(v, schemas, seen, out);
            }
        }
        _ => {}
    }
}

#[test]
fn no_admin_request_carries_code_a_file_or_where_to_get_one() {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("crates/api/openapi.json")).unwrap(),
    )
    .unwrap();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let mut fields = Vec::new();
    let mut operations = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            operations.insert(format!("{method} {path}"));
            if let Some(body) = op.get("requestBody") {
                properties(body, schemas, &mut BTreeSet::new(), &mut fields);
            }
        }
    }
    let names: BTreeSet<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    // Not vacuous: the launch, the volume and the update bodies were read.
    for known in ["instance", "image", "volume", "version", "peers"] {
        assert!(names.contains(known), "{known} not among {names:?}");
    }
    assert!(
        operations.contains("post /v1/host/update"),
        "{operations:?}"
    );
    for (name, schema) in &fields {
        let words: Vec<&str> = name.split('_').collect();
        // user_data is the customer's, given to its own guest by the
        // metadata service; the host never runs it.
        if name == "user_data" {
            continue;
        }
        assert!(
            !words.iter().any(|w| CODE_WORDS.contains(w)),
            "request field {name:?} may carry code or a file to the host"
        );
        let text = schema.to_string();
        assert!(
            !text.contains("contentEncoding")
                && !text.contains("\"format\":\"binary\"")
                && !text.contains("\"format\":\"byte\""),
            "request field {name:?} holds bytes: {text}"
        );
    }
}

#[test]
fn no_flag_of_the_host_agent_names_code() {
    let out = Command::new(env!("CARGO_BIN_EXE_nitrile"))
        .args(["hostd", "--help"])
        .env_remove("NITRILE_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let flags: BTreeSet<String> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches([',', '.']).to_owned())
        .collect();
    let known: BTreeSet<String> = [
        "--config",
        "--stop-instances-on-exit",
        "--exit-with-parent",
        "--log-format",
        // Two descriptor numbers a host agent handing over passes to the
        // staged release it started (its listening socket and a control
        // socket), never a path; see `a_takeover_flag_takes_only_inherited_sockets`.
        "--takeover",
        // A switch: serve the enrollment exchange while the TPM key the
        // config names does not exist; names nothing.
        "--await-enrollment",
        "--output",
        "--help",
        "--version",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    // A new flag is reviewed here before it exists.
    assert!(
        flags.is_subset(&known),
        "new flags of nitrile hostd: {:?}",
        flags.difference(&known).collect::<Vec<_>>()
    );
    assert!(flags.contains("--config"), "{help}");
}

#[test]
fn a_takeover_flag_takes_only_inherited_sockets() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("hostd.toml");
    std::fs::write(&config, "").unwrap();
    for (arg, expect) in [
        ("3,4", "not open"),
        ("1,4", "not a descriptor number above 2"),
        ("/usr/bin/env", "expected LISTENER_FD,CONTROL_FD"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_nitrile"))
            .args(["hostd", "--takeover", arg, "--config"])
            .arg(&config)
            .env_remove("NITRILE_CONFIG")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{arg}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{arg}: {err}");
    }
}

#[test]
fn a_release_pinned_host_takes_no_binary_from_its_config() {
    let tmp = tempfile::tempdir().unwrap();
    for key in ["qemu", "vsock_daemon", "vmm"] {
        let config = tmp.path().join(format!("hostd-{key}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"cell = "local"
host = "h1"
listen = "127.0.0.1:0"
state = "state"
ca = "ca.pem"
cert = "h1.pem"
key = "h1.key"
issuer_keys = "issuer-keys.toml"
images = "images"

[hypervisor]
backend = "qemu"
{key} = "/tmp/something-to-run"

[release]
environment = "prod"
repository = "repo"
root = "root.json"
ci_key = "ci.pub.json"
"#
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_nitrile"))
            .args(["hostd", "--config"])
            .arg(&config)
            .env_remove("NITRILE_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{key}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("[hypervisor] {key} names a binary to run")),
            "{key}: {err}"
        );
    }
}

#[test]
fn the_host_agent_answers_only_the_signals_that_stop_it() {
    let mut sources = Vec::new();
    let mut stack = vec![root().join("crates/hostd/src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                sources.push(p);
            }
        }
    }
    sources.push(root().join("crates/cli/src/cmd/hostd.rs"));
    assert!(sources.len() > 5, "{sources:?}");
    for path in &sources {
        let text = std::fs::read_to_string(path).unwrap();
        for forbidden in [
            "SignalKind::",
            "signal_hook",
            "SIGHUP",
            "SIGUSR1",
            "SIGUSR2",
            "sigaction",
        ] {
            assert!(
                !text.contains(forbidden),
                "{} handles a signal ({forbidden})",
                path.display()
            );
        }
    }
    // The one handler the agent uses: SIGTERM and SIGINT, both to stop.
    let shared = std::fs::read_to_string(root().join("crates/net/src/signal.rs")).unwrap();
    let kinds: BTreeSet<&str> = shared
        .match_indices("SignalKind::")
        .map(|(i, _)| {
            let rest = &shared[i + "SignalKind::".len()..];
            &rest[..rest.find('(').unwrap_or(rest.len())]
        })
        .collect();
    assert_eq!(kinds, BTreeSet::from(["interrupt", "terminate"]));
}
