//! The body of `POST /v1/tokens` as the token service reads it.
//!
//! Properties: nothing panics; a request that parses serializes to JSON
//! that parses back to an equal request.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nitrile_api::wire::{MAX_REQUEST_BODY, TokenRequest};

fuzz_target!(|data: &[u8]| {
    // The token service reads at most this much of a body.
    if data.len() > MAX_REQUEST_BODY {
        return;
    }
    if let Ok(request) = serde_json::from_slice::<TokenRequest>(data) {
        let json = serde_json::to_vec(&request).expect("a parsed request serializes");
        let again: TokenRequest =
            serde_json::from_slice(&json).expect("a serialized request parses");
        assert_eq!(again, request, "request changed in a JSON round trip");
    }
});
