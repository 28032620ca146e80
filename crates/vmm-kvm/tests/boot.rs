//! Boots the bare-metal test guest to its serial marker.

mod common;

use nitrile_vmm_kvm::ExitReason;

#[test]
fn boot_to_marker() {
    if !common::kvm_usable() {
        return;
    }
    let (exit, out) = common::boot("", Vec::new());
    assert!(
        out.contains("NITRILE-TESTGUEST-READY"),
        "serial output: {out:?}"
    );
    assert_eq!(exit, ExitReason::Shutdown { code: 0 });
}

/// The same guest entered through its PVH note (32-bit protected mode, the
/// path QEMU takes): its own page tables reach the block device, and the
/// command line comes from `hvm_start_info`.
#[test]
fn boot_through_pvh_entry() {
    if !common::kvm_usable() {
        return;
    }
    let disk = tempfile::tempfile().unwrap();
    disk.set_len(1 << 20).unwrap();
    let console = common::Console::default();
    let config = nitrile_vmm_kvm::VmConfig {
        memory_bytes: 32 << 20,
        kernel: common::guest_file(),
        kernel_format: nitrile_vmm_kvm::KernelFormat::Pvh,
        cmdline: "blk=rw".into(),
        serial_out: Box::new(console.clone()),
        disks: vec![nitrile_vmm_kvm::DiskConfig {
            file: disk,
            encryption: nitrile_vmm_kvm::DiskEncryption::Xts(common::key(7)),
            read_only: false,
            id: "pvh".into(),
        }],
        vsock: None,
    };
    let mut vmm = nitrile_vmm_kvm::Vmm::new(config).unwrap();
    let exit = vmm.run().unwrap();
    let out = console.text();
    assert!(out.contains("ENTRY-PVH"), "serial output: {out:?}");
    assert!(out.contains("BLK-OK"), "serial output: {out:?}");
    assert_eq!(exit, ExitReason::Shutdown { code: 0 });
}
