//! Client and server certificates as the TLS layer hands them over.
//!
//! Properties: nothing panics; an identity read for a cell agrees with what
//! the display parser reads from the same bytes.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use nitrile_api::Name;
use nitrile_pki::{CertInfo, PeerIdentity};

static CELL: LazyLock<Name> = LazyLock::new(|| Name::new("cell-1").expect("valid name"));

fuzz_target!(|der: &[u8]| {
    let info = CertInfo::from_der(der);
    if let Ok(peer) = PeerIdentity::from_der(der, &CELL) {
        let info = info.expect("a certificate with an identity parses for display");
        assert_eq!(info.principal.as_ref(), Some(&peer.principal));
        assert_eq!(info.sha256, peer.cert_sha256);
        assert_eq!(info.not_after, peer.not_after);
        assert_eq!(peer.principal.cell, *CELL);
    }
});
