//! Live update of a host agent, measured on a real cell.
//!
//! `nitrile up --hosts 1 --no-network` in a fresh directory (this package's
//! `nitrile` binary), its `dev` repository given releases of the same
//! binary; a client calls `nitrile host describe` in a loop. Measured per
//! update (0.2.0, 0.3.0, ...): the time from sending `host.update` to the
//! first describe that reports the new version, and the longest gap
//! between two successive completed calls of the loop, against the same
//! loop's longest gap over as many calls without an update (baseline), and
//! whether any call failed (a refused connection shows as one). The loop's
//! resolution is one CLI call (a process, a token, an mTLS call) plus a
//! pause of [`PACE`] (unpaced, the loop opens about a hundred connections a
//! second to the token service, whose flood protection then refuses it).
//!
//! Run: `cargo bench -p nitrile-cli --bench live_update`;
//! `NITRILE_BENCH_QUICK=1` for one update.

#![allow(clippy::disallowed_macros)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NITRILE: &str = env!("CARGO_BIN_EXE_nitrile");
/// The pause between two calls of the loop.
const PACE: Duration = Duration::from_millis(60);

fn quick() -> bool {
    std::env::var_os("NITRILE_BENCH_QUICK").is_some_and(|v| v == "1")
}

fn ok(args: &[&str]) -> String {
    let out = Command::new(NITRILE).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "nitrile {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn publish(state: &Path, work: &Path, version: &str) {
    let keys = state.join("release/keys");
    let repo = state.join("release/repo");
    let bundle = work.join(format!("b{version}"));
    let (k, r, b) = (
        keys.to_str().unwrap(),
        repo.to_str().unwrap(),
        bundle.to_str().unwrap(),
    );
    ok(&[
        "release",
        "build",
        version,
        "--env",
        "dev",
        "--out",
        b,
        "--binary",
        NITRILE,
        "--guest-image",
        "none",
    ]);
    ok(&[
        "release",
        "attest",
        "--bundle",
        b,
        "--key",
        &format!("{k}/ci.key"),
    ]);
    ok(&["release", "stage", "--repo", r, "--bundle", b]);
    ok(&[
        "release",
        "sign",
        "--repo",
        r,
        "--key",
        &format!("{k}/s1.key"),
    ]);
    ok(&[
        "release",
        "sign",
        "--repo",
        r,
        "--key",
        &format!("{k}/s2.key"),
    ]);
    ok(&[
        "release",
        "publish",
        "--repo",
        r,
        "--online-key",
        &format!("{k}/online.key"),
    ]);
}

/// The end of each completed call with the version it saw, and how many
/// failed.
type Calls = (Vec<(Instant, String)>, usize);

/// Completed calls (their end) and failures of a describe loop.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Calls>>,
    thread: std::thread::JoinHandle<()>,
}

impl Load {
    fn start(config: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new((Vec::new(), 0)));
        let (s, d) = (Arc::clone(&stop), Arc::clone(&done));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let out = Command::new(NITRILE)
                    .arg("--config")
                    .arg(&config)
                    .args(["host", "describe", "-o", "json"])
                    .output()
                    .unwrap();
                // Paced: the token service's flood protection refuses a
                // source opening connections much faster, for minutes.
                std::thread::sleep(PACE);
                let mut g = d.lock().unwrap();
                if out.status.success() {
                    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    let version = v["software"]["nitrile"].as_str().unwrap_or("").to_owned();
                    g.0.push((Instant::now(), version));
                } else {
                    g.1 += 1;
                    let why = String::from_utf8_lossy(&out.stderr).into_owned();
                    let at = g.0.len();
                    if g.1 <= 3 {
                        eprintln!("failed call after {at} completed: {}", why.trim());
                    }
                }
            }
        });
        Self { stop, done, thread }
    }

    fn finish(self) -> Calls {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        Arc::try_unwrap(self.done)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

fn max_gap(calls: &[(Instant, String)]) -> Duration {
    calls
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default()
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut up = Command::new(NITRILE)
        .args(["up", "--hosts", "1", "--no-network"])
        .args([
            "--tokend-listen",
            "127.0.0.1:0",
            "--tokend-metrics",
            "127.0.0.1:0",
        ])
        .args([
            "--hostd-listen",
            "127.0.0.1:0",
            "--logd-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--logd-metrics",
            "127.0.0.1:0",
            "--witness-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--kms-listen",
            "127.0.0.1:0",
            "--placed-listen",
            "127.0.0.1:0",
        ])
        .args(["--deployd-listen", "127.0.0.1:0"])
        .arg("--state")
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read to the end on a thread of its own: the cell's stdout stays open.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = up.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(p) = line.strip_prefix("export NITRILE_CONFIG=") {
                let _ = tx.send(PathBuf::from(p));
            }
        }
    });
    let alice = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("nitrile up printed no export line");
    let deployer = alice.with_file_name("service-deployer.toml");
    let updates = if quick() { 1 } else { 3 };

    // Baseline: the loop alone.
    let load = Load::start(alice.clone());
    std::thread::sleep(Duration::from_secs(if quick() { 5 } else { 15 }));
    let (calls, failed) = load.finish();
    let baseline = max_gap(&calls);
    println!(
        "baseline: {} describe calls, {failed} failed, longest gap {:.0} ms",
        calls.len(),
        baseline.as_secs_f64() * 1e3
    );

    for k in 0..updates {
        let version = format!("0.{}.0", k + 2);
        publish(&state, tmp.path(), &version);
        let load = Load::start(alice.clone());
        std::thread::sleep(Duration::from_secs(2));
        let sent = Instant::now();
        ok(&[
            "--config",
            deployer.to_str().unwrap(),
            "host",
            "update",
            &version,
        ]);
        let answered = sent.elapsed();
        let deadline = Instant::now() + Duration::from_secs(120);
        let serving = loop {
            let g = load.done.lock().unwrap();
            if let Some((t, _)) = g.0.iter().find(|(t, v)| *t > sent && *v == version) {
                break *t - sent;
            }
            drop(g);
            assert!(Instant::now() < deadline, "{version} never served");
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_secs(3));
        let (calls, failed) = load.finish();
        let gap = max_gap(&calls);
        println!(
            "update to {version}: host.update answered in {:.0} ms (check and staging), new agent serving {:.0} ms after it was sent; \
             {} describe calls, {failed} failed, longest gap {:.0} ms ({:.1}x the baseline's)",
            answered.as_secs_f64() * 1e3,
            serving.as_secs_f64() * 1e3,
            calls.len(),
            gap.as_secs_f64() * 1e3,
            gap.as_secs_f64() / baseline.as_secs_f64().max(1e-3)
        );
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(up.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = up.wait();
}
