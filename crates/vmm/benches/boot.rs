//! QEMU backend: process start to the Debian guest's readiness marker, and
//! QEMU's resident memory at that point, over a few boots.
//!
//! Baseline: ~3 s boot-to-marker under TCG, measured with plain QEMU on an
//! idle machine. Boots: `NITRILE_BENCH_BOOTS` (default 5). Prints
//! `SKIPPED: <reason>` without QEMU or the guest image.

use std::time::{Duration, Instant};

use nitrile_vmm::{Hypervisor, QemuBackend};

#[path = "../tests/common/mod.rs"]
mod common;

const BASELINE: Duration = Duration::from_secs(3);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let env = match common::env() {
        Ok(e) => e,
        Err(reason) => {
            println!("SKIPPED: {reason}");
            return;
        }
    };
    let boots: usize = std::env::var("NITRILE_BENCH_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let hv = QemuBackend::new(dir.path().join("vms"), &env.qemu, &env.launcher)
        .expect("qemu backend")
        .with_accel(env.accel);
    let mut times = Vec::new();
    let mut rss = Vec::new();
    for n in 0..boots {
        let spec = common::spec(&env, &format!("bench-{n}"), None, None);
        let t0 = Instant::now();
        let id = hv.create(&spec).expect("create").id;
        hv.start(&id).expect("start");
        let serial = hv.vm_dir(&id).join("serial.log");
        loop {
            let text = std::fs::read(&serial).unwrap_or_default();
            if String::from_utf8_lossy(&text)
                .lines()
                .any(|l| l.trim() == common::READY)
            {
                break;
            }
            assert!(t0.elapsed() < common::BOOT_TIMEOUT, "boot {n} timed out");
            std::thread::sleep(Duration::from_millis(10));
        }
        times.push(t0.elapsed());
        rss.push(hv.qemu_pid(&id).map(rss_kib).unwrap_or(0));
        hv.destroy(&id).expect("destroy");
    }
    times.sort();
    rss.sort_unstable();
    let p50 = percentile(&times, 0.5);
    let p99 = percentile(&times, 0.99);
    println!(
        "qemu backend ({:?}), {boots} boots, 1 vCPU, 256 MiB",
        env.accel
    );
    println!(
        "{:<28} {:>10} {:>10} {:>12}",
        "metric", "p50", "p99", "vs baseline"
    );
    println!(
        "{:<28} {:>9.2}s {:>9.2}s {:>11.2}x",
        "start to guest marker",
        p50.as_secs_f64(),
        p99.as_secs_f64(),
        p50.as_secs_f64() / BASELINE.as_secs_f64()
    );
    println!(
        "{:<28} {:>8}MiB {:>8}MiB {:>12}",
        "QEMU RSS at marker",
        rss[rss.len() / 2] / 1024,
        rss[rss.len() - 1] / 1024,
        "-"
    );
}
