//! What crosses the VMM's control channel before the VM is built, as each
//! side reads it: the sealed keys a VMM is relayed
//! (`unlock::receive_keys`, fed arbitrary lines for a spec with two
//! volumes) and the sealed-key decoder on its own (`SealedKey::decode`),
//! and the QEMU launcher's plan (`qemu::launch::parse_plan`).
//!
//! Properties: nothing panics; no input yields a volume key (the VMM's
//! recipients are fresh, so no sealed key can have been made for them);
//! every recipient line the VMM writes is a canonical control line within
//! the bound; a sealed key that decodes encodes back to the input; a plan
//! that parses has at most `MAX_PLAN_ARGS` arguments and a spec.

#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use nitrile_vmm::control::MAX_CONTROL_LINE;
use nitrile_vmm::qemu::launch::{MAX_PLAN_ARGS, parse_plan};
use nitrile_vmm::{SealedKey, VmSpec, unlock};

const SPEC: &str = r#"{"instance":"web1","image":{"digest":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","kernel":"/k","initramfs":"/i","cmdline":""},"vcpus":1,"memory_mib":64,"volumes":[{"id":"data","path":"/v/data.img","size_mib":1},{"id":"logs","path":"/v/logs.img","size_mib":1}]}"#;

fuzz_target!(|data: &[u8]| {
    let spec = VmSpec::parse_json(SPEC.as_bytes()).expect("the target's spec parses");
    let mut offers = Vec::new();
    let opened = unlock::receive_keys(&spec, &mut Cursor::new(data), &mut offers);
    assert!(opened.is_err(), "a volume key from bytes made before the recipients");
    for line in offers.split_inclusive(|&b| b == b'\n') {
        assert!(line.len() <= MAX_CONTROL_LINE && line.ends_with(b"\n"));
    }

    if let Ok(sealed) = SealedKey::decode(data) {
        assert_eq!(sealed.encode(), data);
    }

    if let Ok((plan, _spec)) = parse_plan(data) {
        assert!(plan.args.len() <= MAX_PLAN_ARGS);
    }
});
