//! Building the guest image: the project's `scripts/guest-image.sh` and
//! `guest/initramfs/init`, compiled into this crate and run with `bash`.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::digest::{Cmdline, CmdlineError};

/// The build script (bash): downloads Debian's `linux-image-cloud-amd64`
/// from bookworm-backports, extracts the ELF vmlinux and the modules, and
/// builds the busybox initramfs. Progress goes to stderr; the output
/// directory is printed on stdout.
pub const GUEST_IMAGE_SCRIPT: &str = include_str!("../../../scripts/guest-image.sh");

/// The initramfs's `/init`.
pub const GUEST_INIT: &str = include_str!("../../../guest/initramfs/init");

/// The source of the initramfs's static vsock test tool (`/bin/vsock-echo`),
/// which the script compiles.
const GUEST_VSOCK_ECHO: &str = include_str!("../../../guest/initramfs/vsock-echo.c");

/// The source of the initramfs's static metadata client (`/bin/imds`),
/// which the script compiles.
const GUEST_IMDS: &str = include_str!("../../../guest/initramfs/imds.c");

/// udhcpc's event script in the initramfs (`/etc/udhcpc/default.script`).
const GUEST_UDHCPC_SCRIPT: &str = include_str!("../../../guest/initramfs/udhcpc.script");

/// The environment variable naming the cache directory.
pub const CACHE_ENV: &str = "NITRILE_CACHE_DIR";

/// Why the guest image build failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No cache directory: neither `NITRILE_CACHE_DIR`, `XDG_CACHE_HOME` nor
    /// `HOME` is set.
    #[error("no cache directory: set NITRILE_CACHE_DIR (or XDG_CACHE_HOME or HOME)")]
    NoCacheDir,
    /// Writing the build script into the cache failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `bash` could not be started.
    #[error("cannot run bash")]
    Spawn(#[source] io::Error),
    /// The build script failed; its stderr says why.
    #[error("the guest image build failed ({status}); see the messages above")]
    Failed {
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The build finished but an output file is missing or unreadable.
    #[error("the guest image build did not produce {}", path.display())]
    MissingOutput {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The build's command line file is not a valid command line.
    #[error("the guest image build wrote an invalid command line")]
    Cmdline(#[from] CmdlineError),
}

/// The files a build produced, in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// The uncompressed ELF vmlinux.
    pub kernel: PathBuf,
    /// The initramfs (cpio newc, compressed).
    pub initramfs: PathBuf,
    /// The default kernel command line.
    pub cmdline: Cmdline,
    /// The kernel release (`uname -r` in the guest).
    pub kernel_release: Option<String>,
}

/// The cache directory: `$NITRILE_CACHE_DIR`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/nitrile`.
pub fn default_cache_dir() -> Result<PathBuf, BuildError> {
    cache_dir_from(
        std::env::var_os(CACHE_ENV),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn cache_dir_from(
    nitrile: Option<OsString>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, BuildError> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(nitrile) {
        return Ok(dir);
    }
    if let Some(dir) = set(xdg) {
        return Ok(dir.join("nitrile"));
    }
    set(home)
        .map(|h| h.join(".cache").join("nitrile"))
        .ok_or(BuildError::NoCacheDir)
}

/// Where a build in `cache` leaves its output, whether or not it has run.
pub fn output_dir(cache: &Path) -> PathBuf {
    cache.join("guest-image").join("out")
}

/// Runs the guest image build with its cache in `cache` (minutes the first
/// time: a 34 MB download and the initramfs; seconds when cached). The
/// script's progress lines go to this process's stderr.
pub fn build_guest_image(cache: &Path) -> Result<BuiltImage, BuildError> {
    let src = cache.join("guest-image").join("src");
    let script = src.join("scripts").join("guest-image.sh");
    let init = src.join("guest").join("initramfs").join("init");
    write_file(&script, GUEST_IMAGE_SCRIPT, 0o755)?;
    write_file(&init, GUEST_INIT, 0o755)?;
    let initramfs_src = src.join("guest").join("initramfs");
    write_file(&initramfs_src.join("vsock-echo.c"), GUEST_VSOCK_ECHO, 0o644)?;
    write_file(&initramfs_src.join("imds.c"), GUEST_IMDS, 0o644)?;
    write_file(
        &initramfs_src.join("udhcpc.script"),
        GUEST_UDHCPC_SCRIPT,
        0o755,
    )?;
    let status = Command::new("bash")
        .arg(&script)
        .arg("--cache")
        .arg(cache)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .map_err(BuildError::Spawn)?;
    if !status.success() {
        return Err(BuildError::Failed { status });
    }
    read_output(&output_dir(cache))
}

/// The output of an earlier build in `dir` (see [`output_dir`]).
pub fn read_output(dir: &Path) -> Result<BuiltImage, BuildError> {
    let kernel = dir.join("vmlinux");
    let initramfs = dir.join("initramfs");
    for path in [&kernel, &initramfs] {
        fs::metadata(path).map_err(|source| BuildError::MissingOutput {
            path: path.clone(),
            source,
        })?;
    }
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read_to_string(&path).map_err(|source| BuildError::MissingOutput { path, source })
    };
    let cmdline = Cmdline::new(read("cmdline")?.trim_end_matches('\n'))?;
    let kernel_release = read("kernel-release")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    Ok(BuiltImage {
        kernel,
        initramfs,
        cmdline,
        kernel_release,
    })
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), BuildError> {
    let err = |source| BuildError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    if fs::read_to_string(path).is_ok_and(|c| c == contents) {
        return Ok(());
    }
    // Written aside and renamed: a concurrent build may be running the old one.
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&tmp, contents).map_err(err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_precedence() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(
            cache_dir_from(s("/a"), s("/x"), s("/h")).ok(),
            Some(PathBuf::from("/a"))
        );
        assert_eq!(
            cache_dir_from(None, s("/x"), s("/h")).ok(),
            Some(PathBuf::from("/x/nitrile"))
        );
        assert_eq!(
            cache_dir_from(s(""), None, s("/h")).ok(),
            Some(PathBuf::from("/h/.cache/nitrile"))
        );
        assert!(matches!(
            cache_dir_from(None, None, None),
            Err(BuildError::NoCacheDir)
        ));
    }

    #[test]
    fn embedded_init_prints_the_markers() {
        for marker in [
            "NITRILE-GUEST-READY",
            "NITRILE-VOLUME-OK",
            "NITRILE-VOLUME-MISSING",
            "NITRILE-PLAINTEXT-",
            "NITRILE-SSH-READY",
            "NITRILE-NET-FAILED",
            "NITRILE-USER-DATA-RAN",
            "poweroff -f",
        ] {
            assert!(GUEST_INIT.contains(marker), "{marker}");
        }
    }
}
