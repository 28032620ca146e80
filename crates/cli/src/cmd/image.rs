//! `nitrile image`: build, list and show content-addressed guest images.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nitrile_image::{Digest, ImageManifest, ImageRef, ImageStore};
use serde::Serialize;

use crate::Global;
use crate::output::{Output, errln, outln, print_json, print_table};

/// The images directory inside a state directory.
const IMAGES_DIR: &str = "images";

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Build the guest image from Debian's `linux-image-cloud-amd64`
    /// (bookworm-backports): an uncompressed ELF vmlinux and a busybox
    /// initramfs. Imports it into `<state>/images` and prints its digest.
    ///
    /// The first build downloads the kernel package (about 34 MB) and takes
    /// a minute or so; later builds reuse the cache. Progress goes to stderr.
    /// Needs the Debian packages `scripts/setup.sh` installs.
    ///
    /// Example: `nitrile image build --state ./nitrile-state`
    Build {
        /// State directory (as for `nitrile up`).
        #[arg(long, value_name = "DIR", default_value = "nitrile-state")]
        state: PathBuf,
        /// Download and build cache (else $NITRILE_CACHE_DIR, else
        /// ${XDG_CACHE_HOME:-~/.cache}/nitrile).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
    },
    /// Build the host image: a Unified Kernel Image (`host.efi`) that boots
    /// a nitrile host with `nitrile` itself as PID 1, its `initramfs`, and
    /// `reference.json` with the digests and the PCR 4, 11 and 15 values a
    /// host booted from it must show.
    ///
    /// The initramfs holds `nitrile`, the libraries it and `mke2fs` link,
    /// `mke2fs`, the kernel modules the host loads and the host's
    /// provisioning (its agent config, certificate, key, pinned issuer keys
    /// and trust roots, from `--provision`, a host directory as `nitrile up`
    /// writes it); no shell or any other program. The kernel is Debian's
    /// cloud kernel that `scripts/guest-image.sh` downloads. The same
    /// inputs give the same bytes. Needs `dpkg-deb`, `depmod`, `ldd`,
    /// `zstd`, `objcopy` and systemd-boot-efi's stub (`scripts/setup.sh`).
    /// The image holds the host's private key: keep it as secret as the
    /// key; with `--enroll` it holds none (the host's key is made in its
    /// TPM and enrolled once it booted).
    ///
    /// Example: `nitrile image build-host --provision nitrile-state/hosts/h1 --out host-image --enroll`
    BuildHost(Box<BuildHostArgs>),
    /// List the images in the store: digest, kernel release, sizes, command
    /// line. Stored files are not re-hashed here; `show` does that.
    ///
    /// Example: `nitrile image list -o json`
    List {
        /// State directory (as for `nitrile up`).
        #[arg(long, value_name = "DIR", default_value = "nitrile-state")]
        state: PathBuf,
    },
    /// Verify one image's stored files against its digest and show it.
    /// DIGEST may be a unique prefix of at least 8 hex digits.
    ///
    /// Example: `nitrile image show 3f2a9c1e`
    Show {
        /// The image digest (or a unique prefix).
        digest: String,
        /// State directory (as for `nitrile up`).
        #[arg(long, value_name = "DIR", default_value = "nitrile-state")]
        state: PathBuf,
    },
}

/// `nitrile image build-host`.
#[derive(Debug, clap::Args)]
pub(crate) struct BuildHostArgs {
    /// The host's provisioning directory (with `hostd.toml`), as `nitrile
    /// up` writes `<state>/hosts/<name>`.
    #[arg(long, value_name = "DIR")]
    provision: PathBuf,
    /// Output directory (made if missing).
    #[arg(long, value_name = "DIR", default_value = "host-image")]
    out: PathBuf,
    /// The `nitrile` binary to put in the image (default: this one).
    #[arg(long, value_name = "PATH")]
    nitrile: Option<PathBuf>,
    /// Strip debug information from that binary first (smaller image; the
    /// binary in the image is then not byte for byte the one given).
    #[arg(long)]
    strip: bool,
    /// Debian's `linux-image-*-cloud-amd64` package (default: the newest
    /// in the cache, as `scripts/guest-image.sh` downloads it).
    #[arg(long, value_name = "DEB")]
    kernel_deb: Option<PathBuf>,
    /// Download and build cache (else $NITRILE_CACHE_DIR, else
    /// ${XDG_CACHE_HOME:-~/.cache}/nitrile).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// systemd's UEFI stub.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_STUB)]
    stub: PathBuf,
    /// `mke2fs`, which makes the state filesystem on first boot.
    #[arg(long, value_name = "PATH", default_value = "/usr/sbin/mke2fs")]
    mke2fs: PathBuf,
    /// The host's address on its network (QEMU's user network by default).
    #[arg(long, value_name = "ADDR/PREFIX", default_value = "10.0.2.15/24")]
    ip: String,
    /// The default gateway.
    #[arg(long, value_name = "ADDR", default_value = "10.0.2.2")]
    gateway: std::net::Ipv4Addr,
    /// Where the host agent listens in the host (default: all addresses,
    /// on the port of the provisioned config).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// More kernel command line parameters.
    #[arg(long, value_name = "PARAMS")]
    append: Option<String>,
    /// Leave the host's key and certificate out: the booted host makes its
    /// TLS key in its TPM, bound to the measured image, and waits on the
    /// agent's port for the cell CA to enroll it (`nitrile pki enroll-host
    /// --address`); what enrollment gives it is kept on its state disk
    /// (`/var/lib/nitrile/enrollment/`), outside the measured image.
    #[arg(long)]
    enroll: bool,
}

/// Where an enrolled host image keeps what enrollment gave it, on the
/// state filesystem.
const ENROLLMENT_DIR: &str = "enrollment";

/// systemd-boot-efi's UEFI stub.
const DEFAULT_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// The kernel command line of every host image: the serial console,
/// lockdown (no /dev/mem, kcore, kexec of unsigned kernels or BPF reads of
/// kernel memory), only signed modules, freed memory zeroed, and an
/// immediate reboot on a kernel panic (`panic=-1`).
pub(crate) const HOST_CMDLINE: &str =
    "console=ttyS0 lockdown=confidentiality module.sig_enforce=1 init_on_free=1 panic=-1";

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    match command {
        Command::BuildHost(args) => build_host(*args, global.output),
        Command::Build { state, cache } => build(&state, cache, global.output),
        Command::List { state } => list(&state, global.output),
        Command::Show { digest, state } => show(&state, &digest, global.output),
    }
}

fn open_store(state: &Path) -> anyhow::Result<ImageStore> {
    let dir = state.join(IMAGES_DIR);
    ImageStore::open(&dir).with_context(|| format!("cannot open the image store {}", dir.display()))
}

/// An image as printed by `show` and `build` with `-o json`.
#[derive(Serialize)]
struct ImageJson<'a> {
    digest: Digest,
    kernel: String,
    kernel_sha256: Digest,
    kernel_size: u64,
    kernel_format: &'static str,
    kernel_release: Option<&'a str>,
    initramfs: String,
    initramfs_sha256: Digest,
    initramfs_size: u64,
    cmdline: &'a str,
    cmdline_sha256: Digest,
    verified: bool,
}

impl<'a> ImageJson<'a> {
    fn of(image: &'a ImageRef) -> Self {
        let m = image.manifest();
        Self {
            digest: image.digest(),
            kernel: image.kernel().display().to_string(),
            kernel_sha256: image.kernel_sha256(),
            kernel_size: m.kernel.size,
            kernel_format: image.kernel_format().as_str(),
            kernel_release: m.kernel_release.as_deref(),
            initramfs: image.initramfs().display().to_string(),
            initramfs_sha256: image.initramfs_sha256(),
            initramfs_size: m.initramfs.size,
            cmdline: image.cmdline().as_str(),
            cmdline_sha256: image.cmdline_sha256(),
            verified: true,
        }
    }
}

fn build(state: &Path, cache: Option<PathBuf>, output: Output) -> anyhow::Result<()> {
    let cache = match cache {
        Some(c) => c,
        None => nitrile_image::default_cache_dir()?,
    };
    let store = open_store(state)?;
    errln!("nitrile image build: building in {}", cache.display())?;
    let built = nitrile_image::build_guest_image(&cache).context("guest image build")?;
    errln!(
        "nitrile image build: importing into {} (hashing {})",
        store.root().display(),
        built.kernel.display()
    )?;
    let image = store
        .import(&built.kernel, &built.initramfs, &built.cmdline)
        .context("cannot import the built image")?;
    match output {
        Output::Json => print_json(&ImageJson::of(&image)),
        Output::Table => {
            outln!("{}", image.digest())?;
            Ok(())
        }
    }
}

fn human_size(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

fn list(state: &Path, output: Output) -> anyhow::Result<()> {
    let store = open_store(state)?;
    let images: Vec<ImageManifest> = store.list().context("cannot list images")?;
    match output {
        Output::Json => print_json(&images),
        Output::Table => {
            let rows: Vec<Vec<String>> = images
                .iter()
                .map(|m| {
                    vec![
                        m.digest.to_string(),
                        m.kernel_release.clone().unwrap_or_else(|| "-".to_owned()),
                        human_size(m.kernel.size),
                        human_size(m.initramfs.size),
                        m.cmdline.to_string(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "DIGEST",
                    "KERNEL",
                    "KERNEL SIZE",
                    "INITRAMFS SIZE",
                    "CMDLINE",
                ],
                &rows,
            )?;
            Ok(())
        }
    }
}

/// Shortest accepted digest prefix for `show`.
const MIN_PREFIX: usize = 8;

fn resolve(store: &ImageStore, given: &str) -> anyhow::Result<Digest> {
    if let Ok(d) = given.parse::<Digest>() {
        return Ok(d);
    }
    let bare = given
        .strip_prefix(nitrile_image::DIGEST_PREFIX)
        .unwrap_or(given);
    if bare.len() < MIN_PREFIX || !bare.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        bail!(
            "{given:?} is not an image digest (64 lowercase hex digits, or a prefix of at least {MIN_PREFIX})"
        );
    }
    match store.find_prefix(bare)?.as_slice() {
        [one] => Ok(*one),
        [] => bail!("no image digest starts with {bare}"),
        many => bail!("{} images start with {bare}; give more digits", many.len()),
    }
}

fn show(state: &Path, given: &str, output: Output) -> anyhow::Result<()> {
    let store = open_store(state)?;
    let digest = resolve(&store, given)?;
    let image = store
        .get(&digest)
        .with_context(|| format!("image {digest} failed verification or cannot be read"))?;
    let j = ImageJson::of(&image);
    match output {
        Output::Json => print_json(&j),
        Output::Table => {
            outln!("digest:           {}", j.digest)?;
            outln!("verified:         kernel, initramfs and command line match the digest")?;
            outln!("kernel:           {}", j.kernel)?;
            outln!("kernel sha256:    {}", j.kernel_sha256)?;
            outln!(
                "kernel size:      {} ({})",
                j.kernel_size,
                human_size(j.kernel_size)
            )?;
            outln!("kernel format:    {}", j.kernel_format)?;
            outln!("kernel release:   {}", j.kernel_release.unwrap_or("-"))?;
            outln!("initramfs:        {}", j.initramfs)?;
            outln!("initramfs sha256: {}", j.initramfs_sha256)?;
            outln!(
                "initramfs size:   {} ({})",
                j.initramfs_size,
                human_size(j.initramfs_size)
            )?;
            outln!("cmdline:          {}", j.cmdline)?;
            outln!("cmdline sha256:   {}", j.cmdline_sha256)?;
            Ok(())
        }
    }
}

/// Copies what the host agent of `provision` needs into `staged`, with a
/// config rewritten for the image: the state, images and volumes on the
/// state filesystem, the files next to the config, no binary paths, no
/// instance network (the data path is provisioned apart), the release
/// repository on the state filesystem, and the machine's TPM
/// (`device:/dev/tpmrm0`) with the event log of the init's measurement.
/// With `enroll`, no key or certificate: the config names where enrollment
/// puts them on the state filesystem, the key being the TPM's.
fn stage_provisioning(
    provision: &Path,
    staged: &Path,
    listen: Option<std::net::SocketAddr>,
    enroll: bool,
) -> anyhow::Result<nitrile_hostd::HostdConfig> {
    use nitrile_image::host::STATE_DIR;
    let source = provision.join(crate::cmd::host_init::HOSTD_CONFIG);
    let old = nitrile_hostd::HostdConfig::load(&source)
        .with_context(|| format!("cannot read the host agent config {}", source.display()))?;
    if staged.exists() {
        std::fs::remove_dir_all(staged)
            .with_context(|| format!("cannot remove {}", staged.display()))?;
    }
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(staged)
            .with_context(|| format!("cannot make {}", staged.display()))?;
    }
    let copy = |from: &Path, name: &str, mode: u32| -> anyhow::Result<PathBuf> {
        let data = nitrile_fs::read_bounded(from, nitrile_image::host::MAX_PROVISION_FILE)
            .with_context(|| format!("cannot read {}", from.display()))?;
        nitrile_fs::write_atomic(&staged.join(name), &data, mode)
            .with_context(|| format!("cannot write {name}"))?;
        Ok(PathBuf::from(name))
    };
    let state = Path::new(STATE_DIR);
    let enrolled = state.join(ENROLLMENT_DIR);
    let (cert, key) = if enroll {
        // The TPM-wrapped key is the host's key; no software key exists.
        (enrolled.join("host.pem"), enrolled.join("tls-key.json"))
    } else {
        (
            copy(&old.cert, "host.pem", 0o644)?,
            copy(&old.key, "host.key", 0o600)?,
        )
    };
    let mut config = nitrile_hostd::HostdConfig::new(
        old.cell.clone(),
        old.host.clone(),
        listen.unwrap_or_else(|| {
            std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), old.listen.port())
        }),
        state.join("host"),
        copy(&old.ca, "ca.pem", 0o644)?,
        cert,
        key.clone(),
        copy(&old.issuer_keys, "issuer-keys.toml", 0o644)?,
        state.join("images"),
    );
    config.hypervisor.backend = old.hypervisor.backend;
    config.capacity = old.capacity;
    config.logd = old.logd.clone();
    config.kms = old.kms.clone();
    config.volumes = Some(state.join("volumes"));
    if let Some(r) = &old.release {
        config.release = Some(nitrile_hostd::ReleaseConfig {
            environment: r.environment.clone(),
            repository: state.join("release-repository"),
            root: copy(&r.root, "release-root.json", 0o644)?,
            ci_key: copy(&r.ci_key, "release-ci-key.json", 0o644)?,
            health_deadline_secs: r.health_deadline_secs,
        });
    }
    config.tpm = Some(nitrile_hostd::config::TpmConfig {
        tcti: crate::cmd::host_init::measure::DEFAULT_TCTI.to_owned(),
        event_log: Some(PathBuf::from(crate::cmd::host_init::INIT_EVENTS)),
        document_certificate: match old
            .tpm
            .as_ref()
            .and_then(|t| t.document_certificate.as_ref())
        {
            _ if enroll => Some(enrolled.join("document.pem")),
            Some(c) => Some(copy(c, "tpm-document.pem", 0o644)?),
            None => None,
        },
        tls_key: enroll.then_some(key),
    });
    config
        .write(&staged.join(crate::cmd::host_init::HOSTD_CONFIG))
        .context("cannot write the image's host agent config")?;
    Ok(config)
}

fn build_host(args: BuildHostArgs, output: Output) -> anyhow::Result<()> {
    use nitrile_image::host::{self, PROVISION_DIR};
    let cache = match args.cache {
        Some(c) => c,
        None => nitrile_image::default_cache_dir()?,
    };
    let kernel_deb = match args.kernel_deb {
        Some(d) => d,
        None => host::cached_kernel_deb(&cache).with_context(|| {
            format!(
                "no kernel package in {}; run scripts/guest-image.sh (or pass --kernel-deb)",
                cache.join("guest-image/deb").display()
            )
        })?,
    };
    let nitrile = match args.nitrile {
        Some(p) => p,
        None => std::env::current_exe().context("cannot find this executable")?,
    };
    if !args.stub.is_file() {
        bail!(
            "no UEFI stub at {} (install systemd-boot-efi: scripts/setup.sh)",
            args.stub.display()
        );
    }
    let (addr, prefix) = args
        .ip
        .split_once('/')
        .and_then(|(a, p)| Some((a.parse::<std::net::Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
        .filter(|(_, p)| *p <= 32)
        .with_context(|| format!("--ip {}: expected ADDR/PREFIX", args.ip))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot make {}", args.out.display()))?;
    let staged = args.out.join(".provision");
    let config = stage_provisioning(&args.provision, &staged, args.listen, args.enroll)?;
    let events = crate::cmd::host_init::init_events(
        &staged.join(crate::cmd::host_init::HOSTD_CONFIG),
        &staged,
        Path::new(PROVISION_DIR),
    )?;
    let stripped = args.out.join(".nitrile-stripped");
    let nitrile = if args.strip {
        let status = std::process::Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&nitrile)
            .arg(&stripped)
            .status()
            .context("cannot run objcopy")?;
        if !status.success() {
            bail!(
                "objcopy --strip-debug {} failed ({status})",
                nitrile.display()
            );
        }
        stripped.clone()
    } else {
        nitrile
    };
    let mut cmdline = format!(
        "{HOST_CMDLINE} nitrile.ip={addr}/{prefix} nitrile.gw={}",
        args.gateway
    );
    if let Some(extra) = &args.append {
        cmdline.push(' ');
        cmdline.push_str(extra.trim());
    }
    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert("host".to_owned(), config.host.to_string());
    annotations.insert("cell".to_owned(), config.cell.to_string());
    annotations.insert("ip".to_owned(), format!("{addr}/{prefix}"));
    annotations.insert("hostd_port".to_owned(), config.listen.port().to_string());
    if args.enroll {
        annotations.insert("identity".to_owned(), "enrolled in the TPM".to_owned());
    }
    let spec = host::HostImageSpec {
        nitrile,
        provision: staged.clone(),
        kernel_deb,
        stub: args.stub,
        mke2fs: args.mke2fs,
        cmdline,
        modules: host::HOST_MODULES.iter().map(|m| (*m).to_owned()).collect(),
        dlopened: host::DLOPENED_LIBRARIES
            .iter()
            .map(|l| (*l).to_owned())
            .collect(),
        init_events: events,
        annotations,
    };
    let built = host::build_host_image(&spec, &args.out, &mut |line| {
        let _ = errln!("nitrile image build-host: {line}");
    });
    let _ = std::fs::remove_dir_all(&staged);
    let _ = std::fs::remove_file(&stripped);
    let built = built.context("host image build")?;
    let r = &built.reference;
    match output {
        Output::Json => print_json(r),
        Output::Table => {
            let size = |name: &str| r.files.get(name).map_or(0, |f| f.size);
            outln!("image:          {}", built.dir.display())?;
            outln!(
                "host.efi:       {} ({}), sha256 {}",
                size("host.efi"),
                human_size(size("host.efi")),
                r.files.get("host.efi").map_or("", |f| f.sha256.as_str())
            )?;
            outln!(
                "initramfs:      {} ({}, {})",
                size("initramfs"),
                human_size(size("initramfs")),
                r.initramfs_compression
            )?;
            let room: Vec<String> = built
                .room
                .iter()
                .map(|(k, v)| format!("{k} {}", human_size(*v)))
                .collect();
            outln!("uncompressed:   {}", room.join(", "))?;
            outln!("kernel:         {}", r.kernel_release)?;
            outln!("cmdline:        {}", r.cmdline)?;
            outln!("pcr4 (sha256):  {}", r.pcr4)?;
            outln!("pcr11 (sha256): {}", r.pcr11)?;
            outln!("pcr15 (sha256): {}", r.pcr15)?;
            outln!("reference:      {}", built.reference_file.display())?;
            Ok(())
        }
    }
}
