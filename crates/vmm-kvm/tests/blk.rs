//! The test guest writes and reads a pattern through the encrypted
//! virtio-blk device; the backing file holds ciphertext only.

mod common;

use std::fs::File;

use nitrile_vmm_kvm::{DiskConfig, DiskEncryption, ExitReason, SectorCipher};

const PATTERN: &[u8] = b"NITRILE-PATTERN-";
const DISK_BYTES: u64 = 1 << 20;

fn disk(file: &File, seed: u8, read_only: bool) -> DiskConfig {
    DiskConfig {
        file: file.try_clone().unwrap(),
        encryption: DiskEncryption::Xts(common::key(seed)),
        read_only,
        id: "vol-test-0001".into(),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn blk_write_read_back_and_backing_file_holds_no_plaintext() {
    if !common::kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    file.set_len(DISK_BYTES).unwrap();

    let (exit, out) = common::boot("blk=rw", vec![disk(&file, 7, false)]);
    assert!(out.contains("NITRILE-TESTGUEST-READY"), "{out}");
    assert!(out.contains("BLK-ID:vol-test-0001"), "{out}");
    assert!(out.contains("BLK-OK"), "{out}");
    assert_eq!(exit, ExitReason::Shutdown { code: 0 });

    // The backing file: ciphertext only.
    let raw = std::fs::read(&path).unwrap();
    assert_eq!(raw.len() as u64, DISK_BYTES);
    assert!(
        !contains(&raw, PATTERN),
        "plaintext pattern found in the backing file"
    );
    assert!(
        !contains(&raw, b"PATTERN"),
        "plaintext fragment found in the backing file"
    );
    // ...which decrypts to the pattern under the right key.
    let mut first = raw[..4096].to_vec();
    SectorCipher::new(&common::key(7))
        .unwrap()
        .decrypt(&mut first, 0)
        .unwrap();
    assert!(contains(&first, PATTERN));
    // A read-only boot with the same key sees what the first boot wrote.
    let (exit, out) = common::boot("blk=ro", vec![disk(&file, 7, true)]);
    assert!(out.contains("BLK-OK"), "{out}");
    assert_eq!(exit, ExitReason::Shutdown { code: 0 });
}

#[test]
fn wrong_key_reads_noise() {
    if !common::kvm_usable() {
        return;
    }
    let file = tempfile::tempfile().unwrap();
    file.set_len(DISK_BYTES).unwrap();
    let (_, out) = common::boot("blk=rw", vec![disk(&file, 1, false)]);
    assert!(out.contains("BLK-OK"), "{out}");

    let (exit, out) = common::boot("blk=ro", vec![disk(&file, 2, true)]);
    assert!(out.contains("BLK-FAIL"), "{out}");
    assert!(!out.contains("BLK-OK"), "{out}");
    assert_eq!(exit, ExitReason::Shutdown { code: 1 });

    let mut raw = vec![0u8; 64 * 512];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut raw, 0).unwrap();
    SectorCipher::new(&common::key(2))
        .unwrap()
        .decrypt(&mut raw, 0)
        .unwrap();
    assert!(!contains(&raw, PATTERN));
}

#[test]
fn read_only_disk_refuses_guest_writes() {
    if !common::kvm_usable() {
        return;
    }
    let file = tempfile::tempfile().unwrap();
    file.set_len(DISK_BYTES).unwrap();
    let (exit, out) = common::boot("blk=rw", vec![disk(&file, 3, true)]);
    assert!(out.contains("BLK-FAIL"), "{out}");
    assert_eq!(exit, ExitReason::Shutdown { code: 1 });
    let mut raw = vec![0u8; DISK_BYTES as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut raw, 0).unwrap();
    assert!(raw.iter().all(|&b| b == 0), "a read-only disk was written");
}

#[test]
fn no_disk_reports_failure() {
    if !common::kvm_usable() {
        return;
    }
    let (exit, out) = common::boot("blk=rw", Vec::new());
    assert!(out.contains("BLK-FAIL no device"), "{out}");
    assert_eq!(exit, ExitReason::Shutdown { code: 1 });
}

/// Control for the no-plaintext test: the same search finds the pattern when
/// the disk is deliberately stored in plaintext.
#[test]
fn danger_plaintext_disk_holds_the_pattern_as_is() {
    if !common::kvm_usable() {
        return;
    }
    let file = tempfile::tempfile().unwrap();
    file.set_len(DISK_BYTES).unwrap();
    let config = DiskConfig {
        file: file.try_clone().unwrap(),
        encryption: DiskEncryption::DangerPlaintext,
        read_only: false,
        id: "plain".into(),
    };
    let (_, out) = common::boot("blk=rw", vec![config]);
    assert!(out.contains("BLK-OK"), "{out}");
    let mut raw = vec![0u8; 64 * 512];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut raw, 0).unwrap();
    assert!(contains(&raw, PATTERN));
}
