//! The host image: what a nitrile host boots, as one Unified Kernel Image.
//!
//! [`build_host_image`] makes, from the `nitrile` binary, a host's
//! provisioning directory, Debian's cloud kernel package and systemd's
//! UEFI stub:
//!
//! - `initramfs`: a cpio newc archive ([`crate::cpio`]) holding exactly
//!   `/init` (a symbolic link to `/usr/bin/nitrile`), `/usr/bin/nitrile`,
//!   `/usr/sbin/mke2fs` (to make the state filesystem on first boot), the
//!   shared libraries both link and the dynamic loader (as `ldd` names
//!   them), the libraries `nitrile` opens at run time ([`DLOPENED_LIBRARIES`]:
//!   `ldd` cannot see them) with theirs, the kernel modules the host loads with their dependencies
//!   (`/lib/modules/<release>/modules.load` lists them in load order),
//!   the provisioning directory at [`PROVISION_DIR`], `/dev/console`, and
//!   the empty mount points `/proc`, `/sys`, `/dev`, `/run`, `/tmp` and
//!   [`STATE_DIR`]. No shell, no other program.
//! - `host.efi`: the stub with the sections `.osrel`, `.cmdline`, `.linux`
//!   and `.initrd` added ([`crate::uki`]).
//! - `reference.json`: the image's digests and the values PCRs 4, 11 and
//!   15 of the SHA-256 bank must hold once it booted ([`Reference`]).
//!
//! The same inputs give the same bytes: entries are sorted with fixed
//! metadata, the compressor (zstd, single-threaded, a fixed level) is
//! deterministic for one zstd version, and the stub's sections are placed
//! at addresses computed from the stub alone.
//!
//! It runs `dpkg-deb` (to unpack the kernel package), `depmod` (for module
//! dependencies), `ldd`, `zstd` and `objcopy` from the build machine.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;

use crate::cpio::{Archive, CpioError, Entry, EntryKind};
use crate::pcr::{self, InitEvent};
use crate::pe::{self, PeError};
use crate::uki::{self, UkiError};

/// Where the provisioning directory is in the image (absolute).
pub const PROVISION_DIR: &str = "/etc/nitrile/host";
/// Where the state filesystem is mounted (absolute).
pub const STATE_DIR: &str = "/var/lib/nitrile";
/// Where the `nitrile` binary is in the image (absolute).
pub const NITRILE_PATH: &str = "/usr/bin/nitrile";
/// Where `mke2fs` is in the image (absolute).
pub const MKE2FS_PATH: &str = "/usr/sbin/mke2fs";
/// The file listing the modules to load, in order, relative to
/// `/lib/modules/<release>/`.
pub const MODULES_LOAD: &str = "modules.load";
/// The modules a host loads when they are not built in: its NIC, its
/// disk, its entropy source (virtio), and the TPM drivers and ext4 when a
/// kernel has them as modules.
pub const HOST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_rng",
    "tpm_crb",
    "tpm_tis",
    "ext4",
];
/// Libraries `nitrile` loads with `dlopen`, which `ldd` does not name:
/// tpm2-tss's TCTI loader opens the TPM device's TCTI by its file name.
/// The builder takes each from the directory of a library `nitrile` links.
pub const DLOPENED_LIBRARIES: &[&str] = &["libtss2-tcti-device.so.0"];
/// The event a UEFI firmware (EDK2's Tcg2Dxe) extends into PCR 4 before
/// it starts the first boot option.
pub const EFI_CALLING_APPLICATION: &str = "Calling EFI Application from Boot Option";
/// Largest provisioning file read.
pub const MAX_PROVISION_FILE: u64 = 1024 * 1024;

/// Why the host image could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostImageError {
    /// An input file or directory could not be read, or an output written.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A build tool could not be run or failed.
    #[error("{tool} failed: {detail}")]
    Tool {
        /// The tool.
        tool: &'static str,
        /// Its status and the end of its stderr.
        detail: String,
    },
    /// The kernel package lacks what the image needs.
    #[error("the kernel package {}: {what}", deb.display())]
    Kernel {
        /// The package.
        deb: PathBuf,
        /// What is missing.
        what: String,
    },
    /// A library `nitrile` opens at run time is not beside the ones it
    /// links.
    #[error("{0} is not in any directory of the libraries nitrile links (install it)")]
    NoLibrary(String),
    /// A module is neither built in nor in the package.
    #[error("module {0} is neither built into the kernel nor in its package")]
    NoModule(String),
    /// The archive refused an entry.
    #[error("initramfs")]
    Cpio(#[from] CpioError),
    /// The stub or the image is not a PE image.
    #[error("PE image")]
    Pe(#[from] PeError),
    /// The UKI could not be assembled.
    #[error("unified kernel image")]
    Uki(#[from] UkiError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> HostImageError + '_ {
    move |source| HostImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What goes into a host image.
#[derive(Debug, Clone)]
pub struct HostImageSpec {
    /// The `nitrile` binary.
    pub nitrile: PathBuf,
    /// The staged provisioning directory, copied whole to [`PROVISION_DIR`]
    /// (files keep their permission bits; directories are 0700).
    pub provision: PathBuf,
    /// The `linux-image-*-cloud-amd64` package.
    pub kernel_deb: PathBuf,
    /// systemd's UEFI stub (`linuxx64.efi.stub`).
    pub stub: PathBuf,
    /// `mke2fs`.
    pub mke2fs: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// The modules to load (those built in are skipped).
    pub modules: Vec<String>,
    /// Libraries `nitrile` opens at run time, by file name
    /// ([`DLOPENED_LIBRARIES`]).
    pub dlopened: Vec<String>,
    /// The measurements of the host's init, in order (from the staged
    /// provisioning directory, with the paths the image has them at).
    pub init_events: Vec<InitEvent>,
    /// Extra fields for `reference.json` (`hostd` address and the like).
    pub annotations: BTreeMap<String, String>,
}

/// One PCR event of a prediction.
#[derive(Debug, Clone, Serialize)]
pub struct PredictedEvent {
    /// What is measured.
    pub description: String,
    /// The digest extended, hex.
    pub sha256: String,
}

/// A file of the image and its digest.
#[derive(Debug, Clone, Serialize)]
pub struct FileDigest {
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of its contents, hex.
    pub sha256: String,
}

/// `reference.json`: what a verifier compares a booted host's PCRs and
/// files with.
#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    /// `nitrile-host-image/1`.
    pub format: &'static str,
    /// The kernel release.
    pub kernel_release: String,
    /// The kernel command line in the UKI.
    pub cmdline: String,
    /// `host.efi` and `initramfs`.
    pub files: BTreeMap<String, FileDigest>,
    /// The Authenticode SHA-256 of `host.efi` (what the firmware measures).
    pub uki_authenticode_sha256: String,
    /// The UKI's added sections.
    pub sections: BTreeMap<String, FileDigest>,
    /// Predicted PCR 4 (SHA-256 bank), hex.
    pub pcr4: String,
    /// Predicted PCR 11, hex.
    pub pcr11: String,
    /// Predicted PCR 15, hex.
    pub pcr15: String,
    /// The events of PCR 4, in order.
    pub pcr4_events: Vec<PredictedEvent>,
    /// The events of PCR 11, in order.
    pub pcr11_events: Vec<PredictedEvent>,
    /// The events of PCR 15 (the host's init), in order.
    pub pcr15_events: Vec<InitEvent>,
    /// The compressor of the initramfs and its version.
    pub initramfs_compression: String,
    /// Extra fields given by the builder.
    pub annotations: BTreeMap<String, String>,
}

/// What a host image build produced.
#[derive(Debug, Clone)]
pub struct BuiltHostImage {
    /// The output directory.
    pub dir: PathBuf,
    /// `initramfs`.
    pub initramfs: PathBuf,
    /// `host.efi`.
    pub uki: PathBuf,
    /// `reference.json`.
    pub reference_file: PathBuf,
    /// Its contents.
    pub reference: Reference,
    /// Uncompressed bytes of the initramfs's contents by part (`nitrile`,
    /// `libraries`, `mke2fs`, `modules`, `provisioning`), and the kernel.
    pub room: BTreeMap<&'static str, u64>,
}

fn run_tool(tool: &'static str, cmd: &mut Command) -> Result<Vec<u8>, HostImageError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| HostImageError::Tool {
            tool,
            detail: format!("cannot run it: {e}"),
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err.lines().rev().take(5).collect::<Vec<_>>().join(" / ");
        return Err(HostImageError::Tool {
            tool,
            detail: format!("{}: {tail}", out.status),
        });
    }
    Ok(out.stdout)
}

/// The absolute paths `ldd` names for `binary`: its libraries and the
/// dynamic loader.
pub fn linked_libraries(binary: &Path) -> Result<BTreeSet<PathBuf>, HostImageError> {
    let out = run_tool("ldd", Command::new("ldd").arg(binary))?;
    let text = String::from_utf8_lossy(&out);
    let mut libs = BTreeSet::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let path = match words.as_slice() {
            [_, "=>", path, ..] => *path,
            [path, ..] => *path,
            [] => continue,
        };
        if path.starts_with('/') {
            libs.insert(PathBuf::from(path));
        } else if words.get(1) == Some(&"=>") && path == "not" {
            return Err(HostImageError::Tool {
                tool: "ldd",
                detail: format!("{}: {line}", binary.display()),
            });
        }
    }
    Ok(libs)
}

/// A module's name from its file name (`virtio_net.ko.xz` -> `virtio_net`),
/// with `-` read as `_` as the kernel does.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Modules in load order: each after all of its dependencies (from
/// `modules.dep`), those wanted first in the order given.
fn load_order(dep: &str, wanted: &[String]) -> Result<(Vec<String>, Vec<String>), String> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let list = rest.split_whitespace().map(module_name).collect();
        deps.insert(module_name(path), (path.to_owned(), list));
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    let mut missing = Vec::new();
    fn visit(
        m: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(m.to_owned()) {
            return;
        }
        if let Some((path, list)) = deps.get(m) {
            // modules.dep lists the modules a module needs so that the
            // last one is loaded first.
            for d in list.iter().rev() {
                visit(d, deps, seen, order);
            }
            order.push(path.clone());
        }
    }
    for m in wanted {
        let m = m.replace('-', "_");
        if deps.contains_key(&m) {
            visit(&m, &deps, &mut seen, &mut order);
        } else {
            missing.push(m);
        }
    }
    Ok((order, missing))
}

fn read(path: &Path) -> Result<Vec<u8>, HostImageError> {
    fs::read(path).map_err(io_at(path))
}

fn strip_root(path: &Path) -> String {
    path.to_string_lossy().trim_start_matches('/').to_owned()
}

fn add_file(
    archive: &mut Archive,
    path: &str,
    data: Vec<u8>,
    perm: u32,
) -> Result<(), HostImageError> {
    if let Some((parent, _)) = path.rsplit_once('/') {
        archive.add_dirs(parent)?;
    }
    archive.add(
        path,
        Entry {
            kind: EntryKind::File(data),
            perm,
        },
    )?;
    Ok(())
}

/// Copies the provisioning directory `dir` into the archive under `at`.
fn add_tree(archive: &mut Archive, dir: &Path, at: &str) -> Result<u64, HostImageError> {
    use std::os::unix::fs::PermissionsExt;
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(io_at(dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_at(dir))?;
    names.sort();
    let mut bytes = 0;
    for name in names {
        let path = dir.join(&name);
        let name = name.to_string_lossy().into_owned();
        let inside = format!("{at}/{name}");
        let meta = fs::symlink_metadata(&path).map_err(io_at(&path))?;
        if meta.is_dir() {
            archive.add(
                &inside,
                Entry {
                    kind: EntryKind::Dir,
                    perm: 0o700,
                },
            )?;
            bytes += add_tree(archive, &path, &inside)?;
        } else if meta.is_file() {
            if meta.len() > MAX_PROVISION_FILE {
                return Err(HostImageError::Io {
                    path,
                    source: io::Error::other("larger than any provisioning file"),
                });
            }
            let data = read(&path)?;
            bytes += data.len() as u64;
            archive.add(
                &inside,
                Entry {
                    kind: EntryKind::File(data),
                    perm: meta.permissions().mode() & 0o700,
                },
            )?;
        } else {
            return Err(HostImageError::Io {
                path,
                source: io::Error::other("neither a file nor a directory"),
            });
        }
    }
    Ok(bytes)
}

/// The unpacked kernel package.
struct KernelPackage {
    release: String,
    bzimage: PathBuf,
    config: String,
    moddir: PathBuf,
}

fn unpack_kernel(deb: &Path, into: &Path) -> Result<KernelPackage, HostImageError> {
    run_tool(
        "dpkg-deb",
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(into),
    )?;
    let kernel_err = |what: &str| HostImageError::Kernel {
        deb: deb.to_owned(),
        what: what.to_owned(),
    };
    let modules = into.join("lib/modules");
    let release = fs::read_dir(&modules)
        .map_err(|_| kernel_err("no lib/modules/<release>"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .min()
        .ok_or_else(|| kernel_err("no lib/modules/<release>"))?;
    let bzimage = into.join(format!("boot/vmlinuz-{release}"));
    let config_path = into.join(format!("boot/config-{release}"));
    if !bzimage.is_file() {
        return Err(kernel_err(&format!("no boot/vmlinuz-{release}")));
    }
    let config = fs::read_to_string(&config_path)
        .map_err(|_| kernel_err(&format!("no boot/config-{release}")))?;
    run_tool(
        "depmod",
        Command::new("depmod").arg("-b").arg(into).arg(&release),
    )?;
    Ok(KernelPackage {
        moddir: modules.join(&release),
        release,
        bzimage,
        config,
    })
}

/// What the kernel's config says about `option` (`y`, `m`, or `None`).
pub fn config_value<'a>(config: &'a str, option: &str) -> Option<&'a str> {
    config.lines().find_map(|l| {
        l.strip_prefix(option)
            .and_then(|r| r.strip_prefix('='))
            .map(str::trim)
    })
}

fn zstd(data: &[u8], out: &Path) -> Result<String, HostImageError> {
    let version = run_tool("zstd", Command::new("zstd").arg("-V"))?;
    // "*** Zstandard CLI (64-bit) v1.5.4, by Yann Collet ***"
    let version = String::from_utf8_lossy(&version)
        .split_whitespace()
        .find(|w| w.starts_with('v') && w[1..].starts_with(|c: char| c.is_ascii_digit()))
        .map(|w| w.trim_end_matches(',').to_owned())
        .unwrap_or_else(|| "unknown version".to_owned());
    let raw = out.with_extension("cpio");
    fs::write(&raw, data).map_err(io_at(&raw))?;
    run_tool(
        "zstd",
        Command::new("zstd")
            .args(["-q", "-f", "-9", "-T1", "--no-progress", "-o"])
            .arg(out)
            .arg(&raw),
    )?;
    fs::remove_file(&raw).map_err(io_at(&raw))?;
    Ok(format!("zstd -9 ({version})"))
}

/// The `.osrel` section: the os-release of the image.
fn os_release(release: &str) -> String {
    format!(
        "ID=nitrile\nNAME=\"nitrile host\"\nPRETTY_NAME=\"nitrile host (Linux {release})\"\nVERSION_ID={}\n",
        env!("CARGO_PKG_VERSION")
    )
}

fn file_digest(data: &[u8]) -> FileDigest {
    FileDigest {
        size: data.len() as u64,
        sha256: hex::encode(pcr::sha256(data)),
    }
}

fn event(description: impl Into<String>, digest: [u8; 32]) -> (PredictedEvent, [u8; 32]) {
    (
        PredictedEvent {
            description: description.into(),
            sha256: hex::encode(digest),
        },
        digest,
    )
}

/// Builds the host image into `out` (made if missing); `progress` gets a
/// line for each long step.
pub fn build_host_image(
    spec: &HostImageSpec,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltHostImage, HostImageError> {
    fs::create_dir_all(out).map_err(io_at(out))?;
    let work = out.join(".work");
    if work.exists() {
        fs::remove_dir_all(&work).map_err(io_at(&work))?;
    }
    fs::create_dir_all(&work).map_err(io_at(&work))?;
    let result = build_in(spec, out, &work, progress);
    let _ = fs::remove_dir_all(&work);
    result
}

fn build_in(
    spec: &HostImageSpec,
    out: &Path,
    work: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<BuiltHostImage, HostImageError> {
    progress(&format!(
        "unpacking {}",
        spec.kernel_deb
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
    ));
    let pkg = unpack_kernel(&spec.kernel_deb, &work.join("pkg"))?;
    let mut room: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut archive = Archive::new();
    for dir in ["dev", "proc", "sys", "run", "usr/bin", "usr/sbin"] {
        archive.add_dirs(dir)?;
    }
    archive.add(
        "tmp",
        Entry {
            kind: EntryKind::Dir,
            perm: 0o1777,
        },
    )?;
    archive.add_dirs(&strip_root(Path::new(STATE_DIR)))?;
    archive.add(
        "dev/console",
        Entry {
            kind: EntryKind::CharDevice(5, 1),
            perm: 0o600,
        },
    )?;

    // nitrile, as /usr/bin/nitrile and /init.
    let nitrile = read(&spec.nitrile)?;
    room.insert("nitrile", nitrile.len() as u64);
    add_file(
        &mut archive,
        &strip_root(Path::new(NITRILE_PATH)),
        nitrile,
        0o755,
    )?;
    archive.add(
        "init",
        Entry {
            kind: EntryKind::Symlink(strip_root(Path::new(NITRILE_PATH))),
            perm: 0o777,
        },
    )?;
    let mke2fs = read(&spec.mke2fs)?;
    room.insert("mke2fs", mke2fs.len() as u64);
    add_file(
        &mut archive,
        &strip_root(Path::new(MKE2FS_PATH)),
        mke2fs,
        0o755,
    )?;

    // The libraries both link, and the loader; then those nitrile opens
    // at run time, from the directories of those it links, with theirs.
    let mut libs = linked_libraries(&spec.nitrile)?;
    let lib_dirs: BTreeSet<PathBuf> = libs
        .iter()
        .filter_map(|l| l.parent().map(Path::to_owned))
        .collect();
    for name in &spec.dlopened {
        let lib = lib_dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| HostImageError::NoLibrary(name.clone()))?;
        libs.extend(linked_libraries(&lib)?);
        libs.insert(lib);
    }
    libs.extend(linked_libraries(&spec.mke2fs)?);
    let mut lib_bytes = 0;
    for lib in &libs {
        let data = read(lib)?;
        lib_bytes += data.len() as u64;
        add_file(&mut archive, &strip_root(lib), data, 0o755)?;
    }
    room.insert("libraries", lib_bytes);

    // The modules, in load order, as the package has them (the kernel
    // decompresses them itself and checks their signatures).
    let dep_path = pkg.moddir.join("modules.dep");
    let dep = fs::read_to_string(&dep_path).map_err(io_at(&dep_path))?;
    let builtin_path = pkg.moddir.join("modules.builtin");
    let builtin: BTreeSet<String> = fs::read_to_string(&builtin_path)
        .map_err(io_at(&builtin_path))?
        .lines()
        .map(module_name)
        .collect();
    let (order, missing) =
        load_order(&dep, &spec.modules).map_err(|what| HostImageError::Kernel {
            deb: spec.kernel_deb.clone(),
            what,
        })?;
    if let Some(m) = missing.iter().find(|m| !builtin.contains(*m)) {
        return Err(HostImageError::NoModule(m.clone()));
    }
    let mod_root = format!("lib/modules/{}", pkg.release);
    let mut mod_bytes = 0;
    for rel in &order {
        let data = read(&pkg.moddir.join(rel))?;
        mod_bytes += data.len() as u64;
        add_file(&mut archive, &format!("{mod_root}/{rel}"), data, 0o644)?;
    }
    room.insert("modules", mod_bytes);
    let mut list = order.join("\n");
    list.push('\n');
    add_file(
        &mut archive,
        &format!("{mod_root}/{MODULES_LOAD}"),
        list.into_bytes(),
        0o644,
    )?;
    progress(&format!(
        "modules: {} of {} ({} built in)",
        order
            .iter()
            .map(|p| module_name(p))
            .collect::<Vec<_>>()
            .join(", "),
        pkg.release,
        missing.join(", ")
    ));

    // The provisioning directory.
    let prov = strip_root(Path::new(PROVISION_DIR));
    if let Some((parent, _)) = prov.rsplit_once('/') {
        archive.add_dirs(parent)?;
    }
    archive.add(
        &prov,
        Entry {
            kind: EntryKind::Dir,
            perm: 0o700,
        },
    )?;
    room.insert(
        "provisioning",
        add_tree(&mut archive, &spec.provision, &prov)?,
    );

    progress("writing the initramfs (cpio newc, zstd)");
    let cpio = archive.to_bytes();
    let initramfs_path = out.join("initramfs");
    let compression = if config_value(&pkg.config, "CONFIG_RD_ZSTD") == Some("y") {
        zstd(&cpio, &initramfs_path)?
    } else {
        fs::write(&initramfs_path, &cpio).map_err(io_at(&initramfs_path))?;
        "none".to_owned()
    };
    drop(cpio);
    let initramfs = read(&initramfs_path)?;

    progress("assembling host.efi");
    let linux = read(&pkg.bzimage)?;
    room.insert("kernel", linux.len() as u64);
    let osrel = os_release(&pkg.release);
    let stub = read(&spec.stub)?;
    let sections: Vec<(&str, &[u8])> = vec![
        (".osrel", osrel.as_bytes()),
        (".cmdline", spec.cmdline.as_bytes()),
        (".linux", &linux),
        (".initrd", &initramfs),
    ];
    let uki_path = out.join("host.efi");
    uki::assemble(&spec.stub, &stub, &sections, &uki_path, work)?;
    let uki_bytes = read(&uki_path)?;
    let authenticode = pe::authenticode_sha256(&uki_bytes)?;

    // PCR 4 (seen in OVMF's event log): the firmware's "calling" action,
    // the separator between pre-boot and boot, the UKI as the boot
    // option's application, then the kernel, which the stub starts with
    // the firmware's LoadImage (so the firmware measures it too).
    let pcr4_events = vec![
        event(
            format!("EV_EFI_ACTION \"{EFI_CALLING_APPLICATION}\""),
            pcr::sha256(EFI_CALLING_APPLICATION.as_bytes()),
        ),
        event("EV_SEPARATOR (4 zero bytes)", pcr::sha256(&[0u8; 4])),
        event(
            "EV_EFI_BOOT_SERVICES_APPLICATION host.efi (Authenticode)",
            authenticode,
        ),
        event(
            "EV_EFI_BOOT_SERVICES_APPLICATION .linux (Authenticode)",
            pe::authenticode_sha256(&linux)?,
        ),
    ];
    // PCR 11: systemd-stub measures, in its fixed order of section kinds
    // (.linux, .osrel, .cmdline, .initrd), each section's name with its
    // NUL, then its contents.
    let mut pcr11_events = Vec::new();
    for name in uki::MEASURED_ORDER {
        let Some((_, data)) = sections.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let mut label = name.as_bytes().to_vec();
        label.push(0);
        pcr11_events.push(event(format!("EV_IPL {name} (name)"), pcr::sha256(&label)));
        pcr11_events.push(event(
            format!("EV_IPL {name} (contents)"),
            pcr::sha256(data),
        ));
    }
    let value = |events: &[(PredictedEvent, [u8; 32])]| {
        hex::encode(pcr::extend_all(events.iter().map(|(_, d)| d)))
    };
    let mut files = BTreeMap::new();
    files.insert("host.efi".to_owned(), file_digest(&uki_bytes));
    files.insert("initramfs".to_owned(), file_digest(&initramfs));
    let reference = Reference {
        format: "nitrile-host-image/1",
        kernel_release: pkg.release.clone(),
        cmdline: spec.cmdline.clone(),
        files,
        uki_authenticode_sha256: hex::encode(authenticode),
        sections: sections
            .iter()
            .map(|(n, d)| ((*n).to_owned(), file_digest(d)))
            .collect(),
        pcr4: value(&pcr4_events),
        pcr11: value(&pcr11_events),
        pcr15: hex::encode(pcr::init_pcr(&spec.init_events)),
        pcr4_events: pcr4_events.into_iter().map(|(e, _)| e).collect(),
        pcr11_events: pcr11_events.into_iter().map(|(e, _)| e).collect(),
        pcr15_events: spec.init_events.clone(),
        initramfs_compression: compression,
        annotations: spec.annotations.clone(),
    };
    let reference_file = out.join("reference.json");
    let mut text = serde_json::to_string_pretty(&reference)
        .unwrap_or_else(|_| unreachable!("a reference is strings and maps"));
    text.push('\n');
    fs::write(&reference_file, text).map_err(io_at(&reference_file))?;
    Ok(BuiltHostImage {
        dir: out.to_owned(),
        initramfs: initramfs_path,
        uki: uki_path,
        reference_file,
        reference,
        room,
    })
}

/// The newest `linux-image-*-cloud-amd64_*.deb` that
/// `scripts/guest-image.sh` downloaded into `cache`.
pub fn cached_kernel_deb(cache: &Path) -> Option<PathBuf> {
    let dir = cache.join("guest-image").join("deb");
    let mut debs: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with("linux-image-") && n.contains("-cloud-amd64_") && n.ends_with(".deb")
        })
        .collect();
    debs.sort();
    debs.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_after_their_dependencies() {
        let dep = "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n\
                   kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n\
                   kernel/net/core/failover.ko.xz:\n\
                   kernel/drivers/block/virtio_blk.ko.xz:\n";
        let (order, missing) = load_order(
            dep,
            &["virtio_net".into(), "virtio_blk".into(), "ext4".into()],
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/core/failover.ko.xz",
                "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/net/virtio_net.ko.xz",
                "kernel/drivers/block/virtio_blk.ko.xz",
            ]
        );
        assert_eq!(missing, ["ext4"]);
    }

    #[test]
    fn module_names_are_read_from_paths() {
        assert_eq!(module_name("kernel/a/tpm-crb.ko.xz"), "tpm_crb");
        assert_eq!(module_name("kernel/ext4/ext4.ko"), "ext4");
        assert_eq!(module_name("virtio_pci"), "virtio_pci");
    }

    #[test]
    fn config_values_are_found() {
        let c = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_AB=m\n";
        assert_eq!(config_value(c, "CONFIG_A"), Some("y"));
        assert_eq!(config_value(c, "CONFIG_AB"), Some("m"));
        assert_eq!(config_value(c, "CONFIG_B"), None);
    }
}
