//! The image upload: one request body, framed, never base64 in JSON.
//!
//! ```text
//! "nitrile-image-upload-v1\n"          the magic line (24 bytes)
//! u32 big-endian                        length of the head
//! head                                  JSON: UploadHead
//! kernel                                head.kernel_len bytes
//! initramfs                             head.initramfs_len bytes
//! root disk                             head.root_disk_len bytes (0: none)
//! ```
//!
//! The parser refuses a body that is not exactly this: a wrong magic, a head
//! over [`MAX_UPLOAD_HEAD`] or not an [`UploadHead`] (unknown fields
//! refused), parts over [`MAX_KERNEL`], [`MAX_INITRAMFS`] or
//! [`MAX_ROOT_DISK`], a root disk not a whole number of MiB, a command line
//! over [`MAX_CMDLINE`], or a body whose length is not the sum (a truncated
//! or padded upload). The digest the customer states is checked against the
//! parts ([`ImageUpload::check_digest`]); whether the kernel is loadable is
//! the image store's check.

use nitrile_image::{Cmdline, Digest, ROOT_DISK_ALIGN, image_digest_with_root_disk};
use serde::{Deserialize, Serialize};

/// The first bytes of every upload.
pub const UPLOAD_MAGIC: &[u8] = b"nitrile-image-upload-v1\n";
/// Largest head.
pub const MAX_UPLOAD_HEAD: usize = 4 * 1024;
/// Largest kernel accepted.
pub const MAX_KERNEL: u64 = 96 * 1024 * 1024;
/// Largest initramfs accepted.
pub const MAX_INITRAMFS: u64 = 160 * 1024 * 1024;
/// Largest root disk accepted (a raw disk image, a whole number of MiB).
pub const MAX_ROOT_DISK: u64 = 256 * 1024 * 1024;
/// Longest kernel command line accepted.
pub const MAX_CMDLINE: usize = nitrile_image::MAX_CMDLINE_LEN;
/// Largest upload body: the magic, the head's length and head, and the
/// largest parts.
pub const MAX_UPLOAD_BODY: usize = UPLOAD_MAGIC.len()
    + 4
    + MAX_UPLOAD_HEAD
    + MAX_KERNEL as usize
    + MAX_INITRAMFS as usize
    + MAX_ROOT_DISK as usize;

/// The JSON head of an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadHead {
    /// The kernel command line.
    pub cmdline: String,
    /// The image digest the customer states: the upload is refused unless
    /// the parts add up to it.
    pub digest: Digest,
    /// Length of the kernel part.
    pub kernel_len: u64,
    /// Length of the initramfs part.
    pub initramfs_len: u64,
    /// Length of the root disk part: 0 for an image without one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub root_disk_len: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Why an upload body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UploadError {
    /// the body does not start with [`UPLOAD_MAGIC`]
    #[error("the body is not an image upload (no nitrile-image-upload-v1 magic)")]
    BadMagic,
    /// the body ends inside the frame
    #[error("the upload is truncated: {need} bytes needed, {got} sent")]
    Truncated {
        /// Bytes the frame says there are.
        need: u64,
        /// Bytes there are.
        got: u64,
    },
    /// bytes after the last part
    #[error("the upload has {0} bytes after its last part")]
    Trailing(u64),
    /// the head is too large
    #[error("the upload head is {0} bytes; at most {MAX_UPLOAD_HEAD}")]
    HeadTooLarge(u64),
    /// the head is not an `UploadHead`
    #[error("the upload head is invalid: {0}")]
    BadHead(String),
    /// the kernel is larger than [`MAX_KERNEL`]
    #[error("the kernel is {0} bytes; at most {MAX_KERNEL}")]
    KernelTooLarge(u64),
    /// the kernel is empty
    #[error("the kernel is empty")]
    EmptyKernel,
    /// the initramfs is larger than [`MAX_INITRAMFS`]
    #[error("the initramfs is {0} bytes; at most {MAX_INITRAMFS}")]
    InitramfsTooLarge(u64),
    /// the root disk is larger than [`MAX_ROOT_DISK`]
    #[error("the root disk is {0} bytes; at most {MAX_ROOT_DISK}")]
    RootDiskTooLarge(u64),
    /// the root disk is not a whole number of MiB
    #[error(
        "the root disk is {0} bytes, not a whole number of MiB (pad it, e.g. with truncate -s)"
    )]
    RootDiskUnaligned(u64),
    /// the command line is not acceptable
    #[error("the command line is not acceptable: {0}")]
    BadCmdline(String),
    /// the parts add up to another digest than the one stated
    #[error("wrong digest: the parts add up to {found}, not the stated {stated}")]
    WrongDigest {
        /// The digest stated.
        stated: Digest,
        /// The digest of the parts.
        found: Digest,
    },
}

/// A parsed upload, borrowing the body.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageUpload<'a> {
    /// The head.
    pub head: UploadHead,
    /// The command line, checked.
    pub cmdline: Cmdline,
    /// The kernel bytes.
    pub kernel: &'a [u8],
    /// The initramfs bytes.
    pub initramfs: &'a [u8],
    /// The root disk bytes, if the image has one.
    pub root_disk: Option<&'a [u8]>,
}

impl std::fmt::Debug for ImageUpload<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageUpload")
            .field("head", &self.head)
            .field("kernel", &self.kernel.len())
            .field("initramfs", &self.initramfs.len())
            .field("root_disk", &self.root_disk.map(<[u8]>::len))
            .finish()
    }
}

impl<'a> ImageUpload<'a> {
    /// Parses `body`, failing closed on anything but exactly one framed
    /// upload within the bounds.
    pub fn parse(body: &'a [u8]) -> Result<Self, UploadError> {
        let got = body.len() as u64;
        let rest = body
            .strip_prefix(UPLOAD_MAGIC)
            .ok_or(UploadError::BadMagic)?;
        let (len, rest) = rest
            .split_first_chunk::<4>()
            .ok_or(UploadError::Truncated {
                need: (UPLOAD_MAGIC.len() + 4) as u64,
                got,
            })?;
        let head_len = u64::from(u32::from_be_bytes(*len));
        if head_len > MAX_UPLOAD_HEAD as u64 {
            return Err(UploadError::HeadTooLarge(head_len));
        }
        let head_len = head_len as usize;
        if rest.len() < head_len {
            return Err(UploadError::Truncated {
                need: (UPLOAD_MAGIC.len() + 4 + head_len) as u64,
                got,
            });
        }
        let (head, parts) = rest.split_at(head_len);
        let head: UploadHead =
            serde_json::from_slice(head).map_err(|e| UploadError::BadHead(e.to_string()))?;
        if head.kernel_len == 0 {
            return Err(UploadError::EmptyKernel);
        }
        if head.kernel_len > MAX_KERNEL {
            return Err(UploadError::KernelTooLarge(head.kernel_len));
        }
        if head.initramfs_len > MAX_INITRAMFS {
            return Err(UploadError::InitramfsTooLarge(head.initramfs_len));
        }
        if head.root_disk_len > MAX_ROOT_DISK {
            return Err(UploadError::RootDiskTooLarge(head.root_disk_len));
        }
        if !head.root_disk_len.is_multiple_of(ROOT_DISK_ALIGN) {
            return Err(UploadError::RootDiskUnaligned(head.root_disk_len));
        }
        let cmdline =
            Cmdline::new(&head.cmdline).map_err(|e| UploadError::BadCmdline(e.to_string()))?;
        // All bounded above, so the sum cannot overflow.
        let need = head.kernel_len + head.initramfs_len + head.root_disk_len;
        let have = parts.len() as u64;
        if have < need {
            return Err(UploadError::Truncated {
                need: got - have + need,
                got,
            });
        }
        if have > need {
            return Err(UploadError::Trailing(have - need));
        }
        let (kernel, rest) = parts.split_at(head.kernel_len as usize);
        let (initramfs, root_disk) = rest.split_at(head.initramfs_len as usize);
        let root_disk = (!root_disk.is_empty()).then_some(root_disk);
        Ok(Self {
            head,
            cmdline,
            kernel,
            initramfs,
            root_disk,
        })
    }

    /// The digest the parts add up to, checked against the stated one.
    pub fn check_digest(&self) -> Result<Digest, UploadError> {
        let found = digest_of(&self.cmdline, self.kernel, self.initramfs, self.root_disk);
        if found != self.head.digest {
            return Err(UploadError::WrongDigest {
                stated: self.head.digest,
                found,
            });
        }
        Ok(found)
    }
}

/// Frames an upload: the magic, the head and the parts (a root disk only
/// when given). The head's lengths are set from the parts.
pub fn encode(
    cmdline: &str,
    digest: Digest,
    kernel: &[u8],
    initramfs: &[u8],
    root_disk: Option<&[u8]>,
) -> Vec<u8> {
    let root_disk = root_disk.unwrap_or_default();
    let head = UploadHead {
        cmdline: cmdline.to_owned(),
        digest,
        kernel_len: kernel.len() as u64,
        initramfs_len: initramfs.len() as u64,
        root_disk_len: root_disk.len() as u64,
    };
    let head = serde_json::to_vec(&head).unwrap_or_default();
    let mut out = Vec::with_capacity(
        UPLOAD_MAGIC.len() + 4 + head.len() + kernel.len() + initramfs.len() + root_disk.len(),
    );
    out.extend_from_slice(UPLOAD_MAGIC);
    out.extend_from_slice(&u32::try_from(head.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(kernel);
    out.extend_from_slice(initramfs);
    out.extend_from_slice(root_disk);
    out
}

/// The digest an image of these parts has: what a customer states.
pub fn digest_of(
    cmdline: &Cmdline,
    kernel: &[u8],
    initramfs: &[u8],
    root_disk: Option<&[u8]>,
) -> Digest {
    image_digest_with_root_disk(
        &Digest::of(kernel),
        &Digest::of(initramfs),
        &cmdline.digest(),
        root_disk.map(Digest::of).as_ref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn good() -> Vec<u8> {
        let cmdline = Cmdline::new("console=ttyS0").unwrap();
        let d = digest_of(&cmdline, b"KERNEL", b"INITRD", None);
        encode("console=ttyS0", d, b"KERNEL", b"INITRD", None)
    }

    #[test]
    fn a_framed_upload_parses_and_its_digest_checks() {
        let body = good();
        let up = ImageUpload::parse(&body).unwrap();
        assert_eq!(up.kernel, b"KERNEL");
        assert_eq!(up.initramfs, b"INITRD");
        up.check_digest().unwrap();
    }

    #[test]
    fn malformed_uploads_are_refused() {
        let body = good();
        assert!(matches!(
            ImageUpload::parse(&body[..body.len() - 1]),
            Err(UploadError::Truncated { .. })
        ));
        let mut padded = body.clone();
        padded.push(0);
        assert_eq!(ImageUpload::parse(&padded), Err(UploadError::Trailing(1)));
        assert_eq!(ImageUpload::parse(b"hello"), Err(UploadError::BadMagic));
        let mut wrong = body.clone();
        let last = wrong.len() - 1;
        wrong[last] ^= 1;
        assert!(matches!(
            ImageUpload::parse(&wrong).unwrap().check_digest(),
            Err(UploadError::WrongDigest { .. })
        ));
        let cmdline = Cmdline::new("x").unwrap();
        let d = digest_of(&cmdline, b"K", b"", None);
        // An oversized initramfs is refused from the head, before any byte
        // of it is read.
        let mut huge = encode("x", d, b"K", b"", None);
        let head = serde_json::to_vec(&UploadHead {
            cmdline: "x".into(),
            digest: d,
            kernel_len: 1,
            initramfs_len: MAX_INITRAMFS + 1,
            root_disk_len: 0,
        })
        .unwrap();
        huge.truncate(UPLOAD_MAGIC.len());
        huge.extend_from_slice(&(head.len() as u32).to_be_bytes());
        huge.extend_from_slice(&head);
        huge.push(b'K');
        assert_eq!(
            ImageUpload::parse(&huge),
            Err(UploadError::InitramfsTooLarge(MAX_INITRAMFS + 1))
        );
        assert_eq!(
            ImageUpload::parse(&encode("x", d, b"", b"", None)),
            Err(UploadError::EmptyKernel)
        );
    }

    #[test]
    fn a_root_disk_is_framed_bounded_and_in_the_digest() {
        let cmdline = Cmdline::new("console=ttyS0").unwrap();
        let disk = vec![7u8; 1 << 20];
        let d = digest_of(&cmdline, b"K", b"I", Some(&disk));
        assert_ne!(d, digest_of(&cmdline, b"K", b"I", None));
        let body = encode("console=ttyS0", d, b"K", b"I", Some(&disk));
        let up = ImageUpload::parse(&body).unwrap();
        assert_eq!(up.root_disk, Some(&disk[..]));
        assert_eq!(up.check_digest().unwrap(), d);
        // The same parts stated without the root disk's digest: refused.
        let stated = digest_of(&cmdline, b"K", b"I", None);
        let body = encode("console=ttyS0", stated, b"K", b"I", Some(&disk));
        assert!(matches!(
            ImageUpload::parse(&body).unwrap().check_digest(),
            Err(UploadError::WrongDigest { .. })
        ));
        // Not a whole number of MiB, or too large: refused from the head.
        let odd = vec![7u8; (1 << 20) + 1];
        let body = encode("console=ttyS0", d, b"K", b"I", Some(&odd));
        assert_eq!(
            ImageUpload::parse(&body),
            Err(UploadError::RootDiskUnaligned((1 << 20) + 1))
        );
        let head = serde_json::to_vec(&UploadHead {
            cmdline: "x".into(),
            digest: d,
            kernel_len: 1,
            initramfs_len: 0,
            root_disk_len: MAX_ROOT_DISK + ROOT_DISK_ALIGN,
        })
        .unwrap();
        let mut huge = UPLOAD_MAGIC.to_vec();
        huge.extend_from_slice(&(head.len() as u32).to_be_bytes());
        huge.extend_from_slice(&head);
        huge.push(b'K');
        assert_eq!(
            ImageUpload::parse(&huge),
            Err(UploadError::RootDiskTooLarge(
                MAX_ROOT_DISK + ROOT_DISK_ALIGN
            ))
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut body = UPLOAD_MAGIC.to_vec();
            body.extend_from_slice(&bytes);
            let _ = ImageUpload::parse(&body);
            let _ = ImageUpload::parse(&bytes);
        }
    }
}
