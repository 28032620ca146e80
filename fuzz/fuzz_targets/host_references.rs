//! A release's `host-references.json` as the key service reads it
//! (`HostReferences::parse`, after tough checked its length and hash) and a
//! host image's `reference.json` as `nitrile release build
//! --host-reference` reads it (`HostReference::from_reference_json`).
//!
//! Properties: nothing panics; what parses is within the bounds (at most
//! `MAX_HOSTS` hosts, every entry naming 1 to 24 PCRs below 24) and its
//! written form parses again to the same references and is the same bytes
//! when written again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nitrile_release::references::{
    HostReference, HostReferences, MAX_HOSTS, PCR_COUNT,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(refs) = HostReferences::parse(data) {
        assert!(refs.hosts().count() <= MAX_HOSTS);
        for host in refs.hosts() {
            let reference = refs.get(host).expect("a listed host has an entry");
            assert!(!reference.pcrs().is_empty());
            assert!(reference.pcrs().keys().all(|i| *i < PCR_COUNT));
        }
        let written = refs.to_bytes();
        let again = HostReferences::parse(&written).expect("what is written parses");
        assert_eq!(again, refs, "the references changed in a round trip");
        assert_eq!(again.to_bytes(), written, "written twice, not the same bytes");
    }
    if let Ok(reference) = HostReference::from_reference_json(data) {
        assert!(!reference.pcrs().is_empty());
        assert!(reference.pcrs().keys().all(|i| *i < PCR_COUNT));
    }
});
