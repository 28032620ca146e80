//! The monitor's rules, from the cell's signed entitlement bundle only.
//!
//! logd runs the rules of `rules/*.yml` of a bundle that verifies against
//! the cell's reviewers (two distinct reviewer signatures over its digest,
//! which covers the rules, as the token service requires), and whose serial
//! is not below the highest logd has loaded (`<state>/bundle-serial.json`,
//! [`nitrile_policy::SerialStore`]; the same serial with another digest is
//! refused too). An edited, added or removed rule without new signatures,
//! or an older bundle, stops logd from starting. The rules parsed are the
//! bytes whose digest was verified: nothing is read from disk twice.

use std::path::{Path, PathBuf};

use nitrile_monitor::{MAX_RULE_FILES, Monitor, RuleError};
use nitrile_policy::{
    Bundle, BundleAdvance, MIN_REVIEWERS, PolicyError, ReviewError, ReviewerSet, SERIAL_FILE,
    SerialError, SerialStore, verify_bundle,
};

use crate::config::MonitorSource;

/// Why the monitor's rules could not be loaded from the bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleRulesError {
    /// the reviewer set could not be loaded
    #[error("reviewer set {}", path.display())]
    Reviewers {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<ReviewError>,
    },
    /// the bundle is not readable or not signed by enough reviewers (an
    /// edited rule is a change the reviewers did not sign)
    #[error(
        "entitlement bundle {} refused: the monitor runs only reviewed rules; after changing \
         a rule, raise the serial in bundle.toml and have two reviewers sign the bundle",
        path.display()
    )]
    Bundle {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<PolicyError>,
    },
    /// the bundle is older than one logd has loaded, or reuses its serial
    #[error("entitlement bundle {} refused", path.display())]
    Order {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<SerialError>,
    },
    /// the record of the highest bundle loaded could not be read or written
    #[error("entitlement bundle serial record {}", path.display())]
    Serial {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<SerialError>,
    },
    /// the bundle has more rule files than the monitor loads
    #[error("{}: more than {MAX_RULE_FILES} rule files", path.display())]
    TooManyRuleFiles {
        /// The bundle.
        path: PathBuf,
    },
    /// a rule does not parse or the rules do not fit together
    #[error("monitor rules of the entitlement bundle {}", path.display())]
    Rules {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<RuleError>,
    },
}

/// A monitor of the rules of `bundle` (parsed from the bytes read, each
/// file named by its path in the bundle), with the default configuration
/// ([`Monitor::from_rule_files`], which tools use to check that a bundle's
/// rules load before it is signed).
pub fn monitor_of(bundle: &Bundle) -> Result<Monitor, BundleRulesError> {
    let path = || bundle.dir().to_path_buf();
    if bundle.rule_files().count() > MAX_RULE_FILES {
        return Err(BundleRulesError::TooManyRuleFiles { path: path() });
    }
    Monitor::from_rule_files(bundle.rule_files()).map_err(|source| BundleRulesError::Rules {
        path: path(),
        source: Box::new(source),
    })
}

/// The monitor of the reviewed bundle `source.bundle`, after checking its
/// serial against (and recording it in) logd's state directory `state`.
/// Returns the bundle's advance for the caller to report.
pub fn load_reviewed_monitor(
    source: &MonitorSource,
    state: &Path,
) -> Result<(Monitor, BundleAdvance), BundleRulesError> {
    let reviewers =
        ReviewerSet::load(&source.reviewers).map_err(|e| BundleRulesError::Reviewers {
            path: source.reviewers.clone(),
            source: Box::new(e),
        })?;
    let reviewed = verify_bundle(&source.bundle, &reviewers, MIN_REVIEWERS).map_err(|e| {
        BundleRulesError::Bundle {
            path: source.bundle.clone(),
            source: Box::new(e),
        }
    })?;
    let monitor = monitor_of(reviewed.bundle())?;
    let serial_path = state.join(SERIAL_FILE);
    let serial_error = |e| BundleRulesError::Serial {
        path: serial_path.clone(),
        source: Box::new(e),
    };
    let mut store = SerialStore::open(&serial_path).map_err(serial_error)?;
    let advance = store
        .check(reviewed.version())
        .map_err(|e| BundleRulesError::Order {
            path: source.bundle.clone(),
            source: Box::new(e),
        })?;
    store.record(&advance).map_err(serial_error)?;
    Ok((monitor, advance))
}
