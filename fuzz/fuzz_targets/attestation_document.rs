//! Attestation documents and quotes as the key service and `nitrile host
//! verify-attestation` read them: `nitrile_attest::cose::open` of a
//! COSE_Sign1 (Nitro layout) a host sent, and `verify_quote` of a quote's
//! two marshalled TPM structures.
//!
//! The input is a document; its second half is also taken as a quote's
//! TPMS_ATTEST and TPMT_SIGNATURE (split at the middle).
//!
//! Properties: nothing panics; no document opens under the check of a CA
//! that issued none of them; under a check that accepts every signature,
//! a document opens only after the check ran on a 96-byte ES384
//! signature; a quote made of the input's bytes never verifies under an
//! attestation key made of the input's other bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nitrile_attest::{AkPublic, Pcrs, Quote, cose, verify_quote};

fuzz_target!(|data: &[u8]| {
    // Under a CA no document here was issued by: never opens.
    let ca = b"not the DER of any certificate".to_vec();
    assert!(cose::open(data, cose::verify_with_root(&ca)).is_err());

    // Under a check that accepts every signature: the parser alone decides.
    let mut checked = false;
    if let Ok(doc) = cose::open(data, |_tbs, signature, _certificate, _bundle| {
        checked = true;
        assert_eq!(signature.len(), 96, "an ES384 signature is 96 bytes");
        Ok(())
    }) {
        assert!(checked, "a document opened without its signature checked");
        let _ = doc.module_id.len();
    }

    // A quote of the second half: never verifies under a fixed key.
    let half = &data[data.len() / 2..];
    let (message, signature) = half.split_at(half.len() / 2);
    let quote = Quote {
        message: message.to_vec(),
        signature: signature.to_vec(),
        pcrs: Pcrs(Default::default()),
    };
    let ak = AkPublic {
        tpmt_public: data[..data.len() / 2].to_vec(),
    };
    assert!(verify_quote(&ak, &quote, b"nonce").is_err());
});
