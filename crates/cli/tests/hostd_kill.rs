//! Claim 6 against the real binary: `kill -9` of the host agent during a
//! load of mutating calls, then a restart on the same state. Every QEMU
//! process of the host has a durable launch or start request record written
//! before it started; every instance directory has its own launch request
//! record; every instance running after the restart was re-adopted (the
//! same QEMU process as before the kill); the journal verifies; and after
//! terminating everything no QEMU of the test remains.
//!
//! Needs QEMU and the guest image; prints `SKIPPED: <reason>` without them.

// The test prints for the person running it; the rule that everything goes
// through the output layer is for the binary.
#![allow(clippy::disallowed_macros)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod cell;
use cell::{Cell, cmdline, start_time};

/// Guest memory: what the vmm tests boot the Debian guest with at least.
const MEMORY: &str = "128M";
/// The instance left running through the kill, so that re-adoption is
/// always tested.
const STEADY: &str = "steady";
/// Threads cycling instances (launch, stop, start, terminate), each with at
/// most one instance: with [`STEADY`], at most 3 at once.
const CYCLERS: usize = 2;
/// Kill once this many mutations succeeded and some are in flight.
const KILL_AFTER_OK: usize = 5;
const KILL_WHEN_IN_FLIGHT: usize = 2;
const LOAD_TIMEOUT: Duration = Duration::from_secs(400);
/// Slack between the record clock and `/proc`'s start times (10 ms ticks,
/// boot time read from `/proc/uptime` at 10 ms).
const CLOCK_SLACK_SECS: f64 = 0.05;

/// Seconds since the epoch of an RFC 3339 time.
fn epoch_secs(rfc3339: &str) -> f64 {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339}: {e}"));
    t.unix_timestamp_nanos() as f64 / 1e9
}

/// The wall-clock start of a process, from its start time in clock ticks.
fn started_at(ticks: u64) -> f64 {
    let hz: f64 = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    now - uptime + ticks as f64 / hz
}

/// A QEMU process of the cell, with the instance it runs.
#[derive(Debug, Clone, PartialEq)]
struct Qemu {
    pid: u32,
    ticks: u64,
    instance: String,
}

/// The live QEMU processes whose command line names the cell's directory.
fn qemus(cell: &Cell) -> Vec<Qemu> {
    let mut found = Vec::new();
    for pid in cell.processes() {
        let Some(cmd) = cmdline(pid) else { continue };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args[0].ends_with("qemu-system-x86_64") {
            continue;
        }
        let joined = args.join(" ");
        let instance = joined
            .split("/vms/")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("no vms/<instance> in {joined}"))
            .to_owned();
        let Some(ticks) = start_time(pid) else {
            continue;
        };
        found.push(Qemu {
            pid,
            ticks,
            instance,
        });
    }
    found.sort_by_key(|q| q.ticks);
    found
}

/// The QEMU pid that the backend recorded for an instance.
fn recorded_qemu_pid(cell: &Cell, instance: &str) -> Option<u64> {
    let bytes = std::fs::read(cell.vm_dir(instance).join("vmm.json")).ok()?;
    let record: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    record["qemu"]["pid"]
        .as_u64()
        .or_else(|| record["spawned"]["pid"].as_u64())
}

/// The persisted instance records: name -> record (None when the directory
/// exists without its first record).
fn instance_dirs(host_dir: &Path) -> BTreeMap<String, Option<serde_json::Value>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(host_dir.join("instances")) else {
        return out;
    };
    for entry in entries {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let record = std::fs::read(entry.path().join("instance.json"))
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap());
        out.insert(name, record);
    }
    out
}

/// Request records (durable before anything ran) of `op`, leaving out
/// those whose outcome says they were refused at the state step (a drained
/// host, a name in use: nothing was created).
fn requests<'a>(
    records: &'a [serde_json::Value],
    op: &'a str,
) -> impl Iterator<Item = &'a serde_json::Value> + 'a {
    let refused: std::collections::BTreeSet<&str> = records
        .iter()
        .filter(|r| r["kind"] == "outcome" && r["detail"]["step"] == "state")
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    records.iter().filter(move |r| {
        r["kind"] == "request"
            && r["operations"][0] == op
            && !r["request_id"]
                .as_str()
                .is_some_and(|id| refused.contains(id))
    })
}

/// What the load did, for the failure messages.
#[derive(Default)]
struct Load {
    ok: AtomicUsize,
    in_flight: AtomicUsize,
    stop: AtomicBool,
    log: Mutex<Vec<String>>,
}

impl Load {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

#[test]
fn kill_9_of_hostd_during_mutations_leaves_no_operation_without_its_request_record() {
    let _ = guest_or_skip!();
    // Room for the steady instance and one per cycler (1 vCPU each).
    let mut cell = Cell::separate(|toml| format!("{toml}\n[capacity]\nvcpus = 4\n"));
    let (placement, alice, image) = {
        let c = &cell;
        let described: nitrile_api::admin::HostDescription =
            serde_json::from_str(&c.ok(&c.alice, &["host", "describe", "-o", "json"])).unwrap();
        let image = described
            .images
            .first()
            .expect("nitrile up imported the guest image")
            .digest
            .to_string();
        c.ok(
            &c.placement,
            &[
                "instance", "launch", STEADY, "--image", &image, "--memory", MEMORY,
            ],
        );
        (c.placement.clone(), c.alice.clone(), image)
    };

    // The load: cyclers and a drainer, each a thread of CLI calls.
    let load = Arc::new(Load::default());
    let mut threads = Vec::new();
    for i in 0..CYCLERS {
        let (load, placement, image) = (Arc::clone(&load), placement.clone(), image.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0;
            while !load.stopped() {
                let name = format!("c{i}n{n}");
                n += 1;
                // Volumes are the cell's: one of its own per instance,
                // created by the launch, kept by terminate, then deleted.
                let volume = format!("{name}-data");
                let launched = load.call_cli(
                    &placement,
                    &[
                        "instance",
                        "launch",
                        &name,
                        "--image",
                        &image,
                        "--memory",
                        MEMORY,
                        "--volume",
                        &format!("{volume}=8M"),
                    ],
                );
                if !launched {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                for verb in ["stop", "start", "terminate"] {
                    if load.stopped() {
                        break;
                    }
                    load.call_cli(&placement, &["instance", verb, &name]);
                }
                if !load.stopped() {
                    load.call_cli(&placement, &["volume", "delete", &volume]);
                }
            }
        }));
    }
    {
        let (load, alice) = (Arc::clone(&load), alice.clone());
        threads.push(std::thread::spawn(move || {
            while !load.stopped() {
                for verb in ["drain", "undrain"] {
                    load.call_cli(&alice, &["host", verb]);
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }));
    }

    let deadline = Instant::now() + LOAD_TIMEOUT;
    while load.ok.load(Ordering::SeqCst) < KILL_AFTER_OK
        || load.in_flight.load(Ordering::SeqCst) < KILL_WHEN_IN_FLIGHT
    {
        assert!(
            Instant::now() < deadline,
            "the load never got going: {:#?}\n{}",
            load.log.lock().unwrap(),
            cell.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (done_at_kill, in_flight_at_kill) = (
        load.ok.load(Ordering::SeqCst),
        load.in_flight.load(Ordering::SeqCst),
    );
    cell.kill_hostd();
    load.stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let log = load.log.lock().unwrap().join("\n");

    // What exists now, with no host agent running: QEMU processes, instance
    // directories, the journal as it is on disk.
    let before = qemus(&cell);
    let dirs = instance_dirs(&cell.host_dir());
    let records = cell.journal(&cell.host_journal());
    assert!(
        before.iter().any(|q| q.instance == STEADY),
        "{before:?}\n{log}"
    );

    println!(
        "killed with {} calls done, {} in flight: {} QEMU, {} instance directories, {} journal records",
        done_at_kill,
        in_flight_at_kill,
        before.len(),
        dirs.len(),
        records.len()
    );

    // Every QEMU process has a durable launch or start request record
    // written before it started.
    for q in &before {
        let start = started_at(q.ticks) + CLOCK_SLACK_SECS;
        let launched_at = dirs
            .get(&q.instance)
            .and_then(|r| r.as_ref())
            .and_then(|r| r["launched_at"].as_str())
            .map(epoch_secs);
        let resource = format!("instance/{}", q.instance);
        let has_record = requests(&records, "instance.start").any(|r| {
            r["resources"][0] == resource.as_str()
                && epoch_secs(r["time"].as_str().unwrap()) <= start
        }) || requests(&records, "instance.launch").any(|r| {
            let t = epoch_secs(r["time"].as_str().unwrap());
            t <= start && launched_at.is_none_or(|l| t <= l)
        });
        assert!(
            has_record,
            "QEMU {q:?} runs without a request record before it\n{records:#?}\n{log}"
        );
    }
    // Every instance directory has a launch request record of its own
    // (names are never reused here): earliest-deadline matching.
    let mut deadlines: Vec<(f64, &String)> = dirs
        .iter()
        .map(|(name, r)| {
            let at = r
                .as_ref()
                .and_then(|r| r["launched_at"].as_str())
                .map_or(f64::INFINITY, epoch_secs);
            (at, name)
        })
        .collect();
    deadlines.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut launches: Vec<f64> = requests(&records, "instance.launch")
        .map(|r| epoch_secs(r["time"].as_str().unwrap()))
        .collect();
    launches.sort_by(f64::total_cmp);
    for (next, (at, name)) in deadlines.iter().enumerate() {
        assert!(
            next < launches.len() && launches[next] <= *at,
            "instance {name} (launched at {at}) has no launch request record of its own: \
             {} instance directories, {} launch requests\n{log}",
            deadlines.len(),
            launches.len()
        );
    }
    assert!(
        dirs.len() >= 2,
        "the load launched too little: {dirs:?}\n{log}"
    );

    // Restart on the same state.
    cell.start_hostd();
    let list: nitrile_api::admin::InstanceList =
        serde_json::from_str(&cell.ok(&cell.alice, &["instance", "list", "-o", "json"])).unwrap();
    let after = qemus(&cell);
    let mut running = 0;
    for i in &list.instances {
        let name = i.instance.as_str();
        if i.state != nitrile_api::admin::InstanceState::Running {
            continue;
        }
        running += 1;
        let q = before
            .iter()
            .find(|q| q.instance == name)
            .unwrap_or_else(|| {
                panic!("{name} runs after the restart but had no QEMU before\n{log}")
            });
        assert_eq!(
            recorded_qemu_pid(&cell, name),
            Some(u64::from(q.pid)),
            "{name} was not re-adopted"
        );
        assert_eq!(
            start_time(q.pid),
            Some(q.ticks),
            "{name}: QEMU {q:?} is not the same"
        );
        let described = cell.ok(&cell.placement, &["instance", "describe", name]);
        assert!(described.contains("running"), "{described}");
    }
    assert!(running >= 1, "{list:?}");
    // No QEMU runs that the agent does not count as running.
    for q in &after {
        assert!(
            list.instances
                .iter()
                .any(|i| i.instance.as_str() == q.instance
                    && i.state == nitrile_api::admin::InstanceState::Running),
            "QEMU {q:?} runs but its instance is not running: {list:?}"
        );
    }
    let report = cell.verify_journal(&cell.host_journal());
    assert!(report["records"].as_u64().unwrap() >= records.len() as u64);

    // Terminate everything: nothing of this test keeps running.
    for i in &list.instances {
        if i.state != nitrile_api::admin::InstanceState::Terminated {
            cell.ok(
                &cell.placement,
                &["instance", "terminate", i.instance.as_str()],
            );
        }
    }
    let left: Vec<Qemu> = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = qemus(&cell);
            if left.is_empty() || Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(left.is_empty(), "QEMU left after terminating all: {left:?}");
    cell.verify_journal(&cell.host_journal());
}

impl Load {
    /// One CLI call as the principal of `config`, counted; whether it
    /// succeeded.
    fn call_cli(&self, config: &Path, args: &[&str]) -> bool {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let out = std::process::Command::new(cell::NITRILE)
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let ok = out.status.success();
        if ok {
            self.ok.fetch_add(1, Ordering::SeqCst);
        }
        let err = String::from_utf8_lossy(&out.stderr);
        self.log
            .lock()
            .unwrap()
            .push(format!("{args:?}: {}", if ok { "ok" } else { err.trim() }));
        ok
    }
}
