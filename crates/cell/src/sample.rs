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

/// The cell name the sample bundle is written for (its audit log resource is
/// `log/local`).
pub const SAMPLE_CELL: &str = "local";
