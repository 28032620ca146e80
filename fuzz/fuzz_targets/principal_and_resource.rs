//! Principal URIs (certificate SANs, token subjects), resource ids and names.
//!
//! Properties: nothing panics; whatever parses prints back as exactly the
//! input, and the JSON string form parses to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nitrile_api::{Audience, MAX_NAME_LEN, Name, PrincipalId, ResourceId};

fuzz_target!(|s: &str| {
    if let Ok(p) = PrincipalId::parse(s) {
        assert_eq!(p.to_string(), s);
        assert_eq!(p.uri(), s);
        let json = serde_json::to_string(&p).expect("a principal serializes");
        assert_eq!(serde_json::from_str::<PrincipalId>(&json).ok(), Some(p));
    }
    if let Ok(r) = ResourceId::parse(s) {
        assert_eq!(r.to_string(), s);
        let json = serde_json::to_string(&r).expect("a resource id serializes");
        assert_eq!(serde_json::from_str::<ResourceId>(&json).ok(), Some(r));
    }
    if let Ok(n) = Name::new(s) {
        assert_eq!(n.as_str(), s);
        assert!(n.as_str().len() <= MAX_NAME_LEN);
        assert_eq!(n.to_string(), s);
    }
    if let Ok(a) = Audience::new(s) {
        assert_eq!(a.as_str(), s);
    }
});
