//! Entitlements of a nitrile cell: which operator groups may call which admin
//! operations on which resource sets, limited by quotas over time windows, in a
//! small bundle that only peer review can change.
//!
//! This crate guarantees:
//! - A bundle ([`Bundle`]) is a directory whose every file has a known role;
//!   unknown files, links and oversize files are refused, never skipped. It is
//!   read once into memory and everything else works on those bytes.
//! - Loading is strict: policies are validated by Cedar's validator in strict
//!   mode against the fixed schema [`SCHEMA_TEXT`], entities and quotas against
//!   the same schema and vocabulary, and every error names `file:line[:col]`.
//! - [`Entitlements::load_reviewed`] loads only a bundle whose current digest
//!   carries valid Ed25519 signatures of at least [`MIN_REVIEWERS`] distinct
//!   reviewers of a [`ReviewerSet`] that the cell keeps outside the bundle.
//! - Every bundle has a serial ([`BundleSerial`]: `serial = N` in
//!   `bundle.toml`, [`MANIFEST_FILE`]) covered by that digest, so reviewers
//!   sign the order of bundles too; [`SerialStore`] keeps the highest serial
//!   (and its digest) a service has loaded, durably, and refuses an older
//!   serial or the same serial with other content: a bundle that was once
//!   signed cannot be brought back after a later one replaced it.
//! - The audit log monitor's rules (`rules/*.yml`) are files of the bundle,
//!   covered by the digest and the signatures like the policies
//!   ([`Bundle::rule_files`]); this crate does not parse them (the monitor
//!   does).
//! - [`Entitlements::authorize`] allows a request only if every (operation,
//!   resource) pair is permitted under one group of the principal, evaluated
//!   as a member of that group alone, and no policy errors (errors deny).
//!   Evaluation uses only the policies of that group's slice; slicing is exact,
//!   and a property test checks it against the whole policy set.
//! - [`QuotaStore::try_charge_request`] charges every (operation, resource)
//!   of a request or none: all quotas of the request are checked and charged
//!   under one lock and committed in one SQLite transaction (WAL,
//!   `synchronous=FULL`) before it returns.
//!
//! It does not authenticate principals (the token service does, by mTLS
//! certificate), does not know which cell a principal belongs to (callers pass
//! only principals of their own cell), and does not read the clock: `now` is
//! passed in.
//!
//! # Bundle format
//!
//! ```text
//! bundle.toml                 serial = N: 1 or more, raised with every change (required)
//! schema.cedarschema          the fixed schema, SCHEMA_TEXT (required)
//! groups.json, *.entities.json  groups, principals, resource sets, hosts, logs
//! *.cedar                     policies
//! quotas.toml                 quotas (optional)
//! rules/*.yml, rules/*.yaml   the audit log monitor's rules (optional)
//! signatures/<reviewer>.sig   detached reviewer signatures (not digested)
//! ```
//!
//! The digest ([`Bundle::digest`]) is SHA-256 over every file but
//! `signatures/`, `bundle.toml` and `rules/` included; a reviewer signs
//! `nitrile-entitlements-v1\n<digest hex>\n`. So the serial and the rules are
//! as reviewed as the policies. A service that loads a bundle keeps the
//! highest [`BundleVersion`] (serial and digest) it has loaded in
//! `<its state>/bundle-serial.json` ([`SerialStore`]) and refuses to load a
//! bundle below it.
//!
//! # Quota durability and throughput
//!
//! Decisions are made against an in-memory copy of the charges in their
//! windows, under one lock, so concurrent requests see each other at once.
//! Charges are then committed by one writer thread that puts everything queued
//! into one SQLite transaction (WAL, `synchronous=FULL`): group commit, one
//! fsync for many charges; the charges of one request are one job, so they
//! are in the same transaction. `try_charge_request` returns only once its charges are
//! durable; a failed commit refuses the request and leaves the charge counted
//! in memory, so failures only make quotas stricter. At start the store loads
//! the charges from the file. `docs/PERFORMANCE.md` has the numbers.

#![forbid(unsafe_code)]

mod bundle;
mod decide;
mod diff;
mod load;
mod manifest;
mod quota;
mod review;
mod schema;
mod serial;
pub mod synth;

use std::fmt;
use std::path::PathBuf;

pub use bundle::{
    Bundle, BundleDigest, MAX_BUNDLE_FILE_SIZE, MAX_BUNDLE_FILES, MAX_BUNDLE_TOTAL_SIZE, RULES_DIR,
    SIGNATURES_DIR,
};
pub use decide::{Authorized, Denied, Explanation, GroupDenial, GroupExplanation, PolicyRef};
pub use diff::{Change, Grant, GrantChange, Target, diff};
pub use load::{Entitlements, GroupSummary, MAX_ENTITIES, MAX_POLICIES, Summary};
pub use manifest::{BundleSerial, BundleVersion, MANIFEST_FILE, MAX_BUNDLE_SERIAL};
pub use quota::{
    MAX_QUOTA_LIMIT, MAX_QUOTA_WINDOW_SECS, Quota, QuotaCharge, QuotaError, QuotaExceeded,
    QuotaPer, QuotaProblem, QuotaStore, QuotaWindow, Quotas,
};
pub use review::{
    MAX_REVIEWER_FILE_SIZE, MAX_SIGNATURE_FILE_SIZE, MIN_REVIEWERS, RejectedSignature, ReviewError,
    ReviewedBundle, ReviewedUnserialed, Reviewer, ReviewerKey, ReviewerSet, SignatureProblem,
    verify_bundle, verify_unserialed_bundle,
};
pub use schema::{NAMESPACE, SCHEMA_TEXT};
pub use serial::{BundleAdvance, MAX_SERIAL_FILE_LEN, SERIAL_FILE, SerialError, SerialStore};

/// A place in a bundle file: `file:line[:column]`, 1-based.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Location {
    /// Path of the file relative to the bundle directory.
    pub file: String,
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1, when known.
    pub column: Option<usize>,
}

impl Location {
    /// The location of byte `offset` of `text`, a file of the bundle.
    pub(crate) fn at_offset(file: &str, text: &str, offset: usize) -> Self {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Self {
            file: file.to_owned(),
            line,
            column: Some(column),
        }
    }

    /// A whole line of a file.
    pub(crate) fn line(file: &str, line: usize) -> Self {
        Self {
            file: file.to_owned(),
            line,
            column: None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.column {
            Some(c) => write!(f, "{}:{}:{}", self.file, self.line, c),
            None => write!(f, "{}:{}", self.file, self.line),
        }
    }
}

/// Why a bundle could not be read, loaded or accepted as reviewed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// reading a file or directory failed
    #[error("cannot read {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// the bundle holds a file whose name has no role
    #[error(
        "{path}: unknown file in the bundle; a bundle holds only bundle.toml, \
         schema.cedarschema, groups.json, *.entities.json, *.cedar, quotas.toml, rules/*.yml \
         and signatures/*.sig"
    )]
    UnknownFile {
        /// Relative path of the file.
        path: String,
    },
    /// the bundle holds a link, device or unexpected directory
    #[error("{path}: not a regular file")]
    NotARegularFile {
        /// Relative path.
        path: String,
    },
    /// a file is larger than [`MAX_BUNDLE_FILE_SIZE`]
    #[error("{path}: larger than {max} bytes")]
    FileTooLarge {
        /// Relative path.
        path: String,
        /// The bound.
        max: u64,
    },
    /// the bundle has more than [`MAX_BUNDLE_FILES`] files
    #[error("the bundle has more than {max} files")]
    TooManyFiles {
        /// The bound.
        max: usize,
    },
    /// the bundle is larger than [`MAX_BUNDLE_TOTAL_SIZE`]
    #[error("the bundle is larger than {max} bytes in total")]
    BundleTooLarge {
        /// The bound.
        max: u64,
    },
    /// a file is not UTF-8
    #[error("{at}: not valid UTF-8")]
    NotUtf8 {
        /// Where the first invalid byte is.
        at: Location,
    },
    /// the bundle has no bundle.toml, so no serial
    #[error(
        "bundle.toml:1: missing; every bundle has a serial: write `serial = 1` (or one above \
         the serial of the bundle it replaces) into bundle.toml and have it signed"
    )]
    MissingManifest,
    /// bundle.toml does not parse or has fields other than `serial`
    #[error("{at}: invalid bundle.toml (only `serial = N` is allowed)")]
    Manifest {
        /// Where.
        at: Location,
        /// The TOML error.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// the serial is not an integer from 1 to [`MAX_BUNDLE_SERIAL`]
    #[error("{at}: serial must be an integer from 1 to {MAX_BUNDLE_SERIAL}")]
    BadSerial {
        /// Where.
        at: Location,
    },
    /// the bundle has no schema.cedarschema
    #[error("schema.cedarschema:1: missing; copy it from the sample bundle")]
    MissingSchema,
    /// schema.cedarschema is not the nitrile schema
    #[error(
        "{at}: schema.cedarschema differs from the nitrile schema of this build \
         (`nitrile entitlements schema` prints it)"
    )]
    SchemaMismatch {
        /// The first line that differs.
        at: Location,
    },
    /// a JSON file does not parse
    #[error("{at}: invalid JSON")]
    Json {
        /// Where.
        at: Location,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// an entities file is not a JSON array of entities
    #[error("{at}: an entities file must be a JSON array of Cedar entities")]
    EntitiesNotAnArray {
        /// The file.
        at: Location,
    },
    /// an entity does not conform to the schema
    #[error("{at}: entity does not conform to the nitrile schema")]
    Entity {
        /// The entity's first line.
        at: Location,
        /// Cedar's error.
        #[source]
        source: Box<cedar_policy::entities_errors::EntitiesError>,
    },
    /// the bundle lists more than [`MAX_ENTITIES`] entities
    #[error("the bundle lists more than {max} entities")]
    TooManyEntities {
        /// The bound.
        max: usize,
    },
    /// an entity id is not a valid nitrile name
    #[error("{at}: entity id {id:?} is not a valid nitrile name")]
    BadEntityId {
        /// The entity's first line.
        at: Location,
        /// The id.
        id: String,
        /// Why.
        #[source]
        source: nitrile_api::IdError,
    },
    /// an entity of a kind that is never listed (instances, volumes)
    #[error(
        "{at}: {kind} entities are not listed in a bundle; scope them by `context.host` instead"
    )]
    UnlistedKind {
        /// The entity's first line.
        at: Location,
        /// The entity type.
        kind: &'static str,
    },
    /// the same entity is listed twice
    #[error("{at}: entity {uid} is already listed at {first}")]
    DuplicateEntity {
        /// The second listing.
        at: Location,
        /// The entity.
        uid: String,
        /// The first listing.
        first: Location,
    },
    /// an entity names a parent group or resource set that no file lists
    #[error("{at}: parent {parent} is not listed in any entities file")]
    UndeclaredParent {
        /// The entity's first line.
        at: Location,
        /// The parent.
        parent: String,
    },
    /// a policy file does not parse
    #[error("{at}: policy syntax error")]
    PolicySyntax {
        /// Where Cedar's parser stopped.
        at: Location,
        /// Cedar's errors.
        #[source]
        source: Box<cedar_policy::ParseErrors>,
    },
    /// a policy file holds a template (a policy with slots)
    #[error("{at}: templates are not allowed in an entitlement bundle")]
    Template {
        /// The template.
        at: Location,
    },
    /// two policies have the same id
    #[error("{at}: policy id {id:?} is already used at {first}")]
    DuplicatePolicyId {
        /// The second policy.
        at: Location,
        /// The id.
        id: String,
        /// The first policy.
        first: Location,
    },
    /// an `@id` annotation is empty, too long or has control characters
    #[error("{at}: @id must be 1 to 128 printable characters")]
    BadPolicyId {
        /// The policy.
        at: Location,
    },
    /// the bundle has more than [`MAX_POLICIES`] policies
    #[error("the bundle has more than {max} policies")]
    TooManyPolicies {
        /// The bound.
        max: usize,
    },
    /// a policy fails strict validation against the schema
    #[error("{at}: policy {policy} fails strict validation{}", more_note(*more))]
    Validation {
        /// Where the validator points.
        at: Location,
        /// The policy id.
        policy: String,
        /// The validator's error.
        #[source]
        source: Box<cedar_policy::ValidationError>,
        /// How many other validation errors there are.
        more: usize,
    },
    /// the validator warns about a policy (warnings are errors in a bundle)
    #[error("{at}: policy {policy}: validator warning")]
    ValidationWarning {
        /// Where the validator points.
        at: Location,
        /// The policy id.
        policy: String,
        /// The validator's warning.
        #[source]
        source: Box<cedar_policy::ValidationWarning>,
    },
    /// a policy names a group or resource set that no entities file lists
    #[error("{at}: policy {policy} names {entity}, which no entities file lists")]
    UndeclaredEntity {
        /// The policy.
        at: Location,
        /// The policy id.
        policy: String,
        /// The entity.
        entity: String,
    },
    /// quotas.toml does not parse
    #[error("{at}: invalid quotas.toml")]
    QuotaSyntax {
        /// Where.
        at: Location,
        /// The TOML error.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// a quota is not acceptable
    #[error("{at}: {problem}")]
    Quota {
        /// Where.
        at: Location,
        /// What is wrong.
        problem: QuotaProblem,
    },
    /// fewer valid reviewer signatures than required
    #[error(
        "bundle {digest} has {} valid reviewer signature(s) ({}), {required} required{}",
        valid.len(),
        names(valid),
        rejected_note(rejected)
    )]
    NotEnoughReviewers {
        /// The bundle digest that was checked.
        digest: BundleDigest,
        /// Reviewers whose signature is valid.
        valid: Vec<nitrile_api::Name>,
        /// How many are required.
        required: usize,
        /// Signatures that did not count, and why.
        rejected: Vec<RejectedSignature>,
    },
}

fn more_note(more: usize) -> String {
    if more == 0 {
        String::new()
    } else {
        format!(" (and {more} more validation error(s))")
    }
}

fn names(v: &[nitrile_api::Name]) -> String {
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
    }
}

fn rejected_note(rejected: &[RejectedSignature]) -> String {
    if rejected.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = rejected.iter().map(|r| r.to_string()).collect();
    format!("; rejected: {}", parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_lines_and_columns() {
        let text = "ab\ncdé\nf";
        assert_eq!(Location::at_offset("x", text, 0).to_string(), "x:1:1");
        assert_eq!(Location::at_offset("x", text, 3).to_string(), "x:2:1");
        assert_eq!(Location::at_offset("x", text, 7).to_string(), "x:2:4");
        assert_eq!(Location::at_offset("x", text, 8).to_string(), "x:3:1");
        assert_eq!(Location::at_offset("x", text, 99).to_string(), "x:3:2");
    }
}
