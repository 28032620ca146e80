//! Loading: the sample bundle loads; every kind of mistake is refused with
//! the file and line that hold it.

mod common;

use std::fs;

use common::*;
use nitrile_policy::{Bundle, PolicyError};

fn load_err(dir: &std::path::Path) -> (PolicyError, String) {
    let e = Bundle::load(dir).expect_err("bundle should be refused");
    let s = e.to_string();
    (e, s)
}

#[test]
fn sample_bundle_loads() {
    let e = Bundle::load(&sample_dir()).unwrap();
    let s = e.summary();
    let groups: Vec<_> = s.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(
        groups,
        ["auditor", "customers", "deployer", "oncall", "placement"]
    );
    assert_eq!(s.principals, 7);
    assert_eq!(s.quotas, 6);
    assert_eq!(s.policies, 33);
    assert_eq!(
        e.groups_of(&principal("operator/alice")),
        vec![name("oncall")]
    );
    assert!(e.reviewers().is_empty());
}

#[test]
fn policy_syntax_error_names_file_line_and_column() {
    let dir = sample_copy();
    edit(
        dir.path(),
        "deployer.cedar",
        "resource in Nitrile",
        "resource inn Nitrile",
    );
    let (e, s) = load_err(dir.path());
    assert!(matches!(e, PolicyError::PolicySyntax { .. }), "{e:?}");
    assert!(s.starts_with("deployer.cedar:7:"), "{s}");
}

#[test]
fn policy_failing_strict_validation_names_file_line() {
    let dir = sample_copy();
    // The context has no attribute `nope`: strict validation refuses.
    edit(
        dir.path(),
        "auditor.cedar",
        "resource == Nitrile::Log::\"local\"\n);",
        "resource == Nitrile::Log::\"local\"\n)\nwhen {\n  context.host.nope == 1\n};",
    );
    let (e, s) = load_err(dir.path());
    assert!(matches!(e, PolicyError::Validation { .. }), "{e:?}: {s}");
    assert!(s.starts_with("auditor.cedar:10:"), "{s}");
    assert!(s.contains("auditor-read-log"), "{s}");
}

#[test]
fn policy_with_unknown_entity_type_names_file_line() {
    let dir = sample_copy();
    edit(
        dir.path(),
        "deployer.cedar",
        "resource in Nitrile::ResourceSet::\"fleet\"",
        "resource in Nitrile::Rack::\"fleet\"",
    );
    let (e, s) = load_err(dir.path());
    assert!(matches!(e, PolicyError::Validation { .. }), "{e:?}: {s}");
    assert!(s.starts_with("deployer.cedar:7:"), "{s}");
}

#[test]
fn entity_of_unknown_type_names_file_line() {
    let dir = sample_copy();
    edit(
        dir.path(),
        "hosts.entities.json",
        "{\"type\": \"Nitrile::Host\", \"id\": \"h2\"}",
        "{\"type\": \"Nitrile::Robot\", \"id\": \"h2\"}",
    );
    let (e, s) = load_err(dir.path());
    assert!(matches!(e, PolicyError::Entity { .. }), "{e:?}: {s}");
    assert!(s.starts_with("hosts.entities.json:6:"), "{s}");
}

#[test]
fn json_syntax_error_names_file_line() {
    let dir = sample_copy();
    edit(
        dir.path(),
        "groups.json",
        "\"id\": \"bob\"}",
        "\"id\": \"bob\"",
    );
    let (e, s) = load_err(dir.path());
    assert!(matches!(e, PolicyError::Json { .. }), "{e:?}: {s}");
    // serde_json reports the line where it noticed the missing brace.
    assert!(s.starts_with("groups.json:11:"), "{s}");
}

#[test]
fn undeclared_parent_and_group_are_refused() {
    let dir = sample_copy();
    edit(
        dir.path(),
        "groups.json",
        "\"id\": \"oncall\"}]}",
        "\"id\": \"on-call\"}]}",
    );
    let (e, s) = load_err(dir.path());
    assert!(
        matches!(e, PolicyError::UndeclaredParent { .. }),
        "{e:?}: {s}"
    );
    assert!(s.starts_with("groups.json:7:"), "{s}");

    let dir = sample_copy();
    edit(
        dir.path(),
        "deployer.cedar",
        "Group::\"deployer\"",
        "Group::\"deployers\"",
    );
    let (e, s) = load_err(dir.path());
    assert!(
        matches!(e, PolicyError::UndeclaredEntity { .. }),
        "{e:?}: {s}"
    );
    assert!(s.starts_with("deployer.cedar:3:"), "{s}");
}

#[test]
fn bad_quotas_name_file_line() {
    let cases = [
        ("group = \"deployer\"", "group = \"deployers\"", 19),
        (
            "operation = \"host.update\"",
            "operation = \"host.shell\"",
            20,
        ),
        ("max_resources = 50", "max_resources = 0", 21),
        (
            "window = \"1h\"\n\n[[quota]]\ngroup = \"deployer\"",
            "window = \"0h\"\n\n[[quota]]\ngroup = \"deployer\"",
            16,
        ),
        ("max_resources = 50", "max_resources = 50\nextra = 1", 22),
        (
            "operation = \"customer-instance.run\"\nmax_resources = 8\nwindow = \"1h\"\nper = \"principal\"",
            "operation = \"customer-instance.run\"\nmax_resources = 8\nwindow = \"1h\"\nper = \"customer\"",
            29,
        ),
    ];
    for (from, to, line) in cases {
        let dir = sample_copy();
        edit(dir.path(), "quotas.toml", from, to);
        let (e, s) = load_err(dir.path());
        assert!(
            matches!(
                e,
                PolicyError::Quota { .. } | PolicyError::QuotaSyntax { .. }
            ),
            "{e:?}: {s}"
        );
        assert!(s.starts_with(&format!("quotas.toml:{line}:")), "{to}: {s}");
    }
    // A second quota for the same (group, operation).
    let dir = sample_copy();
    edit(
        dir.path(),
        "quotas.toml",
        "operation = \"host.undrain\"",
        "operation = \"host.drain\"",
    );
    let (e, s) = load_err(dir.path());
    assert!(matches!(e, PolicyError::Quota { .. }), "{e:?}: {s}");
    assert!(s.starts_with("quotas.toml:12:"), "{s}");
}

#[test]
fn unknown_files_links_and_schema_changes_are_refused() {
    let dir = sample_copy();
    fs::write(dir.path().join("README.md"), "notes").unwrap();
    let (e, s) = load_err(dir.path());
    assert!(matches!(e, PolicyError::UnknownFile { .. }), "{s}");
    assert!(s.starts_with("README.md:"), "{s}");

    let dir = sample_copy();
    fs::create_dir(dir.path().join("extra")).unwrap();
    assert!(matches!(
        load_err(dir.path()).0,
        PolicyError::NotARegularFile { .. }
    ));

    let dir = sample_copy();
    std::os::unix::fs::symlink("oncall.cedar", dir.path().join("more.cedar")).unwrap();
    assert!(matches!(
        load_err(dir.path()).0,
        PolicyError::NotARegularFile { .. }
    ));

    let dir = sample_copy();
    edit(
        dir.path(),
        "schema.cedarschema",
        "entity Volume in [Customer];",
        "entity Volume in [Customer] { secret: String };",
    );
    let (e, s) = load_err(dir.path());
    assert!(matches!(e, PolicyError::SchemaMismatch { .. }), "{s}");
    assert!(s.starts_with("schema.cedarschema:21"), "{s}");

    let dir = sample_copy();
    fs::remove_file(dir.path().join("schema.cedarschema")).unwrap();
    assert!(matches!(load_err(dir.path()).0, PolicyError::MissingSchema));
}

#[test]
fn oversize_files_and_templates_and_duplicate_ids_are_refused() {
    let dir = sample_copy();
    let big = "// x\n".repeat((nitrile_policy::MAX_BUNDLE_FILE_SIZE as usize) / 5 + 1);
    fs::write(dir.path().join("big.cedar"), big).unwrap();
    assert!(matches!(
        load_err(dir.path()).0,
        PolicyError::FileTooLarge { .. }
    ));

    let dir = sample_copy();
    fs::write(
        dir.path().join("t.cedar"),
        "\n\npermit(principal == ?principal, action, resource);\n",
    )
    .unwrap();
    let (e, s) = load_err(dir.path());
    assert!(matches!(e, PolicyError::Template { .. }), "{s}");
    assert!(s.starts_with("t.cedar:3:"), "{s}");

    let dir = sample_copy();
    edit(
        dir.path(),
        "deployer.cedar",
        "@id(\"deployer-update\")",
        "@id(\"oncall-drain\")",
    );
    let (e, s) = load_err(dir.path());
    assert!(matches!(e, PolicyError::DuplicatePolicyId { .. }), "{s}");
    assert!(
        s.starts_with("oncall.cedar:") || s.starts_with("deployer.cedar:"),
        "{s}"
    );
}

#[test]
fn listed_instances_and_bad_entity_ids_are_refused() {
    let dir = sample_copy();
    edit(
        dir.path(),
        "hosts.entities.json",
        "\"Nitrile::Log\", \"id\": \"local\"",
        "\"Nitrile::Instance\", \"id\": \"i-1\"",
    );
    let (e, s) = load_err(dir.path());
    assert!(matches!(e, PolicyError::UnlistedKind { .. }), "{e:?}: {s}");
    assert!(s.starts_with("hosts.entities.json:9:"), "{s}");

    let dir = sample_copy();
    edit(
        dir.path(),
        "groups.json",
        "\"id\": \"carol\"",
        "\"id\": \"Carol\"",
    );
    let (e, s) = load_err(dir.path());
    assert!(matches!(e, PolicyError::BadEntityId { .. }), "{e:?}: {s}");
    assert!(s.starts_with("groups.json:15:"), "{s}");
}
