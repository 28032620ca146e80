//! The test guest booted with an initramfs, as a Linux guest would be: the
//! image is placed in guest memory and the guest still runs to its marker;
//! an initramfs that cannot fit is refused before the VM exists.

mod common;

use std::io::Write;

use nitrile_vmm_kvm::boot::BootError;
use nitrile_vmm_kvm::{ExitReason, KernelFormat, VmConfig, Vmm, VmmError};

fn config(format: KernelFormat, console: &common::Console) -> VmConfig {
    VmConfig {
        memory_bytes: 32 << 20,
        kernel: common::guest_file(),
        kernel_format: format,
        cmdline: String::new(),
        serial_out: Box::new(console.clone()),
        disks: Vec::new(),
        vsock: None,
    }
}

fn initramfs(len: usize) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    f.write_all(&bytes).unwrap();
    f
}

#[test]
fn boots_with_an_initramfs_through_both_entries() {
    if !common::kvm_usable() {
        return;
    }
    for format in [KernelFormat::Elf, KernelFormat::Pvh] {
        let console = common::Console::default();
        let mut vmm = Vmm::with_initramfs(config(format, &console), initramfs(3 << 20)).unwrap();
        assert_eq!(vmm.run().unwrap(), ExitReason::Shutdown { code: 0 });
        let out = console.text();
        assert!(
            out.contains("NITRILE-TESTGUEST-READY"),
            "{format:?}: {out:?}"
        );
    }
}

#[test]
fn an_initramfs_larger_than_memory_is_refused() {
    if !common::kvm_usable() {
        return;
    }
    let console = common::Console::default();
    let big = tempfile::tempfile().unwrap();
    big.set_len(40 << 20).unwrap();
    let err = Vmm::with_initramfs(config(KernelFormat::Elf, &console), big).unwrap_err();
    assert!(
        matches!(
            err,
            VmmError::Boot(BootError::InitrdTooLarge { size }) if size == 40 << 20
        ),
        "{err:?}"
    );
}
