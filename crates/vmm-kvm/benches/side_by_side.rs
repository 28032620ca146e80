//! The same test guest under our VMM and under QEMU `-M microvm`, side by
//! side: process start to the guest's `NITRILE-TESTGUEST-READY` marker on the
//! serial port, and the VMM process's resident memory once the guest is done.
//!
//! Rows:
//! - `ours (ELF entry)`: this binary re-executed as a child that builds a VM
//!   with [`Vmm::new`], 64-bit entry, serial to stdout, and runs it;
//! - `ours (PVH entry)`: the same, entering through the guest's PVH note (the
//!   path QEMU uses);
//! - `qemu microvm, KVM`: `-accel kvm -cpu host,-arch-capabilities` (the
//!   software KVM some hosts run rejects the ARCH_CAPABILITIES MSR that
//!   `-cpu max`/`host` set), PVH entry through QEMU's firmware;
//! - `qemu microvm, TCG`: `-accel tcg -cpu max,-la57`.
//!
//! Memory: guest RAM is 32 MiB in every row, of which the test guest touches
//! under 0.2 MiB (its image, page tables and stack), so `VmRSS` is reported
//! as is and is an upper bound on the VMM's own overhead. `RssAnon` excludes
//! shared library text. QEMU's figure also holds its firmware's guest pages.
//! Ours is read by the child after the run; QEMU's at the marker (the guest
//! then halts with interrupts off and QEMU is killed).
//!
//! Runs: `NITRILE_BENCH_RUNS` (default 20; QEMU with KVM at most 3 since
//! its firmware alone takes seconds under a software KVM). Baselines:
//! Firecracker boots Linux to init in <= 125 ms with <= 5 MiB overhead.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nitrile_vmm_kvm::{KernelFormat, TEST_GUEST_ELF, VmConfig, Vmm};

const MARKER: &str = "NITRILE-TESTGUEST-READY";
const CHILD_ENV: &str = "NITRILE_SIDE_BY_SIDE_CHILD";
const GUEST_MIB: u64 = 32;
const TIMEOUT: Duration = Duration::from_secs(60);

/// The child: one VM with the test guest, serial on stdout, then its own
/// memory figures as `RSS <VmRSS KiB> <RssAnon KiB>`.
fn child(format: &str) -> std::process::ExitCode {
    let kernel_format = if format == "pvh" {
        KernelFormat::Pvh
    } else {
        KernelFormat::Elf
    };
    let run = || -> Option<()> {
        let mut kernel = tempfile::tempfile().ok()?;
        kernel.write_all(TEST_GUEST_ELF).ok()?;
        let config = VmConfig {
            memory_bytes: GUEST_MIB << 20,
            kernel,
            kernel_format,
            cmdline: String::new(),
            serial_out: Box::new(std::io::stdout()),
            disks: Vec::new(),
            vsock: None,
        };
        let mut vmm = Vmm::new(config).ok()?;
        vmm.run().ok()?;
        let (rss, anon) = rss_kib(std::process::id())?;
        println!("RSS {rss} {anon}");
        drop(vmm);
        Some(())
    };
    match run() {
        Some(()) => std::process::ExitCode::SUCCESS,
        None => std::process::ExitCode::FAILURE,
    }
}

/// `VmRSS` and `RssAnon` of `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("VmRSS:")?, field("RssAnon:")?))
}

struct Sample {
    to_marker: Duration,
    rss_kib: u64,
    anon_kib: u64,
}

/// Spawns `cmd`, waits for the marker on its stdout and measures memory:
/// from the child's own `RSS` line if `self_reported`, else at the marker.
fn measure(mut cmd: Command, self_reported: bool) -> Result<Sample, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut proc = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let stdout = proc.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(MARKER) {
                let _ = tx.send((Instant::now(), None));
            } else if let Some(rest) = line.strip_prefix("RSS ") {
                let mut it = rest.split_whitespace().filter_map(|v| v.parse().ok());
                if let (Some(rss), Some(anon)) = (it.next(), it.next()) {
                    let _ = tx.send((Instant::now(), Some((rss, anon))));
                }
            }
        }
    });
    let result = (|| {
        let (at, _) = rx
            .recv_timeout(TIMEOUT)
            .map_err(|_| "no marker before the timeout".to_owned())?;
        let to_marker = at - start;
        let (rss_kib, anon_kib) = if self_reported {
            rx.recv_timeout(TIMEOUT)
                .ok()
                .and_then(|(_, m)| m)
                .ok_or("the child did not report its memory")?
        } else {
            rss_kib(proc.id()).ok_or("no /proc status")?
        };
        Ok(Sample {
            to_marker,
            rss_kib,
            anon_kib,
        })
    })();
    finish(&mut proc);
    result
}

fn finish(proc: &mut Child) {
    if let Ok(None) = proc.try_wait() {
        let _ = proc.kill();
    }
    let _ = proc.wait();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Row {
    name: String,
    p50: Duration,
    p99: Duration,
    rss_kib: u64,
    anon_kib: u64,
}

fn series(
    name: &str,
    runs: usize,
    mut make: impl FnMut() -> Command,
    self_rep: bool,
) -> Option<Row> {
    let mut times = Vec::new();
    let mut rss = Vec::new();
    let mut anon = Vec::new();
    let mut last_err = None;
    for _ in 0..runs {
        match measure(make(), self_rep) {
            Ok(s) => {
                times.push(s.to_marker);
                rss.push(s.rss_kib);
                anon.push(s.anon_kib);
            }
            Err(e) => last_err = Some(e),
        }
    }
    if times.is_empty() {
        println!(
            "{name}: no run reached the marker ({})",
            last_err.unwrap_or_default()
        );
        return None;
    }
    times.sort();
    rss.sort_unstable();
    anon.sort_unstable();
    Some(Row {
        name: format!("{name} ({}/{runs})", times.len()),
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
        rss_kib: rss[rss.len() / 2],
        anon_kib: anon[anon.len() / 2],
    })
}

fn print_row(r: &Row) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{:<30} {:>10.2}ms {:>10.2}ms {:>9}KiB {:>9}KiB",
        r.name,
        ms(r.p50),
        ms(r.p99),
        r.rss_kib,
        r.anon_kib,
    );
}

fn print_ratio(ours: &Row, qemu: &Row) {
    println!(
        "{:<30} / {:<26} p50 {:.3}x  VmRSS {:.3}x  RssAnon {:.3}x",
        ours.name,
        qemu.name,
        ours.p50.as_secs_f64() / qemu.p50.as_secs_f64(),
        ours.rss_kib as f64 / qemu.rss_kib as f64,
        ours.anon_kib as f64 / qemu.anon_kib.max(1) as f64,
    );
}

fn qemu(guest: &std::path::Path, accel: &str, cpu: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,pit=off,pic=off,rtc=off"])
        .args(["-accel", accel, "-cpu", cpu])
        .args(["-m", &format!("{GUEST_MIB}M")])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(guest);
    cmd
}

fn main() -> std::process::ExitCode {
    if let Ok(format) = std::env::var(CHILD_ENV) {
        return child(&format);
    }
    let runs: usize = std::env::var("NITRILE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(20);
    println!(
        "{:<30} {:>12} {:>12} {:>12} {:>12}",
        "process start -> marker", "p50", "p99", "VmRSS", "RssAnon"
    );
    let mut ours = Vec::new();
    let kvm_ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    match std::env::current_exe() {
        Ok(exe) if kvm_ok => {
            for (name, format) in [("ours (ELF entry)", "elf"), ("ours (PVH entry)", "pvh")] {
                let make = || {
                    let mut c = Command::new(&exe);
                    c.env(CHILD_ENV, format);
                    c
                };
                ours.extend(series(name, runs, make, true));
            }
        }
        Ok(_) => println!("SKIPPED: no usable /dev/kvm (our VMM)"),
        Err(e) => println!("SKIPPED: cannot re-execute the benchmark ({e})"),
    }
    let mut qemus = Vec::new();
    let dir = tempfile::tempdir().ok();
    let guest = dir.as_ref().map(|d| d.path().join("testguest.elf"));
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match guest {
        Some(g) if have_qemu && std::fs::write(&g, TEST_GUEST_ELF).is_ok() => {
            if kvm_ok {
                let make = || qemu(&g, "kvm", "host,-arch-capabilities");
                qemus.extend(series("qemu microvm, KVM", runs.min(3), make, false));
            }
            let make = || qemu(&g, "tcg", "max,-la57");
            qemus.extend(series("qemu microvm, TCG", runs, make, false));
        }
        _ => println!("SKIPPED: no qemu-system-x86_64"),
    }
    for r in qemus.iter().chain(&ours) {
        print_row(r);
    }
    println!("ratios (ours / QEMU; below 1 means ours is faster or smaller):");
    for r in &ours {
        for q in &qemus {
            print_ratio(r, q);
        }
    }
    for r in &ours {
        println!(
            "{:<30} {:>12.3}x of the 125 ms Firecracker anchor, {:.3}x of 5 MiB",
            r.name,
            r.p50.as_secs_f64() / 0.125,
            r.rss_kib as f64 / 5120.0
        );
    }
    std::process::ExitCode::SUCCESS
}
