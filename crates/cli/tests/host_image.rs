//! The host image (`nitrile image build-host`) and a host booted from it
//! (`nitrile host boot`, QEMU under TCG with OVMF and swtpm).
//!
//! - The initramfs holds `nitrile`, `mke2fs`, their libraries, kernel
//!   modules, the provisioning directory and empty mount points: every
//!   entry is accounted for, and there is no shell or other tool.
//! - Two builds from the same inputs give the same bytes.
//! - A booted host, on a tap in a network namespace, has exactly one open
//!   TCP port (the host agent's) of all 65535, answers UDP probes of a
//!   representative set of ports (1-1024 and well-known higher ones) with
//!   ICMP port unreachable, and neither echoes nor answers what is typed on
//!   its serial console; its PCRs 4 and 11 (as its init reads them from the
//!   TPM) are the ones `reference.json` predicts, and its init extended
//!   PCR 15 to the predicted value.
//! - Through the CLI, with a token from the cell's token service: `nitrile
//!   host attest` returns a quote of PCRs 4, 11 and 15 and the init's event
//!   log, and `nitrile host verify-attestation` against `reference.json`
//!   finds all three PCRs matching and the log replaying to PCR 15.
//! - An image whose initramfs differs by one byte (in `nitrile`) predicts
//!   another PCR 11 (and PCR 4), the same PCR 15, and the booted host's
//!   attestation fails verification against its reference on PCR 11.
//! - `nitrile host shutdown`: the host agent answers and exits, the init
//!   powers the machine off, and QEMU exits 0 by itself.
//!
//! The PCR 4 prediction follows OVMF's event log, which the host's init
//! prints: `EV_EFI_ACTION "Calling EFI Application from Boot Option"`,
//! `EV_SEPARATOR` (four zero bytes), `EV_EFI_BOOT_SERVICES_APPLICATION` of
//! `host.efi` (its Authenticode hash), then, after the stub's eight
//! `EV_IPL` events of PCR 11 (for `.linux`, `.osrel`, `.cmdline` and
//! `.initrd` in that order: the section name with its NUL, then its
//! contents), `EV_EFI_BOOT_SERVICES_APPLICATION` of the kernel, which the
//! stub starts through the firmware's LoadImage.
//!
//! Prints `SKIPPED: <reason>` without root, QEMU, OVMF, swtpm, the stub,
//! the build tools or the kernel package (`scripts/guest-image.sh`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod cell;
use cell::{Cell, NITRILE, skipped};

const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
const OVMF: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Longest a boot under TCG may take until the host agent serves.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest the host may take from `host shutdown` to QEMU's exit.
const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(120);
/// The host's and the namespace's addresses.
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 91, 0, 2);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 91, 0, 1);
/// The first of the extra addresses UDP probes come from (each address
/// gets its own ICMP rate limit in the host: one answer a second after a
/// burst of six).
const FIRST_PROBE_SOURCE: u8 = 100;
const PROBE_SOURCES: u8 = 64;
/// Names no host image may hold.
const FORBIDDEN: &[&str] = &[
    "sh", "bash", "dash", "ash", "zsh", "busybox", "getty", "agetty", "login", "sshd", "ssh",
    "dropbear", "su", "sudo", "apt", "apt-get", "dpkg", "rpm", "gdb", "strace", "ltrace",
    "python3", "perl", "nc", "socat", "telnetd",
];

/// A line for the person running the tests.
#[allow(clippy::disallowed_macros)]
fn note(line: &str) {
    println!("{line}");
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// Why the image cannot be built here, if it cannot.
fn build_prerequisites() -> Result<(), String> {
    for tool in ["dpkg-deb", "depmod", "ldd", "zstd", "objcopy", "mke2fs"] {
        if !on_path(tool) {
            return Err(format!("{tool} is not on PATH (scripts/setup.sh)"));
        }
    }
    if !Path::new(STUB).is_file() {
        return Err(format!("no UEFI stub {STUB} (install systemd-boot-efi)"));
    }
    let cache = nitrile_image::default_cache_dir().map_err(|e| e.to_string())?;
    if nitrile_image::host::cached_kernel_deb(&cache).is_none() {
        return Err("no kernel package in the cache (run scripts/guest-image.sh)".into());
    }
    Ok(())
}

/// Why a host cannot be booted here, if it cannot.
fn boot_prerequisites() -> Result<(), String> {
    build_prerequisites()?;
    if !nix::unistd::geteuid().is_root() {
        return Err("booting a host on a tap in a network namespace needs root".into());
    }
    for tool in ["qemu-system-x86_64", "swtpm", "swtpm_setup", "ip"] {
        if !on_path(tool) {
            return Err(format!("{tool} is not on PATH (scripts/setup.sh)"));
        }
    }
    if !Path::new(OVMF).is_file() {
        return Err(format!("no OVMF firmware {OVMF} (install ovmf)"));
    }
    Ok(())
}

/// A provisioned host directory: `nitrile up` run once and stopped.
fn provisioned_cell() -> Cell {
    let mut cell = Cell::up();
    cell.stop_up();
    cell
}

fn build(cell: &Cell, out: &Path, extra: &[&str]) -> serde_json::Value {
    let o = Command::new(NITRILE)
        .args(["image", "build-host", "--strip", "--provision"])
        .arg(cell.host_dir())
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "build-host failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&std::fs::read(out.join("reference.json")).unwrap()).unwrap()
}

/// [`build`] of the binary `nitrile` as it is (no `--strip`).
fn build_with(cell: &Cell, out: &Path, nitrile: &Path, extra: &[&str]) -> serde_json::Value {
    let o = Command::new(NITRILE)
        .args(["image", "build-host", "--provision"])
        .arg(cell.host_dir())
        .arg("--out")
        .arg(out)
        .arg("--nitrile")
        .arg(nitrile)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "build-host failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&std::fs::read(out.join("reference.json")).unwrap()).unwrap()
}

/// The initramfs's cpio archive, decompressed.
fn unpacked(initramfs: &Path) -> Vec<u8> {
    let o = Command::new("zstd")
        .args(["-dc", "-q"])
        .arg(initramfs)
        .output()
        .unwrap();
    assert!(o.status.success());
    o.stdout
}

fn unpack(initramfs: &Path) -> nitrile_image::cpio::Archive {
    nitrile_image::cpio::parse(&unpacked(initramfs)).unwrap()
}

/// What an initramfs entry is, or `None` when it is not one the image may
/// hold.
fn account(path: &str, entry: &nitrile_image::cpio::Entry) -> Option<&'static str> {
    use nitrile_image::cpio::EntryKind as K;
    let name = path.rsplit('/').next().unwrap_or(path);
    match (&entry.kind, path) {
        (K::Dir, _) => Some("directory"),
        (K::Symlink(t), "init") if t == "usr/bin/nitrile" => Some("init"),
        (K::CharDevice(5, 1), "dev/console") => Some("console"),
        (K::File(_), "usr/bin/nitrile") => Some("nitrile"),
        (K::File(_), "usr/sbin/mke2fs") => Some("mke2fs"),
        (K::File(_), p)
            if (p.starts_with("lib/x86_64-linux-gnu/") || p.starts_with("lib64/"))
                && name.contains(".so") =>
        {
            Some("library")
        }
        (K::File(_), p)
            if p.starts_with("lib/modules/")
                && (name.ends_with(".ko.xz") || name == "modules.load") =>
        {
            Some("module")
        }
        (K::File(_), p) if p.starts_with("etc/nitrile/host/") => Some("provisioning"),
        _ => None,
    }
}

#[test]
fn the_host_image_holds_only_nitrile_and_builds_reproducibly() {
    if let Err(why) = build_prerequisites() {
        skipped(&why);
        return;
    }
    let cell = provisioned_cell();
    let a = cell.root().join("image-a");
    let b = cell.root().join("image-b");
    let ref_a = build(&cell, &a, &[]);
    let ref_b = build(&cell, &b, &[]);
    for f in ["initramfs", "host.efi", "reference.json"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs between two builds"
        );
    }
    assert_eq!(ref_a, ref_b);

    let archive = unpack(&a.join("initramfs"));
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for (path, entry) in archive.entries() {
        let name = path.rsplit('/').next().unwrap_or(path);
        assert!(!FORBIDDEN.contains(&name), "{path} is in the host image");
        let kind = account(path, entry)
            .unwrap_or_else(|| panic!("{path} ({entry:?}) is not accounted for"));
        *kinds.entry(kind).or_default() += 1;
    }
    for mount in ["proc", "sys", "dev", "run", "tmp", "var/lib/nitrile"] {
        assert!(
            matches!(
                archive.get(mount).map(|e| &e.kind),
                Some(nitrile_image::cpio::EntryKind::Dir)
            ),
            "no mount point {mount}"
        );
        assert!(
            !archive
                .entries()
                .any(|(p, _)| p.starts_with(&format!("{mount}/"))
                    && !(mount == "dev" && p == "dev/console")),
            "{mount} is not empty"
        );
    }
    for f in [
        "hostd.toml",
        "ca.pem",
        "host.pem",
        "host.key",
        "issuer-keys.toml",
    ] {
        assert!(
            archive.get(&format!("etc/nitrile/host/{f}")).is_some(),
            "no {f}"
        );
    }
    assert_eq!(
        archive.get("etc/nitrile/host/host.key").unwrap().perm,
        0o600
    );
    assert!(kinds["library"] >= 2 && kinds["module"] >= 2, "{kinds:?}");
    // tpm2-tss opens the TPM device's TCTI with dlopen: ldd does not name it.
    assert!(
        archive
            .entries()
            .any(|(p, _)| p.ends_with("/libtss2-tcti-device.so.0")),
        "no TCTI of the TPM device"
    );
    let config = String::from_utf8_lossy(
        match &archive.get("etc/nitrile/host/hostd.toml").unwrap().kind {
            nitrile_image::cpio::EntryKind::File(b) => b,
            _ => panic!("hostd.toml is not a file"),
        },
    )
    .into_owned();
    assert!(
        config.contains("[tpm]")
            && config.contains("tcti = \"device:/dev/tpmrm0\"")
            && config.contains("event_log = \"/run/nitrile/init-events.jsonl\""),
        "{config}"
    );
    note(&format!("host image entries: {kinds:?}"));
}

/// The namespace, its tap and addresses; removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn ip(&self, args: &[&str]) {
        let s = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .status()
            .unwrap();
        assert!(s.success(), "ip -n {} {args:?}", self.name);
    }

    fn new(name: &str, tap: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        assert!(
            Command::new("ip")
                .args(["netns", "add", name])
                .status()
                .unwrap()
                .success()
        );
        let ns = Self { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        ns.ip(&["addr", "add", &format!("{GATEWAY}/24"), "dev", tap]);
        for i in 0..PROBE_SOURCES {
            let a = Ipv4Addr::new(10, 91, 0, FIRST_PROBE_SOURCE + i);
            ns.ip(&["addr", "add", &format!("{a}/24"), "dev", tap]);
        }
        ns.ip(&["link", "set", tap, "up"]);
        ns
    }

    /// Runs `f` on a thread in the namespace (threads it starts are in it
    /// too).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let (fd, _) = nitrile_vmm_sys::netns::open_or_create(&self.name).unwrap();
        nitrile_vmm_sys::netns::run_in(fd.as_fd(), f).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `nitrile host boot`; SIGTERM on drop.
struct Booted {
    child: Child,
}

impl Booted {
    /// `nitrile host boot` of `image` on the machine `machine` (its TPM and
    /// disk), its NIC on `tap` in `ns`, its own output in `log`.
    fn start(
        ns: &Netns,
        image: &Path,
        machine: &Path,
        tap: &str,
        log: &Path,
        extra: &[&str],
    ) -> Self {
        Self {
            child: Command::new("ip")
                .args([
                    "netns", "exec", &ns.name, NITRILE, "host", "boot", "--quiet",
                ])
                .args(extra)
                .arg("--image")
                .arg(image)
                .arg("--tpm-state")
                .arg(machine)
                .args(["--tap", tap])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
                .spawn()
                .unwrap(),
        }
    }

    /// Waits (bounded) for `host boot` to exit by itself.
    fn wait_for_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// TCP ports of `host` that accept a connection, and how many gave no
/// answer at all (neither accept nor reset).
fn tcp_scan(host: Ipv4Addr) -> (Vec<u16>, Vec<u16>) {
    const THREADS: u32 = 32;
    let results: Vec<(Vec<u16>, Vec<u16>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    let (mut open, mut silent) = (Vec::new(), Vec::new());
                    let mut port = 1 + t;
                    while port <= 65535 {
                        let p = u16::try_from(port).unwrap();
                        let addr = SocketAddr::from((host, p));
                        let mut outcome = None;
                        for _ in 0..3 {
                            match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                                Ok(_) => outcome = Some(true),
                                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                                    outcome = Some(false)
                                }
                                Err(_) => continue,
                            }
                            break;
                        }
                        match outcome {
                            Some(true) => open.push(p),
                            Some(false) => {}
                            None => silent.push(p),
                        }
                        port += THREADS;
                    }
                    (open, silent)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut open: Vec<u16> = results.iter().flat_map(|r| r.0.clone()).collect();
    let mut silent: Vec<u16> = results.iter().flat_map(|r| r.1.clone()).collect();
    open.sort_unstable();
    silent.sort_unstable();
    (open, silent)
}

/// UDP ports of `ports` on `host` that never answered a datagram with
/// ICMP port unreachable (open or filtered), probing from many source
/// addresses at once and retrying where the host's ICMP rate limit held
/// an answer back.
fn udp_probe(host: Ipv4Addr, ports: &[u16]) -> Vec<u16> {
    let mut silent: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PROBE_SOURCES)
            .map(|i| {
                let mine: Vec<u16> = ports
                    .iter()
                    .copied()
                    .skip(usize::from(i))
                    .step_by(usize::from(PROBE_SOURCES))
                    .collect();
                s.spawn(move || {
                    let src = Ipv4Addr::new(10, 91, 0, FIRST_PROBE_SOURCE + i);
                    let mut silent = Vec::new();
                    for port in mine {
                        let mut refused = false;
                        for _ in 0..12 {
                            let sock = UdpSocket::bind((src, 0)).unwrap();
                            sock.connect((host, port)).unwrap();
                            sock.set_read_timeout(Some(Duration::from_millis(700)))
                                .unwrap();
                            let _ = sock.send(b"probe");
                            let mut buf = [0u8; 64];
                            match sock.recv(&mut buf) {
                                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                                    refused = true;
                                    break;
                                }
                                Ok(_) => break,
                                Err(_) => {}
                            }
                        }
                        if !refused {
                            silent.push(port);
                        }
                    }
                    silent
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    silent.sort_unstable();
    silent
}

/// Types at the console and returns what came back within a while.
fn type_at_console(sock: &Path) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let drain = |s: &mut std::os::unix::net::UnixStream, for_: Duration| {
        let mut got = Vec::new();
        let end = Instant::now() + for_;
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        got
    };
    // What the host wrote before: not an answer.
    drain(&mut s, Duration::from_secs(1));
    let mut got = Vec::new();
    for input in ["root\n", "\n", "sh\n", "ls /\n", "\x03", "\x1a"] {
        s.write_all(input.as_bytes()).unwrap();
        got.extend(drain(&mut s, Duration::from_secs(2)));
    }
    got.extend(drain(&mut s, Duration::from_secs(5)));
    String::from_utf8_lossy(&got).into_owned()
}

/// The value after `key=` in the console's `pcr-sha256` line.
fn console_value<'a>(console: &'a str, prefix: &str, key: &str) -> Option<&'a str> {
    console
        .lines()
        .find(|l| l.contains(prefix))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
}

/// Runs `nitrile` with `args` in the namespace.
fn in_ns(ns: &Netns, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &ns.name, NITRILE])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A service run in the namespace; SIGTERM on drop.
struct NsService {
    child: Child,
}

impl Drop for NsService {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// The cell's token service, in the namespace on the address the client
/// configs name (the CLI there reaches both it and the booted host).
fn tokend_in(ns: &Netns, cell: &Cell) -> NsService {
    let service = NsService {
        child: Command::new("ip")
            .args(["netns", "exec", &ns.name, NITRILE, "tokend", "--state"])
            .arg(&cell.state)
            .arg("--listen")
            .arg(cell.tokend_addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(cell.root().join("tokend-ns.log")).unwrap(),
            ))
            .spawn()
            .unwrap(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = cell.tokend_addr;
    while ns
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the token service did not start\n{}",
            std::fs::read_to_string(cell.root().join("tokend-ns.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    service
}

fn must(o: std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The checks of a `verify-attestation -o json` verdict, by name.
fn checks(verdict: &serde_json::Value) -> std::collections::BTreeMap<String, bool> {
    verdict["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["check"].as_str().unwrap().to_owned(),
                c["ok"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// `nitrile` stripped as `build-host --strip` strips it, with one byte
/// (in the middle of the file) flipped.
fn nitrile_one_byte_off(dir: &Path) -> PathBuf {
    let off = dir.join("nitrile-one-byte-off");
    assert!(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(NITRILE)
            .arg(&off)
            .status()
            .unwrap()
            .success()
    );
    let mut bytes = std::fs::read(&off).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&off, bytes).unwrap();
    off
}

#[test]
fn a_booted_host_shows_only_its_agent_attests_its_image_and_powers_off_on_shutdown() {
    if let Err(why) = boot_prerequisites() {
        skipped(&why);
        return;
    }
    let cell = provisioned_cell();
    let image = cell.root().join("image");
    // An image for enrollment: it holds no key of the host.
    let reference = build(
        &cell,
        &image,
        &[
            "--ip",
            &format!("{HOST_IP}/24"),
            "--gateway",
            &GATEWAY.to_string(),
            "--enroll",
        ],
    );
    let archive = unpack(&image.join("initramfs"));
    for (path, entry) in archive.entries() {
        assert!(
            !path.ends_with("host.key") && !path.ends_with("host.pem"),
            "{path} in an image for enrollment"
        );
        if let nitrile_image::cpio::EntryKind::File(bytes) = &entry.kind
            && path.starts_with("etc/")
        {
            assert!(
                !bytes.windows(11).any(|w| w == b"PRIVATE KEY"),
                "{path} holds a private key"
            );
        }
    }
    let port: u16 = reference["annotations"]["hostd_port"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let tag = std::process::id();
    let tap = format!("nhi{tag}");
    let ns = Netns::new(&format!("nitrile-hi-{tag}"), &tap);
    let machine = cell.root().join("machine");
    let started = Instant::now();
    let mut boot = Booted::start(
        &ns,
        &image,
        &machine,
        &tap,
        &cell.root().join("boot.log"),
        &[],
    );
    let console_log: PathBuf = machine.join("console.log");
    let console = || std::fs::read_to_string(&console_log).unwrap_or_default();
    let wait_for = |line: &str| {
        while !console().contains(line) {
            assert!(
                started.elapsed() < BOOT_TIMEOUT,
                "no {line:?} within {BOOT_TIMEOUT:?}\n{}\n{}",
                std::fs::read_to_string(cell.root().join("boot.log")).unwrap_or_default(),
                console()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    // First boot: the host waits to be enrolled; the cell CA enrolls it
    // over the network, and the host keeps what it got on its state disk.
    wait_for("serving the enrollment exchange");
    note(&format!(
        "boot to the enrollment exchange under TCG: {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let mut ek_ca = std::fs::read("/var/lib/swtpm-localca/issuercert.pem").unwrap();
    ek_ca.extend(std::fs::read("/var/lib/swtpm-localca/swtpm-localca-rootca-cert.pem").unwrap());
    let ek_ca_file = cell.root().join("tpm-ca.pem");
    std::fs::write(&ek_ca_file, ek_ca).unwrap();
    let enrolled_at = Instant::now();
    must(
        in_ns(
            &ns,
            &[
                "pki",
                "enroll-host",
                "--dir",
                cell.root().join("state/pki").to_str().unwrap(),
                "--address",
                &format!("{HOST_IP}:{port}"),
                "--host",
                "h1",
                "--reference",
                image.join("reference.json").to_str().unwrap(),
                "--ek-ca",
                ek_ca_file.to_str().unwrap(),
                "--out",
                cell.root().to_str().unwrap(),
            ],
        ),
        "nitrile pki enroll-host --address",
    );
    note(&format!(
        "enrollment over the network: {:.1} s",
        enrolled_at.elapsed().as_secs_f64()
    ));
    while !console().contains("nitrile hostd: h1 serving on") {
        assert!(
            started.elapsed() < BOOT_TIMEOUT,
            "the host agent did not serve within {BOOT_TIMEOUT:?}\n{}\n{}",
            std::fs::read_to_string(cell.root().join("boot.log")).unwrap_or_default(),
            console()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    note(&format!(
        "boot to serving under TCG: {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    // PCRs, as the host's init read them.
    let text = console();
    let shown = |k: &str| console_value(&text, "nitrile host-init: pcr-sha256 ", k);
    assert_eq!(shown("4="), reference["pcr4"].as_str(), "PCR 4\n{text}");
    assert_eq!(shown("11="), reference["pcr11"].as_str(), "PCR 11\n{text}");
    let pcr15 = reference["pcr15"].as_str().unwrap();
    assert!(
        text.contains(&format!("PCR 15 expected {pcr15}")),
        "the init measured other files than predicted\n{text}"
    );
    assert_eq!(shown("15="), Some(pcr15), "PCR 15\n{text}");

    // From outside: the agent's port, nothing else.
    let (open, silent) = ns.run(|| tcp_scan(HOST_IP));
    assert_eq!(open, [port], "open TCP ports");
    assert!(
        silent.is_empty(),
        "TCP ports that never answered: {silent:?}"
    );
    let mut ports: Vec<u16> = (1..=1024).collect();
    ports.extend([
        port, 1900, 2049, 3260, 4500, 4789, 5353, 5355, 6081, 8472, 11211, 51820, 65535,
    ]);
    ports.sort_unstable();
    ports.dedup();
    let quiet = ns.run(|| udp_probe(HOST_IP, &ports));
    assert!(
        quiet.is_empty(),
        "UDP ports that never answered with port unreachable: {quiet:?}"
    );
    note(&format!(
        "UDP: {} ports probed, all unreachable",
        ports.len()
    ));

    // The console: nothing typed comes back, no prompt, no shell.
    let back = type_at_console(&machine.join("console.sock"));
    for line in back.lines().map(|l| l.trim_end_matches('\r')) {
        let log_line = line.is_empty()
            || line.starts_with("nitrile ")
            || line.starts_with('[')
            || line.starts_with("20");
        assert!(log_line, "the console answered typing: {line:?}\n{back}");
    }
    assert!(!back.contains("root"), "the console echoed: {back:?}");
    assert!(
        ns.run(|| TcpStream::connect_timeout(
            &SocketAddr::from((HOST_IP, port)),
            Duration::from_secs(5)
        ))
        .is_ok(),
        "the host agent stopped serving"
    );

    // Attestation through the CLI, as alice (on call), with a token from
    // the cell's token service.
    let _tokend = tokend_in(&ns, &cell);
    let client = cell.alice.with_file_name("operator-alice-booted.toml");
    std::fs::copy(&cell.alice, &client).unwrap();
    cell::set_section_line(&client, "hosts", "h1", &format!("{HOST_IP}:{port}"));
    let client = client.to_str().unwrap();
    let nonce = "5a".repeat(32);
    let answer = must(
        in_ns(
            &ns,
            &[
                "--config", client, "-o", "json", "host", "attest", "--nonce", &nonce,
            ],
        ),
        "nitrile host attest",
    );
    let saved = cell.root().join("attestation.json");
    std::fs::write(&saved, &answer).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let key = answer["attestation_key"].as_str().unwrap().to_owned();
    let quoted: std::collections::BTreeMap<u64, &str> = answer["quote"]["pcrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["index"].as_u64().unwrap(), p["sha256"].as_str().unwrap()))
        .collect();
    for i in [4u64, 11, 15] {
        assert_eq!(
            Some(quoted[&i]),
            reference[format!("pcr{i}")].as_str(),
            "quoted PCR {i}"
        );
    }
    let logged: Vec<&str> = answer["event_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    let predicted: Vec<&str> = reference["pcr15_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(logged, predicted, "the event log");
    let reference_file = image.join("reference.json");
    let verdict = must(
        in_ns(
            &ns,
            &[
                "--config",
                client,
                "-o",
                "json",
                "host",
                "verify-attestation",
                "--reference",
                reference_file.to_str().unwrap(),
                "--attestation-key",
                &key,
            ],
        ),
        "nitrile host verify-attestation",
    );
    let verdict: serde_json::Value = serde_json::from_str(&verdict).unwrap();
    let passed = checks(&verdict);
    for c in [
        "attestation key",
        "quote",
        "pcr 4",
        "pcr 11",
        "pcr 15",
        "event log",
        "document",
    ] {
        assert_eq!(passed.get(c), Some(&true), "{c}: {verdict:#}");
    }
    assert_eq!(verdict["verified"], true, "{verdict:#}");
    note(&format!("verify-attestation: {passed:?}"));

    // One byte more or less in the initramfs: another PCR 11, and the
    // booted host does not verify against that image's reference.
    let off = nitrile_one_byte_off(cell.root());
    let off_image = cell.root().join("image-one-byte-off");
    let off_ref = build_with(
        &cell,
        &off_image,
        &off,
        &[
            "--ip",
            &format!("{HOST_IP}/24"),
            "--gateway",
            &GATEWAY.to_string(),
            "--enroll",
        ],
    );
    let a = unpacked(&image.join("initramfs"));
    let b = unpacked(&off_image.join("initramfs"));
    assert_eq!(a.len(), b.len());
    let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(differing, 1, "the initramfs differ in {differing} bytes");
    assert_ne!(off_ref["pcr11"], reference["pcr11"]);
    assert_ne!(off_ref["pcr4"], reference["pcr4"]);
    assert_eq!(off_ref["pcr15"], reference["pcr15"]);
    let off_check = Command::new(NITRILE)
        .args(["-o", "json", "host", "verify-attestation", "--reference"])
        .arg(off_image.join("reference.json"))
        .args(["--attestation-key", &key, "--nonce", &nonce, "--from"])
        .arg(&saved)
        .output()
        .unwrap();
    assert_eq!(off_check.status.code(), Some(1), "{off_check:?}");
    let verdict: serde_json::Value = serde_json::from_slice(&off_check.stdout).unwrap();
    let passed = checks(&verdict);
    assert_eq!(passed.get("quote"), Some(&true), "{verdict:#}");
    assert_eq!(passed.get("pcr 11"), Some(&false), "{verdict:#}");
    assert_eq!(passed.get("pcr 15"), Some(&true), "{verdict:#}");
    assert_eq!(verdict["verified"], false);
    note(&format!(
        "one byte off: pcr11 {} instead of {}",
        off_ref["pcr11"], reference["pcr11"]
    ));

    // host.shutdown: the agent answers, exits, and the machine powers off.
    must(
        in_ns(&ns, &["--config", client, "host", "shutdown"]),
        "nitrile host shutdown",
    );
    let status = boot.wait_for_exit(POWER_OFF_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "the host did not power off within {POWER_OFF_TIMEOUT:?}\n{}",
            console()
        )
    });
    let text = console();
    assert!(status.success(), "nitrile host boot: {status}\n{text}");
    assert!(
        text.contains("the host agent exited (exit status 0); powering off"),
        "{text}"
    );
    assert!(!text.contains("Kernel panic"), "{text}");
    drop(boot);
    let left = cell::processes_naming(&machine);
    assert!(
        left.is_empty(),
        "QEMU or swtpm outlived `host boot`: {left:?}"
    );

    // Booted again with the same TPM and disk: enrolled, it serves at once
    // with the key its TPM holds, and answers as h1.
    std::fs::remove_file(&console_log).unwrap();
    let started = Instant::now();
    let mut boot = Booted::start(
        &ns,
        &image,
        &machine,
        &tap,
        &cell.root().join("boot-again.log"),
        &[],
    );
    while !console().contains("nitrile hostd: h1 serving on") {
        assert!(
            started.elapsed() < BOOT_TIMEOUT,
            "the enrolled host did not serve again\n{}",
            console()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let text = console();
    assert!(!text.contains("enrollment exchange"), "{text}");
    let described = must(
        in_ns(&ns, &["--config", client, "-o", "json", "host", "describe"]),
        "nitrile host describe after a reboot",
    );
    assert!(described.contains("tpm-pcr15"), "{described}");
    must(
        in_ns(&ns, &["--config", client, "host", "shutdown"]),
        "nitrile host shutdown",
    );
    let status = boot.wait_for_exit(POWER_OFF_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "the host did not power off within {POWER_OFF_TIMEOUT:?}\n{}",
            console()
        )
    });
    assert!(
        status.success(),
        "nitrile host boot: {status}\n{}",
        console()
    );
    drop(boot);

    // The same disk in a machine without a TPM: the image's identity is a
    // TPM key, so the agent never starts and the machine powers off.
    std::fs::remove_file(&console_log).unwrap();
    let mut boot = Booted::start(
        &ns,
        &image,
        &machine,
        &tap,
        &cell.root().join("boot-no-tpm.log"),
        &["--no-tpm"],
    );
    let status = boot
        .wait_for_exit(BOOT_TIMEOUT)
        .unwrap_or_else(|| panic!("the host without a TPM did not power off\n{}", console()));
    let text = console();
    assert!(
        status.success(),
        "nitrile host boot --no-tpm: {status}\n{text}"
    );
    assert!(
        text.contains("there is no TPM") && text.contains("powering off"),
        "{text}"
    );
    assert!(
        !text.contains("serving on") && !text.contains("enrollment exchange"),
        "{text}"
    );
    drop(boot);
}
