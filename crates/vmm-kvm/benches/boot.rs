//! VM creation to guest marker with the test guest, and AES-256-XTS bytes/s
//! per core in the block device's data path. Plain `std::time` measurement.
//!
//! Baselines: Firecracker boots Linux to init in <= 125 ms; the encrypted
//! data path should stay within 80% of plain I/O throughput.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nitrile_vmm::{VOLUME_KEY_LEN, VolumeKey};
use nitrile_vmm_kvm::{
    DiskConfig, DiskEncryption, KernelFormat, SectorCipher, TEST_GUEST_ELF, VmConfig, Vmm,
};
use zeroize::Zeroizing;

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn boot_once() -> Option<Duration> {
    let mut kernel = tempfile::tempfile().ok()?;
    kernel.write_all(TEST_GUEST_ELF).ok()?;
    let console = Console::default();
    let start = Instant::now();
    let config = VmConfig {
        memory_bytes: 32 << 20,
        kernel,
        kernel_format: KernelFormat::Elf,
        cmdline: String::new(),
        serial_out: Box::new(console.clone()),
        disks: Vec::new(),
        vsock: None,
    };
    let mut vmm = Vmm::new(config).ok()?;
    vmm.run().ok()?;
    let elapsed = start.elapsed();
    let out = console.0.lock().ok()?.clone();
    out.windows(23)
        .any(|w| w == b"NITRILE-TESTGUEST-READY")
        .then_some(elapsed)
}

fn key() -> Option<VolumeKey> {
    let mut kb = Zeroizing::new([0u8; VOLUME_KEY_LEN]);
    for (i, b) in kb.iter_mut().enumerate() {
        *b = i as u8;
    }
    VolumeKey::from_bytes(&kb[..]).ok()
}

/// The guest writes then reads 16 MiB in 64 KiB requests; returns the run time.
fn blk_bench_once(encrypted: bool) -> Option<Duration> {
    let mut kernel = tempfile::tempfile().ok()?;
    kernel.write_all(TEST_GUEST_ELF).ok()?;
    let disk = tempfile::tempfile().ok()?;
    disk.set_len(32 << 20).ok()?;
    let encryption = if encrypted {
        DiskEncryption::Xts(key()?)
    } else {
        DiskEncryption::DangerPlaintext
    };
    let console = Console::default();
    let config = VmConfig {
        memory_bytes: 32 << 20,
        kernel,
        kernel_format: KernelFormat::Elf,
        cmdline: "blk=bench".into(),
        serial_out: Box::new(console.clone()),
        disks: vec![DiskConfig {
            file: disk,
            encryption,
            read_only: false,
            id: "bench".into(),
        }],
        vsock: None,
    };
    let mut vmm = Vmm::new(config).ok()?;
    let start = Instant::now();
    vmm.run().ok()?;
    let elapsed = start.elapsed();
    let out = console.0.lock().ok()?.clone();
    out.windows(14)
        .any(|w| w == b"BLK-BENCH-DONE")
        .then_some(elapsed)
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// RSS growth per VM and encrypted vs plaintext guest block throughput.
fn kvm_extras() {
    // RSS growth for one live VM after boot: VMM state plus the few guest
    // pages the test guest touches (an upper bound on the VMM's overhead).
    let before = rss_kib().unwrap_or(0);
    let Ok(mut kernel) = tempfile::tempfile() else {
        return;
    };
    if kernel.write_all(TEST_GUEST_ELF).is_err() {
        return;
    }
    let config = VmConfig {
        memory_bytes: 32 << 20,
        kernel,
        kernel_format: KernelFormat::Elf,
        cmdline: String::new(),
        serial_out: Box::new(Console::default()),
        disks: Vec::new(),
        vsock: None,
    };
    if let Ok(mut vmm) = Vmm::new(config) {
        let _ = vmm.run();
        let grown = rss_kib().unwrap_or(0).saturating_sub(before);
        println!(
            "{:<34} {:>9}KiB {:>12} {:>13.3}x",
            "RSS growth per VM (32 MiB guest)",
            grown,
            "-",
            grown as f64 / (5.0 * 1024.0)
        );
        drop(vmm);
    }
    // Interleaved, so load from elsewhere on the machine hits both alike.
    let (mut enc, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        enc.extend(blk_bench_once(true));
        plain.extend(blk_bench_once(false));
    }
    enc.sort();
    plain.sort();
    if enc.is_empty() || plain.is_empty() {
        println!("blk bench: the guest did not finish");
        return;
    }
    // 16 MiB written and 16 MiB read per run.
    let mib_s = |d: Duration| 32.0 / d.as_secs_f64();
    let (e, p) = (percentile(&enc, 0.5), percentile(&plain, 0.5));
    println!(
        "{:<34} {:>7.1}MiB/s {:>12} {:>14}",
        "guest blk, plaintext (danger)",
        mib_s(p),
        "-",
        "-"
    );
    println!(
        "{:<34} {:>7.1}MiB/s {:>12} {:>13.3}x",
        "guest blk, AES-256-XTS",
        mib_s(e),
        "-",
        mib_s(e) / mib_s(p)
    );
}

fn main() {
    println!(
        "{:<34} {:>12} {:>12} {:>14}",
        "measurement", "p50", "p99", "vs baseline"
    );
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        let mut times: Vec<Duration> = (0..30).filter_map(|_| boot_once()).collect();
        times.sort();
        if times.is_empty() {
            println!("boot: the test guest did not reach its marker");
        } else {
            let p50 = percentile(&times, 0.5);
            println!(
                "{:<34} {:>10.2}ms {:>10.2}ms {:>13.3}x",
                "VM create -> guest marker",
                p50.as_secs_f64() * 1e3,
                percentile(&times, 0.99).as_secs_f64() * 1e3,
                p50.as_secs_f64() / 0.125
            );
        }
        kvm_extras();
    } else {
        println!("SKIPPED: no usable /dev/kvm (boot measurement)");
    }

    let Some(key) = key() else { return };
    let Ok(cipher) = SectorCipher::new(&key) else {
        return;
    };
    let mut buf = vec![0x5au8; 1 << 20];
    let mut rates = Vec::new();
    for round in 0..64u64 {
        let start = Instant::now();
        if cipher.encrypt(&mut buf, round * 2048).is_err() {
            return;
        }
        rates.push(start.elapsed());
    }
    rates.sort();
    let mib_s = |d: Duration| 1.0 / d.as_secs_f64();
    println!(
        "{:<34} {:>8.0}MiB/s {:>8.0}MiB/s {:>14}",
        "AES-256-XTS encrypt, one core",
        mib_s(percentile(&rates, 0.5)),
        mib_s(percentile(&rates, 0.99)),
        "-"
    );
}
