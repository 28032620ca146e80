//! The content-addressed image store.
//!
//! Layout under the store directory:
//!
//! ```text
//! blobs/<sha256 hex>        kernel, initramfs and root disk files, named by their digest, mode 0444
//! manifests/<digest>.json   one manifest per image, named by the image digest
//! ```
//!
//! Files are written to a temporary name, fsync'd and renamed, and the
//! directory is fsync'd, so a crash leaves either the old or the new state.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nitrile_fs::{AtomicFile, FsError};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::digest::{Cmdline, Digest, image_digest_with_root_disk};
use crate::kernel::{BannerScanner, KERNEL_HEADER_LEN, KernelFormat, bzimage_release};

/// The largest kernel or initramfs file the store accepts or reads.
pub const MAX_COMPONENT_SIZE: u64 = 1 << 30;

/// A root disk's size is a whole number of these (1 MiB), so that the
/// volume made from it is exactly its size.
pub const ROOT_DISK_ALIGN: u64 = 1 << 20;

/// The largest manifest file the store reads.
pub const MAX_MANIFEST_SIZE: u64 = 64 * 1024;

/// The manifest format this crate writes and reads.
pub const MANIFEST_FORMAT: &str = "nitrile-image-v1";

const BLOBS: &str = "blobs";
const MANIFESTS: &str = "manifests";
const CHUNK: usize = 1 << 20;

/// A part of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Component {
    /// The kernel file.
    Kernel,
    /// The initramfs file.
    Initramfs,
    /// The kernel command line.
    Cmdline,
    /// The root disk file.
    RootDisk,
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Initramfs => "initramfs",
            Self::Cmdline => "command line",
            Self::RootDisk => "root disk",
        })
    }
}

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// A file system operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An input file is not a kernel format the VMMs boot (bad input).
    #[error("{} is neither a 64-bit ELF vmlinux nor a bzImage", path.display())]
    UnknownKernelFormat {
        /// The input file.
        path: PathBuf,
    },
    /// An input or stored file is empty, not a regular file, or too large.
    #[error("{component} file {} is {problem}", path.display())]
    BadFile {
        /// Which part.
        component: Component,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: FileProblem,
    },
    /// No image with this digest is in the store.
    #[error("image {0} is not in the store")]
    NotFound(Digest),
    /// A stored component does not hash to the digest its manifest records:
    /// the store was modified outside this crate. Nothing from it is used.
    #[error(
        "stored {component} of image {image} does not match its digest (expected {expected}, found {found}): refusing the image"
    )]
    Tampered {
        /// The image.
        image: Digest,
        /// Which part.
        component: Component,
        /// The digest the manifest records.
        expected: Digest,
        /// The digest of what is stored.
        found: Digest,
    },
    /// A manifest's digests do not add up to the digest it is filed under,
    /// or it is filed under another name: the store was modified.
    #[error("manifest {} does not match image {image}: refusing the image", path.display())]
    ManifestMismatch {
        /// The image looked up (the manifest's name).
        image: Digest,
        /// The manifest file.
        path: PathBuf,
    },
    /// A manifest file is not a valid manifest.
    #[error("manifest {} is malformed", path.display())]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A manifest file is larger than [`MAX_MANIFEST_SIZE`].
    #[error("manifest {} is larger than {MAX_MANIFEST_SIZE} bytes", path.display())]
    ManifestTooLarge {
        /// The manifest file.
        path: PathBuf,
    },
    /// A manifest of another format version.
    #[error("manifest {} has format {found:?}, this build reads {MANIFEST_FORMAT:?}", path.display())]
    ManifestFormat {
        /// The manifest file.
        path: PathBuf,
        /// The format it names.
        found: String,
    },
}

/// What is wrong with a component file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileProblem {
    /// It is empty.
    #[error("empty")]
    Empty,
    /// It is not a regular file.
    #[error("not a regular file")]
    NotRegular,
    /// It is larger than [`MAX_COMPONENT_SIZE`].
    #[error("larger than {MAX_COMPONENT_SIZE} bytes")]
    TooLarge,
    /// Its size differs from the size in the manifest.
    #[error("not the size its manifest records")]
    SizeMismatch,
    /// A root disk whose size is not a whole number of MiB.
    #[error("not a whole number of MiB (pad it, e.g. with truncate -s)")]
    Unaligned,
}

/// One stored file of an image, as recorded in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobInfo {
    /// SHA-256 of the file.
    pub sha256: Digest,
    /// Size in bytes.
    pub size: u64,
}

/// An image's manifest, `manifests/<digest>.json`. Read by
/// [`ImageStore::list`] without checking the stored files; use
/// [`ImageStore::get`] for an image to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// The image digest (see [`image_digest`](crate::image_digest)).
    pub digest: Digest,
    /// The kernel file.
    pub kernel: BlobInfo,
    /// The kernel's boot format.
    pub kernel_format: KernelFormat,
    /// The kernel release the file names, if it does. Informational: not
    /// part of the digest.
    pub kernel_release: Option<String>,
    /// The initramfs file.
    pub initramfs: BlobInfo,
    /// The kernel command line.
    pub cmdline: Cmdline,
    /// SHA-256 of the command line's bytes.
    pub cmdline_sha256: Digest,
    /// The root disk file (a raw disk image), if the image has one: part of
    /// the digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk: Option<BlobInfo>,
}

impl ImageManifest {
    /// Checks that the recorded digests add up to `digest`.
    fn consistent(&self) -> bool {
        self.format == MANIFEST_FORMAT
            && self.cmdline.digest() == self.cmdline_sha256
            && self
                .root_disk
                .as_ref()
                .is_none_or(|r| r.size > 0 && r.size.is_multiple_of(ROOT_DISK_ALIGN))
            && image_digest_with_root_disk(
                &self.kernel.sha256,
                &self.initramfs.sha256,
                &self.cmdline_sha256,
                self.root_disk.as_ref().map(|r| &r.sha256),
            ) == self.digest
    }
}

/// An image whose stored files were just checked against its digests by
/// [`ImageStore::get`] (or written by [`ImageStore::import`]).
///
/// The paths point into the store; whoever can write the store directory
/// can change them afterwards, so the store must be writable only by the
/// host agent, and a VMM that wants a measurement of what it boots hashes
/// the bytes it loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    digest: Digest,
    kernel: PathBuf,
    initramfs: PathBuf,
    root_disk: Option<PathBuf>,
    manifest: ImageManifest,
}

impl ImageRef {
    /// The image digest: SHA-256(kernel || initramfs || cmdline digests).
    pub fn digest(&self) -> Digest {
        self.digest
    }
    /// The stored kernel file.
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }
    /// The stored initramfs file.
    pub fn initramfs(&self) -> &Path {
        &self.initramfs
    }
    /// The stored root disk file, if the image has one.
    pub fn root_disk(&self) -> Option<&Path> {
        self.root_disk.as_deref()
    }
    /// The root disk's size in MiB, if the image has one.
    pub fn root_disk_mib(&self) -> Option<u64> {
        self.manifest
            .root_disk
            .as_ref()
            .map(|r| r.size / ROOT_DISK_ALIGN)
    }
    /// The kernel command line.
    pub fn cmdline(&self) -> &Cmdline {
        &self.manifest.cmdline
    }
    /// SHA-256 of the kernel file.
    pub fn kernel_sha256(&self) -> Digest {
        self.manifest.kernel.sha256
    }
    /// SHA-256 of the initramfs file.
    pub fn initramfs_sha256(&self) -> Digest {
        self.manifest.initramfs.sha256
    }
    /// SHA-256 of the command line.
    pub fn cmdline_sha256(&self) -> Digest {
        self.manifest.cmdline_sha256
    }
    /// The kernel's boot format.
    pub fn kernel_format(&self) -> KernelFormat {
        self.manifest.kernel_format
    }
    /// The whole manifest.
    pub fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }
}

/// A content-addressed store of guest images under one directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// Opens the store at `dir`, creating it (mode 0700) if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let root = dir.into();
        for sub in [root.clone(), root.join(BLOBS), root.join(MANIFESTS)] {
            if !sub.is_dir() {
                fs::create_dir_all(&sub).map_err(io_err("create directory", &sub))?;
                fs::set_permissions(&sub, fs::Permissions::from_mode(0o700))
                    .map_err(io_err("set permissions of", &sub))?;
            }
        }
        Ok(Self { root })
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Copies a kernel and an initramfs into the store and records the image
    /// with `cmdline`. Importing the same three again is a no-op returning
    /// the same digest.
    pub fn import(
        &self,
        kernel: &Path,
        initramfs: &Path,
        cmdline: &Cmdline,
    ) -> Result<ImageRef, ImageError> {
        self.import_with_root_disk(kernel, initramfs, cmdline, None)
    }

    /// [`ImageStore::import`] with a root disk: a raw disk image, not
    /// empty, a whole number of MiB ([`ROOT_DISK_ALIGN`]), at most
    /// [`MAX_COMPONENT_SIZE`]. On any refusal the manifest is not written
    /// (blobs already copied stay, unreferenced and content-addressed).
    pub fn import_with_root_disk(
        &self,
        kernel: &Path,
        initramfs: &Path,
        cmdline: &Cmdline,
        root_disk: Option<&Path>,
    ) -> Result<ImageRef, ImageError> {
        let k = self.copy_in(Component::Kernel, kernel)?;
        let format = k.format.ok_or_else(|| ImageError::UnknownKernelFormat {
            path: kernel.to_path_buf(),
        })?;
        let i = self.copy_in(Component::Initramfs, initramfs)?;
        let r = root_disk
            .map(|path| {
                let r = self.copy_in(Component::RootDisk, path)?;
                if !r.info.size.is_multiple_of(ROOT_DISK_ALIGN) {
                    return Err(ImageError::BadFile {
                        component: Component::RootDisk,
                        path: path.to_path_buf(),
                        problem: FileProblem::Unaligned,
                    });
                }
                Ok(r.info)
            })
            .transpose()?;
        let cmdline_sha256 = cmdline.digest();
        let digest = image_digest_with_root_disk(
            &k.info.sha256,
            &i.info.sha256,
            &cmdline_sha256,
            r.as_ref().map(|r| &r.sha256),
        );
        let manifest = ImageManifest {
            format: MANIFEST_FORMAT.to_owned(),
            digest,
            kernel: k.info,
            kernel_format: format,
            kernel_release: k.release,
            initramfs: i.info,
            cmdline: cmdline.clone(),
            cmdline_sha256,
            root_disk: r,
        };
        let mut json =
            serde_json::to_vec_pretty(&manifest).map_err(|source| ImageError::BadManifest {
                path: self.manifest_path(&digest),
                source,
            })?;
        json.push(b'\n');
        nitrile_fs::write_atomic(&self.manifest_path(&digest), &json, 0o600)
            .map_err(fs_err("write"))?;
        Ok(self.image_ref(manifest))
    }

    /// The manifests of all images, sorted by digest. The stored files are
    /// not checked: use [`ImageStore::get`] before booting one.
    pub fn list(&self) -> Result<Vec<ImageManifest>, ImageError> {
        let dir = self.root.join(MANIFESTS);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("read directory", &dir))? {
            let entry = entry.map_err(io_err("read directory", &dir))?;
            let name = entry.file_name();
            let Some(digest) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse::<Digest>().ok())
            else {
                continue; // temporary files and strangers
            };
            out.push(self.read_manifest(&digest)?);
        }
        out.sort_by_key(|m| m.digest);
        Ok(out)
    }

    /// The image `digest`, after hashing its stored kernel and initramfs and
    /// checking them, the command line and the manifest against `digest`.
    /// Any mismatch refuses the image.
    pub fn get(&self, digest: &Digest) -> Result<ImageRef, ImageError> {
        let manifest = self.read_manifest(digest)?;
        for (component, info) in [
            (Component::Kernel, Some(&manifest.kernel)),
            (Component::Initramfs, Some(&manifest.initramfs)),
            (Component::RootDisk, manifest.root_disk.as_ref()),
        ] {
            let Some(info) = info else { continue };
            let path = self.blob_path(&info.sha256);
            let (found, size) = hash_file(component, &path)?;
            if found != info.sha256 {
                return Err(ImageError::Tampered {
                    image: *digest,
                    component,
                    expected: info.sha256,
                    found,
                });
            }
            if size != info.size {
                return Err(ImageError::BadFile {
                    component,
                    path,
                    problem: FileProblem::SizeMismatch,
                });
            }
        }
        Ok(self.image_ref(manifest))
    }

    /// The digests of images whose hex form starts with `prefix`.
    pub fn find_prefix(&self, prefix: &str) -> Result<Vec<Digest>, ImageError> {
        let prefix = prefix.strip_prefix(crate::DIGEST_PREFIX).unwrap_or(prefix);
        Ok(self
            .list()?
            .into_iter()
            .map(|m| m.digest)
            .filter(|d| d.to_hex().starts_with(prefix))
            .collect())
    }

    fn image_ref(&self, manifest: ImageManifest) -> ImageRef {
        ImageRef {
            digest: manifest.digest,
            kernel: self.blob_path(&manifest.kernel.sha256),
            initramfs: self.blob_path(&manifest.initramfs.sha256),
            root_disk: manifest
                .root_disk
                .as_ref()
                .map(|r| self.blob_path(&r.sha256)),
            manifest,
        }
    }

    fn manifest_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(MANIFESTS).join(format!("{digest}.json"))
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(BLOBS).join(digest.to_hex())
    }

    /// Reads and checks one manifest: size bound, format, and that its
    /// digests add up to the digest it is filed under.
    fn read_manifest(&self, digest: &Digest) -> Result<ImageManifest, ImageError> {
        let path = self.manifest_path(digest);
        let bytes = match nitrile_fs::read_bounded(&path, MAX_MANIFEST_SIZE) {
            Ok(bytes) => bytes,
            Err(FsError::Missing { .. }) => return Err(ImageError::NotFound(*digest)),
            Err(FsError::TooLarge { .. }) => return Err(ImageError::ManifestTooLarge { path }),
            Err(e) => return Err(fs_err("read")(e)),
        };
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|source| ImageError::BadManifest {
                path: path.clone(),
                source,
            })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(ImageError::ManifestFormat {
                path,
                found: manifest.format,
            });
        }
        if manifest.digest != *digest || !manifest.consistent() {
            return Err(ImageError::ManifestMismatch {
                image: *digest,
                path,
            });
        }
        Ok(manifest)
    }

    /// Copies `src` into `blobs/`, hashing as it goes.
    fn copy_in(&self, component: Component, src: &Path) -> Result<Copied, ImageError> {
        let mut input = File::open(src).map_err(io_err("open", src))?;
        let meta = input.metadata().map_err(io_err("stat", src))?;
        check_size(component, src, &meta)?;
        let blobs = self.root.join(BLOBS);
        let mut tmp =
            AtomicFile::create_in(&blobs, OsStr::new(""), 0o600).map_err(fs_err("create"))?;
        let tmp_path = tmp.temp_path().to_owned();
        let copied = (|| {
            let mut hasher = Sha256::new();
            let mut scanner = BannerScanner::default();
            let mut head = Vec::new();
            let mut buf = vec![0u8; CHUNK];
            let mut size = 0u64;
            loop {
                let n = input.read(&mut buf).map_err(io_err("read", src))?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                if size > MAX_COMPONENT_SIZE {
                    return Err(ImageError::BadFile {
                        component,
                        path: src.to_path_buf(),
                        problem: FileProblem::TooLarge,
                    });
                }
                let chunk = &buf[..n];
                hasher.update(chunk);
                if head.len() < KERNEL_HEADER_LEN {
                    let take = (KERNEL_HEADER_LEN - head.len()).min(n);
                    head.extend_from_slice(&chunk[..take]);
                }
                if component == Component::Kernel {
                    scanner.feed(chunk);
                }
                tmp.write_all(chunk).map_err(io_err("write", &tmp_path))?;
            }
            if size == 0 {
                return Err(ImageError::BadFile {
                    component,
                    path: src.to_path_buf(),
                    problem: FileProblem::Empty,
                });
            }
            let sha256 = Digest::from_bytes(hasher.finalize().into());
            let format = KernelFormat::detect(&head);
            let release = match format {
                Some(KernelFormat::BzImage) => bzimage_release(&head),
                _ => scanner.finish(),
            };
            Ok(Copied {
                info: BlobInfo { sha256, size },
                format,
                release,
            })
        })()?;
        // Stored blobs are read-only; the temporary file is removed on any
        // failure (when `tmp` is dropped).
        tmp.set_mode(0o444).map_err(fs_err("set permissions of"))?;
        tmp.commit(&self.blob_path(&copied.info.sha256))
            .map_err(fs_err("store"))?;
        Ok(copied)
    }
}

struct Copied {
    info: BlobInfo,
    format: Option<KernelFormat>,
    release: Option<String>,
}

fn check_size(component: Component, path: &Path, meta: &fs::Metadata) -> Result<(), ImageError> {
    let problem = if !meta.is_file() {
        FileProblem::NotRegular
    } else if meta.len() > MAX_COMPONENT_SIZE {
        FileProblem::TooLarge
    } else {
        return Ok(());
    };
    Err(ImageError::BadFile {
        component,
        path: path.to_path_buf(),
        problem,
    })
}

/// SHA-256 and size of a stored file, reading at most [`MAX_COMPONENT_SIZE`].
fn hash_file(component: Component, path: &Path) -> Result<(Digest, u64), ImageError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let meta = file.metadata().map_err(io_err("stat", path))?;
    check_size(component, path, &meta)?;
    let mut reader = file.take(MAX_COMPONENT_SIZE + 1);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    if size > MAX_COMPONENT_SIZE {
        return Err(ImageError::BadFile {
            component,
            path: path.to_path_buf(),
            problem: FileProblem::TooLarge,
        });
    }
    Ok((Digest::from_bytes(hasher.finalize().into()), size))
}

/// A failed file operation of this crate: `op` on the path it names.
fn fs_err(op: &'static str) -> impl FnOnce(FsError) -> ImageError {
    move |e| ImageError::Io {
        op,
        path: e.path().to_owned(),
        source: e.into(),
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError + use<> {
    let path = path.to_path_buf();
    move |source| ImageError::Io { op, path, source }
}
