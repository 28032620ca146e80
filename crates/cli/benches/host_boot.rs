//! The host image: how long a host takes to boot under TCG, and what takes
//! the room in its image.
//!
//! Provisions a host with `nitrile up` (stopped at once), builds its image
//! with `nitrile image build-host --strip` (this package's `nitrile`
//! binary), then boots it [`RUNS`] times each way, alternately:
//!
//! - `nitrile host boot` (QEMU under TCG, OVMF, swtpm, the UKI as the
//!   firmware's boot option): every run a new machine (fresh firmware
//!   variables and state disk, so every run makes the state filesystem),
//!   the TPM manufactured once beforehand;
//! - the baseline: the same kernel (the UKI's `.linux`, checked against
//!   `reference.json`) and initramfs booted by QEMU's `-kernel`/`-initrd`
//!   under SeaBIOS, with the same devices, swtpm and command line: no UEFI
//!   firmware, no stub.
//!
//! Measured per run, by the time each console line appears (polled every
//! [`POLL`]), from QEMU's start: the first kernel line (`Linux version`:
//! the firmware's and the stub's share, plus the kernel's time before its
//! console is up), the init's first line, the init starting the host agent
//! (after modules, the state filesystem and the measurement), and the host
//! agent serving. Medians of the runs of each way, side by side. Then the
//! image's size: `host.efi` by section (the kernel, the initramfs, the
//! stub), and the initramfs by file, each with its size compressed alone
//! (`zstd -9`, as the initramfs is).
//!
//! Run: `cargo bench -p nitrile-cli --bench host_boot`;
//! `NITRILE_BENCH_QUICK=1` for one run each way. Prints `SKIPPED: <reason>`
//! without QEMU, OVMF, swtpm, the stub, the build tools or the kernel
//! package (`scripts/guest-image.sh`).

#![allow(clippy::disallowed_macros)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NITRILE: &str = env!("CARGO_BIN_EXE_nitrile");
const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Boots of each way.
const RUNS: usize = 3;
/// How often the console log is read.
const POLL: Duration = Duration::from_millis(10);
/// Longest a boot may take until the host agent serves.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Files of the initramfs listed one by one (the largest).
const LISTED: usize = 12;

fn quick() -> bool {
    std::env::var_os("NITRILE_BENCH_QUICK").is_some_and(|v| v == "1")
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

fn prerequisites() -> Result<(), String> {
    for tool in [
        "dpkg-deb",
        "depmod",
        "ldd",
        "zstd",
        "objcopy",
        "mke2fs",
        "qemu-system-x86_64",
        "swtpm",
        "swtpm_setup",
    ] {
        if !on_path(tool) {
            return Err(format!("{tool} is not on PATH (scripts/setup.sh)"));
        }
    }
    for f in [STUB, OVMF_CODE, OVMF_VARS] {
        if !Path::new(f).is_file() {
            return Err(format!("no {f} (scripts/setup.sh)"));
        }
    }
    let cache = nitrile_image::default_cache_dir().map_err(|e| e.to_string())?;
    if nitrile_image::host::cached_kernel_deb(&cache).is_none() {
        return Err("no kernel package in the cache (run scripts/guest-image.sh)".into());
    }
    Ok(())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `nitrile up` once in `dir`, stopped; the host's provisioning directory.
fn provision(dir: &Path) -> PathBuf {
    let state = dir.join("state");
    let mut up = Command::new(NITRILE)
        .args(["up", "--hosts", "1", "--no-network"])
        .args(["--tokend-listen", "127.0.0.1:0"])
        .args(["--tokend-metrics", "127.0.0.1:0"])
        .arg("--hostd-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--logd-listen", "127.0.0.1:0"])
        .args(["--logd-metrics", "127.0.0.1:0"])
        .args(["--witness-listen", "127.0.0.1:0"])
        .args(["--kms-listen", "127.0.0.1:0"])
        .args(["--placed-listen", "127.0.0.1:0"])
        .args(["--deployd-listen", "127.0.0.1:0"])
        .arg("--state")
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("export NITRILE_CONFIG=") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("nitrile up printed no export line");
    // It handles SIGTERM once it printed the line; give it a moment.
    std::thread::sleep(Duration::from_secs(2));
    terminate(&mut up);
    state.join("hosts").join("h1")
}

fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// When each boot step showed on the console, from QEMU's start.
#[derive(Debug, Clone, Copy, Default)]
struct Steps {
    /// The first kernel line.
    kernel: Duration,
    /// The init's first line.
    init: Duration,
    /// The init starting the host agent.
    agent: Duration,
    /// The host agent serving.
    serving: Duration,
}

const MARKERS: [&str; 4] = [
    "Linux version",
    "nitrile host-init: kernel ",
    "nitrile host-init: starting the host agent",
    " serving on ",
];

/// Follows `console` from `started` until the host agent serves.
fn follow(console: &Path, started: Instant, child: &mut Child) -> Steps {
    let mut seen: [Option<Duration>; 4] = [None; 4];
    loop {
        let text = std::fs::read(console).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let at = started.elapsed();
        for (i, m) in MARKERS.iter().enumerate() {
            if seen[i].is_none() && text.contains(m) {
                seen[i] = Some(at);
            }
        }
        if let [Some(kernel), Some(init), Some(agent), Some(serving)] = seen {
            return Steps {
                kernel,
                init,
                agent,
                serving,
            };
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the boot ended ({status}) before the host agent served\n{text}");
        }
        assert!(
            at < BOOT_TIMEOUT,
            "no host agent after {BOOT_TIMEOUT:?}\n{text}"
        );
        std::thread::sleep(POLL);
    }
}

/// One boot with `nitrile host boot` (OVMF, the UKI), as a new machine
/// with the TPM of `machine`.
fn boot_uefi(image: &Path, machine: &Path) -> Steps {
    for stale in ["disk.raw", "OVMF_VARS.fd", "console.log"] {
        let _ = std::fs::remove_file(machine.join(stale));
    }
    let mut child = Command::new(NITRILE)
        .args(["host", "boot", "--quiet", "--image"])
        .arg(image)
        .arg("--tpm-state")
        .arg(machine)
        .arg("--forward")
        .arg(free_port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // QEMU starts right after `host boot` says it boots.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("under QEMU") {
                let _ = tx.send(Instant::now());
            }
        }
    });
    let started = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("nitrile host boot did not start QEMU");
    let steps = follow(&machine.join("console.log"), started, &mut child);
    terminate(&mut child);
    steps
}

/// The baseline: the same kernel and initramfs by QEMU's `-kernel` and
/// `-initrd` (SeaBIOS), the same devices and a TPM of its own.
fn boot_direct(kernel: &Path, initramfs: &Path, cmdline: &str, machine: &Path) -> Steps {
    let tpm = machine.join("tpm");
    nitrile_attest::swtpm::manufacture(&tpm).unwrap();
    let sock = machine.join("swtpm.sock");
    let console = machine.join("console.log");
    let disk = machine.join("disk.raw");
    for stale in [&sock, &console, &disk] {
        let _ = std::fs::remove_file(stale);
    }
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let mut swtpm = Command::new("swtpm")
        .args(["socket", "--tpm2", "--tpmstate"])
        .arg(format!("dir={}", tpm.display()))
        .arg("--ctrl")
        .arg(format!("type=unixio,path={}", sock.display()))
        .arg("--terminate")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max,-la57",
            "-m",
            "1024M",
            "-smp",
            "2",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", cmdline])
        .arg("-chardev")
        .arg(format!("socket,id=chrtpm,path={}", sock.display()))
        .args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm"])
        .args(["-device", "tpm-crb,tpmdev=tpm0"])
        .arg("-drive")
        .arg(format!(
            "if=none,id=state,format=raw,file={}",
            disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=state"])
        .args(["-netdev", "user,id=net0"])
        .args(["-device", "virtio-net-pci,netdev=net0,romfile="])
        .args(["-device", "virtio-rng-pci"])
        .arg("-chardev")
        .arg(format!("file,id=console,path={}", console.display()))
        .args(["-serial", "chardev:console"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let steps = follow(&console, started, &mut qemu);
    terminate(&mut qemu);
    terminate(&mut swtpm);
    steps
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

fn row(name: &str, s: &Steps) {
    println!(
        "| {name} | {} | {} | {} | {} | {} |",
        ms(s.kernel),
        ms(s.init - s.kernel),
        ms(s.agent - s.init),
        ms(s.serving - s.agent),
        ms(s.serving)
    );
}

fn median(runs: &[Steps]) -> Steps {
    let pick = |f: fn(&Steps) -> Duration| {
        let mut v: Vec<Duration> = runs.iter().map(f).collect();
        v.sort();
        v[v.len() / 2]
    };
    Steps {
        kernel: pick(|s| s.kernel),
        init: pick(|s| s.init),
        agent: pick(|s| s.agent),
        serving: pick(|s| s.serving),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / f64::from(1u32 << 20))
}

/// `bytes` compressed alone as the initramfs is (`zstd -9`).
fn zstd_size(bytes: &[u8], scratch: &Path) -> u64 {
    std::fs::write(scratch, bytes).unwrap();
    run(Command::new("zstd")
        .args(["-q", "-9", "-T1", "-c"])
        .arg(scratch))
    .len() as u64
}

fn sizes(image: &Path, reference: &serde_json::Value, scratch: &Path) {
    let efi = std::fs::metadata(image.join("host.efi")).unwrap().len();
    let section = |n: &str| reference["sections"][n]["size"].as_u64().unwrap();
    let sections: u64 = reference["sections"]
        .as_object()
        .unwrap()
        .values()
        .map(|s| s["size"].as_u64().unwrap())
        .sum();
    println!("\nhost.efi: {efi} bytes ({} MiB)\n", mib(efi));
    println!("| part | bytes | MiB |");
    println!("|---|---|---|");
    for (name, bytes) in [
        (".linux (the kernel, bzImage)", section(".linux")),
        (".initrd (the initramfs, zstd -9)", section(".initrd")),
        (
            ".cmdline and .osrel",
            section(".cmdline") + section(".osrel"),
        ),
        ("the stub, headers and alignment", efi - sections),
    ] {
        println!("| {name} | {bytes} | {} |", mib(bytes));
    }

    let cpio = run(Command::new("zstd")
        .args(["-dc", "-q"])
        .arg(image.join("initramfs")));
    let archive = nitrile_image::cpio::parse(&cpio).unwrap();
    let mut files: Vec<(&str, &[u8])> = archive
        .entries()
        .filter_map(|(p, e)| match &e.kind {
            nitrile_image::cpio::EntryKind::File(b) => Some((p, b.as_slice())),
            _ => None,
        })
        .collect();
    files.sort_by_key(|(p, b)| (std::cmp::Reverse(b.len()), *p));
    println!(
        "\ninitramfs: {} entries, {} bytes as cpio ({} MiB), {} compressed\n",
        archive.entries().count(),
        cpio.len(),
        mib(cpio.len() as u64),
        mib(section(".initrd"))
    );
    println!("| file | bytes | MiB | zstd -9 alone, MiB |");
    println!("|---|---|---|---|");
    for (path, bytes) in files.iter().take(LISTED) {
        println!(
            "| /{path} | {} | {} | {} |",
            bytes.len(),
            mib(bytes.len() as u64),
            mib(zstd_size(bytes, scratch))
        );
    }
    let rest: Vec<u8> = files
        .iter()
        .skip(LISTED)
        .flat_map(|(_, b)| b.iter().copied())
        .collect();
    println!(
        "| {} other files | {} | {} | {} |",
        files.len().saturating_sub(LISTED),
        rest.len(),
        mib(rest.len() as u64),
        mib(zstd_size(&rest, scratch))
    );
}

fn main() {
    if let Err(why) = prerequisites() {
        println!("SKIPPED: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let host = provision(tmp.path());
    let image = tmp.path().join("image");
    let built = Instant::now();
    let reference: serde_json::Value = serde_json::from_slice(&run(Command::new(NITRILE)
        .args([
            "-o",
            "json",
            "image",
            "build-host",
            "--strip",
            "--provision",
        ])
        .arg(&host)
        .arg("--out")
        .arg(&image)))
    .unwrap();
    println!(
        "image built in {:.1} s (kernel {})",
        built.elapsed().as_secs_f64(),
        reference["kernel_release"].as_str().unwrap_or("?")
    );

    // The UKI's kernel, for the baseline.
    let kernel = tmp.path().join("vmlinuz");
    run(Command::new("objcopy")
        .args(["-O", "binary", "--only-section=.linux"])
        .arg(image.join("host.efi"))
        .arg(&kernel));
    let mut bytes = std::fs::read(&kernel).unwrap();
    let size = reference["sections"][".linux"]["size"].as_u64().unwrap();
    bytes.truncate(usize::try_from(size).unwrap());
    assert_eq!(
        hex::encode(nitrile_image::pcr::sha256(&bytes)),
        reference["sections"][".linux"]["sha256"].as_str().unwrap(),
        "the kernel taken from host.efi is not its .linux"
    );
    std::fs::write(&kernel, &bytes).unwrap();
    let cmdline = reference["cmdline"].as_str().unwrap().to_owned();

    let uefi_machine = tmp.path().join("machine-uefi");
    let direct_machine = tmp.path().join("machine-direct");
    std::fs::create_dir_all(&direct_machine).unwrap();
    let runs = if quick() { 1 } else { RUNS };
    let (mut uefi, mut direct) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let u = boot_uefi(&image, &uefi_machine);
        println!("run {}: UEFI {} ms to serving", i + 1, ms(u.serving));
        uefi.push(u);
        let d = boot_direct(&kernel, &image.join("initramfs"), &cmdline, &direct_machine);
        println!("run {}: direct {} ms to serving", i + 1, ms(d.serving));
        direct.push(d);
    }

    println!(
        "\nms from QEMU's start (TCG, 2 vCPUs, 1 GiB), each step's own share; \
         median of {runs}\n"
    );
    println!(
        "| boot | to the first kernel line | kernel to init | init to starting the agent | agent to serving | total |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, (u, d)) in uefi.iter().zip(&direct).enumerate() {
        row(&format!("run {}, OVMF + UKI", i + 1), u);
        row(&format!("run {}, -kernel/-initrd (baseline)", i + 1), d);
    }
    let (mu, md) = (median(&uefi), median(&direct));
    row("median, OVMF + UKI", &mu);
    row("median, -kernel/-initrd (baseline)", &md);
    println!(
        "\nthe firmware's and the stub's share (medians, first kernel line): {} ms of {} ms ({:.0}%); \
         to serving, {:.2}x the baseline",
        ms(mu.kernel.saturating_sub(md.kernel)),
        ms(mu.serving),
        100.0 * mu.kernel.saturating_sub(md.kernel).as_secs_f64() / mu.serving.as_secs_f64(),
        mu.serving.as_secs_f64() / md.serving.as_secs_f64()
    );

    sizes(&image, &reference, &tmp.path().join("scratch"));
}
