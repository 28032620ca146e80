//! The key service's routes are the reviewed ones: every key management
//! operation has exactly one route, and its section of
//! `crates/api/OPERATIONS.md` names it; the relayed routes are the host's
//! volume operations.

use std::collections::BTreeMap;

use nitrile_api::{Operation, ResourceKind};
use nitrile_kms_api::{Caller, ROUTES};

/// The `## ` sections of OPERATIONS.md: heading -> body.
fn sections() -> BTreeMap<String, String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/OPERATIONS.md");
    let text = std::fs::read_to_string(&path).expect("read OPERATIONS.md");
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            if let Some((k, v)) = current.take() {
                out.insert(k, v);
            }
            current = Some((h.trim().to_owned(), String::new()));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    if let Some((k, v)) = current {
        out.insert(k, v);
    }
    out
}

#[test]
fn every_key_operation_has_one_reviewed_route() {
    let sections = sections();
    let key_ops: Vec<Operation> = Operation::ALL
        .into_iter()
        .filter(|op| matches!(op.resource_kind(), ResourceKind::KmsKey | ResourceKind::Kms))
        .collect();
    assert_eq!(key_ops.len(), 7);
    for op in key_ops {
        let routes: Vec<_> = ROUTES.iter().filter(|r| r.operation == op).collect();
        assert_eq!(routes.len(), 1, "{op} has {} routes", routes.len());
        let route = routes[0];
        assert_eq!(route.caller, Caller::Principal, "{op}");
        let named = format!("`{} {}`", route.method, route.path);
        let body = sections
            .get(op.as_str())
            .unwrap_or_else(|| panic!("no section {op}"));
        // The section wraps lines: compare with whitespace folded.
        let folded: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            folded.contains(&named),
            "section {op} of OPERATIONS.md does not name its route {named}"
        );
    }
}

#[test]
fn the_relayed_routes_are_the_hosts_volume_operations_that_need_a_key() {
    let relayed: Vec<Operation> = ROUTES
        .iter()
        .filter(|r| r.caller == Caller::Host)
        .map(|r| r.operation)
        .collect();
    assert_eq!(
        relayed,
        [
            Operation::VolumeCreate,
            Operation::VolumeAttach,
            Operation::VolumeDelete
        ]
    );
    for op in relayed {
        assert!(op.is_mutation(), "{op}: relayed tokens are single use");
        assert_eq!(op.resource_kind(), ResourceKind::Volume);
    }
    let sections = sections();
    for op in ["volume.create", "volume.attach", "volume.delete"] {
        assert!(
            sections[op].contains("key service"),
            "section {op} of OPERATIONS.md should say what the key service does"
        );
    }
}
