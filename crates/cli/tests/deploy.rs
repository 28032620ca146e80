//! Rollouts through the deployment service on `nitrile up --hosts 3`, the
//! CLI only.
//!
//! The cell's `dev` release repository (made by `nitrile up`, two of three
//! signers) gets 0.2.0, a release of this very binary; an on-call operator
//! rolls it out in waves of 1 then 2 hosts: every host serves it, wave 2
//! was called only after wave 1 served it and baked, and the deployment
//! service's steps are in its journal (which verifies and is shipped to the
//! audit log) and the hosts' `host.update` records name the deployer.
//!
//! Then 0.3.0, whose binary never serves: the first wave's host fails its
//! health check and serves 0.2.0 again, the rollout stops `failed`, and the
//! other two hosts were never called (no `host.update` of it in their
//! journals). Then 0.4.0 with a long bake, aborted after its first wave:
//! `aborted`, the second wave untouched. An operator's own `host.update`
//! and a customer's rollout are refused at the token service.

// The test prints for the person running it; the rule that everything goes
// through the output layer is for the binary.
#![allow(clippy::disallowed_macros)]

use std::path::Path;
use std::time::{Duration, Instant};

mod cell;
use cell::Cell;

const NITRILE: &str = env!("CARGO_BIN_EXE_nitrile");

/// Builds, attests, stages, signs (s1 and s3: 2 of 3) and publishes
/// `version` with `binary` in the cell's dev repository.
fn publish(cell: &Cell, work: &Path, version: &str, binary: &Path) {
    let keys = cell.state.join("release").join("keys");
    let repo = cell.state.join("release").join("repo");
    let bundle = work.join(format!("b{version}"));
    let run = |args: &[&str]| {
        let out = std::process::Command::new(NITRILE)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nitrile {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (keys, repo, bundle) = (
        keys.to_str().unwrap(),
        repo.to_str().unwrap(),
        bundle.to_str().unwrap(),
    );
    run(&[
        "release",
        "build",
        version,
        "--env",
        "dev",
        "--out",
        bundle,
        "--binary",
        binary.to_str().unwrap(),
        "--guest-image",
        "none",
    ]);
    run(&[
        "release",
        "attest",
        "--bundle",
        bundle,
        "--key",
        &format!("{keys}/ci.key"),
    ]);
    run(&["release", "stage", "--repo", repo, "--bundle", bundle]);
    for s in ["s1", "s3"] {
        run(&[
            "release",
            "sign",
            "--repo",
            repo,
            "--key",
            &format!("{keys}/{s}.key"),
        ]);
    }
    run(&[
        "release",
        "publish",
        "--repo",
        repo,
        "--online-key",
        &format!("{keys}/online.key"),
    ]);
}

fn version_of(cell: &Cell, host: &str) -> String {
    let out = cell.ok(
        &cell.alice,
        &["host", "describe", "--host", host, "-o", "json"],
    );
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    d["software"]["nitrile"].as_str().unwrap().to_owned()
}

/// The steps of each host, by wave: (host, state).
fn steps(d: &serde_json::Value) -> Vec<Vec<(String, String)>> {
    d["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            w["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    (
                        h["host"].as_str().unwrap().to_owned(),
                        h["state"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

/// `host.update` request records of `version` in a host's journal.
fn updates(cell: &Cell, host: &str, version: &str) -> Vec<serde_json::Value> {
    cell.journal(&cell.journal_of_host(host))
        .into_iter()
        .filter(|r| {
            r["kind"] == "request"
                && r["operations"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|o| o == "host.update"))
                && r.to_string().contains(&format!("\"{version}\""))
        })
        .collect()
}

fn deploy(cell: &Cell, config: &Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    let mut all = vec!["deploy"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let out = cell.nitrile(config, &all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), json, stderr)
}

fn wait_status(
    cell: &Cell,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        // A busy cell may time a call out: asked again.
        let (ok, d, _) = deploy(cell, &cell.alice, &["status"]);
        if ok && f(&d) {
            return d;
        }
        assert!(Instant::now() < deadline, "{what}: {d}\n{}", cell.logs());
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn rollouts_go_in_waves_and_stop_at_the_first_failed_host() {
    let cell = Cell::up_with_hosts(3);
    let work = tempfile::tempdir().unwrap();
    let hosts = ["h1", "h2", "h3"];
    for h in hosts {
        assert_eq!(version_of(&cell, h), env!("CARGO_PKG_VERSION"));
    }

    // Refused at the token service: an operator updating a host itself, a
    // customer starting a rollout.
    publish(&cell, work.path(), "0.2.0", Path::new(NITRILE));
    let out = cell.nitrile(&cell.alice, &["host", "update", "0.2.0", "--host", "h2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("entitlement"), "{err}");
    let (ok, _, err) = deploy(&cell, &cell.customer("acme"), &["start", "0.2.0"]);
    assert!(!ok && err.contains("entitlement"), "{err}");

    // A good release, in waves of 1 then 2.
    let (ok, d, err) = deploy(
        &cell,
        &cell.alice,
        &["start", "0.2.0", "--waves", "1,2", "--bake", "2", "--wait"],
    );
    assert!(ok, "{err}\n{}", cell.logs());
    assert_eq!(d["state"], "succeeded", "{d}");
    assert_eq!(
        steps(&d),
        [
            pairs(&[("h1", "healthy")]),
            pairs(&[("h2", "healthy"), ("h3", "healthy")])
        ]
    );
    assert!(err.contains("3 of 3 hosts serve it"), "{err}");
    for h in hosts {
        assert_eq!(version_of(&cell, h), "0.2.0", "{h}");
        let u = updates(&cell, h, "0.2.0");
        assert_eq!(u.len(), 1, "{h}: {u:?}");
        assert_eq!(u[0]["principal"], "nitrile://local/service/deployer");
    }
    // Wave 2 was called after wave 1 served and baked.
    let journal = cell.state.join("deployd").join("journal");
    cell.verify_journal(&journal);
    let events: Vec<serde_json::Value> = cell
        .journal(&journal)
        .into_iter()
        .filter(|r| r["detail"]["event"] == "deployment" && r["detail"]["id"] == 1)
        .collect();
    let at = |step: &str, host: Option<&str>| {
        events
            .iter()
            .position(|e| {
                e["detail"]["step"] == step && host.is_none_or(|h| e["detail"]["host"] == h)
            })
            .unwrap_or_else(|| panic!("no {step} {host:?}: {events:?}"))
    };
    assert!(at("healthy", Some("h1")) < at("baked", None));
    assert!(at("baked", None) < at("update", Some("h2")));
    assert!(at("baked", None) < at("update", Some("h3")));
    assert!(at("healthy", Some("h3")) < at("succeeded", None));

    // A release that never serves: the first wave fails, the rest untouched.
    let broken = work.path().join("broken-nitrile");
    std::fs::write(&broken, "#!/bin/sh\nexec sleep 600\n").unwrap();
    publish(&cell, work.path(), "0.3.0", &broken);
    let (ok, d, err) = deploy(
        &cell,
        &cell.alice,
        &["start", "0.3.0", "--waves", "1,2", "--bake", "1", "--wait"],
    );
    assert!(!ok, "{err}");
    assert_eq!(d["state"], "failed", "{d}\n{err}");
    assert_eq!(
        steps(&d),
        [
            pairs(&[("h1", "failed")]),
            pairs(&[("h2", "untouched"), ("h3", "untouched")])
        ]
    );
    assert!(
        d["reason"].as_str().unwrap().contains("no later host"),
        "{d}"
    );
    // Failed as soon as the host served its previous version again.
    let h1 = &d["waves"][0]["hosts"][0];
    assert!(
        h1["detail"].as_str().unwrap().contains("rolled back"),
        "{h1}"
    );
    assert_eq!(h1["now"], "0.2.0", "{h1}");
    assert_eq!(version_of(&cell, "h1"), "0.2.0");
    for h in ["h2", "h3"] {
        assert_eq!(version_of(&cell, h), "0.2.0");
        assert!(updates(&cell, h, "0.3.0").is_empty(), "{h} was called");
    }
    assert_eq!(updates(&cell, "h1", "0.3.0").len(), 1);
    let rolled_back = cell
        .journal(&cell.journal_of_host("h1"))
        .into_iter()
        .any(|r| r["detail"]["phase"] == "rolled_back" && r["detail"]["to"] == "0.3.0");
    assert!(rolled_back, "h1 journaled no rollback");

    // Aborted after its first wave.
    publish(&cell, work.path(), "0.4.0", Path::new(NITRILE));
    let (ok, d, err) = deploy(
        &cell,
        &cell.alice,
        &["start", "0.4.0", "--waves", "1,2", "--bake", "600"],
    );
    assert!(ok, "{err}");
    assert_eq!(d["state"], "running", "{d}");
    let (ok, _, err) = deploy(&cell, &cell.alice, &["start", "0.4.0"]);
    assert!(!ok && err.contains("a rollout is running"), "{err}");
    wait_status(&cell, "wave 1 of 0.4.0 served", |d| {
        steps(d)[0] == pairs(&[("h1", "healthy")])
    });
    let (ok, _, err) = deploy(&cell, &cell.alice, &["abort"]);
    assert!(ok, "{err}");
    let d = wait_status(&cell, "the abort", |d| d["state"] != "running");
    assert_eq!(d["state"], "aborted", "{d}");
    assert_eq!(
        steps(&d),
        [
            pairs(&[("h1", "healthy")]),
            pairs(&[("h2", "untouched"), ("h3", "untouched")])
        ]
    );
    assert_eq!(version_of(&cell, "h1"), "0.4.0");
    for h in ["h2", "h3"] {
        assert_eq!(version_of(&cell, h), "0.2.0");
    }
    for h in hosts {
        cell.verify_journal(&cell.journal_of_host(h));
    }

    // The deployment service's journal reaches the audit log.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tail = cell.ok(&cell.carol, &["audit", "tail", "-o", "json"]);
        if tail
            .lines()
            .any(|l| l.contains("service/deployer") && l.contains("deployment 3 aborted"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deployment service's records are not in the audit log"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}
