//! The entitlement bundle in force: reviewed, not older than any bundle the
//! service has loaded, and on the record.
//!
//! At every start the token service verifies the bundle's reviewer
//! signatures and loads it strictly, then compares its serial and digest
//! with the highest it has loaded (`<state>/bundle-serial.json`,
//! [`nitrile_policy::SerialStore`]). An older serial, or the same serial with
//! other content, is refused: the service does not start, and the refusal is
//! journaled (step `entitlement`, the bundle offered and the one in force in
//! `detail.bundle`). Otherwise the bundle in force is journaled durably, as an
//! `executed` outcome of the service's own principal with
//! `detail.bundle = {serial, digest, reviewers, previous?}` (`previous` when
//! the serial rose since the last start), and only then recorded as the
//! highest loaded.

use std::path::{Path, PathBuf};

use nitrile_api::PrincipalId;
use nitrile_api::wire::RefusalStep;
use nitrile_audit::{AuditRecord, Journal, Outcome, RequestId};
use nitrile_policy::{
    BundleAdvance, BundleVersion, Entitlements, MIN_REVIEWERS, ReviewerSet, SERIAL_FILE,
    SerialError, SerialStore, verify_bundle,
};
use time::OffsetDateTime;

use crate::TokendError;

/// The key of the journal record's `detail` that describes the bundle.
pub const BUNDLE_DETAIL_KEY: &str = "bundle";

/// The bundle loaded, and what the journal says of it.
#[derive(Debug)]
pub(crate) struct InForce {
    pub(crate) entitlements: Entitlements,
    pub(crate) version: BundleVersion,
}

/// Loads the reviewed bundle at `dir`, checks its serial against the one
/// recorded in `state`, journals the outcome into `journal` as `source`,
/// and records the serial. Fails closed at every step.
// The error is the one `Tokend::open` returns; this runs once, at start.
#[allow(clippy::result_large_err)]
pub(crate) fn load(
    dir: &Path,
    reviewers: &ReviewerSet,
    state: &Path,
    journal: &Journal,
    source: &PrincipalId,
    now: OffsetDateTime,
) -> Result<InForce, TokendError> {
    let refused = |source| TokendError::Entitlements {
        path: dir.to_path_buf(),
        source,
    };
    let reviewed = verify_bundle(dir, reviewers, MIN_REVIEWERS).map_err(refused)?;
    let version = reviewed.version();
    let names: Vec<String> = reviewed
        .reviewers()
        .iter()
        .map(ToString::to_string)
        .collect();
    let entitlements = Entitlements::from_reviewed(reviewed).map_err(refused)?;

    let serial_path = state.join(SERIAL_FILE);
    let serial_error = |path: &PathBuf| {
        let path = path.clone();
        move |source| TokendError::BundleSerial { path, source }
    };
    let mut store = SerialStore::open(&serial_path).map_err(serial_error(&serial_path))?;
    let advance = match store.check(version) {
        Ok(a) => a,
        Err(e) => {
            journal_refusal(journal, source, now, &e);
            return Err(TokendError::BundleOrder {
                path: dir.to_path_buf(),
                source: e,
            });
        }
    };
    let record = in_force_record(source, now, &advance, &names);
    journal.append(&record.encode()?)?;
    store.record(&advance).map_err(serial_error(&serial_path))?;
    Ok(InForce {
        entitlements,
        version,
    })
}

fn version_json(v: BundleVersion) -> serde_json::Value {
    serde_json::json!({ "serial": v.serial.get(), "digest": v.digest.to_hex() })
}

/// The outcome record of the bundle in force.
fn in_force_record(
    source: &PrincipalId,
    now: OffsetDateTime,
    advance: &BundleAdvance,
    reviewers: &[String],
) -> AuditRecord {
    let current = advance.current();
    let mut bundle = version_json(current);
    bundle["reviewers"] = serde_json::json!(reviewers);
    let reason = match advance.previous() {
        Some(previous) => {
            bundle["previous"] = version_json(previous);
            format!(
                "entitlement bundle serial {} in force, replacing serial {}",
                current.serial, previous.serial
            )
        }
        None if advance.is_first() => format!(
            "entitlement bundle serial {} in force, the first loaded",
            current.serial
        ),
        None => format!(
            "entitlement bundle serial {} in force, unchanged",
            current.serial
        ),
    };
    AuditRecord::outcome(
        now,
        source.clone(),
        RequestId::random(&mut rand_core::OsRng),
        Outcome::Executed,
    )
    .with_principal(source.clone())
    .with_reason(&reason)
    .with_detail(serde_json::json!({ BUNDLE_DETAIL_KEY: bundle }))
}

/// Journals a bundle refused for its serial; a journal that cannot take it
/// is reported on stderr (the service does not start either way).
fn journal_refusal(journal: &Journal, source: &PrincipalId, now: OffsetDateTime, e: &SerialError) {
    let (offered, in_force) = match e {
        SerialError::Rollback { loaded, recorded }
        | SerialError::SerialReused { loaded, recorded } => (*loaded, *recorded),
        _ => return,
    };
    let record = AuditRecord::refusal(
        now,
        source.clone(),
        RequestId::random(&mut rand_core::OsRng),
        RefusalStep::Entitlement,
        &e.to_string(),
    )
    .with_principal(source.clone())
    .with_detail(serde_json::json!({
        BUNDLE_DETAIL_KEY: {
            "refused": version_json(offered),
            "in_force": version_json(in_force),
        }
    }));
    let written = record
        .encode()
        .map_err(|e| e.to_string())
        .and_then(|b| journal.append(&b).map_err(|e| e.to_string()));
    if let Err(reason) = written {
        tracing::error!(%reason, "could not journal a refused entitlement bundle");
        eprintln!("nitrile tokend: could not journal the refused entitlement bundle: {reason}");
    }
}
