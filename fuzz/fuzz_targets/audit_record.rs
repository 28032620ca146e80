//! Audit record payloads as a journal reader (or the log service) decodes
//! them.
//!
//! Properties: nothing panics; a record that decodes encodes again (unless
//! the re-encoding outgrows the size bound) and decodes to an equal record.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nitrile_audit::{AuditRecord, RecordError};

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = AuditRecord::decode(data) {
        let bytes = match record.encode() {
            Ok(bytes) => bytes,
            // Numbers in `detail` may print longer than they were written
            // (`1E2` becomes `100.0`), so a record near the bound may not fit
            // once re-encoded; anything else is a bug.
            Err(RecordError::TooLarge { .. }) => return,
            Err(e) => panic!("a decoded record does not encode: {e}"),
        };
        let again = AuditRecord::decode(&bytes).expect("an encoded record decodes");
        assert_eq!(
            again, record,
            "record changed in an encode/decode round trip"
        );
    }
});
