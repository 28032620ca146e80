//! No service crate depends on another service crate. Each service (hostd,
//! logd, tokend, the witness, and those to come) is a process and a trust
//! domain of its own: what they share is in library crates (this one, the
//! log client, token, pki, ...), never in one another. The service crates
//! are named once, in the workspace manifest
//! (`[workspace.metadata.nitrile] service-crates`); this test reads that
//! list and every crate's dependencies from `cargo metadata`.
//!
//! Normal and build dependencies count, followed through the workspace's
//! library crates (a service that reaches another through a library
//! depends on it all the same). Dev-dependencies do not: a service's tests
//! may run another service for real (a token service to mint tokens for a
//! host, a witness for logd).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

/// `cargo metadata` of this workspace, without resolving anything outside.
fn workspace_metadata() -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// The service crates the workspace manifest names.
fn service_crates(metadata: &Value) -> Vec<String> {
    metadata["metadata"]["nitrile"]["service-crates"]
        .as_array()
        .expect("the workspace manifest names its service crates")
        .iter()
        .map(|v| v.as_str().expect("a crate name").to_owned())
        .collect()
}

/// Each workspace crate and the workspace crates it depends on through
/// normal and build dependencies.
fn dependency_graph(metadata: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let packages = metadata["packages"].as_array().expect("packages");
    let members: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().expect("a package name").to_owned())
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .filter_map(|d| d["name"].as_str())
                .filter(|name| members.contains(*name))
                .map(str::to_owned)
                .collect();
            (p["name"].as_str().unwrap_or_default().to_owned(), deps)
        })
        .collect()
}

/// Every way a service crate reaches another one, as the chain of crates
/// from the one to the other.
fn violations(metadata: &Value) -> Vec<Vec<String>> {
    let graph = dependency_graph(metadata);
    let services: BTreeSet<String> = service_crates(metadata).into_iter().collect();
    for s in &services {
        assert!(
            graph.contains_key(s),
            "the manifest names {s} as a service crate, but it is not in the workspace"
        );
    }
    let mut found = Vec::new();
    for service in &services {
        // Breadth first through library crates; a service reached ends
        // its chain.
        let mut seen = BTreeSet::from([service.clone()]);
        let mut queue = VecDeque::from([vec![service.clone()]]);
        while let Some(chain) = queue.pop_front() {
            let last = chain.last().expect("chains are never empty");
            for dep in &graph[last] {
                if !seen.insert(dep.clone()) {
                    continue;
                }
                let mut next = chain.clone();
                next.push(dep.clone());
                if services.contains(dep) {
                    found.push(next);
                } else {
                    queue.push_back(next);
                }
            }
        }
    }
    found
}

#[test]
fn no_service_crate_depends_on_another_service_crate() {
    let metadata = workspace_metadata();
    let services = service_crates(&metadata);
    for s in [
        "nitrile-hostd",
        "nitrile-logd",
        "nitrile-tokend",
        "nitrile-witness",
    ] {
        assert!(services.iter().any(|n| n == s), "{s} is not listed");
    }
    let found = violations(&metadata);
    assert!(
        found.is_empty(),
        "service crates depend on other service crates:\n{}",
        found
            .iter()
            .map(|chain| chain.join(" -> "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A dependency of a synthetic crate: its name and kind (`None` is normal).
type Dep<'a> = (&'a str, Option<&'a str>);

/// A workspace of `packages` (name, dependencies) whose manifest names
/// `services`, as `cargo metadata` prints it.
fn synthetic(services: &[&str], packages: &[(&str, &[Dep<'_>])]) -> Value {
    json!({
        "packages": packages.iter().map(|(name, deps)| json!({
            "name": name,
            "dependencies": deps.iter().map(|(d, kind)| json!({"name": d, "kind": kind}))
                .collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "metadata": {"nitrile": {"service-crates": services}},
    })
}

#[test]
fn a_service_reaching_another_directly_or_through_a_library_is_caught() {
    let services = ["hostd", "logd", "tokend"];
    let direct = synthetic(
        &services,
        &[
            ("hostd", &[("gate", None), ("tokend", None)]),
            ("logd", &[("gate", None)]),
            ("tokend", &[("gate", None)]),
            ("gate", &[("serde", None)]),
        ],
    );
    assert_eq!(violations(&direct), vec![vec!["hostd", "tokend"]]);
    let through_a_library = synthetic(
        &services,
        &[
            ("hostd", &[]),
            ("logd", &[("gate", None)]),
            ("tokend", &[]),
            ("gate", &[("util", None)]),
            ("util", &[("hostd", Some("build"))]),
        ],
    );
    assert_eq!(
        violations(&through_a_library),
        vec![vec!["logd", "gate", "util", "hostd"]]
    );
}

#[test]
fn tests_may_run_other_services_and_unknown_names_are_refused() {
    let dev_only = synthetic(
        &["hostd", "tokend"],
        &[("hostd", &[("tokend", Some("dev"))]), ("tokend", &[])],
    );
    assert!(violations(&dev_only).is_empty());
    let typo = synthetic(&["hostd", "tokn"], &[("hostd", &[]), ("tokend", &[])]);
    assert!(std::panic::catch_unwind(|| violations(&typo)).is_err());
}

/// The dependency table of docs/ARCHITECTURE.md ("Who depends on whom"):
/// each row's crates (without `nitrile-`) and the crates they use.
fn architecture_table(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let start = text
        .find("| crate | uses (nitrile crates, normal dependencies) |")
        .expect("docs/ARCHITECTURE.md has the dependency table");
    let mut table = BTreeMap::new();
    for line in text[start..].lines().skip(2) {
        let Some(row) = line.strip_prefix('|') else {
            break;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(cells.len() >= 2, "a table row without two cells: {line}");
        // The uses cell may end with a remark in parentheses.
        let uses_cell = cells[1].split(" (").next().unwrap_or_default();
        let uses: BTreeSet<String> = if uses_cell == "none" {
            BTreeSet::new()
        } else {
            uses_cell.split(", ").map(|s| s.trim().to_owned()).collect()
        };
        for name in cells[0].split(", ") {
            let name = name.trim().trim_matches('`').to_owned();
            assert!(
                table.insert(name.clone(), uses.clone()).is_none(),
                "{name} has two rows"
            );
        }
    }
    table
}

#[test]
fn the_architecture_table_is_the_dependency_graph() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let documented = architecture_table(&text);
    let short = |name: &str| name.strip_prefix("nitrile-").unwrap_or(name).to_owned();
    let actual: BTreeMap<String, BTreeSet<String>> = dependency_graph(&workspace_metadata())
        .into_iter()
        // The fuzz crate and other tools outside the product are not drawn.
        .filter(|(name, _)| name.starts_with("nitrile-"))
        .map(|(name, deps)| (short(&name), deps.iter().map(|d| short(d)).collect()))
        .collect();
    let mut differences = Vec::new();
    for name in documented
        .keys()
        .chain(actual.keys())
        .collect::<BTreeSet<_>>()
    {
        let (doc, real) = (documented.get(name), actual.get(name));
        if doc != real {
            differences.push(format!(
                "{name}: docs say {doc:?}, cargo metadata says {real:?}"
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "docs/ARCHITECTURE.md's dependency table is out of date:\n{}",
        differences.join("\n")
    );
}

#[test]
fn the_architecture_table_parser_reads_shared_rows_and_remarks() {
    let text = "x\n| crate | uses (nitrile crates, normal dependencies) |\n|---|---|\n\
                | `a`, `b` | none |\n| `c` | a, b (b only to run it) |\n\nafter\n";
    let table = architecture_table(text);
    assert_eq!(table.len(), 3);
    assert!(table["a"].is_empty() && table["b"].is_empty());
    assert_eq!(table["c"], BTreeSet::from(["a".to_owned(), "b".to_owned()]));
}
