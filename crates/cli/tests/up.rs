//! The README's main command, end to end: `nitrile up` brings a cell up,
//! prints the `export NITRILE_CONFIG=` line, the CLI gets tokens through it
//! (and is refused what alice is not entitled to), the journal verifies, the
//! host agent it runs answers the host and instance verbs, and SIGTERM stops
//! it cleanly; a second start reuses the state. With QEMU and the guest image
//! present, the placement service launches, describes and terminates a real
//! instance through it.

// The test prints for the person running it; the rule that everything goes
// through the output layer is for the binary.
#![allow(clippy::disallowed_macros)]

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

/// A test that fails part-way still stops its cell: SIGTERM (the cell stops
/// its host agent and instances), then SIGKILL if it has not ended in time.
impl Drop for Up {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(state: &Path) -> Up {
    // Its stderr (and the host agent's, forwarded) is kept beside the state
    // to explain a failure.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.with_extension("stderr.log"))
        .unwrap();
    let mut child = Command::new(NITRILE)
        .args([
            "up",
            "--tokend-listen",
            "127.0.0.1:0",
            "--tokend-metrics",
            "127.0.0.1:0",
            "--hostd-listen",
            "127.0.0.1:0",
            "--logd-listen",
            "127.0.0.1:0",
            "--logd-metrics",
            "127.0.0.1:0",
            "--witness-listen",
            "127.0.0.1:0",
            "--kms-listen",
            "127.0.0.1:0",
            "--placed-listen",
            "127.0.0.1:0",
            "--deployd-listen",
            "127.0.0.1:0",
        ])
        .arg("--state")
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stdout = Vec::new();
    let config = loop {
        assert!(Instant::now() < deadline, "no export line; got {stdout:?}");
        let Some(line) = lines.next() else {
            panic!(
                "nitrile up exited early; stdout {stdout:?}; stderr:\n{}",
                std::fs::read_to_string(state.with_extension("stderr.log")).unwrap_or_default()
            );
        };
        let line = line.unwrap();
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
    assert!(
        up.stdout
            .iter()
            .any(|l| l.contains("entitlements") && l.contains("serial 1")),
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

    // Both requests are in the journal, after the record of the entitlement
    // bundle in force at start, and its chain verifies.
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
    assert_eq!(not_placements(&journal), 3);

    stop(up);

    // Again: the state is reused, the same journal grows (a start record
    // and the request).
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
    assert!(out.status.success());
    assert_eq!(not_placements(&journal), 5);
}

/// The records of a token service journal but the placement service's
/// (which asks for tokens of its own whenever it refreshes the hosts'
/// networks, at times of its choosing) and the TLS-level refusals without a
/// caller that a connection cut by the cell's stop can leave (placement
/// connecting while the token service stops). Prints the records when it
/// counts, so that a wrong count shows them.
fn not_placements(journal: &Path) -> usize {
    let out = nitrile(
        "/nonexistent",
        &[
            "audit",
            "show-journal",
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
    let records: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| {
            let record = &r["record"];
            record["principal"].as_str() != Some("nitrile://local/service/placement")
                && !(record["step"] == "tls" && record["principal"].is_null())
        })
        .collect();
    for r in &records {
        eprintln!("counted: {}", r["record"]);
    }
    records.len()
}

/// Turns the state of a cell made by `nitrile up` into that of a cell made
/// before bundles had serials: no bundle.toml, the monitor rules in
/// `<state>/rules` named by `rules = ` in logd.toml, the bundle signed by
/// both local reviewers as it was, no serial records.
fn make_cell_from_before_serials(state: &Path) {
    let bundle = state.join("entitlements");
    std::fs::remove_file(bundle.join("bundle.toml")).unwrap();
    std::fs::rename(bundle.join("rules"), state.join("rules")).unwrap();
    std::fs::remove_dir_all(bundle.join("signatures")).unwrap();
    for dir in ["tokend", "logd"] {
        std::fs::remove_file(state.join(dir).join("bundle-serial.json")).unwrap();
    }
    let reviewers = nitrile_policy::ReviewerSet::load(&state.join("reviewers.toml")).unwrap();
    let Err(nitrile_policy::PolicyError::NotEnoughReviewers { digest, .. }) =
        nitrile_policy::verify_unserialed_bundle(&bundle, &reviewers)
    else {
        panic!("an unsigned bundle verified")
    };
    std::fs::create_dir(bundle.join("signatures")).unwrap();
    for name in ["reviewer-1", "reviewer-2"] {
        let key = nitrile_policy::ReviewerKey::load(
            &state.join("reviewers").join(format!("{name}.key")),
            nitrile_api::Name::new(name).unwrap(),
        )
        .unwrap();
        std::fs::write(
            bundle.join(format!("signatures/{name}.sig")),
            key.signature_file(&digest),
        )
        .unwrap();
    }
    let logd_toml = state.join("logd/logd.toml");
    let text = std::fs::read_to_string(&logd_toml).unwrap();
    let start = text.find("[monitor]").unwrap();
    let end = text[start + 1..]
        .find("\n[")
        .map_or(text.len(), |i| start + 1 + i + 1);
    let old = format!("rules = \"../rules\"\n{}{}", &text[..start], &text[end..]);
    std::fs::write(&logd_toml, old).unwrap();
}

#[test]
fn nitrile_up_migrates_a_cell_made_before_bundle_serials() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    stop(start(&state));
    make_cell_from_before_serials(&state);
    // An edit of a rule made on the old cell is kept: it was in force.
    let rule = state.join("rules/many-hosts.yml");
    let text = std::fs::read_to_string(&rule).unwrap();
    std::fs::write(&rule, format!("{text}# tuned on this cell\n")).unwrap();

    let up = start(&state);
    assert!(
        up.stdout
            .iter()
            .any(|l| l.contains("entitlements") && l.contains("serial 1")),
        "{:?}",
        up.stdout
    );
    stop(up);
    let bundle = state.join("entitlements");
    assert!(bundle.join("bundle.toml").exists());
    assert!(
        std::fs::read_to_string(bundle.join("rules/many-hosts.yml"))
            .unwrap()
            .contains("# tuned on this cell")
    );
    assert!(!state.join("rules").exists());
    let logd_toml = std::fs::read_to_string(state.join("logd/logd.toml")).unwrap();
    assert!(logd_toml.contains("[monitor]"), "{logd_toml}");
    assert!(!logd_toml.contains("rules ="), "{logd_toml}");
    let stderr = std::fs::read_to_string(state.with_extension("stderr.log")).unwrap();
    assert!(stderr.contains("now has a serial"), "{stderr}");
    // And it starts again as it is.
    stop(start(&state));
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

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The client config of the placement service next to alice's.
fn placement_config(alice: &str) -> String {
    Path::new(alice)
        .with_file_name("service-placement.toml")
        .to_str()
        .unwrap()
        .to_owned()
}

#[test]
fn nitrile_up_runs_a_host_that_the_cli_calls() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let up = start(&state);
    let said = up.stdout.join("\n");
    for expected in [
        "hostd h1",
        "host journal",
        "metrics.prom",
        "  nitrile host describe",
        "  nitrile instance launch web1 --image ",
        "  nitrile audit tail --config ",
        "  nitrile deploy start VERSION --wait",
        "deployd ",
        "releases       environment dev",
        "logd ",
    ] {
        assert!(said.contains(expected), "{expected:?} not in {said}");
    }
    assert!(state.join("hosts/h1/hostd.toml").exists());
    assert!(state.join("hosts/h1/issuer-keys.toml").exists());
    assert!(state.join("pki/host-h1.pem").exists());
    // The dev release repository, and the host's pins of it.
    assert!(state.join("release/repo/metadata/root.json").exists());
    assert!(state.join("hosts/h1/release-root.json").exists());
    let hostd = std::fs::read_to_string(state.join("hosts/h1/hostd.toml")).unwrap();
    assert!(
        hostd.contains("[release]") && hostd.contains("environment = \"dev\""),
        "{hostd}"
    );

    // host describe: a table, and JSON that is a HostDescription.
    let table = ok(&nitrile(&up.config, &["host", "describe"]));
    assert!(table.contains("h1 (cell local)"), "{table}");
    let json = ok(&nitrile(&up.config, &["host", "describe", "-o", "json"]));
    let described: nitrile_api::admin::HostDescription = serde_json::from_str(&json).unwrap();
    assert_eq!(described.host.as_str(), "h1");
    assert_eq!(described.cell.as_str(), "local");

    // instance list: a table with its header.
    let list = ok(&nitrile(&up.config, &["instance", "list"]));
    assert!(
        list.starts_with("NAME") && list.contains("LAUNCHED"),
        "{list}"
    );
    let json = ok(&nitrile(&up.config, &["instance", "list", "-o", "json"]));
    let _: nitrile_api::admin::InstanceList = serde_json::from_str(&json).unwrap();

    // alice (oncall) may not launch: tokend refuses at the entitlement step,
    // before any call reaches the host.
    let image = described
        .images
        .first()
        .map(|i| i.digest.to_string())
        .unwrap_or_else(|| "ab".repeat(32));
    let out = nitrile(
        &up.config,
        &["instance", "launch", "web1", "--image", &image],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokend refused") && err.contains("step entitlement"),
        "{err}"
    );

    // A host the config does not name, a bad size: usage errors.
    let out = nitrile(&up.config, &["host", "describe", "--host", "h9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("known: h1"));
    let out = nitrile(
        &up.config,
        &[
            "instance", "launch", "web1", "--image", &image, "--memory", "1K",
        ],
    );
    assert_eq!(out.status.code(), Some(2));

    // alice (oncall) drains and undrains the host.
    let drained = ok(&nitrile(&up.config, &["host", "drain"]));
    assert!(drained.contains("drained (launches refused)"), "{drained}");
    let json = ok(&nitrile(&up.config, &["host", "undrain", "-o", "json"]));
    let undrained: nitrile_api::admin::HostDescription = serde_json::from_str(&json).unwrap();
    assert_eq!(
        undrained.placement,
        nitrile_api::admin::PlacementState::Accepting
    );

    // The placement service may launch, so its token is granted and the call
    // reaches the host, which refuses an image it does not have at the state
    // step, naming its journal record.
    let out = nitrile(
        &placement_config(&up.config),
        &["instance", "launch", "web1", "--image", &"cd".repeat(32)],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("host h1 refused instance.launch at step state")
            && err.contains("audit record"),
        "{err}"
    );

    stop(up);

    // Again on the same state: everything reused, the host answers.
    let up = start(&state);
    assert!(
        up.stdout.iter().any(|l| l.contains("(reused)")),
        "{:?}",
        up.stdout
    );
    let table = ok(&nitrile(&up.config, &["host", "describe"]));
    assert!(table.contains("h1 (cell local)"), "{table}");
    stop(up);
}

/// Whether QEMU and a built guest image are here; else why not.
fn guest_prerequisites() -> Result<(), String> {
    let qemu = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false);
    if !qemu {
        return Err("qemu-system-x86_64 is not on PATH".into());
    }
    let cache = nitrile_image::default_cache_dir().map_err(|e| e.to_string())?;
    nitrile_image::read_output(&nitrile_image::output_dir(&cache))
        .map(|_| ())
        .map_err(|e| format!("no guest image ({e}); run scripts/guest-image.sh"))
}

#[test]
fn nitrile_up_launches_a_real_instance() {
    if let Err(why) = guest_prerequisites() {
        println!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let up = start(&state);
    let placement = placement_config(&up.config);
    let json = ok(&nitrile(&up.config, &["host", "describe", "-o", "json"]));
    let described: nitrile_api::admin::HostDescription = serde_json::from_str(&json).unwrap();
    let image = described
        .images
        .first()
        .expect("nitrile up imported the guest image")
        .digest
        .to_string();
    assert!(
        up.stdout
            .iter()
            .any(|l| l.contains(&format!("--image {image} --config {placement}"))),
        "{:?}",
        up.stdout
    );

    let launched = ok(&nitrile(
        &placement,
        &[
            "instance", "launch", "web1", "--image", &image, "--memory", "256M", "--volume",
            "data=16M", "-o", "json",
        ],
    ));
    let launched: nitrile_api::admin::InstanceDescription =
        serde_json::from_str(&launched).unwrap();
    assert_eq!(launched.instance.as_str(), "web1");
    assert_eq!(launched.memory_mib, 256);
    assert_eq!(launched.volumes.len(), 1);
    assert_eq!(launched.state, nitrile_api::admin::InstanceState::Running);

    let described = ok(&nitrile(&placement, &["instance", "describe", "web1"]));
    assert!(described.contains("running"), "{described}");
    let list = ok(&nitrile(&up.config, &["instance", "list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("web1") && l.contains(&image[..12])),
        "{list}"
    );

    // A volume attached to the stopped instance boots with it at its next
    // start, which carries the volume token for both of its volumes.
    let volume = |id: &str| -> nitrile_api::admin::VolumeDescription {
        serde_json::from_str(&ok(&nitrile(
            &placement,
            &["volume", "describe", id, "-o", "json"],
        )))
        .unwrap()
    };
    let data = volume("data");
    assert_eq!(data.state, nitrile_api::admin::VolumeState::Attached);
    let at = data.attachment.unwrap();
    assert_eq!((at.host.as_str(), at.instance.as_str()), ("h1", "web1"));
    ok(&nitrile(&placement, &["instance", "stop", "web1"]));
    ok(&nitrile(
        &placement,
        &["volume", "create", "extra", "--size", "8M"],
    ));
    let attached = ok(&nitrile(
        &placement,
        &["volume", "attach", "extra", "--instance", "web1"],
    ));
    assert!(
        attached.lines().any(|l| l == "attached to  web1 on h1"),
        "{attached}"
    );
    let started = ok(&nitrile(
        &placement,
        &["instance", "start", "web1", "-o", "json"],
    ));
    let started: nitrile_api::admin::InstanceDescription = serde_json::from_str(&started).unwrap();
    assert_eq!(started.state, nitrile_api::admin::InstanceState::Running);
    let mut ids: Vec<&str> = started.volumes.iter().map(|v| v.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["data", "extra"]);

    // Not on a terminal: no question asked. The volumes are detached and
    // kept until `volume delete` erases them.
    let gone = ok(&nitrile(
        &placement,
        &["instance", "terminate", "web1", "-o", "json"],
    ));
    let gone: nitrile_api::admin::InstanceDescription = serde_json::from_str(&gone).unwrap();
    assert_eq!(gone.state, nitrile_api::admin::InstanceState::Terminated);
    for id in ["data", "extra"] {
        let v = volume(id);
        assert_eq!(
            (v.state, v.attachment),
            (nitrile_api::admin::VolumeState::Available, None),
            "{id}"
        );
        let deleted = ok(&nitrile(
            &placement,
            &["volume", "delete", id, "-o", "json"],
        ));
        let deleted: nitrile_api::admin::VolumeDescription =
            serde_json::from_str(&deleted).unwrap();
        assert_eq!(deleted.state, nitrile_api::admin::VolumeState::Deleted);
    }
    let journal = state.join("hosts/h1/journal");
    let records = String::from_utf8(
        std::process::Command::new(NITRILE)
            .args(["audit", "show-journal", "-o", "json"])
            .arg(&journal)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    // The start's request record names the volume token's grant on both.
    assert!(
        records.lines().any(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            let r = &r["record"];
            r["kind"] == "request"
                && r["operations"] == serde_json::json!(["instance.start", "volume.attach"])
                && r["resources"].as_array().is_some_and(|a| {
                    a.contains(&serde_json::json!("volume/data"))
                        && a.contains(&serde_json::json!("volume/extra"))
                })
                && r["detail"]["second_token_id"].is_string()
        }),
        "no start record with the volume token in the host journal"
    );

    // An instance still running when the cell stops is stopped with it: its
    // processes are gone and its record says why.
    ok(&nitrile(
        &placement,
        &["instance", "launch", "web2", "--image", &image],
    ));
    let state_dir = state.to_str().unwrap();
    assert!(
        processes_mentioning(state_dir)
            .iter()
            .any(|p| p.contains("qemu-system")),
        "no QEMU of web2 found"
    );
    stop(up);
    let left = processes_mentioning(state_dir);
    assert!(
        left.is_empty(),
        "still running after the cell stopped: {left:?}"
    );
    let up = start(&state);
    let web2 = ok(&nitrile(
        &placement,
        &["instance", "describe", "web2", "-o", "json"],
    ));
    let web2: nitrile_api::admin::InstanceDescription = serde_json::from_str(&web2).unwrap();
    assert_eq!(web2.state, nitrile_api::admin::InstanceState::Stopped);
    assert_eq!(web2.reason.as_deref(), Some("host agent shut down"));
    stop(up);
}

/// Processes other than this test whose command line mentions `text`.
fn processes_mentioning(text: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == me || !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(text) {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

#[test]
fn nitrile_up_stops_when_its_host_agent_dies() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut up = start(&state);
    let pid = up
        .stdout
        .iter()
        .find_map(|l| {
            let rest = l.split_once("(mTLS, pid ")?.1;
            rest.split(')').next()?.parse::<i32>().ok()
        })
        .unwrap_or_else(|| panic!("no hostd pid in {:?}", up.stdout));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = up.child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status}");
    let log = std::fs::read_to_string(state.with_extension("stderr.log")).unwrap();
    assert!(log.contains("host agent h1 exited unexpectedly"), "{log}");
}

#[test]
fn nitrile_up_stops_when_its_witness_dies() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut up = start(&state);
    // "  witness        127.0.0.1:P (mTLS, pid N)   state ..."
    let pid = up
        .stdout
        .iter()
        .filter(|l| l.trim_start().starts_with("witness "))
        .find_map(|l| {
            let rest = l.split_once("(mTLS, pid ")?.1;
            rest.split(')').next()?.parse::<i32>().ok()
        })
        .unwrap_or_else(|| panic!("no witness pid in {:?}", up.stdout));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = up.child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status}");
    let log = std::fs::read_to_string(state.with_extension("stderr.log")).unwrap();
    assert!(log.contains("the witness exited unexpectedly"), "{log}");
    // The host agent was stopped with the cell.
    assert!(processes_mentioning(state.to_str().unwrap()).is_empty());
}

#[test]
fn nitrile_up_stops_when_its_key_service_dies() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut up = start(&state);
    // "  kms            127.0.0.1:P (mTLS, pid N)   config ..."
    let pid = up
        .stdout
        .iter()
        .filter(|l| l.trim_start().starts_with("kms "))
        .find_map(|l| {
            let rest = l.split_once("(mTLS, pid ")?.1;
            rest.split(')').next()?.parse::<i32>().ok()
        })
        .unwrap_or_else(|| panic!("no kms pid in {:?}", up.stdout));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = up.child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status}");
    let log = std::fs::read_to_string(state.with_extension("stderr.log")).unwrap();
    assert!(log.contains("the key service exited unexpectedly"), "{log}");
    // The host agent and the witness were stopped with the cell.
    assert!(processes_mentioning(state.to_str().unwrap()).is_empty());
}
