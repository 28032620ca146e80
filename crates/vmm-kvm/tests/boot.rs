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
