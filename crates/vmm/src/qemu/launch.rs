//! The QEMU launcher (`nitrile qemu-launch`): the jailed process that holds
//! a VM's volume keys for the moment it takes to hand them to QEMU, and then
//! becomes QEMU.
//!
//! The backend spawns it in QEMU's place, in QEMU's jail (session, no core
//! dumps, cgroup, namespaces; see the [`qemu`](super) module), as
//! `<nitrile> qemu-launch --plan-fd P --control-fd C` with an empty
//! environment, stdout closed and stderr on `qemu.stderr`. Descriptor `P` is
//! a pipe holding the [`LaunchPlan`] (at most [`MAX_PLAN_LEN`] bytes): the
//! QEMU and `qemu-img` binaries, QEMU's arguments without its disks, and the
//! VM spec. `C` is a Unix socketpair to the backend. The launcher, in order:
//!
//! 1. makes itself non-dumpable with no core limit (exec made it dumpable
//!    again), so neither its memory nor a core file shows a key;
//! 2. offers one recipient public key per volume and opens the sealed keys
//!    the backend relays into locked pages ([`crate::unlock`]);
//! 3. generates the instance-store disk's key itself, if the spec has one;
//! 4. creates missing volumes, and the instance-store disk anew, as
//!    LUKS-encrypted qcow2 files with `qemu-img` (the passphrase on a pipe);
//!    a missing volume with a seed (an image's root disk) is made by
//!    `qemu-img convert` from it, so its plaintext goes only into the
//!    encrypted file;
//! 5. puts each disk's passphrase (the key's base64 text, as the backend
//!    used to) in a pipe of its own, adds the disks to QEMU's arguments as
//!    `secret` objects reading `/dev/fd/N`, zeroizes every key, and
//! 6. execs QEMU, which inherits only those pipes and reads them before the
//!    guest runs.
//!
//! Exec replaces the launcher's memory: from then on the keys exist only in
//! QEMU's (non-dumpable, unprivileged, chrooted) process and, until QEMU
//! reads them, in the pipes. The instance-store key was never anywhere
//! else, so the disk is noise once QEMU has gone. Errors go to stderr (the
//! backend quotes them) and end the process with status 1.

use std::fs::File;
use std::io::{BufReader, Read as _, Write as _};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nitrile_vmm_sys::jail::{self, Plan};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{LUKS_ITER_TIME_MS, MAX_STDERR_TAIL, opt};
use crate::{KeyError, MAX_SPEC_LEN, SpecError, UnlockError, VmSpec, VolumeKey};

/// Longest launch plan accepted: the spec and QEMU's other arguments.
pub const MAX_PLAN_LEN: usize = MAX_SPEC_LEN + 64 * 1024;
/// Most arguments of QEMU a plan may carry.
pub const MAX_PLAN_ARGS: usize = 256;

/// What the backend tells the launcher: which binaries, QEMU's arguments
/// but for its disks, and the spec whose volumes it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchPlan {
    /// The QEMU system emulator to exec.
    pub qemu: PathBuf,
    /// `qemu-img`, to create volumes.
    pub qemu_img: PathBuf,
    /// QEMU's arguments without its disks (the launcher adds those).
    pub args: Vec<String>,
    /// The VM spec, as its canonical JSON.
    pub spec: String,
}

/// The descriptors the launcher was started with.
#[derive(Debug, Clone, Copy)]
pub struct LaunchArgs {
    /// Pipe holding the [`LaunchPlan`] as JSON.
    pub plan_fd: RawFd,
    /// Unix socket to the backend (the key exchange).
    pub control_fd: RawFd,
}

/// Why the launcher could not exec QEMU.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// a descriptor number is not an inherited descriptor
    #[error("file descriptor {0} is not a distinct inherited descriptor")]
    BadFd(RawFd),
    /// the process could not be made non-dumpable
    #[error("could not forbid core dumps")]
    Dumps(#[source] nitrile_vmm_sys::process::DumpError),
    /// reading the plan failed
    #[error("reading the launch plan")]
    ReadPlan(#[source] std::io::Error),
    /// the plan is larger than [`MAX_PLAN_LEN`]
    #[error("the launch plan is larger than {MAX_PLAN_LEN} bytes")]
    PlanTooLong,
    /// the plan is not a [`LaunchPlan`]
    #[error("malformed launch plan")]
    Plan(#[source] serde_json::Error),
    /// the plan has more than [`MAX_PLAN_ARGS`] arguments
    #[error("the launch plan has more than {MAX_PLAN_ARGS} arguments")]
    TooManyArgs,
    /// the plan's spec was refused
    #[error("the launch plan's spec")]
    Spec(#[from] SpecError),
    /// the key exchange failed
    #[error("volume keys")]
    Unlock(#[from] UnlockError),
    /// the instance-store disk's key could not be made
    #[error("the instance-store key")]
    ScratchKey(#[source] KeyError),
    /// a pipe could not be made or written
    #[error("a key pipe")]
    Pipe(#[source] std::io::Error),
    /// a disk file could not be prepared
    #[error("preparing {}", path.display())]
    Disk {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// a seed is not the size of its volume
    #[error("seed {} is {found} bytes, its volume {expected}", path.display())]
    SeedSize {
        /// The seed.
        path: PathBuf,
        /// The volume's size in bytes.
        expected: u64,
        /// The seed's.
        found: u64,
    },
    /// `qemu-img` failed
    #[error("qemu-img could not create {} ({status}): {stderr}", path.display())]
    QemuImg {
        /// The file.
        path: PathBuf,
        /// Its status.
        status: std::process::ExitStatus,
        /// The end of its stderr (no key material: the key is on a pipe).
        stderr: String,
    },
    /// exec of QEMU failed
    #[error("could not exec {}", path.display())]
    Exec {
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn take_fd(fd: RawFd) -> Result<OwnedFd, LaunchError> {
    nitrile_vmm_sys::fd::take_inherited(fd).map_err(|_| LaunchError::BadFd(fd))
}

/// Parses a plan of at most [`MAX_PLAN_LEN`] bytes.
pub fn parse_plan(bytes: &[u8]) -> Result<(LaunchPlan, VmSpec), LaunchError> {
    if bytes.len() > MAX_PLAN_LEN {
        return Err(LaunchError::PlanTooLong);
    }
    let plan: LaunchPlan = serde_json::from_slice(bytes).map_err(LaunchError::Plan)?;
    if plan.args.len() > MAX_PLAN_ARGS {
        return Err(LaunchError::TooManyArgs);
    }
    let spec = VmSpec::parse_json(plan.spec.as_bytes())?;
    Ok((plan, spec))
}

/// A pipe holding `secret`, write end closed; the read end, close-on-exec
/// unless `inherit` (then an exec'd program keeps it).
fn secret_pipe(secret: &[u8], inherit: bool) -> Result<OwnedFd, LaunchError> {
    let flags = if inherit {
        nix::fcntl::OFlag::empty()
    } else {
        nix::fcntl::OFlag::O_CLOEXEC
    };
    let (r, w) = nix::unistd::pipe2(flags)
        .map_err(|e| LaunchError::Pipe(std::io::Error::from_raw_os_error(e as i32)))?;
    // A passphrase (88 bytes) is far below the pipe buffer: never blocks.
    let mut w = File::from(w);
    w.write_all(secret).map_err(LaunchError::Pipe)?;
    Ok(r)
}

/// Creates `path` as an encrypted qcow2 disk of `size_mib` MiB under `key`
/// (its LUKS passphrase on a pipe), replacing what was there; with `seed`,
/// a raw disk image of exactly that size, its contents are the seed's.
fn create_disk(
    qemu_img: &Path,
    path: &Path,
    size_mib: u64,
    key: &VolumeKey,
    seed: Option<&Path>,
) -> Result<(), LaunchError> {
    let disk_err = |source| LaunchError::Disk {
        path: path.to_owned(),
        source,
    };
    if let Some(seed) = seed {
        let found = std::fs::metadata(seed)
            .map_err(|source| LaunchError::Disk {
                path: seed.to_owned(),
                source,
            })?
            .len();
        if found != size_mib << 20 {
            return Err(LaunchError::SeedSize {
                path: seed.to_owned(),
                expected: size_mib << 20,
                found,
            });
        }
    }
    // A seeded disk is written beside its path and renamed when whole, so
    // that a launcher that dies while copying leaves no disk that a later
    // one would take as made.
    let target = match seed {
        None => path.to_owned(),
        Some(_) => path.with_extension("seeding"),
    };
    for stale in [path, target.as_path()] {
        match std::fs::remove_file(stale) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(disk_err(e)),
        }
    }
    // Made owner-only first, so qemu-img writes into a private file.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&target)
        .map_err(disk_err)?;
    let pipe = secret_pipe(key.to_base64().as_bytes(), false)?;
    let mut cmd = Command::new(qemu_img);
    let secret = format!(
        "secret,id=sec0,format=raw,file=/dev/fd/{}",
        pipe.as_raw_fd()
    );
    let options = format!(
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time={LUKS_ITER_TIME_MS}"
    );
    match seed {
        None => {
            cmd.args([
                "create", "-q", "--object", &secret, "-f", "qcow2", "-o", &options,
            ])
            .arg(path)
            .arg(format!("{size_mib}M"));
        }
        Some(seed) => {
            cmd.args([
                "convert", "-q", "--object", &secret, "-f", "raw", "-O", "qcow2", "-o", &options,
            ])
            .arg(seed)
            .arg(&target);
        }
    }
    cmd.env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    jail::install(
        &mut cmd,
        Plan {
            inherit: vec![pipe.as_raw_fd()],
            ..Plan::default()
        },
    );
    let out = cmd.output();
    drop(pipe);
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let _ = std::fs::remove_file(&target);
            return Err(LaunchError::Exec {
                path: qemu_img.to_owned(),
                source: e,
            });
        }
    };
    if !out.status.success() {
        let _ = std::fs::remove_file(&target);
        let start = out.stderr.len().saturating_sub(MAX_STDERR_TAIL);
        return Err(LaunchError::QemuImg {
            path: path.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr[start..])
                .trim()
                .to_owned(),
        });
    }
    if target != path
        && let Err(e) = std::fs::rename(&target, path)
    {
        let _ = std::fs::remove_file(&target);
        return Err(disk_err(e));
    }
    Ok(())
}

/// QEMU's arguments for disk `i` at `path`, its passphrase on descriptor
/// `fd`.
fn disk_args(i: usize, path: &Path, read_only: bool, fd: RawFd) -> [String; 6] {
    let ro = if read_only { "on" } else { "off" };
    [
        "-object".to_owned(),
        format!("secret,id=sec{i},format=raw,file=/dev/fd/{fd}"),
        "-blockdev".to_owned(),
        format!(
            "driver=qcow2,node-name=vol{i},read-only={ro},encrypt.format=luks,encrypt.key-secret=sec{i},file.driver=file,file.filename={}",
            opt(path)
        ),
        "-device".to_owned(),
        format!("virtio-blk-device,drive=vol{i}"),
    ]
}

/// Runs the launcher: see the module documentation. Returns only on
/// failure; on success the process is QEMU.
pub fn run(args: LaunchArgs) -> Result<std::convert::Infallible, LaunchError> {
    nitrile_vmm_sys::process::forbid_core_dumps().map_err(LaunchError::Dumps)?;
    let plan_fd = take_fd(args.plan_fd)?;
    let control_fd = take_fd(args.control_fd)?;
    let mut bytes = Vec::new();
    File::from(plan_fd)
        .take(MAX_PLAN_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(LaunchError::ReadPlan)?;
    let (plan, spec) = parse_plan(&bytes)?;

    let control = UnixStream::from(control_fd);
    let mut reader = BufReader::new(control.try_clone().map_err(LaunchError::Pipe)?);
    let mut writer = control;
    let keys = crate::unlock::receive_keys(&spec, &mut reader, &mut writer)?;
    drop((reader, writer));
    let scratch_key = spec
        .scratch()
        .map(|_| VolumeKey::generate(&mut rand_core::OsRng))
        .transpose()
        .map_err(LaunchError::ScratchKey)?;

    // Every disk with its key: the volumes, then the instance-store disk.
    let mut disks: Vec<(&Path, bool, &VolumeKey)> = Vec::new();
    for (vol, key) in spec.volumes().iter().zip(&keys) {
        let path = vol.path.as_path();
        if !path.exists() {
            create_disk(
                &plan.qemu_img,
                path,
                vol.size_mib,
                key,
                vol.seed.as_ref().map(|s| s.as_path()),
            )?;
        }
        disks.push((path, vol.read_only, key));
    }
    if let (Some(s), Some(key)) = (spec.scratch(), &scratch_key) {
        create_disk(&plan.qemu_img, s.path.as_path(), s.size_mib, key, None)?;
        disks.push((s.path.as_path(), false, key));
    }

    let mut cmd = Command::new(&plan.qemu);
    cmd.args(&plan.args);
    let mut pipes = Vec::with_capacity(disks.len());
    for (i, (path, read_only, key)) in disks.iter().enumerate() {
        let passphrase: Zeroizing<String> = key.to_base64();
        let pipe = secret_pipe(passphrase.as_bytes(), true)?;
        cmd.args(disk_args(i, path, *read_only, pipe.as_raw_fd()));
        pipes.push(pipe);
    }
    // The keys are zeroized here; QEMU reads the passphrases from the pipes.
    drop(disks);
    drop(keys);
    drop(scratch_key);
    cmd.env_clear();
    let source = cmd.exec();
    drop(pipes);
    Err(LaunchError::Exec {
        path: plan.qemu.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_json(spec: &str, args: usize) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "qemu": "/usr/bin/qemu-system-x86_64",
            "qemu_img": "/usr/bin/qemu-img",
            "args": vec!["-S"; args],
            "spec": spec,
        }))
        .unwrap()
    }

    const SPEC: &str = r#"{"instance":"i-1","image":{"digest":"abababababababababababababababababababababababababababababababab","kernel":"/k","initramfs":"/i","cmdline":""},"vcpus":1,"memory_mib":32,"volumes":[]}"#;

    #[test]
    fn plans_are_parsed_strictly_and_within_bounds() {
        let (plan, spec) = parse_plan(&plan_json(SPEC, 3)).unwrap();
        assert_eq!(plan.args.len(), 3);
        assert_eq!(spec.instance().as_str(), "i-1");
        assert!(matches!(
            parse_plan(&plan_json(SPEC, MAX_PLAN_ARGS + 1)),
            Err(LaunchError::TooManyArgs)
        ));
        assert!(matches!(
            parse_plan(&plan_json("{}", 1)),
            Err(LaunchError::Spec(_))
        ));
        let mut extra: serde_json::Value = serde_json::from_slice(&plan_json(SPEC, 1)).unwrap();
        extra["key"] = "00".into();
        assert!(matches!(
            parse_plan(&serde_json::to_vec(&extra).unwrap()),
            Err(LaunchError::Plan(_))
        ));
        assert!(matches!(
            parse_plan(&vec![b' '; MAX_PLAN_LEN + 1]),
            Err(LaunchError::PlanTooLong)
        ));
    }

    #[test]
    fn disk_arguments_name_the_pipe_and_escape_the_path() {
        let a = disk_args(1, Path::new("/v/a,b.qcow2"), true, 9);
        assert_eq!(a[1], "secret,id=sec1,format=raw,file=/dev/fd/9");
        assert!(a[3].contains("read-only=on") && a[3].contains("file.filename=/v/a,,b.qcow2"));
        assert_eq!(a[5], "virtio-blk-device,drive=vol1");
    }

    #[test]
    fn secret_pipes_hold_exactly_the_secret_and_inherit_on_request() {
        for inherit in [false, true] {
            let r = secret_pipe(b"passphrase", inherit).unwrap();
            let flags = nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_eq!(flags & libc_cloexec() == 0, inherit);
            let mut s = String::new();
            File::from(r).read_to_string(&mut s).unwrap();
            assert_eq!(s, "passphrase");
        }
    }

    fn libc_cloexec() -> i32 {
        nix::fcntl::FdFlag::FD_CLOEXEC.bits()
    }
}
