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

pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<()> {
    match command {
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
