//! The customer API's routes are the reviewed ones: every customer
//! operation has exactly one route, and its section of
//! `crates/api/OPERATIONS.md` names it; no route serves another operation.

use std::collections::BTreeMap;

use nitrile_api::Operation;
use nitrile_placed_api::ROUTES;

/// The `## ` sections of OPERATIONS.md: heading -> body, whitespace folded.
fn sections() -> BTreeMap<String, String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/OPERATIONS.md");
    let text = std::fs::read_to_string(&path).expect("read OPERATIONS.md");
    let mut out = BTreeMap::new();
    for part in text.split("\n## ").skip(1) {
        let (head, body) = part.split_once('\n').unwrap_or((part, ""));
        let folded = body.split_whitespace().collect::<Vec<_>>().join(" ");
        out.insert(head.trim().to_owned(), folded);
    }
    out
}

#[test]
fn every_customer_operation_has_one_reviewed_route() {
    let sections = sections();
    let customer_ops: Vec<Operation> = Operation::ALL
        .into_iter()
        .filter(|op| op.is_customer())
        .collect();
    assert_eq!(customer_ops.len(), ROUTES.len());
    for op in customer_ops {
        let routes: Vec<_> = ROUTES.iter().filter(|r| r.operation == op).collect();
        assert_eq!(routes.len(), 1, "{op} has {} routes", routes.len());
        let named = format!("`{} {}`", routes[0].method, routes[0].path);
        let body = sections
            .get(op.as_str())
            .unwrap_or_else(|| panic!("no section {op}"));
        assert!(
            body.contains(&named),
            "section {op} of OPERATIONS.md does not name its route {named}"
        );
        assert!(body.contains("not served by hostd"), "{op}");
    }
}
