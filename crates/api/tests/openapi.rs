//! The OpenAPI document, the reviewed operation list and the code agree, and
//! every response is metadata only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use nitrile_api::Operation;
use nitrile_api::admin::{MAX_REASON_LEN, ROUTES};
use nitrile_api::openapi::{self, SchemaError};
use serde_json::Value;

fn crate_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

#[test]
fn checked_in_document_is_generated_from_the_code() {
    let path = crate_file("openapi.json");
    let generated = openapi::document_text();
    if std::env::var_os("NITRILE_BLESS").is_some() {
        nitrile_fs::write_atomic(&path, generated.as_bytes(), 0o644).expect("write the document");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if generated != checked_in {
        let line = generated
            .lines()
            .zip(checked_in.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || generated.lines().count().min(checked_in.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "crates/api/openapi.json differs from the document generated from the code \
             (first difference at line {line}); run `NITRILE_BLESS=1 cargo test -p nitrile-api` \
             to rewrite it, and review the diff"
        );
    }
}

/// The `## ` sections of OPERATIONS.md: heading -> body.
fn sections() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(crate_file("OPERATIONS.md")).expect("read OPERATIONS.md");
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            if let Some((h, body)) = current.take() {
                assert!(out.insert(h.clone(), body).is_none(), "section {h} twice");
            }
            current = Some((heading.trim().to_owned(), String::new()));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    if let Some((h, body)) = current {
        assert!(out.insert(h.clone(), body).is_none(), "section {h} twice");
    }
    out
}

#[test]
fn every_operation_has_a_reviewed_section_and_every_section_is_an_operation() {
    let sections = sections();
    let names: BTreeSet<&str> = Operation::ALL.iter().map(|o| o.as_str()).collect();
    for op in Operation::ALL {
        let body = sections.get(op.as_str()).unwrap_or_else(|| {
            panic!("{op} has no `## {op}` section in crates/api/OPERATIONS.md; review it there")
        });
        for item in [
            "- Route:",
            "- Request",
            "- Response",
            "- Does:",
            "- Who:",
            "- Mutation:",
            "- Why it cannot reach customer content:",
        ] {
            assert!(body.contains(item), "section {op} lacks `{item}`");
        }
        let mutation = if op.is_mutation() {
            "- Mutation: yes"
        } else {
            "- Mutation: no"
        };
        assert!(
            body.contains(mutation),
            "section {op} must say `{mutation}`"
        );
    }
    for heading in sections.keys() {
        assert!(
            names.contains(heading.as_str()),
            "OPERATIONS.md has a section `## {heading}` that is not an Operation"
        );
    }
}

#[test]
fn every_route_is_reviewed_and_in_the_document_and_nothing_else_is() {
    let sections = sections();
    let doc = openapi::document();
    let mut expected = BTreeSet::new();
    for route in ROUTES {
        let op = route.operation;
        let body = &sections[op.as_str()];
        let named = format!("`{} {}`", route.method, route.path);
        assert!(
            body.contains(&named),
            "section {op} of OPERATIONS.md does not name its route {named}"
        );
        let method = route.method.to_ascii_lowercase();
        let operation = doc["paths"][route.path][&method].clone();
        assert_eq!(
            operation["operationId"],
            op.as_str(),
            "{} {} in the document",
            route.method,
            route.path
        );
        assert_eq!(operation["x-nitrile-mutation"], op.is_mutation());
        expected.insert((route.path.to_owned(), method));
    }
    let mut found = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for key in item.as_object().expect("path item").keys() {
            if key != "parameters" {
                found.insert((path.clone(), key.clone()));
            }
        }
    }
    assert_eq!(
        found, expected,
        "the document's operations are exactly ROUTES"
    );
    let served: BTreeSet<Operation> = ROUTES.iter().map(|r| r.operation).collect();
    for op in Operation::ALL {
        if !served.contains(&op) {
            assert!(
                sections[op.as_str()].contains("not served by hostd"),
                "{op} has no route: its section must say it is not served by hostd"
            );
        }
    }
}

#[test]
fn operation_ids_are_unique_and_every_call_needs_both_security_schemes() {
    let doc = openapi::document();
    let mut ids = BTreeSet::new();
    for item in doc["paths"].as_object().expect("paths").values() {
        for (key, op) in item.as_object().expect("path item") {
            if key == "parameters" {
                continue;
            }
            assert!(ids.insert(op["operationId"].as_str().expect("operationId").to_owned()));
            assert!(op.get("security").is_none(), "no route overrides security");
            for status in ["400", "401", "403", "404", "405", "413", "500", "503"] {
                let r = op["responses"][status]["$ref"].as_str().expect("a refusal");
                let name = r.rsplit('/').next().expect("a name");
                assert_eq!(
                    doc["components"]["responses"][name]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/Refusal"
                );
            }
        }
    }
    assert_eq!(
        doc["security"],
        serde_json::json!([{ "mutualTLS": [], "bearerToken": [] }])
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["mutualTLS"]["type"],
        "mutualTLS"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerToken"]["scheme"],
        "bearer"
    );
}

#[test]
fn closed_types_are_closed_in_the_document() {
    let doc = openapi::document();
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in [
        "LaunchRequest",
        "VolumeCreateRequest",
        "VolumeAttachRequest",
        "VolumeDescription",
        "VolumeList",
        "AttachedVolume",
        "HostDescription",
        "InstanceDescription",
        "InstanceList",
        "Refusal",
    ] {
        assert_eq!(
            schemas[name]["additionalProperties"], false,
            "{name} denies unknown fields, so its schema must too"
        );
    }
    assert_eq!(schemas["Sha256Hex"]["pattern"], "^[0-9a-f]{64}$");
    assert_eq!(schemas["Name"]["maxLength"], nitrile_api::MAX_NAME_LEN);
}

#[test]
fn every_response_is_metadata_only() {
    let doc = openapi::document();
    let proof = openapi::metadata_only(&doc).unwrap_or_else(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        panic!(
            "responses that can carry more than metadata:\n{}",
            lines.join("\n")
        )
    });
    let responses: usize = doc["paths"]
        .as_object()
        .expect("paths")
        .values()
        .flat_map(|item| item.as_object().expect("path item").iter())
        .filter(|(k, _)| *k != "parameters")
        .map(|(_, op)| op["responses"].as_object().expect("responses").len())
        .sum();
    assert_eq!(proof.responses, responses);
    assert!(
        proof.schemas >= 10,
        "the walk reached {} schemas",
        proof.schemas
    );
    let schemas = &doc["components"]["schemas"];
    for (name, field) in [("InstanceDescription", "reason"), ("Refusal", "reason")] {
        assert_eq!(
            schemas[name]["properties"][field]["maxLength"], MAX_REASON_LEN,
            "{name}.{field} is bounded at MAX_REASON_LEN"
        );
    }
}

#[test]
fn a_console_field_in_a_response_is_refused() {
    // What a change that leaks guest output would look like: the checker must
    // refuse it in the real document.
    let mut doc = openapi::document();
    doc["components"]["schemas"]["InstanceDescription"]["properties"]["console"] =
        serde_json::json!({ "type": "string", "contentEncoding": "base64", "maxLength": 4096 });
    doc["components"]["schemas"]["Capacity"]["properties"]["memory_dump"] =
        serde_json::json!({ "type": "array", "items": { "type": "integer", "format": "uint8" } });
    let errors = openapi::metadata_only(&doc).expect_err("the leak is found");
    assert!(
        errors.iter().any(
            |e| matches!(e, SchemaError::EncodedContent { at, .. } if at.ends_with("/console"))
        )
    );
    assert!(
        errors
            .iter()
            .any(|e| matches!(e, SchemaError::NumberArray { at } if at.ends_with("/memory_dump")))
    );
    let _: Value = doc;
}
