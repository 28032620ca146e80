//! The image store against real files: round trip, tampering, digests.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nitrile_image::{
    Cmdline, Component, Digest, FileProblem, ImageError, ImageStore, KernelFormat,
    MAX_MANIFEST_SIZE, image_digest,
};

fn fake_elf_kernel(tag: &str) -> Vec<u8> {
    let mut k = b"\x7fELF\x02\x01\x01".to_vec();
    k.resize(4096, 0);
    k.extend_from_slice(b"Linux version %s\0");
    k.extend_from_slice(format!("Linux version 6.12.0-{tag} (builder) #1 SMP\0").as_bytes());
    k.resize(3 << 20, 0x5a); // several read chunks
    k
}

struct Inputs {
    _dir: tempfile::TempDir,
    kernel: PathBuf,
    initramfs: PathBuf,
}

fn inputs(kernel: &[u8], initramfs: &[u8]) -> Inputs {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("vmlinux");
    let i = dir.path().join("initramfs");
    fs::write(&k, kernel).unwrap();
    fs::write(&i, initramfs).unwrap();
    Inputs {
        _dir: dir,
        kernel: k,
        initramfs: i,
    }
}

fn cmdline(s: &str) -> Cmdline {
    Cmdline::new(s).unwrap()
}

fn make_writable_and_modify(path: &Path, offset: usize) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(path).unwrap();
    bytes[offset] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

#[test]
fn import_list_get_round_trip() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path().join("images")).unwrap();
    let kernel = fake_elf_kernel("a");
    let input = inputs(&kernel, b"initramfs bytes");
    let c = cmdline("console=ttyS0 panic=-1");

    let imported = store.import(&input.kernel, &input.initramfs, &c).unwrap();
    assert_eq!(imported.kernel_sha256(), Digest::of(&kernel));
    assert_eq!(imported.initramfs_sha256(), Digest::of(b"initramfs bytes"));
    assert_eq!(
        imported.cmdline_sha256(),
        Digest::of(b"console=ttyS0 panic=-1")
    );
    assert_eq!(
        imported.digest(),
        image_digest(
            &Digest::of(&kernel),
            &Digest::of(b"initramfs bytes"),
            &Digest::of(b"console=ttyS0 panic=-1")
        )
    );
    assert_eq!(imported.kernel_format(), KernelFormat::Elf64);
    assert_eq!(
        imported.manifest().kernel_release.as_deref(),
        Some("6.12.0-a")
    );

    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].digest, imported.digest());
    assert_eq!(listed[0].kernel.size, kernel.len() as u64);

    // A fresh handle on the same directory sees and verifies it.
    let reopened = ImageStore::open(store_dir.path().join("images")).unwrap();
    let got = reopened.get(&imported.digest()).unwrap();
    assert_eq!(got, imported);
    assert_eq!(fs::read(got.kernel()).unwrap(), kernel);
    assert_eq!(fs::read(got.initramfs()).unwrap(), b"initramfs bytes");
    assert_eq!(got.cmdline().as_str(), "console=ttyS0 panic=-1");
    // Stored files are read-only.
    let mode = fs::metadata(got.kernel()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o444);

    // Importing the same again is idempotent.
    let again = store.import(&input.kernel, &input.initramfs, &c).unwrap();
    assert_eq!(again.digest(), imported.digest());
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(
        store
            .find_prefix(&imported.digest().to_hex()[..12])
            .unwrap(),
        vec![imported.digest()]
    );
}

#[test]
fn modified_stored_kernel_is_refused() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let input = inputs(&fake_elf_kernel("a"), b"initramfs");
    let image = store
        .import(&input.kernel, &input.initramfs, &cmdline("quiet"))
        .unwrap();
    make_writable_and_modify(image.kernel(), 2 << 20);
    match store.get(&image.digest()) {
        Err(ImageError::Tampered {
            image: d,
            component: Component::Kernel,
            expected,
            found,
        }) => {
            assert_eq!(d, image.digest());
            assert_eq!(expected, image.kernel_sha256());
            assert_ne!(found, expected);
        }
        other => panic!("expected Tampered kernel, got {other:?}"),
    }
}

#[test]
fn modified_stored_initramfs_is_refused() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let input = inputs(&fake_elf_kernel("a"), b"initramfs");
    let image = store
        .import(&input.kernel, &input.initramfs, &cmdline("quiet"))
        .unwrap();
    make_writable_and_modify(image.initramfs(), 0);
    assert!(matches!(
        store.get(&image.digest()),
        Err(ImageError::Tampered {
            component: Component::Initramfs,
            ..
        })
    ));
    // A deleted blob is refused too.
    fs::remove_file(image.initramfs()).unwrap();
    assert!(matches!(
        store.get(&image.digest()),
        Err(ImageError::Io { .. })
    ));
}

#[test]
fn edited_manifest_is_refused() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let input = inputs(&fake_elf_kernel("a"), b"initramfs");
    let image = store
        .import(&input.kernel, &input.initramfs, &cmdline("quiet"))
        .unwrap();
    let manifest = store_dir
        .path()
        .join("manifests")
        .join(format!("{}.json", image.digest()));
    let text = fs::read_to_string(&manifest).unwrap();

    // Another command line under the same digest.
    fs::write(&manifest, text.replace("\"quiet\"", "\"init=/bin/sh\"")).unwrap();
    assert!(matches!(
        store.get(&image.digest()),
        Err(ImageError::ManifestMismatch { .. })
    ));

    // A consistent manifest of another image filed under this digest.
    let other = inputs(&fake_elf_kernel("b"), b"initramfs");
    let other = store
        .import(&other.kernel, &other.initramfs, &cmdline("quiet"))
        .unwrap();
    let other_manifest = store_dir
        .path()
        .join("manifests")
        .join(format!("{}.json", other.digest()));
    fs::copy(&other_manifest, &manifest).unwrap();
    assert!(matches!(
        store.get(&image.digest()),
        Err(ImageError::ManifestMismatch { .. })
    ));
    assert!(matches!(
        store.list(),
        Err(ImageError::ManifestMismatch { .. })
    ));

    // Oversized and malformed manifests.
    fs::write(&manifest, vec![b' '; MAX_MANIFEST_SIZE as usize + 1]).unwrap();
    assert!(matches!(
        store.get(&image.digest()),
        Err(ImageError::ManifestTooLarge { .. })
    ));
    fs::write(&manifest, "{\"format\":").unwrap();
    assert!(matches!(
        store.get(&image.digest()),
        Err(ImageError::BadManifest { .. })
    ));
}

#[test]
fn digest_changes_with_every_component() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let base = inputs(&fake_elf_kernel("a"), b"initramfs");
    let other_kernel = inputs(&fake_elf_kernel("b"), b"initramfs");
    let other_initramfs = inputs(&fake_elf_kernel("a"), b"initramfs!");
    let c = cmdline("console=ttyS0");
    let c2 = cmdline("console=ttyS0 quiet");

    let d_base = store
        .import(&base.kernel, &base.initramfs, &c)
        .unwrap()
        .digest();
    let d_kernel = store
        .import(&other_kernel.kernel, &other_kernel.initramfs, &c)
        .unwrap()
        .digest();
    let d_initramfs = store
        .import(&other_initramfs.kernel, &other_initramfs.initramfs, &c)
        .unwrap()
        .digest();
    let d_cmdline = store
        .import(&base.kernel, &base.initramfs, &c2)
        .unwrap()
        .digest();
    let all = [d_base, d_kernel, d_initramfs, d_cmdline];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a, b);
        }
    }
    // Swapping kernel and initramfs contents changes it too.
    let swapped = inputs(b"initramfs", &fake_elf_kernel("a"));
    assert!(matches!(
        store.import(&swapped.kernel, &swapped.initramfs, &c),
        Err(ImageError::UnknownKernelFormat { .. })
    ));
    assert_eq!(store.list().unwrap().len(), 4);
    // Same inputs in a fresh store: same digest.
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = ImageStore::open(fresh_dir.path()).unwrap();
    assert_eq!(
        fresh
            .import(&base.kernel, &base.initramfs, &c)
            .unwrap()
            .digest(),
        d_base
    );
}

#[test]
fn bad_inputs_are_refused() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let c = cmdline("quiet");

    let not_kernel = inputs(b"#!/bin/sh\necho hello\n", b"initramfs");
    assert!(matches!(
        store.import(&not_kernel.kernel, &not_kernel.initramfs, &c),
        Err(ImageError::UnknownKernelFormat { .. })
    ));
    let empty_initramfs = inputs(&fake_elf_kernel("a"), b"");
    assert!(matches!(
        store.import(&empty_initramfs.kernel, &empty_initramfs.initramfs, &c),
        Err(ImageError::BadFile {
            component: Component::Initramfs,
            problem: FileProblem::Empty,
            ..
        })
    ));
    let dir_as_kernel = inputs(&fake_elf_kernel("a"), b"i");
    assert!(matches!(
        store.import(store_dir.path(), &dir_as_kernel.initramfs, &c),
        Err(ImageError::BadFile {
            problem: FileProblem::NotRegular,
            ..
        })
    ));
    assert!(matches!(
        store.get(&Digest::of(b"nothing")),
        Err(ImageError::NotFound(_))
    ));
    // Refused imports leave no manifest and no stray temporary files.
    assert!(store.list().unwrap().is_empty());
    let leftovers: Vec<_> = fs::read_dir(store_dir.path().join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn root_disk_is_part_of_the_image_and_checked() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path().join("images")).unwrap();
    let kernel = fake_elf_kernel("r");
    let input = inputs(&kernel, b"initramfs bytes");
    let c = cmdline("console=ttyS0");
    let mut disk = vec![0u8; 2 << 20];
    disk[1024..1040].copy_from_slice(b"ROOT-DISK-MARKER");
    let disk_path = input.kernel.with_file_name("root.img");
    fs::write(&disk_path, &disk).unwrap();

    let with = store
        .import_with_root_disk(&input.kernel, &input.initramfs, &c, Some(&disk_path))
        .unwrap();
    let without = store.import(&input.kernel, &input.initramfs, &c).unwrap();
    assert_ne!(
        with.digest(),
        without.digest(),
        "the root disk is in the digest"
    );
    assert_eq!(
        with.digest(),
        nitrile_image::image_digest_with_root_disk(
            &Digest::of(&kernel),
            &Digest::of(b"initramfs bytes"),
            &Digest::of(b"console=ttyS0"),
            Some(&Digest::of(&disk)),
        )
    );
    assert_eq!(with.root_disk_mib(), Some(2));
    assert_eq!(without.root_disk(), None);
    let got = store.get(&with.digest()).unwrap();
    assert_eq!(fs::read(got.root_disk().unwrap()).unwrap(), disk);

    // A changed byte of the stored root disk refuses the image.
    make_writable_and_modify(got.root_disk().unwrap(), 1024);
    assert!(matches!(
        store.get(&with.digest()),
        Err(ImageError::Tampered {
            component: Component::RootDisk,
            ..
        })
    ));
    // The image without one is untouched.
    store.get(&without.digest()).unwrap();

    // Not a whole number of MiB, or empty: refused, no manifest written.
    let before = store.list().unwrap().len();
    fs::write(&disk_path, vec![1u8; (1 << 20) + 512]).unwrap();
    assert!(matches!(
        store.import_with_root_disk(&input.kernel, &input.initramfs, &c, Some(&disk_path)),
        Err(ImageError::BadFile {
            component: Component::RootDisk,
            problem: FileProblem::Unaligned,
            ..
        })
    ));
    fs::write(&disk_path, b"").unwrap();
    assert!(matches!(
        store.import_with_root_disk(&input.kernel, &input.initramfs, &c, Some(&disk_path)),
        Err(ImageError::BadFile {
            component: Component::RootDisk,
            problem: FileProblem::Empty,
            ..
        })
    ));
    assert_eq!(store.list().unwrap().len(), before);
}
