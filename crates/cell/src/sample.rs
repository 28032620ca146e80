//! The sample entitlement bundle of a one-machine cell, built into the
//! binary from the repository's `entitlements/` directory: its serial, the
//! entitlements, and the monitor rules the cell's audit log service runs.

/// `(relative path, contents)` of every file of the sample bundle (a test
/// fails when they differ from the repository's `entitlements/`).
pub const SAMPLE_BUNDLE: &[(&str, &str)] = &[
    (
        "bundle.toml",
        include_str!("../../../entitlements/bundle.toml"),
    ),
    (
        "schema.cedarschema",
        include_str!("../../../entitlements/schema.cedarschema"),
    ),
    (
        "groups.json",
        include_str!("../../../entitlements/groups.json"),
    ),
    (
        "hosts.entities.json",
        include_str!("../../../entitlements/hosts.entities.json"),
    ),
    (
        "guardrails.cedar",
        include_str!("../../../entitlements/guardrails.cedar"),
    ),
    (
        "oncall.cedar",
        include_str!("../../../entitlements/oncall.cedar"),
    ),
    (
        "placement.cedar",
        include_str!("../../../entitlements/placement.cedar"),
    ),
    (
        "deployer.cedar",
        include_str!("../../../entitlements/deployer.cedar"),
    ),
    (
        "auditor.cedar",
        include_str!("../../../entitlements/auditor.cedar"),
    ),
    (
        "customers.cedar",
        include_str!("../../../entitlements/customers.cedar"),
    ),
    (
        "quotas.toml",
        include_str!("../../../entitlements/quotas.toml"),
    ),
    (
        "rules/journal-integrity.yml",
        include_str!("../../../entitlements/rules/journal-integrity.yml"),
    ),
    (
        "rules/many-hosts.yml",
        include_str!("../../../entitlements/rules/many-hosts.yml"),
    ),
    (
        "rules/refusal-burst.yml",
        include_str!("../../../entitlements/rules/refusal-burst.yml"),
    ),
    (
        "rules/replayed-token.yml",
        include_str!("../../../entitlements/rules/replayed-token.yml"),
    ),
    (
        "rules/sensitive-operation.yml",
        include_str!("../../../entitlements/rules/sensitive-operation.yml"),
    ),
];

/// The cell name the sample bundle is written for (its audit log resource is
/// `log/local`).
pub const SAMPLE_CELL: &str = "local";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_bundle_is_the_repository_bundle() {
        fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<(String, String)>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    let rel = path
                        .strip_prefix(root)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_owned();
                    out.push((rel, std::fs::read_to_string(&path).unwrap()));
                }
            }
        }
        let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../entitlements"));
        let mut on_disk = Vec::new();
        walk(root, root, &mut on_disk);
        on_disk.sort();
        let mut built_in: Vec<(String, String)> = SAMPLE_BUNDLE
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect();
        built_in.sort();
        assert_eq!(built_in, on_disk);
    }
}
