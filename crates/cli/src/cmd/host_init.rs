//! `nitrile host-init`: PID 1 of a host booted from the host image
//! (`nitrile image build-host`), where `/init` is `nitrile` itself.
//!
//! In order: it mounts `/proc`, `/sys`, `/dev` (devtmpfs), `/run` and
//! `/tmp`; turns the console into an output-only device (stdin is
//! `/dev/null`, the serial line's receiver, echo and flow control are off,
//! SysRq is disabled); loads the modules the image lists
//! (`/lib/modules/<release>/modules.load`, in order) and then disables
//! module loading for good; configures the first non-loopback interface
//! from `nitrile.ip=ADDR/PREFIX` and `nitrile.gw=GW` on the kernel command
//! line; makes (on first boot) and mounts the state filesystem
//! (`nitrile.state=DEV`, default `/dev/vda`) on `/var/lib/nitrile`;
//! measures the host agent's config, pinned keys and trust roots (the
//! "init measurement": [`init_events`], extended into PCR 15 of the TPM
//! its config's `[tpm]` names and logged to `/run/nitrile/init-events.jsonl`
//! by [`measure::measure`]); prints PCRs 4, 11 and 15 as the kernel reads
//! them from the TPM; starts `nitrile hostd --await-enrollment` (a host
//! whose identity is enrolled in its TPM and not yet enrolled serves the
//! enrollment exchange first, and keeps what it gets on the state disk)
//! and reaps every process until
//! it exits (after `host.shutdown`, or on a failure); then powers the
//! machine off. It never exits and never reads the console.
//!
//! It fails closed: when any step up to the measurement fails (a TPM that
//! is there but refuses to extend included), the host agent does not
//! start and the machine powers off. A machine without any TPM device runs
//! the host agent without `[tpm]` (it then refuses `host.attest`), and
//! says so on the console.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nitrile_hostd::HostdConfig;
use nitrile_image::host::{MKE2FS_PATH, MODULES_LOAD, NITRILE_PATH, PROVISION_DIR, STATE_DIR};
use nitrile_image::pcr::InitEvent;

pub(crate) mod measure;

/// The host agent's config in the image.
pub(crate) const HOSTD_CONFIG: &str = "hostd.toml";
/// Where the init measurement's event log is written (the image's
/// `[tpm] event_log`).
pub(crate) const INIT_EVENTS: &str = "/run/nitrile/init-events.jsonl";
/// The host agent's config on a host without a TPM (the image's without
/// `[tpm]`).
const RUN_CONFIG: &str = "/run/nitrile/hostd.toml";
/// The state device when the command line names none.
const DEFAULT_STATE_DEVICE: &str = "/dev/vda";
/// How long the state device and the network interface may take to
/// appear after their modules loaded.
const DEVICE_WAIT: Duration = Duration::from_secs(30);
/// The ext2/3/4 superblock magic, at byte 1080 of the device.
const EXT_MAGIC_OFFSET: u64 = 1080;
const EXT_MAGIC: [u8; 2] = [0x53, 0xef];
/// The PCRs printed on the console once the TPM is up.
const SHOWN_PCRS: [u32; 3] = [4, 11, 15];
/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses the module.
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// Kernel settings made before the host agent starts: no kernel pointers
/// or log for the unprivileged, no SysRq from the console, no kexec, no
/// unprivileged BPF or perf, no ptrace at all.
const SYSCTLS: &[(&str, &str)] = &[
    ("kernel/sysrq", "0"),
    ("kernel/kptr_restrict", "2"),
    ("kernel/dmesg_restrict", "1"),
    ("kernel/kexec_load_disabled", "1"),
    ("kernel/unprivileged_bpf_disabled", "1"),
    ("kernel/perf_event_paranoid", "3"),
    ("kernel/yama/ptrace_scope", "3"),
    ("net/core/bpf_jit_harden", "2"),
];

/// Run as PID 1 of the host image (hidden: `/init` is this).
#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

/// Whether this process is PID 1 started as `/init` (the host image's
/// init), decided before anything else runs.
pub(crate) fn is_image_init() -> bool {
    std::process::id() == 1
        && std::env::args_os()
            .next()
            .is_some_and(|a| Path::new(&a).file_name() == Some("init".as_ref()))
}

/// One line on the console.
fn log(line: std::fmt::Arguments<'_>) {
    let _ = crate::output::errln!("nitrile host-init: {line}");
}

macro_rules! say {
    ($($arg:tt)*) => { log(format_args!($($arg)*)) };
}

/// Runs the host: never returns; powers the machine off at the end.
pub(crate) fn run(_args: Args) -> ! {
    let started = Instant::now();
    match boot(started) {
        Ok(status) => say!("the host agent exited ({status}); powering off"),
        Err(e) => say!("failed: {e:#}; powering off"),
    }
    power_off()
}

fn power_off() -> ! {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    say!("power off failed: {e}");
    // PID 1 must not exit (the kernel would panic): wait for the end.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn boot(started: Instant) -> anyhow::Result<String> {
    mount_early()?;
    quiet_console();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    let cmdline = std::fs::read_to_string("/proc/cmdline").context("/proc/cmdline")?;
    say!(
        "kernel {release}, {} s since init started",
        started.elapsed().as_secs()
    );
    for (key, value) in SYSCTLS {
        if let Err(e) = std::fs::write(Path::new("/proc/sys").join(key), value) {
            say!("cannot set {key} = {value}: {e}");
        }
    }

    load_modules(&release)?;
    network(&cmdline)?;
    let device = param(&cmdline, "nitrile.state").unwrap_or(DEFAULT_STATE_DEVICE);
    state_filesystem(Path::new(device))?;

    let config = Path::new(PROVISION_DIR).join(HOSTD_CONFIG);
    let events = init_events(&config, Path::new(PROVISION_DIR), Path::new(PROVISION_DIR))?;
    for e in &events {
        say!(
            "measure pcr={} {} {} sha256={}",
            nitrile_image::pcr::INIT_PCR,
            e.name,
            e.path,
            hex::encode(e.sha256)
        );
    }
    say!(
        "init measurement: {} events, PCR {} expected {}",
        events.len(),
        nitrile_image::pcr::INIT_PCR,
        hex::encode(nitrile_image::pcr::init_pcr(&events))
    );
    let loaded = HostdConfig::load(&config)?;
    let tcti = loaded
        .tpm
        .as_ref()
        .map_or(measure::DEFAULT_TCTI, |t| t.tcti.as_str())
        .to_owned();
    let config = if measure::tpm_present(&tcti) {
        // Fail closed: with a TPM, the host agent starts only after the
        // measurement it will attest to.
        let value = measure::measure(&tcti, &events, Path::new(INIT_EVENTS))
            .context("the init measurement")?;
        say!(
            "PCR {} extended to {} ({tcti}); event log {INIT_EVENTS}",
            nitrile_image::pcr::INIT_PCR,
            hex::encode(value)
        );
        config
    } else {
        say!("no TPM ({tcti}: no device): nothing measured; the host agent runs without [tpm]");
        without_tpm(loaded)?
    };
    show_pcrs();

    say!(
        "starting the host agent ({:.1} s after init)",
        started.elapsed().as_secs_f64()
    );
    let hostd = std::process::Command::new(NITRILE_PATH)
        .arg("hostd")
        .arg("--await-enrollment")
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("PATH", "/usr/bin:/usr/sbin")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("cannot start the host agent")?;
    reap_until(nix::unistd::Pid::from_raw(
        i32::try_from(hostd.id()).context("pid")?,
    ))
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: nix::mount::MsFlags,
    data: Option<&str>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("mkdir {target}"))?;
    nix::mount::mount(Some(source), target, Some(fstype), flags, data)
        .with_context(|| format!("mount {fstype} on {target}"))
}

fn mount_early() -> anyhow::Result<()> {
    use nix::mount::MsFlags as F;
    let hard = F::MS_NOSUID | F::MS_NODEV | F::MS_NOEXEC;
    mount("proc", "/proc", "proc", hard, None)?;
    mount("sysfs", "/sys", "sysfs", hard, None)?;
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        F::MS_NOSUID | F::MS_NOEXEC,
        None,
    )?;
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        F::MS_NOSUID | F::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount("tmpfs", "/tmp", "tmpfs", hard, Some("mode=1777"))?;
    // The firmware's event log (read-only), for whoever checks PCRs.
    if let Err(e) = mount(
        "securityfs",
        "/sys/kernel/security",
        "securityfs",
        hard,
        None,
    ) {
        say!("{e:#}");
    }
    Ok(())
}

/// The console only ever shows what the host writes: stdin becomes
/// `/dev/null`, and the serial line neither receives, echoes nor stops
/// output on XOFF.
fn quiet_console() {
    use nix::sys::termios::{self, ControlFlags, InputFlags, LocalFlags, SetArg};
    match std::fs::File::open("/dev/null") {
        Ok(null) => {
            if let Err(e) = nix::unistd::dup2_stdin(&null) {
                say!("cannot make /dev/null the standard input: {e}");
            }
        }
        Err(e) => say!("cannot open /dev/null: {e}"),
    }
    let out = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        Ok(f) => f,
        Err(e) => {
            say!("cannot open the console: {e}");
            return;
        }
    };
    match termios::tcgetattr(out.as_fd()) {
        Ok(mut t) => {
            t.local_flags &= !(LocalFlags::ECHO
                | LocalFlags::ECHOE
                | LocalFlags::ECHOK
                | LocalFlags::ECHONL
                | LocalFlags::ICANON
                | LocalFlags::ISIG
                | LocalFlags::IEXTEN);
            t.input_flags &= !(InputFlags::IXON | InputFlags::IXOFF | InputFlags::BRKINT);
            t.input_flags |= InputFlags::IGNBRK;
            t.control_flags &= !ControlFlags::CREAD;
            if let Err(e) = termios::tcsetattr(out.as_fd(), SetArg::TCSANOW, &t) {
                say!("cannot set the console's terminal modes: {e}");
            }
            let _ = termios::tcflush(out.as_fd(), termios::FlushArg::TCIFLUSH);
        }
        Err(e) => say!("the console is no terminal ({e})"),
    }
}

/// Loads the image's modules in their listed order, then disables module
/// loading until the next boot.
fn load_modules(release: &str) -> anyhow::Result<()> {
    let dir = Path::new("/lib/modules").join(release);
    let list_path = dir.join(MODULES_LOAD);
    let list =
        std::fs::read_to_string(&list_path).with_context(|| format!("{}", list_path.display()))?;
    let mut loaded = Vec::new();
    for rel in list.lines().filter(|l| !l.trim().is_empty()) {
        let path = dir.join(rel);
        let file = std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
        let flags = if rel.ends_with(".ko") {
            nix::kmod::ModuleInitFlags::empty()
        } else {
            nix::kmod::ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
        };
        match nix::kmod::finit_module(&file, &CString::default(), flags) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => bail!("loading {rel}: {e}"),
        }
        loaded.push(rel.rsplit('/').next().unwrap_or(rel).to_owned());
    }
    std::fs::write("/proc/sys/kernel/modules_disabled", "1").context("disabling module loading")?;
    say!(
        "modules loaded: {}; module loading disabled",
        loaded.join(" ")
    );
    Ok(())
}

/// The value of `key=value` on the kernel command line.
fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// `ADDR/PREFIX`.
fn parse_cidr(s: &str) -> anyhow::Result<(Ipv4Addr, u8)> {
    let (a, p) = s.split_once('/').context("expected ADDR/PREFIX")?;
    let prefix: u8 = p.parse().context("prefix")?;
    if prefix > 32 {
        bail!("prefix {prefix} is over 32");
    }
    Ok((a.parse().context("address")?, prefix))
}

fn first_interface() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().next()
}

fn network(cmdline: &str) -> anyhow::Result<()> {
    nitrile_vmm_sys::netns::set_link_up("lo").context("lo up")?;
    let Some(ip) = param(cmdline, "nitrile.ip") else {
        say!("no nitrile.ip= on the command line: no network");
        return Ok(());
    };
    let (addr, prefix) = parse_cidr(ip).with_context(|| format!("nitrile.ip={ip}"))?;
    let deadline = Instant::now() + DEVICE_WAIT;
    let ifname = loop {
        if let Some(n) = first_interface() {
            break n;
        }
        if Instant::now() > deadline {
            bail!("no network interface appeared");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    nitrile_vmm_sys::ipv4::set_address(&ifname, addr, prefix)
        .with_context(|| format!("{ifname}: address {addr}/{prefix}"))?;
    nitrile_vmm_sys::netns::set_link_up(&ifname).with_context(|| format!("{ifname} up"))?;
    let gw = match param(cmdline, "nitrile.gw") {
        Some(gw) => {
            let gw: Ipv4Addr = gw.parse().with_context(|| format!("nitrile.gw={gw}"))?;
            nitrile_vmm_sys::ipv4::add_default_route(gw)
                .with_context(|| format!("default route via {gw}"))?;
            format!(", default route via {gw}")
        }
        None => String::new(),
    };
    say!("network: {ifname} {addr}/{prefix}{gw}");
    Ok(())
}

fn has_ext_filesystem(device: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::open(device).with_context(|| format!("{}", device.display()))?;
    let mut magic = [0u8; 2];
    match f.read_exact_at(&mut magic, EXT_MAGIC_OFFSET) {
        Ok(()) => Ok(magic == EXT_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", device.display())),
    }
}

/// Mounts the state filesystem, making it first when the device holds
/// none (and only then: a damaged filesystem is not overwritten).
fn state_filesystem(device: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEVICE_WAIT;
    while !device.exists() {
        if Instant::now() > deadline {
            bail!("the state device {} did not appear", device.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !has_ext_filesystem(device)? {
        say!(
            "first boot: making the state filesystem on {}",
            device.display()
        );
        let out = std::process::Command::new(MKE2FS_PATH)
            .args(["-q", "-F", "-t", "ext4", "-L", "nitrile-state"])
            .arg(device)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .output()
            .context("cannot run mke2fs")?;
        if !out.status.success() {
            bail!(
                "mke2fs {} failed ({}): {}",
                device.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    use nix::mount::MsFlags as F;
    let device = device.to_str().context("state device path")?;
    mount(device, STATE_DIR, "ext4", F::MS_NOSUID | F::MS_NODEV, None)?;
    say!("state filesystem {device} mounted on {STATE_DIR}");
    Ok(())
}

/// The files the host agent trusts, as the init measures them, in order:
/// its config file, the pinned token issuer keys, the cell CA, its own
/// certificate, and the release root and CI key when it has releases.
/// `config` is the config file as it is read now; the events name paths
/// as the host has them (`read_root` replaced by `shown_root`), so the
/// image builder, reading a staged copy, predicts the same events.
pub(crate) fn init_events(
    config: &Path,
    read_root: &Path,
    shown_root: &Path,
) -> anyhow::Result<Vec<InitEvent>> {
    let loaded = HostdConfig::load(config)?;
    let mut files: Vec<(&str, PathBuf)> = vec![
        ("hostd-config", config.to_owned()),
        ("issuer-keys", loaded.issuer_keys.clone()),
        ("cell-ca", loaded.ca.clone()),
    ];
    // A certificate enrollment put on the state disk is not measured: it
    // comes after the measurement its key is bound to, and it is checked
    // against the measured cell CA when it is received.
    if loaded.cert.starts_with(read_root) {
        files.push(("host-certificate", loaded.cert.clone()));
    }
    if let Some(r) = &loaded.release {
        files.push(("release-root", r.root.clone()));
        files.push(("release-ci-key", r.ci_key.clone()));
    }
    files
        .into_iter()
        .map(|(name, path)| {
            let bytes = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
            let shown = path
                .strip_prefix(read_root)
                .map_or_else(|_| path.clone(), |rel| shown_root.join(rel));
            Ok(InitEvent::of_bytes(name, &shown, &bytes))
        })
        .collect()
}

/// The host agent's config for a host without a TPM: the image's, with
/// its paths made absolute and no `[tpm]`, written to [`RUN_CONFIG`].
/// Returns where.
fn without_tpm(mut loaded: HostdConfig) -> anyhow::Result<PathBuf> {
    if loaded.tpm.as_ref().is_some_and(|t| t.tls_key.is_some()) {
        bail!("this image's host identity is a key in the TPM, and there is no TPM");
    }
    if loaded.tpm.is_none() {
        return Ok(Path::new(PROVISION_DIR).join(HOSTD_CONFIG));
    }
    loaded.tpm = None;
    let path = PathBuf::from(RUN_CONFIG);
    loaded.write(&path)?;
    Ok(path)
}

/// The firmware's event log.
const EVENT_LOG: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";
/// Largest event log read.
const MAX_EVENT_LOG: u64 = 1 << 20;

/// Prints the firmware log's events of PCRs 4 and 11 (type, SHA-256, and
/// the data of events whose data is short text), then PCRs 4, 11 and 15 of
/// the SHA-256 bank as the kernel reads them.
fn show_pcrs() {
    match nitrile_fs::read_bounded(Path::new(EVENT_LOG), MAX_EVENT_LOG)
        .map_err(anyhow::Error::from)
        .and_then(|b| Ok(nitrile_image::pcr::parse_event_log(&b)?))
    {
        Ok(events) => {
            for e in events.iter().filter(|e| e.pcr == 4 || e.pcr == 11) {
                let text = std::str::from_utf8(&e.data)
                    .ok()
                    .filter(|t| {
                        t.len() <= 64 && t.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                    })
                    .map(|t| format!(" {t:?}"))
                    .unwrap_or_default();
                say!(
                    "event pcr={} {} sha256={}{text}",
                    e.pcr,
                    nitrile_image::pcr::event_type_name(e.event_type),
                    e.sha256.map(hex::encode).unwrap_or_else(|| "-".to_owned())
                );
            }
        }
        Err(e) => say!("no firmware event log ({e:#})"),
    }
    let dir = Path::new("/sys/class/tpm/tpm0/pcr-sha256");
    if !dir.is_dir() {
        say!("no TPM (no {})", dir.display());
        return;
    }
    let values: Vec<String> = SHOWN_PCRS
        .iter()
        .map(|n| {
            let v = std::fs::read_to_string(dir.join(n.to_string()))
                .map(|s| s.trim().to_ascii_lowercase())
                .unwrap_or_else(|e| format!("unreadable({e})"));
            format!("{n}={v}")
        })
        .collect();
    say!("pcr-sha256 {}", values.join(" "));
}

/// Reaps every child until `hostd` exits; returns how it ended.
fn reap_until(hostd: nix::unistd::Pid) -> anyhow::Result<String> {
    use nix::sys::wait::{WaitStatus, waitpid};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == hostd => {
                return Ok(format!("exit status {code}"));
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == hostd => {
                return Ok(format!("killed by {sig}"));
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::ECHILD) => bail!("the host agent is gone"),
            Err(e) => bail!("waitpid: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_parameters_are_found_whole() {
        let c = "console=ttyS0 nitrile.ip=10.0.2.15/24 nitrile.gw=10.0.2.2 nitrile.ipx=1\n";
        assert_eq!(param(c, "nitrile.ip"), Some("10.0.2.15/24"));
        assert_eq!(param(c, "nitrile.gw"), Some("10.0.2.2"));
        assert_eq!(param(c, "nitrile.state"), None);
        assert_eq!(
            parse_cidr("10.0.2.15/24").unwrap(),
            (Ipv4Addr::new(10, 0, 2, 15), 24)
        );
        assert!(parse_cidr("10.0.2.15").is_err());
        assert!(parse_cidr("10.0.2.15/33").is_err());
    }
}
