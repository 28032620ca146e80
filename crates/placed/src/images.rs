//! Importing a customer's image into the cell's image store, all or
//! nothing: the upload is checked whole (bounds by the parser, the stated
//! digest, a kernel the store can load) before anything is written, and a
//! failure while writing removes what this import added. Imports are
//! serialised so that "what this import added" is well defined.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nitrile_image::{
    Digest, ImageError, ImageManifest, ImageStore, KERNEL_HEADER_LEN, KernelFormat,
};
use nitrile_placed_api::ImageUpload;
use nitrile_placed_api::upload::UploadError;

/// Why an import was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The upload does not add up (wrong digest).
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// The kernel is neither a loadable ELF nor a bzImage (truncated or
    /// not a kernel).
    #[error("the kernel is neither a loadable ELF nor a bzImage (truncated, or not a kernel)")]
    NotAKernel,
    /// The staging files could not be written.
    #[error("cannot stage the upload in {}", path.display())]
    Staging {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nitrile_fs::FsError,
    },
    /// The image store refused or failed.
    #[error("image store")]
    Store(#[from] ImageError),
}

impl ImportError {
    /// Whether the customer's input is at fault (400) rather than the
    /// service (500).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Upload(_)
                | Self::NotAKernel
                | Self::Store(ImageError::UnknownKernelFormat { .. })
        )
    }
}

/// The cell's image store as the placement service writes it.
pub(crate) struct Images {
    store: ImageStore,
    staging: PathBuf,
    lock: Mutex<()>,
}

impl Images {
    pub(crate) fn open(root: &Path, staging: PathBuf) -> Result<Self, ImportError> {
        Ok(Self {
            store: ImageStore::open(root)?,
            staging,
            lock: Mutex::new(()),
        })
    }

    pub(crate) fn store(&self) -> &ImageStore {
        &self.store
    }

    fn blob(&self, d: &Digest) -> PathBuf {
        self.store.root().join("blobs").join(d.to_hex())
    }

    fn manifest(&self, d: &Digest) -> PathBuf {
        self.store
            .root()
            .join("manifests")
            .join(format!("{d}.json"))
    }

    /// Checks and imports `upload`; on any failure nothing it added is left.
    pub(crate) fn import(&self, upload: &ImageUpload<'_>) -> Result<ImageManifest, ImportError> {
        let digest = upload.check_digest()?;
        if !loadable(upload.kernel) {
            return Err(ImportError::NotAKernel);
        }
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let kernel_blob = self.blob(&Digest::of(upload.kernel));
        let initramfs_blob = self.blob(&Digest::of(upload.initramfs));
        let root_disk_blob = upload.root_disk.map(|r| self.blob(&Digest::of(r)));
        let manifest = self.manifest(&digest);
        let existed: Vec<(PathBuf, bool)> = [kernel_blob, initramfs_blob, manifest]
            .into_iter()
            .chain(root_disk_blob)
            .map(|p| {
                let e = p.exists();
                (p, e)
            })
            .collect();
        let staged_kernel = self.staging.join("kernel");
        let staged_initramfs = self.staging.join("initramfs");
        let staged_root_disk = self.staging.join("root-disk");
        let result = (|| {
            for (path, bytes) in [
                (&staged_kernel, Some(upload.kernel)),
                (&staged_initramfs, Some(upload.initramfs)),
                (&staged_root_disk, upload.root_disk),
            ] {
                let Some(bytes) = bytes else { continue };
                nitrile_fs::write_atomic(path, bytes, 0o600).map_err(|source| {
                    ImportError::Staging {
                        path: path.clone(),
                        source,
                    }
                })?;
            }
            let imported = self.store.import_with_root_disk(
                &staged_kernel,
                &staged_initramfs,
                &upload.cmdline,
                upload.root_disk.map(|_| staged_root_disk.as_path()),
            )?;
            Ok(imported.manifest().clone())
        })();
        let _ = std::fs::remove_file(&staged_kernel);
        let _ = std::fs::remove_file(&staged_initramfs);
        let _ = std::fs::remove_file(&staged_root_disk);
        if result.is_err() {
            for (path, was) in existed {
                if !was {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        result
    }

    /// Removes the image `digest` from the store: its manifest, and each
    /// blob no other manifest names.
    pub(crate) fn remove(&self, digest: &Digest) -> Result<(), ImportError> {
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let all = self.store.list()?;
        let Some(gone) = all.iter().find(|m| m.digest == *digest) else {
            return Ok(());
        };
        let _ = std::fs::remove_file(self.manifest(digest));
        let blobs = |m: &ImageManifest| {
            [
                Some(m.kernel.sha256),
                Some(m.initramfs.sha256),
                m.root_disk.as_ref().map(|r| r.sha256),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
        };
        for blob in blobs(gone) {
            let shared = all
                .iter()
                .any(|m| m.digest != *digest && blobs(m).contains(&blob));
            if !shared {
                let _ = std::fs::remove_file(self.blob(&blob));
            }
        }
        Ok(())
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u16::from_le_bytes(
        b.get(at..at + 2)?.try_into().ok()?,
    )))
}

fn u32_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u32::from_le_bytes(
        b.get(at..at + 4)?.try_into().ok()?,
    )))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Whether `kernel` is whole: an ELF64 whose program headers and every
/// loadable segment's file bytes lie inside it, or a bzImage whose setup
/// sectors and protected-mode code (`setup_sects`, `syssize`) do. A kernel
/// cut short anywhere in what a VMM loads is refused here.
pub(crate) fn loadable(kernel: &[u8]) -> bool {
    let head = &kernel[..kernel.len().min(KERNEL_HEADER_LEN)];
    let len = kernel.len() as u64;
    match KernelFormat::detect(head) {
        Some(KernelFormat::Elf64) => (|| {
            let phoff = u64_at(kernel, 0x20)?;
            let phentsize = u16_at(kernel, 0x36)?;
            let phnum = u16_at(kernel, 0x38)?;
            if phnum == 0 || phentsize < 56 {
                return Some(false);
            }
            let end = phoff.checked_add(phentsize.checked_mul(phnum)?)?;
            if end > len {
                return Some(false);
            }
            let mut loads = 0;
            for i in 0..phnum {
                let at = usize::try_from(phoff + i * phentsize).ok()?;
                if u32_at(kernel, at)? != 1 {
                    continue; // not PT_LOAD
                }
                loads += 1;
                let offset = u64_at(kernel, at + 8)?;
                let filesz = u64_at(kernel, at + 32)?;
                if offset.checked_add(filesz)? > len {
                    return Some(false);
                }
            }
            Some(loads > 0)
        })()
        .unwrap_or(false),
        Some(KernelFormat::BzImage) => (|| {
            let setup_sects = match kernel.get(0x1f1).copied()? {
                0 => 4,
                n => u64::from(n),
            };
            let syssize = u32_at(kernel, 0x1f4)?;
            let need = (setup_sects + 1) * 512 + syssize * 16;
            Some(syssize > 0 && need <= len)
        })()
        .unwrap_or(false),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_LOAD segment of `filesz` bytes at 0x100.
    pub(crate) fn elf(filesz: u64) -> Vec<u8> {
        let mut k = vec![0u8; 0x100 + filesz as usize];
        k[..5].copy_from_slice(b"\x7fELF\x02");
        k[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        k[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        k[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        k[0x40..0x44].copy_from_slice(&1u32.to_le_bytes());
        k[0x48..0x50].copy_from_slice(&0x100u64.to_le_bytes());
        k[0x60..0x68].copy_from_slice(&filesz.to_le_bytes());
        k
    }

    #[test]
    fn whole_kernels_load_and_truncated_ones_do_not() {
        let k = elf(64);
        assert!(loadable(&k));
        assert!(!loadable(&k[..k.len() - 1]), "a cut segment");
        assert!(!loadable(&k[..0x50]), "cut in the program headers");
        assert!(!loadable(&k[..5]));
        assert!(!loadable(b"MZ not a kernel"));
        assert!(!loadable(&[]));
    }

    #[test]
    fn a_refused_import_leaves_nothing_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let images = Images::open(&dir.path().join("images"), dir.path().to_owned()).unwrap();
        let files = |p: &Path| -> usize {
            ["blobs", "manifests"]
                .iter()
                .map(|s| std::fs::read_dir(p.join(s)).unwrap().count())
                .sum()
        };
        let root = dir.path().join("images");
        let cmdline = nitrile_image::Cmdline::new("console=ttyS0").unwrap();
        let kernel = elf(64);
        // Truncated kernel; a wrong digest.
        for (k, digest) in [
            (
                &kernel[..kernel.len() - 1],
                nitrile_placed_api::upload::digest_of(
                    &cmdline,
                    &kernel[..kernel.len() - 1],
                    b"I",
                    None,
                ),
            ),
            (&kernel[..], Digest::of(b"another image")),
        ] {
            let body = nitrile_placed_api::upload::encode("console=ttyS0", digest, k, b"I", None);
            let upload = ImageUpload::parse(&body).unwrap();
            let err = images.import(&upload).unwrap_err();
            assert!(err.is_bad_input(), "{err}");
            assert_eq!(files(&root), 0, "{err}");
        }
        // A wrong digest with a root disk: its blob is not left either.
        let disk = vec![3u8; 1 << 20];
        let body = nitrile_placed_api::upload::encode(
            "console=ttyS0",
            Digest::of(b"another image"),
            &kernel,
            b"I",
            Some(&disk),
        );
        let err = images
            .import(&ImageUpload::parse(&body).unwrap())
            .unwrap_err();
        assert!(err.is_bad_input(), "{err}");
        assert_eq!(files(&root), 0, "{err}");
        let digest = nitrile_placed_api::upload::digest_of(&cmdline, &kernel, b"I", None);
        let body = nitrile_placed_api::upload::encode("console=ttyS0", digest, &kernel, b"I", None);
        let m = images.import(&ImageUpload::parse(&body).unwrap()).unwrap();
        assert_eq!(m.digest, digest);
        assert_eq!(files(&root), 3);
        images.store().get(&digest).unwrap();
        // The same kernel and initramfs with a root disk: one more blob and
        // manifest; removing the first image keeps the shared blobs.
        let with = nitrile_placed_api::upload::digest_of(&cmdline, &kernel, b"I", Some(&disk));
        let body =
            nitrile_placed_api::upload::encode("console=ttyS0", with, &kernel, b"I", Some(&disk));
        let m = images.import(&ImageUpload::parse(&body).unwrap()).unwrap();
        assert_eq!(m.root_disk.as_ref().map(|r| r.size), Some(1 << 20));
        assert_eq!(files(&root), 5);
        images.remove(&digest).unwrap();
        assert_eq!(files(&root), 4);
        assert!(images.store().get(&with).unwrap().root_disk().is_some());
        images.remove(&with).unwrap();
        assert_eq!(files(&root), 0);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "staging is empty"
        );
    }
}
