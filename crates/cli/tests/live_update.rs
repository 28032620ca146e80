//! Live update (claim 7 and the promise beside it: host software is updated
//! without disturbing customers' instances), against the real binary.
//!
//! A host agent pinned to a prod release repository runs a guest that
//! prints a counter on its serial console every 0.2 s, while a client
//! calls `host.describe` in a loop. The deployer's `host.update 0.2.0`
//! (a release of this very binary, signed by 2 of 3 signers and attested)
//! hands the agent's socket and the VM to the staged binary: the agent
//! process changes (the new one runs from `releases/0.2.0/`), the QEMU
//! process does not, the counter never restarts and keeps counting, the
//! version reported changes, every call of the loop either completed or
//! failed with a clean error and every completed one has its request
//! record, and the journal (written by both agents) verifies.
//!
//! Then a release whose binary never serves (0.3.0): the health check
//! fails at its deadline, the agent serving before serves again (the same
//! process, still 0.2.0), the rollback is journaled with its reason, the VM
//! is untouched, and 0.3.0 is not recorded as run.
//!
//! Needs QEMU and the guest image; prints `SKIPPED: <reason>` without them.

// The test prints for the person running it; the rule that everything goes
// through the output layer is for the binary.
#![allow(clippy::disallowed_macros)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod cell;
use cell::{Cell, cmdline, stat, wait_for_line};

const NITRILE: &str = env!("CARGO_BIN_EXE_nitrile");
const INSTANCE: &str = "ticker";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const SWAP_TIMEOUT: Duration = Duration::from_secs(120);
/// The health check deadline of the host in this test.
const HEALTH_DEADLINE_SECS: u64 = 8;

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(NITRILE)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "nitrile {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A prod release repository with three signers (2 needed) and a CI key.
struct Repo {
    dir: PathBuf,
}

impl Repo {
    fn new(dir: &Path) -> Self {
        for k in ["root", "s1", "s2", "s3", "online", "ci"] {
            ok(dir, &["release", "keygen", "--out", &format!("{k}.key")]);
        }
        ok(
            dir,
            &[
                "release",
                "init",
                "--repo",
                "repo",
                "--env",
                "prod",
                "--root-key",
                "root.key.pub.json",
                "--signer",
                "s1.key.pub.json",
                "--signer",
                "s2.key.pub.json",
                "--signer",
                "s3.key.pub.json",
                "--online-key",
                "online.key.pub.json",
                "--sign-with",
                "root.key",
            ],
        );
        // What a host pins at provisioning: the root and the CI key.
        std::fs::create_dir_all(dir.join("pins")).unwrap();
        std::fs::copy(
            dir.join("repo/metadata/root.json"),
            dir.join("pins/root.json"),
        )
        .unwrap();
        std::fs::copy(dir.join("ci.key.pub.json"), dir.join("pins/ci.pub.json")).unwrap();
        Self {
            dir: dir.to_owned(),
        }
    }

    /// Builds, attests, stages, signs (2 of 3) and publishes `version`
    /// with `binary` as its `nitrile`.
    fn publish(&self, version: &str, binary: &Path) {
        let d = &self.dir;
        let bundle = format!("b{version}");
        ok(
            d,
            &[
                "release",
                "build",
                version,
                "--env",
                "prod",
                "--out",
                &bundle,
                "--binary",
                binary.to_str().unwrap(),
                "--guest-image",
                "none",
            ],
        );
        ok(
            d,
            &["release", "attest", "--bundle", &bundle, "--key", "ci.key"],
        );
        ok(
            d,
            &["release", "stage", "--repo", "repo", "--bundle", &bundle],
        );
        ok(d, &["release", "sign", "--repo", "repo", "--key", "s1.key"]);
        ok(d, &["release", "sign", "--repo", "repo", "--key", "s3.key"]);
        ok(
            d,
            &[
                "release",
                "publish",
                "--repo",
                "repo",
                "--online-key",
                "online.key",
            ],
        );
    }

    fn release_section(&self) -> String {
        let p = |rel: &str| self.dir.join(rel).display().to_string();
        format!(
            "\n[release]\nenvironment = \"prod\"\nrepository = \"{}\"\nroot = \"{}\"\nci_key = \"{}\"\nhealth_deadline_secs = {HEALTH_DEADLINE_SECS}\n",
            p("repo"),
            p("pins/root.json"),
            p("pins/ci.pub.json"),
        )
    }
}

/// The counter values on the guest's console, in order.
fn ticks(serial: &Path) -> Vec<u64> {
    String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default())
        .lines()
        .filter_map(|l| l.trim().strip_prefix("NITRILE-TICK ")?.parse().ok())
        .collect()
}

/// The QEMU processes of the cell.
fn qemus(cell: &Cell) -> Vec<u32> {
    let mut pids: Vec<u32> = cell
        .processes()
        .into_iter()
        .filter(|p| {
            cmdline(*p).is_some_and(|c| {
                String::from_utf8_lossy(&c)
                    .split('\0')
                    .next()
                    .is_some_and(|a| a.contains("qemu-system"))
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Whether `pid` is gone (or a zombie: exited, not yet reaped).
fn exited(pid: u32) -> bool {
    stat(pid).is_none_or(|s| s.first().is_some_and(|st| st == "Z" || st == "X"))
}

/// The pid of the agent that took over, from its line in the log.
fn successor(log: &str, release: &str) -> Option<u32> {
    log.lines().rev().find_map(|l| {
        let rest = l.split_once(" took over as pid ")?.1;
        let (pid, tail) = rest.split_once(' ')?;
        tail.contains(&format!("(release {release})"))
            .then(|| pid.parse().ok())
            .flatten()
    })
}

fn describe(cell: &Cell) -> Result<serde_json::Value, String> {
    let out = cell.nitrile(&cell.alice, &["host", "describe", "-o", "json"]);
    if out.status.success() {
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn wait_for_version(cell: &Cell, version: &str) -> serde_json::Value {
    let deadline = Instant::now() + SWAP_TIMEOUT;
    loop {
        if let Ok(d) = describe(cell)
            && d["software"]["nitrile"] == version
        {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "the host never reported {version}\n{}",
            cell.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A client calling host.describe in a loop: each call's outcome.
struct Load {
    stop: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<Result<(), String>>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Load {
    fn start(alice: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (s, c, alice) = (Arc::clone(&stop), Arc::clone(&calls), alice.to_owned());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let out = Command::new(NITRILE)
                    .args(["--config"])
                    .arg(&alice)
                    .args(["host", "describe", "-o", "json"])
                    .output()
                    .unwrap();
                let r = if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "exit {:?}: {}",
                        out.status.code(),
                        String::from_utf8_lossy(&out.stderr)
                    ))
                };
                c.lock().unwrap().push(r);
            }
        });
        Self {
            stop,
            calls,
            thread,
        }
    }

    fn finish(self) -> Vec<Result<(), String>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        Arc::try_unwrap(self.calls).unwrap().into_inner().unwrap()
    }
}

/// Samples the guest's last counter value every 100 ms.
struct Watch {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Watch {
    fn start(serial: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, c, serial) = (Arc::clone(&stop), Arc::clone(&samples), serial.to_owned());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Some(last) = ticks(&serial).last() {
                    c.lock().unwrap().push((Instant::now(), *last));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            samples,
            thread,
        }
    }

    fn finish(self) -> Vec<(Instant, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        Arc::try_unwrap(self.samples).unwrap().into_inner().unwrap()
    }
}

/// The counter never went back and advanced across the whole window.
fn assert_counted_through(samples: &[(Instant, u64)], what: &str) {
    assert!(samples.len() > 10, "{what}: too few samples");
    for w in samples.windows(2) {
        assert!(
            w[1].1 >= w[0].1,
            "{what}: the guest's counter went back: {w:?}"
        );
    }
    let (first, last) = (samples[0].1, samples[samples.len() - 1].1);
    assert!(last > first, "{what}: the counter stood still at {first}");
}

/// The console holds one boot: 1, 2, 3, ... without a gap or a restart.
fn assert_one_run(serial: &Path) {
    let t = ticks(serial);
    for (i, n) in t.iter().enumerate() {
        assert_eq!(
            *n,
            i as u64 + 1,
            "the counter restarted or skipped at line {i}"
        );
    }
    let console = String::from_utf8_lossy(&std::fs::read(serial).unwrap()).into_owned();
    assert_eq!(
        console.matches("NITRILE-GUEST-READY").count(),
        1,
        "the guest booted again"
    );
}

/// Calls of the loop that failed: each with a clean error from the CLI.
fn assert_clean(calls: &[Result<(), String>]) -> usize {
    let ok = calls.iter().filter(|c| c.is_ok()).count();
    assert!(ok > 0, "no call completed: {calls:?}");
    for c in calls {
        if let Err(e) = c {
            assert!(
                e.starts_with("exit Some(") && !e.contains("panicked"),
                "{e}"
            );
            assert!(e.contains("nitrile:") || e.contains("error"), "{e}");
        }
    }
    ok
}

fn live_updates(cell: &Cell) -> Vec<serde_json::Value> {
    cell.journal(&cell.host_journal())
        .into_iter()
        .filter(|r| r["detail"]["event"] == "live_update")
        .collect()
}

fn describe_requests(cell: &Cell) -> usize {
    cell.journal(&cell.host_journal())
        .iter()
        .filter(|r| {
            r["kind"] == "request"
                && r["operations"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|o| o == "host.describe"))
        })
        .count()
}

#[test]
fn a_live_update_keeps_the_instances_running_and_a_failing_release_rolls_back() {
    let built = guest_or_skip!();
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    repo.publish("0.2.0", Path::new(NITRILE));
    let section = repo.release_section();
    // The host's pinned prod repository in place of the cell's dev one.
    let cell = Cell::separate(|text| {
        let kept = match text.find("\n[release]") {
            Some(at) => {
                let rest = &text[at + 1..];
                let end = rest.find("\n[").map_or(text.len(), |e| at + 1 + e + 1);
                format!("{}{}", &text[..at + 1], &text[end.min(text.len())..])
            }
            None => text.to_owned(),
        };
        format!("{kept}{section}")
    });
    let deployer = cell.alice.with_file_name("service-deployer.toml");

    // The guest that counts.
    let counter =
        nitrile_image::Cmdline::new(&format!("{} nitrile.test=counter", built.cmdline.as_str()))
            .unwrap();
    let image = nitrile_image::ImageStore::open(cell.images_dir())
        .unwrap()
        .import(&built.kernel, &built.initramfs, &counter)
        .unwrap();
    let digest = image.digest().to_hex();
    cell.ok(
        &cell.placement,
        &[
            "instance", "launch", INSTANCE, "--image", &digest, "--memory", "128M",
        ],
    );
    let serial = cell.vm_dir(INSTANCE).join("serial.log");
    assert!(
        wait_for_line(&serial, "NITRILE-TICK 5", BOOT_TIMEOUT),
        "the guest does not count\n{}",
        cell.logs()
    );
    let qemu = qemus(&cell);
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    let old_agent = cell.hostd_pid();
    let before = describe(&cell).unwrap();
    assert_eq!(before["software"]["nitrile"], env!("CARGO_PKG_VERSION"));
    let requests_before = describe_requests(&cell);

    // The update, under load.
    let watch = Watch::start(&serial);
    let load = Load::start(&cell.alice);
    std::thread::sleep(Duration::from_secs(2));
    let out = cell.ok(&deployer, &["host", "update", "0.2.0", "-o", "json"]);
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["staged"], "0.2.0", "{answer}");
    assert_eq!(answer["handing_over"], true, "{answer}");
    let after = wait_for_version(&cell, "0.2.0");
    std::thread::sleep(Duration::from_secs(2));
    let calls = load.finish();
    let samples = watch.finish();

    // Another process runs the staged binary; the VM is the same.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !exited(old_agent) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(exited(old_agent), "the old agent did not exit");
    let new_agent = successor(&cell.logs(), "0.2.0").expect("no takeover line in the log");
    assert_ne!(new_agent, old_agent);
    let exe = std::fs::read_link(format!("/proc/{new_agent}/exe")).unwrap();
    assert!(
        exe.ends_with("releases/0.2.0/nitrile"),
        "the new agent runs {}",
        exe.display()
    );
    assert_eq!(qemus(&cell), qemu, "the QEMU processes changed");
    assert_eq!(after["capacity"]["instances"], 1, "{after}");
    let listed = cell.ok(
        &cell.alice,
        &["instance", "describe", INSTANCE, "-o", "json"],
    );
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["state"], "running", "{listed}");
    assert_counted_through(&samples, "the live update");
    assert_one_run(&serial);
    let completed = assert_clean(&calls);
    // Every completed call had its request record before it was answered.
    assert!(
        describe_requests(&cell) - requests_before >= completed,
        "{completed} calls completed, fewer requests journaled"
    );
    let events = live_updates(&cell);
    let phases: Vec<&str> = events
        .iter()
        .filter_map(|e| e["detail"]["phase"].as_str())
        .collect();
    assert_eq!(phases, ["handing_over", "serving"], "{events:?}");
    assert_eq!(events[1]["detail"]["from_pid"], old_agent, "{events:?}");
    cell.verify_journal(&cell.host_journal());
    eprintln!(
        "live update: {} calls, {} completed; counter {} -> {}",
        calls.len(),
        completed,
        samples[0].1,
        samples[samples.len() - 1].1
    );

    // A release that never serves: rolled back at the deadline.
    let broken = tmp.path().join("broken-nitrile");
    std::fs::write(&broken, "#!/bin/sh\nexec sleep 600\n").unwrap();
    repo.publish("0.3.0", &broken);
    let watch = Watch::start(&serial);
    let out = cell.ok(&deployer, &["host", "update", "0.3.0", "-o", "json"]);
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["handing_over"], true, "{answer}");
    let deadline = Instant::now() + SWAP_TIMEOUT;
    while !live_updates(&cell)
        .iter()
        .any(|e| e["detail"]["phase"] == "rolled_back")
    {
        assert!(Instant::now() < deadline, "no rollback\n{}", cell.logs());
        std::thread::sleep(Duration::from_millis(500));
    }
    let again = wait_for_version(&cell, "0.2.0");
    std::thread::sleep(Duration::from_secs(2));
    let samples = watch.finish();
    assert!(!exited(new_agent), "the agent serving before is gone");
    assert_eq!(
        successor(&cell.logs(), "0.3.0"),
        None,
        "the broken release took over"
    );
    assert_eq!(qemus(&cell), qemu, "the QEMU processes changed");
    assert_eq!(again["capacity"]["instances"], 1, "{again}");
    assert_counted_through(&samples, "the rollback");
    assert_one_run(&serial);
    let events = live_updates(&cell);
    let rolled = events
        .iter()
        .find(|e| e["detail"]["phase"] == "rolled_back")
        .unwrap();
    assert_eq!(rolled["outcome"], "failed", "{rolled}");
    assert_eq!(rolled["detail"]["to"], "0.3.0", "{rolled}");
    assert!(
        rolled["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains("did not report serving"),
        "{rolled}"
    );
    cell.verify_journal(&cell.host_journal());
    let highest = std::fs::read_to_string(cell.host_dir().join("releases/highest.json")).unwrap();
    assert!(highest.contains("0.2.0"), "{highest}");
    // The broken binary (it became `sleep 600`) is not left running.
    let strays: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| cmdline(*p).is_some_and(|c| c == b"sleep\x00600\x00"))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");

    cell.ok(&cell.placement, &["instance", "terminate", INSTANCE]);
}
