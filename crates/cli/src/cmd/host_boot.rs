//! `nitrile host boot`: a host in a box. Boots a host image (`nitrile
//! image build-host`) under QEMU with UEFI firmware (OVMF) and a software
//! TPM (swtpm), so that the firmware measures the Unified Kernel Image into
//! PCR 4 and its stub measures the kernel, command line and initramfs into
//! PCR 11, as on a machine.
//!
//! The UKI is the firmware's only boot option: `EFI/BOOT/BOOTX64.EFI` on a
//! FAT directory QEMU presents as a SATA disk, which the host's kernel has
//! no driver for. The state disk is the host's `/dev/vda` (virtio). The NIC
//! has no option ROM, so the firmware neither network-boots nor measures
//! one.

use std::io::{BufRead as _, Read as _, Seek as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::output::{errln, outln};

/// The accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Accel {
    /// QEMU's emulator (slow, works everywhere).
    Tcg,
    /// Hardware KVM.
    Kvm,
}

/// Boot a host image under QEMU with OVMF and a software TPM.
///
/// On first use the TPM is manufactured (`swtpm_setup`, with an EK and a
/// platform certificate from swtpm's local CA), the firmware's variable
/// store is copied from OVMF's template and the disk is made; later boots
/// reuse them, so the host keeps its TPM and its state filesystem. The
/// serial console goes to `DIR/console.log` (and to stdout unless
/// `--quiet`); its input is a socket, `DIR/console.sock`, which the host
/// never reads. Once the host agent serves, its address is printed.
/// Ctrl-C or SIGTERM stops QEMU and the TPM. When the host powers itself
/// off (`nitrile host shutdown`), QEMU and this command exit 0.
///
/// Networking: `--tap NAME` puts the host on an existing tap device (the
/// image's `nitrile.ip` must fit its network); else QEMU's user network,
/// forwarding `127.0.0.1:PORT` (`--forward`, default the agent's port) to
/// the host agent (the image's default address, 10.0.2.15/24).
///
/// Example: `nitrile host boot --image host-image --tpm-state h1-machine`
#[derive(Debug, clap::Args)]
pub(crate) struct BootArgs {
    /// The host image directory (`host.efi`, `reference.json`).
    #[arg(long, value_name = "DIR")]
    image: PathBuf,
    /// The host's TPM and firmware state (made if missing); also holds its
    /// console log and sockets, and its disk unless `--disk` is given.
    #[arg(long, value_name = "DIR")]
    tpm_state: PathBuf,
    /// The host's state disk (raw; made sparse if missing).
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// Size of a disk made now.
    #[arg(long, value_name = "SIZE", default_value = "2G", value_parser = parse_size)]
    disk_size: u64,
    /// Memory.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    memory: u64,
    /// Virtual CPUs.
    #[arg(long, value_name = "N", default_value_t = 2)]
    cpus: u8,
    /// Put the NIC on this tap device instead of QEMU's user network.
    #[arg(long, value_name = "NAME", conflicts_with = "forward")]
    tap: Option<String>,
    /// User network: the loopback port forwarded to the host agent.
    #[arg(long, value_name = "PORT")]
    forward: Option<u16>,
    /// The accelerator (TCG unless the machine has a usable KVM).
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    accel: Accel,
    /// QEMU (else `qemu-system-x86_64` on PATH).
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// OVMF's code.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    )]
    ovmf_code: PathBuf,
    /// OVMF's variable store template, copied per host.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/usr/share/OVMF/OVMF_VARS_4M.fd"
    )]
    ovmf_vars: PathBuf,
    /// Do not copy the console to stdout.
    #[arg(long)]
    quiet: bool,
    /// Boot without a TPM (a machine that has none): the image's init then
    /// measures nothing, and an image whose identity is a TPM key powers
    /// off without starting the agent.
    #[arg(long)]
    no_tpm: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 512M, 2G)"))
}

/// What `reference.json` says about where the agent listens.
struct HostAddress {
    ip: String,
    port: u16,
}

fn read_reference(image: &Path) -> anyhow::Result<HostAddress> {
    let path = image.join("reference.json");
    let text = nitrile_fs::read_bounded_to_string(&path, 1 << 20)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let ann = &v["annotations"];
    let ip = ann["ip"]
        .as_str()
        .and_then(|s| s.split('/').next())
        .context("reference.json names no host address")?
        .to_owned();
    let port = ann["hostd_port"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .context("reference.json names no host agent port")?;
    Ok(HostAddress { ip, port })
}

fn progress(line: std::fmt::Arguments<'_>) {
    let _ = errln!("nitrile host boot: {line}");
}

macro_rules! say {
    ($($arg:tt)*) => { progress(format_args!($($arg)*)) };
}

fn on_path(name: &Path) -> bool {
    if name.components().count() > 1 {
        return name.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// Manufactures the TPM in `dir` unless it holds one already.
fn manufacture_tpm(dir: &Path) -> anyhow::Result<()> {
    if dir.join("tpm2-00.permall").exists() {
        return Ok(());
    }
    say!(
        "manufacturing the TPM in {} (EK and platform certificates)",
        dir.display()
    );
    let out = std::process::Command::new("swtpm_setup")
        .args(["--tpm2", "--tpmstate"])
        .arg(dir)
        .args(["--create-ek-cert", "--create-platform-cert", "--lock-nvram"])
        .stdin(Stdio::null())
        .output()
        .context("cannot run swtpm_setup (install swtpm-tools: scripts/setup.sh)")?;
    if !out.status.success() {
        bail!(
            "swtpm_setup failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

async fn wait_for_socket(path: &Path, child: &mut tokio::process::Child) -> anyhow::Result<()> {
    for _ in 0..200 {
        if path.exists() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("swtpm exited ({status}) before it served");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("swtpm did not make {}", path.display())
}

/// Copies the console log to stdout as it grows (unless `quiet`) and
/// reports once the host agent serves.
fn follow_console(log: PathBuf, quiet: bool, address: String) {
    std::thread::spawn(move || {
        let mut offset = 0u64;
        let mut pending = Vec::new();
        let mut announced = false;
        loop {
            if let Ok(mut f) = std::fs::File::open(&log)
                && f.seek(std::io::SeekFrom::Start(offset)).is_ok()
            {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf) {
                    offset += n as u64;
                    pending.extend_from_slice(&buf);
                }
            }
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let mut text = String::new();
                let _ = line.as_slice().read_line(&mut text);
                let text = text.trim_end_matches(['\r', '\n']);
                if !quiet {
                    let _ = outln!("{text}");
                }
                if !announced && text.contains("nitrile hostd: ") && text.contains(" serving on ") {
                    announced = true;
                    say!("the host agent serves at {address}");
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}

pub(crate) fn run(args: BootArgs) -> anyhow::Result<()> {
    for (what, path) in [("QEMU", &args.qemu), ("swtpm", &PathBuf::from("swtpm"))] {
        if !on_path(path) {
            bail!(
                "{what} ({}) is not installed (scripts/setup.sh)",
                path.display()
            );
        }
    }
    for f in [&args.ovmf_code, &args.ovmf_vars] {
        if !f.is_file() {
            bail!(
                "no OVMF firmware at {} (install ovmf: scripts/setup.sh)",
                f.display()
            );
        }
    }
    let uki = args.image.join("host.efi");
    if !uki.is_file() {
        bail!(
            "no {} (build it with `nitrile image build-host`)",
            uki.display()
        );
    }
    let host = read_reference(&args.image)?;
    let dir = &args.tpm_state;
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot make {}", dir.display()))?;
    }
    let dir = std::fs::canonicalize(dir)?;
    if !args.no_tpm {
        manufacture_tpm(&dir)?;
    }
    let vars = dir.join("OVMF_VARS.fd");
    if !vars.exists() {
        std::fs::copy(&args.ovmf_vars, &vars)
            .with_context(|| format!("cannot copy {}", args.ovmf_vars.display()))?;
    }
    let esp = dir.join("esp");
    let boot_dir = esp.join("EFI").join("BOOT");
    std::fs::create_dir_all(&boot_dir)?;
    std::fs::copy(&uki, boot_dir.join("BOOTX64.EFI"))
        .with_context(|| format!("cannot copy {}", uki.display()))?;
    let disk = args.disk.clone().unwrap_or_else(|| dir.join("disk.raw"));
    if !disk.exists() {
        say!(
            "making the state disk {} ({} MiB, sparse)",
            disk.display(),
            args.disk_size >> 20
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&disk)
            .with_context(|| format!("cannot make {}", disk.display()))?;
        f.set_len(args.disk_size)?;
    }
    let console_log = dir.join("console.log");
    let console_sock = dir.join("console.sock");
    let tpm_sock = dir.join("swtpm.sock");
    for stale in [&console_sock, &tpm_sock] {
        let _ = std::fs::remove_file(stale);
    }
    std::fs::write(&console_log, b"")?;

    let (netdev, address) = match &args.tap {
        Some(tap) => (
            format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
            format!("{}:{}", host.ip, host.port),
        ),
        None => {
            let port = args.forward.unwrap_or(host.port);
            (
                format!(
                    "user,id=net0,hostfwd=tcp:127.0.0.1:{port}-{}:{}",
                    host.ip, host.port
                ),
                format!("127.0.0.1:{port} (forwarded to {}:{})", host.ip, host.port),
            )
        }
    };
    let mut qemu = std::process::Command::new(&args.qemu);
    qemu.args([
        "-machine",
        "q35",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ])
    .args(["-monitor", "none", "-no-reboot"]);
    match args.accel {
        Accel::Tcg => qemu.args(["-accel", "tcg", "-cpu", "max,-la57"]),
        Accel::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
    };
    qemu.arg("-m")
        .arg(format!("{}M", args.memory >> 20))
        .arg("-smp")
        .arg(args.cpus.to_string())
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            args.ovmf_code.display()
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .arg("-drive")
        .arg(format!(
            // Read-only to the host's files: the guest's writes, if any,
            // go to a temporary overlay.
            "if=none,id=esp,format=raw,snapshot=on,file=fat:{}",
            esp.display()
        ))
        .args(["-device", "ide-hd,drive=esp,bus=ide.0,bootindex=0"])
        .arg("-drive")
        .arg(format!(
            "if=none,id=state,format=raw,file={}",
            disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=state"])
        .arg("-netdev")
        .arg(netdev)
        .args(["-device", "virtio-net-pci,netdev=net0,romfile="])
        .args(["-device", "virtio-rng-pci"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=console,path={},server=on,wait=off,logfile={}",
            console_sock.display(),
            console_log.display()
        ))
        .args(["-serial", "chardev:console"]);
    if !args.no_tpm {
        qemu.arg("-chardev")
            .arg(format!("socket,id=chrtpm,path={}", tpm_sock.display()))
            .args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm"])
            .args(["-device", "tpm-crb,tpmdev=tpm0"]);
    }

    crate::service::block_on(async move {
        let mut swtpm = if args.no_tpm {
            say!("no TPM: the machine has none");
            None
        } else {
            let mut swtpm = tokio::process::Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", dir.display()))
                .arg("--ctrl")
                .arg(format!("type=unixio,path={}", tpm_sock.display()))
                .arg("--log")
                .arg(format!("file={},level=1", dir.join("swtpm.log").display()))
                .arg("--terminate")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start swtpm")?;
            wait_for_socket(&tpm_sock, &mut swtpm).await?;
            Some(swtpm)
        };
        say!(
            "booting {} under QEMU ({}, {} MiB, {} vCPUs); console: {}",
            uki.display(),
            match args.accel {
                Accel::Tcg => "TCG",
                Accel::Kvm => "KVM",
            },
            args.memory >> 20,
            args.cpus,
            console_log.display()
        );
        let mut qemu = tokio::process::Command::from(qemu)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start QEMU")?;
        follow_console(console_log.clone(), args.quiet, address);
        let signal = nitrile_net::shutdown_signal();
        let result = tokio::select! {
            status = qemu.wait() => {
                // The host powered itself off (after `host.shutdown` or
                // a failure its console shows), or QEMU failed.
                let status = status?;
                say!("QEMU exited ({status})");
                if status.success() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("QEMU failed ({status})"))
                }
            }
            () = signal => {
                say!("stopping QEMU and the TPM");
                if let Some(pid) = qemu.id().and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                if tokio::time::timeout(Duration::from_secs(10), qemu.wait()).await.is_err() {
                    let _ = qemu.kill().await;
                }
                Ok(())
            }
        };
        if let Some(swtpm) = &mut swtpm {
            let _ = swtpm.start_kill();
            let _ = swtpm.wait().await;
        }
        // Let the console copy catch up with QEMU's last lines.
        tokio::time::sleep(Duration::from_millis(400)).await;
        result
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
    }
}
