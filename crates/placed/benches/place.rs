//! Placement benchmarks.
//!
//! (a) Placement decisions per second: [`nitrile_placed::store::choose_host`]
//! over 3, 30 and 300 host descriptions (every host accepting and healthy,
//! capacities varied, a record of 2 instances per host spread over 4
//! customers), against a trivial loop over the same descriptions in the
//! same run (reads each host's instance count: the floor of any choice).
//!
//! (b) On a real 3-host cell (`nitrile up --hosts 3`, the binary named by
//! `NITRILE_BIN`, skipped without it): the sample guest image imported by
//! customer acme, then [`RUNS`] `nitrile customer run` calls timed end to
//! end, under four names in turn (the sample per-customer quota), (CLI start, token from the token service, placement's host choice,
//! its token and `instance.launch` on the host, its `network.update` push
//! to the 3 hosts, the journal records), each instance terminated
//! (untimed); baseline: [`RUNS`] `nitrile instance launch` straight to a
//! host as `service/placement` (CLI start, token, launch). The difference
//! is placement's own share. The guest's boot (QEMU TCG) to
//! `NITRILE-SSH-READY` on its serial console is measured apart, after the
//! run returned, for [`BOOTS`] instances.
//!
//! Run: `NITRILE_BIN=target/debug/nitrile cargo bench -p nitrile-placed
//! --bench place`; `NITRILE_BENCH_QUICK=1` for a short smoke run.

#![allow(clippy::disallowed_macros)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nitrile_api::Name;
use nitrile_api::admin::{Capacity, Health, HostDescription, HostHealth, PlacementState, Software};
use nitrile_placed::store::{InstanceRecord, Placements, choose_host};
use nitrile_placed_api::wire::InstanceState;

/// Customer runs timed on the real cell (and direct launches).
const RUNS: usize = 20;
/// Guest boots timed to `NITRILE-SSH-READY`.
const BOOTS: usize = 3;
/// Longest a TCG boot may take.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn quick() -> bool {
    std::env::var_os("NITRILE_BENCH_QUICK").is_some_and(|v| v == "1")
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn fleet(n: usize) -> (BTreeMap<Name, Option<HostDescription>>, Placements) {
    let mut described = BTreeMap::new();
    let mut state = Placements::default();
    for i in 0..n {
        let host = name(&format!("h{}", i + 1));
        let d = HostDescription {
            host: host.clone(),
            cell: name("local"),
            placement: PlacementState::Accepting,
            health: HostHealth {
                journal: Health::Ok,
                hypervisor: Health::Ok,
            },
            software: Software {
                nitrile: "0".into(),
                backend: "qemu".into(),
                backend_version: None,
                kernel: "0".into(),
            },
            measurements: Vec::new(),
            capacity: Capacity {
                vcpus_total: 64,
                vcpus_allocated: (i % 7) as u32,
                memory_mib_total: 65536,
                memory_mib_allocated: ((i % 5) * 1024) as u64,
                instances: (i % 11) as u32,
            },
            images: Vec::new(),
            started_at: "2024-01-01T00:00:00Z".into(),
            network: None,
        };
        described.insert(host.clone(), Some(d));
        for k in 0..2 {
            let customer = name(["acme", "globex", "initech", "umbrella"][(i + k) % 4]);
            let inst = name(&format!("i{i}x{k}"));
            let address = std::net::Ipv4Addr::new(10, 80, (i / 200) as u8, (i % 200 + 10) as u8);
            state.instances.insert(
                format!("{customer}--{inst}"),
                InstanceRecord {
                    customer,
                    name: inst,
                    host: host.clone(),
                    image: nitrile_image::Digest::of(b"bench"),
                    memory_mib: 256,
                    vcpus: 1,
                    vni: 100,
                    address,
                    publish: Vec::new(),
                    published: Vec::new(),
                    state: InstanceState::Running,
                    created: String::new(),
                    root_volume: None,
                },
            );
        }
    }
    (described, state)
}

/// Runs `f` for about `run`; calls per second.
fn rate(run: Duration, mut f: impl FnMut() -> usize) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    let mut sink = 0usize;
    while start.elapsed() < run {
        for _ in 0..64 {
            sink = sink.wrapping_add(f());
        }
        calls += 64;
    }
    black_box(sink);
    calls as f64 / start.elapsed().as_secs_f64()
}

fn decisions() {
    let run = if quick() {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(2)
    };
    println!("(a) placement decisions per second (choose_host), {run:?} each");
    println!("| hosts | decisions/s | trivial loop/s | ratio |");
    println!("|---|---|---|---|");
    let acme = name("acme");
    for n in [3, 30, 300] {
        let (described, state) = fleet(n);
        let choose = rate(run, || {
            let mut skipped = Vec::new();
            let h = choose_host(&described, &state, &acme, 1, 256, &mut skipped);
            h.map_or(0, |h| h.as_str().len()) + skipped.len()
        });
        let trivial = rate(run, || {
            described
                .values()
                .flatten()
                .map(|d| d.capacity.instances as usize)
                .sum()
        });
        println!(
            "| {n} | {choose:.0} | {trivial:.0} | {:.2} |",
            trivial / choose
        );
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nitrile(bin: &Path, config: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nitrile {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn wait_ready(serial: &Path) -> bool {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while Instant::now() < deadline {
        let text = std::fs::read(serial).unwrap_or_default();
        if String::from_utf8_lossy(&text)
            .lines()
            .any(|l| l.trim() == "NITRILE-SSH-READY")
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn cell_runs(bin: PathBuf) {
    let built = match nitrile_image::default_cache_dir()
        .map_err(|e| e.to_string())
        .and_then(|c| {
            nitrile_image::read_output(&nitrile_image::output_dir(&c)).map_err(|e| e.to_string())
        }) {
        Ok(b) => b,
        Err(e) => {
            println!("(b) SKIPPED: no guest image ({e})");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let port = |p: u16| format!("127.0.0.1:{p}");
    let mut up = Command::new(&bin)
        .arg("up")
        .args(["--hosts", "3"])
        .args(["--tokend-listen", &port(free_port())])
        .args(["--tokend-metrics", "127.0.0.1:0"])
        .args(["--hostd-listen", &port(free_port())])
        .args(["--logd-listen", "127.0.0.1:0"])
        .args(["--logd-metrics", "127.0.0.1:0"])
        .args(["--witness-listen", "127.0.0.1:0"])
        .args(["--kms-listen", &port(free_port())])
        .args(["--placed-listen", "127.0.0.1:0"])
        .args(["--deployd-listen", "127.0.0.1:0"])
        .arg("--state")
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut alice = None;
    for line in BufReader::new(up.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(p) = line.strip_prefix("export NITRILE_CONFIG=") {
            alice = Some(PathBuf::from(p));
            break;
        }
    }
    let alice = alice.expect("nitrile up printed no export line");
    let acme = alice.with_file_name("customer-acme.toml");
    let placement = alice.with_file_name("service-placement.toml");
    let image: serde_json::Value = serde_json::from_str(&nitrile(
        &bin,
        &acme,
        &[
            "customer",
            "image",
            "import",
            "--kernel",
            built.kernel.to_str().unwrap(),
            "--initramfs",
            built.initramfs.to_str().unwrap(),
            "--cmdline",
            built.cmdline.as_str(),
            "-o",
            "json",
        ],
    ))
    .unwrap();
    let digest = image["digest"].as_str().unwrap().to_owned();
    let runs = if quick() { 3 } else { RUNS };
    let boots = if quick() { 1 } else { BOOTS };

    let mut run_lat = Vec::new();
    let mut boot_lat = Vec::new();
    let mut hosts = BTreeMap::<String, usize>::new();
    for i in 0..runs {
        // Four names in turn: the sample quota counts distinct instances
        // per customer per hour (8), and each is terminated before reuse.
        let n = format!("b{}", i % 4);
        let t = Instant::now();
        let out = nitrile(
            &bin,
            &acme,
            &["customer", "run", &n, "--image", &digest, "-o", "json"],
        );
        run_lat.push(t.elapsed());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let host = v["host"].as_str().unwrap().to_owned();
        *hosts.entry(host.clone()).or_default() += 1;
        if i < boots {
            let serial = state
                .join("hosts")
                .join(&host)
                .join("vms")
                .join(format!("acme--{n}"))
                .join("serial.log");
            let t = Instant::now();
            assert!(wait_ready(&serial), "acme--{n} did not boot");
            boot_lat.push(t.elapsed());
        }
        nitrile(&bin, &acme, &["customer", "terminate", &n, "--yes"]);
    }
    let mut direct = Vec::new();
    for i in 0..runs {
        let n = format!("d{i}");
        let h = format!("h{}", i % 3 + 1);
        let t = Instant::now();
        nitrile(
            &bin,
            &placement,
            &["instance", "launch", &n, "--image", &digest, "--host", &h],
        );
        direct.push(t.elapsed());
        nitrile(
            &bin,
            &placement,
            &["instance", "terminate", &n, "--host", &h, "--yes"],
        );
    }
    let _ = up.kill();
    let _ = up.wait();
    for v in [&mut run_lat, &mut direct, &mut boot_lat] {
        v.sort();
    }
    println!("(b) 3-host cell, {runs} runs (spread: {hosts:?}), boots timed: {boots}");
    println!("| what | p50 | p99 |");
    println!("|---|---|---|");
    let (r50, r99) = (percentile(&run_lat, 0.5), percentile(&run_lat, 0.99));
    let (d50, d99) = (percentile(&direct, 0.5), percentile(&direct, 0.99));
    println!("| customer run via placement | {} | {} |", ms(r50), ms(r99));
    println!(
        "| instance.launch straight to a host | {} | {} |",
        ms(d50),
        ms(d99)
    );
    println!(
        "| placement's own share (p50 difference) | {} | - |",
        ms(r50.saturating_sub(d50))
    );
    let (b50, b99) = (percentile(&boot_lat, 0.5), percentile(&boot_lat, 0.99));
    println!(
        "| guest boot to NITRILE-SSH-READY after the run (TCG) | {} | {} |",
        ms(b50),
        ms(b99)
    );
    println!(
        "boot share of run + boot (p50): {:.0}%",
        100.0 * b50.as_secs_f64() / (b50 + r50).as_secs_f64()
    );
}

fn main() {
    decisions();
    match std::env::var_os("NITRILE_BIN") {
        Some(bin) => cell_runs(PathBuf::from(bin)),
        None => println!("(b) SKIPPED: NITRILE_BIN names no nitrile binary"),
    }
}
