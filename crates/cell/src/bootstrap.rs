//! Bringing a one-machine cell into being, idempotently.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nitrile_api::{Name, PrincipalId, PrincipalKind};
use nitrile_pki::{CellCa, PkiError};
use nitrile_policy::{
    MANIFEST_FILE, PolicyError, ReviewError, ReviewerKey, ReviewerSet, verify_bundle,
    verify_unserialed_bundle,
};
use time::OffsetDateTime;

use crate::config::{ClientConfig, ConfigError, Endpoints};
use crate::layout::CellLayout;
use crate::sample::SAMPLE_BUNDLE;

/// The sample principals a one-machine cell gets certificates and client
/// configs for, as `kind/name`.
pub const SAMPLE_PRINCIPALS: &[&str] = &[
    "operator/alice",
    "operator/bob",
    "service/placement",
    "service/deployer",
    "auditor/carol",
    "customer/acme",
    "customer/globex",
];

/// The service name of the checkpoint witness of a one-machine cell: its
/// principal is `nitrile://<cell>/service/witness`.
pub const WITNESS: &str = "witness";

/// The service name of the key service: its principal is
/// `nitrile://<cell>/service/kms`.
pub const KMS: &str = "kms";

/// The local reviewers of a one-machine cell.
const LOCAL_REVIEWERS: [&str; 2] = ["reviewer-1", "reviewer-2"];

/// Why a cell could not be brought up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CellError {
    /// a file or directory of the state could not be read or written
    #[error("{}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// the state directory belongs to another cell
    #[error(
        "{} belongs to cell {found:?}, not {wanted:?}; pass --state with another directory",
        path.display()
    )]
    OtherCell {
        /// `cell.toml`.
        path: PathBuf,
        /// The cell found.
        found: String,
        /// The cell asked for.
        wanted: String,
    },
    /// certificates could not be made
    #[error("cell PKI")]
    Pki(#[from] PkiError),
    /// reviewer keys or the reviewer set could not be made
    #[error("entitlement reviewers")]
    Review(#[from] ReviewError),
    /// the entitlement bundle in the state is not valid or not reviewed
    #[error(
        "the entitlement bundle {} is not accepted; after changing it, have two reviewers sign \
         it with `nitrile entitlements sign`",
        path.display()
    )]
    Entitlements {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<PolicyError>,
    },
    /// a client config could not be written
    #[error("client config")]
    Config(#[from] ConfigError),
}

/// What [`bootstrap`] made or found.
#[derive(Debug)]
pub struct Bootstrapped {
    /// The cell.
    pub cell: Name,
    /// The state layout.
    pub layout: CellLayout,
    /// Whether the CA was created now (first start).
    pub first_start: bool,
    /// Hex digest of the entitlement bundle in force.
    pub bundle_digest: String,
    /// Serial of the entitlement bundle in force.
    pub bundle_serial: u64,
    /// Whether a bundle of the format before serials was migrated now
    /// (`bundle.toml` added, the monitor rules moved in, signed again).
    pub bundle_migrated: bool,
    /// The reviewers whose signatures the bundle carries.
    pub reviewers: Vec<Name>,
    /// The token service principal.
    pub tokend: PrincipalId,
    /// Client configs written, per principal.
    pub clients: Vec<(PrincipalId, PathBuf)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CellError + '_ {
    move |source| CellError::Io {
        path: path.to_owned(),
        source,
    }
}

fn principal(cell: &Name, kind_name: &str) -> PrincipalId {
    PrincipalId::parse(&format!("nitrile://{cell}/{kind_name}"))
        .unwrap_or_else(|_| unreachable!("sample principals are valid names"))
}

/// Creates what is missing of a one-machine cell under `layout` and renews
/// its short-lived certificates; `tokend_addr` goes into the client configs.
pub fn bootstrap(
    layout: &CellLayout,
    cell: &Name,
    tokend_addr: &str,
    now: OffsetDateTime,
) -> Result<Bootstrapped, CellError> {
    let root = layout.root();
    std::fs::create_dir_all(root).map_err(io(root))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).map_err(io(root))?;

    let cell_file = layout.cell_file();
    let first_start = match std::fs::read_to_string(&cell_file) {
        Ok(text) => {
            let found = text
                .lines()
                .find_map(|l| l.strip_prefix("cell = "))
                .map(|v| v.trim().trim_matches('"').to_owned())
                .unwrap_or_default();
            if found != cell.as_str() {
                return Err(CellError::OtherCell {
                    path: cell_file,
                    found,
                    wanted: cell.to_string(),
                });
            }
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(
                &cell_file,
                format!("# nitrile cell state\ncell = \"{cell}\"\n"),
            )
            .map_err(io(&cell_file))?;
            true
        }
        Err(e) => return Err(io(&cell_file)(e)),
    };

    let ca = CellCa::init_or_load(&layout.pki_dir(), cell, now)?;

    // Reviewers: keys of a one-machine cell live here; the set is public.
    let keys_dir = layout.reviewer_keys_dir();
    std::fs::create_dir_all(&keys_dir).map_err(io(&keys_dir))?;
    std::fs::set_permissions(&keys_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(&keys_dir))?;
    let mut reviewer_keys = Vec::new();
    for name in LOCAL_REVIEWERS {
        let name = Name::new(name).unwrap_or_else(|_| unreachable!("valid reviewer name"));
        let prefix = keys_dir.join(name.as_str());
        let key_path = prefix.with_extension("key");
        let key = if key_path.exists() {
            ReviewerKey::load(&key_path, name)?
        } else {
            let key = ReviewerKey::generate(name);
            key.write(&prefix)?;
            key
        };
        reviewer_keys.push(key);
    }
    let mut set_text = String::from(
        "# Entitlement reviewers of this cell: a bundle needs signatures of two of them.\n",
    );
    for k in &reviewer_keys {
        set_text.push_str(&format!(
            "\n[[reviewer]]\nname = \"{}\"\npublic_key = \"{}\"\n",
            k.name(),
            k.public_key_base64()
        ));
    }
    let set_path = layout.reviewers_file();
    std::fs::write(&set_path, set_text).map_err(io(&set_path))?;
    let reviewers = ReviewerSet::load(&set_path)?;

    // The entitlement bundle: the sample, signed by both local reviewers, the
    // first time; afterwards whatever is there, which must be signed. A
    // bundle of the format before serials is migrated once.
    let bundle_dir = layout.entitlements_dir();
    let mut migrated = false;
    if !bundle_dir.exists() {
        std::fs::create_dir_all(&bundle_dir).map_err(io(&bundle_dir))?;
        for (name, text) in SAMPLE_BUNDLE {
            let path = bundle_dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&path, text).map_err(io(&path))?;
        }
        for k in &reviewer_keys {
            k.sign_dir(&bundle_dir)?;
        }
    } else if !bundle_dir.join(MANIFEST_FILE).exists() {
        migrate_unserialed_bundle(layout, &reviewers, &reviewer_keys)?;
        migrated = true;
    }
    let reviewed = verify_bundle(&bundle_dir, &reviewers, nitrile_policy::MIN_REVIEWERS).map_err(
        |source| CellError::Entitlements {
            path: bundle_dir.clone(),
            source: Box::new(source),
        },
    )?;

    // Fresh short-lived certificates on every start.
    let tokend = principal(cell, "service/tokend");
    let issue = |p: &PrincipalId| -> Result<(), CellError> {
        let issued = ca.issue(p, None, now)?;
        let (cert, key) = layout.cert_and_key(p);
        issued.write_files(&cert, &key)?;
        Ok(())
    };
    issue(&tokend)?;
    for kind_name in SAMPLE_PRINCIPALS {
        issue(&principal(cell, kind_name))?;
    }
    let endpoints = Endpoints {
        tokend: tokend_addr.to_owned(),
        logd: None,
        kms: None,
        placement: None,
        deployer: None,
    };
    let clients = write_client_configs(layout, cell, &endpoints, &BTreeMap::new(), None, &[])?;
    debug_assert!(clients.iter().all(|(p, _)| p.kind != PrincipalKind::Host));

    Ok(Bootstrapped {
        cell: cell.clone(),
        layout: layout.clone(),
        first_start,
        bundle_digest: reviewed.digest().to_hex(),
        bundle_serial: reviewed.serial().get(),
        bundle_migrated: migrated,
        reviewers: reviewed.reviewers().to_vec(),
        tokend,
        clients,
    })
}

/// Migrates the bundle of a cell made before bundles had serials and
/// before the monitor rules were part of them: only if its signatures verify
/// (an edit without review stays refused), it gets `bundle.toml` with serial
/// 1 and the rules the cell's audit log ran (`<state>/rules/*.yml`, or the
/// sample rules when there is no such directory) under `rules/`, and the
/// local reviewers sign the result. The rule files moved are removed from
/// `<state>/rules` (the directory too, once empty).
fn migrate_unserialed_bundle(
    layout: &CellLayout,
    reviewers: &ReviewerSet,
    reviewer_keys: &[ReviewerKey],
) -> Result<(), CellError> {
    let bundle_dir = layout.entitlements_dir();
    verify_unserialed_bundle(&bundle_dir, reviewers).map_err(|source| CellError::Entitlements {
        path: bundle_dir.clone(),
        source: Box::new(source),
    })?;
    let rules_dir = bundle_dir.join(nitrile_policy::RULES_DIR);
    std::fs::create_dir_all(&rules_dir).map_err(io(&rules_dir))?;
    let legacy = layout.rules_dir();
    let mut moved = Vec::new();
    if legacy.is_dir() {
        for entry in std::fs::read_dir(&legacy).map_err(io(&legacy))? {
            let path = entry.map_err(io(&legacy))?.path();
            let yaml = path.extension().is_some_and(|e| e == "yml" || e == "yaml");
            if yaml && path.is_file() {
                let name = path.file_name().unwrap_or_default();
                let text = std::fs::read(&path).map_err(io(&path))?;
                write_atomic(&rules_dir.join(name), &text, 0o644)?;
                moved.push(path);
            }
        }
    } else {
        for (name, text) in SAMPLE_BUNDLE {
            if let Some(rule) = name.strip_prefix("rules/") {
                write_atomic(&rules_dir.join(rule), text.as_bytes(), 0o644)?;
            }
        }
    }
    let manifest = bundle_dir.join(MANIFEST_FILE);
    write_atomic(
        &manifest,
        b"# The serial of this bundle: raise it with every change (see `nitrile entitlements`).\n\
          serial = 1\n",
        0o644,
    )?;
    for k in reviewer_keys {
        k.sign_dir(&bundle_dir)?;
    }
    for path in moved {
        std::fs::remove_file(&path).map_err(io(&path))?;
    }
    // Left in place if anything else is in it.
    let _ = std::fs::remove_dir(&legacy);
    Ok(())
}

/// Writes the client config of every sample principal, pointing at the
/// cell's services `endpoints`, at the hosts' admin API endpoints `hosts`
/// (host id -> `host:port`) and naming the audit log's verifier key
/// `log_vkey` and its witnesses' cosignature keys `witness_vkeys`;
/// rewritten once the real ports are known.
pub fn write_client_configs(
    layout: &CellLayout,
    cell: &Name,
    endpoints: &Endpoints,
    hosts: &BTreeMap<String, String>,
    log_vkey: Option<&str>,
    witness_vkeys: &[String],
) -> Result<Vec<(PrincipalId, PathBuf)>, CellError> {
    let root = layout.root();
    let rel = |path: &Path| PathBuf::from("..").join(path.strip_prefix(root).unwrap_or(path));
    let mut clients = Vec::new();
    for kind_name in SAMPLE_PRINCIPALS {
        let p = principal(cell, kind_name);
        let (cert, key) = layout.cert_and_key(&p);
        let config = ClientConfig {
            cell: cell.to_string(),
            principal: p.uri(),
            ca: rel(&layout.ca_cert()),
            cert: rel(&cert),
            key: rel(&key),
            log_vkey: log_vkey.map(str::to_owned),
            witness_vkeys: witness_vkeys.to_vec(),
            endpoints: endpoints.clone(),
            hosts: hosts.clone(),
        };
        let path = layout.client_config(&p);
        config.write(&path)?;
        clients.push((p, path));
    }
    Ok(clients)
}

/// A host of a one-machine cell, ready for its host agent to start.
#[derive(Debug, Clone)]
pub struct ProvisionedHost {
    /// The host's principal, `nitrile://<cell>/host/<host>`.
    pub principal: PrincipalId,
    /// Its state directory (owner-only).
    pub dir: PathBuf,
    /// Its certificate, issued by the cell CA.
    pub cert: PathBuf,
    /// Its private key (owner-only).
    pub key: PathBuf,
    /// The token issuer keys it pins.
    pub issuer_keys: PathBuf,
}

/// Gives host `host` of the cell under `layout` (after [`bootstrap`]) a
/// fresh short-lived certificate from the cell CA and an owner-only state
/// directory, and pins the token service's published issuer keys in it.
///
/// The issuer keys are copied when they differ from the pinned ones, so a
/// key rotated by `nitrile tokend rotate-key` reaches the host at the next
/// start; until then the host refuses tokens signed with the new key.
/// Fails with [`CellError::Io`] when the token service has not yet written
/// its keys (it does when it opens).
pub fn provision_host(
    layout: &CellLayout,
    cell: &Name,
    host: &Name,
    now: OffsetDateTime,
) -> Result<ProvisionedHost, CellError> {
    let ca = CellCa::load(&layout.pki_dir(), cell, now)?;
    let principal = PrincipalId::new(cell.clone(), PrincipalKind::Host, host.clone());
    let (cert, key) = layout.cert_and_key(&principal);
    ca.issue(&principal, None, now)?.write_files(&cert, &key)?;

    let dir = layout.host_dir(host);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;

    let published = layout.issuer_keys_file();
    let keys = std::fs::read(&published).map_err(io(&published))?;
    let issuer_keys = layout.host_issuer_keys(host);
    if std::fs::read(&issuer_keys).ok().as_deref() != Some(keys.as_slice()) {
        write_atomic(&issuer_keys, &keys, 0o644)?;
    }
    Ok(ProvisionedHost {
        principal,
        dir,
        cert,
        key,
        issuer_keys,
    })
}

/// The audit log service of a one-machine cell, ready to start.
#[derive(Debug, Clone)]
pub struct ProvisionedLogd {
    /// Its principal, `nitrile://<cell>/service/logd`.
    pub principal: PrincipalId,
    /// Its state directory (owner-only).
    pub dir: PathBuf,
    /// Its certificate, issued by the cell CA.
    pub cert: PathBuf,
    /// Its private key (owner-only).
    pub key: PathBuf,
    /// The token issuer keys it pins (auditors' read tokens are checked
    /// against them).
    pub issuer_keys: PathBuf,
}

/// Gives the audit log service of the cell under `layout` (after
/// [`bootstrap`], once the token service has written its issuer keys) a
/// fresh short-lived certificate for `service/logd`, an owner-only state
/// directory and the pinned token issuer keys, like [`provision_host`].
pub fn provision_logd(
    layout: &CellLayout,
    cell: &Name,
    now: OffsetDateTime,
) -> Result<ProvisionedLogd, CellError> {
    let ca = CellCa::load(&layout.pki_dir(), cell, now)?;
    let principal = principal(cell, "service/logd");
    let (cert, key) = layout.cert_and_key(&principal);
    ca.issue(&principal, None, now)?.write_files(&cert, &key)?;

    let dir = layout.logd_dir();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;

    let published = layout.issuer_keys_file();
    let keys = std::fs::read(&published).map_err(io(&published))?;
    let issuer_keys = layout.logd_issuer_keys();
    if std::fs::read(&issuer_keys).ok().as_deref() != Some(keys.as_slice()) {
        write_atomic(&issuer_keys, &keys, 0o644)?;
    }
    Ok(ProvisionedLogd {
        principal,
        dir,
        cert,
        key,
        issuer_keys,
    })
}

/// The key service of a one-machine cell, ready for its process to start.
#[derive(Debug, Clone)]
pub struct ProvisionedKms {
    /// Its principal, `nitrile://<cell>/service/kms`.
    pub principal: PrincipalId,
    /// Its state directory (owner-only): its journal and its keys.
    pub dir: PathBuf,
    /// Its certificate, issued by the cell CA.
    pub cert: PathBuf,
    /// Its private key (owner-only).
    pub key: PathBuf,
    /// The token issuer keys it pins (the tokens hosts relay and callers
    /// present are checked against them).
    pub issuer_keys: PathBuf,
}

/// Gives the key service of the cell under `layout` (after [`bootstrap`],
/// once the token service has written its issuer keys) a fresh short-lived
/// certificate for `service/kms`, an owner-only state directory and the
/// pinned token issuer keys, like [`provision_host`]. Its keys are the
/// key service's business, made in that directory.
pub fn provision_kms(
    layout: &CellLayout,
    cell: &Name,
    now: OffsetDateTime,
) -> Result<ProvisionedKms, CellError> {
    let ca = CellCa::load(&layout.pki_dir(), cell, now)?;
    let principal = principal(cell, &format!("service/{KMS}"));
    let (cert, key) = layout.cert_and_key(&principal);
    ca.issue(&principal, None, now)?.write_files(&cert, &key)?;

    let dir = layout.kms_dir();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;

    let published = layout.issuer_keys_file();
    let keys = std::fs::read(&published).map_err(io(&published))?;
    let issuer_keys = layout.kms_issuer_keys();
    if std::fs::read(&issuer_keys).ok().as_deref() != Some(keys.as_slice()) {
        write_atomic(&issuer_keys, &keys, 0o644)?;
    }
    Ok(ProvisionedKms {
        principal,
        dir,
        cert,
        key,
        issuer_keys,
    })
}

/// The service name of the placement service: its principal is
/// `nitrile://<cell>/service/placement`.
pub const PLACEMENT: &str = "placement";

/// The placement service of a one-machine cell, ready for its process to
/// start.
#[derive(Debug, Clone)]
pub struct ProvisionedPlaced {
    /// Its principal, `nitrile://<cell>/service/placement`.
    pub principal: PrincipalId,
    /// Its state directory (owner-only): its journal and placement record.
    pub dir: PathBuf,
    /// Its certificate, issued by the cell CA.
    pub cert: PathBuf,
    /// Its private key (owner-only).
    pub key: PathBuf,
    /// The token issuer keys it pins.
    pub issuer_keys: PathBuf,
}

/// Gives the placement service of the cell under `layout` (after
/// [`bootstrap`], once the token service has written its issuer keys) a
/// fresh short-lived certificate for `service/placement`, an owner-only
/// state directory and the pinned token issuer keys (its customers'
/// tokens are checked against them), like [`provision_kms`].
pub fn provision_placed(
    layout: &CellLayout,
    cell: &Name,
    now: OffsetDateTime,
) -> Result<ProvisionedPlaced, CellError> {
    provision_service(
        layout,
        cell,
        PLACEMENT,
        &layout.placed_dir(),
        &layout.placed_issuer_keys(),
        now,
    )
}

/// Gives the deployment service (`service/deployer`) of the cell under
/// `layout` a fresh certificate, an owner-only state directory and the
/// token issuer keys it pins, as [`provision_placed`] does for placement.
pub fn provision_deployd(
    layout: &CellLayout,
    cell: &Name,
    now: OffsetDateTime,
) -> Result<ProvisionedPlaced, CellError> {
    provision_service(
        layout,
        cell,
        "deployer",
        &layout.deployd_dir(),
        &layout.deployd_issuer_keys(),
        now,
    )
}

/// A service `service/<name>` that takes tokens: its certificate, its
/// owner-only state directory `dir`, and the token issuer keys it pins at
/// `issuer_keys` (copied when they changed).
fn provision_service(
    layout: &CellLayout,
    cell: &Name,
    name: &str,
    dir: &Path,
    issuer_keys: &Path,
    now: OffsetDateTime,
) -> Result<ProvisionedPlaced, CellError> {
    let ca = CellCa::load(&layout.pki_dir(), cell, now)?;
    let principal = principal(cell, &format!("service/{name}"));
    let (cert, key) = layout.cert_and_key(&principal);
    ca.issue(&principal, None, now)?.write_files(&cert, &key)?;

    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;

    let published = layout.issuer_keys_file();
    let keys = std::fs::read(&published).map_err(io(&published))?;
    if std::fs::read(issuer_keys).ok().as_deref() != Some(keys.as_slice()) {
        write_atomic(issuer_keys, &keys, 0o644)?;
    }
    Ok(ProvisionedPlaced {
        principal,
        dir: dir.to_owned(),
        cert,
        key,
        issuer_keys: issuer_keys.to_owned(),
    })
}

/// The checkpoint witness of a one-machine cell, ready for its process to
/// start.
#[derive(Debug, Clone)]
pub struct ProvisionedWitness {
    /// Its principal, `nitrile://<cell>/service/witness`.
    pub principal: PrincipalId,
    /// Its state directory (owner-only), apart from logd's.
    pub dir: PathBuf,
    /// Its certificate, issued by the cell CA.
    pub cert: PathBuf,
    /// Its private key (owner-only).
    pub key: PathBuf,
}

/// Gives the checkpoint witness of the cell under `layout` (after
/// [`bootstrap`]) a fresh short-lived certificate for `service/witness`
/// and an owner-only state directory of its own. Its cosigning key is the
/// witness's business (`nitrile_witness`), made once in that directory.
pub fn provision_witness(
    layout: &CellLayout,
    cell: &Name,
    now: OffsetDateTime,
) -> Result<ProvisionedWitness, CellError> {
    let ca = CellCa::load(&layout.pki_dir(), cell, now)?;
    let principal = principal(cell, &format!("service/{WITNESS}"));
    let (cert, key) = layout.cert_and_key(&principal);
    ca.issue(&principal, None, now)?.write_files(&cert, &key)?;
    let dir = layout.witness_dir();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
    Ok(ProvisionedWitness {
        principal,
        dir,
        cert,
        key,
    })
}

/// Writes `bytes` to `path` with `mode` by [`nitrile_fs::write_atomic`]: a
/// unique temporary file beside it, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CellError> {
    nitrile_fs::write_atomic(path, bytes, mode).map_err(|e| io(path)(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_is_idempotent_and_keeps_keys_private() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = Name::new("local").unwrap();
        let now = OffsetDateTime::now_utc();
        let first = bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap();
        assert!(first.first_start);
        assert_eq!(first.reviewers.len(), 2);
        assert_eq!(first.bundle_serial, 1);
        assert!(!first.bundle_migrated);
        // The monitor rules are in the signed bundle, not beside it.
        let rule = layout
            .entitlements_dir()
            .join("rules/sensitive-operation.yml");
        assert!(
            std::fs::read_to_string(&rule)
                .unwrap()
                .contains("host.drain")
        );
        assert!(!layout.rules_dir().exists());
        let second = bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap();
        assert!(!second.first_start);
        assert_eq!(first.bundle_digest, second.bundle_digest);
        for p in [
            layout.pki_dir().join("ca.key"),
            layout.cert_and_key(&first.tokend).1,
        ] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is readable by others", p.display());
        }
        let alice = &first.clients[0];
        let config = ClientConfig::load(&alice.1).unwrap();
        assert!(config.cert.exists() && config.key.exists() && config.ca.exists());
    }

    #[test]
    fn an_edited_unsigned_bundle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = Name::new("local").unwrap();
        let now = OffsetDateTime::now_utc();
        bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap();
        let quotas = layout.entitlements_dir().join("quotas.toml");
        let mut text = std::fs::read_to_string(&quotas).unwrap();
        text = text.replace("max_resources = 20", "max_resources = 2000");
        std::fs::write(&quotas, text).unwrap();
        let err = bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap_err();
        assert!(matches!(err, CellError::Entitlements { .. }), "{err}");
    }

    #[test]
    fn an_edited_rule_is_an_unsigned_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = Name::new("local").unwrap();
        let now = OffsetDateTime::now_utc();
        bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap();
        let rule = layout
            .entitlements_dir()
            .join("rules/sensitive-operation.yml");
        let text = std::fs::read_to_string(&rule).unwrap();
        std::fs::write(&rule, text.replace("host.drain", "host.none")).unwrap();
        let err = bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap_err();
        assert!(matches!(err, CellError::Entitlements { .. }), "{err}");
    }

    /// Turns the bundle of a fresh cell into one of the format before
    /// serials, signed by both local reviewers, with the monitor rules in
    /// `<state>/rules` (one of them edited).
    fn make_unserialed_cell(layout: &CellLayout, cell: &Name, now: OffsetDateTime) {
        bootstrap(layout, cell, "127.0.0.1:7443", now).unwrap();
        let bundle = layout.entitlements_dir();
        std::fs::remove_file(bundle.join(MANIFEST_FILE)).unwrap();
        std::fs::rename(bundle.join("rules"), layout.rules_dir()).unwrap();
        std::fs::remove_dir_all(bundle.join("signatures")).unwrap();
        let rule = layout.rules_dir().join("many-hosts.yml");
        let text = std::fs::read_to_string(&rule).unwrap();
        std::fs::write(&rule, format!("{text}\n# tuned here\n")).unwrap();
        let reviewers = ReviewerSet::load(&layout.reviewers_file()).unwrap();
        let Err(PolicyError::NotEnoughReviewers { digest, .. }) =
            verify_unserialed_bundle(&bundle, &reviewers)
        else {
            panic!("an unsigned bundle verified")
        };
        std::fs::create_dir(bundle.join("signatures")).unwrap();
        for name in LOCAL_REVIEWERS {
            let key = ReviewerKey::load(
                &layout.reviewer_keys_dir().join(format!("{name}.key")),
                Name::new(name).unwrap(),
            )
            .unwrap();
            std::fs::write(
                bundle.join(format!("signatures/{name}.sig")),
                key.signature_file(&digest),
            )
            .unwrap();
        }
    }

    #[test]
    fn a_reviewed_bundle_from_before_serials_is_migrated_with_the_cells_rules() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = Name::new("local").unwrap();
        let now = OffsetDateTime::now_utc();
        make_unserialed_cell(&layout, &cell, now);
        let migrated = bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap();
        assert!(migrated.bundle_migrated);
        assert_eq!(migrated.bundle_serial, 1);
        let rules = layout.entitlements_dir().join("rules");
        assert!(
            std::fs::read_to_string(rules.join("many-hosts.yml"))
                .unwrap()
                .contains("# tuned here"),
            "the rules the cell ran are kept"
        );
        assert_eq!(std::fs::read_dir(&rules).unwrap().count(), 5);
        assert!(!layout.rules_dir().exists());
        let again = bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap();
        assert!(!again.bundle_migrated);
        assert_eq!(again.bundle_digest, migrated.bundle_digest);
    }

    #[test]
    fn an_unreviewed_bundle_from_before_serials_is_not_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = Name::new("local").unwrap();
        let now = OffsetDateTime::now_utc();
        make_unserialed_cell(&layout, &cell, now);
        let quotas = layout.entitlements_dir().join("quotas.toml");
        let text = std::fs::read_to_string(&quotas).unwrap();
        std::fs::write(
            &quotas,
            text.replace("max_resources = 20", "max_resources = 2000"),
        )
        .unwrap();
        let err = bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap_err();
        assert!(matches!(err, CellError::Entitlements { .. }), "{err}");
        assert!(!layout.entitlements_dir().join(MANIFEST_FILE).exists());
        assert!(layout.rules_dir().join("many-hosts.yml").exists());
    }

    #[test]
    fn another_cells_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let now = OffsetDateTime::now_utc();
        bootstrap(&layout, &Name::new("local").unwrap(), "127.0.0.1:1", now).unwrap();
        let err = bootstrap(&layout, &Name::new("other").unwrap(), "127.0.0.1:1", now).unwrap_err();
        assert!(matches!(err, CellError::OtherCell { .. }), "{err}");
    }

    #[test]
    fn a_host_gets_a_certificate_a_private_dir_and_the_pinned_keys() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = Name::new("local").unwrap();
        let h1 = Name::new("h1").unwrap();
        let now = OffsetDateTime::now_utc();
        bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap();
        // No published keys yet: refused, nothing pinned.
        let err = provision_host(&layout, &cell, &h1, now).unwrap_err();
        assert!(matches!(err, CellError::Io { .. }), "{err}");
        assert!(!layout.host_issuer_keys(&h1).exists());

        std::fs::create_dir_all(layout.tokend_dir()).unwrap();
        std::fs::write(layout.issuer_keys_file(), "first").unwrap();
        let host = provision_host(&layout, &cell, &h1, now).unwrap();
        assert_eq!(host.principal.uri(), "nitrile://local/host/h1");
        assert_eq!(host.dir, layout.host_dir(&h1));
        assert_eq!(std::fs::read_to_string(&host.issuer_keys).unwrap(), "first");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o077;
        assert_eq!(mode(&host.key), 0, "host key readable by others");
        assert_eq!(mode(&host.dir), 0, "host dir readable by others");
        let cert = std::fs::read(&host.cert).unwrap();

        // Again: a new certificate, and a rotated key set is pinned anew.
        std::fs::write(layout.issuer_keys_file(), "rotated").unwrap();
        let again = provision_host(&layout, &cell, &h1, now + time::Duration::seconds(2)).unwrap();
        assert_eq!(
            std::fs::read_to_string(&again.issuer_keys).unwrap(),
            "rotated"
        );
        assert_ne!(std::fs::read(&again.cert).unwrap(), cert);
    }

    #[test]
    fn client_configs_name_the_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = Name::new("local").unwrap();
        let now = OffsetDateTime::now_utc();
        bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap();
        let hosts = BTreeMap::from([("h1".to_owned(), "127.0.0.1:7444".to_owned())]);
        let endpoints = Endpoints {
            tokend: "127.0.0.1:7443".into(),
            logd: Some("127.0.0.1:7445".into()),
            kms: Some("127.0.0.1:7447".into()),
            placement: None,
            deployer: None,
        };
        let vkey = "local.nitrile/log+01020304+AQ";
        let witnesses = vec!["local.nitrile/witness+05060708+BA".to_owned()];
        let clients =
            write_client_configs(&layout, &cell, &endpoints, &hosts, Some(vkey), &witnesses)
                .unwrap();
        assert_eq!(clients.len(), SAMPLE_PRINCIPALS.len());
        for (_, path) in clients {
            let loaded = ClientConfig::load(&path).unwrap();
            assert_eq!(loaded.hosts, hosts);
            assert_eq!(loaded.endpoints, endpoints);
            assert_eq!(loaded.log_vkey.as_deref(), Some(vkey));
            assert_eq!(loaded.witness_vkeys, witnesses);
        }
    }

    #[test]
    fn the_key_service_gets_a_certificate_a_private_dir_and_the_pinned_keys() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = Name::new("local").unwrap();
        let now = OffsetDateTime::now_utc();
        bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap();
        assert!(provision_kms(&layout, &cell, now).is_err());
        std::fs::create_dir_all(layout.tokend_dir()).unwrap();
        std::fs::write(layout.issuer_keys_file(), "keys").unwrap();
        let kms = provision_kms(&layout, &cell, now).unwrap();
        assert_eq!(kms.principal.uri(), "nitrile://local/service/kms");
        assert_eq!(kms.dir, layout.kms_dir());
        assert_eq!(std::fs::read_to_string(&kms.issuer_keys).unwrap(), "keys");
        assert_eq!(kms.issuer_keys, layout.kms_issuer_keys());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o077;
        assert_eq!(mode(&kms.key), 0, "kms key readable by others");
        assert_eq!(mode(&kms.dir), 0, "kms dir readable by others");
    }

    #[test]
    fn the_witness_gets_a_service_certificate_and_a_private_dir_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = Name::new("local").unwrap();
        let now = OffsetDateTime::now_utc();
        bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap();
        let w = provision_witness(&layout, &cell, now).unwrap();
        assert_eq!(w.principal.uri(), "nitrile://local/service/witness");
        assert_eq!(w.dir, layout.witness_dir());
        assert_ne!(w.dir, layout.logd_dir());
        assert!(w.cert.exists());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o077;
        assert_eq!(mode(&w.key), 0, "witness key readable by others");
        assert_eq!(mode(&w.dir), 0, "witness dir readable by others");
    }

    #[test]
    fn logd_gets_a_service_certificate_a_private_dir_and_the_pinned_keys() {
        let dir = tempfile::tempdir().unwrap();
        let layout = CellLayout::new(&dir.path().join("state"));
        let cell = Name::new("local").unwrap();
        let now = OffsetDateTime::now_utc();
        bootstrap(&layout, &cell, "127.0.0.1:7443", now).unwrap();
        assert!(provision_logd(&layout, &cell, now).is_err());
        std::fs::create_dir_all(layout.tokend_dir()).unwrap();
        std::fs::write(layout.issuer_keys_file(), "keys").unwrap();
        let logd = provision_logd(&layout, &cell, now).unwrap();
        assert_eq!(logd.principal.uri(), "nitrile://local/service/logd");
        assert_eq!(logd.dir, layout.logd_dir());
        assert_eq!(std::fs::read_to_string(&logd.issuer_keys).unwrap(), "keys");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o077;
        assert_eq!(mode(&logd.key), 0, "logd key readable by others");
        assert_eq!(mode(&logd.dir), 0, "logd dir readable by others");
    }
}
