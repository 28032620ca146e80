//! Content-addressed guest images: a kernel, an initramfs and a kernel
//! command line, named by one digest, like the PCR0 measurement of a Nitro
//! enclave image.
//!
//! The image digest is
//!
//! ```text
//! SHA-256( SHA-256(kernel file) || SHA-256(initramfs file) || SHA-256(cmdline bytes) )
//! ```
//!
//! over the three raw 32-byte component digests in that order (see
//! [`image_digest`]). Changing any byte of any component, or of the command
//! line, changes it. An image may also have a root disk (a raw disk image,
//! a whole number of MiB), whose digest then follows the other three
//! ([`image_digest_with_root_disk`]); a host never boots it as stored but
//! copies it into a new encrypted volume for each instance.
//!
//! This crate guarantees that [`ImageStore::get`] hands out an image only
//! after hashing its stored kernel and initramfs and checking them, the
//! command line and the manifest against the requested digest: a modified
//! store fails closed ([`ImageError::Tampered`], [`ImageError::ManifestMismatch`]).
//! It does not protect the files between that check and their use: the
//! store directory must be writable only by the host agent. It does not sign
//! images (a digest says *what* an image is, not who approved it), and it
//! does not boot anything.
//!
//! [`build_guest_image`] runs the project's guest image build
//! (`scripts/guest-image.sh`, compiled in): Debian's bookworm-backports
//! `linux-image-cloud-amd64` as an uncompressed ELF `vmlinux` with a PVH
//! entry, and a busybox initramfs that loads the virtio-mmio, virtio-blk,
//! virtio-net, vsock and dm-crypt modules, prints `NITRILE-GUEST-READY` on
//! the console, runs the test action named by `nitrile.test=` on the kernel
//! command line (`volume-write`, `volume-read`) and powers off.
//!
//! # Booting it with QEMU
//!
//! This command line boots the built image under QEMU TCG (about 4 s to the
//! marker on a 2-core machine), with a virtio-blk disk as `/dev/vda`:
//!
//! ```text
//! qemu-system-x86_64 -M microvm -cpu max,-la57 -accel tcg -m 256M -smp 1 \
//!   -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
//!   -kernel vmlinux -initrd initramfs \
//!   -drive id=d0,file=disk.raw,format=raw,if=none -device virtio-blk-device,drive=d0 \
//!   -append "console=ttyS0 tsc_early_khz=2000000 panic=-1 nitrile.test=volume-write"
//! ```
//!
//! `-M microvm` describes its virtio-mmio devices to the kernel through ACPI
//! (this kernel has no `virtio_mmio.device=` command line support);
//! `tsc_early_khz=` avoids a TSC calibration hang under TCG; `-cpu
//! max,-la57` keeps 4-level paging. The guest powers off with `poweroff -f`
//! and `-no-reboot` makes QEMU exit.
//!
//! # The host image
//!
//! [`host::build_host_image`] builds what a nitrile host itself boots: a
//! Unified Kernel Image (systemd's UEFI stub with Debian's cloud kernel, a
//! command line and an initramfs holding only `nitrile`, the libraries it
//! links, `mke2fs`, kernel modules and the host's provisioning directory),
//! and the PCR values it must produce ([`host::Reference`]). [`cpio`]
//! writes the archive reproducibly; [`pe`] computes the Authenticode hash
//! a UEFI firmware measures; [`pcr`] replays PCR extensions.

#![forbid(unsafe_code)]

mod build;
pub mod cpio;
mod digest;
pub mod host;
mod kernel;
pub mod pcr;
pub mod pe;
mod store;
pub mod uki;

pub use build::{
    BuildError, BuiltImage, CACHE_ENV, GUEST_IMAGE_SCRIPT, GUEST_INIT, build_guest_image,
    default_cache_dir, output_dir, read_output,
};
pub use digest::{
    Cmdline, CmdlineError, DIGEST_PREFIX, Digest, DigestError, MAX_CMDLINE_LEN, image_digest,
    image_digest_with_root_disk,
};
pub use kernel::{KERNEL_HEADER_LEN, KernelFormat, MAX_RELEASE_LEN};
pub use store::{
    BlobInfo, Component, FileProblem, ImageError, ImageManifest, ImageRef, ImageStore,
    MANIFEST_FORMAT, MAX_COMPONENT_SIZE, MAX_MANIFEST_SIZE, ROOT_DISK_ALIGN,
};
