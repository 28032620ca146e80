//! Where everything of a cell lives under its state directory.

use std::path::{Path, PathBuf};

use nitrile_api::{Name, PrincipalId};

/// The paths of a cell's state directory.
///
/// ```text
/// cell.toml                   cell name
/// pki/ca.pem, pki/ca.key      the cell CA (key 0600)
/// pki/<kind>-<name>.pem/.key  service and principal certificates
/// reviewers.toml              the cell's entitlement reviewer set (public)
/// reviewers/<name>.key/.pub   local reviewer keys of a one-machine cell
/// entitlements/               the signed entitlement bundle in force: bundle.toml
///                             (its serial), policies, quotas, rules/ (the audit
///                             log monitor's rules), signatures/
/// tokend/                     token service state (keys, journal, quotas,
///                             bundle-serial.json: the highest bundle loaded)
/// clients/<name>.toml         operator configs for the CLI
/// images/                     guest images hosts can launch (nitrile-image store)
/// hosts/<host>/               one host agent's state: hostd.toml, journal,
///                             issuer-keys.toml (pinned), metrics.prom, instances
/// logd/                       the audit log service: logd.toml, journal,
///                             issuer-keys.toml (pinned), log.key, log.vkey, log/,
///                             bundle-serial.json (the highest bundle its
///                             monitor loaded rules from)
/// witness/                    the log's witness: witness.toml, cosigner.skey,
///                             logs/ (the checkpoint it last cosigned), split-views/
/// kms/                        the key service: kms.toml, journal, issuer-keys.toml
///                             (pinned), log-anchor.json, store/ (its keys and
///                             volume key records)
/// ```
#[derive(Debug, Clone)]
pub struct CellLayout {
    root: PathBuf,
}

impl CellLayout {
    /// The layout under `root` (made absolute against the current directory).
    pub fn new(root: &Path) -> Self {
        let root = if root.is_absolute() {
            root.to_owned()
        } else {
            std::env::current_dir()
                .map(|d| d.join(root))
                .unwrap_or_else(|_| root.to_owned())
        };
        Self { root }
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `cell.toml`.
    pub fn cell_file(&self) -> PathBuf {
        self.root.join("cell.toml")
    }

    /// The CA directory (`ca.pem`, `ca.key`).
    pub fn pki_dir(&self) -> PathBuf {
        self.root.join("pki")
    }

    /// The CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.pki_dir().join("ca.pem")
    }

    /// Certificate and key of a principal.
    pub fn cert_and_key(&self, principal: &PrincipalId) -> (PathBuf, PathBuf) {
        let stem = format!("{}-{}", principal.kind, principal.name);
        (
            self.pki_dir().join(format!("{stem}.pem")),
            self.pki_dir().join(format!("{stem}.key")),
        )
    }

    /// The reviewer set.
    pub fn reviewers_file(&self) -> PathBuf {
        self.root.join("reviewers.toml")
    }

    /// Local reviewer keys.
    pub fn reviewer_keys_dir(&self) -> PathBuf {
        self.root.join("reviewers")
    }

    /// The entitlement bundle in force.
    pub fn entitlements_dir(&self) -> PathBuf {
        self.root.join("entitlements")
    }

    /// Token service state.
    pub fn tokend_dir(&self) -> PathBuf {
        self.root.join("tokend")
    }

    /// The token service's journal.
    pub fn tokend_journal(&self) -> PathBuf {
        self.tokend_dir().join("journal")
    }

    /// The token service's published issuer keys.
    pub fn issuer_keys_file(&self) -> PathBuf {
        self.tokend_dir().join("issuer-keys.toml")
    }

    /// Operator configs.
    pub fn clients_dir(&self) -> PathBuf {
        self.root.join("clients")
    }

    /// The store of launchable guest images.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Where the host agents of a one-machine cell keep their state.
    pub fn hosts_dir(&self) -> PathBuf {
        self.root.join("hosts")
    }

    /// The state directory of host `host`.
    pub fn host_dir(&self, host: &Name) -> PathBuf {
        self.hosts_dir().join(host.as_str())
    }

    /// The host agent config of host `host`.
    pub fn hostd_config(&self, host: &Name) -> PathBuf {
        self.host_dir(host).join("hostd.toml")
    }

    /// The write-ahead journal of host `host`.
    pub fn host_journal(&self, host: &Name) -> PathBuf {
        self.host_dir(host).join("journal")
    }

    /// The token issuer keys host `host` pins.
    pub fn host_issuer_keys(&self, host: &Name) -> PathBuf {
        self.host_dir(host).join("issuer-keys.toml")
    }

    /// The Prometheus text file host `host` writes its metrics to.
    pub fn host_metrics(&self, host: &Name) -> PathBuf {
        self.host_dir(host).join("metrics.prom")
    }

    /// Where the audit log service's monitor rules were kept before they
    /// became part of the signed entitlement bundle (`entitlements/rules/`);
    /// [`crate::bootstrap`] moves them into the bundle once.
    pub fn rules_dir(&self) -> PathBuf {
        self.root.join("rules")
    }

    /// The audit log service's state directory.
    pub fn logd_dir(&self) -> PathBuf {
        self.root.join("logd")
    }

    /// The audit log service's config file.
    pub fn logd_config(&self) -> PathBuf {
        self.logd_dir().join("logd.toml")
    }

    /// The token issuer keys the audit log service pins.
    pub fn logd_issuer_keys(&self) -> PathBuf {
        self.logd_dir().join("issuer-keys.toml")
    }

    /// The audit log's public verifier key (written by logd).
    pub fn log_vkey(&self) -> PathBuf {
        self.logd_dir().join("log.vkey")
    }

    /// The audit log's tiles and checkpoints.
    pub fn log_store(&self) -> PathBuf {
        self.logd_dir().join("log")
    }

    /// The state directory of the cell's checkpoint witness.
    pub fn witness_dir(&self) -> PathBuf {
        self.root.join("witness")
    }

    /// The witness's config file.
    pub fn witness_config(&self) -> PathBuf {
        self.witness_dir().join("witness.toml")
    }

    /// The witness's cosigning key (owner-only).
    pub fn witness_signing_key(&self) -> PathBuf {
        self.witness_dir().join("cosigner.skey")
    }

    /// The key service's state directory.
    pub fn kms_dir(&self) -> PathBuf {
        self.root.join("kms")
    }

    /// The key service's config file.
    pub fn kms_config(&self) -> PathBuf {
        self.kms_dir().join("kms.toml")
    }

    /// The key service's write-ahead journal.
    pub fn kms_journal(&self) -> PathBuf {
        self.kms_dir().join("journal")
    }

    /// The token issuer keys the key service pins.
    pub fn kms_issuer_keys(&self) -> PathBuf {
        self.kms_dir().join("issuer-keys.toml")
    }

    /// The key service's keys and volume key records.
    pub fn kms_store(&self) -> PathBuf {
        self.kms_dir().join("store")
    }

    /// The placement service's state directory.
    pub fn placed_dir(&self) -> PathBuf {
        self.root.join("placed")
    }

    /// The deployment service's state directory.
    pub fn deployd_dir(&self) -> PathBuf {
        self.root.join("deployd")
    }

    /// The deployment service's config file.
    pub fn deployd_config(&self) -> PathBuf {
        self.deployd_dir().join("deployd.toml")
    }

    /// The token issuer keys the deployment service pins.
    pub fn deployd_issuer_keys(&self) -> PathBuf {
        self.deployd_dir().join("issuer-keys.toml")
    }

    /// The placement service's config file.
    pub fn placed_config(&self) -> PathBuf {
        self.placed_dir().join("placed.toml")
    }

    /// The placement service's write-ahead journal.
    pub fn placed_journal(&self) -> PathBuf {
        self.placed_dir().join("journal")
    }

    /// The token issuer keys the placement service pins.
    pub fn placed_issuer_keys(&self) -> PathBuf {
        self.placed_dir().join("issuer-keys.toml")
    }

    /// The operator config of a principal.
    pub fn client_config(&self, principal: &PrincipalId) -> PathBuf {
        self.clients_dir()
            .join(format!("{}-{}.toml", principal.kind, principal.name))
    }
}
