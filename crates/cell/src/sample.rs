//! The sample entitlement bundle of a one-machine cell, built into the
//! binary from the repository's `entitlements/` directory.

/// `(file name, contents)` of every file of the sample bundle.
pub const SAMPLE_BUNDLE: &[(&str, &str)] = &[
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
        "quotas.toml",
        include_str!("../../../entitlements/quotas.toml"),
    ),
];

/// `(file name, contents)` of the monitor rules a one-machine cell's audit
/// log service runs, built into the binary from the repository's `rules/`
/// directory (a test fails when the two differ).
pub const SAMPLE_RULES: &[(&str, &str)] = &[
    (
        "journal-integrity.yml",
        include_str!("../../../rules/journal-integrity.yml"),
    ),
    (
        "many-hosts.yml",
        include_str!("../../../rules/many-hosts.yml"),
    ),
    (
        "refusal-burst.yml",
        include_str!("../../../rules/refusal-burst.yml"),
    ),
    (
        "replayed-token.yml",
        include_str!("../../../rules/replayed-token.yml"),
    ),
    (
        "sensitive-operation.yml",
        include_str!("../../../rules/sensitive-operation.yml"),
    ),
];

/// The cell name the sample bundle is written for (its audit log resource is
/// `log/local`).
pub const SAMPLE_CELL: &str = "local";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_rules_are_the_repository_rules() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../rules");
        let mut on_disk: Vec<(String, String)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap();
                (p.file_name().unwrap().to_str().unwrap().to_owned(), text)
            })
            .collect();
        on_disk.sort();
        let mut built_in: Vec<(String, String)> = SAMPLE_RULES
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect();
        built_in.sort();
        assert_eq!(built_in, on_disk);
    }
}
