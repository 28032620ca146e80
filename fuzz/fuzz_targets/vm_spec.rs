//! VM specifications as a backend reads them (`VmSpec::parse_json`), and
//! the field parsers behind it.
//!
//! Properties: nothing panics; a spec that parses holds every bound its
//! documentation states (vCPUs, memory, volume count, unique volume ids and
//! files, an instance-store file that is no volume's, absolute normalized
//! paths, printable command line, tap name), its
//! canonical JSON parses back to an equal spec and is a fixed point; a
//! digest, command line or tap name that parses prints back as exactly the
//! input.

#![no_main]

use std::collections::BTreeSet;
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use nitrile_vmm::{
    Cmdline, ImageDigest, MAX_CMDLINE_LEN, MAX_MEMORY_MIB, MAX_PATH_LEN, MAX_SPEC_LEN,
    MAX_TAP_NAME_LEN, MAX_VCPUS, MAX_VOLUME_MIB, MAX_VOLUMES, MIN_MEMORY_MIB, TapName, VmSpec,
};

fn normalized(path: &Path) {
    let s = path.to_str().expect("a spec path is text");
    assert!(s.starts_with('/') && s.len() <= MAX_PATH_LEN, "{s:?}");
    assert!(!s.contains('\0') && !s.contains("//"), "{s:?}");
    assert!(s == "/" || !s.ends_with('/'), "{s:?}");
    assert!(
        path.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
        "{s:?}"
    );
    assert!(
        !s.split('/').any(|part| part == "." || part == ".."),
        "{s:?}"
    );
}

fn check(spec: &VmSpec) {
    assert!((1..=MAX_VCPUS).contains(&spec.vcpus()));
    assert!((MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&spec.memory_mib()));
    let image = spec.image();
    normalized(image.kernel.as_path());
    normalized(image.initramfs.as_path());
    let cmdline = image.cmdline.as_str();
    assert!(cmdline.len() <= MAX_CMDLINE_LEN);
    assert!(cmdline.bytes().all(|b| (0x20..=0x7e).contains(&b)));
    assert!(spec.volumes().len() <= MAX_VOLUMES);
    let mut ids = BTreeSet::new();
    let mut paths = BTreeSet::new();
    for v in spec.volumes() {
        assert!((1..=MAX_VOLUME_MIB).contains(&v.size_mib));
        normalized(v.path.as_path());
        assert!(ids.insert(v.id.clone()), "volume id {:?} twice", v.id);
        assert!(paths.insert(v.path.clone()), "volume file twice");
    }
    if let Some(scratch) = spec.scratch() {
        assert!((1..=MAX_VOLUME_MIB).contains(&scratch.size_mib));
        normalized(scratch.path.as_path());
        assert!(!paths.contains(&scratch.path), "scratch file is a volume's");
    }
    if let Some(vsock) = spec.vsock() {
        assert!(vsock.guest_cid >= 3 && vsock.guest_cid != u32::MAX);
        normalized(vsock.uds_path.as_path());
    }
    if let Some(net) = spec.net() {
        let tap = net.tap.as_str();
        assert!(!tap.is_empty() && tap.len() <= MAX_TAP_NAME_LEN);
        assert!(
            tap.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = VmSpec::parse_json(data) {
        assert!(data.len() <= MAX_SPEC_LEN);
        check(&spec);
        let json = spec.to_json();
        let again = VmSpec::parse_json(&json).expect("a spec's own JSON parses");
        assert_eq!(again, spec, "spec changed in a JSON round trip");
        assert_eq!(
            again.to_json(),
            json,
            "the canonical JSON is not a fixed point"
        );
    }

    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = ImageDigest::parse(s) {
        assert_eq!(d.to_string(), s);
    }
    if let Ok(c) = Cmdline::parse(s) {
        assert_eq!(c.as_str(), s);
    }
    if let Ok(t) = TapName::parse(s) {
        assert_eq!(t.as_str(), s);
    }
});
